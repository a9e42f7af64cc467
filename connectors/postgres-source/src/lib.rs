//! BitClone9's PostgreSQL source: a consistent snapshot, then the logical replication stream.
//!
//! ```text
//!             CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT
//!                    │ consistent point + snapshot name
//!   ┌────────────────┴───────────────┐
//!   │ snapshot: COPY each table      │  op = r, inside the exported snapshot
//!   └────────────────┬───────────────┘
//!                    ▼ SnapshotDone
//!   ┌────────────────────────────────┐
//!   │ stream: START_REPLICATION      │  pgoutput → Change (c/u/d/t), Commit, Progress
//!   └────────────────────────────────┘
//!                    ▲ acknowledged LSN (only what Kafka has durably stored)
//! ```
//!
//! The source never decides on its own what is safe to confirm: the pipeline hands back, through
//! [`PostgresSource::ack_handle`], the end LSN of the last transaction whose every event is
//! delivered, and only that reaches the slot.

pub mod catalog;
pub mod pgoutput;
mod snapshot;
pub mod spool;
mod stream;
pub mod types;

use bitclone9_core::{Change, Lsn, Op, Row, SnapshotMark, TableId, TableSchema, TxInfo, Value};
use bytes::{Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use pgoutput::{Message, StreamControl, TupleValue};
use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use types::PgType;

pub use snapshot::parse_copy_line;
use snapshot::{begin_resync, import_snapshot, SnapshotState};
use stream::Replaying;

/// Microseconds between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
/// Upper bound of events handed over by one `next_batch` call.
const MAX_BATCH: usize = 4096;
/// Prefix of the logical messages the source writes as heartbeats.
pub const HEARTBEAT_PREFIX: &str = "bitclone9.heartbeat";
/// Prefix of the logical messages the DDL trigger (`ddl_trigger = true`) writes in a
/// transaction that creates, drops or alters a table.
pub const DDL_PREFIX: &str = "bitclone9.ddl";

/// Whether to read the tables' existing rows before streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    Initial,
    Never,
}

/// How the source's connections use TLS, with libpq's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    #[default]
    Disable,
    /// Encrypt, but do not check the server's certificate.
    Require,
    /// Encrypt and check the certificate against the CA, not the host name.
    VerifyCa,
    /// Encrypt, check the certificate and that it names the host.
    VerifyFull,
}

/// TLS settings of the source's connections (catalog and replication alike).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: TlsMode,
    /// PEM file of the CA(s) that sign the server's certificate (else the system's roots).
    pub root_cert: Option<std::path::PathBuf>,
    /// Client certificate and PKCS#8 key (PEM), for servers that require one.
    pub client_cert: Option<std::path::PathBuf>,
    pub client_key: Option<std::path::PathBuf>,
}

impl TlsSettings {
    fn replication(&self) -> TlsConfig {
        let cfg = match self.mode {
            TlsMode::Disable => return TlsConfig::disabled(),
            TlsMode::Require => TlsConfig::require(),
            TlsMode::VerifyCa => TlsConfig::verify_ca(self.root_cert.clone()),
            TlsMode::VerifyFull => TlsConfig::verify_full(self.root_cert.clone()),
        };
        match (&self.client_cert, &self.client_key) {
            (Some(c), Some(k)) => cfg.with_client_cert(c.clone(), k.clone()),
            _ => cfg,
        }
    }

    fn connector(&self) -> Result<postgres_native_tls::MakeTlsConnector, SourceError> {
        let bad = |what: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
            SourceError::Misconfigured {
                problem: format!("cannot use {what} {}: {e}", path.display()),
                fix: format!("point {what} at a readable PEM file"),
            }
        };
        let mut b = native_tls::TlsConnector::builder();
        if let Some(ca) = &self.root_cert {
            let pem = std::fs::read(ca).map_err(|e| bad("sslrootcert", ca, &e))?;
            let cert =
                native_tls::Certificate::from_pem(&pem).map_err(|e| bad("sslrootcert", ca, &e))?;
            b.add_root_certificate(cert);
        }
        if let (Some(c), Some(k)) = (&self.client_cert, &self.client_key) {
            let cert = std::fs::read(c).map_err(|e| bad("sslcert", c, &e))?;
            let key = std::fs::read(k).map_err(|e| bad("sslkey", k, &e))?;
            let id = native_tls::Identity::from_pkcs8(&cert, &key)
                .map_err(|e| bad("sslcert/sslkey", c, &e))?;
            b.identity(id);
        }
        match self.mode {
            TlsMode::Require => {
                b.danger_accept_invalid_certs(true)
                    .danger_accept_invalid_hostnames(true);
            }
            TlsMode::VerifyCa => {
                b.danger_accept_invalid_hostnames(true);
            }
            TlsMode::VerifyFull | TlsMode::Disable => {}
        }
        let connector = b.build().map_err(|e| SourceError::Misconfigured {
            problem: format!("cannot set up TLS: {e}"),
            fix: "check sslrootcert, sslcert and sslkey".into(),
        })?;
        Ok(postgres_native_tls::MakeTlsConnector::new(connector))
    }
}

/// Turns a connection failure into an error that names the server and, for certificate
/// trouble, the setting to look at.
fn unreachable(target: String, detail: String, tls: &TlsSettings) -> SourceError {
    let lower = detail.to_lowercase();
    if tls.mode != TlsMode::Disable && (lower.contains("certificate") || lower.contains("tls")) {
        return SourceError::Misconfigured {
            problem: format!("TLS with PostgreSQL at {target} failed: {detail}"),
            fix: "check sslrootcert (the CA that signed the server's certificate) and, for verify-full, that the certificate names the host".into(),
        };
    }
    SourceError::Unreachable { target, detail }
}

/// Everything the source needs to know.
#[derive(Debug, Clone)]
pub struct PostgresSourceConfig {
    /// The source's name, as it appears in events, logs and metrics.
    pub name: String,
    /// The server, database, role and TLS settings of both connections.
    pub endpoint: PgEndpoint,
    pub slot: String,
    pub publication: String,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub snapshot: SnapshotMode,
    /// How often a heartbeat is written so the slot advances on an idle database.
    pub heartbeat_interval: Duration,
    /// How often the confirmed position is reported to the server.
    pub status_interval: Duration,
    /// How often the pipeline asks [`PostgresSource::catalog_changes`]; zero: never.
    pub new_table_check_interval: Duration,
    /// Set REPLICA IDENTITY FULL on matching tables that have no primary key or replica
    /// identity, instead of leaving them out with a warning.
    pub replica_identity_full: bool,
    /// Have PostgreSQL (14+) stream a transaction larger than its `logical_decoding_work_mem`
    /// while it runs (protocol version 2); it is spooled under `spool_dir` until it commits.
    pub stream_large_transactions: bool,
    /// The walsender's `logical_decoding_work_mem` (e.g. "64MB"); the server's when `None`.
    pub logical_decoding_work_mem: Option<String>,
    /// Where streamed transactions wait for their commit.
    pub spool_dir: std::path::PathBuf,
    /// Install an event trigger in the source database that notes each CREATE/DROP/ALTER TABLE
    /// in the WAL, so new and dropped tables are found at once, not at the next catalog check.
    pub ddl_trigger: bool,
}

/// What the daemon remembers of this source between runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumeState {
    /// End LSN of the last transaction Kafka acknowledged.
    pub lsn: Option<Lsn>,
    /// The initial snapshot was delivered completely.
    pub snapshot_done: bool,
    /// Tables to read again before streaming resumes (asked for by an operator).
    pub resync: Vec<TableId>,
    /// The columns each table had when last described (snapshot or Relation message).
    pub shapes: HashMap<TableId, TableShape>,
}

/// The column numbers a table had at a position: how the source tells a column added since
/// from one it already handed over, across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableShape {
    /// The snapshot's consistent point, or the commit LSN of the transaction whose Relation
    /// message described the table, or the stream's position when a catalog check found a
    /// column added since. A message below it, or without a column beyond it, changes nothing.
    pub lsn: Lsn,
    /// Column numbers (`attnum`) described, rising. A column dropped since may keep its
    /// number here: PostgreSQL never gives that number to another column of the table.
    pub attnums: Vec<i16>,
    /// The table's relation OID when it was described (0: unknown, stored by an older
    /// BitClone9). A table whose OID is gone from the catalog was dropped, even if a table of
    /// the same name exists again.
    pub relation_id: u32,
}

/// A failure of the source. [`SourceError::is_transient`] tells whether retrying may help.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot reach PostgreSQL at {target}: {detail}")]
    Unreachable { target: String, detail: String },
    #[error("PostgreSQL error while {what}: {detail}")]
    Query {
        what: &'static str,
        detail: String,
        transient: bool,
    },
    #[error("{problem}; to fix: {fix}")]
    Misconfigured { problem: String, fix: String },
    #[error("replication stream: {0}")]
    Stream(String),
    #[error("undecodable WAL message: {0}")]
    Decode(#[from] pgoutput::DecodeError),
    #[error("table {table}, column {column}: {error}")]
    Value {
        table: TableId,
        column: String,
        error: Box<types::ValueError>,
    },
    #[error("WAL refers to relation {0} before describing it")]
    UnknownRelation(u32),
    /// Writing or reading a streamed transaction's spool failed (a full disk, say): the stream
    /// is read again from the last confirmed position once it works.
    #[error("{0}; to fix: free space or permissions under the daemon's state_dir")]
    Spool(#[from] spool::SpoolError),
}

impl SourceError {
    pub(crate) fn from_postgres(what: &'static str, e: tokio_postgres::Error) -> Self {
        let transient = e.is_closed() || e.as_db_error().is_none();
        let detail = match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => e.to_string(),
        };
        SourceError::Query {
            what,
            detail,
            transient,
        }
    }

    /// Network trouble and lost connections may pass; a misconfiguration or bad data will not.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Unreachable { .. } | SourceError::Stream(_) | SourceError::Spool(_) => {
                true
            }
            SourceError::Query { transient, .. } => *transient,
            _ => false,
        }
    }
}

/// What the source hands to the pipeline, in WAL order.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    Change(Change),
    /// Every change of the transaction ending at `end_lsn` has been handed over.
    Commit {
        end_lsn: Lsn,
    },
    /// No transaction is open up to `lsn` (keepalive or heartbeat): safe to confirm once all
    /// earlier events are delivered.
    Progress {
        lsn: Lsn,
    },
    /// The snapshot (if any) is complete and streaming starts at `consistent_point`.
    SnapshotDone {
        consistent_point: Lsn,
    },
    /// Every row of these tables was handed over again (a resync, or an initial snapshot that
    /// covered a pending resync).
    ResyncDone {
        tables: Vec<TableId>,
    },
    /// The table's columns changed (or were first described): to be stored, so that the next
    /// run compares with it. `rows_rewritten`: a column added since has a default or identity,
    /// so PostgreSQL gave every existing row a value without a row change in the WAL; the
    /// table must be read again (the store records the shape and the resync in one write).
    Shape {
        table: TableId,
        shape: TableShape,
        rows_rewritten: bool,
    },
}

/// Confirms to the slot what Kafka has acknowledged.
#[derive(Clone)]
pub struct AckHandle(watch::Sender<Lsn>);

impl AckHandle {
    /// Raises the confirmed position (never lowers it).
    pub fn ack(&self, lsn: Lsn) {
        self.0.send_if_modified(|cur| {
            let raise = lsn > *cur;
            if raise {
                *cur = lsn;
            }
            raise
        });
    }
}

enum Phase {
    Snapshot(Box<SnapshotState>),
    Streaming,
}

/// Where and how to open a SQL session with a PostgreSQL server (a source, or a sink's target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgEndpoint {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
    pub connect_timeout: Duration,
    pub tls: TlsSettings,
}

/// Opens a normal (SQL) session with the source's settings.
async fn connect_sql(cfg: &PostgresSourceConfig) -> Result<tokio_postgres::Client, SourceError> {
    connect_session(&cfg.endpoint, &format!("bitclone9-{}", cfg.name)).await
}

/// Opens a SQL session with BitClone9's session settings (UTC, ISO dates, exact floats).
pub async fn connect_session(
    ep: &PgEndpoint,
    application_name: &str,
) -> Result<tokio_postgres::Client, SourceError> {
    let target = format!("{}:{} (database {})", ep.host, ep.port, ep.database);
    let mut pg = tokio_postgres::Config::new();
    pg.host(&ep.host)
        .port(ep.port)
        .user(&ep.user)
        .password(&ep.password)
        .dbname(&ep.database)
        .application_name(application_name)
        .connect_timeout(ep.connect_timeout)
        .options(session_options());
    let detail = |e: tokio_postgres::Error| {
        let mut d = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string());
        let mut src = std::error::Error::source(&e);
        while let Some(inner) = src {
            d.push_str(&format!(": {inner}"));
            src = inner.source();
        }
        d
    };
    let (sql, conn) = if ep.tls.mode == TlsMode::Disable {
        let (sql, conn) = pg
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| unreachable(target, detail(e), &ep.tls))?;
        (sql, tokio::spawn(conn))
    } else {
        pg.ssl_mode(tokio_postgres::config::SslMode::Require);
        let (sql, conn) = pg
            .connect(ep.tls.connector()?)
            .await
            .map_err(|e| unreachable(target, detail(e), &ep.tls))?;
        (sql, tokio::spawn(conn))
    };
    let app = application_name.to_string();
    tokio::spawn(async move {
        if let Ok(Err(e)) = conn.await {
            tracing::debug!(session = %app, error = %e, "catalog connection closed");
        }
    });
    Ok(sql)
}

/// Connects and checks that the server can serve this source; returns the tables it would
/// capture (`tables`) and those it would leave out (`without_identity`). Changes nothing on
/// the server.
pub async fn check(cfg: &PostgresSourceConfig) -> Result<catalog::Selection, SourceError> {
    let sql = connect_sql(cfg).await?;
    catalog::check_server(&sql, &cfg.endpoint.user).await?;
    let mut selection = catalog::select_tables(&sql, &cfg.include, &cfg.exclude).await?;
    if cfg.replica_identity_full {
        selection.tables.append(&mut selection.without_identity);
        selection.tables.sort();
    }
    Ok(selection)
}

/// The source's slot as the server sees it, or `None` when it does not exist.
pub async fn slot_status(
    cfg: &PostgresSourceConfig,
) -> Result<Option<catalog::SlotInfo>, SourceError> {
    let sql = connect_sql(cfg).await?;
    catalog::slot_info(&sql, &cfg.slot).await
}

/// Drops the source's slot (the server then frees the WAL it kept). Refuses a slot in use.
/// Returns whether there was one.
pub async fn drop_slot(cfg: &PostgresSourceConfig) -> Result<bool, SourceError> {
    let sql = connect_sql(cfg).await?;
    match catalog::slot_info(&sql, &cfg.slot).await? {
        None => Ok(false),
        Some(s) if s.active_pid.is_some() => Err(SourceError::Misconfigured {
            problem: format!(
                "replication slot '{}' is in use by process {}",
                cfg.slot,
                s.active_pid.unwrap_or_default()
            ),
            fix: "stop bitclone9 (or the other consumer) first".into(),
        }),
        Some(_) => {
            catalog::drop_slot(&sql, &cfg.slot).await?;
            Ok(true)
        }
    }
}

/// A running PostgreSQL source.
pub struct PostgresSource {
    cfg: PostgresSourceConfig,
    sql: tokio_postgres::Client,
    repl: ReplicationClient,
    phase: Phase,
    known_types: HashMap<u32, PgType>,
    relations: HashMap<u32, Arc<TableSchema>>,
    tx: Option<TxInfo>,
    seq: u64,
    acked_tx: watch::Sender<Lsn>,
    acked_rx: watch::Receiver<Lsn>,
    heartbeat: tokio::time::Interval,
    /// A slot created without a snapshot: announced as a finished (empty) snapshot first thing.
    announce_snapshot_done: Option<Lsn>,
    stream_started: bool,
    /// Matching tables left out for want of a replica identity (warned about once each).
    left_out: Vec<TableId>,
    /// The publication's tables as last seen: one missing later was dropped (or taken out of
    /// the publication by hand).
    published: Vec<TableId>,
    /// Streamed transactions not ended yet (streaming on).
    spools: Option<spool::Spools>,
    /// A committed streamed transaction being handed over; the stream waits meanwhile.
    replaying: Option<Replaying>,
    /// The DDL trigger noted a table change: check the catalog now.
    catalog_check_due: bool,
    /// The columns of each table as last described (see [`TableShape`]).
    shapes: HashMap<TableId, TableShape>,
    /// Tables taken out of the publication at start (see [`PostgresSource::unmatched`]).
    unmatched: Vec<TableId>,
    /// See [`PostgresSource::take_gone_at_start`].
    gone_at_start: Vec<(TableId, Lsn)>,
}

/// What a catalog check found since the last one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogChanges {
    /// Tables that match include/exclude and are not published yet: the next run adds and
    /// reads them.
    pub new: Vec<TableId>,
    /// Tables the publication held and no longer does, although they still exist: taken out
    /// of the publication by hand. (A dropped table leaves its publications too; it is in
    /// `gone`.)
    pub unpublished: Vec<TableId>,
    /// Tables captured before whose relation is gone from the catalog: dropped at the source
    /// (perhaps created again under the same name, which is then in `new`).
    pub gone: Vec<TableId>,
    /// Tables with a column added since their stored shape that has a default or identity:
    /// PostgreSQL gave their existing rows a value without row changes in the WAL, and the
    /// table's next Relation message may be long in coming (an idle table), so they are read
    /// again now. Each with the columns found and the shape to store.
    pub rewritten: Vec<RewrittenTable>,
}

/// A table whose rows took values no row change carries (see [`CatalogChanges::rewritten`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrittenTable {
    pub table: TableId,
    /// The columns added with a default or identity.
    pub columns: Vec<String>,
    /// The stored shape's numbers with today's columns' added.
    pub attnums: Vec<i16>,
}

/// Takes the tables whose relation is gone from the catalog out of `shapes`, and returns them.
async fn find_gone(
    sql: &tokio_postgres::Client,
    shapes: &mut HashMap<TableId, TableShape>,
) -> Result<Vec<TableId>, SourceError> {
    let oids: Vec<u32> = shapes
        .values()
        .map(|s| s.relation_id)
        .filter(|id| *id != 0)
        .collect();
    if oids.is_empty() {
        return Ok(Vec::new());
    }
    let existing = catalog::existing_relations(sql, &oids).await?;
    let mut gone: Vec<TableId> = shapes
        .iter()
        .filter(|(_, s)| s.relation_id != 0 && !existing.contains(&s.relation_id))
        .map(|(t, _)| t.clone())
        .collect();
    gone.sort();
    for t in &gone {
        shapes.remove(t);
    }
    Ok(gone)
}

async fn wal_position(sql: &tokio_postgres::Client) -> Result<Lsn, SourceError> {
    let lsn: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|e| SourceError::from_postgres("reading the current WAL position", e))?
        .get(0);
    lsn.parse::<Lsn>().map_err(|e| SourceError::Misconfigured {
        problem: format!("the server reported WAL position {lsn:?}: {e}"),
        fix: "report this as a bug".into(),
    })
}

fn session_options() -> String {
    types::SESSION_SETTINGS
        .iter()
        .map(|(k, v)| format!("-c {k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The replication session's settings: the value formats, and the decoding memory if set.
fn replication_options(cfg: &PostgresSourceConfig) -> String {
    let mut options = session_options();
    if let Some(mem) = &cfg.logical_decoding_work_mem {
        options.push_str(&format!(" -c logical_decoding_work_mem={mem}"));
    }
    options
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl PostgresSource {
    /// Checks the catalog: tables that match `include`/`exclude` and are not in the publication
    /// (created since the run started), which the next run adds and reads, and tables the
    /// publication lost (dropped). A table that cannot be captured (no replica identity) is left
    /// out with a warning instead of stopping the source.
    pub async fn catalog_changes(&mut self) -> Result<CatalogChanges, SourceError> {
        let mut published = catalog::published_tables(&self.sql, &self.cfg.publication).await?;
        let mut gone = self.gone_tables().await?;
        // A drop that committed between the two reads leaves the dropped table listed as
        // published. There it would pass for a table of that name published again, whose drop
        // is announced at once, before the stream passed it, and the changes still to stream
        // would land behind the announcement. Only a table that exists is published again.
        for t in &gone {
            if published.contains(t) && !catalog::table_exists(&self.sql, t).await? {
                published.retain(|p| p != t);
            }
        }
        let mut unpublished = Vec::new();
        for t in self.published.iter().filter(|t| !published.contains(t)) {
            if gone.contains(t) {
                continue;
            }
            // A table without a stored shape (none described yet) is told by its name.
            if !self.shapes.contains_key(t) && !catalog::table_exists(&self.sql, t).await? {
                gone.push(t.clone());
            } else {
                unpublished.push(t.clone());
            }
        }
        for t in &unpublished {
            self.shapes.remove(t);
        }
        self.published = published.clone();
        let selection = match catalog::select_tables(
            &self.sql,
            &self.cfg.include,
            &self.cfg.exclude,
        )
        .await
        {
            Ok(s) => s,
            Err(SourceError::Misconfigured { problem, fix }) => {
                tracing::warn!(source = %self.cfg.name, "not adding new tables: {problem}; to fix: {fix}");
                catalog::Selection::default()
            }
            Err(e) => return Err(e),
        };
        let mut new: Vec<TableId> = selection
            .tables
            .into_iter()
            .filter(|t| !published.contains(t))
            .collect();
        for t in selection.without_identity {
            if published.contains(&t) {
                continue;
            }
            if self.cfg.replica_identity_full {
                new.push(t);
            } else if !self.left_out.contains(&t) {
                tracing::warn!(source = %self.cfg.name, table = %t, "{}", catalog::Selection::left_out_warning(&t));
                self.left_out.push(t);
            }
        }
        let rewritten = self.rewritten_tables().await?;
        Ok(CatalogChanges {
            new,
            unpublished,
            gone,
            rewritten,
        })
    }

    /// Tables with a stored shape whose relation is gone from the catalog (dropped), taken out
    /// of the shapes kept here so that each is found once. The caller stores that (see
    /// `CheckpointStore::record_drop`).
    pub async fn gone_tables(&mut self) -> Result<Vec<TableId>, SourceError> {
        find_gone(&self.sql, &mut self.shapes).await
    }

    /// The server's current WAL write position: every transaction committed before the call
    /// ends below it.
    pub async fn wal_position(&self) -> Result<Lsn, SourceError> {
        wal_position(&self.sql).await
    }

    /// Tables found dropped (see [`Self::gone_tables`]) when this run started, with the WAL
    /// position before anything this run reads: each once.
    pub fn take_gone_at_start(&mut self) -> Vec<(TableId, Lsn)> {
        std::mem::take(&mut self.gone_at_start)
    }

    /// Whether `table` is in the publication (as of the start or the last catalog check).
    pub fn is_published(&self, table: &TableId) -> bool {
        self.published.contains(table)
    }

    /// Tables taken out of the publication at start because include/exclude no longer match
    /// them: they are no longer captured, so their drop later is nobody's concern.
    pub fn unmatched(&self) -> &[TableId] {
        &self.unmatched
    }

    /// Published tables whose catalog has a live column beyond their stored shape that was
    /// added with a default or identity (see [`CatalogChanges::rewritten`]). Tables without a
    /// stored shape are not compared.
    async fn rewritten_tables(&self) -> Result<Vec<RewrittenTable>, SourceError> {
        if self.shapes.is_empty() {
            return Ok(Vec::new());
        }
        let columns = catalog::published_columns(&self.sql, &self.cfg.publication).await?;
        let mut out: Vec<RewrittenTable> = Vec::new();
        for (table, attnum, name, filled) in columns {
            let Some(shape) = self.shapes.get(&table) else {
                continue;
            };
            if shape.attnums.contains(&attnum) {
                continue;
            }
            let entry = match out.iter_mut().position(|r| r.table == table) {
                Some(i) => &mut out[i],
                None => {
                    out.push(RewrittenTable {
                        table: table.clone(),
                        columns: Vec::new(),
                        attnums: shape.attnums.clone(),
                    });
                    let last = out.len() - 1;
                    &mut out[last]
                }
            };
            entry.attnums.push(attnum);
            if filled {
                entry.columns.push(name);
            }
        }
        // A column added without a default only waits for the table's next Relation message.
        out.retain(|r| !r.columns.is_empty());
        for r in &mut out {
            r.attnums.sort_unstable();
            r.attnums.dedup();
        }
        Ok(out)
    }

    /// The stored shape of `table`, if any (see [`TableShape`]).
    pub fn shape(&self, table: &TableId) -> Option<&TableShape> {
        self.shapes.get(table)
    }

    /// Whether the DDL trigger noted a table change since the last call: check the catalog.
    pub fn take_catalog_check_due(&mut self) -> bool {
        std::mem::take(&mut self.catalog_check_due)
    }

    /// Tables that match include/exclude but are left out for want of a replica identity.
    pub fn left_out(&self) -> &[TableId] {
        &self.left_out
    }

    /// Connects, checks the server, makes sure the publication and slot exist, and prepares the
    /// snapshot when one is due.
    ///
    /// `forget_position` runs before a new slot is created: the stored position and snapshot
    /// record belong to the old slot and must not survive it (positions of a new slot, e.g. on
    /// a restored server, may be lower, and a stale record would skip the new snapshot).
    ///
    /// Tables that match `include`/`exclude` but are not in the publication yet (created since)
    /// are added to it and read like a resync, while the other tables stream: `record_resync`
    /// records that durably first, so a crash in between cannot leave their earlier rows unread.
    pub async fn start(
        cfg: PostgresSourceConfig,
        mut resume: ResumeState,
        forget_position: &(dyn Fn() -> Result<(), String> + Sync),
        record_resync: &(dyn Fn(&[TableId]) -> Result<(), String> + Sync),
    ) -> Result<Self, SourceError> {
        let target = format!(
            "{}:{} (database {})",
            cfg.endpoint.host, cfg.endpoint.port, cfg.endpoint.database
        );
        let sql = connect_sql(&cfg).await?;
        catalog::check_server(&sql, &cfg.endpoint.user).await?;
        // Tables dropped while the daemon was stopped, found before any slot or snapshot of
        // this run exists: the position of their announcement is below whatever a table of
        // the same name, created again, is read at.
        let gone = find_gone(&sql, &mut resume.shapes).await?;
        let gone_at_start = match gone.is_empty() {
            true => Vec::new(),
            false => {
                let lsn = wal_position(&sql).await?;
                gone.into_iter().map(|t| (t, lsn)).collect()
            }
        };
        if cfg.ddl_trigger {
            catalog::install_ddl_trigger(&sql, &cfg.endpoint.database).await?;
        }
        let selection = catalog::select_tables(&sql, &cfg.include, &cfg.exclude).await?;
        let mut tables = selection.tables;
        let mut left_out = Vec::new();
        for t in selection.without_identity {
            if cfg.replica_identity_full {
                catalog::set_identity_full(&sql, &t).await?;
                tracing::info!(source = %cfg.name, table = %t, "set REPLICA IDENTITY FULL (replica_identity_full = true): the table has no primary key");
                tables.push(t);
            } else {
                tracing::warn!(source = %cfg.name, table = %t, "{}", catalog::Selection::left_out_warning(&t));
                left_out.push(t);
            }
        }
        metrics::gauge!("bitclone9_source_tables_left_out", "connector" => cfg.name.clone())
            .set(left_out.len() as f64);
        if tables.is_empty() {
            return Err(SourceError::Misconfigured {
                problem: format!(
                    "every table that include/exclude match lacks a primary key or replica identity: {}",
                    left_out.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                ),
                fix: "give them primary keys, or set REPLICA IDENTITY FULL on them (replica_identity_full = true does it)".into(),
            });
        }
        let mut published = catalog::ensure_publication(&sql, &cfg.publication, &tables).await?;
        let unmatched: Vec<TableId> = published
            .iter()
            .filter(|t| !tables.contains(t) && !left_out.contains(t))
            .cloned()
            .collect();
        let mut taken_out = Vec::new();
        if !unmatched.is_empty() {
            // include/exclude changed: stop capturing those tables.
            let names: Vec<String> = unmatched.iter().map(ToString::to_string).collect();
            match catalog::alter_publication(
                &sql,
                &cfg.publication,
                catalog::PublicationChange::Drop,
                &unmatched,
            )
            .await
            {
                Ok(()) => {
                    tracing::info!(source = %cfg.name, tables = %names.join(", "),
                        "tables no longer matching include/exclude removed from the publication");
                    published.retain(|t| !unmatched.contains(t));
                    for t in &unmatched {
                        resume.shapes.remove(t);
                    }
                    taken_out = unmatched;
                }
                Err(e) => tracing::warn!(source = %cfg.name, tables = %names.join(", "),
                    "tables no longer match include/exclude but stay captured: {e}"),
            }
        }
        let new: Vec<TableId> = tables
            .iter()
            .filter(|t| !published.contains(t))
            .cloned()
            .collect();
        if !new.is_empty() {
            let names: Vec<String> = new.iter().map(ToString::to_string).collect();
            if cfg.snapshot == SnapshotMode::Initial {
                record_resync(&new).map_err(|e| SourceError::Misconfigured {
                    problem: format!(
                        "cannot record that new tables {} are to be read: {e}",
                        names.join(", ")
                    ),
                    fix: "check the daemon's state_dir".into(),
                })?;
                for t in &new {
                    if !resume.resync.contains(t) {
                        resume.resync.push(t.clone());
                    }
                }
            }
            catalog::alter_publication(
                &sql,
                &cfg.publication,
                catalog::PublicationChange::Add,
                &new,
            )
            .await?;
            tracing::info!(source = %cfg.name, tables = %names.join(", "), read = cfg.snapshot == SnapshotMode::Initial,
                "new tables matching include added to the publication");
            metrics::counter!("bitclone9_source_tables_added_total", "connector" => cfg.name.clone())
                .increment(new.len() as u64);
            published.extend(new);
        }

        let slot = catalog::slot_info(&sql, &cfg.slot).await?;
        let mut need_slot = slot.is_none();
        if let Some(s) = &slot {
            if let Some(pid) = s.active_pid {
                return Err(SourceError::Misconfigured {
                    problem: format!("replication slot '{}' is in use by process {pid}", cfg.slot),
                    fix: "stop the other consumer of this slot (another bitclone9?), or give this source its own slot name".into(),
                });
            }
            if s.plugin.as_deref() != Some("pgoutput")
                || s.database.as_deref() != Some(cfg.endpoint.database.as_str())
            {
                return Err(SourceError::Misconfigured {
                    problem: format!(
                        "replication slot '{}' exists for plugin {:?} on database {:?}, not pgoutput on '{}'",
                        cfg.slot, s.plugin, s.database, cfg.endpoint.database
                    ),
                    fix: "choose another slot name, or drop that slot if it is unused".into(),
                });
            }
            if s.wal_status.as_deref() == Some("lost") {
                return Err(SourceError::Misconfigured {
                    problem: format!("replication slot '{}' was invalidated: the WAL it needs is gone", cfg.slot),
                    fix: format!("drop it with SELECT pg_drop_replication_slot('{}'); the next start re-snapshots", cfg.slot),
                });
            }
            if cfg.snapshot == SnapshotMode::Initial && !resume.snapshot_done {
                tracing::warn!(source = %cfg.name, slot = %cfg.slot, "the slot exists but no complete snapshot was recorded: dropping and re-creating it to take a consistent snapshot");
                catalog::drop_slot(&sql, &cfg.slot).await?;
                need_slot = true;
            }
        } else if resume.lsn.is_some() {
            tracing::warn!(source = %cfg.name, slot = %cfg.slot, "the slot is gone although this source streamed before: re-creating it{}",
                if cfg.snapshot == SnapshotMode::Initial { " and re-snapshotting" } else { "; changes made while it was missing are NOT captured (snapshot = \"never\")" });
        }

        // Streaming of large transactions needs protocol version 2, PostgreSQL 14 or newer.
        let version: i32 = sql
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(|e| SourceError::from_postgres("reading the server's version", e))?
            .get(0);
        let streaming = cfg.stream_large_transactions && version >= 140_000;
        if cfg.stream_large_transactions && !streaming {
            tracing::info!(source = %cfg.name, server_version = version,
                "large transactions are decoded whole at commit: streaming them needs PostgreSQL 14 or newer");
        }
        let spools = if streaming {
            Some(spool::Spools::open(&cfg.spool_dir)?)
        } else {
            None
        };
        let mut rcfg = replication_config(&cfg, &cfg.slot).with_streaming(streaming);
        if !need_slot {
            if let Some(lsn) = resume.lsn {
                rcfg = rcfg.with_start_lsn(pgwire_replication::Lsn::from_u64(lsn.0));
            }
        }
        let mut repl = ReplicationClient::connect_gated(rcfg)
            .await
            .map_err(|e| unreachable(target.clone(), e.to_string(), &cfg.endpoint.tls))?;

        let (acked_tx, acked_rx) = watch::channel(if need_slot {
            Lsn(0)
        } else {
            resume.lsn.unwrap_or_default()
        });
        let mut phase = Phase::Streaming;
        let mut announce_snapshot_done = None;
        let mut known_types = HashMap::new();
        if need_slot {
            forget_position().map_err(|e| SourceError::Misconfigured {
                problem: format!(
                    "cannot clear the stored position before creating slot '{}': {e}",
                    cfg.slot
                ),
                fix: "check the daemon's state_dir".into(),
            })?;
            let export = cfg.snapshot == SnapshotMode::Initial;
            let sqlcmd = format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {}",
                catalog::quote_ident(&cfg.slot),
                if export {
                    "EXPORT_SNAPSHOT"
                } else {
                    "NOEXPORT_SNAPSHOT"
                }
            );
            let rows = repl
                .simple_query(&sqlcmd)
                .await
                .map_err(|e| stream_err("creating the replication slot", e))?;
            let (consistent_point, snapshot_name) = created_slot(&rows)?;
            tracing::info!(source = %cfg.name, slot = %cfg.slot, lsn = %consistent_point, "created replication slot");
            if !export {
                announce_snapshot_done = Some(consistent_point);
            } else {
                import_snapshot(&sql, snapshot_name, "importing the slot's snapshot").await?;
                let mut schemas = VecDeque::new();
                for t in &published {
                    schemas.push_back(Arc::new(
                        catalog::table_schema(&sql, &mut known_types, t).await?,
                    ));
                }
                // The planner's row estimate, so operators can see how far the snapshot is.
                let ids: Vec<u32> = schemas.iter().map(|t| t.relation_id).collect();
                let estimate: f64 = sql
                    .query_one(
                        "SELECT coalesce(sum(greatest(reltuples, 0)), 0)::float8 FROM pg_class WHERE oid = ANY($1)",
                        &[&ids],
                    )
                    .await
                    .map_err(|e| SourceError::from_postgres("estimating the snapshot's size", e))?
                    .get(0);
                metrics::gauge!("bitclone9_snapshot_rows_estimated", "connector" => cfg.name.clone())
                    .set(estimate);
                phase = Phase::Snapshot(Box::new(SnapshotState {
                    tables: schemas,
                    current: None,
                    partial: BytesMut::new(),
                    seq: 0,
                    consistent_point,
                    started_us: now_us(),
                    held: None,
                    // Every table is read again: pending resyncs are answered too.
                    resync: resume.resync.clone(),
                    resync_only: false,
                }));
            }
        }
        if matches!(phase, Phase::Streaming) && !resume.resync.is_empty() {
            phase = Phase::Snapshot(Box::new(
                begin_resync(&cfg, &sql, &published, &mut known_types, &resume.resync).await?,
            ));
        }
        let mut heartbeat = tokio::time::interval(cfg.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut source = Self {
            cfg,
            sql,
            repl,
            phase,
            known_types,
            relations: HashMap::new(),
            tx: None,
            seq: 0,
            acked_tx,
            acked_rx,
            heartbeat,
            announce_snapshot_done,
            stream_started: false,
            left_out,
            published,
            spools,
            replaying: None,
            catalog_check_due: false,
            shapes: std::mem::take(&mut resume.shapes),
            unmatched: taken_out,
            gone_at_start,
        };
        if matches!(source.phase, Phase::Streaming) {
            source.start_stream().await?;
        }
        Ok(source)
    }

    /// A handle through which the pipeline confirms delivered positions.
    pub fn ack_handle(&self) -> AckHandle {
        AckHandle(self.acked_tx.clone())
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The table the snapshot is reading and how many of its rows are read so far.
    pub fn snapshot_progress(&self) -> Option<(&TableId, u64)> {
        match &self.phase {
            Phase::Snapshot(s) => s.current.as_ref().map(|(t, _)| (&t.id, s.seq)),
            Phase::Streaming => None,
        }
    }

    /// Whether the source is still reading its snapshot.
    pub fn snapshotting(&self) -> bool {
        matches!(self.phase, Phase::Snapshot(_))
    }

    async fn start_stream(&mut self) -> Result<(), SourceError> {
        self.repl
            .start()
            .await
            .map_err(|e| stream_err("starting replication", e))?;
        self.repl.wait_started().await.map_err(|e| match e {
            pgwire_replication::PgWireError::Server(msg) if msg.contains("is active for PID") => SourceError::Misconfigured {
                problem: format!("replication slot '{}' is in use: {msg}", self.cfg.slot),
                fix: "stop the other consumer of this slot, or give this source its own slot name".into(),
            },
            e => stream_err("starting replication", e),
        })?;
        self.stream_started = true;
        tracing::info!(source = %self.cfg.name, slot = %self.cfg.slot, "streaming started");
        Ok(())
    }

    /// Stops the replication session, confirming `final_lsn` first.
    pub async fn shutdown(mut self, final_lsn: Option<Lsn>) {
        if let (Some(lsn), true) = (final_lsn, self.stream_started) {
            // The replication client reports progress on its status interval and sends no last
            // report when stopped: wait until the server has it, so a clean stop leaves the slot
            // exactly at the final checkpoint.
            self.repl
                .update_applied_lsn(pgwire_replication::Lsn::from_u64(lsn.0));
            let deadline =
                tokio::time::Instant::now() + self.cfg.status_interval * 2 + Duration::from_secs(2);
            let target = lsn.to_string();
            while tokio::time::Instant::now() < deadline {
                let confirmed = self
                    .sql
                    .query_opt(
                        "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                        &[&self.cfg.slot, &target],
                    )
                    .await;
                match confirmed {
                    Ok(Some(row)) if row.get::<_, Option<bool>>(0) == Some(true) => break,
                    Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    Err(e) => {
                        tracing::debug!(source = %self.cfg.name, error = %e, "cannot read the slot's position at stop");
                        break;
                    }
                }
            }
        }
        if self.stream_started {
            if let Err(e) = self.repl.shutdown().await {
                tracing::debug!(source = %self.cfg.name, error = %e, "replication shutdown");
            }
        }
    }
}

/// The consistent point and the exported snapshot's name (if any) of CREATE_REPLICATION_SLOT.
fn created_slot(
    rows: &[pgwire_replication::QueryRow],
) -> Result<(Lsn, Option<String>), SourceError> {
    let row = rows
        .first()
        .ok_or_else(|| SourceError::Stream("CREATE_REPLICATION_SLOT returned no row".into()))?;
    let text = |i: usize| {
        row.get(i)
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let consistent_point = text(1).and_then(|s| s.parse().ok()).ok_or_else(|| {
        SourceError::Stream("CREATE_REPLICATION_SLOT returned no consistent point".into())
    })?;
    Ok((consistent_point, text(2)))
}

/// The replication session settings of `cfg`, for the slot `slot`.
fn replication_config(cfg: &PostgresSourceConfig, slot: &str) -> ReplicationConfig {
    ReplicationConfig::new(
        cfg.endpoint.host.clone(),
        cfg.endpoint.user.clone(),
        cfg.endpoint.password.clone(),
        cfg.endpoint.database.clone(),
        slot.to_string(),
        cfg.publication.clone(),
    )
    .with_port(cfg.endpoint.port)
    .with_tls(cfg.endpoint.tls.replication())
    .with_status_interval(cfg.status_interval)
    .with_wakeup_interval(Duration::from_secs(1))
    .with_buffer_size(16 * 1024)
    .with_options(replication_options(cfg))
    .with_application_name(format!("bitclone9-{}", cfg.name))
}

fn stream_err(what: &str, e: pgwire_replication::PgWireError) -> SourceError {
    match e {
        pgwire_replication::PgWireError::Server(msg) if !msg.contains("terminating connection") => {
            SourceError::Misconfigured {
                problem: format!("the server refused {what}: {msg}"),
                fix: "see the server's message; check the slot, publication and role".into(),
            }
        }
        e => SourceError::Stream(format!("{what}: {e}")),
    }
}
