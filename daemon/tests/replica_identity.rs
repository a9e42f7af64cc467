//! Each replica identity mode, cloned through the real stack: the Kafka key and `before` image
//! it gives, and how the sink applies its updates and deletes (docs/sinks.md, "Replica
//! identity"). Tables without any identity are left out, named, and their own writes still work.

mod common;

use common::clone::{wait_equal, Clone};
use common::*;
use std::time::Duration;

const TABLES: &str = "
CREATE TABLE pk_default (id int PRIMARY KEY, v text);
CREATE TABLE pk_full (id int PRIMARY KEY, v text);
ALTER TABLE pk_full REPLICA IDENTITY FULL;
CREATE TABLE by_index (a int NOT NULL, b int NOT NULL, v text, CONSTRAINT by_index_ab UNIQUE (a, b));
ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_ab;
CREATE TABLE keyless (v text, n int, j json, big text);
ALTER TABLE keyless REPLICA IDENTITY FULL;
CREATE TABLE nothing (id int PRIMARY KEY, v text);
ALTER TABLE nothing REPLICA IDENTITY NOTHING;
CREATE TABLE keyless_default (v text);
CREATE TABLE parted (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE parted_eu PARTITION OF parted FOR VALUES IN ('eu');
CREATE TABLE parted_us PARTITION OF parted FOR VALUES IN ('us');
INSERT INTO pk_default SELECT g, 'v' || g FROM generate_series(1, 20) g;
INSERT INTO pk_full SELECT g, 'v' || g FROM generate_series(1, 20) g;
INSERT INTO by_index SELECT g, g % 3, 'v' || g FROM generate_series(1, 20) g;
INSERT INTO keyless SELECT 'dup', 1, '{\"a\": 1}', NULL FROM generate_series(1, 3);
INSERT INTO keyless SELECT 'r' || g, NULLIF(g % 4, 0), '[1, 2]', NULL FROM generate_series(1, 20) g;
INSERT INTO nothing SELECT g, 'v' || g FROM generate_series(1, 5) g;
INSERT INTO keyless_default VALUES ('x');
INSERT INTO parted SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, 'v' || g FROM generate_series(1, 20) g;
";

/// Changes after the snapshot, for every table.
const CHANGES: &str = "
UPDATE pk_default SET v = 'changed' WHERE id <= 5;
DELETE FROM pk_default WHERE id > 15;
UPDATE pk_full SET v = 'changed' WHERE id <= 5;
UPDATE pk_full SET id = id + 100 WHERE id = 6;
DELETE FROM pk_full WHERE id > 15;
UPDATE by_index SET v = 'changed' WHERE a <= 5;
UPDATE by_index SET b = b + 10 WHERE a = 6;
DELETE FROM by_index WHERE a > 15;
-- One of three identical rows changes, then one of the remaining two goes.
UPDATE keyless SET n = 2 WHERE ctid = (SELECT ctid FROM keyless WHERE v = 'dup' LIMIT 1);
DELETE FROM keyless WHERE ctid = (SELECT ctid FROM keyless WHERE v = 'dup' AND n = 1 LIMIT 1);
-- NULLs match NULLs; json (no equality operator) matches by its text.
UPDATE keyless SET v = v || '!' WHERE n IS NULL;
DELETE FROM keyless WHERE v IN ('r1', 'r2');
INSERT INTO keyless VALUES ('dup', 1, '{\"a\": 1}', NULL), ('late', NULL, NULL, NULL);
-- A large (TOASTed) value the next update leaves unchanged: the new row does not carry it.
INSERT INTO keyless VALUES ('toast', 7, NULL, (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g));
UPDATE keyless SET n = 8 WHERE v = 'toast';
-- Rows that move between partitions, reported under the root.
UPDATE parted SET region = 'eu' WHERE id IN (1, 3, 5);
DELETE FROM parted WHERE id = 2;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_identity_is_cloned_equal_and_tables_without_one_are_left_out() {
    let cl = Clone::with_partitions("identity", TABLES, "", "", 3).await;
    let mut daemon = Daemon::start(&cl.config, "identity");
    let cloned = [
        ("pk_default", "id"),
        ("pk_full", "id"),
        ("by_index", "a, b"),
        ("keyless", "dump_row::text"),
        ("parted", "id, region"),
    ];
    wait_equal(&cl, &cloned, Duration::from_secs(90)).await;
    for t in ["nothing", "keyless_default"] {
        assert!(
            daemon
                .log_text()
                .contains(&format!("table public.{t} is left out")),
            "{t} is named as left out: {}",
            daemon.log_text()
        );
    }
    let addr = admin_addr(&mut daemon).await;
    let (_, status) = http_get(&addr, "/status", None).await;
    assert!(
        status.contains("left_out_tables") && status.contains("public.nothing"),
        "/status names the tables left out: {status}"
    );

    cl.src.batch_execute(CHANGES).await.expect("changes");
    // The source's own writes to the tables left out still work (they are not published).
    cl.src
        .batch_execute("UPDATE nothing SET v = 'w'; DELETE FROM keyless_default")
        .await
        .expect("writes to tables left out");
    wait_equal(&cl, &cloned, Duration::from_secs(90)).await;
    let dups: i64 = cl
        .dst
        .query_one("SELECT count(*) FROM keyless WHERE v = 'dup'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        dups, 3,
        "two of the three identical rows are left, and one came"
    );

    // A crash and a restart replay what the sink may have applied: still equal, nothing doubled.
    daemon.kill9();
    cl.src
        .batch_execute(
            "INSERT INTO keyless SELECT 'dup', 1, NULL, NULL FROM generate_series(1, 50);
             DELETE FROM keyless WHERE ctid IN (SELECT ctid FROM keyless WHERE v = 'dup' LIMIT 10);",
        )
        .await
        .expect("more");
    let daemon = Daemon::start(&cl.config, "identity-2");
    wait_equal(&cl, &cloned, Duration::from_secs(90)).await;
    assert!(
        !daemon.log_text().contains("found no row"),
        "every update and delete found its row"
    );

    // What each mode puts on Kafka.
    let records = |t: &str| {
        let topic = cl.spec.topic(t);
        async move { consume(&topic, 1, Duration::from_secs(2), Duration::from_secs(30)).await }
    };
    fn deletes(rs: &[Record]) -> Vec<&Record> {
        rs.iter()
            .filter(|r| r.op().as_deref() == Some("d"))
            .collect()
    }
    let pk_default = records("pk_default").await;
    let pk_default = deletes(&pk_default);
    assert!(!pk_default.is_empty());
    for d in &pk_default {
        let before = d.row("before").expect("before");
        assert_eq!(
            before.get("v"),
            Some(&apache_avro::types::Value::Null),
            "DEFAULT: the old row holds only the key"
        );
    }
    let pk_full = records("pk_full").await;
    let pk_full = deletes(&pk_full);
    assert!(!pk_full.is_empty());
    for d in &pk_full {
        let before = d.row("before").expect("before");
        assert!(
            matches!(before.get("v"), Some(apache_avro::types::Value::String(_))),
            "FULL: the old row is whole: {before:?}"
        );
        assert!(d.key_long("id").is_some(), "the key is the primary key");
    }
    let by_index = records("by_index").await;
    let by_index = deletes(&by_index);
    assert!(!by_index.is_empty());
    for d in &by_index {
        let key = format!("{:?}", d.key);
        assert!(
            key.contains("\"a\"") && key.contains("\"b\""),
            "USING INDEX: the key is the index's columns: {key}"
        );
    }
    let keyless = records("keyless").await;
    let rows: Vec<&Record> = keyless
        .iter()
        .filter(|r| r.op().is_some_and(|op| op != "t"))
        .collect();
    assert!(rows.len() > 20, "{} row events", rows.len());
    assert!(
        rows.iter().all(|r| r.key.is_none() && r.partition == 0),
        "no key, and one partition (so commit order): {:?}",
        rows.iter().map(|r| r.partition).collect::<Vec<_>>()
    );
    drop(daemon);
    cl.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_full_setting_captures_a_table_without_a_key() {
    let cl = Clone::new(
        "identityset",
        "CREATE TABLE plain (v text, n int); INSERT INTO plain VALUES ('a', 1), ('a', 1), ('b', 2);",
        "",
        "",
    )
    .await;
    let mut text = std::fs::read_to_string(&cl.config).expect("config");
    text = text.replacen(
        "heartbeat_interval",
        "replica_identity_full = true\nheartbeat_interval",
        1,
    );
    std::fs::write(&cl.config, text).expect("config");
    let daemon = Daemon::start(&cl.config, "identityset");
    wait_equal(&cl, &[("plain", "dump_row::text")], Duration::from_secs(90)).await;
    let identity: String = cl
        .src
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE oid = 'plain'::regclass",
            &[],
        )
        .await
        .expect("identity")
        .get(0);
    assert_eq!(identity, "f", "the daemon set REPLICA IDENTITY FULL");
    cl.src
        .batch_execute("DELETE FROM plain WHERE ctid = (SELECT ctid FROM plain WHERE v = 'a' LIMIT 1); UPDATE plain SET n = 3 WHERE v = 'b'")
        .await
        .expect("changes");
    wait_equal(&cl, &[("plain", "dump_row::text")], Duration::from_secs(90)).await;
    assert!(daemon.log_text().contains("set REPLICA IDENTITY FULL"));
    drop(daemon);
    cl.cleanup().await;
}
