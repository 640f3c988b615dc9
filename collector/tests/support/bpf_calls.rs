//! bpf(2) calls of the tests' own: TCX programs beside the agent's (a CNI's, or as many as
//! a hook takes), and a link detached as `bpftool` detaches one.

/// `union bpf_attr` for `BPF_PROG_LOAD`, as far as a program without BTF needs it.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_LINK_CREATE` of a TCX link.
#[repr(C)]
#[derive(Default)]
struct TcxLinkAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

fn bpf<T>(command: libc::c_long, attr: &mut T) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    // SAFETY: `attr` is a #[repr(C)] prefix of `union bpf_attr` for `command`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr),
            size_of::<T>(),
        )
    };
    assert!(
        fd >= 0,
        "bpf({command}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new file descriptor that nothing else owns.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) }
}

/// What a CNI's classifier does (Cilium's, Calico's): returns `TC_ACT_OK`, which ends the
/// hook's chain, `per_hook` times on `interface`'s ingress and egress, last in the chain
/// or, with `first`, ahead of every other program. Attached while the returned links live.
/// Call it inside the interface's namespace.
pub fn chain_ending_programs(
    interface: &str,
    first: bool,
    per_hook: usize,
) -> Vec<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd as _;
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
    const BPF_TCX_INGRESS: u32 = 46;
    const BPF_TCX_EGRESS: u32 = 47;
    // With no program named beside it: before all of them.
    const BPF_F_BEFORE: u32 = 1 << 3;
    // r0 = 0 (TC_ACT_OK); exit.
    let instructions: [u64; 2] = [0xb7, 0x95];
    let license = c"GPL";
    let name = std::ffi::CString::new(interface).unwrap();
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {interface}");
    // A hook takes a program once: one of its own for each of a hook's links.
    let programs: Vec<_> = (0..per_hook)
        .map(|_| {
            bpf(
                BPF_PROG_LOAD,
                &mut ProgLoadAttr {
                    prog_type: BPF_PROG_TYPE_SCHED_CLS,
                    insn_cnt: 2,
                    insns: instructions.as_ptr() as u64,
                    license: license.as_ptr() as u64,
                    ..ProgLoadAttr::default()
                },
            )
        })
        .collect();
    [BPF_TCX_INGRESS, BPF_TCX_EGRESS]
        .into_iter()
        .flat_map(|attach_type| programs.iter().map(move |program| (attach_type, program)))
        .map(|(attach_type, program)| {
            bpf(
                BPF_LINK_CREATE,
                &mut TcxLinkAttr {
                    prog_fd: u32::try_from(program.as_raw_fd()).unwrap(),
                    target_ifindex: index,
                    attach_type,
                    flags: if first { BPF_F_BEFORE } else { 0 },
                    ..TcxLinkAttr::default()
                },
            )
        })
        .collect()
}

/// `union bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` for `BPF_LINK_DETACH`.
#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// Detaches the link pinned at `pin` as `bpftool link detach pinned` does: the pin stays,
/// its link attached to nothing.
pub fn detach_pinned_link(pin: &std::path::Path) {
    use std::os::fd::AsRawFd as _;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).unwrap();
    let link = bpf(
        BPF_OBJ_GET,
        &mut ObjGetAttr {
            pathname: path.as_ptr() as u64,
            ..ObjGetAttr::default()
        },
    );
    let mut attr = LinkDetachAttr {
        link_fd: u32::try_from(link.as_raw_fd()).unwrap(),
    };
    // SAFETY: `attr` is a #[repr(C)] prefix of `union bpf_attr` for BPF_LINK_DETACH.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            std::ptr::from_mut(&mut attr),
            size_of::<LinkDetachAttr>(),
        )
    };
    assert_eq!(
        rc,
        0,
        "BPF_LINK_DETACH {}: {}",
        pin.display(),
        std::io::Error::last_os_error()
    );
}
