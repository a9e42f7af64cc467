//! BitClone9's Kafka side: topics per table, Avro schemas registered with a Confluent-compatible
//! registry, and an idempotent producer whose deliveries the pipeline awaits in order.
//!
//! ```text
//!   Change ──► EventWriter::prepare (topic, schemas: once per table shape)
//!          ──► EventWriter::send    (encode key + envelope, enqueue) ──► DeliveryFuture
//! ```

pub mod decode;
pub mod encode;
pub mod registry;
pub mod schema;
pub mod security;

use bitclone9_core::{Change, Lsn, Op, SnapshotMark, TableId, TableSchema, TxInfo};
use encode::{EncodeError, SourceInfo};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
pub use security::{
    KafkaContext, KafkaSecurity, RegistryAccess, RegistryAuth, SaslLogin, TlsFiles,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use rdkafka::producer::DeliveryFuture as Delivery;
pub use registry::Registry;

/// A failure on the Kafka side. [`SinkError::is_transient`] tells whether retrying may help.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot reach Kafka at {bootstrap}: {detail}")]
    KafkaUnreachable { bootstrap: String, detail: String },
    #[error("cannot reach the schema registry at {url}: {detail}")]
    RegistryUnreachable { url: String, detail: String },
    #[error("the schema registry refused subject {subject}: {detail}")]
    SchemaRejected { subject: String, detail: String },
    #[error("the new schema of table {table} breaks the {rule} compatibility rule of subject {subject} ({change}), so its events are not sent and the source waits here. Fix one of: make the change compatible (e.g. add the column instead of changing its type); let this subject take it once: PUT {{\"compatibility\": \"NONE\"}} to {registry}/config/{subject}, and set it back after the daemon moves on; or set on_incompatible_schema = \"new_version\" in this source's [topics] to register such changes as new versions by themselves (consumers then need the registry's writer schema)")]
    SchemaIncompatible {
        table: String,
        subject: String,
        rule: String,
        change: String,
        registry: String,
    },
    #[error("cannot create topic {topic}: {detail}")]
    Topic { topic: String, detail: String },
    #[error("cannot produce to topic {topic}: {detail}")]
    Produce { topic: String, detail: String },
    #[error("invalid Kafka client setting: {0}")]
    Config(String),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error(transparent)]
    Template(#[from] schema::TemplateError),
}

impl SinkError {
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SinkError::KafkaUnreachable { .. }
                | SinkError::RegistryUnreachable { .. }
                | SinkError::Produce { .. }
                | SinkError::Topic { .. }
        )
    }
}

/// Kafka and registry connection settings.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    pub registry_url: String,
    /// librdkafka settings for the producer, applied over BitClone9's defaults.
    pub producer: Vec<(String, String)>,
    pub request_timeout: Duration,
    /// TLS and SASL towards the brokers, for every client.
    pub security: KafkaSecurity,
    /// Login and TLS towards the registry.
    pub registry_access: RegistryAccess,
}

/// A producer whose context keeps the brokers' last error.
pub type EventProducer = FutureProducer<KafkaContext>;
/// An admin client whose context keeps the brokers' last error.
pub type KafkaAdmin = AdminClient<KafkaContext>;

impl KafkaSettings {
    /// The base of every client's configuration: the brokers and how to reach them securely.
    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.bootstrap_servers)
            .set("socket.connection.setup.timeout.ms", "10000");
        self.security.apply(&mut cfg);
        cfg
    }

    /// An admin client for topic and group operations.
    pub fn admin(&self) -> Result<KafkaAdmin, SinkError> {
        self.client_config()
            .create_with_context(KafkaContext::default())
            .map_err(|e| SinkError::Config(e.to_string()))
    }

    /// A producer with BitClone9's settings (see [`producer_config`]), and its context (for
    /// [`ping_kafka`]).
    pub fn producer(&self) -> Result<(EventProducer, KafkaContext), SinkError> {
        let context = KafkaContext::default();
        let producer = producer_config(self)
            .create_with_context(context.clone())
            .map_err(|e| SinkError::Config(e.to_string()))?;
        Ok((producer, context))
    }

    /// The registry client for these settings.
    pub fn registry(&self) -> Result<Registry, SinkError> {
        Registry::with_access(
            &self.registry_url,
            &self.registry_access,
            self.request_timeout,
        )
    }
}

/// What a source does when the registry's compatibility rule refuses a table's new schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IncompatibleSchema {
    /// Stop the source before the first event of the new shape, with an error naming the
    /// subject, the change and the fix; the run is retried and goes on once the registry
    /// takes the schema.
    #[default]
    Stop,
    /// Register the schema as a new version anyway (the subject's rule is lifted for that one
    /// registration), log it and count it: nothing stops.
    NewVersion,
}

/// How the topics of one source are named and created.
#[derive(Debug, Clone)]
pub struct TopicSettings {
    pub prefix: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// Topic configs such as `cleanup.policy`.
    pub config: Vec<(String, String)>,
    pub on_incompatible_schema: IncompatibleSchema,
}

impl TopicSettings {
    /// Whether created topics use log compaction (which refuses records without a key).
    pub fn compacted(&self) -> bool {
        self.config
            .iter()
            .any(|(k, v)| k == "cleanup.policy" && v.contains("compact"))
    }

    pub fn topic_for(&self, table: &TableSchema) -> String {
        self.topic_for_id(&table.id)
    }

    pub fn topic_for_id(&self, table: &TableId) -> String {
        format!("{}.{}.{}", self.prefix, table.schema, table.name)
    }
}

/// The producer settings BitClone9 relies on; user settings may tune the rest.
pub fn producer_config(settings: &KafkaSettings) -> ClientConfig {
    let mut cfg = settings.client_config();
    cfg.set("linger.ms", "5")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        // What waits for Kafka is bounded: while the brokers do not answer, reading WAL stops
        // once this much is queued (100,000 records or 64 MB) instead of growing memory.
        .set("queue.buffering.max.messages", "100000")
        .set("queue.buffering.max.kbytes", "65536")
        .set("message.timeout.ms", "120000");
    for (k, v) in &settings.producer {
        cfg.set(k, v);
    }
    // Never overridable: ordered, exactly-once-per-session delivery acknowledged by all replicas.
    cfg.set("enable.idempotence", "true").set("acks", "all");
    cfg
}

/// Where and how one table's events are written.
struct TableTarget {
    /// The shape last prepared; comparing pointers first keeps the per-event check cheap.
    schema: Arc<TableSchema>,
    fingerprint: u64,
    topic: Arc<str>,
    key_schema_id: Option<u32>,
    value_schema_id: u32,
    partitions: i32,
}

/// Turns changes into Kafka records.
pub struct EventWriter {
    producer: EventProducer,
    admin: KafkaAdmin,
    registry: Registry,
    topics: TopicSettings,
    source: SourceInfo,
    targets: HashMap<u32, TableTarget>,
    key_buf: Vec<u8>,
    old_key_buf: Vec<u8>,
    value_buf: Vec<u8>,
    bootstrap: String,
    timeout: Duration,
}

/// Checks that the Kafka cluster answers (metadata request), off the async threads.
pub async fn ping_kafka(
    producer: &EventProducer,
    context: &KafkaContext,
    bootstrap: &str,
    timeout: Duration,
) -> Result<usize, SinkError> {
    let p = producer.clone();
    let unreachable = |detail: String| SinkError::KafkaUnreachable {
        bootstrap: bootstrap.to_string(),
        detail,
    };
    let found = tokio::task::spawn_blocking(move || {
        p.client()
            .fetch_metadata(None, timeout)
            .map(|m| m.brokers().len())
    })
    .await
    .map_err(|e| unreachable(e.to_string()))?;
    found.map_err(|e| {
        // The request only times out; the brokers' own error says why (TLS, login, refused).
        match context.last_error() {
            Some(cause) => {
                let hint = if cause.contains("certificate verify failed") {
                    " (check the CA file of the Kafka TLS settings)"
                } else if cause.contains("Authentication failed") {
                    " (check the SASL mechanism, username and password)"
                } else {
                    ""
                };
                unreachable(format!("{e}; the brokers said: {cause}{hint}"))
            }
            None => unreachable(e.to_string()),
        }
    })
}

impl EventWriter {
    pub async fn connect(
        settings: &KafkaSettings,
        topics: TopicSettings,
        source: SourceInfo,
    ) -> Result<Self, SinkError> {
        let (producer, context) = settings.producer()?;
        let admin = settings.admin()?;
        ping_kafka(
            &producer,
            &context,
            &settings.bootstrap_servers,
            settings.request_timeout,
        )
        .await?;
        let registry = settings.registry()?;
        registry.ping().await?;
        Ok(Self {
            producer,
            admin,
            registry,
            topics,
            source,
            targets: HashMap::new(),
            key_buf: Vec::with_capacity(256),
            old_key_buf: Vec::with_capacity(256),
            value_buf: Vec::with_capacity(4096),
            bootstrap: settings.bootstrap_servers.clone(),
            timeout: settings.request_timeout,
        })
    }

    /// Whether `table` (in this shape) still needs [`prepare`](Self::prepare).
    pub fn needs_prepare(&mut self, table: &Arc<TableSchema>) -> bool {
        match self.targets.get_mut(&table.relation_id) {
            None => true,
            Some(t) if Arc::ptr_eq(&t.schema, table) => false,
            Some(t) if t.fingerprint == table.fingerprint() => {
                // The same shape described again (e.g. snapshot, then stream).
                t.schema = table.clone();
                false
            }
            Some(_) => true,
        }
    }

    /// Creates the table's topic when missing and registers its schemas for the shape of
    /// `change`, its first change of that shape. When the shape changes a column's type, a
    /// shape barrier goes to every partition first (see [`SHAPE_BARRIER_HEADER`]).
    pub async fn prepare(&mut self, change: &Change) -> Result<(), SinkError> {
        let table = &change.table;
        let original = table;
        let topic = self.topics.topic_for(table);
        if self.topics.compacted() && !table.has_key() {
            return Err(SinkError::Config(format!(
                "table {} has no primary key or replica identity index, so its events have no Kafka key and cannot go to the compacted topic {topic}: set cleanup_policy = \"delete\" for this source, give the table a primary key, or exclude it",
                table.id
            )));
        }
        let known = self.targets.values().find(|t| *t.topic == *topic);
        let partitions = match known {
            Some(t) => t.partitions,
            None => self.ensure_topic(&topic).await?,
        };
        let numbered = self.with_known_attnums(table, &topic).await?;
        let table = numbered.as_ref().unwrap_or(table);
        let value = schema::value_schema(table, &topic)?;
        let value_subject = format!("{topic}-value");
        if partitions > 1 && !self.topics.compacted() {
            let before = match self.targets.get(&table.relation_id) {
                Some(t) => Some(schema::described(&t.schema)),
                // The first shape of this run: the one the topic's events had last.
                None => self
                    .registry
                    .latest(&value_subject)
                    .await?
                    .map(|s| schema::described_columns(&s)),
            };
            let retyped = before
                .map(|b| schema::retyped_columns(&b, table))
                .unwrap_or_default();
            // A change the registry refuses stops below, and is retried: no barrier yet.
            if !retyped.is_empty() && !self.refused(&value_subject, &value).await? {
                self.send_shape_barrier(change, &topic, partitions, &retyped)
                    .await?;
            }
        }
        let key_schema_id = match schema::key_schema(table, &topic) {
            Some(s) => Some(
                self.register_checked(table, &format!("{topic}-key"), &s)
                    .await?,
            ),
            None => None,
        };
        let value_schema_id = self.register_checked(table, &value_subject, &value).await?;
        tracing::info!(table = %table.id, topic = %topic, key_schema_id, value_schema_id, "table prepared");
        let table = original;
        self.targets.insert(
            table.relation_id,
            TableTarget {
                schema: table.clone(),
                fingerprint: table.fingerprint(),
                topic: topic.into(),
                key_schema_id,
                value_schema_id,
                partitions,
            },
        );
        Ok(())
    }

    /// `table` with the column numbers its columns lack (none when its relation is gone from
    /// the catalog: changes of a dropped table, sent again after a restart) taken by name from
    /// the latest value schema of its topic, so that it registers the schemas its events had:
    /// a key schema of another id would put its keys on other partitions. `None` when nothing
    /// lacks a number or nothing is known.
    async fn with_known_attnums(
        &self,
        table: &Arc<TableSchema>,
        topic: &str,
    ) -> Result<Option<Arc<TableSchema>>, SinkError> {
        if table.columns.iter().all(|c| c.attnum.is_some()) {
            return Ok(None);
        }
        let Some(latest) = self.registry.latest(&format!("{topic}-value")).await? else {
            return Ok(None);
        };
        let known = schema::attnums_by_name(&latest);
        let mut numbered = TableSchema::clone(table);
        let mut found = false;
        for c in numbered.columns.iter_mut().filter(|c| c.attnum.is_none()) {
            if let Some(n) = known.get(&c.name) {
                c.attnum = Some(*n);
                found = true;
            }
        }
        if found {
            tracing::debug!(table = %table.id, topic, "column numbers taken from the topic's latest schema (the table is not in the catalog)");
        }
        Ok(found.then(|| Arc::new(numbered)))
    }

    /// Whether registering `schema` under `subject` stops the source: the subject does not
    /// hold it, its rule refuses it, and `on_incompatible_schema` is `stop`.
    async fn refused(&self, subject: &str, schema: &str) -> Result<bool, SinkError> {
        Ok(
            self.topics.on_incompatible_schema == IncompatibleSchema::Stop
                && self.registry.lookup(subject, schema).await?.is_none()
                && !self.registry.is_compatible(subject, schema).await?,
        )
    }

    /// Writes a shape barrier to every partition of `topic` and waits until Kafka holds them
    /// all: records without key or value, placed (by their headers) just before `change`, the
    /// first change whose column types differ. A sink applies nothing after a partition's
    /// barrier until every partition reached it, so no event of the old types meets a column
    /// already changed (by the sink, or by an operator's `USING` expression). Waiting before
    /// the new schema is registered means a restart that finds the old schema still
    /// registered writes the barrier again, and one that finds the new one finds the barrier.
    async fn send_shape_barrier(
        &self,
        change: &Change,
        topic: &str,
        partitions: i32,
        retyped: &[(String, String, String)],
    ) -> Result<(), SinkError> {
        let fanout = partitions.to_string();
        let headers = tx_headers(change)
            .insert(Header {
                key: TRUNCATE_FANOUT_HEADER,
                value: Some(&fanout),
            })
            .insert(Header {
                key: SHAPE_BARRIER_HEADER,
                value: Some(if change.streamed() {
                    "streamed"
                } else {
                    "snapshot"
                }),
            })
            .insert(Header {
                key: "bitclone9.schema",
                value: Some(&change.table.id.schema),
            })
            .insert(Header {
                key: "bitclone9.table",
                value: Some(&change.table.id.name),
            });
        let mut deliveries = Vec::with_capacity(partitions as usize);
        for partition in 0..partitions {
            let rec = FutureRecord::<[u8], [u8]>::to(topic)
                .headers(headers.clone())
                .partition(partition);
            deliveries.push(enqueue(&self.producer, rec).await?);
        }
        for d in deliveries {
            let delivered = tokio::time::timeout(KAFKA_STALL_LIMIT, d).await;
            match delivered {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err((e, _)))) => {
                    return Err(SinkError::Produce {
                        topic: topic.to_string(),
                        detail: format!("shape barrier: {e}"),
                    })
                }
                Ok(Err(_)) | Err(_) => {
                    return Err(SinkError::Produce {
                        topic: topic.to_string(),
                        detail: format!(
                            "shape barrier: not acknowledged within {}s",
                            KAFKA_STALL_LIMIT.as_secs()
                        ),
                    })
                }
            }
        }
        let columns: Vec<String> = retyped
            .iter()
            .map(|(c, from, to)| format!("{c} {from} → {to}"))
            .collect();
        metrics::counter!("bitclone9_kafka_shape_barriers_total", "topic" => topic.to_string())
            .increment(1);
        tracing::info!(table = %change.table.id, topic, partitions, lsn = %change.tx.commit_lsn,
            columns = %columns.join(", "), "column types changed: wrote a shape barrier to every partition");
        Ok(())
    }

    /// Registers a schema of `table` under `subject`, checking it against the subject's
    /// compatibility rule first and applying [`IncompatibleSchema`] when it breaks it.
    async fn register_checked(
        &self,
        table: &TableSchema,
        subject: &str,
        schema: &str,
    ) -> Result<u32, SinkError> {
        let blocked = metrics::gauge!("bitclone9_schema_incompatible",
            "connector" => self.source.name.clone(), "subject" => subject.to_string());
        if let Some(id) = self.registry.lookup(subject, schema).await? {
            blocked.set(0.0);
            return Ok(id);
        }
        if self.registry.is_compatible(subject, schema).await? {
            let id = self.registry.register(subject, schema).await?;
            blocked.set(0.0);
            return Ok(id);
        }
        let change = match self.registry.latest(subject).await? {
            Some(previous) => schema::describe_change(&previous, schema),
            None => "a change the registry's rule refuses".to_string(),
        };
        let rule = self
            .registry
            .compatibility(subject)
            .await?
            .unwrap_or_else(|| "registry's".to_string());
        match self.topics.on_incompatible_schema {
            IncompatibleSchema::Stop => {
                blocked.set(1.0);
                Err(SinkError::SchemaIncompatible {
                    table: table.id.to_string(),
                    subject: subject.to_string(),
                    rule,
                    change,
                    registry: self.registry.url().to_string(),
                })
            }
            IncompatibleSchema::NewVersion => {
                let id = self.registry.register_forced(subject, schema).await?;
                blocked.set(0.0);
                metrics::counter!("bitclone9_schema_forced_versions_total",
                    "connector" => self.source.name.clone(), "subject" => subject.to_string())
                .increment(1);
                tracing::warn!(table = %table.id, subject, rule, change, schema_id = id,
                    "registered a new schema version that breaks the subject's compatibility rule (on_incompatible_schema = \"new_version\")");
                Ok(id)
            }
        }
    }

    /// Creates `topic` if it does not exist; returns its partition count.
    async fn ensure_topic(&self, topic: &str) -> Result<i32, SinkError> {
        let mut new = NewTopic::new(
            topic,
            self.topics.partitions,
            TopicReplication::Fixed(self.topics.replication_factor),
        );
        for (k, v) in &self.topics.config {
            new = new.set(k, v);
        }
        let opts = AdminOptions::new().operation_timeout(Some(self.timeout));
        let results =
            self.admin
                .create_topics([&new], &opts)
                .await
                .map_err(|e| SinkError::Topic {
                    topic: topic.to_string(),
                    detail: e.to_string(),
                })?;
        let mut created = false;
        for r in results {
            match r {
                Ok(_) => {
                    created = true;
                    tracing::info!(topic, partitions = self.topics.partitions, "created topic")
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(SinkError::Topic {
                        topic: topic.to_string(),
                        detail: code.to_string(),
                    })
                }
            }
        }
        // A truncate goes to every partition and rows are spread over them by key, so the
        // count must be the topic's whole count. Right after a topic is created (on a broker
        // still loading, notably) metadata may not show it yet, or show it without leaders:
        // ask again until every partition is there, rather than taking a short count.
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let p = self.producer.clone();
            let t = topic.to_string();
            let timeout = self.timeout;
            let seen = tokio::task::spawn_blocking(move || {
                p.client().fetch_metadata(Some(&t), timeout).map(|m| {
                    m.topics().first().map(|t| TopicView {
                        error: t.error().map(|e| RDKafkaErrorCode::from(e).to_string()),
                        leaders: t
                            .partitions()
                            .iter()
                            .map(|p| (p.id(), p.leader()))
                            .collect(),
                    })
                })
            })
            .await
            .map_err(|e| SinkError::Topic {
                topic: topic.to_string(),
                detail: e.to_string(),
            })?
            .map_err(|e| SinkError::KafkaUnreachable {
                bootstrap: self.bootstrap.clone(),
                detail: e.to_string(),
            })?;
            let view = seen.unwrap_or_default();
            let count = view.complete_count().and_then(|n| {
                if created && n < self.topics.partitions {
                    Err(format!(
                        "{n} of the {} partitions created are listed",
                        self.topics.partitions
                    ))
                } else {
                    Ok(n)
                }
            });
            match count {
                Ok(n) => return Ok(n),
                Err(why) if tokio::time::Instant::now() >= deadline => {
                    return Err(SinkError::Topic {
                        topic: topic.to_string(),
                        detail: format!(
                            "its partitions are not all known to the brokers after {:?}: {why}",
                            self.timeout
                        ),
                    })
                }
                Err(why) => {
                    tracing::debug!(topic, %why, "waiting for the topic's metadata");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Encodes `change` and enqueues its records (a delete adds a tombstone; a truncate goes to
    /// every partition), pushing one delivery future per record onto `deliveries`.
    /// [`prepare`](Self::prepare) must have run for the change's table shape.
    pub async fn send(
        &mut self,
        change: &Change,
        now_ms: i64,
        deliveries: &mut Vec<DeliveryFuture>,
    ) -> Result<(), SinkError> {
        let target =
            self.targets
                .get(&change.table.relation_id)
                .ok_or_else(|| SinkError::Produce {
                    topic: change.table.id.to_string(),
                    detail: "table not prepared".into(),
                })?;
        self.key_buf.clear();
        self.value_buf.clear();
        let table = &change.table;
        let has_key = match target.key_schema_id {
            Some(id) => encode::encode_key(
                &mut self.key_buf,
                id,
                table,
                &[change.after.as_ref(), change.before.as_ref()],
            )?,
            None => false,
        };
        encode::encode_envelope(
            &mut self.value_buf,
            target.value_schema_id,
            change,
            &self.source,
            now_ms,
        )?;
        let key = has_key.then_some(self.key_buf.as_slice());
        let topic = target.topic.clone();
        let headers = tx_headers(change);
        if change.op == Op::Truncate {
            if self.topics.compacted() {
                // A truncate has no key, and compacted topics refuse records without one.
                tracing::warn!(table = %table.id, topic = %topic, "truncate not written: the topic is compacted and a truncate event has no key");
                metrics::counter!("bitclone9_kafka_truncates_not_written_total", "topic" => topic.to_string()).increment(1);
                return Ok(());
            }
            // Sinks hold each partition at the truncate until all of them reached it: the
            // count it went to travels with it, so they never count on their own discovery.
            let fanout = target.partitions.to_string();
            let headers = headers.insert(Header {
                key: TRUNCATE_FANOUT_HEADER,
                value: Some(&fanout),
            });
            for partition in 0..target.partitions {
                let rec = FutureRecord::<[u8], [u8]>::to(&topic)
                    .payload(&self.value_buf)
                    .headers(headers.clone())
                    .partition(partition);
                deliveries.push(enqueue(&self.producer, rec).await?);
            }
            return Ok(());
        }
        // An update that changed the key leaves the old key behind: close it with a tombstone.
        self.old_key_buf.clear();
        let old_key = match (change.op, target.key_schema_id, &change.before) {
            (Op::Update, Some(id), Some(before)) => {
                encode::encode_key(&mut self.old_key_buf, id, table, &[Some(before)])?
                    && self.old_key_buf != self.key_buf
            }
            _ => false,
        };
        // The tombstone lets log compaction drop the key.
        let tombstone = match change.op {
            Op::Delete => key,
            Op::Update if old_key => Some(self.old_key_buf.as_slice()),
            _ => None,
        };
        // Headers are copied into librdkafka: clone them only when a second record needs them.
        // A tombstone also names its table, so a consumer can apply it without a value.
        let tombstone_headers = tombstone.map(|_| {
            headers
                .clone()
                .insert(Header {
                    key: "bitclone9.schema",
                    value: Some(&table.id.schema),
                })
                .insert(Header {
                    key: "bitclone9.table",
                    value: Some(&table.id.name),
                })
        });
        let mut rec = FutureRecord::<[u8], [u8]>::to(&topic)
            .payload(&self.value_buf)
            .headers(headers);
        match key {
            Some(k) => rec = rec.key(k),
            // Without a key, a table's events all go to partition 0, so they stay in commit
            // order (a sink applies a keyless table's changes in order, row by row).
            None => rec = rec.partition(0),
        }
        deliveries.push(enqueue(&self.producer, rec).await?);
        if let (Some(k), Some(h)) = (tombstone, tombstone_headers) {
            let rec = FutureRecord::<[u8], [u8]>::to(&topic).key(k).headers(h);
            deliveries.push(enqueue(&self.producer, rec).await?);
        }
        Ok(())
    }

    /// Announces on `table`'s topic that the table was dropped at the source: a truncate (the
    /// table holds no rows any more) at position `lsn` with the header
    /// [`TABLE_DROPPED_HEADER`], written to every partition like any truncate, so that sinks
    /// apply it once every partition reached it. Returns false, writing nothing, when the table
    /// never had a value schema (no topic to announce it on) or its topic is compacted (a
    /// truncate has no key).
    pub async fn send_drop_marker(
        &mut self,
        table: &TableId,
        lsn: Lsn,
        now_ms: i64,
        deliveries: &mut Vec<DeliveryFuture>,
    ) -> Result<bool, SinkError> {
        let topic = self.topics.topic_for_id(table);
        if self.topics.compacted() {
            tracing::warn!(table = %table, topic = %topic, "drop not announced: the topic is compacted and a truncate event has no key");
            return Ok(false);
        }
        let known = self
            .targets
            .values()
            .find(|t| t.schema.id == *table)
            .map(|t| (t.value_schema_id, t.partitions));
        let (schema_id, partitions) = match known {
            Some(k) => k,
            None => {
                let id = match self.registry.latest_value_schema(&topic).await {
                    Ok((id, _)) => id,
                    Err(decode::DecodeError::RegistryUnreachable { url, detail }) => {
                        return Err(SinkError::RegistryUnreachable { url, detail })
                    }
                    Err(e) => {
                        tracing::info!(table = %table, topic = %topic, "drop not announced: {e}");
                        return Ok(false);
                    }
                };
                (id, self.ensure_topic(&topic).await?)
            }
        };
        let change = Change {
            table: Arc::new(TableSchema {
                id: table.clone(),
                relation_id: 0,
                columns: Vec::new(),
            }),
            op: Op::Truncate,
            before: None,
            after: None,
            tx: TxInfo {
                xid: None,
                commit_lsn: lsn,
                commit_time_us: now_ms.saturating_mul(1000),
            },
            seq: 0,
            snapshot: SnapshotMark::No,
        };
        self.value_buf.clear();
        encode::encode_envelope(
            &mut self.value_buf,
            schema_id,
            &change,
            &self.source,
            now_ms,
        )?;
        let fanout = partitions.to_string();
        let headers = tx_headers(&change)
            .insert(Header {
                key: TRUNCATE_FANOUT_HEADER,
                value: Some(&fanout),
            })
            .insert(Header {
                key: TABLE_DROPPED_HEADER,
                value: Some("true"),
            });
        for partition in 0..partitions {
            let rec = FutureRecord::<[u8], [u8]>::to(&topic)
                .payload(&self.value_buf)
                .headers(headers.clone())
                .partition(partition);
            deliveries.push(enqueue(&self.producer, rec).await?);
        }
        tracing::info!(table = %table, topic = %topic, lsn = %lsn, partitions, "announced the table's drop on its topic");
        Ok(true)
    }

    /// Waits until every enqueued record is delivered or `timeout` passes.
    pub fn flush(&self, timeout: Duration) -> Result<(), SinkError> {
        self.producer
            .flush(timeout)
            .map_err(|e| SinkError::Produce {
                topic: "*".into(),
                detail: e.to_string(),
            })
    }
}

/// A topic as one metadata answer shows it: its error, and each partition's id and leader.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TopicView {
    pub error: Option<String>,
    pub leaders: Vec<(i32, i32)>,
}

impl TopicView {
    /// The partition count, once the answer shows the whole topic: no error, and partitions
    /// 0..n each with a leader. Otherwise what is missing, to ask again.
    pub fn complete_count(&self) -> Result<i32, String> {
        if let Some(e) = &self.error {
            return Err(format!("the brokers answer {e}"));
        }
        if self.leaders.is_empty() {
            return Err("no partitions are listed yet".into());
        }
        let n = i32::try_from(self.leaders.len()).map_err(|e| e.to_string())?;
        let mut ids: Vec<i32> = self.leaders.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        if ids != (0..n).collect::<Vec<_>>() {
            return Err(format!("partitions listed are {ids:?}, not 0..{n}"));
        }
        if let Some((id, _)) = self.leaders.iter().find(|(_, leader)| *leader < 0) {
            return Err(format!("partition {id} has no leader yet"));
        }
        Ok(n)
    }
}

/// The header of a truncate record: how many partitions of its topic it was written to (one
/// record each).
pub const TRUNCATE_FANOUT_HEADER: &str = "bitclone9.partitions";

/// The header of a shape barrier: a record with neither key nor value, written to every
/// partition of a table's topic just before the first change whose column types differ from
/// the events before it. Its value is `streamed` or `snapshot` (whether that change was
/// streamed or read by a snapshot); `bitclone9.lsn` and `bitclone9.seq` give that change's
/// position and [`TRUNCATE_FANOUT_HEADER`] the partition count. Consumers that do not know it
/// skip it as a tombstone of no key.
pub const SHAPE_BARRIER_HEADER: &str = "bitclone9.shape_barrier";

/// The header (value `true`) that makes a truncate record the announcement that its table was
/// dropped at the source (see [`EventWriter::send_drop_marker`]).
pub const TABLE_DROPPED_HEADER: &str = "bitclone9.dropped";

/// Headers naming the source transaction, so consumers' logs and dead letters can be traced back
/// to it without decoding the value: `bitclone9.lsn` (commit LSN, `X/Y`), `bitclone9.txid`
/// (absent for snapshot rows) and `bitclone9.seq`.
fn tx_headers(change: &Change) -> OwnedHeaders {
    let lsn = change.tx.commit_lsn.to_string();
    let seq = change.seq.to_string();
    let mut h = OwnedHeaders::new_with_capacity(3)
        .insert(Header {
            key: "bitclone9.lsn",
            value: Some(&lsn),
        })
        .insert(Header {
            key: "bitclone9.seq",
            value: Some(&seq),
        });
    if let Some(xid) = change.tx.xid {
        let xid = xid.to_string();
        h = h.insert(Header {
            key: "bitclone9.txid",
            value: Some(&xid),
        });
    }
    h
}

/// How long a source waits for Kafka to take or acknowledge the next record before it ends its
/// run. While records wait, the walsender has sent WAL the source cannot confirm, and
/// PostgreSQL's shutdown waits for that confirmation: a source that held its replication
/// connection through a Kafka outage would hold up a restart of PostgreSQL.
pub const KAFKA_STALL_LIMIT: Duration = Duration::from_secs(15);

/// Enqueues a record, waiting while librdkafka's queue is full, for [`KAFKA_STALL_LIMIT`] at
/// most.
async fn enqueue(
    producer: &EventProducer,
    mut rec: FutureRecord<'_, [u8], [u8]>,
) -> Result<DeliveryFuture, SinkError> {
    let mut full_since = None;
    loop {
        match producer.send_result(rec) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                let since = *full_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > KAFKA_STALL_LIMIT {
                    return Err(SinkError::Produce {
                        topic: back.topic.to_string(),
                        detail: format!(
                            "the producer's queue stayed full for {}s: Kafka takes no records",
                            KAFKA_STALL_LIMIT.as_secs()
                        ),
                    });
                }
                rec = back;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((e, back)) => {
                return Err(SinkError::Produce {
                    topic: back.topic.to_string(),
                    detail: e.to_string(),
                })
            }
        }
    }
}

#[cfg(test)]
mod topic_view_tests {
    use super::TopicView;

    fn view(error: Option<&str>, leaders: &[(i32, i32)]) -> TopicView {
        TopicView {
            error: error.map(str::to_string),
            leaders: leaders.to_vec(),
        }
    }

    #[test]
    fn a_topic_counts_only_once_every_partition_has_a_leader() {
        // What a broker still loading answers right after the topic was created: never a
        // count of 1 for a topic of 3.
        assert!(view(Some("Broker: Unknown topic or partition"), &[])
            .complete_count()
            .is_err());
        assert!(view(None, &[]).complete_count().is_err());
        assert!(view(
            Some("Broker: Leader not available"),
            &[(0, 1), (1, 1), (2, 1)]
        )
        .complete_count()
        .is_err());
        assert!(view(None, &[(0, 1), (1, -1), (2, 1)])
            .complete_count()
            .is_err());
        assert!(view(None, &[(0, 1), (2, 1)]).complete_count().is_err());
        assert_eq!(
            view(None, &[(2, 1), (0, 1), (1, 1)]).complete_count(),
            Ok(3)
        );
    }
}
