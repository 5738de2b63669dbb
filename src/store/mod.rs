//! Durable state behind one trait, [`Store`]: users and devices
//! ([`AccountStore`]), conversation history and send records ([`MessageStore`]),
//! groups ([`GroupStore`]) and each user's conversations and receipt
//! watermarks ([`ConversationStore`]). Each backend implements every part in a
//! file of its own (`accounts.rs`, `messages.rs`, `groups.rs`,
//! `conversations.rs`), beside its keys or statements and its writer.
//!
//! "Acknowledged means durable": when a write future resolves `Ok`, the write is as
//! safe as the configured durability promises, and callers acknowledge to clients
//! only then. Implementations group concurrent writes into one commit.
//!
//! The embedded backend ([`embedded`]) is the default product mode; cluster mode
//! keeps the same state in Cassandra ([`cassandra`]).

pub mod cassandra;
pub mod embedded;
mod encoding;
pub mod ownership;
mod records;

use async_trait::async_trait;
use confab_protocol::ids::{ConversationId, DeviceId, GroupId, Seq, UserId};
use confab_protocol::{HistoryRange, Marks, PushToken, Role};
use std::collections::HashMap;

pub use records::{
    Amendment, ConversationHead, DeviceRecord, GroupEvent, GroupRecord, MemberRecord, MessageRecord, NewUser,
    PendingConversation, PendingPush, Rotation, StoredSend, UserRecord,
};

/// Opens the backend `config` names.
pub fn open(config: &crate::Config) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    Ok(match config.store.backend {
        crate::config::StoreBackend::Embedded => std::sync::Arc::new(embedded::EmbeddedStore::open(&config.store)?),
        crate::config::StoreBackend::Cassandra => std::sync::Arc::new(cassandra::CassandraStore::open(
            &config.cassandra,
            config.chat.dedup_window,
        )?),
    })
}

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Username is already taken.
    #[error("username is already taken")]
    UsernameTaken,
    /// A record does not decode or breaks an invariant.
    #[error("stored record is corrupt: {what}{}", Because(.cause))]
    Corrupt {
        /// What was being read.
        what: String,
        /// The decoder's error, if any.
        #[source]
        cause: Option<Cause>,
    },
    /// Storage I/O failed.
    #[error("storage I/O failed: {what}{}", Because(.cause))]
    Io {
        /// What was being done.
        what: String,
        /// The error underneath, if any.
        #[source]
        cause: Option<Cause>,
    },
    /// The store stopped accepting writes after an earlier failure.
    #[error("the store stopped accepting writes after an earlier failure")]
    Poisoned,
    /// The store is shut down.
    #[error("the store is shut down")]
    Closed,
    /// Cluster mode: another live node holds the conversation and sequences
    /// it; appends to it go there.
    #[error("{conversation} is sequenced by node {holder}")]
    HeldElsewhere {
        /// The conversation.
        conversation: ConversationId,
        /// The node that holds it.
        holder: ownership::Incarnation,
    },
    /// The database did not confirm the operation (unreachable, timed out, too few
    /// replicas); nothing acknowledged was lost, and a retry may succeed.
    #[error("the database is unavailable: {what}{}", Because(.cause))]
    Unavailable {
        /// What could not be confirmed.
        what: String,
        /// The driver's error, if any.
        #[source]
        cause: Option<Cause>,
    },
}

/// The error underneath a [`StoreError`]: the database driver's, the file
/// system's, the decoder's. Shared, so a failed batch's error reaches every
/// waiter.
pub type Cause = std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Shows a cause after the message, so a log line says what happened underneath
/// without walking the source chain.
struct Because<'a>(&'a Option<Cause>);

impl std::fmt::Display for Because<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(cause) => write!(f, ": {cause}"),
            None => Ok(()),
        }
    }
}

impl StoreError {
    /// A record that does not decode or breaks an invariant.
    pub fn corrupt(what: impl Into<String>) -> Self {
        Self::Corrupt {
            what: what.into(),
            cause: None,
        }
    }

    /// A record the decoder refused.
    pub fn corrupt_because(what: impl Into<String>, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Corrupt {
            what: what.into(),
            cause: Some(std::sync::Arc::new(cause)),
        }
    }

    /// A failure of the machinery (a task, a runtime) rather than the data.
    pub fn io(what: impl Into<String>) -> Self {
        Self::Io {
            what: what.into(),
            cause: None,
        }
    }

    /// Storage I/O that failed underneath.
    pub fn io_because(what: impl Into<String>, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Io {
            what: what.into(),
            cause: Some(std::sync::Arc::new(cause)),
        }
    }

    /// The database cannot confirm writes now.
    pub fn unavailable(what: impl Into<String>) -> Self {
        Self::Unavailable {
            what: what.into(),
            cause: None,
        }
    }

    /// The database did not answer as asked.
    pub fn unavailable_because(what: impl Into<String>, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Unavailable {
            what: what.into(),
            cause: Some(std::sync::Arc::new(cause)),
        }
    }
}

/// A page of history, in ascending seq order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HistoryPage {
    /// The messages, ascending by seq.
    pub messages: Vec<MessageRecord>,
    /// More messages exist beyond this page in the direction of the range.
    pub has_more: bool,
}

/// Durable state: users, devices, conversation history, groups, marks, one
/// trait per concern. Every backend keeps this contract (tests/it/store.rs);
/// callers hold a `dyn Store` and import the part whose calls they make.
#[async_trait]
pub trait Store:
    AccountStore + MessageStore + GroupStore + ConversationStore + PushStore + Send + Sync + std::fmt::Debug + 'static
{
    /// Whether writes are taken now. A backend that refuses writes after a fault
    /// (a full disk, a failed commit) uses the probe to recover without waiting
    /// for a write; the error says why writes are refused.
    async fn probe_writes(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Makes every acknowledged write durable regardless of the durability setting,
    /// and stops accepting writes. Called once at shutdown.
    async fn close(&self) -> Result<(), StoreError>;

    /// Makes this store write as `me`, one node of a cluster, from now on
    /// (cluster mode, docs/CLUSTER.md). `is_live` says whether a node is live
    /// as this node last saw it: a conversation held by a node that is not
    /// may be taken after fencing it. Only the Cassandra store can.
    async fn join_cluster(&self, me: ownership::Incarnation, is_live: ownership::Liveness) -> Result<(), StoreError> {
        let _ = (me, is_live);
        Err(StoreError::io(
            "this store cannot be shared by a cluster: use store.backend = \"cassandra\"",
        ))
    }
}

/// Users and their devices: sign-up, credentials, refresh-secret rotation.
#[async_trait]
pub trait AccountStore: Send + Sync {
    /// Creates a user with a fresh id; fails with [`StoreError::UsernameTaken`].
    async fn create_user(&self, user: NewUser) -> Result<UserRecord, StoreError>;

    /// The user named `username`.
    async fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>, StoreError>;

    /// The user with id `id`.
    async fn user_by_id(&self, id: UserId) -> Result<Option<UserRecord>, StoreError>;

    /// Which of `ids` name no user.
    async fn missing_users(&self, ids: Vec<UserId>) -> Result<Vec<UserId>, StoreError>;

    /// Creates or replaces a device.
    async fn put_device(&self, device: DeviceRecord) -> Result<(), StoreError>;

    /// `user`'s device `device`.
    async fn device(&self, user: UserId, device: DeviceId) -> Result<Option<DeviceRecord>, StoreError>;

    /// A device and its user, in one read; `None` unless both exist.
    async fn device_and_user(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Result<Option<(DeviceRecord, UserRecord)>, StoreError>;

    /// Removes a device; returns whether it existed.
    async fn delete_device(&self, user: UserId, device: DeviceId) -> Result<bool, StoreError>;

    /// Every device of `user`.
    async fn devices(&self, user: UserId) -> Result<Vec<DeviceRecord>, StoreError>;

    /// Rotates a device's refresh secret if it is still the expected one;
    /// returns whether it was (false also when the device is gone).
    async fn rotate_refresh(&self, rotation: Rotation) -> Result<bool, StoreError>;

    /// Replaces a user's password hash (nothing, for a user that does not exist).
    async fn set_password(&self, user: UserId, password_hash: String) -> Result<(), StoreError>;

    /// Replaces a user's display name (nothing, for a user that does not exist).
    async fn set_display_name(&self, user: UserId, display_name: String) -> Result<(), StoreError>;

    /// Removes a user and frees its name (its devices are removed apart);
    /// returns whether it existed.
    async fn delete_user(&self, user: UserId) -> Result<bool, StoreError>;
}

/// Conversation history: appending sequenced messages, reading them back, and the send records that make sends idempotent.
#[async_trait]
pub trait MessageStore: Send + Sync {
    /// Appends messages. They arrive in seq order per conversation, with no gaps
    /// after the stored maximum, and a conversation's next append only once the
    /// previous one was answered (appends of different conversations overlap).
    /// Each message's `(sender_device, client_msg_id)` is recorded with it for
    /// [`Store::find_sends`], which answers as if both were written atomically.
    async fn append_messages(&self, messages: Vec<MessageRecord>) -> Result<(), StoreError>;

    /// Which of `keys` (sender device, client_msg_id) were already stored in
    /// `conversation`, ignoring those stored before `since_ms` (outside the dedup
    /// window).
    async fn find_sends(
        &self,
        conversation: ConversationId,
        keys: Vec<(DeviceId, String)>,
        since_ms: u64,
    ) -> Result<HashMap<(DeviceId, String), StoredSend>, StoreError>;

    /// Whether [`Store::find_sends`] is a local read cheap enough to run before
    /// every append (the embedded store: a point read in memory, microseconds).
    /// Then the owner keeps no send records of its own ([`Store::sent_ids`] is
    /// never asked); otherwise (a network round trip) it remembers them.
    fn finds_sends_cheaply(&self) -> bool {
        false
    }

    /// The client_msg_ids `device` stored sends under in `conversation`, all of
    /// them, when there are at most `limit` and every send ever stored has its
    /// record; `None` otherwise (more of them, or a failed write may have
    /// stored a message without its record). Expired records may be among them.
    /// An owner that lists a device's ids and then sees every later commit knows
    /// which of its new keys were never stored without asking [`Store::find_sends`].
    async fn sent_ids(
        &self,
        conversation: ConversationId,
        device: DeviceId,
        limit: usize,
    ) -> Result<Option<Vec<String>>, StoreError>;

    /// Forgets the send records stored before `before_ms`; returns how many.
    async fn purge_sends(&self, before_ms: u64) -> Result<usize, StoreError>;

    /// The stored messages of `conversation` with these seqs (missing ones omitted).
    async fn messages_at(
        &self,
        conversation: ConversationId,
        seqs: Vec<Seq>,
    ) -> Result<HashMap<Seq, MessageRecord>, StoreError>;

    /// Highest stored seq of a conversation, 0 when it has none.
    async fn last_seq(&self, conversation: ConversationId) -> Result<Seq, StoreError>;

    /// Called by a conversation's owner before it sequences it: the seq to
    /// continue after. A single node continues after the stored maximum; a
    /// node of a cluster first claims the conversation's next epoch
    /// ([`ownership`]), and is refused while another live node holds it.
    async fn take_conversation(&self, conversation: ConversationId) -> Result<Seq, StoreError> {
        self.last_seq(conversation).await
    }

    /// A page of `conversation`'s history.
    async fn history(
        &self,
        conversation: ConversationId,
        range: HistoryRange,
        limit: usize,
    ) -> Result<HistoryPage, StoreError>;
}

/// Groups and their members, maintained from the group events in appended messages.
#[async_trait]
pub trait GroupStore: Send + Sync {
    /// A group's title and current members, maintained from the group events in
    /// appended messages (in the same commit as the event).
    async fn group(&self, group: GroupId) -> Result<Option<GroupRecord>, StoreError>;

    /// A user's membership of a group, current or past.
    async fn member(&self, group: GroupId, user: UserId) -> Result<Option<MemberRecord>, StoreError>;

    /// Current members with a user id above `after`, by user id; and whether more follow.
    async fn members_page(
        &self,
        group: GroupId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<(Vec<(UserId, Role)>, bool), StoreError>;
}

/// Where devices are reached while they have no connection.
#[async_trait]
pub trait PushStore: Send + Sync {
    /// Sets (`None`: removes) a device's push token. Deleting the device
    /// removes it too.
    async fn set_push_token(&self, user: UserId, device: DeviceId, token: Option<PushToken>) -> Result<(), StoreError>;

    /// The push tokens of `user`'s devices.
    async fn push_tokens(&self, user: UserId) -> Result<Vec<(DeviceId, PushToken)>, StoreError>;

    /// Mutes (or unmutes) `conversation` in `user`'s notifications.
    async fn set_muted(&self, user: UserId, conversation: ConversationId, muted: bool) -> Result<(), StoreError>;

    /// The conversations `user` muted.
    async fn muted(&self, user: UserId) -> Result<Vec<ConversationId>, StoreError>;

    /// Keeps (replaces) `user`'s open notification window.
    async fn put_pending_push(&self, user: UserId, pending: PendingPush) -> Result<(), StoreError>;

    /// Forgets `user`'s notification window (sent, or no longer due).
    async fn delete_pending_push(&self, user: UserId) -> Result<(), StoreError>;

    /// Every user's open notification window, for a push worker starting.
    async fn pending_pushes(&self) -> Result<Vec<(UserId, PendingPush)>, StoreError>;
}

/// Each user's conversations: heads, activity order, receipt watermarks.
#[async_trait]
pub trait ConversationStore: Send + Sync {
    /// Every conversation `user` takes or took part in that has messages, with its
    /// head and the user's read watermark. Kept in the same commit as messages and
    /// group events.
    async fn conversations(&self, user: UserId) -> Result<Vec<ConversationHead>, StoreError>;

    /// `user`'s conversations by the last activity it may see, newest first (ties
    /// by conversation id), after `after` (a conversation's `(last_time_ms, id)`);
    /// at most `limit`, and whether more follow. This default sorts
    /// [`Store::conversations`]; a backend with an index ordered by activity reads
    /// only the newest part of it.
    async fn recent_conversations(
        &self,
        user: UserId,
        after: Option<(u64, ConversationId)>,
        limit: usize,
    ) -> Result<(Vec<ConversationHead>, bool), StoreError> {
        Ok(page_by_activity(self.conversations(user).await?, after, limit))
    }

    /// Raises a device's receipt watermarks (never lowers them); returns the
    /// user's watermarks across all its devices, and whether they rose.
    async fn mark(
        &self,
        conversation: ConversationId,
        user: UserId,
        device: DeviceId,
        marks: Marks,
    ) -> Result<(Marks, bool), StoreError>;
}

/// The page of `heads` after `after` by last activity, newest first (ties by
/// conversation id): at most `limit`, and whether more follow.
pub fn page_by_activity(
    mut heads: Vec<ConversationHead>,
    after: Option<(u64, ConversationId)>,
    limit: usize,
) -> (Vec<ConversationHead>, bool) {
    heads.retain(|head| follows(head, after));
    heads.sort_by_key(|head| activity_order(head.activity()));
    let more = heads.len() > limit;
    heads.truncate(limit);
    (heads, more)
}

/// Whether `head` comes after `after` in a list by activity.
pub fn follows(head: &ConversationHead, after: Option<(u64, ConversationId)>) -> bool {
    after.is_none_or(|after| activity_order(head.activity()) > activity_order(after))
}

/// Newest first, then by conversation id.
fn activity_order((time_ms, conversation): (u64, ConversationId)) -> (std::cmp::Reverse<u64>, ConversationId) {
    (std::cmp::Reverse(time_ms), conversation)
}
