//! Snapshots: the rows of the captured tables, read with COPY inside an exported snapshot,
//! for the initial snapshot and for resyncs.
//!
//! ```text
//!  CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT ──► import_snapshot (REPEATABLE READ)
//!        │ consistent point P
//!        ▼
//!  next_snapshot_batch: COPY each table TO STDOUT ──► parse_copy_line ──► Change (op r, at P)
//!        ▼
//!  SnapshotDone / ResyncDone, then streaming (re)starts
//! ```

use super::*;

pub(crate) struct SnapshotState {
    pub(crate) tables: VecDeque<Arc<TableSchema>>,
    pub(crate) current: Option<(
        Arc<TableSchema>,
        std::pin::Pin<Box<tokio_postgres::CopyOutStream>>,
    )>,
    pub(crate) partial: BytesMut,
    pub(crate) seq: u64,
    pub(crate) consistent_point: Lsn,
    pub(crate) started_us: i64,
    /// The last row read, held back so the very last one can be marked as such.
    pub(crate) held: Option<Change>,
    /// The resync requests this snapshot answers.
    pub(crate) resync: Vec<TableId>,
    /// A resync's snapshot comes from a temporary slot, not the source's own: streaming then
    /// resumes where it was, and no snapshot is recorded as done.
    pub(crate) resync_only: bool,
}

impl PostgresSource {
    pub(crate) async fn next_snapshot_batch(
        &mut self,
        out: &mut Vec<SourceEvent>,
    ) -> Result<(), SourceError> {
        let Phase::Snapshot(state) = &mut self.phase else {
            return Ok(());
        };
        loop {
            if state.current.is_none() {
                let Some(table) = state.tables.pop_front() else {
                    break;
                };
                let cols: Vec<String> = table
                    .columns
                    .iter()
                    .map(|c| catalog::quote_ident(&c.name))
                    .collect();
                // A partitioned table's rows live in its partitions (published under the root);
                // a plain table's inheritance children are tables of their own.
                let partitioned: bool = self
                    .sql
                    .query_one(
                        "SELECT relkind = 'p' FROM pg_class WHERE oid = $1",
                        &[&table.relation_id],
                    )
                    .await
                    .map_err(|e| SourceError::from_postgres("reading the table's kind", e))?
                    .get(0);
                let copy = format!(
                    "COPY (SELECT {} FROM {}{}) TO STDOUT",
                    cols.join(", "),
                    if partitioned { "" } else { "ONLY " },
                    catalog::quote_table(&table.id)
                );
                let stream = self
                    .sql
                    .copy_out(copy.as_str())
                    .await
                    .map_err(|e| SourceError::from_postgres("starting the snapshot COPY", e))?;
                tracing::info!(source = %self.cfg.name, table = %table.id, "snapshot of table started");
                state.seq = 0;
                // The columns as of the consistent point: what later Relation messages are
                // compared with.
                let shape = TableShape {
                    lsn: state.consistent_point,
                    attnums: table.columns.iter().filter_map(|c| c.attnum).collect(),
                    relation_id: table.relation_id,
                };
                self.shapes.insert(table.id.clone(), shape.clone());
                out.push(SourceEvent::Shape {
                    table: table.id.clone(),
                    shape,
                    rows_rewritten: false,
                });
                // The snapshot replaces the table's content: consumers drop what they hold,
                // including rows of an earlier, interrupted snapshot that no longer exist.
                out.push(SourceEvent::Change(Change {
                    table: table.clone(),
                    op: Op::Truncate,
                    before: None,
                    after: None,
                    tx: TxInfo {
                        xid: None,
                        commit_lsn: state.consistent_point,
                        commit_time_us: state.started_us,
                    },
                    seq: 0,
                    snapshot: SnapshotMark::Yes,
                }));
                state.current = Some((table, Box::pin(stream)));
            }
            let Some((table, stream)) = &mut state.current else {
                continue;
            };
            match stream.next().await {
                Some(chunk) => {
                    let chunk = chunk
                        .map_err(|e| SourceError::from_postgres("reading the snapshot COPY", e))?;
                    state.partial.extend_from_slice(&chunk);
                    let tx = TxInfo {
                        xid: None,
                        commit_lsn: state.consistent_point,
                        commit_time_us: state.started_us,
                    };
                    while let Some(nl) = state.partial.iter().position(|&b| b == b'\n') {
                        let line = state.partial.split_to(nl + 1);
                        let row = parse_copy_line(table, &line[..nl])?;
                        let change = Change {
                            table: table.clone(),
                            op: Op::Read,
                            before: None,
                            after: Some(row),
                            tx,
                            seq: state.seq,
                            snapshot: SnapshotMark::Yes,
                        };
                        state.seq += 1;
                        if let Some(prev) = state.held.replace(change) {
                            out.push(SourceEvent::Change(prev));
                        }
                    }
                    // PostgreSQL sends a COPY row per message: fill a whole batch rather than
                    // hand over one row at a time (the per-batch work would dominate).
                    if out.len() >= MAX_BATCH {
                        return Ok(());
                    }
                }
                None => {
                    tracing::info!(source = %self.cfg.name, table = %table.id, rows = state.seq, "snapshot of table done");
                    state.current = None;
                }
            }
        }
        // Every table is read: mark the last row, end the snapshot transaction, start streaming.
        if let Some(mut last) = state.held.take() {
            last.snapshot = SnapshotMark::Last;
            out.push(SourceEvent::Change(last));
        }
        let consistent_point = state.consistent_point;
        let resync = std::mem::take(&mut state.resync);
        let resync_only = state.resync_only;
        self.sql
            .batch_execute("COMMIT")
            .await
            .map_err(|e| SourceError::from_postgres("ending the snapshot transaction", e))?;
        self.phase = Phase::Streaming;
        if !resync_only {
            out.push(SourceEvent::SnapshotDone { consistent_point });
        }
        if !resync.is_empty() {
            out.push(SourceEvent::ResyncDone { tables: resync });
        }
        self.start_stream().await
    }
}

/// Opens the read-only transaction that sees exactly the slot's exported snapshot.
pub(crate) async fn import_snapshot(
    sql: &tokio_postgres::Client,
    snapshot_name: Option<String>,
    what: &'static str,
) -> Result<(), SourceError> {
    let name = snapshot_name.ok_or_else(|| {
        SourceError::Stream("CREATE_REPLICATION_SLOT exported no snapshot".into())
    })?;
    sql.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
        catalog::quote_literal(&name)
    ))
    .await
    .map_err(|e| SourceError::from_postgres(what, e))
}

/// Prepares the snapshot that reads `requested` tables again while the source's own slot
/// waits where it was.
///
/// The rows must fit into the change stream exactly: a temporary slot created now exports a
/// snapshot that holds every transaction committed before its consistent point `P`, and
/// none after. The rows (and the truncate that opens each table) are stamped with `P`, so
/// consumers that compare positions drop the older changes the stream replays afterwards
/// (they are in the rows) and apply the later ones. The slot only lives for the import.
pub(crate) async fn begin_resync(
    cfg: &PostgresSourceConfig,
    sql: &tokio_postgres::Client,
    published: &[TableId],
    known_types: &mut HashMap<u32, types::PgType>,
    requested: &[TableId],
) -> Result<SnapshotState, SourceError> {
    let (tables, gone): (Vec<TableId>, Vec<TableId>) = requested
        .iter()
        .cloned()
        .partition(|t| published.contains(t));
    for t in &gone {
        tracing::warn!(source = %cfg.name, table = %t, "resync skipped: the table is not captured by this source (any more)");
    }
    let mut state = SnapshotState {
        tables: VecDeque::new(),
        current: None,
        partial: BytesMut::new(),
        seq: 0,
        consistent_point: Lsn(0),
        started_us: now_us(),
        held: None,
        resync: requested.to_vec(),
        resync_only: true,
    };
    // Unique per process: a temporary slot of an earlier session may not be released yet.
    let mut slot: String = cfg.slot.chars().take(44).collect();
    slot.push_str(&format!("_resync_{}", std::process::id()));
    let target = format!(
        "{}:{} (database {})",
        cfg.endpoint.host, cfg.endpoint.port, cfg.endpoint.database
    );
    let mut repl = ReplicationClient::connect_gated(replication_config(cfg, &slot))
        .await
        .map_err(|e| unreachable(target, e.to_string(), &cfg.endpoint.tls))?;
    let rows = repl
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
            catalog::quote_ident(&slot)
        ))
        .await
        .map_err(|e| match e {
            pgwire_replication::PgWireError::Server(msg) => SourceError::Misconfigured {
                problem: format!("cannot create the temporary slot '{slot}' a resync reads from: {msg}"),
                fix: "a resync needs one free replication slot and walsender (max_replication_slots, max_wal_senders)".into(),
            },
            e => stream_err("creating the resync's temporary slot", e),
        })?;
    let (consistent_point, snapshot_name) = created_slot(&rows)?;
    state.consistent_point = consistent_point;
    import_snapshot(sql, snapshot_name, "importing the resync's snapshot").await?;
    // The importing transaction now holds the snapshot: the temporary slot can go.
    drop(repl);
    for t in &tables {
        state
            .tables
            .push_back(Arc::new(catalog::table_schema(sql, known_types, t).await?));
    }
    let names: Vec<String> = tables.iter().map(ToString::to_string).collect();
    tracing::info!(source = %cfg.name, tables = %names.join(", "), lsn = %state.consistent_point, "resync: reading tables again");
    metrics::counter!("bitclone9_source_resyncs_total", "connector" => cfg.name.clone())
        .increment(tables.len() as u64);
    Ok(state)
}

/// Parses one line of `COPY ... TO STDOUT` text format.
pub fn parse_copy_line(table: &TableSchema, line: &[u8]) -> Result<Row, SourceError> {
    let mut row = Vec::with_capacity(table.columns.len());
    let mut fields = line.split(|&b| b == b'\t');
    for col in &table.columns {
        let field = fields.next().ok_or_else(|| {
            SourceError::Stream(format!("table {}: COPY row has too few columns", table.id))
        })?;
        if field == b"\\N" {
            row.push(Value::Null);
            continue;
        }
        let raw = copy_unescape(field);
        let text = std::str::from_utf8(&raw).map_err(|_| {
            SourceError::Stream(format!(
                "table {}, column {}: COPY value is not UTF-8",
                table.id, col.name
            ))
        })?;
        row.push(
            types::parse_text(&col.ty, text).map_err(|error| SourceError::Value {
                table: table.id.clone(),
                column: col.name.clone(),
                error: Box::new(error),
            })?,
        );
    }
    Ok(row)
}

/// Undoes COPY text-format escaping (`\\`, `\n`, `\t`, octal and `\x` forms).
fn copy_unescape(field: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !field.contains(&b'\\') {
        return std::borrow::Cow::Borrowed(field);
    }
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        i += 1;
        if b != b'\\' || i >= field.len() {
            out.push(b);
            continue;
        }
        let c = field[i];
        i += 1;
        match c {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                for _ in 0..2 {
                    match field.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            b'x' => {
                let mut v = 0u32;
                let mut n = 0;
                while n < 2 {
                    match field.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                            n += 1;
                        }
                        None => break,
                    }
                }
                if n == 0 {
                    out.push(b'x');
                } else {
                    out.push(v as u8);
                }
            }
            other => out.push(other),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitclone9_core::{Column, ColumnType};

    fn table() -> TableSchema {
        let col = |name: &str, ty| Column {
            name: name.into(),
            ty,
            pg_type: "x".into(),
            type_oid: 0,
            is_key: name == "id",
            attnum: None,
        };
        TableSchema {
            id: TableId::new("public", "t"),
            relation_id: 1,
            columns: vec![col("id", ColumnType::Int64), col("note", ColumnType::Text)],
        }
    }

    #[test]
    fn copy_lines_unescape_and_nulls() {
        let row = parse_copy_line(&table(), b"7\ta\\tb\\\\c\\nd\\101").expect("parses");
        assert_eq!(row, vec![Value::Long(7), Value::Text("a\tb\\c\ndA".into())]);
        let row = parse_copy_line(&table(), b"8\t\\N").expect("parses");
        assert_eq!(row, vec![Value::Long(8), Value::Null]);
        assert!(parse_copy_line(&table(), b"8").is_err());
        let err = parse_copy_line(&table(), b"x\tn").expect_err("bad int");
        assert!(err.to_string().contains("column id"), "{err}");
    }
}
