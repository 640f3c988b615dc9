//! Empty programs in the agent's places, and nothing else, as one side of a pair: what the
//! hooks cost the load (the call, the return, and for `sock_ops` every callback the kernel
//! makes once a program is attached) before one instruction of ours runs, so that the
//! agent's ratios can be read against what no program on those hooks can avoid.

use std::fs::File;

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, SchedClassifier, SockOps, TcAttachType},
};
use collector_common::program_names;

use crate::support::{self, Netns};

/// Which of the agent's hooks get an empty program.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hooks {
    /// lo's ingress, where the agent's `count_loopback` goes (the DNS load's only hook).
    Classifier,
    /// lo's ingress and the cgroup2 root, where the agent's `track_connections` goes.
    ClassifierAndSockOps,
}

/// `stats_floor_tc` (it returns at once) on lo's ingress the way the agent attaches it
/// (tcx), and with [`Hooks::ClassifierAndSockOps`] `stats_floor_sock_ops` on the cgroup2
/// root. Detached on drop, with the programs' links.
pub struct EmptyPrograms {
    _ebpf: Ebpf,
}

impl EmptyPrograms {
    pub fn attach(netns: &Netns, hooks: Hooks) -> Self {
        let ebpf = crate::path_cost::load(false, 1);
        // The attach names lo by index in the caller's namespace: it runs in the benchmark's.
        let mut ebpf = netns.run(move || {
            let mut ebpf = ebpf;
            let program: &mut SchedClassifier = ebpf
                .program_mut(program_names::STATS_FLOOR_TC)
                .unwrap()
                .try_into()
                .unwrap();
            program
                .attach("lo", TcAttachType::Ingress)
                .expect("attaching the empty classifier to lo");
            ebpf
        });
        if hooks == Hooks::ClassifierAndSockOps {
            let program: &mut SockOps = ebpf
                .program_mut(program_names::STATS_FLOOR_SOCK_OPS)
                .unwrap()
                .try_into()
                .unwrap();
            program.load().expect("loading the empty sock_ops program");
            let root = File::open(support::cgroup2_mount()).expect("opening the cgroup2 root");
            program
                .attach(root, CgroupAttachMode::Single)
                .expect("attaching the empty sock_ops program to the cgroup2 root");
        }
        Self { _ebpf: ebpf }
    }
}
