//! The `idempotency-coordinator` binary: parse the configuration, start logging, serve.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser};
use idempotency_coordinator::config::{AdminArgs, BackupArgs, Command, Config, LogFormat, MigrateArgs, RestoreArgs};
use idempotency_coordinator::server::{self, Stop};
use idempotency_core::clock::{Clock, SystemClock};
use idempotency_store_postgres::{PostgresOptions, TimeSource};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(error) = config.validate() {
        // The same message format and exit code (2) as clap's own refusals.
        Config::command().error(clap::error::ErrorKind::ValueValidation, error).exit();
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let result = match &config.command {
        Some(Command::Migrate(args)) => migrate(args).await,
        Some(Command::Backup(args)) => backup(args).await,
        Some(Command::Restore(args)) => restore(args).await,
        Some(Command::Admin(args)) => admin(args).await,
        None => serve(config).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Registered before the store opens (which can take seconds on a large store), so that a
    // SIGTERM during startup still ends in a clean drain and exit 0.
    let stop = stop_signal()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|error| anyhow::anyhow!("cannot listen on {}: {error}", config.listen))?;
    server::run(listener, config, Arc::new(SystemClock), stop).await?;
    Ok(())
}

async fn migrate(args: &MigrateArgs) -> anyhow::Result<()> {
    let to = PostgresOptions {
        url: args.to.clone(),
        schema: args.schema.clone(),
        pool_size: 1,
        timeout: std::time::Duration::from_secs(60),
        max_records: u64::MAX,
        time: TimeSource::Database,
        password: None,
    };
    let report = idempotency_coordinator::migrate::sled_to_postgres(&args.from, &to, SystemClock.now()).await?;
    let import = report.import;
    println!(
        "copied {} records ({} new, {} replacing older copies); {} already there at the same or a later grant; \
         {} expired left behind; fencing tokens continue above {}",
        import.inserted + import.replaced,
        import.inserted,
        import.replaced,
        import.kept,
        report.expired,
        import.fencing_floor
    );
    Ok(())
}

async fn backup(args: &BackupArgs) -> anyhow::Result<()> {
    let report = idempotency_coordinator::backup::backup(&args.data_dir, &args.output, SystemClock.now()).await?;
    println!(
        "wrote {} record{} to {}; {} expired left out; a restore hands out fencing tokens above {}",
        report.records,
        if report.records == 1 { "" } else { "s" },
        args.output.display(),
        report.expired,
        report.fencing_floor
    );
    Ok(())
}

async fn restore(args: &RestoreArgs) -> anyhow::Result<()> {
    let counts = idempotency_coordinator::backup::restore(&args.data_dir, &args.input, SystemClock.now()).await?;
    println!(
        "restored {} record{} into {}; {} expired since the backup left out; fencing tokens continue above {}",
        counts.inserted + counts.replaced,
        if counts.inserted + counts.replaced == 1 { "" } else { "s" },
        args.data_dir.display(),
        counts.expired,
        counts.fencing_floor
    );
    Ok(())
}

async fn admin(args: &AdminArgs) -> anyhow::Result<()> {
    idempotency_coordinator::admin_cli::run(args, &mut std::io::stdout()).await?;
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now; the future completes on either signal. SIGTERM
/// (an orchestrator) drains after the drain delay; SIGINT (Ctrl-C at a terminal) at once.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = Stop> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => Stop::Drain,
            _ = interrupt.recv() => Stop::Now,
        }
    })
}
