//! The Cassandra store's part of the `GroupStore` contract: groups and their
//! members.

use super::CassandraStore;
use super::rows::{left, role_of, to_cql};
use crate::store::{GroupRecord, GroupStore, MemberRecord, StoreError};
use async_trait::async_trait;
use confab_protocol::Role;
use confab_protocol::ids::{GroupId, UserId};

#[async_trait]
impl GroupStore for CassandraStore {
    async fn group(&self, group: GroupId) -> Result<Option<GroupRecord>, StoreError> {
        self.read_on_driver(move |inner| async move {
            let titles: Vec<(Option<String>,)> = inner.rows(&inner.statements.title, (to_cql(group.get()),)).await?;
            let Some((title,)) = titles.into_iter().next() else {
                return Ok(None);
            };
            Ok(Some(GroupRecord {
                title: title.unwrap_or_default(),
                members: inner.current_members(group).await?,
            }))
        })
        .await
    }

    async fn member(&self, group: GroupId, user: UserId) -> Result<Option<MemberRecord>, StoreError> {
        self.read_on_driver(move |inner| async move {
            let rows: Vec<(i8, Option<i64>)> = inner
                .rows(&inner.statements.member, (to_cql(group.get()), to_cql(user.get())))
                .await?;
            rows.into_iter()
                .next()
                .map(|(role, left_seq)| {
                    Ok(MemberRecord {
                        role: role_of(role)?,
                        left_seq: left(left_seq),
                    })
                })
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
        let members = match self.group(group).await? {
            Some(record) => record.members,
            None => return Ok((Vec::new(), false)),
        };
        let mut page: Vec<(UserId, Role)> = members
            .into_iter()
            .filter(|(user, _)| after.is_none_or(|after| user.get() > after.get()))
            .take(limit + 1)
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        Ok((page, more))
    }
}
