//! Reading BitClone9 records back: Confluent-framed Avro keys and envelopes into [`Change`]s.
//!
//! The writer schema of every record comes from the registry by the id in its frame (cached per
//! id). Each schema is parsed with apache-avro (so a malformed one is refused), then turned into a
//! small decoding plan that reads the binary datum straight into [`Value`]s: no tree of named
//! values per record. Column types and names come from the fields' `pg.type` / `pg.name`
//! properties, the key columns from the key schema.

use crate::Registry;
use bitclone9_core::{
    Change, Column, ColumnType, Lsn, Op, Row, SnapshotMark, TableId, TableSchema, TxInfo, Value,
};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::sync::Arc;

/// Why a record could not be read. [`DecodeError::is_poison`] tells a bad record (which no retry
/// mends) from a registry that cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not in the Confluent wire format: {0}")]
    Frame(String),
    #[error("schema id {id} is not in the registry: {detail}")]
    UnknownSchema { id: u32, detail: String },
    #[error("cannot reach the schema registry at {url}: {detail}")]
    RegistryUnreachable { url: String, detail: String },
    #[error("schema id {id} is not a BitClone9 change-event schema: {why}")]
    Unsupported { id: u32, why: String },
    #[error("bad Avro data for schema id {id}: {why}")]
    Data { id: u32, why: String },
}

impl DecodeError {
    /// True when the record itself is at fault and retrying cannot help.
    pub fn is_poison(&self) -> bool {
        !matches!(self, DecodeError::RegistryUnreachable { .. })
    }

    /// A short label for metrics and dead-letter headers.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Frame(_) => "frame",
            DecodeError::UnknownSchema { .. } => "unknown_schema",
            DecodeError::RegistryUnreachable { .. } => "registry_unreachable",
            DecodeError::Unsupported { .. } => "unsupported_schema",
            DecodeError::Data { .. } => "bad_avro",
        }
    }
}

/// The shape of an Avro datum, enough to read (or skip) it.
#[derive(Debug, Clone)]
enum Kind {
    Null,
    Bool,
    Int,
    Long,
    Float,
    Double,
    Bytes,
    Str,
    Record(Vec<Kind>),
    Union(Vec<Kind>),
    Array(Box<Kind>),
    Map(Box<Kind>),
    Enum,
    Fixed(usize),
    /// A value passed over without building it (fields the reader does not need).
    Skip(Box<Kind>),
}

/// A decoded datum, without field names.
#[derive(Debug)]
enum Datum {
    Null,
    Bool(bool),
    Int(i32),
    Long(i64),
    Float(f32),
    Double(f64),
    Bytes(Vec<u8>),
    Str(String),
    Record(Vec<Datum>),
    Array(Vec<Datum>),
    Skipped,
}

/// Reads Avro binary.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn long(&mut self) -> Result<i64, String> {
        let mut v: u64 = 0;
        let mut shift = 0;
        loop {
            let b = *self.buf.get(self.pos).ok_or("datum ends inside a number")?;
            self.pos += 1;
            if shift >= 64 {
                return Err("number longer than 64 bits".into());
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or("datum ends inside a value")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn len(&mut self) -> Result<usize, String> {
        let n = self.long()?;
        usize::try_from(n).map_err(|_| format!("negative length {n}"))
    }

    /// The item count of an array or map block, at most the bytes left (every item of the
    /// schemas read here takes at least one byte).
    fn block_len(&mut self) -> Result<usize, String> {
        let n = self.long()?;
        let n = if n < 0 {
            self.long()?; // block size in bytes
            n.checked_neg().ok_or("bad block count")?
        } else {
            n
        };
        let n = usize::try_from(n).map_err(|_| "bad block count".to_string())?;
        if n > self.buf.len() - self.pos {
            return Err(format!("block of {n} items is longer than the datum"));
        }
        Ok(n)
    }

    fn read(&mut self, kind: &Kind) -> Result<Datum, String> {
        Ok(match kind {
            Kind::Null => Datum::Null,
            Kind::Bool => Datum::Bool(self.take(1)?[0] != 0),
            Kind::Int => {
                Datum::Int(i32::try_from(self.long()?).map_err(|_| "int out of range".to_string())?)
            }
            Kind::Long => Datum::Long(self.long()?),
            Kind::Float => {
                let b: [u8; 4] = self.take(4)?.try_into().map_err(|_| "float")?;
                Datum::Float(f32::from_le_bytes(b))
            }
            Kind::Double => {
                let b: [u8; 8] = self.take(8)?.try_into().map_err(|_| "double")?;
                Datum::Double(f64::from_le_bytes(b))
            }
            Kind::Bytes => {
                let n = self.len()?;
                Datum::Bytes(self.take(n)?.to_vec())
            }
            Kind::Str => {
                let n = self.len()?;
                let s = std::str::from_utf8(self.take(n)?)
                    .map_err(|_| "string is not valid UTF-8".to_string())?;
                Datum::Str(s.to_string())
            }
            Kind::Record(fields) => {
                let mut out = Vec::with_capacity(fields.len());
                for f in fields {
                    out.push(self.read(f)?);
                }
                Datum::Record(out)
            }
            Kind::Union(branches) => {
                let i = self.long()?;
                let b = usize::try_from(i)
                    .ok()
                    .and_then(|i| branches.get(i))
                    .ok_or_else(|| format!("union branch {i} does not exist"))?;
                self.read(b)?
            }
            Kind::Array(item) => {
                let mut out = Vec::new();
                loop {
                    let n = self.block_len()?;
                    if n == 0 {
                        break;
                    }
                    for _ in 0..n {
                        out.push(self.read(item)?);
                    }
                }
                Datum::Array(out)
            }
            // Nothing BitClone9 reads is a map, enum or fixed: pass over them.
            Kind::Map(_) | Kind::Enum | Kind::Fixed(_) | Kind::Skip(_) => {
                self.skip(kind)?;
                Datum::Skipped
            }
        })
    }

    /// Passes over a value of `kind` without allocating.
    fn skip(&mut self, kind: &Kind) -> Result<(), String> {
        match kind {
            Kind::Null => {}
            Kind::Bool => {
                self.take(1)?;
            }
            Kind::Int | Kind::Long | Kind::Enum => {
                self.long()?;
            }
            Kind::Float => {
                self.take(4)?;
            }
            Kind::Double => {
                self.take(8)?;
            }
            Kind::Bytes | Kind::Str => {
                let n = self.len()?;
                self.take(n)?;
            }
            Kind::Fixed(n) => {
                self.take(*n)?;
            }
            Kind::Record(fields) => {
                for f in fields {
                    self.skip(f)?;
                }
            }
            Kind::Union(branches) => {
                let i = self.long()?;
                let b = usize::try_from(i)
                    .ok()
                    .and_then(|i| branches.get(i))
                    .ok_or_else(|| format!("union branch {i} does not exist"))?;
                self.skip(b)?;
            }
            Kind::Array(item) => loop {
                let n = self.block_len()?;
                if n == 0 {
                    break;
                }
                for _ in 0..n {
                    self.skip(item)?;
                }
            },
            Kind::Map(value) => loop {
                let n = self.block_len()?;
                if n == 0 {
                    break;
                }
                for _ in 0..n {
                    let k = self.len()?;
                    self.take(k)?;
                    self.skip(value)?;
                }
            },
            Kind::Skip(inner) => self.skip(inner)?,
        }
        Ok(())
    }
}

/// Named types seen so far while walking a schema, by full and short name.
type Names = HashMap<String, (Kind, Json)>;

/// The [`Kind`] of a JSON schema, registering named types in `names`.
fn kind_of(schema: &Json, ns: &str, names: &mut Names) -> Result<Kind, String> {
    match schema {
        Json::String(s) => Ok(match s.as_str() {
            "null" => Kind::Null,
            "boolean" => Kind::Bool,
            "int" => Kind::Int,
            "long" => Kind::Long,
            "float" => Kind::Float,
            "double" => Kind::Double,
            "bytes" => Kind::Bytes,
            "string" => Kind::Str,
            other => {
                let full = if other.contains('.') || ns.is_empty() {
                    other.to_string()
                } else {
                    format!("{ns}.{other}")
                };
                names
                    .get(&full)
                    .or_else(|| names.get(other))
                    .map(|(k, _)| k.clone())
                    .ok_or_else(|| format!("unknown type {other:?}"))?
            }
        }),
        Json::Array(branches) => Ok(Kind::Union(
            branches
                .iter()
                .map(|b| kind_of(b, ns, names))
                .collect::<Result<_, _>>()?,
        )),
        Json::Object(o) => {
            let ty = o.get("type").ok_or("a schema object without \"type\"")?;
            match ty.as_str() {
                Some("record") | Some("error") => {
                    let name = o
                        .get("name")
                        .and_then(Json::as_str)
                        .ok_or("unnamed record")?;
                    let inner_ns = o.get("namespace").and_then(Json::as_str).unwrap_or(ns);
                    let full = if name.contains('.') || inner_ns.is_empty() {
                        name.to_string()
                    } else {
                        format!("{inner_ns}.{name}")
                    };
                    let rec_ns = full.rsplit_once('.').map(|(n, _)| n).unwrap_or("");
                    let mut fields = Vec::new();
                    for f in o
                        .get("fields")
                        .and_then(Json::as_array)
                        .ok_or("record without fields")?
                    {
                        fields.push(kind_of(
                            f.get("type").ok_or("field without type")?,
                            rec_ns,
                            names,
                        )?);
                    }
                    let kind = Kind::Record(fields);
                    let short = full.rsplit('.').next().unwrap_or(&full).to_string();
                    names.insert(full, (kind.clone(), schema.clone()));
                    names.insert(short, (kind.clone(), schema.clone()));
                    Ok(kind)
                }
                Some("array") => Ok(Kind::Array(Box::new(kind_of(
                    o.get("items").ok_or("array without items")?,
                    ns,
                    names,
                )?))),
                Some("map") => Ok(Kind::Map(Box::new(kind_of(
                    o.get("values").ok_or("map without values")?,
                    ns,
                    names,
                )?))),
                Some("enum") => Ok(Kind::Enum),
                Some("fixed") => Ok(Kind::Fixed(
                    o.get("size")
                        .and_then(Json::as_u64)
                        .and_then(|s| usize::try_from(s).ok())
                        .ok_or("fixed without size")?,
                )),
                _ => kind_of(ty, ns, names),
            }
        }
        _ => Err(format!("unexpected schema element {schema}")),
    }
}

/// The column type a Value field's Avro type stands for.
fn column_type(t: &Json) -> Result<ColumnType, String> {
    if let Some(s) = t.as_str() {
        return Ok(match s {
            "int" => ColumnType::Int32,
            "long" => ColumnType::Int64,
            "float" => ColumnType::Float32,
            "double" => ColumnType::Float64,
            "boolean" => ColumnType::Bool,
            "string" => ColumnType::Text,
            "bytes" => ColumnType::Bytes,
            other => return Err(format!("unsupported column type {other:?}")),
        });
    }
    let base = t.get("type").and_then(Json::as_str).unwrap_or("");
    let logical = t.get("logicalType").and_then(Json::as_str);
    Ok(match (base, logical) {
        ("bytes", Some("decimal")) => {
            let get = |k: &str| t.get(k).and_then(Json::as_u64).map(|v| v as u32);
            ColumnType::Decimal {
                precision: get("precision").ok_or("decimal without precision")?,
                scale: get("scale").unwrap_or(0),
            }
        }
        ("int", Some("date")) => ColumnType::Date,
        ("long", Some("time-micros")) => ColumnType::Time,
        ("long", Some("local-timestamp-micros")) => ColumnType::Timestamp,
        ("long", Some("timestamp-micros")) => ColumnType::TimestampTz,
        ("string", Some("uuid")) => ColumnType::Uuid,
        ("string", None) if t.get("connect.name").is_some() => ColumnType::Json,
        ("array", _) => {
            let items = t.get("items").ok_or("array without items")?;
            let item = match items.as_array() {
                Some(b) if b.len() == 2 && b[0] == "null" => &b[1],
                _ => items,
            };
            ColumnType::Array(Box::new(column_type(item)?))
        }
        (b, None) if !b.is_empty() => column_type(&Json::String(b.into()))?,
        _ => return Err(format!("unsupported column type {t}")),
    })
}

/// The columns described by a record schema's fields (a Key or a Value record).
fn columns_of(record: &Json) -> Result<Vec<(String, Column)>, String> {
    let fields = record
        .get("fields")
        .and_then(Json::as_array)
        .ok_or("record without fields")?;
    let mut out = Vec::with_capacity(fields.len());
    for f in fields {
        let field = f
            .get("name")
            .and_then(Json::as_str)
            .ok_or("field without name")?;
        let ty = f.get("type").ok_or("field without type")?;
        // `T` or `["null", T]`, either with a last `string` branch carrying PostgreSQL's text
        // form of the values `T` cannot hold (`schema::field_type`).
        let inner = match ty.as_array().map(Vec::as_slice) {
            None => ty,
            Some(branches) => {
                let rest = match branches {
                    [n, rest @ ..] if n == "null" => rest,
                    all => all,
                };
                match rest {
                    [t] if t != "null" => t,
                    [t, s] if t != "null" && s == "string" => t,
                    _ => return Err(format!("field {field}: unsupported union {ty}")),
                }
            }
        };
        let pg_type = f
            .get("pg.type")
            .and_then(Json::as_str)
            .ok_or_else(|| format!("field {field} has no pg.type property"))?;
        let name = f.get("pg.name").and_then(Json::as_str).unwrap_or(field);
        out.push((
            field.to_string(),
            Column {
                name: name.to_string(),
                ty: column_type(inner).map_err(|e| format!("field {field}: {e}"))?,
                pg_type: pg_type.to_string(),
                type_oid: 0,
                is_key: false,
                attnum: f
                    .get("pg.attnum")
                    .and_then(Json::as_i64)
                    .and_then(|n| i16::try_from(n).ok()),
            },
        ));
    }
    Ok(out)
}

/// Positions of the envelope's parts in its record.
#[derive(Debug)]
struct EnvelopePlan {
    kind: Kind,
    before: usize,
    after: usize,
    source: usize,
    op: usize,
    unchanged: Option<usize>,
    /// In the source record: snapshot, schema, table, txId, lsn, seq, ts_ms.
    src: [usize; 7],
    /// Field names and columns of the Value record.
    columns: Vec<(String, Column)>,
}

/// A parsed writer schema.
#[derive(Debug)]
enum Plan {
    Key {
        kind: Kind,
        columns: Vec<(String, Column)>,
    },
    Envelope(EnvelopePlan),
}

fn plan(text: &str) -> Result<Plan, String> {
    apache_avro::Schema::parse_str(text).map_err(|e| format!("not a valid Avro schema: {e}"))?;
    let json: Json = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut names = Names::new();
    let kind = kind_of(&json, "", &mut names)?;
    let fields = json
        .get("fields")
        .and_then(Json::as_array)
        .ok_or("not a record schema")?;
    let index = |name: &str| {
        fields
            .iter()
            .position(|f| f.get("name").and_then(Json::as_str) == Some(name))
    };
    let (Some(before), Some(after), Some(source), Some(op)) = (
        index("before"),
        index("after"),
        index("source"),
        index("op"),
    ) else {
        return Ok(Plan::Key {
            kind,
            columns: columns_of(&json)?,
        });
    };
    let value = names
        .get("Value")
        .map(|(_, j)| j.clone())
        .ok_or("envelope without a Value record")?;
    let source_type = &fields[source]["type"];
    let source_json = match source_type.as_str() {
        Some(name) => names
            .get(name)
            .or_else(|| names.get(name.rsplit('.').next().unwrap_or(name)))
            .map(|(_, j)| j.clone())
            .ok_or("envelope without a source record")?,
        None => source_type.clone(),
    };
    let src_fields = source_json
        .get("fields")
        .and_then(Json::as_array)
        .ok_or("source record without fields")?;
    let src_index = |name: &str| {
        src_fields
            .iter()
            .position(|f| f.get("name").and_then(Json::as_str) == Some(name))
            .ok_or_else(|| format!("source record without {name}"))
    };
    let src = [
        src_index("snapshot")?,
        src_index("schema")?,
        src_index("table")?,
        src_index("txId")?,
        src_index("lsn")?,
        src_index("seq")?,
        src_index("ts_ms")?,
    ];
    // Read only what a change needs; pass over the rest (version, connector, name, db, ts_ms).
    let mut kind = kind;
    if let Kind::Record(top) = &mut kind {
        let keep = [
            Some(before),
            Some(after),
            Some(source),
            Some(op),
            index("unchanged_columns"),
        ];
        for (i, f) in top.iter_mut().enumerate() {
            if !keep.contains(&Some(i)) {
                *f = Kind::Skip(Box::new(f.clone()));
            }
        }
        if let Some(Kind::Record(src_kinds)) = top.get_mut(source) {
            for (i, f) in src_kinds.iter_mut().enumerate() {
                if !src.contains(&i) {
                    *f = Kind::Skip(Box::new(f.clone()));
                }
            }
        }
    }
    Ok(Plan::Envelope(EnvelopePlan {
        kind,
        before,
        after,
        source,
        op,
        unchanged: index("unchanged_columns"),
        src,
        columns: columns_of(&value)?,
    }))
}

/// A record of a BitClone9 topic, decoded.
#[derive(Debug)]
pub enum Decoded {
    Change(Change),
    /// A record without a value: the row under its key is gone (after a delete, or under the
    /// old key of an update that changed the key). A delete of that key when its table is
    /// known (from the record's `bitclone9.schema` / `bitclone9.table` headers).
    Tombstone(Option<Change>),
}

/// What a tombstone's headers tell: its table and source position.
#[derive(Debug, Default, Clone)]
pub struct TombstoneHeaders {
    pub schema: Option<String>,
    pub table: Option<String>,
    pub lsn: Option<Lsn>,
    pub seq: Option<u64>,
    pub txid: Option<u32>,
}

/// Decodes records, fetching and caching their writer schemas.
pub struct EventReader {
    registry: Registry,
    plans: HashMap<u32, Arc<Plan>>,
    /// Table shapes by (key schema id, value schema id); the table's name is checked per record.
    tables: HashMap<(Option<u32>, u32), Arc<TableSchema>>,
    /// The newest table shape seen per topic, for tombstones.
    latest: HashMap<String, Arc<TableSchema>>,
}

/// Splits a Confluent frame into schema id and datum.
fn frame(bytes: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    match bytes {
        [0, a, b, c, d, rest @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), rest)),
        [] => Err(DecodeError::Frame("empty".into())),
        [m, ..] if *m != 0 => Err(DecodeError::Frame(format!(
            "magic byte is {m:#04x}, expected 0x00"
        ))),
        _ => Err(DecodeError::Frame(format!(
            "{} bytes, shorter than the 5-byte header",
            bytes.len()
        ))),
    }
}

fn text(d: Datum) -> Option<String> {
    match d {
        Datum::Str(s) => Some(s),
        _ => None,
    }
}

fn long(d: &Datum) -> Option<i64> {
    match d {
        Datum::Long(l) => Some(*l),
        Datum::Int(i) => Some(i64::from(*i)),
        _ => None,
    }
}

/// A column value from its datum, by the column's type.
fn value(d: Datum, ty: &ColumnType) -> Result<Value, String> {
    Ok(match (d, ty) {
        (Datum::Null, _) => Value::Null,
        (Datum::Bool(b), _) => Value::Bool(b),
        (Datum::Int(i), _) => Value::Int(i),
        (Datum::Long(l), _) => Value::Long(l),
        (Datum::Float(f), _) => Value::Float(f),
        (Datum::Double(f), _) => Value::Double(f),
        (Datum::Bytes(b), ColumnType::Decimal { .. }) => Value::Decimal(b),
        (Datum::Bytes(b), _) => Value::Bytes(b),
        (Datum::Str(s), _) => Value::Text(s),
        (Datum::Array(items), ColumnType::Array(elem)) => Value::Array(
            items
                .into_iter()
                .map(|i| value(i, elem))
                .collect::<Result<_, _>>()?,
        ),
        (d, ty) => return Err(format!("value {d:?} does not fit {ty:?}")),
    })
}

fn row(d: Datum, table: &TableSchema) -> Result<Option<Row>, String> {
    match d {
        Datum::Null => Ok(None),
        Datum::Record(vals) => {
            if vals.len() != table.columns.len() {
                return Err("row width differs from its schema".into());
            }
            vals.into_iter()
                .zip(&table.columns)
                .map(|(v, c)| value(v, &c.ty).map_err(|e| format!("column {}: {e}", c.name)))
                .collect::<Result<Row, _>>()
                .map(Some)
        }
        other => Err(format!("expected a row, got {other:?}")),
    }
}

impl EventReader {
    /// A reader that already knows these (id, schema text) pairs, so it needs no registry for
    /// them (benchmarks, tests).
    pub fn with_schemas(registry: Registry, schemas: &[(u32, &str)]) -> Result<Self, DecodeError> {
        let mut r = Self::new(registry);
        for (id, text) in schemas {
            let p = plan(text).map_err(|why| DecodeError::Unsupported { id: *id, why })?;
            r.plans.insert(*id, Arc::new(p));
        }
        Ok(r)
    }

    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            plans: HashMap::new(),
            tables: HashMap::new(),
            latest: HashMap::new(),
        }
    }

    async fn plan(&mut self, id: u32) -> Result<Arc<Plan>, DecodeError> {
        if let Some(p) = self.plans.get(&id) {
            return Ok(p.clone());
        }
        let text = self.registry.schema_by_id(id).await?;
        let p = Arc::new(plan(&text).map_err(|why| DecodeError::Unsupported { id, why })?);
        self.plans.insert(id, p.clone());
        Ok(p)
    }

    /// Decodes one record of `topic`: its key and value bytes, and for a tombstone its headers.
    pub async fn decode(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &TombstoneHeaders,
    ) -> Result<Decoded, DecodeError> {
        let Some(value) = value else {
            return self.tombstone(topic, key, headers).await;
        };
        let (value_id, datum) = frame(value)?;
        let key_plan = match key {
            Some(k) if !k.is_empty() => {
                let (key_id, _) = frame(k)?;
                let p = self.plan(key_id).await?;
                if matches!(&*p, Plan::Envelope(_)) {
                    return Err(DecodeError::Unsupported {
                        id: key_id,
                        why: "the key is framed with an envelope schema".into(),
                    });
                }
                Some((key_id, p))
            }
            _ => None,
        };
        let plan = self.plan(value_id).await?;
        let Plan::Envelope(env) = &*plan else {
            return Err(DecodeError::Unsupported {
                id: value_id,
                why: "the value is framed with a key schema, not an envelope".into(),
            });
        };
        let data = |why: String| DecodeError::Data { id: value_id, why };
        let mut reader = Reader { buf: datum, pos: 0 };
        let Datum::Record(mut parts) = reader.read(&env.kind).map_err(data)? else {
            return Err(data("envelope is not a record".into()));
        };
        let take = |parts: &mut Vec<Datum>, i: usize| {
            parts
                .get_mut(i)
                .map(|d| std::mem::replace(d, Datum::Null))
                .unwrap_or(Datum::Null)
        };
        let Datum::Record(mut src) = take(&mut parts, env.source) else {
            return Err(data("source is not a record".into()));
        };
        let [snap_i, schema_i, table_i, txid_i, lsn_i, seq_i, ts_i] = env.src;
        let schema = text(take(&mut src, schema_i)).ok_or_else(|| data("source.schema".into()))?;
        let table = text(take(&mut src, table_i)).ok_or_else(|| data("source.table".into()))?;
        let snapshot = match text(take(&mut src, snap_i)).as_deref() {
            Some("true") => SnapshotMark::Yes,
            Some("last") => SnapshotMark::Last,
            _ => SnapshotMark::No,
        };
        let field = |i: usize| src.get(i).and_then(long);
        let tx = TxInfo {
            xid: field(txid_i).and_then(|x| u32::try_from(x).ok()),
            commit_lsn: Lsn(field(lsn_i).unwrap_or(0) as u64),
            commit_time_us: field(ts_i).unwrap_or(0).saturating_mul(1000),
        };
        let seq = field(seq_i).unwrap_or(0) as u64;
        let op = match text(take(&mut parts, env.op)).as_deref() {
            Some("c") => Op::Insert,
            Some("u") => Op::Update,
            Some("d") => Op::Delete,
            Some("t") => Op::Truncate,
            Some("r") => Op::Read,
            other => return Err(data(format!("unknown op {other:?}"))),
        };
        let key_id = key_plan.as_ref().map(|(k, _)| *k);
        let cache_key = (key_id, value_id);
        let table = match self
            .tables
            .get(&cache_key)
            .filter(|t| t.id.schema == schema && t.id.name == table)
        {
            Some(t) => t.clone(),
            None => {
                let key_fields: Vec<&String> = match key_plan.as_ref().map(|(_, p)| &**p) {
                    Some(Plan::Key { columns, .. }) => columns.iter().map(|(f, _)| f).collect(),
                    _ => Vec::new(),
                };
                let columns = env
                    .columns
                    .iter()
                    .map(|(field, c)| Column {
                        is_key: key_fields.contains(&field),
                        ..c.clone()
                    })
                    .collect();
                let t = Arc::new(TableSchema {
                    id: TableId::new(schema, table),
                    relation_id: 0,
                    columns,
                });
                self.tables.insert(cache_key, t.clone());
                t
            }
        };
        if !self
            .latest
            .get(topic)
            .is_some_and(|l| Arc::ptr_eq(l, &table))
        {
            self.latest.insert(topic.to_string(), table.clone());
        }
        let before = row(take(&mut parts, env.before), &table).map_err(data)?;
        let mut after = row(take(&mut parts, env.after), &table).map_err(data)?;
        if let (Some(i), Some(after)) = (env.unchanged, after.as_mut()) {
            if let Datum::Array(names) = take(&mut parts, i) {
                for n in names.into_iter().filter_map(text) {
                    if let Some(c) = table.columns.iter().position(|c| c.name == n) {
                        after[c] = Value::UnchangedToast;
                    }
                }
            }
        }
        Ok(Decoded::Change(Change {
            table,
            op,
            before,
            after,
            tx,
            seq,
            snapshot,
        }))
    }
}

impl EventReader {
    /// A tombstone as a delete of its key, in the shape of the newest envelope seen in `topic`
    /// (else the topic's latest registered value schema).
    async fn tombstone(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        h: &TombstoneHeaders,
    ) -> Result<Decoded, DecodeError> {
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return Ok(Decoded::Tombstone(None));
        };
        let (Some(schema), Some(name), Some(lsn), Some(seq)) = (&h.schema, &h.table, h.lsn, h.seq)
        else {
            return Err(DecodeError::Frame(
                "a tombstone without the bitclone9.schema, bitclone9.table, bitclone9.lsn and bitclone9.seq headers: its table is unknown, so the delete of its key cannot be applied".into(),
            ));
        };
        let (key_id, datum) = frame(key)?;
        let key_plan = self.plan(key_id).await?;
        let Plan::Key { kind, columns } = &*key_plan else {
            return Err(DecodeError::Unsupported {
                id: key_id,
                why: "the key is framed with an envelope schema".into(),
            });
        };
        let data = |why: String| DecodeError::Data { id: key_id, why };
        let mut reader = Reader { buf: datum, pos: 0 };
        let Datum::Record(values) = reader.read(kind).map_err(data)? else {
            return Err(data("key is not a record".into()));
        };
        let id = TableId::new(schema.clone(), name.clone());
        let table = match self.latest.get(topic).filter(|t| t.id == id) {
            Some(t) => t.clone(),
            None => {
                let (value_id, text) = self.registry.latest_value_schema(topic).await?;
                let p = Arc::new(
                    plan(&text).map_err(|why| DecodeError::Unsupported { id: value_id, why })?,
                );
                self.plans.insert(value_id, p.clone());
                let Plan::Envelope(env) = &*p else {
                    return Err(DecodeError::Unsupported {
                        id: value_id,
                        why: "the topic's value schema is not an envelope".into(),
                    });
                };
                let key_fields: Vec<&String> = columns.iter().map(|(f, _)| f).collect();
                let t = Arc::new(TableSchema {
                    id: id.clone(),
                    relation_id: 0,
                    columns: env
                        .columns
                        .iter()
                        .map(|(f, c)| Column {
                            is_key: key_fields.contains(&f),
                            ..c.clone()
                        })
                        .collect(),
                });
                self.latest.insert(topic.to_string(), t.clone());
                t
            }
        };
        let mut before: Row = vec![Value::Null; table.columns.len()];
        for ((_, kc), v) in columns.iter().zip(values) {
            let Some(i) = table.columns.iter().position(|c| c.name == kc.name) else {
                return Err(data(format!(
                    "key column {} is not a column of {}",
                    kc.name, table.id
                )));
            };
            before[i] = value(v, &kc.ty).map_err(data)?;
        }
        Ok(Decoded::Tombstone(Some(Change {
            table,
            op: Op::Delete,
            before: Some(before),
            after: None,
            tx: TxInfo {
                xid: h.txid,
                commit_lsn: lsn,
                commit_time_us: 0,
            },
            seq,
            snapshot: SnapshotMark::No,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::{encode_envelope, encode_key, SourceInfo};
    use crate::schema::{key_schema, value_schema};

    fn table() -> Arc<TableSchema> {
        let col = |name: &str, ty, pg: &str, key| Column {
            name: name.into(),
            ty,
            pg_type: pg.into(),
            type_oid: 0,
            is_key: key,
            attnum: None,
        };
        Arc::new(TableSchema {
            id: TableId::new("public", "items"),
            relation_id: 7,
            columns: vec![
                col("id", ColumnType::Int64, "bigint", true),
                col(
                    "price",
                    ColumnType::Decimal {
                        precision: 10,
                        scale: 2,
                    },
                    "numeric(10,2)",
                    false,
                ),
                col("note text", ColumnType::Text, "text", false),
                col(
                    "tags",
                    ColumnType::Array(Box::new(ColumnType::Int32)),
                    "integer[]",
                    false,
                ),
                col(
                    "at",
                    ColumnType::TimestampTz,
                    "timestamp with time zone",
                    false,
                ),
            ],
        })
    }

    #[test]
    fn decodes_what_the_encoder_writes() {
        let t = table();
        let topic = "demo.public.items";
        let mut plans = HashMap::new();
        let key = key_schema(&t, topic).expect("key");
        let value = value_schema(&t, topic).expect("value");
        plans.insert(1, Arc::new(plan(&key).expect("key plan")));
        plans.insert(2, Arc::new(plan(&value).expect("value plan")));
        let change = Change {
            table: t.clone(),
            op: Op::Update,
            before: None,
            after: Some(vec![
                Value::Long(5),
                Value::Decimal(vec![0x01, 0x2c]),
                Value::UnchangedToast,
                Value::Array(vec![Value::Int(1), Value::Null]),
                Value::Long(-3),
            ]),
            tx: TxInfo {
                xid: Some(900),
                commit_lsn: Lsn(0x1_0000_0010),
                commit_time_us: 1_700_000_000_123_000,
            },
            seq: 4,
            snapshot: SnapshotMark::No,
        };
        let mut kbuf = Vec::new();
        let mut vbuf = Vec::new();
        encode_key(&mut kbuf, 1, &t, &[change.after.as_ref()]).expect("key");
        let info = SourceInfo {
            name: "demo".into(),
            db: "shop".into(),
        };
        encode_envelope(&mut vbuf, 2, &change, &info, 1).expect("envelope");
        let mut reader = EventReader {
            registry: crate::Registry::new("http://127.0.0.1:1", std::time::Duration::from_secs(1))
                .expect("registry"),
            plans,
            tables: HashMap::new(),
            latest: HashMap::new(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let got = rt
            .block_on(reader.decode(topic, Some(&kbuf), Some(&vbuf), &Default::default()))
            .expect("decodes");
        let Decoded::Change(got) = got else {
            panic!("expected a change")
        };
        assert_eq!(got.op, Op::Update);
        assert_eq!(got.after, change.after);
        assert_eq!(got.before, None);
        assert_eq!(got.seq, 4);
        assert_eq!(got.tx.xid, Some(900));
        assert_eq!(got.tx.commit_lsn, change.tx.commit_lsn);
        assert_eq!(got.tx.commit_time_us, 1_700_000_000_123_000);
        assert_eq!(got.table.id, t.id);
        assert_eq!(got.table.columns[2].name, "note text");
        assert_eq!(got.table.columns[1].ty, t.columns[1].ty);
        assert!(got.table.columns[0].is_key && !got.table.columns[1].is_key);
        assert!(matches!(
            rt.block_on(reader.decode(topic, Some(&kbuf), None, &Default::default())),
            Err(DecodeError::Frame(_))
        ));
        assert!(matches!(
            rt.block_on(reader.decode(topic, None, None, &Default::default())),
            Ok(Decoded::Tombstone(None))
        ));
        let h = TombstoneHeaders {
            schema: Some("public".into()),
            table: Some("items".into()),
            lsn: Some(Lsn(77)),
            seq: Some(3),
            txid: Some(9),
        };
        let Ok(Decoded::Tombstone(Some(del))) =
            rt.block_on(reader.decode(topic, Some(&kbuf), None, &h))
        else {
            panic!("a tombstone with headers is a delete")
        };
        assert_eq!(del.op, Op::Delete);
        assert!(
            Arc::ptr_eq(&del.table, &got.table),
            "the newest shape of the topic"
        );
        let before = del.before.expect("key row");
        assert_eq!(before[0], Value::Long(5));
        assert!(before[1..].iter().all(|v| *v == Value::Null));
        assert_eq!((del.tx.commit_lsn, del.seq), (Lsn(77), 3));
        let truncated = &vbuf[..vbuf.len() - 3];
        assert!(matches!(
            rt.block_on(reader.decode(topic, Some(&kbuf), Some(truncated), &Default::default())),
            Err(DecodeError::Data { .. })
        ));
        assert!(matches!(
            rt.block_on(reader.decode(topic, None, Some(b"garbage"), &Default::default())),
            Err(DecodeError::Frame(_))
        ));
    }

    #[test]
    fn values_in_text_form_round_trip_in_keys_and_values() {
        let dec = ColumnType::Decimal {
            precision: 10,
            scale: 2,
        };
        let col = |name: &str, ty: ColumnType, key| Column {
            name: name.into(),
            ty,
            pg_type: "t".into(),
            type_oid: 0,
            is_key: key,
            attnum: None,
        };
        let t = Arc::new(TableSchema {
            id: TableId::new("public", "odd"),
            relation_id: 8,
            columns: vec![
                col("k", dec.clone(), true),
                col("n", dec.clone(), false),
                col("a", ColumnType::Array(Box::new(ColumnType::Int32)), false),
                col("m", dec, false),
            ],
        });
        let topic = "demo.public.odd";
        let key = key_schema(&t, topic).expect("key");
        let value = value_schema(&t, topic).expect("value");
        assert!(key.contains(r#""type":[{"logicalType":"decimal""#), "{key}");
        let mut plans = HashMap::new();
        plans.insert(1, Arc::new(plan(&key).expect("key plan")));
        plans.insert(2, Arc::new(plan(&value).expect("value plan")));
        let after = vec![
            Value::Text("NaN".into()),
            Value::Text("-Infinity".into()),
            Value::Text("[0:1]={{1,2},{3,4}}".into()),
            Value::Decimal(vec![0x30, 0x39]),
        ];
        let change = Change {
            table: t.clone(),
            op: Op::Insert,
            before: None,
            after: Some(after.clone()),
            tx: TxInfo {
                xid: Some(1),
                commit_lsn: Lsn(16),
                commit_time_us: 0,
            },
            seq: 0,
            snapshot: SnapshotMark::No,
        };
        let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
        encode_key(&mut kbuf, 1, &t, &[change.after.as_ref()]).expect("key");
        let info = SourceInfo {
            name: "demo".into(),
            db: "shop".into(),
        };
        encode_envelope(&mut vbuf, 2, &change, &info, 1).expect("envelope");
        for (schema, bytes) in [(&key, &kbuf), (&value, &vbuf)] {
            let parsed = apache_avro::Schema::parse_str(schema).expect("schema parses");
            let mut rest = &bytes[5..];
            apache_avro::reader::datum::GenericDatumReader::builder(&parsed)
                .build()
                .expect("reader")
                .read_value(&mut rest)
                .expect("apache-avro reads it");
            assert!(rest.is_empty());
        }
        let mut reader = EventReader {
            registry: crate::Registry::new("http://127.0.0.1:1", std::time::Duration::from_secs(1))
                .expect("registry"),
            plans,
            tables: HashMap::new(),
            latest: HashMap::new(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let Ok(Decoded::Change(got)) =
            rt.block_on(reader.decode(topic, Some(&kbuf), Some(&vbuf), &Default::default()))
        else {
            panic!("decodes")
        };
        assert_eq!(got.after, Some(after));
        let h = TombstoneHeaders {
            schema: Some("public".into()),
            table: Some("odd".into()),
            lsn: Some(Lsn(77)),
            seq: Some(3),
            txid: Some(9),
        };
        let Ok(Decoded::Tombstone(Some(del))) =
            rt.block_on(reader.decode(topic, Some(&kbuf), None, &h))
        else {
            panic!("a tombstone with headers is a delete")
        };
        assert_eq!(del.before.expect("key row")[0], Value::Text("NaN".into()));
    }
}
