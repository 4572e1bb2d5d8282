//! Bytes decoded as every protocol type: decoding never panics, and whatever decodes
//! re-encodes and decodes back to the same value (and the same bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tether_core::{
    Annotated, Chunk, EngineError, ErrorKind, FinishReason, Mode, Request, TraceLink,
};

fn stable<T>(data: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(value) = serde_json::from_slice::<T>(data) else {
        return;
    };
    let json = serde_json::to_string(&value)
        .unwrap_or_else(|e| panic!("{value:?} decoded but does not encode: {e}"));
    let back: T = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("{json} (from {value:?}) does not decode: {e}"));
    assert_eq!(back, value, "round trip via {json}");
    assert_eq!(
        serde_json::to_string(&back).unwrap(),
        json,
        "encoding is stable"
    );
}

fuzz_target!(|data: &[u8]| {
    stable::<Request>(data);
    stable::<Chunk>(data);
    stable::<Annotated<Chunk>>(data);
    stable::<EngineError>(data);
    stable::<TraceLink>(data);
    stable::<FinishReason>(data);
    stable::<Mode>(data);
    stable::<ErrorKind>(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let mid = (s.len() / 2..=s.len())
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(s.len());
        let (a, b) = s.split_at(mid);
        let _ = TraceLink::parse(a, b);
        let _ = s.parse::<Mode>();
        let _ = s.parse::<ErrorKind>();
    }
});
