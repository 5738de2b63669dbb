//! The node as other nodes of a cluster see it ([`crate::cluster::Local`]):
//! a forwarded append goes to its conversation's owner shard like a local one
//! (marked, so it is never forwarded again), and relayed frames go to every
//! shard, whose sessions take those of their users.

use super::ShardId;
use super::mesh::{AppendReply, Arrivals, Delivery, Mesh, ShardMsg};
use crate::chat::ChatError;
use crate::cluster::envelope::{Acked, Refusal, Relayed};
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
        let deliveries: Vec<Delivery> = relayed
            .into_iter()
            .map(|relayed| Delivery {
                conversation: relayed.conversation,
                seq: relayed.seq,
                frame: relayed.frame,
                committed_at: None,
                users: Arc::from(relayed.users),
                skip_device: relayed.skip_device,
            })
            .collect();
        for index in 0..self.mesh.shard_count() {
            let arrivals = Arrivals {
                answers: Vec::new(),
                deliveries: deliveries.clone(),
            };
            // A stopped shard has no sessions left.
            let _ = self.mesh.send(ShardId(index), ShardMsg::Deliver(arrivals)).await;
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
