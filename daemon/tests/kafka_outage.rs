//! A Kafka outage must not hold the source's replication connection. PostgreSQL's shutdown
//! waits until a walsender's client confirms the WAL it was sent, and the source confirms only
//! what Kafka acknowledged: a source that stayed connected through the outage would hold up a
//! restart of PostgreSQL. This freezes the shared broker, so it runs alone, with the checker
//! (scripts/test runs the `chaos_` tests after the others).

mod common;

use common::*;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn kafka_pid() -> i32 {
    let dir = std::env::var("BC9_STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.stack"));
    let path = dir.join("kafka/kafka.pid");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (is the stack up?)", path.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

async fn slot_active(db: &str) -> Option<bool> {
    admin()
        .await
        .query_opt(
            "SELECT active FROM pg_replication_slots WHERE database = $1",
            &[&db],
        )
        .await
        .expect("slots")
        .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_a_kafka_outage_releases_the_replication_connection() {
    let (db, client) = db_with("outage", "CREATE TABLE t (id bigint PRIMARY KEY, v text)").await;
    let spec = SourceSpec::new(&db);
    let (cfg, _dir) = write_config(&spec, "");
    let mut daemon = Daemon::start_streaming(&cfg, "outage").await;
    client
        .batch_execute("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 100) g")
        .await
        .expect("insert");
    let topic = spec.topic("t");
    let got = consume(&topic, 100, Duration::from_secs(2), Duration::from_secs(60)).await;
    assert!(got.len() >= 100, "{} records before the outage", got.len());
    assert_eq!(slot_active(&db).await, Some(true));

    let frozen = Frozen::new(kafka_pid());
    // WAL the walsender sends now cannot be confirmed until Kafka is back.
    client
        .batch_execute("INSERT INTO t SELECT g, 'during' FROM generate_series(101, 200) g")
        .await
        .expect("insert");
    let deadline = Instant::now() + Duration::from_secs(60);
    while slot_active(&db).await != Some(false) {
        assert!(
            Instant::now() < deadline,
            "the source still holds its replication connection a minute into the outage; log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The run's error is logged once its connections are closed: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = daemon.log_text();
        if log.contains("Kafka acknowledged no record for 15s")
            || log.contains("queue stayed full for 15s")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the log says why the source let go; log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // While Kafka stays down, the source does not connect to PostgreSQL again.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            slot_active(&db).await,
            Some(false),
            "reconnected during the outage"
        );
    }
    drop(frozen);

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let records = consume(&topic, 200, Duration::from_secs(2), Duration::from_secs(30)).await;
        let ids: HashSet<i64> = records.iter().filter_map(|r| r.key_long("id")).collect();
        if ids.len() == 200 && slot_active(&db).await == Some(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the outage: {} of 200 ids on Kafka; log:\n{}",
            ids.len(),
            daemon.log_text()
        );
    }
    assert_eq!(daemon.terminate(), Some(0), "{}", daemon.log_text());
    cleanup(&db).await;
}
