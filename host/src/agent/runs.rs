//! Which run each session is running, which wait their turn, and how each
//! is cancelled: at most one active run per session.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

#[derive(Clone, Default)]
pub struct Runs(Arc<Mutex<HashMap<String, SessionRuns>>>);

#[derive(Default)]
struct SessionRuns {
    active: Option<Active>,
    /// Runs waiting for the active one to end, in order.
    queue: VecDeque<String>,
}

struct Active {
    run_id: String,
    cancel: watch::Sender<bool>,
}

/// What to do with a run for a session that is busy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Busy {
    /// Refuse it (409).
    #[default]
    Reject,
    /// Start it when the active run (and those queued before) have ended.
    Enqueue,
    /// Cancel the active run, then start it.
    Interrupt,
}

/// The right to run: the run's cancel signal.
pub struct Claim {
    pub run_id: String,
    pub cancel: watch::Receiver<bool>,
}

/// What a cancel found.
#[derive(Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// The active run was told to stop.
    Active,
    /// A queued run was taken off the queue (it never started).
    Queued,
    /// Not running here (ended already, or unknown).
    NotRunning,
}

impl Runs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionRuns>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `run_id` the session's active run, or says which run is.
    pub fn try_claim(&self, session: &str, run_id: &str) -> Result<Claim, String> {
        let mut map = self.lock();
        let entry = map.entry(session.to_string()).or_default();
        if let Some(active) = &entry.active {
            return Err(active.run_id.clone());
        }
        Ok(activate(entry, run_id))
    }

    /// In one step: claims the session for `run_id` when it is idle, or
    /// else, as `busy` says, refuses (the active run's id), queues it
    /// behind the active run, or queues it first and cancels the active
    /// run. Nothing can end in between, so a queued run is never stranded.
    pub fn claim_or(&self, session: &str, run_id: &str, busy: Busy) -> Result<Option<Claim>, String> {
        let mut map = self.lock();
        let entry = map.entry(session.to_string()).or_default();
        let Some(active) = &entry.active else { return Ok(Some(activate(entry, run_id))) };
        match busy {
            Busy::Reject => Err(active.run_id.clone()),
            Busy::Enqueue => {
                entry.queue.push_back(run_id.to_string());
                Ok(None)
            }
            Busy::Interrupt => {
                active.cancel.send_replace(true);
                entry.queue.push_front(run_id.to_string());
                Ok(None)
            }
        }
    }

    /// Cancels a run of the session: the active one is told to stop, a
    /// queued one is dropped from the queue.
    pub fn cancel(&self, session: &str, run_id: &str) -> Cancelled {
        let mut map = self.lock();
        let Some(entry) = map.get_mut(session) else { return Cancelled::NotRunning };
        if let Some(active) = entry.active.as_ref().filter(|a| a.run_id == run_id) {
            active.cancel.send_replace(true);
            return Cancelled::Active;
        }
        match entry.queue.iter().position(|r| r == run_id) {
            Some(i) => {
                entry.queue.remove(i);
                Cancelled::Queued
            }
            None => Cancelled::NotRunning,
        }
    }

    /// Cancels the session's active run and drops its queue (its tenant is
    /// being deleted); whether it had any.
    pub fn cancel_all(&self, session: &str) -> bool {
        let mut map = self.lock();
        let Some(entry) = map.get_mut(session) else { return false };
        entry.queue.clear();
        if let Some(active) = &entry.active {
            active.cancel.send_replace(true);
        }
        true
    }

    /// The session's active run, if any.
    pub fn active(&self, session: &str) -> Option<String> {
        self.lock().get(session).and_then(|e| e.active.as_ref().map(|a| a.run_id.clone()))
    }

    /// Ends the session's active run `run_id` and makes the next queued run
    /// active, returning its claim.
    pub fn finish(&self, session: &str, run_id: &str) -> Option<Claim> {
        let mut map = self.lock();
        let entry = map.get_mut(session)?;
        if entry.active.as_ref().is_some_and(|a| a.run_id == run_id) {
            entry.active = None;
        }
        let next = match (&entry.active, entry.queue.pop_front()) {
            (None, Some(next)) => Some(activate(entry, &next)),
            (_, Some(next)) => {
                entry.queue.push_front(next);
                None
            }
            (_, None) => None,
        };
        if entry.active.is_none() && entry.queue.is_empty() {
            map.remove(session);
        }
        next
    }

    pub fn is_busy(&self, session: &str) -> bool {
        self.lock().get(session).is_some_and(|e| e.active.is_some() || !e.queue.is_empty())
    }

    /// The active runs: (session, run).
    pub fn active_runs(&self) -> Vec<(String, String)> {
        self.lock().iter().filter_map(|(session, e)| e.active.as_ref().map(|a| (session.clone(), a.run_id.clone()))).collect()
    }

    /// Runs active now, over all sessions.
    pub fn count(&self) -> usize {
        self.lock().values().filter(|e| e.active.is_some()).count()
    }
}

fn activate(entry: &mut SessionRuns, run_id: &str) -> Claim {
    let (cancel, receiver) = watch::channel(false);
    entry.active = Some(Active { run_id: run_id.to_string(), cancel });
    Claim { run_id: run_id.to_string(), cancel: receiver }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_active_run_per_session_and_the_queue_in_order() {
        let runs = Runs::default();
        let first = runs.try_claim("s", "r1").unwrap();
        assert_eq!(runs.try_claim("s", "r2").err().as_deref(), Some("r1"));
        assert!(runs.claim_or("s", "r2", Busy::Enqueue).unwrap().is_none());
        assert!(runs.claim_or("s", "r3", Busy::Enqueue).unwrap().is_none());
        assert!(runs.claim_or("s", "r0", Busy::Interrupt).unwrap().is_none());
        assert_eq!(runs.claim_or("s", "r9", Busy::Reject).err().as_deref(), Some("r1"));
        assert_eq!(runs.cancel("s", "r3"), Cancelled::Queued);
        assert_eq!(runs.cancel("s", "r1"), Cancelled::Active);
        assert!(*first.cancel.borrow());
        assert_eq!(runs.finish("s", "r1").unwrap().run_id, "r0");
        assert_eq!(runs.finish("s", "r0").unwrap().run_id, "r2");
        assert!(runs.finish("s", "r2").is_none());
        assert!(!runs.is_busy("s"));
        assert_eq!(runs.cancel("s", "r2"), Cancelled::NotRunning);
    }
}
