//! Signing in with the app's own tokens (JWT): keys from a JWKS document served
//! by a tiny HTTP server in the test, as an app's auth server would publish them.

use crate::common::*;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use confab_client::Client;
use confab_client::proto::ErrorCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const ISSUER: &str = "https://auth.example";
const AUDIENCE: &str = "chat";
const SECRET: &str = "the app's shared secret, 32 bytes or more";

/// A JWKS endpoint whose document the test can change, counting fetches.
struct JwksServer {
    url: String,
    document: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(document: Value) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let document = Arc::new(Mutex::new(document));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (served, counted) = (document.clone(), fetches.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let body = served.lock().unwrap().to_string();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        Self {
            url: format!("http://{addr}/.well-known/jwks.json"),
            document,
            fetches,
        }
    }

    fn serve(&self, document: Value) {
        *self.document.lock().unwrap() = document;
    }
}

/// A signing key of the app's auth server and its public half as a JWK.
struct SigningKey {
    kid: &'static str,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    fn rsa(kid: &'static str) -> Self {
        let public: Value = serde_json::from_str(include_str!("../fixtures/jwt/rsa.public.json")).unwrap();
        Self {
            kid,
            alg: Algorithm::RS256,
            key: EncodingKey::from_rsa_pem(include_bytes!("../fixtures/jwt/rsa.pem")).unwrap(),
            jwk: json!({ "kty": "RSA", "kid": kid, "use": "sig", "n": public["n"], "e": public["e"] }),
        }
    }

    fn ec(kid: &'static str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = pair.public_key_raw();
        Self {
            kid,
            alg: Algorithm::ES256,
            key: EncodingKey::from_ec_der(&pair.serialize_der()),
            jwk: json!({ "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
                         "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]) }),
        }
    }

    fn ed(kid: &'static str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        Self {
            kid,
            alg: Algorithm::EdDSA,
            key: EncodingKey::from_ed_der(&pair.serialize_der()),
            jwk: json!({ "kty": "OKP", "crv": "Ed25519", "kid": kid, "x": B64.encode(pair.public_key_raw()) }),
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.into());
        encode(&header, claims, &self.key).unwrap()
    }
}

fn jwks(keys: &[&SigningKey]) -> Value {
    json!({ "keys": keys.iter().map(|key| key.jwk.clone()).collect::<Vec<_>>() })
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn claims(sub: &str) -> Value {
    json!({ "sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600, "iat": now() })
}

fn hs256(claims: &Value) -> String {
    encode(&Header::default(), claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

async fn server(mode: &str, jwks_url: &str, extra: &[(&str, &str)]) -> TestServer {
    let mut overrides = vec![
        ("CONFAB_AUTH__MODE", mode),
        ("CONFAB_AUTH__JWT__JWKS_URL", jwks_url),
        ("CONFAB_AUTH__JWT__HS256_SECRET", SECRET),
        ("CONFAB_AUTH__JWT__ISSUER", ISSUER),
        ("CONFAB_AUTH__JWT__AUDIENCE", AUDIENCE),
        ("CONFAB_AUTH__JWT__DEVICE_CLAIM", "did"),
    ];
    overrides.extend_from_slice(extra);
    TestServer::start_with(2, &overrides).await
}

/// A new connection authenticated with `token` (and `device`, if the token names none).
async fn sign_in(
    server: &TestServer,
    token: &str,
    device: &str,
) -> Result<(Client, confab_client::proto::Authenticated), confab_client::ClientError> {
    let client = Client::connect(server.addr).await.unwrap();
    let authenticated = client.authenticate_device(token, device).await?;
    Ok((client, authenticated))
}

#[tokio::test]
async fn app_tokens_sign_in_one_namespaced_user_per_subject_with_a_device_per_label() {
    let (rsa, ec, ed) = (SigningKey::rsa("rsa-1"), SigningKey::ec("ec-1"), SigningKey::ed("ed-1"));
    let endpoint = JwksServer::start(jwks(&[&rsa, &ec, &ed])).await;
    let mut server = server("jwt", &endpoint.url, &[]).await;
    let alice = unique_name("alice");
    let bob = unique_name("bob");

    // Every kind of key signs the same user in.
    let (_phone, first) = sign_in(&server, &rsa.sign(&claims(&alice)), "phone").await.unwrap();
    assert_eq!(first.username, format!("app:{alice}"));
    let (_, by_ec) = sign_in(&server, &ec.sign(&claims(&alice)), "phone").await.unwrap();
    let (_, by_ed) = sign_in(&server, &ed.sign(&claims(&alice)), "laptop").await.unwrap();
    let (_, by_hs) = sign_in(&server, &hs256(&claims(&alice)), "").await.unwrap();
    assert!([&by_ec, &by_ed, &by_hs].iter().all(|a| a.user_id == first.user_id));
    // The same label is the same device; another label or none another one.
    assert_eq!(by_ec.device_id, first.device_id);
    assert_ne!(by_ed.device_id, first.device_id);
    assert_ne!(by_hs.device_id, first.device_id);
    // The token's name claim is the user's display name, and a new one replaces it.
    assert_eq!(first.display_name, "");
    let mut named = claims(&alice);
    named["name"] = json!("Alice Liddell");
    let (_, renamed) = sign_in(&server, &ec.sign(&named), "phone").await.unwrap();
    assert_eq!(renamed.display_name, "Alice Liddell");
    // A device named by the token's claim wins over the client's.
    let mut named = claims(&alice);
    named["did"] = json!("laptop");
    let (_, by_claim) = sign_in(&server, &ec.sign(&named), "phone").await.unwrap();
    assert_eq!(by_claim.device_id, by_ed.device_id);

    // Users of the app's sign-in find and message each other.
    let (bob_client, bob_auth) = sign_in(&server, &rsa.sign(&claims(&bob)), "").await.unwrap();
    let (alice_client, _) = sign_in(&server, &ed.sign(&claims(&alice)), "tablet").await.unwrap();
    let found = alice_client.user(&format!("app:{bob}")).await.unwrap();
    assert_eq!(found.user_id.get(), bob_auth.user_id);
    let alice_seen = bob_client.user(&format!("app:{alice}")).await.unwrap();
    assert_eq!(alice_seen.display_name, "Alice Liddell");
    let ack = alice_client
        .send_direct(found.user_id, "m1", "hello bob")
        .await
        .unwrap();
    let message = within(Duration::from_secs(10), bob_client.next_message())
        .await
        .unwrap();
    assert_eq!((message.seq, message.body.as_str()), (ack.seq, "hello bob"));
    // The app's sign-in, not confab, owns passwords here.
    let refused = code(
        Client::connect(server.addr)
            .await
            .unwrap()
            .sign_up(&unique_name("carol"), PASSWORD)
            .await,
    );
    assert_eq!(refused, ErrorCode::Forbidden);
    server.shutdown().await;
}

#[tokio::test]
async fn forged_expired_and_misaddressed_tokens_are_refused() {
    let rsa = SigningKey::rsa("rsa-1");
    let endpoint = JwksServer::start(jwks(&[&rsa])).await;
    let mut server = server("jwt", &endpoint.url, &[]).await;
    let sub = unique_name("mallory");
    let with = |change: Value| {
        let mut claims = claims(&sub);
        for (key, value) in change.as_object().unwrap() {
            claims[key] = value.clone();
        }
        rsa.sign(&claims)
    };
    let good = rsa.sign(&claims(&sub));
    let mut tampered: Vec<&str> = good.split('.').collect();
    let other_payload = B64.encode(claims("admin").to_string());
    tampered[1] = &other_payload;
    let tampered = tampered.join(".");
    let none = format!(
        "{}.{}.",
        B64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        B64.encode(claims(&sub).to_string())
    );
    // HS/RS confusion: HS256 under the RSA key's public modulus, naming its kid.
    let public: Value = serde_json::from_str(include_str!("../fixtures/jwt/rsa.public.json")).unwrap();
    let mut confused = Header::new(Algorithm::HS256);
    confused.kid = Some("rsa-1".into());
    let confused = encode(
        &confused,
        &claims(&sub),
        &EncodingKey::from_secret(public["n"].as_str().unwrap().as_bytes()),
    )
    .unwrap();
    let unknown_kid = SigningKey::rsa("not-published").sign(&claims(&sub));
    let cases = [
        ("expired", with(json!({ "exp": now() - 3600 }))),
        ("not yet valid", with(json!({ "nbf": now() + 3600 }))),
        ("wrong audience", with(json!({ "aud": "another-app" }))),
        ("wrong issuer", with(json!({ "iss": "https://evil.example" }))),
        ("tampered payload", tampered),
        ("alg none", none),
        ("HS/RS confusion", confused),
        ("unknown kid", unknown_kid),
        ("not a JWT", "eyJhbGciOi.garbage.x".into()),
    ];
    for (case, token) in cases {
        let refused = sign_in(&server, &token, "")
            .await
            .map(|(_, authenticated)| authenticated);
        assert_eq!(code(refused), ErrorCode::Unauthenticated, "{case}");
    }
    // The good one still works, after all that.
    sign_in(&server, &good, "").await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn a_rotated_key_is_fetched_when_a_token_names_it_without_a_restart() {
    let (old, new) = (SigningKey::ec("2026-11"), SigningKey::ed("2026-12"));
    let endpoint = JwksServer::start(jwks(&[&old])).await;
    let mut server = server(
        "jwt",
        &endpoint.url,
        &[("CONFAB_AUTH__JWT__JWKS_MIN_REFETCH_INTERVAL", "0s")],
    )
    .await;
    let sub = unique_name("rotating");
    sign_in(&server, &old.sign(&claims(&sub)), "").await.unwrap();
    // Not published yet: refused after one more fetch.
    let fetched = endpoint.fetches.load(Ordering::SeqCst);
    let early = sign_in(&server, &new.sign(&claims(&sub)), "").await.map(|(_, a)| a);
    assert_eq!(code(early), ErrorCode::Unauthenticated);
    assert!(endpoint.fetches.load(Ordering::SeqCst) > fetched);
    // The auth server rotates: the new key is taken at its first token.
    endpoint.serve(jwks(&[&old, &new]));
    sign_in(&server, &new.sign(&claims(&sub)), "").await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn made_up_key_ids_do_not_make_a_fetch_each() {
    let key = SigningKey::rsa("rsa-1");
    let endpoint = JwksServer::start(jwks(&[&key])).await;
    // Default jwks_min_refetch_interval: 30 s.
    let mut server = server("jwt", &endpoint.url, &[]).await;
    let sub = unique_name("flood");
    sign_in(&server, &key.sign(&claims(&sub)), "").await.unwrap();
    let fetched = endpoint.fetches.load(Ordering::SeqCst);
    for kid in ["a", "b", "c", "d", "e"] {
        let made_up = SigningKey {
            kid,
            ..SigningKey::rsa("x")
        }
        .sign(&claims(&sub));
        let refused = sign_in(&server, &made_up, "").await.map(|(_, a)| a);
        assert_eq!(code(refused), ErrorCode::Unauthenticated);
    }
    assert!(endpoint.fetches.load(Ordering::SeqCst) <= fetched + 1);
    server.shutdown().await;
}

#[tokio::test]
async fn both_mode_keeps_password_accounts_apart_from_the_apps_users() {
    let mut server = server("both", "", &[("CONFAB_AUTH__MAX_DEVICES_PER_USER", "2")]).await;
    // A password account named like a subject of the app's sign-in.
    let (_local, login, name) = new_user(server.addr, "dana").await;
    let (_, external) = sign_in(&server, &hs256(&claims(&name)), "one").await.unwrap();
    assert_ne!(external.user_id, login.user_id.get());
    assert_eq!(external.username, format!("app:{name}"));
    // The app's user has no password to log in with.
    let client = Client::connect(server.addr).await.unwrap();
    assert_eq!(
        code(client.log_in(&format!("app:{name}"), PASSWORD, "x").await),
        ErrorCode::Unauthenticated
    );
    // Devices count against auth.max_devices_per_user.
    sign_in(&server, &hs256(&claims(&name)), "two").await.unwrap();
    let third = sign_in(&server, &hs256(&claims(&name)), "three").await.map(|(_, a)| a);
    assert_eq!(code(third), ErrorCode::TooLarge);
    server.shutdown().await;
}
