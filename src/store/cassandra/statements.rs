//! The schema ([`schema.cql`](schema.cql)) and the statements prepared from it
//! once at start, each with the configured consistency and timeout.

use super::rows::DEVICE_COLUMNS;
use crate::config::{CassandraConfig, Consistency};
use crate::store::StoreError;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;

const SCHEMA: &str = include_str!("schema.cql");

/// Prepared once at start.
#[derive(Debug)]
pub(super) struct Statements {
    pub(super) insert_user: PreparedStatement,
    pub(super) claim_username: PreparedStatement,
    pub(super) user_by_id: PreparedStatement,
    pub(super) id_by_username: PreparedStatement,
    pub(super) insert_device: PreparedStatement,
    pub(super) device: PreparedStatement,
    pub(super) devices: PreparedStatement,
    pub(super) delete_device: PreparedStatement,
    pub(super) rotate_refresh: PreparedStatement,
    pub(super) set_password: PreparedStatement,
    pub(super) set_display_name: PreparedStatement,
    pub(super) release_username: PreparedStatement,
    pub(super) delete_user: PreparedStatement,
    pub(super) insert_message: PreparedStatement,
    pub(super) insert_message_in_epoch: PreparedStatement,
    pub(super) epochs_down_from: PreparedStatement,
    pub(super) register_node: PreparedStatement,
    pub(super) fence_node: PreparedStatement,
    pub(super) node_fenced: PreparedStatement,
    pub(super) owner: PreparedStatement,
    pub(super) first_owner: PreparedStatement,
    pub(super) next_owner: PreparedStatement,
    pub(super) release_owner: PreparedStatement,
    pub(super) insert_epoch: PreparedStatement,
    pub(super) epochs: PreparedStatement,
    pub(super) message_at: PreparedStatement,
    pub(super) latest_in_bucket: PreparedStatement,
    pub(super) before_in_bucket: PreparedStatement,
    pub(super) after_in_bucket: PreparedStatement,
    pub(super) insert_send: PreparedStatement,
    pub(super) sends: PreparedStatement,
    pub(super) device_sends: PreparedStatement,
    pub(super) upsert_head: PreparedStatement,
    pub(super) head: PreparedStatement,
    pub(super) upsert_user_conversation: PreparedStatement,
    pub(super) user_conversations: PreparedStatement,
    pub(super) user_conversations_in: PreparedStatement,
    pub(super) upsert_activity: PreparedStatement,
    pub(super) delete_activity: PreparedStatement,
    pub(super) activity: PreparedStatement,
    pub(super) upsert_title: PreparedStatement,
    pub(super) title: PreparedStatement,
    pub(super) upsert_member: PreparedStatement,
    pub(super) member: PreparedStatement,
    pub(super) members: PreparedStatement,
    pub(super) upsert_mark: PreparedStatement,
    pub(super) marks: PreparedStatement,
    pub(super) upsert_push_token: PreparedStatement,
    pub(super) delete_push_token: PreparedStatement,
    pub(super) push_tokens: PreparedStatement,
    pub(super) put_pending_push: PreparedStatement,
    pub(super) mute: PreparedStatement,
    pub(super) unmute: PreparedStatement,
    pub(super) mutes: PreparedStatement,
    pub(super) delete_pending_push: PreparedStatement,
    pub(super) pending_pushes: PreparedStatement,
}

/// Columns added to tables after the first release, as (table, column, type):
/// schema.cql has them, and a keyspace made before gets them at start. Checked
/// in `system_schema` (not `ADD IF NOT EXISTS`, which ScyllaDB lacks).
const ADDED_COLUMNS: [(&str, &str, &str); 2] = [("users", "display_name", "text"), ("messages", "epoch", "bigint")];

/// Creates the keyspace and tables (idempotent: `IF NOT EXISTS`), and adds the
/// columns a keyspace made by an earlier release lacks.
pub(super) async fn apply_schema(session: &Session, config: &CassandraConfig) -> Result<(), StoreError> {
    for statement in SCHEMA
        .replace("{keyspace}", &config.keyspace)
        .replace("{replication}", &config.replication)
        .split(";\n")
        .map(strip_comments)
        .filter(|statement| !statement.is_empty())
    {
        session
            .query_unpaged(statement.clone(), ())
            .await
            .map_err(|err| StoreError::io_because(format!("applying the schema ({statement})"), err))?;
    }
    for (table, column, kind) in ADDED_COLUMNS {
        let looking = format!("looking for the column {table}.{column}");
        let found = session
            .query_unpaged(
                "SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ? AND column_name = ?",
                // Unquoted names are kept in lower case.
                (config.keyspace.to_ascii_lowercase(), table, column),
            )
            .await
            .map_err(|err| StoreError::io_because(looking.clone(), err))?
            .into_rows_result()
            .map_err(|err| StoreError::io_because(looking, err))?
            .rows_num()
            > 0;
        if !found {
            let statement = format!("ALTER TABLE {}.{table} ADD {column} {kind}", config.keyspace);
            session
                .query_unpaged(statement.clone(), ())
                .await
                .map_err(|err| StoreError::io_because(format!("applying the schema ({statement})"), err))?;
            tracing::info!(table, column, "column added to a keyspace made by an earlier release");
        }
    }
    Ok(())
}

pub(super) fn consistency(level: Consistency) -> scylla::statement::Consistency {
    match level {
        Consistency::One => scylla::statement::Consistency::One,
        Consistency::Quorum => scylla::statement::Consistency::Quorum,
        Consistency::LocalQuorum => scylla::statement::Consistency::LocalQuorum,
        Consistency::All => scylla::statement::Consistency::All,
    }
}

fn strip_comments(statement: &str) -> String {
    statement
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

impl Statements {
    pub(super) async fn prepare(
        session: &Session,
        keyspace: &str,
        config: &CassandraConfig,
    ) -> Result<Self, StoreError> {
        let consistency = consistency(config.consistency);
        let timeout = config.request_timeout;
        let prepare = |cql: String| async move {
            let mut statement = session
                .prepare(cql.clone())
                .await
                .map_err(|err| StoreError::io_because(format!("preparing {cql}"), err))?;
            statement.set_consistency(consistency);
            statement.set_request_timeout(Some(timeout));
            Ok::<_, StoreError>(statement)
        };
        // A lightweight transaction (a conditional write): Paxos among the replicas.
        let prepare_lwt = |cql: String| async move {
            let mut statement = prepare(cql).await?;
            statement.set_serial_consistency(Some(scylla::statement::SerialConsistency::Serial));
            Ok::<_, StoreError>(statement)
        };
        let prepare_serial_read = |cql: String| async move {
            let mut statement = prepare(cql).await?;
            statement.set_consistency(scylla::statement::Consistency::Serial);
            Ok::<_, StoreError>(statement)
        };
        let k = keyspace;
        Ok(Self {
            insert_user: prepare(format!(
                "INSERT INTO {k}.users (id, username, password_hash, created_at_ms, display_name) VALUES (?, ?, ?, ?, ?)"
            ))
            .await?,
            claim_username: prepare_lwt(format!(
                "INSERT INTO {k}.usernames (username, id) VALUES (?, ?) IF NOT EXISTS"
            ))
            .await?,
            user_by_id: prepare(format!(
                "SELECT username, password_hash, created_at_ms, display_name FROM {k}.users WHERE id = ?"
            ))
            .await?,
            id_by_username: prepare(format!("SELECT id FROM {k}.usernames WHERE username = ?")).await?,
            insert_device: prepare(format!(
                "INSERT INTO {k}.devices (user_id, device_id, name, refresh_hash, previous_refresh_hash, \
                 refresh_expires_at_ms, created_at_ms, refreshed_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            device: prepare(format!(
                "SELECT {DEVICE_COLUMNS} FROM {k}.devices WHERE user_id = ? AND device_id = ?"
            ))
            .await?,
            devices: prepare(format!("SELECT {DEVICE_COLUMNS} FROM {k}.devices WHERE user_id = ?")).await?,
            // Compare-and-set.
            rotate_refresh: prepare_lwt(format!(
                "UPDATE {k}.devices SET refresh_hash = ?, previous_refresh_hash = ?, refresh_expires_at_ms = ?, \
                 refreshed_at_ms = ? WHERE user_id = ? AND device_id = ? IF refresh_hash = ?"
            ))
            .await?,
            set_password: prepare(format!("UPDATE {k}.users SET password_hash = ? WHERE id = ?")).await?,
            set_display_name: prepare(format!("UPDATE {k}.users SET display_name = ? WHERE id = ?")).await?,
            release_username: prepare_lwt(format!("DELETE FROM {k}.usernames WHERE username = ? IF id = ?")).await?,
            delete_user: prepare(format!("DELETE FROM {k}.users WHERE id = ?")).await?,
            // A lightweight transaction like the rotation: a plain DELETE
            // carries the client's timestamp, a rotation its Paxos ballot's, so
            // a rotation racing a log-out could outlive the delete and leave a
            // row of the rotated columns alone (a device with no name, read back
            // as an error). Paxos orders the two instead.
            delete_device: prepare_lwt(format!(
                "DELETE FROM {k}.devices WHERE user_id = ? AND device_id = ? IF EXISTS"
            ))
            .await?,
            insert_message: prepare(format!(
                "INSERT INTO {k}.messages (conversation, bucket, seq, data) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            // Cluster mode (ownership.rs).
            insert_message_in_epoch: prepare(format!(
                "INSERT INTO {k}.messages (conversation, bucket, seq, data, epoch) VALUES (?, ?, ?, ?, ?) \
                 USING TIMESTAMP ?"
            ))
            .await?,
            epochs_down_from: prepare(format!(
                "SELECT seq, epoch FROM {k}.messages WHERE conversation = ? AND bucket = ? AND seq <= ? LIMIT ?"
            ))
            .await?,
            register_node: prepare_lwt(format!(
                "INSERT INTO {k}.node_fences (incarnation, fenced) VALUES (?, false) IF NOT EXISTS"
            ))
            .await?,
            fence_node: prepare_lwt(format!(
                "UPDATE {k}.node_fences SET fenced = true WHERE incarnation = ? IF EXISTS"
            ))
            .await?,
            node_fenced: prepare(format!("SELECT fenced FROM {k}.node_fences WHERE incarnation = ?")).await?,
            // Read through Paxos, so a claim sees any transaction under way.
            owner: prepare_serial_read(format!(
                "SELECT epoch, owner, released FROM {k}.conversation_owners WHERE conversation = ?"
            ))
            .await?,
            first_owner: prepare_lwt(format!(
                "INSERT INTO {k}.conversation_owners (conversation, epoch, owner, released) \
                 VALUES (?, 1, ?, false) IF NOT EXISTS"
            ))
            .await?,
            next_owner: prepare_lwt(format!(
                "UPDATE {k}.conversation_owners SET epoch = ?, owner = ?, released = false \
                 WHERE conversation = ? IF epoch = ?"
            ))
            .await?,
            release_owner: prepare_lwt(format!(
                "UPDATE {k}.conversation_owners SET released = true WHERE conversation = ? IF epoch = ? AND owner = ?"
            ))
            .await?,
            insert_epoch: prepare(format!(
                "INSERT INTO {k}.conversation_epochs (conversation, epoch, start_seq) VALUES (?, ?, ?)"
            ))
            .await?,
            epochs: prepare(format!(
                "SELECT epoch, start_seq FROM {k}.conversation_epochs WHERE conversation = ?"
            ))
            .await?,
            message_at: prepare(format!(
                "SELECT data FROM {k}.messages WHERE conversation = ? AND bucket = ? AND seq = ?"
            ))
            .await?,
            latest_in_bucket: prepare(format!(
                "SELECT seq, data FROM {k}.messages WHERE conversation = ? AND bucket = ? LIMIT ?"
            ))
            .await?,
            before_in_bucket: prepare(format!(
                "SELECT seq, data FROM {k}.messages WHERE conversation = ? AND bucket = ? AND seq < ? LIMIT ?"
            ))
            .await?,
            after_in_bucket: prepare(format!(
                "SELECT seq, data FROM {k}.messages WHERE conversation = ? AND bucket = ? AND seq > ? \
                 ORDER BY seq ASC LIMIT ?"
            ))
            .await?,
            insert_send: prepare(format!(
                "INSERT INTO {k}.sends (conversation, device_id, client_msg_id, seq, server_time_ms) \
                 VALUES (?, ?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            sends: prepare(format!(
                "SELECT device_id, client_msg_id, seq, server_time_ms FROM {k}.sends \
                 WHERE conversation = ? AND (device_id, client_msg_id) IN ?"
            ))
            .await?,
            device_sends: prepare(format!(
                "SELECT client_msg_id FROM {k}.sends \
                 WHERE conversation = ? AND device_id = ? LIMIT ?"
            ))
            .await?,
            upsert_head: prepare(format!(
                "INSERT INTO {k}.heads (conversation, last_seq, last_time_ms) VALUES (?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            head: prepare(format!(
                "SELECT last_seq, last_time_ms FROM {k}.heads WHERE conversation = ?"
            ))
            .await?,
            upsert_user_conversation: prepare(format!(
                "INSERT INTO {k}.user_conversations (user_id, conversation, left_seq, left_time_ms) \
                 VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            user_conversations: prepare(format!(
                "SELECT conversation, left_seq, left_time_ms FROM {k}.user_conversations WHERE user_id = ?"
            ))
            .await?,
            user_conversations_in: prepare(format!(
                "SELECT conversation, left_seq, left_time_ms FROM {k}.user_conversations \
                 WHERE user_id = ? AND conversation IN ?"
            ))
            .await?,
            upsert_activity: prepare(format!(
                "INSERT INTO {k}.user_activity (user_id, day, conversation) VALUES (?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            delete_activity: prepare(format!(
                "DELETE FROM {k}.user_activity USING TIMESTAMP ? WHERE user_id = ? AND day = ? AND conversation = ?"
            ))
            .await?,
            activity: prepare(format!(
                "SELECT day, conversation FROM {k}.user_activity WHERE user_id = ? AND (day, conversation) < (?, ?) \
                 LIMIT ?"
            ))
            .await?,
            upsert_title: prepare(format!(
                "INSERT INTO {k}.groups (group_id, title) VALUES (?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            title: prepare(format!("SELECT title FROM {k}.groups WHERE group_id = ?")).await?,
            upsert_member: prepare(format!(
                "INSERT INTO {k}.members (group_id, user_id, role, left_seq) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            member: prepare(format!(
                "SELECT role, left_seq FROM {k}.members WHERE group_id = ? AND user_id = ?"
            ))
            .await?,
            members: prepare(format!(
                "SELECT user_id, role, left_seq FROM {k}.members WHERE group_id = ?"
            ))
            .await?,
            upsert_mark: prepare(format!(
                "INSERT INTO {k}.marks (conversation, user_id, device_id, delivered_seq, read_seq) \
                 VALUES (?, ?, ?, ?, ?)"
            ))
            .await?,
            marks: prepare(format!(
                "SELECT device_id, delivered_seq, read_seq FROM {k}.marks WHERE conversation = ? AND user_id = ?"
            ))
            .await?,
            upsert_push_token: prepare(format!(
                "INSERT INTO {k}.push_tokens (user_id, device_id, platform, push_token) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            delete_push_token: prepare(format!(
                "DELETE FROM {k}.push_tokens WHERE user_id = ? AND device_id = ?"
            ))
            .await?,
            push_tokens: prepare(format!(
                "SELECT device_id, platform, push_token FROM {k}.push_tokens WHERE user_id = ?"
            ))
            .await?,
            mute: prepare(format!("INSERT INTO {k}.mutes (user_id, conversation) VALUES (?, ?)")).await?,
            unmute: prepare(format!("DELETE FROM {k}.mutes WHERE user_id = ? AND conversation = ?")).await?,
            mutes: prepare(format!("SELECT conversation FROM {k}.mutes WHERE user_id = ?")).await?,
            put_pending_push: prepare(format!("INSERT INTO {k}.push_pending (user_id, pending) VALUES (?, ?)")).await?,
            delete_pending_push: prepare(format!("DELETE FROM {k}.push_pending WHERE user_id = ?")).await?,
            // A scan, once at start: the table holds only users with an open window.
            pending_pushes: prepare(format!("SELECT user_id, pending FROM {k}.push_pending")).await?,
        })
    }
}
