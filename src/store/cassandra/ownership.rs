//! Cluster mode's ownership on Cassandra (docs/CLUSTER.md, "Who may write a
//! seq"): a node registers its incarnation, claims a conversation's next epoch
//! with one lightweight transaction, writes inside it plainly (the writer
//! stamps each message row with the epoch and [`write_timestamp`]), and reads
//! its own fence before acknowledging each flush.
//!
//! A store that did not join a cluster writes as a single node, as before.

use super::rows::{from_cql, to_cql};
use super::{BUCKET_SIZE, CassandraStore, Inner, bucket};
use crate::store::StoreError;
use crate::store::ownership::{Claim, ClaimError, Epoch, Epochs, Incarnation, Liveness, MAX_EPOCH};
use confab_protocol::ids::{ConversationId, Seq};
use futures::StreamExt as _;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Rows of `(seq, epoch)` read per step when looking for the highest row that
/// is not stale: stale rows are at most one flush per fenced owner.
const ROWS_PER_STEP: i32 = 256;
/// Claims a take retries after another node won the race for the same
/// conversation (the next read names the winner).
const MAX_LOST_RACES: u32 = 3;

/// Lightweight transactions at once when a node hands over its conversations.
const RELEASES_AT_ONCE: usize = 16;

/// This store's part in a cluster.
pub(super) struct ClusterNode {
    pub(super) me: Incarnation,
    is_live: Liveness,
    /// Set once a fence check found this incarnation fenced: from then on it
    /// owns nothing and writes nothing.
    fenced: AtomicBool,
    /// The conversations this node holds a claim on, with their epoch.
    claims: Mutex<HashMap<ConversationId, Epoch>>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("me", &self.me)
            .field("fenced", &self.fenced)
            .finish_non_exhaustive()
    }
}

impl ClusterNode {
    /// The epoch this node writes `conversation` in, if it holds it.
    pub(super) fn epoch(&self, conversation: ConversationId) -> Option<Epoch> {
        if self.fenced.load(Ordering::Acquire) {
            return None;
        }
        self.claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&conversation)
            .copied()
    }

    fn hold(&self, conversation: ConversationId, epoch: Epoch) {
        self.claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(conversation, epoch);
    }

    fn drop_claim(&self, conversation: ConversationId) -> Option<Epoch> {
        self.claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&conversation)
    }

    /// After a fence check found this node fenced: forget every claim.
    fn fenced(&self) {
        self.fenced.store(true, Ordering::Release);
        self.claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    pub(super) fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }
}

impl CassandraStore {
    /// [`Store::join_cluster`](crate::store::Store::join_cluster): registers
    /// the incarnation (unfenced); appends then need a claim on their
    /// conversation.
    pub(super) async fn join(&self, me: Incarnation, is_live: Liveness) -> Result<(), StoreError> {
        let registered = self
            .on_driver(move |inner| async move {
                inner
                    .applied(&inner.statements.register_node, (to_cql(me.get()),))
                    .await
            })
            .await?;
        if !registered {
            return Err(StoreError::corrupt(format!("incarnation {me} is registered already")));
        }
        self.inner
            .cluster
            .set(ClusterNode {
                me,
                is_live,
                fenced: AtomicBool::new(false),
                claims: Mutex::default(),
            })
            .map_err(|_| StoreError::corrupt("this store joined a cluster already"))
    }

    /// [`MessageStore::take_conversation`](crate::store::MessageStore::take_conversation)
    /// in cluster mode: the seq to continue after, once this node holds the
    /// conversation. An owner that is not live is fenced first; one that is
    /// keeps it.
    pub(super) async fn take(&self, node: &ClusterNode, conversation: ConversationId) -> Result<Seq, StoreError> {
        if node.epoch(conversation).is_some() {
            // Held already: every append of it here was answered, so the
            // head is where it stands.
            return self
                .read_on_driver(move |inner| async move { inner.readable_seq(conversation).await })
                .await;
        }
        let mut fenced_one = false;
        let mut lost = 0;
        loop {
            return match self.claim(conversation).await {
                Ok(claim) => Ok(claim.next_seq - 1),
                // Another node claimed it between this node's read and its
                // write: read again, to learn who holds it now.
                Err(ClaimError::Lost) if lost < MAX_LOST_RACES => {
                    lost += 1;
                    continue;
                }
                Err(ClaimError::Owned { owner, epoch }) if !fenced_one && !(node.is_live)(owner) => {
                    tracing::warn!(%owner, epoch, %conversation, "fencing a node that is no longer live, to take its conversation");
                    self.fence(owner).await?;
                    fenced_one = true;
                    continue;
                }
                Err(ClaimError::Owned { owner, .. }) => Err(StoreError::HeldElsewhere {
                    conversation,
                    holder: owner,
                }),
                Err(ClaimError::Store(err)) => Err(err),
                Err(err) => Err(StoreError::unavailable(format!("taking {conversation}: {err}"))),
            };
        }
    }

    /// Hands over every conversation this node holds: at shutdown, after the
    /// writer answered every append, so the next owners need not wait for its
    /// lease to lapse and fence it.
    pub(super) async fn release_all(&self) {
        let Some(node) = self.inner.cluster.get() else { return };
        let held: Vec<ConversationId> = node
            .claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .copied()
            .collect();
        let releases = futures::stream::iter(held)
            .map(|conversation| async move { (conversation, self.release(conversation).await) })
            .buffer_unordered(RELEASES_AT_ONCE);
        let failed: Vec<_> = releases
            .filter(|(_, result)| std::future::ready(result.is_err()))
            .collect()
            .await;
        if !failed.is_empty() {
            tracing::warn!(
                conversations = failed.len(),
                "some conversations were not released; they move once this node is fenced"
            );
        }
    }

    /// Fences `node`: it acknowledges nothing from its next flush on, and its
    /// conversations may be claimed. Done by whoever decided it is dead.
    pub async fn fence(&self, node: Incarnation) -> Result<(), StoreError> {
        self.on_driver(move |inner| async move {
            // Not applied: no such incarnation, which owns nothing anyway.
            inner
                .applied(&inner.statements.fence_node, (to_cql(node.get()),))
                .await
                .map(drop)
        })
        .await
    }

    /// Claims `conversation`'s next epoch for this node, if its owner released
    /// it or has been fenced, and finds the seq it continues from.
    pub async fn claim(&self, conversation: ConversationId) -> Result<Claim, ClaimError> {
        let node = self.inner.cluster.get().ok_or(ClaimError::NotJoined)?;
        if node.is_fenced() {
            return Err(ClaimError::Fenced);
        }
        let me = node.me;
        let claim = self
            .on_driver(move |inner| async move { Ok(claim(&inner, me, conversation).await) })
            .await??;
        node.hold(conversation, claim.epoch);
        Ok(claim)
    }

    /// Hands `conversation` over: no more appends here; another node may claim
    /// it. Call only once every append of it was answered.
    pub async fn release(&self, conversation: ConversationId) -> Result<(), ClaimError> {
        let node = self.inner.cluster.get().ok_or(ClaimError::NotJoined)?;
        let Some(epoch) = node.drop_claim(conversation) else {
            return Ok(());
        };
        let me = node.me;
        let released = self
            .on_driver(move |inner| async move {
                let values = (conversation.to_string(), to_cql(epoch), to_cql(me.get()));
                inner.applied(&inner.statements.release_owner, values).await
            })
            .await?;
        // Not applied: another node took it meanwhile (this one was fenced).
        if released { Ok(()) } else { Err(ClaimError::Lost) }
    }
}

async fn claim(inner: &Inner, me: Incarnation, conversation: ConversationId) -> Result<Claim, ClaimError> {
    let key = conversation.to_string();
    let owners: Vec<(Option<i64>, Option<i64>, Option<bool>)> =
        inner.rows(&inner.statements.owner, (key.clone(),)).await?;
    let epoch = match owners.first() {
        None => {
            let values = (key.clone(), to_cql(me.get()));
            if !inner.applied(&inner.statements.first_owner, values).await? {
                return Err(ClaimError::Lost);
            }
            1
        }
        Some(&(epoch, owner, released)) => {
            let epoch = epoch.map_or(0, from_cql);
            let owner = Incarnation::new(owner.map_or(0, from_cql));
            if owner != me && released != Some(true) && !is_fenced(inner, owner).await? {
                return Err(ClaimError::Owned { owner, epoch });
            }
            let next = epoch + 1;
            if next > MAX_EPOCH {
                return Err(ClaimError::OutOfEpochs);
            }
            let values = (to_cql(next), to_cql(me.get()), key.clone(), to_cql(epoch));
            if !inner.applied(&inner.statements.next_owner, values).await? {
                return Err(ClaimError::Lost);
            }
            next
        }
    };
    let starts: Vec<(i64, i64)> = inner.rows(&inner.statements.epochs, (key.clone(),)).await?;
    let epochs = Epochs::new(starts.into_iter().map(|(e, s)| (from_cql(e), from_cql(s))).collect());
    let next_seq = highest_kept(inner, conversation, &epochs).await? + 1;
    inner
        .execute(
            &inner.statements.insert_epoch,
            (key.clone(), to_cql(epoch), to_cql(next_seq)),
        )
        .await?;
    // What the last owner stored and may not have made readable (it died
    // between its fence check and its head) becomes readable now.
    let kept = next_seq - 1;
    let heads: Vec<(i64, i64)> = inner.rows(&inner.statements.head, (key.clone(),)).await?;
    let readable = heads.first().map_or(0, |(seq, _)| from_cql(*seq));
    if kept > readable {
        // Those rows were never acknowledged, and a row may have landed
        // without its send record (another table): a retry of one must be
        // found by scanning, not by the records alone.
        inner.suspect(conversation, readable + 1);
    }
    if let Some(message) = inner.message(conversation, kept).await? {
        let time_ms = to_cql(message.server_time_ms);
        let head = (key, to_cql(kept), time_ms, to_cql(kept));
        inner.execute(&inner.statements.upsert_head, head).await?;
    }
    Ok(Claim { epoch, next_seq })
}

/// Whether `node`'s fence is up (or it never registered: it cannot write).
pub(super) async fn is_fenced(inner: &Inner, node: Incarnation) -> Result<bool, StoreError> {
    let rows: Vec<(Option<bool>,)> = inner.rows(&inner.statements.node_fenced, (to_cql(node.get()),)).await?;
    Ok(rows.first().is_none_or(|(fenced,)| fenced.unwrap_or(true)))
}

/// After a flush's rows are written: whether this node may acknowledge them.
/// A fenced node forgets its claims and refuses from then on.
pub(super) async fn check_fence(inner: &Inner, node: &ClusterNode) -> Result<(), StoreError> {
    if node.is_fenced() || is_fenced(inner, node.me).await? {
        node.fenced();
        return Err(StoreError::unavailable(format!(
            "this node ({}) was fenced: another node took over its conversations",
            node.me
        )));
    }
    Ok(())
}

/// The highest stored seq of `conversation` whose row no later epoch made
/// stale: down from the stored maximum past the stale rows (at most a flush
/// of each fenced owner). Below it every row is kept: a later epoch rewrote
/// every seq from its start up to its last.
async fn highest_kept(inner: &Inner, conversation: ConversationId, epochs: &Epochs) -> Result<Seq, StoreError> {
    let key = conversation.to_string();
    let mut from = inner.last_seq(conversation).await?;
    while from > 0 {
        let rows: Vec<(i64, Option<i64>)> = inner
            .rows(
                &inner.statements.epochs_down_from,
                (key.clone(), bucket(from), to_cql(from), ROWS_PER_STEP),
            )
            .await?;
        for &(seq, epoch) in &rows {
            let seq = from_cql(seq);
            if !epochs.is_stale(epoch.map_or(0, from_cql), seq) {
                return Ok(seq);
            }
        }
        // The rest of this bucket is stale, or the bucket is empty below `from`.
        let lowest_read = rows.last().map_or(from, |&(seq, _)| from_cql(seq));
        from = match rows.len() < ROWS_PER_STEP as usize {
            true => (from_cql(bucket(from)) * BUCKET_SIZE).saturating_sub(1),
            false => lowest_read.saturating_sub(1),
        };
    }
    Ok(0)
}

/// Two stores on one keyspace are two nodes. Need a Cassandra node:
/// `TEST_CASSANDRA=<host:port> cargo test --lib store::cassandra -- --ignored`.
#[cfg(test)]
mod tests {
    use super::super::tests::{conversation, message, store};
    use super::*;
    use crate::store::MessageRecord;
    use crate::store::MessageStore as _;
    use confab_protocol::HistoryRange;
    use confab_protocol::ids::DeviceId;

    /// Joins `store` as a node that sees every other node live: a test fences
    /// by hand.
    async fn node(store: &CassandraStore) -> Incarnation {
        let me = Incarnation::random();
        store.join(me, std::sync::Arc::new(|_| true)).await.unwrap();
        me
    }

    fn messages(conversation: ConversationId, seqs: std::ops::RangeInclusive<Seq>, tag: &str) -> Vec<MessageRecord> {
        seqs.map(|seq| message(conversation, seq, &format!("{tag}-{seq}")))
            .collect()
    }

    async fn id_at(store: &CassandraStore, conversation: ConversationId, seq: Seq) -> String {
        let found = store.messages_at(conversation, vec![seq]).await.unwrap();
        found[&seq].client_msg_id.clone()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs a Cassandra node: TEST_CASSANDRA=<host:port>"]
    async fn a_fenced_owner_acknowledges_nothing_and_its_late_rows_never_win() {
        let (a, b, c) = (store(), store(), store());
        let (node_a, node_b, _) = (node(&a).await, node(&b).await, node(&c).await);
        let conversation = conversation();
        let refused = a.append_messages(messages(conversation, 1..=1, "a")).await;
        assert!(
            matches!(refused, Err(StoreError::Unavailable { .. })),
            "no claim: {refused:?}"
        );

        assert_eq!(a.claim(conversation).await.unwrap(), Claim { epoch: 1, next_seq: 1 });
        a.append_messages(messages(conversation, 1..=3, "a")).await.unwrap();
        match b.claim(conversation).await {
            Err(ClaimError::Owned { owner, epoch: 1 }) => assert_eq!(owner, node_a),
            other => panic!("taken from a live owner: {other:?}"),
        }

        // b decides a is dead (a is only paused) and takes over from seq 4.
        b.fence(node_a).await.unwrap();
        assert_eq!(b.claim(conversation).await.unwrap(), Claim { epoch: 2, next_seq: 4 });
        b.append_messages(messages(conversation, 4..=4, "b")).await.unwrap();
        // a, unaware, writes 4 and 5 after b's 4: they land, and are refused;
        // b's 4 wins though it was written first (the later epoch's timestamp).
        let late = a.append_messages(messages(conversation, 4..=5, "a")).await;
        assert!(matches!(late, Err(StoreError::Unavailable { .. })), "fenced: {late:?}");
        assert_eq!(id_at(&b, conversation, 4).await, "b-4");
        assert_eq!(id_at(&b, conversation, 3).await, "a-3", "what a acknowledged stays");
        // a's stale 5 is not readable, and its send record is not found: 5 is
        // the next owner's to give.
        assert_eq!(b.last_seq(conversation).await.unwrap(), 4);
        assert!(b.messages_at(conversation, vec![5]).await.unwrap().is_empty());
        let page = b.history(conversation, HistoryRange::Latest, 10).await.unwrap();
        let seqs: Vec<Seq> = page.messages.iter().map(|message| message.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        let page = b.history(conversation, HistoryRange::After(3), 10).await.unwrap();
        assert_eq!(page.messages.len(), 1);
        let device = DeviceId::new(9).unwrap();
        let stale = b
            .find_sends(conversation, vec![(device, "a-5".into())], 0)
            .await
            .unwrap();
        assert!(stale.is_empty(), "{stale:?}");
        let kept = b
            .find_sends(conversation, vec![(device, "a-3".into())], 0)
            .await
            .unwrap();
        assert_eq!(kept[&(device, "a-3".to_owned())].seq, 3);

        // A third node, after b: a's stale 5 is not taken for a stored message.
        c.fence(node_b).await.unwrap();
        assert_eq!(c.claim(conversation).await.unwrap(), Claim { epoch: 3, next_seq: 5 });
        c.append_messages(messages(conversation, 5..=5, "c")).await.unwrap();
        assert_eq!(id_at(&c, conversation, 5).await, "c-5");

        // Once fenced, a refuses everything and claims nothing.
        assert!(matches!(
            a.claim(super::super::tests::conversation()).await,
            Err(ClaimError::Fenced)
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs a Cassandra node: TEST_CASSANDRA=<host:port>"]
    async fn a_row_a_dead_owner_stored_without_its_record_is_found_by_a_retry() {
        let (a, b) = (store(), store());
        let (node_a, _) = (node(&a).await, node(&b).await);
        let conversation = conversation();
        a.claim(conversation).await.unwrap();
        a.append_messages(messages(conversation, 1..=2, "a")).await.unwrap();
        // a died in its flush of 3: the message row landed, its send record
        // and the head did not.
        let row = (
            conversation.to_string(),
            bucket(3),
            3i64,
            prost::Message::encode_to_vec(&crate::store::encoding::StoredMessage::of(&message(
                conversation,
                3,
                "a-3",
            ))),
            1i64,
            crate::store::ownership::write_timestamp(1, 3),
        );
        a.on_driver(move |inner| async move { inner.execute(&inner.statements.insert_message_in_epoch, row).await })
            .await
            .unwrap();

        b.fence(node_a).await.unwrap();
        assert_eq!(
            b.claim(conversation).await.unwrap(),
            Claim { epoch: 2, next_seq: 4 },
            "3 adopted"
        );
        let device = DeviceId::new(9).unwrap();
        assert_eq!(
            b.sent_ids(conversation, device, 100).await.unwrap(),
            None,
            "the list of a's sends lacks a-3"
        );
        let retry = b
            .find_sends(conversation, vec![(device, "a-3".into())], 0)
            .await
            .unwrap();
        assert_eq!(retry[&(device, "a-3".to_owned())].seq, 3, "the retry gets 3, not 4");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs a Cassandra node: TEST_CASSANDRA=<host:port>"]
    async fn a_released_conversation_is_claimed_without_a_fence_and_continues_its_seqs() {
        let (a, b) = (store(), store());
        node(&a).await;
        node(&b).await;
        let conversation = conversation();
        a.claim(conversation).await.unwrap();
        a.append_messages(messages(conversation, 1..=2, "a")).await.unwrap();
        a.release(conversation).await.unwrap();
        let refused = a.append_messages(messages(conversation, 3..=3, "a")).await;
        assert!(
            matches!(refused, Err(StoreError::Unavailable { .. })),
            "released: {refused:?}"
        );
        assert_eq!(b.claim(conversation).await.unwrap(), Claim { epoch: 2, next_seq: 3 });
        b.append_messages(messages(conversation, 3..=3, "b")).await.unwrap();
        // a is not fenced: it may claim again, once b releases.
        assert!(matches!(
            a.claim(conversation).await,
            Err(ClaimError::Owned { epoch: 2, .. })
        ));
        b.release(conversation).await.unwrap();
        assert_eq!(a.claim(conversation).await.unwrap(), Claim { epoch: 3, next_seq: 4 });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs a Cassandra node: TEST_CASSANDRA=<host:port>"]
    async fn of_two_nodes_claiming_at_once_one_wins() {
        let (a, b) = (store(), store());
        node(&a).await;
        node(&b).await;
        for _ in 0..5 {
            let conversation = conversation();
            let (first, second) = tokio::join!(a.claim(conversation), b.claim(conversation));
            let won = [first.is_ok(), second.is_ok()];
            assert_eq!(won.iter().filter(|won| **won).count(), 1, "{first:?} {second:?}");
            for result in [first, second] {
                match result {
                    Ok(claim) => assert_eq!(claim, Claim { epoch: 1, next_seq: 1 }),
                    Err(ClaimError::Lost | ClaimError::Owned { .. }) => {}
                    Err(err) => panic!("{err}"),
                }
            }
        }
    }
}
