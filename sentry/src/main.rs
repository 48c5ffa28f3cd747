//! `sentry`: keep a blockchain validator private behind a hardened public host.
//!
//! The command line only: parse arguments, load and validate config and keys, set up logging
//! and signals, and hand over to `relay-core`. Exit status: 0 success, 2 bad usage or invalid
//! config (including key files), 1 runtime failure.
#![forbid(unsafe_code)]

mod check;
mod demo;
mod effective;
mod key;
mod pair;
mod status;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use relay_core::config::{self, Config};
use relay_core::keys::{self, KeySource, PrivateKey};
use relay_core::reload::Reload;
use tracing::{debug, error, info, warn};

const ABOUT: &str = "Keep a blockchain validator private: a public sentry relays P2P and RPC \
                     traffic over an authenticated QUIC tunnel to an agent behind NAT.";

const AFTER_HELP: &str = "\
Getting started:
  sentry demo                              see it work on this machine, nothing to set up
  sentry keygen --out sentry.key           on the public host; prints the key agents pin
  sentry keygen --out agent.key            on the validator host; prints the key the sentry pins
  sentry check --config sentry.toml        validate a config (either role) before starting
  sentry serve --config sentry.toml        on the public host
  sentry agent --config agent.toml         beside the validator; it dials out, opens no port
  sentry pair --sentry HOST:4433 --out-dir DIR    or: both keys and matched configs at once
  sentry status                            tunnels, routes and counters of a running daemon

Example configs: configs/sentry.example.toml and configs/agent.example.toml.
Logs go to stderr; set the filter with RUST_LOG (default: info).";

#[derive(Parser)]
#[command(name = "sentry", version = relay_core::VERSION_LINE, about = ABOUT, after_help = AFTER_HELP)]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the public sentry daemon: accept clients on the routes, relay them to agents.
    Serve {
        /// The sentry config file (see configs/sentry.example.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the agent beside the validator: dial the sentries, connect relayed streams to the
    /// services this config exports and to nothing else.
    Agent {
        /// The agent config file (see configs/agent.example.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Write a new private key (mode 0600) and print its public key for peers to pin.
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key of a private key file.
    Pubkey {
        /// The private key file.
        #[arg(long)]
        key: PathBuf,
        /// Print the host's WireGuard public key instead (`wg pubkey` form), for a plain
        /// WireGuard peer's config.
        #[arg(long)]
        wireguard: bool,
    },
    /// Validate a config file of either role (and its key file) without starting anything.
    Check {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Check the config only, not its key file (a config written for another host, or
        /// linted before the key is installed).
        #[arg(long)]
        no_key: bool,
        /// Print the config as the daemon will run it: every default filled in, list files
        /// merged, as TOML.
        #[arg(long)]
        print: bool,
    },
    /// Write two fresh keys and a matched sentry.toml and agent.toml for a chain, ready to
    /// copy to the public host and the validator host.
    Pair {
        /// HOST:PORT the agent will dial: the sentry's public name or address and QUIC port.
        #[arg(long, value_name = "HOST:PORT")]
        sentry: String,
        /// Where to write sentry.key, sentry.toml, agent.key and agent.toml (none may exist).
        #[arg(long)]
        out_dir: PathBuf,
        /// The chain whose ports to relay.
        #[arg(long, value_enum, default_value = "icon")]
        preset: pair::Preset,
        /// Where the key files will live on the hosts; the configs name them there (the
        /// systemd units pass /etc/sentry/sentry.key and /etc/sentry/agent.key to the
        /// daemons as credentials).
        #[arg(long, default_value = "/etc/sentry")]
        key_dir: PathBuf,
    },
    /// Show the tunnels, routes and counters of a running daemon (either role), read from
    /// its metrics listener.
    Status {
        /// The daemon's metrics_listen address.
        #[arg(long, default_value = "127.0.0.1:9900")]
        metrics: std::net::SocketAddr,
        /// Show the agent's relayed peers instead: the loopback address the node sees for
        /// each client of a `source = "mapped"` service, and the real client.
        #[arg(long)]
        peers: bool,
        /// With --peers: only the rows of this address, mapped (as the node logged it) or
        /// client.
        #[arg(long, value_name = "IP", requires = "peers")]
        lookup: Option<std::net::IpAddr>,
    },
    /// Run a sentry, an agent and a sample validator on loopback with throwaway keys, push
    /// sample traffic through, and print what happened and what to try.
    Demo {
        /// Exit after the self-check: status 0 only if every check passed.
        #[arg(long)]
        once: bool,
    },
}

/// A failure and the exit status it maps to.
enum Failure {
    /// Bad usage or an invalid config or key file: exit 2.
    Invalid(String),
    /// Anything at run time: exit 1.
    Runtime(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; its daemons' logs only when something is wrong.
    let default_filter = if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        "info"
    };
    init_logging(cli.log_format, default_filter);
    let result = match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Agent { config } => agent(&config),
        Command::Keygen { out } => keygen(&out),
        Command::Pubkey { key, wireguard } => pubkey(&key, wireguard),
        Command::Check {
            config,
            no_key,
            print,
        } => check::check(&config, !no_key, print).map_err(Failure::Invalid),
        Command::Pair {
            sentry,
            out_dir,
            preset,
            key_dir,
        } => pair::pair(&pair::Request {
            sentry: &sentry,
            out_dir: &out_dir,
            key_dir: &key_dir,
            preset,
        })
        .map(|message| println!("{message}"))
        .map_err(Failure::Invalid),
        Command::Status {
            metrics,
            peers,
            lookup,
        } => runtime().and_then(|rt| {
            let report = if peers {
                rt.block_on(status::peers(metrics, lookup))
            } else {
                rt.block_on(status::report(metrics))
            };
            report
                .map(|report| print!("{report}"))
                .map_err(Failure::Runtime)
        }),
        Command::Demo { once } => runtime().and_then(|rt| rt.block_on(demo::run(once))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Invalid(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // Without the LIFO slot a task woken by another runs after the tasks already ready, not
    // before them. A relayed message wakes its tunnel's driver (quinn's connection task, our
    // WireGuard peer's timer task); with the slot, the driver ran after each message and sent
    // it alone, one datagram per message. Now it runs once the connections ready in the same
    // round have written, and their messages leave together in one datagram or one GSO send.
    // Measured over QUIC in the namespace topology: CPU per relayed request 46 -> 33 us, tunnel
    // datagrams per request 2.2 -> 0.3 at the agent (benches/README.md, "Coalescing across streams").
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder
        // Blocking work is name resolution and file reads: a few threads at most, and the
        // units' TasksMax stays far above this.
        .max_blocking_threads(32)
        .enable_all()
        .build()
        .map_err(|e| Failure::Runtime(format!("starting the async runtime: {e}")))
}

fn load_key(path: &Path) -> Result<PrivateKey, Failure> {
    keys::load_private_key(path).map_err(|e| Failure::Invalid(e.to_string()))
}

/// The daemon's key, named by `config_key` in its config (see [`key::load`]).
fn daemon_key(config_key: &str, configured: &Path) -> Result<PrivateKey, Failure> {
    let (key, source) = key::load(config_key, configured).map_err(Failure::Invalid)?;
    if let KeySource::Credential { .. } = source {
        info!(%source, "private key read from the unit's credentials");
    }
    Ok(key)
}

/// Raise the soft open-file limit to the hard one. Every relayed connection holds a socket (two
/// on the sentry when TLS carries the tunnel), and the common default soft limit of 1024 would
/// refuse connections long before any configured cap. Warns when even the hard limit is below
/// `needed`.
fn raise_open_files(needed: Option<u64>) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    if before.current != before.maximum {
        let raised = Rlimit {
            current: before.maximum,
            maximum: before.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            warn!(error = %e, "cannot raise the open-file limit");
        }
    }
    // `None` is unlimited.
    let now = getrlimit(Resource::Nofile).current;
    match (now, needed) {
        (Some(limit), Some(needed)) if limit < needed => warn!(
            open_files = limit,
            needed,
            "the open-file limit is below what max_connections needs: connections past it are \
             refused; raise it (systemd LimitNOFILE, ulimit -n)"
        ),
        _ => debug!(before = ?before.current, now = ?now, "open-file limit"),
    }
}

fn serve(path: &Path) -> Result<(), Failure> {
    let config = config::load_sentry(path).map_err(|e| Failure::Invalid(e.to_string()))?;
    let key = daemon_key("sentry.private_key", &config.private_key)?;
    config.log_warnings(&key);
    let per_connection = if config.tls_listen.is_some() { 2 } else { 1 };
    raise_open_files(Some(config.max_connections as u64 * per_connection + 256));
    runtime()?.block_on(async {
        let sentry = relay_core::sentry::Sentry::bind(&config, &key)
            .await
            .map_err(|e| Failure::Runtime(e.to_string()))?;
        let handle = sentry.handle();
        info!(
            quic = %handle.quic_addr().map_or_else(|| "-".to_owned(), |a| a.to_string()),
            metrics = ?handle.metrics_addr(),
            public_key = %key.public_key(),
            agents = config.agents.len(),
            routes = config.routes.len(),
            "sentry ready"
        );
        let reload = |path: &Path| reload_from(&handle, path, config::load_sentry);
        let stopping = || info!(drain = ?handle.drain_timeout(), "shutting down: new connections refused, open ones drain (send the signal again to exit at once)");
        run_daemon(path, "sentry", |stop| sentry.run(stop), reload, stopping).await
    })
}

fn agent(path: &Path) -> Result<(), Failure> {
    let config = config::load_agent(path).map_err(|e| Failure::Invalid(e.to_string()))?;
    let key = daemon_key("agent.private_key", &config.private_key)?;
    config.log_warnings(&key);
    raise_open_files(None);
    runtime()?.block_on(async {
        let agent = relay_core::agent::Agent::new(&config, &key)
            .map_err(|e| Failure::Runtime(e.to_string()))?;
        let handle = agent.handle();
        info!(
            name = %config.name,
            public_key = %key.public_key(),
            metrics = ?handle.metrics_addr(),
            sentries = config.sentries.len(),
            services = config.services.len(),
            "agent starting"
        );
        let reload = |path: &Path| reload_from(&handle, path, config::load_agent);
        let stopping =
            || info!("shutting down: open streams drain (send the signal again to exit at once)");
        run_daemon(path, "agent", |stop| agent.run(stop), reload, stopping).await
    })
}

/// Reload a running daemon from its config file (SIGHUP): the file and the key it names are
/// loaded, then applied; a failure anywhere is counted as a refused reload and leaves the
/// running config in place. Returns the log line's summary.
fn reload_from<H: Reload>(
    handle: &H,
    path: &Path,
    load: fn(&Path) -> Result<H::Config, config::ConfigErrors>,
) -> Result<String, String>
where
    H::Config: DaemonConfig,
{
    let refused = |e: String| {
        handle.count_refused_reload();
        e
    };
    let config = load(path).map_err(|e| refused(e.to_string()))?;
    let (key, _) = key::load(H::Config::KEY, config.key_path()).map_err(refused)?;
    config.log_warnings(&key);
    let changes = handle.reload(&config, &key).map_err(|e| e.to_string())?;
    warn_need_restart(&changes.need_restart);
    Ok(format!("{}{}", changes.summary(H::KEPT), config.pinned()))
}

/// What the reload of either daemon needs of its config.
trait DaemonConfig {
    /// The config key that names the private key.
    const KEY: &'static str;
    /// Log its warnings, and a peer pinned with this host's own key.
    fn log_warnings(&self, key: &PrivateKey);
    /// The daemon's private key file.
    fn key_path(&self) -> &Path;
    /// The keys the daemon pins, for the reload's log line.
    fn pinned(&self) -> String;
}

impl DaemonConfig for config::SentryConfig {
    const KEY: &'static str = "sentry.private_key";

    fn log_warnings(&self, key: &PrivateKey) {
        let pinned = check::own_key_pinned(&Config::Sentry(Box::new(self.clone())), key);
        check::log_warnings(&self.warnings, pinned);
    }

    fn key_path(&self) -> &Path {
        &self.private_key
    }

    fn pinned(&self) -> String {
        format!("; {} agent(s) pinned", self.agents.len())
    }
}

impl DaemonConfig for config::AgentConfig {
    const KEY: &'static str = "agent.private_key";

    fn log_warnings(&self, key: &PrivateKey) {
        let pinned = check::own_key_pinned(&Config::Agent(self.clone()), key);
        check::log_warnings(&self.warnings, pinned);
    }

    fn key_path(&self) -> &Path {
        &self.private_key
    }

    fn pinned(&self) -> String {
        format!("; {} sentry key(s) pinned", self.sentries.len())
    }
}

/// Resolves when a daemon is told to stop.
type Stop = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Run a daemon (`run`, given the future that tells it to stop) until a stop signal, reloading
/// it on SIGHUP; at the stop signal, log `stopping` and wait for it to drain and end.
async fn run_daemon<F>(
    path: &Path,
    what: &str,
    run: impl FnOnce(Stop) -> F,
    reload: impl Fn(&Path) -> Result<String, String>,
    stopping: impl FnOnce(),
) -> Result<(), Failure>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(run(Box::pin(async move {
        let _ = stopped.await;
    })));
    supervise(path, reload).await;
    stopping();
    let _ = stop.send(());
    running
        .await
        .map_err(|e| Failure::Runtime(format!("the {what} task failed: {e}")))
}

fn warn_need_restart(keys: &[&str]) {
    if !keys.is_empty() {
        warn!(
            keys = ?keys,
            "these changes take effect only after a restart; the running values stay"
        );
    }
}

/// Tell systemd (when it started us with `Type=notify`) that we are ready, keep its watchdog
/// fed, reload on SIGHUP, and return on the first SIGTERM or SIGINT (after which a second one
/// exits at once). `reload` parses and applies the config file; its error leaves the running
/// config in place.
async fn supervise(path: &Path, reload: impl Fn(&Path) -> Result<String, String>) {
    use sd_notify::NotifyState;
    use tokio::signal::unix::{SignalKind, signal};
    let notify = |states: &[NotifyState<'_>]| {
        // Outside systemd there is no socket to tell; that is not an error.
        let _ = sd_notify::notify(states);
    };
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        // Pinged from the runtime itself: a wedged runtime stops the pings and systemd
        // restarts us.
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval / 2);
            loop {
                ticks.tick().await;
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        });
    }
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let mut states = vec![NotifyState::Reloading];
                if let Ok(now) = NotifyState::monotonic_usec_now() {
                    states.push(now);
                }
                notify(&states);
                match reload(path) {
                    Ok(summary) => info!(config = %path.display(), "config reloaded: {summary}"),
                    Err(e) => error!(config = %path.display(), "config reload refused; the running config stays:\n{e}"),
                }
                notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
            }
        }
    }
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        warn!("second signal: exiting now");
        std::process::exit(1);
    });
}

fn keygen(out: &Path) -> Result<(), Failure> {
    let key = PrivateKey::generate().map_err(|e| Failure::Runtime(e.to_string()))?;
    keys::write_private_key(out, &key).map_err(|e| Failure::Invalid(e.to_string()))?;
    println!("{}", key.public_key());
    Ok(())
}

fn pubkey(path: &Path, wireguard: bool) -> Result<(), Failure> {
    let key = load_key(path)?;
    if wireguard {
        println!("{}", key.wireguard_public_base64());
    } else {
        println!("{}", key.public_key());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The build applies `.cargo/config.toml`: without `--cfg tokio_unstable` the daemon would
    /// keep tokio's LIFO slot (see [`super::runtime`]), and cost more per relayed request, with
    /// nothing else to show for it.
    #[test]
    #[expect(
        clippy::assertions_on_constants,
        reason = "the constant is the build's configuration, which is what is checked"
    )]
    fn the_daemon_runtime_is_built_without_the_lifo_slot() {
        assert!(
            cfg!(tokio_unstable),
            "built without --cfg tokio_unstable (an explicit RUSTFLAGS replaces .cargo/config.toml's)"
        );
    }
}
