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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config_path, log_format) = match &cli.command {
        Command::Run { config, log_format } => (config, *log_format),
        Command::Check { config, .. } => (config, None),
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
