//! The embedded store's single writer thread: batching, staging every kind of
//! write into one atomic fjall batch, committing and persisting it, and
//! answering the callers with the batch's fate.

use super::keys::*;
use super::{Inner, corrupt, fjall_error};
use crate::config::{Durability, StoreConfig};
use crate::ids::{ConversationId, DeviceId, GroupId, UserId};
use crate::store::encoding::StoredMessage;
use crate::store::{Amendment, DeviceRecord, GroupEvent, Marks, MessageRecord, NewUser, StoreError, UserRecord};
use fjall::PersistMode;
use prost::Message as _;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub(super) enum WriteJob {
    CreateUser(NewUser, Reply<UserRecord>),
    PutDevice(DeviceRecord, Reply<()>),
    DeleteDevice(UserId, DeviceId, Reply<bool>),
    Append(Vec<MessageRecord>, Reply<()>),
    Purge(Vec<fjall::UserKey>, Reply<usize>),
    Mark(ConversationId, UserId, DeviceId, Marks, Reply<(Marks, bool)>),
    Close(Reply<()>),
}

/// The single writer: owns batching, commit, persistence and poisoning.
pub(super) struct Writer {
    inner: Arc<Inner>,
    durability: Durability,
    max_batch: usize,
    poisoned: bool,
    closed: bool,
}

/// Answers one job once the batch's fate is known: `Ok` when it is durable.
type Answer = Box<dyn FnOnce(Result<(), String>) + Send>;

/// Answers `reply` with `value` if the batch commits.
fn on_commit<T: Send + 'static>(reply: Reply<T>, value: T) -> Answer {
    Box::new(move |outcome| {
        // A caller that went away no longer needs its answer.
        let _ = reply.send(outcome.map(|()| value).map_err(StoreError::Io));
    })
}

/// Answers `reply` with `err` whatever happens to the batch.
fn refuse<T: Send + 'static>(reply: Reply<T>, err: StoreError) -> Answer {
    Box::new(move |_| {
        let _ = reply.send(Err(err));
    })
}

impl Writer {
    pub(super) fn new(inner: Arc<Inner>, config: &StoreConfig) -> Self {
        Self {
            inner,
            durability: config.durability,
            max_batch: config.max_batch,
            poisoned: false,
            closed: false,
        }
    }

    pub(super) fn run(mut self, mut jobs: mpsc::Receiver<WriteJob>) {
        let mut queue = Vec::with_capacity(self.max_batch);
        while let Some(job) = jobs.blocking_recv() {
            queue.push(job);
            while queue.len() < self.max_batch {
                match jobs.try_recv() {
                    Ok(job) => queue.push(job),
                    Err(_) => break,
                }
            }
            self.commit(&mut queue);
            if self.closed {
                break;
            }
        }
        // Later senders see a closed channel and get `StoreError::Closed`.
    }

    fn commit(&mut self, jobs: &mut Vec<WriteJob>) {
        // Edits and deletes rewrite earlier rows, maybe staged in this very batch:
        // only then are staged messages kept at hand.
        let amends = jobs.iter().any(|job| {
            matches!(job, WriteJob::Append(messages, _) if messages.iter().any(|message| message.amends.is_some()))
        });
        let mut batch = self.inner.db.batch();
        let mut answers: Vec<Answer> = Vec::new();
        let mut closers: Vec<Reply<()>> = Vec::new();
        let mut new_names = HashSet::new();
        let mut new_ids = HashSet::new();
        let mut marks_in_batch = HashMap::new();
        let mut messages_in_batch: HashMap<Vec<u8>, StoredMessage> = HashMap::new();
        for job in jobs.drain(..) {
            if self.closed || !closers.is_empty() {
                answers.push(refuse_job(job, StoreError::Closed));
                continue;
            }
            if self.poisoned && !matches!(job, WriteJob::Close(_)) {
                answers.push(refuse_job(job, StoreError::Poisoned));
                continue;
            }
            answers.push(match job {
                WriteJob::Close(reply) => {
                    closers.push(reply);
                    continue;
                }
                WriteJob::CreateUser(user, reply) => {
                    match self.stage_user(&mut batch, user, &mut new_names, &mut new_ids) {
                        Ok(record) => on_commit(reply, record),
                        Err(err) => refuse(reply, err),
                    }
                }
                WriteJob::PutDevice(device, reply) => {
                    let stored = StoredDevice {
                        name: device.name,
                        refresh_hash: device.refresh_hash.to_vec(),
                        refresh_expires_at_ms: device.refresh_expires_at_ms,
                        created_at_ms: device.created_at_ms,
                    };
                    batch.insert(
                        &self.inner.devices,
                        device_key(device.user, device.id),
                        stored.encode_to_vec(),
                    );
                    on_commit(reply, ())
                }
                WriteJob::DeleteDevice(user, device, reply) => {
                    let key = device_key(user, device);
                    match self.inner.devices.contains_key(key).map_err(fjall_error) {
                        Ok(existed) => {
                            batch.remove(&self.inner.devices, key);
                            on_commit(reply, existed)
                        }
                        Err(err) => refuse(reply, err),
                    }
                }
                WriteJob::Append(messages, reply) => {
                    // One head and one index entry per conversation per job: messages
                    // arrive in seq order, so the last one of each conversation wins.
                    let mut heads: HashMap<ConversationId, &MessageRecord> = HashMap::new();
                    for message in &messages {
                        heads.insert(message.conversation, message);
                    }
                    for (conversation, message) in heads {
                        let head = encode_pair(message.seq, message.server_time_ms);
                        batch.insert(&self.inner.heads, conversation.to_key().as_ref(), head);
                        for member in conversation.direct_members() {
                            batch.insert(
                                &self.inner.user_convs,
                                user_conv_key(member, conversation),
                                encode_pair(0, 0),
                            );
                        }
                    }
                    for message in messages {
                        let key = message_key(message.conversation, message.seq);
                        if let (ConversationId::Group(group), Some(event)) = (message.conversation, &message.event) {
                            self.stage_group_event(&mut batch, group, &message, event);
                        }
                        let stored = StoredMessage::of(&message);
                        if let Some(amendment) = message.amends {
                            if let Err(err) =
                                self.stage_amendment(&mut batch, &mut messages_in_batch, &message, amendment)
                            {
                                tracing::error!(error = %err, "amending a message failed; the amendment is kept");
                            }
                        }
                        batch.insert(&self.inner.messages, key.clone(), stored.encode_to_vec());
                        if amends {
                            messages_in_batch.insert(key, stored.clone());
                        }
                        let send = send_key(message.conversation, message.sender_device, &stored.client_msg_id);
                        batch.insert(
                            &self.inner.sends,
                            send,
                            encode_pair(message.seq, message.server_time_ms),
                        );
                    }
                    on_commit(reply, ())
                }
                WriteJob::Mark(conversation, user, device, raised, reply) => {
                    match self.stage_mark(&mut batch, &mut marks_in_batch, conversation, user, device, raised) {
                        Ok(outcome) => on_commit(reply, outcome),
                        Err(err) => refuse(reply, err),
                    }
                }
                WriteJob::Purge(keys, reply) => {
                    let count = keys.len();
                    for key in keys {
                        batch.remove(&self.inner.sends, key);
                    }
                    on_commit(reply, count)
                }
            });
        }

        let outcome = if batch.is_empty() { Ok(()) } else { self.persist(batch) };
        for answer in answers {
            answer(outcome.clone());
        }
        if !closers.is_empty() {
            self.closed = true;
            let closed = self.inner.db.persist(PersistMode::SyncAll).map_err(|err| {
                tracing::error!(error = %err, "final store sync failed");
                err.to_string()
            });
            for reply in closers {
                on_commit(reply, ())(closed.clone());
            }
        }
    }

    fn stage_user(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        user: NewUser,
        new_names: &mut HashSet<String>,
        new_ids: &mut HashSet<UserId>,
    ) -> Result<UserRecord, StoreError> {
        let taken = new_names.contains(&user.username)
            || self
                .inner
                .usernames
                .contains_key(user.username.as_bytes())
                .map_err(fjall_error)?;
        if taken {
            return Err(StoreError::UsernameTaken);
        }
        let id = loop {
            let id = UserId::random();
            let exists = new_ids.contains(&id)
                || self
                    .inner
                    .users
                    .contains_key(id.get().to_be_bytes())
                    .map_err(fjall_error)?;
            if !exists {
                break id;
            }
        };
        let stored = StoredUser {
            username: user.username.clone(),
            password_hash: user.password_hash.clone(),
            created_at_ms: user.created_at_ms,
        };
        batch.insert(&self.inner.users, id.get().to_be_bytes(), stored.encode_to_vec());
        batch.insert(&self.inner.usernames, user.username.as_bytes(), id.get().to_be_bytes());
        new_names.insert(user.username.clone());
        new_ids.insert(id);
        Ok(UserRecord {
            id,
            username: user.username,
            password_hash: user.password_hash,
            created_at_ms: user.created_at_ms,
        })
    }

    /// Applies an edit or delete to its target's row, so history shows the current
    /// state. `pending` holds messages staged earlier in this batch.
    fn stage_amendment(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        pending: &mut HashMap<Vec<u8>, StoredMessage>,
        amendment_message: &MessageRecord,
        amendment: Amendment,
    ) -> Result<(), StoreError> {
        let (Amendment::Edit(target) | Amendment::Delete(target)) = amendment;
        let key = message_key(amendment_message.conversation, target);
        let mut stored = match pending.get(&key) {
            Some(stored) => stored.clone(),
            None => match self.inner.messages.get(&key).map_err(fjall_error)? {
                Some(value) => StoredMessage::decode(&*value).map_err(corrupt)?,
                None => return Err(StoreError::Corrupt(format!("amended message {target} is missing"))),
            },
        };
        stored.amend(amendment_message, amendment);
        batch.insert(&self.inner.messages, key.clone(), stored.encode_to_vec());
        pending.insert(key, stored);
        Ok(())
    }

    /// Raises one device's watermarks; `pending` holds marks staged earlier in this
    /// batch, which reads of the database do not see yet.
    fn stage_mark(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        pending: &mut HashMap<Vec<u8>, Marks>,
        conversation: ConversationId,
        user: UserId,
        device: DeviceId,
        raised: Marks,
    ) -> Result<(Marks, bool), StoreError> {
        let mut key = conversation.to_key().as_ref().to_vec();
        key.extend_from_slice(&user.get().to_be_bytes());
        let before_user = self.inner.user_marks(conversation, user)?;
        let before_user = pending
            .iter()
            .filter(|(other, _)| other.starts_with(&key))
            .fold(before_user, |acc, (_, marks)| max_marks(acc, *marks));
        key.extend_from_slice(&device.get().to_be_bytes());
        let stored = match pending.get(&key) {
            Some(marks) => *marks,
            None => match self.inner.marks.get(&key).map_err(fjall_error)? {
                Some(value) => {
                    let (delivered_seq, read_seq) = decode_pair(&value)?;
                    Marks {
                        delivered_seq,
                        read_seq,
                    }
                }
                None => Marks::default(),
            },
        };
        let updated = max_marks(stored, raised);
        if updated != stored {
            let mut value = [0u8; 16];
            value[..8].copy_from_slice(&updated.delivered_seq.to_be_bytes());
            value[8..].copy_from_slice(&updated.read_seq.to_be_bytes());
            batch.insert(&self.inner.marks, key.clone(), value);
            pending.insert(key, updated);
        }
        let after_user = max_marks(before_user, updated);
        Ok((after_user, after_user != before_user))
    }

    /// Updates the group projections for `event`, carried by `message`.
    fn stage_group_event(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        group: GroupId,
        message: &MessageRecord,
        event: &GroupEvent,
    ) {
        let conversation = ConversationId::Group(group);
        for (user, member) in event.member_updates(message.sender, message.seq) {
            batch.insert(&self.inner.members, member_key(group, user), encode_member(member));
            let left = match member.left_seq {
                Some(seq) => encode_pair(seq, message.server_time_ms),
                None => encode_pair(0, 0),
            };
            batch.insert(&self.inner.user_convs, user_conv_key(user, conversation), left);
        }
        if let Some(title) = event.title() {
            batch.insert(&self.inner.groups, group.get().to_be_bytes(), title.as_bytes());
        }
    }

    /// Commits the batch, then makes it as durable as configured. Any failure poisons.
    fn persist(&mut self, batch: fjall::OwnedWriteBatch) -> Result<(), String> {
        let result = batch.commit().and_then(|()| match self.durability {
            Durability::Sync => self.inner.db.persist(PersistMode::SyncData),
            Durability::Buffered => Ok(()),
        });
        result.map_err(|err| {
            tracing::error!(error = %err, "store commit failed; refusing further writes");
            self.poisoned = true;
            err.to_string()
        })
    }
}

fn refuse_job(job: WriteJob, err: StoreError) -> Answer {
    match job {
        WriteJob::CreateUser(_, reply) => refuse(reply, err),
        WriteJob::PutDevice(_, reply) | WriteJob::Append(_, reply) | WriteJob::Close(reply) => refuse(reply, err),
        WriteJob::DeleteDevice(_, _, reply) => refuse(reply, err),
        WriteJob::Purge(_, reply) => refuse(reply, err),
        WriteJob::Mark(.., reply) => refuse(reply, err),
    }
}
