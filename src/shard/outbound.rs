//! A connection's queue of encoded frames, from the shard's tasks to the
//! transport's writer.
//!
//! Single-threaded (everything that touches a connection runs on its shard),
//! bounded, and holding no allocation while empty, so an idle connection costs
//! only the handle. A tokio `mpsc` channel would allocate a block of slots up front
//! for every connection.

use super::Closed;
use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use tokio::sync::Notify;

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue is at capacity: the peer is not reading fast enough.
    Full,
    /// The connection is closing.
    Closed,
}

/// A handle on one connection's queue; clones share it.
#[derive(Debug, Clone)]
pub struct Outbound(Rc<Queue>);

#[derive(Debug)]
struct Queue {
    frames: RefCell<VecDeque<Bytes>>,
    capacity: usize,
    closed: Cell<bool>,
    /// Why the connection ended, once it has: transports turn it into a close code.
    ended: Cell<Option<Closed>>,
    /// Wakes the writer when a frame arrives or the queue closes.
    filled: Notify,
    /// Wakes a sender waiting for room.
    drained: Notify,
}

impl Outbound {
    pub fn new(capacity: usize) -> Self {
        Self(Rc::new(Queue {
            frames: RefCell::new(VecDeque::new()),
            capacity,
            closed: Cell::new(false),
            ended: Cell::new(None),
            filled: Notify::new(),
            drained: Notify::new(),
        }))
    }

    /// Queues a frame if there is room.
    pub fn try_send(&self, frame: Bytes) -> Result<(), Refused> {
        if self.0.closed.get() {
            return Err(Refused::Closed);
        }
        let mut frames = self.0.frames.borrow_mut();
        if frames.len() >= self.0.capacity {
            return Err(Refused::Full);
        }
        frames.push_back(frame);
        self.0.filled.notify_one();
        Ok(())
    }

    /// Queues a frame, waiting for room.
    pub async fn send(&self, frame: Bytes) -> Result<(), Refused> {
        loop {
            let drained = self.0.drained.notified();
            match self.try_send(frame.clone()) {
                Err(Refused::Full) => drained.await,
                done => return done,
            }
        }
    }

    /// Waits until a frame fits (or the queue closes). On the shard's single
    /// thread, nothing else queues until the waiter's next `await`, so a
    /// `try_send` right after it succeeds.
    pub async fn room(&self) -> Result<(), Refused> {
        self.drained_to(self.0.capacity.saturating_sub(1)).await
    }

    /// Waits until at most `frames` are queued (or the queue closes).
    pub async fn drained_to(&self, frames: usize) -> Result<(), Refused> {
        loop {
            let drained = self.0.drained.notified();
            if self.0.closed.get() {
                return Err(Refused::Closed);
            }
            if self.0.frames.borrow().len() <= frames {
                return Ok(());
            }
            drained.await;
        }
    }

    /// How many frames the queue takes.
    pub fn capacity(&self) -> usize {
        self.0.capacity
    }

    /// Frames queued now.
    pub fn queued(&self) -> usize {
        self.0.frames.borrow().len()
    }

    /// The next frame; `None` once the queue is closed and empty.
    pub async fn recv(&self) -> Option<Bytes> {
        loop {
            let filled = self.0.filled.notified();
            if let Some(frame) = self.try_recv() {
                return Some(frame);
            }
            if self.0.closed.get() {
                return None;
            }
            filled.await;
        }
    }

    /// The next frame if one is queued.
    pub fn try_recv(&self) -> Option<Bytes> {
        let mut frames = self.0.frames.borrow_mut();
        let frame = frames.pop_front()?;
        if frames.is_empty() {
            // Idle connections hold no buffer.
            *frames = VecDeque::new();
        }
        self.0.drained.notify_one();
        Some(frame)
    }

    /// No more frames will be queued; the writer drains what is there, then ends.
    pub fn close(&self) {
        self.0.closed.set(true);
        self.0.filled.notify_one();
        self.0.drained.notify_waiters();
    }

    /// The connection ended: records why, then closes the queue.
    pub fn end(&self, why: Closed) {
        self.0.ended.set(Some(why));
        self.close();
    }

    /// Why the connection ended; `None` while it runs or if only the writer failed.
    pub fn ended(&self) -> Option<Closed> {
        self.0.ended.get()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_flow_in_order_within_capacity_and_close_drains() {
        let queue = Outbound::new(2);
        queue.try_send(Bytes::from_static(b"a")).unwrap();
        queue.try_send(Bytes::from_static(b"b")).unwrap();
        assert_eq!(queue.try_send(Bytes::from_static(b"c")), Err(Refused::Full));
        assert_eq!(queue.recv().await.unwrap(), Bytes::from_static(b"a"));
        queue.send(Bytes::from_static(b"c")).await.unwrap();
        queue.close();
        assert_eq!(queue.try_send(Bytes::from_static(b"d")), Err(Refused::Closed));
        assert_eq!(queue.recv().await.unwrap(), Bytes::from_static(b"b"));
        assert_eq!(queue.recv().await.unwrap(), Bytes::from_static(b"c"));
        assert_eq!(queue.recv().await, None);
    }

    #[tokio::test]
    async fn a_full_queue_makes_send_wait_for_the_writer() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let queue = Outbound::new(1);
                queue.try_send(Bytes::from_static(b"a")).unwrap();
                let sender = queue.clone();
                let waiting = tokio::task::spawn_local(async move { sender.send(Bytes::from_static(b"b")).await });
                tokio::task::yield_now().await;
                assert!(!waiting.is_finished());
                assert_eq!(queue.recv().await.unwrap(), Bytes::from_static(b"a"));
                waiting.await.unwrap().unwrap();
                assert_eq!(queue.recv().await.unwrap(), Bytes::from_static(b"b"));
            })
            .await;
    }

    #[tokio::test]
    async fn room_waits_for_the_writer_and_a_try_send_after_it_fits() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let queue = Outbound::new(1);
                queue.room().await.unwrap();
                queue.try_send(Bytes::from_static(b"a")).unwrap();
                let waiter = queue.clone();
                let waiting = tokio::task::spawn_local(async move {
                    waiter.room().await?;
                    waiter.try_send(Bytes::from_static(b"b"))
                });
                tokio::task::yield_now().await;
                assert!(!waiting.is_finished());
                assert_eq!(queue.recv().await.unwrap(), Bytes::from_static(b"a"));
                waiting.await.unwrap().unwrap();
                queue.close();
                assert_eq!(queue.room().await, Err(Refused::Closed));
            })
            .await;
    }

    #[tokio::test]
    async fn drained_to_waits_until_the_writer_took_enough() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let queue = Outbound::new(4);
                for frame in [b"a", b"b", b"c"] {
                    queue.try_send(Bytes::from_static(frame)).unwrap();
                }
                let waiter = queue.clone();
                let waiting = tokio::task::spawn_local(async move { waiter.drained_to(1).await });
                tokio::task::yield_now().await;
                assert_eq!(queue.recv().await.unwrap(), Bytes::from_static(b"a"));
                tokio::task::yield_now().await;
                assert!(!waiting.is_finished(), "two frames are still queued");
                assert_eq!(queue.recv().await.unwrap(), Bytes::from_static(b"b"));
                waiting.await.unwrap().unwrap();
            })
            .await;
    }
}
