//! Which incarnations are live: a Redis sorted set, `{prefix}:live`, scored by
//! each member's last heartbeat in Redis's own clock.
//!
//! One script per heartbeat scores this node, drops every member whose score
//! is older than the lease and returns the rest, so a beat is one round trip
//! and no node's clock matters. A node whose member was dropped while it was
//! away (a pause, a lost link) learns it from the script: other nodes may have
//! fenced it and taken its conversations.

use super::{ClusterError, Incarnation};
use crate::config::ClusterConfig;
use fred::interfaces::SortedSetsInterface as _;
use fred::types::scripts::Script;
use std::fmt;

/// Scores ARGV[1] with Redis's `TIME` in ms, removes members older than ARGV[2]
/// ms, and returns whether ARGV[1] was added (not already there) followed by
/// the members left.
const BEAT: &str = r"
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local added = redis.call('ZADD', KEYS[1], ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (ms - tonumber(ARGV[2])))
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
table.insert(live, 1, tostring(added))
return live
";

/// The live incarnations, in ascending order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveNodes(Vec<Incarnation>);

impl LiveNodes {
    /// The incarnations, ascending.
    pub fn as_slice(&self) -> &[Incarnation] {
        &self.0
    }

    /// How many are live.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for LiveNodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (index, node) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{node}")?;
        }
        f.write_str("]")
    }
}

/// What one heartbeat learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// The live incarnations, this one included.
    pub live: LiveNodes,
    /// This node's member had been dropped (its lease lapsed) since its last
    /// beat, and this beat added it again.
    pub rejoined: bool,
}

/// This node's membership: its incarnation, announced in Redis.
#[derive(Debug)]
pub struct Membership {
    client: fred::clients::Client,
    beat: Script,
    key: String,
    me: Incarnation,
    lease_ms: u64,
    /// Whether a beat has added this node yet.
    joined: std::sync::atomic::AtomicBool,
}

impl Membership {
    /// This node's membership over `client` (see [`super::connect`]).
    pub fn new(client: fred::clients::Client, config: &ClusterConfig, me: Incarnation) -> Self {
        Self {
            client,
            beat: Script::from_lua(BEAT),
            key: format!("{}:live", config.prefix),
            me,
            lease_ms: u64::try_from(config.lease.as_millis()).unwrap_or(u64::MAX),
            joined: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// This node's incarnation.
    pub fn me(&self) -> Incarnation {
        self.me
    }

    /// Announces this node and reads the live set, in one round trip.
    pub async fn beat(&self) -> Result<Beat, ClusterError> {
        let reply: Vec<String> = self
            .beat
            .evalsha_with_reload(
                &self.client,
                self.key.as_str(),
                vec![self.me.to_string(), self.lease_ms.to_string()],
            )
            .await
            .map_err(|source| ClusterError::Redis {
                what: "heartbeat",
                source,
            })?;
        let mut reply = reply.into_iter();
        let added = reply.next().is_some_and(|added| added == "1");
        let mut live: Vec<Incarnation> = reply
            .filter_map(|member| {
                let node = Incarnation::parse(&member);
                if node.is_none() {
                    tracing::warn!(key = %self.key, %member, "a member of the live set is not an incarnation; ignored");
                }
                node
            })
            .collect();
        live.sort_unstable();
        let joined_before = self.joined.swap(true, std::sync::atomic::Ordering::Relaxed);
        Ok(Beat {
            live: LiveNodes(live),
            rejoined: added && joined_before,
        })
    }

    /// Leaves the live set at once (a drained node), instead of letting its
    /// lease lapse.
    pub async fn leave(&self) -> Result<(), ClusterError> {
        let _removed: i64 = self
            .client
            .zrem(self.key.as_str(), self.me.to_string())
            .await
            .map_err(|source| ClusterError::Redis {
                what: "leaving",
                source,
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Against a real Redis: `TEST_REDIS=<host:port> cargo test --lib cluster::
    //! -- --ignored` (scripts/test starts one with scripts/redis).
    use super::*;
    use std::time::{Duration, Instant};

    fn config(prefix: &str, lease: Duration) -> ClusterConfig {
        let mut config = crate::Config::defaults().unwrap().cluster;
        config.redis = format!(
            "redis://{}",
            std::env::var("TEST_REDIS").expect("TEST_REDIS=<host:port>")
        );
        config.prefix = prefix.to_owned();
        config.lease = lease;
        config
    }

    fn unique_prefix() -> String {
        format!("unit{}_{:x}", std::process::id(), rand::random::<u32>())
    }

    async fn node(config: &ClusterConfig) -> Membership {
        let client = super::super::connect(config).await.unwrap();
        Membership::new(client, config, Incarnation::random())
    }

    #[tokio::test]
    #[ignore = "needs a Redis server: TEST_REDIS=<host:port>"]
    async fn nodes_see_each_other_and_one_that_leaves_is_gone_at_once() {
        let config = config(&unique_prefix(), Duration::from_secs(30));
        let (a, b) = (node(&config).await, node(&config).await);
        let first = a.beat().await.unwrap();
        assert_eq!(first.live.as_slice(), [a.me()]);
        assert!(!first.rejoined);
        let both = b.beat().await.unwrap();
        let mut expected = vec![a.me(), b.me()];
        expected.sort_unstable();
        assert_eq!(both.live.as_slice(), expected);
        assert_eq!(a.beat().await.unwrap().live, both.live);

        b.leave().await.unwrap();
        assert_eq!(a.beat().await.unwrap().live.as_slice(), [a.me()]);
    }

    #[tokio::test]
    #[ignore = "needs a Redis server: TEST_REDIS=<host:port>"]
    async fn a_node_that_stops_beating_lapses_and_learns_it_when_it_beats_again() {
        let config = config(&unique_prefix(), Duration::from_millis(300));
        let (a, b) = (node(&config).await, node(&config).await);
        a.beat().await.unwrap();
        assert_eq!(b.beat().await.unwrap().live.len(), 2);
        // a is silent from here on; b keeps beating until a's lease has lapsed.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let live = b.beat().await.unwrap().live;
            if live.as_slice() == [b.me()] {
                break;
            }
            assert!(Instant::now() < deadline, "a never lapsed: {live}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let back = a.beat().await.unwrap();
        assert!(back.rejoined, "a was dropped while silent");
        assert_eq!(back.live.len(), 2);
        assert!(!a.beat().await.unwrap().rejoined);
    }

    #[tokio::test]
    #[ignore = "needs a Redis server: TEST_REDIS=<host:port>"]
    async fn a_member_that_is_not_an_incarnation_is_ignored() {
        let config = config(&unique_prefix(), Duration::from_secs(30));
        let a = node(&config).await;
        let _: i64 = a
            .client
            .zadd(a.key.as_str(), None, None, false, false, (1e15, "junk"))
            .await
            .unwrap();
        assert_eq!(a.beat().await.unwrap().live.as_slice(), [a.me()]);
    }

    #[tokio::test]
    async fn an_address_that_is_not_a_redis_url_is_a_clear_error() {
        let mut config = crate::Config::defaults().unwrap().cluster;
        config.redis = "127.0.0.1:6379".into();
        let err = super::super::connect(&config).await.unwrap_err();
        assert!(matches!(err, ClusterError::BadUrl(_)), "{err}");
    }
}
