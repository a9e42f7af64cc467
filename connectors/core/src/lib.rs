//! BitClone9's change-event model, shared by every connector.
//!
//! ```text
//!  PostgreSQL WAL ──► postgres-source ──► Change ──► kafka (Avro, registry) ──► Kafka topic
//!                      (pgoutput, COPY)   (this crate)
//! ```
//!
//! A [`Change`] is one row event of one table. Every change carries the commit LSN of its source
//! transaction and its ordinal within that transaction: together they give a total order and an
//! idempotency token, identical when the same WAL is read again after a restart.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A PostgreSQL WAL position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// An LSN that is not of the form `HI/LO` in hexadecimal.
#[derive(Debug, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal numbers separated by '/', e.g. 0/16B3748")]
pub struct LsnParseError(pub String);

impl FromStr for Lsn {
    type Err = LsnParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// A table's schema-qualified name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableId {
    pub schema: String,
    pub name: String,
}

impl TableId {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// The shape of a column's values, independent of any wire format.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ColumnType {
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    Bool,
    Text,
    Bytes,
    /// `numeric(precision, scale)`; values are exact decimals.
    Decimal {
        precision: u32,
        scale: u32,
    },
    /// Days since 1970-01-01.
    Date,
    /// Microseconds since midnight.
    Time,
    /// Microseconds since 1970-01-01 00:00, no time zone.
    Timestamp,
    /// Microseconds since 1970-01-01 00:00 UTC.
    TimestampTz,
    Uuid,
    Json,
    /// A PostgreSQL enum, sent as its label.
    Enum,
    /// A one-dimensional array of the element type; elements may be NULL.
    Array(Box<ColumnType>),
    /// Any type not mapped yet: its text form, with the PostgreSQL type name kept in the schema.
    Other,
}

/// One column of a table.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
    /// The PostgreSQL type as `format_type` prints it, e.g. `numeric(10,2)` or `text[]`.
    pub pg_type: String,
    /// The PostgreSQL type OID.
    pub type_oid: u32,
    /// Part of the primary key (or, without one, of the replica identity index).
    pub is_key: bool,
    /// The source's number of the column (PostgreSQL `attnum`): it stays when the column is
    /// renamed or retyped, so a sink tells a rename from a drop and an add. `None` when unknown.
    pub attnum: Option<i16>,
}

/// A table's columns as the source saw them at a point of the WAL.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TableSchema {
    pub id: TableId,
    /// The source's identifier of the table (the relation OID in PostgreSQL).
    pub relation_id: u32,
    pub columns: Vec<Column>,
}

impl TableSchema {
    /// Indexes of the key columns, in column order.
    pub fn key_indexes(&self) -> impl Iterator<Item = usize> + '_ {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key)
            .map(|(i, _)| i)
    }

    pub fn has_key(&self) -> bool {
        self.columns.iter().any(|c| c.is_key)
    }

    /// A 64-bit digest of the shape (names, types, keys): a new shape means new Avro schemas.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.id.hash(&mut h);
        self.columns.hash(&mut h);
        h.finish()
    }
}

/// One column value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i32),
    Long(i64),
    Float(f32),
    Double(f64),
    Text(String),
    Bytes(Vec<u8>),
    /// An exact decimal: the unscaled integer as big-endian two's complement bytes.
    Decimal(Vec<u8>),
    Array(Vec<Value>),
    /// A TOASTed value the source did not send because the change left it untouched.
    /// Never a placeholder: sinks must keep the value they have.
    UnchangedToast,
}

/// A row: one value per column of its [`TableSchema`], in column order.
pub type Row = Vec<Value>;

/// What happened to a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
    /// A row read by the initial snapshot.
    Read,
}

impl Op {
    /// The envelope's `op` code.
    pub fn code(self) -> &'static str {
        match self {
            Op::Insert => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
            Op::Read => "r",
        }
    }
}

/// Where a snapshot row stands in its snapshot (the envelope's `source.snapshot`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotMark {
    /// A streamed change, not part of a snapshot.
    No,
    /// A row of the snapshot.
    Yes,
    /// The last row of the snapshot.
    Last,
}

/// The source transaction a change belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxInfo {
    /// The transaction id; none for snapshot rows.
    pub xid: Option<u32>,
    /// LSN of the commit record; for snapshot rows, the slot's consistent point.
    pub commit_lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_us: i64,
}

/// One row event.
#[derive(Clone, Debug)]
pub struct Change {
    pub table: Arc<TableSchema>,
    pub op: Op,
    /// The old row: for deletes, and for updates that changed the key or under REPLICA IDENTITY FULL.
    pub before: Option<Row>,
    /// The new row: for inserts, updates and snapshot reads.
    pub after: Option<Row>,
    pub tx: TxInfo,
    /// Ordinal of this change within its transaction (within its table for snapshot rows).
    pub seq: u64,
    pub snapshot: SnapshotMark,
}

impl Change {
    /// Streamed from the WAL, rather than read by a snapshot: snapshot rows and the truncate
    /// opening a snapshot are not. Among changes at one commit position, those read by a
    /// snapshot come first.
    pub fn streamed(&self) -> bool {
        let snapshot_start = self.op == Op::Truncate && self.snapshot != SnapshotMark::No;
        self.op != Op::Read && !snapshot_start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_text() {
        let lsn: Lsn = "16/B374D848".parse().expect("valid lsn");
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("x/1".parse::<Lsn>().is_err());
    }

    #[test]
    fn fingerprint_changes_with_shape() {
        let col = |n: &str, ty| Column {
            name: n.into(),
            ty,
            pg_type: "integer".into(),
            type_oid: 23,
            is_key: false,
            attnum: None,
        };
        let a = TableSchema {
            id: TableId::new("public", "t"),
            relation_id: 1,
            columns: vec![col("a", ColumnType::Int32)],
        };
        let mut b = a.clone();
        assert_eq!(a.fingerprint(), b.fingerprint());
        b.columns.push(col("b", ColumnType::Text));
        assert_ne!(a.fingerprint(), b.fingerprint());
    }
}
