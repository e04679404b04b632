//! scout: an edge agent for MR scanners.
//!
//! Data flows one way: `scp` receives → `spool` keeps → `series` groups → `features`
//! (`backbone`) → `adapter`s (`analysis`, `postprocess`) → `results` (`sr`, `seg`) →
//! `outbox` sends. Each module owns one concept; stages exchange plain data types over
//! bounded `crossbeam` channels.

pub mod adapter;
pub mod align;
pub mod analysis;
pub mod appearance;
pub mod atlas;
pub mod backbone;
pub mod bench;
pub mod calibration;
pub mod config;
pub mod convex;
pub mod dataset;
pub mod derived;
pub mod dimse;
pub mod enclosed;
pub mod eval;
pub mod extremes;
pub mod features;
pub mod geometry;
pub mod identity;
pub mod image;
pub mod instance;
pub mod journal;
pub mod metrics;
pub mod notify;
pub mod outbox;
pub mod patch;
pub mod pipeline;
pub mod postprocess;
pub mod results;
pub mod rules;
pub mod sam;
pub mod scp;
pub mod scu;
pub mod seg;
pub mod series;
pub mod spool;
pub mod sr;
pub mod stack;
pub mod synth;
pub mod templates;
pub mod train;
pub mod uid;
pub mod votes;
pub mod window;

/// Whether two sequences of floats hold the same bits, value by value, and are as long:
/// the tests' check of rewrites that must not change a result.
#[cfg(test)]
pub(crate) fn same_bits<'a>(
    a: impl IntoIterator<Item = &'a f32>,
    b: impl IntoIterator<Item = &'a f32>,
) -> bool {
    a.into_iter()
        .map(|v| v.to_bits())
        .eq(b.into_iter().map(|v| v.to_bits()))
}
