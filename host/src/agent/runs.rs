//! Which sessions are running a message: at most one run per session.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Runs(Arc<Mutex<HashSet<String>>>);

/// Marks a session busy until dropped.
pub struct RunGuard {
    runs: Runs,
    session: String,
}

impl Runs {
    /// Marks the session busy, or `None` if it already is.
    pub fn try_start(&self, session: &str) -> Option<RunGuard> {
        let mut set = self.0.lock().unwrap();
        set.insert(session.to_string()).then(|| RunGuard { runs: self.clone(), session: session.to_string() })
    }

    pub fn is_busy(&self, session: &str) -> bool {
        self.0.lock().unwrap().contains(session)
    }

    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.runs.0.lock().unwrap().remove(&self.session);
    }
}
