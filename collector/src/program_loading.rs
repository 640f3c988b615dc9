//! Loading the kernel programs a start needs, several at once. The verifier takes about
//! half a second for each classifier here, in the loading thread, and privileged loads do
//! not wait for each other in the kernel (only unprivileged ones share a lock), so a start
//! verifies on as many CPUs as the process may use instead of one program after another.

use std::{
    num::NonZeroUsize,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{Program, ProgramError},
};

/// Loads the programs `names` (each once, whatever the repeats) on up to as many threads as
/// the process may run at once (`available_parallelism` heeds a cgroup's CPU quota), this
/// one among them: a thread the system refuses (a pids limit) only means fewer at once.
/// After a refusal no further load begins (aya loads a refused program again with a
/// verifier log, which takes seconds), and the error is the first in `names`' order of
/// those tried.
pub fn load_all(ebpf: &mut Ebpf, names: &[&str]) -> anyhow::Result<()> {
    let mut unique: Vec<&str> = Vec::with_capacity(names.len());
    for &name in names {
        if !unique.contains(&name) {
            unique.push(name);
        }
    }
    // Each program is borrowed once, so the threads hold disjoint ones.
    let mut programs: Vec<(&str, &mut Program)> = ebpf
        .programs_mut()
        .filter(|(name, _)| unique.contains(name))
        .collect();
    programs.sort_by_key(|&(name, _)| unique.iter().position(|&wanted| wanted == name));
    if let Some(&absent) = unique
        .iter()
        .find(|&&name| programs.iter().all(|&(found, _)| found != name))
    {
        bail!("the kernel object has no program {absent}");
    }
    let workers = thread::available_parallelism()
        .map_or(1, NonZeroUsize::get)
        .min(programs.len());
    let queue = Mutex::new(programs.into_iter().enumerate());
    let refused = AtomicBool::new(false);
    // The lock only hands out the next program; it is not held while loading.
    let work = || {
        let mut done = Vec::new();
        while !refused.load(Ordering::Relaxed)
            && let Some((order, (name, program))) = next(&queue)
        {
            let outcome = load(program);
            if outcome.is_err() {
                refused.store(true, Ordering::Relaxed);
            }
            done.push((order, name, outcome));
        }
        done
    };
    let mut outcomes: Vec<(usize, &str, Result<(), ProgramError>)> = thread::scope(|scope| {
        let helpers: Vec<_> = (1..workers)
            .filter_map(|_| thread::Builder::new().spawn_scoped(scope, work).ok())
            .collect();
        let mut outcomes = work();
        for helper in helpers {
            outcomes.extend(
                helper
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            );
        }
        outcomes
    });
    outcomes.sort_by_key(|&(order, ..)| order);
    for (_, name, outcome) in outcomes {
        outcome.with_context(|| format!("loading {name}"))?;
    }
    Ok(())
}

fn next<T>(queue: &Mutex<impl Iterator<Item = T>>) -> Option<T> {
    queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .next()
}

/// Loads one program of the types the collector attaches.
fn load(program: &mut Program) -> Result<(), ProgramError> {
    match program {
        Program::SockOps(program) => program.load(),
        Program::SchedClassifier(program) => program.load(),
        Program::CgroupSkb(program) => program.load(),
        // None in the object: a program added of another type must be added here too.
        _ => Err(ProgramError::UnexpectedProgramType),
    }
}
