//! The set of trusted peers: agent name → pinned certificate [`Fingerprint`].
//!
//! This module owns the trust decision's data. Both TLS verifiers (see
//! [`crate::tls`]) consult the same shared [`PeerSet`], so `godwit peer add`
//! takes effect for the next handshake without restarting the endpoint.
//! Removing a peer refuses its future handshakes; connections already up stay
//! up until [`crate::Transport::connection`] notices the pin changed.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::identity::Fingerprint;

/// Errors from editing a [`PeerSet`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerSetError {
    /// Two names for one certificate would make an incoming peer's name
    /// ambiguous.
    #[error("fingerprint {fingerprint} is already pinned for peer {existing:?}")]
    DuplicateFingerprint {
        /// The fingerprint being added.
        fingerprint: Fingerprint,
        /// The peer that already has it.
        existing: String,
    },
    /// Names are used in logs, stats and config; an empty one is a mistake.
    #[error("peer name must not be empty")]
    EmptyName,
}

/// Shared, runtime-updatable map of trusted peers. Cloning shares the map.
#[derive(Clone, Default)]
pub struct PeerSet {
    // std RwLock: the rustls verifiers are synchronous and every critical
    // section is a map lookup, so an async lock would buy nothing.
    inner: Arc<RwLock<BTreeMap<String, Fingerprint>>>,
}

impl PeerSet {
    /// An empty set: every peer is refused.
    pub fn new() -> PeerSet {
        PeerSet::default()
    }

    /// Builds a set from `(name, fingerprint)` pairs.
    pub fn from_entries<I, S>(entries: I) -> Result<PeerSet, PeerSetError>
    where
        I: IntoIterator<Item = (S, Fingerprint)>,
        S: Into<String>,
    {
        let set = PeerSet::new();
        for (name, fp) in entries {
            set.insert(name, fp)?;
        }
        Ok(set)
    }

    /// Pins `fingerprint` for `name`, replacing any previous pin for that
    /// name. Returns the previous fingerprint.
    pub fn insert(
        &self,
        name: impl Into<String>,
        fingerprint: Fingerprint,
    ) -> Result<Option<Fingerprint>, PeerSetError> {
        let name = name.into();
        if name.is_empty() {
            return Err(PeerSetError::EmptyName);
        }
        let mut map = self.write();
        if let Some((existing, _)) = map
            .iter()
            .find(|(n, fp)| **fp == fingerprint && **n != name)
        {
            return Err(PeerSetError::DuplicateFingerprint {
                fingerprint,
                existing: existing.clone(),
            });
        }
        Ok(map.insert(name, fingerprint))
    }

    /// Forgets `name`. Returns its fingerprint if it was pinned.
    pub fn remove(&self, name: &str) -> Option<Fingerprint> {
        self.write().remove(name)
    }

    /// The pinned fingerprint of `name`.
    pub fn get(&self, name: &str) -> Option<Fingerprint> {
        self.read().get(name).copied()
    }

    /// The peer whose pinned certificate has this fingerprint.
    pub fn name_of(&self, fingerprint: &Fingerprint) -> Option<String> {
        // Linear scan: a deployment has a handful of sites, not thousands.
        self.read()
            .iter()
            .find(|(_, fp)| *fp == fingerprint)
            .map(|(name, _)| name.clone())
    }

    /// A snapshot of all entries, sorted by name.
    pub fn entries(&self) -> Vec<(String, Fingerprint)> {
        self.read().iter().map(|(n, fp)| (n.clone(), *fp)).collect()
    }

    /// Number of pinned peers.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// True if no peer is pinned.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<String, Fingerprint>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (every write is a single insert/remove), so poisoning is ignored.
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<String, Fingerprint>> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for PeerSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.entries()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(b: u8) -> Fingerprint {
        Fingerprint::from_bytes([b; 32])
    }

    #[test]
    fn insert_lookup_remove() {
        let set = PeerSet::new();
        assert_eq!(set.insert("a", fp(1)), Ok(None));
        assert_eq!(set.insert("b", fp(2)), Ok(None));
        assert_eq!(set.get("a"), Some(fp(1)));
        assert_eq!(set.name_of(&fp(2)).as_deref(), Some("b"));
        assert_eq!(set.insert("a", fp(3)), Ok(Some(fp(1))));
        assert_eq!(set.name_of(&fp(1)), None);
        assert_eq!(set.remove("a"), Some(fp(3)));
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn clones_share_updates() {
        let set = PeerSet::new();
        let other = set.clone();
        set.insert("a", fp(1)).expect("insert");
        assert_eq!(other.get("a"), Some(fp(1)));
    }

    #[test]
    fn duplicate_fingerprint_and_empty_name_are_rejected() {
        let set = PeerSet::from_entries([("a", fp(1))]).expect("build");
        assert!(matches!(
            set.insert("b", fp(1)),
            Err(PeerSetError::DuplicateFingerprint { .. })
        ));
        assert_eq!(set.insert("", fp(9)), Err(PeerSetError::EmptyName));
        // Re-pinning the same name with the same fingerprint is fine.
        assert_eq!(set.insert("a", fp(1)), Ok(Some(fp(1))));
    }
}
