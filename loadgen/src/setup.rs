//! Creating the users and connections a run needs (not measured).

use crate::check::Device;
use anyhow::Context as _;
use confab_client::Client;
use confab_client::Endpoint;
use std::sync::Arc;
use tokio::sync::Semaphore;

const PASSWORD: &str = "loadgen-password";
/// Accounts set up at once.
const SETUP_CONCURRENCY: usize = 32;

/// One authenticated connection of its own user.
#[derive(Debug, Clone)]
pub struct Member {
    pub device: Device,
    pub user_id: u64,
    pub access_token: String,
    pub client: Arc<Client>,
}

/// Signs up `count` fresh users (names unique to this run), logs each in and
/// authenticates one connection per user.
pub async fn members(server: Endpoint, count: usize) -> anyhow::Result<Vec<Member>> {
    let run: u32 = rand_suffix();
    let permits = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let setups = (0..count).map(|index| {
        let permits = permits.clone();
        async move {
            let _permit = permits.acquire().await.context("setup semaphore")?;
            let client = Client::connect(server).await.context("connecting")?;
            let name = format!("lg{run:08x}x{index}");
            let login = client
                .register_and_authenticate(&name, PASSWORD, "loadgen")
                .await
                .with_context(|| format!("setting up user {name}"))?;
            anyhow::Ok(Member {
                device: Device::try_from(index).context("too many devices")?,
                user_id: login.user_id,
                access_token: login.tokens.map(|tokens| tokens.access_token).unwrap_or_default(),
                client: Arc::new(client),
            })
        }
    });
    futures::future::try_join_all(setups).await
}

fn rand_suffix() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    (nanos as u32) ^ std::process::id().rotate_left(16)
}
