//! Feature maps cached on disk, keyed by the backbone's checksum and a hash of the pixels,
//! so repeated evaluations (and re-sent series) do not run the encoder again.
//!
//! Layout: `<dir>/<model sha256>/<pixel sha256>.fm`: magic `SCFM2`, then the number of
//! parts, rows and columns (u32 LE), then per part C, h, w (u32 LE) and C·h·w f32 LE: the
//! maps `FeatureMap::parts` gives, each on its own grid, so a hypercolumn's coarse part
//! comes back as it left the encoder. Written to a temp name and renamed; a file that does
//! not parse is recomputed, never trusted. `SCFM1` files (C, h, w, rows, columns, values:
//! one grid) are still read for backbones with one output; a hypercolumn stored that way
//! lost its coarse part and is computed again.

use crate::backbone::{Backbone, BackboneError, FeatureMap};
use ndarray::{Array2, Array3};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 5] = b"SCFM2";
const MAGIC_ONE_GRID: &[u8; 5] = b"SCFM1";

pub struct FeatureCache {
    dir: PathBuf,
    /// Whether the backbone returns one map (an `SCFM1` file then holds all of it).
    one_output: bool,
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

/// Reads little-endian u32s and f32s off the front of a byte slice.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u32(&mut self) -> Option<usize> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_le_bytes(*head) as usize)
    }

    fn map(&mut self, (c, h, w): (usize, usize, usize)) -> Option<Array3<f32>> {
        let n = c.checked_mul(h)?.checked_mul(w)?;
        let bytes = self.0.get(..n.checked_mul(4)?)?;
        self.0 = &self.0[bytes.len()..];
        let data = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Array3::from_shape_vec((c, h, w), data).ok()
    }

    fn dim(&mut self) -> Option<(usize, usize, usize)> {
        Some((self.u32()?, self.u32()?, self.u32()?))
    }
}

impl FeatureCache {
    pub fn new(root: &Path, backbone: &Backbone) -> FeatureCache {
        FeatureCache {
            dir: root.join(backbone.checksum()),
            one_output: backbone.entry().extra_outputs.is_empty(),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.fm"))
    }

    pub fn load(&self, key: &str) -> Option<FeatureMap> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        let (magic, rest) = bytes.split_first_chunk::<5>()?;
        let mut r = Reader(rest);
        let fm = if magic == MAGIC {
            let (parts, rows, columns) = r.dim()?;
            // Each part takes at least its 12-byte header: a count past that is damage.
            if parts == 0 || parts > r.0.len() / 12 {
                return None;
            }
            let maps = (0..parts)
                .map(|_| r.dim().and_then(|d| r.map(d)))
                .collect::<Option<Vec<_>>>()?;
            // An empty grid cannot be resized onto the others; and the stacked map is a few
            // times the parts (a hypercolumn: twice), not the product of a damaged file's
            // largest height, width and channel count.
            let h = maps.iter().map(|m| m.dim().1).max()?;
            let w = maps.iter().map(|m| m.dim().2).max()?;
            let channels: usize = maps.iter().map(|m| m.dim().0).sum();
            let values: usize = maps.iter().map(|m| m.len()).sum();
            let stacked = channels.checked_mul(h)?.checked_mul(w)?;
            if maps.iter().any(|m| m.dim().1 == 0 || m.dim().2 == 0) || stacked > 16 * values {
                return None;
            }
            FeatureMap::stacked(maps, rows, columns)
        } else if magic == MAGIC_ONE_GRID && self.one_output {
            let (c, h, w) = r.dim()?;
            let (rows, columns) = (r.u32()?, r.u32()?);
            FeatureMap::new(r.map((c, h, w))?, rows, columns)
        } else {
            return None;
        };
        r.0.is_empty().then_some(fm)
    }

    pub fn store(&self, key: &str, fm: &FeatureMap) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let parts = fm.parts();
        let mut bytes = Vec::with_capacity(17 + 12 * parts.len() + 4 * fm.data.len());
        bytes.extend_from_slice(MAGIC);
        for v in [parts.len(), fm.image_rows, fm.image_columns] {
            bytes.extend_from_slice(&(v as u32).to_le_bytes());
        }
        for part in &parts {
            let (c, h, w) = part.dim();
            for v in [c, h, w] {
                bytes.extend_from_slice(&(v as u32).to_le_bytes());
            }
            for v in part.iter() {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
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
        // The key hashes the slice's size too: a map for another size is a damaged file.
        self.load_or_compute(&key, pixels.dim(), || {
            backbone.features(&crate::image::normalize(pixels)?)
        })
    }

    /// The map stored under `key` for an image of `size`, else `compute`'s, stored. One
    /// thread of the process computes a key at a time: the others wait for it and read its
    /// map, since evaluations run side by side (the tests) would otherwise each encode the
    /// same slices at once, every one at a fraction of the cores. The second value says
    /// whether `compute` ran.
    fn load_or_compute<E>(
        &self,
        key: &str,
        size: (usize, usize),
        compute: impl FnOnce() -> Result<FeatureMap, E>,
    ) -> Result<(FeatureMap, bool), E> {
        let sized = |fm: &FeatureMap| (fm.image_rows, fm.image_columns) == size;
        if let Some(fm) = self.load(key).filter(sized) {
            return Ok((fm, false));
        }
        let _turn = Turn::take(self.path(key));
        // Another thread may have stored it while this one waited. When that one failed
        // (or could not store), this one computes.
        if let Some(fm) = self.load(key).filter(sized) {
            return Ok((fm, false));
        }
        let fm = compute()?;
        if let Err(e) = self.store(key, &fm) {
            log::warn!("features: cannot cache in {}: {e}", self.dir.display());
        }
        Ok((fm, true))
    }
}

/// The cache files some thread of this process is computing.
static COMPUTING: std::sync::Mutex<std::collections::BTreeSet<PathBuf>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());
static COMPUTED: std::sync::Condvar = std::sync::Condvar::new();

/// A thread's turn to compute one cache file, given back when dropped (also when the
/// computation fails or panics).
struct Turn(PathBuf);

impl Turn {
    fn take(path: PathBuf) -> Turn {
        // A panic elsewhere while the set was locked leaves it whole (inserts and removes
        // only): its poison is no reason to stop.
        let mut computing = COMPUTING.lock().unwrap_or_else(|e| e.into_inner());
        while computing.contains(&path) {
            computing = COMPUTED.wait(computing).unwrap_or_else(|e| e.into_inner());
        }
        computing.insert(path.clone());
        Turn(path)
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut computing = COMPUTING.lock().unwrap_or_else(|e| e.into_inner());
        computing.remove(&self.0);
        COMPUTED.notify_all();
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
    Ready(Kept),
}

/// A ready map as the store keeps it. A map of several grids is kept as the parts
/// `FeatureMap::stacked` builds it from (a `litemedsam-hyper` map: 12 instead of 28 MiB,
/// its coarse channels on their own grid only) and stacked again when it is read: the 9
/// maps of a stack analysed with `slices = "all"` are held until the series is analysed.
/// Cheap to clone: the map is stacked after the store's lock is released.
#[derive(Clone)]
enum Kept {
    Whole(std::sync::Arc<FeatureMap>),
    Parts {
        parts: std::sync::Arc<Vec<ndarray::Array3<f32>>>,
        image_rows: usize,
        image_columns: usize,
    },
}

impl Kept {
    fn of(fm: std::sync::Arc<FeatureMap>) -> Kept {
        if fm.coarse.is_empty() {
            return Kept::Whole(fm);
        }
        Kept::Parts {
            parts: std::sync::Arc::new(fm.parts().into_iter().map(|p| p.to_owned()).collect()),
            image_rows: fm.image_rows,
            image_columns: fm.image_columns,
        }
    }

    fn map(&self) -> std::sync::Arc<FeatureMap> {
        match self {
            Kept::Whole(fm) => fm.clone(),
            Kept::Parts {
                parts,
                image_rows,
                image_columns,
            } => std::sync::Arc::new(FeatureMap::stacked(
                parts.to_vec(),
                *image_rows,
                *image_columns,
            )),
        }
    }

    fn bytes(&self) -> usize {
        let values = match self {
            Kept::Whole(fm) => fm.data.len() + fm.coarse.iter().map(|p| p.map.len()).sum::<usize>(),
            Kept::Parts { parts, .. } => parts.iter().map(|p| p.len()).sum(),
        };
        values * std::mem::size_of::<f32>()
    }
}

/// Bytes of feature maps kept at most: a few localizers' worth. By size, not count: a
/// LiteMedSAM map is 4 MiB, a `litemedsam-hyper` one 12 MiB as kept (`Kept`; and a
/// 9-slice stack of those must fit while it is analysed).
const KEEP_BYTES: usize = 320 << 20;

impl Slots {
    /// Stores a computed map; the oldest ones go while the maps pass `keep` bytes (the
    /// newest always stays).
    fn insert_ready(&mut self, uid: &str, kept: Kept, keep: usize) {
        self.remove_ready(uid);
        self.bytes += kept.bytes();
        self.map.insert(uid.to_string(), Slot::Ready(kept));
        self.order.push_back(uid.to_string());
        while self.bytes > keep && self.order.len() > 1 {
            if let Some(old) = self.order.pop_front() {
                if let Some(Slot::Ready(kept)) = self.map.remove(&old) {
                    self.bytes -= kept.bytes();
                }
            }
        }
    }

    fn remove_ready(&mut self, uid: &str) {
        if let Some(Slot::Ready(kept)) = self.map.get(uid) {
            self.bytes -= kept.bytes();
            self.map.remove(uid);
            self.order.retain(|u| u != uid);
        }
    }
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
                Some(Slot::Ready(kept)) => {
                    let kept = kept.clone();
                    drop(slots);
                    return Ok(kept.map());
                }
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
        let encoder = started.elapsed();
        // The parts are copied before the lock is taken: readers do not wait on it.
        let result = result.map(|fm| {
            let fm = std::sync::Arc::new(fm);
            (Kept::of(fm.clone()), fm)
        });
        let mut slots = self.lock();
        let out = match result {
            Ok((kept, fm)) => {
                crate::metrics::METRICS.encoder_seconds.observe(encoder);
                slots.insert_ready(uid, kept, KEEP_BYTES);
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
        std::sync::Arc::new(FeatureMap::new(
            ndarray::Array3::zeros((channels, 16, 16)),
            64,
            64,
        ))
    }

    /// A cache in a new, empty folder of its own (removed first if a run left it).
    fn empty_cache(name: &str, one_output: bool) -> (PathBuf, FeatureCache) {
        let dir = std::env::temp_dir().join(format!("scout-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = FeatureCache {
            dir: dir.clone(),
            one_output,
        };
        (dir, cache)
    }

    /// Threads asking for one missing key at once compute it once, and each gets the map;
    /// a failed computation hands the turn on.
    #[test]
    fn one_thread_computes_a_key_the_others_wait_for() {
        let (dir, cache) = empty_cache("turn", true);
        let fm = FeatureMap::new(
            ndarray::Array3::from_shape_fn((8, 4, 4), |(c, i, j)| (c + i * j) as f32),
            16,
            16,
        );
        let runs = std::sync::atomic::AtomicUsize::new(0);
        let compute = || {
            let n = runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Slow enough that the other threads ask while it runs; the first run fails.
            std::thread::sleep(std::time::Duration::from_millis(200));
            if n == 0 {
                Err("encoder failed")
            } else {
                Ok(fm.clone())
            }
        };
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| cache.load_or_compute("k", (16, 16), compute)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            runs.into_inner(),
            2,
            "one failed run, then one that stored the map"
        );
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
        let computed: Vec<bool> = results
            .into_iter()
            .filter_map(|r| r.ok())
            .map(|(m, c)| {
                assert_eq!(m.data, fm.data);
                c
            })
            .collect();
        assert_eq!(computed.iter().filter(|&&c| c).count(), 1);
        let left = COMPUTING
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.starts_with(&dir));
        assert!(!left, "a turn was not given back");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Threads storing one key at once (parallel tests encode the same slice) each
    /// succeed, and the cache then holds the map whole.
    #[test]
    fn concurrent_stores_of_one_key_all_succeed() {
        let (dir, cache) = empty_cache("race", true);
        let fm = FeatureMap::new(
            ndarray::Array3::from_shape_fn((64, 32, 32), |(c, i, j)| (c * i + j) as f32),
            128,
            128,
        );
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

    /// A hypercolumn comes back from the cache with its coarse part; a map of the old
    /// one-grid format is read only where the backbone has one output.
    #[test]
    fn a_stored_hypercolumn_keeps_its_coarse_part() {
        let (dir, mut cache) = empty_cache("parts", false);
        let coarse = Array3::from_shape_fn((3, 4, 4), |(c, i, j)| (c + i * j) as f32 * 0.1);
        let fine = Array3::from_shape_fn((2, 8, 8), |(c, i, j)| (c * i + j) as f32);
        let fm = FeatureMap::stacked(vec![coarse.clone(), fine], 32, 32);
        cache.store("hyper", &fm).unwrap();
        let back = cache.load("hyper").unwrap();
        assert!(crate::same_bits(&back.data, &fm.data));
        assert_eq!((back.image_rows, back.image_columns), (32, 32));
        assert_eq!(back.coarse.len(), 1);
        assert_eq!((back.coarse[0].first, &back.coarse[0].map), (0, &coarse));
        // Cut short, or with a part count past the file: recomputed.
        let path = cache.path("hyper");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        assert!(cache.load("hyper").is_none());
        let mut lying = bytes.clone();
        lying[5..9].copy_from_slice(&1000u32.to_le_bytes());
        std::fs::write(&path, &lying).unwrap();
        assert!(cache.load("hyper").is_none());
        // Parts whose grids would stack to far more than they hold: 64 channels of one
        // cell beside one channel of 64 × 64 would make 64 × 64 × 64 values.
        let mut tall = b"SCFM2".to_vec();
        let u32s = |v: &[u32]| v.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        tall.extend(u32s(&[2, 8, 8, 64, 1, 1]));
        tall.extend(std::iter::repeat_n(0u8, 4 * 64));
        tall.extend(u32s(&[1, 64, 64]));
        tall.extend(std::iter::repeat_n(0u8, 4 * 64 * 64));
        std::fs::write(&path, &tall).unwrap();
        assert!(cache.load("hyper").is_none());
        // The old format: C, h, w, rows, columns, values.
        let mut old = b"SCFM1".to_vec();
        for v in [1u32, 2, 2, 8, 8] {
            old.extend_from_slice(&v.to_le_bytes());
        }
        for v in [1f32, 2.0, 3.0, 4.0] {
            old.extend_from_slice(&v.to_le_bytes());
        }
        std::fs::write(&path, &old).unwrap();
        assert!(
            cache.load("hyper").is_none(),
            "a hypercolumn without its coarse part"
        );
        cache.one_output = true;
        let one = cache.load("hyper").unwrap();
        assert_eq!(one.data.as_slice().unwrap(), [1.0, 2.0, 3.0, 4.0]);
        assert!(one.coarse.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A store that cannot be renamed into place (here a directory stands in the
    /// cache file's path) fails and leaves no temp file behind.
    #[test]
    fn a_failed_store_leaves_no_temp_file() {
        let (dir, cache) = empty_cache("fail", true);
        std::fs::create_dir_all(cache.path("blocked").join("inside")).unwrap();
        let fm = FeatureMap::new(ndarray::Array3::zeros((2, 4, 4)), 8, 8);
        assert!(cache.store("blocked", &fm).is_err());
        assert!(cache.load("blocked").is_none());
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["blocked.fm"], "temp file left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A map of several grids is kept as its parts, counted as such, and read back as the
    /// same map to the bit; a map of one grid is kept as it is.
    #[test]
    fn hypercolumns_are_kept_as_their_parts() {
        let mut rng = crate::adapter::Rng::new(2);
        let mut noise = |d| ndarray::Array3::from_shape_fn(d, |_| rng.normal());
        let (coarse, fine) = (noise((3, 4, 5)), noise((2, 8, 10)));
        let fm = std::sync::Arc::new(FeatureMap::stacked(vec![coarse, fine], 32, 40));
        assert_eq!(fm.data.len(), 5 * 80);
        let mut slots = Slots::default();
        slots.insert_ready("h", Kept::of(fm.clone()), usize::MAX);
        assert_eq!(
            slots.bytes,
            (3 * 20 + 2 * 80) * 4,
            "the parts, not the stacked map"
        );
        let Some(Slot::Ready(kept)) = slots.map.get("h") else {
            panic!("not kept");
        };
        let back = kept.map();
        assert!(crate::same_bits(&back.data, &fm.data));
        assert_eq!(back.coarse.len(), 1);
        assert_eq!(back.coarse[0].first, fm.coarse[0].first);
        assert!(crate::same_bits(&back.coarse[0].map, &fm.coarse[0].map));
        assert_eq!((back.image_rows, back.image_columns), (32, 40));
        let one = map(2);
        slots.insert_ready("one", Kept::of(one.clone()), usize::MAX);
        let Some(Slot::Ready(kept)) = slots.map.get("one") else {
            panic!("not kept");
        };
        assert!(
            std::sync::Arc::ptr_eq(&kept.map(), &one),
            "a one-grid map is shared"
        );
    }

    /// The store is bounded by bytes: small maps stay many, large ones few, the newest
    /// always, and forgetting one gives its bytes back.
    #[test]
    fn ready_maps_are_bounded_by_size() {
        let one = 16 * 16 * 4;
        let mut slots = Slots::default();
        for i in 0..10 {
            slots.insert_ready(&format!("small{i}"), Kept::of(map(1)), 8 * one);
        }
        assert_eq!(slots.order.len(), 8);
        assert_eq!(slots.bytes, 8 * one);
        assert!(!slots.map.contains_key("small0") && !slots.map.contains_key("small1"));
        slots.insert_ready("large", Kept::of(map(6)), 8 * one);
        assert_eq!(slots.order, ["small8", "small9", "large"]);
        assert_eq!(slots.bytes, 8 * one);
        slots.insert_ready("huge", Kept::of(map(20)), 8 * one);
        assert_eq!(
            slots.order,
            ["huge"],
            "the newest stays even alone over the bound"
        );
        slots.insert_ready("huge", Kept::of(map(20)), 8 * one);
        assert_eq!(
            (slots.order.len(), slots.bytes),
            (1, 20 * one),
            "stored again, counted once"
        );
        slots.remove_ready("huge");
        assert_eq!((slots.order.len(), slots.bytes, slots.map.len()), (0, 0, 0));
    }
}
