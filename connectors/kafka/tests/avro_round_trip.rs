//! Property: a change encoded as a Kafka record (key and envelope, Confluent wire format) and
//! decoded by the sink's reader is the same change.
//!
//! ```text
//!  Change ──encode_key / encode_envelope──► bytes ──EventReader::decode──► Change (equal)
//! ```

use bitclone9_core::{
    Change, Column, ColumnType, Lsn, Op, Row, SnapshotMark, TableId, TableSchema, TxInfo, Value,
};
use bitclone9_kafka::decode::{Decoded, EventReader};
use bitclone9_kafka::encode::{encode_envelope, encode_key, SourceInfo};
use bitclone9_kafka::schema::{key_schema, value_schema};
use bitclone9_kafka::Registry;
use proptest::prelude::*;
use std::sync::Arc;
use std::time::Duration;

fn scalar_type() -> impl Strategy<Value = ColumnType> {
    prop_oneof![
        Just(ColumnType::Int16),
        Just(ColumnType::Int32),
        Just(ColumnType::Int64),
        Just(ColumnType::Float32),
        Just(ColumnType::Float64),
        Just(ColumnType::Bool),
        Just(ColumnType::Text),
        Just(ColumnType::Bytes),
        (1u32..=38)
            .prop_flat_map(|p| (Just(p), 0..=p))
            .prop_map(|(precision, scale)| ColumnType::Decimal { precision, scale }),
        Just(ColumnType::Date),
        Just(ColumnType::Time),
        Just(ColumnType::Timestamp),
        Just(ColumnType::TimestampTz),
        Just(ColumnType::Uuid),
        Just(ColumnType::Json),
        Just(ColumnType::Enum),
        Just(ColumnType::Other),
    ]
}

fn column_type() -> impl Strategy<Value = ColumnType> {
    prop_oneof![
        4 => scalar_type(),
        1 => scalar_type().prop_map(|t| ColumnType::Array(Box::new(t))),
    ]
}

/// A non-null value of the column's native Avro type.
fn native(ty: &ColumnType) -> BoxedStrategy<Value> {
    match ty {
        ColumnType::Int16 => any::<i16>().prop_map(|v| Value::Int(v.into())).boxed(),
        ColumnType::Int32 | ColumnType::Date => any::<i32>().prop_map(Value::Int).boxed(),
        ColumnType::Int64 | ColumnType::Time | ColumnType::Timestamp | ColumnType::TimestampTz => {
            any::<i64>().prop_map(Value::Long).boxed()
        }
        ColumnType::Float32 => any::<f32>().prop_map(Value::Float).boxed(),
        ColumnType::Float64 => any::<f64>().prop_map(Value::Double).boxed(),
        ColumnType::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        ColumnType::Text
        | ColumnType::Uuid
        | ColumnType::Json
        | ColumnType::Enum
        | ColumnType::Other => any::<String>().prop_map(Value::Text).boxed(),
        ColumnType::Bytes => proptest::collection::vec(any::<u8>(), 0..40)
            .prop_map(Value::Bytes)
            .boxed(),
        ColumnType::Decimal { .. } => proptest::collection::vec(any::<u8>(), 1..17)
            .prop_map(Value::Decimal)
            .boxed(),
        ColumnType::Array(elem) => {
            proptest::collection::vec(prop_oneof![1 => Just(Value::Null), 4 => native(elem)], 0..5)
                .prop_map(Value::Array)
                .boxed()
        }
    }
}

/// A non-null value: native, or in text form where the column's field has a `string` branch.
fn present(ty: &ColumnType) -> BoxedStrategy<Value> {
    match ty {
        ColumnType::Decimal { .. } | ColumnType::Array(_) => prop_oneof![
            4 => native(ty),
            1 => any::<String>().prop_map(Value::Text),
        ]
        .boxed(),
        _ => native(ty),
    }
}

fn optional(ty: &ColumnType, toast: bool) -> BoxedStrategy<Value> {
    if toast {
        prop_oneof![1 => Just(Value::Null), 1 => Just(Value::UnchangedToast), 5 => present(ty)]
            .boxed()
    } else {
        prop_oneof![1 => Just(Value::Null), 5 => present(ty)].boxed()
    }
}

/// A row of `table`; key columns always have a value, other columns may be NULL (or, in the new
/// row of an update, an unchanged TOAST value).
fn row(table: &TableSchema, toast: bool) -> BoxedStrategy<Row> {
    table
        .columns
        .iter()
        .map(|c| {
            if c.is_key {
                present(&c.ty)
            } else {
                optional(&c.ty, toast)
            }
        })
        .collect::<Vec<_>>()
        .boxed()
}

fn table() -> impl Strategy<Value = TableSchema> {
    (proptest::collection::vec(column_type(), 1..8), 1usize..=2).prop_map(|(types, keys)| {
        TableSchema {
            id: TableId::new("public", "t"),
            relation_id: 1,
            columns: types
                .into_iter()
                .enumerate()
                .map(|(i, ty)| Column {
                    name: format!("c {i}"),
                    ty,
                    pg_type: "t".into(),
                    type_oid: 0,
                    is_key: i < keys,
                    attnum: i16::try_from(i + 1).ok(),
                })
                .collect(),
        }
    })
}

fn change() -> impl Strategy<Value = Change> {
    table().prop_flat_map(|t| {
        let op = prop_oneof![
            Just(Op::Insert),
            Just(Op::Update),
            Just(Op::Delete),
            Just(Op::Read)
        ];
        (
            Just(Arc::new(t.clone())),
            op,
            row(&t, false),
            row(&t, true),
            any::<u64>(),
            any::<u32>(),
            0u64..1_000_000,
        )
            .prop_map(|(table, op, old, new, lsn, xid, seq)| {
                let (before, after) = match op {
                    Op::Delete => (Some(old), None),
                    Op::Update => (Some(old), Some(new)),
                    _ => (None, Some(old)),
                };
                Change {
                    table,
                    op,
                    before,
                    after,
                    tx: TxInfo {
                        xid: (op != Op::Read).then_some(xid),
                        commit_lsn: Lsn(lsn >> 1),
                        commit_time_us: 1_700_000_000_000_000,
                    },
                    seq,
                    snapshot: if op == Op::Read {
                        SnapshotMark::Yes
                    } else {
                        SnapshotMark::No
                    },
                }
            })
    })
}

/// Equality that takes NaN for NaN.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
        (Value::Double(x), Value::Double(y)) => x.to_bits() == y.to_bits(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (a, b) => a == b,
    }
}

fn same_row(a: &Option<Row>, b: &Option<Row>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y)),
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn change_to_avro_to_change(change in change()) {
        let topic = "demo.public.t";
        let key = key_schema(&change.table, topic).expect("tables here have keys");
        let value = value_schema(&change.table, topic).expect("envelope");
        let registry = Registry::new("http://127.0.0.1:1", Duration::from_millis(10)).expect("registry");
        let mut reader = EventReader::with_schemas(registry, &[(1, key.as_str()), (2, value.as_str())])
            .expect("the generated schemas parse");
        let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
        encode_key(&mut kbuf, 1, &change.table, &[change.after.as_ref(), change.before.as_ref()])
            .expect("key encodes");
        let info = SourceInfo { name: "demo".into(), db: "shop".into() };
        encode_envelope(&mut vbuf, 2, &change, &info, 5).expect("envelope encodes");
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let decoded = rt
            .block_on(reader.decode(topic, Some(&kbuf), Some(&vbuf), &Default::default()))
            .unwrap_or_else(|e| panic!("does not decode: {e}"));
        let Decoded::Change(got) = decoded else {
            panic!("a record with a value is a change")
        };
        prop_assert_eq!(got.op, change.op);
        prop_assert_eq!(got.seq, change.seq);
        prop_assert_eq!(got.tx.commit_lsn, change.tx.commit_lsn);
        prop_assert_eq!(got.tx.xid, change.tx.xid);
        prop_assert_eq!(got.snapshot, change.snapshot);
        prop_assert!(same_row(&got.before, &change.before), "before: {:?} != {:?}", got.before, change.before);
        prop_assert!(same_row(&got.after, &change.after), "after: {:?} != {:?}", got.after, change.after);
        let keys: Vec<bool> = got.table.columns.iter().map(|c| c.is_key).collect();
        let want: Vec<bool> = change.table.columns.iter().map(|c| c.is_key).collect();
        prop_assert_eq!(keys, want);
        let attnums: Vec<Option<i16>> = got.table.columns.iter().map(|c| c.attnum).collect();
        let want: Vec<Option<i16>> = change.table.columns.iter().map(|c| c.attnum).collect();
        prop_assert_eq!(attnums, want, "column numbers travel in pg.attnum");
    }
}
