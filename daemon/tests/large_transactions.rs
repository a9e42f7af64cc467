//! Transactions of every size on the real stack: an aborted one and a rolled-back savepoint
//! send nothing, and a large one arrives whole, with one commit position and its changes
//! numbered without a gap, while the daemon's memory stays bounded. Each runs twice: with
//! PostgreSQL streaming large transactions while they run (protocol version 2, forced here by
//! a `logical_decoding_work_mem` of 64kB) and with whole transactions at commit (version 1).

mod common;

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The memory bound the daemon keeps while a large transaction passes (as in the checker).
const RSS_BOUND_KB: u64 = 512 * 1024;

/// `(lsn, seq)` headers of every row event of `topic`, read without decoding values, until
/// `want` events are there (or `timeout`).
fn positions(topic: &str, want: usize, timeout: Duration) -> Vec<(String, u64)> {
    let s = stack();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &s.bootstrap)
        .set("group.id", unique("bc9large"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < want && Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let header = |name: &str| {
            m.headers().and_then(|hs| {
                hs.iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        };
        // Streamed row events carry their transaction id; snapshot records do not.
        if m.payload().is_none() || header("bitclone9.txid").is_none() {
            continue;
        }
        let (Some(lsn), Some(seq)) = (header("bitclone9.lsn"), header("bitclone9.seq")) else {
            continue;
        };
        out.push((lsn, seq.parse().expect("seq is a number")));
    }
    out
}

fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The daemon's metrics, fetched from its admin endpoint.
async fn metrics(daemon: &mut Daemon) -> std::collections::HashMap<String, f64> {
    let addr = admin_addr(daemon).await;
    let (code, text) = http_get(&addr, "/metrics", None).await;
    assert_eq!(code, 200);
    parse_prometheus(&text)
}

/// The sum of every series of `name` whose labels contain `label`.
fn metric(m: &std::collections::HashMap<String, f64>, name: &str, label: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}{{")) && k.contains(label))
        .map(|(_, v)| v)
        .sum()
}

/// The source settings that make PostgreSQL stream every transaction beyond 64kB, or send
/// every transaction whole.
fn streaming_setting(streaming: bool) -> String {
    if streaming {
        "stream_large_transactions = true\nlogical_decoding_work_mem = \"64kB\"\n".into()
    } else {
        // The default.
        String::new()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_aborted_work_sends_nothing_and_a_large_transaction_arrives_whole() {
    aborted_work_and_a_large_transaction(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_work_sends_nothing_and_a_large_transaction_arrives_whole() {
    aborted_work_and_a_large_transaction(false).await;
}

async fn aborted_work_and_a_large_transaction(streaming: bool) {
    let (db, client) = db_with("largetx", "CREATE TABLE t (id bigint PRIMARY KEY, v text)").await;
    let mut spec = SourceSpec::new(&db);
    spec.extra = streaming_setting(streaming);
    let (cfg, _dir) = write_config(&spec, "");
    let mut daemon = Daemon::start_streaming(&cfg, "largetx").await;
    let pid = daemon.child.id();
    let big: u64 = 300_000;
    client
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO t SELECT g, 'aborted' FROM generate_series(1, 200000) g;
             ROLLBACK;
             BEGIN;
             INSERT INTO t VALUES (1000001, 'a');
             SAVEPOINT s;
             INSERT INTO t SELECT g, 'rolled back' FROM generate_series(2000000, 2050000) g;
             ROLLBACK TO s;
             INSERT INTO t VALUES (1000002, 'b');
             COMMIT;
             INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(3000000, {}) g;",
            3_000_000 + big - 1
        ))
        .await
        .expect("transactions");
    // A statement string runs as one transaction: the marker is a transaction of its own.
    client
        .batch_execute("INSERT INTO t VALUES (9999999, 'end')")
        .await
        .expect("marker");
    let want = 2 + big as usize + 1;
    let got = positions(&spec.topic("t"), want, Duration::from_secs(300));
    assert_eq!(got.len(), want, "row events of committed work only");
    let mut by_tx: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (lsn, seq) in got {
        by_tx.entry(lsn).or_default().push(seq);
    }
    let mut sizes: Vec<usize> = by_tx.values().map(Vec::len).collect();
    sizes.sort();
    assert_eq!(
        sizes,
        vec![1, 2, big as usize],
        "three transactions: the marker, the one with a savepoint rolled back, the large one"
    );
    for seqs in by_tx.values() {
        let mut sorted = seqs.clone();
        sorted.sort();
        assert_eq!(sorted, seqs.clone(), "in order");
        let first = sorted[0];
        assert!(
            sorted
                .iter()
                .enumerate()
                .all(|(i, s)| *s == first + i as u64),
            "numbered without a gap: rolled-back changes take no number"
        );
    }
    // Nothing left over after the aborted work: the slot moved past it.
    let rss = peak_rss_kb(pid);
    assert!(
        rss > 0 && rss < RSS_BOUND_KB,
        "peak RSS {rss} kB within {RSS_BOUND_KB} kB"
    );
    eprintln!(
        "large transaction of {big} rows (streaming {streaming}): daemon peak RSS {} MB",
        rss / 1024
    );
    // Streaming was really used, or really not: the large and the aborted transaction went
    // through the spools (a savepoint of 50,000 rows was streamed and rolled back inside one).
    let m = metrics(&mut daemon).await;
    let committed = metric(
        &m,
        "bitclone9_source_streamed_transactions_total",
        "committed",
    );
    let aborted = metric(
        &m,
        "bitclone9_source_streamed_transactions_total",
        "aborted",
    );
    if streaming {
        assert!(committed >= 2.0, "streamed commits: {committed}");
        assert!(aborted >= 1.0, "streamed aborts: {aborted}");
        assert_eq!(
            metric(&m, "bitclone9_source_spool_bytes", ""),
            0.0,
            "spools emptied"
        );
    } else {
        assert_eq!(
            committed + aborted,
            0.0,
            "nothing streamed with streaming off"
        );
    }
    drop(daemon);
    cleanup(&db).await;
}

/// Spool files of `source` under a test's state dir, by directory.
fn spool_dirs(dir: &std::path::Path, source: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir.join("state").join("spool").join(source))
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_transaction_survives_a_kill_in_its_middle_and_arrives_once() {
    let (db, client) = db_with(
        "largetx",
        "CREATE TABLE t (id bigint PRIMARY KEY, v text); CREATE TABLE small (id int PRIMARY KEY)",
    )
    .await;
    let mut spec = SourceSpec::new(&db);
    spec.extra = streaming_setting(true);
    let (cfg, dir) = write_config(&spec, "");
    let mut daemon = Daemon::start_streaming(&cfg, "largetx").await;
    let writer = connect(&db, &stack().pg_user, &stack().pg_password).await;
    writer
        .batch_execute(
            "BEGIN; INSERT INTO t SELECT g, repeat('y', 50) FROM generate_series(1, 60000) g",
        )
        .await
        .expect("first half, not committed");
    daemon
        .wait_log("streamed transaction begins", Duration::from_secs(60))
        .await;
    // A transaction committed while the large one runs arrives before it.
    client
        .batch_execute("INSERT INTO small VALUES (1)")
        .await
        .expect("small commit");
    let small = positions(&spec.topic("small"), 1, Duration::from_secs(60));
    assert_eq!(
        small.len(),
        1,
        "a commit inside the large one's run is not held back"
    );
    let before_kill = spool_dirs(&dir, &spec.name);
    assert_eq!(before_kill.len(), 1, "one spool directory: {before_kill:?}");
    daemon.kill9();
    let mut daemon = Daemon::start_streaming(&cfg, "largetx-again").await;
    writer
        .batch_execute(
            "INSERT INTO t SELECT g, repeat('z', 50) FROM generate_series(60001, 120000) g; COMMIT",
        )
        .await
        .expect("second half and commit");
    let got = positions(&spec.topic("t"), 120_000, Duration::from_secs(300));
    assert_eq!(got.len(), 120_000, "every row of the large transaction");
    let lsns: std::collections::BTreeSet<&String> = got.iter().map(|(l, _)| l).collect();
    assert_eq!(lsns.len(), 1, "one commit position");
    let mut seqs: Vec<u64> = got.iter().map(|(_, s)| *s).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(
        seqs.len(),
        120_000,
        "each change once: no duplicates from before the kill"
    );
    assert_eq!(seqs.first(), Some(&0));
    let (small_lsn, big_lsn) = (small[0].0.clone(), got[0].0.clone());
    let as_num = |l: &str| {
        let (hi, lo) = l.split_once('/').expect("lsn hi/lo");
        (u64::from_str_radix(hi, 16).expect("hex") << 32)
            | u64::from_str_radix(lo, 16).expect("hex")
    };
    assert!(
        as_num(&small_lsn) < as_num(&big_lsn),
        "commit order: {small_lsn} before {big_lsn}"
    );
    // The killed process's spool is gone; the new one's holds nothing once all committed.
    let after = spool_dirs(&dir, &spec.name);
    assert!(
        after.iter().all(|d| !before_kill.contains(d)),
        "the killed process's spool was removed: {after:?}"
    );
    let m = metrics(&mut daemon).await;
    assert!(
        metric(
            &m,
            "bitclone9_source_streamed_transactions_total",
            "committed"
        ) >= 1.0
    );
    drop(daemon);
    cleanup(&db).await;
}
