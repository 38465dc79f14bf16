//! Stores and hit hints off the caller's path: a background thread with its
//! own connection sends them in batches.

use crate::protocol::StoreItem;
use crate::{Client, ClientConfig};
use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use std::collections::HashMap;
use std::time::Duration;

/// Most revisions sent in one `Store` request.
pub const MAX_BATCH: usize = 256;

enum Msg {
    Store(String, StoreItem),
    Touch(String, Vec<(u64, u64)>),
    Barrier(Sender<()>),
}

/// A bounded queue of stores drained by a background thread.
///
/// Stores are optional (a revision not cached is a later miss), so a full
/// queue or an unavailable sidecar drops them rather than blocking.
pub struct StoreQueue {
    tx: Sender<Msg>,
}

impl StoreQueue {
    /// Starts the sender thread with its own [`Client`] for `config`; the
    /// queue holds at most `capacity` revisions.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn start(config: ClientConfig, capacity: usize) -> std::io::Result<Self> {
        let (tx, rx) = bounded(capacity);
        let mut config = config;
        // Batches are larger than single calls: give them more time.
        config.timeout = config.timeout.max(Duration::from_millis(500));
        std::thread::Builder::new()
            .name("tidecache-stores".into())
            .spawn(move || drain(Client::new(config), rx))?;
        Ok(StoreQueue { tx })
    }

    /// Queues one store; returns `false` if the queue was full and the store
    /// was dropped.
    pub fn push(&self, db: &str, item: StoreItem) -> bool {
        match self.tx.try_send(Msg::Store(db.to_owned(), item)) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    /// Queues hit hints: revisions `(oid, serial)` of `db` were read.
    /// Dropped if the queue is full. Send them in batches: each message may
    /// wake the sender thread (a system call).
    pub fn touch(&self, db: &str, revisions: Vec<(u64, u64)>) {
        let _ = self.tx.try_send(Msg::Touch(db.to_owned(), revisions));
    }

    /// Waits until everything queued before this call was sent (or dropped),
    /// at most `timeout`. Returns whether it finished in time.
    pub fn barrier(&self, timeout: Duration) -> bool {
        let (tx, rx) = bounded(1);
        if self.tx.send_timeout(Msg::Barrier(tx), timeout).is_err() {
            return false;
        }
        rx.recv_timeout(timeout).is_ok()
    }
}

fn drain(client: Client, rx: Receiver<Msg>) {
    while let Ok(first) = rx.recv() {
        let mut batch: HashMap<String, Vec<StoreItem>> = HashMap::new();
        let mut touches: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
        let mut barriers = Vec::new();
        let mut n = 0;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Store(db, item) => {
                    batch.entry(db).or_default().push(item);
                    n += 1;
                }
                Msg::Touch(db, revisions) => {
                    touches.entry(db).or_default().extend(revisions);
                    n += 1;
                }
                Msg::Barrier(done) => barriers.push(done),
            }
            if n < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        for (db, items) in batch {
            if let Err(e) = client.store(&db, items) {
                tracing::debug!(error = %e, "stores dropped");
            }
        }
        for (db, revisions) in touches {
            if let Err(e) = client.touch(&db, revisions) {
                tracing::debug!(error = %e, "hit hints dropped");
            }
        }
        for done in barriers {
            let _ = done.send(());
        }
    }
}
