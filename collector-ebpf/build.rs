//! Rebuild the eBPF object when the linker changes: bpf-linker is not a cargo dependency, so
//! cargo cannot see it otherwise. (The BPF CPU version, v3, comes from .cargo/config.toml.)
use which::which;

fn main() {
    match which("bpf-linker") {
        Ok(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        Err(err) => println!(
            "cargo:warning=bpf-linker not found ({err}); install it with `cargo xtask prereqs`"
        ),
    }
}
