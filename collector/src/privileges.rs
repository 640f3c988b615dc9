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
//! refused says to run as root instead of reporting something missing, or, when root with
//! every capability was refused, that a security module (AppArmor, SELinux) did it.

use std::io;

use crate::check::CAPABILITIES;

/// Capabilities the running agent keeps (numbers from linux/capability.h).
pub const KEPT: [u32; 2] = [39, 12];

/// `CAP_DAC_OVERRIDE`: root without it is held to file modes like anyone else.
const CAP_DAC_OVERRIDE: u32 = 1;

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

/// This process's effective capability bits (`CapEff` of /proc/self/status); 0 if unreadable.
#[must_use]
pub fn effective() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// The Linux security module's label of this process (/proc/self/attr/current: an AppArmor
/// profile such as `cri-containerd.apparmor.d (enforce)`, or an SELinux context), unless
/// there is none or it is unconfined.
#[must_use]
pub fn security_label() -> Option<String> {
    let label = std::fs::read_to_string("/proc/self/attr/current").ok()?;
    let label = label.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!label.is_empty() && label != "unconfined").then(|| label.to_owned())
}

/// What to do about a refusal (EPERM, EACCES) while loading, attaching or pinning, for a
/// process with effective uid `euid` and effective capabilities `capabilities`. Root with all
/// four capabilities the agent uses was refused by something else: a Linux security module
/// (a container runtime's default AppArmor profile denies writes below /sys/fs/bpf; SELinux's
/// `container_t` may not manage bpffs files), whose `label` is said when known.
#[must_use]
pub fn denial_advice(euid: u32, capabilities: u64, label: Option<&str>) -> String {
    let all = CAPABILITIES
        .iter()
        .all(|(bit, ..)| capabilities & (1 << bit) != 0);
    if euid != 0 || !all {
        return "permission denied: run as root, or with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, \
                CAP_SYS_ADMIN (bpffs and cgroup2 mounts) and write access to the pin directory"
            .to_owned();
    }
    let confined = label.map_or(String::new(), |label| {
        format!(" (this process runs as `{label}`)")
    });
    // Without CAP_DAC_OVERRIDE (the shipped manifests drop it) root is held to the mode bits
    // of directories it does not own.
    let not_owned = if capabilities & (1 << CAP_DAC_OVERRIDE) == 0 {
        " (unless a directory on the pin directory's path belongs to another user: without \
         CAP_DAC_OVERRIDE root is held to its mode)"
    } else {
        ""
    };
    format!(
        "permission denied, although this process is root with CAP_BPF, CAP_PERFMON, \
         CAP_NET_ADMIN and CAP_SYS_ADMIN: a Linux security module refused it{confined}{not_owned}, \
         and the kernel's log (dmesg, journalctl -k) names the denial. Under AppArmor, whose default \
         container profile denies writes below /sys/fs/bpf, run the container unconfined \
         (Kubernetes: securityContext.appArmorProfile.type: Unconfined, or before 1.30 the \
         annotation container.apparmor.security.beta.kubernetes.io/<container>: unconfined; \
         podman or docker: --security-opt apparmor=unconfined); under SELinux give it the \
         spc_t type (securityContext.seLinuxOptions.type: spc_t; --security-opt \
         label=type:spc_t)"
    )
}

/// The advice of [`denial_advice`] for this process.
#[must_use]
pub fn denial_advice_here() -> String {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    denial_advice(euid, effective(), security_label().as_deref())
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

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_FOUR: u64 = (1 << 39) | (1 << 38) | (1 << 12) | (1 << 21);

    #[test]
    fn root_with_every_capability_is_told_of_the_security_module_not_to_run_as_root() {
        let advice = denial_advice(0, ALL_FOUR, None);
        assert!(!advice.contains("run as root"), "{advice}");
        for fix in [
            "Linux security module",
            "appArmorProfile.type: Unconfined",
            "spc_t",
        ] {
            assert!(advice.contains(fix), "{fix}: {advice}");
        }
        assert!(advice.contains("without CAP_DAC_OVERRIDE"), "{advice}");
        let confined = denial_advice(0, u64::MAX, Some("cri-containerd.apparmor.d (enforce)"));
        assert!(
            confined.contains("runs as `cri-containerd.apparmor.d (enforce)`")
                && !confined.contains("CAP_DAC_OVERRIDE"),
            "{confined}"
        );
    }

    #[test]
    fn without_root_or_a_capability_the_advice_is_to_run_as_root() {
        for (euid, capabilities) in [
            (65534, ALL_FOUR),
            (0, ALL_FOUR & !(1 << 39)),
            (0, ALL_FOUR & !(1 << 21)),
            (0, 0),
        ] {
            let advice = denial_advice(euid, capabilities, None);
            assert!(
                advice.starts_with("permission denied: run as root, or with CAP_BPF"),
                "{euid} {capabilities:#x}: {advice}"
            );
        }
    }
}
