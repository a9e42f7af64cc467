//! The end-to-end checker: a clone through Kafka under randomized faults, checked against the
//! history of what the workload committed.
//!
//! ```text
//!  workload ──tx──► source db ──gate──► bitclone9 (source) ──► Kafka ──► bitclone9 (sink) ──gate──► target db
//!     │ history                          ▲ nemeses: SIGKILL / SIGTERM the daemon, kill -9 or freeze Kafka,
//!     ▼                                  │ freeze the registry, restart PostgreSQL (fast, immediate),
//!  checks ◄── Kafka topics, target samples, final dumps          cut the source / target / registry link
//! ```
//!
//! Every fault is drawn from a seed the run prints (`BC9_CHAOS_SEED` replays it). Settings:
//! `BC9_CHAOS_CYCLES` (default 5), `BC9_CHAOS_SCALE` (fault durations, 1.0 = the full 30 s /
//! 60 s outages; default 0.25), `BC9_CHAOS_FRESH_KAFKA=1` (start from a newly formatted broker),
//! `BC9_CHAOS_LARGE_ROWS` (rows of the one large transaction, default 200000).
//!
//! Checks at the end: (1) every committed change is on Kafka, re-sends carrying the same
//! (lsn, seq); (2) per key, Kafka's order is commit order; (4) every state the target was seen
//! in is a committed state of that key, never an older one than seen before; (5) the target
//! equals the source and `bitclone9 verify` agrees; (6) every cycle recovered without help;
//! (7) the daemon's peak RSS stayed under a bound. (3), the slot never confirming what Kafka
//! lacks, is what (1) checks after each SIGKILL: a position confirmed too early would be a gap.
//! The workload starts once the initial snapshot is recorded, so every change it commits must
//! appear on Kafka as a streamed event.

mod common;

use common::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Peak resident memory the daemon may reach (source and sink in one process).
const RSS_BOUND_MB: f64 = 512.0;

/// SplitMix64: a small, well-mixed generator, so a printed seed replays a run exactly.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Tables of the workload: (name, key columns).
const TABLES: [(&str, &str); 4] = [
    ("acct", "id"),
    ("line", "o, n"),
    ("doc", "id"),
    ("txlog", "id"),
];

const DDL: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE acct (id bigint PRIMARY KEY, v bigint NOT NULL, m mood NOT NULL, note text);
CREATE TABLE line (o int, n int, v bigint NOT NULL, qty int, PRIMARY KEY (o, n));
CREATE TABLE doc (id int PRIMARY KEY, v bigint NOT NULL, title text, body text);
CREATE TABLE txlog (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());
";

/// A big value TOAST keeps out of line (hex digits that pglz cannot shrink below the limit).
const BIG_BODY: &str = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 300))";

type Key = (usize, String);

/// What the workload committed, per key: every state in commit order (`None`: no row), and
/// the row events alone (truncates remove rows without an event per key).
#[derive(Default)]
struct History {
    states: HashMap<Key, Vec<Option<i64>>>,
    events: HashMap<Key, Vec<Option<i64>>>,
    /// Keys with a row now, per table.
    live: [Vec<String>; 4],
    committed_tx: u64,
    /// The large transaction committed (and the SIGKILL meant for it is still to come).
    large_committed: bool,
    indeterminate: u64,
}

/// One effect of a transaction on a key.
#[derive(Clone)]
enum Effect {
    Put(usize, String, i64),
    Delete(usize, String),
    /// Every row of the table gone.
    Truncate(usize),
}

impl History {
    fn record(&mut self, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::Put(t, k, v) => {
                    let key = (*t, k.clone());
                    let was_live = self
                        .states
                        .get(&key)
                        .and_then(|s| s.last().copied())
                        .flatten()
                        .is_some();
                    self.states.entry(key.clone()).or_default().push(Some(*v));
                    self.events.entry(key).or_default().push(Some(*v));
                    if !was_live {
                        self.live[*t].push(k.clone());
                    }
                }
                Effect::Delete(t, k) => {
                    let key = (*t, k.clone());
                    self.states.entry(key.clone()).or_default().push(None);
                    self.events.entry(key).or_default().push(None);
                    self.live[*t].retain(|x| x != k);
                }
                Effect::Truncate(t) => {
                    for k in std::mem::take(&mut self.live[*t]) {
                        self.states.entry((*t, k)).or_default().push(None);
                    }
                }
            }
        }
    }
}

/// The daemon under test, restarted by the harness when a nemesis stopped it (as systemd would).
struct Supervised {
    config: PathBuf,
    daemon: Option<Daemon>,
    starts: u32,
    peak_rss_mb: f64,
}

impl Supervised {
    fn start(&mut self) {
        self.starts += 1;
        self.daemon = Some(Daemon::start(&self.config, &format!("run{}", self.starts)));
    }
    fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|d| d.child.id())
    }
    fn sample_rss(&mut self) {
        let Some(pid) = self.pid() else { return };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(kb) = line.strip_prefix("VmHWM:") {
                let kb: f64 = kb
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .unwrap_or(0.0);
                self.peak_rss_mb = self.peak_rss_mb.max(kb / 1024.0);
            }
        }
    }
    fn log_tail(&self) -> String {
        let text = self
            .daemon
            .as_ref()
            .map(|d| d.log_text())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Nemesis {
    DaemonKill,
    DaemonTerm,
    KafkaKill,
    KafkaFreeze,
    RegistryFreeze,
    PgRestartFast,
    PgRestartImmediate,
    SourceCut,
    TargetCut,
    RegistryCut,
}

const NEMESES: [Nemesis; 10] = [
    Nemesis::DaemonKill,
    Nemesis::DaemonTerm,
    Nemesis::KafkaKill,
    Nemesis::KafkaFreeze,
    Nemesis::RegistryFreeze,
    Nemesis::PgRestartFast,
    Nemesis::PgRestartImmediate,
    Nemesis::SourceCut,
    Nemesis::TargetCut,
    Nemesis::RegistryCut,
];

fn stack_dir() -> PathBuf {
    std::env::var("BC9_STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.stack"))
}

fn stack_script(args: &[&str]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/stack");
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .expect("run scripts/stack");
    assert!(
        out.status.success(),
        "scripts/stack {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pid_of(file: &str) -> i32 {
    let path = stack_dir().join(file);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (is the stack up?)", path.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A committed-or-not transaction: SQL and its effects, tagged with its txlog id.
struct Tx {
    id: u64,
    sql: String,
    effects: Vec<Effect>,
}

/// Draws the next transaction of the workload.
struct Workload {
    rng: Rng,
    next_v: i64,
    next_id: i64,
    next_line: i64,
    tx: u64,
    add_column_at: u64,
    large_at: u64,
    large_rows: i64,
    column_added: bool,
}

impl Workload {
    fn v(&mut self) -> i64 {
        self.next_v += 1;
        self.next_v
    }

    fn draw(&mut self, h: &History) -> Tx {
        self.tx += 1;
        let id = self.tx;
        let mut sql = String::from("BEGIN;\n");
        let mut effects = Vec::new();
        let mut touched: HashSet<Key> = HashSet::new();
        if id == self.add_column_at && !self.column_added {
            self.column_added = true;
            sql.push_str("ALTER TABLE acct ADD COLUMN extra text;\n");
        }
        if id == self.large_at {
            let v0 = self.next_v + 1;
            self.next_v += self.large_rows;
            sql.push_str(&format!(
                "INSERT INTO line SELECT 1000000 + g / 100, g % 100, {v0} + g, g % 7 FROM generate_series(0, {}) g;\n",
                self.large_rows - 1
            ));
            for g in 0..self.large_rows {
                effects.push(Effect::Put(
                    1,
                    format!("{},{}", 1_000_000 + g / 100, g % 100),
                    v0 + g,
                ));
            }
        } else if self.rng.chance(0.004) {
            sql.push_str("TRUNCATE line;\n");
            effects.push(Effect::Truncate(1));
        } else {
            let ops = if self.rng.chance(0.05) {
                20 + self.rng.below(200)
            } else {
                1 + self.rng.below(6)
            };
            for _ in 0..ops {
                self.op(h, &mut sql, &mut effects, &mut touched);
            }
        }
        sql.push_str(&format!("INSERT INTO txlog (id) VALUES ({id});\nCOMMIT;"));
        effects.push(Effect::Put(3, id.to_string(), 0));
        Tx { id, sql, effects }
    }

    fn pick(&mut self, h: &History, t: usize, touched: &HashSet<Key>) -> Option<String> {
        let live = &h.live[t];
        if live.is_empty() {
            return None;
        }
        let k = live[self.rng.below(live.len() as u64) as usize].clone();
        (!touched.contains(&(t, k.clone()))).then_some(k)
    }

    fn op(
        &mut self,
        h: &History,
        sql: &mut String,
        effects: &mut Vec<Effect>,
        touched: &mut HashSet<Key>,
    ) {
        let moods = ["sad", "ok", "happy"];
        let roll = self.rng.below(100);
        let extra = if self.column_added {
            ", extra = 'e' || v"
        } else {
            ""
        };
        match roll {
            // acct: insert, update, delete, key change with a re-insert of the old key.
            0..=19 => {
                self.next_id += 1;
                let (id, v) = (self.next_id, self.v());
                let m = moods[self.rng.below(3) as usize];
                sql.push_str(&format!(
                    "INSERT INTO acct (id, v, m, note) VALUES ({id}, {v}, '{m}', 'n{v}');\n"
                ));
                touched.insert((0, id.to_string()));
                effects.push(Effect::Put(0, id.to_string(), v));
            }
            20..=39 => {
                if let Some(k) = self.pick(h, 0, touched) {
                    let v = self.v();
                    let m = moods[self.rng.below(3) as usize];
                    sql.push_str(&format!(
                        "UPDATE acct SET v = {v}, m = '{m}'{extra} WHERE id = {k};\n"
                    ));
                    touched.insert((0, k.clone()));
                    effects.push(Effect::Put(0, k, v));
                }
            }
            40..=46 => {
                if let Some(k) = self.pick(h, 0, touched) {
                    sql.push_str(&format!("DELETE FROM acct WHERE id = {k};\n"));
                    touched.insert((0, k.clone()));
                    effects.push(Effect::Delete(0, k));
                }
            }
            47..=51 => {
                if let Some(k) = self.pick(h, 0, touched) {
                    self.next_id += 1;
                    let (new, v, v2) = (self.next_id, self.v(), self.v());
                    sql.push_str(&format!(
                        "UPDATE acct SET id = {new}, v = {v} WHERE id = {k};\nINSERT INTO acct (id, v, m) VALUES ({k}, {v2}, 'ok');\n"
                    ));
                    touched.insert((0, k.clone()));
                    touched.insert((0, new.to_string()));
                    effects.push(Effect::Delete(0, k.clone()));
                    effects.push(Effect::Put(0, new.to_string(), v));
                    effects.push(Effect::Put(0, k, v2));
                }
            }
            // line (composite key): insert, update, delete.
            52..=66 => {
                self.next_line += 1;
                let (o, n) = (self.next_line / 10, self.next_line % 10);
                let v = self.v();
                sql.push_str(&format!(
                    "INSERT INTO line VALUES ({o}, {n}, {v}, {});\n",
                    v % 13
                ));
                let k = format!("{o},{n}");
                touched.insert((1, k.clone()));
                effects.push(Effect::Put(1, k, v));
            }
            67..=76 => {
                if let Some(k) = self.pick(h, 1, touched) {
                    let v = self.v();
                    let (o, n) = k.split_once(',').unwrap_or(("0", "0"));
                    sql.push_str(&format!(
                        "UPDATE line SET v = {v}, qty = qty + 1 WHERE o = {o} AND n = {n};\n"
                    ));
                    touched.insert((1, k.clone()));
                    effects.push(Effect::Put(1, k, v));
                }
            }
            77..=80 => {
                if let Some(k) = self.pick(h, 1, touched) {
                    let (o, n) = k.split_once(',').unwrap_or(("0", "0"));
                    sql.push_str(&format!("DELETE FROM line WHERE o = {o} AND n = {n};\n"));
                    touched.insert((1, k.clone()));
                    effects.push(Effect::Delete(1, k));
                }
            }
            // doc: inserts with a TOASTed body; most updates leave the body alone.
            81..=85 => {
                self.next_id += 1;
                let (id, v) = (self.next_id, self.v());
                sql.push_str(&format!(
                    "INSERT INTO doc VALUES ({id}, {v}, 't{v}', {BIG_BODY});\n"
                ));
                touched.insert((2, id.to_string()));
                effects.push(Effect::Put(2, id.to_string(), v));
            }
            86..=96 => {
                if let Some(k) = self.pick(h, 2, touched) {
                    let v = self.v();
                    let body = if self.rng.chance(0.1) {
                        format!(", body = {BIG_BODY}")
                    } else {
                        String::new()
                    };
                    sql.push_str(&format!(
                        "UPDATE doc SET v = {v}, title = 't{v}'{body} WHERE id = {k};\n"
                    ));
                    touched.insert((2, k.clone()));
                    effects.push(Effect::Put(2, k, v));
                }
            }
            _ => {
                if let Some(k) = self.pick(h, 2, touched) {
                    sql.push_str(&format!("DELETE FROM doc WHERE id = {k};\n"));
                    touched.insert((2, k.clone()));
                    effects.push(Effect::Delete(2, k));
                }
            }
        }
    }
}

async fn connect_retrying(db: &str) -> Client {
    let s = stack();
    let conn_str = format!(
        "host=127.0.0.1 port={} user={} password={} dbname={db} connect_timeout=5",
        s.pg_port, s.pg_user, s.pg_password
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match tokio_postgres::connect(&conn_str, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                return client;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("PostgreSQL did not come back within 120 s: {e}"),
        }
    }
}

/// Runs the workload until `stop`, recording what committed. A commit whose answer was lost
/// (PostgreSQL restarted under it) is settled by looking for its txlog row.
fn start_workload(
    db: String,
    mut w: Workload,
    history: Arc<Mutex<History>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut c = connect_retrying(&db).await;
        while !*stop.borrow() {
            let tx = {
                let h = history.lock().unwrap_or_else(|p| p.into_inner());
                w.draw(&h)
            };
            let committed = match c.batch_execute(&tx.sql).await {
                Ok(()) => true,
                Err(_) => {
                    c = connect_retrying(&db).await;
                    let found = c
                        .query_opt("SELECT 1 FROM txlog WHERE id = $1", &[&(tx.id as i64)])
                        .await
                        .ok()
                        .flatten()
                        .is_some();
                    history
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .indeterminate += 1;
                    found
                }
            };
            if committed {
                let mut h = history.lock().unwrap_or_else(|p| p.into_inner());
                h.record(&tx.effects);
                h.committed_tx += 1;
                if tx.effects.len() > 10_000 {
                    h.large_committed = true;
                }
            } else if tx.sql.contains("ADD COLUMN") {
                w.column_added = false;
                w.add_column_at = w.tx + 1;
            } else if tx.effects.len() > 10_000 {
                w.large_at = w.tx + 1;
            }
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    })
}

/// The target's rows as key → version, per table (None: the table is not there yet).
async fn target_versions(c: &Client) -> Option<[HashMap<String, i64>; 4]> {
    let mut out: [HashMap<String, i64>; 4] = Default::default();
    for (i, (t, key)) in TABLES.iter().enumerate() {
        let v = if *t == "txlog" { "0::bigint" } else { "v" };
        let sql = format!(
            "SELECT concat_ws(',', {key})::text, {v} FROM {t}",
            key = key.replace(' ', "")
        );
        let rows = c.query(&sql, &[]).await.ok()?;
        out[i] = rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
            .collect();
    }
    Some(out)
}

/// Per key, the target states seen, in the order seen (each change of state once).
#[derive(Default)]
struct Observed {
    seen: HashMap<Key, Vec<Option<i64>>>,
    last: [HashMap<String, i64>; 4],
}

impl Observed {
    fn add(&mut self, now: [HashMap<String, i64>; 4]) {
        for (t, current) in now.iter().enumerate() {
            for (k, v) in current {
                if self.last[t].get(k) != Some(v) {
                    self.seen.entry((t, k.clone())).or_default().push(Some(*v));
                }
            }
            for k in self.last[t].keys() {
                if !current.contains_key(k) {
                    self.seen.entry((t, k.clone())).or_default().push(None);
                }
            }
        }
        self.last = now;
    }
}

fn start_sampler(
    target_db: String,
    observed: Arc<Mutex<Observed>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut c = connect_retrying(&target_db).await;
        while !*stop.borrow() {
            match target_versions(&c).await {
                Some(now) => observed.lock().unwrap_or_else(|p| p.into_inner()).add(now),
                None => {
                    if c.is_closed() {
                        c = connect_retrying(&target_db).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
    })
}

/// One row event read back from Kafka: the state it gives its key, and its identity (topic,
/// source position, key, state). A re-send has the same identity, and so do a delete and its
/// tombstone. A key change closes the old key with a tombstone in the old key's partition,
/// which keeps each key's records in one partition, in order.
struct KafkaEvent {
    key: Key,
    version: Option<i64>,
    identity: (String, u64, u64, String, Option<i64>),
}

/// `X/Y` (the `bitclone9.lsn` header) as a number.
fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap_or(("0", "0"));
    (u64::from_str_radix(hi, 16).unwrap_or(0) << 32) | u64::from_str_radix(lo, 16).unwrap_or(0)
}

async fn kafka_events(source: &str) -> (Vec<KafkaEvent>, usize) {
    use apache_avro::types::Value as Avro;
    let mut out = Vec::new();
    let mut records = 0;
    for (t, (table, key)) in TABLES.iter().enumerate() {
        let topic = format!("{source}.public.{table}");
        let got = consume(&topic, 1, Duration::from_secs(4), Duration::from_secs(600)).await;
        records += got.len();
        let cols: Vec<&str> = key.split(", ").collect();
        let text = |v: Option<&Avro>| match v {
            Some(Avro::Long(v)) => v.to_string(),
            Some(Avro::Int(v)) => v.to_string(),
            Some(Avro::Union(_, inner)) => match inner.as_ref() {
                Avro::Long(v) => v.to_string(),
                Avro::Int(v) => v.to_string(),
                other => format!("{other:?}"),
            },
            other => format!("{other:?}"),
        };
        let key_of = |row: &HashMap<String, Avro>| -> String {
            cols.iter()
                .map(|c| text(row.get(*c)))
                .collect::<Vec<_>>()
                .join(",")
        };
        for r in got {
            let lsn = parse_lsn(r.headers.get("bitclone9.lsn").map_or("0/0", String::as_str));
            let seq: u64 = r
                .headers
                .get("bitclone9.seq")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let (k, version) = match r.op().as_deref() {
                // A tombstone: the key's row is gone.
                None => {
                    let Some(Avro::Record(fields)) = &r.key else {
                        continue;
                    };
                    let row: HashMap<String, Avro> = fields.iter().cloned().collect();
                    (key_of(&row), None)
                }
                Some("d") => match r.row("before") {
                    Some(b) => (key_of(&b), None),
                    None => continue,
                },
                Some("c") | Some("u") => match r.row("after") {
                    Some(a) => {
                        let v = match a.get("v") {
                            Some(Avro::Long(v)) => *v,
                            _ => 0,
                        };
                        (key_of(&a), Some(v))
                    }
                    None => continue,
                },
                // Snapshot reads and truncates carry no row event of a key.
                _ => continue,
            };
            out.push(KafkaEvent {
                key: (t, k.clone()),
                version,
                identity: (topic.clone(), lsn, seq, k, version),
            });
        }
    }
    (out, records)
}

#[derive(Default, Debug)]
struct Findings {
    changes: usize,
    lost: usize,
    doubled: usize,
    misordered: usize,
    stale_or_unknown_states: usize,
    divergent_rows: usize,
    examples: Vec<String>,
}

impl Findings {
    fn note(&mut self, s: String) {
        if self.examples.len() < 20 {
            self.examples.push(s);
        }
    }
}

/// Checks (1) and (2): Kafka holds every committed row event once (re-sends deduplicated by
/// their position), per key in commit order.
fn check_kafka(h: &History, events: Vec<KafkaEvent>, f: &mut Findings) {
    let mut seen_pos = HashSet::new();
    let mut per_key: HashMap<Key, Vec<Option<i64>>> = HashMap::new();
    for e in events {
        if !seen_pos.insert(e.identity.clone()) {
            continue; // sent again after a restart, or a delete's tombstone
        }
        per_key.entry(e.key).or_default().push(e.version);
    }
    for (key, committed) in &h.events {
        f.changes += committed.len();
        let got = per_key.remove(key).unwrap_or_default();
        if &got == committed {
            continue;
        }
        let want: HashSet<&Option<i64>> = committed.iter().filter(|v| v.is_some()).collect();
        let have: Vec<&Option<i64>> = got.iter().filter(|v| v.is_some()).collect();
        let have_set: HashSet<&Option<i64>> = have.iter().copied().collect();
        let lost = want.difference(&have_set).count()
            + committed
                .iter()
                .filter(|v| v.is_none())
                .count()
                .saturating_sub(got.iter().filter(|v| v.is_none()).count());
        let doubled = have.len() - have_set.len()
            + got
                .iter()
                .filter(|v| v.is_none())
                .count()
                .saturating_sub(committed.iter().filter(|v| v.is_none()).count());
        f.lost += lost;
        f.doubled += doubled;
        if lost == 0 && doubled == 0 {
            f.misordered += 1;
        }
        f.note(format!(
            "{} key {}: committed {committed:?}, on Kafka {got:?}",
            TABLES[key.0].0, key.1
        ));
    }
    for (key, got) in per_key {
        f.doubled += got.len();
        f.note(format!(
            "{} key {}: on Kafka {got:?} but never committed",
            TABLES[key.0].0, key.1
        ));
    }
}

/// Check (4): every target state seen is a committed state of its key, at or after the one
/// seen before.
fn check_observed(h: &History, o: &Observed, f: &mut Findings) {
    for (key, seen) in &o.seen {
        let Some(states) = h.states.get(key) else {
            f.stale_or_unknown_states += 1;
            f.note(format!(
                "{} key {}: target showed {seen:?}, never committed",
                TABLES[key.0].0, key.1
            ));
            continue;
        };
        let mut at = 0usize;
        let mut seen_a_row = false;
        for s in seen {
            let next = match s {
                Some(_) => states[at..].iter().position(|x| x == s).map(|i| at + i),
                // An absent row before any row was seen: not applied yet (no claim on where
                // the key stands). After a row: the state seen, or a later deletion.
                None if !seen_a_row => Some(at),
                None => states[at..]
                    .iter()
                    .position(|x| x.is_none())
                    .map(|i| at + i),
            };
            seen_a_row |= s.is_some();
            match next {
                Some(i) => at = i,
                None => {
                    f.stale_or_unknown_states += 1;
                    f.note(format!(
                        "{} key {}: target went to {s:?} after {:?}; committed {states:?}",
                        TABLES[key.0].0,
                        key.1,
                        states.get(at)
                    ));
                    break;
                }
            }
        }
    }
}

/// Check (5): row for row, and the number of rows that differ.
async fn divergent_rows(src: &Client, dst: &Client) -> (usize, Vec<String>) {
    let mut n = 0;
    let mut notes = Vec::new();
    for (t, order) in TABLES {
        let a: HashSet<String> = dump(src, t, order).await.into_iter().collect();
        let b: HashSet<String> = dump(dst, t, order).await.into_iter().collect();
        let d = a.symmetric_difference(&b).count();
        if d > 0 {
            notes.push(format!(
                "{t}: {d} rows differ (source {} rows, target {})",
                a.len(),
                b.len()
            ));
        }
        n += d;
    }
    (n, notes)
}

async fn max_txlog(c: &Client) -> i64 {
    c.query_one("SELECT coalesce(max(id), 0) FROM txlog", &[])
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_clone_stays_equal_under_randomized_faults() {
    let seed: u64 = env_num(
        "BC9_CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    );
    let cycles: u32 = env_num("BC9_CHAOS_CYCLES", 5);
    let scale: f64 = env_num("BC9_CHAOS_SCALE", 0.25);
    let large_rows: i64 = env_num("BC9_CHAOS_LARGE_ROWS", 200_000);
    println!("chaos: seed {seed} (replay with BC9_CHAOS_SEED={seed}), {cycles} cycles, fault scale {scale}");
    let mut rng = Rng(seed);
    if std::env::var("BC9_CHAOS_FRESH_KAFKA").is_ok_and(|v| v == "1") {
        println!("chaos: starting from a newly formatted Kafka broker");
        stack_script(&["fresh-kafka"]);
    }

    // Source and target, each reached by the daemon through a gate that a nemesis can cut.
    let s = stack();
    let (db, src) = db_with("chaos", DDL).await;
    let target_db = format!("{db}_t");
    let dst = fresh_db(&target_db).await;
    dst.batch_execute("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');")
        .await
        .expect("target type");
    // Rows the initial snapshot reads (enough for a SIGKILL to land inside it).
    src.batch_execute(&format!(
        "INSERT INTO acct SELECT g, g, (ARRAY['sad','ok','happy']::mood[])[1 + g % 3], 'n' || g FROM generate_series(1, 20000) g;
         INSERT INTO line SELECT g / 10, g % 10, 20000 + g, g % 5 FROM generate_series(1, 20000) g;
         INSERT INTO doc SELECT g, 40000 + g, 't' || g, {BIG_BODY} FROM generate_series(1, 300) g;"
    ))
    .await
    .expect("initial rows");
    let history = Arc::new(Mutex::new(History::default()));
    {
        let mut h = history.lock().unwrap_or_else(|p| p.into_inner());
        let mut initial = Vec::new();
        for g in 1..=20000i64 {
            initial.push(Effect::Put(0, g.to_string(), g));
            initial.push(Effect::Put(1, format!("{},{}", g / 10, g % 10), 20000 + g));
        }
        for g in 1..=300i64 {
            initial.push(Effect::Put(2, g.to_string(), 40000 + g));
        }
        h.record(&initial);
        // Snapshot reads, not row events: only the states count them.
        h.events.clear();
    }
    let source_gate = Gate::start(s.pg_port, true).await;
    let target_gate = Gate::start(s.pg_port, true).await;
    let registry_port: u16 = s
        .registry_url
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("registry port");
    let registry_gate = Gate::start(registry_port, true).await;
    let dir = std::env::temp_dir().join(unique("bc9chaos"));
    std::fs::create_dir_all(&dir).expect("state dir");
    let config = dir.join("bitclone9.toml");
    std::fs::write(
        &config,
        format!(
            r#"[daemon]
state_dir = "{state}"
log_level = "info"
[admin]
listen = "127.0.0.1:0"
[kafka]
bootstrap_servers = "{bootstrap}"
schema_registry_url = "http://127.0.0.1:{rport}/apis/ccompat/v7"
request_timeout = "10s"
[sources.{db}]
type = "postgres"
host = "127.0.0.1"
port = {sport}
user = "{user}"
password = "${{TEST_PG_PASSWORD}}"
database = "{db}"
heartbeat_interval = "1s"
status_interval = "200ms"
[sources.{db}.topics]
partitions = 3
[sinks.{db}_clone]
type = "postgres"
host = "127.0.0.1"
port = {tport}
user = "{user}"
password = "${{TEST_PG_PASSWORD}}"
database = "{target_db}"
source = "{db}"
max_batch_wait = "10ms"
"#,
            state = dir.join("state").display(),
            bootstrap = s.bootstrap,
            rport = registry_gate.port,
            sport = source_gate.port,
            tport = target_gate.port,
            user = s.pg_user,
        ),
    )
    .expect("config");
    let mut daemon = Supervised {
        config: config.clone(),
        daemon: None,
        starts: 0,
        peak_rss_mb: 0.0,
    };
    daemon.start();

    // A SIGKILL inside the initial snapshot, drawn at random; the workload starts once the
    // snapshot is recorded.
    let snapshot_kill = rng.chance(0.7);
    let started = Instant::now();
    let mut killed_in_snapshot = false;
    loop {
        let log = daemon
            .daemon
            .as_ref()
            .map(|d| d.log_text())
            .unwrap_or_default();
        if log.contains("snapshot delivered and recorded") {
            break;
        }
        if snapshot_kill && !killed_in_snapshot && log.contains("created replication slot") {
            tokio::time::sleep(Duration::from_millis(rng.below(1500))).await;
            let log = daemon
                .daemon
                .as_ref()
                .map(|d| d.log_text())
                .unwrap_or_default();
            if !log.contains("snapshot delivered and recorded") {
                println!("chaos: SIGKILL during the initial snapshot");
                daemon.sample_rss();
                if let Some(d) = daemon.daemon.as_mut() {
                    d.kill9();
                }
                killed_in_snapshot = true;
                tokio::time::sleep(Duration::from_secs(1)).await;
                daemon.start();
                continue;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the initial snapshot was not recorded within 300 s; log:\n{}",
            daemon.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "chaos: snapshot recorded after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let total_tx_hint = 200 * cycles as u64;
    let workload = Workload {
        rng: Rng(seed ^ 0x5EED),
        next_v: 100_000,
        next_id: 100_000,
        next_line: 100_000,
        tx: 0,
        add_column_at: 1 + Rng(seed).below(total_tx_hint),
        large_at: 1 + Rng(seed.rotate_left(7)).below(total_tx_hint),
        large_rows,
        column_added: false,
    };
    let load = start_workload(db.clone(), workload, history.clone(), stop_rx.clone());
    let observed = Arc::new(Mutex::new(Observed::default()));
    let sampler = start_sampler(target_db.clone(), observed.clone(), stop_rx.clone());

    let dur = |full_s: f64, rng: &mut Rng| {
        Duration::from_secs_f64((full_s * scale).max(1.0) * (0.5 + rng.below(1000) as f64 / 1000.0))
    };
    let mut recoveries: Vec<(u32, Vec<Nemesis>, f64)> = Vec::new();
    let mut count: BTreeMap<Nemesis, u32> = BTreeMap::new();
    for cycle in 1..=cycles {
        // A quiet spell; a SIGKILL lands while the large transaction is being streamed.
        let quiet = Instant::now() + Duration::from_millis(1000 + rng.below(4000));
        let mut during_large = false;
        while Instant::now() < quiet && !during_large {
            during_large = {
                let mut h = history.lock().unwrap_or_else(|p| p.into_inner());
                std::mem::take(&mut h.large_committed)
            };
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut faults = vec![if during_large {
            println!("chaos: the large transaction committed: SIGKILL while it streams");
            Nemesis::DaemonKill
        } else {
            NEMESES[rng.below(NEMESES.len() as u64) as usize]
        }];
        if rng.chance(0.3) {
            let second = NEMESES[rng.below(NEMESES.len() as u64) as usize];
            if !faults.contains(&second) {
                faults.push(second);
            }
        }
        // The daemon is stopped first, while every service still answers: a SIGTERM must then
        // end in a clean exit.
        faults.sort();
        // One way of stopping the daemon per cycle.
        if faults.contains(&Nemesis::DaemonKill) {
            faults.retain(|f| *f != Nemesis::DaemonTerm);
        }
        for f in &faults {
            *count.entry(*f).or_default() += 1;
        }
        println!("chaos: cycle {cycle}: {faults:?}");
        daemon.sample_rss();
        let mut frozen: Vec<Frozen> = Vec::new();
        let mut kafka_killed = false;
        let mut daemon_stopped = false;
        let mut hold = Duration::from_secs(0);
        for f in &faults {
            match f {
                Nemesis::DaemonKill => {
                    if let Some(d) = daemon.daemon.as_mut() {
                        d.kill9();
                    }
                    daemon_stopped = true;
                }
                Nemesis::DaemonTerm => {
                    if let Some(d) = daemon.daemon.as_mut() {
                        let code = d.terminate();
                        assert_eq!(
                            code,
                            Some(0),
                            "SIGTERM: a clean exit; log:\n{}",
                            daemon.log_tail()
                        );
                    }
                    daemon_stopped = true;
                }
                Nemesis::KafkaKill => {
                    send_signal("-KILL", pid_of("kafka/kafka.pid"));
                    kafka_killed = true;
                    hold = hold.max(dur(10.0, &mut rng));
                }
                Nemesis::KafkaFreeze => {
                    if !kafka_killed {
                        frozen.push(Frozen::new(pid_of("kafka/kafka.pid")));
                        hold = hold.max(dur(30.0, &mut rng));
                    }
                }
                Nemesis::RegistryFreeze => {
                    frozen.push(Frozen::new(pid_of("registry/registry.pid")));
                    hold = hold.max(dur(30.0, &mut rng));
                }
                Nemesis::PgRestartFast => stack_script(&["pg-restart", "fast"]),
                Nemesis::PgRestartImmediate => stack_script(&["pg-restart", "immediate"]),
                Nemesis::SourceCut => {
                    source_gate.set_open(false);
                    hold = hold.max(dur(30.0, &mut rng));
                }
                Nemesis::TargetCut => {
                    target_gate.set_open(false);
                    hold = hold.max(dur(60.0, &mut rng));
                }
                Nemesis::RegistryCut => {
                    registry_gate.set_open(false);
                    hold = hold.max(dur(30.0, &mut rng));
                }
            }
        }
        tokio::time::sleep(hold).await;
        // Heal: thaw, reopen, restart what was stopped.
        drop(frozen);
        source_gate.set_open(true);
        target_gate.set_open(true);
        registry_gate.set_open(true);
        if kafka_killed {
            stack_script(&["up", "kafka"]);
        }
        if daemon_stopped {
            tokio::time::sleep(Duration::from_millis(rng.below(2000))).await;
            daemon.start();
        }
        // Recovered: the target holds every transaction committed up to the heal.
        let healed = Instant::now();
        let want = max_txlog(&connect_retrying(&db).await).await;
        let target = connect_retrying(&target_db).await;
        loop {
            daemon.sample_rss();
            if max_txlog(&target).await >= want {
                break;
            }
            assert!(
                healed.elapsed() < Duration::from_secs(240),
                "cycle {cycle} ({faults:?}, seed {seed}): the clone did not catch up with the source within 240 s of the heal; daemon log:\n{}",
                daemon.log_tail()
            );
            if let Some(d) = daemon.daemon.as_mut() {
                assert!(
                    d.is_running(),
                    "cycle {cycle} (seed {seed}): the daemon exited by itself; log:\n{}",
                    daemon.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let took = healed.elapsed().as_secs_f64();
        println!(
            "chaos: cycle {cycle} recovered in {took:.1} s (peak RSS so far {:.0} MB)",
            daemon.peak_rss_mb
        );
        recoveries.push((cycle, faults, took));
    }

    // Stop the load; the clone must reach the source's final state by itself.
    let _ = stop_tx.send(true);
    load.await.expect("workload");
    let src = connect_retrying(&db).await;
    let dst = connect_retrying(&target_db).await;
    let want = max_txlog(&src).await;
    let settle = Instant::now();
    loop {
        daemon.sample_rss();
        if max_txlog(&dst).await >= want && divergent_rows(&src, &dst).await.0 == 0 {
            break;
        }
        if settle.elapsed() > Duration::from_secs(240) {
            break; // reported below as divergent rows
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sampler.await.expect("sampler");
    if let Some(now) = target_versions(&dst).await {
        observed.lock().unwrap_or_else(|p| p.into_inner()).add(now);
    }

    let mut f = Findings::default();
    let (d, notes) = divergent_rows(&src, &dst).await;
    f.divergent_rows = d;
    for n in notes {
        f.note(n);
    }
    let (verify_code, verify_out) = cli(&config, &["verify", "--rounds", "3"], &[]);
    let (events, records) = kafka_events(&db).await;
    let (committed_tx, indeterminate) = {
        let h = history.lock().unwrap_or_else(|p| p.into_inner());
        check_kafka(&h, events, &mut f);
        check_observed(
            &h,
            &observed.lock().unwrap_or_else(|p| p.into_inner()),
            &mut f,
        );
        (h.committed_tx, h.indeterminate)
    };
    daemon.sample_rss();
    let worst = recoveries.iter().map(|r| r.2).fold(0.0, f64::max);
    let mut sorted: Vec<f64> = recoveries.iter().map(|r| r.2).collect();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);

    println!("chaos: nemeses drawn: {count:?}");
    println!(
        "chaos: {} transactions committed ({} with a lost answer, settled by their txlog row), {records} Kafka records read",
        committed_tx, indeterminate
    );
    println!("| scenario | cycles | changes checked | lost | doubled | misordered | stale states | divergent rows | peak RSS | recovery (median / max) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| seed {seed}, scale {scale} | {cycles} | {} | {} | {} | {} | {} | {} | {:.0} MB | {median:.1} s / {worst:.1} s |",
        f.changes, f.lost, f.doubled, f.misordered, f.stale_or_unknown_states, f.divergent_rows, daemon.peak_rss_mb
    );
    for e in &f.examples {
        println!("chaos: finding: {e}");
    }
    let clean = f.lost == 0
        && f.doubled == 0
        && f.misordered == 0
        && f.stale_or_unknown_states == 0
        && f.divergent_rows == 0;
    assert!(
        clean,
        "seed {seed}: the clone broke its promise: {f:?}\ndaemon log:\n{}",
        daemon.log_tail()
    );
    assert!(f.changes > 0, "the workload committed nothing");
    assert_eq!(verify_code, Some(0), "verify disagrees: {verify_out}");
    assert!(
        daemon.peak_rss_mb < RSS_BOUND_MB,
        "peak RSS {:.0} MB over the bound of {RSS_BOUND_MB} MB",
        daemon.peak_rss_mb
    );
    if let Some(d) = daemon.daemon.as_mut() {
        assert_eq!(d.terminate(), Some(0), "clean stop at the end");
    }
    cleanup(&db).await;
    cleanup(&target_db).await;
}
