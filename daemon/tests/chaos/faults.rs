//! The daemon under test and the faults done to it and to the services around it.
//!
//! ```text
//!  Supervised ── starts bitclone9 and starts it again when a fault stopped it (as systemd
//!                would); samples its peak RSS
//!  Nemesis    ── one fault: SIGKILL / SIGTERM the daemon, drop its replication slot, kill -9
//!                or freeze Kafka, freeze the registry, restart PostgreSQL, cut a link, make
//!                the state directory unwritable
//!  slot drop  ── drop_slot (the window opens) ··· heal ··· await_resnapshot (it closes)
//!  late       ── created ··· await_late_read (on Kafka: its gap closes; applied: sampled)
//!  gone       ── dropped (not while a window is open) ··· await_drop_applied (at the end)
//! ```

use crate::check::{History, LATE, TABLES};
use crate::common::{admin, admin_addr, confirmed_flush, current_lsn, metric_sum, stack, Daemon};
use crate::{connect_retrying, max_txlog};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// The source's warning when its slot is gone after it streamed (connectors/postgres-source).
const RESNAPSHOT_WARNING: &str = "re-creating it and re-snapshotting";
/// The daemon's line once a snapshot is on Kafka and recorded (daemon/src/pipeline.rs).
pub(crate) const SNAPSHOT_RECORDED: &str = "snapshot delivered and recorded";
/// The daemon's line once a resync's records are on Kafka and recorded, with the tables read
/// as `tables=public.a, public.b` (daemon/src/pipeline.rs).
const RESYNC_DELIVERED: &str = "resync delivered";
/// The sink's line once it applied a drop announcement and kept the target table
/// (daemon/src/sink.rs), with `table=public.gone`.
const DROP_KEPT: &str = "the source dropped this table: its target table is kept";

/// The daemon under test, restarted by the harness when a nemesis stopped it (as systemd would).
pub(crate) struct Supervised {
    pub(crate) config: PathBuf,
    pub(crate) daemon: Option<Daemon>,
    pub(crate) starts: u32,
    pub(crate) peak_rss_mb: f64,
}

impl Supervised {
    pub(crate) fn start(&mut self) {
        self.starts += 1;
        self.daemon = Some(Daemon::start(&self.config, &format!("run{}", self.starts)));
    }
    fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|d| d.child.id())
    }
    pub(crate) fn sample_rss(&mut self) {
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
    /// The daemon's memory gauges now, as "RSS x MB, allocated y MB" (allocated growing from
    /// cycle to cycle would be a leak).
    pub(crate) async fn memory_now(&mut self) -> String {
        let Some(d) = self.daemon.as_mut() else {
            return "stopped".into();
        };
        let addr = admin_addr(d).await;
        let mb = |v: f64| v / 1024.0 / 1024.0;
        format!(
            "RSS {:.0} MB, allocated {:.0} MB",
            mb(metric_sum(&addr, "bitclone9_process_resident_memory_bytes", "").await),
            mb(metric_sum(&addr, "bitclone9_memory_allocated_bytes", "").await)
        )
    }
    /// The log of the daemon's current run (each start writes a log of its own).
    pub(crate) fn log_text(&self) -> String {
        self.daemon
            .as_ref()
            .map(|d| d.log_text())
            .unwrap_or_default()
    }
    /// The logs of every run so far, in the order they ran: what an earlier run did (a read
    /// delivered just before a SIGKILL, say) is not in the current run's log.
    pub(crate) fn all_logs_text(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                std::fs::read_to_string(self.config.with_file_name(format!("run{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
    pub(crate) fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
    /// The daemon must not exit by itself.
    pub(crate) fn assert_running(&mut self, context: &str) {
        if let Some(d) = self.daemon.as_mut() {
            assert!(
                d.is_running(),
                "{context}: the daemon exited by itself; log:\n{}",
                self.log_tail()
            );
        }
    }
}

/// One fault. Faults of a cycle run in this order: the daemon is stopped first and the slot
/// dropped next, while every service still answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Nemesis {
    DaemonKill,
    DaemonTerm,
    SlotDrop,
    KafkaKill,
    KafkaFreeze,
    RegistryFreeze,
    PgRestartFast,
    PgRestartImmediate,
    SourceCut,
    TargetCut,
    RegistryCut,
    StateDirUnwritable,
}

pub(crate) const NEMESES: [Nemesis; 12] = [
    Nemesis::DaemonKill,
    Nemesis::DaemonTerm,
    Nemesis::SlotDrop,
    Nemesis::KafkaKill,
    Nemesis::KafkaFreeze,
    Nemesis::RegistryFreeze,
    Nemesis::PgRestartFast,
    Nemesis::PgRestartImmediate,
    Nemesis::SourceCut,
    Nemesis::TargetCut,
    Nemesis::RegistryCut,
    Nemesis::StateDirUnwritable,
];

fn stack_dir() -> PathBuf {
    std::env::var("BC9_STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.stack"))
}

pub(crate) fn stack_script(args: &[&str]) {
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

pub(crate) fn pid_of(file: &str) -> i32 {
    let path = stack_dir().join(file);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (is the stack up?)", path.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A directory made immutable (`chattr -R +i`). The tests run as root, whom permissions do not
/// stop, but every write under an immutable directory fails, also to files already open. It is
/// made writable again when this is dropped, also when the test fails, like `Frozen`.
pub(crate) struct Unwritable(PathBuf);

impl Unwritable {
    pub(crate) fn new(dir: &Path) -> Self {
        if let Err(e) = chattr(dir, "+i") {
            let _ = chattr(dir, "-i");
            panic!("chattr -R +i {}: {e}", dir.display());
        }
        Unwritable(dir.to_path_buf())
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        if let Err(e) = chattr(&self.0, "-i") {
            eprintln!("chaos: chattr -R -i {}: {e}", self.0.display());
        }
    }
}

/// `chattr -R FLAG DIR`, up to three times: a file the daemon deletes while chattr walks the
/// tree fails that walk, and the next walk finds the directories walked already immutable.
/// The error is chattr's output.
fn chattr(dir: &Path, flag: &str) -> Result<(), String> {
    let mut error = String::new();
    for _ in 0..3 {
        let out = Command::new("chattr")
            .arg("-R")
            .arg(flag)
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run chattr: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        error = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Err(error)
}

/// A slot drop in progress: the first transaction number of its window, and how often the
/// daemon's log had warned of a missing slot and recorded a snapshot before. While it lives the
/// workload does not drop `gone`: the new snapshot could not read a table dropped meanwhile, so
/// its changes the old slot had not streamed would be lost, in the target too.
pub(crate) struct SlotWindow {
    pub(crate) start: u64,
    warnings_before: usize,
    snapshots_before: usize,
    _no_drop: tokio::sync::OwnedMutexGuard<()>,
}

/// Drops the source's replication slot behind the daemon's back. First takes `drop_lock` (a
/// transaction dropping `gone` ends first; none starts until the window closes), and waits until
/// the slot confirmed everything committed so far: the daemon confirms nothing Kafka lacks, so
/// Kafka then holds every transaction up to the window's start and only later ones may be
/// missing there. Then pauses the target sampler (`resnapshot`), ends the slot's walsender and
/// drops the slot, over again while the daemon takes the slot back, for up to 15 s.
pub(crate) async fn drop_slot(
    daemon: &Supervised,
    slot: &str,
    history: &Mutex<History>,
    resnapshot: &AtomicBool,
    drop_lock: &Arc<tokio::sync::Mutex<()>>,
) -> SlotWindow {
    let no_drop = drop_lock.clone().lock_owned().await;
    let log = daemon.log_text();
    let warnings_before = log.matches(RESNAPSHOT_WARNING).count();
    let snapshots_before = log.matches(SNAPSHOT_RECORDED).count();
    let admin = admin().await;
    let start = history
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .committed_tx;
    // Every transaction counted in `start` committed before this position.
    let lsn = current_lsn(&admin).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let confirmed = confirmed_flush(&admin, slot).await;
        if confirmed.is_some_and(|c| c >= lsn) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slot {slot} confirmed {confirmed:?}, not {lsn}, within 120 s of the slot drop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    resnapshot.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // The daemon reconnects after a backoff, in which the drop goes through.
        let _ = admin
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&slot],
            )
            .await;
        let dropped = admin
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await;
        match dropped {
            Ok(_) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "replication slot {slot} not dropped within 15 s: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    SlotWindow {
        start,
        warnings_before,
        snapshots_before,
        _no_drop: no_drop,
    }
}

/// After a slot drop and the heal: waits until the daemon found the slot gone, re-created it
/// and recorded a new snapshot, and then until the target applied every record on Kafka by
/// then. The snapshot empties and refills the target's tables; only then may the sampler look
/// again. `with_late`: `late` was read, its topic is among those to apply.
pub(crate) async fn await_resnapshot(
    daemon: &mut Supervised,
    w: &SlotWindow,
    db: &str,
    target: &Client,
    context: &str,
    with_late: bool,
) {
    let since = Instant::now();
    let limit = Duration::from_secs(240);
    loop {
        daemon.sample_rss();
        let log = daemon.log_text();
        let warned = log.matches(RESNAPSHOT_WARNING).count() > w.warnings_before;
        let snapshots = log.matches(SNAPSHOT_RECORDED).count();
        // After the last warning: an interrupted snapshot is taken again without one.
        let after_warning = log.rfind(RESNAPSHOT_WARNING).map_or("", |at| &log[at..]);
        let recorded = snapshots > w.snapshots_before && after_warning.contains(SNAPSHOT_RECORDED);
        if warned && recorded {
            break;
        }
        assert!(
            since.elapsed() < limit,
            "{context}: the daemon did not re-create the dropped slot and record a new snapshot within 240 s; log:\n{}",
            daemon.log_tail()
        );
        daemon.assert_running(context);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    await_applied(daemon, db, target, context, since, limit, with_late).await;
}

/// Whether a line of `log` holds every one of `words`.
fn logged(log: &str, words: &[&str]) -> bool {
    log.lines().any(|l| words.iter().all(|w| l.contains(w)))
}

/// After `acct` got a column with a default: waits until the daemon noticed it, read the
/// table again (the resync empties and refills the target's `acct`), and the target applied
/// every record on Kafka by then. The logs of all runs count: the read may have been delivered
/// in a run a SIGKILL ended since. `with_late` as for [`await_resnapshot`].
pub(crate) async fn await_reread(
    daemon: &mut Supervised,
    db: &str,
    target: &Client,
    context: &str,
    with_late: bool,
) {
    let (since, limit) = (Instant::now(), Duration::from_secs(240));
    // After the last notice: a resync interrupted before it was recorded comes again. The
    // delivery must name acct: `late`'s read is a resync too.
    let done = |log: &str| {
        let after = log.rfind(REWRITE_NOTICE).map(|at| &log[at..]);
        after.is_some_and(|rest| logged(rest, &[RESYNC_DELIVERED, "public.acct"]))
    };
    let what = "the daemon did not read acct again within 240 s of its ADD COLUMN ... DEFAULT";
    wait_logged(daemon, context, what, limit, done).await;
    await_applied(daemon, db, target, context, since, limit, with_late).await;
}

/// Waits until `done` holds for the logs of all runs; fails with `what` after `limit`, or if
/// the daemon exited by itself.
async fn wait_logged(
    daemon: &mut Supervised,
    context: &str,
    what: &str,
    limit: Duration,
    done: impl Fn(&str) -> bool,
) {
    let since = Instant::now();
    loop {
        daemon.sample_rss();
        if done(&daemon.all_logs_text()) {
            return;
        }
        assert!(
            since.elapsed() < limit,
            "{context}: {what}; log:\n{}",
            daemon.log_tail()
        );
        daemon.assert_running(context);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const REWRITE_NOTICE: &str = "gave every existing row a value the WAL does not carry";

/// After `late` was created: waits until the daemon found it, added it to its publication and
/// delivered its read (a truncate and its rows, at a position after every transaction they
/// hold) to Kafka, in any run. Every transaction counted then is in those rows or streams after
/// them, so `late`'s gap (its events that may be missing on Kafka) ends there: recorded in the
/// history, and returned. Then waits until the target applied every record on Kafka, `late`'s
/// included, so that the sampler finds `late` filled when it first looks.
pub(crate) async fn await_late_read(
    daemon: &mut Supervised,
    db: &str,
    target: &Client,
    context: &str,
    history: &Mutex<History>,
) -> u64 {
    let (since, limit) = (Instant::now(), Duration::from_secs(240));
    let what = "the daemon did not add and read the new table late within 240 s";
    wait_logged(daemon, context, what, limit, |log| {
        logged(log, &[RESYNC_DELIVERED, "public.late"])
    })
    .await;
    let end = {
        let mut h = history.lock().unwrap_or_else(|p| p.into_inner());
        let end = h.committed_tx;
        let start = h.late_created.unwrap_or(0);
        h.table_gaps.push((LATE, start, end));
        end
    };
    await_applied(daemon, db, target, context, since, limit, true).await;
    end
}

/// After `gone` was dropped: waits until the sink applied the drop's announcement (it keeps
/// the target table), in any run, which it does once every partition of the topic has it, and
/// then until the target applied every record on Kafka.
pub(crate) async fn await_drop_applied(
    daemon: &mut Supervised,
    db: &str,
    target: &Client,
    context: &str,
    with_late: bool,
) {
    let (since, limit) = (Instant::now(), Duration::from_secs(240));
    let what = "the sink did not apply the drop of gone within 240 s";
    wait_logged(daemon, context, what, limit, |log| {
        logged(log, &[DROP_KEPT, "table=public.gone"])
    })
    .await;
    await_applied(daemon, db, target, context, since, limit, with_late).await;
}

/// Waits until the target applied every record on Kafka now, and every transaction the source
/// committed by now. `with_late`: `late`'s topic is among them (it exists once `late` was read).
async fn await_applied(
    daemon: &mut Supervised,
    db: &str,
    target: &Client,
    context: &str,
    since: Instant,
    limit: Duration,
    with_late: bool,
) {
    // On Kafka now: the new snapshot, and what streamed after it.
    let want = max_txlog(&connect_retrying(db).await).await;
    let sink = format!("{db}_clone");
    let mut ends = None;
    loop {
        daemon.sample_rss();
        if ends.is_none() {
            ends = kafka_ends(db, with_late);
        }
        let applied = match &ends {
            Some(ends) => sink_covers(target, &sink, ends).await,
            None => false,
        };
        if applied && max_txlog(target).await >= want {
            break;
        }
        assert!(
            since.elapsed() < limit,
            "{context}: the target did not apply what Kafka holds within 240 s; log:\n{}",
            daemon.log_tail()
        );
        daemon.assert_running(context);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Per partition of the workload's topics (`late`'s only `with_late`): (topic, partition,
/// offset after its last record); `None` while Kafka does not answer, or lists no partition of
/// a topic (each exists once its table was read: the broker has not caught up).
fn kafka_ends(source: &str, with_late: bool) -> Option<Vec<(String, i32, i64)>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", stack().bootstrap)
        .create()
        .ok()?;
    tokio::task::block_in_place(|| {
        let mut ends = Vec::new();
        for (i, (table, _)) in TABLES.into_iter().enumerate() {
            if i == LATE && !with_late {
                continue;
            }
            let topic = format!("{source}.public.{table}");
            let md = consumer
                .fetch_metadata(Some(topic.as_str()), Duration::from_secs(10))
                .ok()?;
            let partitions = md.topics().first().map_or(0, |t| t.partitions().len());
            if partitions == 0 {
                return None;
            }
            for p in 0..partitions as i32 {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p, Duration::from_secs(10))
                    .ok()?;
                ends.push((topic.clone(), p, high));
            }
        }
        Some(ends)
    })
}

/// Whether the sink's positions in the target (`bitclone9.sink_positions`, the last offset
/// applied per partition) reach `ends`.
async fn sink_covers(target: &Client, sink: &str, ends: &[(String, i32, i64)]) -> bool {
    let rows = target
        .query(
            "SELECT topic, kafka_partition, kafka_offset FROM bitclone9.sink_positions WHERE sink = $1",
            &[&sink],
        )
        .await;
    let Ok(rows) = rows else { return false };
    let mut applied: HashMap<(String, i32), i64> = HashMap::new();
    for r in &rows {
        applied.insert((r.get(0), r.get(1)), r.get(2));
    }
    ends.iter().all(|(topic, p, end)| {
        let done = applied
            .get(&(topic.clone(), *p))
            .map_or(0, |offset| offset + 1);
        done >= *end
    })
}
