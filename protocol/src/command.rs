//! Commands: what a valid client request asks the server to do, with every field
//! already parsed into domain types.

use crate::content::Append;
use crate::credentials::{Password, PushToken, Username};
use crate::cursors::Cursors;
use crate::history::{HistoryRange, Marks};
use crate::ids::{ConversationId, DeviceId, GroupId, UserId};

/// A command and the request id its reply must echo.
#[derive(Debug)]
pub struct Request {
    /// The client's request id (0 for a request the session made itself).
    pub id: u64,
    /// What to do.
    pub command: Command,
}

/// A valid request. Fields named `user`, `device`, `reader` or `subscriber`
/// are the session's own identity, never a value the client chose.
#[derive(Debug)]
pub enum Command {
    /// Creates an account.
    SignUp {
        /// The new account's name.
        username: Username,
        /// Its password.
        password: Password,
    },
    /// Checks a password and registers a device with fresh tokens.
    LogIn {
        /// The account.
        username: Username,
        /// Its password.
        password: Password,
        /// The new device's display name, cleaned.
        device_name: String,
    },
    /// Binds the connection to a device with an access token.
    Authenticate {
        /// The token, checked by the server.
        access_token: String,
        /// Where a reconnecting device stands: replay what it missed first.
        resume: Option<Cursors>,
        /// The device the client names, for a JWT that names none.
        device: Option<String>,
    },
    /// Trades a refresh token for new tokens.
    RefreshToken {
        /// The token, checked (and rotated) by the server.
        refresh_token: String,
    },
    /// Removes this device and ends the connection's authentication.
    LogOut {
        /// The session's user.
        user: UserId,
        /// The session's device.
        device: DeviceId,
    },
    /// The user's devices.
    ListDevices {
        /// The session's user.
        user: UserId,
        /// The session's device, marked as current in the list.
        device: DeviceId,
    },
    /// Where the session's device is reached while it has no connection.
    RegisterPushToken {
        /// The session's user.
        user: UserId,
        /// The session's device.
        device: DeviceId,
        /// The token; `None` removes it.
        push: Option<PushToken>,
    },
    /// Mutes or unmutes a conversation in the user's push notifications.
    MuteConversation {
        /// The session's user.
        user: UserId,
        /// The conversation, one of the user's.
        conversation: ConversationId,
        /// Muted or not.
        muted: bool,
    },
    /// Log out another device of the user.
    RevokeDevice {
        /// The session's user.
        user: UserId,
        /// The device to log out (not the session's own).
        device: DeviceId,
    },
    /// New password for the session's user; every other device is logged out.
    ChangePassword {
        /// The password now, checked by the server.
        current: Password,
        /// The password from now on.
        new: Password,
    },
    /// Looks a user up by name.
    GetUser {
        /// Whom to find.
        username: Username,
    },
    /// A message or a group change, sequenced by the conversation's owner.
    Append(Append),
    /// A page of a conversation's history.
    History {
        /// Which conversation.
        conversation: ConversationId,
        /// The session's user, who must be (or have been) a member.
        reader: UserId,
        /// Which slice.
        range: HistoryRange,
        /// At most this many messages, already capped.
        limit: usize,
    },
    /// A page of a group's members.
    ListMembers {
        /// Which group.
        group: GroupId,
        /// The session's user, who must be a member.
        reader: UserId,
        /// Members with a user id above this one.
        after: Option<UserId>,
        /// At most this many, already capped.
        limit: usize,
    },
    /// What the device has not seen, across its conversations.
    Sync {
        /// The session's user.
        user: UserId,
        /// Where the device stands.
        cursors: Cursors,
        /// At most this many messages, already capped.
        limit: usize,
    },
    /// The user's conversations by last activity, newest first.
    ListConversations {
        /// The session's user.
        user: UserId,
        /// Last activity and id of the previous page's last conversation.
        after: Option<(u64, ConversationId)>,
        /// At most this many, already capped.
        limit: usize,
    },
    /// Raises the device's receipt watermarks.
    Mark {
        /// Which conversation.
        conversation: ConversationId,
        /// The session's user.
        user: UserId,
        /// The session's device.
        device: DeviceId,
        /// The watermarks asked for; never lowers them.
        marks: Marks,
    },
    /// Tells the other members the user is (no longer) typing.
    Typing {
        /// Which conversation.
        conversation: ConversationId,
        /// The session's user.
        user: UserId,
        /// The session's device.
        device: DeviceId,
        /// Typing now, or stopped.
        typing: bool,
    },
    /// Starts presence updates about `users`.
    SubscribePresence {
        /// The session's user.
        subscriber: UserId,
        /// Whom to watch: none 0, bounded, no repeats.
        users: Vec<UserId>,
    },
    /// Stops presence updates about `users`.
    UnsubscribePresence {
        /// The session's user.
        subscriber: UserId,
        /// Whom to stop watching.
        users: Vec<UserId>,
    },
}

impl Command {
    /// Commands that may run concurrently with later requests of the same
    /// connection. The others change or depend on the session's authentication
    /// state and run one at a time, in order.
    pub fn is_pipelined(&self) -> bool {
        matches!(
            self,
            Self::Append(_)
                | Self::History { .. }
                | Self::GetUser { .. }
                | Self::ListMembers { .. }
                | Self::Sync { .. }
                | Self::ListConversations { .. }
                | Self::Mark { .. }
                | Self::Typing { .. }
                | Self::SubscribePresence { .. }
                | Self::UnsubscribePresence { .. }
        )
    }

    /// Commands that only read: limited by the read rates, since each costs
    /// store reads (up to a page of them) for a few bytes of request.
    pub fn is_read(&self) -> bool {
        self.is_paged() || matches!(self, Self::GetUser { .. } | Self::SubscribePresence { .. })
    }

    /// Commands answered with a page read from the store, as large as a frame:
    /// what a connection may have in flight of them is bounded by bytes.
    pub fn is_paged(&self) -> bool {
        matches!(
            self,
            Self::History { .. } | Self::Sync { .. } | Self::ListConversations { .. } | Self::ListMembers { .. }
        )
    }
}
