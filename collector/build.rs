//! Builds the kernel programs (`collector-ebpf`) for the BPF target with the nightly pinned in
//! collector-ebpf/rust-toolchain.toml and bpf-linker, and leaves the object in `OUT_DIR` for
//! `include_bytes_aligned!`. The build runs from collector-ebpf/, so that cargo reads the
//! configuration there (collector-ebpf/.cargo/config.toml: the BPF CPU version).
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
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
