//! Least privilege: once everything is loaded and attached, the agent keeps only the
//! capabilities it still uses and drops every other one.
//!
//! Kept: `CAP_BPF` (every bpf(2) call, map reads included, when unprivileged BPF is off, as
//! it is by default) and `CAP_NET_ADMIN` (attaching the classifiers to interfaces that appear
//! later). Dropped: `CAP_SYS_ADMIN` and `CAP_PERFMON` (needed only to load, attach to the
//! cgroup and mount), and everything else. Pins are removed at stop by their owner (uid 0)
//! without any capability. Capabilities are per thread: this runs before the async runtime
//! starts its threads, which inherit the reduced set.
//!
//! Also here: telling a refusal for lack of privilege from other errors, so that what was
//! refused says to run as root instead of reporting something missing.

use std::io;

use crate::check::CAPABILITIES;

/// Capabilities the running agent keeps (numbers from linux/capability.h).
pub const KEPT: [u32; 2] = [39, 12];

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops every capability but [`KEPT`] from this thread's effective, permitted and
/// inheritable sets, and clears the ambient set. Returns how many it dropped.
pub fn keep_only_runtime_capabilities() -> io::Result<u32> {
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two Data records for version 3, which we provide.
    if unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let had = u64::from(data[0].permitted) | (u64::from(data[1].permitted) << 32);
    let keep: u64 = KEPT.iter().map(|bit| 1u64 << bit).sum::<u64>() & had;
    #[expect(clippy::cast_possible_truncation, reason = "splitting 64 bits in two")]
    let (low, high) = (keep as u32, (keep >> 32) as u32);
    data = [
        Data {
            effective: low,
            permitted: low,
            inheritable: 0,
        },
        Data {
            effective: high,
            permitted: high,
            inheritable: 0,
        },
    ];
    // SAFETY: as above; capset reads the two records.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: prctl with constant arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    Ok((had & !keep).count_ones())
}

/// Whether the kernel refused a call for lack of privilege (EPERM, EACCES).
#[must_use]
pub fn denied(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EPERM | libc::EACCES))
}

/// Whether any cause in `err`'s chain is [`denied`].
#[must_use]
pub fn denied_in(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|cause| cause.downcast_ref::<io::Error>())
        .any(denied)
}

/// Names of [`KEPT`], for the logs.
#[must_use]
pub fn kept_names() -> Vec<&'static str> {
    CAPABILITIES
        .iter()
        .filter(|(bit, ..)| KEPT.contains(bit))
        .map(|(_, name, _)| *name)
        .collect()
}
