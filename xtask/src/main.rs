//! Developer tasks: `cargo xtask prereqs | run | test | image | bench`.
//!
//! Every task first installs what is missing (Debian packages, with the services they bring
//! disabled unless enabled before, the pinned nightly of collector-ebpf/rust-toolchain.toml
//! with `rust-src`, bpf-linker 0.13.0 built against LLVM 22; for `test` and `bench` also the
//! test servers and tools, rustfmt and clippy for the host toolchain), so the two commands in
//! the README work on a machine with rustup. `image` needs podman besides.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use test_output::TestOutput;

mod test_output;

/// LLVM major version of the kernel crate's nightly (collector-ebpf/rust-toolchain.toml):
/// bpf-linker must be built against it.
const LLVM_MAJOR: &str = "22";
/// The bpf-linker release the kernel crate links with, built with only the LLVM above
/// (`--no-default-features --features llvm-22`): another release or LLVM is replaced.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Set by cargo's rustup proxy for everything `cargo xtask` runs; it would override the
/// kernel crate's rust-toolchain.toml.
const TOOLCHAIN_OVERRIDE: &str = "RUSTUP_TOOLCHAIN";
/// Debian packages the build and the agent need: all that `run` and a production host's
/// `prereqs --build-only` install.
const BUILD_PACKAGES: &[&str] = &[
    // cc and c++: bpf-linker's build links LLVM with the C++ library.
    "build-essential",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    // build.rs reads the revision for collector_build_info.
    "git",
    // `nft`, which makes and removes the agent's counter table (`[nftables]`, on by
    // default where something else hooks netfilter already).
    "nftables",
];
/// Debian packages the test suite and the benchmark need besides.
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    // promtool, to lint a live scrape in the tests.
    "prometheus",
    // The DNS server of the DNS tests and benchmark, and the benchmark's load generator.
    "unbound",
    "dnsperf",
    // The reverse proxy of the benchmark's proxied load.
    "nginx-light",
    // Lints the deployment YAML (collector/tests/deploy.rs), which also reads it with
    // PyYAML; systemd-analyze checks the unit.
    "yamllint",
    "python3-yaml",
    "systemd",
    // The HTTPS and basic-auth tests: a test certificate, an htpasswd file, an HTTPS client.
    "openssl",
    "apache2-utils",
    "curl",
    // Reads the agent's pinned links in the tests (their ids, whether they are gone).
    "bpftool",
    // Builds deploy/container/Containerfile in the tests, on a Debian base made locally.
    "podman",
    "debootstrap",
    // sysctl, for the forwarding and IPv6 settings of the tests' and benchmark's namespaces
    // (priority important, not required: a minimal system lacks it).
    "procps",
];
/// Services that packages above bring and enable, each on a port of the host (53, 80,
/// 9090): installed for their binaries only, which the tests and the benchmark start in
/// namespaces of their own, so they are disabled once installed (after a reboot they would
/// take those ports). The package, and the unit it enables (nginx-light's comes with
/// nginx-common).
const SERVICES: &[(&str, &str)] = &[
    ("unbound", "unbound.service"),
    ("nginx-light", "nginx.service"),
    ("prometheus", "prometheus.service"),
];

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing prerequisites: for the build, the tests and the benchmark.
    Prereqs {
        /// Only what the build needs (a production host's: no DNS server, proxy or
        /// Prometheus packages).
        #[arg(long)]
        build_only: bool,
    },
    /// Build and run the collector (as root) with the embedded default config or the
    /// arguments given after `--`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the whole test suite, privileged integration tests included (as root).
    Test {
        /// Extra arguments for `cargo test`, as typed (a test name filter, `--test dns`,
        /// `-- --test-threads=1`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the release binary and the container image from deploy/container/Containerfile
    /// with podman.
    Image {
        /// Image name and tag.
        #[arg(long, default_value = "localhost/collector:dev")]
        tag: String,
        /// Base image (the Containerfile's BASE), e.g. a local mirror of debian:bookworm-slim.
        #[arg(long)]
        base: Option<String>,
    },
    /// Measure the collector's overhead on loopback and write docs/BENCHMARKS.md (as root).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    let root = workspace_root();
    match task {
        Task::Prereqs { build_only } => prereqs(if build_only { Scope::Build } else { Scope::All }),
        Task::Run { args } => {
            require_root("running the collector")?;
            prereqs(Scope::Build)?;
            mount_bpffs()?;
            cargo(&root, &["build", "--release", "--package", "collector"])?;
            let collector = target_dir(&root)?.join("release/collector");
            let mut args = args;
            if args.first().is_none_or(|first| first.starts_with('-')) {
                args.insert(0, "run".into());
            }
            // Replaces this process (as `cargo run` replaced cargo's), so that a SIGTERM to
            // what was started reaches the collector, which then detaches everything.
            let err =
                std::os::unix::process::CommandExt::exec(Command::new(&collector).args(&args));
            Err(err).with_context(|| format!("starting {}", collector.display()))
        }
        // As typed: clap takes a leading `--` for the end of xtask's own options.
        Task::Test { args: _ } => {
            let args =
                cargo_test_args(std::env::args_os().map(|arg| arg.to_string_lossy().into_owned()));
            require_root("the privileged integration tests")?;
            prereqs(Scope::All)?;
            mount_bpffs()?;
            cargo(&root, &["fmt", "--all", "--check"])?;
            // Also compiles the benchmark, which `cargo test` does not build. In the tests'
            // profile, whose build script run (the kernel object) it shares.
            cargo(
                &root,
                &[
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "collector-ebpf",
                    "--all-targets",
                    "--",
                    "--deny",
                    "warnings",
                ],
            )?;
            kernel_clippy(&root)?;
            // Every test binary runs, whatever fails first: one CI run then shows every
            // failure, and the closing totals cover the whole suite.
            let mut test = vec![
                "test",
                "--workspace",
                "--exclude",
                "collector-ebpf",
                "--no-fail-fast",
            ];
            test.extend(args.iter().map(String::as_str));
            cargo_test(&root, &test)
        }
        Task::Image { tag, base } => {
            prereqs(Scope::Build)?;
            image(&root, &tag, base.as_deref())
        }
        Task::Bench { args } => {
            require_root("the benchmarks")?;
            prereqs(Scope::All)?;
            mount_bpffs()?;
            let mut bench = vec![
                "bench",
                "--package",
                "collector",
                "--bench",
                "overhead",
                "--",
            ];
            bench.extend(args.iter().map(String::as_str));
            // Replaces this process, so that a signal to it reaches cargo, whose end the
            // bench hears of and cleans up on.
            let err = std::os::unix::process::CommandExt::exec(cargo_command(&root).args(&bench));
            Err(err).context("running cargo bench")
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Where cargo builds: `CARGO_TARGET_DIR` or a `build.target-dir` of cargo's config
/// files move it from `target/` under the workspace, so cargo is asked.
fn target_dir(root: &Path) -> anyhow::Result<PathBuf> {
    let metadata = metadata_command(root)
        .output()
        .context("running cargo metadata")?;
    if !metadata.status.success() {
        bail!(
            "cargo metadata failed ({}): {}",
            metadata.status,
            String::from_utf8_lossy(&metadata.stderr).trim()
        );
    }
    target_directory(&metadata.stdout)
}

/// The cargo that runs xtask (`CARGO`), in the workspace.
fn cargo_command(root: &Path) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root);
    command
}

fn metadata_command(root: &Path) -> Command {
    let mut command = cargo_command(root);
    command.args([
        "metadata",
        "--format-version",
        "1",
        "--no-deps",
        "--offline",
    ]);
    command
}

/// `target_directory` of `cargo metadata`'s output.
fn target_directory(metadata: &[u8]) -> anyhow::Result<PathBuf> {
    let metadata: serde_json::Value =
        serde_json::from_slice(metadata).context("reading cargo metadata's output")?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata names no target_directory")
}

fn require_root(what: &str) -> anyhow::Result<()> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!(
            "{what} need root (BPF, tc, network namespaces): run `cargo xtask` in a root shell \
             (`sudo -i`) with root's rustup (`sudo cargo` finds no cargo where sudo resets PATH)"
        );
    }
    Ok(())
}

fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let status = cargo_command(root)
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Denies clippy's warnings in the kernel programs, built as they are for the kernel: with
/// the nightly their directory pins (so through rustup's `cargo`, without the host
/// toolchain that cargo names in `RUSTUP_TOOLCHAIN`) and `core` built for BPF.
fn kernel_clippy(root: &Path) -> anyhow::Result<()> {
    let args = [
        "clippy",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "--deny",
        "warnings",
    ];
    let status = Command::new("cargo")
        .args(args)
        .current_dir(root.join("collector-ebpf"))
        .env_remove(TOOLCHAIN_OVERRIDE)
        .status()
        .context("running cargo clippy in collector-ebpf")?;
    if !status.success() {
        bail!(
            "cargo {} in collector-ebpf failed ({status})",
            args.join(" ")
        );
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and closes with each failing test's last lines
/// and the totals over every test binary (`N passed, N failed`), so the last line says how
/// many tests ran in all.
fn cargo_test(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cargo_command(root)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    let mut output = TestOutput::default();
    if let Some(stdout) = child.stdout.take() {
        // Bytes, not `lines()`: a test's output that is not UTF-8 would end the loop, and
        // with it the echo and the totals, before the run does.
        for line in BufReader::new(stdout).split(b'\n') {
            let line = line.context("reading cargo test's output")?;
            let line = String::from_utf8_lossy(&line);
            println!("{line}");
            output.line(&line);
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("{output}");
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|out| out.status.success())
}

fn run_checked(program: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
    eprintln!("xtask: {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The release binary is the build context: the BPF programs are inside it.
fn image(root: &Path, tag: &str, base: Option<&str>) -> anyhow::Result<()> {
    cargo(root, &["build", "--release", "--package", "collector"])?;
    let target = target_dir(root)?;
    let context = target.join("image");
    std::fs::create_dir_all(&context)?;
    std::fs::copy(target.join("release/collector"), context.join("collector"))
        .context("staging the binary for the image")?;
    let containerfile = root.join("deploy/container/Containerfile");
    // chroot isolation: the one RUN step needs no OCI runtime, and crun refuses hosts with
    // the hybrid cgroup layout.
    let mut args = vec![
        "build".to_owned(),
        "--isolation=chroot".to_owned(),
        "-t".to_owned(),
        tag.to_owned(),
    ];
    if let Some(base) = base {
        args.extend(["--build-arg".to_owned(), format!("BASE={base}")]);
    }
    args.extend([
        "-f".to_owned(),
        containerfile.display().to_string(),
        context.display().to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_checked("podman", &args, &[])
}

/// Where Debian's maintainer scripts ask whether they may start a service.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
/// The line that marks a policy-rc.d as ours (earlier versions wrote it too): one left behind
/// by a run that was killed (Ctrl-C during apt-get) would forbid every service start on the
/// host for good, so the next run removes it.
const POLICY_MARKER: &str = "# cargo xtask prereqs: no service starts while it installs packages";

/// While it lives, packages install without starting their services: unbound, nginx and
/// prometheus are installed for their binaries, which the tests and the benchmark start in
/// namespaces of their own, and the host's ports 53, 80 and 9090 are not ours to take. A
/// policy the host already has stands.
struct NoServiceStarts(Option<PathBuf>);

impl NoServiceStarts {
    fn new(path: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        remove_stale_policy(path)?;
        if path.exists() {
            return Ok(Self(None));
        }
        // 101: "action forbidden by policy" (invoke-rc.d(8)).
        std::fs::write(path, format!("#!/bin/sh\n{POLICY_MARKER}\nexit 101\n"))
            .with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self(Some(path.to_path_buf())))
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Removes a policy-rc.d of ours that an interrupted run left; anyone else's stands.
fn remove_stale_policy(path: &Path) -> anyhow::Result<()> {
    let ours = std::fs::read_to_string(path)
        .is_ok_and(|text| text.lines().any(|line| line == POLICY_MARKER));
    if ours {
        eprintln!(
            "xtask: removing {} left by an interrupted `cargo xtask prereqs`",
            path.display()
        );
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// The units of `SERVICES` whose packages are among `installed`.
fn units_of(installed: &[&str]) -> Vec<&'static str> {
    SERVICES
        .iter()
        .filter(|(package, _)| installed.contains(package))
        .map(|&(_, unit)| unit)
        .collect()
}

/// The units among `units` that are enabled, under `root` when given.
fn enabled_units(root: Option<&Path>, units: &[&'static str]) -> Vec<&'static str> {
    let root = root.map(|root| format!("--root={}", root.display()));
    units
        .iter()
        .copied()
        .filter(|unit| {
            let mut args = vec!["is-enabled", "--quiet"];
            args.extend(root.as_deref());
            args.push(unit);
            succeeds("systemctl", &args)
        })
        .collect()
}

/// Disables `units` (nothing started them: see `NoServiceStarts`), under `root` when given
/// (`systemctl --root`). systemctl changes the unit links itself where systemd is not running
/// (a container, a chroot), and a host without systemctl has nothing to disable.
fn disable_services(root: Option<&Path>, units: &[&str]) -> anyhow::Result<()> {
    if units.is_empty() || !succeeds("systemctl", &["--version"]) {
        return Ok(());
    }
    let mut args = vec!["disable".to_owned(), "--quiet".to_owned()];
    if let Some(root) = root {
        args.push(format!("--root={}", root.display()));
    }
    args.extend(units.iter().map(|&unit| unit.to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_checked("systemctl", &args, &[])
}

/// Whether cargo's record of installed crates (`$CARGO_HOME/.crates2.json`) has bpf-linker
/// `BPF_LINKER_VERSION` from crates.io built with the feature `llvm-LLVM_MAJOR` alone.
fn bpf_linker_as_pinned(crates2: &str) -> bool {
    let key = format!("\"bpf-linker {BPF_LINKER_VERSION} (registry+");
    let Some(at) = crates2.find(&key) else {
        return false;
    };
    // The entry's fields: strings and arrays of strings, no nested object.
    let entry = &crates2[at..];
    let entry = &entry[..entry.find('}').unwrap_or(entry.len())];
    let compact: String = entry.chars().filter(|c| !c.is_whitespace()).collect();
    compact.contains(&format!("\"features\":[\"llvm-{LLVM_MAJOR}\"]"))
        && compact.contains("\"no_default_features\":true")
        && compact.contains("\"all_features\":false")
}

/// `$CARGO_HOME/.crates2.json`, empty when there is none.
fn installed_crates() -> String {
    let home = std::env::var_os("CARGO_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"),
        PathBuf::from,
    );
    std::fs::read_to_string(home.join(".crates2.json")).unwrap_or_default()
}

/// What `prereqs` installs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    Build,
    /// The build's, the tests' and the benchmark's.
    All,
}

impl Scope {
    fn packages(self) -> impl Iterator<Item = &'static str> {
        let tests: &[&str] = match self {
            Self::Build => &[],
            Self::All => TEST_PACKAGES,
        };
        BUILD_PACKAGES.iter().chain(tests).copied()
    }
}

/// Installs what is missing; quick when everything is there.
fn prereqs(scope: Scope) -> anyhow::Result<()> {
    let missing: Vec<&str> = scope
        .packages()
        .filter(|package| !installed(package))
        .collect();
    remove_stale_policy(Path::new(POLICY_RC_D))?;
    if !missing.is_empty() {
        require_root("installing Debian packages")?;
        run_checked("apt-get", &["update", "-q"], &[])?;
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(&missing);
        // A unit enabled before (Debian's full nginx, the host's own proxy, shares
        // nginx-light's unit) is the host's, and stays enabled.
        let units = units_of(&missing);
        let enabled_before = enabled_units(None, &units);
        let no_starts = NoServiceStarts::new(Path::new(POLICY_RC_D))?;
        run_checked("apt-get", &args, &[("DEBIAN_FRONTEND", "noninteractive")])?;
        drop(no_starts);
        let brought: Vec<&str> = units
            .into_iter()
            .filter(|unit| !enabled_before.contains(unit))
            .collect();
        disable_services(None, &brought)?;
    }
    // `cargo xtask test` checks the formatting and the lints with the host toolchain's
    // rustfmt and clippy, which a minimal rustup profile leaves out. RUSTUP_TOOLCHAIN, set by
    // cargo, names that toolchain.
    for (subcommand, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        if scope == Scope::All && !succeeds("cargo", &[subcommand, "--version"]) {
            run_checked("rustup", &["component", "add", component], &[])?;
        }
    }
    let ebpf_crate = workspace_root().join("collector-ebpf");
    let pinned = PinnedToolchain::of(&ebpf_crate)?;
    if !ebpf_toolchain_complete(&ebpf_crate, &pinned) {
        // Named, with its components: rustup before 1.28 refuses `toolchain install` without
        // a name. The pinned nightly, never an update of `nightly`.
        let mut args = vec![
            "toolchain",
            "install",
            pinned.channel.as_str(),
            "--profile",
            "minimal",
        ];
        for component in &pinned.components {
            args.extend(["--component", component.as_str()]);
        }
        eprintln!("xtask: rustup {}", args.join(" "));
        let status = Command::new("rustup")
            .args(&args)
            .current_dir(&ebpf_crate)
            .env_remove(TOOLCHAIN_OVERRIDE)
            .status()
            .context("running rustup")?;
        if !status.success() {
            bail!(
                "rustup toolchain install in {} failed ({status})",
                ebpf_crate.display()
            );
        }
    }
    // Another release, or one built against another LLVM (its default features pick one),
    // cannot read the nightly's bitcode or links it wrongly: it is replaced.
    if !succeeds("bpf-linker", &["--version"]) || !bpf_linker_as_pinned(&installed_crates()) {
        let prefix = format!("/usr/lib/llvm-{LLVM_MAJOR}");
        let feature = format!("llvm-{LLVM_MAJOR}");
        run_checked(
            "cargo",
            &[
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                &feature,
            ],
            // bpf-linker's build finds LLVM through LLVM_PREFIX; Debian keeps it versioned.
            &[("LLVM_PREFIX", &prefix)],
        )?;
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// What collector-ebpf/rust-toolchain.toml pins: read line by line, as collector/build.rs
/// reads its channel (the file holds one table of plain `key = value` lines).
struct PinnedToolchain {
    channel: String,
    components: Vec<String>,
}

impl PinnedToolchain {
    fn of(ebpf_crate: &Path) -> anyhow::Result<Self> {
        let file = ebpf_crate.join("rust-toolchain.toml");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let value = |key: &str| {
            text.lines().find_map(|line| {
                let (name, value) = line.split_once('=')?;
                (name.trim() == key).then(|| value.trim().to_owned())
            })
        };
        let channel = value("channel")
            .map(|channel| channel.trim_matches('"').to_owned())
            .with_context(|| format!("{} has no `channel = \"...\"` line", file.display()))?;
        let listed = value("components");
        let mut components: Vec<String> = listed
            .as_deref()
            .unwrap_or_default()
            .split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        if listed.is_some() && components.is_empty() {
            bail!(
                "{} lists its components in a form this cannot read: keep them on the \
                 `components = [...]` line",
                file.display()
            );
        }
        // None listed: what the build needs at least.
        if components.is_empty() {
            components.push("rust-src".to_owned());
        }
        Ok(Self {
            channel,
            components,
        })
    }
}

/// The toolchain of collector-ebpf/rust-toolchain.toml is installed, with every component
/// the file lists (`rust-src` to build the programs, `clippy` to lint them): one added by
/// hand with `rust-src` alone failed the kernel lints.
fn ebpf_toolchain_complete(ebpf_crate: &Path, pinned: &PinnedToolchain) -> bool {
    Command::new("rustup")
        .args(["component", "list", "--installed"])
        .current_dir(ebpf_crate)
        .env_remove(TOOLCHAIN_OVERRIDE)
        .output()
        .is_ok_and(|out| {
            let installed = String::from_utf8_lossy(&out.stdout);
            out.status.success()
                && pinned.components.iter().all(|component| {
                    // Named alone (`rust-src`) or with the host's triple (`clippy-x86_64-...`).
                    installed
                        .lines()
                        .any(|line| line == component || line.starts_with(&format!("{component}-")))
                })
        })
}

/// Mounts bpffs where it is missing, for the tasks that start the agent: it pins its maps
/// there, and the tests look for them there. Building (`image`, `prereqs`) needs none.
fn mount_bpffs() -> anyhow::Result<()> {
    if !bpffs_mounted() {
        run_checked(
            "mount",
            &["-t", "bpf", "-o", "mode=0700", "bpf", "/sys/fs/bpf"],
            &[],
        )?;
    }
    Ok(())
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            line.split_whitespace().nth(1) == Some("/sys/fs/bpf") && line.contains(" bpf ")
        })
    })
}

/// What follows `test` in xtask's command line, `--` included: clap takes a leading `--` for
/// the end of xtask's own options and drops it, which handed `-- --test-threads=1` to
/// `cargo test` as `--test-threads=1`, an option cargo refuses.
fn cargo_test_args(typed: impl Iterator<Item = String>) -> Vec<String> {
    typed
        .skip(1)
        .skip_while(|arg| arg != "test")
        .skip(1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_arguments_reach_cargo_test_as_typed() {
        let typed = |line: &str| cargo_test_args(line.split(' ').map(str::to_owned));
        assert_eq!(
            typed("target/debug/xtask test -- --test-threads=1"),
            ["--", "--test-threads=1"]
        );
        assert_eq!(
            typed("target/debug/xtask test --test dns -- --nocapture"),
            ["--test", "dns", "--", "--nocapture"]
        );
        assert_eq!(typed("target/debug/xtask test names"), ["names"]);
        assert!(typed("target/debug/xtask test").is_empty());
    }

    /// A directory of the test's own, removed when it ends.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The binary `cargo xtask run` starts is where cargo built it, also with the target
    /// directory moved by the environment.
    #[test]
    fn the_target_directory_is_cargos() {
        let root = workspace_root();
        // The environment's setting goes before any of cargo's config files.
        let elsewhere = TempDir::new("target-dir");
        let output = metadata_command(&root)
            .env("CARGO_TARGET_DIR", &elsewhere.0)
            .output()
            .unwrap();
        assert_eq!(target_directory(&output.stdout).unwrap(), elsewhere.0);
    }

    /// cargo's record as it reads on the project's machine, with `entry` for bpf-linker.
    fn crates2(entry: &str) -> String {
        format!(
            "{{\"installs\":{{\"cargo-nextest 0.9.143 (registry+https://github.com/rust-lang/crates.io-index)\":\
             {{\"version_req\":null,\"bins\":[\"cargo-nextest\"],\"features\":[\"default\"],\
             \"all_features\":false,\"no_default_features\":false}},{entry}}}}}"
        )
    }

    #[test]
    fn bpf_linker_is_as_pinned_only_at_its_version_with_only_its_llvm() {
        let entry = |version: &str, features: &str, no_default: bool| {
            format!(
                "\"bpf-linker {version} (registry+https://github.com/rust-lang/crates.io-index)\":\
                 {{\"version_req\":null,\"bins\":[\"bpf-linker\"],\"features\":[{features}],\
                 \"all_features\":false,\"no_default_features\":{no_default},\"profile\":\"release\",\
                 \"target\":\"x86_64-unknown-linux-gnu\",\"rustc\":\"rustc 1.95.0\\nLLVM version: 22.1.2\\n\"}}"
            )
        };
        assert!(bpf_linker_as_pinned(&crates2(&entry(
            "0.13.0",
            "\"llvm-22\"",
            true
        ))));
        for (version, features, no_default) in [
            ("0.13.1", "\"llvm-22\"", true),
            ("0.12.2", "\"llvm-22\"", true),
            ("0.13.0", "\"llvm-21\"", true),
            ("0.13.0", "\"llvm-22\"", false),
            ("0.13.0", "", false),
            ("0.13.0", "\"llvm-22\",\"llvm-21\"", true),
        ] {
            assert!(
                !bpf_linker_as_pinned(&crates2(&entry(version, features, no_default))),
                "{version} [{features}] no_default_features {no_default}"
            );
        }
        assert!(!bpf_linker_as_pinned(&crates2(
            "\"x 1.0.0 (registry+x)\":{}"
        )));
        assert!(!bpf_linker_as_pinned(""));
    }

    #[test]
    fn a_policy_left_by_an_interrupted_run_is_removed_and_anyone_elses_stands() {
        let dir = TempDir::new("policy");
        let path = dir.0.join("policy-rc.d");
        // Ours, as a run killed during apt-get left it (what earlier versions wrote too).
        std::fs::write(&path, format!("#!/bin/sh\n{POLICY_MARKER}\nexit 101\n")).unwrap();
        remove_stale_policy(&path).unwrap();
        assert!(!path.exists());
        // Written for a run, with the marker, and removed when the run is done.
        let guard = NoServiceStarts::new(&path).unwrap();
        let written = std::fs::read_to_string(&path).unwrap();
        assert!(
            written.lines().any(|line| line == POLICY_MARKER),
            "{written}"
        );
        assert!(written.contains("exit 101"));
        drop(guard);
        assert!(!path.exists());
        // A stale one of ours is taken over for the run, then removed.
        std::fs::write(&path, format!("#!/bin/sh\n{POLICY_MARKER}\nexit 101\n")).unwrap();
        drop(NoServiceStarts::new(&path).unwrap());
        assert!(!path.exists());
        // The host's own (Docker images ship one) stands, before, during and after.
        let docker = "#!/bin/sh\n# For most Docker users, ...\nexit 101\n";
        std::fs::write(&path, docker).unwrap();
        remove_stale_policy(&path).unwrap();
        drop(NoServiceStarts::new(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), docker);
    }

    #[test]
    fn the_services_installed_are_disabled() {
        for (package, _) in SERVICES {
            assert!(TEST_PACKAGES.contains(package), "{package}");
        }
        assert_eq!(
            units_of(&["curl", "unbound", "nginx-light"]),
            ["unbound.service", "nginx.service"]
        );
        assert!(units_of(&["curl"]).is_empty());
        if !succeeds("systemctl", &["--version"]) {
            eprintln!("no systemctl: nothing to disable");
            return;
        }
        // As the packages' maintainer scripts leave them: enabled for multi-user.target, in
        // a root of the test's own.
        let root = TempDir::new("services");
        let units = root.0.join("etc/systemd/system");
        let wants = units.join("multi-user.target.wants");
        std::fs::create_dir_all(&wants).unwrap();
        for (_, unit) in SERVICES {
            std::fs::write(
                units.join(unit),
                "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n",
            )
            .unwrap();
            std::os::unix::fs::symlink(format!("/etc/systemd/system/{unit}"), wants.join(unit))
                .unwrap();
        }
        let all = units_of(TEST_PACKAGES);
        assert_eq!(enabled_units(Some(&root.0), &all), all);
        disable_services(Some(&root.0), &all).unwrap();
        assert!(enabled_units(Some(&root.0), &all).is_empty());
        for (_, unit) in SERVICES {
            assert!(
                wants.join(unit).symlink_metadata().is_err(),
                "{unit} still enabled"
            );
        }
    }

    /// The channel and components rustup is asked for come from the kernel crate's file,
    /// comments and other keys left aside; rust-src at least where none are listed.
    #[test]
    fn the_pinned_toolchain_is_read_from_its_file() {
        let dir = TempDir::new("pinned-toolchain");
        let file = dir.0.join("rust-toolchain.toml");
        std::fs::write(
            &file,
            "# the date = the LLVM's\n[toolchain]\nchannel = \"nightly-2026-05-20\"\n\
             components = [\"rust-src\", \"clippy\"]\nprofile = \"minimal\"\n",
        )
        .unwrap();
        let pinned = PinnedToolchain::of(&dir.0).unwrap();
        assert_eq!(pinned.channel, "nightly-2026-05-20");
        assert_eq!(pinned.components, ["rust-src", "clippy"]);
        std::fs::write(&file, "[toolchain]\nchannel = \"nightly-2026-05-20\"\n").unwrap();
        assert_eq!(
            PinnedToolchain::of(&dir.0).unwrap().components,
            ["rust-src"]
        );
        std::fs::write(
            &file,
            "[toolchain]\nchannel = \"nightly-2026-05-20\"\ncomponents = [\n  \"rust-src\",\n]\n",
        )
        .unwrap();
        let err = PinnedToolchain::of(&dir.0).err().unwrap().to_string();
        assert!(err.contains("cannot read"), "{err}");
        std::fs::write(&file, "[toolchain]\nprofile = \"minimal\"\n").unwrap();
        let err = PinnedToolchain::of(&dir.0).err().unwrap().to_string();
        assert!(err.contains("no `channel"), "{err}");
        // The kernel crate's own file reads.
        let ours = PinnedToolchain::of(&workspace_root().join("collector-ebpf")).unwrap();
        assert!(ours.channel.starts_with("nightly-"), "{}", ours.channel);
    }

    /// .ci/run stops at once, saying what to install, where Rust is missing or too old; stub
    /// commands stand in for the rest, so nothing else runs.
    #[test]
    fn ci_asks_for_rust_before_anything_else() {
        let bin = TempDir::new("ci-path");
        // rustup's environment, which .ci/run loads: rustc is only on the PATH it sets.
        let cargo_home = TempDir::new("ci-cargo-home");
        let stub = |dir: &Path, name: &str, body: &str| {
            use std::os::unix::fs::PermissionsExt as _;
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        let ci = workspace_root().join(".ci/run");
        let run = || {
            let out = Command::new("bash")
                .arg(&ci)
                .env("PATH", format!("{}:/usr/bin:/bin", bin.0.display()))
                .env("CARGO_HOME", &cargo_home.0)
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        stub(&bin.0, "cargo", "exit 0");
        stub(&bin.0, "rustup", "exit 0");
        let (status, stderr) = run();
        assert_eq!(status, Some(1), "{stderr}");
        assert!(
            stderr.contains("rustc is not on PATH") && stderr.contains("rustup"),
            "{stderr}"
        );
        let rustup_bin = cargo_home.0.join("bin");
        std::fs::create_dir(&rustup_bin).unwrap();
        stub(
            &rustup_bin,
            "rustc",
            "echo 'rustc 1.90.0 (1159e78c4 2025-09-14)'",
        );
        std::fs::write(
            cargo_home.0.join("env"),
            format!("PATH=\"{}:$PATH\"\n", rustup_bin.display()),
        )
        .unwrap();
        let (status, stderr) = run();
        assert_eq!(status, Some(1), "{stderr}");
        assert!(stderr.contains("rustc 1.91.0 or later"), "{stderr}");
        assert!(stderr.contains("1.90.0"), "{stderr}");
    }
}
