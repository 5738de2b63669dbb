//! Groups: who is in them, who may change what, and how a change is applied.
//!
//! Sans-IO: the owner shard keeps a [`GroupState`] per loaded group, asks it to
//! [`authorize`](GroupState::authorize) each command (which yields the event to
//! sequence), and [`apply`](GroupState::apply)s the event at once, so the next
//! message in the conversation already sees the new membership.
//!
//! Rules: any member may send, leave and list; owners and admins add members and
//! rename; the owner also removes admins and sets roles; admins remove plain
//! members. Nobody removes the owner; when the owner leaves, the lowest-id admin
//! (else the lowest-id member) becomes owner.

use super::ChatError;
use super::access::NOT_A_MEMBER;
use crate::store::{GroupEvent, GroupRecord};
use confab_protocol::ids::UserId;
use confab_protocol::{GroupCommand, Role};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A loaded group: its title and current members.
#[derive(Debug, Clone)]
pub struct GroupState {
    title: String,
    members: BTreeMap<UserId, Role>,
    /// Current members, cached for fan-out; rebuilt on membership changes.
    recipients: Arc<[UserId]>,
}

impl GroupState {
    /// A group as loaded from the store.
    pub fn from_record(record: GroupRecord) -> Self {
        let mut state = Self {
            title: record.title,
            members: record.members.into_iter().collect(),
            recipients: Arc::new([]),
        };
        state.refresh_recipients();
        state
    }

    /// The `Created` event of a new group, if `creator` may create it.
    pub fn create(
        creator: UserId,
        title: String,
        mut members: Vec<UserId>,
        max_members: usize,
    ) -> Result<GroupEvent, ChatError> {
        members.push(creator);
        members.sort_unstable();
        members.dedup();
        if members.len() > max_members {
            return Err(ChatError::TooManyMembers { max: max_members });
        }
        Ok(GroupEvent::Created { title, members })
    }

    /// A new group from its `Created` event.
    pub fn created(creator: UserId, event: &GroupEvent) -> Self {
        let mut state = Self {
            title: String::new(),
            members: BTreeMap::new(),
            recipients: Arc::new([]),
        };
        state.apply(creator, event);
        state
    }

    /// Its title.
    pub fn title(&self) -> &str {
        &self.title
    }

    /// `user`'s role, if a member.
    pub fn role(&self, user: UserId) -> Option<Role> {
        self.members.get(&user).copied()
    }

    /// Current members.
    pub fn recipients(&self) -> Arc<[UserId]> {
        self.recipients.clone()
    }

    /// The event `command` by `actor` amounts to, if allowed.
    pub fn authorize(&self, actor: UserId, command: GroupCommand, max_members: usize) -> Result<GroupEvent, ChatError> {
        let actor_role = self.role(actor).ok_or(NOT_A_MEMBER)?;
        let manages = actor_role >= Role::Admin;
        Ok(match command {
            GroupCommand::Create { .. } => return Err(ChatError::AlreadyExists),
            GroupCommand::Add(mut users) => {
                if !manages {
                    return Err(ChatError::Forbidden("only owners and admins add members"));
                }
                users.sort_unstable();
                users.dedup();
                users.retain(|user| !self.members.contains_key(user));
                if users.is_empty() {
                    return Err(ChatError::BadRequest("everyone named is already a member"));
                }
                if self.members.len() + users.len() > max_members {
                    return Err(ChatError::TooManyMembers { max: max_members });
                }
                GroupEvent::MembersAdded(users)
            }
            GroupCommand::Remove(user) => {
                let target = self.role(user).ok_or(ChatError::BadRequest("not a member"))?;
                if user == actor {
                    return Err(ChatError::BadRequest("to remove yourself, leave the group"));
                }
                let allowed = match actor_role {
                    Role::Owner => true,
                    Role::Admin => target == Role::Member,
                    Role::Member => false,
                };
                if !allowed {
                    return Err(ChatError::Forbidden("not allowed to remove this member"));
                }
                GroupEvent::MemberRemoved(user)
            }
            GroupCommand::Leave => {
                let new_owner = (actor_role == Role::Owner).then(|| self.successor(actor)).flatten();
                GroupEvent::MemberLeft { new_owner }
            }
            GroupCommand::Rename(title) => {
                if !manages {
                    return Err(ChatError::Forbidden("only owners and admins rename the group"));
                }
                GroupEvent::Renamed(title)
            }
            GroupCommand::SetRole(user, role) => {
                if actor_role != Role::Owner {
                    return Err(ChatError::Forbidden("only the owner sets roles"));
                }
                match (self.role(user), role) {
                    (None, _) => return Err(ChatError::BadRequest("not a member")),
                    (Some(Role::Owner), _) | (_, Role::Owner) => {
                        return Err(ChatError::BadRequest("ownership moves only when the owner leaves"));
                    }
                    _ => GroupEvent::RoleChanged(user, role),
                }
            }
        })
    }

    /// Applies an event sent by `actor` (already authorized, or read back from history).
    pub fn apply(&mut self, actor: UserId, event: &GroupEvent) {
        match event {
            GroupEvent::Created { title, members } => {
                self.title.clone_from(title);
                self.members = members.iter().map(|user| (*user, Role::Member)).collect();
                self.members.insert(actor, Role::Owner);
            }
            GroupEvent::MembersAdded(users) => {
                for user in users {
                    self.members.entry(*user).or_insert(Role::Member);
                }
            }
            GroupEvent::MemberRemoved(user) => {
                self.members.remove(user);
            }
            GroupEvent::MemberLeft { new_owner } => {
                self.members.remove(&actor);
                if let Some(owner) = new_owner {
                    self.members.insert(*owner, Role::Owner);
                }
            }
            GroupEvent::Renamed(title) => self.title.clone_from(title),
            GroupEvent::RoleChanged(user, role) => {
                if let Some(current) = self.members.get_mut(user) {
                    *current = *role;
                }
            }
        }
        if !matches!(event, GroupEvent::Renamed(_) | GroupEvent::RoleChanged(..)) {
            self.refresh_recipients();
        }
    }

    /// Who owns the group after `owner` leaves: the lowest-id admin, else the
    /// lowest-id member.
    fn successor(&self, owner: UserId) -> Option<UserId> {
        let others = || self.members.iter().filter(move |(user, _)| **user != owner);
        others()
            .find(|(_, role)| **role == Role::Admin)
            .or_else(|| others().next())
            .map(|(user, _)| *user)
    }

    fn refresh_recipients(&mut self) {
        self.recipients = self.members.keys().copied().collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(raw: u64) -> UserId {
        UserId::new(raw).unwrap()
    }

    /// Owner 1, admin 2, members 3 and 4.
    fn group() -> GroupState {
        let created = GroupState::create(user(1), "team".into(), vec![user(2), user(3), user(4)], 10).unwrap();
        let mut state = GroupState::created(user(1), &created);
        state.apply(user(1), &GroupEvent::RoleChanged(user(2), Role::Admin));
        state
    }

    fn allowed(state: &GroupState, actor: u64, command: GroupCommand) -> bool {
        state.authorize(user(actor), command, 10).is_ok()
    }

    #[test]
    fn creation_makes_the_creator_owner_and_respects_the_limit() {
        let state = group();
        assert_eq!(state.role(user(1)), Some(Role::Owner));
        assert_eq!(state.role(user(3)), Some(Role::Member));
        assert_eq!(state.recipients().len(), 4);
        assert!(matches!(
            GroupState::create(user(1), "big".into(), (2..=11).map(user).collect(), 10),
            Err(ChatError::TooManyMembers { max: 10 })
        ));
    }

    #[test]
    fn roles_gate_every_change() {
        let state = group();
        let add = || GroupCommand::Add(vec![user(9)]);
        assert!(allowed(&state, 1, add()) && allowed(&state, 2, add()) && !allowed(&state, 3, add()));
        assert!(!allowed(&state, 9, add()), "non-members change nothing");
        assert!(allowed(&state, 2, GroupCommand::Remove(user(3))));
        assert!(
            !allowed(&state, 2, GroupCommand::Remove(user(1))),
            "nobody removes the owner"
        );
        assert!(!allowed(&state, 3, GroupCommand::Remove(user(4))));
        assert!(allowed(&state, 1, GroupCommand::Remove(user(2))));
        assert!(
            !allowed(&state, 1, GroupCommand::Remove(user(1))),
            "the owner leaves instead"
        );
        assert!(!allowed(&state, 3, GroupCommand::Rename("x".into())));
        assert!(allowed(&state, 2, GroupCommand::Rename("x".into())));
        assert!(!allowed(&state, 2, GroupCommand::SetRole(user(3), Role::Admin)));
        assert!(allowed(&state, 1, GroupCommand::SetRole(user(3), Role::Admin)));
        assert!(!allowed(&state, 1, GroupCommand::SetRole(user(3), Role::Owner)));
        assert!(allowed(&state, 4, GroupCommand::Leave));
    }

    #[test]
    fn adding_respects_the_member_limit_and_skips_existing_members() {
        let state = group();
        let event = state
            .authorize(user(1), GroupCommand::Add(vec![user(3), user(5), user(5)]), 10)
            .unwrap();
        assert_eq!(event, GroupEvent::MembersAdded(vec![user(5)]));
        assert!(matches!(
            state.authorize(user(1), GroupCommand::Add((5..=11).map(user).collect()), 10),
            Err(ChatError::TooManyMembers { .. })
        ));
    }

    #[test]
    fn an_owner_leaving_hands_over_to_an_admin() {
        let mut state = group();
        let event = state.authorize(user(1), GroupCommand::Leave, 10).unwrap();
        assert_eq!(
            event,
            GroupEvent::MemberLeft {
                new_owner: Some(user(2))
            }
        );
        state.apply(user(1), &event);
        assert_eq!(state.role(user(1)), None);
        assert_eq!(state.role(user(2)), Some(Role::Owner));
        assert_eq!(state.recipients().len(), 3);
    }

    #[test]
    fn removal_takes_effect_for_fan_out_at_once() {
        let mut state = group();
        state.apply(user(1), &GroupEvent::MemberRemoved(user(3)));
        assert!(!state.recipients().contains(&user(3)));
        assert!(!allowed(&state, 3, GroupCommand::Leave));
    }
}
