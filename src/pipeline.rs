//! The running agent: stages as threads joined by bounded channels, start-up recovery,
//! spool retention and shutdown on SIGTERM/SIGINT.

use crate::config::Config;
use crate::scp::{self, ScpHandle};
use crate::series::{self, Series};
use crate::spool::{Spool, SpoolError};
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
}

/// Instances in flight between the SCP and series assembly; a full channel makes the
/// SCP wait before acknowledging, which slows the sender instead of dropping anything.
const RECEIVED_QUEUE: usize = 256;
const SERIES_QUEUE: usize = 16;
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
    std::fs::create_dir_all(&config.data_dir).map_err(|source| PipelineError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let spool = Arc::new(Spool::open(&config.spool_dir(), config.spool.clone())?);
    let (received_tx, received_rx) = bounded(RECEIVED_QUEUE);
    let (series_tx, series_rx) = bounded(SERIES_QUEUE);
    let series_config = config.series.clone();
    std::thread::Builder::new()
        .name("series".into())
        .spawn(move || series::run(series_config, received_rx, series_tx))
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

/// `scout serve`: runs until SIGTERM or SIGINT. Every acknowledged instance is already
/// durable, so stopping never loses one; unfinished series are recovered at next start.
pub fn serve(config: &Config) -> Result<(), PipelineError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).map_err(PipelineError::Signal)?;
    }
    let ingest = start_ingest(config)?;
    let spool = ingest.spool.clone();
    let series = ingest.series.clone();
    // Until the feature and adapter stages consume series, completion is the last step:
    // mark the series done so it is not recovered again and retention can reclaim it.
    std::thread::Builder::new()
        .name("series-sink".into())
        .spawn(move || {
            for s in series.iter() {
                if let Err(e) = spool.mark_done(&s.study_instance_uid, &s.series_instance_uid) {
                    log::error!("series {}: cannot mark done: {e}", s.series_instance_uid);
                }
            }
        })
        .map_err(PipelineError::Thread)?;

    let mut last_sweep: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
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
    log::info!("scout: stopping on signal");
    ingest.scp.stop();
    if let Err(e) = ingest.spool.checkpoint() {
        log::error!("spool: final checkpoint failed: {e}");
    }
    Ok(())
}
