//! One sink's pipeline: Kafka topics → decoded changes → a target PostgreSQL, and the supervisor
//! that restarts it.
//!
//! ```text
//!  consumer ──records──► EventReader::decode ──► truncate barrier ──► batch ──► target transaction:
//!  (every partition of                                                           lock positions, drop
//!   its topics, from the                                                         what they cover, apply,
//!   target's positions)                                                          store positions, dead
//!      ▲                                                                         letters acked, COMMIT
//!      └──── commit offsets to the group ◄── checkpoint (RocksDB) ◄──────────────────┘
//! ```
//!
//! The target's own `bitclone9.sink_positions` table decides what is applied: it commits with
//! the rows, so a crash at any instant leaves rows and positions in agreement. RocksDB and the
//! consumer group follow it (for `offsets`, status and lag tools) and may lag behind, never lead.

use crate::checkpoint::CheckpointStore;
use crate::status::{ConnectorState, Status};
use bitclone9_core::{Change, Op};
use bitclone9_kafka::decode::{DecodeError, Decoded, EventReader, TombstoneHeaders};
use bitclone9_kafka::{EventProducer, KafkaSettings, SHAPE_BARRIER_HEADER, TABLE_DROPPED_HEADER};
use bitclone9_postgres_sink::{
    Applied, Part, PartitionPosition, PostgresTarget, PostgresTargetConfig, TargetError, Watermark,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

mod barrier;
mod stopped;
use barrier::PartitionBarrier;
use stopped::StoppedTables;

/// Why a sink run ended.
#[derive(Debug, thiserror::Error)]
pub enum SinkPipelineError {
    #[error("target: {0}")]
    Target(#[from] TargetError),
    #[error("decoding: {0}")]
    Decode(#[from] DecodeError),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("stopping at {topic}[{partition}]@{offset} (on_error = \"stop\"): {error}")]
    Poison {
        topic: String,
        partition: i32,
        offset: i64,
        error: String,
    },
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
}

impl crate::pipeline::RunFailure for SinkPipelineError {
    fn component(&self) -> &'static str {
        match self {
            SinkPipelineError::Target(_) | SinkPipelineError::Poison { .. } => "postgres",
            SinkPipelineError::Decode(_) => "schema_registry",
            SinkPipelineError::Kafka(_) => "kafka",
            SinkPipelineError::Checkpoint(_) => "checkpoint_store",
        }
    }
}

/// What a sink does with an event the target refuses after retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonPolicy {
    DeadLetter,
    Stop,
}

/// Everything one sink needs.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkPipelineConfig {
    pub name: String,
    pub kafka: KafkaSettings,
    pub consumer: Vec<(String, String)>,
    pub group: String,
    /// Topic names, or one `^regex`.
    pub subscription: Vec<String>,
    pub target: PostgresTargetConfig,
    pub on_error: PoisonPolicy,
    pub dead_letter_topic: String,
    pub max_batch: usize,
    /// Most bytes of records (key and value) in one batch.
    pub max_batch_bytes: usize,
    pub max_wait: Duration,
    /// Target sessions applying disjoint sets of partitions at once.
    pub apply_concurrency: usize,
}

/// Attempts at a batch the target refuses before it is applied change by change.
const POISON_ATTEMPTS: u32 = 3;

/// Runs the sink until `shutdown` turns true, restarting it after failures.
pub async fn supervise(
    cfg: SinkPipelineConfig,
    store: Arc<CheckpointStore>,
    status: Arc<Status>,
    shutdown: watch::Receiver<bool>,
) {
    let name = cfg.name.clone();
    status.register(&name, "");
    crate::pipeline::restart_on_failure("sink", &name, &status, shutdown, |stop| {
        run_once(&cfg, &store, &status, stop)
    })
    .await;
}

/// The consumer settings BitClone9 relies on; user settings tune the rest.
pub fn consumer_config(cfg: &SinkPipelineConfig) -> ClientConfig {
    let mut c = cfg.kafka.client_config();
    c.set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "5000")
        .set("fetch.wait.max.ms", "50")
        // Records fetched ahead of the target are bounded (16 MB in all, not 64 MB and
        // 100,000 records per partition), so catching up after an outage keeps memory flat.
        .set("queued.max.messages.kbytes", "16384")
        .set("queued.min.messages", "20000");
    for (k, v) in &cfg.consumer {
        c.set(k, v);
    }
    // The target's positions decide what is applied and where reading starts; offsets are
    // committed to the group after the target, for lag tools.
    c.set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    c
}

/// What the target has applied from each partition (as of the last commit): where reading
/// resumes, and what the truncate barrier and lag figures compare with.
type Applieds = HashMap<(String, i32), Applied>;

/// Finds the topics a sink reads and assigns all their partitions to it, each starting after
/// the target's position (or at its beginning). The sink assigns partitions itself rather than
/// through consumer-group rebalancing, so a restarted daemon resumes at once and a topic that
/// appears later (a new table) is picked up within seconds.
struct Assigner {
    names: Vec<String>,
    patterns: Vec<regex::Regex>,
    exclude: String,
    assigned: std::collections::HashSet<(String, i32)>,
    last_scan: Option<Instant>,
}

impl Assigner {
    fn new(cfg: &SinkPipelineConfig) -> Result<Self, SinkPipelineError> {
        let mut names = Vec::new();
        let mut patterns = Vec::new();
        for s in &cfg.subscription {
            if s.starts_with('^') {
                patterns.push(regex::Regex::new(s).map_err(|e| {
                    SinkPipelineError::Kafka(format!(
                        "topic pattern {s:?} is not a valid regular expression: {e}"
                    ))
                })?);
            } else {
                names.push(s.clone());
            }
        }
        Ok(Self {
            names,
            patterns,
            exclude: cfg.dead_letter_topic.clone(),
            assigned: Default::default(),
            last_scan: None,
        })
    }

    fn wants(&self, topic: &str) -> bool {
        topic != self.exclude
            && !topic.starts_with("__")
            && (self.names.iter().any(|n| n == topic)
                || self.patterns.iter().any(|p| p.is_match(topic)))
    }

    /// Makes the next [`scan`](Self::scan) list the topics again without waiting.
    fn rescan_soon(&mut self) {
        if self
            .last_scan
            .is_some_and(|t| t.elapsed() >= Duration::from_millis(500))
        {
            self.last_scan = None;
        }
    }

    /// Gives up `topic`'s partitions: they are assigned again by a later scan, from the
    /// target's positions.
    fn unassign<C: ConsumerContext>(&mut self, consumer: &StreamConsumer<C>, topic: &str) {
        let mut tpl = TopicPartitionList::new();
        for (t, p) in self.assigned.iter().filter(|(t, _)| t == topic) {
            tpl.add_partition(t, *p);
        }
        self.assigned.retain(|(t, _)| t != topic);
        if tpl.count() > 0 {
            if let Err(e) = consumer.incremental_unassign(&tpl) {
                tracing::warn!(topic, error = %e, "cannot give up the topic's partitions (its records are dropped meanwhile)");
            }
        }
    }

    /// Assigns partitions not assigned yet (at most every 5 s), but none of `stopped` topics.
    fn scan<C: ConsumerContext>(
        &mut self,
        name: &str,
        consumer: &StreamConsumer<C>,
        applied: &Applieds,
        stopped: &StoppedTables,
        timeout: Duration,
    ) -> Result<(), SinkPipelineError> {
        if self
            .last_scan
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
        {
            return Ok(());
        }
        self.last_scan = Some(Instant::now());
        let metadata = tokio::task::block_in_place(|| consumer.fetch_metadata(None, timeout))
            .map_err(|e| SinkPipelineError::Kafka(format!("listing topics: {e}")))?;
        let mut tpl = TopicPartitionList::new();
        let wanted: Vec<_> = metadata
            .topics()
            .iter()
            .filter(|t| self.wants(t.name()) && !stopped.blocks(t.name()))
            .collect();
        for t in wanted {
            for p in t.partitions() {
                let key = (t.name().to_string(), p.id());
                if self.assigned.contains(&key) {
                    continue;
                }
                let start = applied
                    .get(&key)
                    .map_or(Offset::Beginning, |a| Offset::Offset(a.offset + 1));
                tracing::info!(connector = %name, topic = t.name(), partition = p.id(), offset = ?start, "reading partition, from after the target's position");
                let _ = tpl.add_partition_offset(t.name(), p.id(), start);
                self.assigned.insert(key);
            }
        }
        if tpl.count() > 0 {
            consumer
                .incremental_assign(&tpl)
                .map_err(|e| SinkPipelineError::Kafka(format!("assigning partitions: {e}")))?;
        }
        Ok(())
    }
}

/// One consumed record and what it decoded to.
struct Item {
    msg: OwnedMessage,
    decoded: Result<Decoded, DecodeError>,
}

impl Item {
    fn change(&self) -> Option<&Change> {
        match &self.decoded {
            Ok(Decoded::Change(c) | Decoded::Tombstone(Some(c))) => Some(c),
            _ => None,
        }
    }

    fn watermark(&self) -> Option<Watermark> {
        match &self.decoded {
            Ok(Decoded::Change(c)) => Some(Watermark::of(c)),
            Ok(Decoded::Tombstone(Some(c))) => Some(Watermark::of_tombstone(c)),
            Ok(Decoded::Tombstone(None)) => self.shape_barrier(),
            _ => None,
        }
    }

    /// The position of a shape barrier (a record of no key or value with the
    /// [`SHAPE_BARRIER_HEADER`]): just before the change of new column types it announces.
    fn shape_barrier(&self) -> Option<Watermark> {
        if !matches!(self.decoded, Ok(Decoded::Tombstone(None))) {
            return None;
        }
        let kind = self
            .msg
            .headers()?
            .iter()
            .find(|h| h.key == SHAPE_BARRIER_HEADER)?
            .value?;
        let h = tombstone_headers(&self.msg);
        Some(Watermark {
            lsn: h.lsn?.0,
            streamed: kind == b"streamed",
            seq: h.seq?,
            part: Part::Barrier,
        })
    }

    /// Where the barrier holds this record's partition until every partition reached it: a
    /// truncate, or a shape barrier.
    fn barrier(&self) -> Option<Watermark> {
        self.change()
            .filter(|c| c.op == Op::Truncate)
            .map(Watermark::of)
            .or_else(|| self.shape_barrier())
    }

    /// The announcement that this truncate's table was dropped at the source.
    fn table_dropped(&self) -> bool {
        self.change().is_some_and(|c| c.op == Op::Truncate)
            && self.msg.headers().is_some_and(|h| {
                h.iter()
                    .any(|h| h.key == TABLE_DROPPED_HEADER && h.value == Some(b"true".as_slice()))
            })
    }
}

/// A record for the dead-letter topic, with why.
struct DeadLetter<'a> {
    item: &'a Item,
    kind: String,
    error: String,
}

struct Metrics {
    applied: [metrics::Counter; 5],
    duplicates: metrics::Counter,
    apply_seconds: metrics::Histogram,
    batch_events: metrics::Histogram,
    commit_lag: metrics::Histogram,
    checkpointed_at: metrics::Gauge,
    missing_rows: metrics::Counter,
    /// Target tables whose source table was dropped: kept, and dropped.
    tables_kept: metrics::Counter,
    tables_dropped: metrics::Counter,
}

impl Metrics {
    fn new(name: &str) -> Self {
        let op = |op: Op| metrics::counter!("bitclone9_sink_events_total", "connector" => name.to_string(), "op" => op.code());
        Self {
            applied: [
                op(Op::Insert),
                op(Op::Update),
                op(Op::Delete),
                op(Op::Truncate),
                op(Op::Read),
            ],
            duplicates: metrics::counter!("bitclone9_sink_duplicates_skipped_total", "connector" => name.to_string()),
            apply_seconds: metrics::histogram!("bitclone9_sink_apply_seconds", "connector" => name.to_string()),
            batch_events: metrics::histogram!("bitclone9_sink_batch_records", "connector" => name.to_string()),
            commit_lag: metrics::histogram!("bitclone9_sink_source_to_target_seconds", "connector" => name.to_string()),
            checkpointed_at: metrics::gauge!("bitclone9_checkpoint_timestamp_seconds", "connector" => name.to_string()),
            missing_rows: metrics::counter!("bitclone9_sink_missing_rows_total", "connector" => name.to_string()),
            tables_kept: metrics::counter!("bitclone9_sink_source_tables_dropped_total", "connector" => name.to_string(), "action" => "kept"),
            tables_dropped: metrics::counter!("bitclone9_sink_source_tables_dropped_total", "connector" => name.to_string(), "action" => "dropped"),
        }
    }
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

async fn run_once(
    cfg: &SinkPipelineConfig,
    store: &Arc<CheckpointStore>,
    status: &Arc<Status>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SinkPipelineError> {
    if *shutdown.borrow() {
        return Ok(());
    }
    let name = cfg.name.as_str();
    let mut target = PostgresTarget::connect(cfg.target.clone()).await?;
    // More sessions apply disjoint sets of partitions at once (`apply_concurrency`).
    let mut more_targets = Vec::new();
    for _ in 1..cfg.apply_concurrency.max(1) {
        more_targets.push(PostgresTarget::connect(cfg.target.clone()).await?);
    }
    let registry = cfg
        .kafka
        .registry()
        .map_err(|e| SinkPipelineError::Kafka(e.to_string()))?;
    let mut reader = EventReader::new(registry);
    let mut applied: Applieds = target
        .positions()
        .await?
        .into_iter()
        .map(|p| ((p.topic, p.partition), p.applied))
        .collect();
    let (producer, context) = cfg
        .kafka
        .producer()
        .map_err(|e| SinkPipelineError::Kafka(format!("dead-letter producer: {e}")))?;
    // Reach the brokers first: a refused TLS handshake or login is reported by its cause.
    bitclone9_kafka::ping_kafka(
        &producer,
        &context,
        &cfg.kafka.bootstrap_servers,
        cfg.kafka.request_timeout,
    )
    .await
    .map_err(|e| SinkPipelineError::Kafka(e.to_string()))?;
    let consumer: StreamConsumer = consumer_config(cfg)
        .create()
        .map_err(|e| SinkPipelineError::Kafka(format!("consumer: {e}")))?;
    let mut assigner = Assigner::new(cfg)?;
    let mut stopped = StoppedTables::new(name);
    assigner.scan(
        name,
        &consumer,
        &applied,
        &stopped,
        cfg.kafka.request_timeout,
    )?;
    ensure_topic(cfg).await?;
    tracing::info!(connector = %name, topics = ?cfg.subscription, group = %cfg.group, "sink started");
    status.set_state(name, ConnectorState::Streaming);
    let m = Metrics::new(name);
    let mut progress = Progress {
        last: None,
        gauge: metrics::gauge!("bitclone9_sink_lag_records", "connector" => name.to_string()),
    };
    let mut barrier = PartitionBarrier::default();
    let dead_letters = |reason: &str| metrics::counter!("bitclone9_sink_dead_letters_total", "connector" => name.to_string(), "reason" => reason.to_string());

    loop {
        status.touch(name);
        progress.refresh(
            name,
            &consumer,
            &assigner,
            &applied,
            status,
            cfg.kafka.request_timeout,
        );
        assigner.scan(
            name,
            &consumer,
            &applied,
            &stopped,
            cfg.kafka.request_timeout,
        )?;
        // Wait for a first record (touching the status while idle), then fill the batch.
        let first = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
            r = tokio::time::timeout(Duration::from_secs(1), consumer.recv()) => r,
        };
        let first = match first {
            Err(_) => {
                // Nothing to apply: the checkpoint is current.
                m.checkpointed_at.set(now_secs());
                continue;
            }
            Ok(Err(e)) if waiting_for_topics(&e) => {
                tracing::debug!(connector = %name, "a topic the sink reads is not there: {e}");
                continue;
            }
            Ok(Err(e)) => return Err(SinkPipelineError::Kafka(format!("consuming: {e}"))),
            Ok(Ok(msg)) => msg.detach(),
        };
        let record_bytes =
            |m: &OwnedMessage| m.payload().map_or(0, <[u8]>::len) + m.key().map_or(0, <[u8]>::len);
        let mut bytes = record_bytes(&first);
        let mut msgs = vec![first];
        let deadline = tokio::time::Instant::now() + cfg.max_wait;
        // The batch ends at max_batch_events records or max_batch_bytes: what the sink holds
        // (records and their decoded rows) stays bounded however large the rows are.
        while msgs.len() < cfg.max_batch && bytes < cfg.max_batch_bytes {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(msg)) => {
                    let msg = msg.detach();
                    bytes += record_bytes(&msg);
                    msgs.push(msg);
                }
                Ok(Err(e)) if waiting_for_topics(&e) => break,
                Ok(Err(e)) => return Err(SinkPipelineError::Kafka(format!("consuming: {e}"))),
                Err(_) => break,
            }
        }
        let mut items = Vec::with_capacity(msgs.len());
        // Records of a stopped table fetched before its partitions were given up are read
        // again when it is tried again.
        for msg in msgs.into_iter().filter(|m| !stopped.blocks(m.topic())) {
            let headers = if msg.payload().is_none() {
                tombstone_headers(&msg)
            } else {
                TombstoneHeaders::default()
            };
            let decoded = match reader
                .decode(msg.topic(), msg.key(), msg.payload(), &headers)
                .await
            {
                Err(e) if !e.is_poison() => return Err(e.into()),
                d => d,
            };
            items.push(Item { msg, decoded });
        }
        let routed = barrier.route(items, &applied, &assigner.assigned);
        pause_resume(&consumer, &routed.pause, &routed.resume);
        if barrier.held().next().is_some() {
            // A held truncate may wait for partitions this sink has not assigned yet: look for
            // them now rather than at the next periodic scan.
            assigner.rescan_soon();
        }
        if routed.ready.is_empty() {
            continue;
        }
        // A shape barrier ends a target transaction: what came before it (events of the old
        // column types) commits before what follows, which may change a column, or fail until
        // an operator changes it, and is then applied again from the committed positions.
        for mut items in after_shape_barriers(routed.ready) {
            let started = Instant::now();
            // A table the target cannot follow stops alone: its records leave the batch, and
            // the rest is applied again.
            let outcome = loop {
                items.retain(|i| !stopped.blocks(i.msg.topic()));
                if items.is_empty() {
                    break None;
                }
                match apply_items(cfg, &mut target, &mut more_targets, &producer, &items, &m).await
                {
                    Ok(o) => break Some(o),
                    Err(SinkPipelineError::Target(TargetError::SchemaChange { table, detail })) => {
                        let topics: std::collections::BTreeSet<String> = items
                            .iter()
                            .filter_map(|i| Some((i.msg.topic(), i.change()?)))
                            .filter(|(_, c)| target.target_of(&c.table.id).to_string() == table)
                            .map(|(t, _)| t.to_string())
                            .collect();
                        if topics.is_empty() {
                            return Err(TargetError::SchemaChange { table, detail }.into());
                        }
                        for topic in &topics {
                            let wait = stopped.stop(topic, &table, &detail);
                            assigner.unassign(&consumer, topic);
                            barrier.forget(topic);
                            metrics::counter!("bitclone9_sink_table_stops_total", "connector" => name.to_string(), "table" => table.clone()).increment(1);
                            tracing::error!(connector = %name, table = %table, topic = %topic, retry_in = ?wait,
                                "table stopped, the sink's other tables go on: {detail}");
                        }
                        status.set_stopped_tables(name, stopped.describe());
                    }
                    Err(e) => return Err(e),
                }
            };
            let Some(outcome) = outcome else { continue };
            let resumed = stopped.applied(items.iter().map(|i| i.msg.topic()));
            if !resumed.is_empty() {
                tracing::info!(connector = %name, tables = %resumed.join(", "), "stopped tables apply again");
                status.set_stopped_tables(name, stopped.describe());
            }
            for (kind, n) in &outcome.dead_lettered {
                dead_letters(kind).increment(*n);
            }
            for table in &outcome.dropped_tables {
                for t in more_targets.iter_mut() {
                    t.forget(table);
                }
            }
            tracing::debug!(connector = %name, records = items.len(), duplicates = outcome.duplicates, elapsed = ?started.elapsed(), "batch applied");
            m.apply_seconds.record(started.elapsed().as_secs_f64());
            m.batch_events.record(items.len() as f64);
            m.duplicates.increment(outcome.duplicates);
            m.missing_rows.increment(outcome.missing_rows);
            let now_us = (now_secs() * 1e6) as i64;
            for item in &items {
                // Streamed events only: snapshot rows carry the snapshot's start, tombstones no time.
                if let Ok(Decoded::Change(c)) = &item.decoded {
                    if c.op != Op::Read && c.snapshot == bitclone9_core::SnapshotMark::No {
                        m.commit_lag
                            .record((now_us - c.tx.commit_time_us).max(0) as f64 / 1e6);
                    }
                }
            }
            // Follow the target: checkpoint, then tell the consumer group.
            let offsets: Vec<(String, i32, i64)> = outcome
                .positions
                .iter()
                .map(|p| (p.topic.clone(), p.partition, p.applied.offset))
                .collect();
            store.save_sink_offsets(name, &offsets)?;
            for p in &outcome.positions {
                applied.insert((p.topic.clone(), p.partition), p.applied);
            }
            m.checkpointed_at.set(now_secs());
            let mut tpl = TopicPartitionList::new();
            for (topic, partition, offset) in &offsets {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(offset + 1));
            }
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                tracing::warn!(connector = %name, error = %e, "cannot commit offsets to the consumer group (the target holds the positions; lag tools may show stale lag)");
            }
        }
    }
}

/// Applies `items` in one transaction when they hold a truncate (it and what follows it are
/// applied in order), else spread over the target sessions by partition.
async fn apply_items(
    cfg: &SinkPipelineConfig,
    target: &mut PostgresTarget,
    more_targets: &mut [PostgresTarget],
    producer: &EventProducer,
    items: &[Item],
    m: &Metrics,
) -> Result<Outcome, SinkPipelineError> {
    let truncates = items
        .iter()
        .any(|i| i.change().is_some_and(|c| c.op == Op::Truncate));
    if more_targets.is_empty() || truncates {
        let all: Vec<&Item> = items.iter().collect();
        apply_batch(cfg, target, producer, &all, m).await
    } else {
        apply_concurrently(cfg, target, more_targets, producer, items, m).await
    }
}

/// `items` cut after each run of shape barriers, in order.
fn after_shape_barriers(items: Vec<Item>) -> Vec<Vec<Item>> {
    let mut parts: Vec<Vec<Item>> = vec![Vec::new()];
    let mut after_barrier = false;
    for item in items {
        let barrier = item.shape_barrier().is_some();
        if after_barrier && !barrier {
            parts.push(Vec::new());
        }
        after_barrier = barrier;
        if let Some(last) = parts.last_mut() {
            last.push(item);
        }
    }
    parts
}

/// Lag per partition, for `/status` and `bitclone9_sink_lag_records`, every 10 s at most.
struct Progress {
    last: Option<Instant>,
    gauge: metrics::Gauge,
}

impl Progress {
    fn refresh<C: ConsumerContext>(
        &mut self,
        name: &str,
        consumer: &StreamConsumer<C>,
        assigner: &Assigner,
        applied: &Applieds,
        status: &Status,
        timeout: Duration,
    ) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        self.last = Some(Instant::now());
        let mut parts: Vec<&(String, i32)> = assigner.assigned.iter().collect();
        parts.sort();
        let mut progress = crate::status::SinkProgress::default();
        for (topic, partition) in parts {
            let Ok((low, high)) = tokio::task::block_in_place(|| {
                consumer.fetch_watermarks(topic, *partition, timeout)
            }) else {
                continue;
            };
            let done = applied.get(&(topic.clone(), *partition)).map(|a| a.offset);
            let lag = (high - done.map_or(low, |o| o + 1)).max(0);
            progress.lag_records += lag;
            progress.partitions.push(crate::status::PartitionProgress {
                topic: topic.clone(),
                partition: *partition,
                applied_offset: done,
                end_offset: high,
                lag_records: lag,
            });
        }
        self.gauge.set(progress.lag_records as f64);
        status.sink_progress(name, progress);
    }
}

/// Stops fetching partitions held at a truncate, and fetches released ones again.
fn pause_resume<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    pause: &[(String, i32)],
    resume: &[(String, i32)],
) {
    let list = |parts: &[(String, i32)]| {
        let mut tpl = TopicPartitionList::new();
        for (t, p) in parts {
            tpl.add_partition(t, *p);
        }
        tpl
    };
    if !pause.is_empty() {
        let _ = consumer.pause(&list(pause));
    }
    if !resume.is_empty() {
        let _ = consumer.resume(&list(resume));
    }
}

/// The headers that let a tombstone be applied: its table and source position.
fn tombstone_headers(msg: &OwnedMessage) -> TombstoneHeaders {
    let mut h = TombstoneHeaders::default();
    let Some(headers) = msg.headers() else {
        return h;
    };
    for header in headers.iter() {
        let Some(v) = header.value.and_then(|v| std::str::from_utf8(v).ok()) else {
            continue;
        };
        match header.key {
            "bitclone9.schema" => h.schema = Some(v.to_string()),
            "bitclone9.table" => h.table = Some(v.to_string()),
            "bitclone9.lsn" => h.lsn = v.parse().ok(),
            "bitclone9.seq" => h.seq = v.parse().ok(),
            "bitclone9.txid" => h.txid = v.parse().ok(),
            _ => {}
        }
    }
    h
}

/// An assigned topic or partition is gone or not there yet (deleted, or not yet created by the
/// source): not a reason to stop; the next scan of the topics settles it.
fn waiting_for_topics(e: &rdkafka::error::KafkaError) -> bool {
    matches!(
        e,
        rdkafka::error::KafkaError::MessageConsumption(
            rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition
                | rdkafka::types::RDKafkaErrorCode::UnknownTopic
        )
    )
}

/// Applies a batch on several sessions at once, each taking the records of its share of the
/// partitions (all records of a partition, hence of a key, go to one session, in order).
async fn apply_concurrently(
    cfg: &SinkPipelineConfig,
    first: &mut PostgresTarget,
    more: &mut [PostgresTarget],
    producer: &EventProducer,
    items: &[Item],
    m: &Metrics,
) -> Result<Outcome, SinkPipelineError> {
    let n = more.len() + 1;
    let share = |item: &Item| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (item.msg.topic(), item.msg.partition()).hash(&mut h);
        (h.finish() % n as u64) as usize
    };
    let mut groups: Vec<Vec<&Item>> = vec![Vec::new(); n];
    for item in items {
        groups[share(item)].push(item);
    }
    let mut targets: Vec<&mut PostgresTarget> =
        std::iter::once(first).chain(more.iter_mut()).collect();
    let runs = targets
        .iter_mut()
        .zip(&groups)
        .filter(|(_, g)| !g.is_empty())
        .map(|(t, g)| apply_batch(cfg, t, producer, g, m));
    let mut merged = Outcome {
        positions: Vec::new(),
        duplicates: 0,
        missing_rows: 0,
        dead_lettered: BTreeMap::new(),
        dropped_tables: Vec::new(),
    };
    for r in futures::future::join_all(runs).await {
        let o = r?;
        merged.positions.extend(o.positions);
        merged.duplicates += o.duplicates;
        merged.missing_rows += o.missing_rows;
        for (k, v) in o.dead_lettered {
            *merged.dead_lettered.entry(k).or_insert(0) += v;
        }
    }
    Ok(merged)
}

/// What a batch did.
struct Outcome {
    positions: Vec<PartitionPosition>,
    duplicates: u64,
    missing_rows: u64,
    dead_lettered: BTreeMap<String, u64>,
    /// Tables whose drop at the source was applied: other sessions forget them.
    dropped_tables: Vec<bitclone9_core::TableId>,
}

/// Applies a batch in one target transaction, retrying refusals and, when they persist,
/// applying change by change so only the refused ones go to the dead-letter topic.
async fn apply_batch(
    cfg: &SinkPipelineConfig,
    target: &mut PostgresTarget,
    producer: &EventProducer,
    items: &[&Item],
    m: &Metrics,
) -> Result<Outcome, SinkPipelineError> {
    let span = tracing::info_span!(
        "sink_apply",
        connector = %cfg.name,
        records = items.len(),
        offsets = tracing::field::Empty,
        lsn = tracing::field::Empty,
    );
    if !span.is_disabled() {
        span.record("offsets", offset_ranges(items));
        if let Some(lsn) = items
            .iter()
            .rev()
            .find_map(|i| i.change())
            .map(|c| c.tx.commit_lsn)
        {
            span.record("lsn", tracing::field::display(lsn));
        }
    }
    tracing::Instrument::instrument(apply_with_retries(cfg, target, producer, items, m), span).await
}

/// `topic[partition]:first..last` for each partition of a batch, for its span.
fn offset_ranges(items: &[&Item]) -> String {
    let mut ranges: BTreeMap<(&str, i32), (i64, i64)> = BTreeMap::new();
    for i in items {
        let o = i.msg.offset();
        ranges
            .entry((i.msg.topic(), i.msg.partition()))
            .and_modify(|r| r.1 = o)
            .or_insert((o, o));
    }
    ranges
        .iter()
        .map(|((t, p), (a, b))| format!("{t}[{p}]:{a}..{b}"))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn apply_with_retries(
    cfg: &SinkPipelineConfig,
    target: &mut PostgresTarget,
    producer: &EventProducer,
    items: &[&Item],
    m: &Metrics,
) -> Result<Outcome, SinkPipelineError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let isolate = attempt > POISON_ATTEMPTS;
        match apply_once(cfg, target, producer, items, m, isolate).await {
            Ok(o) => return Ok(o),
            Err(SinkPipelineError::Target(e)) if e.is_poison() && !isolate => {
                let wait = Duration::from_millis(100 << (attempt - 1));
                tracing::warn!(connector = %cfg.name, attempt, error = %e, retry_in = ?wait, "target refused the batch");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn apply_once(
    cfg: &SinkPipelineConfig,
    target: &mut PostgresTarget,
    producer: &EventProducer,
    items: &[&Item],
    m: &Metrics,
    isolate: bool,
) -> Result<Outcome, SinkPipelineError> {
    let partitions: Vec<(String, i32)> = items
        .iter()
        .map(|i| (i.msg.topic(), i.msg.partition()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|(t, p)| (t.to_string(), p))
        .collect();
    target.begin().await?;
    let result = async {
        let stored: HashMap<(String, i32), Applied> = target
            .lock_positions(&partitions)
            .await?
            .into_iter()
            .map(|p| ((p.topic, p.partition), p.applied))
            .collect();
        // Keep what the stored positions do not cover, in partition order.
        let mut running: HashMap<(&str, i32), Option<Applied>> = HashMap::new();
        let mut keep: Vec<&Item> = Vec::new();
        let mut letters: Vec<DeadLetter> = Vec::new();
        let mut duplicates = 0u64;
        for item in items {
            let key = (item.msg.topic(), item.msg.partition());
            let pos = running
                .entry(key)
                .or_insert_with(|| stored.get(&(key.0.to_string(), key.1)).copied());
            let offset = item.msg.offset();
            if pos.is_some_and(|p| offset <= p.offset) {
                continue;
            }
            let mut next = pos.unwrap_or_default();
            next.offset = offset;
            match (&item.decoded, item.watermark()) {
                (Ok(_), Some(w)) => {
                    if pos.is_some_and(|p| w <= p.watermark) {
                        duplicates += 1;
                    } else {
                        next.watermark = w;
                        keep.push(item);
                    }
                }
                (Ok(_), None) => {}
                (Err(e), _) => letters.push(DeadLetter {
                    item,
                    kind: e.kind().to_string(),
                    error: e.to_string(),
                }),
            }
            *pos = Some(next);
        }
        let mut missing_rows = 0;
        let mut counts = [0u64; 5];
        let mut dropped_tables: Vec<(bitclone9_core::TableId, bool)> = Vec::new();
        if isolate {
            for item in &keep {
                let Some(c) = item.change() else { continue };
                if item.table_dropped() {
                    // Isolated or not, a drop is no poison: it stops the batch if it fails.
                    if !dropped_tables.iter().any(|(t, _)| *t == c.table.id) {
                        let gone = target.table_dropped(&c.table.id).await?;
                        dropped_tables.push((c.table.id.clone(), gone));
                    }
                    counts[c.op as usize] += 1;
                    continue;
                }
                match target.apply_isolated(c).await {
                    Ok(s) => {
                        missing_rows += s.missing_rows;
                        counts[c.op as usize] += 1;
                    }
                    Err(e) if e.is_poison() => letters.push(DeadLetter {
                        item,
                        kind: e.code().to_string(),
                        error: e.to_string(),
                    }),
                    Err(e) => return Err(e.into()),
                }
            }
        } else {
            let changes: Vec<&Change> = keep.iter().filter_map(|i| i.change()).collect();
            let drops: Vec<bool> = keep
                .iter()
                .filter(|i| i.change().is_some())
                .map(|i| i.table_dropped())
                .collect();
            // A drop announcement ends the run of changes before it; it arrives once per
            // partition, and back to back once is enough.
            let mut start = 0;
            for i in (0..changes.len()).filter(|i| drops[*i]) {
                missing_rows += target.apply(&changes[start..i]).await?.missing_rows;
                let c = changes[i];
                let repeat = i > 0
                    && drops[i - 1]
                    && changes[i - 1].table.id == c.table.id
                    && Watermark::of(changes[i - 1]) == Watermark::of(c);
                if !repeat {
                    let gone = target.table_dropped(&c.table.id).await?;
                    dropped_tables.push((c.table.id.clone(), gone));
                }
                start = i + 1;
            }
            missing_rows += target.apply(&changes[start..]).await?.missing_rows;
            for c in &changes {
                counts[c.op as usize] += 1;
            }
        }
        if let (Some(first), PoisonPolicy::Stop) = (letters.first(), cfg.on_error) {
            return Err(SinkPipelineError::Poison {
                topic: first.item.msg.topic().to_string(),
                partition: first.item.msg.partition(),
                offset: first.item.msg.offset(),
                error: first.error.clone(),
            });
        }
        let positions: Vec<PartitionPosition> = running
            .into_iter()
            .filter_map(|((topic, partition), applied)| {
                applied.map(|applied| PartitionPosition {
                    topic: topic.to_string(),
                    partition,
                    applied,
                })
            })
            .collect();
        target.save_positions(&positions).await?;
        let mut dead_lettered = BTreeMap::new();
        for l in &letters {
            *dead_lettered.entry(l.kind.clone()).or_insert(0) += 1;
            tracing::error!(
                connector = %cfg.name,
                topic = l.item.msg.topic(),
                partition = l.item.msg.partition(),
                offset = l.item.msg.offset(),
                reason = %l.kind,
                dead_letter_topic = %cfg.dead_letter_topic,
                "event not applied, sent to the dead-letter topic: {}", l.error
            );
        }
        send_dead_letters(cfg, producer, &letters).await?;
        Ok::<_, SinkPipelineError>((
            positions,
            duplicates,
            missing_rows,
            dead_lettered,
            counts,
            dropped_tables,
        ))
    }
    .await;
    match result {
        Ok((positions, duplicates, missing_rows, dead_lettered, counts, dropped_tables)) => {
            target.commit().await?;
            for (i, n) in counts.iter().enumerate() {
                m.applied[i].increment(*n);
            }
            for (table, gone) in &dropped_tables {
                match gone {
                    true => m.tables_dropped.increment(1),
                    false => m.tables_kept.increment(1),
                }
                tracing::warn!(connector = %cfg.name, table = %table,
                    "{}", if *gone { "the source dropped this table: its target table is dropped too (on_table_drop = \"drop\")" }
                        else { "the source dropped this table: its target table is kept with its rows (on_table_drop = \"keep\")" });
            }
            Ok(Outcome {
                positions,
                duplicates,
                missing_rows,
                dead_lettered,
                dropped_tables: dropped_tables.into_iter().map(|(t, _)| t).collect(),
            })
        }
        Err(e) => {
            target.rollback().await;
            Err(e)
        }
    }
}

/// Writes dead letters and waits until Kafka holds them all (before the target commits past them).
async fn send_dead_letters(
    cfg: &SinkPipelineConfig,
    producer: &EventProducer,
    letters: &[DeadLetter<'_>],
) -> Result<(), SinkPipelineError> {
    let mut pending = Vec::with_capacity(letters.len());
    for l in letters {
        let msg = &l.item.msg;
        let partition = msg.partition().to_string();
        let offset = msg.offset().to_string();
        let mut headers = OwnedHeaders::new();
        if let Some(h) = msg.headers() {
            for h in h.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        for (key, value) in [
            ("bitclone9.error", l.error.as_str()),
            ("bitclone9.error.kind", l.kind.as_str()),
            ("bitclone9.sink", cfg.name.as_str()),
            ("bitclone9.source.topic", msg.topic()),
            ("bitclone9.source.partition", partition.as_str()),
            ("bitclone9.source.offset", offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut rec = FutureRecord::<[u8], [u8]>::to(&cfg.dead_letter_topic).headers(headers);
        if let Some(k) = msg.key() {
            rec = rec.key(k);
        }
        if let Some(p) = msg.payload() {
            rec = rec.payload(p);
        }
        let f = producer.send_result(rec).map_err(|(e, _)| {
            SinkPipelineError::Kafka(format!("dead-letter topic {}: {e}", cfg.dead_letter_topic))
        })?;
        pending.push(f);
    }
    for f in pending {
        match f.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => {
                return Err(SinkPipelineError::Kafka(format!(
                    "dead-letter topic {}: {e}",
                    cfg.dead_letter_topic
                )))
            }
            Err(_) => {
                return Err(SinkPipelineError::Kafka(
                    "dead-letter producer dropped a delivery".into(),
                ))
            }
        }
    }
    Ok(())
}

/// Creates the dead-letter topic when missing (one partition, the broker's replication factor).
async fn ensure_topic(cfg: &SinkPipelineConfig) -> Result<(), SinkPipelineError> {
    use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
    let admin = cfg
        .kafka
        .admin()
        .map_err(|e| SinkPipelineError::Kafka(e.to_string()))?;
    let topic = NewTopic::new(&cfg.dead_letter_topic, 1, TopicReplication::Fixed(-1));
    let opts = AdminOptions::new().operation_timeout(Some(cfg.kafka.request_timeout));
    let results = admin.create_topics([&topic], &opts).await.map_err(|e| {
        SinkPipelineError::Kafka(format!(
            "cannot reach Kafka at {}: {e}",
            cfg.kafka.bootstrap_servers
        ))
    })?;
    for r in results {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => {
                return Err(SinkPipelineError::Kafka(format!(
                    "cannot create the dead-letter topic {t}: {e}"
                )))
            }
        }
    }
    Ok(())
}
