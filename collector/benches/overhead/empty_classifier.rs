//! An empty classifier on lo, and nothing else, as one side of a pair: what any tc program
//! costs the packets (the hook, the call, the return) before one instruction of ours runs,
//! so that the agent's ratios can be read against what no classifier can avoid.

use aya::{
    Ebpf,
    programs::{SchedClassifier, TcAttachType},
};
use collector_common::program_names;

use crate::support::Netns;

/// `stats_floor_tc` (it returns at once) attached to lo's ingress, where the agent's
/// `count_loopback` goes, the way the agent attaches it (tcx). Detached on drop, with the
/// program's link.
pub struct EmptyClassifier {
    _ebpf: Ebpf,
}

impl EmptyClassifier {
    pub fn attach(netns: &Netns) -> Self {
        let ebpf = crate::path_cost::load(false, 1);
        // The attach names lo by index in the caller's namespace: it runs in the benchmark's.
        let ebpf = netns.run(move || {
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
        Self { _ebpf: ebpf }
    }
}
