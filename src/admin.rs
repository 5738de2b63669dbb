//! `confab admin`: the server API (docs/API.md) from the command line, for
//! operators and tests: create users, issue a device's tokens, publish, log
//! devices out, presence, stats. Prints the API's JSON answer; an error answer
//! is the command's error.

use crate::http::{HttpUrl, Request, client_tls};
use anyhow::Context as _;
use serde_json::{Value, json};
use std::time::Duration;

/// Longest wait for the API's answer.
const TIMEOUT: Duration = Duration::from_secs(30);

/// What to ask the API.
#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// Create a user: a password account, or `namespace:subject` without one.
    CreateUser {
        /// The username.
        username: String,
        /// The password of a password account.
        #[arg(long)]
        password: Option<String>,
        /// The name to show.
        #[arg(long)]
        display_name: Option<String>,
    },
    /// Look a user up by name.
    User {
        /// The username.
        username: String,
    },
    /// Log a new device of a password account in without its password and
    /// print its tokens (for testing).
    Token {
        /// The user's id.
        user_id: u64,
        /// The device's name.
        #[arg(long, default_value = "confab admin")]
        device: String,
    },
    /// Publish a message as a user.
    Publish {
        /// The sender's user id.
        #[arg(long)]
        from: u64,
        /// The other user of a direct conversation.
        #[arg(long, conflicts_with = "conversation", required_unless_present = "conversation")]
        to: Option<u64>,
        /// A conversation id (a group's).
        #[arg(long)]
        conversation: Option<String>,
        /// The idempotency key: give the same one to retry safely (default: random).
        #[arg(long)]
        idempotency_key: Option<String>,
        /// The message.
        body: String,
    },
    /// Log every device of a user out and close their connections.
    Revoke {
        /// The user's id.
        user_id: u64,
    },
    /// A user's connections on the node.
    Presence {
        /// The user's id.
        user_id: u64,
    },
    /// The node's connections.
    Stats,
}

/// Sends `command` to the API at `api` with `key`; the answer, pretty-printed.
pub async fn run(api: &HttpUrl, key: &str, command: AdminCommand) -> anyhow::Result<String> {
    let (method, path, body) = match command {
        AdminCommand::CreateUser {
            username,
            password,
            display_name,
        } => (
            "POST",
            "/v1/users".to_owned(),
            Some(json!({ "username": username, "password": password, "display_name": display_name })),
        ),
        AdminCommand::User { username } => ("GET", format!("/v1/users/by-name/{username}"), None),
        AdminCommand::Token { user_id, device } => (
            "POST",
            format!("/v1/users/{user_id}/devices"),
            Some(json!({ "device_name": device })),
        ),
        AdminCommand::Publish {
            from,
            to,
            conversation,
            idempotency_key,
            body,
        } => {
            let key = idempotency_key.unwrap_or_else(|| format!("admin-{:016x}", rand::random::<u64>()));
            let mut request = json!({ "sender_user_id": from, "idempotency_key": key, "body": body });
            match (to, conversation) {
                (Some(to), _) => request["direct_user_id"] = json!(to),
                (None, Some(conversation)) => request["conversation_id"] = json!(conversation),
                (None, None) => anyhow::bail!("give --to or --conversation"),
            }
            ("POST", "/v1/messages".to_owned(), Some(request))
        }
        AdminCommand::Revoke { user_id } => ("DELETE", format!("/v1/users/{user_id}/devices"), None),
        AdminCommand::Presence { user_id } => ("GET", format!("/v1/users/{user_id}/presence"), None),
        AdminCommand::Stats => ("GET", "/v1/stats".to_owned(), None),
    };
    // No null fields: an absent password is "none", not `null`.
    let body = body.map(|mut body| {
        if let Some(fields) = body.as_object_mut() {
            fields.retain(|_, value| !value.is_null());
        }
        body.to_string()
    });
    let url = api.with_path(&path).context("the request's URL")?;
    let tls = client_tls().context("setting up TLS")?;
    let request = Request {
        method,
        bearer: Some(key),
        json: body.as_deref(),
        headers: &[],
    };
    let (status, answer) = url
        .send(&tls, request, TIMEOUT)
        .await
        .with_context(|| format!("{method} {url}"))?;
    let answer: Value =
        serde_json::from_slice(&answer).with_context(|| format!("{method} {url}: HTTP {status}, not JSON"))?;
    if !(200..300).contains(&status) {
        anyhow::bail!(
            "{method} {url}: HTTP {status} {}: {}",
            answer["code"].as_str().unwrap_or("?"),
            answer["message"].as_str().unwrap_or("")
        );
    }
    Ok(serde_json::to_string_pretty(&answer)?)
}
