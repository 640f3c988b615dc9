//! The `bpf(2)` commands aya 0.14 does not expose for every link type: opening a pinned
//! object and swapping the program inside a link, used to adopt links that a crashed agent
//! left pinned, replacing their program atomically so nothing is missed or counted twice;
//! and listing a TCX hook's programs in the order they run; reading a TCX link's interface
//! (0 once the device is gone), to tell the pins of a namespace that is gone; reading the
//! program behind a pinned link, whose maps `collector maps dump` reads where they are not
//! pinned. Also a throwaway map pinned for a moment, for `collector check` to try what `run`
//! needs of the pin directory.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `enum bpf_link_type`'s TCX link (Linux 6.6).
const BPF_LINK_TYPE_TCX: u32 = 11;
/// Attach types of the TCX hooks.
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;
/// Attach types of the cgroup hooks: the server name reader's and `sock_ops`.
pub const BPF_CGROUP_INET_INGRESS: u32 = 0;
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
/// Attach flags of a cgroup hook's programs: others may override them in a child cgroup
/// (`BPF_F_ALLOW_OVERRIDE`), others may join them (`BPF_F_ALLOW_MULTI`, as links always do).
pub const BPF_F_ALLOW_OVERRIDE: u32 = 1;
const BPF_F_ALLOW_MULTI: u32 = 2;
/// `BPF_CGROUP_MAX_PROGS`: the programs one cgroup hook holds at most.
pub const CGROUP_MAX_PROGRAMS: usize = 64;

/// `union bpf_attr` for `BPF_MAP_CREATE`, as far as a plain array needs.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET` and `BPF_OBJ_PIN` (kernel `include/uapi/linux/bpf.h`).
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` for `BPF_LINK_UPDATE`.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `union bpf_attr` for `BPF_PROG_QUERY`.
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` up to the TCX link's part of its union: type, id and program id,
/// then the union, 8-aligned (it holds `__aligned_u64` members), whose `tcx` is ifindex and
/// attach type. The kernel fills the first `info_len` bytes of its own, larger, struct.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    tcx_ifindex: u32,
    tcx_attach_type: u32,
}

const _: () = assert!(size_of::<LinkInfo>() == 24);
const _: () = assert!(std::mem::offset_of!(LinkInfo, tcx_ifindex) == 16);

fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a #[repr(C)] prefix of `union bpf_attr` for `command`, valid for the
    // size passed; the kernel zero-extends the rest.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr),
            size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens the BPF object pinned at `path`.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates a one-entry array map and pins it at `path`, as the agent pins its maps: the map
/// goes once the pin is removed. The error says which step was refused.
pub fn pin_probe_map(path: &Path) -> Result<(), (&'static str, io::Error)> {
    let mut create = MapCreateAttr {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
    };
    let fd = bpf(BPF_MAP_CREATE, &mut create).map_err(|err| ("creating a map", err))?;
    let fd = i32::try_from(fd).map_err(|err| ("creating a map", io::Error::other(err)))?;
    // SAFETY: BPF_MAP_CREATE returned a new file descriptor that nothing else owns.
    let map = unsafe { OwnedFd::from_raw_fd(fd) };
    let pathname = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|err| {
        (
            "pinning a map",
            io::Error::new(io::ErrorKind::InvalidInput, err),
        )
    })?;
    let mut pin = ObjGetAttr {
        pathname: pathname.as_ptr() as u64,
        bpf_fd: u32::try_from(map.as_raw_fd())
            .map_err(|err| ("pinning a map", io::Error::other(err)))?,
        ..ObjGetAttr::default()
    };
    bpf(BPF_OBJ_PIN, &mut pin)
        .map(|_| ())
        .map_err(|err| ("pinning a map", err))
}

/// Atomically replaces the program attached through `link` with `program`.
pub fn update_link(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: u32::try_from(link.as_fd().as_raw_fd()).map_err(io::Error::other)?,
        new_prog_fd: u32::try_from(program.as_raw_fd()).map_err(io::Error::other)?,
        ..LinkUpdateAttr::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// The interface index of the TCX link `link`: 0 once its device is unregistered (the
/// kernel's `tcx_uninstall` drops the link's device, and `tcx_link_fill_info` reports 0; a
/// namespace's devices go when the namespace does). `None` if `link` is not a TCX link.
pub fn tcx_link_ifindex(link: BorrowedFd<'_>) -> io::Result<Option<u32>> {
    let info = link_info(link)?;
    Ok((info.link_type == BPF_LINK_TYPE_TCX).then_some(info.tcx_ifindex))
}

/// The id of the program attached through `link` (any link type).
pub fn link_program_id(link: BorrowedFd<'_>) -> io::Result<u32> {
    Ok(link_info(link)?.prog_id)
}

fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut info = LinkInfo::default();
    let mut attr = InfoByFdAttr {
        bpf_fd: u32::try_from(link.as_raw_fd()).map_err(io::Error::other)?,
        info_len: u32::try_from(size_of::<LinkInfo>()).map_err(io::Error::other)?,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// The ids of the programs on interface `ifindex`'s TCX hook `attach_type`, in the order they
/// run.
pub fn tcx_programs(ifindex: u32, attach_type: u32) -> io::Result<Vec<u32>> {
    query_programs(ifindex, attach_type).map(|(_, ids)| ids)
}

/// The programs on one hook of a cgroup, as `BPF_PROG_QUERY` tells them.
pub struct CgroupHook {
    /// How they were attached (`BPF_F_ALLOW_OVERRIDE`, `BPF_F_ALLOW_MULTI`, or neither).
    pub flags: u32,
    /// Their ids, in the order they run.
    pub ids: Vec<u32>,
}

impl CgroupHook {
    /// The programs on the cgroup `cgroup`'s hook `attach_type`.
    pub fn query(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Self> {
        let fd = u32::try_from(cgroup.as_raw_fd()).map_err(io::Error::other)?;
        let (flags, ids) = query_programs(fd, attach_type)?;
        Ok(Self { flags, ids })
    }

    /// Whether its programs were attached without `BPF_F_ALLOW_MULTI` (exclusively, or to be
    /// overridden), which lets no other program join them: the kernel refuses a link there
    /// with EPERM.
    pub fn closed(&self) -> bool {
        !self.ids.is_empty() && self.flags & BPF_F_ALLOW_MULTI == 0
    }

    /// Whether it holds the kernel's limit of programs (`BPF_CGROUP_MAX_PROGS`): a link more
    /// is refused with E2BIG.
    pub fn full(&self) -> bool {
        self.ids.len() >= CGROUP_MAX_PROGRAMS
    }
}

/// `BPF_PROG_QUERY` of `target` (an interface index, or a cgroup's descriptor) for the hook
/// `attach_type`: the hook's attach flags and its programs' ids, in the order they run.
fn query_programs(target: u32, attach_type: u32) -> io::Result<(u32, Vec<u32>)> {
    // A cgroup hook's limit, more than any host runs on one TCX hook; the kernel says ENOSPC
    // if not.
    let mut ids = vec![0u32; CGROUP_MAX_PROGRAMS];
    let mut attr = ProgQueryAttr {
        target_ifindex: target,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: u32::try_from(ids.len()).map_err(io::Error::other)?,
        ..ProgQueryAttr::default()
    };
    bpf(BPF_PROG_QUERY, &mut attr)?;
    ids.truncate(attr.prog_cnt as usize);
    Ok((attr.attach_flags, ids))
}

/// A program that does nothing, attached to a cgroup as the agent attaches (a link) or the
/// way before links, for tests of what the second does to the first.
#[cfg(test)]
pub mod test_programs {
    use super::{BorrowedFd, FromRawFd, OwnedFd, bpf, io};
    use std::os::fd::AsRawFd;

    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_ATTACH: libc::c_long = 8;
    const BPF_PROG_DETACH: libc::c_long = 9;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;

    /// `union bpf_attr` for `BPF_PROG_LOAD`, as far as a program without maps needs.
    #[repr(C)]
    #[derive(Default)]
    struct ProgLoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
    }

    /// `union bpf_attr` for `BPF_PROG_ATTACH` and `BPF_PROG_DETACH`.
    #[repr(C)]
    #[derive(Default)]
    struct ProgAttachAttr {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
    }

    /// A `sock_ops` program that returns 1 at once: `r0 = 1; exit`.
    pub fn load_sock_ops_returning() -> io::Result<OwnedFd> {
        let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x95];
        let license = c"GPL";
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_SOCK_OPS,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
        };
        let fd = i32::try_from(bpf(BPF_PROG_LOAD, &mut attr)?).map_err(io::Error::other)?;
        // SAFETY: BPF_PROG_LOAD returned a new file descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Links `program` to `cgroup`'s hook `attach_type` (`BPF_LINK_CREATE`, as aya does): the
    /// link's descriptor, which detaches it when closed.
    pub fn link(
        cgroup: BorrowedFd<'_>,
        program: BorrowedFd<'_>,
        attach_type: u32,
    ) -> io::Result<OwnedFd> {
        // `link_create`'s first four words: the program, the target, the type, the flags.
        let mut attr = attach_attr(cgroup, program, attach_type)?;
        (attr.target_fd, attr.attach_bpf_fd) = (attr.attach_bpf_fd, attr.target_fd);
        let fd = i32::try_from(bpf(BPF_LINK_CREATE, &mut attr)?).map_err(io::Error::other)?;
        // SAFETY: BPF_LINK_CREATE returned a new file descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Attaches `program` to `cgroup`'s hook `attach_type` the way before links, with `flags`
    /// (0: exclusively).
    pub fn attach(
        cgroup: BorrowedFd<'_>,
        program: BorrowedFd<'_>,
        attach_type: u32,
        flags: u32,
    ) -> io::Result<()> {
        let mut attr = attach_attr(cgroup, program, attach_type)?;
        attr.attach_flags = flags;
        bpf(BPF_PROG_ATTACH, &mut attr).map(|_| ())
    }

    /// Detaches `program` from `cgroup`'s hook `attach_type`.
    pub fn detach(
        cgroup: BorrowedFd<'_>,
        program: BorrowedFd<'_>,
        attach_type: u32,
    ) -> io::Result<()> {
        let mut attr = attach_attr(cgroup, program, attach_type)?;
        bpf(BPF_PROG_DETACH, &mut attr).map(|_| ())
    }

    /// A cgroup of a test's own below the cgroup2 root, whose hooks no other test uses:
    /// removed when dropped, after whatever was attached to it.
    pub struct TestCgroup {
        pub path: std::path::PathBuf,
        pub file: std::fs::File,
    }

    impl TestCgroup {
        /// `collector-test-{tag}-{pid}` below the visible cgroup2 root.
        pub fn make(tag: &str) -> Self {
            let crate::paths::Cgroup2::Mounted(root) = crate::paths::cgroup2_root(None).unwrap()
            else {
                panic!("no cgroup2 mount is visible");
            };
            let path = root.join(format!("collector-test-{tag}-{}", std::process::id()));
            std::fs::create_dir(&path).unwrap_or_else(|err| {
                panic!(
                    "making the cgroup {} (this test needs root and a writable cgroup2): {err}",
                    path.display()
                )
            });
            let file = std::fs::File::open(&path).unwrap();
            Self { path, file }
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.path);
        }
    }

    fn attach_attr(
        cgroup: BorrowedFd<'_>,
        program: BorrowedFd<'_>,
        attach_type: u32,
    ) -> io::Result<ProgAttachAttr> {
        Ok(ProgAttachAttr {
            target_fd: u32::try_from(cgroup.as_raw_fd()).map_err(io::Error::other)?,
            attach_bpf_fd: u32::try_from(program.as_raw_fd()).map_err(io::Error::other)?,
            attach_type,
            attach_flags: 0,
        })
    }
}
