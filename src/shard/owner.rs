//! The owner role of a shard: sequencing, storing and fanning out the messages of
//! the conversations it owns.
//!
//! Appends arrive on the mesh. The [`Sequencer`] assigns seqs; one committer task
//! per shard writes assigned messages in assignment order, in batches (whatever
//! queued while the previous batch was being made durable), and only after the
//! store confirms does it fan out and acknowledge. Fan-out encodes each message
//! once and sends it once per destination shard.

use super::mesh::{AppendReply, Delivery, ShardMsg};
use super::{Shard, ShardId};
use crate::chat::{Admission, Append, Assigned, ChatError, SendAck, message_frame};
use crate::ids::ConversationId;
use std::rc::Rc;
use std::sync::Arc;

/// Takes an append from the mesh. Never waits.
pub fn submit(shard: &Rc<Shard>, append: Append, reply: AppendReply) {
    let admission = shard.sequencer.borrow_mut().submit(append, reply);
    match admission {
        Admission::Assigned(assigned) => shard.enqueue_commit(assigned),
        Admission::Queued => {}
        Admission::Load(conversation) => {
            let shard_for_load = shard.clone();
            shard.spawn_core(load(shard_for_load, conversation));
        }
        Admission::Overloaded(append, reply) => {
            tracing::warn!(conversation = %append.conversation, "owner shard overloaded: refusing append");
            let _ = reply.send(Err(ChatError::Overloaded));
        }
    }
}

/// Reads where a conversation's seqs continue and checks its members exist.
async fn load(shard: Rc<Shard>, conversation: ConversationId) {
    let result = async {
        for member in conversation.members() {
            if shard.store.user_by_id(member).await?.is_none() {
                return Err(ChatError::UnknownUser);
            }
        }
        Ok(shard.store.last_seq(conversation).await?)
    }
    .await;
    match result {
        Ok(last_seq) => {
            let assigned = shard.sequencer.borrow_mut().loaded(conversation, last_seq);
            for assigned in assigned {
                shard.enqueue_commit(assigned);
            }
        }
        Err(err) => {
            if !matches!(err, ChatError::UnknownUser) {
                tracing::error!(%conversation, error = %err, "loading conversation failed");
            }
            let refused = shard.sequencer.borrow_mut().load_failed(conversation);
            for (_, reply) in refused {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

/// The committer: batches assigned messages into the store, then fans out and acks.
pub async fn run_committer(shard: Rc<Shard>) {
    loop {
        let batch: Vec<Assigned<AppendReply>> = {
            let mut queue = shard.commit_queue.borrow_mut();
            let take = queue.len().min(shard.config.store.max_batch);
            queue.drain(..take).collect()
        };
        if batch.is_empty() {
            tokio::select! {
                () = shard.commit_ready.notified() => continue,
                () = shard.stop.cancelled() => return,
            }
        }
        let records = batch
            .iter()
            .map(|assigned| assigned.record.clone())
            .collect();
        match shard.store.append_messages(records).await {
            Ok(()) => fan_out(&shard, batch).await,
            Err(err) => {
                tracing::error!(error = %err, messages = batch.len(), "committing messages failed");
                let mut sequencer = shard.sequencer.borrow_mut();
                for assigned in batch {
                    sequencer.commit_failed(assigned.record.conversation);
                    let _ = assigned.reply.send(Err(ChatError::Store(err.clone())));
                }
            }
        }
    }
}

async fn fan_out(shard: &Rc<Shard>, batch: Vec<Assigned<AppendReply>>) {
    let mut per_shard: Vec<Vec<Delivery>> = vec![Vec::new(); shard.mesh.shard_count()];
    for assigned in batch {
        let record = &assigned.record;
        let users: Arc<[_]> = record.conversation.members().collect();
        let delivery = Delivery {
            frame: message_frame(record),
            users: users.clone(),
            skip_device: Some((record.sender, record.sender_device)),
        };
        let mask = {
            let directory = shard.directory.borrow();
            users
                .iter()
                .fold(0u64, |mask, user| mask | directory.shards_of(*user))
        };
        for (index, deliveries) in per_shard.iter_mut().enumerate() {
            if mask & (1 << index) != 0 {
                deliveries.push(delivery.clone());
            }
        }
        shard.sequencer.borrow_mut().committed(record.conversation);
        let _ = assigned.reply.send(Ok(SendAck::of(record)));
    }
    for (index, deliveries) in per_shard.into_iter().enumerate() {
        if !deliveries.is_empty()
            && shard
                .mesh
                .send(ShardId(index), ShardMsg::Deliver(deliveries))
                .await
                .is_err()
        {
            tracing::warn!(to = index, "shard stopped; deliveries dropped");
        }
    }
}
