//! Avro binary encoding of keys and envelopes in the Confluent wire format (magic byte 0, the
//! 4-byte schema id, the Avro datum), written straight from [`Change`] into a reused buffer:
//! no intermediate value tree on the hot path. The field order is the one `schema.rs` generates;
//! tests decode the bytes with apache-avro against those schemas.

use crate::schema::has_text_form;
use bitclone9_core::{Change, ColumnType, Row, SnapshotMark, TableSchema, Value};

/// A value that does not fit its column's Avro type.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("table {table}, column {column}: value {value} does not fit {ty:?}")]
    Mismatch {
        table: String,
        column: String,
        value: String,
        ty: ColumnType,
    },
    #[error("table {table}: key column {column} has no value in the change")]
    MissingKey { table: String, column: String },
}

/// Fixed facts written into every envelope's `source` record.
#[derive(Debug, Clone)]
pub struct SourceInfo {
    pub name: String,
    pub db: String,
}

pub fn write_long(buf: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        buf.push((z as u8) | 0x80);
        z >>= 7;
    }
    buf.push(z as u8);
}

pub fn write_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    write_long(buf, b.len() as i64);
    buf.extend_from_slice(b);
}

/// Starts a Confluent-framed message for schema `id`.
pub fn write_header(buf: &mut Vec<u8>, id: u32) {
    buf.push(0);
    buf.extend_from_slice(&id.to_be_bytes());
}

fn mismatch(table: &TableSchema, col: usize, v: &Value, ty: &ColumnType) -> EncodeError {
    EncodeError::Mismatch {
        table: table.id.to_string(),
        column: table.columns[col].name.clone(),
        value: format!("{v:?}").chars().take(64).collect(),
        ty: ty.clone(),
    }
}

/// Writes a non-null value of type `ty`; `Err(())` when the value has another shape.
fn write_value(buf: &mut Vec<u8>, ty: &ColumnType, v: &Value) -> Result<(), ()> {
    match (ty, v) {
        (ColumnType::Int16 | ColumnType::Int32 | ColumnType::Date, Value::Int(i)) => {
            write_long(buf, i64::from(*i))
        }
        (
            ColumnType::Int64 | ColumnType::Time | ColumnType::Timestamp | ColumnType::TimestampTz,
            Value::Long(i),
        ) => write_long(buf, *i),
        (ColumnType::Float32, Value::Float(f)) => buf.extend_from_slice(&f.to_le_bytes()),
        (ColumnType::Float64, Value::Double(f)) => buf.extend_from_slice(&f.to_le_bytes()),
        (ColumnType::Bool, Value::Bool(b)) => buf.push(u8::from(*b)),
        (
            ColumnType::Text
            | ColumnType::Uuid
            | ColumnType::Json
            | ColumnType::Enum
            | ColumnType::Other,
            Value::Text(s),
        ) => write_bytes(buf, s.as_bytes()),
        (ColumnType::Bytes, Value::Bytes(b)) | (ColumnType::Decimal { .. }, Value::Decimal(b)) => {
            write_bytes(buf, b)
        }
        (ColumnType::Array(elem), Value::Array(items)) => {
            if !items.is_empty() {
                write_long(buf, items.len() as i64);
                for item in items {
                    write_optional(buf, elem, item)?;
                }
            }
            write_long(buf, 0);
        }
        _ => return Err(()),
    }
    Ok(())
}

/// Writes a `["null", T]` union; an unchanged TOAST value is written as null.
fn write_optional(buf: &mut Vec<u8>, ty: &ColumnType, v: &Value) -> Result<(), ()> {
    match v {
        Value::Null | Value::UnchangedToast => {
            write_long(buf, 0);
            Ok(())
        }
        v => {
            write_long(buf, 1);
            write_value(buf, ty, v)
        }
    }
}

/// Writes a column's field (`schema::field_type`): the union branch, then the value. A text value
/// in a column with a text form takes the `string` branch, which comes last.
fn write_field(buf: &mut Vec<u8>, ty: &ColumnType, v: &Value, optional: bool) -> Result<(), ()> {
    let first = i64::from(optional);
    match v {
        Value::Null | Value::UnchangedToast if optional => write_long(buf, 0),
        Value::Null | Value::UnchangedToast => return Err(()),
        Value::Text(s) if has_text_form(ty) => {
            write_long(buf, first + 1);
            write_bytes(buf, s.as_bytes());
        }
        v => {
            if optional || has_text_form(ty) {
                write_long(buf, first);
            }
            write_value(buf, ty, v)?;
        }
    }
    Ok(())
}

fn write_row(buf: &mut Vec<u8>, table: &TableSchema, row: &Row) -> Result<(), EncodeError> {
    for (i, (col, v)) in table.columns.iter().zip(row).enumerate() {
        write_field(buf, &col.ty, v, true).map_err(|()| mismatch(table, i, v, &col.ty))?;
    }
    Ok(())
}

/// Encodes the key record of `table` from `rows`, taking each key column's value from the first
/// row that has it (for a change: the new row, else the old one). Returns `Ok(false)` and writes
/// nothing when the table has no key or there is no row.
pub fn encode_key(
    buf: &mut Vec<u8>,
    schema_id: u32,
    table: &TableSchema,
    rows: &[Option<&Row>],
) -> Result<bool, EncodeError> {
    if !table.has_key() || rows.iter().all(Option::is_none) {
        return Ok(false);
    }
    write_header(buf, schema_id);
    for i in table.key_indexes() {
        let v = rows
            .iter()
            .flatten()
            .map(|r| &r[i])
            .find(|v| !matches!(v, Value::Null | Value::UnchangedToast))
            .ok_or_else(|| EncodeError::MissingKey {
                table: table.id.to_string(),
                column: table.columns[i].name.clone(),
            })?;
        write_field(buf, &table.columns[i].ty, v, false)
            .map_err(|()| mismatch(table, i, v, &table.columns[i].ty))?;
    }
    Ok(true)
}

/// Encodes the envelope of a change. `now_ms` is the processing time written to `ts_ms`.
pub fn encode_envelope(
    buf: &mut Vec<u8>,
    schema_id: u32,
    change: &Change,
    source: &SourceInfo,
    now_ms: i64,
) -> Result<(), EncodeError> {
    let table = &change.table;
    write_header(buf, schema_id);
    for row in [&change.before, &change.after] {
        match row {
            None => write_long(buf, 0),
            Some(r) => {
                write_long(buf, 1);
                write_row(buf, table, r)?;
            }
        }
    }
    // source
    write_bytes(buf, env!("CARGO_PKG_VERSION").as_bytes());
    write_bytes(buf, b"postgresql");
    write_bytes(buf, source.name.as_bytes());
    write_long(buf, change.tx.commit_time_us.div_euclid(1000));
    write_bytes(
        buf,
        match change.snapshot {
            SnapshotMark::No => b"false".as_slice(),
            SnapshotMark::Yes => b"true",
            SnapshotMark::Last => b"last",
        },
    );
    write_bytes(buf, source.db.as_bytes());
    write_bytes(buf, table.id.schema.as_bytes());
    write_bytes(buf, table.id.name.as_bytes());
    match change.tx.xid {
        Some(x) => {
            write_long(buf, 1);
            write_long(buf, i64::from(x));
        }
        None => write_long(buf, 0),
    }
    write_long(buf, 1);
    write_long(buf, change.tx.commit_lsn.0 as i64);
    write_long(buf, change.seq as i64);
    // op, ts_ms
    write_bytes(buf, change.op.code().as_bytes());
    write_long(buf, 1);
    write_long(buf, now_ms);
    // unchanged_columns
    let unchanged = change
        .after
        .as_ref()
        .map(|r| r.iter().filter(|v| **v == Value::UnchangedToast).count())
        .unwrap_or(0);
    if unchanged > 0 {
        write_long(buf, unchanged as i64);
        if let Some(row) = &change.after {
            for (col, v) in table.columns.iter().zip(row) {
                if *v == Value::UnchangedToast {
                    write_bytes(buf, col.name.as_bytes());
                }
            }
        }
    }
    write_long(buf, 0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema;
    use apache_avro::types::Value as Avro;
    use bitclone9_core::{Column, Lsn, Op, TableId, TxInfo};
    use std::sync::Arc;

    fn col(name: &str, ty: ColumnType, key: bool) -> Column {
        Column {
            name: name.into(),
            ty,
            pg_type: "t".into(),
            type_oid: 0,
            is_key: key,
            attnum: None,
        }
    }

    fn all_types_table() -> Arc<TableSchema> {
        Arc::new(TableSchema {
            id: TableId::new("public", "all types"),
            relation_id: 9,
            columns: vec![
                col("id", ColumnType::Int64, true),
                col("i2", ColumnType::Int16, false),
                col("i4", ColumnType::Int32, false),
                col("f4", ColumnType::Float32, false),
                col("f8", ColumnType::Float64, false),
                col("b", ColumnType::Bool, false),
                col("t", ColumnType::Text, false),
                col("by", ColumnType::Bytes, false),
                col(
                    "n",
                    ColumnType::Decimal {
                        precision: 10,
                        scale: 2,
                    },
                    false,
                ),
                col("d", ColumnType::Date, false),
                col("tm", ColumnType::Time, false),
                col("ts", ColumnType::Timestamp, false),
                col("tz", ColumnType::TimestampTz, false),
                col("u", ColumnType::Uuid, false),
                col("j", ColumnType::Json, false),
                col("e", ColumnType::Enum, false),
                col("a", ColumnType::Array(Box::new(ColumnType::Int32)), false),
                col("big", ColumnType::Text, false),
            ],
        })
    }

    fn decode(schema_json: &str, bytes: &[u8], id: u32) -> Avro {
        let schema = apache_avro::Schema::parse_str(schema_json).expect("schema parses");
        assert_eq!(bytes[0], 0, "magic byte");
        assert_eq!(&bytes[1..5], &id.to_be_bytes(), "schema id");
        let mut rest = &bytes[5..];
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .expect("reader");
        let v = reader.read_value(&mut rest).expect("datum decodes");
        assert!(rest.is_empty(), "no trailing bytes");
        v
    }

    fn field<'a>(record: &'a Avro, name: &str) -> &'a Avro {
        match record {
            Avro::Record(fields) => {
                &fields
                    .iter()
                    .find(|(n, _)| n == name)
                    .expect("field exists")
                    .1
            }
            other => panic!("not a record: {other:?}"),
        }
    }

    #[test]
    fn envelope_round_trips_through_apache_avro() {
        let table = all_types_table();
        let row = vec![
            Value::Long(42),
            Value::Int(-7),
            Value::Int(1 << 30),
            Value::Float(1.5),
            Value::Double(-2.25),
            Value::Bool(true),
            Value::Text("héllo".into()),
            Value::Bytes(vec![0, 1, 255]),
            Value::Decimal(vec![0x30, 0x39]),
            Value::Int(19_000),
            Value::Long(3_600_000_000),
            Value::Long(1_700_000_000_000_000),
            Value::Long(-1),
            Value::Text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".into()),
            Value::Text("{\"k\": 1}".into()),
            Value::Text("red".into()),
            Value::Array(vec![Value::Int(1), Value::Null, Value::Int(3)]),
            Value::UnchangedToast,
        ];
        let change = Change {
            table: table.clone(),
            op: Op::Update,
            before: None,
            after: Some(row),
            tx: TxInfo {
                xid: Some(777),
                commit_lsn: Lsn(0x1_0000_0010),
                commit_time_us: 1_700_000_000_123_456,
            },
            seq: 5,
            snapshot: SnapshotMark::No,
        };
        let topic = "demo.public.all types";
        let mut buf = Vec::new();
        let info = SourceInfo {
            name: "demo".into(),
            db: "shop".into(),
        };
        encode_envelope(&mut buf, 7, &change, &info, 99).expect("encodes");
        let v = decode(
            &schema::value_schema(&table, topic).expect("schema"),
            &buf,
            7,
        );
        assert_eq!(field(&v, "before"), &Avro::Union(0, Box::new(Avro::Null)));
        assert_eq!(field(&v, "op"), &Avro::String("u".into()));
        assert_eq!(
            field(&v, "ts_ms"),
            &Avro::Union(1, Box::new(Avro::Long(99)))
        );
        assert_eq!(
            field(&v, "unchanged_columns"),
            &Avro::Array(vec![Avro::String("big".into())])
        );
        let source = field(&v, "source");
        assert_eq!(
            field(source, "lsn"),
            &Avro::Union(1, Box::new(Avro::Long(0x1_0000_0010)))
        );
        assert_eq!(
            field(source, "txId"),
            &Avro::Union(1, Box::new(Avro::Long(777)))
        );
        assert_eq!(field(source, "seq"), &Avro::Long(5));
        assert_eq!(field(source, "ts_ms"), &Avro::Long(1_700_000_000_123));
        assert_eq!(field(source, "table"), &Avro::String("all types".into()));
        assert_eq!(field(source, "snapshot"), &Avro::String("false".into()));
        let Avro::Union(1, after) = field(&v, "after") else {
            panic!("after is set")
        };
        let opt = |name: &str| match field(after, name) {
            Avro::Union(1, inner) => (**inner).clone(),
            other => other.clone(),
        };
        assert_eq!(opt("id"), Avro::Long(42));
        assert_eq!(opt("i2"), Avro::Int(-7));
        assert_eq!(opt("f4"), Avro::Float(1.5));
        assert_eq!(opt("t"), Avro::String("héllo".into()));
        assert_eq!(opt("by"), Avro::Bytes(vec![0, 1, 255]));
        assert!(matches!(opt("n"), Avro::Decimal(_)));
        assert_eq!(opt("d"), Avro::Date(19_000));
        assert_eq!(opt("tm"), Avro::TimeMicros(3_600_000_000));
        assert_eq!(opt("ts"), Avro::LocalTimestampMicros(1_700_000_000_000_000));
        assert_eq!(opt("tz"), Avro::TimestampMicros(-1));
        assert!(matches!(opt("u"), Avro::Uuid(_)));
        assert_eq!(
            opt("a"),
            Avro::Array(vec![
                Avro::Union(1, Box::new(Avro::Int(1))),
                Avro::Union(0, Box::new(Avro::Null)),
                Avro::Union(1, Box::new(Avro::Int(3))),
            ])
        );
        assert_eq!(field(after, "big"), &Avro::Union(0, Box::new(Avro::Null)));

        let mut key = Vec::new();
        assert!(encode_key(
            &mut key,
            3,
            &table,
            &[change.after.as_ref(), change.before.as_ref()]
        )
        .expect("key encodes"));
        let k = decode(
            &schema::key_schema(&table, topic).expect("has key"),
            &key,
            3,
        );
        assert_eq!(k, Avro::Record(vec![("id".into(), Avro::Long(42))]));
    }

    #[test]
    fn mismatched_value_names_table_and_column() {
        let table = all_types_table();
        let mut row = vec![Value::Null; table.columns.len()];
        row[0] = Value::Long(1);
        row[2] = Value::Text("oops".into());
        let change = Change {
            table,
            op: Op::Insert,
            before: None,
            after: Some(row),
            tx: TxInfo {
                xid: None,
                commit_lsn: Lsn(1),
                commit_time_us: 0,
            },
            seq: 0,
            snapshot: SnapshotMark::Yes,
        };
        let info = SourceInfo {
            name: "s".into(),
            db: "d".into(),
        };
        let err = encode_envelope(&mut Vec::new(), 1, &change, &info, 0).expect_err("mismatch");
        assert!(err.to_string().contains("column i4"), "{err}");
    }

    #[test]
    fn zigzag_varints() {
        let enc = |v| {
            let mut b = Vec::new();
            write_long(&mut b, v);
            b
        };
        assert_eq!(enc(0), vec![0]);
        assert_eq!(enc(-1), vec![1]);
        assert_eq!(enc(1), vec![2]);
        assert_eq!(enc(64), vec![0x80, 1]);
        assert_eq!(enc(i64::MIN).len(), 10);
    }
}
