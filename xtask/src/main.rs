//! Developer tasks: `cargo xtask prereqs | run | test | bench`.
//!
//! Every task first installs what is missing (Debian packages, the pinned nightly of
//! collector-ebpf/rust-toolchain.toml with `rust-src`, bpf-linker built against LLVM 22), so
//! the two commands in the README work on a fresh machine.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// LLVM major version of the kernel crate's nightly (collector-ebpf/rust-toolchain.toml):
/// bpf-linker must be built against it.
const LLVM_MAJOR: &str = "22";
/// Set by cargo's rustup proxy for everything `cargo xtask` runs; it would override the
/// kernel crate's rust-toolchain.toml.
const TOOLCHAIN_OVERRIDE: &str = "RUSTUP_TOOLCHAIN";
/// Debian packages the build and the test suite need.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "iproute2",
    "nftables",
    // promtool, to lint a live scrape in the tests.
    "prometheus",
    // The DNS server of the DNS tests and benchmark, and the benchmark's load generator.
    "unbound",
    "dnsperf",
    // The reverse proxy of the benchmark's proxied load.
    "nginx-light",
    // Lints the deployment YAML (collector/tests/deploy.rs); systemd-analyze checks the unit.
    "yamllint",
    "systemd",
    // The HTTPS and basic-auth tests: a test certificate, an htpasswd file, an HTTPS client.
    "openssl",
    "apache2-utils",
    "curl",
    // Builds deploy/container/Containerfile in the tests, on a Debian base made locally.
    "podman",
    "debootstrap",
];

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing prerequisites.
    Prereqs,
    /// Build and run the collector (as root) with the embedded default config or the
    /// arguments given after `--`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the whole test suite, privileged integration tests included (as root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
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
        Task::Prereqs => prereqs(),
        Task::Run { args } => {
            require_root("running the collector")?;
            prereqs()?;
            cargo(&root, &["build", "--release", "--package", "collector"])?;
            let mut args = args;
            if args.first().is_none_or(|first| first.starts_with('-')) {
                args.insert(0, "run".into());
            }
            // Replaces this process (as `cargo run` replaced cargo's), so that a SIGTERM to
            // what was started reaches the collector, which then detaches everything.
            let err = std::os::unix::process::CommandExt::exec(
                Command::new(root.join("target/release/collector")).args(&args),
            );
            Err(err).context("starting target/release/collector")
        }
        Task::Test { args } => {
            require_root("the privileged integration tests")?;
            prereqs()?;
            cargo(&root, &["fmt", "--all", "--check"])?;
            let mut test = vec!["test", "--workspace", "--exclude", "collector-ebpf"];
            test.extend(args.iter().map(String::as_str));
            cargo_test(&root, &test)
        }
        Task::Image { tag, base } => image(&root, &tag, base.as_deref()),
        Task::Bench { args } => {
            require_root("the benchmarks")?;
            prereqs()?;
            let mut bench = vec![
                "bench",
                "--package",
                "collector",
                "--bench",
                "overhead",
                "--",
            ];
            bench.extend(args.iter().map(String::as_str));
            cargo(&root, &bench)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn require_root(what: &str) -> anyhow::Result<()> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!("{what} need root (BPF, tc, network namespaces): run `sudo cargo xtask ...`");
    }
    Ok(())
}

fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and closes with the totals over every test
/// binary (`N passed, N failed`), so the last line says how many tests ran in all.
fn cargo_test(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(&cargo)
        .args(args)
        .current_dir(root)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.context("reading cargo test's output")?;
            println!("{line}");
            if let Some(result) = line.strip_prefix("test result: ") {
                passed += count_before(result, " passed");
                failed += count_before(result, " failed");
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("{passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The number just before `label` in a `test result:` line ("ok. 35 passed; 0 failed; ...").
fn count_before(result: &str, label: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(label)?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
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
    let context = root.join("target/image");
    std::fs::create_dir_all(&context)?;
    std::fs::copy(
        root.join("target/release/collector"),
        context.join("collector"),
    )
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

/// While it lives, packages install without starting their services: unbound, nginx and
/// prometheus are installed for their binaries, which the tests and the benchmark start in
/// namespaces of their own, and the host's ports 53, 80 and 9090 are not ours to take. A
/// policy the host already has stands.
struct NoServiceStarts(Option<PathBuf>);

impl NoServiceStarts {
    fn new() -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = PathBuf::from(POLICY_RC_D);
        if path.exists() {
            return Ok(Self(None));
        }
        // 101: "action forbidden by policy" (invoke-rc.d(8)).
        std::fs::write(
            &path,
            "#!/bin/sh\n# cargo xtask prereqs: no service starts while it installs packages\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self(Some(path)))
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Installs what is missing; quick when everything is there.
fn prereqs() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|package| !installed(package))
        .collect();
    if !missing.is_empty() {
        require_root("installing Debian packages")?;
        run_checked("apt-get", &["update", "-q"], &[])?;
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(&missing);
        let _no_starts = NoServiceStarts::new()?;
        run_checked("apt-get", &args, &[("DEBIAN_FRONTEND", "noninteractive")])?;
    }
    let ebpf_crate = workspace_root().join("collector-ebpf");
    if !ebpf_toolchain_has_rust_src(&ebpf_crate) {
        // Given no name, rustup installs the toolchain (and components) that the directory's
        // rust-toolchain.toml names: the pinned nightly, never an update of `nightly`.
        eprintln!("xtask: rustup toolchain install (collector-ebpf/rust-toolchain.toml)");
        let status = Command::new("rustup")
            .args(["toolchain", "install"])
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
    if !bpffs_mounted() {
        // The agent pins its maps there; the tests look for them there.
        run_checked(
            "mount",
            &["-t", "bpf", "-o", "mode=0700", "bpf", "/sys/fs/bpf"],
            &[],
        )?;
    }
    if !succeeds("bpf-linker", &["--version"]) {
        let prefix = format!("/usr/lib/llvm-{LLVM_MAJOR}");
        let feature = format!("llvm-{LLVM_MAJOR}");
        run_checked(
            "cargo",
            &[
                "install",
                "bpf-linker",
                "--locked",
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

/// The toolchain of collector-ebpf/rust-toolchain.toml is installed, with `rust-src`.
fn ebpf_toolchain_has_rust_src(ebpf_crate: &Path) -> bool {
    Command::new("rustup")
        .args(["component", "list", "--installed"])
        .current_dir(ebpf_crate)
        .env_remove(TOOLCHAIN_OVERRIDE)
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .any(|line| line.starts_with("rust-src"))
        })
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            line.split_whitespace().nth(1) == Some("/sys/fs/bpf") && line.contains(" bpf ")
        })
    })
}
