//! docs/PROTOCOL.md matches the protocol: every message of the .proto files is
//! documented, and the worked example's bytes are what the codec produces.

use confab_client::proto::{
    self, ClientFrame, ProtocolVersion, ServerFrame, client_frame, conversation_ref, server_frame,
};
use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// Names declared with `message` or `enum` in a .proto file.
fn declared_names(proto: &str) -> Vec<String> {
    proto
        .lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let rest = line.strip_prefix("message ").or_else(|| line.strip_prefix("enum "))?;
            Some(rest.split_whitespace().next()?.to_owned())
        })
        .collect()
}

#[test]
fn every_message_and_enum_is_documented() {
    let doc = read("docs/PROTOCOL.md");
    let names = declared_names(&read("proto/confab/v1/frames.proto"));
    assert!(names.len() > 50, "parsed {} names", names.len());
    let missing: Vec<_> = names
        .iter()
        .filter(|name| !doc.contains(&format!("`{name}`")))
        .collect();
    assert!(missing.is_empty(), "not documented in docs/PROTOCOL.md: {missing:?}");
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The frames of the worked example, as the codec encodes them.
fn example() -> Vec<(&'static str, String)> {
    let client = |request_id, kind| {
        hex(&confab_proto::encode_frame(&ClientFrame {
            request_id,
            kind: Some(kind),
        }))
    };
    let server = |request_id, kind| {
        hex(&confab_proto::encode_frame(&ServerFrame {
            request_id,
            kind: Some(kind),
        }))
    };
    vec![
        (
            "hello",
            client(
                1,
                client_frame::Kind::Hello(proto::Hello {
                    protocol_version: ProtocolVersion::V1 as i32,
                    client_name: "demo".into(),
                    client_version: "1.0".into(),
                }),
            ),
        ),
        (
            "welcome",
            server(
                1,
                server_frame::Kind::Welcome(proto::Welcome {
                    server_version: "0.1.0".into(),
                    protocol_version: ProtocolVersion::V1 as i32,
                    session_id: "00000000000000ab".into(),
                    limits: Some(proto::Limits {
                        max_frame_bytes: 262_144,
                        heartbeat_interval_ms: 15_000,
                        max_body_chars: 100_000,
                        max_history_limit: 200,
                    }),
                }),
            ),
        ),
        (
            "send",
            client(
                4,
                client_frame::Kind::Send(proto::Send {
                    conversation: Some(proto::ConversationRef {
                        target: Some(conversation_ref::Target::DirectUserId(42)),
                    }),
                    client_msg_id: "m1".into(),
                    body: "hi".into(),
                }),
            ),
        ),
        (
            "send_ack",
            server(
                4,
                server_frame::Kind::SendAck(proto::SendAck {
                    conversation_id: "d:7:42".into(),
                    seq: 1,
                    server_time_ms: 1_764_000_000_000,
                    client_msg_id: "m1".into(),
                }),
            ),
        ),
        (
            "message",
            server(
                0,
                server_frame::Kind::Message(proto::Message {
                    conversation_id: "d:7:42".into(),
                    seq: 1,
                    sender_user_id: 7,
                    sender_device_id: 3,
                    client_msg_id: "m1".into(),
                    body: "hi".into(),
                    server_time_ms: 1_764_000_000_000,
                    ..proto::Message::default()
                }),
            ),
        ),
    ]
}

#[test]
fn the_worked_example_bytes_are_real() {
    let doc = read("docs/PROTOCOL.md")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for (name, bytes) in example() {
        println!("{name}: {bytes}");
        assert!(doc.contains(&bytes), "docs/PROTOCOL.md lacks the {name} frame: {bytes}");
    }
}
