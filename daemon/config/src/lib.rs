//! The one TOML file that configures a BitClone9 daemon.
//!
//! Loading goes: read → parse TOML → interpolate `${VAR}` in strings from the environment →
//! deserialize into typed structs (unknown keys rejected) → check values. Every error names the
//! file, the key path and what was expected, so a bad file is fixed in one look.

use bitclone9_kafka::TlsFiles;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: not valid TOML: {message}")]
    Syntax { file: PathBuf, message: String },
    #[error("{file}: at `{path}`: {message}")]
    Invalid {
        file: PathBuf,
        path: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkConfig>,
    /// Export of spans over OTLP (`[telemetry]`); none when absent.
    pub telemetry: Option<TelemetryConfig>,
    /// Problems worth a warning but not a refusal (filled by `load`).
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// Where `bitclone9 run` sends its spans (source batches, sink batches).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// An OTLP/HTTP (protobuf) endpoint, e.g. `http://127.0.0.1:4318`; `/v1/traces` is added
    /// unless the URL already ends with it.
    pub otlp_endpoint: String,
    /// The `service.name` resource attribute.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// HTTP headers sent with every export (e.g. an API key).
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// The share of traces kept, from 0 to 1.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
}

/// A password, token or header value from the configuration. It prints as `<redacted>`, so a
/// `{:?}` of the configuration never shows one; `expose` is the only way to the value.
#[derive(Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

fn default_service_name() -> String {
    "bitclone9".into()
}
fn default_sample_ratio() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Where the checkpoint store (RocksDB) lives.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub log_format: LogFormat,
    /// A `tracing` filter such as `info` or `info,bitclone9=debug`.
    #[serde(default = "default_log_level")]
    pub log_level: String,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            state_dir: default_state_dir(),
            log_format: LogFormat::Text,
            log_level: default_log_level(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/bitclone9")
}
fn default_log_level() -> String {
    "info".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin endpoint (`/metrics`, `/healthz`, `/readyz`, `/status`).
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Bearer token the endpoint requires (all paths but `/healthz`); mandatory off loopback.
    #[serde(default)]
    pub token: Option<Secret>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token: None,
        }
    }
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9187))
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// Base URL of the Confluent-compatible schema registry API.
    pub schema_registry_url: String,
    /// librdkafka producer settings passed through (e.g. `"linger.ms" = "10"`).
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// TLS towards the brokers (`[kafka.tls]`); present = on.
    pub tls: Option<TlsFiles>,
    /// SASL login towards the brokers (`[kafka.sasl]`).
    pub sasl: Option<SaslConfig>,
    /// Login and TLS towards the schema registry (`[kafka.schema_registry]`).
    #[serde(default)]
    pub schema_registry: RegistryConfig,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SaslConfig {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: Secret,
}

/// How to log into the schema registry: basic auth (`username`/`password`) or a bearer `token`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub token: Option<Secret>,
    pub tls: Option<TlsFiles>,
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Postgres,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SslModeSetting {
    #[default]
    Disable,
    Require,
    VerifyCa,
    VerifyFull,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotSetting {
    #[default]
    Initial,
    Never,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    #[serde(rename = "type")]
    pub kind: SourceKind,
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    pub user: String,
    #[serde(default)]
    pub password: Secret,
    pub database: String,
    /// TLS: `disable`, `require`, `verify-ca` or `verify-full` (libpq's meanings).
    #[serde(default)]
    pub sslmode: SslModeSetting,
    /// CA certificate(s) (PEM) that sign the server's certificate.
    pub sslrootcert: Option<PathBuf>,
    /// Client certificate and PKCS#8 key (PEM), both or neither.
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    /// Replication slot; default `bitclone9_<source name>`.
    pub slot: Option<String>,
    /// Publication; default `bitclone9_<source name>`.
    pub publication: Option<String>,
    /// Tables to capture, as `schema.table` patterns with `*` and `?`.
    #[serde(default = "default_include")]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub snapshot: SnapshotSetting,
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    #[serde(default = "default_status_interval", with = "humantime_serde")]
    pub status_interval: Duration,
    /// How often the catalog is checked for new tables that match `include`/`exclude` (added to
    /// the publication and read while streaming goes on); "0s" checks only at start.
    #[serde(default = "default_new_table_check", with = "humantime_serde")]
    pub new_table_check_interval: Duration,
    /// Set REPLICA IDENTITY FULL on matching tables without a primary key or replica identity
    /// (they are left out with a warning otherwise).
    #[serde(default)]
    pub replica_identity_full: bool,
    /// Have PostgreSQL 14+ stream a transaction that outgrows `logical_decoding_work_mem`
    /// while it runs (spooled under state_dir until it commits); `false` (the default, faster
    /// as measured: README, Performance) has the server send each whole at its commit.
    #[serde(default)]
    pub stream_large_transactions: bool,
    /// The replication session's `logical_decoding_work_mem` (e.g. "64MB"): how much of a
    /// transaction PostgreSQL holds in memory before streaming it; the server's setting if unset.
    pub logical_decoding_work_mem: Option<String>,
    /// Install an event trigger in the source database (needs a superuser once) that notes
    /// each CREATE/DROP/ALTER TABLE in the WAL: new tables are then added at once.
    #[serde(default)]
    pub ddl_trigger: bool,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Topics are `<topic_prefix>.<schema>.<table>`; default the source name.
    pub topic_prefix: Option<String>,
    #[serde(default)]
    pub topics: TopicConfig,
}

fn default_pg_port() -> u16 {
    5432
}
fn default_include() -> Vec<String> {
    vec!["public.*".into()]
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(10)
}
fn default_new_table_check() -> Duration {
    Duration::from_secs(30)
}
fn default_status_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    #[serde(default = "one")]
    pub partitions: i32,
    #[serde(default = "one")]
    pub replication_factor: i32,
    /// `delete` or `compact` (or `compact,delete`).
    #[serde(default = "default_cleanup")]
    pub cleanup_policy: String,
    /// Other topic configs for created topics (e.g. `"retention.ms" = "604800000"`).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// What to do when the registry's compatibility rule refuses a table's new schema.
    #[serde(default)]
    pub on_incompatible_schema: IncompatibleSchemaSetting,
}

/// `on_column_drop`: `"keep"` (the default) or `"drop"`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ColumnDropSetting {
    /// Keep the target column and its values; it takes NULL from then on.
    #[default]
    Keep,
    /// Drop the target column too.
    Drop,
}

/// `on_table_drop`: `"keep"` (the default) or `"drop"`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TableDropSetting {
    /// Keep the target table with the rows it had when the source table was dropped.
    #[default]
    Keep,
    /// Drop the target table too.
    Drop,
}

/// `on_incompatible_schema`: `"stop"` (the default) or `"new_version"`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum IncompatibleSchemaSetting {
    /// Stop the source with an error naming the subject, the change and the fix.
    #[default]
    Stop,
    /// Register the schema as a new version although it breaks the subject's rule.
    NewVersion,
}

impl Default for TopicConfig {
    fn default() -> Self {
        Self {
            partitions: 1,
            replication_factor: 1,
            cleanup_policy: default_cleanup(),
            config: BTreeMap::new(),
            on_incompatible_schema: IncompatibleSchemaSetting::Stop,
        }
    }
}

fn one() -> i32 {
    1
}
fn default_cleanup() -> String {
    "delete".into()
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    Postgres,
}

/// What a sink does with an event the target refuses after retries.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Write it to the dead-letter topic with headers naming the error, and go on.
    #[default]
    DeadLetter,
    /// Stop the sink (it retries with backoff, applying nothing past the event).
    Stop,
}

/// A sink: Kafka topics applied to a target PostgreSQL database.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    #[serde(rename = "type")]
    pub kind: SinkKind,
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    pub user: String,
    #[serde(default)]
    pub password: Secret,
    pub database: String,
    #[serde(default)]
    pub sslmode: SslModeSetting,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Consume every topic of this configured source (`<its topic_prefix>.*`).
    pub source: Option<String>,
    /// Or: these topics.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Or: every topic matching this regular expression (must start with `^`).
    pub topic_pattern: Option<String>,
    /// Kafka consumer group; default `bitclone9-sink-<name>`.
    pub group_id: Option<String>,
    /// Create missing target tables from the event schemas.
    #[serde(default = "yes")]
    pub create_tables: bool,
    /// Write every table into this schema instead of its source schema.
    pub target_schema: Option<String>,
    /// What a column dropped at the source does to its target column.
    #[serde(default)]
    pub on_column_drop: ColumnDropSetting,
    /// What a table dropped at the source does to its target table.
    #[serde(default)]
    pub on_table_drop: TableDropSetting,
    #[serde(default)]
    pub on_error: OnError,
    /// Dead-letter topic; default `bitclone9.dead-letter.<name>`.
    pub dead_letter_topic: Option<String>,
    /// Most events applied in one target transaction.
    #[serde(default = "default_max_batch")]
    pub max_batch_events: usize,
    /// Most bytes of Kafka records (keys and values, as fetched) in one batch: with large rows
    /// a batch ends here before `max_batch_events`, so the sink's memory stays bounded.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// How long a batch waits to fill once its first event arrived.
    #[serde(default = "default_batch_wait", with = "humantime_serde")]
    pub max_batch_wait: Duration,
    /// Target sessions applying disjoint sets of partitions at once (1 to 16). Above 1, the
    /// changes of different partitions commit in separate transactions; keep 1 when the target
    /// has unique constraints besides the key that rows of different partitions can contend for.
    #[serde(default = "one_usize")]
    pub apply_concurrency: usize,
    /// librdkafka consumer settings passed through.
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
}

fn one_usize() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_max_batch() -> usize {
    10_000
}
fn default_max_batch_bytes() -> usize {
    8 << 20
}
fn default_batch_wait() -> Duration {
    Duration::from_millis(20)
}

impl SinkConfig {
    pub fn group(&self, sink: &str) -> String {
        self.group_id
            .clone()
            .unwrap_or_else(|| format!("bitclone9-sink-{sink}"))
    }
    pub fn dead_letter(&self, sink: &str) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("bitclone9.dead-letter.{sink}"))
    }
}

impl SourceConfig {
    pub fn slot_name(&self, source: &str) -> String {
        self.slot
            .clone()
            .unwrap_or_else(|| format!("bitclone9_{}", source.replace('-', "_")))
    }
    pub fn publication_name(&self, source: &str) -> String {
        self.publication
            .clone()
            .unwrap_or_else(|| format!("bitclone9_{}", source.replace('-', "_")))
    }
    pub fn prefix(&self, source: &str) -> String {
        self.topic_prefix
            .clone()
            .unwrap_or_else(|| source.to_string())
    }
}

impl Config {
    /// Reads, interpolates, parses and checks `file`.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(file, &text, &|name| std::env::var(name).ok())?;
        config.warnings = world_readable_secrets(file, &text);
        config.warnings.extend(config.credentials_in_clear());
        Ok(config)
    }

    /// Logins the configuration would send unencrypted over the network.
    pub fn credentials_in_clear(&self) -> Vec<String> {
        let k = &self.kafka;
        let mut out = Vec::new();
        if let Some(sasl) = &k.sasl {
            if k.tls.is_none() && sasl.mechanism == SaslMechanism::Plain {
                out.push("kafka.sasl: PLAIN without [kafka.tls] sends the Kafka password unencrypted: add [kafka.tls], or use a SCRAM mechanism".to_string());
            }
        }
        let r = &k.schema_registry;
        if (r.password.is_some() || r.token.is_some())
            && k.schema_registry_url.starts_with("http://")
        {
            out.push(format!("kafka.schema_registry: the registry login goes unencrypted to {}: use an https:// schema_registry_url", k.schema_registry_url));
        }
        out
    }

    /// Parses `text` (from `file`, for messages), looking up `${VAR}`s with `env`.
    pub fn parse(
        file: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        interpolate(&mut value, &mut Vec::new(), env).map_err(|(path, message)| {
            ConfigError::Invalid {
                file: file.to_path_buf(),
                path,
                message,
            }
        })?;
        let config: Config =
            serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Invalid {
                file: file.to_path_buf(),
                path: e.path().to_string(),
                message: with_example(&e.inner().to_string()),
            })?;
        config
            .check()
            .map_err(|(path, message)| ConfigError::Invalid {
                file: file.to_path_buf(),
                path,
                message,
            })?;
        Ok(config)
    }

    /// TLS files that are not there, half a client certificate, half a login.
    fn check_kafka_security(&self) -> Result<(), (String, String)> {
        let k = &self.kafka;
        if let Some(tls) = &k.tls {
            check_tls_files(tls, "kafka.tls")?;
        }
        if let Some(sasl) = &k.sasl {
            if sasl.username.is_empty() || sasl.password.expose().is_empty() {
                return Err((
                    "kafka.sasl".into(),
                    "a SASL login needs a non-empty username and password".into(),
                ));
            }
        }
        let r = &k.schema_registry;
        if r.token.is_some() && (r.username.is_some() || r.password.is_some()) {
            return Err((
                "kafka.schema_registry.token".into(),
                "give either a bearer token or a username and password, not both".into(),
            ));
        }
        if r.username.is_some() != r.password.is_some() {
            return Err((
                "kafka.schema_registry".into(),
                "basic auth needs both username and password".into(),
            ));
        }
        if let Some(tls) = &r.tls {
            let at = "kafka.schema_registry.tls";
            check_tls_files(tls, at)?;
            if tls.key_password.is_some() {
                return Err((format!("{at}.key_password"), "the registry's client key must be an unencrypted PKCS#8 PEM file; key_password is for Kafka only".into()));
            }
            if !k.schema_registry_url.starts_with("https://") {
                return Err((
                    at.into(),
                    format!(
                        "TLS settings need an https:// schema_registry_url, got {:?}",
                        k.schema_registry_url
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Value checks serde cannot express.
    fn check(&self) -> Result<(), (String, String)> {
        let name_ok = |s: &str, extra: &[char]| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || extra.contains(&c))
        };
        if !self.admin.listen.ip().is_loopback()
            && self
                .admin
                .token
                .as_ref()
                .is_none_or(|t| t.expose().is_empty())
        {
            return Err((
                "admin.token".into(),
                format!(
                    "a token is required when admin.listen ({}) is not a loopback address",
                    self.admin.listen
                ),
            ));
        }
        if self.kafka.bootstrap_servers.trim().is_empty() {
            return Err((
                "kafka.bootstrap_servers".into(),
                "expected host:port[,host:port...], got an empty string".into(),
            ));
        }
        if !(self.kafka.schema_registry_url.starts_with("http://")
            || self.kafka.schema_registry_url.starts_with("https://"))
        {
            return Err((
                "kafka.schema_registry_url".into(),
                format!(
                    "expected an http:// or https:// URL, got {:?}",
                    self.kafka.schema_registry_url
                ),
            ));
        }
        self.check_kafka_security()?;
        if let Some(t) = &self.telemetry {
            if !(t.otlp_endpoint.starts_with("http://") || t.otlp_endpoint.starts_with("https://"))
            {
                return Err((
                    "telemetry.otlp_endpoint".into(),
                    format!(
                        "expected an http:// or https:// URL of an OTLP/HTTP receiver, got {:?}",
                        t.otlp_endpoint
                    ),
                ));
            }
            if !(0.0..=1.0).contains(&t.sample_ratio) {
                return Err((
                    "telemetry.sample_ratio".into(),
                    format!("expected a share from 0 to 1, got {}", t.sample_ratio),
                ));
            }
        }
        for (name, s) in &self.sources {
            let at = |key: &str| format!("sources.{name}.{key}");
            if !name_ok(name, &['-']) {
                return Err((
                    format!("sources.{name}"),
                    "source names may use letters, digits, '_' and '-' only".into(),
                ));
            }
            let slot = s.slot_name(name);
            if slot.len() > 63
                || !slot
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err((at("slot"), format!("expected at most 63 lower-case letters, digits or '_' (a PostgreSQL slot name), got {slot:?}")));
            }
            if s.publication_name(name).is_empty() {
                return Err((
                    at("publication"),
                    "expected a publication name, got an empty string".into(),
                ));
            }
            let prefix = s.prefix(name);
            if !name_ok(&prefix, &['-', '.']) {
                return Err((at("topic_prefix"), format!("expected letters, digits, '.', '_' or '-' (a Kafka topic prefix), got {prefix:?}")));
            }
            if s.include.is_empty() {
                return Err((
                    at("include"),
                    "expected at least one schema.table pattern".into(),
                ));
            }
            for (i, p) in s.include.iter().chain(&s.exclude).enumerate() {
                if !p.contains('.') {
                    let key = if i < s.include.len() {
                        "include"
                    } else {
                        "exclude"
                    };
                    return Err((
                        at(key),
                        format!("expected schema.table patterns such as \"public.*\", got {p:?}"),
                    ));
                }
            }
            check_connection(&s.connection(), &at)?;
            if let Some(mem) = &s.logical_decoding_work_mem {
                let digits = mem.trim_end_matches(|c: char| c.is_ascii_alphabetic());
                let unit = &mem[digits.len()..];
                let amount: u64 = digits.parse().unwrap_or(0);
                // PostgreSQL takes 64kB at the least.
                let kb = match unit {
                    "kB" => amount,
                    "MB" => amount.saturating_mul(1 << 10),
                    "GB" => amount.saturating_mul(1 << 20),
                    _ => 0,
                };
                if kb < 64 {
                    return Err((
                        at("logical_decoding_work_mem"),
                        format!("expected an amount of at least 64kB in kB, MB or GB, such as \"64MB\", got {mem:?}"),
                    ));
                }
            }
            if s.topics.partitions < 1 {
                return Err((
                    at("topics.partitions"),
                    format!("expected at least 1, got {}", s.topics.partitions),
                ));
            }
            if s.topics.replication_factor < 1 {
                return Err((
                    at("topics.replication_factor"),
                    format!("expected at least 1, got {}", s.topics.replication_factor),
                ));
            }
            let policies: Vec<&str> = s.topics.cleanup_policy.split(',').map(str::trim).collect();
            if policies.iter().any(|p| *p != "delete" && *p != "compact") {
                return Err((
                    at("topics.cleanup_policy"),
                    format!(
                        "expected \"delete\", \"compact\" or \"compact,delete\", got {:?}",
                        s.topics.cleanup_policy
                    ),
                ));
            }
            if s.heartbeat_interval.is_zero() || s.status_interval.is_zero() {
                return Err((
                    at(if s.heartbeat_interval.is_zero() {
                        "heartbeat_interval"
                    } else {
                        "status_interval"
                    }),
                    "expected a duration above zero, such as \"10s\"".into(),
                ));
            }
        }
        for (name, k) in &self.sinks {
            let at = |key: &str| format!("sinks.{name}.{key}");
            if !name_ok(name, &['-']) {
                return Err((
                    format!("sinks.{name}"),
                    "sink names may use letters, digits, '_' and '-' only".into(),
                ));
            }
            if self.sources.contains_key(name) {
                return Err((
                    format!("sinks.{name}"),
                    "a source has the same name: connector names must be unique".into(),
                ));
            }
            let ways = usize::from(k.source.is_some())
                + usize::from(!k.topics.is_empty())
                + usize::from(k.topic_pattern.is_some());
            if ways != 1 {
                return Err((
                    at("source"),
                    "give exactly one of source (a configured source's topics), topics (a list) or topic_pattern (a regular expression)".into(),
                ));
            }
            if let Some(src) = &k.source {
                if !self.sources.contains_key(src) {
                    return Err((
                        at("source"),
                        format!(
                            "no source named {src:?} is configured (known: {})",
                            self.sources.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
            }
            if let Some(p) = &k.topic_pattern {
                if !p.starts_with('^') {
                    return Err((
                        at("topic_pattern"),
                        format!("expected a regular expression starting with ^, got {p:?}"),
                    ));
                }
            }
            if k.max_batch_events == 0 {
                return Err((at("max_batch_events"), "expected at least 1".into()));
            }
            if k.max_batch_bytes < 1024 {
                return Err((
                    at("max_batch_bytes"),
                    format!("expected at least 1024 (bytes), got {}", k.max_batch_bytes),
                ));
            }
            if !(1..=16).contains(&k.apply_concurrency) {
                return Err((
                    at("apply_concurrency"),
                    format!("expected 1 to 16, got {}", k.apply_concurrency),
                ));
            }
            check_connection(&k.connection(), &at)?;
        }
        Ok(())
    }

    /// The topics (or `^pattern`) the sink `name` subscribes to.
    pub fn sink_subscription(&self, name: &str) -> Vec<String> {
        let Some(k) = self.sinks.get(name) else {
            return Vec::new();
        };
        if let Some(src) = k
            .source
            .as_ref()
            .and_then(|s| self.sources.get(s).map(|c| (s, c)))
        {
            let prefix = src.1.prefix(src.0).replace('.', "\\.");
            return vec![format!("^{prefix}\\..*")];
        }
        if let Some(p) = &k.topic_pattern {
            return vec![p.clone()];
        }
        k.topics.clone()
    }
}

/// Serde's message (without the line break toml ends it with), with an example of the expected
/// form where it gives none: durations and the admin address (an IP address, not a host name).
fn with_example(message: &str) -> String {
    let message = message.trim_end();
    if message.contains("expected a duration") && !message.contains("such as") {
        message.replacen(
            "expected a duration",
            "expected a duration such as \"10s\" or \"500ms\"",
            1,
        )
    } else if message.contains("socket address") {
        format!("{message}: write IP:port, such as \"127.0.0.1:9187\" (not a host name)")
    } else {
        message.to_string()
    }
}

/// The PostgreSQL connection keys sources and sinks share.
#[derive(Debug, Clone, Copy)]
pub struct PgConnection<'a> {
    pub host: &'a str,
    pub port: u16,
    pub user: &'a str,
    pub password: &'a str,
    pub database: &'a str,
    pub sslmode: SslModeSetting,
    pub sslrootcert: Option<&'a PathBuf>,
    pub sslcert: Option<&'a PathBuf>,
    pub sslkey: Option<&'a PathBuf>,
    pub connect_timeout: Duration,
}

macro_rules! connection_of {
    ($t:ty) => {
        impl $t {
            pub fn connection(&self) -> PgConnection<'_> {
                PgConnection {
                    host: &self.host,
                    port: self.port,
                    user: &self.user,
                    password: self.password.expose(),
                    database: &self.database,
                    sslmode: self.sslmode,
                    sslrootcert: self.sslrootcert.as_ref(),
                    sslcert: self.sslcert.as_ref(),
                    sslkey: self.sslkey.as_ref(),
                    connect_timeout: self.connect_timeout,
                }
            }
        }
    };
}
connection_of!(SourceConfig);
connection_of!(SinkConfig);

/// TLS settings that cannot work: verify-full against an IP address, half a client
/// certificate, PEM files that are not there. `at` turns a key into its path in the file.
fn check_connection(c: &PgConnection, at: &dyn Fn(&str) -> String) -> Result<(), (String, String)> {
    if c.sslmode == SslModeSetting::VerifyFull && c.host.parse::<std::net::IpAddr>().is_ok() {
        return Err((at("host"), format!("sslmode = \"verify-full\" checks the certificate against a host name, and BitClone9's connections (the replication one among them) cannot check it against an IP address ({}): use the server's DNS name, or sslmode = \"verify-ca\"", c.host)));
    }
    if c.sslcert.is_some() != c.sslkey.is_some() {
        return Err((
            at(if c.sslcert.is_some() {
                "sslkey"
            } else {
                "sslcert"
            }),
            "sslcert and sslkey go together: give both or neither".into(),
        ));
    }
    for (key, path) in [
        ("sslrootcert", c.sslrootcert),
        ("sslcert", c.sslcert),
        ("sslkey", c.sslkey),
    ] {
        if let Some(p) = path.filter(|p| !p.is_file()) {
            return Err((
                at(key),
                format!(
                    "expected a readable PEM file, but {} does not exist",
                    p.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The PEM files of a TLS section must exist; a client certificate needs its key.
fn check_tls_files(tls: &TlsFiles, at: &str) -> Result<(), (String, String)> {
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        return Err((
            format!(
                "{at}.{}",
                if tls.cert_file.is_some() {
                    "key_file"
                } else {
                    "cert_file"
                }
            ),
            "cert_file and key_file go together: give both or neither".into(),
        ));
    }
    for (key, path) in [
        ("ca_file", &tls.ca_file),
        ("cert_file", &tls.cert_file),
        ("key_file", &tls.key_file),
    ] {
        if let Some(p) = path.as_ref().filter(|p| !p.is_file()) {
            return Err((
                format!("{at}.{key}"),
                format!(
                    "expected a readable PEM file, but {} does not exist",
                    p.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Warns when `file` can be read by every user and writes a secret in clear (rather than as
/// `${VAR}`): `sources.*.password`, `sinks.*.password`, `admin.token`, Kafka and registry
/// passwords and tokens, or a producer setting named like a password.
fn world_readable_secrets(file: &Path, text: &str) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let readable_by_all =
        std::fs::metadata(file).is_ok_and(|m| m.permissions().mode() & 0o004 != 0);
    let Ok(value) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    if !readable_by_all {
        return Vec::new();
    }
    let literal = |v: Option<&toml::Value>| {
        v.and_then(toml::Value::as_str)
            .is_some_and(|s| !s.is_empty() && !s.contains("${"))
    };
    let mut keys = Vec::new();
    if let Some(sources) = value.get("sources").and_then(toml::Value::as_table) {
        for (name, s) in sources {
            if literal(s.get("password")) {
                keys.push(format!("sources.{name}.password"));
            }
        }
    }
    if let Some(sinks) = value.get("sinks").and_then(toml::Value::as_table) {
        for (name, s) in sinks {
            if literal(s.get("password")) {
                keys.push(format!("sinks.{name}.password"));
            }
        }
    }
    if literal(value.get("admin").and_then(|a| a.get("token"))) {
        keys.push("admin.token".into());
    }
    let at = |path: &[&str]| {
        let (first, rest) = path.split_first()?;
        rest.iter()
            .try_fold(value.get(*first)?, |v, k| v.get(*k))
            .filter(|v| literal(Some(v)))
            .map(|_| path.join("."))
    };
    if let Some(h) = value
        .get("telemetry")
        .and_then(|t| t.get("headers"))
        .and_then(toml::Value::as_table)
    {
        // Export headers exist to carry credentials (API keys, tokens): any literal one counts.
        for (k, v) in h {
            if literal(Some(v)) {
                keys.push(format!("telemetry.headers.\"{k}\""));
            }
        }
    }
    keys.extend(
        [
            &["kafka", "sasl", "password"][..],
            &["kafka", "tls", "key_password"],
            &["kafka", "schema_registry", "password"],
            &["kafka", "schema_registry", "token"],
        ]
        .into_iter()
        .filter_map(at),
    );
    if let Some(p) = value
        .get("kafka")
        .and_then(|k| k.get("producer"))
        .and_then(toml::Value::as_table)
    {
        for (k, v) in p {
            if (k.contains("password") || k.contains("secret")) && literal(Some(v)) {
                keys.push(format!("kafka.producer.\"{k}\""));
            }
        }
    }
    keys.into_iter()
        .map(|k| format!("{} is readable by every user and holds a secret in clear at `{k}`: run chmod o-r on it, or write the value as ${{VAR}} and set VAR in a root-only EnvironmentFile", file.display()))
        .collect()
}

/// The value of `${name}`: an environment variable, `file:PATH` (the file's content), or
/// `credential:NAME` (a systemd credential, `$CREDENTIALS_DIRECTORY/NAME`). Trailing newlines of
/// files are dropped.
fn resolve_reference(name: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let read = |path: std::path::PathBuf, what: &str| {
        std::fs::read_to_string(&path)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
            .map_err(|e| {
                format!(
                    "cannot read {what} {} (referenced as ${{{name}}}): {e}",
                    path.display()
                )
            })
    };
    if let Some(file) = name.strip_prefix("file:") {
        return read(PathBuf::from(file), "file");
    }
    if let Some(cred) = name.strip_prefix("credential:") {
        let dir = env("CREDENTIALS_DIRECTORY").ok_or_else(|| {
            format!("${{{name}}} needs systemd's CREDENTIALS_DIRECTORY (LoadCredential={cred}:... in the unit), which is not set")
        })?;
        return read(PathBuf::from(dir).join(cred), "credential");
    }
    env(name).ok_or_else(|| {
        format!("environment variable {name} is not set (referenced as ${{{name}}})")
    })
}

/// Replaces `${VAR}` in every string with the environment variable's value (`$${` for a literal
/// `${`). Errors carry the key path.
fn interpolate(
    value: &mut toml::Value,
    path: &mut Vec<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    match value {
        toml::Value::String(s) if s.contains("${") => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(i) = rest.find("${") {
                if i > 0 && rest.as_bytes()[i - 1] == b'$' {
                    out.push_str(&rest[..i - 1]);
                    out.push_str("${");
                    rest = &rest[i + 2..];
                    continue;
                }
                out.push_str(&rest[..i]);
                let end = rest[i..].find('}').ok_or_else(|| {
                    (
                        path.join("."),
                        "unterminated ${ in string (write $${ for a literal ${)".to_string(),
                    )
                })?;
                let name = &rest[i + 2..i + end];
                let v = resolve_reference(name, env).map_err(|m| (path.join("."), m))?;
                out.push_str(&v);
                rest = &rest[i + end + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                path.push(k.clone());
                interpolate(v, path, env)?;
                path.pop();
            }
        }
        toml::Value::Array(a) => {
            for (i, v) in a.iter_mut().enumerate() {
                path.push(i.to_string());
                interpolate(v, path, env)?;
                path.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[daemon]
state_dir = "/tmp/x"
[kafka]
bootstrap_servers = "127.0.0.1:9092"
schema_registry_url = "http://127.0.0.1:8081/apis/ccompat/v7"
[sources.demo]
type = "postgres"
host = "127.0.0.1"
user = "u"
password = "${PGPASS}"
database = "shop"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text, &|n| {
            (n == "PGPASS").then(|| "s3cret".to_string())
        })
    }

    #[test]
    fn good_config_with_defaults_and_interpolation() {
        let c = parse(GOOD).expect("valid");
        let s = &c.sources["demo"];
        assert_eq!(s.password.expose(), "s3cret");
        assert_eq!(s.port, 5432);
        assert_eq!(s.slot_name("demo"), "bitclone9_demo");
        assert_eq!(s.include, vec!["public.*".to_string()]);
        assert_eq!(s.heartbeat_interval, Duration::from_secs(10));
    }

    fn invalid(text: &str) -> (String, String) {
        match parse(text) {
            Err(ConfigError::Invalid { path, message, .. }) => (path, message),
            other => panic!("expected an invalid-config error, got {other:?}"),
        }
    }

    #[test]
    fn kafka_and_registry_security_sections_are_checked() {
        let with = |extra: &str| {
            GOOD.replace(
                "schema_registry_url = \"http://127.0.0.1:8081/apis/ccompat/v7\"",
                &format!(
                    "schema_registry_url = \"https://registry:8443/apis/ccompat/v7\"\n{extra}"
                ),
            )
        };
        let good = with(
            "[kafka.sasl]\nmechanism = \"SCRAM-SHA-512\"\nusername = \"u\"\npassword = \"${PGPASS}\"\n[kafka.schema_registry]\ntoken = \"${PGPASS}\"",
        );
        let c = parse(&good).expect("valid");
        assert_eq!(
            c.kafka.sasl.as_ref().map(|s| s.mechanism),
            Some(SaslMechanism::ScramSha512)
        );
        assert_eq!(
            c.kafka.schema_registry.token.as_ref().map(Secret::expose),
            Some("s3cret")
        );

        let err = |extra: &str| -> String {
            match parse(&with(extra)) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("accepted: {extra}"),
            }
        };
        let e = err("[kafka.sasl]\nmechanism = \"GSSAPI\"\nusername = \"u\"\npassword = \"p\"");
        assert!(
            e.contains("kafka.sasl.mechanism") && e.contains("SCRAM-SHA-512"),
            "{e}"
        );
        let e = err("[kafka.tls]\nca_file = \"/nonexistent/ca.pem\"");
        assert!(
            e.contains("kafka.tls.ca_file") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let e = err("[kafka.tls]\ncert_file = \"/etc/hostname\"");
        assert!(
            e.contains("kafka.tls.key_file") && e.contains("go together"),
            "{e}"
        );
        let e = err("[kafka.schema_registry]\nusername = \"u\"\npassword = \"p\"\ntoken = \"t\"");
        assert!(e.contains("kafka.schema_registry.token"), "{e}");
        let e = err("[kafka.schema_registry]\nusername = \"u\"");
        assert!(e.contains("needs both username and password"), "{e}");
        let e = err("[kafka.schema_registry.tls]\nkey_password = \"p\"");
        assert!(e.contains("kafka.schema_registry.tls.key_password"), "{e}");
        let plain = GOOD.replace(
            "schema_registry_url = \"http://127.0.0.1:8081/apis/ccompat/v7\"",
            "schema_registry_url = \"http://127.0.0.1:8081/apis/ccompat/v7\"\n[kafka.schema_registry.tls]\nverify_hostname = false",
        );
        let (path, msg) = invalid(&plain);
        assert_eq!(path, "kafka.schema_registry.tls");
        assert!(msg.contains("https://"), "{msg}");
    }

    #[test]
    fn clear_kafka_and_registry_secrets_in_a_world_readable_file_are_flagged_by_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("bc9-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("c.toml");
        let text = "[kafka]\n[kafka.sasl]\npassword = \"clear-one\"\n[kafka.schema_registry]\ntoken = \"clear-two\"\npassword = \"${FROM_ENV}\"\n";
        std::fs::write(&file, text).expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let warnings = world_readable_secrets(&file, text).join("\n");
        assert!(warnings.contains("`kafka.sasl.password`"), "{warnings}");
        assert!(
            warnings.contains("`kafka.schema_registry.token`"),
            "{warnings}"
        );
        assert!(!warnings.contains("schema_registry.password"), "{warnings}");
        assert!(
            !warnings.contains("clear-one") && !warnings.contains("clear-two"),
            "{warnings}"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(world_readable_secrets(&file, text).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn logins_sent_in_clear_are_warned_about_and_secrets_stay_out_of_debug() {
        let text = GOOD.replace(
            "schema_registry_url = \"http://127.0.0.1:8081/apis/ccompat/v7\"",
            "schema_registry_url = \"http://127.0.0.1:8081/apis/ccompat/v7\"\n[kafka.sasl]\nmechanism = \"PLAIN\"\nusername = \"u\"\npassword = \"sasl-secret\"\n[kafka.schema_registry]\ntoken = \"token-secret\"",
        );
        let c = parse(&text).expect("valid");
        let w = c.credentials_in_clear().join("\n");
        assert!(w.contains("kafka.sasl: PLAIN without [kafka.tls]"), "{w}");
        assert!(
            w.contains("kafka.schema_registry: the registry login goes unencrypted"),
            "{w}"
        );
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "the source password: {debug}");
        assert!(
            !debug.contains("sasl-secret") && !debug.contains("token-secret"),
            "{debug}"
        );
        assert!(parse(GOOD)
            .expect("valid")
            .credentials_in_clear()
            .is_empty());
        // Loading a file carries them as warnings (printed at start and by `check`).
        let dir = std::env::temp_dir().join(format!("bc9-clear-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("c.toml");
        std::fs::write(&file, text.replace("${PGPASS}", "${HOME}")).expect("write");
        let loaded = Config::load(&file).expect("load");
        assert!(
            loaded
                .warnings
                .iter()
                .any(|w| w.contains("PLAIN without [kafka.tls]")),
            "{:?}",
            loaded.warnings
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn errors_name_the_key_path() {
        let (path, msg) = invalid(&GOOD.replace("${PGPASS}", "${NOPE}"));
        assert_eq!(path, "sources.demo.password");
        assert!(msg.contains("NOPE"), "{msg}");

        let (path, msg) = invalid(&format!("{GOOD}colour = \"red\"\n"));
        assert_eq!(path, "sources.demo.colour");
        assert!(msg.contains("unknown field"), "{msg}");

        let (path, msg) = invalid(&format!("{GOOD}port = \"five\"\n"));
        assert_eq!(path, "sources.demo.port");
        assert!(msg.contains("u16"), "{msg}");

        let (path, _) = invalid(&format!("{GOOD}snapshot = \"sometimes\"\n"));
        assert_eq!(path, "sources.demo.snapshot");

        let (path, msg) = invalid(&format!("{GOOD}[sources.demo.topics]\npartitions = 0\n"));
        assert_eq!(path, "sources.demo.topics.partitions");
        assert!(msg.contains("at least 1"), "{msg}");

        let (path, _) = invalid(&format!("{GOOD}slot = \"Bad-Slot\"\n"));
        assert_eq!(path, "sources.demo.slot");

        let (path, msg) =
            invalid(&GOOD.replace("[kafka]", "[admin]\nlisten = \"0.0.0.0:9187\"\n[kafka]"));
        assert_eq!(path, "admin.token");
        assert!(msg.contains("not a loopback"), "{msg}");
        assert!(parse(&GOOD.replace(
            "[kafka]",
            "[admin]\nlisten = \"0.0.0.0:9187\"\ntoken = \"t\"\n[kafka]"
        ))
        .is_ok());

        let (path, msg) = invalid(&format!("{GOOD}sslmode = \"verify-full\"\n"));
        assert_eq!(path, "sources.demo.host");
        assert!(msg.contains("DNS name"), "{msg}");
        let (path, _) = invalid(&format!("{GOOD}sslrootcert = \"/nonexistent/ca.pem\"\n"));
        assert_eq!(path, "sources.demo.sslrootcert");

        let (path, _) = invalid(&format!("{GOOD}heartbeat_interval = \"often\"\n"));
        assert_eq!(path, "sources.demo.heartbeat_interval");

        assert!(matches!(parse("[kafka\n"), Err(ConfigError::Syntax { .. })));
    }

    #[test]
    fn duration_and_address_errors_show_the_expected_form() {
        let (path, msg) = invalid(&format!("{GOOD}connect_timeout = \"5 parsecs\"\n"));
        assert_eq!(path, "sources.demo.connect_timeout");
        assert!(msg.contains("expected a duration such as \"10s\""), "{msg}");
        let (path, msg) = invalid(&format!("{GOOD}heartbeat_interval = true\n"));
        assert_eq!(path, "sources.demo.heartbeat_interval");
        assert!(msg.contains("\"500ms\""), "{msg}");
        let (path, msg) =
            invalid(&GOOD.replace("[kafka]", "[admin]\nlisten = \"localhost:9187\"\n[kafka]"));
        assert_eq!(path, "admin.listen");
        assert!(msg.contains("\"127.0.0.1:9187\""), "{msg}");
    }

    #[test]
    fn sink_sections_are_checked() {
        let sink = |body: &str| {
            format!("{GOOD}\n[sinks.copy]\ntype = \"postgres\"\nhost = \"h\"\nuser = \"u\"\ndatabase = \"d\"\n{body}")
        };
        let c = parse(&sink("source = \"demo\"")).expect("valid sink");
        assert_eq!(c.sink_subscription("copy"), vec!["^demo\\..*".to_string()]);
        assert_eq!(c.sinks["copy"].group("copy"), "bitclone9-sink-copy");
        assert_eq!(
            c.sinks["copy"].dead_letter("copy"),
            "bitclone9.dead-letter.copy"
        );
        let (path, msg) = invalid(&sink(""));
        assert_eq!(path, "sinks.copy.source");
        assert!(msg.contains("exactly one of"), "{msg}");
        let (path, msg) = invalid(&sink("source = \"nope\""));
        assert_eq!(path, "sinks.copy.source");
        assert!(msg.contains("demo"), "{msg}");
        let (path, _) = invalid(&sink("topic_pattern = \"demo.*\""));
        assert_eq!(path, "sinks.copy.topic_pattern");
        let (path, _) = invalid(&sink("topics = [\"a\"]\non_table_drop = \"purge\""));
        assert_eq!(path, "sinks.copy.on_table_drop");
        let (path, _) = invalid(&sink("topics = [\"a\"]\non_error = \"ignore\""));
        assert_eq!(path, "sinks.copy.on_error");
        let (path, _) = invalid(&sink("topics = [\"a\"]\nmax_batch_events = 0"));
        assert_eq!(path, "sinks.copy.max_batch_events");
        let source =
            |line: &str| GOOD.replacen("[sources.demo]", &format!("[sources.demo]\n{line}"), 1);
        assert!(GOOD.contains("[sources.demo]"));
        let c = parse(&source("logical_decoding_work_mem = \"64kB\"")).expect("valid source");
        assert!(
            !c.sources["demo"].stream_large_transactions,
            "off unless asked for"
        );
        for bad in ["\"32kB\"", "\"64\"", "\"1 MB\"", "\"lots\""] {
            let (path, msg) = invalid(&source(&format!("logical_decoding_work_mem = {bad}")));
            assert_eq!(path, "sources.demo.logical_decoding_work_mem");
            assert!(msg.contains("at least 64kB"), "{msg}");
        }
        let (path, msg) =
            invalid(&sink("topics = [\"a\"]").replace("[sinks.copy]", "[sinks.demo]"));
        assert_eq!(path, "sinks.demo");
        assert!(msg.contains("unique"), "{msg}");
    }

    #[test]
    fn secrets_from_files_and_systemd_credentials() {
        let dir = std::env::temp_dir().join(format!("bc9-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("pg"), "from-credential\n").expect("write");
        std::fs::write(dir.join("pw.txt"), "from-file\n").expect("write");
        let creds = dir.display().to_string();
        let env = |n: &str| match n {
            "CREDENTIALS_DIRECTORY" => Some(creds.clone()),
            _ => None,
        };
        let text = GOOD.replace("${PGPASS}", "${credential:pg}");
        let c = Config::parse(Path::new("t.toml"), &text, &env).expect("credential");
        assert_eq!(c.sources["demo"].password.expose(), "from-credential");
        let text = GOOD.replace("${PGPASS}", &format!("${{file:{}/pw.txt}}", dir.display()));
        let c = Config::parse(Path::new("t.toml"), &text, &env).expect("file");
        assert_eq!(c.sources["demo"].password.expose(), "from-file");
        let text = GOOD.replace("${PGPASS}", "${credential:missing}");
        match Config::parse(Path::new("t.toml"), &text, &env) {
            Err(ConfigError::Invalid { path, message, .. }) => {
                assert_eq!(path, "sources.demo.password");
                assert!(message.contains("missing"), "{message}");
            }
            other => panic!("expected an error, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn dollar_escape_keeps_a_literal() {
        let c = parse(&GOOD.replace("${PGPASS}", "a$${b}")).expect("valid");
        assert_eq!(c.sources["demo"].password.expose(), "a${b}");
    }

    #[test]
    fn shipped_example_configs_parse() {
        let env = |name: &str| {
            Some(if name.ends_with("URL") {
                "http://127.0.0.1:1".to_string()
            } else {
                "x".to_string()
            })
        };
        for f in ["bitclone9.toml", "quickstart.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../config")
                .join(f);
            let text = std::fs::read_to_string(&path).expect("example config exists");
            Config::parse(&path, &text, &env).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }
}
