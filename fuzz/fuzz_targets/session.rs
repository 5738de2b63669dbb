//! The sans-IO session state machine driven by arbitrary sequences of frames,
//! keepalives, authentication outcomes and clock steps: never a panic, every
//! reply it makes itself fits a frame, and its deadlines hold.
#![no_main]

use confab_protocol::Identity;
use confab_protocol::ids::{DeviceId, GroupIds, UserId};
use confab_protocol::{Session, SessionLimits, Step};
use confab_proto::v1::ClientFrame;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn limits() -> &'static SessionLimits {
    static LIMITS: OnceLock<SessionLimits> = OnceLock::new();
    LIMITS.get_or_init(|| confab::Config::defaults().expect("the defaults load").session_limits())
}

fuzz_target!(|input: &[u8]| {
    let limits = limits();
    let start = Instant::now();
    let mut now = start;
    let mut session = Session::new(7, limits.clone(), GroupIds::new(&[9; 32]), now);
    let mut input = input;
    // Each step: one byte of clock (in 100 ms), one byte of action, then for a
    // frame a two-byte length and that many bytes of protobuf.
    while let [tick, action, rest @ ..] = input {
        input = rest;
        now += Duration::from_millis(u64::from(*tick) * 100);
        match action % 6 {
            0 => {
                let Some((len, rest)) = input.split_first_chunk::<2>() else {
                    return;
                };
                let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
                let (payload, rest) = rest.split_at(len);
                input = rest;
                let Ok(frame) = ClientFrame::decode(payload) else {
                    continue;
                };
                match session.on_frame(frame, now) {
                    Step::Reply(reply) | Step::Close(reply) => {
                        assert!(reply.encoded_len() <= limits.max_frame_bytes, "{reply:?}");
                    }
                    Step::Run(_) => {}
                }
            }
            1 => session.on_keepalive(now),
            // Authenticated (or authenticated again), with a token that lasts
            // as many seconds as the next byte says.
            2 => {
                let lasts = Duration::from_secs(u64::from(input.first().copied().unwrap_or(0)));
                let identity = Identity {
                    user: UserId::new(1).expect("non-zero"),
                    device: DeviceId::new(2).expect("non-zero"),
                    username: "fuzz".into(),
                    display_name: String::new(),
                    expires_at_ms: 0,
                };
                session.authenticated(identity, now + lasts);
            }
            3 if session.identity().is_some() => session.logged_out(),
            4 => {
                let _ = session.on_refused(confab_proto::v1::ErrorCode::Unauthenticated);
            }
            _ => {
                let deadline = session.deadline();
                match session.on_deadline(now) {
                    Some(_) => assert!(now >= deadline),
                    None => assert!(now < deadline),
                }
            }
        }
    }
});
