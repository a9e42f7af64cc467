//! The replication stream: pgoutput messages into [`SourceEvent`]s, in WAL order.
//!
//! ```text
//!  ReplicationEvent ──► handle_event ─┬─ Begin/Commit/KeepAlive/Message ──► tx bounds, Progress
//!                                     └─ XLogData ─┬─ (streaming) handle_streamed ──► spool
//!                                                  │        Stream Commit ──► next_replay_batch ─┐
//!                                                  └─ handle_message ◄──────────────────────────┘
//!                                                        Relation → schema; I/U/D/T → Change
//! ```

use super::*;

/// A streamed transaction read back from its spool at its commit.
#[derive(Debug)]
pub(crate) struct Replaying {
    replay: spool::Replay,
    end_lsn: Lsn,
    changes: u64,
}

impl PostgresSource {
    /// Hands over the next events (at least one) in WAL order.
    pub async fn next_batch(&mut self, out: &mut Vec<SourceEvent>) -> Result<(), SourceError> {
        if let Phase::Snapshot(_) = self.phase {
            return self.next_snapshot_batch(out).await;
        }
        if let Some(consistent_point) = self.announce_snapshot_done.take() {
            out.push(SourceEvent::SnapshotDone { consistent_point });
            return Ok(());
        }
        if self.replaying.is_some() {
            return self.next_replay_batch(out).await;
        }
        let first = loop {
            tokio::select! {
                ev = self.repl.recv() => break ev,
                changed = self.acked_rx.changed() => {
                    if changed.is_ok() {
                        let lsn = *self.acked_rx.borrow_and_update();
                        self.repl.update_applied_lsn(pgwire_replication::Lsn::from_u64(lsn.0));
                    }
                }
                _ = self.heartbeat.tick() => {
                    // A hung catalog connection must not stop the stream from being read.
                    if tokio::time::timeout(self.cfg.endpoint.connect_timeout, self.write_heartbeat()).await.is_err() {
                        tracing::warn!(source = %self.cfg.name, "heartbeat timed out");
                    }
                }
            }
        };
        self.handle_event(first, out).await?;
        // A committed streamed transaction is handed over before anything after it.
        while out.len() < MAX_BATCH && self.replaying.is_none() {
            match self.repl.recv().now_or_never() {
                Some(ev) => self.handle_event(ev, out).await?,
                None => break,
            }
        }
        if self.acked_rx.has_changed().unwrap_or(false) {
            let lsn = *self.acked_rx.borrow_and_update();
            self.repl
                .update_applied_lsn(pgwire_replication::Lsn::from_u64(lsn.0));
        }
        Ok(())
    }

    /// Writes a non-transactional logical message into this database's WAL so the slot has
    /// something of its own to confirm even when the captured tables are idle.
    async fn write_heartbeat(&self) {
        if let Err(e) = self
            .sql
            .execute(
                "SELECT pg_logical_emit_message(false, $1, '')",
                &[&HEARTBEAT_PREFIX],
            )
            .await
        {
            tracing::warn!(source = %self.cfg.name, error = %e, "could not write a heartbeat; an idle database may retain WAL (grant EXECUTE on pg_logical_emit_message to the role)");
        }
        // How far the slot trails the server, and how much WAL it keeps: the two numbers an
        // operator watches so the disk never fills.
        match self
            .sql
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8,
                        pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.cfg.slot],
            )
            .await
        {
            Ok(Some(row)) => {
                let name = self.cfg.name.clone();
                if let Some(lag) = row.get::<_, Option<f64>>(0) {
                    metrics::gauge!("bitclone9_source_slot_lag_bytes", "connector" => name.clone())
                        .set(lag);
                }
                if let Some(retained) = row.get::<_, Option<f64>>(1) {
                    metrics::gauge!("bitclone9_source_retained_wal_bytes", "connector" => name)
                        .set(retained);
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(source = %self.cfg.name, error = %e, "could not read the slot's lag")
            }
        }
    }

    async fn handle_event(
        &mut self,
        ev: pgwire_replication::Result<Option<ReplicationEvent>>,
        out: &mut Vec<SourceEvent>,
    ) -> Result<(), SourceError> {
        let ev = ev
            .map_err(|e| stream_err("reading the replication stream", e))?
            .ok_or_else(|| SourceError::Stream("the server ended the replication stream".into()))?;
        match ev {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                self.tx = Some(TxInfo {
                    xid: Some(xid),
                    commit_lsn: Lsn(final_lsn.as_u64()),
                    commit_time_us: commit_time_micros + PG_EPOCH_OFFSET_US,
                });
                self.seq = 0;
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                self.tx = None;
                out.push(SourceEvent::Commit {
                    end_lsn: Lsn(end_lsn.as_u64()),
                });
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                if self.tx.is_none() && !wal_end.is_zero() {
                    out.push(SourceEvent::Progress {
                        lsn: Lsn(wal_end.as_u64()),
                    });
                }
            }
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                ..
            } => {
                // The DDL trigger's note: a table may have come or gone.
                if prefix == DDL_PREFIX {
                    self.catalog_check_due = true;
                }
                if !transactional && self.tx.is_none() {
                    out.push(SourceEvent::Progress {
                        lsn: Lsn(lsn.as_u64()),
                    });
                }
            }
            ReplicationEvent::XLogData { data, .. } => {
                if self.spools.is_some() {
                    self.handle_streamed(&data, out).await?;
                } else {
                    self.handle_message(&data, out).await?;
                }
            }
            ReplicationEvent::StoppedAt { .. } => {
                return Err(SourceError::Stream("the stream stopped".into()));
            }
        }
        Ok(())
    }

    async fn handle_message(
        &mut self,
        data: &Bytes,
        out: &mut Vec<SourceEvent>,
    ) -> Result<(), SourceError> {
        let msg = pgoutput::decode(data)?;
        // `full_old`: the old row is complete (REPLICA IDENTITY FULL), not just its key.
        let (op, relation_id, before, after, full_old) = match msg {
            Message::Relation {
                relation_id,
                namespace,
                name,
                columns,
                replica_identity,
            } => {
                // The key as the WAL describes it (the replica identity, which old rows carry),
                // not today's catalog. Under REPLICA IDENTITY FULL every column is flagged, so
                // the primary key is taken from the catalog instead.
                let key = if replica_identity == b'f' {
                    catalog::key_columns(&self.sql, relation_id).await?
                } else {
                    columns
                        .iter()
                        .filter(|c| c.is_identity)
                        .map(|c| c.name.clone())
                        .collect()
                };
                let cols: Vec<(String, u32, i32)> = columns
                    .iter()
                    .map(|c| (c.name.clone(), c.type_oid, c.type_modifier))
                    .collect();
                // Numbers from today's catalog, which may be ahead of this message (later DDL)
                // or even behind it (the walsender can send a transaction a moment before its
                // commit is visible to other sessions): found by name, else by place.
                let names: Vec<String> = columns.iter().map(|c| c.name.clone()).collect();
                let mut in_catalog = catalog::catalog_columns(&self.sql, relation_id).await?;
                let mut numbers = catalog::infer_attnums(&names, &in_catalog);
                if numbers.iter().any(Option::is_none) {
                    // A commit not visible yet becomes so within moments: ask once more.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    in_catalog = catalog::catalog_columns(&self.sql, relation_id).await?;
                    numbers = catalog::infer_attnums(&names, &in_catalog);
                }
                let mut attnums: HashMap<String, i16> = names
                    .iter()
                    .zip(&numbers)
                    .filter_map(|(n, a)| a.map(|a| (n.clone(), a)))
                    .collect();
                // A column dropped since keeps the number the previous shape had for its name.
                if let Some(previous) = self.relations.get(&relation_id) {
                    for c in &previous.columns {
                        if let Some(n) = c.attnum {
                            if names.contains(&c.name)
                                && !attnums.contains_key(&c.name)
                                && !attnums.values().any(|v| *v == n)
                            {
                                attnums.insert(c.name.clone(), n);
                            }
                        }
                    }
                }
                let columns = catalog::describe_columns(
                    &self.sql,
                    &mut self.known_types,
                    &cols,
                    &key,
                    &attnums,
                )
                .await?;
                let schema = TableSchema {
                    id: TableId::new(namespace, name),
                    relation_id,
                    columns,
                };
                tracing::debug!(source = %self.cfg.name, table = %schema.id, "relation described");
                let lsn = self.current_tx().commit_lsn;
                out.extend(self.shape_change(&schema, &in_catalog, lsn));
                self.relations.insert(relation_id, Arc::new(schema));
                return Ok(());
            }
            Message::Insert { relation_id, new } => {
                (Op::Insert, relation_id, None, Some(new), false)
            }
            Message::Update {
                relation_id,
                old,
                new,
                old_is_key_only,
            } => (Op::Update, relation_id, old, Some(new), !old_is_key_only),
            Message::Delete {
                relation_id,
                old,
                old_is_key_only,
            } => (Op::Delete, relation_id, Some(old), None, !old_is_key_only),
            Message::Truncate { relation_ids, .. } => {
                let tx = self.current_tx();
                for id in relation_ids {
                    let table = self.relation(id)?;
                    out.push(SourceEvent::Change(Change {
                        table,
                        op: Op::Truncate,
                        before: None,
                        after: None,
                        tx,
                        seq: self.next_seq(),
                        snapshot: SnapshotMark::No,
                    }));
                }
                return Ok(());
            }
            Message::Type { .. } | Message::Origin | Message::Other(_) => return Ok(()),
        };
        let table = self.relation(relation_id)?;
        let before = before.map(|t| parse_tuple(&table, &t)).transpose()?;
        let mut after = after.map(|t| parse_tuple(&table, &t)).transpose()?;
        // Under REPLICA IDENTITY FULL the old row has the unchanged TOAST values: use them. A
        // key-only old row has NULL in the other columns, which must not replace the marker.
        if let (true, Some(b), Some(a)) = (full_old, &before, &mut after) {
            for (new, old) in a.iter_mut().zip(b) {
                if *new == Value::UnchangedToast
                    && !matches!(old, Value::UnchangedToast | Value::Null)
                {
                    *new = old.clone();
                }
            }
        }
        let tx = self.current_tx();
        out.push(SourceEvent::Change(Change {
            table,
            op,
            before,
            after,
            tx,
            seq: self.next_seq(),
            snapshot: SnapshotMark::No,
        }));
        Ok(())
    }

    /// A message under streaming: the frame of a streamed transaction, a message inside one of
    /// its segments (spooled), or one of a transaction sent whole.
    async fn handle_streamed(
        &mut self,
        data: &Bytes,
        out: &mut Vec<SourceEvent>,
    ) -> Result<(), SourceError> {
        let Some(spools) = self.spools.as_mut() else {
            return self.handle_message(data, out).await;
        };
        let name = &self.cfg.name;
        match pgoutput::stream_control(data)? {
            Some(StreamControl::Start { xid, first }) => {
                if first {
                    tracing::debug!(source = %name, xid, "streamed transaction begins");
                }
                spools.start(xid, first)?;
            }
            Some(StreamControl::Stop) => {
                spools.stop();
                metrics::gauge!("bitclone9_source_spool_bytes", "connector" => name.clone())
                    .set(spools.bytes() as f64);
            }
            Some(StreamControl::Abort { xid, subxid }) => {
                spools.abort(xid, subxid);
                if xid == subxid {
                    tracing::debug!(source = %name, xid, "streamed transaction rolled back");
                    metrics::counter!("bitclone9_source_streamed_transactions_total",
                        "connector" => name.clone(), "outcome" => "aborted")
                    .increment(1);
                }
            }
            Some(StreamControl::Commit {
                xid,
                commit_lsn,
                end_lsn,
                commit_time,
            }) => {
                let replay = spools.commit(xid)?;
                tracing::info!(source = %name, xid, lsn = %Lsn(commit_lsn), spooled_bytes = replay.bytes,
                    "streamed transaction committed: handing it over from its spool");
                self.tx = Some(TxInfo {
                    xid: Some(xid),
                    commit_lsn: Lsn(commit_lsn),
                    commit_time_us: commit_time + PG_EPOCH_OFFSET_US,
                });
                self.seq = 0;
                self.replaying = Some(Replaying {
                    replay,
                    end_lsn: Lsn(end_lsn),
                    changes: 0,
                });
            }
            None if spools.in_segment() => {
                let (tag, subxid, body) = pgoutput::split_xid(data)?;
                // Logical messages inside a transaction carry nothing to capture.
                if tag != b'M' {
                    spools.append(tag, subxid, body)?;
                }
            }
            None => self.handle_message(data, out).await?,
        }
        Ok(())
    }

    /// Hands over the next part of a committed streamed transaction, and its commit at the end.
    async fn next_replay_batch(&mut self, out: &mut Vec<SourceEvent>) -> Result<(), SourceError> {
        while out.len() < MAX_BATCH {
            let Some(r) = self.replaying.as_mut() else {
                break;
            };
            match r.replay.next_message()? {
                Some(msg) => {
                    let before = out.len();
                    self.handle_message(&msg, out).await?;
                    if let Some(r) = self.replaying.as_mut() {
                        r.changes += (out.len() - before) as u64;
                    }
                }
                None => {
                    let end_lsn = r.end_lsn;
                    let changes = r.changes;
                    self.replaying = None;
                    self.tx = None;
                    out.push(SourceEvent::Commit { end_lsn });
                    tracing::debug!(source = %self.cfg.name, changes, lsn = %end_lsn, "streamed transaction handed over");
                    metrics::counter!("bitclone9_source_streamed_transactions_total",
                        "connector" => self.cfg.name.clone(), "outcome" => "committed")
                    .increment(1);
                    if let Some(spools) = &self.spools {
                        metrics::gauge!("bitclone9_source_spool_bytes", "connector" => self.cfg.name.clone())
                            .set(spools.bytes() as f64);
                    }
                    break;
                }
            }
        }
        if self.acked_rx.has_changed().unwrap_or(false) {
            let lsn = *self.acked_rx.borrow_and_update();
            self.repl
                .update_applied_lsn(pgwire_replication::Lsn::from_u64(lsn.0));
        }
        Ok(())
    }

    /// Compares a table's columns, as a Relation message in the transaction committed at
    /// `lsn` describes them, with the shape last stored: a new shape is to be stored, and a
    /// column added since with a default or identity means that its table's rows changed
    /// without row changes in the WAL (see [`SourceEvent::Shape`]).
    fn shape_change(
        &mut self,
        schema: &TableSchema,
        in_catalog: &[catalog::CatalogColumn],
        lsn: Lsn,
    ) -> Option<SourceEvent> {
        let attnums: Vec<i16> = schema.columns.iter().filter_map(|c| c.attnum).collect();
        if lsn == Lsn(0) || attnums.len() != schema.columns.len() {
            // Columns not found in the catalog (a sink follows them by name): no shape to
            // compare with.
            tracing::debug!(source = %self.cfg.name, table = %schema.id, lsn = %lsn, "columns not all numbered: shape not compared");
            return None;
        }
        let rows_rewritten = match self.shapes.get(&schema.id) {
            // Earlier than the stored shape: a replay. No column beyond it: nothing to store,
            // since a column number is never used twice in a table, so a number the stored
            // shape holds and the table lost (a DROP COLUMN) can never come back, and a message
            // of an older shape (a transaction from before a DDL that the catalog check already
            // stored) must not hide the newer one.
            // Another table of the same name (dropped and created again): its shape starts anew.
            Some(last) if last.relation_id != 0 && last.relation_id != schema.relation_id => false,
            Some(last) if lsn < last.lsn || attnums.iter().all(|a| last.attnums.contains(a)) => {
                return None
            }
            Some(last) => {
                let filled: Vec<&str> = in_catalog
                    .iter()
                    .filter(|c| {
                        c.filled && attnums.contains(&c.attnum) && !last.attnums.contains(&c.attnum)
                    })
                    .map(|c| c.name.as_str())
                    .collect();
                if !filled.is_empty() {
                    tracing::warn!(source = %self.cfg.name, table = %schema.id, lsn = %lsn, columns = %filled.join(", "),
                        "columns added with a default or identity gave every existing row a value the WAL does not carry: reading the table again");
                    metrics::counter!("bitclone9_source_rewritten_tables_total",
                        "connector" => self.cfg.name.clone())
                    .increment(1);
                }
                !filled.is_empty()
            }
            None => false,
        };
        let shape = TableShape {
            lsn,
            attnums,
            relation_id: schema.relation_id,
        };
        self.shapes.insert(schema.id.clone(), shape.clone());
        Some(SourceEvent::Shape {
            table: schema.id.clone(),
            shape,
            rows_rewritten,
        })
    }

    fn current_tx(&self) -> TxInfo {
        self.tx.unwrap_or(TxInfo {
            xid: None,
            commit_lsn: Lsn(0),
            commit_time_us: 0,
        })
    }

    fn next_seq(&mut self) -> u64 {
        let s = self.seq;
        self.seq += 1;
        s
    }

    fn relation(&self, id: u32) -> Result<Arc<TableSchema>, SourceError> {
        self.relations
            .get(&id)
            .cloned()
            .ok_or(SourceError::UnknownRelation(id))
    }
}

fn parse_tuple(table: &TableSchema, tuple: &[TupleValue]) -> Result<Row, SourceError> {
    if tuple.len() != table.columns.len() {
        return Err(SourceError::Stream(format!(
            "table {}: row has {} columns, relation has {}",
            table.id,
            tuple.len(),
            table.columns.len()
        )));
    }
    tuple
        .iter()
        .zip(&table.columns)
        .map(|(v, col)| match v {
            TupleValue::Null => Ok(Value::Null),
            TupleValue::UnchangedToast => Ok(Value::UnchangedToast),
            TupleValue::Text(b) | TupleValue::Binary(b) => {
                let text = std::str::from_utf8(b).map_err(|_| SourceError::Value {
                    table: table.id.clone(),
                    column: col.name.clone(),
                    error: Box::new(types::ValueError {
                        ty: col.pg_type.clone(),
                        text: String::from_utf8_lossy(b).into_owned(),
                        why: "not UTF-8",
                    }),
                })?;
                types::parse_text(&col.ty, text).map_err(|error| SourceError::Value {
                    table: table.id.clone(),
                    column: col.name.clone(),
                    error: Box::new(error),
                })
            }
        })
        .collect()
}
