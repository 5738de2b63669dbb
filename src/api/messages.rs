//! Messages and groups: publishing as a user and group changes go to the
//! conversation's owner shard like a client's `Send` (the same seq, idempotency
//! key, durability and fan-out); history is read from the store.
//!
//! The API sends from each user's device "api" (a fixed id per user), so its
//! idempotency keys are its own: a retried request with the same
//! `idempotency_key` gets the original answer, and a client's `client_msg_id`
//! never collides with it. Every device of the user is pushed the message.

use super::ApiState;
use super::error::{ApiError, json};
use super::users::existing_user;
use crate::auth::external_device_id;
use crate::chat::{SendAck, message_proto};
use crate::store::GroupEvent;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use confab_proto::v1;
use confab_protocol::ids::{ConversationId, GroupId, UserId};
use confab_protocol::{Append, Content, GroupCommand, HistoryRange, Role};
use serde::{Deserialize, Serialize};

/// The device label the API sends from.
const API_DEVICE: &str = "api";
/// Default and largest history page.
const DEFAULT_HISTORY_LIMIT: usize = 50;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Publish {
    sender_user_id: u64,
    #[serde(default)]
    conversation_id: Option<String>,
    #[serde(default)]
    direct_user_id: Option<u64>,
    idempotency_key: String,
    body: String,
}

/// A committed append's answer.
#[derive(Debug, Serialize)]
pub(super) struct Ack {
    conversation_id: String,
    seq: u64,
    server_time_ms: u64,
    idempotency_key: String,
}

impl From<SendAck> for Ack {
    fn from(ack: SendAck) -> Self {
        Self {
            conversation_id: ack.conversation.to_string(),
            seq: ack.seq,
            server_time_ms: ack.server_time_ms,
            idempotency_key: ack.client_msg_id,
        }
    }
}

/// `POST /v1/messages`.
pub(super) async fn publish(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Ack>, ApiError> {
    let request: Publish = json(body)?;
    let sender = existing_user(&state, request.sender_user_id).await?;
    let conversation = match (request.conversation_id, request.direct_user_id) {
        (Some(id), None) => ConversationId::parse(&id).map_err(|err| ApiError::bad_request(err.to_string()))?,
        (None, Some(other)) => {
            let other = UserId::new(other).ok_or_else(|| ApiError::bad_request("direct_user_id must not be 0"))?;
            if other == sender {
                return Err(ApiError::bad_request("a direct conversation is with another user"));
            }
            ConversationId::direct(sender, other)
        }
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of conversation_id and direct_user_id",
            ));
        }
    };
    state.limits.check_body(&request.body)?;
    append(
        &state,
        conversation,
        sender,
        request.idempotency_key,
        Content::Text(request.body),
    )
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateGroup {
    creator_user_id: u64,
    title: String,
    member_user_ids: Vec<u64>,
    idempotency_key: String,
}

/// `POST /v1/groups`: the creator owns the group; the answer's
/// `conversation_id` names it.
pub(super) async fn create_group(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Ack>, ApiError> {
    let request: CreateGroup = json(body)?;
    let creator = existing_user(&state, request.creator_user_id).await?;
    state.limits.check_client_msg_id(&request.idempotency_key)?;
    let command = GroupCommand::Create {
        title: state.limits.group_title(&request.title)?,
        members: known_users(&state, request.member_user_ids).await?,
    };
    let device = external_device_id(creator, API_DEVICE);
    let group = state.group_ids.derive(creator, device, &request.idempotency_key);
    let conversation = ConversationId::Group(group);
    append(
        &state,
        conversation,
        creator,
        request.idempotency_key,
        Content::Group(command),
    )
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddMembers {
    actor_user_id: u64,
    user_ids: Vec<u64>,
    idempotency_key: String,
}

/// `POST /v1/groups/{conversation_id}/members`: as `actor_user_id`, an
/// admin or the owner of the group.
pub(super) async fn add_members(
    State(state): State<ApiState>,
    Path(conversation): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Ack>, ApiError> {
    let request: AddMembers = json(body)?;
    let command = GroupCommand::Add(known_users(&state, request.user_ids).await?);
    let change = (request.actor_user_id, request.idempotency_key, command);
    group_change(&state, &conversation, change).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RemoveMember {
    actor_user_id: u64,
    idempotency_key: String,
}

/// `DELETE /v1/groups/{conversation_id}/members/{user_id}?actor_user_id=&idempotency_key=`.
pub(super) async fn remove_member(
    State(state): State<ApiState>,
    Path((conversation, user)): Path<(String, u64)>,
    Query(request): Query<RemoveMember>,
) -> Result<Json<Ack>, ApiError> {
    let user = UserId::new(user).ok_or_else(|| ApiError::bad_request("user id must not be 0"))?;
    let change = (
        request.actor_user_id,
        request.idempotency_key,
        GroupCommand::Remove(user),
    );
    group_change(&state, &conversation, change).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RenameGroup {
    actor_user_id: u64,
    title: String,
    idempotency_key: String,
}

/// `PATCH /v1/groups/{conversation_id}`: a new title, as an admin or the owner.
pub(super) async fn rename_group(
    State(state): State<ApiState>,
    Path(conversation): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Ack>, ApiError> {
    let request: RenameGroup = json(body)?;
    let command = GroupCommand::Rename(state.limits.group_title(&request.title)?);
    let change = (request.actor_user_id, request.idempotency_key, command);
    group_change(&state, &conversation, change).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(super) enum GrantedRole {
    Member,
    Admin,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SetRole {
    actor_user_id: u64,
    role: GrantedRole,
    idempotency_key: String,
}

/// `PUT /v1/groups/{conversation_id}/members/{user_id}/role`: "member" or
/// "admin", as the owner.
pub(super) async fn set_role(
    State(state): State<ApiState>,
    Path((conversation, user)): Path<(String, u64)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Ack>, ApiError> {
    let request: SetRole = json(body)?;
    let user = UserId::new(user).ok_or_else(|| ApiError::bad_request("user id must not be 0"))?;
    let role = match request.role {
        GrantedRole::Member => Role::Member,
        GrantedRole::Admin => Role::Admin,
    };
    let change = (
        request.actor_user_id,
        request.idempotency_key,
        GroupCommand::SetRole(user, role),
    );
    group_change(&state, &conversation, change).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HistoryQuery {
    #[serde(default)]
    before: Option<u64>,
    #[serde(default)]
    after: Option<u64>,
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
pub(super) struct Page {
    messages: Vec<Message>,
    has_more: bool,
}

/// A stored message as JSON; `event` is set for a group change.
#[derive(Debug, Serialize)]
pub(super) struct Message {
    seq: u64,
    sender_user_id: u64,
    sender_device_id: u64,
    client_msg_id: String,
    body: String,
    server_time_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<Event>,
    edits_seq: u64,
    deletes_seq: u64,
    deleted: bool,
    edited_by_seq: u64,
}

/// A group change.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum Event {
    Created { title: String, user_ids: Vec<u64> },
    MembersAdded { user_ids: Vec<u64> },
    MemberRemoved { user_id: u64 },
    MemberLeft { new_owner_user_id: u64 },
    Renamed { title: String },
    RoleChanged { user_id: u64, role: &'static str },
}

impl From<&GroupEvent> for Event {
    fn from(event: &GroupEvent) -> Self {
        let ids = |users: &[UserId]| users.iter().map(|user| user.get()).collect();
        match event {
            GroupEvent::Created { title, members } => Self::Created {
                title: title.clone(),
                user_ids: ids(members),
            },
            GroupEvent::MembersAdded(users) => Self::MembersAdded { user_ids: ids(users) },
            GroupEvent::MemberRemoved(user) => Self::MemberRemoved { user_id: user.get() },
            GroupEvent::MemberLeft { new_owner } => Self::MemberLeft {
                new_owner_user_id: new_owner.map_or(0, UserId::get),
            },
            GroupEvent::Renamed(title) => Self::Renamed { title: title.clone() },
            GroupEvent::RoleChanged(user, role) => Self::RoleChanged {
                user_id: user.get(),
                role: match role {
                    Role::Member => "member",
                    Role::Admin => "admin",
                    Role::Owner => "owner",
                },
            },
        }
    }
}

/// `GET /v1/conversations/{conversation_id}/messages?before=&after=&limit=`:
/// a page of history, as the server sees it (every message; no member check).
pub(super) async fn history(
    State(state): State<ApiState>,
    Path(conversation): Path<String>,
    Query(query): Query<HistoryQuery>,
) -> Result<Json<Page>, ApiError> {
    let conversation = ConversationId::parse(&conversation).map_err(|err| ApiError::bad_request(err.to_string()))?;
    let range = match (query.before, query.after) {
        (None, None) => HistoryRange::Latest,
        (Some(before), None) => HistoryRange::Before(before),
        (None, Some(after)) => HistoryRange::After(after),
        (Some(_), Some(_)) => return Err(ApiError::bad_request("give at most one of before and after")),
    };
    let max = usize::try_from(state.limits.max_history_limit).unwrap_or(usize::MAX);
    let limit = query.limit.unwrap_or(DEFAULT_HISTORY_LIMIT).clamp(1, max);
    let page = state.store.history(conversation, range, limit).await?;
    let messages = page
        .messages
        .iter()
        .map(|record| {
            let message = message_proto(record);
            Message {
                seq: message.seq,
                sender_user_id: message.sender_user_id,
                sender_device_id: message.sender_device_id,
                client_msg_id: message.client_msg_id,
                body: message.body,
                server_time_ms: message.server_time_ms,
                event: record.event.as_ref().map(Event::from),
                edits_seq: message.edits_seq,
                deletes_seq: message.deletes_seq,
                deleted: message.deleted,
                edited_by_seq: message.edited_by_seq,
            }
        })
        .collect();
    Ok(Json(Page {
        messages,
        has_more: page.has_more,
    }))
}

/// Sequences a change to the group `conversation` names, made by an existing
/// user: `(actor_user_id, idempotency_key, command)`.
async fn group_change(
    state: &ApiState,
    conversation: &str,
    (actor, idempotency_key, command): (u64, String, GroupCommand),
) -> Result<Json<Ack>, ApiError> {
    let group = group(conversation)?;
    let actor = existing_user(state, actor).await?;
    let conversation = ConversationId::Group(group);
    append(state, conversation, actor, idempotency_key, Content::Group(command)).await
}

/// Has `user` leave every group it is a member of (as a client's
/// `LeaveGroup`: an owner hands the group on); how many it left.
pub(super) async fn leave_groups(state: &ApiState, user: UserId) -> Result<usize, ApiError> {
    let mut left = 0;
    for head in state.store.conversations(user).await? {
        if head.left_seq.is_some() || !matches!(head.conversation, ConversationId::Group(_)) {
            continue;
        }
        let key = "confab-api-delete-user".to_owned();
        let Json(_) = append(state, head.conversation, user, key, Content::Group(GroupCommand::Leave)).await?;
        left += 1;
    }
    Ok(left)
}

/// Sequences `content` in `conversation` as `sender`'s API device.
async fn append(
    state: &ApiState,
    conversation: ConversationId,
    sender: UserId,
    idempotency_key: String,
    content: Content,
) -> Result<Json<Ack>, ApiError> {
    state.limits.check_client_msg_id(&idempotency_key)?;
    // A direct conversation's members are in its id; a group's are checked by
    // its owner.
    if matches!(conversation, ConversationId::Direct { .. }) && !conversation.direct_members().any(|m| m == sender) {
        return Err(ApiError::new(
            v1::ErrorCode::Forbidden,
            "the sender is not a member of this conversation",
        ));
    }
    let append = Append {
        conversation,
        sender,
        sender_device: external_device_id(sender, API_DEVICE),
        client_msg_id: idempotency_key,
        content,
    };
    Ok(Json(state.mesh.append(append).await?.into()))
}

/// User ids within the group limits, every one of an existing user.
async fn known_users(state: &ApiState, raw: Vec<u64>) -> Result<Vec<UserId>, ApiError> {
    let users = state.limits.group_members(raw)?;
    let missing = state.store.missing_users(users.clone()).await?;
    match missing.first() {
        None => Ok(users),
        Some(user) => Err(ApiError::new(v1::ErrorCode::NotFound, format!("no user {user}"))),
    }
}

fn group(conversation: &str) -> Result<GroupId, ApiError> {
    match ConversationId::parse(conversation) {
        Ok(ConversationId::Group(group)) => Ok(group),
        Ok(ConversationId::Direct { .. }) => Err(ApiError::bad_request("not a group conversation")),
        Err(err) => Err(ApiError::bad_request(err.to_string())),
    }
}
