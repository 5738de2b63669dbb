//! The Cassandra store's part of the `ConversationStore` contract: each user's
//! conversations and receipt watermarks.

use super::reads::read_all;
use super::rows::{corrupt, day, to_cql};
use super::{ACTIVITY_ROWS_PER_READ, CassandraStore};
use crate::store::{ConversationHead, ConversationStore, StoreError, page_by_activity};
use async_trait::async_trait;
use confab_protocol::Marks;
use confab_protocol::ids::{ConversationId, DeviceId, UserId};
use std::collections::HashSet;

#[async_trait]
impl ConversationStore for CassandraStore {
    async fn conversations(&self, user: UserId) -> Result<Vec<ConversationHead>, StoreError> {
        self.read_on_driver(move |inner| async move {
            let rows: Vec<(String, Option<i64>, Option<i64>)> = inner
                .rows(&inner.statements.user_conversations, (to_cql(user.get()),))
                .await?;
            let heads = rows.into_iter().map(|(key, left_seq, left_time_ms)| {
                let inner = inner.clone();
                async move {
                    let conversation = ConversationId::parse(&key).map_err(corrupt)?;
                    inner
                        .conversation_head(user, conversation, left_seq, left_time_ms)
                        .await
                }
            });
            Ok(read_all(heads).await?.into_iter().flatten().collect())
        })
        .await
    }

    /// Reads `user_activity` newest day first, a day at a time, until the days
    /// read hold more than `limit` conversations after `after`: any conversation
    /// not read yet was last active on an earlier day.
    async fn recent_conversations(
        &self,
        user: UserId,
        after: Option<(u64, ConversationId)>,
        limit: usize,
    ) -> Result<(Vec<ConversationHead>, bool), StoreError> {
        self.read_on_driver(move |inner| async move {
            // Rows sort by (day, conversation) descending: read below this bound.
            let first_day = after.map_or(i64::MAX, |(time_ms, _)| day(time_ms).saturating_add(1));
            let mut bound = (first_day, String::new());
            let mut seen = HashSet::new();
            let mut found = Vec::new();
            let mut day_read = None;
            let mut fresh = Vec::new();
            loop {
                let rows: Vec<(i64, String)> = inner
                    .rows(
                        &inner.statements.activity,
                        (
                            to_cql(user.get()),
                            bound.0,
                            bound.1.clone(),
                            ACTIVITY_ROWS_PER_READ as i32,
                        ),
                    )
                    .await?;
                let exhausted = rows.len() < ACTIVITY_ROWS_PER_READ;
                for (row_day, key) in rows {
                    if day_read != Some(row_day) {
                        // Every row of the days before was read.
                        found.extend(inner.heads_after(user, std::mem::take(&mut fresh), after).await?);
                        if found.len() > limit {
                            return Ok(page_by_activity(found, after, limit));
                        }
                        day_read = Some(row_day);
                    }
                    let conversation = ConversationId::parse(&key).map_err(corrupt)?;
                    if seen.insert(conversation) {
                        fresh.push(conversation);
                    }
                    bound = (row_day, key);
                }
                if exhausted {
                    break;
                }
            }
            found.extend(inner.heads_after(user, fresh, after).await?);
            Ok(page_by_activity(found, after, limit))
        })
        .await
    }

    async fn mark(
        &self,
        conversation: ConversationId,
        user: UserId,
        device: DeviceId,
        marks: Marks,
    ) -> Result<(Marks, bool), StoreError> {
        self.writer.mark(conversation, user, device, marks).await
    }
}
