//! `bitclone9`: PostgreSQL change data capture to Kafka as Avro.
//!
//! Exit codes: 0 success, 1 a check failed, 2 bad usage or configuration.

use anyhow::Context;
use bitclone9::checkpoint::CheckpointStore;
use bitclone9::config::{Config, LogFormat};
use bitclone9::pipeline::{self, PipelineConfig};
use bitclone9::status::Status;
use bitclone9_postgres_source::PostgresSourceConfig;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "bitclone9",
    version = bitclone9::VERSION,
    about = "PostgreSQL change data capture to Kafka as Avro"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every configured pipeline until SIGTERM or SIGINT.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Overrides daemon.log_format.
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
    },
    /// Validate the configuration file; with --connect, also reach each service.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        connect: bool,
    },
    /// Show each connector's state: from the running daemon's /status, else from the checkpoint store.
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show or drop the replication slots of the configured sources.
    Slot {
        #[command(subcommand)]
        action: SlotAction,
    },
    /// Compare every table a sink clones with its source (row counts and checksums per key
    /// range); exit 0 when equal, 1 when a table differs.
    Verify {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this sink (default: every sink with a `source`).
        #[arg(long)]
        sink: Option<String>,
        /// Rows per compared key range.
        #[arg(long, default_value_t = 10_000)]
        chunk_rows: i64,
        /// Comparisons of a differing range before it is reported (the source may be changing).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Wait between rounds.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
    },
    /// Show each sink's applied offsets and lag, or reset a sink to replay its topics.
    Offsets {
        #[command(subcommand)]
        action: OffsetsAction,
    },
    /// Have a source read one table again (a fresh snapshot of it, placed exactly in its change
    /// stream): through the running daemon's admin endpoint (needs `admin.token`), or, when the
    /// daemon is down, recorded in the checkpoint store for its next start.
    Resync {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        source: String,
        /// `schema.table` (a bare name means schema `public`).
        #[arg(long)]
        table: String,
    },
    /// Copy the checkpoint store (RocksDB) consistently, or put a copy back.
    Checkpoint {
        #[command(subcommand)]
        action: CheckpointAction,
    },
}

/// `--log-format`, as `daemon.log_format` takes it.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(f: LogFormatArg) -> Self {
        match f {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

#[derive(Subcommand)]
enum CheckpointAction {
    /// Write a consistent copy of the checkpoint store into DIR (which must not exist).
    Backup {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        to: PathBuf,
    },
    /// Replace the checkpoint store with a backup; the replaced one is kept beside it.
    /// Refused while the daemon runs.
    Restore {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        from: PathBuf,
        /// Confirm: sources resume from the backup's positions.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum OffsetsAction {
    /// Print each sink's positions: applied (in the target), checkpointed, committed to the
    /// consumer group, the partition's end and the lag.
    Show {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Forget one sink's positions (target, checkpoint store and consumer group), so its next
    /// run applies every topic from the beginning. Refused while the daemon runs.
    Reset {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        sink: String,
        /// Resume every partition the sink has applied from at this offset (default: the start).
        #[arg(long, conflicts_with = "to_time")]
        to_offset: Option<i64>,
        /// Resume every partition the sink has applied from at the first record written at or
        /// after this time (RFC 3339, e.g. 2026-11-24T05:00:00Z).
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        to_time: Option<std::time::SystemTime>,
        /// Confirm: the sink applies again what follows the new position.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum SlotAction {
    /// Print each source's slot: active or not, confirmed and restart LSN, retained WAL.
    Show {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Drop one source's slot and forget its checkpoint (the next start takes a new snapshot).
    Drop {
        #[arg(long, short)]
        config: PathBuf,
        /// The source whose slot to drop.
        #[arg(long)]
        source: String,
        /// Confirm: dropping a slot loses the position; changes made until the next start are
        /// only recovered by the new snapshot.
        #[arg(long)]
        yes: bool,
    },
}

/// jemalloc gives memory freed after a burst (a snapshot, a large transaction) back to the
/// system within seconds, where the system allocator kept it in per-thread arenas.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config_path, log_format) = match &cli.command {
        Command::Run { config, log_format } => (config, log_format.map(LogFormat::from)),
        Command::Check { config, .. }
        | Command::Status { config }
        | Command::Slot {
            action: SlotAction::Show { config } | SlotAction::Drop { config, .. },
        }
        | Command::Verify { config, .. }
        | Command::Offsets {
            action: OffsetsAction::Show { config } | OffsetsAction::Reset { config, .. },
        }
        | Command::Resync { config, .. }
        | Command::Checkpoint {
            action:
                CheckpointAction::Backup { config, .. } | CheckpointAction::Restore { config, .. },
        } => (config, None),
    };
    let cfg = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bitclone9: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let spans = init_logging(&cfg, log_format, matches!(cli.command, Command::Run { .. }));
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bitclone9: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match cli.command {
        Command::Run { config, .. } => runtime.block_on(run(cfg, config)),
        Command::Check { connect, .. } => runtime.block_on(check(cfg, connect)),
        Command::Status { .. } => runtime.block_on(status_command(cfg)),
        Command::Slot { action } => runtime.block_on(slot_command(cfg, action)),
        Command::Verify {
            sink,
            chunk_rows,
            rounds,
            interval,
            ..
        } => runtime.block_on(verify_command(
            cfg,
            sink,
            bitclone9::verify::VerifyOptions {
                chunk_rows: chunk_rows.max(1),
                rounds,
                interval,
            },
        )),
        Command::Offsets { action } => runtime.block_on(offsets_command(cfg, action)),
        Command::Resync { source, table, .. } => {
            runtime.block_on(resync_command(cfg, source, table))
        }
        Command::Checkpoint { action } => checkpoint_command(cfg, action),
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("bitclone9: {e:#}");
            ExitCode::from(1)
        }
    };
    if let Some(provider) = spans {
        // Send the spans still queued; an unreachable endpoint must not hold up the exit long.
        if let Err(e) = provider.shutdown_with_timeout(std::time::Duration::from_secs(5)) {
            eprintln!("bitclone9: spans not all exported: {e}");
        }
    }
    code
}

/// Logs to stderr as text or JSON; with `export_spans` and `[telemetry]`, spans also go to the
/// OTLP endpoint (the provider returned is flushed at exit). `log_level` applies to both: spans
/// are made at info.
fn init_logging(
    cfg: &Config,
    over: Option<LogFormat>,
    export_spans: bool,
) -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_env("BITCLONE9_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.daemon.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let fmt = match over.unwrap_or(cfg.daemon.log_format) {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    // One global filter: `EnvFilter` as a per-layer filter drops some events when a target has
    // its own level (e.g. `info,bitclone9=debug`).
    let logs = tracing_subscriber::registry().with(filter).with(fmt);
    // Only a configured exporter joins: an absent layer must not take part in filtering.
    let (provider, failed) = match cfg.telemetry.as_ref().filter(|_| export_spans) {
        Some(t) => match bitclone9::telemetry::layer(t) {
            Ok((layer, provider)) => {
                logs.with(layer).init();
                (Some(provider), None)
            }
            Err(e) => {
                logs.init();
                (None, Some(e))
            }
        },
        None => {
            logs.init();
            (None, None)
        }
    };
    if let Some(e) = failed {
        tracing::error!("spans are not exported: {e}");
    } else if let Some(t) = cfg.telemetry.as_ref().filter(|_| export_spans) {
        tracing::info!(
            endpoint = %bitclone9::telemetry::traces_url(&t.otlp_endpoint),
            "exporting spans over OTLP"
        );
    }
    provider
}

/// What a running connector was started from: a change in it restarts the connector on reload.
#[derive(PartialEq)]
enum StartedFrom {
    Source(Box<bitclone9::config::SourceConfig>),
    Sink(Box<bitclone9::sink::SinkPipelineConfig>),
}

/// One running connector, with what it was started from.
struct Running {
    from: StartedFrom,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// What the connector `name` of `cfg` would be started from.
fn started_from(name: &str, cfg: &Config) -> Option<StartedFrom> {
    if let Some(s) = cfg.sources.get(name) {
        return Some(StartedFrom::Source(Box::new(s.clone())));
    }
    bitclone9::sink_settings(name, cfg).map(|k| StartedFrom::Sink(Box::new(k)))
}

/// Every connector name of `cfg`: sources, then sinks.
fn connector_names(cfg: &Config) -> Vec<String> {
    cfg.sources
        .keys()
        .chain(cfg.sinks.keys())
        .cloned()
        .collect()
}

fn start_pipeline(
    name: &str,
    cfg: &Config,
    store: &Arc<CheckpointStore>,
    status: &Arc<Status>,
) -> Option<Running> {
    let from = started_from(name, cfg)?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = match &from {
        StartedFrom::Source(source) => {
            let pc = PipelineConfig {
                source: PostgresSourceConfig {
                    spool_dir: bitclone9::spool_dir(&cfg.daemon.state_dir, name),
                    ..bitclone9::source_settings(name, source)
                },
                kafka: bitclone9::kafka_settings(cfg),
                topics: bitclone9::topic_settings(name, source),
            };
            tokio::spawn(pipeline::supervise(
                pc,
                store.clone(),
                status.clone(),
                stop_rx,
            ))
        }
        StartedFrom::Sink(k) => tokio::spawn(bitclone9::sink::supervise(
            (**k).clone(),
            store.clone(),
            status.clone(),
            stop_rx,
        )),
    };
    Some(Running { from, stop, task })
}

/// Applies a new configuration: stops removed and changed pipelines (each finishes its
/// deliveries and checkpoints), starts new and changed ones, and leaves the rest running.
/// Pauses (stops cleanly) or resumes a connector, for the admin endpoint.
async fn admin_action(
    cmd: &bitclone9::admin::AdminCommand,
    cfg: &Config,
    running: &mut std::collections::BTreeMap<String, Running>,
    paused: &mut std::collections::BTreeSet<String>,
    store: &Arc<CheckpointStore>,
    status: &Arc<Status>,
) -> Result<String, (u16, String)> {
    use bitclone9::admin::AdminAction;
    let name = &cmd.connector;
    if started_from(name, cfg).is_none() {
        return Err((404, format!("no connector named {name:?}")));
    }
    match &cmd.action {
        AdminAction::Resync(table) => {
            let Some(source) = cfg.sources.get(name) else {
                return Err((400, format!("{name} is a sink: resync reads a source's table again (to apply a topic again, stop the daemon and use `bitclone9 offsets reset`)")));
            };
            if let Some(why) = resync_refusal(name, source) {
                return Err((400, why));
            }
            let captured =
                bitclone9_postgres_source::check(&bitclone9::source_settings(name, source))
                    .await
                    .map_err(|e| (503, format!("cannot read the source's tables: {e}")))?
                    .tables;
            if !captured.contains(table) {
                return Err((404, format!("table {table} is not captured by source {name} (see its include/exclude and the database's tables)")));
            }
            let new = store
                .request_resync(name, table)
                .map_err(|e| (500, format!("cannot record the resync: {e}")))?;
            if paused.contains(name) {
                return Ok(format!(
                    "resync of {table} recorded: it runs when {name} resumes"
                ));
            }
            let state = status.snapshot().get(name).map(|c| c.state);
            if state == Some(bitclone9::status::ConnectorState::Snapshotting) {
                // Restarting would throw the snapshot in progress away; the connector reads
                // the requests still pending as soon as it is done.
                return Ok(format!(
                    "resync of {table} recorded: it runs once the snapshot in progress ends"
                ));
            }
            if !new && running.contains_key(name) {
                // Already pending: the running connector is reading it, or will at its next start.
                return Ok(format!("resync of {table} already pending"));
            }
            // The connector reads pending resyncs when it starts: restart it cleanly.
            if let Some(r) = running.remove(name) {
                let _ = r.stop.send(true);
                let _ = r.task.await;
            }
            if let Some(r) = start_pipeline(name, cfg, store, status) {
                running.insert(name.clone(), r);
            }
            Ok(format!(
                "resync of {table} started: /status shows its progress"
            ))
        }
        AdminAction::Pause => {
            if paused.contains(name) {
                return Ok("already paused".into());
            }
            if let Some(r) = running.remove(name) {
                let _ = r.stop.send(true);
                let _ = r.task.await;
            }
            paused.insert(name.clone());
            status.set_state(name, bitclone9::status::ConnectorState::Paused);
            Ok("paused: stopped after finishing its deliveries and checkpoint".into())
        }
        AdminAction::Resume => {
            if !paused.remove(name) {
                return Ok("not paused".into());
            }
            if let Some(r) = start_pipeline(name, cfg, store, status) {
                running.insert(name.clone(), r);
            }
            Ok("resumed".into())
        }
    }
}

async fn reload(
    path: &std::path::Path,
    current: &mut Config,
    running: &mut std::collections::BTreeMap<String, Running>,
    paused: &std::collections::BTreeSet<String>,
    store: &Arc<CheckpointStore>,
    status: &Arc<Status>,
) {
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("reload refused, the running configuration stays: {e}");
            return;
        }
    };
    if new.daemon.state_dir != current.daemon.state_dir || new.admin.listen != current.admin.listen
    {
        tracing::warn!("daemon.state_dir and admin.listen changes take effect at the next restart");
    }
    let kafka_changed = new.kafka != current.kafka;
    let names: Vec<String> = running.keys().cloned().collect();
    for name in names {
        let keep = !kafka_changed
            && started_from(&name, &new).as_ref() == running.get(&name).map(|r| &r.from);
        if keep {
            continue;
        }
        if let Some(r) = running.remove(&name) {
            tracing::info!(connector = %name, "reload: stopping pipeline");
            let _ = r.stop.send(true);
            let _ = r.task.await;
            status.remove(&name);
        }
    }
    for name in connector_names(&new) {
        if !running.contains_key(&name) && !paused.contains(&name) {
            tracing::info!(connector = %name, "reload: starting pipeline");
            if let Some(r) = start_pipeline(&name, &new, store, status) {
                running.insert(name.clone(), r);
            }
        }
    }
    tracing::info!(connectors = running.len(), "configuration reloaded");
    *current = new;
}

async fn run(cfg: Config, path: PathBuf) -> anyhow::Result<ExitCode> {
    if cfg.sources.is_empty() && cfg.sinks.is_empty() {
        eprintln!("bitclone9: configuration error: no [sources.NAME] or [sinks.NAME] section: nothing to run");
        return Ok(ExitCode::from(2));
    }
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    bitclone9::memory::spawn_gauges();
    let status = Arc::new(Status::default());
    let (admin_tx, mut admin_rx) = tokio::sync::mpsc::channel(8);
    let admin_addr = bitclone9::admin::serve(
        cfg.admin.listen,
        cfg.admin.token.as_ref().map(|t| t.expose().to_string()),
        status.clone(),
        metrics,
        admin_tx,
    )
    .await
    .with_context(|| {
        format!(
            "cannot serve the admin endpoint on {} (admin.listen)",
            cfg.admin.listen
        )
    })?;
    tracing::info!(address = %admin_addr, "admin endpoint listening");
    let store = Arc::new(CheckpointStore::open(&cfg.daemon.state_dir)?);
    let mut running = std::collections::BTreeMap::new();
    for name in connector_names(&cfg) {
        if let Some(r) = start_pipeline(&name, &cfg, &store, &status) {
            running.insert(name.clone(), r);
        }
    }
    tracing::info!(
        sources = cfg.sources.len(),
        sinks = cfg.sinks.len(),
        version = bitclone9::VERSION,
        "bitclone9 running"
    );
    let notifier = tokio::spawn(systemd_notifications(status.clone()));

    let mut cfg = cfg;
    let mut paused = std::collections::BTreeSet::new();
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let stop_signal = wait_for_signal();
    tokio::pin!(stop_signal);
    loop {
        tokio::select! {
            r = &mut stop_signal => {
                r?;
                break;
            }
            _ = hangup.recv() => {
                notify(&[sd_notify::NotifyState::Reloading]);
                tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
                reload(&path, &mut cfg, &mut running, &paused, &store, &status).await;
                notify(&[sd_notify::NotifyState::Ready]);
            }
            Some(cmd) = admin_rx.recv() => {
                let result = admin_action(&cmd, &cfg, &mut running, &mut paused, &store, &status).await;
                let _ = cmd.reply.send(result);
            }
        }
    }
    notifier.abort();
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping: finishing deliveries and checkpointing"),
    ]);
    tracing::info!(
        "stopping: finishing deliveries and checkpointing (signal again to exit at once)"
    );
    for r in running.values() {
        let _ = r.stop.send(true);
    }
    // A second signal exits at once; what Kafka has not acknowledged is read again on the next
    // start, so nothing is lost.
    tokio::spawn(async {
        if wait_for_signal().await.is_ok() {
            eprintln!("bitclone9: second signal, exiting now");
            std::process::exit(130);
        }
    });
    for (_, r) in running {
        let _ = r.task.await;
    }
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Tells systemd (when it runs us with NOTIFY_SOCKET) READY=1 once every connector has started,
/// STATUS= lines as they change, and WATCHDOG=1 pings while no connector is stuck.
async fn systemd_notifications(status: Arc<Status>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let mut watchdog_usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec)
        .then(|| std::time::Duration::from_micros(watchdog_usec));
    let tick = watchdog
        .map(|w| w / 3)
        .unwrap_or(std::time::Duration::from_secs(1))
        .min(std::time::Duration::from_secs(1));
    let (mut ready_sent, mut last_status) = (false, String::new());
    loop {
        let summary = status.summary();
        if summary != last_status {
            notify(&[sd_notify::NotifyState::Status(&summary)]);
            last_status = summary;
        }
        if !ready_sent && status.ready() {
            notify(&[sd_notify::NotifyState::Ready]);
            ready_sent = true;
        }
        if let Some(limit) = watchdog {
            let stuck = status.stuck(limit);
            if stuck.is_empty() {
                notify(&[sd_notify::NotifyState::Watchdog]);
            } else {
                tracing::error!(connectors = ?stuck, "connectors made no progress within the watchdog interval: not pinging the watchdog, so systemd restarts the service");
            }
        }
        tokio::time::sleep(tick).await;
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// GETs `path` from the admin endpoint; `None` when nothing answers there.
async fn admin_get(cfg: &Config, path: &str) -> Option<(u16, String)> {
    match admin_call(cfg, "GET", path, std::time::Duration::from_secs(10)).await {
        Exchange::Answer(code, body) => Some((code, body)),
        Exchange::Refused | Exchange::NoAnswer => None,
    }
}

/// How a call to the admin endpoint went.
enum Exchange {
    /// Nothing listens there (the daemon is down).
    Refused,
    /// Connected, but no complete answer came in time.
    NoAnswer,
    Answer(u16, String),
}

async fn admin_call(cfg: &Config, method: &str, path: &str, wait: std::time::Duration) -> Exchange {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut addr = cfg.admin.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let connect = tokio::net::TcpStream::connect(addr);
    let mut stream = match tokio::time::timeout(std::time::Duration::from_secs(3), connect).await {
        Ok(Ok(s)) => s,
        _ => return Exchange::Refused,
    };
    let auth = cfg
        .admin
        .token
        .as_ref()
        .map(|t| format!("Authorization: Bearer {}\r\n", t.expose()))
        .unwrap_or_default();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n");
    if stream.write_all(req.as_bytes()).await.is_err() {
        return Exchange::NoAnswer;
    }
    let mut buf = Vec::new();
    match tokio::time::timeout(wait, stream.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => {}
        _ => return Exchange::NoAnswer,
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    match (code, body) {
        (Some(code), Some(body)) => Exchange::Answer(code, body),
        _ => Exchange::NoAnswer,
    }
}

/// Why a table of `source` cannot be read again, if it cannot.
fn resync_refusal(name: &str, source: &bitclone9::config::SourceConfig) -> Option<String> {
    bitclone9::topic_settings(name, source).compacted().then(|| format!(
        "source {name} writes compacted topics, which cannot carry the truncate a resync opens with: rows gone from the source would stay in the targets"
    ))
}

async fn resync_command(cfg: Config, source: String, table: String) -> anyhow::Result<ExitCode> {
    let Some(s) = cfg.sources.get(&source) else {
        eprintln!("bitclone9: no source named {source:?} in the configuration");
        return Ok(ExitCode::from(2));
    };
    if let Some(why) = resync_refusal(&source, s) {
        println!("{why}");
        return Ok(ExitCode::from(1));
    }
    let Some(id) = bitclone9::admin::parse_table(&table) else {
        eprintln!("bitclone9: {table:?} is not a table name: write schema.table");
        return Ok(ExitCode::from(2));
    };
    let segment = |t: &str| -> String {
        t.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    };
    let path = format!(
        "/connectors/{}/tables/{}/resync",
        segment(&source),
        segment(&id.to_string())
    );
    // The daemon stops the source cleanly before answering: give it time.
    let wait = std::time::Duration::from_secs(120);
    let answer = match admin_call(&cfg, "POST", &path, wait).await {
        Exchange::Answer(code, body) => Some((code, body)),
        Exchange::Refused => None,
        Exchange::NoAnswer => anyhow::bail!(
            "the daemon at {} took the request but did not answer within {}s; see `bitclone9 status` for the resync's progress",
            cfg.admin.listen,
            wait.as_secs()
        ),
    };
    if let Some((code, body)) = answer {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        return Ok(match (code, v["result"].as_str(), v["error"].as_str()) {
            (200, Some(done), _) => {
                println!("{source}: {done}");
                ExitCode::SUCCESS
            }
            (_, _, Some(why)) => {
                println!("the daemon at {} refused ({code}): {why}", cfg.admin.listen);
                ExitCode::from(1)
            }
            _ => {
                println!(
                    "the daemon at {} answered {code}: {}",
                    cfg.admin.listen,
                    body.trim()
                );
                ExitCode::from(1)
            }
        });
    }
    // Nothing answers: record the request for the next start, once the table is known.
    let captured = bitclone9_postgres_source::check(&bitclone9::source_settings(&source, s))
        .await
        .context("reading the source's tables")?
        .tables;
    if !captured.contains(&id) {
        println!("table {id} is not captured by source {source} (see its include/exclude and the database's tables)");
        return Ok(ExitCode::from(1));
    }
    let store = CheckpointStore::open(&cfg.daemon.state_dir).with_context(|| {
        format!(
            "the daemon does not answer on {} but holds the checkpoint store",
            cfg.admin.listen
        )
    })?;
    store.request_resync(&source, &id)?;
    tracing::info!(target: "bitclone9::audit", action = "resync", connector = %source, table = %id, result = "recorded for the next start", "admin action");
    println!("{source}: resync of {id} recorded: it runs when the daemon next starts");
    Ok(ExitCode::SUCCESS)
}

async fn status_command(cfg: Config) -> anyhow::Result<ExitCode> {
    if let Some((code, body)) = admin_get(&cfg, "/status").await {
        if code != 200 {
            println!(
                "the daemon at {} answered {code}: {}",
                cfg.admin.listen,
                body.trim()
            );
            return Ok(ExitCode::from(1));
        }
        let v: serde_json::Value = serde_json::from_str(&body).context("reading /status")?;
        println!(
            "daemon running ({}), version {}",
            cfg.admin.listen,
            v["version"].as_str().unwrap_or("?")
        );
        if let Some(connectors) = v["connectors"].as_object() {
            for (name, c) in connectors {
                if let Some(sink) = c.get("sink") {
                    println!(
                        "{name}: {} (sink, lag {} records in {} partition(s), restarts {}){}",
                        c["state"].as_str().unwrap_or("?"),
                        sink["lag_records"],
                        sink["partitions"].as_array().map_or(0, Vec::len),
                        c["restarts"],
                        c["last_error"]
                            .as_str()
                            .map(|e| format!(", last error: {e}"))
                            .unwrap_or_default()
                    );
                    continue;
                }
                println!(
                    "{name}: {} (slot {}, confirmed {}, restarts {}){}",
                    c["state"].as_str().unwrap_or("?"),
                    c["slot"].as_str().unwrap_or("?"),
                    c["confirmed_lsn"].as_str().unwrap_or("none"),
                    c["restarts"],
                    c["last_error"]
                        .as_str()
                        .map(|e| format!(", last error: {e}"))
                        .unwrap_or_default()
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "daemon not running (nothing answers on {}); from the checkpoint store:",
        cfg.admin.listen
    );
    let store = CheckpointStore::open(&cfg.daemon.state_dir)
        .or_else(|_| CheckpointStore::open_read_only(&cfg.daemon.state_dir))?;
    for name in cfg.sinks.keys() {
        let offsets = store.load_sink_offsets(name)?;
        println!(
            "{name}: sink, {} partition(s) checkpointed{}",
            offsets.len(),
            offsets
                .iter()
                .map(|(t, p, o)| format!("; {t}[{p}] applied {o}"))
                .collect::<String>()
        );
    }
    for name in cfg.sources.keys() {
        let r = store.load_source(name)?;
        println!(
            "{name}: checkpoint {}, snapshot {}",
            r.lsn
                .map(|l| l.to_string())
                .unwrap_or_else(|| "none".into()),
            if r.snapshot_done { "done" } else { "not done" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn slot_command(cfg: Config, action: SlotAction) -> anyhow::Result<ExitCode> {
    match action {
        SlotAction::Show { .. } => {
            let mut failed = false;
            for (name, s) in &cfg.sources {
                let sc = bitclone9::source_settings(name, s);
                match bitclone9_postgres_source::slot_status(&sc).await {
                    Ok(Some(slot)) => println!(
                        "{name}: slot {} {} (pid {}), confirmed {}, restart {}, retains {} bytes, wal_status {}",
                        sc.slot,
                        if slot.active_pid.is_some() { "active" } else { "inactive" },
                        slot.active_pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                        slot.confirmed_flush.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                        slot.restart_lsn.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                        slot.retained_bytes.unwrap_or(0),
                        slot.wal_status.as_deref().unwrap_or("-"),
                    ),
                    Ok(None) => println!("{name}: slot {} does not exist", sc.slot),
                    Err(e) => {
                        failed = true;
                        println!("{name}: FAILED: {e}");
                    }
                }
            }
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        SlotAction::Drop { source, yes, .. } => {
            let Some(s) = cfg.sources.get(&source) else {
                eprintln!("bitclone9: no source named {source:?} in the configuration");
                return Ok(ExitCode::from(2));
            };
            if !yes {
                eprintln!("bitclone9: dropping the slot of {source} loses its position; the next start takes a new snapshot. Add --yes to do it.");
                return Ok(ExitCode::from(2));
            }
            let sc = bitclone9::source_settings(&source, s);
            // The checkpoint store is locked while the daemon runs: refuse before touching the slot.
            let store = CheckpointStore::open(&cfg.daemon.state_dir)
                .context("stop bitclone9 before dropping a slot")?;
            match bitclone9_postgres_source::drop_slot(&sc).await {
                Ok(existed) => {
                    store.clear_source(&source)?;
                    tracing::info!(connector = %source, slot = %sc.slot, "admin action: slot dropped");
                    println!(
                        "{source}: slot {} {}; checkpoint cleared",
                        sc.slot,
                        if existed { "dropped" } else { "did not exist" }
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("{source}: FAILED: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}

async fn check(cfg: Config, connect: bool) -> anyhow::Result<ExitCode> {
    println!(
        "configuration: ok ({} source(s), {} sink(s))",
        cfg.sources.len(),
        cfg.sinks.len()
    );
    for w in &cfg.warnings {
        println!("warning: {w}");
    }
    if !connect {
        return Ok(ExitCode::SUCCESS);
    }
    let mut failed = false;
    let kafka = bitclone9::kafka_settings(&cfg);
    let (producer, context) = kafka.producer().context("creating the Kafka client")?;
    match bitclone9_kafka::ping_kafka(
        &producer,
        &context,
        &kafka.bootstrap_servers,
        kafka.request_timeout,
    )
    .await
    {
        Ok(n) => println!("kafka {}: ok ({n} broker(s))", kafka.bootstrap_servers),
        Err(e) => {
            failed = true;
            println!("kafka {}: FAILED: {e}", kafka.bootstrap_servers)
        }
    }
    let registry = kafka.registry()?;
    match registry.ping().await {
        Ok(n) => println!(
            "schema registry {}: ok ({n} subject(s))",
            kafka.registry_url
        ),
        Err(e) => {
            failed = true;
            println!("schema registry {}: FAILED: {e}", kafka.registry_url)
        }
    }
    for (name, s) in &cfg.sources {
        let sc = bitclone9::source_settings(name, s);
        match bitclone9_postgres_source::check(&sc).await {
            Ok(selection) => {
                println!(
                    "source {name} (postgres {}:{}/{}): ok, {} table(s) to capture",
                    s.host,
                    s.port,
                    s.database,
                    selection.tables.len()
                );
                for t in &selection.without_identity {
                    println!(
                        "source {name}: warning: {}",
                        bitclone9_postgres_source::catalog::Selection::left_out_warning(t)
                    );
                }
            }
            Err(e) => {
                failed = true;
                println!(
                    "source {name} (postgres {}:{}/{}): FAILED: {e}",
                    s.host, s.port, s.database
                )
            }
        }
    }
    for (name, k) in &cfg.sinks {
        let at = format!(
            "sink {name} (postgres {}:{}/{})",
            k.host, k.port, k.database
        );
        match bitclone9_postgres_sink::read_positions(&bitclone9::pg_endpoint(k.connection()), name)
            .await
        {
            Ok(p) => println!("{at}: ok, {} partition position(s) stored", p.len()),
            Err(e) => {
                failed = true;
                println!("{at}: FAILED: {e}");
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn verify_command(
    cfg: Config,
    only: Option<String>,
    opts: bitclone9::verify::VerifyOptions,
) -> anyhow::Result<ExitCode> {
    if let Some(name) = &only {
        if !cfg.sinks.contains_key(name) {
            eprintln!("bitclone9: no sink named {name:?} in the configuration");
            return Ok(ExitCode::from(2));
        }
    }
    println!(
        "comparing row counts and row checksums per key range of {} rows; the source may be changing, so a differing range is compared again up to {} times, {:?} apart",
        opts.chunk_rows, opts.rounds, opts.interval
    );
    let mut differ = 0;
    let mut compared = 0;
    for (name, k) in &cfg.sinks {
        if only.as_ref().is_some_and(|o| o != name) {
            continue;
        }
        let Some(source_name) = &k.source else {
            println!("sink {name}: skipped: it has no `source`, so its source database is unknown");
            continue;
        };
        let Some(s) = cfg.sources.get(source_name) else {
            continue;
        };
        let sc = bitclone9::source_settings(source_name, s);
        let tables = bitclone9_postgres_source::check(&sc)
            .await
            .with_context(|| format!("listing the tables of source {source_name}"))?;
        let pairs: Vec<_> = tables
            .tables
            .into_iter()
            .map(|t| {
                let target = bitclone9_core::TableId::new(
                    k.target_schema.clone().unwrap_or(t.schema.clone()),
                    t.name.clone(),
                );
                (t, target)
            })
            .collect();
        println!(
            "sink {name}: source {source_name} ({}/{}) → target {}:{}/{}, {} table(s)",
            s.host,
            s.database,
            k.host,
            k.port,
            k.database,
            pairs.len()
        );
        let reports = bitclone9::verify::verify(
            &bitclone9::pg_endpoint(s.connection()),
            &bitclone9::pg_endpoint(k.connection()),
            &pairs,
            opts,
        )
        .await?;
        for r in &reports {
            compared += 1;
            if let Some(p) = &r.problem {
                differ += 1;
                println!("  {} → {}: DIFFERENT: {p}", r.source, r.target);
            } else if r.equal() {
                println!(
                    "  {} → {}: equal ({} rows in {} key range(s){})",
                    r.source,
                    r.target,
                    r.source_rows,
                    r.ranges,
                    if r.rounds_used > 1 {
                        format!(", after {} rounds", r.rounds_used)
                    } else {
                        String::new()
                    }
                );
            } else {
                differ += 1;
                println!(
                    "  {} → {}: DIFFERENT in {} of {} key range(s) after {} round(s):",
                    r.source,
                    r.target,
                    r.differing.len(),
                    r.ranges,
                    r.rounds_used
                );
                for d in &r.differing {
                    println!(
                        "    {}: source {} rows, target {} rows{}",
                        r.describe(d),
                        d.source_rows,
                        d.target_rows,
                        if d.source_rows == d.target_rows {
                            " (same count, different content)"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
    }
    if differ > 0 {
        println!("verify: {differ} of {compared} table(s) differ");
        Ok(ExitCode::from(1))
    } else {
        println!("verify: all {compared} table(s) equal");
        Ok(ExitCode::SUCCESS)
    }
}

async fn offsets_command(cfg: Config, action: OffsetsAction) -> anyhow::Result<ExitCode> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    match action {
        OffsetsAction::Show { .. } => {
            let store = CheckpointStore::open(&cfg.daemon.state_dir)
                .or_else(|_| CheckpointStore::open_read_only(&cfg.daemon.state_dir))
                .ok();
            let mut failed = false;
            for (name, k) in &cfg.sinks {
                let Some(sc) = bitclone9::sink_settings(name, &cfg) else {
                    continue;
                };
                println!("sink {name} (group {}):", sc.group);
                let applied = match bitclone9_postgres_sink::read_positions(
                    &sc.target.endpoint,
                    name,
                )
                .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        failed = true;
                        println!("  target {}:{}/{}: FAILED: {e}", k.host, k.port, k.database);
                        Vec::new()
                    }
                };
                let checkpointed = match &store {
                    Some(s) => s.load_sink_offsets(name)?,
                    None => Vec::new(),
                };
                let consumer: BaseConsumer = bitclone9::sink::consumer_config(&sc)
                    .create()
                    .context("creating the Kafka client")?;
                let mut parts: Vec<(String, i32)> = applied
                    .iter()
                    .map(|p| (p.topic.clone(), p.partition))
                    .chain(checkpointed.iter().map(|(t, p, _)| (t.clone(), *p)))
                    .collect();
                parts.sort();
                parts.dedup();
                if parts.is_empty() {
                    println!("  nothing applied yet");
                }
                let mut tpl = rdkafka::TopicPartitionList::new();
                for (t, p) in &parts {
                    tpl.add_partition(t, *p);
                }
                let timeout = cfg.kafka.request_timeout;
                let committed = {
                    let c = &consumer;
                    let tpl = tpl.clone();
                    tokio::task::block_in_place(|| c.committed_offsets(tpl, timeout)).ok()
                };
                for (t, p) in &parts {
                    let applied_off = applied
                        .iter()
                        .find(|x| &x.topic == t && x.partition == *p)
                        .map(|x| x.applied.offset);
                    let ckpt = checkpointed
                        .iter()
                        .find(|x| &x.0 == t && x.1 == *p)
                        .map(|x| x.2);
                    let group = committed.as_ref().and_then(|c| {
                        c.find_partition(t, *p).and_then(|e| match e.offset() {
                            rdkafka::Offset::Offset(o) => Some(o),
                            _ => None,
                        })
                    });
                    let end = tokio::task::block_in_place(|| {
                        consumer.fetch_watermarks(t, *p, timeout).ok().map(|w| w.1)
                    });
                    let show =
                        |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
                    let lag = match (end, applied_off) {
                        (Some(e), Some(a)) => Some((e - a - 1).max(0)),
                        (Some(e), None) => Some(e),
                        _ => None,
                    };
                    println!(
                        "  {t}[{p}]: applied {}, checkpoint {}, group {}, end {}, lag {}",
                        show(applied_off),
                        show(ckpt),
                        show(group),
                        show(end),
                        show(lag)
                    );
                }
            }
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        OffsetsAction::Reset {
            sink,
            yes,
            to_offset,
            to_time,
            ..
        } => {
            let Some(sc) = bitclone9::sink_settings(&sink, &cfg) else {
                eprintln!("bitclone9: no sink named {sink:?} in the configuration");
                return Ok(ExitCode::from(2));
            };
            if !yes {
                eprintln!("bitclone9: resetting {sink} makes it apply its topics again from the beginning. Add --yes to do it.");
                return Ok(ExitCode::from(2));
            }
            if admin_get(&cfg, "/healthz").await.is_some() {
                eprintln!(
                    "bitclone9: the daemon is running (it answers on {}): stop it before resetting offsets",
                    cfg.admin.listen
                );
                return Ok(ExitCode::from(1));
            }
            let store = CheckpointStore::open(&cfg.daemon.state_dir)
                .context("stop bitclone9 before resetting offsets")?;
            // The partitions the sink has applied from, and where each resumes.
            let mut partitions: Vec<(String, i32)> =
                bitclone9_postgres_sink::read_positions(&sc.target.endpoint, &sink)
                    .await?
                    .into_iter()
                    .map(|p| (p.topic, p.partition))
                    .chain(
                        store
                            .load_sink_offsets(&sink)?
                            .into_iter()
                            .map(|(t, p, _)| (t, p)),
                    )
                    .collect();
            partitions.sort();
            partitions.dedup();
            let resume_at: Vec<(String, i32, i64)> = match (to_offset, to_time) {
                (Some(o), _) => partitions
                    .iter()
                    .map(|(t, p)| (t.clone(), *p, o.max(0)))
                    .collect(),
                (None, Some(time)) => {
                    use rdkafka::consumer::{BaseConsumer, Consumer};
                    let ms = time
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(0);
                    let consumer: BaseConsumer = bitclone9::sink::consumer_config(&sc)
                        .create()
                        .context("creating the Kafka client")?;
                    let mut tpl = rdkafka::TopicPartitionList::new();
                    for (t, p) in &partitions {
                        let _ = tpl.add_partition_offset(t, *p, rdkafka::Offset::Offset(ms));
                    }
                    let timeout = cfg.kafka.request_timeout;
                    let found =
                        tokio::task::block_in_place(|| consumer.offsets_for_times(tpl, timeout))
                            .context("looking up offsets by time in Kafka")?;
                    let mut out = Vec::new();
                    for (t, p) in &partitions {
                        let at = match found.find_partition(t, *p).map(|e| e.offset()) {
                            Some(rdkafka::Offset::Offset(o)) => o,
                            // Nothing written at or after that time: resume at the end.
                            _ => tokio::task::block_in_place(|| {
                                consumer.fetch_watermarks(t, *p, timeout)
                            })
                            .map(|w| w.1)
                            .with_context(|| format!("reading the end of {t}[{p}]"))?,
                        };
                        out.push((t.clone(), *p, at));
                    }
                    out
                }
                (None, None) => Vec::new(),
            };
            let deleted =
                bitclone9_postgres_sink::reset_positions(&sc.target.endpoint, &sink).await?;
            let cleared = store.clear_sink(&sink)?;
            if !resume_at.is_empty() {
                let applied: Vec<(String, i32, i64)> = resume_at
                    .iter()
                    .map(|(t, p, o)| (t.clone(), *p, o - 1))
                    .collect();
                bitclone9_postgres_sink::set_positions(&sc.target.endpoint, &sink, &applied)
                    .await?;
                store.save_sink_offsets(&sink, &applied)?;
                for (t, p, o) in &resume_at {
                    println!("{sink}: {t}[{p}] resumes at offset {o}");
                }
            }
            let admin = bitclone9::kafka_settings(&cfg)
                .admin()
                .context("creating the Kafka admin client")?;
            let opts = rdkafka::admin::AdminOptions::new()
                .operation_timeout(Some(cfg.kafka.request_timeout));
            // The sink resumes from the target's positions; the group's offsets only mirror
            // them for lag tools, and the next run overwrites them if deleting fails.
            let group = match admin.delete_groups(&[sc.group.as_str()], &opts).await {
                Ok(r) => match r.into_iter().next() {
                    Some(Ok(_)) => "deleted".to_string(),
                    Some(Err((_, rdkafka::types::RDKafkaErrorCode::GroupIdNotFound))) | None => {
                        "did not exist".to_string()
                    }
                    Some(Err((_, e))) => {
                        format!("kept ({e}); its offsets are overwritten by the next run")
                    }
                },
                Err(e) => format!("not reached ({e}); its offsets are overwritten by the next run"),
            };
            tracing::info!(connector = %sink, positions = deleted, checkpoints = cleared, group = %sc.group, "admin action: sink offsets reset");
            println!(
                "{sink}: {deleted} target position(s) and {cleared} checkpoint(s) replaced; consumer group {} {group}; {}",
                sc.group,
                if resume_at.is_empty() {
                    "the next run applies from the beginning"
                } else {
                    "the next run applies from the offsets above"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn checkpoint_command(cfg: Config, action: CheckpointAction) -> anyhow::Result<ExitCode> {
    let dir = &cfg.daemon.state_dir;
    match action {
        CheckpointAction::Backup { to, .. } => {
            if to.exists() {
                eprintln!("bitclone9: {} exists: give a new directory", to.display());
                return Ok(ExitCode::from(2));
            }
            match CheckpointStore::open(dir) {
                Ok(store) => store.backup(&to),
                // The daemon holds the store: copy what it has written so far.
                Err(_) => CheckpointStore::backup_live(dir, &to),
            }
            .with_context(|| format!("backing up {}", dir.display()))?;
            tracing::info!(to = %to.display(), "admin action: checkpoint store backed up");
            println!(
                "checkpoint store {} backed up to {}",
                dir.display(),
                to.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        CheckpointAction::Restore { from, yes, .. } => {
            if !yes {
                eprintln!("bitclone9: restoring replaces every connector's checkpoint with the backup's. Add --yes to do it.");
                return Ok(ExitCode::from(2));
            }
            let kept = CheckpointStore::restore(dir, &from)
                .context("stop bitclone9 before restoring its checkpoint store")?;
            tracing::info!(from = %from.display(), kept = %kept.display(), "admin action: checkpoint store restored");
            println!(
                "checkpoint store {} restored from {}; the replaced one is kept in {}",
                dir.display(),
                from.display(),
                kept.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
