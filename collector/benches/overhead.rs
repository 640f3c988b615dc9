//! The collector's cost on the traffic it watches, measured side by side in one run: new
//! connections per second and bulk throughput on loopback, requests per second through a real
//! reverse proxy (nginx), and the queries per second of a real DNS server (unbound) under
//! dnsperf, alternately without and with the agent attached, in a network namespace of the
//! benchmark's own. The proxy and DNS loads also run with an empty classifier in the agent's
//! place (what any tc program costs them), and each load ends with the same pairs run with
//! the agent on neither side, which shows how far a median strays when nothing differs. Then the kernel's own run-time
//! statistics give the cost per program run, and test runs the instruction cost of each
//! classifier path (`path_cost`), and the agent's memory under names and clients never seen
//! before (`memory`). Results go to docs/BENCHMARKS.md.
//!
//! `cargo xtask bench [-- --pairs N --seconds S --only PART --no-docs]` (`-- --help` says more)

#[path = "overhead/empty_programs.rs"]
mod empty_programs;
#[path = "overhead/memory.rs"]
mod memory;
#[path = "overhead/nginx.rs"]
mod nginx;
#[path = "overhead/path_cost.rs"]
mod path_cost;
#[path = "overhead/ratio.rs"]
mod ratio;
use ratio::median;
#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use empty_programs::{EmptyPrograms, Hooks};
use ratio::RatioSummary;
use support::{Agent, AgentConfig, Netns, dns::Unbound, dns_json, sample, scrape};

const CONNECT_PORT: u16 = 18080;
const BULK_PORT: u16 = 18090;
const CLIENT_THREADS: usize = 1;
const CHUNK: usize = 256 * 1024;

const ROUTES: &str = r#"
[[routes]]
name = "connect"
ports = [18080]
type = "http"

[[routes]]
name = "bulk"
ports = [18090]
type = "tcp"
"#;

/// The benchmark's own client, followed as a proxy's connections to a backend are.
const UPSTREAM_OF_CONNECT: &str = r#"
[[upstreams]]
name = "connect"
ports = [18080]
"#;

/// Both ports shared by server name: a route by name beside each. The benchmark's clients
/// send no ClientHello, so every connection waits for its first segment and goes to the
/// route without a name, and the server name reader runs on every packet arriving for any
/// socket.
const SHARED_BY_NAME: &str = r#"
[[routes]]
name = "connect-by-name"
ports = [18080]
type = "https"
sni = ["connect.example"]

[[routes]]
name = "bulk-by-name"
ports = [18090]
type = "tcp"
sni = ["bulk.example"]
"#;

/// The mode that measures the method itself: pairs run exactly as in the other modes, but
/// the agent is started on neither side, so every ratio should be 1.
const NOISE_TITLE: &str = "Nothing attached on either side (the method's own noise)";
const NOISE_TEXT: &str = "The same alternation with the agent started on neither side (\"with\" \
    is the run where the other modes start it): the true ratio is 1, so the interval should \
    cover 1, and the distance of the median from 1 shows how far this run's other medians \
    stray when nothing differs.";

/// The mode that measures the hook: the agent's place taken by an empty classifier on lo.
const EMPTY_CLASSIFIER_TITLE: &str =
    "An empty classifier on lo in the agent's place (what any tc program costs these packets)";
const EMPTY_CLASSIFIER_TEXT: &str = "The same alternation with no agent: the \"with\" side has \
    only an empty classifier attached where the agent's loopback classifier goes (tcx ingress \
    on lo, a program that returns at once). Its ratio is what putting any tc program on this \
    path costs these packets, before one instruction of ours runs: the best ratio a \
    classifier on this hook can reach on this machine, so a bound above the agent's (the \
    agent's targets are judged against it to say whether any classifier could meet them \
    here).";

/// The proxy load's floor: both of the agent's hooks with an empty program each.
const EMPTY_HOOKS_TITLE: &str = "Empty programs in both of the agent's places (what the hooks \
    cost these connections)";
const EMPTY_HOOKS_TEXT: &str = "As above, with an empty `sock_ops` program on the cgroup2 root \
    as well, where the agent's `track_connections` goes. Once any program is attached there, \
    the kernel calls it for every socket's lifecycle questions (the SYN's timeout, the initial \
    window, ECN, connect and established), several calls a connection, whatever the program \
    does: the best ratio any collector on these two hooks can reach here.";

const AGAINST_EMPTY_HOOKS_TITLE: &str =
    "The agent with its defaults against the empty programs (programs on both hooks on both sides)";
const AGAINST_EMPTY_HOOKS_TEXT: &str = "The agent with its defaults on the \"with\" side, the \
    empty programs of the mode above on the \"without\" side: both sides pay the hooks, so the \
    ratio is what the agent costs beyond them, the part its own instructions and maps decide.";

/// The nginx load's floor, as [`EMPTY_HOOKS_TITLE`] for the bare server.
const NGINX_EMPTY_HOOKS_TITLE: &str = "Empty programs in both of the agent's places (what the \
    hooks cost these requests)";
const NGINX_EMPTY_HOOKS_TEXT: &str = "The same alternation with no agent: the \"with\" side has \
    an empty classifier on lo's ingress and an empty `sock_ops` program on the cgroup2 root, \
    where the agent's programs go, and nothing else: the best ratio any collector on these two \
    hooks can reach through this nginx.";

const AGAINST_EMPTY_TEXT: &str = "The agent counting only on the \"with\" side, the empty \
    classifier of the mode above on the \"without\" side: both put a program on every packet, \
    so the ratio is what the agent costs beyond the hook, the part its own instructions and \
    maps decide.";

/// What runs beside the load on one side of a pair.
#[derive(Clone, Copy)]
enum Beside<'a> {
    Nothing,
    /// The agent on this config, started fresh for the run.
    Agent(&'a AgentConfig),
    /// [`EmptyPrograms`] on these hooks, attached for the run.
    Empty(Hooks),
}

impl<'a> Beside<'a> {
    fn attach(self, netns: &Netns) -> Attached {
        match self {
            Self::Nothing => Attached::Nothing,
            Self::Agent(config) => Attached::Agent(Agent::start(netns, config)),
            Self::Empty(hooks) => Attached::Empty {
                _attached: EmptyPrograms::attach(netns, hooks),
            },
        }
    }

    fn config(self) -> Option<&'a AgentConfig> {
        match self {
            Self::Agent(config) => Some(config),
            Self::Nothing | Self::Empty(_) => None,
        }
    }
}

/// What [`Beside::attach`] attached for one run.
enum Attached {
    Nothing,
    Agent(Agent),
    /// Held for their attachments, detached on drop.
    Empty {
        _attached: EmptyPrograms,
    },
}

impl Attached {
    fn agent(&self) -> Option<&Agent> {
        match self {
            Self::Agent(agent) => Some(agent),
            Self::Nothing | Self::Empty { .. } => None,
        }
    }

    /// Stops the agent, which must exit cleanly, or detaches the empty programs.
    fn detach(self) {
        if let Self::Agent(agent) = self {
            assert!(agent.stop().success());
        }
    }
}

struct Settings {
    pairs: usize,
    seconds: f64,
    write_docs: bool,
    /// `--only PART`, one of [`PARTS`]: for quick comparisons (docs not written).
    only: Option<String>,
}

impl Settings {
    fn runs(&self, part: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only == part)
    }
}

/// What `--help` prints.
const USAGE: &str = "usage: cargo xtask bench [-- [--pairs N] [--seconds S] [--only PART] [--no-docs]]

  --pairs N     pairs of runs per mode, at least 1 (default 9; the issues' targets ask for 5 or more)
  --seconds S   seconds per run (default 3)
  --only PART   one part alone, for quick comparisons: proxy, nginx, dns, nft, paths, poll
                or memory
                (docs/BENCHMARKS.md is not written)
  --no-docs     print the report without writing docs/BENCHMARKS.md";

/// The parts `--only` takes, in the order a full run measures them.
const PARTS: [&str; 7] = ["proxy", "nginx", "dns", "nft", "paths", "poll", "memory"];

/// The settings from the command line; usage on `--help`, and a refusal of what it does not
/// know, before anything is measured (a misspelt option would otherwise run the whole bench).
fn settings() -> Settings {
    // cargo bench adds --bench after the arguments typed.
    match parse_settings(std::env::args().skip(1).filter(|arg| arg != "--bench")) {
        Ok(Some(settings)) => settings,
        Ok(None) => {
            println!("{USAGE}");
            std::process::exit(0);
        }
        Err(err) => {
            eprintln!("bench: {err}\n\n{USAGE}");
            std::process::exit(2);
        }
    }
}

/// `None` for `--help`.
fn parse_settings(mut args: impl Iterator<Item = String>) -> Result<Option<Settings>, String> {
    let mut settings = Settings {
        // Six pairs are the fewest that give a median a 95 % interval (their extremes); nine
        // give one that leaves the extremes out (the 2nd to the 8th ratio).
        pairs: 9,
        seconds: 3.0,
        write_docs: true,
        only: None,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--pairs" => {
                settings.pairs = value()?
                    .parse()
                    .ok()
                    .filter(|&pairs| pairs > 0)
                    .ok_or("--pairs takes a whole number, at least 1")?;
            }
            "--seconds" => {
                settings.seconds = value()?
                    .parse()
                    .ok()
                    .filter(|seconds: &f64| seconds.is_finite() && *seconds > 0.0)
                    .ok_or("--seconds takes a number of seconds above 0")?;
            }
            "--no-docs" => settings.write_docs = false,
            "--only" => {
                let part = value()?;
                if !PARTS.contains(&part.as_str()) {
                    return Err(format!(
                        "--only takes one of {}, not {part}",
                        PARTS.join(", ")
                    ));
                }
                settings.only = Some(part);
                settings.write_docs = false;
            }
            "--help" | "-h" => return Ok(None),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Some(settings))
}

/// The thread that takes the stop signals.
const STOP_THREAD: &str = "bench-stop";

/// A Ctrl-C, a `kill`, or the end of the cargo that started the bench stops it where it is,
/// and its guards (namespace, agent, nginx, unbound) run only as a stack unwinds, which a
/// signal skips. A thread takes SIGINT, SIGTERM and SIGHUP instead, removes what this run
/// made (`support::sweep_this_run`: its agent gets SIGTERM and detaches as it always does)
/// and exits with 128 + the signal's number, whatever the sweep met. Meanwhile the other
/// threads make nothing more (`support::halt_if_stopping`), and one that panics (a Ctrl-C
/// reaches the agent and servers too, which then end) waits for that exit rather than
/// unwinding into it.
fn clean_up_on_signals() {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let mut signals = runtime.block_on(async {
        [libc::SIGINT, libc::SIGTERM, libc::SIGHUP]
            .map(|number| (number, signal(SignalKind::from_raw(number)).unwrap()))
    });
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if thread::current().name() != Some(STOP_THREAD) {
            // A panic a signal caused can come a moment before the signal thread wakes.
            let deadline = Instant::now() + Duration::from_secs(1);
            while !support::stopping() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            support::halt_if_stopping();
        }
        report(info);
    }));
    thread::Builder::new()
        .name(STOP_THREAD.into())
        .spawn(move || {
            let [(int, sigint), (term, sigterm), (hup, sighup)] = &mut signals;
            let number = runtime.block_on(async {
                tokio::select! {
                    _ = sigint.recv() => *int,
                    _ = sigterm.recv() => *term,
                    _ = sighup.recv() => *hup,
                }
            });
            // Written, not printed: after a hang-up stderr fails, and a print would panic.
            let _ = writeln!(
                std::io::stderr(),
                "bench: stopped by signal {number}: removing what this run made"
            );
            let _ = std::panic::catch_unwind(support::sweep_this_run);
            std::process::exit(128 + number);
        })
        .unwrap();
    // A signal to `cargo xtask bench` alone ends the cargo that runs the bench and not the
    // bench: it then hears of it as a SIGTERM.
    // SAFETY: getppid and prctl have no memory preconditions.
    unsafe {
        let parent = libc::getppid();
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        if libc::getppid() != parent {
            libc::raise(libc::SIGTERM);
        }
    }
}

/// The CPU the loads run on in the pairs: the first this process may use.
fn load_cpu() -> usize {
    allowed_cpus()[0]
}

/// Pins the calling thread to [`load_cpu`], where the proxy load's client and server threads
/// all run. The loop is then bound by the CPU, so what the collector takes from it shows in
/// full. Left to the scheduler on two CPUs, each connection waits on wake-ups across CPUs
/// (about 15,000 a second here against 49,000 on one), which hide what it costs and spread
/// the runs three times as wide (docs/DESIGN.md, Measuring the cost).
fn pin_to_load_cpu() {
    let cpu = load_cpu();
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` came from the set the kernel filled, so it is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a cpu_set_t of the size passed; pid 0 is the calling thread.
    let pinned =
        unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) };
    assert_eq!(
        pinned,
        0,
        "sched_setaffinity to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
}

/// Servers that run for the whole benchmark: one answers a byte with a byte and closes, one
/// swallows bulk data.
fn start_servers(netns: &Netns, stop: &Arc<AtomicBool>) {
    let connect = netns.run(|| TcpListener::bind(("127.0.0.1", CONNECT_PORT)).unwrap());
    let connect = Arc::new(connect);
    for _ in 0..CLIENT_THREADS {
        let listener = Arc::clone(&connect);
        let stop = Arc::clone(stop);
        thread::spawn(move || {
            pin_to_load_cpu();
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut stream, _)) = listener.accept() else {
                    continue;
                };
                let mut byte = [0u8; 1];
                if stream.read_exact(&mut byte).is_ok() {
                    let _ = stream.write_all(&byte);
                }
            }
        });
    }
    let bulk = netns.run(|| TcpListener::bind(("127.0.0.1", BULK_PORT)).unwrap());
    thread::spawn(move || {
        pin_to_load_cpu();
        let mut buf = vec![0u8; CHUNK];
        for stream in bulk.incoming() {
            let Ok(mut stream) = stream else { continue };
            while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
        }
    });
}

/// New connections per second: each sends a byte, reads the answer and the server's close.
fn connection_rate(netns: &Netns, seconds: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENT_THREADS)
        .map(|_| {
            netns.spawn(move || {
                pin_to_load_cpu();
                let mut done = 0u64;
                let mut byte = [7u8; 1];
                while Instant::now() < deadline {
                    let mut stream = TcpStream::connect(("127.0.0.1", CONNECT_PORT)).unwrap();
                    stream.write_all(&byte).unwrap();
                    stream.read_exact(&mut byte).unwrap();
                    let mut rest = [0u8; 1];
                    let _ = stream.read(&mut rest);
                    done += 1;
                }
                done
            })
        })
        .collect();
    let total: u64 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let rate = total as f64 / started.elapsed().as_secs_f64();
    rate
}

/// Bulk throughput of one stream, in bytes per second.
fn bulk_throughput(netns: &Netns, seconds: f64) -> f64 {
    netns.run(move || {
        pin_to_load_cpu();
        let mut stream = TcpStream::connect(("127.0.0.1", BULK_PORT)).unwrap();
        let chunk = vec![b'b'; CHUNK];
        let started = Instant::now();
        let deadline = started + Duration::from_secs_f64(seconds);
        let mut sent = 0u64;
        while Instant::now() < deadline {
            stream.write_all(&chunk).unwrap();
            sent += CHUNK as u64;
        }
        stream.shutdown(Shutdown::Write).unwrap();
        #[expect(clippy::cast_precision_loss, reason = "byte counts far below 2^52")]
        let rate = sent as f64 / started.elapsed().as_secs_f64();
        rate
    })
}

/// A warm-up run of each side, then `settings.pairs` pairs of runs without the agent
/// (`run(false)`) and with it (`run(true)`), alternating which side goes first so that drift
/// favours neither; `log` reports each pair as it ends.
fn alternate<T>(
    settings: &Settings,
    mut run: impl FnMut(bool) -> T,
    mut log: impl FnMut(usize, &T, &T),
) -> Vec<(T, T)> {
    run(false);
    run(true);
    (0..settings.pairs)
        .map(|i| {
            let (without, with) = if i % 2 == 0 {
                let without = run(false);
                (without, run(true))
            } else {
                let with = run(true);
                (run(false), with)
            };
            log(i, &without, &with);
            (without, with)
        })
        .collect()
}

struct Pair {
    connect_without: f64,
    connect_with: f64,
    bulk_without: f64,
    bulk_with: f64,
    /// The agent's CPU use during the connection load, in cores (none in the noise mode).
    agent_cpu: Option<f64>,
}

/// One run of each load with `beside` attached: (connections per second, bulk bytes per
/// second, the agent's CPU use in cores during the connection load if an agent ran).
fn measure(netns: &Netns, beside: Beside, seconds: f64) -> (f64, f64, Option<f64>) {
    let attached = beside.attach(netns);
    let cpu_before = attached
        .agent()
        .map_or(0.0, |agent| cpu_seconds(agent.pid()));
    let connect = connection_rate(netns, seconds);
    let agent_cpu = attached
        .agent()
        .map(|agent| (cpu_seconds(agent.pid()) - cpu_before) / seconds);
    let bulk = bulk_throughput(netns, seconds);
    attached.detach();
    (connect, bulk, agent_cpu)
}

/// The agent's CPU use for the report, "—" where no agent ran.
fn cores(cpu: Option<f64>) -> String {
    cpu.map_or_else(|| String::from("—"), |cpu| format!("{cpu:.3}"))
}

/// One program's runs and average time per run, from the kernel's statistics.
struct Cost {
    program: String,
    runs: f64,
    per_run_ns: f64,
}

/// The cost of each of `programs` from a scrape of an agent started with `--bpf-stats`;
/// programs that did not run (tc ingress/egress are not attached to loopback) are left out.
fn costs(metrics: &str, programs: &[&str]) -> Vec<Cost> {
    programs
        .iter()
        .filter_map(|program| {
            let labels = [("program", *program)];
            let seconds =
                sample(metrics, "collector_bpf_program_run_seconds_total", &labels).unwrap_or(0.0);
            let runs = sample(metrics, "collector_bpf_program_runs_total", &labels).unwrap_or(0.0);
            (runs > 0.0).then(|| Cost {
                program: (*program).to_owned(),
                runs,
                per_run_ns: seconds * 1e9 / runs,
            })
        })
        .collect()
}

/// A table of costs per run, and net of the statistics' own cost: `--bpf-stats` attaches an
/// empty program of each type beside ours, which sees the same packets and callbacks.
fn cost_table(costs: &[Cost]) -> String {
    let floor = |name: &str| {
        costs
            .iter()
            .find(|c| c.program == name)
            .map_or(0.0, |c| c.per_run_ns)
    };
    let mut table = String::from(
        "| program | runs | ns per run | minus the empty program |\n|---|---|---|---|\n",
    );
    for cost in costs {
        let net = if cost.program.starts_with("stats_floor") {
            String::from("(the floor)")
        } else if cost.program == "track_connections" {
            format!("{:.1}", cost.per_run_ns - floor("stats_floor_sock_ops"))
        } else if cost.program == "read_server_names" {
            // No empty cgroup_skb program runs beside it: the tc one's timing stands in.
            format!(
                "{:.1} (the tc floor)",
                cost.per_run_ns - floor("stats_floor_tc")
            )
        } else {
            format!("{:.1}", cost.per_run_ns - floor("stats_floor_tc"))
        };
        let _ = writeln!(
            table,
            "| {} | {:.0} | {:.1} | {net} |",
            cost.program, cost.runs, cost.per_run_ns
        );
    }
    table
}

/// One mode's part of the report: per-pair table, medians, costs per run (only where the
/// agent ran: `with` is what ran beside the load on the "with" side).
fn mode_report(pairs: &[Pair], without: Beside, with: Beside, costs: Option<&[Cost]>) -> String {
    let connect_ratios: Vec<f64> = pairs
        .iter()
        .map(|p| p.connect_with / p.connect_without)
        .collect();
    let bulk_ratios: Vec<f64> = pairs.iter().map(|p| p.bulk_with / p.bulk_without).collect();
    let (connect, bulk) = (
        RatioSummary::of(&connect_ratios),
        RatioSummary::of(&bulk_ratios),
    );

    let mut report = String::new();
    let _ = writeln!(
        report,
        "| pair | new conn/s without | with | ratio | agent CPU (cores) | bulk Gbit/s without | with | ratio |"
    );
    let _ = writeln!(report, "|---|---|---|---|---|---|---|---|");
    for (i, p) in pairs.iter().enumerate() {
        let _ = writeln!(
            report,
            "| {i} | {:.0} | {:.0} | {:.3} | {} | {:.2} | {:.2} | {:.3} |",
            p.connect_without,
            p.connect_with,
            p.connect_with / p.connect_without,
            cores(p.agent_cpu),
            p.bulk_without * 8e-9,
            p.bulk_with * 8e-9,
            p.bulk_with / p.bulk_without
        );
    }
    let (what, judged) = what_ran(without, with);
    let _ = writeln!(
        report,
        "\n**Median ratio{what}: new connections {}, bulk throughput {}.**",
        connect.describe(judged.then_some(0.98)),
        bulk.describe(judged.then_some(0.99))
    );
    let Some(costs) = costs else {
        return report;
    };
    let _ = writeln!(
        report,
        "\nCost per program run, from the kernel's run-time statistics (`--bpf-stats`) under the same loads; the empty programs (`stats_floor_*`) show what the statistics' own timing costs per run on this VM:\n"
    );
    report.push_str(&cost_table(costs));
    report
}

/// What ran, for a mode's summary line, and whether the targets apply: not where nothing
/// differs, nor to the agent's share beyond the empty programs.
fn what_ran(without: Beside, with: Beside) -> (&'static str, bool) {
    match (without, with) {
        (Beside::Empty(_), _) => (" of the agent against the empty programs", false),
        (_, Beside::Empty(Hooks::Classifier)) => (" with an empty classifier on lo alone", true),
        (_, Beside::Empty(Hooks::ClassifierAndSockOps)) => (
            " with an empty classifier on lo and an empty sock_ops program on the cgroup2 root",
            true,
        ),
        (_, Beside::Nothing) => (" with nothing attached on either side", false),
        (_, Beside::Agent(_)) => ("", true),
    }
}

/// Average cost per run of each program, from the kernel's statistics, under `load`.
fn program_costs(netns: &Netns, config: &AgentConfig, load: impl FnOnce()) -> Vec<Cost> {
    let agent = Agent::start_with(netns, config, &["--bpf-stats"]);
    load();
    let metrics = scrape(netns);
    assert!(agent.stop().success());
    costs(
        &metrics,
        &[
            "track_connections",
            "stats_floor_sock_ops",
            "read_server_names",
            "count_loopback",
            "count_ingress",
            "count_egress",
            "stats_floor_tc",
        ],
    )
}

/// The queries dnsperf sends, round robin: names the server answers from its local zones.
const DNS_QUERIES: &str = "www.test A\napi.test A\nwww.test AAAA\nmail.test MX\ntxt.test TXT\n";

/// One dnsperf run at its maximum rate, on `cpu` only if given: (queries sent, queries per
/// second).
fn dnsperf_on(
    netns: &Netns,
    queries: &std::path::Path,
    seconds: f64,
    cpu: Option<usize>,
) -> (u64, f64) {
    let mut command = netns.command("taskset");
    let cpus = cpu.map_or_else(|| cpu_list(&allowed_cpus()), |cpu| cpu.to_string());
    command.args(["-c", &cpus, "dnsperf"]);
    let text = run_dnsperf(command, queries, &["-l", &format!("{seconds}")]);
    let field = |name: &str| -> f64 {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {name:?} in dnsperf's output:\n{text}"))
    };
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a count"
    )]
    let sent = field("Queries sent:") as u64;
    (sent, field("Queries per second:"))
}

/// Runs `command`, dnsperf or a wrapper ending in it, against the server on 127.0.0.1:53 with
/// `queries` and the arguments `more`; its report.
fn run_dnsperf(
    mut command: std::process::Command,
    queries: &std::path::Path,
    more: &[&str],
) -> String {
    let out = command
        .args(["-s", "127.0.0.1", "-p", "53", "-d"])
        .arg(queries)
        .args(more)
        .output()
        .expect("running dnsperf (apt install dnsperf; cargo xtask prereqs does)");
    assert!(
        out.status.success(),
        "dnsperf: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the agent counted in one DNS run.
struct DnsCount {
    /// Queries dnsperf sent.
    sent: u64,
    /// The agent's `totalQueries` (it starts from zero each run).
    counted: u64,
    /// The agent's CPU use during the run, in cores.
    agent_cpu: f64,
}

/// One DNS run with `beside` attached: queries per second, and what the agent counted if
/// one ran.
fn measure_dns(
    netns: &Netns,
    beside: Beside,
    queries: &std::path::Path,
    seconds: f64,
) -> (f64, Option<DnsCount>) {
    let attached = beside.attach(netns);
    let cpu_before = attached
        .agent()
        .map_or(0.0, |agent| cpu_seconds(agent.pid()));
    let (sent, qps) = dnsperf_on(netns, queries, seconds, Some(load_cpu()));
    let counted = attached.agent().map(|agent| {
        let cpu = cpu_seconds(agent.pid()) - cpu_before;
        // dnsperf stops waiting for late answers; the kernel counted every query it saw.
        let counted = settled_count(sent, || dns_json(netns)["totalQueries"].as_u64());
        DnsCount {
            sent,
            counted,
            agent_cpu: cpu / seconds,
        }
    });
    attached.detach();
    (qps, counted)
}

/// CPU time every thread of a process has used so far, in seconds: from the scheduler's
/// nanoseconds, since `/proc/PID/stat`'s 10 ms ticks are 0.003 cores of a 3 s run.
fn cpu_seconds(pid: u32) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "nanoseconds as float seconds")]
    let seconds = cpu_ns(pid) as f64 / 1e9;
    seconds
}

/// "at commit 1a2b3c4 on 2026-12-03, on 2 CPUs and Linux 6.18.0": what the numbers were
/// measured on, so that a reader can tell them from the code changed since.
fn measured_where() -> String {
    let output = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let commit = output("git", &["rev-parse", "--short", "HEAD"]).map_or_else(
        || String::from("an unknown commit"),
        |commit| format!("commit {commit}"),
    );
    let changed = output("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|status| !status.is_empty());
    let date = output("date", &["-u", "+%F"]).unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let machine = output("systemd-detect-virt", &["--vm"])
        .map_or_else(String::new, |vm| format!(" (a {vm} VM)"));
    format!(
        "at {commit}{} on {date}, on {cpus} CPUs and Linux {}{machine}",
        if changed {
            " with uncommitted changes"
        } else {
            ""
        },
        kernel.trim()
    )
}

/// The agent's count once it reached `expected`, or what it read after a few polls more: a
/// count short of it is a result to report, not a reason to abort the run.
fn settled_count(expected: u64, mut read: impl FnMut() -> Option<u64>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let count = read();
        if count.is_some_and(|count| count >= expected) || Instant::now() >= deadline {
            return count.unwrap_or_else(|| panic!("the agent's count could not be read"));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// "0 in every run", or the sum of `counted − expected` with how many runs fell short and
/// how many went over.
fn count_differences(runs: impl Iterator<Item = (u64, u64)>) -> String {
    let (mut sum, mut short, mut over) = (0i128, 0, 0);
    for (counted, expected) in runs {
        let difference = i128::from(counted) - i128::from(expected);
        sum += difference;
        short += usize::from(difference < 0);
        over += usize::from(difference > 0);
    }
    if short + over == 0 {
        String::from("0 in every run")
    } else {
        format!("{sum:+} ({short} runs short, {over} over)")
    }
}

struct DnsPair {
    without: f64,
    with: f64,
    /// None in the noise mode, which runs no agent.
    count: Option<DnsCount>,
}

/// Pairs of DNS runs with `without` and with `with` attached, alternating, with dnsperf and
/// unbound (`unbound`: its process id) on [`load_cpu`]: as with the proxy load, the loop is
/// then bound by the CPU, which every packet's classifier takes from, and not by where the
/// scheduler puts the two.
fn dns_pairs(
    netns: &Netns,
    without: Beside,
    with: Beside,
    queries: &std::path::Path,
    settings: &Settings,
    unbound: u32,
) -> Vec<DnsPair> {
    pin(unbound, &load_cpu().to_string());
    eprintln!("dns warm-up");
    let run = |on: bool| {
        let beside = if on { with } else { without };
        measure_dns(netns, beside, queries, settings.seconds)
    };
    let pairs = alternate(settings, run, |i, without, (with, count)| {
        eprint!("dns pair {i}: qps {:.0} -> {with:.0}", without.0);
        if let Some(count) = &count {
            eprint!(
                ", sent {}, counted {}, agent CPU {:.3} cores",
                count.sent, count.counted, count.agent_cpu
            );
        }
        eprintln!();
    });
    pairs
        .into_iter()
        .map(|((without, _), (with, count))| DnsPair {
            without,
            with,
            count,
        })
        .collect()
}

/// Where dnsperf and unbound run while the classifier's cost is measured.
#[derive(Clone, Copy)]
enum Placement {
    /// Where the scheduler puts them.
    Scheduled,
    /// Both on CPU 0, as in the pairs: a query and its response run on one CPU.
    OneCpu,
    /// unbound on CPU 0, dnsperf on CPU 1: a response runs on another CPU than its query.
    TwoCpus,
}

impl Placement {
    const ALL: [Self; 3] = [Self::Scheduled, Self::OneCpu, Self::TwoCpus];

    fn describe(self) -> &'static str {
        match self {
            Self::Scheduled => "dnsperf and unbound where the scheduler puts them",
            Self::OneCpu => {
                "both on one CPU, as in the pairs (a query and its response run on one CPU)"
            }
            Self::TwoCpus => {
                "unbound on one CPU, dnsperf on another (each response on another CPU than its query)"
            }
        }
    }

    /// (unbound's CPUs, dnsperf's CPU) among the `allowed` ones; `None` if there are too few.
    fn cpus(self, allowed: &[usize]) -> Option<(String, Option<usize>)> {
        match self {
            Self::Scheduled => Some((cpu_list(allowed), None)),
            Self::OneCpu => allowed.first().map(|&cpu| (cpu.to_string(), Some(cpu))),
            Self::TwoCpus => match allowed {
                [unbound, dnsperf, ..] => Some((unbound.to_string(), Some(*dnsperf))),
                _ => None,
            },
        }
    }
}

/// The CPUs this process may run on (its affinity, which a cpuset may narrow).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set, filled by the call.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a cpu_set_t of the size passed.
    let got = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) };
    assert_eq!(
        got,
        0,
        "sched_getaffinity: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: reads of the set filled above, at indexes below its size.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// CPUs as taskset lists them.
fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The classifier's cost per packet from the kernel's statistics under dnsperf (every packet
/// takes its DNS path), with the empty program on the same packets, for each placement of
/// dnsperf and unbound (`unbound`: its process id, whose threads are moved).
fn dns_costs(
    netns: &Netns,
    config: &AgentConfig,
    queries: &std::path::Path,
    seconds: f64,
    unbound: u32,
) -> Vec<(Placement, Vec<Cost>)> {
    let allowed = allowed_cpus();
    let mut measured = Vec::new();
    for placement in Placement::ALL {
        let Some((unbound_cpus, dnsperf_cpu)) = placement.cpus(&allowed) else {
            continue;
        };
        pin(unbound, &unbound_cpus);
        let agent = Agent::start_with(netns, config, &["--bpf-stats"]);
        dnsperf_on(netns, queries, seconds, dnsperf_cpu);
        let metrics = scrape(netns);
        assert!(agent.stop().success());
        measured.push((
            placement,
            costs(&metrics, &["count_loopback", "stats_floor_tc"]),
        ));
    }
    pin(unbound, &cpu_list(&allowed));
    measured
}

/// Moves every thread of process `pid` to `cpus`.
fn pin(pid: u32, cpus: &str) {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("taskset (util-linux)");
    assert!(status.success(), "taskset -a -p -c {cpus} {pid}");
}

/// One DNS mode's sides, pairs and costs.
struct DnsMode<'a> {
    /// What the sides ran, for the report.
    title: &'static str,
    /// What the mode shows, where the title alone does not say.
    text: Option<&'static str>,
    without: Beside<'a>,
    with: Beside<'a>,
    pairs: Vec<DnsPair>,
    /// Per placement of dnsperf and unbound, where the agent ran against nothing.
    costs: Option<Vec<(Placement, Vec<Cost>)>>,
}

/// The agent on `[dns] section` (with the benchmark's routes), for [`dns_mode`].
fn dns_config(section: &str) -> AgentConfig {
    AgentConfig::shipped_poll(&format!("{ROUTES}\n[dns]\n{section}"))
}

/// Pairs with `without` and `with` attached, then, where the agent runs against nothing,
/// its programs' costs.
fn dns_mode<'a>(
    netns: &Netns,
    (title, text): (&'static str, Option<&'static str>),
    without: Beside<'a>,
    with: Beside<'a>,
    queries: &std::path::Path,
    settings: &Settings,
    unbound: u32,
) -> DnsMode<'a> {
    let costs = match (without, with) {
        (Beside::Nothing, Beside::Agent(config)) => Some(config),
        _ => None,
    };
    DnsMode {
        title,
        text,
        without,
        with,
        pairs: dns_pairs(netns, without, with, queries, settings, unbound),
        costs: costs.map(|config| dns_costs(netns, config, queries, settings.seconds, unbound)),
    }
}

fn dns_report(settings: &Settings, modes: &[DnsMode]) -> String {
    let mut report = String::new();
    let _ = writeln!(report, "## DNS overhead on loopback\n");
    let _ = writeln!(
        report,
        "Command: `cargo xtask bench -- --pairs {} --seconds {}`: dnsperf at its maximum rate \
         against unbound (one thread, answering from local zones) on 127.0.0.1:53, both on one CPU \
         (the loop bound by the CPU, which the classifier takes from), {} s per run, pairs \
         alternating; \"counted\" is the agent's `totalQueries` after the run (a fresh \
         agent each run), \"sent\" what dnsperf reports. The cost per packet comes from the \
         kernel's run-time statistics (`--bpf-stats`) under the same load: `count_loopback`, the \
         one classifier on lo, takes its DNS path for every packet here, and the empty program \
         `stats_floor_tc` shows what the statistics' own timing costs per run. It is measured \
         three times: with dnsperf and unbound where the scheduler puts them, both on one CPU (as \
         in the pairs), and on two: on loopback a query is classified on dnsperf's CPU and its \
         response on unbound's, and latency tracking's in-flight slot then changes CPU twice a \
         query.\n",
        settings.pairs, settings.seconds, settings.seconds
    );
    for mode in modes {
        let _ = writeln!(report, "### {}\n", mode.title);
        if let Some(text) = mode.text {
            let _ = writeln!(report, "{text}\n");
        }
        dns_mode_report(&mut report, mode);
    }
    report
}

fn dns_mode_report(report: &mut String, mode: &DnsMode) {
    let pairs = &mode.pairs;
    let ratios: Vec<f64> = pairs.iter().map(|p| p.with / p.without).collect();
    let qps = RatioSummary::of(&ratios);
    let _ = writeln!(
        report,
        "| pair | qps without | with | ratio | sent | counted | agent CPU (cores) |"
    );
    let _ = writeln!(report, "|---|---|---|---|---|---|---|");
    for (i, p) in pairs.iter().enumerate() {
        let count = |field: fn(&DnsCount) -> u64| {
            p.count
                .as_ref()
                .map_or_else(|| String::from("—"), |count| field(count).to_string())
        };
        let (sent, counted) = (count(|c| c.sent), count(|c| c.counted));
        let agent_cpu = cores(p.count.as_ref().map(|count| count.agent_cpu));
        let _ = writeln!(
            report,
            "| {i} | {:.0} | {:.0} | {:.3} | {sent} | {counted} | {agent_cpu} |",
            p.without,
            p.with,
            p.with / p.without,
        );
    }
    let differences = count_differences(
        pairs
            .iter()
            .filter_map(|p| p.count.as_ref())
            .map(|count| (count.counted, count.sent)),
    );
    let summary = match (mode.without, mode.with) {
        (Beside::Nothing, Beside::Nothing) => format!(
            "Median qps ratio with nothing attached on either side: {}",
            qps.describe(None)
        ),
        (Beside::Nothing, Beside::Empty(_)) => format!(
            "Median qps ratio with an empty classifier on lo alone: {}",
            qps.describe(Some(0.985))
        ),
        (Beside::Nothing, Beside::Agent(_)) => format!(
            "Median qps ratio {}; counted − sent: {differences} (target 0)",
            qps.describe(Some(0.985))
        ),
        (Beside::Agent(_), Beside::Agent(_)) => format!(
            "Median qps ratio of the agent with nftables counting against the agent without: {}; counted − sent: {differences}",
            qps.describe(None)
        ),
        _ => format!(
            "Median qps ratio of the agent against the empty classifier: {}; counted − sent: {differences}",
            qps.describe(None)
        ),
    };
    let _ = writeln!(report, "\n**{summary}.**\n");
    for (placement, costs) in mode.costs.iter().flatten() {
        let _ = writeln!(report, "Costs with {}:\n", placement.describe());
        report.push_str(&cost_table(costs));
        report.push('\n');
    }
}

/// The cost of one poll of every source with 50 routes configured, from the agent's own
/// per-source read durations (median over a few seconds of polls), next to reading the same
/// counters through `nft -j`.
fn poll_costs(netns: &Netns, settings: &Settings) -> String {
    use std::fmt::Write as _;
    let mut routes = String::new();
    for i in 0..50u16 {
        let _ = write!(
            routes,
            "[[routes]]\nname = \"r{i}\"\nports = [{}]\n\n",
            20000 + i
        );
    }
    let config = AgentConfig::with_nft(&routes);
    let agent = Agent::start(netns, &config);
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); 4];
    let deadline = Instant::now() + Duration::from_secs_f64(settings.seconds);
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(150));
        let metrics = scrape(netns);
        for (i, source) in ["ebpf", "netlink", "nft"].iter().enumerate() {
            if let Some(v) = sample(
                &metrics,
                "collector_source_read_duration_seconds",
                &[("source", source)],
            ) {
                samples[i].push(v);
            }
        }
        if let Some(v) = sample(&metrics, "collector_poll_duration_seconds", &[]) {
            samples[3].push(v);
        }
    }
    let mut nft_json = Vec::new();
    for _ in 0..20 {
        let began = Instant::now();
        let out = netns
            .command("nft")
            .args(["-j", "list", "counters", "table", "inet", &config.nft_table])
            .output()
            .unwrap();
        assert!(out.status.success());
        nft_json.push(began.elapsed().as_secs_f64());
    }
    assert!(agent.stop().success());
    let mut report = String::new();
    let _ = writeln!(report, "## One poll with 50 routes\n");
    let _ = writeln!(
        report,
        "Command: `cargo xtask bench -- --seconds {}`: an agent with 50 routes (100 nftables \
         counters with DNS) polling every 100 ms, no traffic; the agent's own per-source read \
         durations, median over the run:\n",
        settings.seconds
    );
    let _ = writeln!(report, "| source | median µs per read |");
    let _ = writeln!(report, "|---|---|");
    for (name, values) in [
        "ebpf (kernel maps)",
        "netlink (interfaces)",
        "nft (nfnetlink)",
        "whole poll (ebpf + rates + snapshot)",
    ]
    .iter()
    .zip(samples.iter_mut())
    {
        if !values.is_empty() {
            let _ = writeln!(report, "| {name} | {:.0} |", median(values) * 1e6);
        }
    }
    let _ = writeln!(
        report,
        "| for comparison: `nft -j list counters table inet ...` (process + JSON) | {:.0} |",
        median(&mut nft_json) * 1e6
    );
    report.push_str(&poll_cost_by_interfaces(settings));
    report
}

/// Veths beside lo for [`poll_cost_by_interfaces`]: a node's pod interfaces, each watched.
const POLLED_VETHS: usize = 200;

/// The agent's whole work per poll (its CPU time, every thread, over its poll count) with lo
/// alone and with [`POLLED_VETHS`] veths more: each poll lists the links, checks each
/// attached hook (`BPF_PROG_QUERY`) and reads the maps. What the read durations above leave
/// out is in it too.
fn poll_cost_by_interfaces(settings: &Settings) -> String {
    let mut rows = Vec::new();
    for veths in [0, POLLED_VETHS] {
        let netns = Netns::new();
        let pods = Netns::new();
        let mut links = String::new();
        for i in 0..veths {
            let _ = writeln!(
                links,
                "link add pv{i} type veth peer name pp{i} netns {}\nlink set pv{i} up",
                pods.name
            );
        }
        if veths > 0 {
            support::ip_batch(&netns.name, &links);
        }
        let config = AgentConfig::polling_every(
            "[[routes]]\nname = \"web\"\nports = [18080]\ntype = \"http\"\n",
            100,
        );
        let agent = Agent::start(&netns, &config);
        let polls = || sample(&scrape(&netns), "collector_polls_total", &[]).unwrap();
        // The first polls after a start attach nothing more, but let them pass.
        thread::sleep(Duration::from_secs(1));
        let (polls_before, cpu_before) = (polls(), cpu_ns(agent.pid()));
        thread::sleep(Duration::from_secs_f64(settings.seconds.max(3.0)));
        let (polls_after, cpu_after) = (polls(), cpu_ns(agent.pid()));
        assert!(agent.stop().success());
        #[expect(clippy::cast_precision_loss, reason = "nanoseconds of a few seconds")]
        let per_poll = (cpu_after - cpu_before) as f64 / (polls_after - polls_before);
        rows.push((veths + 1, per_poll / 1000.0));
    }
    let mut report = String::from(
        "\nThe agent's CPU time per poll, all its threads (`/proc/PID/task/*/schedstat`), over \
         its own poll count, polling every 100 ms with one route and no traffic, the scrapes \
         that count the polls at the two ends only:\n\n| interfaces watched | µs of CPU per \
         poll |\n|---|---|\n",
    );
    for (interfaces, micros) in rows {
        let _ = writeln!(report, "| {interfaces} | {micros:.0} |");
    }
    report
}

/// CPU time of every thread of process `pid` so far, in nanoseconds.
fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// New-connection rate and bulk throughput, with nothing attached and with `with`,
/// alternating, against the servers already running; then the programs' cost per run where
/// `with` is the agent. With nothing on both sides: the method's own noise.
fn proxy_mode(netns: &Netns, without: Beside, with: Beside, settings: &Settings) -> String {
    eprintln!("warm-up");
    let run = |on: bool| {
        let beside = if on { with } else { without };
        measure(netns, beside, settings.seconds)
    };
    let pairs = alternate(settings, run, |i, without, with| {
        eprintln!(
            "pair {i}: connections/s {:.0} -> {:.0} (agent CPU {}), bulk Gbit/s {:.2} -> {:.2}",
            without.0,
            with.0,
            cores(with.2),
            without.1 * 8e-9,
            with.1 * 8e-9
        );
    });
    let pairs: Vec<Pair> = pairs
        .into_iter()
        .map(|(without, with)| Pair {
            connect_without: without.0,
            connect_with: with.0,
            bulk_without: without.1,
            bulk_with: with.1,
            agent_cpu: with.2,
        })
        .collect();
    // Measured once per config: where the agent runs against nothing.
    let against_nothing = matches!(without, Beside::Nothing);
    let costs = with.config().filter(|_| against_nothing).map(|config| {
        program_costs(netns, config, || {
            connection_rate(netns, settings.seconds);
            bulk_throughput(netns, settings.seconds);
        })
    });
    mode_report(&pairs, without, with, costs.as_deref())
}

/// One run of the nginx load, with the agent if there was one.
struct NginxRun {
    /// Requests per second; each is a new connection.
    rate: f64,
    /// Requests made.
    made: u64,
    /// The connections the agent counted closed on the route after the run (a fresh agent
    /// each run), and its CPU use in cores.
    counted: Option<(u64, f64)>,
}

fn measure_nginx(netns: &Netns, beside: Beside, seconds: f64) -> NginxRun {
    let attached = beside.attach(netns);
    let cpu_before = attached
        .agent()
        .map_or(0.0, |agent| cpu_seconds(agent.pid()));
    let (made, rate) = nginx::connection_rate(netns, seconds);
    let counted = attached.agent().map(|agent| {
        let cpu = (cpu_seconds(agent.pid()) - cpu_before) / seconds;
        let closed = settled_count(made, || {
            let closed = sample(
                &scrape(netns),
                "collector_proxy_connections_closed_total",
                &[("route", "nginx")],
            )?;
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a count"
            )]
            Some(closed as u64)
        });
        (closed, cpu)
    });
    attached.detach();
    NginxRun {
        rate,
        made,
        counted,
    }
}

/// Requests through nginx with and without the agent (with the embedded default and a route
/// for nginx's port), with empty programs in its places, the agent against those, and the
/// same pairs with nothing attached.
fn nginx_overhead(netns: &Netns, settings: &Settings) -> String {
    let nginx = nginx::Nginx::start(netns);
    // With its client, on one CPU as the other loads.
    pin(nginx.pid(), &load_cpu().to_string());
    let config = AgentConfig::shipped_poll(nginx::ROUTE);
    let mut report = String::new();
    let _ = writeln!(
        report,
        "## Proxy overhead through nginx
"
    );
    let _ = writeln!(
        report,
        "Command: `cargo xtask bench -- --pairs {} --seconds {}`: nginx (one process, \
         `master_process off`) on port {} proxies every request to a backend server block of its \
         own over kept-alive upstream connections, as an ingress proxy does; one client thread \
         makes one request per new connection (`Connection: close`), on nginx's CPU, {} s per \
         run, pairs alternating. \"counted\" is the agent's closed connections on the route after the run \
         (a fresh agent each run), \"made\" the requests the client completed. The bare server \
         above answers a byte and closes: its ratio is the collector's share of the cheapest \
         possible connection, this one its share of a proxied request.\n",
        settings.pairs,
        settings.seconds,
        nginx::PROXY_PORT,
        settings.seconds
    );
    let agent = Beside::Agent(&config);
    let empty_hooks = Beside::Empty(Hooks::ClassifierAndSockOps);
    let modes = [
        (
            "With the embedded default's settings (its polling; the nginx port as the one route)",
            None,
            Beside::Nothing,
            agent,
        ),
        (
            NGINX_EMPTY_HOOKS_TITLE,
            Some(NGINX_EMPTY_HOOKS_TEXT),
            Beside::Nothing,
            empty_hooks,
        ),
        (
            AGAINST_EMPTY_HOOKS_TITLE,
            Some(AGAINST_EMPTY_HOOKS_TEXT),
            empty_hooks,
            agent,
        ),
        (
            NOISE_TITLE,
            Some(NOISE_TEXT),
            Beside::Nothing,
            Beside::Nothing,
        ),
    ];
    for (title, text, without, with) in modes {
        let _ = writeln!(report, "### {title}\n");
        if let Some(text) = text {
            let _ = writeln!(report, "{text}\n");
        }
        eprintln!("nginx warm-up");
        let run =
            |on: bool| measure_nginx(netns, if on { with } else { without }, settings.seconds);
        let pairs = alternate(settings, run, |i, without, with| {
            eprintln!(
                "nginx pair {i}: requests/s {:.0} -> {:.0}",
                without.rate, with.rate
            );
        });
        nginx_mode_report(&mut report, &pairs, without, with);
        // Measured once, where the agent runs against nothing.
        if let (Beside::Nothing, Some(config)) = (without, with.config()) {
            let costs = program_costs(netns, config, || {
                nginx::connection_rate(netns, settings.seconds);
            });
            let _ = writeln!(
                report,
                "Cost per program run under the same load, from the kernel's run-time statistics (`--bpf-stats`):\n"
            );
            report.push_str(&cost_table(&costs));
        }
        report.push('\n');
    }
    report
}

fn nginx_mode_report(
    report: &mut String,
    pairs: &[(NginxRun, NginxRun)],
    without: Beside,
    with: Beside,
) {
    let ratios: Vec<f64> = pairs
        .iter()
        .map(|(without, with)| with.rate / without.rate)
        .collect();
    let summary = RatioSummary::of(&ratios);
    let _ = writeln!(
        report,
        "| pair | requests/s without | with | ratio | made | counted | agent CPU (cores) |"
    );
    let _ = writeln!(report, "|---|---|---|---|---|---|---|");
    for (i, (without, with)) in pairs.iter().enumerate() {
        let (counted, cpu) = with.counted.map_or_else(
            || (String::from("—"), String::from("—")),
            |(counted, cpu)| (counted.to_string(), format!("{cpu:.3}")),
        );
        let _ = writeln!(
            report,
            "| {i} | {:.0} | {:.0} | {:.3} | {} | {counted} | {cpu} |",
            without.rate,
            with.rate,
            with.rate / without.rate,
            with.made,
        );
    }
    let (what, judged) = what_ran(without, with);
    let verdict = format!(
        "\n**Median ratio{what}: new connections {}",
        summary.describe(judged.then_some(0.98))
    );
    if with.config().is_none() {
        let _ = writeln!(report, "{verdict}.**\n");
        return;
    }
    let differences = count_differences(
        pairs
            .iter()
            .filter_map(|(_, with)| with.counted.map(|(counted, _)| (counted, with.made))),
    );
    let _ = writeln!(report, "{verdict}; counted − made: {differences}.**\n");
}

/// The proxy modes: with the per-client figures (the default), without, with both ends followed,
/// and with the ports shared by server name; then an empty classifier in the agent's place,
/// and the method's own noise.
fn proxy_overhead(netns: &Netns, settings: &Settings) -> String {
    let stop = Arc::new(AtomicBool::new(false));
    start_servers(netns, &stop);
    let mut report = String::new();
    let _ = writeln!(report, "## Proxy overhead on loopback\n");
    let _ = writeln!(
        report,
        "Command: `cargo xtask bench -- --pairs {} --seconds {}` ({} client thread(s), with the \
         server's threads on one CPU; {} s per run; pairs alternate which side runs first; ratio = \
         with / without, median over pairs).\n",
        settings.pairs, settings.seconds, CLIENT_THREADS, settings.seconds
    );
    // (title, top-level settings, tables after the routes)
    let modes = [
        (
            "With per-client figures (the default, `client_stats = true`)",
            "",
            "",
        ),
        (
            "Without per-client figures (`client_stats = false`: no `connectionsByIP`, `topIPs` or connection events)",
            "client_stats = false\n",
            "",
        ),
        (
            "With the connecting side followed as an upstream too (`[[upstreams]]` on the route's port: each connection is followed at both ends, as a proxy's connections to a backend it opens one per request are)",
            "",
            UPSTREAM_OF_CONNECT,
        ),
        (
            "With the ports shared by server name (a route with `sni` beside each: each connection waits for its first segment, and the server name reader runs on every packet arriving for a socket)",
            "",
            SHARED_BY_NAME,
        ),
    ];
    for (title, setting, tables) in modes {
        let config = AgentConfig::shipped_poll(&format!("{setting}{ROUTES}{tables}"));
        let _ = writeln!(report, "### {title}\n");
        report.push_str(&proxy_mode(
            netns,
            Beside::Nothing,
            Beside::Agent(&config),
            settings,
        ));
        report.push('\n');
    }
    let default = AgentConfig::shipped_poll(ROUTES);
    let empty_hooks = Beside::Empty(Hooks::ClassifierAndSockOps);
    for (title, text, without, with) in [
        (
            EMPTY_CLASSIFIER_TITLE,
            EMPTY_CLASSIFIER_TEXT,
            Beside::Nothing,
            Beside::Empty(Hooks::Classifier),
        ),
        (
            EMPTY_HOOKS_TITLE,
            EMPTY_HOOKS_TEXT,
            Beside::Nothing,
            empty_hooks,
        ),
        (
            AGAINST_EMPTY_HOOKS_TITLE,
            AGAINST_EMPTY_HOOKS_TEXT,
            empty_hooks,
            Beside::Agent(&default),
        ),
        (NOISE_TITLE, NOISE_TEXT, Beside::Nothing, Beside::Nothing),
    ] {
        let _ = writeln!(report, "### {title}\n\n{text}\n");
        report.push_str(&proxy_mode(netns, without, with, settings));
        report.push('\n');
    }
    stop.store(true, Ordering::Relaxed);
    report
}

/// unbound in the namespace, and dnsperf's query file: what the DNS and nftables parts load.
struct DnsLoad {
    _server: Unbound,
    _scratch: support::ScratchDir,
    queries: std::path::PathBuf,
    /// unbound's process id, whose threads are moved between CPUs.
    unbound: u32,
}

impl DnsLoad {
    fn start(netns: &Netns) -> Self {
        let server = Unbound::start(netns, false);
        let scratch = support::ScratchDir::new("dnsperf");
        let queries = scratch.path("queries.txt");
        std::fs::write(&queries, DNS_QUERIES).unwrap();
        let unbound = server.main_pid();
        Self {
            _server: server,
            _scratch: scratch,
            queries,
            unbound,
        }
    }
}

/// Queries per second of unbound under dnsperf with the agent in each DNS mode, with an
/// empty classifier in its place, and with nothing.
fn dns_overhead(netns: &Netns, settings: &Settings) -> String {
    let load = DnsLoad::start(netns);
    let (queries, unbound) = (load.queries.as_path(), load.unbound);
    let tracking = dns_config("match_responses = true\n");
    let sampled = dns_config("match_every = 16\n");
    let counting = dns_config("match_responses = false\n");
    let mode = |described, without, with| {
        dns_mode(netns, described, without, with, queries, settings, unbound)
    };
    let modes = [
        mode(
            (
                "With latency tracking (the default, `[dns] match_responses = true`)",
                None,
            ),
            Beside::Nothing,
            Beside::Agent(&tracking),
        ),
        mode(
            (
                "With latency tracking for one query in 16 (`[dns] match_every = 16`: latency, cache and in-flight figures from that sample)",
                None,
            ),
            Beside::Nothing,
            Beside::Agent(&sampled),
        ),
        mode(
            (
                "Counting only (`[dns] match_responses = false`: no latency, cache or in-flight figures)",
                None,
            ),
            Beside::Nothing,
            Beside::Agent(&counting),
        ),
        mode(
            (EMPTY_CLASSIFIER_TITLE, Some(EMPTY_CLASSIFIER_TEXT)),
            Beside::Nothing,
            Beside::Empty(Hooks::Classifier),
        ),
        mode(
            (
                "Counting only against the empty classifier (a classifier on lo on both sides)",
                Some(AGAINST_EMPTY_TEXT),
            ),
            Beside::Empty(Hooks::Classifier),
            Beside::Agent(&counting),
        ),
        mode(
            (NOISE_TITLE, Some(NOISE_TEXT)),
            Beside::Nothing,
            Beside::Nothing,
        ),
    ];
    drop(load);
    dns_report(settings, &modes)
}

/// A host firewall's hooks (as iptables or kube-proxy make them): NAT at prerouting and
/// postrouting, conntrack on, so that our chains are not the namespace's first hooks.
const HOST_FIREWALL: &str = "table inet bench_host_firewall {
  chain prerouting { type nat hook prerouting priority dstnat; }
  chain input { type filter hook input priority 0; ct state established,related accept; }
  chain postrouting { type nat hook postrouting priority srcnat; }
}
";

/// `nft -f -` of `script` in `netns`.
fn nft_in(netns: &Netns, script: &str) {
    use std::io::Write as _;
    let mut nft = netns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft");
    nft.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success(), "nft -f - of {script}");
}

/// What our nftables table costs dnsperf against unbound: the agent with `[nftables]
/// enabled = true` against the agent with it off, per rule form, in the bare namespace
/// (where our chains are its only netfilter hooks) and beside a host firewall.
fn nft_overhead(netns: &Netns, settings: &Settings) -> String {
    use std::fmt::Write as _;
    let load = DnsLoad::start(netns);
    let (queries, unbound) = (load.queries.as_path(), load.unbound);
    let agent = |top: &str, enabled| {
        AgentConfig::shipped_poll_nft(&format!("{top}{ROUTES}\n[dns]\n"), enabled)
    };
    let forms = [
        (
            "the host's packets (the rule by default: port, then `fib daddr type local`)",
            "",
        ),
        (
            "with `extra_local_addresses` (a packet on a watched port jumps to a chain that counts it and returns if local, else counts it if its address is in the family's set)",
            "extra_local_addresses = [\"203.0.113.0/28\", \"2001:db8::/120\"]\n",
        ),
        (
            "by port alone (`all_namespaces = true`)",
            "all_namespaces = true\n",
        ),
    ];
    let configs: Vec<(&'static str, AgentConfig, AgentConfig)> = forms
        .iter()
        .map(|&(title, top)| (title, agent(top, false), agent(top, true)))
        .collect();
    let mut report = String::new();
    let _ = writeln!(report, "## nftables counting under DNS load\n");
    let _ = writeln!(
        report,
        "Command: `cargo xtask bench -- --pairs {} --seconds {}` (alone: `--only nft`): dnsperf \
         against unbound as in the DNS part, the agent with its defaults on both sides, \
         `[nftables] enabled = true` on the \"with\" side and `false` on the other, so the \
         ratio is what our table's chains cost each DNS packet, per rule form: first in the \
         benchmark's bare namespace, where they are its only netfilter hooks, then beside a \
         host firewall (NAT at prerouting and postrouting, conntrack on), as on a host running \
         iptables or kube-proxy.\n",
        settings.pairs, settings.seconds
    );
    for firewall in [false, true] {
        if firewall {
            nft_in(netns, HOST_FIREWALL);
        }
        for (title, off, on) in &configs {
            let place = if firewall {
                "beside a host firewall"
            } else {
                "in the bare namespace"
            };
            let _ = writeln!(report, "### Counting {title}, {place}\n");
            let mode = DnsMode {
                title,
                text: None,
                without: Beside::Agent(off),
                with: Beside::Agent(on),
                pairs: dns_pairs(
                    netns,
                    Beside::Agent(off),
                    Beside::Agent(on),
                    queries,
                    settings,
                    unbound,
                ),
                costs: None,
            };
            dns_mode_report(&mut report, &mode);
        }
    }
    nft_in(netns, "delete table inet bench_host_firewall\n");
    drop(load);
    report
}

fn main() {
    let settings = settings();
    clean_up_on_signals();
    // Read before the run, as the build it measures was made: sources edited while it runs
    // are not in it.
    let measured_where = measured_where();
    support::require_root();
    let netns = Netns::new();
    // Many short connections: keep the namespace from running out of ports.
    for sysctl in [
        "net.ipv4.ip_local_port_range=1024 65000",
        "net.ipv4.tcp_tw_reuse=1",
    ] {
        assert!(
            netns
                .command("sysctl")
                .args(["-q", "-w", sysctl])
                .status()
                .unwrap()
                .success()
        );
    }
    let mut report = String::new();
    if settings.runs("proxy") {
        report.push_str(&proxy_overhead(&netns, &settings));
    }
    if settings.runs("nginx") {
        report.push_str(&nginx_overhead(&netns, &settings));
    }
    if settings.runs("dns") {
        report.push_str(&dns_overhead(&netns, &settings));
    }
    if settings.runs("nft") {
        report.push_str(&nft_overhead(&netns, &settings));
    }
    if settings.runs("paths") {
        report.push_str(&path_cost::report());
    }
    if settings.runs("poll") {
        report.push_str(&poll_costs(&netns, &settings));
    }
    if settings.runs("memory") {
        report.push_str(&memory::report(&netns));
    }
    // Stopped by a signal meanwhile: the figures are cut short, and the exit is the sweep's.
    support::halt_if_stopping();
    println!("{report}");
    if settings.write_docs {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/BENCHMARKS.md");
        let header = format!(
            "# Benchmarks\n\nMeasured by `cargo xtask bench` {measured_where}; numbers from one run, rerun to refresh this file. The proxy load \
            is one client thread and one server thread on loopback in a namespace of the \
            benchmark's own, then one client thread and nginx (from apt) proxying to a backend \
            there, and the DNS load dnsperf against unbound there, each load on one CPU (on one CPU a load is bound by the CPU, so all the collector takes from it \
            shows; docs/DESIGN.md, Measuring the cost); \"with\" means the agent running with its default programs, its \
            1 MiB event ring and the embedded default's 1 s polling, and nftables counting at its default \"auto\": off \
            in that bare namespace, where it would be the first netfilter hook (docs/DESIGN.md, \
            nftables, has what that costs). Single pairs on this VM swing by 5 to 15 % \
            (bulk by more), which is why the medians matter and why no test asserts on speed. \
            Each median comes with its 95 % confidence interval, from the order statistics of \
            the pairs (no assumption about their distribution): a target counts as met or \
            missed only when the interval lies wholly on one side of it. The proxy and DNS \
            loads also run with empty programs in the agent's places, whose medians show \
            what any program on those hooks costs them, and each load ends with its pairs run with the \
            agent on neither side, whose medians show how far a median strays from 1 when \
            nothing differs. \
            The cost per run comes from the kernel's own statistics (`--bpf-stats`, switched on \
            only for that last phase), which include the kernel's timing of each run; the empty \
            programs `--bpf-stats` attaches beside ours measure that timing, and the last column \
            takes it off.\n\n",
        );
        std::fs::write(path, format!("{header}{report}")).unwrap();
        eprintln!("wrote docs/BENCHMARKS.md");
    }
    support::halt_if_stopping();
}
