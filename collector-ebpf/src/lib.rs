//! Exists so that `collector`'s build script can depend on this crate (cargo tracks changes to a
//! library target, not to binaries); the programs are in `main.rs`.
#![no_std]
