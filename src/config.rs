//! Typed configuration, parsed once at startup.
//!
//! Layers, later wins: the built-in `config/default.toml` (embedded in the binary),
//! an optional file, then `CONFAB_<SECTION>__<KEY>` environment variables. Unknown
//! keys in a file and bad values are errors naming the key and where it came
//! from; an environment variable with the prefix that names no key (another
//! tool's, or a typo) is set aside in [`Config::ignored_env`] for a warning.

use confab_protocol::{Rate, SessionLimits};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEFAULTS: &str = include_str!("../config/default.toml");
const ENV_PREFIX: &str = "CONFAB_";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("invalid config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub tls: TlsConfig,
    pub websocket: WebSocketConfig,
    pub quic: QuicConfig,
    pub protocol: ProtocolConfig,
    pub auth: AuthConfig,
    pub chat: ChatConfig,
    pub store: StoreConfig,
    pub cassandra: CassandraConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    /// `CONFAB_*` environment variables that name no config key: not applied,
    /// to be warned about once logging is up.
    #[serde(skip)]
    pub ignored_env: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub shards: usize,
    pub pin_threads: bool,
    pub max_connections: usize,
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub mesh_channel_capacity: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub reserved_file_descriptors: usize,
    pub max_connections_per_ip: usize,
    pub connect_rate_per_ip: f64,
    pub max_connections_per_user: usize,
    pub reply_bytes_per_ip: usize,
    pub connect_burst_per_ip: f64,
    pub exempt_loopback: bool,
    pub send_rate_per_device: f64,
    pub send_burst_per_device: f64,
    pub send_rate_per_user: f64,
    pub send_burst_per_user: f64,
    pub send_mib_per_user_per_day: f64,
    pub read_rate_per_device: f64,
    pub read_burst_per_device: f64,
    pub read_rate_per_user: f64,
    pub read_burst_per_user: f64,
    pub login_failures_per_account: u32,
    pub login_failures_per_ip: u32,
    pub login_failures_before_lockout: u32,
    #[serde(with = "humantime_serde")]
    pub login_lockout: Duration,
    pub signups_per_ip_per_hour: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub mode: TlsMode,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Where the TCP and WebSocket listeners get their certificate, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    Off,
    SelfSigned,
    Files,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub path: String,
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolConfig {
    pub max_frame_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    pub outbound_queue_frames: usize,
    pub outbound_queue_bytes: usize,
    pub outbound_reply_bytes: usize,
    pub max_in_flight_requests: usize,
    pub max_auth_failures: u32,
    pub max_replay_messages: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub token_key: String,
    #[serde(with = "humantime_serde")]
    pub access_token_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub refresh_token_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub session_lifetime: Duration,
    pub max_devices_per_user: usize,
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub max_concurrent_hashes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatConfig {
    pub max_body_chars: usize,
    pub max_client_msg_id_bytes: usize,
    pub max_history_limit: u32,
    pub max_cached_conversations: usize,
    pub max_pending_appends: usize,
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    pub max_group_members: usize,
    pub max_group_title_chars: usize,
    #[serde(with = "humantime_serde")]
    pub typing_min_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub typing_expiry: Duration,
    #[serde(with = "humantime_serde")]
    pub receipt_flush_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub presence_grace: Duration,
    #[serde(with = "humantime_serde")]
    pub presence_min_interval: Duration,
    pub max_presence_subscriptions: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    pub data_dir: PathBuf,
    pub durability: Durability,
    pub max_batch: usize,
    pub min_free_mib: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    Embedded,
    Cassandra,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CassandraConfig {
    pub contact_points: Vec<String>,
    pub keyspace: String,
    pub create_schema: bool,
    pub replication: String,
    pub consistency: Consistency,
    #[serde(with = "humantime_serde")]
    pub batch_window: Duration,
    pub max_batch_rows: usize,
    pub batch_writes: bool,
    pub max_in_flight: usize,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

/// CQL consistency levels confab accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    One,
    Quorum,
    LocalQuorum,
    All,
}

/// When an acknowledged write is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync'd before the acknowledgement: survives power loss.
    Sync,
    /// Written to the OS before the acknowledgement: survives a process crash.
    Buffered,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `None` when empty: off.
    #[serde(deserialize_with = "optional_addr")]
    pub listen: Option<SocketAddr>,
}

/// An address, or nothing for "".
fn optional_addr<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    match text.trim() {
        "" => Ok(None),
        addr => addr.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
}

impl Config {
    /// The limits each connection's protocol session enforces.
    pub fn session_limits(&self) -> SessionLimits {
        SessionLimits {
            max_frame_bytes: self.protocol.max_frame_bytes,
            heartbeat_interval: self.protocol.heartbeat_interval,
            handshake_timeout: self.server.handshake_timeout,
            auth_timeout: self.server.auth_timeout,
            max_body_chars: self.chat.max_body_chars,
            max_client_msg_id_bytes: self.chat.max_client_msg_id_bytes,
            max_history_limit: self.chat.max_history_limit,
            max_auth_failures: self.protocol.max_auth_failures,
            max_group_members: self.chat.max_group_members,
            max_group_title_chars: self.chat.max_group_title_chars,
            typing_min_interval: self.chat.typing_min_interval,
            max_presence_subscriptions: self.chat.max_presence_subscriptions,
            send_rate: Rate {
                per_second: self.limits.send_rate_per_device,
                burst: self.limits.send_burst_per_device,
            },
            read_rate: Rate {
                per_second: self.limits.read_rate_per_device,
                burst: self.limits.read_burst_per_device,
            },
        }
    }

    /// Built-in defaults < `file` < `CONFAB_*` variables of the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Config::load`] with an explicit environment, for tests.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = match file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?),
            None => None,
        };
        Self::build(text.as_deref().zip(file), env)
    }

    /// The defaults < `file` (its text and where it came from) < `env`.
    fn build(
        file: Option<(&str, &Path)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = parse_toml(DEFAULTS, Path::new("<built-in defaults>"))?;
        if let Some((text, path)) = file {
            merge(&mut table, parse_toml(text, path)?);
        }
        let mut ignored_env = Vec::new();
        for (name, value) in env {
            if let Some(key) = name.strip_prefix(ENV_PREFIX)
                && !apply_env(&mut table, key, &value)
            {
                ignored_env.push(name);
            }
        }
        let mut config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|err| ConfigError::Invalid {
                key: err.path().to_string(),
                message: err.inner().message().to_owned(),
            })?;
        config.validate()?;
        config.ignored_env = ignored_env;
        Ok(config)
    }

    /// The defaults with `text` (a config file's contents) over them.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::build(Some((text, Path::new("<text>"))), std::iter::empty())
    }

    /// The defaults alone, with no file and no environment.
    pub fn defaults() -> Result<Self, ConfigError> {
        Self::load_from(None, std::iter::empty())
    }

    /// Number of shards after resolving 0 to the available cores.
    pub fn shard_count(&self) -> usize {
        match self.server.shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                key: key.to_owned(),
                message: message.to_owned(),
            })
        };
        // Counts and durations that must not be zero.
        let at_least_one = [
            ("server.max_connections", self.server.max_connections as u128),
            (
                "limits.max_connections_per_ip",
                self.limits.max_connections_per_ip as u128,
            ),
            (
                "limits.max_connections_per_user",
                self.limits.max_connections_per_user as u128,
            ),
            (
                "server.mesh_channel_capacity",
                self.server.mesh_channel_capacity as u128,
            ),
            (
                "protocol.max_in_flight_requests",
                self.protocol.max_in_flight_requests as u128,
            ),
            (
                "protocol.max_replay_messages",
                self.protocol.max_replay_messages as u128,
            ),
            ("auth.argon2_iterations", u128::from(self.auth.argon2_iterations)),
            (
                "limits.login_failures_before_lockout",
                u128::from(self.limits.login_failures_before_lockout),
            ),
            ("limits.login_lockout", self.limits.login_lockout.as_millis()),
            (
                "limits.signups_per_ip_per_hour",
                u128::from(self.limits.signups_per_ip_per_hour),
            ),
            ("auth.access_token_ttl", self.auth.access_token_ttl.as_millis()),
            ("auth.refresh_token_ttl", self.auth.refresh_token_ttl.as_millis()),
            ("auth.session_lifetime", self.auth.session_lifetime.as_millis()),
            ("auth.max_devices_per_user", self.auth.max_devices_per_user as u128),
            ("chat.max_body_chars", self.chat.max_body_chars as u128),
            ("chat.max_history_limit", u128::from(self.chat.max_history_limit)),
            ("chat.max_group_title_chars", self.chat.max_group_title_chars as u128),
            (
                "chat.max_cached_conversations",
                self.chat.max_cached_conversations as u128,
            ),
            ("chat.max_pending_appends", self.chat.max_pending_appends as u128),
            (
                "chat.max_presence_subscriptions",
                self.chat.max_presence_subscriptions as u128,
            ),
            ("store.max_batch", self.store.max_batch as u128),
            ("cassandra.max_batch_rows", self.cassandra.max_batch_rows as u128),
            ("cassandra.max_in_flight", self.cassandra.max_in_flight as u128),
            ("cassandra.request_timeout", self.cassandra.request_timeout.as_millis()),
        ];
        if let Some((key, _)) = at_least_one.iter().find(|(_, value)| *value == 0) {
            return invalid(key, "must be at least 1");
        }
        // Rates and bursts: positive numbers, bursts of at least one.
        let rates = [
            ("limits.send_rate_per_device", self.limits.send_rate_per_device, 0.0),
            ("limits.send_burst_per_device", self.limits.send_burst_per_device, 1.0),
            ("limits.send_rate_per_user", self.limits.send_rate_per_user, 0.0),
            ("limits.send_burst_per_user", self.limits.send_burst_per_user, 1.0),
            ("limits.connect_rate_per_ip", self.limits.connect_rate_per_ip, 0.0),
            ("limits.connect_burst_per_ip", self.limits.connect_burst_per_ip, 1.0),
            ("limits.read_rate_per_device", self.limits.read_rate_per_device, 0.0),
            ("limits.read_burst_per_device", self.limits.read_burst_per_device, 1.0),
            ("limits.read_rate_per_user", self.limits.read_rate_per_user, 0.0),
            ("limits.read_burst_per_user", self.limits.read_burst_per_user, 1.0),
            (
                "limits.send_mib_per_user_per_day",
                self.limits.send_mib_per_user_per_day,
                0.0,
            ),
        ];
        if let Some((key, _, least)) = rates
            .iter()
            .find(|(_, value, least)| !(value.is_finite() && *value > 0.0 && value >= least))
        {
            return invalid(
                key,
                if *least > 0.0 {
                    "must be at least 1"
                } else {
                    "must be a positive number"
                },
            );
        }
        if self.server.shards > crate::shard::MAX_SHARDS {
            return invalid("server.shards", "at most 64 shards are supported");
        }
        // A frame keeps 16 KiB for everything but a message body.
        if !(32 * 1024..=64 * 1024 * 1024).contains(&self.protocol.max_frame_bytes) {
            return invalid("protocol.max_frame_bytes", "must be between 32768 and 67108864");
        }
        if self.protocol.heartbeat_interval < Duration::from_millis(100) {
            return invalid("protocol.heartbeat_interval", "must be at least 100ms");
        }
        if self.protocol.outbound_queue_frames <= self.protocol.max_in_flight_requests {
            return invalid(
                "protocol.outbound_queue_frames",
                "must be larger than protocol.max_in_flight_requests, so replies cannot crowd out pushes",
            );
        }
        if self.protocol.outbound_reply_bytes < self.protocol.max_frame_bytes {
            return invalid(
                "protocol.outbound_reply_bytes",
                "must be at least protocol.max_frame_bytes, so a reply of a full frame fits",
            );
        }
        if self.limits.reply_bytes_per_ip < self.protocol.outbound_reply_bytes {
            return invalid(
                "limits.reply_bytes_per_ip",
                "must be at least protocol.outbound_reply_bytes, so one connection can use its own budget",
            );
        }
        if self.protocol.outbound_queue_bytes < 2 * self.protocol.outbound_reply_bytes {
            return invalid(
                "protocol.outbound_queue_bytes",
                "must be at least twice protocol.outbound_reply_bytes, so replies cannot crowd out pushes",
            );
        }
        if self.tls.mode == TlsMode::Files
            && (self.tls.cert_file.as_os_str().is_empty() || self.tls.key_file.as_os_str().is_empty())
        {
            return invalid(
                "tls.cert_file",
                "tls.mode = \"files\" needs tls.cert_file and tls.key_file",
            );
        }
        if self.cassandra.contact_points.is_empty() {
            return invalid("cassandra.contact_points", "needs at least one host:port");
        }
        let keyspace = &self.cassandra.keyspace;
        if keyspace.is_empty()
            || keyspace.len() > 48
            || !keyspace.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return invalid("cassandra.keyspace", "must be 1-48 letters, digits or underscores");
        }
        if !self.websocket.path.starts_with('/') {
            return invalid("websocket.path", "must start with /");
        }
        if self.auth.argon2_memory_kib < 8 {
            return invalid("auth.argon2_memory_kib", "must be at least 8");
        }
        if self.chat.max_group_members < 2 {
            return invalid("chat.max_group_members", "must be at least 2");
        }
        if self.chat.dedup_window < Duration::from_secs(1) {
            return invalid("chat.dedup_window", "must be at least 1s");
        }
        Ok(())
    }
}

fn parse_toml(text: &str, path: &Path) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|err| ConfigError::Syntax {
        path: path.to_owned(),
        message: err.message().to_owned(),
    })
}

/// Deep-merges `overlay` into `base`: tables merge key by key, other values replace.
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base_table)), toml::Value::Table(overlay_table)) => {
                merge(base_table, overlay_table);
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Applies `CONFAB_SECTION__KEY=value` if it names a key of the defaults (every
/// key has a default); returns whether it did. The value is read as a TOML value
/// when it parses as one (numbers, booleans, lists), otherwise as a string.
fn apply_env(table: &mut toml::Table, key: &str, value: &str) -> bool {
    let Some((section, field)) = key.split_once("__") else {
        return false;
    };
    let (section, field) = (section.to_ascii_lowercase(), field.to_ascii_lowercase());
    let Some(toml::Value::Table(section_table)) = table.get_mut(&section) else {
        return false;
    };
    if !section_table.contains_key(&field) {
        return false;
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    section_table.insert(field, parsed);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn defaults_load() {
        let config = Config::defaults().unwrap();
        assert_eq!(config.protocol.max_frame_bytes, 256 * 1024);
        assert_eq!(config.server.handshake_timeout, Duration::from_secs(10));
        assert_eq!(config.store.durability, Durability::Sync);
        assert_eq!(config.chat.max_body_chars, 100_000);
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("confab.toml");
        std::fs::write(&path, "[server]\nshards = 3\n[store]\ndurability = \"buffered\"\n").unwrap();
        let config = Config::load_from(
            Some(&path),
            env(&[
                ("CONFAB_SERVER__SHARDS", "2"),
                ("CONFAB_LOG__LEVEL", "debug"),
                ("HOME", "/x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server.shards, 2);
        assert_eq!(config.store.durability, Durability::Buffered);
        assert_eq!(config.log.level, "debug");
        assert_eq!(config.server.listen.port(), 7300, "untouched keys keep defaults");
    }

    #[test]
    fn another_tools_confab_variables_are_set_aside_not_fatal() {
        let config = Config::load_from(
            None,
            env(&[
                ("CONFAB_HOME", "/opt/other"),
                ("CONFAB_NOSECTION__KEY", "1"),
                ("CONFAB_SERVER__SHARDZ", "3"),
                ("CONFAB_SERVER__SHARDS", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server.shards, 3);
        assert_eq!(
            config.ignored_env,
            ["CONFAB_HOME", "CONFAB_NOSECTION__KEY", "CONFAB_SERVER__SHARDZ"]
        );
    }

    #[test]
    fn bad_value_names_the_key() {
        let err = Config::load_from(None, env(&[("CONFAB_STORE__DURABILITY", "sometimes")])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("store.durability"), "{text}");
    }

    #[test]
    fn every_zero_limit_names_its_own_key() {
        for key in [
            "AUTH__REFRESH_TOKEN_TTL",
            "CHAT__MAX_CACHED_CONVERSATIONS",
            "CHAT__MAX_PRESENCE_SUBSCRIPTIONS",
        ] {
            let value = if key.ends_with("TTL") { "0s" } else { "0" };
            let text = Config::load_from(None, env(&[(&format!("CONFAB_{key}"), value)]))
                .unwrap_err()
                .to_string();
            assert!(
                text.contains(&key.to_ascii_lowercase().replace("__", ".")),
                "{key}: {text}"
            );
        }
    }

    #[test]
    fn the_shipped_config_files_load() {
        for file in ["config/cluster.toml", "config/bench.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            Config::load_from(Some(&path), env(&[])).unwrap_or_else(|err| panic!("{file}: {err}"));
        }
    }

    #[test]
    fn unknown_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("confab.toml");
        std::fs::write(&path, "[server]\nshardz = 3\n").unwrap();
        let text = Config::load_from(Some(&path), env(&[])).unwrap_err().to_string();
        assert!(text.contains("shardz"), "{text}");
    }

    #[test]
    fn out_of_range_value_names_the_key() {
        let text = Config::load_from(None, env(&[("CONFAB_PROTOCOL__MAX_FRAME_BYTES", "10")]))
            .unwrap_err()
            .to_string();
        assert!(text.contains("protocol.max_frame_bytes"), "{text}");
    }

    #[test]
    fn syntax_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.toml");
        std::fs::write(&path, "[server\n").unwrap();
        let text = Config::load_from(Some(&path), env(&[])).unwrap_err().to_string();
        assert!(text.contains("broken.toml"), "{text}");
    }
}
