//! A source database cloned into a target database through the real stack: the config of a
//! source and its sink, and a wait until both read the same.

use super::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// A source database and a target database, with a config that clones one into the other.
pub struct Clone {
    pub spec: SourceSpec,
    pub target_db: String,
    pub config: PathBuf,
    pub src: Client,
    pub dst: Client,
}

impl Clone {
    /// `ddl` runs in the source; `target_ddl` in the target (types the events need, or tables
    /// with extra constraints). `sink_extra` goes into the sink's section.
    pub async fn new(prefix: &str, ddl: &str, target_ddl: &str, sink_extra: &str) -> Self {
        Self::with_partitions(prefix, ddl, target_ddl, sink_extra, 1).await
    }

    pub async fn with_partitions(
        prefix: &str,
        ddl: &str,
        target_ddl: &str,
        sink_extra: &str,
        partitions: i32,
    ) -> Self {
        let (db, src) = db_with(prefix, ddl).await;
        let target_db = format!("{db}_t");
        let dst = fresh_db(&target_db).await;
        if !target_ddl.is_empty() {
            dst.batch_execute(target_ddl).await.expect("target ddl");
        }
        let mut spec = SourceSpec::new(&db);
        spec.extra = format!("[sources.{db}.topics]\npartitions = {partitions}\n");
        let (config, _) = write_config(&spec, "");
        let s = stack();
        let mut text = std::fs::read_to_string(&config).expect("config");
        text.push_str(&format!(
            r#"
[sinks.{db}_clone]
type = "postgres"
host = "127.0.0.1"
port = {port}
user = "{user}"
password = "${{TEST_PG_PASSWORD}}"
database = "{target_db}"
source = "{db}"
max_batch_wait = "10ms"
{sink_extra}
"#,
            port = s.pg_port,
            user = s.pg_user,
        ));
        std::fs::write(&config, text).expect("write config");
        Self {
            spec,
            target_db,
            config,
            src,
            dst,
        }
    }

    pub fn sink(&self) -> String {
        format!("{}_clone", self.spec.db)
    }

    /// Adds `line` (e.g. `new_table_check_interval = "1s"`) to the source's section.
    pub fn set_source_option(&self, line: &str) {
        let text = std::fs::read_to_string(&self.config).expect("config");
        let topics = format!("[sources.{}.topics]", self.spec.db);
        assert!(text.contains(&topics), "the config has {topics}");
        std::fs::write(
            &self.config,
            text.replacen(&topics, &format!("{line}\n{topics}"), 1),
        )
        .expect("config");
    }

    pub async fn cleanup(&self) {
        cleanup(&self.spec.db).await;
        cleanup(&self.target_db).await;
    }
}

/// The rows `query` reads, as text (one line naming the error if it fails, e.g. for a
/// missing table).
pub async fn read_rows(c: &Client, query: &str) -> Vec<String> {
    match c
        .query(&format!("SELECT q::text FROM ({query}) q"), &[])
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get::<_, String>(0)).collect(),
        Err(e) => vec![format!("error: {e}")],
    }
}

/// Waits until `query` reads the same in the source and the target of `cl`.
pub async fn wait_same(cl: &Clone, query: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (a, b) = (
            read_rows(&cl.src, query).await,
            read_rows(&cl.dst, query).await,
        );
        if a == b {
            return;
        }
        if Instant::now() > deadline {
            let first = a.iter().zip(&b).find(|(x, y)| x != y);
            panic!(
                "{query}: source and target differ after {timeout:?} ({} vs {} rows), first: {first:?}",
                a.len(),
                b.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until every table reads the same in source and target; panics with the first
/// difference after `timeout`.
pub async fn wait_equal(cl: &Clone, tables: &[(&str, &str)], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut diff = None;
        for (t, order) in tables {
            let exists: bool = cl
                .dst
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[t])
                .await
                .expect("regclass")
                .get(0);
            if !exists {
                diff = Some(format!("{t} missing in target"));
                break;
            }
            let (a, b) = (dump(&cl.src, t, order).await, dump(&cl.dst, t, order).await);
            if a != b {
                let first = a
                    .iter()
                    .zip(&b)
                    .find(|(x, y)| x != y)
                    .map(|(x, y)| {
                        let at = x.chars().zip(y.chars()).take_while(|(a, b)| a == b).count();
                        let from = at.saturating_sub(40);
                        let part = |s: &str| s.chars().skip(from).take(120).collect::<String>();
                        format!("source …{}\ntarget …{}", part(x), part(y))
                    })
                    .unwrap_or_else(|| format!("source {} rows, target {} rows", a.len(), b.len()));
                diff = Some(format!("{t}: {first}"));
                break;
            }
        }
        match diff {
            None => return,
            Some(d) if Instant::now() > deadline => {
                panic!("source and target still differ after {timeout:?}: {d}")
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}
