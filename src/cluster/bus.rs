//! Messages between nodes through Redis Streams (docs/CLUSTER.md, "Fan-out and
//! signals"): each node reads its own inbox stream, `{prefix}:inbox:{node}`,
//! with `XREADGROUP` as the one consumer of a group of its own, and `XACK`s
//! what it took, trimming what it acknowledged (`XTRIM MINID ~`); other nodes
//! `XADD` to it, many entries per round trip, capped with `MAXLEN ~` for a
//! node that stops reading.
//!
//! An entry is one opaque payload (field `p`); what it says is the caller's.
//! The inbox is named after the incarnation, so a node that restarts never
//! reads what was meant for its previous run: the store is the source of truth,
//! and entries of a dead node are dropped with its inbox, not claimed. Its
//! owner keeps the inbox alive with an expiry it renews ([`Inbox::keep`]), so
//! a dead node's inbox goes by itself, and no node deletes another's: after a
//! Redis outage every lease looks lapsed, and deleting on that would drop
//! what live nodes are sent.

use super::{ClusterError, Incarnation};
use bytes::Bytes;
use fred::clients::Client;
use fred::interfaces::{KeysInterface as _, StreamsInterface as _};
use std::collections::HashMap;
use std::time::Duration;

/// The consumer group (and consumer) every inbox is read through.
const GROUP: &str = "node";
/// The field an entry's payload is kept in.
const FIELD: &str = "p";

fn inbox_key(prefix: &str, node: Incarnation) -> String {
    format!("{prefix}:inbox:{node}")
}

/// Sends entries to other nodes' inboxes.
#[derive(Debug, Clone)]
pub struct Outbox {
    client: Client,
    prefix: String,
    /// Entries an inbox keeps at most (about: `MAXLEN ~`).
    max_len: u64,
}

impl Outbox {
    /// Sends through `client`, to inboxes of keys under `prefix`.
    pub fn new(client: Client, prefix: &str, max_len: u64) -> Self {
        Self {
            client,
            prefix: prefix.to_owned(),
            max_len,
        }
    }

    /// Appends each payload to its node's inbox, in order per inbox, all in
    /// one pipeline: one round trip for the lot.
    pub async fn send(&self, entries: &[(Incarnation, Bytes)]) -> Result<(), ClusterError> {
        if entries.is_empty() {
            return Ok(());
        }
        let pipeline = self.client.pipeline();
        let cap = ("MAXLEN", "~", i64::try_from(self.max_len).unwrap_or(i64::MAX));
        for (node, payload) in entries {
            // Queued: the reply comes with the pipeline's.
            let () = pipeline
                .xadd(inbox_key(&self.prefix, *node), true, cap, "*", (FIELD, payload.clone()))
                .await
                .map_err(|source| ClusterError::Redis { what: "XADD", source })?;
        }
        let replies = pipeline.try_all::<fred::types::Value>().await;
        for reply in replies {
            // NOMKSTREAM: a node that left (its inbox deleted) gets nothing, and
            // that is not an error: the store is the source of truth.
            reply.map_err(|source| ClusterError::Redis { what: "XADD", source })?;
        }
        Ok(())
    }
}

/// `XREADGROUP`'s reply: per stream, its entries' ids and fields.
type StreamsRead = HashMap<String, Vec<(String, HashMap<String, Bytes>)>>;

/// An entry taken from this node's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its stream id, to acknowledge it by.
    pub id: String,
    /// What the sender sent.
    pub payload: Bytes,
}

/// This node's inbox. Reads block, so they need a connection of their own;
/// acknowledgements go through another, so they never wait behind a read.
#[derive(Debug)]
pub struct Inbox {
    client: Client,
    acks: Client,
    key: String,
    consumer: String,
}

impl Inbox {
    /// Creates `me`'s inbox (empty) and its consumer group; call before the
    /// node announces itself, so nothing sent to it is missed. Reads go
    /// through `client`, acknowledgements through `acks`.
    pub async fn open(client: Client, acks: Client, prefix: &str, me: Incarnation) -> Result<Self, ClusterError> {
        let key = inbox_key(prefix, me);
        let () = client
            .xgroup_create(key.as_str(), GROUP, "0", true)
            .await
            .map_err(|source| ClusterError::Redis {
                what: "XGROUP CREATE",
                source,
            })?;
        Ok(Self {
            client,
            acks,
            key,
            consumer: me.to_string(),
        })
    }

    /// Creates the inbox and its group again if they are gone (Redis restarted
    /// without its data, or other nodes deleted the inbox while this node
    /// was away); nothing if they are there.
    pub async fn recreate(&self) -> Result<(), ClusterError> {
        let created: Result<(), _> = self.acks.xgroup_create(self.key.as_str(), GROUP, "$", true).await;
        match created {
            Err(err) if err.details().starts_with("BUSYGROUP") => Ok(()),
            other => other.map_err(|source| ClusterError::Redis {
                what: "XGROUP CREATE",
                source,
            }),
        }
    }

    /// Renews the inbox's expiry to `ttl` from now, creating it (and its
    /// group) again if it is gone.
    pub async fn keep(&self, ttl: Duration) -> Result<(), ClusterError> {
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let pexpire = |client: &Client| {
            let key = self.key.clone();
            let client = client.clone();
            async move {
                let renewed: i64 =
                    client
                        .pexpire(key.as_str(), ms, None)
                        .await
                        .map_err(|source| ClusterError::Redis {
                            what: "PEXPIRE",
                            source,
                        })?;
                Ok::<_, ClusterError>(renewed == 1)
            }
        };
        if !pexpire(&self.acks).await? {
            tracing::warn!(inbox = %self.key, "this node's inbox was gone (Redis lost it?): created again");
            self.recreate().await?;
            pexpire(&self.acks).await?;
        }
        Ok(())
    }

    /// Up to `count` entries not taken yet, waiting up to `block` for the
    /// first (empty after that). An entry without a payload is logged,
    /// acknowledged and left out.
    pub async fn receive(&self, count: u64, block: Duration) -> Result<Vec<Entry>, ClusterError> {
        let block_ms = u64::try_from(block.as_millis()).unwrap_or(u64::MAX).max(1);
        let reply: fred::types::Value = self
            .client
            .xreadgroup(
                GROUP,
                self.consumer.as_str(),
                Some(count),
                Some(block_ms),
                false,
                self.key.as_str(),
                ">",
            )
            .await
            .map_err(|source| ClusterError::Redis {
                what: "XREADGROUP",
                source,
            })?;
        // Nil: the block ran out with nothing new.
        let reply: Option<StreamsRead> = match reply.is_null() {
            true => None,
            false => Some(reply.into_xread_response().map_err(|source| ClusterError::Redis {
                what: "reading XREADGROUP's reply",
                source,
            })?),
        };
        let mut entries = Vec::new();
        let mut junk = Vec::new();
        for (id, mut fields) in reply.into_iter().flat_map(|streams| streams.into_values().flatten()) {
            match fields.remove(FIELD) {
                Some(payload) => entries.push(Entry { id, payload }),
                None => {
                    tracing::warn!(inbox = %self.key, %id, "an inbox entry without a payload; dropped");
                    junk.push(id);
                }
            }
        }
        self.ack(junk).await?;
        Ok(entries)
    }

    /// Acknowledges entries once they were handed on, and trims the inbox
    /// up to the last of them (one reader takes entries in order, so every
    /// entry before it was handed on too), in one round trip: a node that
    /// keeps up holds next to nothing in Redis.
    pub async fn ack(&self, ids: Vec<String>) -> Result<(), ClusterError> {
        let Some(last) = ids.last().cloned() else {
            return Ok(());
        };
        let pipeline = self.acks.pipeline();
        let () = pipeline
            .xack(self.key.as_str(), GROUP, ids)
            .await
            .map_err(|source| ClusterError::Redis { what: "XACK", source })?;
        let () = pipeline
            .xtrim(self.key.as_str(), ("MINID", "~", last))
            .await
            .map_err(|source| ClusterError::Redis { what: "XTRIM", source })?;
        for reply in pipeline.try_all::<fred::types::Value>().await {
            reply.map_err(|source| ClusterError::Redis {
                what: "XACK and XTRIM",
                source,
            })?;
        }
        Ok(())
    }

    /// Deletes the inbox: the node is leaving.
    pub async fn close(&self) -> Result<(), ClusterError> {
        let _deleted: i64 = self
            .acks
            .del(self.key.as_str())
            .await
            .map_err(|source| ClusterError::Redis { what: "DEL", source })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Against a real Redis: `TEST_REDIS=<host:port> cargo test --lib cluster::
    //! -- --ignored` (scripts/test starts one with scripts/redis).
    use super::*;
    use crate::config::ClusterConfig;

    fn config() -> ClusterConfig {
        let mut config = crate::Config::defaults().unwrap().cluster;
        config.redis = format!(
            "redis://{}",
            std::env::var("TEST_REDIS").expect("TEST_REDIS=<host:port>")
        );
        config.prefix = format!("unit{}_{:x}", std::process::id(), rand::random::<u32>());
        config
    }

    async fn inbox(config: &ClusterConfig, me: Incarnation) -> Inbox {
        let client = super::super::connect(config).await.unwrap();
        let acks = super::super::connect(config).await.unwrap();
        Inbox::open(client, acks, &config.prefix, me).await.unwrap()
    }

    async fn outbox(config: &ClusterConfig, max_len: u64) -> Outbox {
        Outbox::new(super::super::connect(config).await.unwrap(), &config.prefix, max_len)
    }

    const WAIT: Duration = Duration::from_millis(200);

    #[tokio::test]
    #[ignore = "needs a Redis server: TEST_REDIS=<host:port>"]
    async fn entries_arrive_once_in_order_and_an_acknowledged_one_is_not_read_again() {
        let config = config();
        let (a, b) = (Incarnation::random(), Incarnation::random());
        let (inbox_a, inbox_b) = (inbox(&config, a).await, inbox(&config, b).await);
        let outbox = outbox(&config, 10_000).await;
        let batch: Vec<(Incarnation, Bytes)> = (0..300u32)
            .map(|i| (if i % 3 == 0 { a } else { b }, Bytes::from(i.to_be_bytes().to_vec())))
            .collect();
        outbox.send(&batch).await.unwrap();

        for (inbox, node) in [(&inbox_a, a), (&inbox_b, b)] {
            let expected: Vec<Bytes> = batch
                .iter()
                .filter(|(to, _)| *to == node)
                .map(|(_, payload)| payload.clone())
                .collect();
            let mut got = Vec::new();
            while got.len() < expected.len() {
                let entries = inbox.receive(64, WAIT).await.unwrap();
                assert!(!entries.is_empty(), "{} of {} arrived", got.len(), expected.len());
                inbox
                    .ack(entries.iter().map(|entry| entry.id.clone()).collect())
                    .await
                    .unwrap();
                got.extend(entries.into_iter().map(|entry| entry.payload));
            }
            assert_eq!(got, expected);
            assert!(inbox.receive(64, WAIT).await.unwrap().is_empty(), "nothing twice");
            let client = super::super::connect(&config).await.unwrap();
            let left: u64 = client.xlen(inbox_key(&config.prefix, node)).await.unwrap();
            assert!(left < 150, "what was acknowledged is trimmed: {left} entries left");
        }
    }

    #[tokio::test]
    #[ignore = "needs a Redis server: TEST_REDIS=<host:port>"]
    async fn an_inbox_stays_near_its_length_and_a_closed_one_takes_nothing() {
        let config = config();
        let me = Incarnation::random();
        let inbox = inbox(&config, me).await;
        let outbox = outbox(&config, 100).await;
        let batch: Vec<(Incarnation, Bytes)> = (0..2_000u32).map(|i| (me, Bytes::from(i.to_string()))).collect();
        outbox.send(&batch).await.unwrap();
        let client = super::super::connect(&config).await.unwrap();
        let key = inbox_key(&config.prefix, me);
        let len: u64 = client.xlen(key.as_str()).await.unwrap();
        assert!(len < 1_000, "trimmed to about 100, is {len}");

        inbox.close().await.unwrap();
        outbox.send(&[(me, Bytes::from_static(b"late"))]).await.unwrap();
        let exists: u64 = client.exists(key.as_str()).await.unwrap();
        assert_eq!(exists, 0, "no inbox is made for a node that left");
    }

    #[tokio::test]
    #[ignore = "needs a Redis server: TEST_REDIS=<host:port>"]
    async fn a_kept_inbox_expires_unless_renewed_and_comes_back_when_lost() {
        let config = config();
        let me = Incarnation::random();
        let inbox = inbox(&config, me).await;
        let client = super::super::connect(&config).await.unwrap();
        let key = inbox_key(&config.prefix, me);
        inbox.keep(Duration::from_secs(60)).await.unwrap();
        let ttl: i64 = client.pttl(key.as_str()).await.unwrap();
        assert!((1..=60_000).contains(&ttl), "expires in {ttl} ms");

        // Lost (Redis restarted without it): kept again, it takes entries.
        let _: i64 = client.del(key.as_str()).await.unwrap();
        inbox.keep(Duration::from_secs(60)).await.unwrap();
        Outbox::new(client, &config.prefix, 100)
            .send(&[(me, Bytes::from_static(b"after"))])
            .await
            .unwrap();
        let entries = inbox.receive(10, WAIT).await.unwrap();
        assert_eq!(entries.len(), 1);
    }

    #[tokio::test]
    #[ignore = "needs a Redis server: TEST_REDIS=<host:port>"]
    async fn an_entry_without_a_payload_is_dropped_not_fatal() {
        let config = config();
        let me = Incarnation::random();
        let inbox = inbox(&config, me).await;
        let client = super::super::connect(&config).await.unwrap();
        let key = inbox_key(&config.prefix, me);
        let _: String = client.xadd(key.as_str(), true, None, "*", ("junk", "x")).await.unwrap();
        Outbox::new(client, &config.prefix, 100)
            .send(&[(me, Bytes::from_static(b"real"))])
            .await
            .unwrap();
        let entries = inbox.receive(10, WAIT).await.unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].payload, Bytes::from_static(b"real"));
    }
}
