//! Tool calls waiting for a person: each permission request of this
//! process has a waiter, woken by the reply endpoint once the answer is
//! stored. The store is the truth; the wake-up only saves a poll.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::store::PermissionRequest;

#[derive(Clone, Default)]
pub struct Approvals(Arc<Mutex<HashMap<String, oneshot::Sender<PermissionRequest>>>>);

impl Approvals {
    /// Registers a waiter for request `id` (before the request is stored,
    /// so no answer can slip past it).
    pub fn wait(&self, id: &str) -> oneshot::Receiver<PermissionRequest> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id.to_string(), tx);
        rx
    }

    /// Hands a stored answer to its waiter, if it is still waiting.
    pub fn deliver(&self, answered: PermissionRequest) {
        if let Some(tx) = self.lock().remove(&answered.id) {
            let _ = tx.send(answered);
        }
    }

    /// Whether a run of this host waits for request `id`.
    pub fn is_waiting(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<PermissionRequest>>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
