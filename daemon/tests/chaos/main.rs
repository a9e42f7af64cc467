//! The end-to-end checker: a clone through Kafka under randomized faults, checked against the
//! history of what the workload committed.
//!
//! ```text
//!  workload ──tx──► source db ──gate──► bitclone9 (source) ──► Kafka ──► bitclone9 (sink) ──gate──► target db
//!     │ history                          ▲ nemeses: SIGKILL / SIGTERM the daemon, kill -9 or freeze Kafka,
//!     ▼                                  │ freeze the registry, restart PostgreSQL (fast, immediate),
//!  checks ◄── Kafka topics, target samples, final dumps          cut the source / target / registry link,
//!                                                                drop the slot, make the state directory unwritable
//! ```
//!
//! Every fault is drawn from a seed the run prints (`BC9_CHAOS_SEED` replays it). Settings:
//! `BC9_CHAOS_CYCLES` (default 5), `BC9_CHAOS_SCALE` (fault durations, 1.0 = the full 30 s /
//! 60 s outages; default 0.25), `BC9_CHAOS_FRESH_KAFKA=1` (start from a newly formatted broker),
//! `BC9_CHAOS_LARGE_ROWS` (rows of the one large transaction, default 200000),
//! `BC9_CHAOS_NEMESES` (draw only these faults, e.g. `SlotDrop,StateDirUnwritable`),
//! `BC9_CHAOS_STREAMING=0` (large transactions sent whole at commit instead of streamed),
//! `BC9_CHAOS_EXTRA_DEFAULT=1` or `0` (add `acct.extra` with or without a default; else drawn).
//!
//! Checks at the end: (1) every committed change is on Kafka, re-sends carrying the same
//! (lsn, seq); (2) per key, Kafka's order is commit order; (4) every state the target was seen
//! in is a committed state of that key, never an older one than seen before; (5) the target
//! equals the source, row for row and in its columns (names, types, order: the workload adds a
//! column to `acct`, with a default for half the seeds, so that `acct` is read again; renames
//! `line.qty` to `quantity` and makes it `bigint`; drops `doc.title`, which the target keeps
//! (`on_column_drop = "keep"`: compared without it); turns `doc.code` from text into `bigint`
//! by an expression, which the registry refuses and the target cannot cast, so the run's
//! operator (`operator.rs`) does what the daemon's messages ask; creates table `late` and drops
//! table `gone`, each at a transaction drawn from the seed), and `bitclone9 verify` agrees; (6) every cycle
//! recovered without help; (7) the daemon's peak RSS stayed under a bound. (3), the slot never
//! confirming what Kafka lacks, is what (1) checks after each SIGKILL: a position confirmed too
//! early would be a gap.
//! The workload starts once the initial snapshot is recorded, so every change it commits must
//! appear on Kafka as a streamed event, except inside a slot-drop window: the daemon then takes
//! a new snapshot, which carries the rows of the changes it no longer streams. (1) excuses those
//! changes missing, nothing else; the sampler pauses while the new snapshot refills the target.
//!
//! New and dropped tables (the daemon checks its catalog every second): `late`'s changes from
//! its creation until the daemon's read of it are in that read's rows, so (1) excuses them
//! missing (a gap of `late` alone); the sampler looks at `late` only once the run saw that
//! read applied. `gone` is dropped at the source and kept in the target (`on_table_drop =
//! "keep"`): (1) and (2) hold for its changes as for any, its topic must carry the drop's
//! announcement on every partition after all of them, and (5) compares the target's `gone`
//! with the history's last state of each key (the source has no `gone` to compare with), as
//! (4) does all along.
//!
//! Files: `main.rs` the run and its cycles, `workload.rs` the transactions, `faults.rs` the
//! daemon's supervision and the nemeses, `check.rs` the history and the checks against it,
//! `operator.rs` the person who follows the daemon's messages.

#[path = "../common/mod.rs"]
mod common;

mod check;
mod faults;
mod operator;
mod workload;

use check::*;
use common::*;
use faults::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use workload::{
    start_workload, Rng, Shape, Workload, BIG_BODY, DDL, LATE_CREATED, LATE_READ,
    REWRITE_COMMITTED, REWRITE_ISSUED, REWRITE_SETTLED,
};

/// Peak resident memory the daemon may reach (source and sink in one process).
const RSS_BOUND_MB: f64 = 512.0;

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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

/// Table `t`'s rows in a database as key → version (`txlog`'s: version 0).
async fn versions(c: &Client, t: usize) -> Result<HashMap<String, i64>, tokio_postgres::Error> {
    let (table, key) = TABLES[t];
    let v = if table == "txlog" { "0::bigint" } else { "v" };
    let sql = format!(
        "SELECT concat_ws(',', {key})::text, {v} FROM {table}",
        key = key.replace(' ', "")
    );
    Ok(c.query(&sql, &[])
        .await?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect())
}

/// The target's rows as key → version, per table but those in `skip` (None: the tables are
/// not there yet). `late` is looked at where the target has it.
async fn target_versions(c: &Client, skip: &[usize]) -> Option<Sample> {
    let mut out: Sample = Default::default();
    for (t, rows) in out.iter_mut().enumerate() {
        if skip.contains(&t) {
            continue;
        }
        match versions(c, t).await {
            Ok(now) => *rows = Some(now),
            // Not created in the target yet: nothing to see.
            Err(e) if t == LATE && e.code() == Some(&SqlState::UNDEFINED_TABLE) => {}
            Err(_) => return None,
        }
    }
    Some(out)
}

/// Samples the target's states until `stop`. While `paused` (a new snapshot empties and refills
/// the target, whose states are then no committed states) it takes none, and drops a sample that
/// a pause began under. It looks at `late` only once the run saw its read applied (`late` at
/// [`LATE_READ`]): the read empties and fills it, again if interrupted.
fn start_sampler(
    target_db: String,
    observed: Arc<Mutex<Observed>>,
    resnapshot: Arc<AtomicBool>,
    rewrite: Arc<AtomicU8>,
    late: Arc<AtomicU8>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let paused = || {
            resnapshot.load(Ordering::SeqCst)
                || matches!(
                    rewrite.load(Ordering::SeqCst),
                    REWRITE_ISSUED | REWRITE_COMMITTED
                )
        };
        let mut c = connect_retrying(&target_db).await;
        while !*stop.borrow() {
            if paused() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let skip: &[usize] = if late.load(Ordering::SeqCst) >= LATE_READ {
                &[]
            } else {
                &[LATE]
            };
            match target_versions(&c, skip).await {
                Some(_) if paused() => {}
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

/// `X/Y` (the `bitclone9.lsn` header) as a number.
fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap_or(("0", "0"));
    (u64::from_str_radix(hi, 16).unwrap_or(0) << 32) | u64::from_str_radix(lo, 16).unwrap_or(0)
}

/// The row events on the workload's topics, the number of records read, and each topic's drop
/// announcements. `with_late`: `late` was read, so its topic exists (it is not read otherwise:
/// waiting for a first record of a topic that never comes would take the whole timeout).
async fn kafka_events(source: &str, with_late: bool) -> (Vec<KafkaEvent>, usize, Vec<DropMarks>) {
    use apache_avro::types::Value as Avro;
    let mut out = Vec::new();
    let mut records = 0;
    let mut all_marks = Vec::new();
    for (t, (table, key)) in TABLES.iter().enumerate() {
        if t == LATE && !with_late {
            continue;
        }
        let topic = format!("{source}.public.{table}");
        let got = consume(&topic, 1, Duration::from_secs(4), Duration::from_secs(600)).await;
        records += got.len();
        let mut marks = DropMarks {
            table: t,
            partitions: if t == GONE {
                topic_partitions(&topic).await
            } else {
                0
            },
            ..DropMarks::default()
        };
        // Per partition, the offset of its last drop announcement, and the row events in the
        // order read (offset order per partition) with whether each was new then.
        let mut last_mark: HashMap<i32, i64> = HashMap::new();
        let mut sent: HashSet<(u64, u64, String, Option<i64>)> = HashSet::new();
        let mut first_sends: Vec<(i32, i64, String)> = Vec::new();
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
            if r.headers
                .get("bitclone9.dropped")
                .is_some_and(|v| v == "true")
            {
                marks.markers += 1;
                let at = last_mark.entry(r.partition).or_insert(r.offset);
                *at = (*at).max(r.offset);
                continue;
            }
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
            if sent.insert((lsn, seq, k.clone(), version)) {
                first_sends.push((r.partition, r.offset, k.clone()));
            }
            out.push(KafkaEvent {
                key: (t, k.clone()),
                version,
                identity: (topic.clone(), lsn, seq, k, version),
            });
        }
        marks.marked = last_mark.keys().copied().collect();
        marks.after = first_sends
            .into_iter()
            .filter(|(p, offset, _)| last_mark.get(p).is_some_and(|m| offset > m))
            .map(|(_, _, k)| k)
            .collect();
        all_marks.push(marks);
    }
    (out, records, all_marks)
}

/// A table's columns as `name type` (`format_type`), in column order.
async fn columns(c: &Client, table: &str) -> Vec<String> {
    c.query(
        "SELECT attname::text || ' ' || format_type(atttypid, atttypmod) FROM pg_attribute
          WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        &[&table],
    )
    .await
    .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect())
    .unwrap_or_default()
}

/// Whether `table` exists in the database.
async fn exists(c: &Client, table: &str) -> bool {
    c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or_else(|e| panic!("looking for table {table}: {e}"))
}

/// The columns `gone` was created with, which the target keeps after the drop.
const GONE_COLUMNS: [&str; 2] = ["id bigint", "v bigint"];

/// Check (5), the tables' shape: the tables whose columns differ (a rename followed as a new
/// column, a type not changed), with what each side has. `gone`, once dropped at the source,
/// is kept in the target with the columns it had; so is `doc.title` once dropped at the source
/// (`on_column_drop = "keep"`), in its place.
async fn divergent_columns(src: &Client, dst: &Client, shape: &Shape) -> (usize, Vec<String>) {
    let mut notes = Vec::new();
    for (i, (t, _)) in TABLES.into_iter().enumerate() {
        let mut a = if i == GONE && shape.gone_dropped {
            Vec::from(GONE_COLUMNS.map(String::from))
        } else {
            columns(src, t).await
        };
        if t == "doc" && shape.title_dropped && a.len() >= 2 {
            a.insert(2, "title text".to_string());
        }
        let b = columns(dst, t).await;
        if a != b {
            notes.push(format!("{t}: columns differ: source {a:?}, target {b:?}"));
        }
    }
    (notes.len(), notes)
}

/// Check (5): row for row, and the number of rows that differ. `gone_final`: `gone` was
/// dropped at the source, and the target holds these rows of it (the history's last state of
/// each key), no other. `late` is compared once it exists on either side. Once `doc.title`
/// was dropped at the source (`title_dropped`), `doc` is compared without it: the target
/// keeps the column, with the values it had.
async fn divergent_rows(
    src: &Client,
    dst: &Client,
    gone_final: Option<&HashMap<String, i64>>,
    title_dropped: bool,
) -> (usize, Vec<String>) {
    let mut n = 0;
    let mut notes = Vec::new();
    for (i, (t, order)) in TABLES.into_iter().enumerate() {
        if let (GONE, Some(want)) = (i, gone_final) {
            let got = versions(dst, GONE)
                .await
                .unwrap_or_else(|e| panic!("reading the target's {t}: {e}"));
            let d = want.iter().filter(|(k, v)| got.get(*k) != Some(*v)).count()
                + got.keys().filter(|k| !want.contains_key(*k)).count();
            if d > 0 {
                notes.push(format!(
                    "{t} (dropped at the source): {d} rows differ from its last committed state ({} rows, target {})",
                    want.len(),
                    got.len()
                ));
            }
            n += d;
            continue;
        }
        let (in_src, in_dst) = (exists(src, t).await, exists(dst, t).await);
        if !in_src && !in_dst {
            continue; // `late`, not created
        }
        let mut a: HashSet<String> = HashSet::new();
        if in_src {
            a.extend(compared_rows(src, t, order, title_dropped).await);
        }
        let mut b: HashSet<String> = HashSet::new();
        if in_dst {
            b.extend(compared_rows(dst, t, order, title_dropped).await);
        }
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

/// `table`'s rows as text, as check (5) compares them: `doc` without `title` once the source
/// dropped it (`title_dropped`).
async fn compared_rows(c: &Client, table: &str, order: &str, title_dropped: bool) -> Vec<String> {
    if table != "doc" || !title_dropped {
        return dump(c, table, order).await;
    }
    c.query(
        &format!("SELECT ROW(id, v, body, code)::text FROM {table} ORDER BY {order}"),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("dump {table} without title: {e}"))
    .iter()
    .map(|r| r.get(0))
    .collect()
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
    // The faults to draw from: all, or those named in BC9_CHAOS_NEMESES (e.g. "SlotDrop,KafkaKill").
    let pool: Vec<Nemesis> = match std::env::var("BC9_CHAOS_NEMESES") {
        Ok(names) if !names.trim().is_empty() => {
            let pool: Vec<Nemesis> = NEMESES
                .iter()
                .copied()
                .filter(|n| names.split(',').any(|x| x.trim() == format!("{n:?}")))
                .collect();
            assert!(
                !pool.is_empty(),
                "BC9_CHAOS_NEMESES={names:?} names no fault of {NEMESES:?}"
            );
            pool
        }
        _ => NEMESES.to_vec(),
    };
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
         INSERT INTO doc SELECT g, 40000 + g, 't' || g, {BIG_BODY}, 'c' || (40000 + g) FROM generate_series(1, 300) g;
         INSERT INTO gone SELECT g, 60000 + g FROM generate_series(1, 500) g;"
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
        for g in 1..=500i64 {
            initial.push(Effect::Put(GONE, g.to_string(), 60000 + g));
        }
        h.record(0, &initial);
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
    let state_dir = dir.join("state");
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
# New tables (late) and dropped ones (gone) are found by a catalog check this often.
new_table_check_interval = "1s"
# Large transactions are streamed while they run (and spooled until they commit).
stream_large_transactions = {streaming}
logical_decoding_work_mem = "64kB"
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
# gone, dropped at the source, stays in the target with every change made before the drop.
on_table_drop = "keep"
"#,
            state = state_dir.display(),
            bootstrap = s.bootstrap,
            rport = registry_gate.port,
            sport = source_gate.port,
            streaming = std::env::var("BC9_CHAOS_STREAMING").map_or(true, |v| v != "0"),
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
        let log = daemon.log_text();
        if log.contains(SNAPSHOT_RECORDED) {
            break;
        }
        if snapshot_kill && !killed_in_snapshot && log.contains("created replication slot") {
            tokio::time::sleep(Duration::from_millis(rng.below(1500))).await;
            if !daemon.log_text().contains(SNAPSHOT_RECORDED) {
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
        rename_at: 1 + Rng(seed.rotate_left(13)).below(total_tx_hint),
        retype_at: 1 + Rng(seed.rotate_left(29)).below(total_tx_hint),
        create_at: 1 + Rng(seed.rotate_left(53)).below(total_tx_hint),
        drop_at: 1 + Rng(seed.rotate_left(59)).below(total_tx_hint),
        drop_column_at: 1 + Rng(seed.rotate_left(61)).below(total_tx_hint),
        retype_code_at: 1 + Rng(seed.rotate_left(67)).below(total_tx_hint),
        large_at: 1 + Rng(seed.rotate_left(7)).below(total_tx_hint),
        large_rows,
        shape: Shape::default(),
        extra_default: match std::env::var("BC9_CHAOS_EXTRA_DEFAULT").as_deref() {
            Ok("1") => true,
            Ok("0") => false,
            _ => Rng(seed.rotate_left(41)).below(2) == 1,
        },
        rewrite: Arc::new(AtomicU8::new(0)),
        late: Arc::new(AtomicU8::new(0)),
        drop_lock: Arc::new(tokio::sync::Mutex::new(())),
    };
    let rewrite = workload.rewrite.clone();
    let late = workload.late.clone();
    let drop_lock = workload.drop_lock.clone();
    println!(
        "chaos: DDL from transaction {} (acct ADD COLUMN extra{}), {} (line RENAME qty TO quantity), {} (line's quantity column TYPE bigint), {} (CREATE TABLE late), {} (DROP TABLE gone), {} (doc DROP COLUMN title), {} (doc.code text → bigint USING an expression)",
        workload.add_column_at,
        if workload.extra_default { " DEFAULT, read again" } else { "" },
        workload.rename_at,
        workload.retype_at,
        workload.create_at,
        workload.drop_at,
        workload.drop_column_at,
        workload.retype_code_at
    );
    let load = start_workload(db.clone(), workload, history.clone(), stop_rx.clone());
    let observed = Arc::new(Mutex::new(Observed::default()));
    // Set while a slot drop's new snapshot empties and refills the target.
    let resnapshot = Arc::new(AtomicBool::new(false));
    // The operator stays until the final checks: the daemon may ask for help while settling.
    let (operator_stop, operator_stop_rx) = tokio::sync::watch::channel(false);
    let operator = operator::start_operator(
        config
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default(),
        target_db.clone(),
        operator_stop_rx,
    );
    let sampler = start_sampler(
        target_db.clone(),
        observed.clone(),
        resnapshot.clone(),
        rewrite.clone(),
        late.clone(),
        stop_rx.clone(),
    );
    // The source's slot (SourceConfig::slot_name: its name, dashes as underscores).
    let slot = format!("bitclone9_{}", db.replace('-', "_"));

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
            pool[rng.below(pool.len() as u64) as usize]
        }];
        if rng.chance(0.3) {
            let second = pool[rng.below(pool.len() as u64) as usize];
            if !faults.contains(&second) {
                faults.push(second);
            }
        }
        // The daemon is stopped first and the slot dropped next, while every service still
        // answers: a SIGTERM must then end in a clean exit, and the slot confirm what committed.
        faults.sort();
        // One way of stopping the daemon per cycle.
        if faults.contains(&Nemesis::DaemonKill) {
            faults.retain(|f| *f != Nemesis::DaemonTerm);
        }
        // A SIGTERM's clean stop checkpoints: not onto an unwritable state directory.
        if faults.contains(&Nemesis::DaemonTerm) {
            faults.retain(|f| *f != Nemesis::StateDirUnwritable);
        }
        // A slot drop is followed in the log of the daemon's run: no run may end in its cycle.
        let ending_a_run = [
            Nemesis::DaemonKill,
            Nemesis::DaemonTerm,
            Nemesis::StateDirUnwritable,
        ];
        if faults.iter().any(|f| ending_a_run.contains(f)) {
            faults.retain(|f| *f != Nemesis::SlotDrop);
        }
        for f in &faults {
            *count.entry(*f).or_default() += 1;
        }
        println!("chaos: cycle {cycle}: {faults:?}");
        let context = format!("cycle {cycle} ({faults:?}, seed {seed})");
        let unwritable_cycle = faults.contains(&Nemesis::StateDirUnwritable);
        daemon.sample_rss();
        let mut frozen: Vec<Frozen> = Vec::new();
        let mut unwritable: Option<Unwritable> = None;
        let mut slot_window: Option<SlotWindow> = None;
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
                Nemesis::SlotDrop => {
                    slot_window =
                        Some(drop_slot(&daemon, &slot, &history, &resnapshot, &drop_lock).await);
                    hold = hold.max(dur(5.0, &mut rng));
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
                Nemesis::StateDirUnwritable => {
                    unwritable = Some(Unwritable::new(&state_dir));
                    hold = hold.max(dur(20.0, &mut rng));
                }
            }
        }
        tokio::time::sleep(hold).await;
        // Heal: thaw, make writable, reopen, restart what was stopped.
        drop(frozen);
        drop(unwritable);
        source_gate.set_open(true);
        target_gate.set_open(true);
        registry_gate.set_open(true);
        if kafka_killed {
            stack_script(&["up", "kafka"]);
        }
        if daemon_stopped {
            tokio::time::sleep(Duration::from_millis(rng.below(2000))).await;
            daemon.start();
        } else if unwritable_cycle {
            // It said so while it lasted (the error of a call that failed just before the heal
            // may be a moment late in the log), and keeps running.
            let told = |log: &str| {
                (log.contains("checkpoint store failed") && log.contains("state directory"))
                    || (log.contains("spool file")
                        && log.contains("permissions under the daemon's state_dir"))
            };
            let since = Instant::now();
            while !told(&daemon.log_text()) && since.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(
                told(&daemon.log_text()),
                "{context}: the daemon did not report its unwritable state directory; log:\n{}",
                daemon.log_tail()
            );
            daemon.assert_running(&context);
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
                "{context}: the clone did not catch up with the source within 240 s of the heal; daemon log:\n{}",
                daemon.log_tail()
            );
            daemon.assert_running(&context);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // `late`'s topic is among those the target must have applied once `late` was read.
        let with_late = late.load(Ordering::SeqCst) >= LATE_READ;
        if let Some(w) = slot_window {
            await_resnapshot(&mut daemon, &w, &db, &target, &context, with_late).await;
            let end = {
                let mut h = history.lock().unwrap_or_else(|p| p.into_inner());
                let end = h.committed_tx;
                h.gaps.push((w.start, end));
                end
            };
            resnapshot.store(false, Ordering::SeqCst);
            println!(
                "chaos: slot dropped; window of transactions {}..{end} re-snapshotted",
                w.start
            );
            // The window closes (`w` and its hold on the drop of `gone` go here).
        }
        if rewrite.load(Ordering::SeqCst) == REWRITE_COMMITTED {
            await_reread(&mut daemon, &db, &target, &context, with_late).await;
            rewrite.store(REWRITE_SETTLED, Ordering::SeqCst);
            println!("chaos: acct read again after ADD COLUMN extra DEFAULT");
        }
        if late.load(Ordering::SeqCst) == LATE_CREATED {
            let end = await_late_read(&mut daemon, &db, &target, &context, &history).await;
            late.store(LATE_READ, Ordering::SeqCst);
            println!(
                "chaos: the new table late was added and read (its gap ends at transaction {end})"
            );
        }
        let took = healed.elapsed().as_secs_f64();
        let memory = daemon.memory_now().await;
        println!(
            "chaos: cycle {cycle} recovered in {took:.1} s (peak RSS so far {:.0} MB; now {memory})",
            daemon.peak_rss_mb
        );
        recoveries.push((cycle, faults, took));
    }

    // Stop the load; the clone must reach the source's final state by itself.
    let _ = stop_tx.send(true);
    let shape = load.await.expect("workload").shape;
    let src = connect_retrying(&db).await;
    let dst = connect_retrying(&target_db).await;
    let at_end = format!("seed {seed}, at the end");
    if rewrite.load(Ordering::SeqCst) == REWRITE_COMMITTED {
        let with_late = late.load(Ordering::SeqCst) >= LATE_READ;
        await_reread(&mut daemon, &db, &dst, &at_end, with_late).await;
    }
    if late.load(Ordering::SeqCst) == LATE_CREATED {
        let end = await_late_read(&mut daemon, &db, &dst, &at_end, &history).await;
        late.store(LATE_READ, Ordering::SeqCst);
        println!("chaos: the new table late was added and read at the end (its gap ends at transaction {end})");
    }
    let with_late = late.load(Ordering::SeqCst) >= LATE_READ;
    if shape.gone_dropped {
        await_drop_applied(&mut daemon, &db, &dst, &at_end, with_late).await;
    }
    // The checker's own bookkeeping: the DDL it counts as committed is the source's shape.
    let source_line = columns(&src, "line").await;
    assert_eq!(
        source_line,
        shape.line_columns(),
        "seed {seed}: the workload's notion of line's columns ({shape:?}) is not the source's"
    );
    println!("chaos: line's columns at the end: {source_line:?}");
    assert_eq!(
        (exists(&src, "late").await, exists(&src, "gone").await),
        (shape.late, !shape.gone_dropped),
        "seed {seed}: the workload's notion of which of late and gone exist ({shape:?}) is not the source's"
    );
    let (late_created, gone_dropped, gone_final) = {
        let h = history.lock().unwrap_or_else(|p| p.into_inner());
        let gone_final = h.gone_dropped.map(|_| h.final_rows(GONE));
        (h.late_created, h.gone_dropped, gone_final)
    };
    println!(
        "chaos: late created by transaction {late_created:?}, gone dropped by transaction {gone_dropped:?}"
    );
    let want = max_txlog(&src).await;
    let settle = Instant::now();
    loop {
        daemon.sample_rss();
        if max_txlog(&dst).await >= want
            && divergent_columns(&src, &dst, &shape).await.0 == 0
            && divergent_rows(&src, &dst, gone_final.as_ref(), shape.title_dropped)
                .await
                .0
                == 0
        {
            break;
        }
        if settle.elapsed() > Duration::from_secs(240) {
            break; // reported below as divergent rows
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sampler.await.expect("sampler");
    let _ = operator_stop.send(true);
    let helped = operator.await.expect("operator");
    println!("chaos: the operator did: {helped:?}");
    let skip: &[usize] = if with_late { &[] } else { &[LATE] };
    if let Some(now) = target_versions(&dst, skip).await {
        observed.lock().unwrap_or_else(|p| p.into_inner()).add(now);
    }

    let mut f = Findings::default();
    let (d, notes) = divergent_columns(&src, &dst, &shape).await;
    f.divergent_columns = d;
    for n in notes {
        f.note(n);
    }
    let (d, notes) = divergent_rows(&src, &dst, gone_final.as_ref(), shape.title_dropped).await;
    f.divergent_rows = d;
    for n in notes {
        f.note(n);
    }
    let (verify_code, verify_out) = cli(&config, &["verify", "--rounds", "3"], &[]);
    let (events, records, marks) = kafka_events(&db, with_late).await;
    let (committed_tx, indeterminate) = {
        let h = history.lock().unwrap_or_else(|p| p.into_inner());
        check_kafka(&h, events, &mut f);
        check_drops(&h, &marks, &mut f);
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
    if f.excused > 0 {
        println!(
            "chaos: {} committed changes inside slot-drop windows or before late's read not on Kafka as row events (in a snapshot's or the read's rows)",
            f.excused
        );
    }
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
        && f.divergent_columns == 0
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
