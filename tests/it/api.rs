//! The server HTTP API (`api.listen`, docs/API.md): what the app's backend does
//! reaches the clients as their own requests would, and every response these
//! tests get is checked against docs/openapi.yaml.

use crate::common::*;
use confab_client::proto::ErrorCode;
use confab_client::proto::group_event::Kind;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;

const KEY: &str = "an API key of the app's backend, 32+ chars";
const WAIT: Duration = Duration::from_secs(10);

/// docs/openapi.yaml, for checking responses.
struct Spec(Value);

impl Spec {
    fn load() -> Self {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml")).unwrap();
        Self(serde_yaml::from_str(&text).unwrap())
    }

    fn resolve<'a>(&'a self, value: &'a Value) -> &'a Value {
        match value.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let pointer = reference.trim_start_matches('#');
                self.resolve(self.0.pointer(pointer).unwrap_or_else(|| panic!("no {reference}")))
            }
            None => value,
        }
    }

    /// The documented response of `method path` with `status`.
    fn response(&self, method: &str, path: &str, status: u16) -> &Value {
        let path = path.split('?').next().unwrap();
        let segments: Vec<&str> = path.split('/').collect();
        let (_, item) = self.0["paths"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(template, _)| {
                let template: Vec<&str> = template.split('/').collect();
                template.len() == segments.len()
                    && template
                        .iter()
                        .zip(&segments)
                        .all(|(t, s)| t == s || (t.starts_with('{') && !s.is_empty()))
            })
            .unwrap_or_else(|| panic!("{path} is not in docs/openapi.yaml"));
        let operation = &item[method.to_ascii_lowercase()];
        assert!(operation.is_object(), "{method} {path} is not in docs/openapi.yaml");
        let response = &operation["responses"][status.to_string()];
        assert!(
            response.is_object(),
            "{method} {path} → {status} is not in docs/openapi.yaml"
        );
        self.resolve(response)
    }

    /// Checks a response against the spec; panics with where it differs.
    fn check(&self, method: &str, path: &str, status: u16, content_type: &str, body: &str) {
        let response = self.response(method, path, status);
        let content = &response["content"];
        if content_type.starts_with("application/json") {
            let schema = &content["application/json"]["schema"];
            assert!(schema.is_object(), "{method} {path} → {status}: JSON not documented");
            let value: Value = serde_json::from_str(body).unwrap();
            if let Err(err) = self.validate(schema, &value, "$") {
                panic!("{method} {path} → {status} does not match docs/openapi.yaml: {err}\n{body}");
            }
        } else {
            assert!(
                content["text/plain"].is_object(),
                "{method} {path} → {status}: {content_type} not documented"
            );
        }
    }

    fn validate(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema);
        let kind = schema["type"].as_str().unwrap_or("any");
        let fits = match kind {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_u64() || value.is_i64(),
            "boolean" => value.is_boolean(),
            _ => true,
        };
        if !fits {
            return Err(format!("{at}: expected {kind}, got {value}"));
        }
        if let Some(allowed) = schema["enum"].as_array()
            && !allowed.contains(value)
        {
            return Err(format!("{at}: {value} is not one of {allowed:?}"));
        }
        if let (Some(object), Some(properties)) = (value.as_object(), schema["properties"].as_object()) {
            for required in schema["required"].as_array().into_iter().flatten() {
                let name = required.as_str().unwrap();
                if !object.contains_key(name) {
                    return Err(format!("{at}: missing {name}"));
                }
            }
            for (name, field) in object {
                match properties.get(name) {
                    Some(property) => self.validate(property, field, &format!("{at}.{name}"))?,
                    None if schema["additionalProperties"] == json!(false) => {
                        return Err(format!("{at}: {name} is not documented"));
                    }
                    None => {}
                }
            }
        }
        if let Some(items) = value.as_array() {
            for (index, item) in items.iter().enumerate() {
                self.validate(&schema["items"], item, &format!("{at}[{index}]"))?;
            }
        }
        Ok(())
    }
}

/// An HTTP/1.1 client for the API that checks every response against the spec.
struct Api {
    addr: SocketAddr,
    spec: Spec,
}

struct Response {
    status: u16,
    headers: String,
    body: String,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|err| panic!("{err}: {}", self.body))
    }

    fn code(&self) -> String {
        self.json()["code"].as_str().unwrap().to_owned()
    }
}

impl Api {
    async fn request(&self, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> Response {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: confab\r\nConnection: close\r\n");
        if let Some(key) = key {
            request.push_str(&format!("Authorization: Bearer {key}\r\n"));
        }
        let body = body.unwrap_or_default();
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        within(WAIT, stream.read_to_string(&mut response)).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let content_type = head
            .lines()
            .find_map(|line| {
                line.to_ascii_lowercase()
                    .strip_prefix("content-type: ")
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        self.spec.check(method, path, status, &content_type, body);
        Response {
            status,
            headers: head.to_owned(),
            body: body.to_owned(),
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Response {
        let body = body.map(|body| body.to_string());
        self.request(method, path, Some(KEY), body.as_deref()).await
    }
}

async fn node(extra: &[(&str, &str)]) -> (TestServer, Api) {
    let keys = format!("[\"{KEY}\"]");
    let mut overrides = vec![
        ("CONFAB_API__LISTEN", "127.0.0.1:0"),
        ("CONFAB_API__KEYS", keys.as_str()),
        ("CONFAB_API__MAX_BODY_BYTES", "4096"),
    ];
    overrides.extend_from_slice(extra);
    let node = TestServer::start_with(2, &overrides).await;
    let addr = node.server.as_ref().unwrap().api_addr().unwrap();
    (
        node,
        Api {
            addr,
            spec: Spec::load(),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_message_reaches_live_devices_with_the_next_seq_once_per_key() {
    let (mut node, api) = node(&[]).await;
    let (alice, alice_login, _) = new_user(node.addr, "alice").await;
    let (bob, bob_login, _) = new_user(node.addr, "bob").await;
    let alice_id = alice_login.user_id.get();
    let first = alice
        .send_direct(bob_login.user_id, "c1", "from the client")
        .await
        .unwrap();
    within(WAIT, bob.next_message()).await.unwrap();

    let publish = json!({ "sender_user_id": alice_id, "direct_user_id": bob_login.user_id.get(),
                          "idempotency_key": "order-42", "body": "your order shipped" });
    let published = api.call("POST", "/v1/messages", Some(publish.clone())).await;
    assert_eq!(published.status, 200, "{}", published.body);
    let ack = published.json();
    assert_eq!(ack["seq"], json!(first.seq + 1));
    assert_eq!(ack["conversation_id"], json!(first.conversation_id));
    // Bob, and Alice's own device, get it as any message.
    for client in [&bob, &alice] {
        let message = within(WAIT, client.next_message()).await.unwrap();
        assert_eq!(
            (message.seq, message.body.as_str()),
            (first.seq + 1, "your order shipped")
        );
        assert_eq!(message.sender_user_id, alice_id);
    }
    // A retry answers the same, and stores and pushes nothing new.
    let retried = api.call("POST", "/v1/messages", Some(publish)).await.json();
    assert_eq!(retried, ack);
    let next = alice.send_direct(bob_login.user_id, "c2", "next").await.unwrap();
    assert_eq!(next.seq, first.seq + 2);
    let pushed = within(WAIT, bob.next_message()).await.unwrap();
    assert_eq!(pushed.client_msg_id, "c2", "the retry was not pushed again");

    // History has all three.
    let path = format!("/v1/conversations/{}/messages", first.conversation_id);
    let page = api.call("GET", &path, None).await.json();
    let bodies: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["from the client", "your order shipped", "next"]);
    let after = api
        .call("GET", &format!("{path}?after={}&limit=1", first.seq), None)
        .await
        .json();
    assert_eq!(after["messages"][0]["seq"], json!(first.seq + 1));
    assert_eq!(after["has_more"], json!(true));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_made_through_the_api_are_groups_for_the_clients() {
    let (mut node, api) = node(&[]).await;
    let (_owner, owner_login, _) = new_user(node.addr, "owner").await;
    let (member, member_login, _) = new_user(node.addr, "member").await;
    let (_late, late_login, _) = new_user(node.addr, "late").await;
    let owner_id = owner_login.user_id.get();
    let create = json!({ "creator_user_id": owner_id, "title": "Support", "member_user_ids": [member_login.user_id.get()],
                         "idempotency_key": "group-1" });
    let created = api.call("POST", "/v1/groups", Some(create)).await;
    assert_eq!(created.status, 200, "{}", created.body);
    let group = created.json()["conversation_id"].as_str().unwrap().to_owned();
    let event = within(WAIT, member.next_message()).await.unwrap();
    assert_eq!(event.conversation_id, group);

    // The member is not an admin: refused as for a client.
    let add = |actor: u64, key: &str| json!({ "actor_user_id": actor, "user_ids": [late_login.user_id.get()], "idempotency_key": key });
    let refused = api
        .call(
            "POST",
            &format!("/v1/groups/{group}/members"),
            Some(add(member_login.user_id.get(), "a1")),
        )
        .await;
    assert_eq!((refused.status, refused.code().as_str()), (403, "FORBIDDEN"));
    let added = api
        .call(
            "POST",
            &format!("/v1/groups/{group}/members"),
            Some(add(owner_id, "a2")),
        )
        .await;
    assert_eq!(added.status, 200, "{}", added.body);
    let role = format!("/v1/groups/{group}/members/{}/role", member_login.user_id);
    let admin = json!({ "actor_user_id": owner_id, "role": "admin", "idempotency_key": "role-1" });
    assert_eq!(api.call("PUT", &role, Some(admin)).await.status, 200);
    let bad_role = json!({ "actor_user_id": owner_id, "role": "owner", "idempotency_key": "role-2" });
    assert_eq!(api.call("PUT", &role, Some(bad_role)).await.status, 400);
    // An admin now: renames the group.
    let rename = json!({ "actor_user_id": member_login.user_id.get(), "title": "Support 2", "idempotency_key": "t1" });
    assert_eq!(
        api.call("PATCH", &format!("/v1/groups/{group}"), Some(rename))
            .await
            .status,
        200
    );
    let path = format!(
        "/v1/groups/{group}/members/{}?actor_user_id={owner_id}&idempotency_key=r1",
        late_login.user_id
    );
    assert_eq!(api.call("DELETE", &path, None).await.status, 200);
    // A message into the group from someone outside it is refused.
    let outsider = json!({ "sender_user_id": late_login.user_id.get(), "conversation_id": group, "idempotency_key": "x", "body": "hi" });
    let refused = api.call("POST", "/v1/messages", Some(outsider)).await;
    assert_eq!((refused.status, refused.code().as_str()), (403, "FORBIDDEN"));

    let page = api
        .call("GET", &format!("/v1/conversations/{group}/messages"), None)
        .await
        .json();
    let kinds: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["event"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["created", "members_added", "role_changed", "renamed", "member_removed"]
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_presence_and_revoking_devices() {
    let (mut node, api) = node(&[]).await;
    let name = unique_name("api");
    let created = api
        .call(
            "POST",
            "/v1/users",
            Some(json!({ "username": name, "password": PASSWORD })),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let user_id = created.json()["user_id"].as_u64().unwrap();
    // The account works for a client.
    let client = confab_client::Client::connect(node.addr).await.unwrap();
    let login = client.log_in(&name, PASSWORD, "phone").await.unwrap();
    client.authenticate(&login.tokens.access_token).await.unwrap();
    assert_eq!(login.user_id.get(), user_id);

    // A device issued through the API signs in without the password.
    let path = format!("/v1/users/{user_id}/devices");
    let issued = api.call("POST", &path, Some(json!({ "device_name": "tool" }))).await;
    assert_eq!(issued.status, 201, "{}", issued.body);
    let tool = confab_client::Client::connect(node.addr).await.unwrap();
    let access_token = issued.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(tool.authenticate(&access_token).await.unwrap().user_id, user_id);
    let external = api
        .call("POST", "/v1/users", Some(json!({ "username": format!("app:{name}") })))
        .await;
    assert_eq!(external.status, 201, "{}", external.body);
    let found = api
        .call("GET", &format!("/v1/users/by-name/app:{name}"), None)
        .await
        .json();
    assert_eq!(found["user_id"], external.json()["user_id"]);

    let presence = api
        .call("GET", &format!("/v1/users/{user_id}/presence"), None)
        .await
        .json();
    assert_eq!(
        presence,
        json!({ "user_id": user_id, "online": true, "connections": 2 })
    );
    let revoked = api
        .call("DELETE", &format!("/v1/users/{user_id}/devices"), None)
        .await
        .json();
    assert_eq!(revoked, json!({ "revoked_devices": 2 }));
    // The device's connection is told and closed.
    let closed = within(WAIT, client.next_message()).await.unwrap_err();
    assert_eq!(closed.code(), Some(ErrorCode::Unauthenticated), "{closed}");
    let mut offline = Value::Null;
    for _ in 0..200 {
        offline = api
            .call("GET", &format!("/v1/users/{user_id}/presence"), None)
            .await
            .json();
        if offline["online"] == json!(false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(offline["connections"], json!(0));
    let stats = api.call("GET", "/v1/stats", None).await.json();
    assert_eq!(stats["shards"], json!(2));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_protocols_codes_and_change_nothing() {
    let (mut node, api) = node(&[]).await;
    // No key, a wrong key: 401, and nothing is created.
    let name = unique_name("nokey");
    let body = json!({ "username": name, "password": PASSWORD }).to_string();
    for key in [None, Some("not the key, but long enough to be one......")] {
        let refused = api.request("POST", "/v1/users", key, Some(&body)).await;
        assert_eq!((refused.status, refused.code().as_str()), (401, "UNAUTHENTICATED"));
        assert!(
            refused.headers.contains("www-authenticate: Bearer"),
            "{}",
            refused.headers
        );
    }
    let lookup = api.call("GET", &format!("/v1/users/by-name/{name}"), None).await;
    assert_eq!((lookup.status, lookup.code().as_str()), (404, "NOT_FOUND"));

    let cases = [
        ("POST", "/v1/users", "{not json".to_owned(), 400, "BAD_REQUEST"),
        (
            "POST",
            "/v1/users",
            json!({ "username": 7 }).to_string(),
            400,
            "BAD_REQUEST",
        ),
        (
            "POST",
            "/v1/users",
            json!({ "username": "x y" }).to_string(),
            400,
            "BAD_REQUEST",
        ),
        (
            "POST",
            "/v1/users",
            json!({ "username": "nopassword" }).to_string(),
            400,
            "BAD_REQUEST",
        ),
        (
            "POST",
            "/v1/users",
            json!({ "username": "s", "password": PASSWORD, "extra": 1 }).to_string(),
            400,
            "BAD_REQUEST",
        ),
        ("POST", "/v1/users", "x".repeat(5000), 413, "TOO_LARGE"),
        (
            "POST",
            "/v1/messages",
            json!({ "sender_user_id": 0, "direct_user_id": 1, "idempotency_key": "k", "body": "b" }).to_string(),
            400,
            "BAD_REQUEST",
        ),
        (
            "POST",
            "/v1/messages",
            json!({ "sender_user_id": 999_999_999, "direct_user_id": 1, "idempotency_key": "k", "body": "b" })
                .to_string(),
            404,
            "NOT_FOUND",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let response = api.request(method, path, Some(KEY), Some(&body)).await;
        assert_eq!(
            (response.status, response.code().as_str()),
            (status, code),
            "{method} {path} {body:.60}"
        );
    }
    let (_alice, alice_login, _) = new_user(node.addr, "alice").await;
    let alice_id = alice_login.user_id.get();
    for (publish, status, code) in [
        (
            json!({ "sender_user_id": alice_id, "idempotency_key": "k", "body": "b" }),
            400,
            "BAD_REQUEST",
        ),
        (
            json!({ "sender_user_id": alice_id, "direct_user_id": alice_id, "idempotency_key": "k", "body": "b" }),
            400,
            "BAD_REQUEST",
        ),
        (
            json!({ "sender_user_id": alice_id, "direct_user_id": 1, "idempotency_key": "", "body": "b" }),
            400,
            "BAD_REQUEST",
        ),
        (
            json!({ "sender_user_id": alice_id, "direct_user_id": 1, "idempotency_key": "k", "body": "" }),
            400,
            "BAD_REQUEST",
        ),
        (
            json!({ "sender_user_id": alice_id, "conversation_id": "nonsense", "idempotency_key": "k", "body": "b" }),
            400,
            "BAD_REQUEST",
        ),
    ] {
        let response = api.call("POST", "/v1/messages", Some(publish.clone())).await;
        assert_eq!((response.status, response.code().as_str()), (status, code), "{publish}");
    }
    // Health needs no key; metrics are off here.
    assert_eq!(api.request("GET", "/healthz", None, None).await.body, "ok\n");
    assert_eq!(api.request("GET", "/readyz", None, None).await.body, "ready\n");
    assert_eq!(api.request("GET", "/metrics", None, None).await.status, 404);
    node.shutdown().await;
}

/// Runs `confab admin` against `api`: its stdout as JSON, or its stderr.
async fn admin(api: SocketAddr, key: &str, args: &[&str]) -> Result<Value, String> {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_confab"));
    command
        .args(["admin", "--api", &format!("http://{api}"), "--key", key])
        .args(args);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    match output.status.success() {
        true => Ok(serde_json::from_slice(&output.stdout).unwrap()),
        false => Err(String::from_utf8_lossy(&output.stderr).into_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confab_admin_creates_a_user_issues_its_token_and_publishes() {
    let (mut node, api) = node(&[]).await;
    let name = unique_name("cli");
    let created = admin(api.addr, KEY, &["create-user", &name, "--password", PASSWORD])
        .await
        .unwrap();
    let user_id = created["user_id"].as_u64().unwrap();
    let token = admin(api.addr, KEY, &["token", &user_id.to_string()]).await.unwrap();
    let client = confab_client::Client::connect(node.addr).await.unwrap();
    client
        .authenticate(token["access_token"].as_str().unwrap())
        .await
        .unwrap();
    let (_, other, _) = new_user(node.addr, "other").await;
    let (from, to) = (other.user_id.to_string(), user_id.to_string());
    let ack = admin(
        api.addr,
        KEY,
        &["publish", "--from", &from, "--to", &to, "hello from ops"],
    )
    .await
    .unwrap();
    let message = within(WAIT, client.next_message()).await.unwrap();
    assert_eq!(
        (message.seq, message.body.as_str()),
        (ack["seq"].as_u64().unwrap(), "hello from ops")
    );
    let presence = admin(api.addr, KEY, &["presence", &to]).await.unwrap();
    assert_eq!(presence["online"], json!(true));
    let refused = admin(api.addr, "a wrong key that is long enough, yes", &["stats"])
        .await
        .unwrap_err();
    assert!(refused.contains("HTTP 401 UNAUTHENTICATED"), "{refused}");
    let missing = admin(api.addr, KEY, &["user", "nobody-here"]).await.unwrap_err();
    assert!(missing.contains("HTTP 404 NOT_FOUND"), "{missing}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_renamed_given_new_passwords_and_deleted() {
    let (mut node, api) = node(&[]).await;
    let (owner, owner_login, owner_name) = new_user(node.addr, "gone").await;
    let (member, member_login, _) = new_user(node.addr, "stays").await;
    let owner_id = owner_login.user_id.get();

    let renamed = api
        .call(
            "PATCH",
            &format!("/v1/users/{owner_id}"),
            Some(json!({ "display_name": "Soon Gone" })),
        )
        .await
        .json();
    assert_eq!(renamed["display_name"], json!("Soon Gone"));
    assert_eq!(member.user(&owner_name).await.unwrap().display_name, "Soon Gone");

    // A new password logs every device out; the new one works, the old not.
    let patched = api
        .call(
            "PATCH",
            &format!("/v1/users/{owner_id}"),
            Some(json!({ "password": "a brand new password" })),
        )
        .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    let closed = within(WAIT, owner.next_message()).await.unwrap_err();
    assert_eq!(closed.code(), Some(ErrorCode::Unauthenticated), "{closed}");
    let client = confab_client::Client::connect(node.addr).await.unwrap();
    assert_eq!(
        code(client.log_in(&owner_name, PASSWORD, "x").await),
        ErrorCode::Unauthenticated
    );
    let login = client.log_in(&owner_name, "a brand new password", "x").await.unwrap();
    client.authenticate(&login.tokens.access_token).await.unwrap();

    // Deleting the owner of a group hands the group on, then removes the user.
    let group = client
        .create_group("g1", "Team", &[member_login.user_id])
        .await
        .unwrap();
    within(WAIT, member.next_message()).await.unwrap();
    let deleted = api.call("DELETE", &format!("/v1/users/{owner_id}"), None).await.json();
    assert_eq!(deleted, json!({ "groups_left": 1, "revoked_devices": 1 }));
    let left = within(WAIT, member.next_message()).await.unwrap();
    assert_eq!(left.conversation_id, group.conversation_id);
    let new_owner = left.event.and_then(|event| event.kind);
    assert!(
        matches!(new_owner, Some(Kind::MemberLeft(ref left)) if left.new_owner_user_id == member_login.user_id.get()),
        "{new_owner:?}"
    );
    // The deleted user's device sees its leaving, then is closed.
    let closed = within(WAIT, async {
        loop {
            if let Err(closed) = client.next_message().await {
                return closed;
            }
        }
    })
    .await;
    assert_eq!(closed.code(), Some(ErrorCode::Unauthenticated), "{closed}");
    let gone = api.call("GET", &format!("/v1/users/by-name/{owner_name}"), None).await;
    assert_eq!((gone.status, gone.code().as_str()), (404, "NOT_FOUND"));
    let again = api.call("DELETE", &format!("/v1/users/{owner_id}"), None).await;
    assert_eq!(again.status, 404);
    // The name is free again.
    let reborn = api
        .call(
            "POST",
            "/v1/users",
            Some(json!({ "username": owner_name, "password": PASSWORD })),
        )
        .await;
    assert_eq!(reborn.status, 201, "{}", reborn.body);
    assert_ne!(reborn.json()["user_id"], json!(owner_id));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_take_more_than_api_max_connections() {
    let (mut node, api) = node(&[("CONFAB_API__MAX_CONNECTIONS", "2")]).await;
    let idle = [
        tokio::net::TcpStream::connect(api.addr).await.unwrap(),
        tokio::net::TcpStream::connect(api.addr).await.unwrap(),
    ];
    // A third connection waits: its request is not answered ...
    let mut waiting = tokio::spawn(async move { api.request("GET", "/healthz", None, None).await.body });
    let early = tokio::time::timeout(Duration::from_millis(300), &mut waiting).await;
    assert!(early.is_err(), "answered beyond api.max_connections");
    // ... until an idle one goes away.
    drop(idle);
    assert_eq!(within(WAIT, waiting).await.unwrap(), "ok\n");
    node.shutdown().await;
}
