//! Builds the kernel programs (`collector-ebpf`) for the BPF target with the nightly pinned in
//! collector-ebpf/rust-toolchain.toml and bpf-linker, and leaves the object in `OUT_DIR` for
//! `include_bytes_aligned!`. The build runs from collector-ebpf/, so that cargo reads the
//! configuration there (collector-ebpf/.cargo/config.toml: the BPF CPU version).
//!
//! Also records the commit built (`COLLECTOR_REVISION`, from the environment or git) for
//! `collector_build_info`: the version alone is the same for every build.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    record_revision();
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../collector-ebpf");
    let toolchain_file = format!("{root_dir}/rust-toolchain.toml");
    println!("cargo:rerun-if-changed={toolchain_file}");
    let toolchain = std::fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {toolchain_file}"))?;
    let channel = channel(&toolchain)
        .with_context(|| format!("{toolchain_file} has no `channel = \"...\"` line"))?;
    std::env::set_current_dir(root_dir).with_context(|| format!("entering {root_dir}"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "collector-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(channel),
    )
}

/// The value of the file's `channel = "..."` line (all a rust-toolchain.toml needs here).
fn channel(toolchain_file: &str) -> Option<&str> {
    toolchain_file.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "channel").then(|| value.trim().trim_matches('"'))
    })
}

/// Sets `COLLECTOR_REVISION` for the build: as given in the environment (an image build from a
/// tarball), else git's short commit hash, else "unknown". Rerun when the commit moves.
fn record_revision() {
    println!("cargo:rerun-if-env-changed=COLLECTOR_REVISION");
    let manifest_dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| -> Option<String> {
        // A checkout owned by another user than the builder's (root building a user's clone
        // without sudo) is refused as of "dubious ownership": building it runs its code
        // anyway, so reading its HEAD trusts nothing more.
        let out = std::process::Command::new("git")
            .args(["-c", "safe.directory=*", "-C"])
            .arg(manifest_dir)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .filter(|text| !text.is_empty())
    };
    let revision = std::env::var("COLLECTOR_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| {
            // The files whose change moves HEAD: HEAD itself, its reflog (appended at every
            // move, also where the branch's ref is packed and a new loose one appears), the
            // branch it names, packed refs; only those that exist, since cargo reruns for a
            // missing one every time.
            let branch = git(&["symbolic-ref", "-q", "HEAD"]);
            for name in ["HEAD", "logs/HEAD", "packed-refs"]
                .into_iter()
                .map(str::to_owned)
                .chain(branch)
            {
                if let Some(path) =
                    git(&["rev-parse", "--path-format=absolute", "--git-path", &name])
                        .filter(|path| std::path::Path::new(path).exists())
                {
                    println!("cargo:rerun-if-changed={path}");
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"])
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=COLLECTOR_REVISION={revision}");
}
