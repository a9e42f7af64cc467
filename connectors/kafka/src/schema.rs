//! Avro schemas of a table's events: the key record (its key columns) and the envelope (the
//! fixed parts from `schemas/*.avsc`, with a `Value` record built from the table's columns).

use bitclone9_core::{ColumnType, TableSchema};
use serde_json::{json, Map, Value as Json};

/// The envelope's `source` record, as shipped in `schemas/source.avsc`.
pub const SOURCE_AVSC: &str = include_str!("../../../schemas/source.avsc");
/// The envelope template, as shipped in `schemas/envelope.avsc`.
pub const ENVELOPE_AVSC: &str = include_str!("../../../schemas/envelope.avsc");

/// A schema file that does not have the shape this module relies on (a build defect).
#[derive(Debug, thiserror::Error)]
#[error("schemas/{file} is malformed: {why}")]
pub struct TemplateError {
    pub file: &'static str,
    pub why: String,
}

/// An Avro name part: letters, digits and `_`, not starting with a digit.
pub fn avro_name(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// Avro field names of a table's columns, unique even when sanitising makes two collide.
pub fn field_names(table: &TableSchema) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(table.columns.len());
    for c in &table.columns {
        let base = avro_name(&c.name);
        let mut name = base.clone();
        let mut n = 1;
        while names.contains(&name) {
            n += 1;
            name = format!("{base}_{n}");
        }
        names.push(name);
    }
    names
}

/// The record namespace of a topic's schemas, e.g. `demo.public.orders`.
pub fn namespace(topic: &str) -> String {
    topic
        .split('.')
        .map(avro_name)
        .collect::<Vec<_>>()
        .join(".")
}

/// The Avro type of a column's (non-null) values.
pub fn avro_type(ty: &ColumnType) -> Json {
    match ty {
        ColumnType::Int16 | ColumnType::Int32 => json!("int"),
        ColumnType::Int64 => json!("long"),
        ColumnType::Float32 => json!("float"),
        ColumnType::Float64 => json!("double"),
        ColumnType::Bool => json!("boolean"),
        ColumnType::Text | ColumnType::Enum | ColumnType::Other => json!("string"),
        ColumnType::Bytes => json!("bytes"),
        ColumnType::Decimal { precision, scale } => {
            json!({"type": "bytes", "logicalType": "decimal", "precision": precision, "scale": scale})
        }
        ColumnType::Date => json!({"type": "int", "logicalType": "date"}),
        ColumnType::Time => json!({"type": "long", "logicalType": "time-micros"}),
        ColumnType::Timestamp => json!({"type": "long", "logicalType": "local-timestamp-micros"}),
        ColumnType::TimestampTz => json!({"type": "long", "logicalType": "timestamp-micros"}),
        ColumnType::Uuid => json!({"type": "string", "logicalType": "uuid"}),
        ColumnType::Json => json!({"type": "string", "connect.name": "io.debezium.data.Json"}),
        ColumnType::Array(elem) => json!({"type": "array", "items": ["null", avro_type(elem)]}),
    }
}

/// Whether a column's field has a `string` branch beside its native type, for the values the
/// native type cannot hold: `NaN` in `numeric(p,s)`; multi-dimensional arrays,
/// arrays with other lower bounds than 1 and arrays whose elements do not fit the element type.
/// Such values travel as PostgreSQL's text form, which a sink writes back unchanged.
pub fn has_text_form(ty: &ColumnType) -> bool {
    matches!(ty, ColumnType::Decimal { .. } | ColumnType::Array(_))
}

/// The Avro type of a column's field: `["null", T]` when `optional` (Value records), `T` in
/// Key records, with a `string` branch last for the types of [`has_text_form`].
pub fn field_type(ty: &ColumnType, optional: bool) -> Json {
    let mut branches = Vec::with_capacity(3);
    if optional {
        branches.push(json!("null"));
    }
    branches.push(avro_type(ty));
    if has_text_form(ty) {
        branches.push(json!("string"));
    }
    match branches.len() {
        1 => branches.remove(0),
        _ => Json::Array(branches),
    }
}

fn field(name: &str, column: &bitclone9_core::Column, optional: bool) -> Json {
    let mut f = Map::new();
    f.insert("name".into(), json!(name));
    f.insert("type".into(), field_type(&column.ty, optional));
    if optional {
        f.insert("default".into(), Json::Null);
    }
    // What a sink needs to recreate the column exactly.
    f.insert("pg.type".into(), json!(column.pg_type));
    if name != column.name {
        f.insert("pg.name".into(), json!(column.name));
    }
    Json::Object(f)
}

/// The key record of a table's topic, or `None` for a table without key columns.
pub fn key_schema(table: &TableSchema, topic: &str) -> Option<String> {
    let names = field_names(table);
    let fields: Vec<Json> = table
        .key_indexes()
        .map(|i| field(&names[i], &table.columns[i], false))
        .collect();
    if fields.is_empty() {
        return None;
    }
    Some(
        json!({"type": "record", "name": "Key", "namespace": namespace(topic), "fields": fields})
            .to_string(),
    )
}

/// The envelope of a table's topic.
pub fn value_schema(table: &TableSchema, topic: &str) -> Result<String, TemplateError> {
    let bad = |file, why: &str| TemplateError {
        file,
        why: why.to_string(),
    };
    let source: Json =
        serde_json::from_str(SOURCE_AVSC).map_err(|e| bad("source.avsc", &e.to_string()))?;
    let mut envelope: Json =
        serde_json::from_str(ENVELOPE_AVSC).map_err(|e| bad("envelope.avsc", &e.to_string()))?;
    let names = field_names(table);
    let value_fields: Vec<Json> = table
        .columns
        .iter()
        .zip(&names)
        .map(|(c, n)| field(n, c, true))
        .collect();
    envelope["namespace"] = json!(namespace(topic));
    let fields = envelope["fields"]
        .as_array_mut()
        .ok_or_else(|| bad("envelope.avsc", "no fields array"))?;
    for f in fields.iter_mut() {
        match f["name"].as_str() {
            Some("before") => {
                let record = f["type"]
                    .get_mut(1)
                    .filter(|r| r["name"] == "Value")
                    .ok_or_else(|| bad("envelope.avsc", "before is not [null, Value]"))?;
                record["fields"] = json!(value_fields);
            }
            Some("source") => f["type"] = source.clone(),
            _ => {}
        }
    }
    Ok(envelope.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitclone9_core::{Column, TableId};

    fn table() -> TableSchema {
        let col = |name: &str, ty, key| Column {
            name: name.into(),
            ty,
            pg_type: "t".into(),
            type_oid: 0,
            is_key: key,
        };
        TableSchema {
            id: TableId::new("public", "orders"),
            relation_id: 1,
            columns: vec![
                col("id", ColumnType::Int64, true),
                col(
                    "total price",
                    ColumnType::Decimal {
                        precision: 10,
                        scale: 2,
                    },
                    false,
                ),
                col("total_price", ColumnType::Text, false),
                col("tags", ColumnType::Array(Box::new(ColumnType::Text)), false),
            ],
        }
    }

    #[test]
    fn shipped_schema_files_parse() {
        let source = apache_avro::Schema::parse_str(SOURCE_AVSC).expect("source.avsc parses");
        assert!(matches!(source, apache_avro::Schema::Record(_)));
        let list = apache_avro::Schema::parse_list([SOURCE_AVSC, ENVELOPE_AVSC])
            .expect("envelope.avsc parses");
        assert_eq!(list.len(), 2);
    }

    #[test]
    fn generated_schemas_parse_and_sanitise_names() {
        let t = table();
        let key = key_schema(&t, "demo.public.orders").expect("has key");
        let key = apache_avro::Schema::parse_str(&key).expect("key parses");
        assert_eq!(
            key.name().map(|n| n.fullname(None)),
            Some("demo.public.orders.Key".into())
        );
        let value = value_schema(&t, "demo.public.orders").expect("builds");
        let parsed = apache_avro::Schema::parse_str(&value).expect("value parses");
        assert_eq!(
            parsed.name().map(|n| n.fullname(None)),
            Some("demo.public.orders.Envelope".into())
        );
        assert!(value.contains("\"total_price\""));
        assert!(value.contains("\"total_price_2\""));
        assert!(value.contains("\"pg.name\":\"total price\""));
    }
}
