//! Avro schemas of a table's events: the key record (its key columns) and the envelope (the
//! fixed parts from `schemas/*.avsc`, with a `Value` record built from the table's columns).

use bitclone9_core::{ColumnType, TableSchema};
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;

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
    // What a sink needs to follow a rename or a type change as such.
    if let Some(n) = column.attnum {
        f.insert("pg.attnum".into(), json!(n));
    }
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

/// One column as an envelope schema describes it: its source name, number and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribedColumn {
    pub name: String,
    pub attnum: Option<i16>,
    pub pg_type: Option<String>,
}

/// The columns of `table` as its envelope schema describes them.
pub fn described(table: &TableSchema) -> Vec<DescribedColumn> {
    table
        .columns
        .iter()
        .map(|c| DescribedColumn {
            name: c.name.clone(),
            attnum: c.attnum,
            pg_type: Some(c.pg_type.clone()),
        })
        .collect()
}

/// The columns of an envelope schema (its `before` record), as the source described them.
pub fn described_columns(schema: &str) -> Vec<DescribedColumn> {
    let Ok(parsed) = serde_json::from_str::<Json>(schema) else {
        return Vec::new();
    };
    let fields = parsed["fields"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["name"] == "before"))
        .and_then(|f| f["type"].get(1))
        .and_then(|r| r["fields"].as_array());
    fields
        .into_iter()
        .flatten()
        .filter_map(|f| {
            Some(DescribedColumn {
                name: f["pg.name"].as_str().or(f["name"].as_str())?.to_string(),
                attnum: f["pg.attnum"].as_i64().and_then(|n| i16::try_from(n).ok()),
                pg_type: f["pg.type"].as_str().map(str::to_string),
            })
        })
        .collect()
}

/// The source column numbers (`pg.attnum`) an envelope schema gives its columns, by the
/// columns' source names.
pub fn attnums_by_name(schema: &str) -> HashMap<String, i16> {
    described_columns(schema)
        .into_iter()
        .filter_map(|c| Some((c.name, c.attnum?)))
        .collect()
}

/// The columns of `table` whose type differs from the one `before` gave them (matched by
/// column number, else by name): `(name, old type, new type)`.
pub fn retyped_columns(
    before: &[DescribedColumn],
    table: &TableSchema,
) -> Vec<(String, String, String)> {
    table
        .columns
        .iter()
        .filter_map(|c| {
            let old = before
                .iter()
                .find(|b| c.attnum.is_some() && b.attnum == c.attnum)
                .or_else(|| before.iter().find(|b| b.name == c.name))?;
            let old_type = old.pg_type.as_deref()?;
            (old_type != c.pg_type)
                .then(|| (c.name.clone(), old_type.to_string(), c.pg_type.clone()))
        })
        .collect()
}

/// The column fields of a key or envelope schema: `(name, type)` in order. Envelope fields are
/// those of its `Value` record (the `before` and `after` image).
fn column_fields(schema: &str) -> Option<Vec<(String, Json)>> {
    let parsed: Json = serde_json::from_str(schema).ok()?;
    let fields = parsed["fields"].as_array()?;
    let value = fields
        .iter()
        .find(|f| f["name"] == "before")
        .and_then(|f| f["type"].get(1))
        .and_then(|r| r["fields"].as_array());
    Some(
        value
            .unwrap_or(fields)
            .iter()
            .filter_map(|f| Some((f["name"].as_str()?.to_string(), f["type"].clone())))
            .collect(),
    )
}

/// A short form of a field's type for messages: branches without `null`, logical types named.
fn type_label(ty: &Json) -> String {
    match ty {
        Json::String(s) => s.clone(),
        Json::Array(branches) => {
            let shown: Vec<String> = branches
                .iter()
                .filter(|b| *b != "null")
                .map(type_label)
                .collect();
            shown.join(" | ")
        }
        Json::Object(o) => match (o.get("logicalType"), o.get("type")) {
            (Some(l), _) => l.as_str().unwrap_or("?").to_string(),
            (None, Some(Json::String(t))) if t == "array" => {
                format!(
                    "array of {}",
                    o.get("items").map(type_label).unwrap_or_default()
                )
            }
            (None, Some(t)) => type_label(t),
            _ => "?".to_string(),
        },
        _ => "?".to_string(),
    }
}

/// What changed between two schemas of the same subject, column by column, e.g.
/// `column "qty": int → string; column "note" removed`.
pub fn describe_change(previous: &str, next: &str) -> String {
    let (Some(old), Some(new)) = (column_fields(previous), column_fields(next)) else {
        return "the record's shape changed".to_string();
    };
    let mut parts = Vec::new();
    for (name, ty) in &old {
        match new.iter().find(|(n, _)| n == name) {
            None => parts.push(format!("column \"{name}\" removed")),
            Some((_, t)) if t != ty => {
                let (a, b) = (type_label(ty), type_label(t));
                if a == b {
                    parts.push(format!("column \"{name}\": {a}, with other type details"));
                } else {
                    parts.push(format!("column \"{name}\": {a} → {b}"));
                }
            }
            Some(_) => {}
        }
    }
    for (name, ty) in &new {
        if !old.iter().any(|(n, _)| n == name) {
            parts.push(format!("column \"{name}\" added as {}", type_label(ty)));
        }
    }
    if parts.is_empty() {
        "the record's other attributes changed".to_string()
    } else {
        parts.join("; ")
    }
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
            attnum: None,
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
    fn retyped_columns_are_found_by_number_through_renames_and_read_back_from_the_registry() {
        let mut before = table();
        for (i, c) in before.columns.iter_mut().enumerate() {
            c.attnum = Some(i as i16 + 1);
        }
        let registered =
            described_columns(&value_schema(&before, "db.public.orders").expect("schema"));
        assert_eq!(
            registered,
            described(&before),
            "the schema keeps name, number and type"
        );
        let mut after = before.clone();
        after.columns[1].name = "price".into(); // renamed, same type: no change
        after.columns[2].pg_type = "bigint".into(); // retyped
        after.columns.remove(3); // dropped: no change of type
        assert_eq!(
            retyped_columns(&registered, &after),
            vec![(
                "total_price".to_string(),
                "t".to_string(),
                "bigint".to_string()
            )]
        );
        assert!(retyped_columns(&registered, &before).is_empty());
    }

    #[test]
    fn column_numbers_are_read_back_by_the_columns_source_names() {
        let mut t = table();
        for (i, c) in t.columns.iter_mut().enumerate() {
            c.attnum = (i != 3).then_some(i as i16 + 1);
        }
        let value = value_schema(&t, "demo.public.orders").expect("value");
        let known = attnums_by_name(&value);
        // "total price" is sanitised in the schema and named by pg.name; tags has no number.
        assert_eq!(
            known,
            HashMap::from([
                ("id".to_string(), 1),
                ("total price".to_string(), 2),
                ("total_price".to_string(), 3),
            ])
        );
        assert!(attnums_by_name("not json").is_empty());
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

    #[test]
    fn a_change_is_described_column_by_column() {
        let t = table();
        let before = value_schema(&t, "demo.public.orders").expect("builds");
        let mut changed = t.clone();
        changed.columns[0].ty = ColumnType::Text;
        changed.columns.remove(2);
        changed.columns.push(Column {
            name: "note".into(),
            ty: ColumnType::Date,
            pg_type: "date".into(),
            type_oid: 0,
            is_key: false,
            attnum: None,
        });
        let after = value_schema(&changed, "demo.public.orders").expect("builds");
        assert_eq!(
            describe_change(&before, &after),
            "column \"id\": long → string; column \"total_price_2\" removed; column \"note\" added as date"
        );
        let key_before = key_schema(&t, "demo.public.orders").expect("has key");
        let key_after = key_schema(&changed, "demo.public.orders").expect("has key");
        assert_eq!(
            describe_change(&key_before, &key_after),
            "column \"id\": long → string"
        );
        assert_eq!(
            describe_change(&before, &before),
            "the record's other attributes changed"
        );
    }
}
