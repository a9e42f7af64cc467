//! Transactions of every size on the real stack: an aborted one and a rolled-back savepoint
//! send nothing, and a large one arrives whole, with one commit position and its changes
//! numbered without a gap, while the daemon's memory stays bounded.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_work_sends_nothing_and_a_large_transaction_arrives_whole() {
    let (db, client) = db_with("largetx", "CREATE TABLE t (id bigint PRIMARY KEY, v text)").await;
    let spec = SourceSpec::new(&db);
    let (cfg, _dir) = write_config(&spec, "");
    let daemon = Daemon::start_streaming(&cfg, "largetx").await;
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
        "large transaction of {big} rows: daemon peak RSS {} MB",
        rss / 1024
    );
    drop(daemon);
    cleanup(&db).await;
}
