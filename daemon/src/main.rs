//! `bitclone9`: PostgreSQL change data capture to Kafka as Avro.
//!
//! Exit codes: 0 success, 1 a check failed, 2 bad usage or configuration.

use anyhow::Context;
use bitclone9::checkpoint::CheckpointStore;
use bitclone9::config::{Config, LogFormat};
use bitclone9::pipeline::{self, PipelineConfig};
use bitclone9::status::Status;
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
        log_format: Option<LogFormat>,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config_path, log_format) = match &cli.command {
        Command::Run { config, log_format } => (config, *log_format),
        Command::Check { config, .. }
        | Command::Status { config }
        | Command::Slot {
            action: SlotAction::Show { config } | SlotAction::Drop { config, .. },
        } => (config, None),
    };
    let cfg = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bitclone9: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&cfg, log_format);
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
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("bitclone9: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(cfg: &Config, over: Option<LogFormat>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BITCLONE9_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.daemon.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match over.unwrap_or(cfg.daemon.log_format) {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// One running pipeline, with what it was started from.
struct Running {
    source: bitclone9::config::SourceConfig,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn start_pipeline(
    name: &str,
    cfg: &Config,
    store: &Arc<CheckpointStore>,
    status: &Arc<Status>,
) -> Option<Running> {
    let source = cfg.sources.get(name)?.clone();
    let pc = PipelineConfig {
        source: bitclone9::source_settings(name, &source),
        kafka: bitclone9::kafka_settings(cfg),
        topics: bitclone9::topic_settings(name, &source),
    };
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(pipeline::supervise(
        pc,
        store.clone(),
        status.clone(),
        stop_rx,
    ));
    Some(Running { source, stop, task })
}

/// Applies a new configuration: stops removed and changed pipelines (each finishes its
/// deliveries and checkpoints), starts new and changed ones, and leaves the rest running.
async fn reload(
    path: &std::path::Path,
    current: &mut Config,
    running: &mut std::collections::BTreeMap<String, Running>,
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
        let keep =
            !kafka_changed && new.sources.get(&name) == running.get(&name).map(|r| &r.source);
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
    for name in new.sources.keys() {
        if !running.contains_key(name) {
            tracing::info!(connector = %name, "reload: starting pipeline");
            if let Some(r) = start_pipeline(name, &new, store, status) {
                running.insert(name.clone(), r);
            }
        }
    }
    tracing::info!(sources = running.len(), "configuration reloaded");
    *current = new;
}

async fn run(cfg: Config, path: PathBuf) -> anyhow::Result<ExitCode> {
    if cfg.sources.is_empty() {
        eprintln!("bitclone9: configuration error: no [sources.NAME] section: nothing to run");
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
    let status = Arc::new(Status::default());
    let admin_addr = bitclone9::admin::serve(
        cfg.admin.listen,
        cfg.admin.token.clone(),
        status.clone(),
        metrics,
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
    for name in cfg.sources.keys() {
        if let Some(r) = start_pipeline(name, &cfg, &store, &status) {
            running.insert(name.clone(), r);
        }
    }
    tracing::info!(
        sources = cfg.sources.len(),
        version = bitclone9::VERSION,
        "bitclone9 running"
    );
    let notifier = tokio::spawn(systemd_notifications(status.clone()));

    let mut cfg = cfg;
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
                reload(&path, &mut cfg, &mut running, &store, &status).await;
                notify(&[sd_notify::NotifyState::Ready]);
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut addr = cfg.admin.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let connect = tokio::net::TcpStream::connect(addr);
    let mut stream = tokio::time::timeout(std::time::Duration::from_secs(3), connect)
        .await
        .ok()?
        .ok()?;
    let auth = cfg
        .admin
        .token
        .as_deref()
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut buf),
    )
    .await
    .ok()?
    .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
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
    let store = CheckpointStore::open(&cfg.daemon.state_dir)?;
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
    println!("configuration: ok ({} source(s))", cfg.sources.len());
    for w in &cfg.warnings {
        println!("warning: {w}");
    }
    if !connect {
        return Ok(ExitCode::SUCCESS);
    }
    let mut failed = false;
    let kafka = bitclone9::kafka_settings(&cfg);
    let producer: rdkafka::producer::FutureProducer = bitclone9_kafka::producer_config(&kafka)
        .create()
        .context("creating the Kafka client")?;
    match bitclone9_kafka::ping_kafka(&producer, &kafka.bootstrap_servers, kafka.request_timeout)
        .await
    {
        Ok(n) => println!("kafka {}: ok ({n} broker(s))", kafka.bootstrap_servers),
        Err(e) => {
            failed = true;
            println!("kafka {}: FAILED: {e}", kafka.bootstrap_servers)
        }
    }
    let registry = bitclone9_kafka::Registry::new(&kafka.registry_url, kafka.request_timeout)?;
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
            Ok(tables) => println!(
                "source {name} (postgres {}:{}/{}): ok, {} table(s) to capture",
                s.host,
                s.port,
                s.database,
                tables.len()
            ),
            Err(e) => {
                failed = true;
                println!(
                    "source {name} (postgres {}:{}/{}): FAILED: {e}",
                    s.host, s.port, s.database
                )
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
