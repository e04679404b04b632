//! `scout bench ingest`: DCMTK `storescu` sends the same N instances on one association
//! to (a) scout's SCP, in this process, fsync-ing every instance, and (b) DCMTK `storescp`,
//! on the same machine in the same run. Rounds alternate so that neither side gets a
//! warmer cache; the medians and their ratio are reported, ending with one JSON line.

use crate::config::Config;
use crate::pipeline;
use crate::synth::{self, SynthSpec};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error("{tool} failed: {detail}")]
    Tool { tool: &'static str, detail: String },
}

fn setup(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

pub struct IngestFigures {
    pub instances: usize,
    pub instance_bytes: u64,
    /// scout with its write-ahead journal (the default).
    pub scout_s: f64,
    /// scout with the journal off: temp file, fsync, rename, directory fsync each.
    pub scout_direct_s: f64,
    pub storescp_s: f64,
}

fn free_port() -> Result<u16, BenchError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(setup)?;
    Ok(l.local_addr().map_err(setup)?.port())
}

fn storescu(port: u16, called: &str, dir: &Path) -> Result<f64, BenchError> {
    // Start every timed run with no dirty pages left by the previous one, so neither side
    // pays for the other's writeback.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let t = Instant::now();
    let out = Command::new("storescu")
        .env("TCP_NODELAY", "1")
        .args(["-aet", "BENCH", "-aec", called, "+sd", "-nh"])
        .arg("127.0.0.1")
        .arg(port.to_string())
        .arg(dir)
        .output()
        .map_err(|e| BenchError::Tool {
            tool: "storescu",
            detail: format!("{e} (is DCMTK installed?)"),
        })?;
    let elapsed = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(BenchError::Tool {
            tool: "storescu",
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(elapsed)
}

fn wait_listening(port: u16, child: &mut Child) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(BenchError::Tool {
                tool: "storescp",
                detail: format!("exited early: {status}"),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(BenchError::Tool {
        tool: "storescp",
        detail: "not listening after 10 s".into(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn ingest(count: usize, rounds: usize, work: &Path) -> Result<IngestFigures, BenchError> {
    let rounds = rounds.max(1);
    let src = work.join("series");
    let spec = SynthSpec {
        slices: count,
        localizer: false,
        series_description: "BENCH".into(),
        slice_gap_mm: 0.5,
        ..SynthSpec::default()
    };
    let written = synth::write_series(&src, &spec).map_err(BenchError::Setup)?;
    let instance_bytes = written
        .files
        .first()
        .and_then(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .unwrap_or(0);

    let mut scout_times = Vec::new();
    let mut direct_times = Vec::new();
    let mut dcmtk_times = Vec::new();
    for round in 0..rounds {
        for journal in [true, false] {
            // A fresh spool each time, so every instance is a new file.
            let data = work.join(format!("scout-{round}-{journal}"));
            let mut config = Config::embedded().map_err(setup)?;
            config.data_dir = data.clone();
            config.scp.bind = "127.0.0.1".into();
            config.scp.port = 0;
            config.spool.min_free_bytes = 0;
            if !journal {
                config.spool.journal_segment_mib = 0;
            }
            let ingest = pipeline::start_ingest(&config).map_err(setup)?;
            let port = ingest.scp.local_addr.port();
            let series = ingest.series.clone();
            // Drain completed series so assembly never waits on us.
            std::thread::spawn(move || series.iter().count());
            let t = storescu(port, "SCOUT", &src)?;
            if journal {
                scout_times.push(t)
            } else {
                direct_times.push(t)
            }
            ingest.scp.stop();
            // Let the last files be written before counting them.
            std::thread::sleep(Duration::from_millis(300));
            drop(ingest.spool);
            let stored = walk_count(&config.spool_dir());
            if stored != count {
                return Err(BenchError::Setup(format!(
                    "scout spooled {stored} of {count} instances"
                )));
            }
            let _ = std::fs::remove_dir_all(&data);
        }

        // DCMTK storescp, same files, same client.
        let out = work.join(format!("storescp-{round}"));
        std::fs::create_dir_all(&out).map_err(setup)?;
        let port = free_port()?;
        let mut child = Command::new("storescp")
            .env("TCP_NODELAY", "1")
            .args(["-aet", "STORESCP", "-od"])
            .arg(&out)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| BenchError::Tool {
                tool: "storescp",
                detail: e.to_string(),
            })?;
        let timed =
            wait_listening(port, &mut child).and_then(|()| storescu(port, "STORESCP", &src));
        let _ = child.kill();
        let _ = child.wait();
        dcmtk_times.push(timed?);
        let stored = walk_count(&out);
        if stored != count {
            return Err(BenchError::Setup(format!(
                "storescp stored {stored} of {count} instances"
            )));
        }
        let _ = std::fs::remove_dir_all(&out);
    }
    Ok(IngestFigures {
        instances: count,
        instance_bytes,
        scout_s: median(scout_times),
        scout_direct_s: median(direct_times),
        storescp_s: median(dcmtk_times),
    })
}

fn walk_count(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == ".tmp") {
                    0
                } else {
                    walk_count(&p)
                }
            } else {
                usize::from(
                    p.extension().is_some_and(|x| x == "dcm")
                        || p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("MR")),
                )
            }
        })
        .sum()
}

/// Peak resident set size of this process so far (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    vm_hwm_mib("self")
}

/// VmHWM of `/proc/<pid>/status` in MiB (NaN where /proc is not there).
fn vm_hwm_mib(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Per-slice latencies of one encoder variant in tract.
#[derive(Debug, serde::Serialize)]
pub struct EncoderFigures {
    pub backbone: String,
    pub load_s: f64,
    /// Median single-slice latency, intra-op threads = `threads`.
    pub median_ms: f64,
    pub min_ms: f64,
    /// A 9-slice localizer, slices one after the other on `threads` intra-op threads.
    pub localizer9_intra_op_ms: f64,
    /// The same 9 slices, one slice per thread on `threads` threads, single-threaded each.
    pub localizer9_slice_per_thread_ms: f64,
}

fn time_ms(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1000.0
}

/// Times each listed backbone (and the SAM decoder) on `slice`, a normalised image.
pub fn backbone(
    manifest: &crate::backbone::Manifest,
    ids: &[String],
    slice: &ndarray::Array2<f32>,
    runs: usize,
    threads: usize,
) -> Result<(Vec<EncoderFigures>, f64), BenchError> {
    use crate::backbone::{set_threads, Backbone};
    let runs = runs.max(1);
    let mut out = Vec::new();
    let mut decoder_ms = f64::NAN;
    for id in ids {
        set_threads(threads);
        let t = Instant::now();
        let b = Backbone::load(manifest, id).map_err(setup)?;
        let load_s = t.elapsed().as_secs_f64();
        let input = b.input_tensor(slice).map_err(setup)?;
        b.features_of_input(input.clone(), slice.dim())
            .map_err(setup)?; // warm-up
        let mut times = Vec::with_capacity(runs);
        let mut fm = None;
        for _ in 0..runs {
            let mut r = None;
            times.push(time_ms(|| {
                r = Some(b.features_of_input(input.clone(), slice.dim()))
            }));
            fm = Some(
                r.into_iter()
                    .next()
                    .ok_or_else(|| setup("no result"))?
                    .map_err(setup)?,
            );
        }
        let min_ms = times.iter().copied().fold(f64::INFINITY, f64::min);
        let median_ms = median(times);
        let mut err = None;
        let intra = time_ms(|| {
            for _ in 0..9 {
                if let Err(e) = b.features_of_input(input.clone(), slice.dim()) {
                    err = Some(e);
                }
            }
        });
        set_threads(1);
        let per_thread = time_ms(|| {
            let next = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|s| {
                for _ in 0..threads.max(1) {
                    s.spawn(|| {
                        while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 9 {
                            let _ = b.features_of_input(input.clone(), slice.dim());
                        }
                    });
                }
            })
        });
        set_threads(threads);
        if let Some(e) = err {
            return Err(setup(e));
        }
        if id == &manifest.default_backbone {
            if let (Ok(sam), Some(fm)) = (crate::sam::Sam::load(manifest, id), fm) {
                let prompt: Vec<(f32, f32, f32)> = (0..10)
                    .map(|i| (100.0 + 3.0 * i as f32, 128.0, 1.0))
                    .collect();
                let _ = sam.decode_raw(&fm.data, &prompt);
                let mut t = Vec::new();
                for _ in 0..runs.max(5) {
                    t.push(time_ms(|| {
                        let _ = sam.decode_raw(&fm.data, &prompt);
                    }));
                }
                decoder_ms = median(t);
            }
        }
        out.push(EncoderFigures {
            backbone: id.clone(),
            load_s,
            median_ms,
            min_ms,
            localizer9_intra_op_ms: intra,
            localizer9_slice_per_thread_ms: per_thread,
        });
    }
    Ok((out, decoder_ms))
}

/// `scout bench e2e` figures: seconds from the last image acknowledged by the agent to
/// the SR received at the destination.
#[derive(Debug, serde::Serialize)]
pub struct E2eFigures {
    pub slices: String,
    pub images: usize,
    pub gap_ms: u64,
    pub paced_s: f64,
    pub burst_s: f64,
    pub paced_runs: Vec<f64>,
    pub burst_runs: Vec<f64>,
    /// Last image acknowledged → both an SR and a SEG stored (the shipped chest rules
    /// send one each, from two rules); None when a round's SEG did not follow its SR
    /// within `SEG_WAIT`.
    pub paced_both_s: Option<f64>,
    pub burst_both_s: Option<f64>,
    /// Peak resident memory of the agent process (VmHWM).
    pub peak_rss_mb: f64,
}

/// How long after its SR a round waits for a SEG before it counts the round as one
/// without (the phantom may show no structure).
const SEG_WAIT: Duration = Duration::from_secs(10);

/// Real images for `e2e` to send as one localizer series.
#[derive(Debug, Clone)]
pub struct BenchImages {
    /// One per slice, of one plane.
    pub images: Vec<ndarray::Array2<u16>>,
    pub plane: crate::geometry::Plane,
    pub series_description: String,
    /// Stored as negatives (air bright): sent as MONOCHROME1.
    pub negatives: bool,
}

impl BenchImages {
    /// A data set's case as a scanner would send it: a volume's stack as a sagittal
    /// localizer, as the spine rule expects; a 2D data set's image as a coronal chest
    /// localizer, as the chest rules expect, its grey levels back to integers (a PNG is
    /// read as 0..1: ×65535 keeps 8- and 16-bit levels exact).
    pub fn of_case(
        layout: crate::dataset::Layout,
        case: &crate::dataset::Case,
        negatives: bool,
    ) -> BenchImages {
        use crate::dataset::Layout;
        use crate::geometry::Plane;
        let scale = match layout {
            Layout::Volume => 1.0,
            Layout::Image
                if case
                    .slices
                    .iter()
                    .all(|s| s.pixels.iter().all(|v| (0.0..=1.0).contains(v))) =>
            {
                65535.0
            }
            Layout::Image => 1.0,
        };
        BenchImages {
            images: case
                .slices
                .iter()
                .map(|s| {
                    s.pixels
                        .mapv(|v| (v * scale).round().clamp(0.0, 65535.0) as u16)
                })
                .collect(),
            plane: match layout {
                Layout::Volume => Plane::Sagittal,
                Layout::Image => Plane::Coronal,
            },
            series_description: match layout {
                Layout::Volume => SynthSpec::default().series_description,
                Layout::Image => "CHEST LOCALIZER".into(),
            },
            negatives,
        }
    }

    /// The series to write: these images, with Images in Acquisition (so the agent takes
    /// it as complete when its last image is in).
    fn spec(&self) -> SynthSpec {
        let (rows, columns) = self.images.first().map_or((0, 0), |i| i.dim());
        SynthSpec {
            slices: self.images.len(),
            rows: rows as u16,
            columns: columns as u16,
            planes: vec![self.plane],
            series_description: self.series_description.clone(),
            images: self.images.clone(),
            negatives: self.negatives,
            images_in_acquisition: true,
            ..SynthSpec::default()
        }
    }
}

/// The configuration `text` with the shipped spine rule's adapter and backbone replaced
/// (None when it has no such rule, or the rule names no backbone).
fn with_spine_adapter(text: &str, adapter: &str, backbone: &str) -> Option<String> {
    const SHIPPED: &str = "adapter = \"models/adapters/spine.adapter\"";
    let at = text.find(SHIPPED)?;
    let rule_end = text[at..].find("[[rules]]").map_or(text.len(), |i| at + i);
    let start = at + text[at..rule_end].find("\nbackbone = ")? + 1;
    let end = start + text[start..].find('\n')?;
    let mut out = text.to_string();
    out.replace_range(start..end, &format!("backbone = {backbone:?}"));
    Some(out.replacen(SHIPPED, &format!("adapter = {adapter:?}"), 1))
}

/// Runs the agent (`scout serve`, a child process on the embedded configuration with
/// `slices` and a destination in this process) and a scanner simulation in this process.
/// The series is a localizer: `images` when given, else the phantom's stack.
pub fn e2e(
    work: &Path,
    rounds: usize,
    gap: Duration,
    slices: crate::rules::Slices,
    images: Option<&BenchImages>,
    spine_adapter: Option<&Path>,
) -> Result<E2eFigures, BenchError> {
    use crate::scu::{self, Outgoing, Peer};
    std::fs::create_dir_all(work).map_err(setup)?;
    if !Path::new("models/models.toml").is_file() {
        return Err(BenchError::Setup(
            "run from the repository root (the embedded configuration reads models/)".into(),
        ));
    }
    // The destination: scout's own SCP, timing each arrival as soon as it is stored.
    let mut dest_cfg = Config::embedded().map_err(setup)?;
    dest_cfg.data_dir = work.join("destination");
    dest_cfg.scp.ae_title = "DEST".into();
    dest_cfg.scp.bind = "127.0.0.1".into();
    dest_cfg.scp.port = 0;
    dest_cfg.spool.min_free_bytes = 0;
    dest_cfg.spool.journal_segment_mib = 4;
    let (arrived_tx, arrived) = crossbeam_channel::unbounded::<(Instant, String)>();
    let tap: pipeline::InstanceTap = Box::new(move |r| {
        let _ = arrived_tx.send((Instant::now(), r.meta.sop_class_uid.clone()));
    });
    let dest = pipeline::start_ingest_with(&dest_cfg, Some(tap)).map_err(setup)?;
    let drain = dest.series.clone();
    std::thread::spawn(move || drain.iter().count());

    let port = free_port()?;
    let slices_name = match slices {
        crate::rules::Slices::Center => "center",
        crate::rules::Slices::All => "all",
    };
    let text = crate::config::DEFAULT_CONFIG_TOML
        .replace(
            "data_dir = \"scout-data\"",
            &format!("data_dir = {:?}", work.join("agent").display().to_string()),
        )
        .replace("port = 11112", &format!("port = {port}"))
        .replace("bind = \"0.0.0.0\"", "bind = \"127.0.0.1\"")
        .replace("bind = \"127.0.0.1:9112\"", "bind = \"\"")
        .replace("min_free_bytes = 536870912", "min_free_bytes = 0")
        .replace("slices = \"center\"", &format!("slices = \"{slices_name}\""))
        .replace("destinations = []", "destinations = [\"bench\"]")
        .replace(
            "# Where results are sent (C-STORE).",
            &format!(
                "[[destinations]]\nname = \"bench\"\nae_title = \"DEST\"\nhost = \"127.0.0.1\"\nport = {}\n\n#",
                dest.scp.local_addr.port()
            ),
        );
    let text = match spine_adapter {
        None => text,
        Some(p) => {
            // The rule runs on the backbone the adapter was trained on.
            let backbone = crate::train::Bundle::backbone_id(p)
                .map_err(|e| BenchError::Setup(format!("--spine-adapter: {e}")))?;
            with_spine_adapter(&text, &p.display().to_string(), &backbone).ok_or_else(|| {
                BenchError::Setup(
                    "--spine-adapter: the embedded configuration has no spine rule with a backbone"
                        .into(),
                )
            })?
        }
    };
    let cfg_path = work.join("agent.toml");
    std::fs::write(&cfg_path, text).map_err(setup)?;
    let log = std::fs::File::create(work.join("agent.log")).map_err(setup)?;
    let exe = std::env::current_exe().map_err(setup)?;
    let mut agent = Command::new(exe)
        .args(["serve", "--config"])
        .arg(&cfg_path)
        .env(
            "RUST_LOG",
            std::env::var("SCOUT_AGENT_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(setup)?;
    let result = (|| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || agent.try_wait().ok().flatten().is_some() {
                return Err(BenchError::Setup(format!(
                    "agent did not start; see {}",
                    work.join("agent.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let peer = Peer {
            host: "127.0.0.1".into(),
            port,
            called_ae_title: "SCOUT".into(),
            calling_ae_title: "SCANNER".into(),
            timeout: Duration::from_secs(30),
        };
        let spec = match images {
            Some(b) => b.spec(),
            None => SynthSpec {
                images_in_acquisition: true,
                ..SynthSpec::default()
            },
        };
        let (mut paced, mut burst) = (Vec::new(), Vec::new());
        let (mut paced_both, mut burst_both) = (Vec::new(), Vec::new());
        // Round 0 is a warm-up burst (first inference allocates).
        for round in 0..=rounds {
            for (is_paced, times, both) in [
                (false, &mut burst, &mut burst_both),
                (true, &mut paced, &mut paced_both),
            ] {
                if round == 0 && is_paced {
                    continue;
                }
                let series =
                    synth::write_series(&work.join(format!("series-{round}-{is_paced}")), &spec)
                        .map_err(BenchError::Setup)?;
                let items: Vec<Outgoing> = series
                    .files
                    .iter()
                    .map(|f| Outgoing::from_file(f))
                    .collect::<Result<_, _>>()
                    .map_err(setup)?;
                while arrived.try_recv().is_ok() {}
                let (results, last_ack) =
                    scu::store_paced(&peer, &items, if is_paced { gap } else { Duration::ZERO })
                        .map_err(setup)?;
                if results.iter().any(|r| r.status != Some(0)) {
                    return Err(BenchError::Setup(format!(
                        "agent refused images: {results:?}"
                    )));
                }
                // The SR, and a SEG before or after it (two rules may send them): when the
                // SR came, and when both were in (None: no SEG within `SEG_WAIT` of the SR).
                let (mut sr_at, mut seg_at): (Option<Instant>, Option<Instant>) = (None, None);
                let started = Instant::now();
                let (sr_at, both_at) = loop {
                    let wait = match sr_at {
                        None => Duration::from_secs(120).saturating_sub(started.elapsed()),
                        Some(t) => SEG_WAIT.saturating_sub(t.elapsed()),
                    };
                    match arrived.recv_timeout(wait) {
                        Ok((t, class)) if class == crate::sr::COMPREHENSIVE_3D_SR => {
                            sr_at = sr_at.or(Some(t))
                        }
                        Ok((t, class)) if class == crate::seg::SEGMENTATION => {
                            seg_at = seg_at.or(Some(t))
                        }
                        Ok(_) => {}
                        Err(_) => match sr_at {
                            Some(sr) => break (sr, None),
                            None => {
                                return Err(BenchError::Setup(format!(
                                    "no SR within 120 s; see {}",
                                    work.join("agent.log").display()
                                )))
                            }
                        },
                    }
                    if let (Some(sr), Some(seg)) = (sr_at, seg_at) {
                        break (sr, Some(sr.max(seg)));
                    }
                };
                if round > 0 {
                    let since = |t: Instant| t.saturating_duration_since(last_ack).as_secs_f64();
                    times.push(since(sr_at));
                    both.push(both_at.map(since));
                }
            }
        }
        let rss = vm_hwm_mib(&agent.id().to_string());
        Ok(E2eFigures {
            slices: slices_name.into(),
            images: spec.slices,
            gap_ms: gap.as_millis() as u64,
            paced_s: median(paced.clone()),
            burst_s: median(burst.clone()),
            paced_runs: paced,
            burst_runs: burst,
            paced_both_s: paced_both
                .into_iter()
                .collect::<Option<Vec<f64>>>()
                .map(median),
            burst_both_s: burst_both
                .into_iter()
                .collect::<Option<Vec<f64>>>()
                .map(median),
            peak_rss_mb: rss,
        })
    })();
    let _ = agent.kill();
    let _ = agent.wait();
    dest.scp.stop();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2D data set's image goes out as a coronal chest localizer that both shipped chest
    /// rules pick up, its 8-bit grey levels exact; a volume's stack as a sagittal one that
    /// the spine rule picks up, its values as read.
    #[test]
    fn a_data_sets_case_goes_out_as_the_localizer_its_rules_expect() {
        use crate::dataset::{Case, Layout, Slice};
        let grey = ndarray::Array2::from_shape_fn((32, 24), |(r, c)| ((r * 7 + c) % 256) as f32);
        let case = |pixels: Vec<ndarray::Array2<f32>>| Case {
            name: "c".into(),
            center: pixels.len() / 2,
            slices: pixels
                .into_iter()
                .map(|pixels| Slice {
                    pixels,
                    labels: None,
                    k: None,
                })
                .collect(),
            landmarks: Default::default(),
        };
        let config = Config::embedded().expect("embedded");
        let work = tempfile::tempdir().expect("tempdir");
        let matched = |b: &BenchImages, dir: &str| -> Vec<String> {
            let series = synth::write_series(&work.path().join(dir), &b.spec()).expect("written");
            let meta = crate::spool::read_meta(&series.files[0]).expect("meta");
            let c = crate::rules::Candidate::of_instance(&meta, &config.series.localizer_patterns);
            config
                .rules
                .iter()
                .filter(|r| r.criteria.matches(&c))
                .map(|r| r.name.clone())
                .collect()
        };

        let png = case(vec![grey.mapv(|v| v / 255.0)]);
        let chest = BenchImages::of_case(Layout::Image, &png, true);
        assert_eq!(chest.images.len(), 1);
        assert_eq!(chest.images[0], grey.mapv(|v| v as u16 * 257));
        assert!(chest.negatives);
        // In the configuration's order: the landmarks' rule first (its SR plans the scans).
        assert_eq!(matched(&chest, "chest"), ["chest-landmarks", "chest"]);

        let stack = case(vec![grey.mapv(|v| v * 100.0); 3]);
        let spine = BenchImages::of_case(Layout::Volume, &stack, false);
        assert_eq!(spine.images, vec![grey.mapv(|v| (v * 100.0) as u16); 3]);
        assert_eq!(matched(&spine, "spine"), ["spine"]);
    }

    /// `--spine-adapter` changes the spine rule's adapter and backbone, nothing else.
    #[test]
    fn spine_adapter_swaps_the_spine_rules_adapter_and_backbone() {
        let text = crate::config::DEFAULT_CONFIG_TOML;
        let swapped = with_spine_adapter(text, "/tmp/x.adapter", "litemedsam").expect("spine rule");
        let before = crate::config::Config::from_toml(text, "embedded").expect("embedded");
        let after = crate::config::Config::from_toml(&swapped, "swapped").expect("swapped");
        let spine = |c: &crate::config::Config| {
            c.rules
                .iter()
                .find(|r| r.name == "spine")
                .cloned()
                .expect("spine")
        };
        assert_eq!(
            spine(&after).adapter,
            std::path::PathBuf::from("/tmp/x.adapter")
        );
        assert_eq!(spine(&before).backbone, "litemedsam-hyper");
        assert_eq!(spine(&after).backbone, "litemedsam");
        assert_eq!(before.rules.len(), after.rules.len());
        for (b, a) in before
            .rules
            .iter()
            .zip(&after.rules)
            .filter(|(b, _)| b.name != "spine")
        {
            assert_eq!(
                (&b.adapter, &b.backbone),
                (&a.adapter, &a.backbone),
                "{}",
                b.name
            );
        }
        let no_backbone = text.replacen(
            "backbone = \"litemedsam-hyper\"\n# \"center\"",
            "# \"center\"",
            1,
        );
        assert_ne!(no_backbone, text);
        assert!(
            with_spine_adapter(&no_backbone, "/tmp/x.adapter", "b").is_none(),
            "the chest rule's backbone line is not the spine rule's"
        );
    }
}
