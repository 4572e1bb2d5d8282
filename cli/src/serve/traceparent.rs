//! The W3C `traceparent` header of a generation request ([`Traceparent`]): a valid one
//! becomes the request's migration link, a malformed one of the right shape is kept as
//! it came for the adapter's span attributes and warning.
//!
//! Owns the header's parsing only; the handlers read the header and apply the result.

use tether_core::protocol::{RawTraceLink, Request, TraceLink};

/// The longest raw id kept from a malformed `traceparent` (the header is the client's;
/// what is kept ends up in logs and span attributes).
const MAX_RAW_ID: usize = 64;

/// What a request's W3C `traceparent` header (`{version}-{trace id}-{span id}-{flags}`)
/// gives its migration link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Traceparent {
    /// No header, or not of that shape (ignored, as W3C asks).
    Absent,
    /// A valid link.
    Link(TraceLink),
    /// The shape, with ids that do not parse: kept as they came (each cut to 64
    /// characters) for [`Request::malformed_migration_link`], so the adapter records
    /// them as span attributes and logs a warning; the request still runs.
    Malformed(RawTraceLink),
}

impl Traceparent {
    /// Read the header's value.
    pub(crate) fn parse(value: &str) -> Traceparent {
        let mut parts = value.trim().split('-');
        let (Some(version), Some(trace), Some(span), Some(_flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Traceparent::Absent;
        };
        // Version ff is forbidden: such a header is not a trace context at all.
        if version.len() != 2 || version == "ff" {
            return Traceparent::Absent;
        }
        match TraceLink::parse(trace, span) {
            Ok(link) => Traceparent::Link(link),
            Err(_) => Traceparent::Malformed(RawTraceLink {
                trace_id: cut(trace),
                span_id: cut(span),
            }),
        }
    }

    /// Set `request`'s migration link (or its malformed one) from this header.
    pub(crate) fn apply(self, request: &mut Request) {
        match self {
            Traceparent::Absent => {}
            Traceparent::Link(link) => request.migration_link = Some(link),
            Traceparent::Malformed(raw) => request.malformed_migration_link = Some(raw),
        }
    }
}

fn cut(id: &str) -> String {
    id.chars().take(MAX_RAW_ID).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_headers() {
        let Traceparent::Link(link) =
            Traceparent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        else {
            panic!("a valid traceparent is a link");
        };
        assert_eq!(link.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(link.span_id_hex(), "b7ad6b7169203331");
        let raw = |trace: &str, span: &str| {
            Traceparent::Malformed(RawTraceLink {
                trace_id: trace.to_owned(),
                span_id: span.to_owned(),
            })
        };
        // The W3C shape with bad ids: kept as it came.
        assert_eq!(
            Traceparent::parse("00-xyz-b7ad6b7169203331-01"),
            raw("xyz", "b7ad6b7169203331")
        );
        assert_eq!(
            Traceparent::parse("00-0AF7651916CD43DD8448EB211C80319C-0000000000000000-01"),
            raw("0AF7651916CD43DD8448EB211C80319C", "0000000000000000")
        );
        let long = "a".repeat(100);
        assert_eq!(
            Traceparent::parse(&format!("00-{long}-b7ad6b7169203331-01")),
            raw(&long[..64], "b7ad6b7169203331")
        );
        // Not the shape: ignored.
        assert_eq!(Traceparent::parse("garbage"), Traceparent::Absent);
        assert_eq!(Traceparent::parse("00-abc-def"), Traceparent::Absent);
        assert_eq!(
            Traceparent::parse("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            Traceparent::Absent
        );
        let mut request = Request::new("r", "sim", vec![1]);
        Traceparent::parse("00-xyz-b7ad6b7169203331-01").apply(&mut request);
        assert_eq!(request.migration_link, None);
        assert_eq!(
            request.malformed_migration_link,
            Some(RawTraceLink {
                trace_id: "xyz".to_owned(),
                span_id: "b7ad6b7169203331".to_owned(),
            })
        );
    }
}
