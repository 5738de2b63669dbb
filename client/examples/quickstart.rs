//! The README's quick start: two users, one message, one history page.
//!
//! `cargo run -p confab-client --example quickstart [ADDR]` with a server running.
#![allow(clippy::print_stdout)]

use confab_client::Client;

#[tokio::main]
async fn main() -> Result<(), confab_client::ClientError> {
    // e.g. 127.0.0.1:7300, ws://127.0.0.1:7380 or quic://127.0.0.1:7300#<certificate sha256>
    let server: confab_client::Endpoint = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7300".into())
        .parse()
        .map_err(confab_client::ClientError::Transport)?;
    let alice = Client::connect(server).await?;
    alice
        .register_and_authenticate("alice", "correct horse", "laptop")
        .await?;
    let bob = Client::connect(server).await?;
    let bob_login = bob.register_and_authenticate("bob", "battery staple", "phone").await?;

    let ack = alice.send_direct(bob_login.user_id, "msg-1", "hi bob!").await?;
    println!("stored as #{} of {}", ack.seq, ack.conversation_id);

    let message = bob.next_message().await?;
    println!("bob got {:?} from user {}", message.body, message.sender_user_id);

    let page = bob.history(&ack.conversation_id, None, None, 50).await?;
    println!("history holds {} message(s)", page.messages.len());
    Ok(())
}
