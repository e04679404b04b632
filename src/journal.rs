//! The spool's write-ahead journal: makes an instance durable with one positional write
//! and one `fdatasync` into a pre-allocated segment file, so the SCP can acknowledge
//! sooner than a new file plus its directory could be synced. The instance's own file is
//! written after the acknowledgement; a checkpoint (`syncfs`) later makes those files
//! durable and recycles the segments. After a crash, every journalled record whose file
//! may not have reached the disk is written again from the journal.
//!
//! Segment layout: a 16-byte header (`SCOUTWAL`, generation u64 LE) and then records:
//! magic u32, generation u64, sequence u64, path length u32, data length u64, CRC-32 of
//! path and data (u32); then the path (relative to the spool root) and the data. A record
//! counts only if its generation is the segment's and its CRC matches, so a torn write
//! (never acknowledged) and records of an earlier generation are ignored.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const SEGMENT_MAGIC: &[u8; 8] = b"SCOUTWAL";
const SEGMENT_HEADER: u64 = 16;
const RECORD_MAGIC: u32 = 0x5343_524D;
const RECORD_HEADER: u64 = 4 + 8 + 8 + 4 + 8 + 4;

/// A record found at start-up, to be written again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub path: String,
    pub data: Vec<u8>,
}

struct Segment {
    file: File,
    path: PathBuf,
    generation: u64,
    used: u64,
    /// Records appended whose instance file is not written yet.
    unfinished: Arc<AtomicUsize>,
}

/// Proof that a record is durable; hand it back through [`Journal::finished`] once the
/// instance's own file is written.
#[must_use]
pub struct Ticket {
    unfinished: Arc<AtomicUsize>,
}

pub struct Journal {
    dir: PathBuf,
    segment_size: u64,
    idle: Mutex<Vec<Segment>>,
    seq: AtomicU64,
    generation: AtomicU64,
    created: AtomicU64,
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl Journal {
    /// Opens the journal directory and returns the records of a previous run, oldest
    /// first. The caller writes them durably, then calls [`Journal::reset_all`].
    pub fn open(dir: &Path, segment_size: u64) -> io::Result<(Journal, Vec<Record>)> {
        fs::create_dir_all(dir)?;
        let mut records = Vec::new();
        let mut segments = Vec::new();
        let mut max_generation = 0;
        let mut max_index = 0;
        let mut names: Vec<PathBuf> = fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .collect();
        names.sort();
        for path in names {
            let index = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.strip_prefix("segment-"))
                .and_then(|s| s.parse::<u64>().ok());
            let Some(index) = index else { continue };
            max_index = max_index.max(index + 1);
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let len = file.metadata()?.len();
            let (generation, mut found) = read_segment(&file, len)?;
            max_generation = max_generation.max(generation);
            records.append(&mut found);
            if len == segment_size {
                segments.push(Segment {
                    file,
                    path,
                    generation,
                    used: SEGMENT_HEADER,
                    unfinished: Arc::default(),
                });
            } else {
                // A size from another configuration (or a crash while creating it): its
                // records are recovered above, the file itself is replaced.
                drop(file);
                fs::remove_file(&path)?;
            }
        }
        records.sort_by_key(|r| r.seq);
        let next_seq = records.last().map_or(0, |r| r.seq + 1);
        let journal = Journal {
            dir: dir.to_path_buf(),
            segment_size,
            idle: Mutex::new(segments),
            seq: AtomicU64::new(next_seq),
            generation: AtomicU64::new(max_generation + 1),
            created: AtomicU64::new(max_index),
        };
        Ok((journal, records))
    }

    /// Largest data (path + bytes) one record can hold.
    pub fn capacity(&self) -> u64 {
        self.segment_size
            .saturating_sub(SEGMENT_HEADER + RECORD_HEADER)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Segment>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn create_segment(&self) -> io::Result<Segment> {
        let index = self.created.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("segment-{index:06}.wal"));
        let tmp = path.with_extension("new");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        // Real zeros, not a sparse file: later overwrites then need no block allocation,
        // and fdatasync has no metadata to commit.
        let zeros = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < self.segment_size {
            let n = (self.segment_size - off).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], off)?;
            off += n as u64;
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        write_segment_header(&file, generation)?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        File::open(&self.dir)?.sync_all()?;
        Ok(Segment {
            file,
            path,
            generation,
            used: SEGMENT_HEADER,
            unfinished: Arc::default(),
        })
    }

    /// Ensures `n` idle segments exist, so the first instances do not wait for one.
    pub fn preallocate(&self, n: usize) -> io::Result<()> {
        while self.lock().len() < n {
            let s = self.create_segment()?;
            self.lock().push(s);
        }
        Ok(())
    }

    /// Appends one record and syncs it. `parts` are concatenated as the record's data.
    /// Returns None when the record is larger than a segment can hold.
    pub fn append(&self, path: &str, parts: &[&[u8]]) -> io::Result<Option<Ticket>> {
        let data_len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let need = RECORD_HEADER + path.len() as u64 + data_len;
        if need > self.segment_size - SEGMENT_HEADER {
            return Ok(None);
        }
        let taken = {
            let mut idle = self.lock();
            let pos = idle.iter().position(|s| s.used + need <= self.segment_size);
            pos.map(|i| idle.swap_remove(i))
        };
        let mut seg = match taken {
            Some(s) => s,
            None => self.create_segment()?,
        };
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut crc = crc32fast::Hasher::new();
        crc.update(path.as_bytes());
        for p in parts {
            crc.update(p);
        }
        let mut header = Vec::with_capacity(RECORD_HEADER as usize + path.len());
        header.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        header.extend_from_slice(&seg.generation.to_le_bytes());
        header.extend_from_slice(&seq.to_le_bytes());
        header.extend_from_slice(&(path.len() as u32).to_le_bytes());
        header.extend_from_slice(&data_len.to_le_bytes());
        header.extend_from_slice(&crc.finalize().to_le_bytes());
        header.extend_from_slice(path.as_bytes());
        let written = (|| {
            let mut off = seg.used;
            seg.file.write_all_at(&header, off)?;
            off += header.len() as u64;
            for p in parts {
                seg.file.write_all_at(p, off)?;
                off += p.len() as u64;
            }
            seg.file.sync_data()?;
            Ok::<u64, io::Error>(off)
        })();
        match written {
            Ok(end) => {
                seg.used = end;
                seg.unfinished.fetch_add(1, Ordering::SeqCst);
                let ticket = Ticket {
                    unfinished: seg.unfinished.clone(),
                };
                self.lock().push(seg);
                Ok(Some(ticket))
            }
            Err(e) => {
                // The tail may hold a partial record with a bad CRC; later records go
                // after it, so keep the space and hand the segment back.
                self.lock().push(seg);
                Err(e)
            }
        }
    }

    /// The record's instance file is written (not yet synced; the checkpoint does that).
    pub fn finished(&self, ticket: Ticket) {
        ticket.unfinished.fetch_sub(1, Ordering::SeqCst);
    }

    /// Syncs the file system holding `root` and recycles every used segment whose
    /// records all have their files written. Returns how many were recycled.
    pub fn checkpoint(&self, root: &Path) -> io::Result<usize> {
        let ready: Vec<Segment> = {
            let mut idle = self.lock();
            let (ready, keep): (Vec<Segment>, Vec<Segment>) = idle
                .drain(..)
                .partition(|s| s.used > SEGMENT_HEADER && s.unfinished.load(Ordering::SeqCst) == 0);
            *idle = keep;
            ready
        };
        if ready.is_empty() {
            return Ok(0);
        }
        let synced = syncfs(root);
        let mut recycled = 0;
        for mut seg in ready {
            if synced.is_ok() && seg.unfinished.load(Ordering::SeqCst) == 0 {
                let generation = self.generation.fetch_add(1, Ordering::Relaxed);
                match write_segment_header(&seg.file, generation)
                    .and_then(|()| seg.file.sync_data())
                {
                    Ok(()) => {
                        seg.generation = generation;
                        seg.used = SEGMENT_HEADER;
                        recycled += 1;
                    }
                    // Left as it is: its records stay valid and are rewritten at start.
                    Err(e) => log::error!("journal: cannot recycle {}: {e}", seg.path.display()),
                }
            }
            self.lock().push(seg);
        }
        synced.map(|()| recycled)
    }

    /// After start-up recovery has written every record durably: start all segments anew.
    pub fn reset_all(&self) -> io::Result<()> {
        let mut idle = self.lock();
        for seg in idle.iter_mut() {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            write_segment_header(&seg.file, generation)?;
            seg.file.sync_data()?;
            seg.generation = generation;
            seg.used = SEGMENT_HEADER;
        }
        Ok(())
    }

    #[cfg(test)]
    fn segment_paths(&self) -> Vec<PathBuf> {
        self.lock().iter().map(|s| s.path.clone()).collect()
    }
}

fn write_segment_header(file: &File, generation: u64) -> io::Result<()> {
    let mut h = [0u8; SEGMENT_HEADER as usize];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..].copy_from_slice(&generation.to_le_bytes());
    file.write_all_at(&h, 0)
}

/// (generation, valid records) of one segment.
fn read_segment(file: &File, len: u64) -> io::Result<(u64, Vec<Record>)> {
    let mut out = Vec::new();
    let mut h = [0u8; SEGMENT_HEADER as usize];
    if len < SEGMENT_HEADER || file.read_exact_at(&mut h, 0).is_err() || &h[..8] != SEGMENT_MAGIC {
        return Ok((0, out));
    }
    let generation = le_u64(&h[8..]);
    let mut off = SEGMENT_HEADER;
    let mut rh = [0u8; RECORD_HEADER as usize];
    while off + RECORD_HEADER <= len {
        file.read_exact_at(&mut rh, off)?;
        if le_u32(&rh[0..]) != RECORD_MAGIC || le_u64(&rh[4..]) != generation {
            break;
        }
        let seq = le_u64(&rh[12..]);
        let path_len = le_u32(&rh[20..]) as u64;
        let data_len = le_u64(&rh[24..]);
        let crc = le_u32(&rh[32..]);
        let body = path_len
            .checked_add(data_len)
            .filter(|b| off + RECORD_HEADER + b <= len);
        let Some(body) = body else { break };
        let mut buf = vec![0u8; body as usize];
        file.read_exact_at(&mut buf, off + RECORD_HEADER)?;
        if crc32fast::hash(&buf) != crc {
            break;
        }
        let data = buf.split_off(path_len as usize);
        let Ok(path) = String::from_utf8(buf) else {
            break;
        };
        out.push(Record { seq, path, data });
        off += RECORD_HEADER + body;
    }
    Ok((generation, out))
}

fn syncfs(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = File::open(path)?;
    // SAFETY: a valid open file descriptor for the lifetime of the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 64 * 1024;

    #[test]
    fn records_survive_reopen_until_checkpointed() {
        let tmp = tempfile::tempdir().unwrap();
        let (j, found) = Journal::open(tmp.path(), SIZE).unwrap();
        assert!(found.is_empty());
        let t1 = j
            .append("a/b/1.dcm", &[b"hello ", b"world"])
            .unwrap()
            .unwrap();
        let t2 = j.append("a/b/2.dcm", &[&[7u8; 30_000]]).unwrap().unwrap();
        assert!(
            j.append("big.dcm", &[&vec![0u8; SIZE as usize]])
                .unwrap()
                .is_none(),
            "too big for a segment"
        );
        j.finished(t1);
        // Not checkpointed: a restart finds both records, oldest first.
        let (_, found) = Journal::open(tmp.path(), SIZE).unwrap();
        let names: Vec<&str> = found.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(names, ["a/b/1.dcm", "a/b/2.dcm"]);
        assert_eq!(found[0].data, b"hello world");

        // A segment with an unfinished record is not recycled...
        assert_eq!(j.checkpoint(tmp.path()).unwrap(), 0);
        j.finished(t2);
        // ...once finished, it is, and nothing is found at the next start.
        assert_eq!(j.checkpoint(tmp.path()).unwrap(), 1);
        let (_, found) = Journal::open(tmp.path(), SIZE).unwrap();
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn torn_and_stale_records_are_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(tmp.path(), SIZE).unwrap();
        let t = j.append("x/1.dcm", &[&[1u8; 5000]]).unwrap().unwrap();
        j.finished(t);
        j.checkpoint(tmp.path()).unwrap();
        // New generation: one new short record over the old one's start.
        let t = j.append("x/2.dcm", &[b"new"]).unwrap().unwrap();
        j.finished(t);
        let t = j.append("x/3.dcm", &[&[3u8; 100]]).unwrap().unwrap();
        j.finished(t);
        // Tear the last record: flip a data byte.
        let seg = &j.segment_paths()[0];
        let f = OpenOptions::new().write(true).open(seg).unwrap();
        let pos = SEGMENT_HEADER + RECORD_HEADER + 7 + 3 + RECORD_HEADER + 7 + 50;
        f.write_all_at(&[0xff], pos).unwrap();
        let (_, found) = Journal::open(tmp.path(), SIZE).unwrap();
        let names: Vec<&str> = found.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            names,
            ["x/2.dcm"],
            "stale generation and torn record both ignored"
        );
    }
}
