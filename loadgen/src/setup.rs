//! Creating the users and connections a run needs (not measured).

use crate::check::Device;
use crate::line::Line;
use anyhow::Context as _;
use confab_client::Client;
use confab_client::{ClientOptions, Endpoint, Failover};
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Every loadgen account's password.
pub const PASSWORD: &str = "loadgen-password";
/// Accounts set up at once.
const SETUP_CONCURRENCY: usize = 32;

/// One authenticated connection of its own user.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub device: Device,
    pub user_id: confab_client::UserId,
    pub access_token: String,
    /// The member's connection, which moves to another server when its own
    /// goes away (in a run over several servers).
    pub line: Arc<Line>,
}

impl Member {
    /// The member's current connection.
    pub fn client(&self) -> Arc<Client> {
        self.line.client()
    }
}

/// Signs up `count` fresh users (names unique to this run), logs each in and
/// authenticates one connection per user, user `i` on the connector's server
/// `i` (in turn).
pub async fn members(connector: &Connector, count: usize) -> anyhow::Result<Vec<Member>> {
    let run: u32 = rand_suffix();
    let permits = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let setups = (0..count).map(|index| {
        let permits = permits.clone();
        async move {
            let _permit = permits.acquire().await.context("setup semaphore")?;
            let client = connector.connect_nth(index).await.context("connecting")?;
            let name = format!("lg{run:08x}x{index}");
            let context = || format!("setting up user {name}");
            until_not_rate_limited(|| client.sign_up(&name, PASSWORD))
                .await
                .with_context(context)?;
            let login = until_not_rate_limited(|| client.log_in(&name, PASSWORD, "loadgen"))
                .await
                .with_context(context)?;
            client
                .authenticate(&login.tokens.access_token)
                .await
                .with_context(context)?;
            let server = index % connector.servers().len();
            let line = Line::new(client, server, connector.clone(), login.tokens.access_token.clone());
            anyhow::Ok(Member {
                name,
                device: Device::try_from(index).context("too many devices")?,
                user_id: login.user_id,
                access_token: login.tokens.access_token,
                line: Arc::new(line),
            })
        }
    });
    futures::future::try_join_all(setups).await
}

/// Runs `request` again while the server answers RATE_LIMITED (a server with its
/// default limits lets one address hash one password at a time per two cores).
async fn until_not_rate_limited<T, F>(mut request: impl FnMut() -> F) -> Result<T, confab_client::ClientError>
where
    F: std::future::Future<Output = Result<T, confab_client::ClientError>>,
{
    let mut wait = std::time::Duration::from_millis(5);
    for _ in 0..100 {
        match request().await {
            Err(err) if err.code() == Some(confab_client::proto::ErrorCode::RateLimited) => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_millis(200));
            }
            result => return result,
        }
    }
    request().await
}

fn rand_suffix() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    (nanos as u32) ^ std::process::id().rotate_left(16)
}

/// Opens a run's connections: over QUIC they share one client endpoint (one UDP
/// socket and receive buffer for all, instead of ~2 MB each).
#[derive(Debug, Clone)]
pub struct Connector {
    /// The first server, then the others of a cluster.
    servers: Vec<Endpoint>,
    quic: Option<confab_client::quinn::Endpoint>,
}

impl Connector {
    /// Must be called inside the runtime the run uses (QUIC drives its socket there).
    pub fn new(server: Endpoint) -> anyhow::Result<Self> {
        Self::spread(vec![server])
    }

    /// A connector over several servers (the nodes of a cluster; at least one),
    /// which [`Connector::connect_nth`] takes in turn.
    pub fn spread(servers: Vec<Endpoint>) -> anyhow::Result<Self> {
        let server = *servers.first().context("no server to connect to")?;
        let quic = match server.transport {
            confab_client::Transport::Quic => {
                let local: std::net::SocketAddr = match server.addr {
                    std::net::SocketAddr::V4(_) => ([127, 0, 0, 1], 0).into(),
                    std::net::SocketAddr::V6(_) => (std::net::Ipv6Addr::LOCALHOST, 0).into(),
                };
                Some(confab_client::quic_client_endpoint(local).context("binding the QUIC client socket")?)
            }
            _ => None,
        };
        Ok(Self { servers, quic })
    }

    /// The first server.
    pub fn server(&self) -> Endpoint {
        self.servers[0]
    }

    /// Every server, the first first.
    pub fn servers(&self) -> &[Endpoint] {
        &self.servers
    }

    /// A client connected to the first server that answers after server
    /// `from` (in turn, wrapping around), and that server's index.
    pub async fn connect_after(
        &self,
        from: usize,
        failover: &Failover,
    ) -> Result<(Client, usize), confab_client::ClientError> {
        Client::connect_any(&self.servers, from + 1, self.options(None), failover).await
    }

    /// A client connected to the first server, from `local_ip` when given
    /// (TCP-based transports).
    pub async fn connect(&self, local_ip: Option<IpAddr>) -> Result<Client, confab_client::ClientError> {
        Client::connect_with(self.server(), self.options(local_ip)).await
    }

    /// A client connected to server `index` (modulo their number).
    pub async fn connect_nth(&self, index: usize) -> Result<Client, confab_client::ClientError> {
        let server = self.servers[index % self.servers.len()];
        Client::connect_with(server, self.options(None)).await
    }

    /// A client connected and authenticated with `access_token` in one round
    /// trip (`Authenticate` pipelined after `Hello`, as an app would reconnect).
    pub async fn connect_authenticated(
        &self,
        local_ip: Option<IpAddr>,
        access_token: &str,
    ) -> Result<Client, confab_client::ClientError> {
        let (client, _) = Client::connect_authenticated(self.server(), self.options(local_ip), access_token).await?;
        Ok(client)
    }

    fn options(&self, local_ip: Option<IpAddr>) -> ClientOptions {
        ClientOptions {
            local_ip,
            quic_endpoint: self.quic.clone(),
            ..ClientOptions::default()
        }
    }
}
