//! Commands: what a valid client request asks the server to do, with every field
//! already parsed into domain types.

use crate::content::Append;
use crate::credentials::{Password, Username};
use crate::cursors::Cursors;
use crate::history::{HistoryRange, Marks};
use crate::ids::{ConversationId, DeviceId, GroupId, UserId};

/// A command and the request id its reply must echo.
#[derive(Debug)]
pub struct Request {
    pub id: u64,
    pub command: Command,
}

#[derive(Debug)]
pub enum Command {
    SignUp {
        username: Username,
        password: Password,
    },
    LogIn {
        username: Username,
        password: Password,
        device_name: String,
    },
    Authenticate {
        access_token: String,
        /// Where a reconnecting device stands: replay what it missed first.
        resume: Option<Cursors>,
    },
    RefreshToken {
        refresh_token: String,
    },
    LogOut {
        user: UserId,
        device: DeviceId,
    },
    ListDevices {
        user: UserId,
        device: DeviceId,
    },
    /// Log out another device of the user.
    RevokeDevice {
        user: UserId,
        device: DeviceId,
    },
    /// New password for the session's user; every other device is logged out.
    ChangePassword {
        current: Password,
        new: Password,
    },
    GetUser {
        username: Username,
    },
    /// A message or a group change, sequenced by the conversation's owner.
    Append(Append),
    History {
        conversation: ConversationId,
        reader: UserId,
        range: HistoryRange,
        limit: usize,
    },
    ListMembers {
        group: GroupId,
        reader: UserId,
        after: Option<UserId>,
        limit: usize,
    },
    Sync {
        user: UserId,
        cursors: Cursors,
        limit: usize,
    },
    ListConversations {
        user: UserId,
        /// Last activity and id of the previous page's last conversation.
        after: Option<(u64, ConversationId)>,
        limit: usize,
    },
    Mark {
        conversation: ConversationId,
        user: UserId,
        device: DeviceId,
        marks: Marks,
    },
    Typing {
        conversation: ConversationId,
        user: UserId,
        device: DeviceId,
        typing: bool,
    },
    SubscribePresence {
        subscriber: UserId,
        users: Vec<UserId>,
    },
    UnsubscribePresence {
        subscriber: UserId,
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
