//! Property: a value the source read, written by the sink as a COPY text field and read back by
//! the source's COPY parser, is the same value.
//!
//! ```text
//!  Value ──copy_field──► COPY line ──parse_copy_line──► Value   (equal, for every type)
//! ```

use bitclone9_core::{Column, ColumnType, Row, TableId, TableSchema, Value};
use bitclone9_postgres_sink::text::copy_field;
use bitclone9_postgres_source::parse_copy_line;
use proptest::prelude::*;

fn decimal_type() -> impl Strategy<Value = ColumnType> {
    (1u32..=38)
        .prop_flat_map(|p| (Just(p), 0..=p))
        .prop_map(|(precision, scale)| ColumnType::Decimal { precision, scale })
}

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
        decimal_type(),
        Just(ColumnType::Date),
        Just(ColumnType::Time),
        Just(ColumnType::Timestamp),
        Just(ColumnType::TimestampTz),
        Just(ColumnType::Json),
        Just(ColumnType::Other),
    ]
}

fn column_type() -> impl Strategy<Value = ColumnType> {
    prop_oneof![
        4 => scalar_type(),
        1 => scalar_type().prop_map(|t| ColumnType::Array(Box::new(t))),
    ]
}

/// Minimal big-endian two's complement, as the source writes decimals.
fn twos_complement(v: i128) -> Vec<u8> {
    let b = v.to_be_bytes();
    let mut start = 0;
    while start < 15 {
        let (hi, next) = (b[start], b[start + 1]);
        if (hi == 0 && next & 0x80 == 0) || (hi == 0xff && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    b[start..].to_vec()
}

/// Values PostgreSQL can hold in a column of type `ty`, in the form the source reads them.
fn native_value(ty: &ColumnType) -> BoxedStrategy<Value> {
    match ty {
        ColumnType::Int16 => any::<i16>().prop_map(|v| Value::Int(v.into())).boxed(),
        ColumnType::Int32 => any::<i32>().prop_map(Value::Int).boxed(),
        ColumnType::Int64 => any::<i64>().prop_map(Value::Long).boxed(),
        ColumnType::Float32 => any::<f32>().prop_map(Value::Float).boxed(),
        ColumnType::Float64 => any::<f64>().prop_map(Value::Double).boxed(),
        ColumnType::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        // PostgreSQL text holds no NUL.
        ColumnType::Text | ColumnType::Json | ColumnType::Other => {
            "[^\u{0}]{0,40}".prop_map(Value::Text).boxed()
        }
        ColumnType::Bytes => proptest::collection::vec(any::<u8>(), 0..40)
            .prop_map(Value::Bytes)
            .boxed(),
        ColumnType::Decimal { precision, .. } => {
            let max = 10i128.pow((*precision).min(38)) - 1;
            (-max..=max)
                .prop_map(|v| Value::Decimal(twos_complement(v)))
                .boxed()
        }
        // 4713 BC to 5874897 AD, and ±infinity.
        ColumnType::Date => prop_oneof![
            8 => (-2_440_588i32..=2_145_042_905).prop_map(Value::Int),
            1 => prop_oneof![Just(i32::MAX), Just(i32::MIN)].prop_map(Value::Int),
        ]
        .boxed(),
        ColumnType::Time => (0i64..=86_400_000_000).prop_map(Value::Long).boxed(),
        // 4713 BC to 294246 AD, and ±infinity.
        ColumnType::Timestamp | ColumnType::TimestampTz => prop_oneof![
            8 => (-210_866_803_200_000_000i64..=9_223_339_000_000_000_000).prop_map(Value::Long),
            1 => prop_oneof![Just(i64::MAX), Just(i64::MIN)].prop_map(Value::Long),
        ]
        .boxed(),
        ColumnType::Uuid | ColumnType::Enum => "[a-z0-9-]{1,36}".prop_map(Value::Text).boxed(),
        ColumnType::Array(elem) => proptest::collection::vec(
            prop_oneof![1 => Just(Value::Null), 4 => native_value(elem)],
            0..5,
        )
        .prop_map(Value::Array)
        .boxed(),
    }
}

/// Any value of a column: NULL, native, or in text form where the type has one.
fn value(ty: &ColumnType) -> BoxedStrategy<Value> {
    let text_form = match ty {
        ColumnType::Decimal { .. } => prop_oneof![Just("NaN"), Just("Infinity"), Just("-Infinity")]
            .prop_map(|s| Value::Text(s.into()))
            .boxed(),
        ColumnType::Array(_) => prop_oneof![
            Just("{{1,2},{3,4}}"),
            Just("[0:2]={7,8,9}"),
            Just("{{\"a\\tb\"},{NULL}}"),
        ]
        .prop_map(|s| Value::Text(s.into()))
        .boxed(),
        _ => native_value(ty),
    };
    prop_oneof![1 => Just(Value::Null), 6 => native_value(ty), 1 => text_form].boxed()
}

fn table_and_row() -> impl Strategy<Value = (TableSchema, Row)> {
    proptest::collection::vec(column_type(), 1..8).prop_flat_map(|types| {
        let row: Vec<BoxedStrategy<Value>> = types.iter().map(value).collect();
        let columns = types
            .into_iter()
            .enumerate()
            .map(|(i, ty)| Column {
                name: format!("c{i}"),
                ty,
                pg_type: "t".into(),
                type_oid: 0,
                is_key: i == 0,
                attnum: None,
            })
            .collect();
        let table = TableSchema {
            id: TableId::new("public", "t"),
            relation_id: 1,
            columns,
        };
        (Just(table), row)
    })
}

/// Equality that takes NaN for NaN (floats are compared by their bits).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => {
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
        }
        (Value::Double(x), Value::Double(y)) => {
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (a, b) => a == b,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn value_to_copy_text_to_value((table, row) in table_and_row()) {
        let mut line = String::new();
        for (i, (v, col)) in row.iter().zip(&table.columns).enumerate() {
            if i > 0 {
                line.push('\t');
            }
            copy_field(&mut line, v, &col.ty).expect("the value fits its column");
        }
        let back = parse_copy_line(&table, line.as_bytes())
            .unwrap_or_else(|e| panic!("{line:?} does not read back: {e}"));
        prop_assert_eq!(back.len(), row.len());
        for (i, (a, b)) in row.iter().zip(&back).enumerate() {
            prop_assert!(same(a, b), "column {} ({:?}): wrote {:?}, line {:?}, read {:?}", i, table.columns[i].ty, a, line, b);
        }
    }
}
