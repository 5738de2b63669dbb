//! Users: create, look up by name, presence on this node, log every device out,
//! and the node's connection count.

use super::ApiState;
use super::error::{ApiError, json};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use confab_proto::v1::ErrorCode;
use confab_protocol::ids::UserId;
use confab_protocol::{Password, Username};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateUser {
    username: String,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    display_name: String,
}

#[derive(Debug, Serialize)]
pub(super) struct User {
    user_id: u64,
    username: String,
    display_name: String,
}

/// `POST /v1/users`: a password account, or a user of the app's sign-in
/// (`namespace:subject`, no password).
pub(super) async fn create(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    let request: CreateUser = json(body)?;
    let username = match request.username.contains(':') {
        true => Username::lookup(&request.username),
        false => Username::parse(&request.username),
    }
    .map_err(|err| ApiError::bad_request(err.to_string()))?;
    let password = request
        .password
        .map(Password::parse)
        .transpose()
        .map_err(|err| ApiError::bad_request(err.to_string()))?;
    let display_name = confab_protocol::display_name(&request.display_name);
    let user = state
        .accounts
        .create_user(&username, password, display_name.clone())
        .await?;
    let user = User {
        user_id: user.get(),
        username: username.as_str().to_owned(),
        display_name,
    };
    Ok((StatusCode::CREATED, Json(user)))
}

/// `GET /v1/users/by-name/{username}`.
pub(super) async fn by_name(
    State(state): State<ApiState>,
    Path(username): Path<String>,
) -> Result<Json<User>, ApiError> {
    let username = Username::lookup(&username).map_err(|err| ApiError::bad_request(err.to_string()))?;
    let user = state.accounts.user_by_name(&username).await?;
    Ok(Json(User {
        user_id: user.id.get(),
        username: user.username,
        display_name: user.display_name,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdateUser {
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// `PATCH /v1/users/{user_id}`: a new display name, and a password account's
/// new password (which logs every device out).
pub(super) async fn update(
    State(state): State<ApiState>,
    Path(user): Path<u64>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<User>, ApiError> {
    let request: UpdateUser = json(body)?;
    let user = existing_user(&state, user).await?;
    let password = request
        .password
        .map(Password::parse)
        .transpose()
        .map_err(|err| ApiError::bad_request(err.to_string()))?;
    let display_name = request.display_name.as_deref().map(confab_protocol::display_name);
    let revoked = state.accounts.update_user(user, display_name, password).await?;
    for device in revoked {
        state.mesh.revoke(user, device).await;
    }
    match state.store.user_by_id(user).await? {
        Some(record) => Ok(Json(User {
            user_id: record.id.get(),
            username: record.username,
            display_name: record.display_name,
        })),
        None => Err(ApiError::new(ErrorCode::NotFound, format!("no user {user}"))),
    }
}

#[derive(Debug, Serialize)]
pub(super) struct Deleted {
    groups_left: usize,
    revoked_devices: usize,
}

/// `DELETE /v1/users/{user_id}`: the user leaves its groups, its devices are
/// logged out, and it is removed (its name is free again; its messages stay
/// in their conversations' history).
pub(super) async fn delete(State(state): State<ApiState>, Path(user): Path<u64>) -> Result<Json<Deleted>, ApiError> {
    let user = existing_user(&state, user).await?;
    let groups_left = super::messages::leave_groups(&state, user).await?;
    let revoked = state.accounts.delete_user(user).await?;
    for device in &revoked {
        state.mesh.revoke(user, *device).await;
    }
    Ok(Json(Deleted {
        groups_left,
        revoked_devices: revoked.len(),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct IssueDevice {
    #[serde(default)]
    device_name: String,
}

#[derive(Debug, Serialize)]
pub(super) struct Issued {
    user_id: u64,
    device_id: u64,
    access_token: String,
    access_expires_at_ms: u64,
    refresh_token: String,
    refresh_expires_at_ms: u64,
}

/// `POST /v1/users/{user_id}/devices`: a new device of a password account,
/// logged in without its password, with fresh tokens (for tests and tools;
/// within the device limit).
pub(super) async fn issue_device(
    State(state): State<ApiState>,
    Path(user): Path<u64>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Issued>), ApiError> {
    let request: IssueDevice = json(body)?;
    let user = UserId::new(user).ok_or_else(|| ApiError::bad_request("user id must not be 0"))?;
    let grant = state
        .accounts
        .issue_device(user, confab_protocol::device_name(&request.device_name))
        .await?;
    let issued = Issued {
        user_id: grant.user.get(),
        device_id: grant.device.get(),
        access_token: grant.access_token,
        access_expires_at_ms: grant.access_expires_at_ms,
        refresh_token: grant.refresh_token,
        refresh_expires_at_ms: grant.refresh_expires_at_ms,
    };
    Ok((StatusCode::CREATED, Json(issued)))
}

#[derive(Debug, Serialize)]
pub(super) struct Presence {
    user_id: u64,
    online: bool,
    connections: usize,
}

/// `GET /v1/users/{user_id}/presence`: the user's authenticated connections on
/// this node.
pub(super) async fn presence(State(state): State<ApiState>, Path(user): Path<u64>) -> Result<Json<Presence>, ApiError> {
    let user = existing_user(&state, user).await?;
    let connections = state.admission.user_connections(user);
    Ok(Json(Presence {
        user_id: user.get(),
        online: connections > 0,
        connections,
    }))
}

#[derive(Debug, Serialize)]
pub(super) struct Revoked {
    revoked_devices: usize,
}

/// `DELETE /v1/users/{user_id}/devices`: logs every device of the user out
/// and closes their connections.
pub(super) async fn revoke_devices(
    State(state): State<ApiState>,
    Path(user): Path<u64>,
) -> Result<Json<Revoked>, ApiError> {
    let user = existing_user(&state, user).await?;
    let revoked = state.accounts.revoke_all_devices(user).await?;
    for device in &revoked {
        state.mesh.revoke(user, *device).await;
    }
    Ok(Json(Revoked {
        revoked_devices: revoked.len(),
    }))
}

#[derive(Debug, Serialize)]
pub(super) struct Stats {
    connections: usize,
    shards: usize,
}

/// `GET /v1/stats`: connections open on this node.
pub(super) async fn stats(State(state): State<ApiState>) -> Json<Stats> {
    Json(Stats {
        connections: state.admission.connections(),
        shards: state.mesh.shard_count(),
    })
}

/// The user `raw` names, if it exists.
pub(super) async fn existing_user(state: &ApiState, raw: u64) -> Result<UserId, ApiError> {
    let user = UserId::new(raw).ok_or_else(|| ApiError::bad_request("user id must not be 0"))?;
    match state.store.user_by_id(user).await {
        Ok(Some(_)) => Ok(user),
        Ok(None) => Err(ApiError::new(ErrorCode::NotFound, format!("no user {raw}"))),
        Err(err) => Err(err.into()),
    }
}
