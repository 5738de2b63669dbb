//! What one node tells another through its inbox, as typed values, and their
//! encoding (`proto/confab/cluster/v1/bus.proto`). Decoding checks every id
//! and field: an entry that does not decode is logged and dropped by the
//! receiver, never trusted.

use super::Incarnation;
use bytes::Bytes;
use confab_proto::ProstMessage as _;
use confab_proto::cluster::v1 as wire;
use confab_proto::v1::ErrorCode;
use confab_protocol::ids::{ConversationId, DeviceId, Seq, UserId};
use confab_protocol::{Append, Content, GroupCommand, Role};

/// One inbox entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope {
    /// An append for the node that sequences its conversation; answered with
    /// an [`Envelope::Answer`] of the same token to `reply_to`.
    Forward {
        /// Chosen by the sender, unique among its forwards in flight.
        token: u64,
        /// The node waiting for the answer.
        reply_to: Incarnation,
        /// What the client sent.
        append: Append,
    },
    /// The sequencing node's answer to a forward.
    Answer {
        /// The forward's token.
        token: u64,
        /// Its ack, or why it was refused.
        answer: Answer,
    },
    /// Frames for the sessions of some users on the receiving node.
    Relay(Vec<Relayed>),
    /// Who has sessions on the sending node.
    Presence(Sessions),
}

/// Which users have sessions on a node, as one of its presence homes (a
/// shard) sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sessions {
    /// The node.
    pub node: Incarnation,
    /// The home (shard) of that node that tells.
    pub home: u32,
    /// `online` is the home's whole set, replacing what was known from it.
    pub snapshot: bool,
    /// Users that gained their first session on the node (or all of them).
    pub online: Vec<UserId>,
    /// Users that lost their last session there.
    pub offline: Vec<UserId>,
}

/// The answer to a forwarded append.
pub type Answer = Result<Acked, Refusal>;

/// A forwarded append was stored under this seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    /// Its seq.
    pub seq: Seq,
    /// When the sequencing node stored it.
    pub server_time_ms: u64,
}

/// A forwarded append was refused, or could not be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// The code its client sees.
    pub code: ErrorCode,
    /// The text its client sees.
    pub message: String,
}

impl Refusal {
    /// A refusal the client should retry, ideally elsewhere.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Unavailable,
            message: message.into(),
        }
    }
}

/// One encoded frame for the sessions of some users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    /// The conversation it belongs to.
    pub conversation: ConversationId,
    /// Its seq; 0 for a push that is not part of the history.
    pub seq: Seq,
    /// The encoded server frame.
    pub frame: Bytes,
    /// Who gets it.
    pub users: Vec<UserId>,
    /// The device that sent it: it got an ack instead.
    pub skip_device: Option<(UserId, DeviceId)>,
}

/// Why an entry was not understood.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Not a protobuf `Entry`.
    #[error("not an inbox entry")]
    Decode(#[from] prost::DecodeError),
    /// A field is missing or out of range.
    #[error("bad {0}")]
    Invalid(&'static str),
}

impl Envelope {
    /// The encoded entry.
    pub fn encode(&self) -> Bytes {
        let kind = match self {
            Self::Forward {
                token,
                reply_to,
                append,
            } => wire::entry::Kind::Forward(forward(*token, *reply_to, append)),
            Self::Answer { token, answer } => wire::entry::Kind::Answer(wire::Answer {
                token: *token,
                result: Some(match answer {
                    Ok(acked) => wire::answer::Result::Acked(wire::Acked {
                        seq: acked.seq,
                        server_time_ms: acked.server_time_ms,
                    }),
                    Err(refusal) => wire::answer::Result::Refused(wire::Refused {
                        code: refusal.code as i32,
                        message: refusal.message.clone(),
                    }),
                }),
            }),
            Self::Relay(deliveries) => wire::entry::Kind::Relay(wire::Relay {
                deliveries: deliveries.iter().map(delivery).collect(),
            }),
            Self::Presence(sessions) => {
                let ids = |users: &[UserId]| users.iter().map(|user| user.get()).collect();
                wire::entry::Kind::Presence(wire::Presence {
                    node: sessions.node.get(),
                    home: sessions.home,
                    snapshot: sessions.snapshot,
                    online: ids(&sessions.online),
                    offline: ids(&sessions.offline),
                })
            }
        };
        Bytes::from(wire::Entry { kind: Some(kind) }.encode_to_vec())
    }

    /// Reads an encoded entry.
    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let entry = wire::Entry::decode(bytes)?;
        match entry.kind.ok_or(EnvelopeError::Invalid("entry kind"))? {
            wire::entry::Kind::Forward(forward) => Ok(Self::Forward {
                token: forward.token,
                reply_to: Incarnation::new(forward.reply_to),
                append: append(forward)?,
            }),
            wire::entry::Kind::Answer(answer) => Ok(Self::Answer {
                token: answer.token,
                answer: match answer.result.ok_or(EnvelopeError::Invalid("answer"))? {
                    wire::answer::Result::Acked(acked) => Ok(Acked {
                        seq: acked.seq,
                        server_time_ms: acked.server_time_ms,
                    }),
                    wire::answer::Result::Refused(refused) => Err(Refusal {
                        code: ErrorCode::try_from(refused.code).map_err(|_| EnvelopeError::Invalid("error code"))?,
                        message: refused.message,
                    }),
                },
            }),
            wire::entry::Kind::Relay(relay) => Ok(Self::Relay(
                relay.deliveries.into_iter().map(relayed).collect::<Result<_, _>>()?,
            )),
            wire::entry::Kind::Presence(presence) => Ok(Self::Presence(Sessions {
                node: Incarnation::new(presence.node),
                home: presence.home,
                snapshot: presence.snapshot,
                online: users(presence.online)?,
                offline: users(presence.offline)?,
            })),
        }
    }
}

fn forward(token: u64, reply_to: Incarnation, append: &Append) -> wire::Forward {
    use wire::forward::Content as Wire;
    let content = match &append.content {
        Content::Text(body) => Wire::Text(body.clone()),
        Content::Edit { target, body } => Wire::Edit(wire::Edit {
            target: *target,
            body: body.clone(),
        }),
        Content::Delete { target } => Wire::Delete(*target),
        Content::Group(command) => Wire::Group(group_change(command)),
    };
    wire::Forward {
        token,
        reply_to: reply_to.get(),
        conversation: append.conversation.to_string(),
        sender: append.sender.get(),
        sender_device: append.sender_device.get(),
        client_msg_id: append.client_msg_id.clone(),
        content: Some(content),
    }
}

fn group_change(command: &GroupCommand) -> wire::GroupChange {
    use wire::group_change::Change;
    let ids = |users: &[UserId]| users.iter().map(|user| user.get()).collect();
    let change = match command {
        GroupCommand::Create { title, members } => Change::Create(wire::Create {
            title: title.clone(),
            members: ids(members),
        }),
        GroupCommand::Add(users) => Change::Add(wire::Users { users: ids(users) }),
        GroupCommand::Remove(user) => Change::Remove(user.get()),
        GroupCommand::Leave => Change::Leave(true),
        GroupCommand::Rename(title) => Change::Rename(title.clone()),
        GroupCommand::SetRole(user, role) => Change::SetRole(wire::SetRole {
            user: user.get(),
            role: confab_proto::v1::Role::from(*role) as i32,
        }),
    };
    wire::GroupChange { change: Some(change) }
}

fn delivery(relayed: &Relayed) -> wire::Delivery {
    let (skip_user, skip_device) = relayed
        .skip_device
        .map_or((0, 0), |(user, device)| (user.get(), device.get()));
    wire::Delivery {
        conversation: relayed.conversation.to_string(),
        seq: relayed.seq,
        frame: relayed.frame.clone(),
        users: relayed.users.iter().map(|user| user.get()).collect(),
        skip_user,
        skip_device,
    }
}

fn conversation(text: &str) -> Result<ConversationId, EnvelopeError> {
    ConversationId::parse(text).map_err(|_| EnvelopeError::Invalid("conversation id"))
}

fn user(id: u64) -> Result<UserId, EnvelopeError> {
    UserId::new(id).ok_or(EnvelopeError::Invalid("user id"))
}

fn users(ids: Vec<u64>) -> Result<Vec<UserId>, EnvelopeError> {
    ids.into_iter().map(user).collect()
}

fn append(forward: wire::Forward) -> Result<Append, EnvelopeError> {
    use wire::forward::Content as Wire;
    let content = match forward.content.ok_or(EnvelopeError::Invalid("content"))? {
        Wire::Text(body) => Content::Text(body),
        Wire::Edit(edit) => Content::Edit {
            target: edit.target,
            body: edit.body,
        },
        Wire::Delete(target) => Content::Delete { target },
        Wire::Group(change) => Content::Group(group_command(change)?),
    };
    Ok(Append {
        conversation: conversation(&forward.conversation)?,
        sender: user(forward.sender)?,
        sender_device: DeviceId::new(forward.sender_device).ok_or(EnvelopeError::Invalid("device id"))?,
        client_msg_id: forward.client_msg_id,
        content,
    })
}

fn group_command(change: wire::GroupChange) -> Result<GroupCommand, EnvelopeError> {
    use wire::group_change::Change;
    Ok(match change.change.ok_or(EnvelopeError::Invalid("group change"))? {
        Change::Create(create) => GroupCommand::Create {
            title: create.title,
            members: users(create.members)?,
        },
        Change::Add(added) => GroupCommand::Add(users(added.users)?),
        Change::Remove(removed) => GroupCommand::Remove(user(removed)?),
        Change::Leave(_) => GroupCommand::Leave,
        Change::Rename(title) => GroupCommand::Rename(title),
        Change::SetRole(set) => GroupCommand::SetRole(
            user(set.user)?,
            Role::from_proto(set.role).ok_or(EnvelopeError::Invalid("role"))?,
        ),
    })
}

fn relayed(delivery: wire::Delivery) -> Result<Relayed, EnvelopeError> {
    let skip_device = match (delivery.skip_user, delivery.skip_device) {
        (0, 0) => None,
        (user_id, device) => Some((
            user(user_id)?,
            DeviceId::new(device).ok_or(EnvelopeError::Invalid("device id"))?,
        )),
    };
    Ok(Relayed {
        conversation: conversation(&delivery.conversation)?,
        seq: delivery.seq,
        frame: delivery.frame,
        users: users(delivery.users)?,
        skip_device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(raw: u64) -> UserId {
        UserId::new(raw).unwrap()
    }

    fn forward_of(content: Content) -> Envelope {
        Envelope::Forward {
            token: 7,
            reply_to: Incarnation::new(0xfeed),
            append: Append {
                conversation: ConversationId::direct(id(3), id(9)),
                sender: id(3),
                sender_device: DeviceId::new(5).unwrap(),
                client_msg_id: "m-1".into(),
                content,
            },
        }
    }

    #[test]
    fn every_kind_of_entry_reads_back_as_written() {
        let entries = [
            forward_of(Content::Text("hi".into())),
            forward_of(Content::Edit {
                target: 4,
                body: "fixed".into(),
            }),
            forward_of(Content::Delete { target: 4 }),
            forward_of(Content::Group(GroupCommand::Create {
                title: "t".into(),
                members: vec![id(9), id(11)],
            })),
            forward_of(Content::Group(GroupCommand::Add(vec![id(12)]))),
            forward_of(Content::Group(GroupCommand::Remove(id(12)))),
            forward_of(Content::Group(GroupCommand::Leave)),
            forward_of(Content::Group(GroupCommand::Rename("u".into()))),
            forward_of(Content::Group(GroupCommand::SetRole(id(9), Role::Admin))),
            Envelope::Answer {
                token: 7,
                answer: Ok(Acked {
                    seq: 41,
                    server_time_ms: 1_700_000_000_000,
                }),
            },
            Envelope::Answer {
                token: 8,
                answer: Err(Refusal {
                    code: ErrorCode::Forbidden,
                    message: "not a member of this conversation".into(),
                }),
            },
            Envelope::Relay(vec![
                Relayed {
                    conversation: ConversationId::direct(id(3), id(9)),
                    seq: 41,
                    frame: Bytes::from_static(b"\x00\x00\x00\x01x"),
                    users: vec![id(3), id(9)],
                    skip_device: Some((id(3), DeviceId::new(5).unwrap())),
                },
                Relayed {
                    conversation: ConversationId::direct(id(3), id(9)),
                    seq: 0,
                    frame: Bytes::from_static(b"typing"),
                    users: vec![id(9)],
                    skip_device: None,
                },
            ]),
            Envelope::Presence(Sessions {
                node: Incarnation::new(0xbeef),
                home: 1,
                snapshot: false,
                online: vec![id(3)],
                offline: vec![id(9), id(11)],
            }),
            Envelope::Presence(Sessions {
                node: Incarnation::new(0xbeef),
                home: 0,
                snapshot: true,
                online: vec![],
                offline: vec![],
            }),
        ];
        for entry in entries {
            assert_eq!(Envelope::decode(&entry.encode()).unwrap(), entry);
        }
    }

    #[test]
    fn an_entry_with_a_bad_id_or_nothing_in_it_is_refused() {
        assert!(Envelope::decode(b"\xff\xff").is_err());
        assert!(Envelope::decode(&[]).is_err(), "no kind");
        let mut bad = match forward_of(Content::Text("x".into())) {
            Envelope::Forward {
                token,
                reply_to,
                append,
            } => forward(token, reply_to, &append),
            _ => unreachable!(),
        };
        bad.conversation = "d:9:3".into();
        let bytes = wire::Entry {
            kind: Some(wire::entry::Kind::Forward(bad.clone())),
        }
        .encode_to_vec();
        assert!(matches!(
            Envelope::decode(&bytes),
            Err(EnvelopeError::Invalid("conversation id"))
        ));
        bad.conversation = "d:3:9".into();
        bad.sender = 0;
        let bytes = wire::Entry {
            kind: Some(wire::entry::Kind::Forward(bad)),
        }
        .encode_to_vec();
        assert!(matches!(
            Envelope::decode(&bytes),
            Err(EnvelopeError::Invalid("user id"))
        ));
    }
}
