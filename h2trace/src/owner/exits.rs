//! `--pid`: which followed processes have exited. Read from /proc once a second: a zombie
//! counts as exited (its sockets are closed by then), and a pid taken by a new process is told
//! apart by its start time.
use std::collections::{HashMap, HashSet};

#[derive(Default)]
pub struct Exits {
    /// Start time (clock ticks after boot) of each followed process when first seen.
    started: HashMap<u32, u64>,
    exited: HashSet<u32>,
}

/// The start time of `pid` while it runs; `None` once it has exited (or is a zombie).
fn start_time(pid: u32) -> Option<u64> {
    let stat = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    (!matches!(stat.state, 'Z' | 'X')).then_some(stat.starttime)
}

impl Exits {
    /// The followed processes that have exited since the last call.
    pub fn poll(&mut self, followed: &HashSet<u32>) -> Vec<u32> {
        let mut now_gone: Vec<u32> = followed
            .iter()
            .copied()
            .filter(|pid| !self.exited.contains(pid))
            .filter(|&pid| match start_time(pid) {
                Some(t) => *self.started.entry(pid).or_insert(t) != t,
                None => true,
            })
            .collect();
        now_gone.sort_unstable();
        self.exited.extend(&now_gone);
        now_gone
    }

    /// Every followed process has exited.
    pub fn all(&self, followed: &HashSet<u32>) -> bool {
        followed.iter().all(|p| self.exited.contains(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_followed_until_it_is_reaped_or_a_zombie() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let me = std::process::id();
        let followed: HashSet<u32> = [pid, me].into();
        let mut exits = Exits::default();
        assert!(exits.poll(&followed).is_empty());
        assert!(!exits.all(&followed));
        child.kill().unwrap();
        // Killed and not yet reaped: a zombie has exited.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut gone = Vec::new();
        while gone.is_empty() && std::time::Instant::now() < deadline {
            gone = exits.poll(&followed);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(gone, [pid]);
        // Said once; this process still runs.
        assert!(exits.poll(&followed).is_empty());
        assert!(!exits.all(&followed));
        child.wait().unwrap();
        assert!(exits.all(&[pid].into()));
    }
}
