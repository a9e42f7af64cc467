//! One source's pipeline, and the supervisor that restarts it.
//!
//! ```text
//!  PostgresSource ──batch──► EventWriter::send ──► librdkafka (in flight)
//!        ▲                        │ DeliveryFutures, Commit(lsn) markers, in WAL order
//!        │                        ▼
//!        └──── AckHandle ◄──── acker task: await deliveries in order; at each marker,
//!                               checkpoint (RocksDB) then confirm to the slot
//! ```
//!
//! Reading never waits for Kafka acknowledgements (only for librdkafka's queue to have room);
//! the acker confirms an LSN only after every record before it was acknowledged by Kafka.

mod drops;

use crate::checkpoint::CheckpointStore;
use crate::status::{ConnectorState, Status};
use bitclone9_core::{Lsn, Op};
use bitclone9_kafka::encode::SourceInfo;
use bitclone9_kafka::{
    Delivery, EventWriter, KafkaSettings, SinkError, TopicSettings, KAFKA_STALL_LIMIT,
};
use bitclone9_postgres_source::{
    AckHandle, PostgresSource, PostgresSourceConfig, SourceError, SourceEvent,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Why a pipeline run ended.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("postgres source: {0}")]
    Source(#[from] SourceError),
    #[error("kafka: {0}")]
    Kafka(#[from] SinkError),
    #[error("kafka delivery failed: {0}")]
    Delivery(String),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
}

impl PipelineError {
    /// A short name of the part at fault, for logs and metrics.
    pub fn component(&self) -> &'static str {
        match self {
            PipelineError::Source(_) => "postgres",
            PipelineError::Kafka(
                SinkError::RegistryUnreachable { .. }
                | SinkError::SchemaRejected { .. }
                | SinkError::SchemaIncompatible { .. },
            ) => "schema_registry",
            PipelineError::Kafka(_) | PipelineError::Delivery(_) => "kafka",
            PipelineError::Checkpoint(_) => "checkpoint_store",
        }
    }
}

/// What one pipeline needs.
pub struct PipelineConfig {
    pub source: PostgresSourceConfig,
    pub kafka: KafkaSettings,
    pub topics: TopicSettings,
}

/// Items the acker handles in order.
enum AckItem {
    Deliveries(Vec<Delivery>),
    /// Everything before this is in the WAL up to `lsn`: confirm once delivered.
    Position(Lsn),
    SnapshotDone(Lsn),
    ResyncDone(Vec<bitclone9_core::TableId>),
    /// The drop of a table, found at this position, is announced (see [`drops`]).
    DropAnnounced(bitclone9_core::TableId, Lsn),
}

/// Adds `deliveries` to the batch, after the last item if that is deliveries too.
fn push_deliveries(items: &mut Vec<AckItem>, deliveries: &mut Vec<Delivery>) {
    if deliveries.is_empty() {
        return;
    }
    match items.last_mut() {
        Some(AckItem::Deliveries(d)) => d.append(deliveries),
        _ => items.push(AckItem::Deliveries(std::mem::take(deliveries))),
    }
}

/// Adds a position covering everything before it. An earlier position of the same batch that
/// only deliveries follow is dropped: the later one covers it.
fn push_position(items: &mut Vec<AckItem>, deliveries: &mut Vec<Delivery>, lsn: Lsn) {
    if let Some(AckItem::Position(_)) = items.last() {
        items.pop();
    } else if items.len() >= 2
        && matches!(items[items.len() - 2], AckItem::Position(_))
        && matches!(items[items.len() - 1], AckItem::Deliveries(_))
    {
        let d = items.pop();
        items.pop();
        if let Some(d) = d {
            items.push(d);
        }
    }
    push_deliveries(items, deliveries);
    items.push(AckItem::Position(lsn));
}

/// How often the confirmed position is written to the checkpoint store at most.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// A failure that ends a connector's run: named by the part at fault, for logs and metrics.
pub trait RunFailure: std::fmt::Display {
    fn component(&self) -> &'static str;
    /// Whether retrying may help (a hint for the log; every failure is retried).
    fn transient(&self) -> bool {
        true
    }
}

impl RunFailure for PipelineError {
    fn component(&self) -> &'static str {
        PipelineError::component(self)
    }
    fn transient(&self) -> bool {
        match self {
            PipelineError::Source(s) => s.is_transient(),
            PipelineError::Kafka(k) => k.is_transient(),
            _ => true,
        }
    }
}

/// How long to wait before the next attempt, kept per component at fault: it doubles from 1 s
/// to 60 s while one component keeps failing before the connector comes up, and starts again
/// at 1 s for every component once a run came up (connected to everything). So a long outage
/// of one service is probed ever less often, while a service back after a short blip, or a
/// different one failing later, is retried at once.
#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: std::collections::HashMap<&'static str, Duration>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(60))
    }
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: Default::default(),
        }
    }

    /// The wait after a run that failed at `component`; `came_up`: whether that run had come
    /// up before it failed.
    pub fn after_failure(&mut self, component: &'static str, came_up: bool) -> Duration {
        if came_up {
            self.next.clear();
        }
        let next = self.next.entry(component).or_insert(self.first);
        let wait = *next;
        *next = (wait * 2).min(self.max);
        wait
    }
}

/// Runs a connector (`kind` "source" or "sink") until `shutdown` turns true, restarting it
/// after failures with a [`Backoff`] per component. Never returns an error: failures are
/// logged, counted and shown in the status.
pub async fn restart_on_failure<F, Fut, E>(
    kind: &'static str,
    name: &str,
    status: &Status,
    shutdown: watch::Receiver<bool>,
    run: F,
) where
    F: FnMut(watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: RunFailure,
{
    supervise_with(Backoff::default(), kind, name, status, shutdown, run).await
}

async fn supervise_with<F, Fut, E>(
    mut backoff: Backoff,
    kind: &'static str,
    name: &str,
    status: &Status,
    mut shutdown: watch::Receiver<bool>,
    mut run: F,
) where
    F: FnMut(watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: RunFailure,
{
    loop {
        let ups = status.ups(name);
        status.set_state(name, ConnectorState::Starting);
        // The run's span names the connector on every log line; it lives as long as the run,
        // so it is not exported (see telemetry.rs): each batch is a trace of its own.
        let span = match kind {
            "sink" => tracing::info_span!(target: "bitclone9::run", "sink", connector = %name),
            _ => tracing::info_span!(target: "bitclone9::run", "source", connector = %name),
        };
        let result = tracing::Instrument::instrument(run(shutdown.clone()), span).await;
        let e = match result {
            Ok(()) if *shutdown.borrow() => {
                status.set_state(name, ConnectorState::Stopped);
                return;
            }
            // A clean stop without a shutdown asks for a fresh start (e.g. to read a table
            // again that was asked for while a snapshot ran).
            Ok(()) => {
                tracing::info!(connector = %name, "{kind} restarting");
                continue;
            }
            Err(e) => e,
        };
        metrics::counter!("bitclone9_pipeline_restarts_total", "connector" => name.to_string(), "component" => e.component()).increment(1);
        let wait = backoff.after_failure(e.component(), status.ups(name) > ups);
        tracing::error!(connector = %name, component = e.component(), transient = e.transient(), retry_in = ?wait, "{kind} stopped: {e}");
        status.failed(name, format!("{}: {e}", e.component()), wait);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Runs the source pipeline until `shutdown` turns true, restarting it after failures; nothing
/// is confirmed that Kafka has not stored.
pub async fn supervise(
    cfg: PipelineConfig,
    store: Arc<CheckpointStore>,
    status: Arc<Status>,
    shutdown: watch::Receiver<bool>,
) {
    let name = cfg.source.name.clone();
    status.register(&name, &cfg.source.slot);
    let (cfg, store, status) = (&cfg, &store, &status);
    restart_on_failure("source", &name, status, shutdown, move |stop| async move {
        let result = run_once(cfg, store, status, stop).await;
        // A value the events cannot carry stops the source at the same change after every
        // restart (docs/types.md): counted by table and column for the alert that names them.
        if let Err(PipelineError::Source(SourceError::Value { table, column, .. })) = &result {
            metrics::counter!("bitclone9_source_unreadable_values_total",
                "connector" => cfg.source.name.clone(), "table" => table.to_string(), "column" => column.clone())
            .increment(1);
        }
        result
    })
    .await;
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn run_once(
    cfg: &PipelineConfig,
    store: &Arc<CheckpointStore>,
    status: &Arc<Status>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), PipelineError> {
    if *shutdown.borrow() {
        return Ok(());
    }
    let name = cfg.source.name.clone();
    let resume = store.load_source(&name)?;
    let started_with = resume.resync.clone();
    tracing::info!(connector = %name, lsn = ?resume.lsn.map(|l| l.to_string()), snapshot_done = resume.snapshot_done, "starting pipeline");
    let info = SourceInfo {
        name: name.clone(),
        db: cfg.source.endpoint.database.clone(),
    };
    let mut writer = EventWriter::connect(&cfg.kafka, cfg.topics.clone(), info).await?;
    let forget = || store.clear_source(&name).map_err(|e| e.to_string());
    let record_resync = |tables: &[bitclone9_core::TableId]| {
        tables
            .iter()
            .try_for_each(|t| store.request_resync(&name, t).map(|_| ()))
            .map_err(|e| e.to_string())
    };
    let mut source =
        PostgresSource::start(cfg.source.clone(), resume, &forget, &record_resync).await?;
    status.set_left_out(&name, source.left_out());
    store.forget_shapes(&name, source.unmatched())?;
    let mut drops = drops::PendingDrops::load(store, &name)?;
    drops.record(store, status, &name, &source.take_gone_at_start())?;
    // New tables matching include are looked for between batches while streaming (never by
    // interrupting a batch); the next run adds and reads them.
    let check_every = cfg.source.new_table_check_interval;
    let mut checked_at = Instant::now();

    let (ack_tx, ack_rx) = mpsc::channel::<(Instant, Vec<AckItem>)>(64);
    let mut acker = tokio::spawn(acker(
        name.clone(),
        ack_rx,
        store.clone(),
        status.clone(),
        source.ack_handle(),
    ));
    let mut state = if source.snapshotting() {
        ConnectorState::Snapshotting
    } else {
        ConnectorState::Streaming
    };
    status.set_state(&name, state);

    let labels_op = |op: Op| [("connector", name.clone()), ("op", op.code().to_string())];
    let events_c = metrics::counter!("bitclone9_source_events_total", &labels_op(Op::Insert));
    let events_u = metrics::counter!("bitclone9_source_events_total", &labels_op(Op::Update));
    let events_d = metrics::counter!("bitclone9_source_events_total", &labels_op(Op::Delete));
    let events_t = metrics::counter!("bitclone9_source_events_total", &labels_op(Op::Truncate));
    let events_r = metrics::counter!("bitclone9_source_events_total", &labels_op(Op::Read));
    let records =
        metrics::counter!("bitclone9_kafka_records_sent_total", "connector" => name.clone());

    let mut events = Vec::with_capacity(4096);
    let mut deliveries: Vec<Delivery> = Vec::with_capacity(4096);
    let mut last_position = None;
    let mut restart_for_resync = false;
    let result: Result<(), PipelineError> = loop {
        if restart_for_resync {
            // Stop cleanly (deliveries, checkpoint) and start again: the next run reads them.
            tracing::info!(connector = %name, "more tables to read again were asked for meanwhile: restarting to read them");
            break Ok(());
        }
        events.clear();
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => break Ok(()),
            done = &mut acker => {
                break Err(match done {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => PipelineError::Delivery("acknowledgement task ended".into()),
                    Err(e) => PipelineError::Delivery(format!("acknowledgement task failed: {e}")),
                });
            }
            r = source.next_batch(&mut events) => {
                if let Err(e) = r {
                    break Err(e.into());
                }
            }
        }
        if state == ConnectorState::Snapshotting && !source.snapshotting() {
            state = ConnectorState::Streaming;
            status.set_state(&name, state);
        } else if let Some((table, rows)) = source.snapshot_progress() {
            status.set_detail(&name, format!("table {table}, {rows} rows read"));
        } else {
            status.touch(&name);
        }
        let now = now_ms();
        let mut counts = [0u64; 5];
        let mut failed = None;
        let mut items: Vec<AckItem> = Vec::new();
        // One span per batch of changes (not per event, nor for keepalives): what was read
        // and up to which position.
        let batch_span = if events.iter().any(|e| matches!(e, SourceEvent::Change(_))) {
            tracing::info_span!(
                "source_batch",
                connector = %name,
                events = events.len(),
                lsn = tracing::field::Empty
            )
        } else {
            tracing::Span::none()
        };
        let entered = batch_span.clone();
        let handing_over = async {
            // A table of a dropped one's name, published again, is read from this batch on:
            // its drop goes first.
            let first = drops.due(last_position, true, |t| source.is_published(t));
            if let Err(e) = announce(&mut writer, first, now, &mut deliveries, &mut items).await {
                failed = Some(e);
                return;
            }
            for ev in events.drain(..) {
                match ev {
                    SourceEvent::Change(change) => {
                        counts[change.op as usize] += 1;
                        if writer.needs_prepare(&change.table) {
                            if let Err(e) = writer.prepare(&change).await {
                                failed = Some(e.into());
                                break;
                            }
                        }
                        if let Err(e) = writer.send(&change, now, &mut deliveries).await {
                            failed = Some(e.into());
                            break;
                        }
                    }
                    SourceEvent::Commit { end_lsn: lsn } | SourceEvent::Progress { lsn } => {
                        if last_position < Some(lsn) {
                            last_position = Some(lsn);
                            push_position(&mut items, &mut deliveries, lsn);
                        }
                    }
                    SourceEvent::SnapshotDone { consistent_point } => {
                        push_deliveries(&mut items, &mut deliveries);
                        items.push(AckItem::SnapshotDone(consistent_point));
                        restart_for_resync |= asked_meanwhile(store, &name, &started_with);
                    }
                    SourceEvent::ResyncDone { tables } => {
                        push_deliveries(&mut items, &mut deliveries);
                        items.push(AckItem::ResyncDone(tables));
                        restart_for_resync |= asked_meanwhile(store, &name, &started_with);
                    }
                    SourceEvent::Shape {
                        table,
                        shape,
                        rows_rewritten,
                    } => {
                        // Stored at once, not once delivered: a replay describes the same
                        // shape again, and the resync request is durable with it.
                        if let Err(e) = store.record_shape(&name, &table, &shape, rows_rewritten) {
                            failed = Some(e.into());
                            break;
                        }
                        if rows_rewritten {
                            status.note(&name, format!("table {table}: a column added with a default or identity gave its rows values the WAL does not carry; it is read again"));
                            restart_for_resync = true;
                        }
                    }
                }
            }
            if failed.is_none() {
                let passed = drops.due(last_position, false, |t| source.is_published(t));
                if let Err(e) =
                    announce(&mut writer, passed, now, &mut deliveries, &mut items).await
                {
                    failed = Some(e);
                }
            }
        };
        tracing::Instrument::instrument(handing_over, entered).await;
        if let Some(lsn) = last_position {
            batch_span.record("lsn", tracing::field::display(lsn));
        }
        push_deliveries(&mut items, &mut deliveries);
        if !items.is_empty() {
            let sent: usize = items
                .iter()
                .map(|i| match i {
                    AckItem::Deliveries(d) => d.len(),
                    _ => 0,
                })
                .sum();
            records.increment(sent as u64);
            // One hand-over per batch: the acker sees deliveries and positions in WAL order.
            let _ = ack_tx.send((Instant::now(), items)).await;
        }
        events_c.increment(counts[Op::Insert as usize]);
        events_u.increment(counts[Op::Update as usize]);
        events_d.increment(counts[Op::Delete as usize]);
        events_t.increment(counts[Op::Truncate as usize]);
        events_r.increment(counts[Op::Read as usize]);
        if let Some(e) = failed {
            break Err(e);
        }
        let polled = !check_every.is_zero() && checked_at.elapsed() >= check_every;
        if !source.snapshotting() && (polled | source.take_catalog_check_due()) {
            if !polled {
                // Noted by the DDL trigger: the walsender may send a transaction a moment
                // before its commit is visible to other sessions.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            checked_at = Instant::now();
            let changes = match source.catalog_changes().await {
                Ok(c) => c,
                Err(e) => break Err(e.into()),
            };
            if !changes.unpublished.is_empty() {
                let names: Vec<String> = changes
                    .unpublished
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                tracing::warn!(connector = %name, tables = %names.join(", "),
                    "tables taken out of the publication (they still exist): no longer captured; their topics and target tables are kept");
                for t in &changes.unpublished {
                    status.note(
                        &name,
                        format!(
                            "table {t} was taken out of the publication; it is no longer captured"
                        ),
                    );
                }
                if let Err(e) = store.forget_shapes(&name, &changes.unpublished) {
                    break Err(e.into());
                }
            }
            if !changes.gone.is_empty() {
                let found = match source.wal_position().await {
                    Ok(lsn) => changes
                        .gone
                        .iter()
                        .map(|t| (t.clone(), lsn))
                        .collect::<Vec<_>>(),
                    Err(e) => break Err(e.into()),
                };
                if let Err(e) = drops.record(store, status, &name, &found) {
                    break Err(e.into());
                }
            }
            status.set_left_out(&name, source.left_out());
            if !changes.rewritten.is_empty() {
                // The table's next Relation message would say so too, but an idle table may not
                // send one for a long time: store the shape and the resync now, in one write.
                let mut failed: Option<PipelineError> = None;
                for r in &changes.rewritten {
                    let lsn = last_position
                        .into_iter()
                        .chain(source.shape(&r.table).map(|s| s.lsn))
                        .max()
                        .unwrap_or_default();
                    let shape = bitclone9_postgres_source::TableShape {
                        lsn,
                        attnums: r.attnums.clone(),
                        relation_id: source.shape(&r.table).map_or(0, |s| s.relation_id),
                    };
                    tracing::warn!(connector = %name, table = %r.table, lsn = %lsn, columns = %r.columns.join(", "),
                        "columns added with a default or identity gave every existing row a value the WAL does not carry: reading the table again");
                    metrics::counter!("bitclone9_source_rewritten_tables_total", "connector" => name.clone())
                        .increment(1);
                    if let Err(e) = store.record_shape(&name, &r.table, &shape, true) {
                        failed = Some(e.into());
                        break;
                    }
                    status.note(&name, format!("table {}: a column added with a default or identity gave its rows values the WAL does not carry; it is read again", r.table));
                }
                match failed {
                    Some(e) => break Err(e),
                    // Stop cleanly (deliveries, checkpoint) and start again: the next run reads them.
                    None => break Ok(()),
                }
            }
            let new = changes.new;
            if !new.is_empty() {
                let names: Vec<String> = new.iter().map(ToString::to_string).collect();
                tracing::info!(connector = %name, tables = %names.join(", "), "new tables match include: restarting to add and read them");
                break Ok(());
            }
        }
    };

    // Stop reading; let every record already handed to librdkafka be acknowledged, then
    // checkpoint and confirm the last position they cover.
    drop(ack_tx);
    let mut result = result;
    let final_lsn = if result.is_ok() {
        let _ = tokio::task::block_in_place(|| writer.flush(Duration::from_secs(30)));
        match tokio::time::timeout(Duration::from_secs(30), &mut acker).await {
            Ok(Ok(Ok(()))) => match store.load_source(&name) {
                Ok(r) => r.lsn,
                Err(e) => {
                    result = Err(e.into());
                    None
                }
            },
            Ok(Ok(Err(e))) => {
                result = Err(e);
                None
            }
            _ => {
                // Never leave an acker running beside the next run's.
                acker.abort();
                None
            }
        }
    } else {
        acker.abort();
        None
    };
    tracing::info!(connector = %name, lsn = ?final_lsn.map(|l| l.to_string()), "pipeline stopped");
    source.shutdown(final_lsn).await;
    result
}

/// Announces the drops `due` on their topics; each is forgotten once its records are delivered.
async fn announce(
    writer: &mut EventWriter,
    due: Vec<(bitclone9_core::TableId, Lsn)>,
    now_ms: i64,
    deliveries: &mut Vec<Delivery>,
    items: &mut Vec<AckItem>,
) -> Result<(), PipelineError> {
    for (table, lsn) in due {
        writer
            .send_drop_marker(&table, lsn, now_ms, deliveries)
            .await?;
        push_deliveries(items, deliveries);
        items.push(AckItem::DropAnnounced(table, lsn));
    }
    Ok(())
}

/// Whether resyncs were asked for that this run did not start with (so it does not read them).
fn asked_meanwhile(
    store: &CheckpointStore,
    name: &str,
    started_with: &[bitclone9_core::TableId],
) -> bool {
    store
        .pending_resyncs(name)
        .is_ok_and(|p| p.iter().any(|t| !started_with.contains(t)))
}

/// Awaits deliveries in order; checkpoints and confirms positions they cover.
async fn acker(
    name: String,
    mut rx: mpsc::Receiver<(Instant, Vec<AckItem>)>,
    store: Arc<CheckpointStore>,
    status: Arc<Status>,
    ack: AckHandle,
) -> Result<(), PipelineError> {
    let confirmed = metrics::gauge!("bitclone9_source_confirmed_lsn", "connector" => name.clone());
    let delivery =
        metrics::histogram!("bitclone9_kafka_delivery_seconds", "connector" => name.clone());
    let checkpointed_at =
        metrics::gauge!("bitclone9_checkpoint_timestamp_seconds", "connector" => name.clone());
    let mut pending: Option<Lsn> = None;
    let mut last_write = Instant::now();
    let flush = |lsn: Lsn| -> Result<(), PipelineError> {
        store.save_source_lsn(&name, lsn)?;
        ack.ack(lsn);
        confirmed.set(lsn.0 as f64);
        checkpointed_at.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        status.confirmed(&name, lsn.to_string());
        Ok(())
    };
    loop {
        let batch = if pending.is_some() {
            // Checkpoint a pending position when the stream pauses.
            match tokio::time::timeout(CHECKPOINT_EVERY, rx.recv()).await {
                Ok(batch) => batch,
                Err(_) => {
                    if let Some(lsn) = pending.take() {
                        flush(lsn)?;
                        last_write = Instant::now();
                    }
                    continue;
                }
            }
        } else {
            rx.recv().await
        };
        let Some((sent_at, batch)) = batch else { break };
        for item in batch {
            match item {
                AckItem::Deliveries(deliveries) => {
                    for mut d in deliveries {
                        // Kafka down or frozen: end the run, which releases the replication
                        // connection; the next run connects to Kafka first.
                        // Most deliveries are done by now: a timer only for those still waiting.
                        let waited = match futures::FutureExt::now_or_never(&mut d) {
                            Some(done) => Ok(done),
                            None => tokio::time::timeout(KAFKA_STALL_LIMIT, d).await,
                        };
                        let Ok(done) = waited else {
                            return Err(PipelineError::Delivery(format!(
                                "Kafka acknowledged no record for {}s: the replication \
                                 connection is released until Kafka takes records again",
                                KAFKA_STALL_LIMIT.as_secs()
                            )));
                        };
                        match done {
                            Ok(Ok(_)) => {}
                            Ok(Err((e, msg))) => {
                                use rdkafka::message::Message;
                                return Err(PipelineError::Delivery(format!(
                                    "topic {}: {e}",
                                    msg.topic()
                                )));
                            }
                            Err(_) => {
                                return Err(PipelineError::Delivery(
                                    "producer dropped a delivery".into(),
                                ))
                            }
                        }
                    }
                }
                AckItem::Position(lsn) => pending = Some(lsn),
                AckItem::SnapshotDone(lsn) => {
                    store.mark_snapshot_done(&name, lsn)?;
                    tracing::info!(connector = %name, lsn = %lsn, "snapshot delivered and recorded");
                }
                AckItem::DropAnnounced(table, lsn) => {
                    store.finish_drop(&name, &table, lsn)?;
                }
                AckItem::ResyncDone(tables) => {
                    store.finish_resyncs(&name, &tables)?;
                    let names: Vec<String> = tables.iter().map(ToString::to_string).collect();
                    tracing::info!(connector = %name, tables = %names.join(", "), "resync delivered");
                }
            }
        }
        delivery.record(sent_at.elapsed().as_secs_f64());
        if let Some(lsn) = pending {
            if last_write.elapsed() >= CHECKPOINT_EVERY {
                flush(lsn)?;
                pending = None;
                last_write = Instant::now();
            }
        }
    }
    if let Some(lsn) = pending {
        flush(lsn)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_per_component_and_resets_once_a_run_came_up() {
        let mut b = Backoff::default();
        let s = Duration::from_secs;
        let waits: Vec<Duration> = (0..7)
            .map(|_| b.after_failure("schema_registry", false))
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60].map(s));
        // Another part failing meanwhile is not punished for the registry's outage.
        assert_eq!(b.after_failure("postgres", false), s(1));
        assert_eq!(b.after_failure("schema_registry", false), s(60));
        // The registry came back and the run came up; then PostgreSQL restarts.
        assert_eq!(b.after_failure("postgres", true), s(1));
        assert_eq!(b.after_failure("postgres", false), s(2));
        assert_eq!(b.after_failure("schema_registry", false), s(1));
    }

    struct Failure(&'static str);
    impl std::fmt::Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{} is down", self.0)
        }
    }
    impl RunFailure for Failure {
        fn component(&self) -> &'static str {
            self.0
        }
    }

    #[tokio::test]
    async fn the_supervisor_resets_the_wait_after_a_run_that_came_up() {
        // Each run: (came up first?, the part it then fails at). What each next run saw as
        // the wait before it is read from the status.
        let script = [
            (false, "schema_registry"),
            (false, "schema_registry"),
            (false, "schema_registry"),
            (true, "postgres"),
            (false, "postgres"),
            (false, "kafka"),
        ];
        let status = Arc::new(Status::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ms = Duration::from_millis;
        let (st, sn, cl) = (status.clone(), seen.clone(), calls.clone());
        supervise_with(
            Backoff::new(ms(5), ms(1000)),
            "source",
            "src",
            &status,
            stop_rx,
            move |_| {
                let (st, sn, cl) = (st.clone(), sn.clone(), cl.clone());
                let stop_tx = stop_tx.clone();
                async move {
                    let i = cl.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i > 0 {
                        let c = st.snapshot();
                        let wait = c.get("src").and_then(|c| c.retry_wait_s);
                        sn.lock().unwrap_or_else(|p| p.into_inner()).push(wait);
                    }
                    let Some((up, part)) = script.get(i) else {
                        let _ = stop_tx.send(true);
                        return Ok(());
                    };
                    if *up {
                        st.set_state("src", ConnectorState::Streaming);
                    }
                    Err(Failure(part))
                }
            },
        )
        .await;
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let secs = |v: &[u64]| {
            v.iter()
                .map(|m| Some(*m as f64 / 1000.0))
                .collect::<Vec<_>>()
        };
        assert_eq!(seen, secs(&[5, 10, 20, 5, 10, 5]));
    }
}
