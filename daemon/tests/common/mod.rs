//! Test harness over the real local stack (scripts/stack up): PostgreSQL, Kafka and the schema
//! registry. Nothing is mocked. A missing service fails the test with a message saying so.
#![allow(dead_code)]

pub mod clone;

use apache_avro::types::Value as Avro;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;
use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

pub struct Stack {
    pub pg_port: u16,
    pub pg_user: String,
    pub pg_password: String,
    pub pg_superuser: String,
    pub pg_superpass: String,
    pub bootstrap: String,
    pub registry_url: String,
}

pub fn stack() -> Stack {
    Stack {
        pg_port: env_or("BC9_PG_PORT", "5433")
            .parse()
            .expect("BC9_PG_PORT is a port"),
        pg_user: env_or("BC9_PG_USER", "bitclone9"),
        pg_password: env_or("BC9_PG_PASSWORD", "bitclone9"),
        pg_superuser: env_or("BC9_PG_SUPERUSER", "postgres"),
        pg_superpass: env_or("BC9_PG_SUPERPASS", "bitclone9-admin"),
        bootstrap: env_or("BC9_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        registry_url: env_or("BC9_REGISTRY_URL", "http://127.0.0.1:8081/apis/ccompat/v7"),
    }
}

/// A name unique to this test run, for databases, slots and topics.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 100_000_000)
        .unwrap_or(0);
    format!(
        "{prefix}_{t}_{}_{}",
        std::process::id() % 10_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub async fn connect(db: &str, user: &str, password: &str) -> Client {
    let s = stack();
    let conn_str = format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname={db}",
        s.pg_port
    );
    let (client, conn) = tokio_postgres::connect(&conn_str, NoTls).await.unwrap_or_else(|e| {
        panic!("PostgreSQL of the local stack is not reachable on 127.0.0.1:{} ({e}); run scripts/stack up", s.pg_port)
    });
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

pub async fn admin() -> Client {
    let s = stack();
    connect("postgres", &s.pg_superuser, &s.pg_superpass).await
}

/// A fresh database owned by the BitClone9 role; returns a session in it as that role.
pub async fn fresh_db(name: &str) -> Client {
    let s = stack();
    admin()
        .await
        .batch_execute(&format!("CREATE DATABASE {name} OWNER {}", s.pg_user))
        .await
        .expect("create database");
    connect(name, &s.pg_user, &s.pg_password).await
}

/// A fresh database (see [`fresh_db`]) named after `prefix`, with `ddl` run in it.
pub async fn db_with(prefix: &str, ddl: &str) -> (String, Client) {
    let db = unique(prefix);
    let client = fresh_db(&db).await;
    client.batch_execute(ddl).await.expect("test schema");
    (db, client)
}

/// A session in `db` as the superuser.
pub async fn admin_in(db: &str) -> Client {
    let s = stack();
    connect(db, &s.pg_superuser, &s.pg_superpass).await
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bitclone9"))
}

/// Settings of one test source.
pub struct SourceSpec {
    pub name: String,
    pub db: String,
    pub extra: String,
}

impl SourceSpec {
    pub fn new(db: &str) -> Self {
        Self {
            name: db.to_string(),
            db: db.to_string(),
            extra: String::new(),
        }
    }
    pub fn topic(&self, table: &str) -> String {
        format!("{}.public.{table}", self.name)
    }
}

/// Writes a config file for `spec` into a fresh state dir and returns (config path, dir).
pub fn write_config(spec: &SourceSpec, kafka_extra: &str) -> (PathBuf, PathBuf) {
    let s = stack();
    let dir = std::env::temp_dir().join(unique("bc9test"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cfg = format!(
        r#"[daemon]
state_dir = "{state}"
log_level = "info,bitclone9=debug"
[admin]
listen = "127.0.0.1:0"
[kafka]
bootstrap_servers = "{bootstrap}"
schema_registry_url = "{registry}"
{kafka_extra}
[sources.{name}]
type = "postgres"
host = "127.0.0.1"
port = {port}
user = "{user}"
password = "${{TEST_PG_PASSWORD}}"
database = "{db}"
heartbeat_interval = "1s"
status_interval = "200ms"
{extra}
"#,
        state = dir.join("state").display(),
        bootstrap = s.bootstrap,
        registry = s.registry_url,
        name = spec.name,
        port = s.pg_port,
        user = s.pg_user,
        db = spec.db,
        extra = spec.extra,
    );
    let path = dir.join("bitclone9.toml");
    std::fs::write(&path, cfg).expect("write config");
    (path, dir)
}

/// A running `bitclone9 run` process; killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(config: &std::path::Path, log_name: &str) -> Self {
        Self::start_with(config, log_name, &[])
    }

    /// Starts with extra environment variables; `WATCHDOG_PID=self` becomes the daemon's pid.
    pub fn start_with(config: &std::path::Path, log_name: &str, env: &[(&str, &str)]) -> Self {
        let log = config.with_file_name(format!("{log_name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        // `exec` keeps the shell's pid, so $$ is the daemon's pid.
        let mut script = String::new();
        for (k, v) in env {
            let v = if *v == "self" {
                "$$".to_string()
            } else {
                format!("'{v}'")
            };
            script.push_str(&format!("export {k}={v}; "));
        }
        script.push_str("exec \"$0\" run --config \"$1\"");
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(bin())
            .arg(config)
            .env("TEST_PG_PASSWORD", stack().pg_password)
            .env_remove("BITCLONE9_LOG")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start bitclone9");
        Self { child, log }
    }

    /// Starts the daemon and waits until its pipeline streams.
    pub async fn start_streaming(config: &std::path::Path, log_name: &str) -> Self {
        let mut d = Self::start(config, log_name);
        d.wait_log("streaming started", Duration::from_secs(60))
            .await;
        d
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return;
            }
            assert!(
                self.is_running(),
                "bitclone9 exited early; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "no {needle:?} in the log within {timeout:?}; log:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The slot's confirmed position, as an LSN number.
pub async fn confirmed_flush(client: &Client, slot: &str) -> Option<u64> {
    let row = client
        .query_opt(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("query slot");
    row.and_then(|r| r.get::<_, Option<i64>>(0))
        .map(|v| v as u64)
}

pub async fn current_lsn(client: &Client) -> u64 {
    client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
        .await
        .expect("current lsn")
        .get::<_, i64>(0) as u64
}

/// Waits until the slot has confirmed at least `lsn`.
pub async fn wait_confirmed(client: &Client, slot: &str, lsn: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let c = confirmed_flush(client, slot).await;
        if c.is_some_and(|c| c >= lsn) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "slot {slot} confirmed {c:?}, not {lsn} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One decoded Kafka record.
#[derive(Debug, Clone)]
pub struct Record {
    pub headers: HashMap<String, String>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Avro>,
    pub value: Option<Avro>,
}

impl Record {
    pub fn op(&self) -> Option<String> {
        self.value.as_ref().map(|v| match field(v, "op") {
            Avro::String(s) => s.clone(),
            other => panic!("op is not a string: {other:?}"),
        })
    }
    pub fn source(&self, name: &str) -> Avro {
        field(
            field(self.value.as_ref().expect("not a tombstone"), "source"),
            name,
        )
        .clone()
    }
    /// (lsn, seq) of the event.
    pub fn position(&self) -> (i64, i64) {
        let lsn = match self.source("lsn") {
            Avro::Union(_, v) => match *v {
                Avro::Long(l) => l,
                _ => -1,
            },
            _ => -1,
        };
        let seq = match self.source("seq") {
            Avro::Long(s) => s,
            _ => -1,
        };
        (lsn, seq)
    }
    /// The before or after row as column → value (unwrapping optional unions), if set.
    pub fn row(&self, which: &str) -> Option<HashMap<String, Avro>> {
        match field(self.value.as_ref()?, which) {
            Avro::Union(_, inner) => match inner.as_ref() {
                Avro::Null => None,
                Avro::Record(fields) => Some(
                    fields
                        .iter()
                        .map(|(k, v)| (k.clone(), unwrap_union(v)))
                        .collect(),
                ),
                other => panic!("{which} is not a record: {other:?}"),
            },
            other => panic!("{which} is not a union: {other:?}"),
        }
    }
    pub fn key_long(&self, name: &str) -> Option<i64> {
        match self.key.as_ref().map(|k| field(k, name)) {
            Some(Avro::Long(v)) => Some(*v),
            Some(Avro::Int(v)) => Some(i64::from(*v)),
            _ => None,
        }
    }
}

pub fn unwrap_union(v: &Avro) -> Avro {
    match v {
        Avro::Union(_, inner) => (**inner).clone(),
        other => other.clone(),
    }
}

pub fn field<'a>(v: &'a Avro, name: &str) -> &'a Avro {
    match v {
        Avro::Record(fields) => {
            &fields
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("no field {name} in {v:?}"))
                .1
        }
        other => panic!("not a record: {other:?}"),
    }
}

/// Reads `topic` from the beginning until `min` records arrived and no more came for `idle`, or
/// `timeout` passed; decodes keys and values through the schema registry.
pub async fn consume(topic: &str, min: usize, idle: Duration, timeout: Duration) -> Vec<Record> {
    let s = stack();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &s.bootstrap)
        .set("group.id", unique("bc9test"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let decoder = AvroDecoder::new(SrSettings::new(s.registry_url.clone()));
    let mut raw = Vec::new();
    let start = Instant::now();
    let mut last = Instant::now();
    while start.elapsed() < timeout && !(raw.len() >= min && last.elapsed() >= idle) {
        let polled = tokio::task::block_in_place(|| {
            consumer.poll(Duration::from_millis(200)).map(|r| {
                r.map(|m| {
                    let headers: HashMap<String, String> = m
                        .headers()
                        .map(|hs| {
                            use rdkafka::message::Headers;
                            hs.iter()
                                .map(|h| {
                                    (
                                        h.key.to_string(),
                                        String::from_utf8_lossy(h.value.unwrap_or_default())
                                            .into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    (
                        headers,
                        m.partition(),
                        m.offset(),
                        m.key().map(<[u8]>::to_vec),
                        m.payload().map(<[u8]>::to_vec),
                    )
                })
            })
        });
        match polled {
            Some(Ok(m)) => {
                raw.push(m);
                last = Instant::now();
            }
            // A topic not created yet reports an error at first; keep polling.
            Some(Err(e)) if !e.to_string().contains("UnknownTopic") => eprintln!("consumer: {e}"),
            _ => {}
        }
    }
    // Each decode is bounded: a registry call that never completes fails the test rather
    // than hanging the whole run.
    let decode = |bytes: Vec<u8>, what: &'static str| {
        let decoder = &decoder;
        async move {
            tokio::time::timeout(Duration::from_secs(60), decoder.decode(Some(&bytes)))
                .await
                .unwrap_or_else(|_| panic!("{what} not decoded within 60 s"))
                .unwrap_or_else(|e| panic!("{what} decodes through the registry: {e}"))
                .value
        }
    };
    let mut out = Vec::with_capacity(raw.len());
    for (headers, partition, offset, key, value) in raw {
        let key = match key {
            Some(k) => Some(decode(k, "key").await),
            None => None,
        };
        let value = match value {
            Some(v) => Some(decode(v, "value").await),
            None => None,
        };
        out.push(Record {
            headers,
            partition,
            offset,
            key,
            value,
        });
    }
    out
}

/// A TCP forwarder to a real service that a test can close (dropping every connection and
/// refusing new ones) and open again: the service "becomes unreachable" and comes back.
pub struct Gate {
    pub port: u16,
    open: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    pub async fn start(target_port: u16, open: bool) -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gate");
        let port = listener.local_addr().expect("gate addr").port();
        let (tx, rx) = tokio::sync::watch::channel(open);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*rx.borrow() {
                    continue; // dropped: the peer sees the connection closed at once
                }
                let mut closed = rx.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = closed.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Gate { port, open: tx }
    }

    pub fn set_open(&self, open: bool) {
        let _ = self.open.send(open);
    }
}

fn admin_client() -> rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", stack().bootstrap)
        .create()
        .expect("admin client")
}

/// The partition count of an existing topic.
pub async fn topic_partitions(topic: &str) -> usize {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", stack().bootstrap)
        .create()
        .expect("consumer");
    let md = tokio::task::block_in_place(|| {
        consumer.fetch_metadata(Some(topic), Duration::from_secs(10))
    })
    .expect("topic metadata");
    md.topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0)
}

/// The configs of an existing topic.
pub async fn topic_configs(topic: &str) -> HashMap<String, String> {
    let admin = admin_client();
    let res = admin
        .describe_configs(
            &[rdkafka::admin::ResourceSpecifier::Topic(topic)],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .expect("describe configs");
    let resource = res
        .into_iter()
        .next()
        .expect("one resource")
        .expect("topic configs");
    resource
        .entries
        .into_iter()
        .filter_map(|e| e.value.map(|v| (e.name, v)))
        .collect()
}

/// Drops a test database and its replication slots, so finished tests hold no WAL.
pub async fn cleanup(db: &str) {
    let admin = admin().await;
    admin
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active",
            &[&db],
        )
        .await
        .expect("drop test slots");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .expect("drop test database");
}

/// The admin endpoint's address, from the daemon's log.
pub async fn admin_addr(daemon: &mut Daemon) -> String {
    daemon
        .wait_log("admin endpoint listening", Duration::from_secs(30))
        .await;
    let log = daemon.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("admin endpoint listening"))
        .expect("log line");
    line.split("address=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("address in the log line")
        .to_string()
}

/// A plain HTTP/1.1 GET; returns (status code, body).
pub async fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    http_request(addr, "GET", path, token).await
}

/// A plain HTTP/1.1 request without a body; returns (status code, body).
pub async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect admin endpoint");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("send request");
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.expect("read response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// Parses Prometheus text format into (name with labels) -> value.
/// The sum of the samples of metric `name` (exactly that name) whose labels contain `label`
/// (e.g. `action="kept"`; "" for all).
pub async fn metric_sum(addr: &str, name: &str, label: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics", None).await;
    parse_prometheus(&body)
        .into_iter()
        .filter(|(k, _)| (k == name || k.starts_with(&format!("{name}{{"))) && k.contains(label))
        .map(|(_, v)| v)
        .sum()
}

pub fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("malformed metrics line {l:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("malformed value in {l:?}"));
            (name.to_string(), value)
        })
        .collect()
}

/// Inserts into `table (id bigint, payload text)` in transactions of `rows_per_tx` rows with
/// `payload_len`-byte payloads, about 150 transactions a second (bounded, so a debug build keeps
/// up), until told to stop; the task returns how many rows it inserted (ids 0..n).
pub fn start_insert_load(
    db: &str,
    table: &str,
    rows_per_tx: i64,
    payload_len: i32,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<i64>,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (db, table) = (db.to_string(), table.to_string());
    let task = tokio::spawn(async move {
        let s = stack();
        let c = connect(&db, &s.pg_user, &s.pg_password).await;
        let mut next = 0i64;
        while !*stop_rx.borrow() {
            c.batch_execute(&format!(
                "INSERT INTO {table} SELECT g, repeat('x', {payload_len}) FROM generate_series({next}, {}) g",
                next + rows_per_tx - 1
            ))
            .await
            .expect("load insert");
            next += rows_per_tx;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        next
    });
    (stop_tx, task)
}

/// Runs `bitclone9 ARGS --config CFG` with `env`; returns the exit code and stdout + stderr.
pub fn cli(cfg: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .arg("--config")
        .arg(cfg)
        .env("TEST_PG_PASSWORD", stack().pg_password);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run bitclone9");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The pid of the server process streaming `slot` (its walsender).
pub async fn walsender_pid(slot: &str) -> i32 {
    admin()
        .await
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot")
        .get(0)
}

/// Sends `sig` (e.g. "-STOP") to `pid`; asserts it was delivered.
/// A process stopped with SIGSTOP; it is continued when this is dropped, also when the test
/// fails, so that a frozen server never holds up the tests after it.
pub struct Frozen(i32);

impl Frozen {
    pub fn new(pid: i32) -> Self {
        send_signal("-STOP", pid);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.0.to_string())
            .status();
    }
}

pub fn send_signal(sig: &str, pid: impl std::fmt::Display) {
    let ok = Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Every row of `table` as text, in key order.
pub async fn dump(c: &Client, table: &str, order: &str) -> Vec<String> {
    c.query(
        &format!("SELECT dump_row::text FROM {table} dump_row ORDER BY {order}"),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("dump {table}: {e}"))
    .iter()
    .map(|r| r.get(0))
    .collect()
}
