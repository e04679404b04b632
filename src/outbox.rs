//! Results on their way out: a persistent queue per destination and the sender that
//! drains it. A result is on disk (fsynced) before anything is sent, is sent with
//! C-STORE, and is deleted only after the destination answered success; failures are
//! retried with exponential back-off, across restarts. A ledger of what was delivered
//! keeps a series that is analysed again after a crash from being delivered twice.
//!
//! Layout: `<outbox>/<destination>/<name>.dcm` (pending), `<outbox>/<destination>/failed/`
//! (refused too often), `<outbox>/sent.log` (`<unix seconds> <destination>/<name>` lines).

use crate::config::OutboxConfig;
use crate::rules::Destination;
use crate::scu::{self, Outgoing, Peer};
use crossbeam_channel::Receiver;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
#[error("outbox {path}: {source}")]
pub struct OutboxError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

fn err(path: &Path) -> impl FnOnce(std::io::Error) -> OutboxError + '_ {
    move |source| OutboxError {
        path: path.to_path_buf(),
        source,
    }
}

/// Ledger entries older than this are dropped at start: a series is not re-sent after
/// so long anyway (the spool retention has removed it).
const LEDGER_KEEP: Duration = Duration::from_secs(60 * 24 * 3600);
/// Instances sent on one association.
const BATCH: usize = 16;

pub struct Outbox {
    root: PathBuf,
    sent: Mutex<HashSet<String>>,
}

/// Writes `bytes` to `path` so that after return it survives a crash or power cut:
/// temp file, fsync, rename, fsync of the directory.
pub fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), OutboxError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err(dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("result")
    ));
    let mut f = File::create(&tmp).map_err(err(&tmp))?;
    f.write_all(bytes).map_err(err(&tmp))?;
    f.sync_all().map_err(err(&tmp))?;
    fs::rename(&tmp, path).map_err(err(path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(err(dir))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Outbox {
    pub fn open(root: &Path) -> Result<Outbox, OutboxError> {
        fs::create_dir_all(root).map_err(err(root))?;
        let ledger = root.join("sent.log");
        let text = match fs::read_to_string(&ledger) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(err(&ledger)(e)),
        };
        let oldest = unix_now().saturating_sub(LEDGER_KEEP.as_secs());
        let mut kept = String::new();
        let mut sent = HashSet::new();
        // A torn last line (crash while appending) does not parse and is dropped.
        for line in text.lines() {
            let Some((t, name)) = line.split_once(' ') else {
                continue;
            };
            if t.parse::<u64>().is_ok_and(|t| t >= oldest) && !name.is_empty() {
                sent.insert(name.to_string());
                kept.push_str(line);
                kept.push('\n');
            }
        }
        if kept.len() != text.len() {
            write_durable(&ledger, kept.as_bytes())?;
        }
        Ok(Outbox {
            root: root.to_path_buf(),
            sent: Mutex::new(sent),
        })
    }

    fn dir(&self, destination: &str) -> PathBuf {
        self.root.join(destination)
    }

    fn sent_set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.sent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a result for a destination. Returns false when the same name is already
    /// queued or was delivered (the series was analysed again after a restart).
    pub fn put(&self, destination: &str, name: &str, bytes: &[u8]) -> Result<bool, OutboxError> {
        let path = self.dir(destination).join(name);
        if path.exists() || self.sent_set().contains(&format!("{destination}/{name}")) {
            return Ok(false);
        }
        write_durable(&path, bytes)?;
        Ok(true)
    }

    /// Pending items of a destination, oldest first.
    pub fn pending(&self, destination: &str) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(self.dir(destination)) else {
            return Vec::new();
        };
        let mut items: Vec<(SystemTime, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "dcm"))
            .map(|p| {
                let t = fs::metadata(&p)
                    .and_then(|m| m.modified())
                    .unwrap_or(UNIX_EPOCH);
                (t, p)
            })
            .collect();
        items.sort();
        items.into_iter().map(|(_, p)| p).collect()
    }

    /// Pending items over all destinations.
    pub fn depth(&self, destinations: &[Destination]) -> usize {
        destinations
            .iter()
            .map(|d| self.pending(&d.name).len())
            .sum()
    }

    /// Records a delivery in the ledger (synced), then removes the item.
    pub fn delivered(&self, destination: &str, item: &Path) -> Result<(), OutboxError> {
        let name = item
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let entry = format!("{destination}/{name}");
        let ledger = self.root.join("sent.log");
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&ledger)
            .map_err(err(&ledger))?;
        f.write_all(format!("{} {entry}\n", unix_now()).as_bytes())
            .map_err(err(&ledger))?;
        f.sync_data().map_err(err(&ledger))?;
        self.sent_set().insert(entry);
        fs::remove_file(item).map_err(err(item))?;
        let dir = self.dir(destination);
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(err(&dir))
    }

    /// Moves an item the destination keeps refusing out of the queue.
    pub fn park(&self, destination: &str, item: &Path) -> Result<PathBuf, OutboxError> {
        let failed = self.dir(destination).join("failed");
        fs::create_dir_all(&failed).map_err(err(&failed))?;
        let to = failed.join(item.file_name().unwrap_or_default());
        fs::rename(item, &to).map_err(err(item))?;
        Ok(to)
    }
}

/// Whether a C-STORE status means the destination has the instance (success, or a
/// warning: coercion, elements discarded, data set does not match SOP class).
pub fn is_success(status: u16) -> bool {
    status == 0x0000 || status & 0xF000 == 0xB000 || status == 0x0107 || status == 0x0116
}

struct Schedule {
    next_try: Instant,
    wait: Duration,
    /// Failed attempts since the last success (for the log).
    failures: u32,
}

/// Drains the outbox until `stop` is set: every destination in turn, due items in
/// batches on one association, back-off per destination after a failure. `wake` is
/// signalled when something new is queued.
pub fn run_sender(
    outbox: Arc<Outbox>,
    destinations: Vec<Destination>,
    our_ae_title: String,
    config: OutboxConfig,
    wake: Receiver<()>,
    stop: Arc<AtomicBool>,
) {
    let initial = Duration::from_secs(config.retry_initial_s);
    let max = Duration::from_secs(config.retry_max_s);
    let mut schedules: HashMap<String, Schedule> = destinations
        .iter()
        .map(|d| {
            (
                d.name.clone(),
                Schedule {
                    next_try: Instant::now(),
                    wait: initial,
                    failures: 0,
                },
            )
        })
        .collect();
    let mut refusals: HashMap<PathBuf, u32> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        for d in &destinations {
            let Some(s) = schedules.get_mut(&d.name) else {
                continue;
            };
            if Instant::now() < s.next_try {
                continue;
            }
            let pending = outbox.pending(&d.name);
            if pending.is_empty() {
                continue;
            }
            let peer = Peer {
                host: d.host.clone(),
                port: d.port,
                called_ae_title: d.ae_title.clone(),
                calling_ae_title: d.calling_ae_title.clone().unwrap_or(our_ae_title.clone()),
                timeout: Duration::from_secs(d.timeout_s),
            };
            let ok = send_batch(
                &outbox,
                d,
                &peer,
                &pending,
                &mut refusals,
                config.max_refusals,
            );
            if ok {
                if s.failures > 0 {
                    log::info!(
                        "send: {} reachable again after {} failed attempts",
                        d.name,
                        s.failures
                    );
                }
                *s = Schedule {
                    next_try: Instant::now(),
                    wait: initial,
                    failures: 0,
                };
            } else {
                s.failures += 1;
                crate::metrics::inc(&crate::metrics::METRICS.send_failures);
                s.next_try = Instant::now() + s.wait;
                log::warn!(
                    "send: {}: {} results waiting; next try in {} s",
                    d.name,
                    outbox.pending(&d.name).len(),
                    s.wait.as_secs()
                );
                s.wait = (s.wait * 2).min(max);
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
        }
        let now = Instant::now();
        let due = schedules
            .iter()
            .filter(|(name, _)| !outbox.pending(name).is_empty())
            .map(|(_, s)| s.next_try.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let _ = wake.recv_timeout(due);
    }
}

/// Sends up to `BATCH` items; true when the destination took every one it answered.
fn send_batch(
    outbox: &Outbox,
    d: &Destination,
    peer: &Peer,
    pending: &[PathBuf],
    refusals: &mut HashMap<PathBuf, u32>,
    max_refusals: u32,
) -> bool {
    let mut items = Vec::new();
    let mut paths = Vec::new();
    for p in pending.iter().take(BATCH) {
        match Outgoing::from_file(p) {
            Ok(o) => {
                items.push(o);
                paths.push(p.clone());
            }
            Err(e) => {
                log::error!("send: {}: unreadable result, parked: {e}", d.name);
                let _ = outbox.park(&d.name, p);
            }
        }
    }
    if items.is_empty() {
        return true;
    }
    let results = match scu::store(peer, &items) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("send: {}: {e}", d.name);
            return false;
        }
    };
    let mut all_ok = true;
    for ((r, item), path) in results.iter().zip(&items).zip(&paths) {
        match r.status {
            Some(s) if is_success(s) => {
                crate::metrics::inc(&crate::metrics::METRICS.results_sent);
                crate::metrics::METRICS
                    .last_send_unix
                    .store(unix_now(), Ordering::Relaxed);
                if let Err(e) = outbox.delivered(&d.name, path) {
                    log::error!("send: {}: delivered but cannot record it: {e}", d.name);
                }
                refusals.remove(path);
                log::info!(
                    "send: {} accepted {} (status {s:04X})",
                    d.name,
                    item.sop_instance_uid
                );
            }
            status => {
                all_ok = false;
                let n = refusals.entry(path.clone()).or_insert(0);
                *n += 1;
                let what = match status {
                    Some(s) => format!("status {s:04X}"),
                    None => "no presentation context accepted".into(),
                };
                if *n >= max_refusals {
                    refusals.remove(path);
                    crate::metrics::inc(&crate::metrics::METRICS.results_parked);
                    match outbox.park(&d.name, path) {
                        Ok(to) => log::error!(
                            "send: {} refused {} {max_refusals} times ({what}{}); moved to {}",
                            d.name,
                            item.sop_instance_uid,
                            r.error_comment
                                .as_deref()
                                .map(|c| format!(": {c}"))
                                .unwrap_or_default(),
                            to.display()
                        ),
                        Err(e) => {
                            log::error!("send: {}: cannot park a refused result: {e}", d.name)
                        }
                    }
                } else {
                    log::warn!(
                        "send: {} refused {} ({what}), attempt {n} of {max_refusals}",
                        d.name,
                        item.sop_instance_uid
                    );
                }
            }
        }
    }
    all_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_and_delivered_items_are_not_queued_again_even_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(dir.path()).unwrap();
        assert!(ob.put("pacs", "a.sr.dcm", b"x").unwrap());
        assert!(!ob.put("pacs", "a.sr.dcm", b"x").unwrap(), "already queued");
        assert!(
            ob.put("other", "a.sr.dcm", b"x").unwrap(),
            "per destination"
        );
        let p = ob.pending("pacs");
        assert_eq!(p.len(), 1);
        ob.delivered("pacs", &p[0]).unwrap();
        assert!(ob.pending("pacs").is_empty());
        assert!(
            !ob.put("pacs", "a.sr.dcm", b"x").unwrap(),
            "already delivered"
        );
        // A torn ledger line from a crash is ignored.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("sent.log"))
            .unwrap();
        f.write_all(b"17").unwrap();
        let ob = Outbox::open(dir.path()).unwrap();
        assert!(!ob.put("pacs", "a.sr.dcm", b"x").unwrap());
        assert_eq!(ob.pending("other").len(), 1);
        let parked = ob.park("other", &ob.pending("other")[0]).unwrap();
        assert!(parked.exists() && ob.pending("other").is_empty());
    }

    #[test]
    fn success_statuses() {
        assert!(is_success(0x0000) && is_success(0xB000) && is_success(0xB007));
        assert!(!is_success(0xA700) && !is_success(0xC000) && !is_success(0x0122));
    }
}
