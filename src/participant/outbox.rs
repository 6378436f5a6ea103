//! The queue between a connection driver and its WebSocket writer, bounded in messages and
//! bytes. The driver never waits on it: a client that does not read what it is sent fills
//! the queue, and a full queue means a slow reader, which is disconnected (close code 4010,
//! leave reason `slow_reader`). Before this, the driver awaited a bounded channel, so one
//! client that stopped reading froze its driver: no join timeout, no dead-connection timeout,
//! no pings, and the member stayed in its room forever.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{Notify, broadcast, mpsc};

use super::WsOut;
use crate::metrics::Metrics;
use crate::signaling::protocol::close_code;

/// State both ends see.
struct Shared {
    /// Bytes of text waiting in the queue (not yet taken by the writer).
    queued: AtomicUsize,
    max_bytes: usize,
    /// The connection was found to be a slow reader (full queue, or a write timed out).
    slow: AtomicBool,
    /// Driver -> writer: drop what is queued and close now.
    abort: Notify,
    /// Writer -> driver: a write timed out, the writer is gone.
    stalled: Notify,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn take_bytes(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
        self.metrics
            .ws_outbox_bytes
            .fetch_sub(n as u64, Ordering::Relaxed);
    }
}

/// The driver's end.
pub struct Outbox {
    tx: mpsc::Sender<WsOut>,
    shared: Arc<Shared>,
}

/// The writer's end. After the join it also reads the room's feed (`WsOut::Follow`): the
/// messages for everyone, which a writer that falls [`crate::room::FEED_CAPACITY`] batches
/// behind is cut off for, like a full queue.
pub struct OutboxRx {
    rx: mpsc::Receiver<WsOut>,
    shared: Arc<Shared>,
    feed: Option<crate::room::Feed>,
    /// The feed's batch being sent, and how many of its lines went.
    batch: Option<(crate::room::FeedItem, usize)>,
}

/// What the writer should do next.
#[derive(Debug)]
pub enum Next {
    Send(WsOut),
    /// The driver gave up on this client: close with this code, skipping what is queued.
    Abort(u16),
    /// The driver ended and everything queued was taken.
    End,
}

/// A queue of at most `messages` messages and `bytes` bytes of text. One message larger than
/// `bytes` is still accepted into an empty queue (a big join result is not a slow reader).
pub fn outbox(messages: usize, bytes: usize, metrics: Arc<Metrics>) -> (Outbox, OutboxRx) {
    let (tx, rx) = mpsc::channel(messages.max(1));
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        max_bytes: bytes,
        slow: AtomicBool::new(false),
        abort: Notify::new(),
        stalled: Notify::new(),
        metrics,
    });
    (
        Outbox {
            tx,
            shared: shared.clone(),
        },
        OutboxRx {
            rx,
            shared,
            feed: None,
            batch: None,
        },
    )
}

fn len_of(m: &WsOut) -> usize {
    match m {
        WsOut::Text(t) => t.len(),
        // Not held by this queue (the room's feed holds it).
        WsOut::Shared(_) | WsOut::Follow(_) => 0,
        WsOut::Ping => 0,
        WsOut::Close(_, r) => r.len(),
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

impl Outbox {
    /// Queue `m` without waiting. If the queue is full (messages or bytes) the client is a
    /// slow reader: the connection is marked, the writer told to close with 4010, and `m`
    /// dropped. Returns whether `m` was queued.
    pub fn push(&self, m: WsOut) -> bool {
        let s = &self.shared;
        if s.slow.load(Ordering::Relaxed) {
            return false;
        }
        let len = len_of(&m);
        let queued = s.queued.fetch_add(len, Ordering::Relaxed);
        if queued > 0 && queued + len > s.max_bytes {
            s.queued.fetch_sub(len, Ordering::Relaxed);
            self.overflow("bytes");
            return false;
        }
        s.metrics
            .ws_outbox_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        match self.tx.try_send(m) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                s.take_bytes(len);
                self.overflow("messages");
                false
            }
            // The writer is gone (the socket failed); the driver learns it from the socket.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                s.take_bytes(len);
                false
            }
        }
    }

    fn overflow(&self, what: &str) {
        let s = &self.shared;
        if !s.slow.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                queued_bytes = s.queued.load(Ordering::Relaxed),
                limit = what,
                "websocket client does not read: outgoing queue full; disconnecting (slow reader)"
            );
            bump(&s.metrics.ws_slow_readers);
            s.abort.notify_one();
        }
    }

    /// Whether this connection was found to be a slow reader (either end).
    pub fn is_slow(&self) -> bool {
        self.shared.slow.load(Ordering::Relaxed)
    }

    /// Resolves when the writer gave up because a write timed out.
    pub async fn stalled(&self) {
        self.shared.stalled.notified().await
    }

    /// Bytes queued and not yet taken by the writer.
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }
}

impl OutboxRx {
    /// The next thing to do; an abort goes before anything still queued, the connection's
    /// own messages before the room's feed.
    pub async fn next(&mut self) -> Next {
        loop {
            if self.shared.slow.load(Ordering::Relaxed) {
                return Next::Abort(close_code::SLOW_READER);
            }
            if let Some(line) = self.batch_line() {
                return Next::Send(WsOut::Shared(line));
            }
            let feed = async {
                match self.feed.as_mut() {
                    Some(f) => f.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.shared.abort.notified() => return Next::Abort(close_code::SLOW_READER),
                m = self.rx.recv() => match m {
                    Some(WsOut::Follow(f)) => self.feed = Some(f),
                    Some(m) => {
                        self.shared.take_bytes(len_of(&m));
                        return Next::Send(m);
                    }
                    None => return Next::End,
                },
                r = feed => match r {
                    Ok(b) => self.batch = Some((b, 0)),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        self.fell_behind(n);
                        return Next::Abort(close_code::SLOW_READER);
                    }
                    // The room is gone.
                    Err(broadcast::error::RecvError::Closed) => self.feed = None,
                },
            }
        }
    }

    /// What is queued right now, without waiting (`None`: nothing, or the client is being
    /// cut off). The writer sends it in the same flush as the message before.
    pub fn try_next(&mut self) -> Option<WsOut> {
        loop {
            if self.shared.slow.load(Ordering::Relaxed) {
                return None;
            }
            match self.rx.try_recv() {
                Ok(WsOut::Follow(f)) => {
                    self.feed = Some(f);
                    continue;
                }
                Ok(m) => {
                    self.shared.take_bytes(len_of(&m));
                    return Some(m);
                }
                Err(_) => {}
            }
            if let Some(line) = self.batch_line() {
                return Some(WsOut::Shared(line));
            }
            return match self.feed.as_mut()?.try_recv() {
                Ok(b) => {
                    self.batch = Some((b, 0));
                    continue;
                }
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    // The next `next` aborts.
                    self.fell_behind(n);
                    None
                }
                Err(_) => None,
            };
        }
    }

    /// The next line of the feed's batch being sent.
    fn batch_line(&mut self) -> Option<bytes::Bytes> {
        let (b, i) = self.batch.as_mut()?;
        let line = b.get(*i).cloned();
        *i += 1;
        if *i >= b.len() {
            self.batch = None;
        }
        line
    }

    /// The client read so slowly that the room's feed moved on without it.
    fn fell_behind(&self, missed: u64) {
        let s = &self.shared;
        if !s.slow.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                missed,
                "websocket client does not read: behind the room's feed; disconnecting (slow reader)"
            );
            bump(&s.metrics.ws_slow_readers);
            // The driver leaves the room (it watches for a stalled writer).
            s.stalled.notify_one();
        }
    }

    /// Resolves when the driver gave up on this client (to cut a write in progress short).
    pub async fn aborted(&self) {
        if !self.shared.slow.load(Ordering::Relaxed) {
            self.shared.abort.notified().await
        }
    }

    /// A write did not finish within the write timeout: mark the connection slow and wake
    /// the driver so it leaves the room.
    pub fn stalled(&self) {
        let s = &self.shared;
        if !s.slow.swap(true, Ordering::Relaxed) {
            bump(&s.metrics.ws_slow_readers);
        }
        s.stalled.notify_one();
    }
}

impl Drop for OutboxRx {
    /// Whatever is still queued is freed with the channel: take it off the gauge.
    fn drop(&mut self) {
        let n = self.shared.queued.swap(0, Ordering::Relaxed);
        self.shared
            .metrics
            .ws_outbox_bytes
            .fetch_sub(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_queue_marks_a_slow_reader_and_aborts_the_writer() {
        let m = Arc::new(Metrics::default());
        let (tx, mut rx) = outbox(4, 100, m.clone());
        // One big message fits an empty queue.
        assert!(tx.push(WsOut::Text("x".repeat(500))));
        // Over the byte limit now.
        assert!(!tx.push(WsOut::Text("y".into())));
        assert!(tx.is_slow());
        assert!(matches!(
            rx.next().await,
            Next::Abort(close_code::SLOW_READER)
        ));
        assert_eq!(m.ws_slow_readers.load(Ordering::Relaxed), 1);
        drop(rx);
        assert_eq!(m.ws_outbox_bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn message_count_is_bounded_and_order_kept() {
        let m = Arc::new(Metrics::default());
        let (tx, mut rx) = outbox(2, 1 << 20, m.clone());
        assert!(tx.push(WsOut::Text("a".into())));
        assert!(tx.push(WsOut::Ping));
        assert!(!tx.push(WsOut::Text("b".into())));
        assert!(tx.is_slow());
        assert!(matches!(rx.next().await, Next::Abort(_)));
        let (tx, mut rx) = outbox(8, 1 << 20, m.clone());
        tx.push(WsOut::Text("a".into()));
        tx.push(WsOut::Text("b".into()));
        assert_eq!(tx.queued_bytes(), 2);
        assert!(matches!(rx.next().await, Next::Send(WsOut::Text(t)) if t == "a"));
        assert_eq!(tx.queued_bytes(), 1);
        drop(tx);
        assert!(matches!(rx.next().await, Next::Send(WsOut::Text(t)) if t == "b"));
        assert!(matches!(rx.next().await, Next::End));
    }

    #[tokio::test]
    async fn the_room_feed_follows_the_join_and_a_writer_far_behind_is_cut_off() {
        let m = Arc::new(Metrics::default());
        let (tx, mut rx) = outbox(8, 1 << 20, m.clone());
        let (feed, _) = broadcast::channel::<crate::room::FeedItem>(4);
        let item = |lines: &[&str]| -> crate::room::FeedItem {
            lines
                .iter()
                .map(|l| bytes::Bytes::from(l.to_string()))
                .collect()
        };
        // Posted before this member follows: not for it.
        let _ = feed.send(item(&["before"]));
        tx.push(WsOut::Text("join result".into()));
        tx.push(WsOut::Follow(feed.subscribe()));
        let _ = feed.send(item(&["chat", "like"]));
        let _ = feed.send(item(&["count"]));
        assert!(matches!(rx.next().await, Next::Send(WsOut::Text(t)) if t == "join result"));
        // A batch's lines in order, then the next batch, with or without waiting.
        assert!(matches!(rx.next().await, Next::Send(WsOut::Shared(b)) if b == "chat"));
        assert!(matches!(rx.try_next(), Some(WsOut::Shared(b)) if b == "like"));
        assert!(matches!(rx.try_next(), Some(WsOut::Shared(b)) if b == "count"));
        assert!(rx.try_next().is_none());
        // More than the feed holds, unread: a slow reader.
        for i in 0..6 {
            let _ = feed.send(item(&[&format!("line {i}")]));
        }
        assert!(matches!(
            rx.next().await,
            Next::Abort(close_code::SLOW_READER)
        ));
        assert!(tx.is_slow());
        assert_eq!(m.ws_slow_readers.load(Ordering::Relaxed), 1);
    }
}
