//! Builds the kernel programs (`collector-ebpf`) for the BPF target with the nightly
//! toolchain and bpf-linker, and leaves the object in `OUT_DIR` for `include_bytes_aligned!`.
fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../collector-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "collector-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
