//! Tables dropped at the source, on the real stack: the source announces the drop on the
//! table's topic once every change of the table is there, and the sink keeps or drops the
//! target table as its `on_table_drop` says; a table created again under the same name is
//! cloned afresh, also when the drop and the new table happened while the daemon was stopped.

mod common;

use common::clone::{read_rows, wait_same};
use common::*;
use std::time::{Duration, Instant};

async fn exists(c: &tokio_postgres::Client, table: &str) -> bool {
    c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .expect("regclass")
        .get(0)
}

/// Waits until `table` is missing from the target (or present, with `present`).
async fn wait_exists(c: &tokio_postgres::Client, table: &str, present: bool, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while exists(c, table).await != present {
        assert!(
            Instant::now() < deadline,
            "target table {table} still {} after {timeout:?}",
            if present { "missing" } else { "there" }
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn column_names(c: &tokio_postgres::Client, table: &str) -> Vec<String> {
    c.query(
        "SELECT attname::text FROM pg_attribute
          WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        &[&table],
    )
    .await
    .expect("columns")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// A clone of tables `gone` and `stays` whose source checks its catalog every second, running
/// and caught up.
async fn cloned(prefix: &str, sink_extra: &str) -> (common::clone::Clone, Daemon) {
    let cl = common::clone::Clone::with_partitions(
        prefix,
        "CREATE TABLE gone (id int PRIMARY KEY, v text, n int);
         INSERT INTO gone SELECT g, 'v' || g, g FROM generate_series(1, 100) g;
         CREATE TABLE stays (id int PRIMARY KEY, v int);
         INSERT INTO stays SELECT g, g FROM generate_series(1, 20) g",
        "",
        sink_extra,
        2,
    )
    .await;
    cl.set_source_option("new_table_check_interval = \"1s\"");
    let daemon = Daemon::start(&cl.config, prefix);
    wait_same(
        &cl,
        "SELECT * FROM gone ORDER BY id",
        Duration::from_secs(90),
    )
    .await;
    wait_same(
        &cl,
        "SELECT * FROM stays ORDER BY id",
        Duration::from_secs(30),
    )
    .await;
    (cl, daemon)
}

/// `on_table_drop = "drop"`: the target table goes with the source's, and a table created
/// again under the name is created afresh with its own columns, whether the drop is found
/// while streaming or at a start after the daemon was stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_table_drop_drop_removes_the_target_table_and_a_new_table_of_the_name_is_cloned_afresh()
{
    let (cl, mut daemon) = cloned("skdropdrop", "on_table_drop = \"drop\"").await;

    cl.src
        .batch_execute(
            "UPDATE gone SET n = n + 1000 WHERE id <= 10; DROP TABLE gone;
             UPDATE stays SET v = v + 1 WHERE id <= 5",
        )
        .await
        .expect("drop");
    wait_exists(&cl.dst, "gone", false, Duration::from_secs(60)).await;
    wait_same(
        &cl,
        "SELECT * FROM stays ORDER BY id",
        Duration::from_secs(30),
    )
    .await;
    let addr = admin_addr(&mut daemon).await;
    let sink_metric = "bitclone9_sink_source_tables_dropped_total";
    assert_eq!(
        metric_sum(&addr, sink_metric, "action=\"dropped\"").await,
        1.0,
        "the drop is applied once, not once per partition"
    );
    assert!(daemon
        .log_text()
        .contains("announced the table's drop on its topic"));

    // Created again while streaming, with other columns.
    cl.src
        .batch_execute(
            "CREATE TABLE gone (id int PRIMARY KEY, w text);
             INSERT INTO gone SELECT g, 'w' || g FROM generate_series(1, 30) g",
        )
        .await
        .expect("create again");
    wait_same(
        &cl,
        "SELECT * FROM gone ORDER BY id",
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(column_names(&cl.dst, "gone").await, ["id", "w"]);

    // Dropped and created again while the daemon is stopped: the drop is announced before the
    // new table's rows, so the new target table is not dropped after it was filled.
    daemon.terminate();
    cl.src
        .batch_execute(
            "UPDATE gone SET w = w || '!' WHERE id <= 3;
             DROP TABLE gone;
             CREATE TABLE gone (id int PRIMARY KEY, z int);
             INSERT INTO gone SELECT g, g * 7 FROM generate_series(1, 40) g",
        )
        .await
        .expect("drop and create while stopped");
    let mut daemon = Daemon::start(&cl.config, "dropdrop-restart");
    wait_same(
        &cl,
        "SELECT * FROM gone ORDER BY id",
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(column_names(&cl.dst, "gone").await, ["id", "z"]);
    // Changes after the new table's read still flow.
    cl.src
        .batch_execute("INSERT INTO gone VALUES (41, 1); UPDATE stays SET v = 0 WHERE id = 1")
        .await
        .expect("more");
    wait_same(
        &cl,
        "SELECT * FROM gone ORDER BY id",
        Duration::from_secs(60),
    )
    .await;
    wait_same(
        &cl,
        "SELECT * FROM stays ORDER BY id",
        Duration::from_secs(30),
    )
    .await;
    let addr = admin_addr(&mut daemon).await;
    assert_eq!(
        metric_sum(&addr, sink_metric, "action=\"dropped\"").await,
        1.0
    );
    drop(daemon);
    cl.cleanup().await;
}

/// `on_table_drop = "keep"` (the default): the target table keeps every change the source
/// made before the drop, also one made just before a drop while the daemon was stopped; a
/// table only taken out of the publication is not announced as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_table_drop_keep_keeps_the_target_table_with_every_change_made_before_the_drop() {
    let (cl, mut daemon) = cloned("skdropkeep", "").await;

    // Taken out of the publication by hand: no longer captured, and not a drop.
    let publication: String = cl
        .src
        .query_one(
            "SELECT pubname::text FROM pg_publication_tables WHERE tablename = 'stays'",
            &[],
        )
        .await
        .expect("publication")
        .get(0);
    cl.src
        .batch_execute(&format!(
            "ALTER PUBLICATION \"{publication}\" DROP TABLE stays"
        ))
        .await
        .expect("unpublish");
    daemon
        .wait_log(
            "tables taken out of the publication",
            Duration::from_secs(30),
        )
        .await;

    // The last changes and the drop happen while the daemon is stopped.
    daemon.terminate();
    cl.src
        .batch_execute(
            "UPDATE gone SET v = 'last' WHERE id <= 10; DELETE FROM gone WHERE id > 90;
             INSERT INTO gone VALUES (1000, 'new', 0)",
        )
        .await
        .expect("last changes");
    let before_drop = read_rows(&cl.src, "SELECT * FROM gone ORDER BY id").await;
    cl.src.batch_execute("DROP TABLE gone").await.expect("drop");
    let mut daemon = Daemon::start(&cl.config, "dropkeep-restart");
    let addr = admin_addr(&mut daemon).await;
    let sink_metric = "bitclone9_sink_source_tables_dropped_total";
    let deadline = Instant::now() + Duration::from_secs(90);
    while metric_sum(&addr, sink_metric, "action=\"kept\"").await < 1.0 {
        assert!(Instant::now() < deadline, "the drop never reached the sink");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        read_rows(&cl.dst, "SELECT * FROM gone ORDER BY id").await,
        before_drop,
        "the kept table holds every change made before the drop"
    );
    // `stays`, taken out of the publication by hand, was added again (include matches it)
    // and read again; it was never announced as dropped.
    wait_same(
        &cl,
        "SELECT * FROM stays ORDER BY id",
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(metric_sum(&addr, sink_metric, "connector").await, 1.0);
    let source_metric = "bitclone9_source_tables_dropped_total";
    assert_eq!(
        metric_sum(&addr, source_metric, "").await,
        1.0,
        "one drop found"
    );
    drop(daemon);
    cl.cleanup().await;
}
