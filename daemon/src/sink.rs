//! One sink's pipeline: Kafka topics → decoded changes → a target PostgreSQL, and the supervisor
//! that restarts it.
//!
//! ```text
//!  consumer ──records──► EventReader::decode ──► batch ──► target transaction:
//!  (group, no auto                                          lock positions, drop what they cover,
//!   commit)                                                 apply, store positions, dead letters
//!      ▲                                                    acknowledged, COMMIT
//!      └──── commit offsets to the group ◄── checkpoint (RocksDB) ◄──┘
//! ```
//!
//! The target's own `bitclone9.sink_positions` table decides what is applied: it commits with
//! the rows, so a crash at any instant leaves rows and positions in agreement. RocksDB and the
//! consumer group follow it (for `offsets`, status and lag tools) and may lag behind, never lead.

use crate::checkpoint::CheckpointStore;
use crate::status::{ConnectorState, Status};
use bitclone9_core::{Change, Op};
use bitclone9_kafka::decode::{DecodeError, Decoded, EventReader};
use bitclone9_kafka::{KafkaSettings, Registry};
use bitclone9_postgres_sink::{
    Applied, PartitionPosition, PostgresTarget, PostgresTargetConfig, TargetError, Watermark,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

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

impl SinkPipelineError {
    pub fn component(&self) -> &'static str {
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
    pub max_wait: Duration,
}

/// Attempts at a batch the target refuses before it is applied change by change.
const POISON_ATTEMPTS: u32 = 3;

/// Runs the sink until `shutdown` turns true, restarting it with backoff (1 s doubling to 60 s).
pub async fn supervise(
    cfg: SinkPipelineConfig,
    store: Arc<CheckpointStore>,
    status: Arc<Status>,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = cfg.name.clone();
    status.register(&name, "");
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        status.set_state(&name, ConnectorState::Starting);
        let span = tracing::info_span!("sink", connector = %name);
        let result = tracing::Instrument::instrument(
            run_once(&cfg, &store, &status, shutdown.clone()),
            span,
        )
        .await;
        match result {
            Ok(()) => {
                status.set_state(&name, ConnectorState::Stopped);
                return;
            }
            Err(e) => {
                metrics::counter!("bitclone9_pipeline_restarts_total", "connector" => name.clone(), "component" => e.component()).increment(1);
                if started.elapsed() > Duration::from_secs(120) {
                    backoff = Duration::from_secs(1);
                }
                tracing::error!(connector = %name, component = e.component(), retry_in = ?backoff, "sink stopped: {e}");
                status.failed(&name, format!("{}: {e}", e.component()));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// The consumer settings BitClone9 relies on; user settings tune the rest.
pub fn consumer_config(cfg: &SinkPipelineConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.bootstrap_servers)
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "5000")
        .set("socket.connection.setup.timeout.ms", "10000")
        .set("fetch.wait.max.ms", "50")
        // Static membership: a restarted daemon takes its partitions back at once instead of
        // waiting for the group to notice that its previous process is gone.
        .set(
            "group.instance.id",
            format!("bitclone9-{}-{}", cfg.name, hostname()),
        )
        .set("session.timeout.ms", "10000");
    for (k, v) in &cfg.consumer {
        c.set(k, v);
    }
    // The target's positions decide what is applied; offsets are committed only after it.
    c.set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    c
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// One consumed record and what it decoded to.
struct Item {
    msg: OwnedMessage,
    decoded: Result<Decoded, DecodeError>,
}

impl Item {
    fn change(&self) -> Option<&Change> {
        match &self.decoded {
            Ok(Decoded::Change(c)) => Some(c),
            _ => None,
        }
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
            batch_events: metrics::histogram!("bitclone9_sink_batch_events", "connector" => name.to_string()),
            commit_lag: metrics::histogram!("bitclone9_sink_source_to_target_seconds", "connector" => name.to_string()),
            checkpointed_at: metrics::gauge!("bitclone9_checkpoint_timestamp_seconds", "connector" => name.to_string()),
            missing_rows: metrics::counter!("bitclone9_sink_missing_rows_total", "connector" => name.to_string()),
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
    let registry = Registry::new(&cfg.kafka.registry_url, cfg.kafka.request_timeout)
        .map_err(|e| SinkPipelineError::Kafka(e.to_string()))?;
    let mut reader = EventReader::new(registry);
    let consumer: StreamConsumer = consumer_config(cfg)
        .create()
        .map_err(|e| SinkPipelineError::Kafka(format!("consumer: {e}")))?;
    let topics: Vec<&str> = cfg.subscription.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| SinkPipelineError::Kafka(format!("subscribing to {topics:?}: {e}")))?;
    let producer: FutureProducer = bitclone9_kafka::producer_config(&cfg.kafka)
        .create()
        .map_err(|e| SinkPipelineError::Kafka(format!("dead-letter producer: {e}")))?;
    ensure_topic(cfg).await?;
    tracing::info!(connector = %name, topics = ?cfg.subscription, group = %cfg.group, "sink started");
    status.set_state(name, ConnectorState::Streaming);
    let m = Metrics::new(name);
    let dead_letters = |reason: &str| metrics::counter!("bitclone9_sink_dead_letters_total", "connector" => name.to_string(), "reason" => reason.to_string());

    loop {
        // Wait for a first record (touching the status while idle), then fill the batch.
        let first = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
            r = tokio::time::timeout(Duration::from_secs(1), consumer.recv()) => r,
        };
        let first = match first {
            Err(_) => {
                status.touch(name);
                continue;
            }
            Ok(Err(e)) if waiting_for_topics(&e) => {
                tracing::debug!(connector = %name, "no subscribed topic exists yet: {e}");
                status.touch(name);
                continue;
            }
            Ok(Err(e)) => return Err(SinkPipelineError::Kafka(format!("consuming: {e}"))),
            Ok(Ok(msg)) => msg.detach(),
        };
        let mut msgs = vec![first];
        let deadline = tokio::time::Instant::now() + cfg.max_wait;
        while msgs.len() < cfg.max_batch {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(msg)) => msgs.push(msg.detach()),
                Ok(Err(e)) if waiting_for_topics(&e) => break,
                Ok(Err(e)) => return Err(SinkPipelineError::Kafka(format!("consuming: {e}"))),
                Err(_) => break,
            }
        }
        let mut items = Vec::with_capacity(msgs.len());
        for msg in msgs {
            let decoded = match reader.decode(msg.key(), msg.payload()).await {
                Err(e) if !e.is_poison() => return Err(e.into()),
                d => d,
            };
            items.push(Item { msg, decoded });
        }
        let started = Instant::now();
        let outcome = apply_batch(cfg, &mut target, &producer, &items, &m).await?;
        for (kind, n) in &outcome.dead_lettered {
            dead_letters(kind).increment(*n);
        }
        tracing::debug!(connector = %name, records = items.len(), duplicates = outcome.duplicates, elapsed = ?started.elapsed(), "batch applied");
        m.apply_seconds.record(started.elapsed().as_secs_f64());
        m.batch_events.record(items.len() as f64);
        m.duplicates.increment(outcome.duplicates);
        m.missing_rows.increment(outcome.missing_rows);
        let now_us = (now_secs() * 1e6) as i64;
        for c in items.iter().filter_map(Item::change) {
            if c.op != Op::Read {
                m.commit_lag
                    .record((now_us - c.tx.commit_time_us).max(0) as f64 / 1e6);
            }
        }
        // Follow the target: checkpoint, then tell the consumer group.
        let offsets: Vec<(String, i32, i64)> = outcome
            .positions
            .iter()
            .map(|p| (p.topic.clone(), p.partition, p.applied.offset))
            .collect();
        store.save_sink_offsets(name, &offsets)?;
        m.checkpointed_at.set(now_secs());
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, offset) in &offsets {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(offset + 1));
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(connector = %name, error = %e, "cannot commit offsets to the consumer group (the target holds the positions; lag tools may show stale lag)");
        }
        status.touch(name);
    }
}

/// A subscribed topic (or every topic of a pattern) does not exist yet: the source creates
/// topics with their first events, so a sink started first waits for them.
fn waiting_for_topics(e: &rdkafka::error::KafkaError) -> bool {
    matches!(
        e,
        rdkafka::error::KafkaError::MessageConsumption(
            rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition
                | rdkafka::types::RDKafkaErrorCode::UnknownTopic
        )
    )
}

/// What a batch did.
struct Outcome {
    positions: Vec<PartitionPosition>,
    duplicates: u64,
    missing_rows: u64,
    dead_lettered: BTreeMap<String, u64>,
}

/// Applies a batch in one target transaction, retrying refusals and, when they persist,
/// applying change by change so only the refused ones go to the dead-letter topic.
async fn apply_batch(
    cfg: &SinkPipelineConfig,
    target: &mut PostgresTarget,
    producer: &FutureProducer,
    items: &[Item],
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
    producer: &FutureProducer,
    items: &[Item],
    m: &Metrics,
    isolate: bool,
) -> Result<Outcome, SinkPipelineError> {
    let mut partitions: Vec<(String, i32)> = items
        .iter()
        .map(|i| (i.msg.topic().to_string(), i.msg.partition()))
        .collect();
    partitions.sort();
    partitions.dedup();
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
            match &item.decoded {
                Ok(Decoded::Change(c)) => {
                    let w = Watermark::of(c);
                    if pos.is_some_and(|p| w <= p.watermark) {
                        duplicates += 1;
                    } else {
                        next.watermark = w;
                        keep.push(item);
                    }
                }
                Ok(Decoded::Tombstone) => {}
                Err(e) => letters.push(DeadLetter {
                    item,
                    kind: e.kind().to_string(),
                    error: e.to_string(),
                }),
            }
            *pos = Some(next);
        }
        let mut missing_rows = 0;
        let mut counts = [0u64; 5];
        if isolate {
            for item in &keep {
                let Some(c) = item.change() else { continue };
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
            let s = target.apply(&changes).await?;
            missing_rows = s.missing_rows;
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
        Ok::<_, SinkPipelineError>((positions, duplicates, missing_rows, dead_lettered, counts))
    }
    .await;
    match result {
        Ok((positions, duplicates, missing_rows, dead_lettered, counts)) => {
            target.commit().await?;
            for (i, n) in counts.iter().enumerate() {
                m.applied[i].increment(*n);
            }
            Ok(Outcome {
                positions,
                duplicates,
                missing_rows,
                dead_lettered,
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
    producer: &FutureProducer,
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
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.bootstrap_servers)
        .create()
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
