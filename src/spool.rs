//! The spool: every acknowledged instance as a DICOM Part-10 file, made durable (temp
//! file, fsync, atomic rename, directory fsync) before the SCP answers success.
//!
//! With the journal on (the default), "durable" means one record in the write-ahead
//! journal (`journal` module); the instance's own file is written right after the
//! acknowledgement, made durable by the next checkpoint, and rewritten from the journal
//! after a crash. Instances larger than a journal segment take the direct path.
//!
//! Layout: `<root>/<study uid>/<series uid>/<sop instance uid>.dcm`; partial writes live in
//! `<root>/.tmp/` and are removed at start; the journal lives in `<root>/.journal/`. A series that downstream stages have finished
//! with carries a `.done` marker; storing into it removes the marker first, so a crash
//! can never leave a new instance inside a series that looks finished.

use crate::config::{OnDuplicate, SpoolConfig};
use crate::instance::InstanceMeta;
use crate::journal::{Journal, Ticket};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTable, OpenFileOptions};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

const TMP_DIR: &str = ".tmp";
const JOURNAL_DIR: &str = ".journal";
const DONE_MARKER: &str = ".done";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full: {used} bytes used, {incoming} incoming, limit {limit}")]
    OverQuota {
        used: u64,
        incoming: u64,
        limit: u64,
    },
    #[error("file system of {path} has {available} bytes free, below the reserve of {reserve}")]
    DiskFull {
        path: PathBuf,
        available: u64,
        reserve: u64,
    },
    #[error("spool I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode file meta information: {0}")]
    Meta(String),
}

impl SpoolError {
    /// Out of resources (quota, disk, or the OS saying so) rather than a fault of ours.
    pub fn is_out_of_resources(&self) -> bool {
        match self {
            SpoolError::OverQuota { .. } | SpoolError::DiskFull { .. } => true,
            SpoolError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(code) if code == libc::ENOSPC || code == libc::EDQUOT
            ),
            SpoolError::Meta(_) => false,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What happened to an instance handed to [`Spool::store`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    Stored,
    /// Same SOP Instance UID was there; the new copy replaced it.
    Replaced,
    /// Same SOP Instance UID was there; configuration says keep the first copy.
    DuplicateIgnored,
}

/// An instance that is durable; hand it to [`Spool::finish`] after acknowledging it.
#[must_use]
pub struct Stored {
    pub outcome: StoreOutcome,
    pub path: PathBuf,
    /// Journalled, its own file still to write: the ticket and the file meta bytes.
    pending: Option<(Ticket, Vec<u8>)>,
}

/// An instance safe on disk, as handed to series assembly.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub path: PathBuf,
    pub meta: InstanceMeta,
}

pub struct Spool {
    root: PathBuf,
    config: SpoolConfig,
    used: AtomicU64,
    /// Serialises quota reservations so concurrent associations cannot overshoot.
    quota: Mutex<()>,
    tmp_counter: AtomicU64,
    journal: Option<Journal>,
    /// Instances acknowledged whose files are not written yet: (how many, latest size).
    /// Duplicate detection must see them, or a quick re-send would look new.
    inflight: Mutex<HashMap<PathBuf, (usize, u64)>>,
}

impl Spool {
    /// Opens (creating if needed) the spool, removes partial writes of a previous run and
    /// measures what is stored.
    pub fn open(root: &Path, config: SpoolConfig) -> Result<Spool, SpoolError> {
        let tmp = root.join(TMP_DIR);
        create_dir_durable(&tmp)?;
        for entry in fs::read_dir(&tmp).map_err(io(&tmp))? {
            let entry = entry.map_err(io(&tmp))?;
            let p = entry.path();
            log::warn!(
                "spool: removing partial write {} left by a previous run",
                p.display()
            );
            fs::remove_file(&p).map_err(io(&p))?;
        }
        let mut spool = Spool {
            root: root.to_path_buf(),
            config,
            used: AtomicU64::new(0),
            quota: Mutex::new(()),
            tmp_counter: AtomicU64::new(0),
            journal: None,
            inflight: Mutex::new(HashMap::new()),
        };
        if spool.config.journal_segment_mib > 0 {
            let dir = root.join(JOURNAL_DIR);
            let (journal, records) =
                Journal::open(&dir, spool.config.journal_segment_mib << 20).map_err(io(&dir))?;
            if !records.is_empty() {
                log::warn!(
                    "spool: rewriting {} journalled instances a previous run may not have finished",
                    records.len()
                );
            }
            for r in records {
                let target = root.join(&r.path);
                if r.path
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == "..")
                {
                    log::error!(
                        "spool: journal record with unsafe path {:?} skipped",
                        r.path
                    );
                    continue;
                }
                spool.write_file(&target, &[&r.data], true)?;
            }
            journal.reset_all().map_err(io(&dir))?;
            journal.preallocate(2).map_err(io(&dir))?;
            spool.journal = Some(journal);
        }
        let mut used = 0;
        for (_, _, files) in series_dirs(root)? {
            for f in files {
                used += fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
            }
        }
        spool.used = AtomicU64::new(used);
        Ok(spool)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn series_dir(&self, study_uid: &str, series_uid: &str) -> PathBuf {
        self.root.join(study_uid).join(series_uid)
    }

    fn instance_path(&self, meta: &InstanceMeta) -> PathBuf {
        self.series_dir(&meta.study_instance_uid, &meta.series_instance_uid)
            .join(format!("{}.dcm", meta.sop_instance_uid))
    }

    /// Makes `file_meta` + the data set, exactly as received, durable. Acknowledge the
    /// instance after this returns, then call [`Spool::finish`].
    pub fn store(
        &self,
        meta: &InstanceMeta,
        file_meta: &FileMetaTable,
        dataset: &[u8],
    ) -> Result<Stored, SpoolError> {
        let target = self.instance_path(meta);
        let mut header = Vec::with_capacity(512);
        header.extend_from_slice(&[0u8; 128]);
        header.extend_from_slice(b"DICM");
        file_meta
            .write(&mut header)
            .map_err(|e| SpoolError::Meta(e.to_string()))?;
        let size = (header.len() + dataset.len()) as u64;

        // Check and register under one lock, so two copies at once cannot both look new.
        let existing = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            let existing = inflight
                .get(&target)
                .map(|e| e.1)
                .or_else(|| fs::metadata(&target).ok().map(|m| m.len()));
            if existing.is_some() && self.config.on_duplicate == OnDuplicate::Ignore {
                return Ok(Stored {
                    outcome: StoreOutcome::DuplicateIgnored,
                    path: target,
                    pending: None,
                });
            }
            let e = inflight.entry(target.clone()).or_insert((0, 0));
            *e = (e.0 + 1, size);
            existing
        };
        if let Err(e) = self.reserve(size) {
            self.settle(&target);
            return Err(e);
        }
        let result = self.make_durable(&target, meta, &header, dataset);
        match (&result, existing) {
            (Ok(_), Some(old)) => {
                self.used
                    .fetch_sub(old.min(self.used_bytes()), Ordering::Relaxed);
            }
            (Ok(_), None) => {}
            (Err(_), _) => {
                self.used.fetch_sub(size, Ordering::Relaxed);
            }
        }
        let ticket = match result {
            Ok(t) => t,
            Err(e) => {
                self.settle(&target);
                return Err(e);
            }
        };
        if ticket.is_none() {
            self.settle(&target); // written directly, nothing in flight
        }
        let outcome = if existing.is_some() {
            StoreOutcome::Replaced
        } else {
            StoreOutcome::Stored
        };
        Ok(Stored {
            outcome,
            path: target,
            pending: ticket.map(|t| (t, header)),
        })
    }

    /// One in-flight copy of `target` is written (or was refused).
    fn settle(&self, target: &Path) {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = inflight.get_mut(target) {
            e.0 -= 1;
            if e.0 == 0 {
                inflight.remove(target);
            }
        }
    }

    fn make_durable(
        &self,
        target: &Path,
        meta: &InstanceMeta,
        header: &[u8],
        dataset: &[u8],
    ) -> Result<Option<Ticket>, SpoolError> {
        let series_dir = target.parent().unwrap_or(&self.root);
        create_dir_durable(series_dir)?;
        // The series is unfinished again before anything of it is acknowledged.
        let marker = series_dir.join(DONE_MARKER);
        if marker.exists() {
            fs::remove_file(&marker).map_err(io(&marker))?;
            sync_dir(series_dir)?;
        }
        if let Some(journal) = &self.journal {
            let rel = format!(
                "{}/{}/{}.dcm",
                meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid
            );
            let dir = self.root.join(JOURNAL_DIR);
            if let Some(ticket) = journal.append(&rel, &[header, dataset]).map_err(io(&dir))? {
                return Ok(Some(ticket));
            }
        }
        self.write_file(target, &[header, dataset], true)?;
        Ok(None)
    }

    /// Writes the file of a journalled instance (after it was acknowledged) and returns
    /// its path. On error the journal keeps the record, and the next start rewrites it.
    pub fn finish(&self, stored: Stored, dataset: &[u8]) -> Result<PathBuf, SpoolError> {
        if let Some((ticket, header)) = stored.pending {
            self.write_file(&stored.path, &[&header, dataset], false)?;
            self.settle(&stored.path);
            if let Some(j) = &self.journal {
                j.finished(ticket);
            }
        }
        Ok(stored.path)
    }

    /// Makes the files written since the last checkpoint durable and recycles journal
    /// space. Cheap when nothing happened.
    pub fn checkpoint(&self) -> Result<usize, SpoolError> {
        match &self.journal {
            Some(j) => j.checkpoint(&self.root).map_err(io(&self.root)),
            None => Ok(0),
        }
    }

    fn reserve(&self, size: u64) -> Result<(), SpoolError> {
        let _guard = self.quota.lock().unwrap_or_else(|p| p.into_inner());
        let used = self.used_bytes();
        if used + size > self.config.max_bytes {
            return Err(SpoolError::OverQuota {
                used,
                incoming: size,
                limit: self.config.max_bytes,
            });
        }
        let available = available_bytes(&self.root)?;
        if available < size.saturating_add(self.config.min_free_bytes) {
            return Err(SpoolError::DiskFull {
                path: self.root.clone(),
                available,
                reserve: self.config.min_free_bytes,
            });
        }
        self.used.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    /// Temp file, then rename over `target`; with `durable`, fsync the file before and
    /// the directory after the rename.
    fn write_file(&self, target: &Path, parts: &[&[u8]], durable: bool) -> Result<(), SpoolError> {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = self
            .root
            .join(TMP_DIR)
            .join(format!("{}-{n}-{name}.part", std::process::id()));
        let written = (|| {
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(io(&tmp))?;
            let mut w = BufWriter::with_capacity(1 << 16, file);
            for p in parts {
                w.write_all(p).map_err(io(&tmp))?;
            }
            let file = w.into_inner().map_err(|e| SpoolError::Io {
                path: tmp.clone(),
                source: e.into_error(),
            })?;
            if durable {
                file.sync_all().map_err(io(&tmp))?;
            }
            Ok(())
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let dir = target.parent().unwrap_or(&self.root);
        let placed = (|| {
            create_dir_durable(dir)?;
            fs::rename(&tmp, target).map_err(io(target))?;
            if durable {
                sync_dir(dir)?;
            }
            Ok(())
        })();
        if placed.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        placed
    }

    /// Marks a series as finished by the downstream stages; it is then not recovered at
    /// start and becomes subject to retention.
    pub fn mark_done(&self, study_uid: &str, series_uid: &str) -> Result<(), SpoolError> {
        let dir = self.series_dir(study_uid, series_uid);
        let marker = dir.join(DONE_MARKER);
        File::create(&marker)
            .and_then(|f| f.sync_all())
            .map_err(io(&marker))?;
        sync_dir(&dir)
    }

    /// Every instance of every series not marked done: what a previous run acknowledged
    /// but did not finish. Unreadable files are logged and skipped, never deleted.
    pub fn recover(&self) -> Result<Vec<Received>, SpoolError> {
        let mut out = Vec::new();
        for (dir, done, files) in series_dirs(&self.root)? {
            if done {
                continue;
            }
            for path in files {
                match read_meta(&path) {
                    Ok(meta) => out.push(Received { path, meta }),
                    Err(e) => log::error!("spool: cannot recover {}: {e}", path.display()),
                }
            }
            log::debug!("spool: recovered series directory {}", dir.display());
        }
        Ok(out)
    }

    /// Deletes finished series older than the retention period. Returns how many.
    pub fn sweep(&self) -> Result<usize, SpoolError> {
        if self.config.retention_hours == 0 {
            return Ok(0);
        }
        let max_age = Duration::from_secs(self.config.retention_hours * 3600);
        let now = SystemTime::now();
        let mut removed = 0;
        for (dir, done, files) in series_dirs(&self.root)? {
            let marker = dir.join(DONE_MARKER);
            let age = fs::metadata(&marker)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok());
            if !done || age.is_none_or(|a| a < max_age) {
                continue;
            }
            let bytes: u64 = files
                .iter()
                .filter_map(|f| fs::metadata(f).ok())
                .map(|m| m.len())
                .sum();
            fs::remove_dir_all(&dir).map_err(io(&dir))?;
            self.used
                .fetch_sub(bytes.min(self.used_bytes()), Ordering::Relaxed);
            if let Some(study) = dir.parent() {
                // Only succeeds when the study has no other series left.
                let _ = fs::remove_dir(study);
            }
            removed += 1;
        }
        Ok(removed)
    }
}

/// Reads the header of a spooled file (pixel data is not needed to group series).
pub fn read_meta(path: &Path) -> Result<InstanceMeta, String> {
    let obj = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .map_err(|e| e.to_string())?;
    InstanceMeta::from_object(&obj).map_err(|e| e.to_string())
}

/// (series dir, done?, instance files) for every series directory under `root`.
fn series_dirs(root: &Path) -> Result<Vec<(PathBuf, bool, Vec<PathBuf>)>, SpoolError> {
    let mut out = Vec::new();
    for study in fs::read_dir(root).map_err(io(root))? {
        let study = study.map_err(io(root))?.path();
        // .tmp, .journal: not studies.
        if !study.is_dir()
            || study
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        for series in fs::read_dir(&study).map_err(io(&study))? {
            let series = series.map_err(io(&study))?.path();
            if !series.is_dir() {
                continue;
            }
            let mut files = Vec::new();
            for f in fs::read_dir(&series).map_err(io(&series))? {
                let f = f.map_err(io(&series))?.path();
                if f.extension().is_some_and(|e| e == "dcm") {
                    files.push(f);
                }
            }
            files.sort();
            let done = series.join(DONE_MARKER).exists();
            out.push((series, done, files));
        }
    }
    out.sort();
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Creates `dir` and any missing parents, fsyncing each parent that gained an entry so
/// the new directories survive a power cut.
fn create_dir_durable(dir: &Path) -> Result<(), SpoolError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() {
            create_dir_durable(parent)?;
        }
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(io(dir)(e)),
    }
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => Ok(()),
    }
}

fn available_bytes(path: &Path) -> Result<u64, SpoolError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| SpoolError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` is a properly sized out-param.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io(path)(std::io::Error::last_os_error()));
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{write_series, SynthSpec};
    use dicom_object::open_file;

    fn config() -> SpoolConfig {
        SpoolConfig {
            max_bytes: 1 << 30,
            min_free_bytes: 0,
            on_duplicate: OnDuplicate::Replace,
            retention_hours: 1,
            journal_segment_mib: 1,
        }
    }

    /// Splits a Part-10 file the way the SCP receives it: meta + raw data set.
    fn received_parts(path: &Path) -> (InstanceMeta, FileMetaTable, Vec<u8>) {
        let obj = open_file(path).unwrap();
        let meta = InstanceMeta::from_object(&obj).unwrap();
        let bytes = fs::read(path).unwrap();
        let start = 132 + 12 + obj.meta().information_group_length as usize;
        (meta, obj.meta().clone(), bytes[start..].to_vec())
    }

    #[test]
    fn store_recover_done_and_retention() {
        let tmp = tempfile::tempdir().unwrap();
        let src = write_series(
            &tmp.path().join("src"),
            &SynthSpec {
                slices: 3,
                ..Default::default()
            },
        )
        .unwrap();
        let root = tmp.path().join("spool");
        let spool = Spool::open(&root, config()).unwrap();
        for f in &src.files {
            let (meta, fm, ds) = received_parts(f);
            let stored = spool.store(&meta, &fm, &ds).unwrap();
            assert_eq!(stored.outcome, StoreOutcome::Stored);
            let path = spool.finish(stored, &ds).unwrap();
            assert_eq!(read_meta(&path).unwrap(), meta);
        }
        let total: u64 = series_dirs(&root).unwrap()[0]
            .2
            .iter()
            .map(|f| fs::metadata(f).unwrap().len())
            .sum();
        assert_eq!(spool.used_bytes(), total);

        // A partial write of a crashed run is removed at open; the stored ones recover.
        fs::write(root.join(TMP_DIR).join("1-2.3-0.part"), b"half").unwrap();
        let spool = Spool::open(&root, config()).unwrap();
        assert_eq!(spool.used_bytes(), total);
        assert!(fs::read_dir(root.join(TMP_DIR)).unwrap().next().is_none());
        assert_eq!(spool.recover().unwrap().len(), 3);

        // Done series are not recovered; retention removes them once old enough.
        spool
            .mark_done(&src.study_instance_uid, &src.series_instance_uid)
            .unwrap();
        assert!(spool.recover().unwrap().is_empty());
        assert_eq!(spool.sweep().unwrap(), 0, "too young");
        let marker = spool
            .series_dir(&src.study_instance_uid, &src.series_instance_uid)
            .join(DONE_MARKER);
        let old = SystemTime::now() - Duration::from_secs(2 * 3600);
        File::options()
            .write(true)
            .open(&marker)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(spool.sweep().unwrap(), 1);
        assert_eq!(spool.used_bytes(), 0);
        assert!(!root.join(&src.study_instance_uid).exists());
    }

    #[test]
    fn storing_into_a_done_series_reopens_it() {
        let tmp = tempfile::tempdir().unwrap();
        let src = write_series(
            &tmp.path().join("src"),
            &SynthSpec {
                slices: 2,
                ..Default::default()
            },
        )
        .unwrap();
        let spool = Spool::open(&tmp.path().join("spool"), config()).unwrap();
        let (m0, f0, d0) = received_parts(&src.files[0]);
        let s0 = spool.store(&m0, &f0, &d0).unwrap();
        spool.finish(s0, &d0).unwrap();
        spool
            .mark_done(&m0.study_instance_uid, &m0.series_instance_uid)
            .unwrap();
        let (m1, f1, d1) = received_parts(&src.files[1]);
        let s1 = spool.store(&m1, &f1, &d1).unwrap();
        spool.finish(s1, &d1).unwrap();
        assert_eq!(
            spool.recover().unwrap().len(),
            2,
            "the whole series is unfinished again"
        );
    }

    /// A spool opened with `config` and one synthetic instance, split as received.
    fn one_instance(
        config: SpoolConfig,
    ) -> (
        tempfile::TempDir,
        Spool,
        (InstanceMeta, FileMetaTable, Vec<u8>),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let src = write_series(
            &tmp.path().join("src"),
            &SynthSpec {
                slices: 1,
                ..Default::default()
            },
        )
        .unwrap();
        let spool = Spool::open(&tmp.path().join("spool"), config).unwrap();
        let parts = received_parts(&src.files[0]);
        (tmp, spool, parts)
    }

    #[test]
    fn quota_is_checked_before_writing() {
        let (_tmp, spool, (m, f, d)) = one_instance(SpoolConfig {
            max_bytes: 1000,
            ..config()
        });
        let Err(err) = spool.store(&m, &f, &d) else {
            panic!("stored over quota")
        };
        assert!(err.is_out_of_resources(), "{err}");
        assert_eq!(spool.used_bytes(), 0);
        assert!(spool.recover().unwrap().is_empty());
    }

    #[test]
    fn acknowledged_but_unfinished_instances_are_rewritten_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let src = write_series(
            &tmp.path().join("src"),
            &SynthSpec {
                slices: 3,
                ..Default::default()
            },
        )
        .unwrap();
        let root = tmp.path().join("spool");
        {
            let spool = Spool::open(&root, config()).unwrap();
            for f in &src.files {
                let (m, fm, d) = received_parts(f);
                // Durable in the journal; the process dies before `finish`.
                let stored = spool.store(&m, &fm, &d).unwrap();
                assert!(stored.pending.is_some(), "132 KB fits a 1 MiB segment");
                std::mem::forget(stored);
            }
            assert!(
                spool.recover().unwrap().is_empty(),
                "no instance file written yet"
            );
        }
        let spool = Spool::open(&root, config()).unwrap();
        let recovered = spool.recover().unwrap();
        assert_eq!(recovered.len(), 3);
        for f in &src.files {
            let (m, _, _) = received_parts(f);
            let path = spool.instance_path(&m);
            let original = fs::read(f).unwrap();
            let copy = fs::read(&path).unwrap();
            // Same data set bytes; the file meta is ours in both.
            let ds_start = |b: &[u8]| 132 + 12 + le32(&b[140..144]) as usize;
            assert_eq!(&original[ds_start(&original)..], &copy[ds_start(&copy)..]);
        }
        // A third start finds the journal reset: nothing to rewrite.
        let (_, records) = Journal::open(&root.join(JOURNAL_DIR), 1 << 20).unwrap();
        assert!(records.is_empty());
    }

    fn le32(b: &[u8]) -> u32 {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    #[test]
    fn without_journal_every_file_is_synced_directly() {
        let (tmp, spool, (m, fm, d)) = one_instance(SpoolConfig {
            journal_segment_mib: 0,
            ..config()
        });
        let stored = spool.store(&m, &fm, &d).unwrap();
        assert!(stored.pending.is_none());
        assert!(stored.path.exists(), "written before store returns");
        assert!(!tmp.path().join("spool").join(JOURNAL_DIR).exists());
    }
}
