//! Templates: what an adapter learns from. Landmarks are learned from points — the region
//! of a landmark is a disk (a sphere, for volumes) of a stated radius around it, as the
//! paper draws a box around each landmark; structures are learned from label maps.
//! Either becomes a label per feature cell.

use crate::backbone::FeatureMap;
use crate::dataset::{Case, LandmarkTruth};
use ndarray::Array2;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Named landmarks, each learned from a disk/sphere of `radius` pixels.
    Landmarks { names: Vec<String>, radius: f64 },
    /// Label values of the label maps.
    Structures { values: Vec<u8> },
}

/// A kind of task: what `scout eval --only` measures and what a rule reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    Landmarks,
    Structures,
}

impl TaskKind {
    /// As the configuration spells it.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Landmarks => "landmarks",
            TaskKind::Structures => "structures",
        }
    }
}

impl Task {
    pub fn kind(&self) -> TaskKind {
        match self {
            Task::Landmarks { .. } => TaskKind::Landmarks,
            Task::Structures { .. } => TaskKind::Structures,
        }
    }

    /// Label names in adapter order.
    pub fn label_names(&self) -> Vec<String> {
        match self {
            Task::Landmarks { names, .. } => names.clone(),
            Task::Structures { values } => values.iter().map(|v| v.to_string()).collect(),
        }
    }
}

/// The landmark regions of one slice at image resolution: 0 or 1 + landmark index.
pub fn landmark_regions(
    rows: usize,
    cols: usize,
    slice_k: Option<usize>,
    names: &[String],
    truth: &std::collections::BTreeMap<String, LandmarkTruth>,
    radius: f64,
) -> Array2<u8> {
    // Radius of each landmark's disk in this slice (a sphere cut at slice k).
    let disks: Vec<(usize, f64, f64, f64)> = names
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            let t = truth.get(n)?;
            let r2 = match (t.k, slice_k) {
                (Some(k), Some(sk)) => radius * radius - (sk as f64 - k).powi(2),
                _ => radius * radius,
            };
            (r2 > 0.0).then_some((i, t.row, t.column, r2))
        })
        .collect();
    Array2::from_shape_fn((rows, cols), |(r, c)| {
        let mut best = (0u8, f64::INFINITY);
        for &(i, tr, tc, r2) in &disks {
            let d2 = (r as f64 - tr).powi(2) + (c as f64 - tc).powi(2);
            if d2 <= r2 && d2 < best.1 {
                best = ((i + 1) as u8, d2);
            }
        }
        best.0
    })
}

/// Adapter labels of one slice at image resolution (0 = background).
pub fn slice_regions(task: &Task, case: &Case, slice: usize) -> Option<Array2<u8>> {
    let s = &case.slices[slice];
    let (rows, cols) = s.pixels.dim();
    match task {
        Task::Landmarks { names, radius } => Some(landmark_regions(
            rows,
            cols,
            s.k,
            names,
            &case.landmarks,
            *radius,
        )),
        Task::Structures { values } => {
            let labels = s.labels.as_ref()?;
            Some(labels.mapv(|v| {
                values
                    .iter()
                    .position(|x| *x == v)
                    .map_or(0, |i| (i + 1) as u8)
            }))
        }
    }
}

/// Image-resolution regions sampled at the centre of every feature cell.
pub fn cell_labels(regions: &Array2<u8>, fm: &FeatureMap) -> Array2<u8> {
    let (h, w) = fm.grid();
    let (rows, cols) = regions.dim();
    Array2::from_shape_fn((h, w), |(i, j)| {
        let (r, c) = fm.cell_to_pixel(i as f64, j as f64);
        let r = (r.round().max(0.0) as usize).min(rows - 1);
        let c = (c.round().max(0.0) as usize).min(cols - 1);
        regions[[r, c]]
    })
}

/// The centroid (row, column) of the pixels with `value` (None if there are none).
pub fn label_centroid(labels: &Array2<u8>, value: u8) -> Option<(f64, f64)> {
    centroid_where(labels, |v| *v == value)
}

/// The centroid (row, column) of the pixels where `inside` holds (None if there are none).
pub fn centroid_where<T>(map: &Array2<T>, inside: impl Fn(&T) -> bool) -> Option<(f64, f64)> {
    let (mut n, mut r, mut c) = (0.0, 0.0, 0.0);
    for ((i, j), v) in map.indexed_iter() {
        if inside(v) {
            n += 1.0;
            r += i as f64;
            c += j as f64;
        }
    }
    (n > 0.0).then(|| (r / n, c / n))
}

/// Per label value, its centroid in the case's slice k* (None where the slice has none or
/// no label map).
pub fn structure_centroids(case: &Case, values: &[u8]) -> Vec<Option<(f64, f64)>> {
    let Some(labels) = case.slices.get(case.center).and_then(|s| s.labels.as_ref()) else {
        return vec![None; values.len()];
    };
    values.iter().map(|v| label_centroid(labels, *v)).collect()
}

/// Label values (other than 0) present in the label maps of some cases, sorted.
pub fn structure_values<'a>(cases: impl IntoIterator<Item = &'a Case>) -> Vec<u8> {
    let mut values: Vec<u8> = cases
        .into_iter()
        .flat_map(|c| {
            c.slices
                .iter()
                .filter_map(|s| s.labels.as_ref())
                .flat_map(|l| l.iter().copied())
        })
        .filter(|v| *v > 0)
        .collect();
    values.sort_unstable();
    values.dedup();
    values
}
