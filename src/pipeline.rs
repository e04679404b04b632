//! The running agent: stages as threads joined by bounded channels, start-up recovery,
//! spool retention and shutdown on SIGTERM/SIGINT.

use crate::analysis::{AnalysisError, Engine};
use crate::config::Config;
use crate::features;
use crate::outbox::{self, Outbox};
use crate::results::SeriesResult;
use crate::rules::Output;
use crate::scp::{self, ScpHandle};
use crate::series::{self, Series};
use crate::spool::Received;
use crate::spool::{Spool, SpoolError};
use crate::{derived, seg, sr};
use crossbeam_channel::{bounded, Receiver};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Scp(#[from] scp::ScpError),
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Analysis(#[from] AnalysisError),
    #[error(transparent)]
    Outbox(#[from] outbox::OutboxError),
}

/// Instances in flight between the SCP and series assembly; a full channel makes the
/// SCP wait before acknowledging, which slows the sender instead of dropping anything.
const RECEIVED_QUEUE: usize = 256;
const SERIES_QUEUE: usize = 16;
/// Instances waiting for the prefetch encoder: about two localizers.
const PREFETCH_QUEUE: usize = 32;
const SWEEP_EVERY: Duration = Duration::from_secs(600);
/// How often files written after their journal record are synced and journal space
/// recycled: bounds the work a crash leaves for the next start.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// The receiving half of the agent: SCP → spool → series.
pub struct Ingest {
    pub scp: ScpHandle,
    pub spool: Arc<Spool>,
    /// Completed series, in the order they completed.
    pub series: Receiver<Series>,
}

/// Opens the spool, re-queues what a previous run left unfinished, then starts series
/// assembly and the SCP.
pub fn start_ingest(config: &Config) -> Result<Ingest, PipelineError> {
    start_ingest_with(config, None)
}

/// Called for every instance as soon as it is spooled (and for recovered ones).
pub type InstanceTap = Box<dyn Fn(&Received) + Send>;

/// `start_ingest`, with `tap` seeing each instance before series assembly does.
pub fn start_ingest_with(
    config: &Config,
    tap: Option<InstanceTap>,
) -> Result<Ingest, PipelineError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| PipelineError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let spool = Arc::new(Spool::open(&config.spool_dir(), config.spool.clone())?);
    let (received_tx, received_rx) = bounded(RECEIVED_QUEUE);
    let (series_tx, series_rx) = bounded(SERIES_QUEUE);
    let series_config = config.series.clone();
    let series_input = match tap {
        None => received_rx,
        Some(tap) => {
            let (tx, rx) = bounded(RECEIVED_QUEUE);
            std::thread::Builder::new()
                .name("tap".into())
                .spawn(move || {
                    for r in received_rx.iter() {
                        tap(&r);
                        if tx.send(r).is_err() {
                            return;
                        }
                    }
                })
                .map_err(PipelineError::Thread)?;
            rx
        }
    };
    std::thread::Builder::new()
        .name("series".into())
        .spawn(move || series::run(series_config, series_input, series_tx))
        .map_err(PipelineError::Thread)?;
    let recovered = spool.recover()?;
    if !recovered.is_empty() {
        log::info!(
            "spool: recovering {} unfinished instances from a previous run",
            recovered.len()
        );
    }
    let feeder = received_tx.clone();
    // Fed from a thread: recovery may exceed the queue while nobody drains series yet.
    std::thread::Builder::new()
        .name("recover".into())
        .spawn(move || {
            for r in recovered {
                if feeder.send(r).is_err() {
                    break;
                }
            }
        })
        .map_err(PipelineError::Thread)?;

    // Holds only a weak reference: the thread ends once the spool is dropped.
    let checkpointed = Arc::downgrade(&spool);
    std::thread::Builder::new()
        .name("checkpoint".into())
        .spawn(move || loop {
            std::thread::sleep(CHECKPOINT_EVERY);
            let Some(spool) = checkpointed.upgrade() else {
                return;
            };
            if let Err(e) = spool.checkpoint() {
                log::error!("spool: checkpoint failed: {e}");
            }
        })
        .map_err(PipelineError::Thread)?;

    let scp = scp::start(&config.scp, spool.clone(), received_tx)?;
    Ok(Ingest {
        scp,
        spool,
        series: series_rx,
    })
}

/// `scout serve`: runs until SIGTERM or SIGINT. Models load before the SCP opens, so a
/// broken model set-up stops the start instead of accepting images it cannot process.
/// Every acknowledged instance is already durable and a series is marked done only
/// after its results are in the outbox, so stopping (or crashing) anywhere loses
/// nothing: unfinished series are analysed again at the next start, and results that
/// were already queued or delivered are not queued again.
pub fn serve(config: &Config) -> Result<(), PipelineError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).map_err(PipelineError::Signal)?;
    }
    let engine = Engine::load(config)?.map(Arc::new);
    let outbox = Arc::new(Outbox::open(&config.outbox_dir())?);

    // Streaming features: instances of series that a rule analyses slice by slice are
    // encoded while the rest of the series arrives. A full prefetch queue only means
    // the analysis computes those slices itself later; nothing is lost.
    let tap: Option<InstanceTap> = match &engine {
        Some(e) if e.has_streaming_rules() => {
            let (tx, rx) = bounded::<features::PrefetchJob>(PREFETCH_QUEUE);
            std::thread::Builder::new()
                .name("features".into())
                .spawn(move || features::prefetch(rx))
                .map_err(PipelineError::Thread)?;
            let e = e.clone();
            Some(Box::new(move |r: &Received| {
                let stores = e.prefetch_stores(&r.meta);
                if stores.is_empty() {
                    return;
                }
                let job = features::PrefetchJob {
                    received: r.clone(),
                    stores,
                };
                if tx.try_send(job).is_err() {
                    log::debug!(
                        "features: prefetch queue full; {} computed on demand",
                        r.meta.sop_instance_uid
                    );
                }
            }))
        }
        _ => None,
    };
    if !config.health.bind.is_empty() {
        let depth_outbox = outbox.clone();
        let destinations = config.destinations.clone();
        let probe = Arc::new(crate::metrics::Probe {
            spool_dir: config.spool_dir(),
            models_loaded: engine.is_some(),
            rules: config.rules.len(),
            outbox_depth: Box::new(move || depth_outbox.depth(&destinations)),
            started_unix: crate::metrics::unix_now(),
        });
        // Monitoring must not keep DICOM from being served: a taken port is only logged.
        // Bound before the SCP opens, so a probe that sees the DICOM port also finds this.
        if let Err(e) = crate::metrics::serve(&config.health.bind, probe) {
            log::error!("{e}; continuing without it");
        }
    }

    let ingest = start_ingest_with(config, tap)?;
    let (wake_tx, wake_rx) = bounded::<()>(1);
    let sender = {
        let (outbox, stop) = (outbox.clone(), stop.clone());
        let (destinations, ae, cfg) = (
            config.destinations.clone(),
            config.scp.ae_title.clone(),
            config.outbox.clone(),
        );
        std::thread::Builder::new()
            .name("send".into())
            .spawn(move || outbox::run_sender(outbox, destinations, ae, cfg, wake_rx, stop))
            .map_err(PipelineError::Thread)?
    };
    let analysis = {
        let spool = ingest.spool.clone();
        let series = ingest.series.clone();
        let stop = stop.clone();
        let config = config.clone();
        let outbox = outbox.clone();
        std::thread::Builder::new()
            .name("analysis".into())
            .spawn(move || {
                // Polls the stop flag: associations still open keep the channel alive.
                // A series not taken is left unmarked, and analysed at the next start.
                while !stop.load(Ordering::Relaxed) {
                    let s = match series.recv_timeout(Duration::from_millis(200)) {
                        Ok(s) => s,
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                    };
                    let finished = match &engine {
                        None => true,
                        Some(e) => analyze_and_publish(e, &config, &outbox, &s, &wake_tx),
                    };
                    if finished {
                        if let Err(e) =
                            spool.mark_done(&s.study_instance_uid, &s.series_instance_uid)
                        {
                            log::error!("series {}: cannot mark done: {e}", s.series_instance_uid);
                        }
                    }
                    let _ = wake_tx.try_send(());
                }
            })
            .map_err(PipelineError::Thread)?
    };

    crate::notify::notify(&format!(
        "READY=1\nSTATUS=listening on port {}, {} rules",
        ingest.scp.local_addr.port(),
        config.rules.len()
    ));
    let watchdog = crate::notify::watchdog_interval();
    let mut last_pet = Instant::now();
    let mut last_sweep: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        // The watchdog is petted only while the stages are alive: a dead analysis or
        // sender thread lets systemd restart the agent instead of it sitting there mute.
        if let Some(every) = watchdog {
            if last_pet.elapsed() >= every {
                if analysis.is_finished() || sender.is_finished() {
                    log::error!("scout: a pipeline stage has stopped; not petting the watchdog");
                } else {
                    crate::notify::notify("WATCHDOG=1");
                }
                last_pet = Instant::now();
            }
        }
        if last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY) {
            match ingest.spool.sweep() {
                Ok(0) => {}
                Ok(n) => log::info!("spool: retention removed {n} finished series"),
                Err(e) => log::error!("spool: retention sweep failed: {e}"),
            }
            last_sweep = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    crate::notify::notify("STOPPING=1");
    log::info!("scout: stopping on signal: no new associations; finishing the series in analysis");
    ingest.scp.stop();
    if let Err(e) = ingest.spool.checkpoint() {
        log::error!("spool: final checkpoint failed: {e}");
    }
    // The analysis finishes the series it is working on (its results reach the outbox);
    // the sender finishes its association. What is left is on disk for the next start.
    let _ = analysis.join();
    let _ = sender.join();
    log::info!("scout: stopped");
    Ok(())
}

/// Runs every matching rule on a series and queues its outputs. True when the series
/// is finished with: results queued, or it matched no rule, or its images cannot be
/// analysed (logged; trying again would fail the same way). False when writing results
/// failed (e.g. disk full): the series stays unfinished and is analysed again at start.
/// The sender is woken after each rule's results are queued, not after the last rule's.
fn analyze_and_publish(
    engine: &Engine,
    config: &Config,
    outbox: &Outbox,
    s: &Series,
    wake: &crossbeam_channel::Sender<()>,
) -> bool {
    let t = Instant::now();
    let mut finished = true;
    engine.analyze(s, |result| {
        match result {
            Ok(r) => {
                crate::metrics::inc(&crate::metrics::METRICS.series_analysed);
                let found = r.landmarks.iter().filter(|l| l.found.is_some()).count();
                match publish(&r, config, outbox) {
                    Ok(queued) => {
                        let _ = wake.try_send(());
                        log::info!(
                            "rule {}: series {}: {found}/{} landmarks, {} structure masks, {:.2} s; {queued}",
                            r.rule,
                            s.series_instance_uid,
                            r.landmarks.len(),
                            r.stacks.iter().map(|st| st.structures.len()).sum::<usize>(),
                            t.elapsed().as_secs_f64()
                        )
                    }
                    Err(e) => {
                        log::error!("rule {}: series {}: results not written: {e}", r.rule, s.series_instance_uid);
                        finished = false;
                    }
                }
            }
            Err(e) => {
                crate::metrics::inc(&crate::metrics::METRICS.analysis_errors);
                log::error!("series {}: {e}", s.series_instance_uid)
            }
        }
    });
    crate::metrics::METRICS
        .analysis_seconds
        .observe(t.elapsed());
    finished
}

/// Writes the outputs of a result under `results/` and queues them for its destinations.
/// Returns a summary for the log.
fn publish(r: &SeriesResult, config: &Config, outbox: &Outbox) -> Result<String, PublishError> {
    let Some(rule) = config.rules.iter().find(|x| x.name == r.rule) else {
        return Ok("rule removed from the configuration; nothing written".into());
    };
    let Some(first) = r.first_source() else {
        return Ok("no images".into());
    };
    let source = derived::source_header(&first.path)?;
    let dir = config
        .results_dir()
        .join(&r.study_instance_uid)
        .join(&r.series_instance_uid);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for output in &rule.outputs {
        match output {
            Output::Sr => files.push((
                format!("{}.{}.sr.dcm", r.key, r.rule),
                sr::build(r, &source)?,
            )),
            Output::Seg => {
                for i in 0..r.stacks.len() {
                    if let Some(bytes) = seg::build(r, i, &source)? {
                        files.push((format!("{}.{}.seg{}.dcm", r.key, r.rule, i + 1), bytes));
                    }
                }
            }
            Output::Json => {
                let text = serde_json::to_vec_pretty(&r.to_json()).unwrap_or_default();
                outbox::write_durable(&dir.join(format!("{}.json", r.rule)), &text)?;
            }
        }
    }
    let mut queued = Vec::new();
    for (name, bytes) in &files {
        outbox::write_durable(&dir.join(name), bytes)?;
        for d in &rule.destinations {
            if outbox.put(d, name, bytes)? {
                queued.push(format!("{name} → {d}"));
            }
        }
    }
    Ok(if queued.is_empty() {
        format!("{} objects in {}", files.len(), dir.display())
    } else {
        format!("queued {}", queued.join(", "))
    })
}

#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error(transparent)]
    Derived(#[from] derived::DerivedError),
    #[error(transparent)]
    Outbox(#[from] outbox::OutboxError),
}
