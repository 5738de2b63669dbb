//! Who may see a conversation: the one membership check every read and signal
//! makes.
//!
//! A direct conversation's members are in its id (the session checked them when
//! it parsed the request); a group's are in the store. A former group member
//! still reads the history up to the message that removed it, but sends,
//! lists members and types no more.

use super::ChatError;
use crate::store::Store;
use confab_protocol::ids::{ConversationId, Seq, UserId};

/// What a user is to a conversation it may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A member: everything.
    Member,
    /// A former group member: history up to `left_seq`.
    Former {
        /// The seq of the message that removed it (or that it sent to leave).
        left_seq: Seq,
    },
}

/// The refusal for a user who is not (or never was) a member.
pub const NOT_A_MEMBER: ChatError = ChatError::Forbidden("not a member of this conversation");

impl Access {
    /// The highest seq this user may see of a conversation whose last is `last_seq`.
    pub fn visible(self, last_seq: Seq) -> Seq {
        match self {
            Self::Member => last_seq,
            Self::Former { left_seq } => left_seq.min(last_seq),
        }
    }

    /// Refuses a former member.
    pub fn current(self) -> Result<(), ChatError> {
        match self {
            Self::Member => Ok(()),
            Self::Former { .. } => Err(NOT_A_MEMBER),
        }
    }
}

/// What `user` is to `conversation`; refused when it never was a member.
pub async fn access(store: &dyn Store, conversation: ConversationId, user: UserId) -> Result<Access, ChatError> {
    let ConversationId::Group(group) = conversation else {
        return Ok(Access::Member);
    };
    match store.member(group, user).await? {
        None => Err(NOT_A_MEMBER),
        Some(member) => Ok(match member.left_seq {
            None => Access::Member,
            Some(left_seq) => Access::Former { left_seq },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_former_member_sees_up_to_its_leaving() {
        assert_eq!(Access::Member.visible(40), 40);
        assert_eq!(Access::Former { left_seq: 12 }.visible(40), 12);
        assert_eq!(Access::Former { left_seq: 12 }.visible(9), 9);
        assert!(Access::Member.current().is_ok());
        assert!(Access::Former { left_seq: 12 }.current().is_err());
    }
}
