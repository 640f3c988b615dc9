//! `collector`: the agent (`collector run`) and the operator's command line.

mod address_table;
mod addresses;
mod agent_http;
mod api;
mod auth;
mod bpf_sys;
mod check;
mod cleanup;
mod client;
mod client_table;
mod clock;
mod config;
mod config_watch;
mod counters;
mod dns;
mod ephemeral_ports;
mod event_stream;
mod events;
mod file_version;
mod gzip;
mod http_load;
mod links;
mod loader;
mod logging;
mod mapped;
mod maps;
mod metrics;
mod netlink_dump;
mod netns;
mod nfnetlink;
mod nft;
mod nft_claim;
mod nft_continuity;
mod nft_tool;
mod open_files;
mod orphans;
mod output;
mod paths;
mod pin_lock;
mod poller;
mod preexisting;
mod privileges;
mod process;
mod program_loading;
mod rates;
#[cfg(test)]
mod scratch;
mod secret_reloads;
mod serve;
mod signals;
mod slots;
mod snapshot;
mod sock_diag;
mod systemd;
mod tally;
mod tls;
mod topk;
mod unsent_answers;

use std::{
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    addresses::ChangeSignal,
    client_table::ClientTable,
    config::{Config, RefusedAtStart},
    config_watch::ConfigWatch,
    events::ClientStats,
    loader::{Attachment, Options},
    poller::{Polled, Poller, SharedSnapshot},
    preexisting::Preexisting,
    tally::TallyTable,
};

/// The version and the commit built: every build is 0.1.0, so the commit is what tells one
/// from another (which upgrade notes apply); `collector_build_info` says the same.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("COLLECTOR_REVISION"),
    ")"
);

#[derive(Parser)]
#[command(
    version = VERSION,
    about = "Kernel-assisted proxy and DNS metrics for ingress hosts"
)]
struct Cli {
    /// Log lines as text, or as one JSON object a line (level, message, fields and target
    /// at the top level) for log pipelines that parse them. The level comes from `RUST_LOG`.
    #[arg(
        long,
        global = true,
        value_enum,
        ignore_case = true,
        default_value_t = LogFormat::Text,
        env = "COLLECTOR_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the kernel programs and serve metrics until SIGINT/SIGTERM.
    Run {
        #[command(flatten)]
        source: ConfigSource,
        /// Listen address for HTTP, overriding the config's `listen`.
        #[arg(long, value_parser = config::listen_address, env = "COLLECTOR_LISTEN")]
        listen: Option<SocketAddr>,
        /// Turn on the kernel's per-program run-time statistics while running (they cost
        /// two clock reads per program run, so they are off by default). Needs
        /// `CAP_SYS_ADMIN`, which the shipped manifests do not grant: a start without it is
        /// refused.
        #[arg(long)]
        bpf_stats: bool,
    },
    /// Print the running agent's events (connections, DNS queries and answers) as NDJSON.
    Events {
        #[command(flatten)]
        agent: AgentAddress,
    },
    /// The running agent's figures, as in its JSON API: a table for people, or `--json`.
    Stats {
        #[arg(value_enum)]
        what: StatsOf,
        #[command(flatten)]
        agent: AgentAddress,
        /// The agent's JSON answer, on one line (with --watch, a line per refresh, for jq).
        #[arg(long)]
        json: bool,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// A live view of routes, upstreams and DNS, refreshed every second, like top.
    Top {
        #[command(flatten)]
        agent: AgentAddress,
        /// Print one view and exit.
        #[arg(long)]
        once: bool,
    },
    /// Inspect the pinned maps (from bpffs: works while the agent runs and after it crashed).
    Maps {
        #[command(subcommand)]
        action: MapsAction,
    },
    /// Check the kernel, mounts and privileges the agent needs, and that the pin directory,
    /// the [http] files and the listen address work as `run` uses them: one line each, with
    /// the fix. It tries them for real: it pins a probe map in a directory of its own in the
    /// pin directory and binds the listen address for a moment (both gone when it ends; a
    /// probe left by a check that was killed is listed by `cleanup`, with the `rm -r` that
    /// removes it). Exits 1 when a requirement is
    /// not met.
    Check {
        #[command(flatten)]
        source: ConfigSource,
        /// The listen address to try, overriding the config's `listen`, as `run --listen`.
        #[arg(long, value_parser = config::listen_address, env = "COLLECTOR_LISTEN")]
        listen: Option<SocketAddr>,
        /// Check the configuration file alone (no kernel, mounts or privileges, so no root):
        /// for a pipeline that checks a `ConfigMap` before it reaches the nodes. Prints the
        /// warnings a start would log; exits 1 with the file, line and reason when invalid.
        /// With `--listen`, judges the address the pods are started with; with `--pin-dir`,
        /// the rules the file's `pin_dir` has (absolute, no `..`, not the bpffs mount itself,
        /// no dot in a name below it), not its mount.
        #[arg(long, requires = "config")]
        config_only: bool,
    },
    /// List what a crashed collector left in bpffs (pinned maps and links) and nftables;
    /// remove it with --apply, which is refused while a collector runs with the pin
    /// directory (a listing then says it runs).
    Cleanup {
        #[command(flatten)]
        source: ConfigSource,
        /// Remove instead of listing.
        #[arg(long)]
        apply: bool,
    },
}

/// How the CLI finds a running agent.
#[derive(clap::Args)]
struct AgentAddress {
    /// The agent's listen address [default: the config's, else 127.0.0.1:9464].
    #[arg(long, value_parser = config::listen_address, env = "COLLECTOR_LISTEN")]
    listen: Option<SocketAddr>,
    /// The agent's config: its listen address, and its HTTPS and bearer token if it has them.
    #[arg(long, short, env = "COLLECTOR_CONFIG")]
    config: Option<PathBuf>,
    /// PEM certificates to trust for HTTPS [default: the config's TLS certificate].
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// The name the agent's certificate must carry [default: the address connected to].
    #[arg(long)]
    server_name: Option<String>,
}

impl AgentAddress {
    fn endpoint(&self) -> anyhow::Result<agent_http::Endpoint> {
        let (config, refused) = match &self.config {
            Some(path) => {
                let (config, refused) = Config::from_file_for_reading(path)?;
                (Some(config), refused)
            }
            None => (None, None),
        };
        if let Some(refused) = refused {
            let agent = agent_http::agent_address(self.listen, config.as_ref());
            warn_refused_at_start(
                &refused,
                &format!("the agent at {agent}"),
                &[("listen", self.listen.is_some()), ("[http]", false)],
            );
        }
        agent_http::Endpoint::new(
            self.listen,
            config.as_ref(),
            self.cacert.as_deref(),
            self.server_name.as_deref(),
        )
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum StatsOf {
    Proxy,
    Dns,
}

#[derive(Subcommand)]
enum MapsAction {
    /// Every pinned map: type, key and value size, capacity, entries in use.
    List {
        #[command(flatten)]
        source: ConfigSource,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One map's numbers, refreshed, with their change per second.
    Watch {
        /// The map's name, in any case.
        #[arg(ignore_case = true, value_parser = maps::name_parser())]
        name: String,
        #[command(flatten)]
        source: ConfigSource,
        /// Milliseconds between refreshes (100 or more: a dump of the connection table reads
        /// all its slots, 65,536 by default).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..))]
        interval_ms: u64,
        /// Stop after this many refreshes (1 or more).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
    },
    /// One map's contents, decoded, per-CPU values summed (JSON).
    Dump {
        /// The map's name, in any case.
        #[arg(ignore_case = true, value_parser = maps::name_parser())]
        name: String,
        #[command(flatten)]
        source: ConfigSource,
        /// Compact JSON on one line instead of indented.
        #[arg(long)]
        json: bool,
    },
}

/// Where the configuration comes from.
#[derive(clap::Args, Clone)]
struct ConfigSource {
    /// TOML configuration; without it the embedded default is used.
    #[arg(long, short, env = "COLLECTOR_CONFIG")]
    config: Option<PathBuf>,
    /// bpffs directory for the pins, overriding the config's `pin_dir`: one collector per
    /// directory, so each sidecar needs its own (deploy/kubernetes/sidecar.yaml).
    #[arg(long, env = "COLLECTOR_PIN_DIR")]
    pin_dir: Option<PathBuf>,
}

impl ConfigSource {
    /// The configuration a start runs with, every line of the file checked.
    fn load(&self) -> anyhow::Result<Config> {
        let (config, _) =
            self.load_with(|path| Config::from_file(path).map(|config| (config, None)))?;
        Ok(config)
    }

    /// The configuration as a command that only reads the pins takes it (`maps`): a file a
    /// start would refuse gives its `pin_dir` all the same ([`warn_refused_at_start`]).
    /// `cleanup`, which removes what it finds, takes the file only whole.
    fn load_for_reading(&self) -> anyhow::Result<Config> {
        let (config, refused) = self.load_with(Config::from_file_for_reading)?;
        if let Some(refused) = refused {
            warn_refused_at_start(
                &refused,
                &format!("the pins in {}", config.pin_dir.display()),
                &[("pin_dir", self.pin_dir.is_some())],
            );
        }
        Ok(config)
    }

    fn load_with<E: Into<anyhow::Error>>(
        &self,
        from_file: impl FnOnce(&Path) -> Result<(Config, Option<RefusedAtStart>), E>,
    ) -> anyhow::Result<(Config, Option<RefusedAtStart>)> {
        cleanup::note_invocation(self.config.as_deref(), self.pin_dir.as_deref());
        let (mut config, refused) = match &self.config {
            Some(path) => from_file(path).map_err(Into::into)?,
            None => (Config::embedded_default(), None),
        };
        if let Some(pin_dir) = &self.pin_dir {
            anyhow::ensure!(
                pin_dir.is_absolute(),
                "--pin-dir {}: must be an absolute path",
                pin_dir.display()
            );
            // As the file's `pin_dir`: bpffs would refuse it as a name with a dot.
            anyhow::ensure!(
                !pin_dir
                    .components()
                    .any(|part| part == std::path::Component::ParentDir),
                "--pin-dir {}: has a `..`: write the directory without it",
                pin_dir.display()
            );
            config.pin_dir = config::normal_pin_dir(pin_dir);
        }
        Ok((config, refused))
    }
}

/// Says that a start would refuse the config file a reading command took (a bad edit of its
/// `ConfigMap`, while the agent goes on serving), what the command reads all the same, and
/// which of `keys` it uses (each with whether a flag or variable gave it instead) the file,
/// as read, does not set: a key misplaced under another table is not read, and a default
/// must not pass for the file's value.
fn warn_refused_at_start(refused: &RefusedAtStart, reading: &str, keys: &[(&'static str, bool)]) {
    let defaulted: Vec<&str> = keys
        .iter()
        .filter(|(key, given)| !given && refused.defaulted.contains(key))
        .map(|(key, _)| *key)
        .collect();
    let defaults = if defaulted.is_empty() {
        String::new()
    } else {
        format!(
            ", with the default {} (not set in it)",
            defaulted.join(" and ")
        )
    };
    tracing::warn!(
        "{}: a start would refuse this file; reading {reading} all the same{defaults}",
        refused.error
    );
}

/// A watch on the config file `source` names, if any, which reads it again as this start
/// read it into `running`.
fn watch_config_file(
    source: &ConfigSource,
    listen: Option<SocketAddr>,
    running: &Config,
) -> Option<ConfigWatch> {
    let path = source.config.clone()?;
    if !config_watch::can_be_read_again(&path) {
        tracing::info!(
            "the config file {} is not a regular file (a pipe, as from <(...), or a FIFO): read \
             again it would be empty or wait for a writer, so it is not watched (no \
             collector_config_file_* series)",
            path.display()
        );
        return None;
    }
    let source = source.clone();
    let reread: config_watch::Reread = Box::new(move || {
        let mut config = source.load()?;
        serve_on(&mut config, listen)?;
        // A file it names that is not there refuses the next start as surely as a bad line.
        serve::read_http_files(&config.http)?;
        // So do a pin directory off bpffs, a cgroup2 path that is not the root's mount, and
        // a listen address no interface here has (a file shared by many hosts).
        paths::refused_at_start(&config.pin_dir, config.cgroup2.as_deref())?;
        serve::address_here(config.listen)?;
        Ok(config)
    });
    Some(ConfigWatch::new(path, running, reread))
}

/// Sets `--listen`, if given, and refuses the address the agent would serve on if it must.
/// A listen line of the file's own was checked with the file; the default is checked here,
/// since `--listen` may replace it.
fn serve_on(config: &mut Config, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    if let Some(listen) = listen {
        config.listen = listen;
    }
    if let Some(reason) = config::listen_refused(config.listen, &config.routes) {
        let given = if listen.is_some() {
            "--listen"
        } else {
            "the default listen address"
        };
        anyhow::bail!("{given}: {reason}");
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format;
    logging::init(log_format == LogFormat::Json);
    let result = match cli.command {
        Command::Run {
            source,
            listen,
            bpf_stats,
        } => signals::catch_while_starting()
            .context("installing the signal handlers")
            // Before anything else: the agent is PID 1 in a container, where a signal
            // without a handler is dropped (the kubelet would wait its grace period out).
            .and_then(|()| source.load())
            .and_then(|mut config| {
                serve_on(&mut config, listen)?;
                let watch = watch_config_file(&source, listen, &config);
                run(&config, bpf_stats, watch)
            }),
        Command::Events { agent } => agent.endpoint().and_then(|agent| client::events(&agent)),
        Command::Top { agent, once } => {
            agent.endpoint().and_then(|agent| client::top(&agent, once))
        }
        Command::Stats {
            what,
            agent,
            json,
            watch,
        } => agent
            .endpoint()
            .and_then(|agent| client::stats(&agent, matches!(what, StatsOf::Dns), json, watch)),
        Command::Maps {
            action: MapsAction::List { source, json },
        } => source.load_for_reading().and_then(|config| {
            let rows = maps::list(&config.pin_dir)?;
            if json {
                let text = serde_json::to_string(&rows)?;
                output::write(|out| writeln!(out, "{text}"))
            } else {
                output::write(|out| maps::print_list(out, &rows))
            }
        }),
        Command::Maps {
            action:
                MapsAction::Watch {
                    name,
                    source,
                    interval_ms,
                    count,
                },
        } => source.load_for_reading().and_then(|config| {
            maps::watch(
                &config.pin_dir,
                &name,
                std::time::Duration::from_millis(interval_ms),
                count,
            )
        }),
        Command::Maps {
            action: MapsAction::Dump { name, source, json },
        } => source.load_for_reading().and_then(|config| {
            let value = maps::dump(&config.pin_dir, &name)?;
            let text = if json {
                value.to_string()
            } else {
                serde_json::to_string_pretty(&value)?
            };
            output::write(|out| writeln!(out, "{text}"))
        }),
        Command::Check {
            source,
            listen,
            config_only,
        } => source.load().and_then(|config| {
            // The start refuses these below the usual bpffs mount, whatever the host: the
            // file alone has its `pin_dir` judged so, at its line.
            if let Some(pin_dir) = source.pin_dir.as_ref().filter(|_| config_only)
                && let Some(reason) = config::pin_dir_refused(pin_dir)
            {
                anyhow::bail!("--pin-dir {}: {reason}", pin_dir.display());
            }
            check(config, listen, config_only)
        }),
        Command::Cleanup { source, apply } => source
            .load()
            .and_then(|config| cleanup::run(&config, apply)),
    };
    let failed = result.err().filter(|err| !err.is::<output::ReaderGone>());
    // The reason it stopped is a log line like the others where a pipeline parses them; where
    // `RUST_LOG` filters errors out, the plain line below still says it.
    let logged = failed.is_some()
        && log_format == LogFormat::Json
        && tracing::enabled!(tracing::Level::ERROR);
    if let Some(err) = failed.as_ref().filter(|_| logged) {
        tracing::error!("{err:#}");
    }
    // The lines still queued go before the exit, and before the reason below.
    logging::flush();
    match failed {
        None => std::process::ExitCode::SUCCESS,
        Some(err) => {
            // Not `eprintln!`, which panics (status 101) on a closed stderr (`2>&1 | head`).
            if !logged {
                let _ = writeln!(std::io::stderr(), "collector: {err:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// The agent: bind, load and attach, drop the capabilities no longer needed, then serve on
/// the async runtime until SIGINT/SIGTERM, and detach.
fn run(config: &Config, bpf_stats: bool, watch: Option<ConfigWatch>) -> anyhow::Result<()> {
    match open_files::raise_to_hard() {
        Ok(limit) => {
            if let Some(warning) = open_files::warning(limit, config) {
                tracing::warn!("{warning}");
            }
        }
        Err(err) => tracing::warn!("raising the open-file limit to the hard one: {err}"),
    }
    // Bind first: a taken address, an unreadable secret or a bad certificate is refused
    // before anything is attached.
    let listener = serve::bind(config.listen)?;
    let guard = serve::Guard::from_config(&config.http)?;
    let tls = config
        .http
        .tls
        .as_ref()
        .map(|files| tls::server_config(files, Arc::clone(&guard.reloads)))
        .transpose()?;
    for warning in config.start_warnings() {
        tracing::warn!("{warning}");
    }
    if let Some(warning) = ephemeral_ports::warning(config) {
        tracing::warn!("{warning}");
    }
    if signals::stop_requested() {
        tracing::info!("asked to stop before attaching anything");
        return Ok(());
    }
    let Some(attachment) = Attachment::attach(&Options { config, bpf_stats })? else {
        tracing::info!("asked to stop while waiting for the pin directory's lock");
        return Ok(());
    };
    // A stop asked for meanwhile is taken there, after the nftables source started: a
    // crashed run's table, whose pins this start took over, then goes with them.
    serve_attached(config, attachment, listener, guard, tls, watch)
}

/// The rest of [`run`], once the programs are attached: the nftables table, the capability
/// drop, serving, and the stop.
fn serve_attached(
    config: &Config,
    mut attachment: Attachment,
    listener: std::net::TcpListener,
    guard: serve::Guard,
    tls: Option<Arc<rustls::ServerConfig>>,
    watch: Option<ConfigWatch>,
) -> anyhow::Result<()> {
    let mut nft = nft::Source::start(config, attachment.inherited());
    // Before the runtime's threads exist: capabilities are per thread, and they inherit.
    match privileges::keep_only_runtime_capabilities() {
        Ok(dropped) => tracing::info!(
            dropped,
            kept = ?privileges::kept_names(),
            "dropped the capabilities no longer needed"
        ),
        Err(err) => tracing::warn!("could not drop capabilities: {err}"),
    }
    // After the drop: the log's writer thread starts with the reduced set.
    logging::write_from_queue();
    let mut polling = false;
    let result = if signals::stop_requested() {
        tracing::info!("asked to stop while starting");
        Ok(())
    } else {
        serve_until_stopped(
            &mut attachment,
            &mut nft,
            config,
            Serving {
                listener,
                guard,
                tls,
                polling: &mut polling,
                watch,
            },
        )
    };
    if let Err(err) = &result {
        if err.is::<FailedWhileRunning>() {
            tracing::error!(
                "stopping on an error: programs, pins and the nftables table stay, as after a \
                 crash, for the next start to take over with every counter (`{}` removes them)",
                cleanup::command()
            );
            return result;
        }
        // Failed before its first poll, after taking over a crashed run's pins: a detach
        // would throw away the counters the crashed run left. Everything stays, as on an
        // error while running.
        if !polling && attachment.inherited() {
            // Nothing keeps the address table until the next start: count by port meanwhile.
            attachment.leave_addresses_to_the_ports();
            tracing::error!(
                "the start failed after taking over what a crashed collector left: its pins, \
                 with every counter, and this start's programs stay for the next start \
                 (`{}` removes them)",
                cleanup::command()
            );
            return result;
        }
    }
    tracing::info!("stopping: detaching programs and removing pins");
    // The programs first: a hung `nft` then leaves only its table behind when the
    // supervisor's kill comes, not programs on the host's cgroup.
    let detached = attachment.detach();
    // Pins that could not all be removed stay for the next start to take over, as after a
    // crash: so does the table, whose counts go on with theirs.
    if detached.is_err() {
        tracing::warn!("the nftables table stays with the pins left");
        return first_failure(result, [detached]);
    }
    let removed = nft.stop();
    first_failure(result, [removed])
}

/// `result`, or else the first of `then` that failed; the failures not returned are logged,
/// so that what the stop left is said also after a failed run (`Err(a).and(Err(b))` drops
/// `b`).
fn first_failure(
    result: anyhow::Result<()>,
    then: impl IntoIterator<Item = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    then.into_iter()
        .fold(result, |first, next| match (first, next) {
            (Err(first), Err(next)) => {
                tracing::error!("{next:#}");
                Err(first)
            }
            (Ok(()), next) => next,
            (first, Ok(())) => first,
        })
}

/// What [`serve_until_stopped`] serves with, and where it says its poll loop began.
struct Serving<'a> {
    listener: std::net::TcpListener,
    guard: serve::Guard,
    tls: Option<Arc<rustls::ServerConfig>>,
    polling: &'a mut bool,
    /// The config file, when one was given.
    watch: Option<ConfigWatch>,
}

/// Runs the async side until SIGINT or SIGTERM. A SIGHUP is logged and changes nothing.
fn serve_until_stopped(
    attachment: &mut Attachment,
    nft: &mut nft::Source,
    config: &Config,
    serving: Serving<'_>,
) -> anyhow::Result<()> {
    let Serving {
        listener,
        guard,
        tls,
        polling,
        watch,
    } = serving;
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .and_then(|runtime| {
            let result = runtime.block_on(async {
                let mut sigterm =
                    signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
                let mut sigint =
                    signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
                let mut sighup =
                    signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
                let listener = tokio::net::TcpListener::from_std(listener)
                    .context("serving on the listen socket")?;
                let http = Http {
                    listener,
                    guard,
                    tls,
                    watch,
                };
                serve_until_signal(attachment, nft, config, http, polling, async move {
                    // One that came before these handlers were in place.
                    if signals::stop_requested() {
                        return;
                    }
                    loop {
                        tokio::select! {
                            _ = sigterm.recv() => return,
                            _ = sigint.recv() => return,
                            _ = sighup.recv() => tracing::info!(
                                "SIGHUP: nothing to reload; credential and certificate files are re-read when they change, other config changes need a restart"
                            ),
                        }
                    }
                })
                .await
            });
            // Blocking threads still under way (a systemd send to a manager that stopped
            // reading) must not hold the detach that follows.
            runtime.shutdown_timeout(RUNTIME_SHUTDOWN_WAIT);
            result
        })
}

/// How long the stop waits for the runtime's blocking threads.
pub(crate) const RUNTIME_SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The HTTP side: where it listens, what guards it, and its TLS; and the config file, whose
/// state it serves.
struct Http {
    listener: tokio::net::TcpListener,
    guard: serve::Guard,
    tls: Option<Arc<rustls::ServerConfig>>,
    watch: Option<ConfigWatch>,
}

/// The per-client figures, over the kernel's tables (none with `client_stats = false`).
fn client_stats(attachment: &mut Attachment, config: &Config) -> anyhow::Result<ClientStats> {
    Ok(if config.client_stats {
        ClientStats::new(
            Some(ClientTable::map(attachment.take_conn_state()?)?),
            TallyTable::map(
                attachment.take_conn_clients()?,
                collector_common::map_names::CONN_CLIENTS,
            )?,
        )
    } else {
        ClientStats::new(None, TallyTable::unmapped(0))
    })
}

async fn serve_until_signal(
    attachment: &mut Attachment,
    nft: &mut nft::Source,
    config: &Config,
    http: Http,
    polling: &mut bool,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let preexisting = connections_from_before(attachment);
    let maps = attachment.take_maps()?;
    let ring = attachment.take_conn_events()?;
    let clients = Arc::new(Mutex::new(client_stats(attachment, config)?));
    let hub = event_stream::EventHub::new(
        attachment.routes.clone(),
        attachment.dropped_before_attach(),
        event_stream::StreamTerms::of(config, clock::unix_ms()),
    );
    hub.control_connections(attachment.take_conn_stream_wanted()?);
    let connection_drain =
        events::connection_drain(ring, Arc::clone(&clients), hub.connections.clone());
    let mut events = tokio::spawn(events::drain_periodically(Arc::clone(&connection_drain)));
    let (dns_sources, domain_drain) = dns_sources(attachment, config, &hub)?;
    let mut dns_events = tokio::spawn(events::drain_periodically(Arc::clone(&domain_drain)));

    let latest = Arc::new(SharedSnapshot::new(snapshot::Snapshot::before_first_read(
        config.client_stats,
        dns_sources.before_first_read(),
    )));
    let listening = bound_address(&http.listener, config.listen);
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let liveness = serve::Liveness::new(config.poll_interval);
    let mut server = tokio::spawn(serve::serve(
        http.listener,
        http.tls,
        serve::Sources {
            latest: Arc::clone(&latest),
            hub: Arc::clone(&hub),
            liveness: Arc::clone(&liveness),
        },
        http.guard,
        async move {
            let _ = server_stopped.await;
        },
    ));
    log_running(attachment, &listening);
    let watchdog = tokio::spawn(systemd::notify(Arc::clone(&liveness)));

    let mut poller = Poller::new(
        maps,
        poller::Watched {
            routes: attachment.routes.clone(),
            upstreams: attachment.upstreams.clone(),
            retired_slots: attachment.retired_slots.clone(),
            connection_table_slots: config.connection_table_slots,
            poll_interval: config.poll_interval,
        },
        clients,
        vec![connection_drain, domain_drain],
        dns_sources,
        Arc::clone(&hub),
        preexisting,
    )
    .counting_drops_from(attachment.dropped_before_attach())
    .watching_config(http.watch);
    let mut netlink = NetlinkSource::default();
    let mut address_changes = attachment.address_change_signal();
    let mut ticks = tokio::time::interval(config.poll_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    *polling = true;
    let mut stalls = Stalls::default();
    let outcome = loop {
        tokio::select! {
            () = &mut stop => break stopped(stalls.at_stop(&liveness)),
            _ = ticks.tick() => {
                let programs = program_stats(attachment);
                let interfaces = read_interfaces(attachment, links::Watched::of(config), &mut netlink);
                hub.update_switches();
                match poller.poll(programs, interfaces, nft.read()) {
                    Polled::Fresh(snapshot) => latest.store(*snapshot),
                    Polled::Failed(health) => latest.store_failed(*health),
                }
                stalls.before_polled(&liveness);
                liveness.polled();
            }
            announced = address_change(address_changes.as_ref()) => on_change(
                attachment, &mut address_changes, announced, links::Watched::of(config), &mut netlink,
            ),
            ended = &mut events => break Err(reader_stopped(ended, "connection")),
            ended = &mut dns_events => break Err(reader_stopped(ended, "DNS")),
            ended = &mut server => break Err(server_ended(ended)),
        }
    };
    if outcome.is_ok() {
        systemd::stopping();
    }
    watchdog.abort();
    // The periodic drains end first: none can then send after the streams' `end` line (one
    // under way finishes before the last drain takes the same lock).
    events.abort();
    dns_events.abort();
    // After a clean stop only: after an error, a reader that panicked in its drain would
    // only panic again, before `finish` switched the events off.
    if outcome.is_ok() {
        poller.last_drain();
    }
    hub.stop(outcome.is_ok());
    if outcome.is_err() {
        attachment.leave_addresses_to_the_ports();
    }
    let _ = stop_server.send(());
    finish(outcome, server, &hub).await
}

/// What was bound, as the socket says (the configured address if it cannot).
fn bound_address(listener: &tokio::net::TcpListener, configured: SocketAddr) -> String {
    listener
        .local_addr()
        .map_or_else(|_| configured.to_string(), |addr| addr.to_string())
}

/// The line that says the agent runs, and with what.
fn log_running(attachment: &Attachment, listening: &str) {
    tracing::info!(
        version = VERSION,
        listen = %listening,
        routes = attachment.routes.len(),
        upstreams = attachment.upstreams.len(),
        interfaces = ?attachment.interfaces(),
        cgroup2 = %attachment.cgroup2,
        inherited = attachment.inherited(),
        "collector running"
    );
}

/// How the run ends: after a stop, once the HTTP server has drained; after an error, at
/// once, with what it attached left running for the next start.
async fn finish(
    outcome: anyhow::Result<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    hub: &event_stream::EventHub,
) -> anyhow::Result<()> {
    match outcome {
        Ok(()) => wait_for_server(server).await,
        Err(err) => {
            server.abort();
            // The programs stay attached: with the switches on they would send whole events
            // to a ring nobody reads until the next start, rather than count names.
            hub.switch_off();
            Err(FailedWhileRunning(err).into())
        }
    }
}

/// The kernel's run statistics of the programs, for the poll.
fn program_stats(attachment: &Attachment) -> Vec<snapshot::ProgramStats> {
    attachment
        .program_stats()
        .into_iter()
        .map(|(name, run_time_ns, run_count)| snapshot::ProgramStats {
            name,
            run_time_ns,
            run_count,
        })
        .collect()
}

/// How a stop ends the loop: cleanly, or as after an error if the loop had stood still.
fn stopped(stalled: Option<std::time::Duration>) -> anyhow::Result<()> {
    match stalled {
        Some(stalled) => Err(StoppedWhileStalled(stalled).into()),
        None => Ok(()),
    }
}

/// The poll loop's stalls past `/healthz`'s limit, for the stop: looked at before a poll
/// says the loop runs again, and at the stop (a stall anywhere else is followed by one of
/// them).
#[derive(Default)]
struct Stalls {
    /// How long the loop had stood still when a stop was asked during a stall.
    stopped_in: Option<std::time::Duration>,
    /// When the last stall ended, and how long it was.
    last: Option<(std::time::Instant, std::time::Duration)>,
}

/// How long after a stall a stop is still taken for the probes' restart: the kubelet's kill
/// may come a few seconds after the probe that decided it, and the loop may have run again
/// meanwhile (the shipped probes run every 10 s).
const STALL_STOP_WINDOW: std::time::Duration = std::time::Duration::from_secs(15);

impl Stalls {
    /// Before a poll marks the loop alive again.
    fn before_polled(&mut self, liveness: &serve::Liveness) {
        if let Some(stalled) = liveness.stalled_for() {
            if signals::stop_requested() {
                self.stopped_in.get_or_insert(stalled);
            }
            self.last = Some((std::time::Instant::now(), stalled));
        }
    }

    /// At the stop: the stall it was asked in or came right after, if any.
    fn at_stop(&self, liveness: &serve::Liveness) -> Option<std::time::Duration> {
        self.stopped_in
            .or_else(|| liveness.stalled_for())
            .or_else(|| {
                self.last
                    .filter(|(ended, _)| ended.elapsed() < STALL_STOP_WINDOW)
                    .map(|(_, stalled)| stalled)
            })
    }
}

/// A stop asked while the poll loop stood still past `/healthz`'s limit, or within
/// [`STALL_STOP_WINDOW`] after: most likely the kubelet's restart after failed liveness
/// probes (or an operator's stop of a wedged agent).
/// It is carried out as after a crash, everything left for the next start to take over
/// with every counter: the restart is the probe's, not a removal, and a stall that outlasts
/// the kill's grace keeps them too (a clean stop here reset every counter only when the
/// stall ended within that grace).
#[derive(Debug, thiserror::Error)]
#[error(
    "asked to stop during, or right after, a stall of the poll loop of {} s, past /healthz's limit (a liveness probe's restart, most likely)",
    .0.as_secs()
)]
struct StoppedWhileStalled(std::time::Duration);

/// What the running agent stopped on, other than a signal: a task it needs ended. What it
/// attached stays, as after a crash, so that the supervisor's restart takes it over with
/// every counter (a clean stop here would reset them all, at every repeat of the fault).
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
struct FailedWhileRunning(anyhow::Error);

/// Why the HTTP server ended before the stop.
fn server_ended(ended: Result<std::io::Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    let why = match ended {
        Ok(Err(err)) => err.into(),
        Ok(Ok(())) => anyhow::anyhow!("it returned"),
        Err(err) => err.into(),
    };
    why.context("the HTTP server stopped")
}

/// Refreshes the local address table, and the attached interfaces if the links changed, on
/// an announced change; a signal that failed is given up, and the polls read the changes
/// from then on.
fn on_change(
    attachment: &mut Attachment,
    signal: &mut Option<ChangeSignal>,
    announced: std::io::Result<()>,
    watched: links::Watched<'_>,
    netlink: &mut NetlinkSource,
) {
    match announced {
        Ok(()) => {
            let began = std::time::Instant::now();
            if attachment.refresh_local_addresses() {
                sync_links(attachment, watched, netlink);
            }
            if let Some(signal) = signal {
                signal.synced(began.elapsed());
            }
        }
        Err(err) => {
            tracing::warn!("address changes are read at the polls only: {err}");
            *signal = None;
        }
    }
}

/// The next announced change of the namespace's addresses (never, without a signal).
async fn address_change(signal: Option<&ChangeSignal>) -> std::io::Result<()> {
    match signal {
        Some(signal) => signal.announced().await,
        None => std::future::pending().await,
    }
}

/// Waits for the HTTP server to finish the requests under way, for a while. They must not
/// hold up the detach: a client that stopped reading (an event stream piped into a pager)
/// would keep its connection for ever, and the kubelet's or systemd's SIGKILL would then
/// leave everything attached.
async fn wait_for_server(
    mut server: tokio::task::JoinHandle<std::io::Result<()>>,
) -> anyhow::Result<()> {
    match tokio::time::timeout(HTTP_SHUTDOWN_GRACE, &mut server).await {
        Ok(Ok(result)) => result.context("serving HTTP"),
        Ok(Err(err)) => Err(err).context("the HTTP server task failed"),
        Err(_) => {
            tracing::warn!(
                "HTTP clients still connected {} s after the stop: closing them",
                HTTP_SHUTDOWN_GRACE.as_secs()
            );
            server.abort();
            Ok(())
        }
    }
}

/// What the poll reads of DNS: the top domains, fed by the name table and the DNS events
/// (drained by the returned drain), and the in-flight table while responses are matched.
fn dns_sources(
    attachment: &mut Attachment,
    config: &Config,
    hub: &event_stream::EventHub,
) -> anyhow::Result<(poller::DnsSources, events::SharedDrain)> {
    let dns_ring = attachment.take_dns_events()?;
    hub.control_dns(attachment.take_dns_stream_wanted()?);
    let names = TallyTable::map(
        attachment.take_dns_names()?,
        collector_common::map_names::DNS_NAMES,
    )?;
    let domains = Arc::new(Mutex::new(dns::DomainStats::new(
        config.dns.top_k,
        config.dns.sample_every,
        names,
    )));
    let drain = dns::domain_drain(dns_ring, Arc::clone(&domains), hub.dns.clone());
    let in_flight = if config.dns.enabled && config.dns.match_responses {
        Some(dns::InFlightTable::map(attachment.take_dns_inflight()?)?)
    } else {
        None
    };
    let sources = poller::DnsSources {
        enabled: config.dns.enabled,
        match_responses: config.dns.enabled && config.dns.match_responses,
        match_every: config.dns.match_every,
        domains,
        listed: config.dns.top_k,
        in_flight,
    };
    Ok((sources, drain))
}

/// How long a stop waits for HTTP requests under way before it detaches; well inside the
/// 60 s that the shipped systemd unit and `DaemonSet` give before SIGKILL.
pub(crate) const HTTP_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The connections on the route ports open since before this start that no connection table
/// of ours holds: after a clean stop, all that are open; after a crash, those the crashed run
/// had itself found open at its start, and those on ports that were no route then (the ones
/// it accepted are in the table it left). None if they cannot be listed (said in the log,
/// and by `collector_proxy_connections_from_before_start_known`): `active` then leaves them
/// out until they close.
/// Those the crashed run's full table turned away are among them: counted `untracked`, they
/// are out of `active` but for this listing.
fn connections_from_before(attachment: &Attachment) -> Preexisting {
    match Preexisting::list(&attachment.routes, &attachment.upstreams, || {
        attachment.tracked_cookies()
    }) {
        Ok(preexisting) => preexisting,
        Err(err) => {
            tracing::warn!("listing the connections open from before the start: {err:#}");
            Preexisting::unknown()
        }
    }
}

/// The interfaces as netlink last listed them, and how its reads went.
#[derive(Default)]
struct NetlinkSource {
    health: snapshot::SourceHealth,
    links: Vec<links::Link>,
}

/// Reads the interfaces over netlink and keeps the attached set current. A failed read is
/// reported as the netlink source being down, and the interfaces' counters stay as last
/// read, as the kernel maps' do after a failed read: series that vanished for a poll would
/// end in Prometheus and fire alerts on absence.
fn read_interfaces(
    attachment: &mut Attachment,
    watched: links::Watched<'_>,
    netlink: &mut NetlinkSource,
) -> poller::InterfaceView {
    // Addresses first: their watch announces links too, and what it announced before this
    // point the list below covers (after it, the watch wakes the run loop).
    attachment.refresh_local_addresses();
    sync_links(attachment, watched, netlink);
    let hooks = attachment.check_hooks();
    poller::InterfaceView {
        attached: attachment.interfaces(),
        links: netlink.links.clone(),
        hooks,
        address_table: attachment.address_table_use(),
        health: netlink.health.clone(),
    }
}

/// Lists the links and keeps the attached set current: at every poll, and when the kernel
/// announces a change of the links (a pod's veth counts from its first packets, not from the
/// next poll).
fn sync_links(
    attachment: &mut Attachment,
    watched: links::Watched<'_>,
    netlink: &mut NetlinkSource,
) {
    let began = std::time::Instant::now();
    let read = links::list();
    netlink.health.record(&read, began.elapsed());
    match read {
        Ok(links) => {
            attachment.sync_interfaces(&links, watched);
            netlink.links = links;
        }
        Err(err) => {
            tracing::warn!("listing interfaces over netlink failed: {err}");
        }
    }
}

/// Why an event reader task ended (it never should while the agent runs).
fn reader_stopped(
    ended: Result<anyhow::Result<()>, tokio::task::JoinError>,
    which: &str,
) -> anyhow::Error {
    let why = match ended {
        Ok(Err(err)) => err,
        Ok(Ok(())) => anyhow::anyhow!("it returned"),
        Err(err) => err.into(),
    };
    why.context(format!("the {which} event reader stopped"))
}

/// `collector check`: the config file alone, or the host as `run` would use it.
fn check(mut config: Config, listen: Option<SocketAddr>, config_only: bool) -> anyhow::Result<()> {
    if config_only {
        // What `run` refuses of the address it would serve on, the default's included.
        serve_on(&mut config, listen)?;
        return check_config(&config);
    }
    if let Some(listen) = listen {
        config.listen = listen;
    }
    check_host(&config)
}

/// A config that parsed is valid; what a start would warn of goes to stderr.
fn check_config(config: &Config) -> anyhow::Result<()> {
    for warning in config.start_warnings() {
        let _ = writeln!(std::io::stderr(), "warning: {warning}");
    }
    output::write(|out| writeln!(out, "config valid"))
}

/// `collector check` on the host: one line per requirement, and status 1 if one is not met.
fn check_host(config: &Config) -> anyhow::Result<()> {
    let verdicts = check::verdicts(config)?;
    let printed = output::write(|out| {
        for verdict in &verdicts {
            let mark = verdict.status.mark();
            writeln!(out, "{mark}  {:<14} {}", verdict.name, verdict.detail)?;
        }
        Ok(())
    });
    // The status says whether the host is ready, read to the end or not.
    let failed = verdicts
        .iter()
        .filter(|v| v.status == check::Status::Fail)
        .count();
    if failed > 0 {
        anyhow::bail!("{failed} requirement(s) not met");
    }
    printed
}
