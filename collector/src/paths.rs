//! Every path and fixed location the agent uses, in one place: the bpffs pin layout, the
//! cgroup2 mount.

use std::{
    fs,
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Layout version of the pinned maps. At start, `loader::check_pinned_maps` compares each
/// pinned map's type, sizes, capacity and flags with this build's: the short-lived DNS
/// matching tables (`DNS_INFLIGHT`, `DNS_UPSTREAM`, `DNS_UPSTREAM_LATEST`: seconds of
/// state) of another shape are unpinned and made afresh, with a warning; any other map of
/// another shape (the counters, the connection table) has every pin removed, links first,
/// and counting starts from zero, as after a clean upgrade. A change of
/// meaning that keeps the shape raises `collector_common::PIN_LAYOUT` instead of this,
/// which the pins record: a new directory would leave a crashed run's links attached beside
/// the new ones, counting twice.
pub const PIN_LAYOUT_VERSION: &str = "v1";
/// Filesystem type of bpffs in /proc/mounts.
const BPFFS: &str = "bpf";
/// Filesystem type of cgroup v2 in /proc/mounts.
const CGROUP2: &str = "cgroup2";

#[derive(Debug, Error)]
pub enum PathError {
    #[error(
        "cgroup2 path {0} is not a mounted cgroup2 filesystem (see /proc/mounts): set `cgroup2` to a cgroup2 mount, or leave it out for the first one"
    )]
    NotCgroup2(PathBuf),
    #[error(
        "the cgroup2 mount at {0} is a cgroup below the hierarchy's root (a container's own cgroup namespace?), where sock_ops would see only that cgroup's sockets; mount the host's cgroup2 (a hostPath of /sys/fs/cgroup) or run in the host's cgroup namespace, and set `cgroup2` to it"
    )]
    NotCgroup2Root(PathBuf),
    #[error("opening the cgroup2 root at {0}: {1}")]
    OpenCgroup2(PathBuf, #[source] std::io::Error),
    #[error(
        "no cgroup2 mount is visible here (/proc/self/mounts): mount the host's cgroup2 into this container (a hostPath of its mount, /sys/fs/cgroup or /sys/fs/cgroup/unified) and set `cgroup2` to it where it is not found; mounting one at {0} to open its root needs CAP_SYS_ADMIN and a writable temporary directory (TMPDIR), and failed"
    )]
    MountCgroup2(PathBuf, #[source] std::io::Error),
    #[error(
        "{0} is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf` or set `pin_dir` to a directory on bpffs"
    )]
    NoBpffs(PathBuf),
    #[error(
        "mounting bpffs at {0} (needs CAP_SYS_ADMIN; or mount it yourself: `mount -t bpf bpf /sys/fs/bpf`)"
    )]
    MountBpffs(PathBuf, #[source] std::io::Error),
    #[error("reading /proc/mounts: {0}")]
    Mounts(#[source] std::io::Error),
    #[error(
        "pin directory {0}: bpffs refuses names with a dot in them; set `pin_dir` (or --pin-dir) to one without"
    )]
    DotInBpffsName(PathBuf),
    #[error("looking for {0}: permission denied: run as root (bpffs is mode 0700, root's alone)")]
    PinsDenied(PathBuf),
    #[error("looking for {0}: {1}")]
    LookUp(PathBuf, #[source] std::io::Error),
    #[error(
        "pin_dir {pin_dir} is the bpffs mount itself, where other tools pin too: the collector's \
         pins would go among theirs (in {layout}) and its lock would hold the whole mount; set \
         `pin_dir` (or --pin-dir) to a directory of its own on it, such as {suggested}"
    )]
    BpffsRoot {
        pin_dir: PathBuf,
        layout: PathBuf,
        suggested: PathBuf,
    },
}

impl PathError {
    /// Says itself that a refusal needs `CAP_SYS_ADMIN` (a mount).
    #[must_use]
    pub fn explains_denial(&self) -> bool {
        matches!(self, Self::MountBpffs(..) | Self::MountCgroup2(..))
    }
}

/// One line of /proc/mounts.
struct Mount<'a> {
    target: &'a str,
    fstype: &'a str,
}

fn parse_mounts(text: &str) -> impl Iterator<Item = Mount<'_>> {
    text.lines().filter_map(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next()?;
        let target = fields.next()?;
        let fstype = fields.next()?;
        Some(Mount { target, fstype })
    })
}

/// /proc/mounts escapes spaces and a few other bytes as octal (`\040`).
fn unescape_mount_path(path: &str) -> PathBuf {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(value) = u8::from_str_radix(&path[i + 1..i + 4], 8)
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&out),
    ))
}

/// Whether the pin directory was given as a symbolic link (bpffs laid out by the operator):
/// its directory is then emptied but never removed, by a stop or `cleanup --apply`. Removed
/// through the link, it left the link dangling, which the next start cannot make again; and
/// `rmdir` refuses a link (ENOTDIR), which failed the stop and left the nftables table.
pub fn given_as_link(pin_dir: &Path) -> bool {
    fs::symlink_metadata(pin_dir).is_ok_and(|found| found.file_type().is_symlink())
}

fn read_mounts() -> Result<String, PathError> {
    fs::read("/proc/self/mounts")
        .map(mounts_text)
        .map_err(PathError::Mounts)
}

/// /proc/self/mounts as text. The kernel escapes only whitespace and backslashes in mount
/// paths and passes other bytes through: read as UTF-8, one mount point named in Latin-1 (a
/// user's FUSE mount) failed every start. Its bad bytes come out as U+FFFD, so that path is
/// never the cgroup2 or bpffs mount looked for, which keep their names.
fn mounts_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes)
        .unwrap_or_else(|err| String::from_utf8_lossy(err.as_bytes()).into_owned())
}

/// The cgroup2 mounts in `mounts_text`, in order (hybrid hosts mount it at
/// /sys/fs/cgroup/unified, unified ones at /sys/fs/cgroup).
fn cgroup2_mounts(mounts_text: &str) -> impl Iterator<Item = PathBuf> + '_ {
    parse_mounts(mounts_text)
        .filter(|m| m.fstype == CGROUP2)
        .map(|m| unescape_mount_path(m.target))
}

/// The root directory of a cgroup2 hierarchy is kernfs's first node, inode 1; a mount made
/// inside a cgroup namespace, or a bind mount of a cgroup below, shows another.
const CGROUP2_ROOT_INODE: u64 = 1;

fn is_hierarchy_root(metadata: &fs::Metadata) -> bool {
    std::os::unix::fs::MetadataExt::ino(metadata) == CGROUP2_ROOT_INODE
}

fn mount_is_hierarchy_root(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|metadata| is_hierarchy_root(&metadata))
}

/// The bpffs mount that holds `pin_dir`, if any.
pub fn bpffs_for(pin_dir: &Path) -> Result<Option<PathBuf>, PathError> {
    Ok(bpffs_containing(&read_mounts()?, pin_dir))
}

/// The cgroup2 root the `sock_ops` program attaches to.
pub enum Cgroup2 {
    /// A mount point visible to this process.
    Mounted(PathBuf),
    /// None is visible (`ip netns exec` gives its command a fresh /sys without the host's
    /// cgroup mounts): mount one for a moment to open its root.
    Unmounted,
}

/// The configured cgroup2 mount, else the first in /proc/self/mounts that shows the
/// hierarchy's root; checked to be a cgroup2 mount of the root: `sock_ops` attached below
/// it would count only the sockets of that cgroup, silently.
pub fn cgroup2_root(configured: Option<&Path>) -> Result<Cgroup2, PathError> {
    cgroup2_root_in(&read_mounts()?, configured)
}

/// [`cgroup2_root`] by the mounts in `mounts`.
fn cgroup2_root_in(mounts: &str, configured: Option<&Path>) -> Result<Cgroup2, PathError> {
    let path = match configured {
        None => {
            let mut found = cgroup2_mounts(mounts);
            let Some(first) = found.next() else {
                return Ok(Cgroup2::Unmounted);
            };
            std::iter::once(first.clone())
                .chain(found)
                .find(|path| mount_is_hierarchy_root(path))
                .unwrap_or(first)
        }
        Some(path) => {
            if !cgroup2_mounts(mounts).any(|mount| mount == path) {
                return Err(PathError::NotCgroup2(path.to_path_buf()));
            }
            path.to_path_buf()
        }
    };
    if mount_is_hierarchy_root(&path) {
        Ok(Cgroup2::Mounted(path))
    } else {
        Err(PathError::NotCgroup2Root(path))
    }
}

/// Opens the root of the cgroup2 hierarchy. Without a visible mount, mounts cgroup2 on a
/// temporary directory, opens it and detaches the mount at once: the open directory keeps
/// the cgroup, and nothing stays mounted.
pub fn open_cgroup2(cgroup: &Cgroup2) -> Result<(fs::File, String), PathError> {
    match cgroup {
        Cgroup2::Mounted(path) => fs::File::open(path)
            .map(|file| (file, path.display().to_string()))
            .map_err(|err| PathError::OpenCgroup2(path.clone(), err)),
        Cgroup2::Unmounted => {
            let dir = std::env::temp_dir().join(format!(
                "collector-cgroup2-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .subsec_nanos()
            ));
            let fail = |err| PathError::MountCgroup2(dir.clone(), err);
            // Made here, or refused: one found there (a symbolic link someone put in a
            // shared /tmp) would have the mount follow it elsewhere. Once made, the sticky
            // /tmp keeps others from swapping it.
            fs::create_dir(&dir).map_err(fail)?;
            let opened = mount("cgroup2", &dir, "cgroup2", c"").and_then(|()| {
                let file = fs::File::open(&dir);
                unmount_detached(&dir);
                file
            });
            let _ = fs::remove_dir(&dir);
            let file = opened.map_err(fail)?;
            // In a cgroup namespace of its own, a fresh mount shows the namespace's root.
            if !is_hierarchy_root(&file.metadata().map_err(fail)?) {
                return Err(PathError::NotCgroup2Root(dir));
            }
            Ok((file, "cgroup2 root (mounted privately)".to_owned()))
        }
    }
}

fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    options: &std::ffi::CStr,
) -> std::io::Result<()> {
    let source = std::ffi::CString::new(source)?;
    let target = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())?;
    let fstype = std::ffi::CString::new(fstype)?;
    // SAFETY: NUL-terminated strings that outlive the call; mount(2) copies them.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            options.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn unmount_detached(target: &Path) {
    if let Ok(target) = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()) {
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
    }
}

/// The bpffs mount that contains `path`, if any (longest matching mount point).
fn bpffs_containing(mounts_text: &str, path: &Path) -> Option<PathBuf> {
    parse_mounts(mounts_text)
        .filter(|m| m.fstype == BPFFS)
        .map(|m| unescape_mount_path(m.target))
        .filter(|target| path.starts_with(target))
        .max_by_key(|target| target.as_os_str().len())
}

/// Where bpffs is conventionally mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Whether `path` is the mount point of a bpffs in `mounts_text`.
fn is_bpffs_mount_point(mounts_text: &str, path: &Path) -> bool {
    parse_mounts(mounts_text).any(|m| m.fstype == BPFFS && unescape_mount_path(m.target) == path)
}

/// Whether `path` is a bpffs mount itself, not a directory of one: mounted there, or
/// /sys/fs/bpf, where `run` mounts one when none is (so it is one, or becomes one).
pub fn is_bpffs_root(path: &Path) -> Result<bool, PathError> {
    Ok(is_bpffs_root_in(&read_mounts()?, path))
}

/// [`is_bpffs_root`] by the mounts in `mounts_text`.
fn is_bpffs_root_in(mounts_text: &str, path: &Path) -> bool {
    // `--pin-dir /sys/fs/../fs/bpf` or a symbolic link to the mount is the mount too.
    let real = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    [path, real.as_path()]
        .into_iter()
        .any(|path| path == Path::new(BPFFS_ROOT) || is_bpffs_mount_point(mounts_text, path))
}

/// Refuses a pin directory that is the bpffs mount itself ([`is_bpffs_root`]): the layout
/// directory would sit among other tools' pins (iproute2's and Cilium's `tc/globals`,
/// bpftool's), the pin directory's lock would be taken on the whole mount, and `cleanup`
/// refuses to work there. The error names a directory of its own to use.
pub fn refuse_bpffs_root(pin_dir: &Path) -> Result<(), PathError> {
    refuse_bpffs_root_in(&read_mounts()?, pin_dir)
}

/// [`refuse_bpffs_root`] by the mounts in `mounts_text`.
fn refuse_bpffs_root_in(mounts_text: &str, pin_dir: &Path) -> Result<(), PathError> {
    if is_bpffs_root_in(mounts_text, pin_dir) {
        return Err(PathError::BpffsRoot {
            pin_dir: pin_dir.into(),
            layout: map_pin_dir(pin_dir),
            suggested: pin_dir.join("collector"),
        });
    }
    Ok(())
}

/// Makes sure `pin_dir` lies on bpffs, in a directory of its own ([`refuse_bpffs_root`]).
/// With none mounted and a pin directory under /sys/fs/bpf, mounts bpffs there, as Cilium
/// does. Under `ip netns exec` that mount is private to the agent (its /sys is its own), so
/// the pins do not outlive it.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), PathError> {
    if bpffs_of(&read_mounts()?, pin_dir)?.is_none() {
        let root = Path::new(BPFFS_ROOT);
        fs::create_dir_all(root)
            .and_then(|()| mount("bpf", root, "bpf", c"mode=0700"))
            .map_err(|err| PathError::MountBpffs(root.into(), err))?;
        tracing::warn!(
            "no bpffs was mounted: mounted one at {BPFFS_ROOT}; if this process has a private /sys (ip netns exec), its pins vanish with it"
        );
    }
    Ok(())
}

/// The bpffs mount `pin_dir` lies on, or `None` where a start mounts one at
/// [`BPFFS_ROOT`] for it; an error where a start refuses it.
fn bpffs_of(mounts_text: &str, pin_dir: &Path) -> Result<Option<PathBuf>, PathError> {
    // /sys/fs/bpf is refused whether or not bpffs is mounted there yet.
    refuse_bpffs_root_in(mounts_text, pin_dir)?;
    let mount = bpffs_containing(mounts_text, pin_dir);
    if mount.is_none() && !pin_dir.starts_with(BPFFS_ROOT) {
        return Err(PathError::NoBpffs(pin_dir.into()));
    }
    // Otherwise creating the directory fails with EPERM, which reads as missing privileges.
    if dot_below(mount.as_deref().unwrap_or(Path::new(BPFFS_ROOT)), pin_dir) {
        return Err(PathError::DotInBpffsName(pin_dir.into()));
    }
    Ok(mount)
}

/// What a start would refuse of `pin_dir` and `cgroup2` on this host, found without mounting
/// or making anything: the config watch judges an edited file by it, as the next start would.
pub fn refused_at_start(pin_dir: &Path, cgroup2: Option<&Path>) -> Result<(), PathError> {
    let mounts = read_mounts()?;
    bpffs_of(&mounts, pin_dir)?;
    // Read only: none configured and none visible, a start mounts one of its own.
    cgroup2_root_in(&mounts, cgroup2).map(drop)
}

/// Whether a name of `path` below the bpffs mount at `mount` has a dot in it.
pub fn dot_below(mount: &Path, path: &Path) -> bool {
    path.strip_prefix(mount).is_ok_and(|below| {
        below
            .components()
            .any(|name| name.as_os_str().as_encoded_bytes().contains(&b'.'))
    })
}

/// Whether the pin or pin directory `path` exists. To anyone but root, bpffs (mode 0700) hides
/// everything, and `Path::exists` would report nothing pinned: that is an error here.
pub fn pin_exists(path: &Path) -> Result<bool, PathError> {
    path.try_exists().map_err(|err| {
        if crate::privileges::denied(&err) {
            PathError::PinsDenied(path.into())
        } else {
            PathError::LookUp(path.into(), err)
        }
    })
}

/// Prefix of the directory `collector check` makes in the pin directory to try pinning a map
/// there, followed by its process id.
pub const CHECK_PROBE_PREFIX: &str = "check-probe-";

/// Directory of this build's pinned maps under the configured pin directory.
pub fn map_pin_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(PIN_LAYOUT_VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0
bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0
bpf /sys/fs/bpf/with\\040space bpf rw 0 0
";

    #[test]
    fn a_pin_directory_is_judged_as_a_start_judges_it_before_mounting_anything() {
        let of = |mounts: &str, pin_dir: &str| bpffs_of(mounts, Path::new(pin_dir));
        assert_eq!(
            of(HYBRID, "/sys/fs/bpf/collector").unwrap(),
            Some(PathBuf::from("/sys/fs/bpf"))
        );
        // None mounted: a start mounts one at /sys/fs/bpf for a pin directory below it.
        assert_eq!(of("", "/sys/fs/bpf/collector").unwrap(), None);
        for (mounts, refused) in [
            (HYBRID, "/run/collector"),
            ("", "/run/collector"),
            (HYBRID, "/sys/fs/bpf/collector.v2"),
            ("", "/sys/fs/bpf/collector.v2"),
            (HYBRID, "/sys/fs/bpf"),
        ] {
            assert!(of(mounts, refused).is_err(), "{refused} with {mounts:?}");
        }
    }

    #[test]
    fn a_dot_is_refused_only_below_the_bpffs_mount() {
        let mount = Path::new("/run/x.y/bpf");
        assert!(!dot_below(mount, Path::new("/run/x.y/bpf/collector")));
        assert!(dot_below(mount, Path::new("/run/x.y/bpf/collector.prod")));
        assert!(dot_below(mount, Path::new("/run/x.y/bpf/a.b/collector")));
    }

    #[test]
    fn a_bpffs_mount_point_is_told_from_a_directory_on_it() {
        assert!(is_bpffs_mount_point(HYBRID, Path::new("/sys/fs/bpf")));
        assert!(is_bpffs_mount_point(HYBRID, Path::new("/sys/fs/bpf/")));
        assert!(is_bpffs_mount_point(
            HYBRID,
            Path::new("/sys/fs/bpf/with space")
        ));
        assert!(!is_bpffs_mount_point(
            HYBRID,
            Path::new("/sys/fs/bpf/collector")
        ));
        // cgroup2's mount point is a mount, but not bpffs.
        assert!(!is_bpffs_mount_point(
            HYBRID,
            Path::new("/sys/fs/cgroup/unified")
        ));
    }

    #[test]
    fn finds_cgroup2_on_hybrid_hosts() {
        assert_eq!(
            cgroup2_mounts(HYBRID).collect::<Vec<_>>(),
            [PathBuf::from("/sys/fs/cgroup/unified")]
        );
        assert_eq!(cgroup2_mounts("proc /proc proc rw 0 0\n").next(), None);
        // A mount point that is not UTF-8 costs only its own name.
        let mut bytes = b"fuse /home/u/caf\xe9 fuse rw 0 0\n".to_vec();
        bytes.extend_from_slice(HYBRID.as_bytes());
        let text = mounts_text(bytes);
        assert_eq!(
            cgroup2_mounts(&text).collect::<Vec<_>>(),
            [PathBuf::from("/sys/fs/cgroup/unified")]
        );
        assert_eq!(
            bpffs_containing(&text, Path::new("/sys/fs/bpf/collector")),
            Some(PathBuf::from("/sys/fs/bpf"))
        );
    }

    #[test]
    fn finds_the_bpffs_holding_a_path() {
        assert_eq!(
            bpffs_containing(HYBRID, Path::new("/sys/fs/bpf/collector")),
            Some(PathBuf::from("/sys/fs/bpf"))
        );
        assert_eq!(
            bpffs_containing(HYBRID, Path::new("/sys/fs/bpf/with space/x")),
            Some(PathBuf::from("/sys/fs/bpf/with space"))
        );
        assert_eq!(bpffs_containing(HYBRID, Path::new("/tmp/pins")), None);
        // A prefix of a component is not containment.
        assert_eq!(bpffs_containing(HYBRID, Path::new("/sys/fs/bpfx")), None);
    }
}
