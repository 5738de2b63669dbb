//! How the embedded store lays records out: keys (big-endian integers, so they
//! sort numerically) and the encodings of values. The layout itself is listed in
//! the module doc of [`super`].

use crate::store::{DeviceRecord, MemberRecord, StoreError, StoredSend};
use confab_proto::v1::PushPlatform;
use confab_protocol::ids::{ConversationId, DeviceId, GroupId, Seq, UserId};
use confab_protocol::{PushToken, Role};

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct StoredUser {
    #[prost(string, tag = "1")]
    pub(super) username: String,
    #[prost(string, tag = "2")]
    pub(super) password_hash: String,
    #[prost(uint64, tag = "3")]
    pub(super) created_at_ms: u64,
    #[prost(string, tag = "4")]
    pub(super) display_name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct StoredDevice {
    #[prost(string, tag = "1")]
    pub(super) name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub(super) refresh_hash: Vec<u8>,
    #[prost(uint64, tag = "3")]
    pub(super) refresh_expires_at_ms: u64,
    #[prost(uint64, tag = "4")]
    pub(super) created_at_ms: u64,
    #[prost(bytes = "vec", tag = "5")]
    pub(super) previous_refresh_hash: Vec<u8>,
    #[prost(uint64, tag = "6")]
    pub(super) refreshed_at_ms: u64,
}

impl StoredDevice {
    pub(super) fn of(device: &DeviceRecord) -> Self {
        Self {
            name: device.name.clone(),
            refresh_hash: device.refresh_hash.to_vec(),
            refresh_expires_at_ms: device.refresh_expires_at_ms,
            created_at_ms: device.created_at_ms,
            previous_refresh_hash: device.previous_refresh_hash.to_vec(),
            refreshed_at_ms: device.refreshed_at_ms,
        }
    }

    pub(super) fn into_record(self, user: UserId, id: DeviceId) -> Result<DeviceRecord, StoreError> {
        let hash = |bytes: Vec<u8>| -> Result<[u8; 32], StoreError> {
            match bytes.len() {
                // Devices stored before rotations were kept have no previous hash.
                0 => Ok([0; 32]),
                _ => bytes
                    .try_into()
                    .map_err(|_| StoreError::corrupt("device refresh hash is not 32 bytes")),
            }
        };
        Ok(DeviceRecord {
            user,
            id,
            name: self.name,
            refresh_hash: hash(self.refresh_hash)?,
            previous_refresh_hash: hash(self.previous_refresh_hash)?,
            refresh_expires_at_ms: self.refresh_expires_at_ms,
            created_at_ms: self.created_at_ms,
            refreshed_at_ms: self.refreshed_at_ms,
        })
    }
}

pub(super) fn device_of_key(key: &[u8]) -> Result<(UserId, DeviceId), StoreError> {
    let id = |range: std::ops::Range<usize>| key.get(range).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
    id(0..8)
        .and_then(UserId::new)
        .zip(id(8..16).and_then(DeviceId::new))
        .ok_or_else(|| StoreError::corrupt("device key"))
}

pub(super) fn device_key(user: UserId, device: DeviceId) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&user.get().to_be_bytes());
    key[8..].copy_from_slice(&device.get().to_be_bytes());
    key
}

pub(super) fn message_key(conversation: ConversationId, seq: Seq) -> Vec<u8> {
    let prefix = conversation.to_key();
    let mut key = Vec::with_capacity(prefix.as_ref().len() + 8);
    key.extend_from_slice(prefix.as_ref());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

pub(super) fn user_conv_key(user: UserId, conversation: ConversationId) -> Vec<u8> {
    let mut key = user.get().to_be_bytes().to_vec();
    key.extend_from_slice(conversation.to_key().as_ref());
    key
}

/// The conversation a key (from `to_key`) names.
pub(super) fn conversation_of_key(key: &[u8]) -> Result<ConversationId, StoreError> {
    let id = |range: std::ops::Range<usize>| key.get(range).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
    let parsed = match (key.first(), key.len()) {
        (Some(b'd'), 17) => id(1..9)
            .and_then(UserId::new)
            .zip(id(9..17).and_then(UserId::new))
            .map(|(low, high)| ConversationId::Direct { low, high }),
        (Some(b'g'), 9) => id(1..9).and_then(GroupId::new).map(ConversationId::Group),
        _ => None,
    };
    parsed.ok_or_else(|| StoreError::corrupt("conversation key"))
}

/// A `user_convs` value: the seq the user left at and that message's time (for a
/// current member `0, 0`; entries written before the time was kept hold the seq
/// alone).
pub(super) fn decode_user_conversation(value: &[u8]) -> Result<(Option<Seq>, Option<u64>), StoreError> {
    let (left_seq, left_time_ms) = match value.len() {
        8 => (value.try_into().map(u64::from_be_bytes).unwrap_or_default(), 0),
        _ => decode_pair(value)?,
    };
    let left_seq = (left_seq != 0).then_some(left_seq);
    Ok((left_seq, left_seq.and((left_time_ms != 0).then_some(left_time_ms))))
}

/// Two big-endian u64s.
pub(super) fn encode_pair(first: u64, second: u64) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&first.to_be_bytes());
    value[8..].copy_from_slice(&second.to_be_bytes());
    value
}

/// The two u64s of [`encode_pair`].
pub(super) fn decode_pair(value: &[u8]) -> Result<(u64, u64), StoreError> {
    let field =
        |range: std::ops::Range<usize>| value.get(range).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
    field(0..8)
        .zip(field(8..16))
        .ok_or_else(|| StoreError::corrupt("pair of u64"))
}

pub(super) fn member_key(group: GroupId, user: UserId) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&group.get().to_be_bytes());
    key[8..].copy_from_slice(&user.get().to_be_bytes());
    key
}

pub(super) fn member_of_key(key: &[u8]) -> Result<UserId, StoreError> {
    key.get(8..16)
        .and_then(|bytes| bytes.try_into().ok())
        .map(u64::from_be_bytes)
        .and_then(UserId::new)
        .ok_or_else(|| StoreError::corrupt("member key"))
}

/// Role byte, then the seq the member left at (0 while a member).
pub(super) fn encode_member(member: MemberRecord) -> [u8; 9] {
    let mut value = [0u8; 9];
    value[0] = match member.role {
        Role::Member => 1,
        Role::Admin => 2,
        Role::Owner => 3,
    };
    value[1..].copy_from_slice(&member.left_seq.unwrap_or(0).to_be_bytes());
    value
}

pub(super) fn decode_member(value: &[u8]) -> Result<MemberRecord, StoreError> {
    let corrupt = || StoreError::corrupt("member record");
    let role = match value.first() {
        Some(1) => Role::Member,
        Some(2) => Role::Admin,
        Some(3) => Role::Owner,
        _ => return Err(corrupt()),
    };
    let left = value
        .get(1..9)
        .and_then(|bytes| bytes.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(corrupt)?;
    Ok(MemberRecord {
        role,
        left_seq: (left != 0).then_some(left),
    })
}

pub(super) fn send_key(conversation: ConversationId, device: DeviceId, client_msg_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(25 + client_msg_id.len());
    key.extend_from_slice(conversation.to_key().as_ref());
    key.extend_from_slice(&device.get().to_be_bytes());
    key.extend_from_slice(client_msg_id.as_bytes());
    key
}

pub(super) fn decode_send(value: &[u8]) -> Result<StoredSend, StoreError> {
    let field =
        |range: std::ops::Range<usize>| value.get(range).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
    match (field(0..8), field(8..16)) {
        (Some(seq), Some(server_time_ms)) if value.len() == 16 => Ok(StoredSend { seq, server_time_ms }),
        _ => Err(StoreError::corrupt("send record is not 16 bytes")),
    }
}

pub(super) fn seq_of_key(key: &[u8]) -> Result<Seq, StoreError> {
    key.len()
        .checked_sub(8)
        .and_then(|start| key[start..].try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::corrupt("message key too short"))
}

pub(super) fn decode_user_id(bytes: &[u8]) -> Result<UserId, StoreError> {
    bytes
        .try_into()
        .ok()
        .map(u64::from_be_bytes)
        .and_then(UserId::new)
        .ok_or_else(|| StoreError::corrupt("username index holds an invalid user id"))
}

/// A push token's value: its platform (one byte) ++ the token.
pub(super) fn encode_push_token(token: &PushToken) -> Vec<u8> {
    let platform = u8::try_from(token.platform as i32).unwrap_or(0);
    let mut value = Vec::with_capacity(1 + token.token.len());
    value.push(platform);
    value.extend_from_slice(token.token.as_bytes());
    value
}

pub(super) fn decode_push_token(value: &[u8]) -> Result<PushToken, StoreError> {
    let corrupt = || StoreError::corrupt("push token");
    let (platform, token) = value.split_first().ok_or_else(corrupt)?;
    let platform = PushPlatform::try_from(i32::from(*platform)).map_err(|_| corrupt())?;
    let token = String::from_utf8(token.to_vec()).map_err(|_| corrupt())?;
    Ok(PushToken { platform, token })
}
