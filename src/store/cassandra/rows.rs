//! How confab's values are kept in CQL columns: ids and seqs as `bigint`,
//! roles as `tinyint`, days and buckets as partition keys; and how a driver
//! error or an undecodable row becomes a [`StoreError`].

use super::BUCKET_SIZE;
use crate::store::{DeviceRecord, StoreError, StoredSend};
use confab_protocol::Role;
use confab_protocol::ids::{DeviceId, Seq, UserId};

/// `user_activity` rows are per day of activity.
const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// The day `time_ms` falls in (days since the Unix epoch).
pub(super) fn day(time_ms: u64) -> i64 {
    to_cql(time_ms / DAY_MS)
}

/// The bucket holding `seq`.
pub fn bucket(seq: Seq) -> i64 {
    to_cql(seq / BUCKET_SIZE)
}

/// Ids and seqs are u64; CQL `bigint` is i64: the bits are kept as they are.
pub(super) fn to_cql(value: u64) -> i64 {
    i64::from_ne_bytes(value.to_ne_bytes())
}

pub(super) fn from_cql(value: i64) -> u64 {
    u64::from_ne_bytes(value.to_ne_bytes())
}

pub(super) fn stored_send(seq: i64, server_time_ms: i64) -> StoredSend {
    StoredSend {
        seq: from_cql(seq),
        server_time_ms: from_cql(server_time_ms),
    }
}

/// Maps a driver error: the database did not answer as asked.
pub(super) fn unavailable(err: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::unavailable_because("the database did not answer as asked", err)
}

pub(super) fn corrupt(err: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::corrupt_because("a row does not decode", err)
}

pub(super) fn role_code(role: Role) -> i8 {
    match role {
        Role::Member => 0,
        Role::Admin => 1,
        Role::Owner => 2,
    }
}

pub(super) fn role_of(code: i8) -> Result<Role, StoreError> {
    match code {
        0 => Ok(Role::Member),
        1 => Ok(Role::Admin),
        2 => Ok(Role::Owner),
        other => Err(StoreError::corrupt(format!("unknown role {other}"))),
    }
}

pub(super) fn user_id(raw: i64) -> Result<UserId, StoreError> {
    UserId::new(from_cql(raw)).ok_or_else(|| StoreError::corrupt("user id 0"))
}

pub(super) fn left(raw: Option<i64>) -> Option<Seq> {
    raw.map(from_cql).filter(|seq| *seq != 0)
}

/// The columns a device is read with, in [`DeviceRow`]'s order.
pub(super) const DEVICE_COLUMNS: &str =
    "device_id, name, refresh_hash, previous_refresh_hash, refresh_expires_at_ms, created_at_ms, refreshed_at_ms";
pub(super) type DeviceRow = (i64, String, Vec<u8>, Option<Vec<u8>>, i64, i64, Option<i64>);

pub(super) fn device_record(user: UserId, row: DeviceRow) -> Result<DeviceRecord, StoreError> {
    let (id, name, refresh_hash, previous_refresh_hash, refresh_expires_at_ms, created_at_ms, refreshed_at_ms) = row;
    let hash = |bytes: Vec<u8>| -> Result<[u8; 32], StoreError> {
        bytes
            .try_into()
            .map_err(|_| StoreError::corrupt("refresh hash is not 32 bytes"))
    };
    Ok(DeviceRecord {
        user,
        id: DeviceId::new(from_cql(id)).ok_or_else(|| StoreError::corrupt("device id 0"))?,
        name,
        refresh_hash: hash(refresh_hash)?,
        previous_refresh_hash: previous_refresh_hash.map(hash).transpose()?.unwrap_or([0; 32]),
        refresh_expires_at_ms: from_cql(refresh_expires_at_ms),
        created_at_ms: from_cql(created_at_ms),
        refreshed_at_ms: refreshed_at_ms.map_or(0, from_cql),
    })
}
