//! The embedded store's part of the `GroupStore` contract: groups and their
//! members.

use super::keys::{decode_member, member_key, member_of_key};
use super::{EmbeddedStore, fjall_error};
use crate::store::{GroupRecord, GroupStore, MemberRecord, StoreError};
use async_trait::async_trait;
use confab_protocol::Role;
use confab_protocol::ids::{GroupId, UserId};

#[async_trait]
impl GroupStore for EmbeddedStore {
    async fn group(&self, group: GroupId) -> Result<Option<GroupRecord>, StoreError> {
        self.read(move |view| {
            let Some(title) = view.get(&view.groups, group.get().to_be_bytes()).map_err(fjall_error)? else {
                return Ok(None);
            };
            let title = String::from_utf8(title.to_vec()).map_err(|_| StoreError::corrupt("group title"))?;
            let mut members = Vec::new();
            for guard in view.prefix(&view.members, group.get().to_be_bytes()) {
                let (key, value) = guard.into_inner().map_err(fjall_error)?;
                let member = decode_member(&value)?;
                if member.left_seq.is_none() {
                    members.push((member_of_key(&key)?, member.role));
                }
            }
            Ok(Some(GroupRecord { title, members }))
        })
        .await
    }

    async fn member(&self, group: GroupId, user: UserId) -> Result<Option<MemberRecord>, StoreError> {
        self.read(move |view| {
            view.get(&view.members, member_key(group, user))
                .map_err(fjall_error)?
                .map(|value| decode_member(&value))
                .transpose()
        })
        .await
    }

    async fn members_page(
        &self,
        group: GroupId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<(Vec<(UserId, Role)>, bool), StoreError> {
        self.read(move |view| {
            let first = after.map_or(1, |user| user.get().saturating_add(1));
            let mut from = [0u8; 16];
            from[..8].copy_from_slice(&group.get().to_be_bytes());
            from[8..].copy_from_slice(&first.to_be_bytes());
            let mut to = [0xffu8; 16];
            to[..8].copy_from_slice(&group.get().to_be_bytes());
            let mut members = Vec::new();
            for guard in view.range(&view.members, from..=to) {
                let (key, value) = guard.into_inner().map_err(fjall_error)?;
                let member = decode_member(&value)?;
                if member.left_seq.is_none() {
                    if members.len() == limit {
                        return Ok((members, true));
                    }
                    members.push((member_of_key(&key)?, member.role));
                }
            }
            Ok((members, false))
        })
        .await
    }
}
