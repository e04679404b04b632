//! scout: an edge agent for MR scanners.
//!
//! Data flows one way: `scp` receives → `spool` keeps → `series` groups → `features`
//! (`backbone`) → `adapter`s (`analysis`, `postprocess`) → `results` (`sr`, `seg`) →
//! `outbox` sends. Each module owns one concept; stages exchange plain data types over
//! bounded `crossbeam` channels.

pub mod adapter;
pub mod align;
pub mod analysis;
pub mod atlas;
pub mod backbone;
pub mod bench;
pub mod config;
pub mod dataset;
pub mod derived;
pub mod dimse;
pub mod eval;
pub mod features;
pub mod geometry;
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
pub mod synth;
pub mod templates;
pub mod train;
pub mod uid;
pub mod votes;
