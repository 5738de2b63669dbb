//! Groups end to end: fan-out across shards and devices, membership changes as
//! sequenced system messages, permissions, and what removed members can see.

use crate::common;
use crate::common::{TestServer, code, new_user, second_device, within};
use confab_client::proto::{ErrorCode, Message, RemoveMember, Role, client_frame, group_event::Kind as Event};
use confab_client::{Client, ClientError, UserId};
use futures::StreamExt as _;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// Reads messages until one with `seq` arrives; returns everything read.
async fn read_until(client: &Client, seq: u64) -> Vec<Message> {
    let mut read = Vec::new();
    loop {
        let message = within(WAIT, client.next_message()).await.unwrap();
        let done = message.seq >= seq;
        read.push(message);
        if done {
            return read;
        }
    }
}

fn event(message: &Message) -> Option<Event> {
    message.event.clone().and_then(|event| event.kind)
}

/// 50 members on two shards with two devices each: every device receives every
/// message it did not send, exactly once, in seq order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_members_on_two_devices_receive_everything_once_in_order() {
    const MEMBERS: usize = 50;
    const SENDERS: usize = 10;
    const PER_SENDER: u64 = 20;
    let mut node = TestServer::start(2).await;
    let addr = node.addr;
    let setups = (0..MEMBERS).map(|_| async move {
        let (laptop, login, name) = new_user(addr, "member").await;
        let (phone, _) = second_device(addr, &name).await;
        (login.user_id, Arc::new(laptop), Arc::new(phone))
    });
    let members = futures::future::join_all(setups).await;
    let ids: Vec<UserId> = members.iter().map(|(id, _, _)| *id).collect();

    let owner = &members[0].1;
    let created = owner.create_group("create-1", "fifty", &ids[1..]).await.unwrap();
    assert_eq!(created.seq, 1);
    let group = created.conversation_id.clone();

    // Ten members send concurrently from their laptops.
    let sends = members[..SENDERS].iter().map(|(id, laptop, _)| {
        let laptop = laptop.clone();
        let group = group.clone();
        let id = *id;
        async move {
            let mut seqs = Vec::new();
            for i in 0..PER_SENDER {
                seqs.push(
                    laptop
                        .send(group_target(&group), &format!("{id}-{i}"), &format!("hi {i}"))
                        .await
                        .unwrap()
                        .seq,
                );
            }
            seqs
        }
    });
    let sent: Vec<Vec<u64>> = futures::future::join_all(sends).await;
    let last = 1 + SENDERS as u64 * PER_SENDER;
    let mut all: Vec<u64> = sent.iter().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(all, (2..=last).collect::<Vec<_>>(), "gap-free group seqs");

    let checks = members.iter().enumerate().flat_map(|(index, (_, laptop, phone))| {
        let own: HashSet<u64> = match index {
            0 => std::iter::once(1).chain(sent[0].iter().copied()).collect(),
            i if i < SENDERS => sent[i].iter().copied().collect(),
            _ => HashSet::new(),
        };
        [(laptop.clone(), own), (phone.clone(), HashSet::new())]
    });
    let checks = checks.map(|(device, own)| async move {
        let expected: Vec<u64> = (1..=last).filter(|seq| !own.contains(seq)).collect();
        let mut received = Vec::new();
        while received.len() < expected.len() {
            received.push(within(WAIT, device.next_message()).await.unwrap().seq);
        }
        assert_eq!(received, expected, "exactly once, in order");
    });
    futures::future::join_all(checks).await;
    node.shutdown().await;
}

fn group_target(id: &str) -> confab_client::proto::conversation_ref::Target {
    confab_client::proto::conversation_ref::Target::ConversationId(id.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_are_sequenced_and_removed_members_see_nothing_after() {
    let mut node = TestServer::start(2).await;
    let (owner, owner_login, _) = new_user(node.addr, "owner").await;
    let (admin, admin_login, _) = new_user(node.addr, "admin").await;
    let (member, member_login, _) = new_user(node.addr, "member").await;
    let (late, late_login, _) = new_user(node.addr, "late").await;
    let (outsider, _, _) = new_user(node.addr, "outsider").await;

    let created = owner
        .create_group("g1", "  Team  ", &[admin_login.user_id, member_login.user_id])
        .await
        .unwrap();
    let group = created.conversation_id.clone();
    assert!(group.starts_with("g:"));
    // A retried create names the same group and returns the same ack.
    assert_eq!(owner.create_group("g1", "Team", &[]).await.unwrap(), created);

    let first = within(WAIT, member.next_message()).await.unwrap();
    let Some(Event::Created(created_event)) = event(&first) else {
        panic!("expected Created, got {first:?}");
    };
    assert_eq!(
        (created_event.title.as_str(), first.sender_user_id, first.seq),
        ("Team", owner_login.user_id.get(), 1)
    );

    owner
        .set_role(&group, "r1", admin_login.user_id, Role::Admin)
        .await
        .unwrap();
    // Permissions: plain members do not add; admins do; nobody adds a stranger id.
    assert_eq!(
        code(member.add_members(&group, "a0", &[late_login.user_id]).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(admin.add_members(&group, "a1", &[UserId::new(424_242).unwrap()]).await),
        ErrorCode::NotFound
    );
    let added = admin.add_members(&group, "a2", &[late_login.user_id]).await.unwrap();
    assert_eq!(added.seq, 3);
    admin.rename_group(&group, "n1", "Renamed").await.unwrap();

    // The new member receives from its joining on, and can read the history.
    let joined = within(WAIT, late.next_message()).await.unwrap();
    assert!(matches!(event(&joined), Some(Event::MembersAdded(_))));
    assert_eq!(late.full_history(&group).await.unwrap().len(), 4);

    // Outsiders and forged ids get nothing.
    assert_eq!(
        code(outsider.send(group_target(&group), "x", "let me in").await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(outsider.history(&group, None, None, 10).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(outsider.list_members(&group, None, 10).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(outsider.send(group_target("g:12345"), "x", "hello?").await),
        ErrorCode::Forbidden
    );
    assert_eq!(code(outsider.leave_group(&group, "l").await), ErrorCode::Forbidden);

    // Remove the member: it gets its own removal, then nothing.
    let removed = admin.remove_member(&group, "rm1", member_login.user_id).await.unwrap();
    let after_removal = owner.send(group_target(&group), "m1", "after removal").await.unwrap();
    let seen = read_until(&member, removed.seq).await;
    assert!(matches!(event(seen.last().unwrap()), Some(Event::MemberRemoved(_))));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), member.next_message())
            .await
            .is_err()
    );
    assert_eq!(
        code(member.send(group_target(&group), "m2", "still here?").await),
        ErrorCode::Forbidden
    );
    // It reads history up to its removal, never past it.
    let history = member.full_history(&group).await.unwrap();
    assert_eq!(history.last().unwrap().seq, removed.seq);
    let latest = member.history(&group, None, None, 50).await.unwrap();
    assert_eq!(latest.messages.last().unwrap().seq, removed.seq);
    assert!(latest.messages.iter().all(|m| m.seq < after_removal.seq));
    assert_eq!(code(member.list_members(&group, None, 10).await), ErrorCode::Forbidden);

    // Members listing reflects roles and the removal.
    let list = late.list_members(&group, None, 100).await.unwrap();
    assert_eq!(list.title, "Renamed");
    let roles: Vec<(u64, i32)> = list.members.iter().map(|m| (m.user_id, m.role)).collect();
    let mut expected = vec![
        (owner_login.user_id.get(), Role::Owner as i32),
        (admin_login.user_id.get(), Role::Admin as i32),
        (late_login.user_id.get(), Role::Member as i32),
    ];
    expected.sort_unstable();
    assert_eq!(roles, expected);

    // The owner leaves: the admin owns the group now and may set roles.
    let left = owner.leave_group(&group, "bye").await.unwrap();
    let seen = read_until(&admin, left.seq).await;
    let Some(Event::MemberLeft(left_event)) = event(seen.last().unwrap()) else {
        panic!("expected MemberLeft");
    };
    assert_eq!(left_event.new_owner_user_id, admin_login.user_id.get());
    admin
        .set_role(&group, "r2", late_login.user_id, Role::Admin)
        .await
        .unwrap();
    assert_eq!(
        code(owner.rename_group(&group, "n2", "mine again").await),
        ErrorCode::Forbidden
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_limits_and_bad_requests_are_refused() {
    let mut node = TestServer::start_with(1, &[("CONFAB_CHAT__MAX_GROUP_MEMBERS", "3")]).await;
    let (owner, _, _) = new_user(node.addr, "limit").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(new_user(node.addr, "limit").await.1.user_id);
    }
    let too_many: Result<_, ClientError> = owner.create_group("big", "big", &ids).await;
    assert_eq!(code(too_many), ErrorCode::TooLarge);
    let group = owner.create_group("ok", "ok", &ids[..2]).await.unwrap().conversation_id;
    assert_eq!(
        code(owner.add_members(&group, "more", &ids[2..]).await),
        ErrorCode::TooLarge
    );
    assert_eq!(code(owner.create_group("t", "   ", &[]).await), ErrorCode::BadRequest);
    assert_eq!(code(owner.create_group("", "no id", &[]).await), ErrorCode::BadRequest);
    assert_eq!(code(owner.add_members("d:1:2", "x", &ids).await), ErrorCode::BadRequest);
    assert_eq!(
        // User 0, which the typed client cannot name: as a raw frame.
        code(
            owner
                .request(client_frame::Kind::RemoveMember(RemoveMember {
                    conversation_id: group.clone(),
                    client_msg_id: "self".into(),
                    user_id: 0,
                }))
                .await
        ),
        ErrorCode::BadRequest
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_survive_a_restart() {
    let mut node = TestServer::start(2).await;
    let (owner, owner_login, _) = new_user(node.addr, "durable").await;
    let (_, member_login, _) = new_user(node.addr, "durable").await;
    let group = owner
        .create_group("c", "kept", &[member_login.user_id])
        .await
        .unwrap()
        .conversation_id;
    owner.send(group_target(&group), "m", "before restart").await.unwrap();
    node.shutdown().await;

    let server = common::start_server(common::config(node.dir.path(), 2, &[]));
    let owner = Client::connect(common::endpoint(&server, common::transport()))
        .await
        .unwrap();
    owner.authenticate(&owner_login.tokens.access_token).await.unwrap();
    let ack = owner.send(group_target(&group), "m2", "after restart").await.unwrap();
    assert_eq!(ack.seq, 3, "seqs continue after the stored maximum");
    let list = owner.list_members(&group, None, 10).await.unwrap();
    assert_eq!(list.members.len(), 2);
    server.shutdown().await.unwrap();
}

/// A 10 000-member room: created in one request, messages fan out, members page.
/// The members are created through the store directly (signing up 10 000 users
/// over the protocol would only measure password hashing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_thousand_member_room_works() {
    use confab::store::NewUser;
    const MEMBERS: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(
        dir.path(),
        2,
        &[
            ("CONFAB_CHAT__MAX_GROUP_MEMBERS", "10000"),
            ("CONFAB_STORE__DURABILITY", "buffered"),
        ],
    );
    let store = common::open_store(&config);
    let creates = (0..MEMBERS - 1).map(|i| {
        let store = store.clone();
        async move {
            store
                .create_user(NewUser {
                    username: format!("crowd{i}"),
                    password_hash: "unused".into(),
                    created_at_ms: 0,
                    display_name: String::new(),
                })
                .await
                .unwrap()
                .id
        }
    });
    // Bounded: each is a lightweight transaction on Cassandra.
    let members: Vec<UserId> = futures::stream::iter(creates).buffered(64).collect().await;
    store.close().await.unwrap();
    drop(store);

    let server = common::start_server(config);
    let addr = common::endpoint(&server, common::transport());
    let (owner, _, _) = new_user(addr, "host").await;
    let (listener, listener_login, _) = new_user(addr, "listener").await;
    let mut everyone = members.clone();
    everyone.pop();
    everyone.push(listener_login.user_id);
    let created = owner.create_group("big", "town hall", &everyone).await.unwrap();
    let group = created.conversation_id;
    for i in 0..20 {
        owner
            .send(group_target(&group), &format!("m{i}"), "to everyone")
            .await
            .unwrap();
    }
    let seen = read_until(&listener, 21).await;
    assert_eq!(
        seen.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=21).collect::<Vec<_>>()
    );

    let mut listed = 0;
    let mut after = None;
    loop {
        let page = listener.list_members(&group, after, 1000).await.unwrap();
        listed += page.members.len();
        after = page.members.last().and_then(|m| UserId::new(m.user_id)).or(after);
        if !page.has_more {
            break;
        }
    }
    assert_eq!(listed, MEMBERS);
    let outsider = members[MEMBERS - 2];
    let full: Result<_, ClientError> = owner.add_members(&group, "one-more", &[outsider]).await;
    assert_eq!(code(full), ErrorCode::TooLarge, "the room is full");
    let again: Result<_, ClientError> = owner.add_members(&group, "again", &[members[0]]).await;
    assert_eq!(code(again), ErrorCode::BadRequest, "already a member");
    server.shutdown().await.unwrap();
}
