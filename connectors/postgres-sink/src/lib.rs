//! BitClone9's PostgreSQL target: applies change events to tables of another database.
//!
//! ```text
//!  [Change] ──► collapse per key ──► COPY into a staging table ──► DELETE USING / INSERT ... ON
//!               (last state wins,     (one per table shape,         CONFLICT DO UPDATE / UPDATE
//!                TOAST kept)           temporary, reused)            for unchanged-TOAST rows
//! ```
//!
//! A batch is applied in one target transaction together with the sink's positions (table
//! `bitclone9.sink_positions`), so the rows and the record of what was applied commit or vanish
//! together: after a crash the sink starts from exactly what the target holds.

mod columns;
mod dropped;
mod keyless;
pub mod text;

pub use columns::ColumnDrop;
pub use dropped::TableDrop;

use bitclone9_core::{Change, Column, Op, SnapshotMark, TableId, TableSchema, Value};
use bitclone9_postgres_source::{connect_session, PgEndpoint};
use std::collections::HashMap;
use std::sync::Arc;
use tokio_postgres::Client;

/// A failure to apply. [`TargetError::is_poison`] tells a change the target refuses (which
/// retrying cannot mend) from a target that is unreachable or busy.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("cannot reach the target PostgreSQL: {0}")]
    Unreachable(String),
    #[error("target table {table}: {detail}")]
    Refused {
        table: String,
        sqlstate: String,
        detail: String,
    },
    #[error("target table {table}: {detail}")]
    Unusable { table: String, detail: String },
    /// A column change of the source the target cannot follow by itself: the sink waits
    /// (retrying) until an operator makes it.
    #[error("target table {table}: {detail}")]
    SchemaChange { table: String, detail: String },
    #[error("target: {0}")]
    Other(String),
}

impl TargetError {
    /// True when the target refuses the data itself: a constraint, a type, a missing key.
    pub fn is_poison(&self) -> bool {
        match self {
            TargetError::Refused { sqlstate, .. } => {
                // 08 connection, 40 rollback (serialization, deadlock), 53 resources,
                // 57 operator intervention, 58 system: worth retrying; the rest is the data.
                !["08", "40", "53", "57", "58", "55"]
                    .iter()
                    .any(|c| sqlstate.starts_with(c))
            }
            TargetError::Unusable { .. } => true,
            TargetError::SchemaChange { .. }
            | TargetError::Unreachable(_)
            | TargetError::Other(_) => false,
        }
    }

    /// The SQLSTATE or a short label, for metrics and dead-letter headers.
    pub fn code(&self) -> &str {
        match self {
            TargetError::Refused { sqlstate, .. } => sqlstate,
            TargetError::Unusable { .. } => "unusable_table",
            TargetError::SchemaChange { .. } => "schema_change",
            TargetError::Unreachable(_) => "unreachable",
            TargetError::Other(_) => "other",
        }
    }
}

fn db_error(table: &str, e: tokio_postgres::Error) -> TargetError {
    match e.as_db_error() {
        Some(d) => TargetError::Refused {
            table: table.to_string(),
            sqlstate: d.code().code().to_string(),
            detail: match d.detail() {
                Some(x) => format!("{} ({x})", d.message()),
                None => d.message().to_string(),
            },
        },
        None if e.is_closed() => TargetError::Unreachable(e.to_string()),
        None => TargetError::Unreachable(format!("{e}")),
    }
}

/// Quotes an identifier.
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// How the target is reached and shaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresTargetConfig {
    /// The sink's name (positions are stored under it).
    pub name: String,
    pub endpoint: PgEndpoint,
    /// Create missing tables (and schemas) from the event schemas.
    pub create_tables: bool,
    /// Put every table into this schema instead of its source schema.
    pub schema: Option<String>,
    /// What a source column's drop does to its target column.
    pub on_column_drop: ColumnDrop,
    /// What a source table's drop does to its target table.
    pub on_table_drop: TableDrop,
}

/// What the sink has applied from one partition: its Kafka offset and the source position of
/// the last change applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    pub offset: i64,
    pub watermark: Watermark,
}

/// A record's place in its source: (commit LSN, streamed after snapshot, seq, part). Within a
/// partition, records arrive in increasing order, except those a source sends again after a
/// restart: anything not above the stored watermark is already applied. Records sharing a
/// change's (lsn, seq) are told apart by `part`: [`Part::Barrier`] (a shape barrier, before the
/// change it announces), [`Part::SnapshotStart`] (the truncate opening a table's snapshot,
/// before its first row), [`Part::Event`], [`Part::Tombstone`] (after the event it closes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Watermark {
    pub lsn: u64,
    pub streamed: bool,
    pub seq: u64,
    pub part: Part,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub enum Part {
    /// A shape barrier: the mark a source writes to every partition of a topic just before the
    /// first event of a table's new column types (see the sink's barrier).
    Barrier = -1,
    SnapshotStart = 0,
    #[default]
    Event = 1,
    Tombstone = 2,
}

impl Part {
    fn from_i16(v: i16) -> Self {
        match v {
            -1 => Part::Barrier,
            0 => Part::SnapshotStart,
            2 => Part::Tombstone,
            _ => Part::Event,
        }
    }
}

impl Watermark {
    /// The watermark of an event (a tombstone's is [`Watermark::of_tombstone`]).
    pub fn of(change: &Change) -> Self {
        let snapshot_start = change.op == Op::Truncate && change.snapshot != SnapshotMark::No;
        Self {
            lsn: change.tx.commit_lsn.0,
            streamed: change.streamed(),
            seq: change.seq,
            part: if snapshot_start {
                Part::SnapshotStart
            } else {
                Part::Event
            },
        }
    }

    pub fn of_tombstone(change: &Change) -> Self {
        Self {
            part: Part::Tombstone,
            ..Self::of(change)
        }
    }
}

/// One row of `bitclone9.sink_positions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionPosition {
    pub topic: String,
    pub partition: i32,
    pub applied: Applied,
}

/// SQL and staging table for one table shape.
struct ShapeSql {
    stage: String,
    copy: String,
    delete: String,
    upsert: String,
    partial: String,
    key: Vec<usize>,
    /// For a table without a key: its changes are applied in order by full-row match.
    keyless: Option<keyless::KeylessSql>,
}

/// A row's fate after a batch, per key.
enum Fate<'a> {
    Delete(&'a Change),
    /// New values; `None` where an unchanged TOAST value must be kept.
    Upsert(Vec<Option<&'a Value>>),
}

/// Counts of one apply.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyStats {
    pub upserts: u64,
    pub deletes: u64,
    pub truncates: u64,
    /// Updates of unchanged-TOAST rows that found no row to update in the target.
    pub missing_rows: u64,
}

pub struct PostgresTarget {
    cfg: PostgresTargetConfig,
    client: Client,
    shapes: HashMap<(TableId, u64), Arc<ShapeSql>>,
    /// Columns known to exist per target table.
    columns: HashMap<TableId, Vec<String>>,
    stages: usize,
    /// Staging tables written in the open transaction (cleared before reuse).
    dirty: Vec<String>,
    /// Shapes prepared in the open transaction: their tables, columns and staging tables vanish
    /// with a rollback, so they are forgotten with it.
    prepared: Vec<(TableId, u64)>,
    /// Source columns of each target table by attnum (`bitclone9.source_columns`), as loaded
    /// or changed in the open transaction; forgotten with a rollback.
    column_maps: HashMap<TableId, columns::ColumnMap>,
}

const POSITIONS_DDL: &str = "CREATE SCHEMA IF NOT EXISTS bitclone9;
CREATE TABLE IF NOT EXISTS bitclone9.sink_positions (
    sink text NOT NULL,
    topic text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset bigint NOT NULL,
    lsn numeric(20) NOT NULL,
    streamed boolean NOT NULL,
    seq bigint NOT NULL,
    part smallint NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sink, topic, kafka_partition)
)";

impl PostgresTarget {
    pub async fn connect(cfg: PostgresTargetConfig) -> Result<Self, TargetError> {
        let client = positions_session(&cfg.endpoint, &cfg.name).await?;
        Ok(Self {
            cfg,
            client,
            shapes: HashMap::new(),
            columns: HashMap::new(),
            stages: 0,
            dirty: Vec::new(),
            prepared: Vec::new(),
            column_maps: HashMap::new(),
        })
    }

    /// The target table a source table is written to.
    pub fn target_of(&self, source: &TableId) -> TableId {
        TableId::new(
            self.cfg.schema.clone().unwrap_or(source.schema.clone()),
            source.name.clone(),
        )
    }

    /// Every stored position of this sink.
    pub async fn positions(&self) -> Result<Vec<PartitionPosition>, TargetError> {
        load_positions(&self.client, &self.cfg.name, None).await
    }

    pub async fn begin(&mut self) -> Result<(), TargetError> {
        self.dirty.clear();
        self.prepared.clear();
        self.simple("BEGIN").await
    }

    pub async fn commit(&mut self) -> Result<(), TargetError> {
        self.dirty.clear();
        self.prepared.clear();
        self.simple("COMMIT").await
    }

    pub async fn rollback(&mut self) {
        self.dirty.clear();
        self.forget_prepared(0);
        self.column_maps.clear();
        self.columns.clear();
        let _ = self.simple("ROLLBACK").await;
    }

    /// Forgets the shapes prepared since the `from`-th of the open transaction.
    fn forget_prepared(&mut self, from: usize) {
        for (table, fp) in self.prepared.drain(from..) {
            self.shapes.remove(&(table.clone(), fp));
            self.columns.remove(&table);
        }
    }

    async fn simple(&self, sql: &str) -> Result<(), TargetError> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| db_error("-", e))
    }

    /// Reads and locks this sink's positions of the given partitions, inside the open
    /// transaction: a second daemon applying the same partitions waits here.
    pub async fn lock_positions(
        &self,
        partitions: &[(String, i32)],
    ) -> Result<Vec<PartitionPosition>, TargetError> {
        load_positions(&self.client, &self.cfg.name, Some(partitions)).await
    }

    /// Stores positions, inside the open transaction.
    pub async fn save_positions(&self, positions: &[PartitionPosition]) -> Result<(), TargetError> {
        if positions.is_empty() {
            return Ok(());
        }
        let topics: Vec<&str> = positions.iter().map(|p| p.topic.as_str()).collect();
        let parts: Vec<i32> = positions.iter().map(|p| p.partition).collect();
        let offsets: Vec<i64> = positions.iter().map(|p| p.applied.offset).collect();
        let lsns: Vec<String> = positions
            .iter()
            .map(|p| p.applied.watermark.lsn.to_string())
            .collect();
        let streamed: Vec<bool> = positions
            .iter()
            .map(|p| p.applied.watermark.streamed)
            .collect();
        let seqs: Vec<i64> = positions
            .iter()
            .map(|p| p.applied.watermark.seq as i64)
            .collect();
        let record_parts: Vec<i16> = positions
            .iter()
            .map(|p| p.applied.watermark.part as i16)
            .collect();
        self.client
            .execute(
                "INSERT INTO bitclone9.sink_positions AS p
                   (sink, topic, kafka_partition, kafka_offset, lsn, streamed, seq, part)
                 SELECT $1, t, k, o, l::numeric, s, q, r
                   FROM unnest($2::text[], $3::int[], $4::bigint[], $5::text[], $6::bool[], $7::bigint[], $8::smallint[])
                     AS u(t, k, o, l, s, q, r)
                 ON CONFLICT (sink, topic, kafka_partition) DO UPDATE
                   SET kafka_offset = EXCLUDED.kafka_offset, lsn = EXCLUDED.lsn,
                       streamed = EXCLUDED.streamed, seq = EXCLUDED.seq, part = EXCLUDED.part,
                       applied_at = now()",
                &[
                    &self.cfg.name,
                    &topics,
                    &parts,
                    &offsets,
                    &lsns,
                    &streamed,
                    &seqs,
                    &record_parts,
                ],
            )
            .await
            .map_err(|e| db_error("bitclone9.sink_positions", e))?;
        Ok(())
    }

    /// Follows the source's column changes (by attnum) for events of `table`'s shape seen up to
    /// `at`: renames, retypes, adds or drops target columns when the shape is current, and says
    /// how to write the events (an older shape is written to the columns it became).
    async fn follow_columns(
        &mut self,
        table: &TableSchema,
        at: Watermark,
    ) -> Result<columns::View, TargetError> {
        let identity = || columns::View {
            schema: table.clone(),
            keep: None,
        };
        // Events without column numbers (written by an older BitClone9) are followed by name.
        if table.columns.iter().all(|c| c.attnum.is_none()) {
            return Ok(identity());
        }
        let target = self.target_of(&table.id);
        let map = match self.column_maps.get(&target) {
            Some(m) => m.clone(),
            None => columns::load(&self.client, &target).await?,
        };
        let existing = match self.columns.get(&target) {
            Some(c) => c.clone(),
            None => self.existing_columns(&target).await?,
        };
        // A table not created yet is created from this shape: every column is there then.
        let names: Vec<String> = if existing.is_empty() {
            table.columns.iter().map(|c| c.name.clone()).collect()
        } else {
            existing
        };
        let plan = columns::plan(table, at, &map, &names, self.cfg.on_column_drop);
        if !plan.steps.is_empty() {
            columns::apply_steps(&self.client, &target, &plan.steps).await?;
            // Statements and staging tables of this table name columns as they were.
            self.shapes.retain(|(t, _), _| *t != target);
            self.columns.remove(&target);
        }
        if plan.map != map {
            columns::store(&self.client, &target, &map, &plan.map).await?;
        }
        let view = columns::view(table, &plan.written);
        self.column_maps.insert(target, plan.map);
        Ok(view)
    }

    /// Creates the target table when missing (and allowed), adds columns the events have and
    /// the table lacks, and prepares the staging table and statements for this shape.
    async fn shape(&mut self, table: &Arc<TableSchema>) -> Result<Arc<ShapeSql>, TargetError> {
        let target = self.target_of(&table.id);
        let fp = table.fingerprint();
        if let Some(s) = self.shapes.get(&(target.clone(), fp)) {
            return Ok(s.clone());
        }
        let name = format!("{}.{}", ident(&target.schema), ident(&target.name));
        let shown = target.to_string();
        let unusable = |detail: String| TargetError::Unusable {
            table: shown.clone(),
            detail,
        };
        let key: Vec<usize> = table.key_indexes().collect();
        if let Some(c) = table.columns.iter().find(|c| !plain_type(&c.pg_type)) {
            return Err(unusable(format!(
                "column {} has the type {:?}, which is not a plain PostgreSQL type name: refusing to put it into DDL",
                c.name, c.pg_type
            )));
        }
        let existing = match self.columns.get(&target) {
            Some(c) => c.clone(),
            None => self.existing_columns(&target).await?,
        };
        if existing.is_empty() {
            if !self.cfg.create_tables {
                return Err(unusable(
                    "does not exist and create_tables is off: create it, or set create_tables = true".into(),
                ));
            }
            let mut ddl = format!(
                "CREATE SCHEMA IF NOT EXISTS {}; CREATE TABLE IF NOT EXISTS {name} (",
                ident(&target.schema)
            );
            for c in &table.columns {
                ddl.push_str(&format!("{} {}, ", ident(&c.name), c.pg_type));
            }
            let keys: Vec<String> = key.iter().map(|i| ident(&table.columns[*i].name)).collect();
            if keys.is_empty() {
                // A table without a key stays without one (its rows may repeat).
                ddl.truncate(ddl.len() - 2);
                ddl.push(')');
            } else {
                ddl.push_str(&format!("PRIMARY KEY ({}))", keys.join(", ")));
            }
            self.client
                .batch_execute(&ddl)
                .await
                .map_err(|e| self.ddl_error(&shown, table, e))?;
            tracing::info!(table = %shown, "created target table");
        } else {
            for c in table.columns.iter().filter(|c| !existing.contains(&c.name)) {
                let ddl = format!(
                    "ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {} {}",
                    ident(&c.name),
                    c.pg_type
                );
                self.client
                    .batch_execute(&ddl)
                    .await
                    .map_err(|e| self.ddl_error(&shown, table, e))?;
                tracing::info!(table = %shown, column = %c.name, "added a column the events have");
            }
            if !key.is_empty() {
                self.check_unique_key(&target, table, &key).await?;
            }
        }
        let cols = self.existing_columns(&target).await?;
        self.columns.insert(target.clone(), cols);
        if key.is_empty() {
            let sql = Arc::new(ShapeSql {
                stage: String::new(),
                copy: String::new(),
                delete: String::new(),
                upsert: String::new(),
                partial: String::new(),
                key,
                keyless: Some(keyless::KeylessSql::new(&name, table)),
            });
            self.prepared.push((target.clone(), fp));
            self.shapes.insert((target, fp), sql.clone());
            return Ok(sql);
        }

        self.stages += 1;
        let stage = format!("bitclone9_stage_{}", self.stages);
        let list = |prefix: &str| {
            table
                .columns
                .iter()
                .map(|c| format!("{prefix}{}", ident(&c.name)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let key_match = key
            .iter()
            .map(|i| {
                let c = ident(&table.columns[*i].name);
                format!("t.{c} = s.{c}")
            })
            .collect::<Vec<_>>()
            .join(" AND ");
        let non_key: Vec<&Column> = table.columns.iter().filter(|c| !c.is_key).collect();
        let keys = key
            .iter()
            .map(|i| ident(&table.columns[*i].name))
            .collect::<Vec<_>>()
            .join(", ");
        let on_conflict = if non_key.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!(
                "DO UPDATE SET {}",
                non_key
                    .iter()
                    .map(|c| format!("{0} = EXCLUDED.{0}", ident(&c.name)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let partial_set = if non_key.is_empty() {
            format!("{0} = t.{0}", ident(&table.columns[key[0]].name))
        } else {
            non_key
                .iter()
                .map(|c| {
                    format!(
                        "{0} = CASE WHEN {1} = ANY(s.bitclone9_unchanged) THEN t.{0} ELSE s.{0} END",
                        ident(&c.name),
                        pg_literal(&c.name)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let sql = ShapeSql {
            copy: format!(
                "COPY {stage} ({}, bitclone9_op, bitclone9_unchanged) FROM STDIN",
                list("")
            ),
            delete: format!(
                "DELETE FROM {name} AS t USING {stage} AS s WHERE s.bitclone9_op = 'd' AND {key_match}"
            ),
            upsert: format!(
                "INSERT INTO {name} AS t ({}) SELECT {} FROM {stage} AS s WHERE s.bitclone9_op = 'u' ON CONFLICT ({keys}) {on_conflict}",
                list(""),
                list("s.")
            ),
            partial: format!(
                "UPDATE {name} AS t SET {partial_set} FROM {stage} AS s WHERE s.bitclone9_op = 'p' AND {key_match}"
            ),
            stage: stage.clone(),
            key,
            keyless: None,
        };
        let create_stage = format!(
            "CREATE TEMPORARY TABLE {stage} ON COMMIT DELETE ROWS AS SELECT {} FROM {name} WITH NO DATA;
             ALTER TABLE {stage} ADD COLUMN bitclone9_op \"char\", ADD COLUMN bitclone9_unchanged text[]",
            list("")
        );
        self.client
            .batch_execute(&create_stage)
            .await
            .map_err(|e| db_error(&shown, e))?;
        let sql = Arc::new(sql);
        self.prepared.push((target.clone(), fp));
        self.shapes.insert((target, fp), sql.clone());
        Ok(sql)
    }

    fn ddl_error(&self, table: &str, shape: &TableSchema, e: tokio_postgres::Error) -> TargetError {
        let err = db_error(table, e);
        match &err {
            TargetError::Refused {
                sqlstate, detail, ..
            } if sqlstate == "42704" => TargetError::Unusable {
                table: table.to_string(),
                detail: format!(
                    "{detail}: the events use a type the target database lacks (columns: {}); create the type (enum, domain or extension) in the target first",
                    shape
                        .columns
                        .iter()
                        .map(|c| format!("{} {}", c.name, c.pg_type))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
            _ => err,
        }
    }

    async fn existing_columns(&self, t: &TableId) -> Result<Vec<String>, TargetError> {
        let rows = self
            .client
            .query(
                "SELECT a.attname::text FROM pg_attribute a
                   JOIN pg_class c ON c.oid = a.attrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attnum",
                &[&t.schema, &t.name],
            )
            .await
            .map_err(|e| db_error(&t.to_string(), e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// `ON CONFLICT` needs a unique index on exactly the key columns.
    async fn check_unique_key(
        &self,
        t: &TableId,
        table: &TableSchema,
        key: &[usize],
    ) -> Result<(), TargetError> {
        let mut names: Vec<String> = key.iter().map(|i| table.columns[*i].name.clone()).collect();
        names.sort();
        let rows = self
            .client
            .query(
                "SELECT array_agg(a.attname::text ORDER BY a.attname::text)
                   FROM pg_index i
                   JOIN pg_class c ON c.oid = i.indrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey)
                  WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique AND i.indpred IS NULL
                  GROUP BY i.indexrelid",
                &[&t.schema, &t.name],
            )
            .await
            .map_err(|e| db_error(&t.to_string(), e))?;
        if rows.iter().any(|r| r.get::<_, Vec<String>>(0) == names) {
            return Ok(());
        }
        Err(TargetError::Unusable {
            table: t.to_string(),
            detail: format!(
                "has no primary key or unique index on the event key ({}): add one, so changes can be matched to rows",
                names.join(", ")
            ),
        })
    }

    /// Applies `changes` (in partition order) inside the open transaction. Each source table's
    /// rows are collapsed per key to their last state; a truncate, or a table whose shape
    /// changes, closes the run of changes before it.
    pub async fn apply(&mut self, changes: &[&Change]) -> Result<ApplyStats, TargetError> {
        let mut stats = ApplyStats::default();
        let mut start = 0;
        let mut seen: HashMap<&TableId, u64> = HashMap::new();
        for (i, c) in changes.iter().enumerate() {
            let fp = c.table.fingerprint();
            let shape_changed = seen.get(&c.table.id).is_some_and(|f| *f != fp);
            if c.op == Op::Truncate || shape_changed {
                self.apply_run(&changes[start..i], &mut stats).await?;
                seen.clear();
                start = i;
                if c.op == Op::Truncate {
                    // A truncate arrives once per partition; back to back, once is enough.
                    let repeat = i > 0 && {
                        let p = changes[i - 1];
                        p.op == Op::Truncate
                            && p.table.id == c.table.id
                            && Watermark::of(p) == Watermark::of(c)
                    };
                    if !repeat {
                        self.truncate(&c.table).await?;
                        stats.truncates += 1;
                    }
                    start = i + 1;
                    continue;
                }
            }
            seen.insert(&c.table.id, fp);
        }
        self.apply_run(&changes[start..], &mut stats).await?;
        Ok(stats)
    }

    /// Applies one change in a savepoint of the open transaction: on failure the transaction
    /// goes on without it.
    pub async fn apply_isolated(&mut self, change: &Change) -> Result<ApplyStats, TargetError> {
        self.simple("SAVEPOINT bitclone9_one").await?;
        let dirty = self.dirty.clone();
        let prepared = self.prepared.len();
        match self.apply(&[change]).await {
            Ok(s) => {
                self.simple("RELEASE SAVEPOINT bitclone9_one").await?;
                Ok(s)
            }
            Err(e) => {
                self.simple("ROLLBACK TO SAVEPOINT bitclone9_one").await?;
                self.dirty = dirty;
                self.forget_prepared(prepared);
                self.column_maps.clear();
                self.columns.clear();
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, table: &Arc<TableSchema>) -> Result<(), TargetError> {
        let t = self.target_of(&table.id);
        if self.existing_columns(&t).await?.is_empty() {
            return Ok(());
        }
        self.client
            .batch_execute(&format!("TRUNCATE {}.{}", ident(&t.schema), ident(&t.name)))
            .await
            .map_err(|e| db_error(&t.to_string(), e))
    }

    /// Applies a run of changes without truncates or shape changes.
    async fn apply_run(
        &mut self,
        changes: &[&Change],
        stats: &mut ApplyStats,
    ) -> Result<(), TargetError> {
        if changes.is_empty() {
            return Ok(());
        }
        // Group per table, keeping first-seen order.
        let mut order: Vec<&Arc<TableSchema>> = Vec::new();
        let mut groups: HashMap<&TableId, Vec<&Change>> = HashMap::new();
        for c in changes {
            let g = groups.entry(&c.table.id).or_default();
            if g.is_empty() {
                order.push(&c.table);
            }
            g.push(c);
        }
        for table in order {
            let group = &groups[&table.id];
            let at = group
                .iter()
                .map(|c| Watermark::of(c))
                .max()
                .unwrap_or_default();
            let view = self.follow_columns(table, at).await?;
            let target = self.target_of(&table.id).to_string();
            match view.keep {
                None => {
                    let shape = self.shape(table).await?;
                    self.write_table(&shape, table, group, &target, stats)
                        .await?;
                }
                // Events of an older shape: their values go to the columns they became.
                Some(keep) => {
                    let schema = Arc::new(view.schema);
                    let pick = |row: &Option<Vec<Value>>| {
                        row.as_ref()
                            .map(|r| keep.iter().map(|i| r[*i].clone()).collect::<Vec<_>>())
                    };
                    let projected: Vec<Change> = group
                        .iter()
                        .map(|c| Change {
                            table: schema.clone(),
                            op: c.op,
                            before: pick(&c.before),
                            after: pick(&c.after),
                            tx: c.tx,
                            seq: c.seq,
                            snapshot: c.snapshot,
                        })
                        .collect();
                    let refs: Vec<&Change> = projected.iter().collect();
                    let shape = self.shape(&schema).await?;
                    self.write_table(&shape, &schema, &refs, &target, stats)
                        .await?;
                }
            }
        }
        Ok(())
    }

    async fn write_table(
        &mut self,
        shape: &ShapeSql,
        table: &TableSchema,
        changes: &[&Change],
        target: &str,
        stats: &mut ApplyStats,
    ) -> Result<(), TargetError> {
        if let Some(sql) = &shape.keyless {
            let k = keyless::apply(&self.client, sql, table, changes, target).await?;
            if k.missing > 0 {
                stats.missing_rows += k.missing;
                tracing::warn!(table = %target, missing = k.missing, "updates or deletes of a table without a key found no row equal to the old one in the target: the target lacks rows the source has; run bitclone9 verify");
            }
            stats.upserts += k.inserts + k.updates;
            stats.deletes += k.deletes;
            return Ok(());
        }
        // Collapse per key: the last state of each row wins; unchanged TOAST values are taken
        // from an earlier state of the same batch when there is one, else kept in the target.
        let mut fates: HashMap<String, Fate> = HashMap::with_capacity(changes.len());
        let mut order: Vec<String> = Vec::with_capacity(changes.len());
        let bad = |detail: String| TargetError::Refused {
            table: target.to_string(),
            sqlstate: "22000".into(),
            detail,
        };
        for c in changes {
            let row_key = |row: &[Value]| -> Result<String, TargetError> {
                let mut k = String::new();
                for i in &shape.key {
                    if matches!(row[*i], Value::Null | Value::UnchangedToast) {
                        return Err(bad(format!(
                            "key column {} has no value in the change",
                            table.columns[*i].name
                        )));
                    }
                    text::copy_field(&mut k, &row[*i], &table.columns[*i].ty)
                        .map_err(|e| bad(e.to_string()))?;
                    k.push('\t');
                }
                Ok(k)
            };
            match c.op {
                Op::Insert | Op::Update | Op::Read => {
                    let after = c
                        .after
                        .as_ref()
                        .ok_or_else(|| bad(format!("{} event without a new row", c.op.code())))?;
                    // An update that changed the key leaves the old key to the tombstone that
                    // follows it in the old key's partition, in order with that key's changes.
                    let key = row_key(after)?;
                    let mut values: Vec<Option<&Value>> = after
                        .iter()
                        .map(|v| (!matches!(v, Value::UnchangedToast)).then_some(v))
                        .collect();
                    if values.iter().any(Option::is_none) {
                        // Unchanged TOAST values come from an earlier state of the row in this
                        // batch: under its key, or under the old key when the key changed.
                        let old_key = match &c.before {
                            Some(b) => Some(row_key(b)?).filter(|k| *k != key),
                            None => None,
                        };
                        let earlier = fates
                            .get(&key)
                            .or_else(|| old_key.as_ref().and_then(|k| fates.get(k)));
                        if let Some(Fate::Upsert(prev)) = earlier {
                            for (v, p) in values.iter_mut().zip(prev) {
                                if v.is_none() {
                                    *v = *p;
                                }
                            }
                        }
                        if old_key.is_some() && values.iter().any(Option::is_none) {
                            // The row moves to a new key, and the source did not send the large
                            // values it kept: writing it would lose them.
                            return Err(bad(format!(
                                "an update moved a row to a new key and left large (TOAST) values unchanged, which PostgreSQL does not send under the default replica identity ({}): set REPLICA IDENTITY FULL on the source table",
                                table
                                    .columns
                                    .iter()
                                    .zip(&values)
                                    .filter(|(_, v)| v.is_none())
                                    .map(|(c, _)| c.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )));
                        }
                    }
                    set(&mut order, &mut fates, key, Fate::Upsert(values));
                }
                Op::Delete => {
                    let before = c
                        .before
                        .as_ref()
                        .ok_or_else(|| bad("delete event without the old row".into()))?;
                    let key = row_key(before)?;
                    set(&mut order, &mut fates, key, Fate::Delete(c));
                }
                Op::Truncate => {}
            }
        }
        let mut buf = String::with_capacity(order.len() * 64);
        let (mut deletes, mut upserts, mut partials) = (0u64, 0u64, 0u64);
        for k in &order {
            match &fates[k] {
                Fate::Delete(c) => {
                    deletes += 1;
                    let row = c.before.as_ref().or(c.after.as_ref());
                    for (i, col) in table.columns.iter().enumerate() {
                        if shape.key.contains(&i) {
                            if let Some(r) = row {
                                text::copy_field(&mut buf, &r[i], &col.ty)
                                    .map_err(|e| bad(format!("column {}: {e}", col.name)))?;
                            }
                        } else {
                            buf.push_str("\\N");
                        }
                        buf.push('\t');
                    }
                    buf.push_str("d\t\\N\n");
                }
                Fate::Upsert(values) => {
                    let mut unchanged: Vec<&str> = Vec::new();
                    for (col, v) in table.columns.iter().zip(values) {
                        match v {
                            Some(v) => text::copy_field(&mut buf, v, &col.ty)
                                .map_err(|e| bad(format!("column {}: {e}", col.name)))?,
                            None => {
                                unchanged.push(&col.name);
                                buf.push_str("\\N");
                            }
                        }
                        buf.push('\t');
                    }
                    if unchanged.is_empty() {
                        upserts += 1;
                        buf.push_str("u\t\\N\n");
                    } else {
                        partials += 1;
                        let mut arr = String::from("{");
                        for (i, n) in unchanged.iter().enumerate() {
                            if i > 0 {
                                arr.push(',');
                            }
                            arr.push('"');
                            arr.push_str(&n.replace('\\', "\\\\").replace('"', "\\\""));
                            arr.push('"');
                        }
                        arr.push('}');
                        buf.push_str("p\t");
                        text::copy_escape(&mut buf, &arr);
                        buf.push('\n');
                    }
                }
            }
        }
        if self.dirty.contains(&shape.stage) {
            self.client
                .batch_execute(&format!("DELETE FROM {}", shape.stage))
                .await
                .map_err(|e| db_error(target, e))?;
        }
        self.dirty.push(shape.stage.clone());
        copy_in(&self.client, &shape.copy, buf, target).await?;
        if deletes > 0 {
            self.client
                .execute(shape.delete.as_str(), &[])
                .await
                .map_err(|e| db_error(target, e))?;
        }
        if upserts > 0 {
            self.client
                .execute(shape.upsert.as_str(), &[])
                .await
                .map_err(|e| db_error(target, e))?;
        }
        if partials > 0 {
            let n = self
                .client
                .execute(shape.partial.as_str(), &[])
                .await
                .map_err(|e| db_error(target, e))?;
            if n < partials {
                stats.missing_rows += partials - n;
                tracing::warn!(table = %target, missing = partials - n, "updates that left large (TOAST) values unchanged found no row in the target: the target lacks rows the source has; run bitclone9 verify");
            }
        }
        stats.deletes += deletes;
        stats.upserts += upserts + partials;
        Ok(())
    }
}

/// Records a key's fate, remembering the order keys were first seen in.
fn set<'a>(
    order: &mut Vec<String>,
    fates: &mut HashMap<String, Fate<'a>>,
    k: String,
    fate: Fate<'a>,
) {
    if !fates.contains_key(&k) {
        order.push(k.clone());
    }
    fates.insert(k, fate);
}

/// Streams `data` into `COPY ... FROM STDIN`.
async fn copy_in(client: &Client, sql: &str, data: String, table: &str) -> Result<(), TargetError> {
    use futures::SinkExt;
    let sink = client
        .copy_in::<_, bytes::Bytes>(sql)
        .await
        .map_err(|e| db_error(table, e))?;
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data))
        .await
        .map_err(|e| db_error(table, e))?;
    sink.finish().await.map_err(|e| db_error(table, e))?;
    Ok(())
}

/// A type name as `format_type` prints it (`numeric(10,2)`, `character varying(20)[]`,
/// `"My Type"`, `public.mood`): nothing that could end the DDL statement it goes into.
fn plain_type(t: &str) -> bool {
    let mut depth = 0i32;
    let mut quoted = false;
    for c in t.chars() {
        match c {
            '"' => quoted = !quoted,
            _ if quoted => {
                if c == ';' {
                    return false;
                }
            }
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            c if c.is_ascii_alphanumeric() || " _,.[]".contains(c) => {}
            // A negative type modifier, as in numeric(5,-2) ("--" is refused below).
            '-' if depth > 0 => {}
            _ => return false,
        }
    }
    !t.is_empty() && depth == 0 && !quoted && !t.contains("--")
}

/// A SQL string literal.
fn pg_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

async fn load_positions(
    client: &Client,
    sink: &str,
    only: Option<&[(String, i32)]>,
) -> Result<Vec<PartitionPosition>, TargetError> {
    let rows = match only {
        None => {
            client
                .query(
                    "SELECT topic, kafka_partition, kafka_offset, lsn::text, streamed, seq, part
                       FROM bitclone9.sink_positions WHERE sink = $1 ORDER BY topic, kafka_partition",
                    &[&sink],
                )
                .await
        }
        Some(parts) => {
            let topics: Vec<&str> = parts.iter().map(|(t, _)| t.as_str()).collect();
            let nums: Vec<i32> = parts.iter().map(|(_, p)| *p).collect();
            // A row to lock for each partition, also the first time: two daemons applying the
            // same partition then wait for each other.
            client
                .execute(
                    "INSERT INTO bitclone9.sink_positions
                       (sink, topic, kafka_partition, kafka_offset, lsn, streamed, seq, part)
                     SELECT $1, t, k, -1, 0, false, 0, 0 FROM unnest($2::text[], $3::int[]) AS u(t, k)
                     ON CONFLICT (sink, topic, kafka_partition) DO NOTHING",
                    &[&sink, &topics, &nums],
                )
                .await
                .map_err(|e| db_error("bitclone9.sink_positions", e))?;
            client
                .query(
                    "SELECT topic, kafka_partition, kafka_offset, lsn::text, streamed, seq, part
                       FROM bitclone9.sink_positions
                      WHERE sink = $1 AND (topic, kafka_partition) IN
                            (SELECT * FROM unnest($2::text[], $3::int[]))
                      FOR UPDATE",
                    &[&sink, &topics, &nums],
                )
                .await
        }
    }
    .map_err(|e| db_error("bitclone9.sink_positions", e))?;
    rows.iter()
        .filter(|r| r.get::<_, i64>(2) >= 0 || only.is_some())
        .map(|r| {
            let lsn: String = r.get(3);
            Ok(PartitionPosition {
                topic: r.get(0),
                partition: r.get(1),
                applied: Applied {
                    offset: r.get(2),
                    watermark: Watermark {
                        lsn: lsn.parse().map_err(|_| {
                            TargetError::Other(format!("bitclone9.sink_positions: bad lsn {lsn}"))
                        })?,
                        streamed: r.get(4),
                        seq: r.get::<_, i64>(5) as u64,
                        part: Part::from_i16(r.get(6)),
                    },
                },
            })
        })
        .collect()
}

/// A session in the target with the positions table in place, for the `offsets` commands.
async fn positions_session(endpoint: &PgEndpoint, sink: &str) -> Result<Client, TargetError> {
    let client = connect_session(endpoint, &format!("bitclone9-sink-{sink}"))
        .await
        .map_err(|e| TargetError::Unreachable(e.to_string()))?;
    client
        .batch_execute(POSITIONS_DDL)
        .await
        .map_err(|e| db_error("bitclone9.sink_positions", e))?;
    client
        .batch_execute(columns::SOURCE_COLUMNS_DDL)
        .await
        .map_err(|e| db_error("bitclone9.source_columns", e))?;
    Ok(client)
}

/// Deletes this sink's positions (all, or one topic's), so the next run applies from wherever
/// the consumer starts. Returns how many were deleted.
pub async fn reset_positions(endpoint: &PgEndpoint, sink: &str) -> Result<u64, TargetError> {
    let client = positions_session(endpoint, sink).await?;
    client
        .execute(
            "DELETE FROM bitclone9.sink_positions WHERE sink = $1",
            &[&sink],
        )
        .await
        .map_err(|e| db_error("bitclone9.sink_positions", e))
}

/// Sets a sink's positions to the given last-applied offsets, with no source position: every
/// change after them is applied again (`offsets reset --to-offset | --to-time`).
pub async fn set_positions(
    endpoint: &PgEndpoint,
    sink: &str,
    applied: &[(String, i32, i64)],
) -> Result<(), TargetError> {
    let client = positions_session(endpoint, sink).await?;
    let topics: Vec<&str> = applied.iter().map(|(t, _, _)| t.as_str()).collect();
    let parts: Vec<i32> = applied.iter().map(|(_, p, _)| *p).collect();
    let offsets: Vec<i64> = applied.iter().map(|(_, _, o)| *o).collect();
    client
        .execute(
            "INSERT INTO bitclone9.sink_positions
               (sink, topic, kafka_partition, kafka_offset, lsn, streamed, seq, part)
             SELECT $1, t, k, o, 0, false, 0, 0 FROM unnest($2::text[], $3::int[], $4::bigint[]) AS u(t, k, o)
             ON CONFLICT (sink, topic, kafka_partition) DO UPDATE
               SET kafka_offset = EXCLUDED.kafka_offset, lsn = 0, streamed = false, seq = 0, part = 0,
                   applied_at = now()",
            &[&sink, &topics, &parts, &offsets],
        )
        .await
        .map_err(|e| db_error("bitclone9.sink_positions", e))?;
    Ok(())
}

/// Reads a sink's positions from its target without changing anything.
pub async fn read_positions(
    endpoint: &PgEndpoint,
    sink: &str,
) -> Result<Vec<PartitionPosition>, TargetError> {
    let client = connect_session(endpoint, &format!("bitclone9-sink-{sink}"))
        .await
        .map_err(|e| TargetError::Unreachable(e.to_string()))?;
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('bitclone9.sink_positions') IS NOT NULL",
            &[],
        )
        .await
        .map_err(|e| db_error("bitclone9.sink_positions", e))?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    load_positions(&client, sink, None).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_type_names_go_into_ddl() {
        for ok in [
            "integer",
            "numeric(10,2)",
            "character varying(20)[]",
            "timestamp with time zone",
            "public.mood",
            "\"My Type\"",
            "numeric(12,3)[]",
            "numeric(5,-2)",
        ] {
            assert!(plain_type(ok), "{ok}");
        }
        for bad in [
            "int); DROP TABLE x; --",
            "int) , evil int",
            "int -- comment",
            "numeric(5,--2)",
            "int - 1",
            "text'",
            "\"a;b\"",
            "",
            "(int",
        ] {
            assert!(!plain_type(bad), "{bad}");
        }
    }
}
