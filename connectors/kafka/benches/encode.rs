//! The per-event hot paths of the Kafka side: Avro-encoding a change's key and envelope, and
//! decoding them back (what a sink does per record). Run with `cargo bench -p bitclone9-kafka`.

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
        attnum: None,
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

fn bench_decode(c: &mut Criterion) {
    use bitclone9_kafka::decode::{Decoded, EventReader};
    let change = orders_change();
    let topic = "shop.public.orders";
    let key_schema = bitclone9_kafka::schema::key_schema(&change.table, topic).expect("key");
    let value_schema = bitclone9_kafka::schema::value_schema(&change.table, topic).expect("value");
    let registry =
        bitclone9_kafka::Registry::new("http://127.0.0.1:1", std::time::Duration::from_secs(1))
            .expect("registry");
    let mut reader = EventReader::with_schemas(registry, &[(1, &key_schema), (2, &value_schema)])
        .expect("plans");
    let info = SourceInfo {
        name: "shop".into(),
        db: "shop".into(),
    };
    let (mut key, mut value) = (Vec::new(), Vec::new());
    encode_key(&mut key, 1, &change.table, &[change.after.as_ref()]).expect("key");
    encode_envelope(&mut value, 2, &change, &info, 1).expect("envelope");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("key_and_envelope_8_columns", |b| {
        b.iter(|| {
            let d = rt
                .block_on(reader.decode(
                    topic,
                    Some(&key),
                    Some(black_box(&value)),
                    &Default::default(),
                ))
                .expect("decodes");
            black_box(matches!(d, Decoded::Change(_)))
        })
    });
    g.finish();
}

criterion_group!(benches, bench_encode, bench_decode);
criterion_main!(benches);
