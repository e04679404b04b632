//! Feature maps cached on disk, keyed by the backbone's checksum and a hash of the pixels,
//! so repeated evaluations (and re-sent series) do not run the encoder again.
//!
//! Layout: `<dir>/<model sha256>/<pixel sha256>.fm`: magic `SCFM1`, then C, h, w, rows,
//! columns (u32 LE) and C·h·w f32 LE. Written to a temp name and renamed; a file that does
//! not parse is recomputed, never trusted.

use crate::backbone::{Backbone, BackboneError, FeatureMap};
use ndarray::{Array2, Array3};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 5] = b"SCFM1";

pub struct FeatureCache {
    dir: PathBuf,
}

/// SHA-256 of a slice's size and pixel values.
pub fn pixel_hash(pixels: &Array2<f32>) -> String {
    let mut h = Sha256::new();
    let (r, c) = pixels.dim();
    h.update((r as u64).to_le_bytes());
    h.update((c as u64).to_le_bytes());
    for v in pixels.iter() {
        h.update(v.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl FeatureCache {
    pub fn new(root: &Path, backbone: &Backbone) -> FeatureCache {
        FeatureCache {
            dir: root.join(backbone.checksum()),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.fm"))
    }

    pub fn load(&self, key: &str) -> Option<FeatureMap> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        if bytes.len() < 25 || &bytes[..5] != MAGIC {
            return None;
        }
        let u = |i: usize| {
            u32::from_le_bytes([
                bytes[5 + 4 * i],
                bytes[6 + 4 * i],
                bytes[7 + 4 * i],
                bytes[8 + 4 * i],
            ]) as usize
        };
        let (c, h, w, rows, cols) = (u(0), u(1), u(2), u(3), u(4));
        let n = c.checked_mul(h)?.checked_mul(w)?;
        if bytes.len() != 25 + 4 * n {
            return None;
        }
        let data: Vec<f32> = bytes[25..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Some(FeatureMap {
            data: Array3::from_shape_vec((c, h, w), data).ok()?,
            image_rows: rows,
            image_columns: cols,
        })
    }

    pub fn store(&self, key: &str, fm: &FeatureMap) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let (c, h, w) = fm.data.dim();
        let mut bytes = Vec::with_capacity(25 + 4 * fm.data.len());
        bytes.extend_from_slice(MAGIC);
        for v in [c, h, w, fm.image_rows, fm.image_columns] {
            bytes.extend_from_slice(&(v as u32).to_le_bytes());
        }
        for v in fm.data.iter() {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        // One temp file per write: threads of one process (the tests, parallel
        // evaluations) storing the same key must not write into each other's file and
        // find it renamed away.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!(".{key}.{}.{n}.tmp", std::process::id()));
        // A failed write (a full disk) or rename must not leave its temp file: with a
        // name per write, every failure would otherwise add one.
        let done =
            std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, self.path(key)));
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        done
    }

    /// Cached features of a raw slice, computing (and caching) them when missing. The
    /// second value says whether the encoder ran.
    pub fn features(
        &self,
        backbone: &Backbone,
        pixels: &Array2<f32>,
    ) -> Result<(FeatureMap, bool), BackboneError> {
        // Posterised images were encoded unsmoothed before `normalize` smoothed them:
        // their own key keeps those maps from being reused, and every other entry valid.
        let mut key = pixel_hash(pixels);
        if crate::image::is_posterised(pixels)? {
            key.push_str("-smoothed");
        }
        if let Some(fm) = self.load(&key) {
            return Ok((fm, false));
        }
        let normalized = crate::image::normalize(pixels)?;
        let fm = backbone.features(&normalized)?;
        if let Err(e) = self.store(&key, &fm) {
            log::warn!("features: cannot cache in {}: {e}", self.dir.display());
        }
        Ok((fm, true))
    }
}

/// Features of spooled instances for the running agent, computed once per instance:
/// a prefetch worker fills it while a series arrives, and the analysis takes what is
/// ready, waits for what is being computed and computes the rest itself.
pub struct FeatureStore {
    backbone: std::sync::Arc<Backbone>,
    slots: std::sync::Mutex<Slots>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct Slots {
    map: std::collections::HashMap<String, Slot>,
    /// Insertion order of the ready maps, to bound memory if series are abandoned.
    order: std::collections::VecDeque<String>,
    /// Bytes of the ready maps.
    bytes: usize,
    /// Instances whose series was analysed: a prefetch job still queued for one is stale.
    finished: std::collections::HashSet<String>,
    finished_order: std::collections::VecDeque<String>,
}

enum Slot {
    Running,
    Ready(std::sync::Arc<FeatureMap>),
}

/// Bytes of feature maps kept at most: a few localizers' worth. By size, not count: a
/// LiteMedSAM map is 4 MiB, a `litemedsam-hyper` one 24 MiB (and a 9-slice stack of
/// those must fit while it is analysed).
const KEEP_BYTES: usize = 320 << 20;

impl Slots {
    /// Stores a computed map; the oldest ones go while the maps pass `keep` bytes (the
    /// newest always stays).
    fn insert_ready(&mut self, uid: &str, fm: std::sync::Arc<FeatureMap>, keep: usize) {
        self.remove_ready(uid);
        self.bytes += map_bytes(&fm);
        self.map.insert(uid.to_string(), Slot::Ready(fm));
        self.order.push_back(uid.to_string());
        while self.bytes > keep && self.order.len() > 1 {
            if let Some(old) = self.order.pop_front() {
                if let Some(Slot::Ready(fm)) = self.map.remove(&old) {
                    self.bytes -= map_bytes(&fm);
                }
            }
        }
    }

    fn remove_ready(&mut self, uid: &str) {
        if let Some(Slot::Ready(fm)) = self.map.get(uid) {
            self.bytes -= map_bytes(fm);
            self.map.remove(uid);
            self.order.retain(|u| u != uid);
        }
    }
}

fn map_bytes(fm: &FeatureMap) -> usize {
    fm.data.len() * std::mem::size_of::<f32>()
}

impl FeatureStore {
    pub fn new(backbone: std::sync::Arc<Backbone>) -> FeatureStore {
        FeatureStore {
            backbone,
            slots: std::sync::Mutex::new(Slots::default()),
            changed: std::sync::Condvar::new(),
        }
    }

    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        // A panic elsewhere must not stop the agent: the map stays consistent per entry.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Features of the instance `uid` stored at `path`.
    pub fn get(&self, uid: &str, path: &Path) -> Result<std::sync::Arc<FeatureMap>, BackboneError> {
        let mut slots = self.lock();
        loop {
            match slots.map.get(uid) {
                Some(Slot::Ready(fm)) => return Ok(fm.clone()),
                Some(Slot::Running) => {
                    slots = self.changed.wait(slots).unwrap_or_else(|p| p.into_inner());
                }
                None => break,
            }
        }
        slots.map.insert(uid.to_string(), Slot::Running);
        drop(slots);
        let started = std::time::Instant::now();
        let result = crate::image::read_dicom(path)
            .map_err(BackboneError::from)
            .and_then(|px| crate::image::normalize(&px).map_err(BackboneError::from))
            .and_then(|n| self.backbone.features(&n));
        let mut slots = self.lock();
        let out = match result {
            Ok(fm) => {
                crate::metrics::METRICS
                    .encoder_seconds
                    .observe(started.elapsed());
                let fm = std::sync::Arc::new(fm);
                slots.insert_ready(uid, fm.clone(), KEEP_BYTES);
                Ok(fm)
            }
            Err(e) => {
                slots.map.remove(uid);
                Err(e)
            }
        };
        self.changed.notify_all();
        out
    }

    /// Drops the features of instances whose series has been analysed.
    pub fn forget<'a>(&self, uids: impl IntoIterator<Item = &'a str>) {
        let mut slots = self.lock();
        for uid in uids {
            slots.remove_ready(uid);
            if slots.finished.insert(uid.to_string()) {
                slots.finished_order.push_back(uid.to_string());
            }
        }
        while slots.finished_order.len() > 4096 {
            if let Some(old) = slots.finished_order.pop_front() {
                slots.finished.remove(&old);
            }
        }
    }

    /// Computes features ahead of the analysis unless they are no longer needed.
    pub fn prefetch(&self, uid: &str, path: &Path) -> Result<(), BackboneError> {
        if self.lock().finished.contains(uid) {
            return Ok(());
        }
        self.get(uid, path).map(|_| ())
    }
}

/// An arrived instance and the feature stores (one per backbone) that will want it.
pub struct PrefetchJob {
    pub received: crate::spool::Received,
    pub stores: Vec<std::sync::Arc<FeatureStore>>,
}

/// Computes features of instances sent to it until the channel closes. A failure is only
/// logged: the analysis computes the instance again and reports the error with its series.
pub fn prefetch(jobs: crossbeam_channel::Receiver<PrefetchJob>) {
    for job in jobs.iter() {
        let r = &job.received;
        for store in &job.stores {
            let t = std::time::Instant::now();
            match store.prefetch(&r.meta.sop_instance_uid, &r.path) {
                Ok(_) => log::debug!(
                    "features: {} ({}) ready in {:.0} ms",
                    r.meta.sop_instance_uid,
                    store.backbone().id(),
                    t.elapsed().as_secs_f64() * 1000.0
                ),
                Err(e) => log::warn!("features: {}: {e}", r.meta.sop_instance_uid),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(channels: usize) -> std::sync::Arc<FeatureMap> {
        std::sync::Arc::new(FeatureMap {
            data: ndarray::Array3::zeros((channels, 16, 16)),
            image_rows: 64,
            image_columns: 64,
        })
    }

    /// Threads storing one key at once (parallel tests encode the same slice) each
    /// succeed, and the cache then holds the map whole.
    #[test]
    fn concurrent_stores_of_one_key_all_succeed() {
        let dir = std::env::temp_dir().join(format!("scout-cache-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = FeatureCache { dir: dir.clone() };
        let fm = FeatureMap {
            data: ndarray::Array3::from_shape_fn((64, 32, 32), |(c, i, j)| (c * i + j) as f32),
            image_rows: 128,
            image_columns: 128,
        };
        let results: Vec<std::io::Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..20).try_for_each(|_| cache.store("same", &fm))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            r.unwrap();
        }
        let back = cache.load("same").unwrap();
        assert_eq!(back.data, fm.data);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "temp files left behind"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A store that cannot be renamed into place (here a directory stands in the
    /// cache file's path) fails and leaves no temp file behind.
    #[test]
    fn a_failed_store_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("scout-cache-fail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = FeatureCache { dir: dir.clone() };
        std::fs::create_dir_all(cache.path("blocked").join("inside")).unwrap();
        let fm = FeatureMap {
            data: ndarray::Array3::zeros((2, 4, 4)),
            image_rows: 8,
            image_columns: 8,
        };
        assert!(cache.store("blocked", &fm).is_err());
        assert!(cache.load("blocked").is_none());
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["blocked.fm"], "temp file left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The store is bounded by bytes: small maps stay many, large ones few, the newest
    /// always, and forgetting one gives its bytes back.
    #[test]
    fn ready_maps_are_bounded_by_size() {
        let one = 16 * 16 * 4;
        let mut slots = Slots::default();
        for i in 0..10 {
            slots.insert_ready(&format!("small{i}"), map(1), 8 * one);
        }
        assert_eq!(slots.order.len(), 8);
        assert_eq!(slots.bytes, 8 * one);
        assert!(!slots.map.contains_key("small0") && !slots.map.contains_key("small1"));
        slots.insert_ready("large", map(6), 8 * one);
        assert_eq!(slots.order, ["small8", "small9", "large"]);
        assert_eq!(slots.bytes, 8 * one);
        slots.insert_ready("huge", map(20), 8 * one);
        assert_eq!(
            slots.order,
            ["huge"],
            "the newest stays even alone over the bound"
        );
        slots.insert_ready("huge", map(20), 8 * one);
        assert_eq!(
            (slots.order.len(), slots.bytes),
            (1, 20 * one),
            "stored again, counted once"
        );
        slots.remove_ready("huge");
        assert_eq!((slots.order.len(), slots.bytes, slots.map.len()), (0, 0, 0));
    }
}
