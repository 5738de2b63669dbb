//! Records the store keeps, independent of how a backend lays them out.

use crate::ids::{ConversationId, DeviceId, Seq, UserId};

/// A user to create: the store assigns the id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    /// Already validated and normalised.
    pub username: String,
    /// PHC string (argon2id); never the password.
    pub password_hash: String,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: UserId,
    pub username: String,
    pub password_hash: String,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub user: UserId,
    pub id: DeviceId,
    pub name: String,
    /// SHA-256 of the current refresh secret.
    pub refresh_hash: [u8; 32],
    pub refresh_expires_at_ms: u64,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    pub conversation: ConversationId,
    pub seq: Seq,
    pub sender: UserId,
    pub sender_device: DeviceId,
    pub client_msg_id: String,
    pub body: String,
    pub server_time_ms: u64,
}

/// What a send was stored as: its answer to a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredSend {
    pub seq: Seq,
    pub server_time_ms: u64,
}
