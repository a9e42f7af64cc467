//! The `bitclone9` daemon: configuration, checkpoint store, pipelines and their supervisor.
//! The binary (`main.rs`) is a thin CLI over this library, so tests can drive the same code.

pub mod admin;
pub mod checkpoint;
pub mod memory;
pub use bitclone9_config as config;
pub mod pipeline;
pub mod sink;
pub mod status;
pub mod telemetry;
pub mod verify;

/// The version and the git commit the binary was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("BITCLONE9_GIT_COMMIT"),
    ")"
);

use bitclone9_kafka::{IncompatibleSchema, KafkaSettings, TopicSettings};
use bitclone9_postgres_sink::PostgresTargetConfig;
use bitclone9_postgres_source::PgEndpoint;
use bitclone9_postgres_source::{PostgresSourceConfig, SnapshotMode, TlsMode, TlsSettings};
use config::{Config, OnError, SnapshotSetting, SourceConfig, SslModeSetting};

fn tls_mode(m: SslModeSetting) -> TlsMode {
    match m {
        SslModeSetting::Disable => TlsMode::Disable,
        SslModeSetting::Require => TlsMode::Require,
        SslModeSetting::VerifyCa => TlsMode::VerifyCa,
        SslModeSetting::VerifyFull => TlsMode::VerifyFull,
    }
}

/// Where a source or sink's PostgreSQL is, and how to reach it.
pub fn pg_endpoint(c: config::PgConnection) -> PgEndpoint {
    PgEndpoint {
        host: c.host.to_string(),
        port: c.port,
        user: c.user.to_string(),
        password: c.password.to_string(),
        database: c.database.to_string(),
        connect_timeout: c.connect_timeout,
        tls: TlsSettings {
            mode: tls_mode(c.sslmode),
            root_cert: c.sslrootcert.cloned(),
            client_cert: c.sslcert.cloned(),
            client_key: c.sslkey.cloned(),
        },
    }
}

/// The settings of the sink named `name`.
pub fn sink_settings(name: &str, cfg: &Config) -> Option<sink::SinkPipelineConfig> {
    let k = cfg.sinks.get(name)?;
    Some(sink::SinkPipelineConfig {
        name: name.to_string(),
        kafka: kafka_settings(cfg),
        consumer: k
            .consumer
            .iter()
            .map(|(a, b)| (a.clone(), b.clone()))
            .collect(),
        group: k.group(name),
        subscription: cfg.sink_subscription(name),
        target: PostgresTargetConfig {
            name: name.to_string(),
            endpoint: pg_endpoint(k.connection()),
            create_tables: k.create_tables,
            schema: k.target_schema.clone(),
            on_column_drop: match k.on_column_drop {
                config::ColumnDropSetting::Keep => bitclone9_postgres_sink::ColumnDrop::Keep,
                config::ColumnDropSetting::Drop => bitclone9_postgres_sink::ColumnDrop::Drop,
            },
            on_table_drop: match k.on_table_drop {
                config::TableDropSetting::Keep => bitclone9_postgres_sink::TableDrop::Keep,
                config::TableDropSetting::Drop => bitclone9_postgres_sink::TableDrop::Drop,
            },
        },
        on_error: match k.on_error {
            OnError::DeadLetter => sink::PoisonPolicy::DeadLetter,
            OnError::Stop => sink::PoisonPolicy::Stop,
        },
        dead_letter_topic: k.dead_letter(name),
        max_batch: k.max_batch_events,
        max_batch_bytes: k.max_batch_bytes,
        max_wait: k.max_batch_wait,
        apply_concurrency: k.apply_concurrency,
    })
}

/// The Kafka settings of a configuration.
pub fn kafka_settings(cfg: &Config) -> KafkaSettings {
    KafkaSettings {
        bootstrap_servers: cfg.kafka.bootstrap_servers.clone(),
        registry_url: cfg.kafka.schema_registry_url.clone(),
        producer: cfg
            .kafka
            .producer
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        request_timeout: cfg.kafka.request_timeout,
        security: bitclone9_kafka::KafkaSecurity {
            tls: cfg.kafka.tls.clone(),
            sasl: cfg.kafka.sasl.as_ref().map(|s| bitclone9_kafka::SaslLogin {
                mechanism: s.mechanism.name().to_string(),
                username: s.username.clone(),
                password: s.password.expose().to_string(),
            }),
        },
        registry_access: {
            let r = &cfg.kafka.schema_registry;
            bitclone9_kafka::RegistryAccess {
                auth: match (&r.username, &r.password, &r.token) {
                    (Some(username), Some(password), _) => bitclone9_kafka::RegistryAuth::Basic {
                        username: username.clone(),
                        password: password.expose().to_string(),
                    },
                    (_, _, Some(token)) => {
                        bitclone9_kafka::RegistryAuth::Bearer(token.expose().to_string())
                    }
                    _ => bitclone9_kafka::RegistryAuth::None,
                },
                tls: r.tls.clone(),
            }
        },
    }
}

/// The source connector's settings for the source named `name`.
pub fn source_settings(name: &str, s: &SourceConfig) -> PostgresSourceConfig {
    PostgresSourceConfig {
        name: name.to_string(),
        endpoint: pg_endpoint(s.connection()),
        slot: s.slot_name(name),
        publication: s.publication_name(name),
        include: s.include.clone(),
        exclude: s.exclude.clone(),
        snapshot: match s.snapshot {
            SnapshotSetting::Initial => SnapshotMode::Initial,
            SnapshotSetting::Never => SnapshotMode::Never,
        },
        heartbeat_interval: s.heartbeat_interval,
        status_interval: s.status_interval,
        new_table_check_interval: s.new_table_check_interval,
        replica_identity_full: s.replica_identity_full,
        stream_large_transactions: s.stream_large_transactions,
        logical_decoding_work_mem: s.logical_decoding_work_mem.clone(),
        // The running daemon spools under its state_dir (`spool_dir`); this is for commands
        // that never stream.
        spool_dir: std::env::temp_dir().join(format!("bitclone9-spool-{name}")),
        ddl_trigger: s.ddl_trigger,
    }
}

/// Where the source named `name` spools streamed transactions: under the daemon's state_dir.
pub fn spool_dir(state_dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    state_dir.join("spool").join(name)
}

/// How the source named `name` names and creates its topics.
pub fn topic_settings(name: &str, s: &SourceConfig) -> TopicSettings {
    let mut config: Vec<(String, String)> =
        vec![("cleanup.policy".into(), s.topics.cleanup_policy.clone())];
    config.extend(s.topics.config.iter().map(|(k, v)| (k.clone(), v.clone())));
    TopicSettings {
        prefix: s.prefix(name),
        partitions: s.topics.partitions,
        replication_factor: s.topics.replication_factor,
        config,
        on_incompatible_schema: match s.topics.on_incompatible_schema {
            crate::config::IncompatibleSchemaSetting::Stop => IncompatibleSchema::Stop,
            crate::config::IncompatibleSchemaSetting::NewVersion => IncompatibleSchema::NewVersion,
        },
    }
}
