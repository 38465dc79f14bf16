//! Crash points: named steps of the arena writer's paths at which a test
//! can have the sidecar killed with `SIGKILL`, to check that a restart on
//! the same file never serves a wrong state (invariant 8; the approach of
//! redb's crash-consistency tests: fail at every write step, then recover
//! and compare with a model).
//!
//! The points are always compiled in and inert: [`point`] costs one atomic
//! load until [`arm`] is called. `tidecached serve` arms them from the
//! environment variable `TIDECACHED_CRASH_AT=<name>:<n>` (the `n`th time
//! the writer reaches point `<name>`, counting from 1, the process sends
//! itself `SIGKILL`: the arena file is left exactly as a `kill -9` at that
//! instruction leaves it). Nothing but tests sets it.
//!
//! The names are the constants below; `sidecar/tests/crash_points.rs`
//! crashes at each of them and checks every lookup after the restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// A record's words are written, not yet linked into its chain.
pub const INSERT_WRITTEN: &str = "insert-written";
/// A record is linked; the counts are not updated yet.
pub const INSERT_LINKED: &str = "insert-linked";
/// A revision's `end` is written, its CRC word not yet.
pub const CLOSE_END: &str = "close-end";
/// A database's horizon is stored, its slot not yet resealed.
pub const HORIZON_STORED: &str = "horizon-stored";
/// A database slot is resealed (its CRC written).
pub const SLOT_SEALED: &str = "slot-sealed";
/// A flush bumped the generation; its records are not yet unlinked.
pub const FLUSH_GENERATION: &str = "flush-generation";
/// A resync dropped the open revisions; the new horizon is not published.
pub const RESYNC_DROPPED: &str = "resync-dropped";
/// Eviction copied a segment's hot records; the rest is not yet unlinked.
pub const EVICT_COPIED: &str = "evict-copied";
/// Eviction unlinked a segment's records; its generation is not yet odd.
pub const EVICT_UNLINKED: &str = "evict-unlinked";
/// A slot got its new key; it is not yet marked in use.
pub const SLOT_ASSIGNED: &str = "slot-assigned";
/// A slot was marked free; its records are not yet unlinked.
pub const SLOT_RELEASED: &str = "slot-released";

/// Every crash point, for tests that go through them all.
pub const ALL: &[&str] = &[
    INSERT_WRITTEN,
    INSERT_LINKED,
    CLOSE_END,
    HORIZON_STORED,
    SLOT_SEALED,
    FLUSH_GENERATION,
    RESYNC_DROPPED,
    EVICT_COPIED,
    EVICT_UNLINKED,
    SLOT_ASSIGNED,
    SLOT_RELEASED,
];

struct Armed {
    name: String,
    remaining: AtomicU64,
}

static ARMED: OnceLock<Armed> = OnceLock::new();

/// Why [`arm`] refused a specification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArmError {
    /// Not of the form `<name>:<n>` with `n >= 1`.
    #[error("crash point {0:?} is not <name>:<n> with n >= 1")]
    Malformed(String),
    /// The name is none of [`ALL`].
    #[error("no crash point is named {0:?} (known: {known})", known = ALL.join(", "))]
    Unknown(String),
    /// A crash point is armed already (once per process).
    #[error("a crash point is armed already")]
    AlreadyArmed,
}

/// Arms the crash point `spec` = `<name>:<n>`: the `n`th time [`point`]
/// is called with `<name>`, the process kills itself with `SIGKILL`.
///
/// # Errors
/// [`ArmError`] if `spec` is malformed or names no crash point, or one is
/// armed already.
pub fn arm(spec: &str) -> Result<(), ArmError> {
    let (name, n) = spec
        .rsplit_once(':')
        .and_then(|(name, n)| Some((name, n.parse::<u64>().ok().filter(|&n| n >= 1)?)))
        .ok_or_else(|| ArmError::Malformed(spec.to_owned()))?;
    if !ALL.contains(&name) {
        return Err(ArmError::Unknown(name.to_owned()));
    }
    ARMED
        .set(Armed {
            name: name.to_owned(),
            remaining: AtomicU64::new(n),
        })
        .map_err(|_| ArmError::AlreadyArmed)
}

/// The writer reached crash point `name`: kills the process if this is
/// the armed point's `n`th time; otherwise nothing.
#[inline]
pub fn point(name: &'static str) {
    if let Some(armed) = ARMED.get() {
        if armed.name == name && armed.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            kill_self();
        }
    }
}

#[cfg(not(loom))]
fn kill_self() {
    // SAFETY: raise only sends a signal to this process; SIGKILL cannot be
    // caught, so nothing runs after it.
    unsafe {
        libc::raise(libc::SIGKILL);
    }
}

#[cfg(loom)]
fn kill_self() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specifications_are_checked() {
        assert_eq!(arm("insert-written"), Err(ArmError::Malformed("insert-written".into())));
        assert_eq!(
            arm("insert-written:0"),
            Err(ArmError::Malformed("insert-written:0".into()))
        );
        assert_eq!(arm("nowhere:1"), Err(ArmError::Unknown("nowhere".into())));
        // An armed point that is never reached does nothing.
        assert_eq!(arm("slot-released:1000000"), Ok(()));
        assert_eq!(arm("slot-released:1"), Err(ArmError::AlreadyArmed));
        point(INSERT_WRITTEN);
        point(SLOT_RELEASED);
    }
}
