//! The call to the app's push service: a batch of notifications as JSON,
//! signed with HMAC-SHA256 over the timestamp and the body (docs/PUSH.md).

use crate::http::{HttpUrl, Request, client_tls};
use crate::store::PendingPush;
use confab_proto::v1::PushPlatform;
use confab_protocol::PushToken;
use confab_protocol::ids::{ConversationId, DeviceId, UserId};
use hmac::{Hmac, Mac as _};
use serde::Serialize;
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;

/// One device's notification.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Notification {
    user_id: u64,
    device_id: u64,
    platform: &'static str,
    token: String,
    collapse_key: String,
    count: u64,
    conversations: Vec<Conversation>,
}

#[derive(Debug, Clone, Serialize)]
struct Conversation {
    conversation_id: String,
    count: u64,
    last_seq: u64,
    sender_user_id: u64,
    body: String,
}

impl Notification {
    /// `device`'s notification of `pending`, with the texts when `bodies`, but
    /// of the `muted` conversations.
    pub(super) fn new(
        (user, device): (UserId, DeviceId),
        token: PushToken,
        pending: &PendingPush,
        bodies: bool,
        muted: &[ConversationId],
    ) -> Self {
        Self {
            user_id: user.get(),
            device_id: device.get(),
            platform: match token.platform {
                PushPlatform::Fcm => "fcm",
                PushPlatform::Apns => "apns",
                PushPlatform::Webpush => "webpush",
                PushPlatform::Webhook | PushPlatform::Unspecified => "webhook",
            },
            token: token.token,
            collapse_key: format!("confab-{}-{}", user.get(), device.get()),
            count: pending.count,
            conversations: pending
                .conversations
                .iter()
                .map(|conversation| Conversation {
                    conversation_id: conversation.conversation.to_string(),
                    count: conversation.count,
                    last_seq: conversation.last_seq,
                    sender_user_id: conversation.sender.get(),
                    body: match bodies && !muted.contains(&conversation.conversation) {
                        true => conversation.body.clone(),
                        false => String::new(),
                    },
                })
                .collect(),
        }
    }
}

/// The app's push webhook.
pub(super) struct Webhook {
    url: HttpUrl,
    key: Hmac<Sha256>,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl Webhook {
    /// Calls to `url`, signed with `secret`, each answered within `timeout`.
    pub(super) fn new(url: HttpUrl, secret: &str, timeout: Duration) -> Result<Self, String> {
        Ok(Self {
            url,
            key: Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_err(|err| err.to_string())?,
            tls: client_tls().map_err(|err| err.to_string())?,
            timeout,
        })
    }

    /// POSTs `notifications`; an error unless the answer is 2xx.
    pub(super) async fn post(&self, notifications: &[Notification], unix_s: u64) -> Result<(), String> {
        let body = serde_json::json!({ "notifications": notifications }).to_string();
        let timestamp = unix_s.to_string();
        let signature = format!("v1={}", sign(&self.key, &timestamp, &body));
        let headers = [
            ("x-confab-timestamp", timestamp.as_str()),
            ("x-confab-signature", signature.as_str()),
        ];
        let request = Request {
            method: "POST",
            bearer: None,
            json: Some(&body),
            headers: &headers,
        };
        match self.url.send(&self.tls, request, self.timeout).await {
            Ok((status, _)) if (200..300).contains(&status) => Ok(()),
            Ok((status, _)) => Err(format!("HTTP {status}")),
            Err(err) => Err(err.to_string()),
        }
    }
}

/// Hex HMAC-SHA256 of `timestamp.body`.
fn sign(key: &Hmac<Sha256>, timestamp: &str, body: &str) -> String {
    let mut mac = key.clone();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed apart: python3 hmac.new(b"key", b'1700000000.{"notifications":[]}', sha256).
        let key = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
        assert_eq!(
            sign(&key, "1700000000", r#"{"notifications":[]}"#),
            "f69207727de941bb1b699373d1c9ba63a08efb971e9862b215dc578582d22747"
        );
    }
}
