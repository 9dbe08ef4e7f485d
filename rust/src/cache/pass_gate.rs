//! [`PassGate`]: the model's forward passes, one at a time.
//!
//! While a pass runs, it alone holds slots of the cache. So when an
//! outermost pass starts, any slot still pinned was stranded by a pass that
//! an exception cut short, and can be released; and threads sharing one
//! model take turns instead of competing for its slots. The bookkeeping is
//! here rather than in a Python lock because a Python exception (a Ctrl-C)
//! can land between any two bytecodes, also between taking a lock and the
//! `try` that would give it back: a turn taken here ends when the Rust call
//! that took it returns, whatever the Python code inside it did.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::Duration;

#[derive(Default)]
pub struct PassGate {
    passes: Mutex<Passes>,
    ended: Condvar,
}

/// The thread whose pass runs, and how deeply its passes are nested (an
/// encoder's forward inside the model's, a forward inside `generate`).
#[derive(Default)]
struct Passes {
    owner: Option<ThreadId>,
    depth: usize,
}

/// A thread's turn at the model; dropping it ends that (possibly nested) pass.
pub struct Turn<'a> {
    gate: &'a PassGate,
    outermost: bool,
}

impl PassGate {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Passes> {
        // The counts are updated in single statements: a poisoned lock still
        // guards consistent ones.
        self.passes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The calling thread's turn: at once when no pass runs or the thread is
    /// inside a pass of its own (a nested pass), else once the running pass
    /// ends, if it ends within `patience`; `None` if it does not.
    pub fn enter(&self, patience: Duration) -> Option<Turn<'_>> {
        let me = std::thread::current().id();
        let someone_else = |p: &mut Passes| p.owner.is_some_and(|owner| owner != me);
        let (mut passes, _) = self
            .ended
            .wait_timeout_while(self.lock(), patience, someone_else)
            .unwrap_or_else(|e| e.into_inner());
        if someone_else(&mut passes) {
            return None;
        }
        passes.owner = Some(me);
        passes.depth += 1;
        Some(Turn {
            gate: self,
            outermost: passes.depth == 1,
        })
    }
}

impl Turn<'_> {
    /// Whether this pass is not nested in another of the same thread.
    pub fn is_outermost(&self) -> bool {
        self.outermost
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut passes = self.gate.lock();
        passes.depth -= 1;
        if passes.depth == 0 {
            passes.owner = None;
            drop(passes);
            self.gate.ended.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn passes_nest_on_one_thread_and_exclude_other_threads() {
        let gate = Arc::new(PassGate::new());
        let outer = gate.enter(Duration::ZERO).unwrap();
        let inner = gate.enter(Duration::ZERO).unwrap();
        assert!(outer.is_outermost() && !inner.is_outermost());
        let other = {
            let gate = Arc::clone(&gate);
            move || gate.enter(Duration::ZERO).map(|t| t.is_outermost())
        };
        assert_eq!(thread::spawn(other.clone()).join().unwrap(), None);
        drop(inner);
        assert_eq!(thread::spawn(other.clone()).join().unwrap(), None);
        drop(outer);
        assert_eq!(thread::spawn(other).join().unwrap(), Some(true));
        assert!(gate.enter(Duration::ZERO).unwrap().is_outermost());
    }

    #[test]
    fn a_waiting_thread_gets_its_turn_when_the_pass_ends() {
        let gate = Arc::new(PassGate::new());
        let turn = gate.enter(Duration::ZERO).unwrap();
        let waiter = {
            let gate = Arc::clone(&gate);
            thread::spawn(move || gate.enter(Duration::from_secs(600)).is_some())
        };
        drop(turn);
        assert!(waiter.join().unwrap());
    }
}
