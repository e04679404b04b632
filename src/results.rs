//! What the adapters found in one series for one rule, as plain data: landmarks as
//! points in patient coordinates (with the pixel they came from), structures as masks
//! per analysed slice. The SR, SEG and JSON writers read this; nothing here knows DICOM
//! encoding.

use crate::geometry::{Plane, SliceGeometry};
use crate::rules::{Code, StructureCode};
use ndarray::Array2;
use serde::Serialize;
use std::path::PathBuf;

/// One source image of a stack.
#[derive(Debug, Clone)]
pub struct SourceImage {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub geometry: SliceGeometry,
    pub path: PathBuf,
}

/// Where a landmark was found.
#[derive(Debug, Clone, Serialize)]
pub struct LandmarkPoint {
    /// Patient coordinates (mm, LPS) of the landmark.
    pub patient_mm: [f64; 3],
    pub frame_of_reference_uid: String,
    /// The image with the strongest evidence, and the landmark's pixel in it
    /// (row, column, pixel centres at integers).
    pub sop_instance_uid: String,
    pub row: f64,
    pub column: f64,
    /// Mean adapter score over the found region (0.25..1); 0 for a landmark placed by
    /// the aligned templates, the layout or a structure's outline alone (no region
    /// found).
    pub confidence: f64,
    /// Index of the stack in `SeriesResult::stacks`.
    #[serde(skip)]
    pub stack: usize,
}

impl LandmarkPoint {
    /// Placed from the other landmarks' layout, the aligned templates or a structure's
    /// outline: no region of its own was found (confidence 0).
    pub fn estimated(&self) -> bool {
        self.confidence <= 0.0
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Landmark {
    pub name: String,
    pub code: Code,
    /// None: the adapter found no region for it. Reported as not found, never guessed.
    pub found: Option<LandmarkPoint>,
}

/// One structure in one stack: a mask per analysed image.
#[derive(Debug, Clone)]
pub struct Structure {
    pub value: u8,
    pub code: StructureCode,
    /// (index into `StackResult::images`, mask at image resolution); analysed images where
    /// the structure was absent have no entry.
    pub masks: Vec<(usize, Array2<bool>)>,
}

#[derive(Debug, Clone)]
pub struct StackResult {
    pub plane: Plane,
    pub images: Vec<SourceImage>,
    /// Indices into `images` of the images the adapters ran on.
    pub analysed: Vec<usize>,
    pub structures: Vec<Structure>,
}

/// The result of one rule on one series.
#[derive(Debug, Clone)]
pub struct SeriesResult {
    pub rule: String,
    /// Stable identity of this result (rule + the exact set of source instances): the
    /// same input always gives the same key and the same output UIDs, so a series that
    /// is analysed again after a crash is not delivered twice.
    pub key: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    /// Adapter provenance and version, for the SR's algorithm identification.
    pub algorithm_name: String,
    pub algorithm_version: String,
    pub landmarks: Vec<Landmark>,
    pub stacks: Vec<StackResult>,
}

impl SeriesResult {
    /// A Part-10 file of the source series, to copy patient and study attributes from.
    pub fn first_source(&self) -> Option<&SourceImage> {
        self.stacks.iter().flat_map(|s| s.images.first()).next()
    }

    pub fn has_structures(&self) -> bool {
        self.stacks
            .iter()
            .any(|s| s.structures.iter().any(|st| !st.masks.is_empty()))
    }

    /// The JSON sidecar: landmarks for systems that do not read SR.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "rule": self.rule,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "algorithm": { "name": self.algorithm_name, "version": self.algorithm_version },
            "coordinates": "patient (mm, DICOM LPS); row/column are pixel centres of the named image",
            "landmarks": self.landmarks,
        })
    }
}
