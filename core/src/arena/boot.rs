//! The boot id: which boot of the host an arena file's pages were written
//! in. A file on a disk that outlives a reboot (a power loss) may hold any
//! mix of its pages' versions: the kernel writes dirty pages back in no
//! particular order and nothing calls `msync`. Within one boot every
//! mapping sees the page cache, so the file is coherent whatever reached
//! the disk; across a reboot it is not. [`ArenaWriter::recover`] compares
//! the boot id in the header ([`super::layout::header::BOOT_ID`]) with the
//! running kernel's and, when they differ, keeps only what a torn file
//! cannot get wrong (see there).
//!
//! [`ArenaWriter::recover`]: super::ArenaWriter::recover

use std::sync::OnceLock;

/// Where Linux publishes the boot id (a UUID chosen at every boot).
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The running kernel's boot id as two words (the UUID's 32 hex digits,
/// big-endian halves), read once per process; `[0, 0]` where it cannot be
/// read, which no file ever matches: every re-attach then counts as one
/// after a reboot (the safe side).
pub fn current() -> [u64; 2] {
    static ID: OnceLock<[u64; 2]> = OnceLock::new();
    *ID.get_or_init(|| {
        std::fs::read_to_string(BOOT_ID_PATH)
            .ok()
            .and_then(|s| parse(&s))
            .unwrap_or([0, 0])
    })
}

/// Parses a boot id (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, any case,
/// surrounding white space ignored); `None` if it is not 32 hex digits or
/// is all zeros.
pub fn parse(text: &str) -> Option<[u64; 2]> {
    let hex: String = text.trim().chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let hi = u64::from_str_radix(&hex[..16], 16).ok()?;
    let lo = u64::from_str_radix(&hex[16..], 16).ok()?;
    (hi | lo != 0).then_some([hi, lo])
}

/// Whether a file whose header holds `stored` was last served in another
/// boot than this one (or the boot is unknown).
pub fn rebooted_since(stored: [u64; 2]) -> bool {
    let now = current();
    now == [0, 0] || stored != now
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn boot_ids_parse_and_unknown_counts_as_rebooted() {
        assert_eq!(
            parse("0123abcd-0000-4000-8000-00000000002a\n"),
            Some([0x0123_abcd_0000_4000, 0x8000_0000_0000_002a])
        );
        assert_eq!(parse(""), None);
        assert_eq!(parse("00000000-0000-0000-0000-000000000000"), None);
        assert_eq!(parse("not a boot id"), None);
        assert!(rebooted_since([0, 0]));
        if current() != [0, 0] {
            assert!(!rebooted_since(current()));
        }
    }
}
