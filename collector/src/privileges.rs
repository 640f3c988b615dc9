//! Least privilege: once everything is loaded and attached, the agent keeps only the
//! capabilities it still uses and drops every other one.
//!
//! Kept: `CAP_BPF` (every bpf(2) call, map reads included, when unprivileged BPF is off, as
//! it is by default) and `CAP_NET_ADMIN` (attaching the classifiers to interfaces that appear
//! later). Dropped: `CAP_PERFMON` (needed only to load), `CAP_SYS_ADMIN` where it was granted
//! (needed only to mount and to switch on run-time statistics), and everything else. Pins are removed at stop by their owner (uid 0)
//! without any capability. Capabilities are per thread: this runs before the async runtime
//! starts its threads, which inherit the reduced set.
//!
//! Also here: telling a refusal for lack of privilege from other errors, so that what was
//! refused says to run as root instead of reporting something missing, or, when root with
//! every capability was refused, that a security module (AppArmor, SELinux) did it, or that
//! the process runs in a user namespace of its own, whose capabilities bpf(2) does not take.

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

/// A refusal whose message says it needs `CAP_SYS_ADMIN`: where this process lacks it, the
/// privilege advice ([`denial_advice`]), a guess, is left off it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NeedsSysAdmin(pub String);

/// Whether any cause in `err`'s chain is [`denied`].
#[must_use]
pub fn denied_in(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|cause| cause.downcast_ref::<io::Error>())
        .any(denied)
}

/// The kernel's verifier refused a program for itself, not for a missing privilege: its log,
/// which aya puts after `Verifier output:`, has something in it (a security module refuses
/// before the verifier runs, with no log), and the process holds every capability the agent
/// needs (without `CAP_PERFMON` the verifier refuses pointer arithmetic, with a log too).
#[must_use]
pub fn verifier_refused(err: &anyhow::Error, capabilities: u64) -> bool {
    let all = CAPABILITIES
        .iter()
        .all(|(bit, ..)| capabilities & (1 << bit) != 0);
    all && err.chain().any(|cause| {
        cause
            .to_string()
            .split_once("Verifier output:")
            .is_some_and(|(_, log)| !log.trim().is_empty())
    })
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

/// This process's uid map, in which the initial user namespace maps every uid to itself.
const UID_MAP: &str = "/proc/self/uid_map";

/// Whether a process runs in a user namespace other than the initial (the host's) one, from
/// its uid map as read from `/proc/PID/uid_map`: `Some` with the map (its ranges on one line,
/// comma-separated) unless it is the initial namespace's identity map `0 0 4294967295`. A
/// map that could not be read says nothing: `None`.
#[must_use]
pub fn user_namespace(uid_map: io::Result<String>) -> Option<String> {
    let text = uid_map.ok()?;
    let ranges: Vec<Vec<&str>> = text
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|range| !range.is_empty())
        .collect();
    if ranges == [["0", "0", "4294967295"]] {
        return None;
    }
    let ranges = ranges
        .iter()
        .map(|range| range.join(" "))
        .collect::<Vec<_>>()
        .join(", ");
    Some(if ranges.is_empty() {
        "empty: no uid mapped yet".to_owned()
    } else {
        ranges
    })
}

/// What to do about a refusal (EPERM, EACCES) while loading, attaching or pinning, for a
/// process with effective uid `euid` and effective capabilities `capabilities`, in the user
/// namespace whose uid map is `uid_map` (`None`: the host's, see [`user_namespace`]).
///
/// In a user namespace of its own (a rootless or user-namespaced container) root and its
/// capabilities count only inside it, and bpf(2) checks `CAP_BPF`, `CAP_PERFMON` and
/// `CAP_SYS_ADMIN` with `capable()`, in the initial user namespace (kernel/bpf/syscall.c; Linux
/// 6.9's BPF tokens delegate some of it, which aya does not use): nothing done inside helps.
/// Root with the three capabilities the agent always needs in the host's namespace was
/// refused by
/// something else: a Linux security module (a container runtime's default AppArmor profile
/// denies writes below /sys/fs/bpf; SELinux's `container_t` may not manage bpffs files),
/// whose `label` is said when known, or a seccomp filter (`status`: /proc/self/status).
#[must_use]
pub fn denial_advice(
    euid: u32,
    capabilities: u64,
    label: Option<&str>,
    uid_map: Option<&str>,
    status: &str,
) -> String {
    if let Some(uid_map) = uid_map {
        return format!(
            "permission denied: running in a user namespace (uid_map {uid_map}), whose root \
             and capabilities count only inside it: eBPF needs the host's CAP_BPF and \
             CAP_PERFMON (the kernel checks them in the initial user \
             namespace), which nothing inside can grant; run the collector in the host's user \
             namespace (Kubernetes: no `hostUsers: false`; docker: --userns=host where the \
             daemon remaps users; podman: as root, without --userns or --uidmap, since rootless \
             podman always runs in one)"
        );
    }
    let all = CAPABILITIES
        .iter()
        .all(|(bit, ..)| capabilities & (1 << bit) != 0);
    if euid != 0 || !all {
        return "permission denied: run as root, or with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN \
                (and CAP_SYS_ADMIN where the agent mounts bpffs or cgroup2 itself) and write \
                access to the pin directory"
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
    // A seccomp filter's refusal leaves nothing in the kernel's log: named first where one
    // is on, as the runtimes' default profiles refuse bpf(2) without CAP_SYS_ADMIN.
    let seccomp = if seccomp_filtered(status) {
        "a seccomp filter is on (Seccomp: 2 in /proc/self/status): a container runtime's \
         default profile (CRI-O's, podman's, older containerd's) refuses bpf(2) without \
         CAP_SYS_ADMIN, which leaves nothing in the kernel's log; run the collector without it \
         (Kubernetes: securityContext.seccompProfile.type: Unconfined; podman or docker: \
         --security-opt seccomp=unconfined). Otherwise "
    } else {
        ""
    };
    format!(
        "permission denied, although this process is root with CAP_BPF, CAP_PERFMON and \
         CAP_NET_ADMIN: {seccomp}a Linux security module refused it{confined}{not_owned}, \
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
    denial_advice(
        euid,
        effective(),
        security_label().as_deref(),
        user_namespace_here().as_deref(),
        &std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
    )
}

/// Whether a seccomp filter is on, by /proc/self/status (`Seccomp: 2`).
fn seccomp_filtered(status: &str) -> bool {
    status.lines().any(|line| {
        line.strip_prefix("Seccomp:")
            .is_some_and(|mode| mode.trim() == "2")
    })
}

/// The uid map of this process's user namespace, where it is not the host's.
#[must_use]
pub fn user_namespace_here() -> Option<String> {
    user_namespace(std::fs::read_to_string(UID_MAP))
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

    /// The three capabilities the agent always needs, without `CAP_SYS_ADMIN`.
    const NEEDED: u64 = (1 << 39) | (1 << 38) | (1 << 12);

    #[test]
    fn a_refusal_with_a_verifier_log_is_the_verifiers() {
        let load = |log: &str| {
            anyhow::anyhow!(
                "the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier \
                 output: {log}"
            )
            .context("loading read_server_names")
        };
        let refused = load("0: R1=ctx() R10=fp0\ninvalid access to packet, off=0 size=1");
        assert!(verifier_refused(&refused, NEEDED));
        assert!(!verifier_refused(&load(""), NEEDED));
        let pinning = anyhow::anyhow!("pinning the link: Permission denied (os error 13)");
        assert!(!verifier_refused(&pinning, NEEDED));
        // Without CAP_PERFMON the verifier refuses pointer arithmetic, with a log: that one
        // is for the privileges advice.
        let arithmetic = load("0: R1=ctx() R10=fp0\nR1 pointer arithmetic prohibited");
        assert!(!verifier_refused(&arithmetic, NEEDED & !(1 << 38)));
    }

    #[test]
    fn root_with_every_capability_is_told_of_the_security_module_not_to_run_as_root() {
        let advice = denial_advice(0, NEEDED, None, None, "Seccomp:\t0\n");
        assert!(!advice.contains("run as root"), "{advice}");
        assert!(!advice.contains("seccomp"), "{advice}");
        for fix in [
            "Linux security module",
            "appArmorProfile.type: Unconfined",
            "spc_t",
        ] {
            assert!(advice.contains(fix), "{fix}: {advice}");
        }
        assert!(advice.contains("without CAP_DAC_OVERRIDE"), "{advice}");
        let confined = denial_advice(
            0,
            u64::MAX,
            Some("cri-containerd.apparmor.d (enforce)"),
            None,
            "",
        );
        assert!(
            confined.contains("runs as `cri-containerd.apparmor.d (enforce)`")
                && !confined.contains("CAP_DAC_OVERRIDE"),
            "{confined}"
        );
        // Under a seccomp filter, which logs nothing, that is named first.
        let filtered = denial_advice(0, NEEDED, None, None, "Name:\tcollector\nSeccomp:\t2\n");
        assert!(
            filtered.contains(
                "CAP_NET_ADMIN: a seccomp filter is on (Seccomp: 2 in /proc/self/status)"
            ) && filtered.contains("seccompProfile.type: Unconfined")
                && filtered.contains("Otherwise a Linux security module"),
            "{filtered}"
        );
    }

    #[test]
    fn without_root_or_a_capability_the_advice_is_to_run_as_root() {
        for (euid, capabilities) in [
            (65534, NEEDED),
            (0, NEEDED & !(1 << 39)),
            (0, NEEDED & !(1 << 12)),
            (0, 0),
        ] {
            let advice = denial_advice(euid, capabilities, None, None, "Seccomp:\t2\n");
            assert!(
                advice.starts_with("permission denied: run as root, or with CAP_BPF"),
                "{euid} {capabilities:#x}: {advice}"
            );
        }
    }

    #[test]
    fn a_user_namespace_is_told_from_the_hosts_by_its_uid_map() {
        let map = |text: &str| user_namespace(Ok(text.to_owned()));
        // The initial namespace's, as the kernel pads it.
        assert_eq!(map("         0          0 4294967295\n"), None);
        // A container's: its root is uid 100000 of the host, and so on for 65536 uids.
        assert_eq!(
            map("         0     100000      65536\n"),
            Some("0 100000 65536".to_owned())
        );
        // `unshare --map-root-user`: root is root, but only root is mapped.
        assert_eq!(map("0 0 1\n"), Some("0 0 1".to_owned()));
        assert_eq!(
            map("0 1000 1\n1 100000 65536\n"),
            Some("0 1000 1, 1 100000 65536".to_owned())
        );
        assert_eq!(map(""), Some("empty: no uid mapped yet".to_owned()));
        // Unreadable (no /proc mounted): nothing known, and nothing said.
        assert_eq!(
            user_namespace(std::fs::read_to_string("/nonexistent/uid_map")),
            None
        );
        assert_eq!(
            user_namespace(Err(io::ErrorKind::PermissionDenied.into())),
            None
        );
    }

    #[test]
    fn in_a_user_namespace_the_advice_says_so_whoever_the_process_is() {
        for (euid, capabilities) in [(0, NEEDED), (0, u64::MAX), (0, 0), (65534, 0)] {
            let advice = denial_advice(
                euid,
                capabilities,
                Some("unconfined_u:unconfined_r:container_t:s0"),
                Some("0 100000 65536"),
                "Seccomp:\t2\n",
            );
            assert!(
                advice.starts_with(
                    "permission denied: running in a user namespace (uid_map 0 100000 65536)"
                ) && advice.contains("the host's CAP_BPF")
                    && !advice.contains("run as root")
                    && !advice.contains("security module"),
                "{euid} {capabilities:#x}: {advice}"
            );
        }
    }
}
