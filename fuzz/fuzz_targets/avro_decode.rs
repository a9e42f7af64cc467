//! The sink's Avro decoder on arbitrary Kafka record bytes.
//!
//! ```text
//!  input: [key length n][key: n bytes][value: the rest]
//!         │ schema ids rewritten to the two known ones (no registry lookups)
//!         ▼
//!  EventReader::decode(topic, key, value) ──► a change, a tombstone or an error; never a panic
//! ```
#![no_main]

use bitclone9_core::{
    Change, Column, ColumnType, Lsn, Op, SnapshotMark, TableId, TableSchema, TxInfo, Value,
};
use bitclone9_kafka::decode::{Decoded, EventReader, TombstoneHeaders};
use bitclone9_kafka::encode::{encode_envelope, encode_key, SourceInfo};
use bitclone9_kafka::schema::{key_schema, value_schema};
use bitclone9_kafka::Registry;
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

const TOPIC: &str = "demo.public.all_types";

fn table() -> TableSchema {
    let col = |name: &str, ty: ColumnType, key: bool| Column {
        name: name.into(),
        ty,
        pg_type: "t".into(),
        type_oid: 0,
        is_key: key,
        attnum: None,
    };
    let dec = ColumnType::Decimal {
        precision: 10,
        scale: 2,
    };
    TableSchema {
        id: TableId::new("public", "all_types"),
        relation_id: 1,
        columns: vec![
            col("id", ColumnType::Int64, true),
            col("k2", dec.clone(), true),
            col("i2", ColumnType::Int16, false),
            col("i4", ColumnType::Int32, false),
            col("f4", ColumnType::Float32, false),
            col("f8", ColumnType::Float64, false),
            col("b", ColumnType::Bool, false),
            col("t", ColumnType::Text, false),
            col("by", ColumnType::Bytes, false),
            col("n", dec.clone(), false),
            col("d", ColumnType::Date, false),
            col("tm", ColumnType::Time, false),
            col("ts", ColumnType::Timestamp, false),
            col("tz", ColumnType::TimestampTz, false),
            col("u", ColumnType::Uuid, false),
            col("j", ColumnType::Json, false),
            col("e", ColumnType::Enum, false),
            col("a", ColumnType::Array(Box::new(ColumnType::Int32)), false),
            col("an", ColumnType::Array(Box::new(dec)), false),
            col("o", ColumnType::Other, false),
        ],
    }
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    reader: EventReader,
}

fn fixture() -> Fixture {
    let t = table();
    let key = key_schema(&t, TOPIC).expect("the table has a key");
    let value = value_schema(&t, TOPIC).expect("the envelope builds");
    let registry =
        Registry::new("http://127.0.0.1:1", Duration::from_millis(10)).expect("registry client");
    let mut f = Fixture {
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime"),
        reader: EventReader::with_schemas(registry, &[(1, key.as_str()), (2, value.as_str())])
            .expect("the schemas parse"),
    };
    // One real record first: the reader then knows the topic's table, and tombstones need no
    // registry lookup.
    let table = Arc::new(t);
    let mut row = vec![Value::Null; table.columns.len()];
    row[0] = Value::Long(1);
    row[1] = Value::Text("NaN".into());
    let change = Change {
        table: table.clone(),
        op: Op::Insert,
        before: None,
        after: Some(row),
        tx: TxInfo {
            xid: Some(1),
            commit_lsn: Lsn(16),
            commit_time_us: 0,
        },
        seq: 0,
        snapshot: SnapshotMark::No,
    };
    let (mut k, mut v) = (Vec::new(), Vec::new());
    encode_key(&mut k, 1, &table, &[change.after.as_ref()]).expect("key encodes");
    let info = SourceInfo {
        name: "demo".into(),
        db: "demo".into(),
    };
    encode_envelope(&mut v, 2, &change, &info, 0).expect("envelope encodes");
    let decoded =
        f.runtime.block_on(
            f.reader
                .decode(TOPIC, Some(&k), Some(&v), &Default::default()),
        );
    assert!(matches!(decoded, Ok(Decoded::Change(_))), "{decoded:?}");
    f
}

thread_local! {
    static FIXTURE: RefCell<Fixture> = RefCell::new(fixture());
}

/// Points a framed message at schema `id`, so that no input needs the registry.
fn with_id(bytes: &[u8], id: u32) -> Vec<u8> {
    let mut b = bytes.to_vec();
    if b.len() >= 5 {
        b[1..5].copy_from_slice(&id.to_be_bytes());
    }
    b
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n).min(rest.len());
    let (key, value) = rest.split_at(n);
    let (key, value) = (with_id(key, 1), with_id(value, 2));
    let headers = TombstoneHeaders {
        schema: Some("public".into()),
        table: Some("all_types".into()),
        lsn: Some(Lsn(1)),
        seq: Some(0),
        txid: None,
    };
    FIXTURE.with(|f| {
        let f = &mut *f.borrow_mut();
        let key = (!key.is_empty()).then_some(key.as_slice());
        let _ = f.runtime.block_on(
            f.reader
                .decode(TOPIC, key, Some(&value), &Default::default()),
        );
        // The same key as a tombstone: the delete of that key.
        let _ = f
            .runtime
            .block_on(f.reader.decode(TOPIC, key, None, &headers));
    });
});
