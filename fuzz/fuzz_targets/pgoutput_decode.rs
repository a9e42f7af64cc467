//! The pgoutput decoder on arbitrary replication payloads, and the text-value parser on every
//! value such a payload carries; also read as a streamed transaction's frame, or as a message
//! inside one of its segments.
//!
//! ```text
//!  XLogData payload ──► pgoutput::decode ──► tuple values ──► types::parse_text (each type)
//!                   ├─► pgoutput::stream_control
//!                   └─► pgoutput::split_xid ──► tag + body ──► pgoutput::decode
//! ```
#![no_main]

use bitclone9_core::ColumnType;
use bitclone9_postgres_source::pgoutput::{decode, split_xid, stream_control, Message, TupleValue};
use bitclone9_postgres_source::types::{parse_decimal, parse_text};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fn types() -> Vec<ColumnType> {
    let dec = ColumnType::Decimal {
        precision: 12,
        scale: 3,
    };
    vec![
        ColumnType::Int16,
        ColumnType::Int64,
        ColumnType::Float64,
        ColumnType::Bool,
        ColumnType::Bytes,
        dec.clone(),
        ColumnType::Date,
        ColumnType::Time,
        ColumnType::Timestamp,
        ColumnType::TimestampTz,
        ColumnType::Array(Box::new(ColumnType::Int32)),
        ColumnType::Array(Box::new(ColumnType::Text)),
        ColumnType::Array(Box::new(dec)),
        ColumnType::Array(Box::new(ColumnType::Timestamp)),
    ]
}

fn values(msg: &Message) -> Vec<&TupleValue> {
    match msg {
        Message::Insert { new, .. } => new.iter().collect(),
        Message::Update { old, new, .. } => old.iter().flatten().chain(new).collect(),
        Message::Delete { old, .. } => old.iter().collect(),
        _ => Vec::new(),
    }
}

fuzz_target!(|data: &[u8]| {
    let payload = Bytes::copy_from_slice(data);
    let _ = stream_control(&payload);
    if let Ok((tag, _xid, body)) = split_xid(&payload) {
        let mut v1 = vec![tag];
        v1.extend_from_slice(body);
        let _ = decode(&Bytes::from(v1));
    }
    if let Ok(msg) = decode(&payload) {
        for v in values(&msg) {
            if let TupleValue::Text(b) = v {
                if let Ok(text) = std::str::from_utf8(b) {
                    for ty in types() {
                        let _ = parse_text(&ty, text);
                    }
                }
            }
        }
    }
    // The raw input as one text value, too.
    if let Ok(text) = std::str::from_utf8(data) {
        for ty in types() {
            let _ = parse_text(&ty, text);
        }
        let _ = parse_decimal(text, 4);
    }
});
