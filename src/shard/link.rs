//! The node as other nodes of a cluster see it ([`crate::cluster::Local`]):
//! a forwarded append goes to its conversation's owner shard like a local one
//! (marked, so it is never forwarded again), and relayed frames go to their
//! conversation's owner shard, which puts them in order with this node's own
//! commits and hands them to the shards holding their recipients.

use super::ShardId;
use super::mesh::{AppendReply, Delivery, Mesh, ShardMsg};
use crate::chat::ChatError;
use crate::cluster::envelope::{Acked, Refusal, Relayed, Sessions};
use crate::cluster::peers::PendingAnswer;
use async_trait::async_trait;
use confab_protocol::{Append, ErrorKind as _};
use std::sync::Arc;

/// The shards of this node, reached through the mesh.
#[derive(Debug, Clone)]
pub struct NodeLink {
    mesh: Mesh,
}

impl NodeLink {
    /// The node whose shards `mesh` reaches.
    pub fn new(mesh: Mesh) -> Self {
        Self { mesh }
    }
}

#[async_trait]
impl crate::cluster::Local for NodeLink {
    async fn submit(&self, append: Append) -> PendingAnswer {
        let owner = self.mesh.owner_of(append.conversation);
        let (reply, answered) = AppendReply::forwarded(owner);
        if self.mesh.send(owner, ShardMsg::Append(append, reply)).await.is_err() {
            return Box::pin(std::future::ready(Err(refusal(&ChatError::ShuttingDown))));
        }
        Box::pin(async move {
            match answered.await {
                Ok(Ok(ack)) => Ok(Acked {
                    seq: ack.seq,
                    server_time_ms: ack.server_time_ms,
                }),
                Ok(Err(err)) => Err(refusal(&err)),
                Err(_) => Err(refusal(&ChatError::ShuttingDown)),
            }
        })
    }

    async fn deliver(&self, relayed: Vec<Relayed>) {
        // Each conversation's owner shard puts them in order with this node's
        // own commits (continuity) and hands them to the shards with recipients.
        let mut per_owner: Vec<Vec<Delivery>> = vec![Vec::new(); self.mesh.shard_count()];
        for relayed in relayed {
            per_owner[self.mesh.owner_of(relayed.conversation).0].push(Delivery {
                conversation: relayed.conversation,
                seq: relayed.seq,
                frame: relayed.frame,
                committed_at: None,
                users: Arc::from(relayed.users),
                skip_device: relayed.skip_device,
            });
        }
        for (index, deliveries) in per_owner.into_iter().enumerate() {
            // A stopped shard has no sessions left.
            if !deliveries.is_empty() {
                let _ = self.mesh.send(ShardId(index), ShardMsg::Relayed(deliveries)).await;
            }
        }
    }
    async fn presence(&self, sessions: Sessions) {
        // Each user's presence home here takes its part; a snapshot goes to
        // every home, since it also says who is no longer there.
        let shards = self.mesh.shard_count();
        let mut parts: Vec<Sessions> = (0..shards)
            .map(|_| Sessions {
                node: sessions.node,
                home: sessions.home,
                snapshot: sessions.snapshot,
                online: Vec::new(),
                offline: Vec::new(),
            })
            .collect();
        for user in sessions.online {
            parts[self.mesh.home_of(user).0].online.push(user);
        }
        for user in sessions.offline {
            parts[self.mesh.home_of(user).0].offline.push(user);
        }
        for (index, part) in parts.into_iter().enumerate() {
            if part.snapshot || !part.online.is_empty() || !part.offline.is_empty() {
                // A stopped shard has no subscribers left.
                let _ = self.mesh.send(ShardId(index), ShardMsg::Elsewhere(part)).await;
            }
        }
    }
}

/// What the forwarding node tells its client.
fn refusal(err: &ChatError) -> Refusal {
    Refusal {
        code: err.code(),
        message: err.client_message(),
    }
}
