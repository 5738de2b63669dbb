//! A connection's queue of encoded frames, from the shard's tasks to the
//! transport's writer.
//!
//! Single-threaded (everything that touches a connection runs on its shard),
//! bounded, and holding no allocation while empty, so an idle connection costs
//! only the handle. A tokio `mpsc` channel would allocate a block of slots up front
//! for every connection.
//!
//! Bounded in frames and in bytes. Pushes (the same encoded frame shared by
//! every recipient) may fill it all; beyond, the session is a slow consumer.
//! Replies (and a resume's replay), encoded for this connection alone, have a
//! budget of their own, much smaller: they wait while it is spent, or while the
//! queue is more than half full, so a peer that pipelines requests and reads
//! slowly gets back-pressure, not a disconnect, cannot crowd out pushes, and
//! holds at most its reply budget of memory no one else shares. A reply whose
//! size is not known before it is read from the store (a page) first reserves
//! room in that budget: a connection reads at most a budget of pages ahead of
//! its peer. The connections from one source address on a shard also share an
//! [`AddressShare`] of reply bytes, so many connections from one address cannot
//! multiply the per-connection budget.

use super::Closed;
use bytes::Bytes;
use confab_protocol::ids::SourceAddress;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::rc::{Rc, Weak};
use tokio::sync::Notify;

/// Addresses remembered above which those with no connection left are forgotten.
const PRUNE_ABOVE: usize = 4096;

/// The reply bytes all connections from one source address on one shard hold:
/// queued, and reserved for pages being read.
#[derive(Debug)]
pub struct AddressShare {
    queued: Cell<usize>,
    reserved: Cell<usize>,
    max: usize,
    /// Wakes the address's connections waiting for room.
    freed: Notify,
}

impl AddressShare {
    fn free(&self, queued: usize, reserved: usize) {
        self.queued.set(self.queued.get() - queued);
        self.reserved.set(self.reserved.get() - reserved);
        self.freed.notify_waiters();
    }
}

/// A shard's [`AddressShare`]s, one per source address with connections.
#[derive(Debug)]
pub struct AddressShares {
    max: usize,
    exempt_loopback: bool,
    by_address: HashMap<SourceAddress, Weak<AddressShare>>,
}

impl AddressShares {
    /// Shares of `max` bytes; none for loopback if it is exempt.
    pub fn new(max: usize, exempt_loopback: bool) -> Self {
        Self {
            max,
            exempt_loopback,
            by_address: HashMap::new(),
        }
    }

    /// The share of connections from `ip`; `None` if it is exempt.
    pub fn of(&mut self, ip: IpAddr) -> Option<Rc<AddressShare>> {
        if self.exempt_loopback && ip.is_loopback() {
            return None;
        }
        if self.by_address.len() > PRUNE_ABOVE {
            self.by_address.retain(|_, share| share.strong_count() > 0);
        }
        let slot = self.by_address.entry(SourceAddress::of(ip)).or_default();
        if let Some(share) = slot.upgrade() {
            return Some(share);
        }
        let share = Rc::new(AddressShare {
            queued: Cell::new(0),
            reserved: Cell::new(0),
            max: self.max,
            freed: Notify::new(),
        });
        *slot = Rc::downgrade(&share);
        Some(share)
    }
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue is at capacity: the peer is not reading fast enough.
    Full,
    /// The connection is closing.
    Closed,
}

/// How much one queue holds.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Frames queued for one connection at most.
    pub frames: usize,
    /// Bytes of all frames queued.
    pub bytes: usize,
    /// Bytes of replies queued, and again of replies reserved.
    pub reply_bytes: usize,
}

impl Bounds {
    /// Bounds that only count frames.
    #[cfg(test)]
    pub fn frames(frames: usize) -> Self {
        Self {
            frames,
            bytes: usize::MAX,
            reply_bytes: usize::MAX,
        }
    }
}

/// A handle on one connection's queue; clones share it.
#[derive(Debug, Clone)]
pub struct Outbound(Rc<Queue>);

#[derive(Debug)]
struct Queue {
    /// Frames, and whether each is a reply.
    frames: RefCell<VecDeque<(Bytes, bool)>>,
    bounds: Bounds,
    /// Bytes of the frames queued now, and of the replies among them.
    bytes: Cell<usize>,
    reply_bytes: Cell<usize>,
    /// Bytes promised to replies still being read (see [`Outbound::reserve`]).
    reserved: Cell<usize>,
    /// The reply bytes this connection's address holds on this shard.
    address: Option<Rc<AddressShare>>,
    closed: Cell<bool>,
    /// Why the connection ended, once it has: transports turn it into a close code.
    ended: Cell<Option<Closed>>,
    /// Wakes the writer when a frame arrives or the queue closes.
    filled: Notify,
    /// Wakes everyone waiting for room (senders, reservations).
    drained: Notify,
}

/// Room promised to a reply being prepared; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    queue: Rc<Queue>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.queue.reserved.set(self.queue.reserved.get() - self.bytes);
        if let Some(address) = &self.queue.address {
            address.free(0, self.bytes);
        }
        self.queue.drained.notify_waiters();
    }
}

impl Drop for Queue {
    /// A connection's queued replies stop counting for its address when it ends.
    fn drop(&mut self) {
        if let Some(address) = &self.address {
            address.free(self.reply_bytes.get(), 0);
        }
    }
}

/// `used + len` is within `max`; an empty budget takes anything, so every
/// frame can pass.
fn within(used: usize, len: usize, max: usize) -> bool {
    used == 0 || used.saturating_add(len) <= max
}

impl Queue {
    fn has_frame_room(&self) -> bool {
        self.frames.borrow().len() < self.bounds.frames
    }

    /// Whether a push of `len` bytes fits.
    fn fits_push(&self, len: usize) -> bool {
        self.has_frame_room() && within(self.bytes.get(), len, self.bounds.bytes)
    }

    /// Whether a reply of `len` bytes fits: in the reply budget, and in half
    /// the queue.
    fn fits_reply(&self, len: usize) -> bool {
        self.has_frame_room()
            && within(self.bytes.get(), len, self.bounds.bytes / 2)
            && within(self.reply_bytes.get(), len, self.bounds.reply_bytes)
            && self
                .address
                .as_ref()
                .is_none_or(|address| within(address.queued.get(), len, address.max))
    }

    /// Whether `bytes` more may be reserved: within the connection's reply
    /// budget (any amount when it has nothing reserved) and its address's.
    fn fits_reservation(&self, bytes: usize) -> bool {
        let reserved = self.reserved.get();
        let own = reserved == 0 || self.reply_bytes.get() + reserved + bytes <= self.bounds.reply_bytes;
        own && self
            .address
            .as_ref()
            .is_none_or(|address| within(address.queued.get() + address.reserved.get(), bytes, address.max))
    }
}

impl Outbound {
    /// A queue with no address share.
    #[cfg(test)]
    pub fn new(bounds: Bounds) -> Self {
        Self::sharing(bounds, None)
    }

    /// A queue whose replies also count in `address`'s share.
    pub fn sharing(bounds: Bounds, address: Option<Rc<AddressShare>>) -> Self {
        Self(Rc::new(Queue {
            frames: RefCell::new(VecDeque::new()),
            bounds,
            bytes: Cell::new(0),
            reply_bytes: Cell::new(0),
            reserved: Cell::new(0),
            address,
            closed: Cell::new(false),
            ended: Cell::new(None),
            filled: Notify::new(),
            drained: Notify::new(),
        }))
    }

    /// Queues a push if there is room.
    pub fn try_send(&self, frame: Bytes) -> Result<(), Refused> {
        if self.0.closed.get() {
            return Err(Refused::Closed);
        }
        if !self.0.fits_push(frame.len()) {
            return Err(Refused::Full);
        }
        self.push(frame, false);
        Ok(())
    }

    fn push(&self, frame: Bytes, reply: bool) {
        self.0.bytes.set(self.0.bytes.get() + frame.len());
        if reply {
            self.0.reply_bytes.set(self.0.reply_bytes.get() + frame.len());
            if let Some(address) = &self.0.address {
                address.queued.set(address.queued.get() + frame.len());
            }
        }
        self.0.frames.borrow_mut().push_back((frame, reply));
        self.0.filled.notify_one();
    }

    /// Queues a reply (or a replayed message), waiting for room.
    pub async fn send(&self, frame: Bytes) -> Result<(), Refused> {
        self.wait_until(|queue| queue.fits_reply(frame.len())).await?;
        self.push(frame, true);
        Ok(())
    }

    /// Waits until a small reply fits (or the queue closes). On the shard's
    /// single thread, nothing else queues until the waiter's next `await`, so a
    /// `try_send` right after it succeeds.
    pub async fn room(&self) -> Result<(), Refused> {
        self.wait_until(|queue| queue.fits_reply(0)).await
    }

    /// Waits until the queue holds at most half its frames and half its bytes
    /// (or closes).
    pub async fn half_empty(&self) -> Result<(), Refused> {
        self.wait_until(|queue| {
            queue.frames.borrow().len() <= queue.bounds.frames / 2 && queue.bytes.get() <= queue.bounds.bytes / 2
        })
        .await
    }

    /// Waits until `bytes` more fit in the reply budget beside the replies
    /// queued and reserved (any amount fits when nothing is reserved), and
    /// reserves them. Reservations do not hold back [`Outbound::send`]: a
    /// reply goes out while others are still being read. A closed queue
    /// reserves nothing at once: the reply is not sent.
    pub async fn reserve(&self, bytes: usize) -> Reservation {
        let waited = self.wait_until(|queue| queue.fits_reservation(bytes)).await;
        let bytes = if waited.is_ok() { bytes } else { 0 };
        self.0.reserved.set(self.0.reserved.get() + bytes);
        if let Some(address) = &self.0.address {
            address.reserved.set(address.reserved.get() + bytes);
        }
        Reservation {
            queue: self.0.clone(),
            bytes,
        }
    }

    async fn wait_until(&self, ready: impl Fn(&Queue) -> bool) -> Result<(), Refused> {
        loop {
            let drained = self.0.drained.notified();
            let freed = self.0.address.as_ref().map(|address| address.freed.notified());
            if self.0.closed.get() {
                return Err(Refused::Closed);
            }
            if ready(&self.0) {
                return Ok(());
            }
            match freed {
                Some(freed) => {
                    tokio::select! {
                        () = drained => {}
                        () = freed => {}
                    }
                }
                None => drained.await,
            }
        }
    }

    /// Frames queued now.
    pub fn queued(&self) -> usize {
        self.0.frames.borrow().len()
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.0.bytes.get()
    }

    /// The reply budget: what a replay reads at a time.
    pub fn reply_bytes(&self) -> usize {
        self.0.bounds.reply_bytes
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
        let (frame, reply) = frames.pop_front()?;
        if frames.is_empty() {
            // Idle connections hold no buffer.
            *frames = VecDeque::new();
        }
        drop(frames);
        self.0.bytes.set(self.0.bytes.get() - frame.len());
        if reply {
            self.0.reply_bytes.set(self.0.reply_bytes.get() - frame.len());
            if let Some(address) = &self.0.address {
                address.free(frame.len(), 0);
            }
        }
        self.0.drained.notify_waiters();
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
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_flow_in_order_within_capacity_and_close_drains() {
        let queue = Outbound::new(Bounds::frames(2));
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
                let queue = Outbound::new(Bounds::frames(1));
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
                let queue = Outbound::new(Bounds::frames(1));
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
    async fn half_empty_waits_until_the_writer_took_enough() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let queue = Outbound::new(Bounds::frames(4));
                for frame in [b"a", b"b", b"c"] {
                    queue.try_send(Bytes::from_static(frame)).unwrap();
                }
                let waiter = queue.clone();
                let waiting = tokio::task::spawn_local(async move { waiter.half_empty().await });
                tokio::task::yield_now().await;
                assert!(!waiting.is_finished(), "three of four frames are queued");
                assert_eq!(queue.recv().await.unwrap(), Bytes::from_static(b"a"));
                waiting.await.unwrap().unwrap();
            })
            .await;
    }

    fn frame(len: usize) -> Bytes {
        Bytes::from(vec![0u8; len])
    }

    fn bounds(bytes: usize, reply_bytes: usize) -> Bounds {
        Bounds {
            frames: 100,
            bytes,
            reply_bytes,
        }
    }

    #[test]
    fn pushes_fill_the_bytes_and_one_frame_always_fits_an_empty_queue() {
        let queue = Outbound::new(bounds(1000, 100));
        queue.try_send(frame(600)).unwrap();
        queue.try_send(frame(400)).unwrap();
        assert_eq!(queue.try_send(frame(1)), Err(Refused::Full));
        assert_eq!(queue.queued_bytes(), 1000);
        queue.try_recv().unwrap();
        queue.try_recv().unwrap();
        assert_eq!(queue.queued_bytes(), 0);
        queue.try_send(frame(5000)).unwrap();
        assert_eq!(queue.try_send(frame(1)), Err(Refused::Full));
    }

    #[tokio::test]
    async fn replies_wait_while_the_queue_holds_more_than_half_its_bytes() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let queue = Outbound::new(bounds(1000, 1000));
                queue.send(frame(300)).await.unwrap();
                queue.try_send(frame(300)).unwrap();
                let sender = queue.clone();
                let waiting = tokio::task::spawn_local(async move { sender.send(frame(200)).await });
                tokio::task::yield_now().await;
                assert!(!waiting.is_finished(), "600 bytes queued: over half the queue");
                queue.try_recv().unwrap();
                waiting.await.unwrap().unwrap();
                assert_eq!(queue.queued_bytes(), 500);
            })
            .await;
    }

    #[tokio::test]
    async fn replies_have_a_budget_of_their_own_that_pushes_do_not_spend() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let queue = Outbound::new(bounds(100_000, 500));
                queue.send(frame(300)).await.unwrap();
                let sender = queue.clone();
                let waiting = tokio::task::spawn_local(async move { sender.send(frame(300)).await });
                tokio::task::yield_now().await;
                assert!(!waiting.is_finished(), "300 of the 500 reply bytes are queued");
                // Pushes still go in.
                queue.try_send(frame(5000)).unwrap();
                assert_eq!(queue.try_recv().unwrap().len(), 300);
                waiting.await.unwrap().unwrap();
                assert_eq!(queue.try_recv().unwrap().len(), 5000);
                assert_eq!(queue.try_recv().unwrap().len(), 300);
            })
            .await;
    }

    #[tokio::test]
    async fn reservations_share_the_reply_budget_and_give_it_back_when_dropped() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let queue = Outbound::new(bounds(100_000, 500));
                let first = queue.reserve(300).await;
                let second = queue.reserve(200).await;
                let reserver = queue.clone();
                let waiting = tokio::task::spawn_local(async move { reserver.reserve(300).await.bytes });
                tokio::task::yield_now().await;
                assert!(!waiting.is_finished(), "500 of the 500 bytes are reserved");
                // A reply goes out whatever is reserved.
                queue.send(frame(400)).await.unwrap();
                drop(first);
                tokio::task::yield_now().await;
                assert!(!waiting.is_finished(), "400 queued and 200 reserved");
                queue.try_recv().unwrap();
                assert_eq!(waiting.await.unwrap(), 300);
                drop(second);
                // Nothing reserved: a reservation larger than the budget still goes.
                let large = queue.reserve(5000).await;
                assert_eq!(large.bytes, 5000);
                queue.close();
                assert_eq!(queue.reserve(10).await.bytes, 0, "a closed queue reserves nothing");
            })
            .await;
    }

    #[tokio::test]
    async fn connections_from_one_address_share_its_reply_bytes() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let mut shares = AddressShares::new(500, true);
                assert!(shares.of("127.0.0.1".parse().unwrap()).is_none(), "loopback is exempt");
                let address: IpAddr = "10.0.0.1".parse().unwrap();
                let first = Outbound::sharing(bounds(100_000, 400), shares.of(address));
                let second = Outbound::sharing(bounds(100_000, 400), shares.of(address));
                let elsewhere = Outbound::sharing(bounds(100_000, 400), shares.of("10.0.0.2".parse().unwrap()));
                first.send(frame(300)).await.unwrap();
                // Within its own budget, but the address has 200 left.
                let sender = second.clone();
                let waiting = tokio::task::spawn_local(async move { sender.send(frame(300)).await });
                tokio::task::yield_now().await;
                assert!(!waiting.is_finished(), "the address's 500 bytes would be exceeded");
                elsewhere.send(frame(300)).await.unwrap();
                // A reservation waits for the address too.
                let reserver = second.clone();
                let reserving = tokio::task::spawn_local(async move { reserver.reserve(300).await.bytes });
                tokio::task::yield_now().await;
                assert!(!reserving.is_finished());
                // The first connection's peer reads: room for one of them.
                first.try_recv().unwrap();
                waiting.await.unwrap().unwrap();
                tokio::task::yield_now().await;
                assert!(!reserving.is_finished(), "300 queued + 300 reserved > 500");
                second.try_recv().unwrap();
                assert_eq!(reserving.await.unwrap(), 300);
                // A connection that ends gives back what it still had queued.
                let third = Outbound::sharing(bounds(100_000, 400), shares.of(address));
                third.send(frame(200)).await.unwrap();
                assert!(!first.0.fits_reservation(400), "200 queued + 400 > 500");
                drop(third);
                assert!(first.0.fits_reservation(400));
            })
            .await;
    }
}
