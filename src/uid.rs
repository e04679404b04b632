//! New DICOM UIDs under the UUID-derived root `2.25` (PS3.5 §B.2): no registered org root
//! is needed and collisions are as unlikely as for random UUIDs.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn random_u64() -> u64 {
    // RandomState is seeded from the OS per process and per instance; the counter and the
    // clock make successive values distinct even if the seed repeated.
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// A fresh UID: `2.25.` followed by a 128-bit random integer in decimal (at most 44 chars).
pub fn new_uid() -> String {
    let v = ((random_u64() as u128) << 64) | random_u64() as u128;
    // UUID variant bits do not matter for 2.25 UIDs; only the decimal form does.
    format!("2.25.{v}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn uids_are_valid_and_distinct() {
        let a = super::new_uid();
        let b = super::new_uid();
        assert_ne!(a, b);
        assert!(crate::config::is_valid_uid(&a), "{a}");
        assert!(a.len() <= 64);
    }
}
