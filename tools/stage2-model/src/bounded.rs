//! An exhaustive search of every schedule with at most `bound` preemptions (iterative context
//! bounding, as in Microsoft's CHESS), as a shuttle scheduler.
//!
//! A preemption is switching away from a thread that could have gone on; switching when the
//! running thread blocks (waits for an acknowledgement, for a release, or ends) is free. The
//! full depth-first search of the small configuration does not finish in hours (every lock is
//! a scheduling point of four threads); bounding preemptions makes it finish in seconds while
//! still covering every interleaving the order has to survive: the races here need two
//! preemptions (one to let a vCPU fill its TLB before the zap, one to stop it before its next
//! instruction), and the suite searches every schedule with up to three.

use shuttle::scheduler::{Schedule, Scheduler, Task, TaskId};

struct Level {
    options: Vec<TaskId>,
    chosen: usize,
}

pub struct PreemptionBounded {
    bound: usize,
    levels: Vec<Level>,
    step: usize,
    preemptions: usize,
    executions: usize,
}

impl PreemptionBounded {
    pub fn new(bound: usize) -> Self {
        Self {
            bound,
            levels: Vec::new(),
            step: 0,
            preemptions: 0,
            executions: 0,
        }
    }
}

impl Scheduler for PreemptionBounded {
    fn new_execution(&mut self) -> Option<Schedule> {
        if self.executions > 0 {
            // Backtrack: the deepest choice that still has an untried option.
            while self
                .levels
                .last()
                .is_some_and(|l| l.chosen + 1 >= l.options.len())
            {
                self.levels.pop();
            }
            self.levels.last_mut()?.chosen += 1;
        }
        self.executions += 1;
        self.step = 0;
        self.preemptions = 0;
        Some(Schedule::new(0))
    }

    fn next_task(
        &mut self,
        runnable: &[&Task],
        current: Option<TaskId>,
        _is_yielding: bool,
    ) -> Option<TaskId> {
        let cur = current.filter(|c| runnable.iter().any(|t| t.id() == *c));
        if self.step == self.levels.len() {
            let options = match cur {
                Some(c) if self.preemptions >= self.bound => vec![c],
                Some(c) => std::iter::once(c)
                    .chain(runnable.iter().map(|t| t.id()).filter(|&t| t != c))
                    .collect(),
                None => runnable.iter().map(|t| t.id()).collect(),
            };
            self.levels.push(Level { options, chosen: 0 });
        }
        let level = &self.levels[self.step];
        let next = level.options[level.chosen];
        if cur.is_some_and(|c| c != next) {
            self.preemptions += 1;
        }
        self.step += 1;
        Some(next)
    }

    fn next_u64(&mut self) -> u64 {
        panic!("the exhaustive search explores fixed workloads: no random data");
    }
}
