//! Rebuild the eBPF object when the linker changes: bpf-linker is not a cargo dependency, so
//! cargo cannot see it otherwise. And enable ALU32 code generation, under which LLVM emits
//! BPF atomics: the connection table claims slots with a compare-and-swap (Linux 5.12+).
use which::which;

fn main() {
    // Through the build script because aya-build sets the RUSTFLAGS of this build itself
    // (and rustc already passes `--cpu generic`, which may not be given twice).
    println!("cargo:rustc-link-arg-bins=--cpu-features=+alu32");
    match which("bpf-linker") {
        Ok(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        Err(err) => println!(
            "cargo:warning=bpf-linker not found ({err}); install it with `cargo xtask prereqs`"
        ),
    }
}
