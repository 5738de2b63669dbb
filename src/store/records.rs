//! Records the store keeps, independent of how a backend lays them out.

use confab_proto::v1;
use confab_protocol::Role;
use confab_protocol::ids::{ConversationId, DeviceId, Seq, UserId};

/// A user to create: the store assigns the id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    /// Already validated and normalised.
    pub username: String,
    /// PHC string (argon2id); never the password. Empty for a user of the
    /// app's sign-in.
    pub password_hash: String,
    /// When the user signed up (Unix ms).
    pub created_at_ms: u64,
    /// The name shown for the user; may be empty.
    pub display_name: String,
}

/// A stored user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Its id.
    pub id: UserId,
    /// Its normalised name.
    pub username: String,
    /// PHC string (argon2id); never the password.
    pub password_hash: String,
    /// When it signed up (Unix ms).
    pub created_at_ms: u64,
    /// The name shown for it; may be empty (then show the username).
    pub display_name: String,
}

/// A stored device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Its user.
    pub user: UserId,
    /// Its id.
    pub id: DeviceId,
    /// Its display name.
    pub name: String,
    /// SHA-256 of the current refresh secret.
    pub refresh_hash: [u8; 32],
    /// SHA-256 of the refresh secret it replaced (zeros: none): presenting that
    /// one again means the token was copied, and the device is logged out.
    pub previous_refresh_hash: [u8; 32],
    /// When its refresh token expires (Unix ms).
    pub refresh_expires_at_ms: u64,
    /// When it logged in first (Unix ms).
    pub created_at_ms: u64,
    /// When it last logged in or refreshed.
    pub refreshed_at_ms: u64,
}

/// A refresh-token rotation: it happens only if the device's current refresh
/// hash is still `expected` (so of two refreshes with one token, one wins, and a
/// device logged out meanwhile stays out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// The device's user.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
    /// The refresh hash it must still have.
    pub expected: [u8; 32],
    /// The new refresh hash.
    pub refresh_hash: [u8; 32],
    /// When the new refresh token expires (Unix ms).
    pub refresh_expires_at_ms: u64,
    /// When this refresh happened (Unix ms).
    pub refreshed_at_ms: u64,
}

/// A stored message, or a system message of a group change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    /// Its conversation.
    pub conversation: ConversationId,
    /// Its seq there.
    pub seq: Seq,
    /// Who sent it.
    pub sender: UserId,
    /// From which device.
    pub sender_device: DeviceId,
    /// The sender's idempotency key.
    pub client_msg_id: String,
    /// Empty for a system message.
    pub body: String,
    /// When the owner sequenced it (Unix ms).
    pub server_time_ms: u64,
    /// Set for a system message.
    pub event: Option<GroupEvent>,
    /// Set for an edit or a delete of an earlier message.
    pub amends: Option<Amendment>,
    /// Current state: deleted by a later message.
    pub deleted: bool,
    /// Current state: the body comes from this later edit.
    pub edited_by: Option<Seq>,
}

/// A message that changes an earlier one of the same author.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amendment {
    /// The body of this message replaces the target's.
    Edit(Seq),
    /// This message deletes the target.
    Delete(Seq),
}

/// What a send was stored as: its answer to a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredSend {
    /// Its seq.
    pub seq: Seq,
    /// When it was sequenced (Unix ms).
    pub server_time_ms: u64,
}

/// A change to a group, made by the sender of the system message that carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupEvent {
    /// The sender created the group and owns it; `members` includes the owner.
    Created {
        /// The group's title.
        title: String,
        /// Its members, the owner included.
        members: Vec<UserId>,
    },
    /// These users joined.
    MembersAdded(Vec<UserId>),
    /// This user was removed.
    MemberRemoved(UserId),
    /// The sender left; when it was the owner, `new_owner` owns the group now.
    MemberLeft {
        /// The owner (the sender's heir when it was the owner).
        new_owner: Option<UserId>,
    },
    /// The group has this title now.
    Renamed(String),
    /// This user has this role now.
    RoleChanged(UserId, Role),
}

impl GroupEvent {
    /// The membership records this event, sent by `actor` at `seq`, writes:
    /// `(user, role, left_seq)` — the store projections every backend keeps.
    pub fn member_updates(&self, actor: UserId, seq: Seq) -> Vec<(UserId, MemberRecord)> {
        let member = |role, left_seq| MemberRecord { role, left_seq };
        match self {
            Self::Created { members, .. } => members
                .iter()
                .map(|user| {
                    let role = if *user == actor { Role::Owner } else { Role::Member };
                    (*user, member(role, None))
                })
                .collect(),
            Self::MembersAdded(users) => users.iter().map(|user| (*user, member(Role::Member, None))).collect(),
            Self::MemberRemoved(user) => vec![(*user, member(Role::Member, Some(seq)))],
            Self::MemberLeft { new_owner } => std::iter::once((actor, member(Role::Member, Some(seq))))
                .chain(new_owner.map(|owner| (owner, member(Role::Owner, None))))
                .collect(),
            Self::RoleChanged(user, role) => vec![(*user, member(*role, None))],
            Self::Renamed(_) => Vec::new(),
        }
    }

    /// The title this event sets, if any.
    pub fn title(&self) -> Option<&str> {
        match self {
            Self::Created { title, .. } | Self::Renamed(title) => Some(title),
            _ => None,
        }
    }
}

/// A group as stored: its title and current members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    /// Its title.
    pub title: String,
    /// Its current members and their roles.
    pub members: Vec<(UserId, Role)>,
}

/// One user's membership of a group, current or past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberRecord {
    /// The role it has (or had).
    pub role: Role,
    /// Seq of the system message that removed the user (or that it sent to
    /// leave); `None` while a member. A former member may read history up to it.
    pub left_seq: Option<Seq>,
}

// Events are persisted in their protocol form, which is versioned and append-only.

impl From<&GroupEvent> for v1::GroupEvent {
    fn from(event: &GroupEvent) -> Self {
        use v1::group_event::Kind;
        let ids = |users: &[UserId]| users.iter().map(|user| user.get()).collect();
        let kind = match event {
            GroupEvent::Created { title, members } => Kind::Created(v1::GroupCreated {
                title: title.clone(),
                members: ids(members),
            }),
            GroupEvent::MembersAdded(users) => Kind::MembersAdded(v1::MembersAdded { user_ids: ids(users) }),
            GroupEvent::MemberRemoved(user) => Kind::MemberRemoved(v1::MemberRemoved { user_id: user.get() }),
            GroupEvent::MemberLeft { new_owner } => Kind::MemberLeft(v1::MemberLeft {
                new_owner_user_id: new_owner.map_or(0, UserId::get),
            }),
            GroupEvent::Renamed(title) => Kind::Renamed(v1::GroupRenamed { title: title.clone() }),
            GroupEvent::RoleChanged(user, role) => Kind::RoleChanged(v1::RoleChanged {
                user_id: user.get(),
                role: v1::Role::from(*role) as i32,
            }),
        };
        Self { kind: Some(kind) }
    }
}

impl GroupEvent {
    /// Reads an event back; `None` if it is not a valid event.
    pub fn from_proto(event: v1::GroupEvent) -> Option<Self> {
        use v1::group_event::Kind;
        let ids = |raw: Vec<u64>| raw.into_iter().map(UserId::new).collect::<Option<Vec<_>>>();
        Some(match event.kind? {
            Kind::Created(created) => Self::Created {
                title: created.title,
                members: ids(created.members)?,
            },
            Kind::MembersAdded(added) => Self::MembersAdded(ids(added.user_ids)?),
            Kind::MemberRemoved(removed) => Self::MemberRemoved(UserId::new(removed.user_id)?),
            Kind::MemberLeft(left) => Self::MemberLeft {
                new_owner: UserId::new(left.new_owner_user_id),
            },
            Kind::Renamed(renamed) => Self::Renamed(renamed.title),
            Kind::RoleChanged(changed) => {
                Self::RoleChanged(UserId::new(changed.user_id)?, Role::from_proto(changed.role)?)
            }
        })
    }
}

/// Where one of a user's conversations stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationHead {
    /// The conversation.
    pub conversation: ConversationId,
    /// Highest seq the user may see: the conversation's last seq, or for a former
    /// group member the seq that removed it.
    pub last_seq: Seq,
    /// Time of that message: what conversation lists are ordered by.
    pub last_time_ms: u64,
    /// Set for a former group member.
    pub left_seq: Option<Seq>,
    /// The user's read watermark: the highest seq any of its devices marked read.
    pub read_seq: Seq,
    /// A group's title.
    pub title: Option<String>,
}

impl ConversationHead {
    /// Where it stands in a list by activity: `(last_time_ms, conversation)`.
    pub fn activity(&self) -> (u64, ConversationId) {
        (self.last_time_ms, self.conversation)
    }
}

/// A user's notifications while its collapse window is open (docs/PUSH.md).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PendingPush {
    /// When the window opened (Unix ms).
    pub since_ms: u64,
    /// Messages in it.
    pub count: u64,
    /// Per conversation: its messages in the window and the last one.
    pub conversations: Vec<PendingConversation>,
}

/// One conversation's share of a [`PendingPush`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingConversation {
    /// The conversation.
    pub conversation: ConversationId,
    /// Its messages in the window.
    pub count: u64,
    /// The last one's seq.
    pub last_seq: Seq,
    /// Who sent the last one.
    pub sender: UserId,
    /// The last one's text (cut), or empty.
    pub body: String,
}
