//! Object ids, transaction ids and revisions: the keys of the cache.
//!
//! ZODB spells oids and tids as 8-byte big-endian strings (`ZODB.utils.p64`
//! and `u64`); tidecache holds them as `u64` and converts at the Python
//! boundary only.

use serde::{Deserialize, Serialize};
use std::fmt;

/// An 8-byte ZODB object id, as a `u64` (ZODB's `u64(oid)`).
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Oid(pub u64);

/// An 8-byte ZODB transaction id, as a `u64` (ZODB's `u64(tid)`).
///
/// Tids increase monotonically with commit order. The *serial* of a
/// revision is the tid of the transaction that wrote it; a *view* is the tid
/// of the last transaction a connection sees.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Tid(pub u64);

impl Oid {
    /// Decodes ZODB's 8-byte big-endian oid string.
    pub fn from_be_bytes(b: [u8; 8]) -> Oid {
        Oid(u64::from_be_bytes(b))
    }
    /// Encodes as ZODB's 8-byte big-endian oid string.
    pub fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
}

impl Tid {
    /// The tid before any transaction (`z64`).
    pub const ZERO: Tid = Tid(0);
    /// Decodes ZODB's 8-byte big-endian tid string.
    pub fn from_be_bytes(b: [u8; 8]) -> Tid {
        Tid(u64::from_be_bytes(b))
    }
    /// Encodes as ZODB's 8-byte big-endian tid string.
    pub fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
}

impl fmt::Debug for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oid {:#x}", self.0)
    }
}

impl fmt::Display for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

impl fmt::Debug for Tid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tid {:#x}", self.0)
    }
}

impl fmt::Display for Tid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

/// The validity interval of a revision: `[serial, end)`, `end` being the
/// serial of the next revision of the same oid, or `None` while the
/// revision is current (open).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Validity {
    /// Tid of the transaction that wrote the revision.
    pub serial: Tid,
    /// Serial of the next revision of the oid; `None` while current.
    pub end: Option<Tid>,
}

impl Validity {
    /// Whether the revision is visible at view `view`, given the horizon `h`
    /// up to which invalidation information is complete (invariant 2: an open
    /// revision answers only views `<= h`).
    pub fn visible_at(&self, view: Tid, horizon: Tid) -> bool {
        if view < self.serial {
            return false;
        }
        match self.end {
            Some(end) => view < end,
            None => view <= horizon,
        }
    }
}

/// Byte size of a cached state, used to bound the cache by memory.
pub trait StateWeight {
    /// Size of the state in bytes (the pickle's length for raw states).
    fn weight(&self) -> usize;
}

impl StateWeight for Vec<u8> {
    fn weight(&self) -> usize {
        self.len()
    }
}

impl StateWeight for Box<[u8]> {
    fn weight(&self) -> usize {
        self.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_revision_needs_the_horizon() {
        let v = Validity {
            serial: Tid(5),
            end: None,
        };
        assert!(!v.visible_at(Tid(4), Tid(10)));
        assert!(v.visible_at(Tid(5), Tid(10)));
        assert!(v.visible_at(Tid(10), Tid(10)));
        assert!(!v.visible_at(Tid(11), Tid(10)), "invariant 2");
    }

    #[test]
    fn closed_revision_is_visible_until_end() {
        let v = Validity {
            serial: Tid(5),
            end: Some(Tid(8)),
        };
        assert!(v.visible_at(Tid(7), Tid(0)));
        assert!(!v.visible_at(Tid(8), Tid(100)));
    }

    #[test]
    fn byte_order_matches_zodb_p64() {
        let o = Oid::from_be_bytes([0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(o, Oid(0x102));
        assert_eq!(o.to_be_bytes(), [0, 0, 0, 0, 0, 0, 1, 2]);
    }
}
