//! The per-event hot path of the Kafka side: Avro-encoding a change's key and envelope.
//! Run with `cargo bench -p bitclone9-kafka`.

use bitclone9_core::{
    Change, Column, ColumnType, Lsn, Op, SnapshotMark, TableId, TableSchema, TxInfo, Value,
};
use bitclone9_kafka::encode::{encode_envelope, encode_key, SourceInfo};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;

fn orders_change() -> Change {
    let col = |name: &str, ty, is_key| Column {
        name: name.into(),
        ty,
        pg_type: "t".into(),
        type_oid: 0,
        is_key,
    };
    let table = Arc::new(TableSchema {
        id: TableId::new("public", "orders"),
        relation_id: 1,
        columns: vec![
            col("id", ColumnType::Int64, true),
            col("customer_id", ColumnType::Int64, false),
            col("status", ColumnType::Enum, false),
            col(
                "total",
                ColumnType::Decimal {
                    precision: 12,
                    scale: 2,
                },
                false,
            ),
            col("placed_at", ColumnType::TimestampTz, false),
            col("note", ColumnType::Text, false),
            col("tags", ColumnType::Array(Box::new(ColumnType::Text)), false),
            col("paid", ColumnType::Bool, false),
        ],
    });
    Change {
        table,
        op: Op::Insert,
        before: None,
        after: Some(vec![
            Value::Long(123_456),
            Value::Long(42),
            Value::Text("paid".into()),
            Value::Decimal(vec![0x01, 0xE2, 0x40]),
            Value::Long(1_700_000_000_000_000),
            Value::Text("deliver to the back door, please".into()),
            Value::Array(vec![Value::Text("web".into()), Value::Text("promo".into())]),
            Value::Bool(true),
        ]),
        tx: TxInfo {
            xid: Some(7777),
            commit_lsn: Lsn(0x1_6B37_4D48),
            commit_time_us: 1_700_000_000_123_456,
        },
        seq: 3,
        snapshot: SnapshotMark::No,
    }
}

fn bench_encode(c: &mut Criterion) {
    let change = orders_change();
    let info = SourceInfo {
        name: "shop".into(),
        db: "shop".into(),
    };
    let (mut key, mut value) = (Vec::with_capacity(64), Vec::with_capacity(512));
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("key_and_envelope_8_columns", |b| {
        b.iter(|| {
            key.clear();
            value.clear();
            let rows = [change.after.as_ref(), change.before.as_ref()];
            encode_key(&mut key, 1, &change.table, &rows).expect("key");
            encode_envelope(&mut value, 2, black_box(&change), &info, 1_700_000_000_000)
                .expect("envelope");
            black_box((key.len(), value.len()))
        })
    });
    g.finish();
}

criterion_group!(benches, bench_encode);
criterion_main!(benches);
