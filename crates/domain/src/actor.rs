//! Who acts through an admin backend, and the questions every service asks of them.

use super::key::{KeyRecord, Owner, OwnerKind};
use super::refusal::{Reason, Refusal};

/// The permission that makes an actor an administrator rather than a self-service member.
pub const ADMIN_PERMISSION: &str = "admin";

/// Whether an actor holding `permissions` is a self-service member (see
/// [`Actor::is_self_service`]); for a request's actor not yet checked.
pub fn is_self_service(permissions: &[String]) -> bool {
    !permissions.iter().any(|p| p == ADMIN_PERMISSION)
}

/// The principal acting through an admin backend.
#[derive(Clone, Debug)]
pub struct Actor {
    pub id: String,
    pub permissions: Vec<String>,
}

impl Actor {
    /// A self-service member: an actor without the admin permission, who sees and manages
    /// only the keys it owns.
    pub fn is_self_service(&self) -> bool {
        is_self_service(&self.permissions)
    }

    /// The refusal of a self-service member that named `named`, not itself, as the owner
    /// of keys `rule` concerns ("a self-service member's key is its own", ...).
    pub fn owner_not_actor(&self, named: &Owner, rule: &str) -> Refusal {
        Refusal::new(
            Reason::SelfServiceOwnerNotActor,
            format!("{rule}: owner {named} is not the actor {}", self.id),
        )
        .with("owner", named)
        .with("actor_id", &self.id)
    }

    /// Whether the actor owns `key` (as its user owner).
    pub fn owns(&self, key: &KeyRecord) -> bool {
        key.owner.kind == OwnerKind::User && key.owner.id == self.id
    }

    /// The actor as a key's owner: a user.
    pub fn as_owner(&self) -> Owner {
        Owner {
            kind: OwnerKind::User,
            id: self.id.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor(permissions: &[&str]) -> Actor {
        Actor {
            id: "user_1".into(),
            permissions: permissions.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn an_actor_without_admin_is_self_service_and_owns_only_its_own_keys() {
        assert!(actor(&["read", "write"]).is_self_service());
        assert!(!actor(&["read", "admin"]).is_self_service());
        let mut key = KeyRecord::sample("key_1");
        let member = actor(&["read"]);
        assert!(!member.owns(&key));
        key.owner = member.as_owner();
        assert!(member.owns(&key));
        key.owner.kind = OwnerKind::ServiceAccount;
        assert!(
            !member.owns(&key),
            "a service account of the same id is not the user"
        );
    }
}
