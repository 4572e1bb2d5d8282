//! An incremental Server-Sent Events splitter for `tether load --url`: bytes in as they
//! arrive off the wire, each complete event's `data` out.
//!
//! Owns the SSE framing only (events end with a blank line, `\n` or `\r\n`; comment
//! lines such as keep-alives carry no data and yield nothing); what an event means is
//! the client's business.

/// Splits a byte stream into SSE events.
#[derive(Debug, Default)]
pub(crate) struct SseSplitter {
    buf: Vec<u8>,
}

/// One event's payload.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SseEvent {
    /// The `data:` lines of an event, joined with `\n`.
    Data(String),
    /// An event whose data is not UTF-8.
    NotUtf8,
}

impl SseSplitter {
    /// Feed `bytes`; returns the events they completed, in order.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some((end, sep)) = event_end(&self.buf) {
            let event: Vec<u8> = self.buf.drain(..end + sep).collect();
            let Ok(text) = std::str::from_utf8(&event[..end]) else {
                out.push(SseEvent::NotUtf8);
                continue;
            };
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("data:")
                        .map(|d| d.strip_prefix(' ').unwrap_or(d))
                })
                .collect();
            if !data.is_empty() {
                out.push(SseEvent::Data(data.join("\n")));
            }
        }
        out
    }

    /// Whether bytes of an unfinished event are waiting.
    pub(crate) fn has_partial(&self) -> bool {
        self.buf.iter().any(|b| !b.is_ascii_whitespace())
    }
}

/// Where the first event in `buf` ends and how long its separator is.
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads() {
        let mut s = SseSplitter::default();
        assert_eq!(s.push(b"data: {\"a\""), vec![]);
        assert!(s.has_partial());
        assert_eq!(
            s.push(b":1}\n\n: keep-alive\n\ndata:[DONE]\r\n\r\n"),
            vec![
                SseEvent::Data("{\"a\":1}".to_owned()),
                SseEvent::Data("[DONE]".to_owned())
            ]
        );
        assert!(!s.has_partial());
        assert_eq!(
            s.push(b"data: a\ndata: b\n\n"),
            vec![SseEvent::Data("a\nb".to_owned())]
        );
        assert_eq!(s.push(b"data: \xff\n\n"), vec![SseEvent::NotUtf8]);
    }
}
