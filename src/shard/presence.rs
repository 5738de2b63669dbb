//! The presence home role of a shard: for the users that hash to it, turns
//! directory changes (a user gained its first / lost its last session anywhere)
//! into presence, with the grace period and rate limit of
//! [`crate::chat::PresenceTracker`], and pushes updates to subscribers' shards.

use super::mesh::{Delivery, ShardMsg};
use super::{Shard, ShardId};
use crate::chat::{ChatError, Presence, Update};
use crate::clock::unix_ms;
use crate::ids::{ConversationId, UserId};
use crate::protocol::push_frame;
use confab_proto::v1::{self, server_frame::Kind};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Instant;
use tokio::sync::oneshot;

/// A subscriber: a user, on the shard that holds its sessions.
pub(super) type Subscriber = (ShardId, UserId);

/// `user`'s sessions anywhere went from none to some (`online`) or back.
pub(super) fn directory_changed(shard: &Rc<Shard>, user: UserId, online: bool) {
    let update = {
        let mut tracker = shard.presence.borrow_mut();
        if online {
            tracker.connected(user, Instant::now(), unix_ms())
        } else {
            tracker.disconnected(user, Instant::now(), unix_ms());
            None
        }
    };
    shard.presence_changed.notify_one();
    if let Some(update) = update {
        shard.spawn_core(push(shard.clone(), vec![update]));
    }
}

pub(super) fn subscribe(shard: &Shard, user: UserId, subscriber: Subscriber, reply: oneshot::Sender<Presence>) {
    let presence = shard.presence.borrow_mut().subscribe(user, subscriber);
    shard.presence_changed.notify_one();
    let _ = reply.send(presence);
}

pub(super) fn unsubscribe(shard: &Shard, user: UserId, subscriber: Subscriber) {
    shard.presence.borrow_mut().unsubscribe(user, &subscriber);
}

/// Ends grace periods and sends rate-limited updates when they fall due.
pub(super) async fn run_timer(shard: Rc<Shard>) {
    loop {
        let deadline = shard.presence.borrow().next_deadline();
        let wake = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = wake => {
                let updates = shard.presence.borrow_mut().tick(Instant::now());
                if !updates.is_empty() {
                    push(shard.clone(), updates).await;
                }
            }
            () = shard.presence_changed.notified() => {}
            () = shard.stop.cancelled() => return,
        }
    }
}

/// Sends each update, encoded once, to the shards of its subscribers.
async fn push(shard: Rc<Shard>, updates: Vec<Update<Subscriber>>) {
    for update in updates {
        let frame = confab_proto::encode_frame(&push_frame(Kind::PresenceUpdate(presence_proto(
            update.user,
            update.presence,
        ))));
        let mut by_shard: HashMap<ShardId, Vec<UserId>> = HashMap::new();
        for (to, subscriber) in update.subscribers {
            // A subscriber with no session left on its shard is dropped here.
            if shard.directory.borrow().shards_of(subscriber) & (1 << to.0) == 0 {
                shard.presence.borrow_mut().unsubscribe(update.user, &(to, subscriber));
                continue;
            }
            by_shard.entry(to).or_default().push(subscriber);
        }
        for (to, users) in by_shard {
            let delivery = Delivery {
                // A pseudo-conversation: presence is about a user, not a conversation;
                // seq 0 keeps it out of resume replays.
                conversation: ConversationId::direct(update.user, update.user),
                seq: 0,
                frame: frame.clone(),
                users: users.into(),
                skip_device: None,
            };
            if shard.mesh.send(to, ShardMsg::Deliver(vec![delivery])).await.is_err() {
                return;
            }
        }
    }
}

pub(super) fn presence_proto(user: UserId, presence: Presence) -> v1::PresenceUpdate {
    v1::PresenceUpdate {
        user_id: user.get(),
        online: presence.online,
        last_seen_ms: presence.last_seen_ms,
    }
}

/// Subscribes `subscriber` to the presence of `users` it may see (those sharing a
/// conversation with it); the others are listed as hidden.
pub(super) async fn subscribe_users(
    shard: &Shard,
    subscriber: UserId,
    users: Vec<UserId>,
) -> Result<v1::PresenceList, ChatError> {
    let contacts = contacts(shard, subscriber).await?;
    let mut list = v1::PresenceList::default();
    for user in users {
        let visible = user == subscriber
            || contacts.direct.contains(&user)
            || shard
                .store
                .conversations(user)
                .await?
                .iter()
                .any(|head| head.left_seq.is_none() && contacts.groups.contains(&head.conversation));
        if !visible {
            list.hidden.push(user.get());
            continue;
        }
        let (reply, presence) = oneshot::channel();
        let subscribe = ShardMsg::Subscribe {
            user,
            subscriber: (shard.id, subscriber),
            reply,
        };
        shard
            .mesh
            .send(shard.mesh.home_of(user), subscribe)
            .await
            .map_err(|_| ChatError::ShuttingDown)?;
        let presence = presence.await.map_err(|_| ChatError::ShuttingDown)?;
        list.users.push(presence_proto(user, presence));
    }
    Ok(list)
}

pub(super) async fn unsubscribe_users(shard: &Shard, subscriber: UserId, users: Vec<UserId>) {
    for user in users {
        let unsubscribe = ShardMsg::Unsubscribe {
            user,
            subscriber: (shard.id, subscriber),
        };
        // A stopped home shard has no subscriptions left.
        let _ = shard.mesh.send(shard.mesh.home_of(user), unsubscribe).await;
    }
}

/// Who shares a conversation with a user.
struct Contacts {
    direct: HashSet<UserId>,
    groups: HashSet<ConversationId>,
}

async fn contacts(shard: &Shard, user: UserId) -> Result<Contacts, ChatError> {
    let mut contacts = Contacts {
        direct: HashSet::new(),
        groups: HashSet::new(),
    };
    for head in shard.store.conversations(user).await? {
        match head.conversation {
            ConversationId::Direct { .. } => {
                contacts
                    .direct
                    .extend(head.conversation.direct_members().filter(|member| *member != user));
            }
            ConversationId::Group(_) if head.left_seq.is_none() => {
                contacts.groups.insert(head.conversation);
            }
            ConversationId::Group(_) => {}
        }
    }
    Ok(contacts)
}
