//! The events of every session: each gets the session's next `seq`, goes
//! at once to the clients following the session live, and is stored in
//! batches (through the store's group commit) for clients that come back.
//!
//! A client that subscribes from a `seq` gets the stored events after it,
//! then the recent ones still in memory, then the live feed, with no gap and
//! no duplicate: the in-memory ring keeps every event until it is stored,
//! and subscribing takes the ring's contents and the live receiver under
//! one lock, so nothing is published between the two.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc, oneshot};

use crate::store::{Store, StoreError, StoredEvent};

/// Events kept in memory per session once stored (more are kept while
/// their write is pending).
const RING: usize = 256;
/// Events a live follower may fall behind before it re-reads the store
/// (and the ring). The broadcast channel allocates every slot up front, per
/// session: 4,096 slots cost ~250 KB a session, 250 MB for 1,000 streams.
const LIVE_BUFFER: usize = 64;
/// Events written in one transaction at most.
const BATCH: usize = 512;

/// One event as it was sent.
pub type Event = Arc<StoredEvent>;

#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    feeds: tokio::sync::Mutex<HashMap<String, Arc<Feed>>>,
    writes: mpsc::UnboundedSender<Write>,
}

enum Write {
    Event(Arc<Feed>, Event),
    /// Answered once everything queued before it is stored.
    Flush(oneshot::Sender<()>),
}

/// One session's feed.
pub struct Feed {
    session: String,
    state: Mutex<FeedState>,
    live: broadcast::Sender<Event>,
}

struct FeedState {
    /// The seq the next event gets.
    next: u64,
    /// Recent events, oldest first; every event not yet stored is here.
    ring: VecDeque<Event>,
    /// The highest seq known to be stored.
    stored: u64,
}

/// Why a subscription cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("events up to seq {pruned} are no longer kept; read the session again and follow from its current state")]
    ResyncRequired { pruned: u64 },
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl Bus {
    /// A bus storing through `store`; its writer task runs on the current runtime.
    pub fn new(store: Store) -> Bus {
        let (writes, queue) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(store.clone(), queue));
        Bus { inner: Arc::new(Inner { store, feeds: Default::default(), writes }) }
    }

    /// The session's feed, created on first use from the store's last seq.
    pub async fn feed(&self, session: &str) -> Result<Arc<Feed>, StoreError> {
        if let Some(feed) = self.inner.feeds.lock().await.get(session) {
            return Ok(feed.clone());
        }
        // Read without the map's lock, so that one session's read does not
        // hold up every other session's feed; the first feed made wins.
        let last = self.inner.store.last_seq(session).await?;
        Ok(self.feed_or_new(session, last).await)
    }

    /// The session's feed, made from `last` (the store's last seq) when
    /// there is none yet.
    async fn feed_or_new(&self, session: &str, last: u64) -> Arc<Feed> {
        let mut feeds = self.inner.feeds.lock().await;
        let feed = feeds.entry(session.to_string()).or_insert_with(|| {
            Arc::new(Feed {
                session: session.to_string(),
                state: Mutex::new(FeedState { next: last + 1, ring: VecDeque::new(), stored: last }),
                live: broadcast::channel(LIVE_BUFFER).0,
            })
        });
        feed.clone()
    }

    /// [`Bus::fresh_feed`] with the store's last seq already read (by the
    /// run's own first read, so that its feed costs no read of its own).
    pub async fn fresh_feed_from(&self, session: &str, last: u64) -> Arc<Feed> {
        let feed = self.feed_or_new(session, last).await;
        if self.inner.store.is_shared() {
            catch_up(&feed, last);
        }
        feed
    }

    /// The session's feed to publish to. On a database several hosts
    /// share, its seq is made current from the store first: another host
    /// may have run the session since this host last did.
    pub async fn fresh_feed(&self, session: &str) -> Result<Arc<Feed>, StoreError> {
        if !self.inner.store.is_shared() {
            return self.feed(session).await;
        }
        let last = self.inner.store.last_seq(session).await?;
        Ok(self.fresh_feed_from(session, last).await)
    }

    /// Sessions this host has a feed for (whose followers another host's
    /// events would reach through [`Bus::ingest`]), and the seq each
    /// expects next.
    pub async fn followed(&self) -> Vec<(String, u64)> {
        let feeds = self.inner.feeds.lock().await;
        feeds
            .iter()
            .filter(|(_, feed)| feed.live.receiver_count() > 0)
            .map(|(session, feed)| (session.clone(), feed.state.lock().unwrap_or_else(|p| p.into_inner()).next))
            .collect()
    }

    /// Brings in the events another host stored for the session since this
    /// host's feed last saw one, and sends them to this host's followers,
    /// as if published here. Only for a session no run of this host is
    /// publishing to. Nothing happens without a feed (no one follows).
    pub async fn ingest(&self, session: &str) -> Result<(), StoreError> {
        let Some(feed) = self.inner.feeds.lock().await.get(session).cloned() else { return Ok(()) };
        let after = feed.state.lock().unwrap_or_else(|p| p.into_inner()).next - 1;
        let stored = self.inner.store.events(session, after, None, None).await?;
        let mut state = feed.state.lock().unwrap_or_else(|p| p.into_inner());
        // Two ingests may read the same rows: each event goes out once.
        for event in stored {
            if event.seq < state.next {
                continue;
            }
            let event = Arc::new(event);
            state.next = event.seq + 1;
            state.stored = event.seq;
            state.ring.push_back(event.clone());
            let _ = feed.live.send(event);
        }
        trim(&mut state);
        Ok(())
    }

    /// Gives the event the session's next seq, sends it to live followers
    /// and queues it for storage. Returns the event as sent.
    pub fn publish(&self, feed: &Arc<Feed>, run_id: &str, name: &str, data: String) -> Event {
        let mut state = feed.state.lock().unwrap_or_else(|p| p.into_inner());
        let event = Arc::new(StoredEvent { seq: state.next, run_id: run_id.to_string(), name: name.to_string(), data });
        state.next += 1;
        state.ring.push_back(event.clone());
        trim(&mut state);
        // No follower is not an error: the event is stored all the same.
        let _ = feed.live.send(event.clone());
        let _ = self.inner.writes.send(Write::Event(feed.clone(), event.clone()));
        event
    }

    /// Waits until every event published so far is stored.
    pub async fn flush(&self) {
        let (done, stored) = oneshot::channel();
        if self.inner.writes.send(Write::Flush(done)).is_ok() {
            let _ = stored.await;
        }
    }

    /// Events of the session after `after` (of one run, if given): the
    /// stored ones, then live ones as they come.
    pub async fn subscribe(&self, session: &str, after: u64, run: Option<&str>) -> Result<Subscription, SubscribeError> {
        let feed = self.feed(session).await?;
        let (recent, live, oldest_in_memory) = {
            let state = feed.state.lock().unwrap_or_else(|p| p.into_inner());
            let recent: Vec<Event> = state.ring.iter().filter(|e| e.seq > after).cloned().collect();
            let oldest = state.ring.front().map_or(state.next, |e| e.seq);
            (recent, feed.live.subscribe(), oldest)
        };
        let mut backlog: VecDeque<Event> = VecDeque::new();
        if after + 1 < oldest_in_memory {
            let stored = self.inner.store.events(session, after, Some(oldest_in_memory), run.map(str::to_string)).await?;
            backlog.extend(stored.into_iter().map(Arc::new));
        }
        // Retention removes the events of ended runs only: a run's own
        // events are there while it runs (an ended run's are checked by
        // the caller against its end). Checked after the read: a prune
        // deletes events and records it in one write, so a read it emptied
        // is always followed by a mark that says so; checked before, a
        // prune in between left a cursor with nothing and no resync.
        if run.is_none() {
            let pruned = self.inner.store.events_pruned(session).await?;
            if after < pruned {
                return Err(SubscribeError::ResyncRequired { pruned });
            }
        }
        backlog.extend(recent.into_iter().filter(|e| run.is_none_or(|r| e.run_id == r)));
        Ok(Subscription { bus: self.clone(), session: session.to_string(), run: run.map(str::to_string), last: after, backlog, live })
    }

    /// Forgets feeds nobody follows and whose events are all stored (their
    /// seq is in the store for the next `feed`).
    pub async fn sweep(&self) {
        let mut feeds = self.inner.feeds.lock().await;
        feeds.retain(|_, feed| {
            let state = feed.state.lock().unwrap_or_else(|p| p.into_inner());
            feed.live.receiver_count() > 0 || state.stored + 1 < state.next || Arc::strong_count(feed) > 1
        });
    }
}

/// Moves the feed's next seq past `last`, the store's: another host may
/// have run the session since this host last did.
fn catch_up(feed: &Feed, last: u64) {
    let mut state = feed.state.lock().unwrap_or_else(|p| p.into_inner());
    if last >= state.next {
        state.next = last + 1;
        state.stored = state.stored.max(last);
    }
}

/// Drops stored events from the front of the ring beyond its size.
fn trim(state: &mut FeedState) {
    while state.ring.len() > RING && state.ring.front().is_some_and(|e| e.seq <= state.stored) {
        state.ring.pop_front();
    }
}

/// Stores queued events in batches, in publication order.
async fn write_loop(store: Store, mut queue: mpsc::UnboundedReceiver<Write>) {
    while let Some(first) = queue.recv().await {
        let mut events: Vec<(Arc<Feed>, Event)> = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(write) = next.take() {
            match write {
                Write::Event(feed, event) => events.push((feed, event)),
                Write::Flush(done) => flushes.push(done),
            }
            if events.len() < BATCH {
                next = queue.try_recv().ok();
            }
        }
        if !events.is_empty() {
            let rows = events.iter().map(|(feed, e)| (feed.session.clone(), (**e).clone())).collect();
            if let Err(err) = store.insert_events(rows).await {
                // They stay in memory for live followers; a client that
                // comes back later misses them.
                tracing::error!(%err, events = events.len(), "cannot store events");
            }
            for (feed, event) in &events {
                let mut state = feed.state.lock().unwrap_or_else(|p| p.into_inner());
                state.stored = state.stored.max(event.seq);
                trim(&mut state);
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

/// A client's place in a session's events.
pub struct Subscription {
    bus: Bus,
    session: String,
    run: Option<String>,
    /// The last seq handed out.
    last: u64,
    backlog: VecDeque<Event>,
    live: broadcast::Receiver<Event>,
}

impl Subscription {
    /// The next event; `None` only if the feed is gone.
    pub async fn next(&mut self) -> Result<Event, SubscribeError> {
        loop {
            if let Some(event) = self.backlog.pop_front() {
                if event.seq > self.last {
                    self.last = event.seq;
                    return Ok(event);
                }
                continue;
            }
            match self.live.recv().await {
                Ok(event) if event.seq > self.last && self.run.as_deref().is_none_or(|r| r == event.run_id) => {
                    self.last = event.seq;
                    return Ok(event);
                }
                Ok(_) => continue,
                // Fell behind the live buffer: read what was missed again.
                Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => {
                    let again = self.bus.subscribe(&self.session, self.last, self.run.as_deref()).await?;
                    *self = again;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Session, now};

    async fn store_with_session(dir: &std::path::Path) -> Store {
        let store = Store::open(&dir.join("hangar.db")).unwrap();
        let t = now();
        store.insert_session(Session { id: "s".into(), work_dir: None, history: Vec::new(), created_at: t, updated_at: t, tenant_id: "default".into() }).await.unwrap();
        store
    }

    /// A follower far behind the live buffer (and the ring) re-reads what
    /// it missed from the store: every event once, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lagging_follower_gets_every_event_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let bus = Bus::new(store_with_session(dir.path()).await);
        let feed = bus.feed("s").await.unwrap();
        let mut follower = bus.subscribe("s", 0, None).await.unwrap();
        let total = (LIVE_BUFFER + RING) as u64 * 3;
        for i in 0..total {
            bus.publish(&feed, "r1", "text", format!("{{\"n\":{i}}}"));
        }
        bus.flush().await;
        for expected in 1..=total {
            let event = follower.next().await.unwrap();
            assert_eq!(event.seq, expected);
            assert_eq!(event.data, format!("{{\"n\":{}}}", expected - 1));
        }
        // A late subscriber from the middle, and one of a single run.
        let mut late = bus.subscribe("s", total - 5, Some("r1")).await.unwrap();
        assert_eq!(late.next().await.unwrap().seq, total - 4);
        // A new feed for the session (after a restart) continues the seq.
        let again = Bus::new(Store::open(&dir.path().join("hangar.db")).unwrap());
        let feed = again.feed("s").await.unwrap();
        assert_eq!(again.publish(&feed, "r2", "text", "{}".into()).seq, total + 1);
    }
}
