//! The evaluation protocol of `EVALUATION.md`: the first N cases (sorted) are templates,
//! every other case is a test case; volumes are read as 9-slice sagittal stacks; landmark
//! accuracy within 10 pixels (3D from the stack, and the 2D localizer variant on slice k*),
//! IoU per structure, false positives on empty slices, timings. Works on any folder with
//! one of the two layouts.

use crate::adapter::{Adapter, AdapterError, Context, Method, TrainConfig, TrainingSlice};
use crate::align::{AlignTemplate, Prior};
use crate::backbone::{Backbone, BackboneError, FeatureMap};
use crate::dataset::{Case, Dataset, DatasetError, Layout};
use crate::features::FeatureCache;
use crate::patch::{self, LandmarkPatch, TemplateView};
use crate::postprocess::{self, Finding};
use crate::sam::{Point, PointLabel, Sam, SamMask};
use crate::templates::{self, Task};
use crate::window::Cells;
use ndarray::{Array2, Array3};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

pub const HIT_DISTANCE: f64 = 10.0;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Backbone(#[from] BackboneError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("{0}")]
    Setup(String),
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub templates: usize,
    pub method: Method,
    /// One binary adapter per label instead of one multi-label adapter.
    pub binary: bool,
    /// Refine structures with SAM's decoder.
    pub sam: Option<SamRefine>,
    /// Align the templates to each test case (landmarks).
    pub align: Option<AlignMode>,
    pub landmark_radius: f64,
    pub train: TrainConfig,
    pub png_dir: Option<PathBuf>,
    /// Templates are cases `template_offset..template_offset + templates` (folds).
    pub template_offset: usize,
    /// Applied to the test cases only (robustness check); templates stay as they are.
    pub augment: Augment,
    /// Which of the data set's tasks to train and measure (`None`: all it has).
    pub only: Option<TaskKind>,
    /// Volumes: test cases keep only their localizer slice k* (what the agent analyses by
    /// default, `slices = "center"`); the templates keep their stacks. The 3D landmarks
    /// then come from that one slice, so the 2D figures are the ones to read.
    pub localizer_only: bool,
}

pub use crate::templates::TaskKind;

/// A change of pose and protocol applied to test images (robustness check) or to copies of
/// the templates (`TrainConfig::augment`), with their label maps and landmarks:
/// in-plane rotation and scaling about the image centre, the rows optionally more than the
/// columns, a move along the rows (same image size; what leaves the field of view is lost,
/// what enters is 0), and an intensity gamma over each slice's range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Augment {
    pub rotate_deg: f64,
    pub scale: f64,
    /// The rows' scale relative to the columns' (1: the same): a taller or flatter body.
    pub stretch: f64,
    pub gamma: f64,
    /// The content moved down by this share of the rows (negative: up), after the turn
    /// and the scale: the field of view placed higher (towards the head, content down) or
    /// lower on the body.
    pub shift: f64,
}

impl Default for Augment {
    fn default() -> Self {
        Augment::NONE
    }
}

impl Augment {
    /// No change: what each of `TEMPLATE_AUGMENTS` changes one thing of.
    pub const NONE: Augment = Augment {
        rotate_deg: 0.0,
        scale: 1.0,
        stretch: 1.0,
        gamma: 1.0,
        shift: 0.0,
    };

    pub fn is_identity(&self) -> bool {
        *self == Augment::default()
    }

    /// A finite turn and finite factors above 0: anything else would map the images to
    /// nothing (or to NaN) without a word.
    pub fn is_valid(&self) -> bool {
        let factor = |f: f64| f.is_finite() && f > 0.0;
        self.rotate_deg.is_finite()
            && factor(self.scale)
            && factor(self.stretch)
            && factor(self.gamma)
            && self.shift.is_finite()
    }

    /// Where a pixel (row, column) of the original lands in the augmented image: turned,
    /// then scaled (the rows by `scale × stretch`), then moved along the rows.
    fn forward(&self, p: (f64, f64), rows: usize, cols: usize) -> (f64, f64) {
        let (cy, cx) = ((rows as f64 - 1.0) / 2.0, (cols as f64 - 1.0) / 2.0);
        let (ty, tx) = turn((p.0 - cy, p.1 - cx), self.rotate_deg);
        let down = self.shift * rows as f64;
        (
            cy + self.scale * self.stretch * ty + down,
            cx + self.scale * tx,
        )
    }

    /// Where a pixel of the augmented image comes from in the original: moved back,
    /// unstretched, then turned back and unscaled.
    fn inverse(&self, p: (f64, f64), rows: usize, cols: usize) -> (f64, f64) {
        let (cy, cx) = ((rows as f64 - 1.0) / 2.0, (cols as f64 - 1.0) / 2.0);
        let up = p.0 - self.shift * rows as f64;
        let (ty, tx) = turn(((up - cy) / self.stretch, p.1 - cx), -self.rotate_deg);
        let shrink = 1.0 / self.scale;
        (cy + shrink * ty, cx + shrink * tx)
    }

    pub fn apply(&self, case: &Case) -> Case {
        if self.is_identity() {
            return case.clone();
        }
        let mut out = case.clone();
        for s in &mut out.slices {
            let (rows, cols) = s.pixels.dim();
            let src = |r: usize, c: usize| self.inverse((r as f64, c as f64), rows, cols);
            let (lo, hi) = s
                .pixels
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            let gamma = |v: f32| {
                if self.gamma == 1.0 || hi <= lo {
                    v
                } else {
                    lo + (hi - lo) * ((v - lo) / (hi - lo)).max(0.0).powf(self.gamma as f32)
                }
            };
            let pixels = &s.pixels;
            s.pixels = Array2::from_shape_fn((rows, cols), |(r, c)| {
                let (y, x) = src(r, c);
                if y < -0.5 || x < -0.5 || y > rows as f64 - 0.5 || x > cols as f64 - 0.5 {
                    return 0.0;
                }
                gamma(crate::image::bilinear_at(pixels, y, x))
            });
            if let Some(labels) = &s.labels {
                s.labels = Some(Array2::from_shape_fn((rows, cols), |(r, c)| {
                    let (y, x) = src(r, c);
                    let (y, x) = (y.round(), x.round());
                    if y < 0.0 || x < 0.0 || y > rows as f64 - 1.0 || x > cols as f64 - 1.0 {
                        0
                    } else {
                        labels[[y as usize, x as usize]]
                    }
                }));
            }
        }
        if let Some(first) = case.slices.first() {
            let (rows, cols) = first.pixels.dim();
            for t in out.landmarks.values_mut() {
                (t.row, t.column) = self.forward((t.row, t.column), rows, cols);
            }
        }
        out
    }
}

/// An offset (row, column) turned by `deg` degrees, as `Augment` turns images.
fn turn((dy, dx): (f64, f64), deg: f64) -> (f64, f64) {
    let (sin, cos) = deg.to_radians().sin_cos();
    (cos * dy + sin * dx, -sin * dy + cos * dx)
}

/// The changes of pose and protocol the templates are copied with for `TrainConfig::augment`:
/// the magnitudes of the robustness check (`--rotate/--scale/--gamma`), one at a time.
pub const TEMPLATE_AUGMENTS: [Augment; 6] = [
    Augment {
        rotate_deg: 10.0,
        ..Augment::NONE
    },
    Augment {
        rotate_deg: -10.0,
        ..Augment::NONE
    },
    Augment {
        scale: 0.9,
        ..Augment::NONE
    },
    Augment {
        scale: 1.1,
        ..Augment::NONE
    },
    Augment {
        gamma: 0.7,
        ..Augment::NONE
    },
    Augment {
        gamma: 1.4,
        ..Augment::NONE
    },
];

/// The features of every slice of a case (cached).
pub fn case_features(
    case: &Case,
    backbone: &Backbone,
    cache: &FeatureCache,
) -> Result<Vec<FeatureMap>, BackboneError> {
    case.slices
        .iter()
        .map(|s| cache.features(backbone, &s.pixels).map(|(f, _)| f))
        .collect()
}

/// The moves of the field of view the templates are also copied with for the structures
/// (`TrainConfig::augment_shift`): a localizer's placement on the body varies, and a body
/// cut by the image's top edge is otherwise taken for the unlabelled one above the
/// templates' topmost (spine-mr s15, s18: L1 scored 0.05–0.31 at the edge).
pub const SHIFT_AUGMENTS: [Augment; 2] = [
    Augment {
        shift: -0.1,
        ..Augment::NONE
    },
    Augment {
        shift: 0.1,
        ..Augment::NONE
    },
];

/// The body's proportions the templates are also copied with for the structures
/// (`TrainConfig::augment_stretch`): the robustness check's `--stretch` both ways.
pub const STRETCH_AUGMENTS: [Augment; 2] = [
    Augment {
        stretch: 0.9,
        ..Augment::NONE
    },
    Augment {
        stretch: 1.1,
        ..Augment::NONE
    },
];

/// The copies of each template the structures are trained on beyond `TEMPLATE_AUGMENTS`
/// (the landmarks are not), in `augmented_templates`' order.
pub fn structure_augments(config: &TrainConfig) -> Vec<Augment> {
    let shift = SHIFT_AUGMENTS.iter().filter(|_| config.augment_shift);
    let stretch = STRETCH_AUGMENTS.iter().filter(|_| config.augment_stretch);
    shift.chain(stretch).copied().collect()
}

/// The templates changed by each of `TEMPLATE_AUGMENTS`, then by each of
/// `structure_augments`, template by template, with their features (cached).
pub fn augmented_templates(
    templates: &[(Case, Vec<FeatureMap>)],
    backbone: &Backbone,
    cache: &FeatureCache,
    config: &TrainConfig,
) -> Result<Vec<(Case, Vec<FeatureMap>)>, BackboneError> {
    let extra = structure_augments(config);
    let augments: Vec<&Augment> = TEMPLATE_AUGMENTS.iter().chain(&extra).collect();
    let progress = Progress::new(
        (templates.len() * augments.len()) as u64,
        "augmented templates",
    );
    let mut out = Vec::new();
    for (case, _) in templates {
        for a in &augments {
            let case = a.apply(case);
            let fms = case_features(&case, backbone, cache)?;
            out.push((case, fms));
            progress.bar.inc(1);
        }
    }
    progress.bar.finish_and_clear();
    Ok(out)
}

/// How SAM is prompted from a localized region, and when its mask replaces the region.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SamRefine {
    pub prompt: SamPrompt,
    /// Positive points drawn from the region (`Points`).
    pub points: usize,
    /// Keep SAM's mask only if its own predicted IoU reaches this...
    pub min_predicted_iou: f32,
    /// ...and its IoU with the adapter's region reaches this; otherwise keep the region.
    pub min_agreement: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum SamPrompt {
    /// Positive points drawn at random from the region.
    Points,
    /// The region's bounding box (LiteMedSAM was trained with boxes).
    Box,
    /// The bounding box and the region's score-weighted centre as a positive point.
    BoxCenter,
}

/// How the templates aligned to a test case (`align::Prior`) enter its landmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum AlignMode {
    /// As a prior in the choice among each landmark's candidate regions.
    Prior,
    /// As `Prior`, and a landmark with no region in slice k* takes the aligned position.
    Fill,
    /// Alone: the aligned templates' landmarks are the answer (no adapter).
    Only,
}

#[derive(Debug, Clone, Serialize)]
pub struct LandmarkStats {
    pub accuracy: f64,
    pub median_error: Option<f64>,
    pub p90_error: Option<f64>,
    pub absent: usize,
    pub cases: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct SegStats {
    pub iou: f64,
    pub cases: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    pub encoder_ms_per_slice: Option<f64>,
    pub train_s: f64,
    pub adapter_ms_per_slice: f64,
    /// The structures task's share of `adapter_ms_per_slice`: its own mean per slice
    /// (issue #7's goal is per adapter).
    pub structures_ms_per_slice: Option<f64>,
    /// Its mean over the localizer slices alone (k*), the one slice the agent analyses by
    /// default, which also learns the patient's appearance.
    pub centre_structures_ms: Option<f64>,
    pub sam_ms_per_call: Option<f64>,
    /// Share of SAM masks that passed the acceptance checks.
    pub sam_accepted: Option<f64>,
    /// Aligning all templates to one test case.
    pub align_ms_per_case: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub dataset: String,
    /// Whether the data set's images were read inverted (`Dataset::negatives`).
    pub negatives: bool,
    pub method: String,
    pub binary: bool,
    pub sam: Option<SamRefine>,
    pub align: Option<AlignMode>,
    pub guided: bool,
    /// Applied to the test cases.
    pub augment: Augment,
    pub backbone: String,
    pub templates: Vec<String>,
    pub test_cases: usize,
    pub landmark_radius: f64,
    pub landmarks: BTreeMap<String, LandmarkStats>,
    pub landmarks_2d: BTreeMap<String, LandmarkStats>,
    pub segmentation: BTreeMap<String, SegStats>,
    pub empty_slice_fp_rate: BTreeMap<String, f64>,
    pub timing: Timing,
    /// Per test case, what the summaries above are made of: which cases fail, and how.
    pub cases: BTreeMap<String, CaseResult>,
}

/// One test case's measurements (`Report::cases`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CaseResult {
    /// Per landmark, the error in pixels (3D for volumes); `None` when reported absent.
    pub landmarks: BTreeMap<String, Option<f64>>,
    /// Volumes: the 2D localizer variant on slice k*.
    pub landmarks_2d: BTreeMap<String, Option<f64>>,
    /// Per landmark, the answer: (row, column) in pixels, and for volumes the slice index
    /// as a third value; `None` when reported absent.
    pub points: BTreeMap<String, Option<Vec<f64>>>,
    /// Volumes: the answer (row, column) of the 2D localizer variant, in slice k*.
    pub points_2d: BTreeMap<String, Option<Vec<f64>>>,
    /// Per structure (label value), IoU in percent over the case's slices.
    pub iou: BTreeMap<String, f64>,
    /// With `--window`: the share of slice k*'s cells its structures were scored within
    /// (absent when they were scored over the whole slice).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_share: Option<f64>,
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    Some(sorted[idx.min(sorted.len() - 1)])
}

fn landmark_stats(errors: &[Option<f64>]) -> LandmarkStats {
    let mut found: Vec<f64> = errors.iter().flatten().copied().collect();
    found.sort_by(f64::total_cmp);
    let hits = found.iter().filter(|e| **e <= HIT_DISTANCE).count();
    LandmarkStats {
        accuracy: if errors.is_empty() {
            0.0
        } else {
            hits as f64 / errors.len() as f64
        },
        median_error: percentile(&found, 50.0),
        p90_error: percentile(&found, 90.0),
        absent: errors.len() - found.len(),
        cases: errors.len(),
    }
}

/// Adapters for one task: one multi-label, or one binary per label.
struct Trained {
    adapters: Vec<Adapter>,
}

impl Trained {
    /// The scores of all adapters' labels (`Adapter::scores`: without the rows, a chunk
    /// of cells at a time); each adapter's within the window `window` gives it, if any
    /// (`Adapter::scores_within`).
    fn scores(&self, fm: &FeatureMap, window: &WindowOf) -> Result<Array3<f32>, AdapterError> {
        let parts = self
            .adapters
            .iter()
            .map(|a| match window(a) {
                Some(cells) => a.scores_within(fm, &cells),
                None => a.scores(fm),
            })
            .collect::<Result<Vec<_>, _>>()?;
        concatenate_labels(&parts)
    }

    /// The scores of all adapters' labels, and per adapter the standardised rows they
    /// were computed from (`Adapter::scores_and_rows`).
    fn scores_and_rows(
        &self,
        fm: &FeatureMap,
    ) -> Result<(Array3<f32>, Vec<Array2<f32>>), AdapterError> {
        let (parts, rows): (Vec<Array3<f32>>, Vec<Array2<f32>>) = self
            .adapters
            .iter()
            .map(|a| a.scores_and_rows(fm))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        Ok((concatenate_labels(&parts)?, rows))
    }
}

/// The window an adapter scores a slice within (None: the whole slice).
type WindowOf<'a> = dyn Fn(&Adapter) -> Option<Cells> + 'a;

/// No window: every adapter scores the whole slice.
fn whole_slices(_: &Adapter) -> Option<Cells> {
    None
}

/// Score planes of several adapters, one after the other along the labels.
fn concatenate_labels(parts: &[Array3<f32>]) -> Result<Array3<f32>, AdapterError> {
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    ndarray::concatenate(ndarray::Axis(0), &views)
        .map_err(|e| AdapterError::NoTraining(e.to_string()))
}

/// The cases with each feature map cut to its coarsest part; a map of one grid has none,
/// and asking for it there is a mistake in the options, not a no-op.
fn coarsest_parts(
    cases: &[&(Case, Vec<FeatureMap>)],
) -> Result<Vec<(Case, Vec<FeatureMap>)>, AdapterError> {
    cases
        .iter()
        .map(|(case, fms)| {
            let parts = fms
                .iter()
                .map(|fm| fm.coarsest().ok_or(AdapterError::OneGrid))
                .collect::<Result<_, _>>()?;
            Ok((case.clone(), parts))
        })
        .collect()
}

/// Trains adapters for `task` on the template cases' slices, and on `augmented` copies of
/// them (training material only: the layout, alignment and patches are the templates').
/// The cases are borrowed, so that a subset of them (`Recipe::train_without`) costs no copy of
/// their feature maps (a spine template's stacks and augmented copies on the hypercolumn:
/// 3.4 GB).
pub fn train_task<C: std::borrow::Borrow<(Case, Vec<FeatureMap>)>>(
    task: &Task,
    method: Method,
    binary: bool,
    templates: &[C],
    augmented: &[C],
    config: &TrainConfig,
    backbone: (&str, &str),
) -> Result<Vec<Adapter>, AdapterError> {
    let templates: Vec<&(Case, Vec<FeatureMap>)> = templates.iter().map(|c| c.borrow()).collect();
    let names = task.label_names();
    // A landmark's region is a disk drawn around a point, its edge no edge in the image:
    // negatives just outside it would teach the adapter an edge that is not there.
    let landmarks = matches!(task, Task::Landmarks { .. });
    // The landmarks without the structures' own copies (`augmented_templates`' order):
    // trained on the shifted ones, the spine's landmark adapter lost the cue that held
    // s08's run of vertebrae in place (first split: acc 1.00 → 0.87, s08's five landmarks
    // a whole vertebra off).
    let extra = structure_augments(config).len();
    let per = TEMPLATE_AUGMENTS.len() + extra;
    let augmented: Vec<&(Case, Vec<FeatureMap>)> = if landmarks && extra > 0 {
        augmented
            .chunks(per)
            .flat_map(|copies| copies.iter().take(TEMPLATE_AUGMENTS.len()))
            .map(|c| c.borrow())
            .collect()
    } else {
        augmented.iter().map(|c| c.borrow()).collect()
    };
    let for_task = TrainConfig {
        borders: config.borders && !landmarks,
        coarse_landmarks: config.coarse_landmarks && landmarks,
        window: config.window && !landmarks,
        identity: config.identity && !landmarks,
        stack_fill: config.stack_fill && !landmarks,
        stack_bound: config.stack_bound && !landmarks,
        stack_blend: config.stack_blend && !landmarks,
        stack_carry: config.stack_carry && !landmarks,
        appearance: config.appearance && !landmarks,
        context: Context {
            position: config.context.position && (landmarks || !config.landmark_position),
            ..config.context.clone()
        },
        ..config.clone()
    };
    let config = &for_task;
    // What the adapters will read (`Adapter::features`), for everything trained here.
    let (templates_read, augmented_read);
    let (templates, augmented) = if config.coarse_landmarks {
        templates_read = coarsest_parts(&templates)?;
        augmented_read = coarsest_parts(&augmented)?;
        (
            templates_read.iter().collect::<Vec<_>>(),
            augmented_read.iter().collect::<Vec<_>>(),
        )
    } else {
        (templates, augmented)
    };
    let mut material: Vec<(Array2<u8>, &FeatureMap)> = Vec::new();
    for (case, fms) in templates.iter().chain(&augmented) {
        for (i, fm) in fms.iter().enumerate() {
            if let Some(regions) = templates::slice_regions(task, case, i) {
                material.push((templates::cell_labels(&regions, fm), fm));
            }
        }
    }
    let groups: Vec<Vec<usize>> = if binary {
        (0..names.len()).map(|l| vec![l]).collect()
    } else {
        vec![(0..names.len()).collect()]
    };
    let mut out = Vec::new();
    for group in groups {
        let slices: Vec<TrainingSlice> = material
            .iter()
            .map(|(cells, fm)| TrainingSlice {
                features: fm,
                cells: cells.mapv(|v| {
                    group
                        .iter()
                        .position(|&l| l + 1 == v as usize)
                        .map_or(0, |p| (p + 1) as u8)
                }),
            })
            .collect();
        let labels = group.iter().map(|&l| names[l].clone()).collect();
        let mut a = Adapter::train(method, labels, &slices, config.clone(), backbone)?;
        if let Task::Landmarks { radius, names } = task {
            a.landmark_radius = Some(*radius);
            // The landmarks in the localizer slice k* of each template.
            let points = template_points(&templates, names);
            if config.shape {
                a.shape =
                    crate::postprocess::ShapeModel::fit(&points).map(|s| s.with_pose(config.pose));
            }
            if config.patches {
                a.patches = landmark_patches(&templates, &points, &group, names)?;
            }
            if config.votes {
                a.votes = landmark_votes(
                    &a,
                    templates.iter().chain(&augmented).copied(),
                    &group,
                    names,
                    *radius,
                )?;
            }
            if config.align {
                a.alignment = templates
                    .iter()
                    .zip(points)
                    .map(|((case, fms), p)| AlignTemplate::new(&fms[case.center], p))
                    .collect();
            }
        }
        if let (Task::Structures { values }, true) = (task, config.shape) {
            let values: Vec<u8> = group.iter().map(|&l| values[l]).collect();
            let centroids: Vec<Vec<Option<(f64, f64)>>> = templates
                .iter()
                .map(|(case, _)| templates::structure_centroids(case, &values))
                .collect();
            a.shape =
                crate::postprocess::ShapeModel::fit(&centroids).map(|s| s.with_pose(config.pose));
        }
        if let (Task::Structures { values }, true) = (task, config.stack_anchor) {
            let values: Vec<u8> = group.iter().map(|&l| values[l]).collect();
            // A template with a slice unlabelled teaches nothing: its maps would not line
            // up with its slices.
            let stacks = templates.iter().filter_map(|(case, _)| {
                let maps: Option<Vec<&Array2<u8>>> =
                    case.slices.iter().map(|s| s.labels.as_ref()).collect();
                Some((maps?, case.center))
            });
            let reach = crate::stack::learn_reach(stacks.clone(), &values);
            // Templates of one slice each teach nothing here: the file stays as before.
            if reach.iter().any(Option::is_some) {
                a.stack_reach = reach;
            }
            // Per structure, what was learned per step out, for the log.
            fn per_step<T: Copy>(learned: &[Vec<Option<T>>], show: fn(T) -> String) -> String {
                let steps = |d: &Vec<Option<T>>| {
                    d.iter()
                        .map(|d| d.map_or("-".into(), show))
                        .collect::<Vec<_>>()
                        .join(" / ")
                };
                learned.iter().map(steps).collect::<Vec<_>>().join(", ")
            }
            // What was learned, if the option is on and it learned anything: templates of
            // one slice each teach nothing, and the file stays as before.
            fn kept<T>(learned: Vec<Vec<Option<T>>>) -> Option<Vec<Vec<Option<T>>>> {
                learned
                    .iter()
                    .flatten()
                    .any(Option::is_some)
                    .then_some(learned)
            }
            let share = |d: f64| format!("{d:.2}");
            let on = |on: bool, learn: fn(_, &[u8]) -> Vec<Vec<Option<f64>>>| {
                kept(if on {
                    learn(stacks.clone(), &values)
                } else {
                    Vec::new()
                })
            };
            if let Some(carry) = on(config.stack_carry, crate::stack::learn_carry) {
                log::info!(
                    "stack carry: structures a slice misses carried over from the slice next in where every template's section continues (share of the templates' sections continuing, per step out) {}",
                    per_step(&carry, share)
                );
                a.stack_carry = carry;
            }
            if let Some(depth) = on(config.stack_fill, crate::stack::learn_depth) {
                log::info!(
                    "stack fill: structures filled from the slice next in, eroded by (equivalent radii per step out) {}",
                    per_step(&depth, share)
                );
                a.stack_depth = depth;
            }
            if let Some(bound) = on(config.stack_bound, crate::stack::learn_bound) {
                log::info!(
                    "stack bound: structures bounded by the slice next in, grown by (equivalent radii per step out) {}",
                    per_step(&bound, share)
                );
                a.stack_bound = bound;
            }
            let blend = config
                .stack_blend
                .then(|| crate::stack::learn_blend(stacks.clone(), &values))
                .and_then(kept);
            if let Some(blend) = blend {
                log::info!(
                    "stack blend: outermost structures halfway to the slice next in, scaled by (rows × columns per step out) {}",
                    per_step(&blend, |[r, c]| format!("{r:.2} × {c:.2}"))
                );
                a.stack_blend = blend;
            }
        }
        if let (Task::Structures { values }, true) = (task, config.window) {
            let values: Vec<u8> = group.iter().map(|&l| values[l]).collect();
            let names = template_landmarks(&templates);
            let points = template_points(&templates, &names);
            let stacks = templates.iter().zip(points).map(|((case, _), points)| {
                let maps = case
                    .slices
                    .iter()
                    .filter_map(|s| s.labels.as_ref())
                    .collect();
                (points, maps)
            });
            a.window = crate::window::LandmarkWindow::learn(names.clone(), stacks, &values);
            match &a.window {
                Some(w) => log::info!(
                    "structures' window: they reach {:.3} of the side of the box of {} landmarks past it",
                    w.share,
                    names.len()
                ),
                None => log::warn!(
                    "structures' window: no template has every landmark; scored over whole slices"
                ),
            }
        }
        if let (Task::Structures { values }, true) = (task, config.identity) {
            let values: Vec<u8> = group.iter().map(|&l| values[l]).collect();
            let names = template_landmarks(&templates);
            let points = template_points(&templates, &names);
            let centres = templates
                .iter()
                .zip(points)
                .filter_map(|((case, _), points)| {
                    let map = case.slices.get(case.center)?.labels.as_ref()?;
                    Some((points, map))
                });
            a.identity = crate::identity::LandmarkLinks::learn(&names, centres, &values);
            match &a.identity {
                Some(i) => log::info!(
                    "structures named by the landmarks inside them: {}",
                    i.landmarks
                        .iter()
                        .zip(&values)
                        .map(|(n, v)| format!("{v} ← {}", n.as_deref().unwrap_or("-")))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => log::warn!(
                    "structures' names: no landmark lies inside one structure in every template"
                ),
            }
        }
        if let (Task::Structures { values }, true) = (task, config.atlas) {
            let values: Vec<u8> = group.iter().map(|&l| values[l]).collect();
            let maps = templates
                .iter()
                .flat_map(|(case, _)| case.slices.iter().filter_map(|s| s.labels.as_ref()));
            a.atlas = crate::atlas::StructureAtlas::fit(maps, &values);
        }
        if let (Task::Structures { values }, true) = (task, config.enclosed) {
            let values: Vec<u8> = group.iter().map(|&l| values[l]).collect();
            let maps = templates.iter().filter_map(|(case, _)| {
                case.slices.get(case.center).and_then(|s| s.labels.as_ref())
            });
            let sizes: &[f32] = if config.enclosed_sizes {
                &crate::enclosed::SIZES
            } else {
                &[1.0]
            };
            a.enclosed = crate::enclosed::EnclosedModel::fit(maps, &values, sizes);
        }
        if let (Task::Structures { values }, true) = (task, config.convex) {
            let values: Vec<u8> = group.iter().map(|&l| values[l]).collect();
            let maps = templates.iter().filter_map(|(case, _)| {
                case.slices.get(case.center).and_then(|s| s.labels.as_ref())
            });
            let convex = crate::convex::learn(maps.clone(), &values);
            // None convex: the file stays as it was.
            if convex.iter().any(|c| *c) {
                if config.ellipse {
                    let ellipse = crate::convex::learn_ellipse(maps, &values, &convex);
                    log::info!(
                        "convex structures' ellipses: {}",
                        values
                            .iter()
                            .zip(&ellipse)
                            .map(|(v, e)| match e {
                                Some(s) => format!("{v} at scale {s:.2}"),
                                None => format!("{v} none"),
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    if ellipse.iter().any(Option::is_some) {
                        a.ellipse = ellipse;
                    }
                }
                a.convex = convex;
            }
        }
        out.push(a);
    }
    Ok(out)
}

/// Every landmark name the templates have, sorted.
fn template_landmarks(templates: &[&(Case, Vec<FeatureMap>)]) -> Vec<String> {
    let names: std::collections::BTreeSet<&String> = templates
        .iter()
        .flat_map(|(c, _)| c.landmarks.keys())
        .collect();
    names.into_iter().cloned().collect()
}

/// Per template, the points of the landmarks `names` in that order (`None` where it lacks
/// one).
fn template_points(
    templates: &[&(Case, Vec<FeatureMap>)],
    names: &[String],
) -> Vec<Vec<Option<Pixel>>> {
    templates
        .iter()
        .map(|(case, _)| {
            names
                .iter()
                .map(|n| case.landmarks.get(n).map(|t| (t.row, t.column)))
                .collect()
        })
        .collect()
}

/// One slice's structures as `scout eval` takes them before SAM: the scores at image
/// resolution, refined to the edges with `guided`, then the structure steps through
/// `anchor` (`step`: the slice's place from the stack's localizer slice, 0; `named`: the
/// points of the landmarks naming the structures there); each adapter scored within the
/// window `window` gives it. Returns the findings and the scores.
#[allow(clippy::too_many_arguments)]
fn slice_structures(
    trained: &Trained,
    fm: &FeatureMap,
    s: &crate::dataset::Slice,
    guided: bool,
    anchor: &mut crate::stack::Anchor,
    step: isize,
    window: &WindowOf,
    named: &[Option<(f64, f64)>],
) -> Result<(Vec<Option<Finding>>, Array3<f32>), EvalError> {
    // After the centre slice, only the cells its structures' reach needs.
    let reach = anchor.window(s.pixels.dim(), fm.grid());
    let narrowed = |a: &Adapter| Cells::narrowed(window(a), reach.clone(), fm.grid());
    let mut scores = trained.scores(fm, &narrowed)?;
    anchor.weigh(&mut scores, fm, trained.adapters.first(), step);
    let (rows, cols) = s.pixels.dim();
    let mut up = postprocess::upsample_scores(&scores, rows, cols);
    if guided {
        let guide = crate::image::normalize(&s.pixels).map_err(BackboneError::from)?;
        postprocess::refine_to_edges(&mut up, &guide, fm.grid().0);
    }
    let found = anchor.structures(
        &mut up,
        trained.adapters.first(),
        step,
        crate::stack::cell_side(&scores, rows, cols),
        named,
    );
    Ok((found, up))
}

/// The structures' last step, after SAM's redraws, as the agent takes it
/// (`Adapter::close_gaps`): `found` in a slice read as `fm`, `up` its scores at image
/// resolution.
fn close_gaps(trained: &Trained, fm: &FeatureMap, found: &mut [Option<Finding>], up: &Array3<f32>) {
    if let Some(a) = trained.adapters.first() {
        let cell = crate::patch::cell_px((fm.image_rows, fm.image_columns), fm.grid());
        a.close_gaps(found, cell, up);
    }
}

/// Slice k*'s structures as the landmarks task took them for `extremes` (SAM's redraws
/// included), with what they cost: the structures task would take them again to the bit.
struct CentreStructures {
    found: Vec<Option<Finding>>,
    /// What k* passes on to the stack's other slices.
    anchor: crate::stack::Anchor,
    /// Per decoder call, the structure and whether SAM's mask was accepted.
    calls: Vec<(usize, bool)>,
    adapter_ms: f64,
    sam_ms: f64,
}

/// What a step that leaves each template out in turn trains its adapters from, as the
/// adapters it serves were trained: the templates, their `augmented` copies
/// (`TEMPLATE_AUGMENTS` per template, in order), the method, the options and the
/// backbone's (id, checksum). Multi-label adapters: the steps read one adapter per task.
#[derive(Clone, Copy)]
pub struct Recipe<'a> {
    pub templates: &'a [(Case, Vec<FeatureMap>)],
    pub augmented: &'a [(Case, Vec<FeatureMap>)],
    pub method: Method,
    pub config: &'a TrainConfig,
    pub backbone: (&'a str, &'a str),
}

impl Recipe<'_> {
    /// Whether a template can be left out: with one, no template is left to train on
    /// without it, and the leave-one-out steps learn nothing.
    fn leaves_some_in(&self) -> bool {
        self.templates.len() > 1
    }

    /// The adapters for `task` trained on every template but the `i`th and the augmented
    /// copies of those: what the agent would bring to that template were it a new case.
    fn train_without(&self, i: usize, task: &Task) -> Result<Vec<Adapter>, AdapterError> {
        let per = (self.augmented.len() / self.templates.len().max(1)).max(1);
        let others: Vec<_> = self
            .templates
            .iter()
            .enumerate()
            .filter_map(|(k, t)| (k != i).then_some(t))
            .collect();
        let others_augmented: Vec<_> = self
            .augmented
            .iter()
            .enumerate()
            .filter_map(|(k, t)| (k / per != i).then_some(t))
            .collect();
        train_task(
            task,
            self.method,
            false,
            &others,
            &others_augmented,
            self.config,
            self.backbone,
        )
    }
}

/// The landmarks of one slice k* as the agent places them with `adapter` (one
/// multi-label adapter, no alignment prior): the layout's choice of regions, the layout
/// fill, the votes, the template patches and the structures' extremes on `masks` (label
/// value, SAM's accepted mask). The calibration itself is not taken off.
fn centre_landmarks(
    adapter: &Adapter,
    fm: &FeatureMap,
    s: &crate::dataset::Slice,
    radius: f64,
    masks: &[(u8, &Array2<bool>)],
) -> Result<Vec<Option<Finding>>, EvalError> {
    let fm = adapter.features(fm);
    let (scores, rows) = adapter.scores_and_rows(&fm)?;
    let (r, c) = s.pixels.dim();
    let up = postprocess::upsample_scores(&scores, r, c);
    let shape = adapter.shape.as_ref();
    let mut found = postprocess::shaped_findings(&up, shape, None);
    if let (Some(shape), true) = (shape, adapter.train.layout_fill) {
        postprocess::fill_from_layout(&mut found, shape, radius, (r, c));
    }
    crate::votes::refine_findings(&mut found, &adapter.votes, rows.view(), &fm, scores.view());
    if adapter.patches.iter().any(Option::is_some) {
        let pixels = crate::image::normalize(&s.pixels).map_err(BackboneError::from)?;
        patch::refine_findings(&mut found, &adapter.patches, &pixels, &fm);
    }
    crate::extremes::refine_findings(&mut found, &adapter.extremes, masks, shape);
    Ok(found)
}

/// With `calibrate`: per landmark of `landmarks` (one multi-label adapter trained for
/// `task` by `recipe`), the offset its pipeline makes (`calibration::learn`): each
/// template in turn is left out, an adapter trained on the others places its landmarks
/// in its slice k* (`centre_landmarks`, with `landmarks`' extremes on `left_out`, SAM's
/// masks of `left_out_sam_masks`), and its errors against the template's own landmarks
/// are pooled. The offsets stay empty when no landmark has one.
pub fn learn_calibration(
    landmarks: &mut Adapter,
    task: &Task,
    recipe: Recipe,
    left_out: &[LeftOutMasks],
) -> Result<(), EvalError> {
    let (Task::Landmarks { radius, .. }, true) = (task, recipe.leaves_some_in()) else {
        return Ok(());
    };
    let mut errors: Vec<Vec<(f64, f64)>> = vec![Vec::new(); landmarks.labels.len()];
    for (i, (case, fms)) in recipe.templates.iter().enumerate() {
        let (Some(slice), Some(fm)) = (case.slices.get(case.center), fms.get(case.center)) else {
            continue;
        };
        let trained = recipe.train_without(i, task)?;
        let Some(mut adapter) = trained.into_iter().next() else {
            continue;
        };
        // The rules the templates chose together (learning them again on fewer templates
        // would change little and needs SAM's masks drawn from fewer still).
        adapter.extremes = landmarks.extremes.clone();
        let masks: Vec<(u8, &Array2<bool>)> = left_out
            .get(i)
            .into_iter()
            .flatten()
            .filter_map(|(v, m)| Some((*v, m.as_ref()?)))
            .collect();
        let found = centre_landmarks(&adapter, fm, slice, *radius, &masks)?;
        for ((name, f), errors) in adapter.labels.iter().zip(&found).zip(errors.iter_mut()) {
            let (Some(f), Some(t)) = (f, case.landmarks.get(name)) else {
                continue;
            };
            // A landmark marked in another slice than k* is not placed there.
            if t.k
                .zip(slice.k)
                .is_some_and(|(tk, k)| (tk - k as f64).abs() > 0.5)
            {
                continue;
            }
            errors.push((f.point.0 - t.row, f.point.1 - t.column));
        }
    }
    let offsets: Vec<Option<[f64; 2]>> = errors
        .iter()
        .map(|e| crate::calibration::learn(e))
        .collect();
    for ((name, o), e) in landmarks.labels.iter().zip(&offsets).zip(&errors) {
        if let Some([r, c]) = o {
            log::info!(
                "landmark {name}: offset ({r:.2}, {c:.2}) px taken off, from {} left-out templates",
                e.len()
            );
        }
    }
    if offsets.iter().any(Option::is_some) {
        landmarks.calibration = offsets;
    }
    Ok(())
}

/// One template's structures as SAM drew them when the template was left out
/// (`left_out_sam_masks`): per structure SAM redraws, its label value and SAM's accepted
/// mask.
pub type LeftOutMasks = Vec<(u8, Option<Array2<bool>>)>;

/// With `extremes`, per template: SAM's masks of the structures `structures` redraws
/// (label values `values`, score order) in its slice k*, as the agent would draw them
/// were the template a new case: the structures found by an adapter trained by `recipe`
/// (as `structures` was) on the other templates, then redrawn by SAM
/// (`Sam::redraw_structures`); None where SAM's mask was not accepted. A box drawn around
/// the template's own mask would hand SAM the extremes the rules read (a box's corner is
/// the costophrenic angle).
pub fn left_out_sam_masks(
    structures: &Adapter,
    values: &[u8],
    recipe: Recipe,
    sam: &Sam,
) -> Result<Vec<LeftOutMasks>, EvalError> {
    // Nothing to draw: no structure adapters to train, or no templates to train them on
    // (and `extremes::learn` takes no rule from one template).
    if !structures.sam_redraw.contains(&true) || !recipe.leaves_some_in() {
        return Ok(vec![Vec::new(); recipe.templates.len()]);
    }
    let task = Task::Structures {
        values: values.to_vec(),
    };
    let mut out = Vec::new();
    for (i, (case, fms)) in recipe.templates.iter().enumerate() {
        let (Some(slice), Some(fm)) = (case.slices.get(case.center), fms.get(case.center)) else {
            out.push(Vec::new());
            continue;
        };
        let adapters = recipe.train_without(i, &task)?;
        let left_out = Trained { adapters };
        let (mut found, up) = slice_structures(
            &left_out,
            fm,
            slice,
            recipe.config.guided,
            &mut crate::stack::Anchor::default(),
            0,
            &whole_slices,
            &[],
        )?;
        let calls = sam.redraw_structures(fm, &mut found, |l| structures.redraws(l), &up)?;
        out.push(
            calls
                .into_iter()
                .filter_map(|(l, accepted)| {
                    let mask = found
                        .get(l)?
                        .as_ref()
                        .filter(|_| accepted)
                        .map(|f| f.mask.clone());
                    Some((*values.get(l)?, mask))
                })
                .collect(),
        );
    }
    Ok(out)
}

/// With `extremes`: per landmark adapter among `landmarks` (trained for `task` on
/// `templates`), the extreme of a structure SAM redraws that places each landmark
/// (`extremes::learn`, on each template's true masks, those masks without the detail
/// finer than the cells of `sam`'s masks, and `left_out`, the SAM masks of
/// `left_out_sam_masks`; when several structures have one, the one SAM's masks keep
/// closest). The rules stay empty when no landmark has one.
pub fn learn_extremes(
    landmarks: &mut [Adapter],
    task: &Task,
    templates: &[(Case, Vec<FeatureMap>)],
    left_out: &[LeftOutMasks],
    sam: &Sam,
) {
    let Task::Landmarks { radius, .. } = task else {
        return;
    };
    let mut drawn: Vec<u8> = left_out.iter().flatten().map(|(v, _)| *v).collect();
    drawn.sort_unstable();
    drawn.dedup();
    // Per structure, each template's true mask in slice k*, and that mask without the
    // detail finer than a cell of SAM's masks on its image.
    let truths: Vec<Vec<Option<_>>> = drawn
        .iter()
        .map(|&v| {
            templates
                .iter()
                .map(|(case, _)| {
                    let labels = case.slices.get(case.center)?.labels.as_ref()?;
                    let truth = Some(labels.mapv(|x| x == v)).filter(|m| m.iter().any(|x| *x))?;
                    let (rows, cols) = truth.dim();
                    let coarse = crate::extremes::open(&truth, sam.mask_cell(rows, cols));
                    Some((truth, coarse))
                })
                .collect()
        })
        .collect();
    for a in landmarks.iter_mut() {
        let rules: Vec<Option<crate::extremes::Extreme>> = a
            .labels
            .iter()
            .map(|name| {
                drawn
                    .iter()
                    .zip(&truths)
                    .filter_map(|(&v, truths)| {
                        // Every template: its landmark in slice k*, its true mask there.
                        let views = templates
                            .iter()
                            .zip(truths)
                            .zip(left_out)
                            .map(|(((case, _), truth), drawn)| {
                                let t = case.landmarks.get(name)?;
                                let k = case.slices.get(case.center)?.k;
                                if t.k.zip(k).is_some_and(|(tk, k)| (tk - k as f64).abs() > 0.5) {
                                    return None;
                                }
                                let (truth, coarse) = truth.as_ref()?;
                                Some(crate::extremes::TemplateView {
                                    landmark: (t.row, t.column),
                                    truth,
                                    coarse,
                                    sam: drawn.iter().find(|(s, _)| *s == v)?.1.as_ref(),
                                })
                            })
                            .collect::<Option<Vec<_>>>()?;
                        crate::extremes::learn(v, &views, *radius)
                    })
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|(rule, on_sam)| {
                        log::info!(
                            "landmark {name}: at structure {}'s extreme {:?} (band {} px{}); SAM's masks of the left-out templates keep it {on_sam:.1} px off",
                            rule.structure,
                            rule.direction,
                            rule.band,
                            if rule.fallback { ", where the adapter finds none" } else { "" }
                        );
                        rule
                    })
            })
            .collect();
        if rules.iter().any(Option::is_some) {
            a.extremes = rules;
        }
    }
}

/// With `sam_redraw`: per structure adapter among `adapters` (trained for `task` on
/// `templates`), which of its structures SAM's decoder redraws (`Sam::learn_redraws` on
/// each template's slice k*); the flags stay empty when it redraws none.
pub fn learn_sam_redraws(
    adapters: &mut [Adapter],
    task: &Task,
    templates: &[(Case, Vec<FeatureMap>)],
    sam: &Sam,
) -> Result<(), BackboneError> {
    let Task::Structures { values } = task else {
        return Ok(());
    };
    let names = task.label_names();
    for a in adapters.iter_mut() {
        // An adapter's labels are the task's names, in the order of its group.
        let values: Vec<u8> = a
            .labels
            .iter()
            .filter_map(|l| names.iter().position(|n| n == l).map(|i| values[i]))
            .collect();
        let slices = templates.iter().filter_map(|(case, fms)| {
            let labels = case.slices.get(case.center)?.labels.as_ref()?;
            Some((fms.get(case.center)?, labels))
        });
        let redraw = sam.learn_redraws(slices, &values)?;
        if redraw.iter().any(|r| *r) {
            a.sam_redraw = redraw;
        }
    }
    Ok(())
}

/// Per label of `group`, the offset model of `votes`, fit on the cells near the landmark
/// in slice k* of the templates and their augmented copies (a copy counts as its
/// template when one is left out to choose the ridge strength).
fn landmark_votes<'a>(
    adapter: &Adapter,
    cases: impl Iterator<Item = &'a (Case, Vec<FeatureMap>)>,
    group: &[usize],
    names: &[String],
    radius: f64,
) -> Result<Vec<Option<crate::votes::LandmarkVotes>>, AdapterError> {
    let mut samples: Vec<crate::votes::Samples> =
        group.iter().map(|_| Default::default()).collect();
    let mut templates: Vec<&str> = Vec::new();
    for (case, fms) in cases {
        let t = match templates.iter().position(|n| *n == case.name) {
            Some(t) => t,
            None => {
                templates.push(&case.name);
                templates.len() - 1
            }
        };
        let fm = &fms[case.center];
        let rows = adapter.standardized_rows(fm)?;
        // Cells within the landmark radius plus one cell of the point.
        let cell = crate::patch::cell_px((fm.image_rows, fm.image_columns), fm.grid());
        let reach = radius + cell.0.max(cell.1);
        for (s, &l) in samples.iter_mut().zip(group) {
            if let Some(p) = case.landmarks.get(&names[l]) {
                s.add(rows.view(), fm, (p.row, p.column), reach, t);
            }
        }
    }
    Ok(samples
        .iter()
        .map(|s| {
            let reach = s
                .offsets
                .iter()
                .map(|o| o[0].hypot(o[1]))
                .fold(radius, f64::max);
            crate::votes::LandmarkVotes::fit(s, reach)
        })
        .collect())
}

/// Per label of `group`, the mean of the templates' patches around the landmark in their
/// slice k* (`points`: per template, per landmark).
fn landmark_patches(
    templates: &[&(Case, Vec<FeatureMap>)],
    points: &[Vec<Option<(f64, f64)>>],
    group: &[usize],
    names: &[String],
) -> Result<Vec<Option<LandmarkPatch>>, AdapterError> {
    let mut slices = Vec::new();
    for (case, fms) in templates {
        let pixels = crate::image::normalize(&case.slices[case.center].pixels)
            .map_err(|e| AdapterError::NoTraining(format!("{}: {e}", case.name)))?;
        let fm = &fms[case.center];
        slices.push((
            pixels,
            patch::cell_px((fm.image_rows, fm.image_columns), fm.grid()),
        ));
    }
    Ok(group
        .iter()
        .map(|&l| {
            let views: Vec<TemplateView> = slices
                .iter()
                .zip(points)
                .filter_map(|((pixels, cell_px), p)| {
                    Some(TemplateView {
                        pixels,
                        cell_px: *cell_px,
                        point: p.get(l).copied()??,
                    })
                })
                .collect();
            let (patch, check) = LandmarkPatch::fit_checked(&views);
            if let Some((before, after)) = check {
                log::info!(
                    "landmark {}: template patches, leave-one-out error {before:.2} -> {after:.2} cells: {}",
                    names[l],
                    if patch.is_some() { "kept" } else { "not used" }
                );
            }
            patch
        })
        .collect())
}

/// SAM's mask for one finding, prompted as `how` says (points drawn with `seed`).
pub fn refine_with_sam(
    sam: &Sam,
    fm: &FeatureMap,
    finding: &Finding,
    how: &SamRefine,
    seed: u64,
) -> Result<SamMask, BackboneError> {
    let pixels: Vec<(usize, usize)> = finding
        .mask
        .indexed_iter()
        .filter(|(_, v)| **v)
        .map(|(p, _)| p)
        .collect();
    let point = |(row, column): (f64, f64), label| Point { row, column, label };
    let mut prompts = Vec::new();
    match how.prompt {
        SamPrompt::Points => {
            let mut rng = crate::adapter::Rng::new(seed);
            for _ in 0..how.points.min(pixels.len()).max(1) {
                let (r, c) = pixels
                    .get(rng.below(pixels.len().max(1)))
                    .copied()
                    .unwrap_or((finding.point.0 as usize, finding.point.1 as usize));
                prompts.push(point((r as f64, c as f64), PointLabel::Foreground));
            }
        }
        SamPrompt::Box | SamPrompt::BoxCenter => {
            if how.prompt == SamPrompt::BoxCenter {
                prompts.push(point(finding.point, PointLabel::Foreground));
            }
            // Points first, then the box corners, as SAM's ONNX decoder expects.
            prompts.extend(crate::sam::box_prompt(&finding.mask).into_iter().flatten());
        }
    }
    sam.mask(fm, &prompts)
}

struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new(len: u64, what: &str) -> Progress {
        let bar = indicatif::ProgressBar::new(len);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(what.to_string());
        Progress { bar }
    }
}

pub fn evaluate(
    dataset: &Dataset,
    backbone: &Backbone,
    cache: &FeatureCache,
    sam: Option<&Sam>,
    opts: &EvalOptions,
) -> Result<Report, EvalError> {
    let n_templates = opts.templates.max(1);
    // A fold's templates may be the last cases: its test cases are all the others.
    let n_cases = dataset.cases.len();
    if opts.template_offset + n_templates > n_cases {
        return Err(EvalError::Setup(format!(
            "{n_cases} cases: no templates {}–{} among them",
            opts.template_offset + 1,
            opts.template_offset + n_templates
        )));
    }
    if n_cases <= n_templates {
        return Err(EvalError::Setup(format!(
            "{n_cases} cases: none left to test with {n_templates} templates"
        )));
    }
    let a = &opts.augment;
    if !a.is_valid() {
        return Err(EvalError::Setup(format!(
            "augmentation needs a finite rotation and shift, and scale, stretch and gamma > 0 (got {a:?})"
        )));
    }
    if opts.train.calibrate && (opts.binary || opts.align.is_some()) {
        // The left-out templates are placed by one multi-label adapter without the
        // alignment prior: their errors would not be the errors of such adapters.
        return Err(EvalError::Setup(
            "--calibrate needs one multi-label adapter without --align".into(),
        ));
    }
    if (opts.train.window || opts.train.identity)
        && (opts.train.extremes
            || dataset.landmark_names.is_empty()
            || opts.only == Some(TaskKind::Structures))
    {
        // The structures are scored around, or named by, the landmarks found: those come
        // first, and cannot wait for the structures' extremes.
        return Err(EvalError::Setup(
            "--window and --identity need the landmarks task (a data set with landmarks, not --only structures) and not --extremes".into(),
        ));
    }
    if (opts.sam.is_some() || opts.train.sam_redraw) && sam.is_none() {
        return Err(EvalError::Setup(
            "--sam and --sam-redraw need a SAM decoder for this backbone in the manifest".into(),
        ));
    }
    // Load every case and its features (cached on disk).
    let progress = Progress::new(dataset.cases.len() as u64, "features");
    let mut encoder_ms = Vec::new();
    let mut cases: Vec<(Case, Vec<FeatureMap>)> = Vec::new();
    let template_range = opts.template_offset..opts.template_offset + n_templates;
    for (i, name) in dataset.cases.iter().enumerate() {
        let case = dataset.load_case(name)?;
        let case = if template_range.contains(&i) {
            case
        } else if opts.localizer_only {
            opts.augment.apply(&case.localizer())
        } else {
            opts.augment.apply(&case)
        };
        let mut fms = Vec::new();
        for s in &case.slices {
            let t = Instant::now();
            let (fm, computed) = cache.features(backbone, &s.pixels)?;
            if computed {
                encoder_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            fms.push(fm);
        }
        cases.push((case, fms));
        progress.bar.inc(1);
    }
    progress.bar.finish_and_clear();

    // Templates first; the test cases are all the others.
    let mut cases = cases;
    cases.rotate_left(opts.template_offset);
    let (templ, tests) = cases.split_at(n_templates);
    let values = templates::structure_values(templ.iter().map(|(c, _)| c));
    match opts.only {
        Some(TaskKind::Landmarks) if dataset.landmark_names.is_empty() => {
            return Err(EvalError::Setup(
                "--only landmarks: the data set has no landmarks".into(),
            ))
        }
        Some(TaskKind::Structures) if values.is_empty() => {
            return Err(EvalError::Setup(
                "--only structures: the templates have no label maps".into(),
            ))
        }
        _ => {}
    }
    let bb = (backbone.id(), backbone.checksum());
    let mut timing = Timing {
        encoder_ms_per_slice: (!encoder_ms.is_empty())
            .then(|| encoder_ms.iter().sum::<f64>() / encoder_ms.len() as f64),
        ..Timing::default()
    };
    let mut report = Report {
        dataset: dataset
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        negatives: dataset.negatives,
        method: opts.method.to_string(),
        binary: opts.binary,
        sam: opts.sam,
        align: opts.align,
        guided: opts.train.guided,
        augment: opts.augment,
        backbone: backbone.id().to_string(),
        templates: templ.iter().map(|(c, _)| c.name.clone()).collect(),
        test_cases: tests.len(),
        landmark_radius: opts.landmark_radius,
        landmarks: BTreeMap::new(),
        landmarks_2d: BTreeMap::new(),
        segmentation: BTreeMap::new(),
        empty_slice_fp_rate: BTreeMap::new(),
        timing: Timing::default(),
        cases: BTreeMap::new(),
    };
    let augmented = if opts.train.augment {
        augmented_templates(templ, backbone, cache, &opts.train)?
    } else {
        Vec::new()
    };
    let config = TrainConfig {
        align: opts.train.align || opts.align.is_some(),
        ..opts.train.clone()
    };
    // The steps that leave each template out train as the adapters here were trained.
    let recipe = Recipe {
        templates: templ,
        augmented: &augmented,
        method: opts.method,
        config: &config,
        backbone: bb,
    };
    let train_timed = |task: &Task, timing: &mut Timing| -> Result<Trained, EvalError> {
        let t = Instant::now();
        let mut adapters = train_task(
            task,
            opts.method,
            opts.binary,
            templ,
            &augmented,
            &config,
            bb,
        )?;
        if let (true, Some(sam)) = (config.sam_redraw, sam) {
            learn_sam_redraws(&mut adapters, task, templ, sam)?;
        }
        timing.train_s += t.elapsed().as_secs_f64();
        Ok(Trained { adapters })
    };
    let mut adapter_ms = Vec::new();
    let mut structures_ms = Vec::new();
    let mut centre_ms = Vec::new();
    let mut sam_ms = Vec::new();
    let mut sam_accepted: Vec<bool> = Vec::new();
    let mut overlays: BTreeMap<String, Overlay> = BTreeMap::new();

    // With `extremes`, the structures SAM redraws place landmarks too: their adapter is
    // trained first.
    let landmarks_wanted =
        !dataset.landmark_names.is_empty() && opts.only != Some(TaskKind::Structures);
    let mut structures_trained = match (opts.train.extremes, sam) {
        (true, Some(_)) if landmarks_wanted && !values.is_empty() => {
            let task = Task::Structures {
                values: values.clone(),
            };
            Some(train_timed(&task, &mut timing)?)
        }
        _ => None,
    };

    // Per test case, its landmarks found in slice k* (in the data set's order): the
    // structures' `window`.
    let mut centre_points: BTreeMap<String, Vec<Option<(f64, f64)>>> = BTreeMap::new();
    // Per test case, with `extremes`: its slice k*'s structures as the landmarks took them.
    let mut centre_structures: BTreeMap<String, CentreStructures> = BTreeMap::new();
    // Landmarks.
    if landmarks_wanted {
        let task = Task::Landmarks {
            names: dataset.landmark_names.clone(),
            radius: opts.landmark_radius,
        };
        let mut trained = train_timed(&task, &mut timing)?;
        let mut left_out = Vec::new();
        let extremes = match (
            structures_trained
                .as_ref()
                .and_then(|t| Some((t, t.adapters.first()?))),
            sam,
        ) {
            (Some((st_trained, st)), Some(sam)) => {
                let t = Instant::now();
                left_out = left_out_sam_masks(st, &values, recipe, sam)?;
                learn_extremes(&mut trained.adapters, &task, templ, &left_out, sam);
                timing.train_s += t.elapsed().as_secs_f64();
                trained
                    .adapters
                    .first()
                    .filter(|a| !a.extremes.is_empty())
                    .map(|l| (l.extremes.clone(), st_trained, sam))
            }
            _ => None,
        };
        if let (true, Some(adapter)) = (opts.train.calibrate, trained.adapters.first_mut()) {
            let t = Instant::now();
            learn_calibration(adapter, &task, recipe, &left_out)?;
            timing.train_s += t.elapsed().as_secs_f64();
        }
        let names = &dataset.landmark_names;
        let mut errors3: Vec<Vec<Option<f64>>> = vec![Vec::new(); names.len()];
        let mut errors2: Vec<Vec<Option<f64>>> = vec![Vec::new(); names.len()];
        let progress = Progress::new(tests.len() as u64, "landmarks");
        let alignment = trained
            .adapters
            .first()
            .map_or(&[][..], |a| &a.alignment[..]);
        // Per label across the adapters (one per label with `binary`).
        let patches: Vec<Option<LandmarkPatch>> = trained
            .adapters
            .iter()
            .flat_map(|a| {
                if a.patches.is_empty() {
                    vec![None; a.labels.len()]
                } else {
                    a.patches.clone()
                }
            })
            .collect();
        let mut align_ms = Vec::new();
        for (ci, (case, fms)) in tests.iter().enumerate() {
            let fms_whole = fms;
            // The adapters of a task read the same part of a map (`Adapter::features`).
            let fms: Vec<_> = match trained.adapters.first() {
                Some(a) => fms.iter().map(|fm| a.features(fm)).collect(),
                None => fms.iter().map(std::borrow::Cow::Borrowed).collect(),
            };
            let prior = opts.align.map(|_| {
                let t = Instant::now();
                let p = Prior::estimate(
                    alignment,
                    &fms[case.center],
                    opts.train.seed ^ ((ci as u64) << 16),
                );
                align_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                p
            });
            let mut per_slice: Vec<Vec<Option<Finding>>> = Vec::new();
            for (si, (s, fm)) in case.slices.iter().zip(&fms).enumerate() {
                if let (Some(AlignMode::Only), Some(prior)) = (opts.align, &prior) {
                    let mut none = vec![None; prior.points.len()];
                    if si == case.center {
                        postprocess::fill_from_prior(&mut none, prior, s.pixels.dim());
                    }
                    per_slice.push(none);
                    continue;
                }
                // With `extremes`, slice k*'s structures as the structures task takes them
                // (their time is not the landmarks'), first: SAM's accepted masks rank the
                // landmarks' regions (fallback rules) and place landmarks on their extremes.
                let mut taken = None;
                if let (Some((_, structures, sam)), true) = (&extremes, si == case.center) {
                    let whole = &fms_whole[si];
                    let t = Instant::now();
                    let mut anchor = crate::stack::Anchor::default();
                    let (mut drawn, up) = slice_structures(
                        structures,
                        whole,
                        s,
                        opts.train.guided,
                        &mut anchor,
                        0,
                        &whole_slices,
                        &[],
                    )?;
                    let structures_ms = t.elapsed().as_secs_f64() * 1000.0;
                    let t = Instant::now();
                    let redraws = |l| structures.adapters.first().is_some_and(|a| a.redraws(l));
                    let calls = sam.redraw_structures(whole, &mut drawn, redraws, &up)?;
                    let sam_ms = t.elapsed().as_secs_f64() * 1000.0;
                    close_gaps(structures, whole, &mut drawn, &up);
                    taken = Some(CentreStructures {
                        found: drawn,
                        anchor,
                        calls,
                        adapter_ms: structures_ms,
                        sam_ms,
                    });
                }
                let masks: Vec<(u8, &Array2<bool>)> = taken.as_ref().map_or(Vec::new(), |c| {
                    c.calls
                        .iter()
                        .filter(|c| c.1)
                        .filter_map(|&(l, _)| Some((*values.get(l)?, &c.found[l].as_ref()?.mask)))
                        .collect()
                });
                let t = Instant::now();
                let (scores, feature_rows) = trained.scores_and_rows(fm)?;
                let (rows, cols) = s.pixels.dim();
                let up = postprocess::upsample_scores(&scores, rows, cols);
                let shape = trained.adapters.first().and_then(|a| a.shape.as_ref());
                let ranked = match &extremes {
                    Some((rules, ..)) => {
                        crate::extremes::prior(rules, &masks, opts.landmark_radius, prior.as_ref())
                    }
                    None => prior.clone(),
                };
                let mut found = postprocess::shaped_findings(&up, shape, ranked.as_ref());
                if let (Some(AlignMode::Fill), Some(prior), true) =
                    (opts.align, &prior, si == case.center)
                {
                    postprocess::fill_from_prior(&mut found, prior, (rows, cols));
                }
                if let (Some(shape), true) = (shape, opts.train.layout_fill && si == case.center) {
                    postprocess::fill_from_layout(
                        &mut found,
                        shape,
                        opts.landmark_radius,
                        (rows, cols),
                    );
                }
                // Per adapter (one per label with `binary`), on its own labels.
                let mut first = 0;
                for (a, a_rows) in trained.adapters.iter().zip(&feature_rows) {
                    let labels = first..first + a.labels.len();
                    first = labels.end;
                    if a.votes.is_empty() {
                        continue;
                    }
                    crate::votes::refine_findings(
                        &mut found[labels.clone()],
                        &a.votes,
                        a_rows.view(),
                        fm,
                        scores.slice(ndarray::s![labels, .., ..]),
                    );
                }
                if patches.iter().any(Option::is_some) {
                    let pixels = crate::image::normalize(&s.pixels).map_err(BackboneError::from)?;
                    patch::refine_findings(&mut found, &patches, &pixels, fm);
                }
                adapter_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                if let (Some((rules, ..)), true) = (&extremes, taken.is_some()) {
                    crate::extremes::refine_findings(&mut found, rules, &masks, shape);
                }
                // What the structures task, when it runs, would take again to the bit (it
                // redraws with SAM's decoder only where `--sam` does not refine instead).
                if let (Some(taken), true) = (
                    taken,
                    opts.sam.is_none() && opts.only != Some(TaskKind::Landmarks),
                ) {
                    centre_structures.insert(case.name.clone(), taken);
                }
                if let (Some(a), true) = (trained.adapters.first(), si == case.center) {
                    crate::calibration::refine_findings(&mut found, &a.calibration, shape);
                }
                per_slice.push(found);
            }
            let center = &per_slice[case.center];
            centre_points.insert(
                case.name.clone(),
                center.iter().map(|f| f.as_ref().map(|f| f.point)).collect(),
            );
            let mut points_3d: Vec<Option<(f64, f64, f64)>> = (0..names.len())
                .map(|l| {
                    let anchor = center[l]
                        .as_ref()
                        .filter(|_| opts.train.stack_anchor)
                        .map(|f| f.point);
                    let stack: Vec<(f64, Option<&Finding>)> = case
                        .slices
                        .iter()
                        .zip(&per_slice)
                        .map(|(s, f)| {
                            let f = f[l].as_ref().filter(|f| {
                                postprocess::near_anchor(f.point, anchor, opts.landmark_radius)
                            });
                            (s.k.unwrap_or(0) as f64, f)
                        })
                        .collect();
                    postprocess::landmark_3d(&stack)
                })
                .collect();
            let shape = trained.adapters.first().and_then(|a| a.shape.as_ref());
            if let (Some(shape), true, Layout::Volume) =
                (shape, opts.train.layout_fill, dataset.layout)
            {
                let placed: Vec<Option<bool>> = center
                    .iter()
                    .map(|f| f.as_ref().map(Finding::is_placed))
                    .collect();
                let mut depths: Vec<Option<f64>> =
                    points_3d.iter().map(|p| p.map(|p| p.2)).collect();
                postprocess::fill_depths(shape, &placed, &mut depths);
                for (p, d) in points_3d.iter_mut().zip(depths) {
                    if let (Some(p), Some(d)) = (p, d) {
                        p.2 = d;
                    }
                }
            }
            for (l, name) in names.iter().enumerate() {
                let Some(truth) = case.landmarks.get(name) else {
                    continue;
                };
                // The answer in slice k* (the image itself for image data sets).
                let answer_2d = center[l].as_ref().map(|f| vec![f.point.0, f.point.1]);
                match dataset.layout {
                    Layout::Image => {
                        let e = center[l].as_ref().map(|f| {
                            ((f.point.0 - truth.row).powi(2) + (f.point.1 - truth.column).powi(2))
                                .sqrt()
                        });
                        errors3[l].push(e);
                        let result = case_result(&mut report, &case.name);
                        result.landmarks.insert(name.clone(), e);
                        result.points.insert(name.clone(), answer_2d);
                    }
                    Layout::Volume => {
                        let p = points_3d[l];
                        let tk = truth.k.unwrap_or(0.0);
                        let e = p.map(|(r, c, k)| {
                            ((r - truth.row).powi(2)
                                + (c - truth.column).powi(2)
                                + (k - tk).powi(2))
                            .sqrt()
                        });
                        errors3[l].push(e);
                        let result = case_result(&mut report, &case.name);
                        result.landmarks.insert(name.clone(), e);
                        result
                            .points
                            .insert(name.clone(), p.map(|(r, c, k)| vec![r, c, k]));
                        // 2D localizer variant: slice k*, truth = centroid of label l+1 there.
                        if let Some(gt) = case.slices[case.center]
                            .labels
                            .as_ref()
                            .and_then(|lab| templates::label_centroid(lab, (l + 1) as u8))
                        {
                            let e = center[l].as_ref().map(|f| {
                                ((f.point.0 - gt.0).powi(2) + (f.point.1 - gt.1).powi(2)).sqrt()
                            });
                            errors2[l].push(e);
                            let result = case_result(&mut report, &case.name);
                            result.landmarks_2d.insert(name.clone(), e);
                            result.points_2d.insert(name.clone(), answer_2d);
                        }
                    }
                }
            }
            overlays.entry(case.name.clone()).or_default().landmarks = names
                .iter()
                .enumerate()
                .map(|(l, n)| {
                    (
                        center[l].as_ref().map(|f| f.point),
                        case.landmarks
                            .get(n)
                            .filter(|t| {
                                t.k.is_none_or(|k| {
                                    (k - case.slices[case.center].k.unwrap_or(0) as f64).abs() < 3.0
                                })
                            })
                            .map(|t| (t.row, t.column)),
                    )
                })
                .collect();
            progress.bar.inc(1);
        }
        progress.bar.finish_and_clear();
        timing.align_ms_per_case =
            (!align_ms.is_empty()).then(|| align_ms.iter().sum::<f64>() / align_ms.len() as f64);
        for (l, name) in names.iter().enumerate() {
            report
                .landmarks
                .insert(name.clone(), landmark_stats(&errors3[l]));
            if dataset.layout == Layout::Volume && !errors2[l].is_empty() {
                report
                    .landmarks_2d
                    .insert(name.clone(), landmark_stats(&errors2[l]));
            }
        }
    }

    // Structures, from the label values of the template label maps.
    if !values.is_empty() && opts.only != Some(TaskKind::Landmarks) {
        let task = Task::Structures {
            values: values.clone(),
        };
        let trained = match structures_trained.take() {
            Some(t) => t,
            None => train_timed(&task, &mut timing)?,
        };
        let mut ious: Vec<Vec<f64>> = vec![Vec::new(); values.len()];
        let mut empty = vec![(0usize, 0usize); values.len()];
        let mut window_shares: Vec<f64> = Vec::new();
        let progress = Progress::new(tests.len() as u64, "structures");
        for (ci, (case, fms)) in tests.iter().enumerate() {
            let mut inter = vec![0usize; values.len()];
            let mut union = vec![0usize; values.len()];
            // The localizer slice first: with `stack_anchor` its structures are the prior
            // of the stack's other slices and bound how far their regions reach there;
            // then outwards, each slice carried, filled, bounded and (the outermost) blended
            // by the one next in with `stack_carry`, `stack_fill`, `stack_bound` and
            // `stack_blend`.
            let mut anchor = crate::stack::Anchor::default();
            let points = centre_points.get(&case.name);
            for si in crate::stack::outwards(case.slices.len(), case.center) {
                let (Some(s), Some(fm)) = (case.slices.get(si), fms.get(si)) else {
                    continue;
                };
                let Some(gt) = s.labels.as_ref() else {
                    continue;
                };
                let t = Instant::now();
                // With `window`, the box of the landmarks found in slice k*, for every
                // slice on its grid (as the agent scores a stack).
                let on_centre_grid = case
                    .slices
                    .get(case.center)
                    .is_some_and(|c| c.pixels.dim() == s.pixels.dim());
                let window_of = |a: &Adapter| {
                    let (w, points) = (a.window.as_ref()?, points.filter(|_| on_centre_grid)?);
                    let points = w.points_of(&dataset.landmark_names, points);
                    w.cells(&points, opts.landmark_radius, s.pixels.dim(), fm.grid())
                };
                if let (Some(window), true) = (
                    trained.adapters.first().and_then(window_of),
                    si == case.center,
                ) {
                    let share = window.share_of(fm.grid());
                    window_shares.push(share);
                    case_result(&mut report, &case.name).window_share = Some(share);
                }
                let mut record_sam = |ms: f64, calls: &[(usize, bool)]| {
                    if !calls.is_empty() {
                        let each = ms / calls.len() as f64;
                        sam_ms.extend(std::iter::repeat_n(each, calls.len()));
                        sam_accepted.extend(calls.iter().map(|c| c.1));
                    }
                };
                let taken = if si == case.center {
                    centre_structures.remove(&case.name)
                } else {
                    None
                };
                let found = if let Some(taken) = taken {
                    anchor = taken.anchor;
                    adapter_ms.push(taken.adapter_ms);
                    structures_ms.push(taken.adapter_ms);
                    centre_ms.push(taken.adapter_ms);
                    record_sam(taken.sam_ms, &taken.calls);
                    taken.found
                } else {
                    let named = match (trained.adapters.first(), points) {
                        (
                            Some(Adapter {
                                identity: Some(i), ..
                            }),
                            Some(points),
                        ) => i.points_of(&dataset.landmark_names, points),
                        _ => Vec::new(),
                    };
                    let (mut found, up) = slice_structures(
                        &trained,
                        fm,
                        s,
                        opts.train.guided,
                        &mut anchor,
                        si as isize - case.center as isize,
                        &window_of,
                        &named,
                    )?;
                    let ms = t.elapsed().as_secs_f64() * 1000.0;
                    adapter_ms.push(ms);
                    structures_ms.push(ms);
                    if si == case.center {
                        centre_ms.push(ms);
                    }
                    if let (None, Some(sam), Some(a)) = (&opts.sam, sam, trained.adapters.first()) {
                        let t = Instant::now();
                        let calls = sam.redraw_structures(fm, &mut found, |l| a.redraws(l), &up)?;
                        record_sam(t.elapsed().as_secs_f64() * 1000.0, &calls);
                    }
                    close_gaps(&trained, fm, &mut found, &up);
                    found
                };
                let mut pred_masks: Vec<Option<Array2<bool>>> = Vec::with_capacity(values.len());
                for (l, f) in found.iter().enumerate() {
                    let mask = match (f, &opts.sam, sam) {
                        (Some(f), Some(how), Some(sam)) => {
                            let t = Instant::now();
                            let seed = opts.train.seed
                                ^ ((ci as u64) << 32)
                                ^ ((si as u64) << 8)
                                ^ l as u64;
                            let m = refine_with_sam(sam, fm, f, how, seed)?;
                            sam_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                            let accept = m.predicted_iou >= how.min_predicted_iou
                                && crate::sam::mask_iou(&m.mask, &f.mask) >= how.min_agreement;
                            sam_accepted.push(accept);
                            Some(if accept { m.mask } else { f.mask.clone() })
                        }
                        (Some(f), _, _) => Some(f.mask.clone()),
                        (None, _, _) => None,
                    };
                    pred_masks.push(mask);
                }
                for (l, v) in values.iter().enumerate() {
                    let gt_l = gt.mapv(|x| x == *v);
                    let n_gt = gt_l.iter().filter(|x| **x).count();
                    if let Some(m) = &pred_masks[l] {
                        inter[l] += m
                            .iter()
                            .zip(gt_l.iter())
                            .filter(|(a, b)| **a && **b)
                            .count();
                        union[l] += m
                            .iter()
                            .zip(gt_l.iter())
                            .filter(|(a, b)| **a || **b)
                            .count();
                    } else {
                        union[l] += n_gt;
                    }
                    if n_gt == 0 && dataset.layout == Layout::Volume {
                        empty[l].0 += 1;
                        empty[l].1 += usize::from(pred_masks[l].is_some());
                    }
                }
                if si == case.center {
                    let o = overlays.entry(case.name.clone()).or_default();
                    o.predicted = Some(pred_masks.iter().enumerate().fold(
                        Array2::zeros(s.pixels.dim()),
                        |mut acc: Array2<u8>, (l, m)| {
                            if let Some(m) = m {
                                acc.zip_mut_with(m, |a, b| {
                                    if *b {
                                        *a = (l + 1) as u8
                                    }
                                });
                            }
                            acc
                        },
                    ));
                    o.truth = Some(gt.mapv(|x| {
                        values
                            .iter()
                            .position(|v| *v == x)
                            .map_or(0, |i| (i + 1) as u8)
                    }));
                }
            }
            for l in 0..values.len() {
                if union[l] > 0 {
                    let iou = inter[l] as f64 / union[l] as f64;
                    ious[l].push(iou);
                    case_result(&mut report, &case.name)
                        .iou
                        .insert(values[l].to_string(), 100.0 * iou);
                }
            }
            progress.bar.inc(1);
        }
        progress.bar.finish_and_clear();
        if !window_shares.is_empty() {
            let n = window_shares.len() as f64;
            let (lo, hi) = window_shares
                .iter()
                .fold((f64::INFINITY, 0.0f64), |(a, z), &v| (a.min(v), z.max(v)));
            log::info!(
                "structures scored within the landmarks' window in {} of {} cases: {:.1} % of the cells (mean; {:.1}–{:.1} %)",
                window_shares.len(),
                tests.len(),
                100.0 * window_shares.iter().sum::<f64>() / n,
                100.0 * lo,
                100.0 * hi
            );
        }
        for (l, v) in values.iter().enumerate() {
            let n = ious[l].len();
            let iou = if n == 0 {
                0.0
            } else {
                100.0 * ious[l].iter().sum::<f64>() / n as f64
            };
            report
                .segmentation
                .insert(v.to_string(), SegStats { iou, cases: n });
            if dataset.layout == Layout::Volume && empty[l].0 > 0 {
                report
                    .empty_slice_fp_rate
                    .insert(v.to_string(), empty[l].1 as f64 / empty[l].0 as f64);
            }
        }
    }
    timing.adapter_ms_per_slice = if adapter_ms.is_empty() {
        0.0
    } else {
        adapter_ms.iter().sum::<f64>() / adapter_ms.len() as f64
    };
    let mean = |ms: &[f64]| (!ms.is_empty()).then(|| ms.iter().sum::<f64>() / ms.len() as f64);
    timing.structures_ms_per_slice = mean(&structures_ms);
    timing.centre_structures_ms = mean(&centre_ms);
    timing.sam_ms_per_call =
        (!sam_ms.is_empty()).then(|| sam_ms.iter().sum::<f64>() / sam_ms.len() as f64);
    timing.sam_accepted = (!sam_accepted.is_empty())
        .then(|| sam_accepted.iter().filter(|a| **a).count() as f64 / sam_accepted.len() as f64);
    report.timing = timing;

    if let Some(dir) = &opts.png_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| EvalError::Setup(format!("{}: {e}", dir.display())))?;
        for (case, _) in tests {
            if let Some(o) = overlays.get(&case.name) {
                let path = dir.join(format!("{}_{}.png", case.name, opts.method));
                o.write(&case.slices[case.center].pixels, &path)
                    .map_err(EvalError::Setup)?;
            }
        }
    }
    Ok(report)
}

fn case_result<'a>(report: &'a mut Report, case: &str) -> &'a mut CaseResult {
    report.cases.entry(case.to_string()).or_default()
}

/// (row, column) in image pixels.
type Pixel = (f64, f64);

/// What an overlay PNG shows for the localizer slice of a test case.
#[derive(Default)]
struct Overlay {
    /// Per landmark: (predicted, truth) points.
    landmarks: Vec<(Option<Pixel>, Option<Pixel>)>,
    predicted: Option<Array2<u8>>,
    truth: Option<Array2<u8>>,
}

impl Overlay {
    /// Grey image; truth outlines in green, predicted regions tinted red; landmarks as
    /// crosses (green truth, red prediction, joined by a yellow line).
    fn write(&self, pixels: &Array2<f32>, path: &std::path::Path) -> Result<(), String> {
        let norm = crate::image::normalize(pixels).map_err(|e| e.to_string())?;
        let (rows, cols) = norm.dim();
        let mut img = ::image::RgbImage::new(cols as u32, rows as u32);
        for ((r, c), v) in norm.indexed_iter() {
            let g = (v * 255.0) as u8;
            img.put_pixel(c as u32, r as u32, ::image::Rgb([g, g, g]));
        }
        if let Some(p) = &self.predicted {
            for ((r, c), v) in p.indexed_iter() {
                if *v > 0 {
                    let px = img.get_pixel_mut(c as u32, r as u32);
                    px.0 = [
                        px.0[0].saturating_add(90),
                        (px.0[1] as f32 * 0.6) as u8,
                        (px.0[2] as f32 * 0.6) as u8,
                    ];
                }
            }
        }
        if let Some(t) = &self.truth {
            for ((r, c), v) in t.indexed_iter() {
                let edge = *v > 0
                    && [(0i64, 1i64), (1, 0), (0, -1), (-1, 0)]
                        .iter()
                        .any(|(dr, dc)| {
                            let (nr, nc) = (r as i64 + dr, c as i64 + dc);
                            nr < 0
                                || nc < 0
                                || nr >= rows as i64
                                || nc >= cols as i64
                                || t[[nr as usize, nc as usize]] != *v
                        });
                if edge {
                    img.put_pixel(c as u32, r as u32, ::image::Rgb([0, 255, 0]));
                }
            }
        }
        let mut put = |r: f64, c: f64, colour: [u8; 3]| {
            let (r, c) = (r.round() as i64, c.round() as i64);
            if r >= 0 && c >= 0 && r < rows as i64 && c < cols as i64 {
                img.put_pixel(c as u32, r as u32, ::image::Rgb(colour));
            }
        };
        for (pred, truth) in &self.landmarks {
            if let (Some(p), Some(t)) = (pred, truth) {
                for s in 0..=20 {
                    let f = s as f64 / 20.0;
                    put(p.0 + (t.0 - p.0) * f, p.1 + (t.1 - p.1) * f, [255, 255, 0]);
                }
            }
            for (pt, colour) in [(truth, [0, 255, 0]), (pred, [255, 0, 0])] {
                if let Some((r, c)) = pt {
                    for d in -4..=4 {
                        put(r + d as f64, *c, colour);
                        put(*r, c + d as f64, colour);
                    }
                }
            }
        }
        img.save(path)
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The human-readable table of a report.
pub fn table(r: &Report) -> String {
    let mut out = format!(
        "{}{} — {}{}{}{}, backbone {}, templates {}, {} test cases, landmark radius {} px\n",
        r.dataset,
        if r.negatives {
            " (negatives, read inverted)"
        } else {
            ""
        },
        r.method,
        if r.binary {
            " (binary)"
        } else {
            " (multi-label)"
        },
        match r.align {
            None => String::new(),
            Some(AlignMode::Prior) => " + alignment prior".to_string(),
            Some(AlignMode::Fill) => " + alignment prior, filling absent landmarks".to_string(),
            Some(AlignMode::Only) => ", landmarks from the aligned templates alone".to_string(),
        } + if r.guided { " + guided filter" } else { "" },
        match &r.sam {
            None => String::new(),
            Some(h) => format!(
                " + SAM ({:?} prompt, accepted at predicted IoU ≥ {} and agreement ≥ {})",
                h.prompt, h.min_predicted_iou, h.min_agreement
            ),
        },
        r.backbone,
        r.templates.join(","),
        r.test_cases,
        r.landmark_radius
    );
    if !r.augment.is_identity() {
        out += &format!(
            "  test cases augmented: rotated {}°, scaled ×{} (rows ×{} more), gamma {}, moved down {} of the rows\n",
            r.augment.rotate_deg, r.augment.scale, r.augment.stretch, r.augment.gamma, r.augment.shift
        );
    }
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    for (title, m) in [
        ("landmarks", &r.landmarks),
        ("landmarks 2D (slice k*)", &r.landmarks_2d),
    ] {
        if m.is_empty() {
            continue;
        }
        out += &format!(
            "  {title:<26} {:>8} {:>8} {:>8} {:>7}\n",
            "acc@10", "median", "p90", "absent"
        );
        for (n, s) in m {
            out += &format!(
                "    {n:<24} {:>8.2} {:>8} {:>8} {:>4}/{}\n",
                s.accuracy,
                fmt(s.median_error),
                fmt(s.p90_error),
                s.absent,
                s.cases
            );
        }
    }
    if !r.segmentation.is_empty() {
        out += &format!(
            "  {:<26} {:>8} {:>12}\n",
            "structures (label)", "IoU", "empty FP"
        );
        for (n, s) in &r.segmentation {
            let fp = r
                .empty_slice_fp_rate
                .get(n)
                .map_or("-".to_string(), |v| format!("{v:.2}"));
            out += &format!("    {n:<24} {:>8.1} {:>12}\n", s.iou, fp);
        }
    }
    out += &format!(
        "  timing: encoder {} ms/slice, training {:.1} s, adapter {:.1} ms/slice{}{}\n",
        fmt(r.timing.encoder_ms_per_slice),
        r.timing.train_s,
        r.timing.adapter_ms_per_slice,
        r.timing.structures_ms_per_slice.map_or(String::new(), |v| {
            let centre = r.timing.centre_structures_ms;
            let centre = centre.map_or(String::new(), |c| format!(", k* {c:.1}"));
            format!(" (structures {v:.1}{centre})")
        }),
        r.timing.sam_ms_per_call.map_or(String::new(), |v| format!(
            ", SAM {v:.0} ms/call, {:.0} % of its masks kept",
            100.0 * r.timing.sam_accepted.unwrap_or(0.0)
        )) + &r
            .timing
            .align_ms_per_case
            .map_or(String::new(), |v| format!(", alignment {v:.0} ms/case"))
    );
    out
}

/// Mean and worst fold per landmark (accuracy) and structure (IoU), for `--folds`.
pub fn folds_table(reports: &[Report]) -> String {
    let mut out = format!(
        "{} folds (templates {}):\n  {:<46} {:>10} {:>10}\n",
        reports.len(),
        reports
            .iter()
            .map(|r| r.templates.join(","))
            .collect::<Vec<_>>()
            .join(" | "),
        "",
        "mean",
        "worst"
    );
    let mut line = |name: String, values: Vec<f64>, worst_is_min: bool| {
        if values.is_empty() {
            return;
        }
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let worst = if worst_is_min {
            values.iter().cloned().fold(f64::INFINITY, f64::min)
        } else {
            values.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
        };
        out.push_str(&format!("  {name:<46} {mean:>10.2} {worst:>10.2}\n"));
    };
    let first = &reports[0];
    for (title, pick) in [("acc@10", 0usize), ("acc@10 2D (slice k*)", 1usize)] {
        let names: Vec<&String> = if pick == 0 {
            first.landmarks.keys().collect()
        } else {
            first.landmarks_2d.keys().collect()
        };
        for n in names {
            let v: Vec<f64> = reports
                .iter()
                .filter_map(|r| {
                    if pick == 0 {
                        r.landmarks.get(n)
                    } else {
                        r.landmarks_2d.get(n)
                    }
                })
                .map(|s| s.accuracy)
                .collect();
            line(format!("{title} {n}"), v, true);
        }
    }
    for n in first.segmentation.keys() {
        let v: Vec<f64> = reports
            .iter()
            .filter_map(|r| r.segmentation.get(n))
            .map(|s| s.iou)
            .collect();
        line(format!("IoU {n}"), v, true);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{LandmarkTruth, Slice};

    /// Templates whose maps are a coarse part (4 channels, 8 × 8) stacked with a finer one
    /// (3 channels, 16 × 16) over a 64 × 64 slice with a landmark and a labelled square;
    /// the coarse part carries the landmark's signal.
    fn two_grid_templates() -> Vec<(Case, Vec<FeatureMap>)> {
        let mut rng = crate::adapter::Rng::new(7);
        (0..3)
            .map(|t| {
                let point = (20.0 + 4.0 * t as f64, 30.0 - 4.0 * t as f64);
                let square = |r: usize, c: usize| (36..52).contains(&r) && (8..28).contains(&c);
                let case = Case {
                    name: format!("t{t}"),
                    slices: vec![Slice {
                        pixels: Array2::from_shape_fn((64, 64), |(r, c)| (r * 64 + c) as f32),
                        labels: Some(Array2::from_shape_fn((64, 64), |(r, c)| {
                            u8::from(square(r, c))
                        })),
                        k: None,
                    }],
                    center: 0,
                    landmarks: BTreeMap::from([(
                        "p".to_string(),
                        LandmarkTruth {
                            row: point.0,
                            column: point.1,
                            k: None,
                        },
                    )]),
                };
                let coarse = Array3::from_shape_fn((4, 8, 8), |(ch, i, j)| {
                    let (r, c) = (i as f64 * 8.0 + 3.5, j as f64 * 8.0 + 3.5);
                    let near = (r - point.0).hypot(c - point.1) < 10.0;
                    f32::from(near) * (ch + 1) as f32 + 0.3 * rng.normal()
                });
                let fine = Array3::from_shape_fn((3, 16, 16), |(ch, i, j)| {
                    let (r, c) = (i * 4 + 2, j * 4 + 2);
                    f32::from(square(r, c)) * (ch + 1) as f32 + 0.3 * rng.normal()
                });
                let fm = FeatureMap::stacked(vec![coarse, fine], 64, 64);
                (case, vec![fm])
            })
            .collect()
    }

    /// With `coarse_landmarks` a landmark adapter is trained and scored on the maps'
    /// coarse part alone — the same adapter as one trained on those parts as maps of their
    /// own — and a structure adapter of the same configuration on all the channels.
    #[test]
    fn coarse_landmarks_read_the_coarse_part_only() {
        let templates = two_grid_templates();
        let config = TrainConfig {
            steps: 100,
            coarse_landmarks: true,
            ..TrainConfig::default()
        };
        let landmarks = Task::Landmarks {
            names: vec!["p".to_string()],
            radius: 8.0,
        };
        let bb = ("test", "0");
        let train = |task: &Task, templates: &[(Case, Vec<FeatureMap>)], config: &TrainConfig| {
            let mut a = train_task(
                task,
                Method::Classification,
                false,
                templates,
                &[],
                config,
                bb,
            )
            .unwrap();
            assert_eq!(a.len(), 1);
            a.remove(0)
        };
        let coarse = train(&landmarks, &templates, &config);
        assert!(coarse.train.coarse_landmarks);
        assert_eq!(coarse.feature_mean.len(), 4);
        let parts: Vec<(Case, Vec<FeatureMap>)> = templates
            .iter()
            .map(|(c, fms)| (c.clone(), vec![fms[0].coarsest().unwrap()]))
            .collect();
        let plain = train(
            &landmarks,
            &parts,
            &TrainConfig {
                coarse_landmarks: false,
                ..config.clone()
            },
        );
        assert_eq!(coarse.feature_mean, plain.feature_mean);
        let target = &templates[1].1[0];
        let read = coarse.features(target);
        assert_eq!((read.channels(), read.grid()), (4, (8, 8)));
        let scores = coarse.scores(&read).unwrap();
        assert_eq!(scores, plain.scores(&parts[1].1[0]).unwrap());
        // Read whole, the map does not fit the adapter.
        assert!(coarse.scores(target).is_err());
        // A one-grid map is read as it is.
        let one = FeatureMap::new(target.data.clone(), 64, 64);
        assert_eq!(coarse.features(&one).channels(), 7);

        // Asked of maps of one grid (the coarse parts are), it is refused, not ignored.
        assert!(matches!(
            train_task(
                &landmarks,
                Method::Classification,
                false,
                &parts,
                &[],
                &config,
                bb
            ),
            Err(AdapterError::OneGrid)
        ));

        let structures = Task::Structures { values: vec![1] };
        let whole = train(&structures, &templates, &config);
        assert!(!whole.train.coarse_landmarks);
        assert_eq!(whole.feature_mean.len(), 7);
        assert_eq!(whole.features(target).channels(), 7);
    }

    /// The one classification adapter `train_task` trains for `task`.
    fn train_one(
        task: &Task,
        templates: &[(Case, Vec<FeatureMap>)],
        augmented: &[(Case, Vec<FeatureMap>)],
        config: &TrainConfig,
    ) -> Adapter {
        let bb = ("test", "0");
        let mut a = train_task(
            task,
            Method::Classification,
            false,
            templates,
            augmented,
            config,
            bb,
        )
        .unwrap();
        a.remove(0)
    }

    /// `two_grid_templates`' tasks: the labelled square, the landmark "p".
    fn square_and_point() -> (Task, Task) {
        let landmarks = Task::Landmarks {
            names: vec!["p".to_string()],
            radius: 8.0,
        };
        (Task::Structures { values: vec![1] }, landmarks)
    }

    /// With `identity`, a structure adapter learns which landmark lies inside each of its
    /// structures in every template; a landmark adapter learns nothing of it. With
    /// `augment_shift` or `augment_stretch`, a landmark adapter is trained as without the
    /// shifted or stretched copies, a structure adapter on them too.
    #[test]
    fn identity_shifted_and_stretched_copies_are_the_structures_own() {
        let mut templates = two_grid_templates();
        for (case, _) in &mut templates {
            // Inside the labelled square (rows 36..52, columns 8..28).
            let p = case.landmarks.get_mut("p").expect("landmark");
            (p.row, p.column) = (44.0, 18.0);
        }
        let config = TrainConfig {
            steps: 20,
            identity: true,
            ..TrainConfig::default()
        };
        let bb = ("test", "0");
        let train = |task: &Task, augmented: &[(Case, Vec<FeatureMap>)], config: &TrainConfig| {
            train_one(task, &templates, augmented, config)
        };
        let (structures, landmarks) = square_and_point();
        let named = train(&structures, &[], &config);
        assert!(named.train.identity);
        let links = named.identity.as_ref().expect("linked");
        assert_eq!(links.landmarks, [Some("p".to_string())]);
        assert!(named.validate().is_ok() && named.file_format() == 9);
        let placed = train(&landmarks, &[], &config);
        assert!(!placed.train.identity && placed.identity.is_none());
        // The landmark outside the square in one template: nothing is linked.
        let mut apart = templates.clone();
        if let Some(p) = apart[0].0.landmarks.get_mut("p") {
            p.row = 10.0;
        }
        let unlinked = train_task(
            &structures,
            Method::Classification,
            false,
            &apart,
            &[],
            &config,
            bb,
        )
        .unwrap();
        assert!(unlinked[0].identity.is_none());

        // Copies per template in `augmented_templates`' order, each of its own features;
        // the structures' own copies with shifts, stretches or both.
        let plain = TrainConfig {
            augment: true,
            ..config.clone()
        };
        let landmark_mean = |augmented: &[_], config: &TrainConfig| {
            train(&landmarks, augmented, config).feature_mean
        };
        let structure_mean = |augmented: &[_], config: &TrainConfig| {
            train(&structures, augmented, config).feature_mean
        };
        for (shift, stretch) in [(true, false), (false, true), (true, true)] {
            let own = TrainConfig {
                augment_shift: shift,
                augment_stretch: stretch,
                ..plain.clone()
            };
            let extra = structure_augments(&own);
            let expected: Vec<Augment> = SHIFT_AUGMENTS
                .iter()
                .filter(|_| shift)
                .chain(STRETCH_AUGMENTS.iter().filter(|_| stretch))
                .copied()
                .collect();
            assert_eq!(extra, expected);
            let per = TEMPLATE_AUGMENTS.len() + extra.len();
            let copies: Vec<(Case, Vec<FeatureMap>)> = templates
                .iter()
                .flat_map(|(case, fms)| {
                    (0..per).map(move |k| {
                        let fms = fms
                            .iter()
                            .map(|fm| {
                                let mut fm = fm.clone();
                                fm.data.mapv_inplace(|v| v + k as f32);
                                fm
                            })
                            .collect();
                        (case.clone(), fms)
                    })
                })
                .collect();
            let common: Vec<(Case, Vec<FeatureMap>)> = copies
                .chunks(per)
                .flat_map(|c| c[..TEMPLATE_AUGMENTS.len()].to_vec())
                .collect();
            assert_eq!(
                landmark_mean(&copies, &own),
                landmark_mean(&common, &plain),
                "{extra:?}"
            );
            assert_ne!(
                landmark_mean(&copies, &plain),
                landmark_mean(&common, &plain)
            );
            assert_eq!(
                structure_mean(&copies, &own),
                structure_mean(&copies, &plain)
            );
        }
    }

    /// With `landmark_position` the landmark adapter reads the position columns and the
    /// structure adapter does not: each is the adapter trained with, and without, the
    /// position for both tasks.
    #[test]
    fn the_position_can_be_the_landmarks_alone() {
        let templates = two_grid_templates();
        let train = |task: &Task, position: bool, landmark_position: bool| {
            let config = TrainConfig {
                steps: 20,
                landmark_position,
                context: Context {
                    position,
                    ..Context::default()
                },
                ..TrainConfig::default()
            };
            train_one(task, &templates, &[], &config)
        };
        let (structures, landmarks) = square_and_point();
        let weights = |a: &Adapter| serde_json::to_string(&a.model).unwrap();
        let placed = train(&landmarks, true, true);
        let unplaced = train(&structures, true, true);
        assert!(placed.train.context.position && !unplaced.train.context.position);
        assert_eq!(weights(&placed), weights(&train(&landmarks, true, false)));
        assert_eq!(
            weights(&unplaced),
            weights(&train(&structures, false, false))
        );
        assert_ne!(
            weights(&unplaced),
            weights(&train(&structures, true, false))
        );
        // Two more columns read: row and column.
        assert_eq!(placed.feature_mean.len(), unplaced.feature_mean.len() + 2);
    }

    /// A slice of a 16 × 20 rectangle (label 1) on 64 × 64 pixels, from row `top`, and
    /// its feature map: two channels on a 16 × 16 grid, the label at each cell's centre.
    fn rectangle_slice(top: usize, t: usize) -> (Slice, FeatureMap) {
        let labels = Array2::from_shape_fn((64, 64), |(r, c)| {
            u8::from((top..top + 16).contains(&r) && (20..40).contains(&c))
        });
        let data = Array3::from_shape_fn((2, 16, 16), |(ch, i, j)| {
            f32::from(labels[[i * 4 + 2, j * 4 + 2]]) * (ch + 1) as f32
        });
        let slice = Slice {
            pixels: Array2::from_elem((64, 64), t as f32),
            labels: Some(labels),
            k: None,
        };
        (slice, FeatureMap::new(data, 64, 64))
    }

    /// Template `t`: a three-slice stack of `rectangle_slice`s, the lateral slices shifted
    /// down by 2 rows: 10 % of their pixels lie 1 or 2 pixels past the centre's rectangle.
    fn rectangle_stack(t: usize) -> (Case, Vec<FeatureMap>) {
        let (slices, fms) = [22, 20, 22]
            .iter()
            .map(|&top| rectangle_slice(top, t))
            .unzip();
        let case = Case {
            name: format!("t{t}"),
            slices,
            center: 1,
            landmarks: BTreeMap::new(),
        };
        (case, fms)
    }

    /// With `stack_anchor`, a structure adapter learns from the templates' stacks how far
    /// a structure reaches past its section in the centre slice; templates of one slice
    /// teach it nothing.
    #[test]
    fn stack_anchor_learns_the_structures_reach_from_template_stacks() {
        let templates: Vec<(Case, Vec<FeatureMap>)> = (0..2).map(rectangle_stack).collect();
        let structures = Task::Structures { values: vec![1] };
        let train_with = |templates: &[(Case, Vec<FeatureMap>)], config: TrainConfig| {
            let config = TrainConfig {
                steps: 20,
                ..config
            };
            train_task(
                &structures,
                Method::Classification,
                false,
                templates,
                &[],
                &config,
                ("test", "0"),
            )
            .unwrap()
            .remove(0)
        };
        let train = |templates: &[(Case, Vec<FeatureMap>)], stack_anchor: bool, stack_fill| {
            let config = TrainConfig {
                stack_anchor,
                stack_fill,
                ..TrainConfig::default()
            };
            train_with(templates, config)
        };
        let a = train(&templates, true, false);
        let equivalent = (320.0 / std::f64::consts::PI).sqrt();
        assert_eq!(a.stack_reach.len(), 1);
        let reach = a.stack_reach[0].unwrap_or(0.0);
        assert!((reach - 2.0 / equivalent).abs() < 1e-9, "{reach}");
        assert!(a.validate().is_ok());
        assert!(a.stack_depth.is_empty(), "no depth without the fill");
        assert!(train(&templates, false, false).stack_reach.is_empty());
        // With the fill: the centre's rectangle lies within the lateral one from 2 pixels
        // inside it (its top 2 rows are not in it), 0.20 of its equivalent radius (10.09).
        let filled = train(&templates, true, true);
        assert_eq!(filled.stack_depth, [[Some(0.2)]]);
        assert!(filled.validate().is_ok() && filled.file_format() == 4);
        assert!(filled.stack_bound.is_empty(), "no bound without its option");
        // With the bound: 40 of the lateral rectangles' 320 pixels lie 1 or 2 pixels past
        // the centre's, so 99 % are held at 2 pixels, 0.20 of its equivalent radius.
        let both = TrainConfig {
            stack_anchor: true,
            stack_fill: true,
            stack_bound: true,
            ..TrainConfig::default()
        };
        let bounded = train_with(&templates, both.clone());
        assert_eq!(bounded.stack_bound, [[Some(0.2)]]);
        assert_eq!(bounded.stack_depth, filled.stack_depth);
        assert!(bounded.validate().is_ok() && bounded.file_format() == 5);
        assert!(
            bounded.stack_blend.is_empty(),
            "no blend without its option"
        );
        // With the blend: the lateral rectangles are the centre's moved down, of the same
        // spread, so scaled by 1 in rows and columns, at the one step out there is.
        let all = TrainConfig {
            stack_blend: true,
            ..both.clone()
        };
        let blended = train_with(&templates, all.clone());
        assert_eq!(blended.stack_blend.len(), 1);
        let [rows, cols] = blended.stack_blend[0][0].expect("step 1");
        assert!((rows - 1.0).abs() < 1e-12 && (cols - 1.0).abs() < 1e-12);
        assert_eq!(blended.stack_bound, bounded.stack_bound);
        assert!(blended.validate().is_ok() && blended.file_format() == 6);
        assert!(
            blended.stack_carry.is_empty(),
            "no carry without its option"
        );
        // With the carry: every lateral section continues from the centre's.
        let carried = TrainConfig {
            stack_carry: true,
            ..all.clone()
        };
        let carried = train_with(&templates, carried);
        assert_eq!(carried.stack_carry, [[Some(1.0)]]);
        assert_eq!(carried.stack_blend, blended.stack_blend);
        assert!(carried.validate().is_ok() && carried.file_format() == 7);
        let single: Vec<(Case, Vec<FeatureMap>)> = templates
            .iter()
            .map(|(c, fms)| {
                let mut c = c.clone();
                c.slices.truncate(1);
                c.center = 0;
                (c, vec![fms[0].clone()])
            })
            .collect();
        assert!(train(&single, true, false).stack_reach.is_empty());
        assert!(train(&single, true, true).stack_depth.is_empty());
        assert!(train_with(&single, both).stack_bound.is_empty());
        assert!(train_with(&single, all.clone()).stack_blend.is_empty());
        let carried = TrainConfig {
            stack_carry: true,
            ..all
        };
        assert!(train_with(&single, carried).stack_carry.is_empty());
    }

    /// After the centre slice, a stack's slices are scored only where the centre slice's
    /// structures may stay (`stack::Anchor::window`): a look-alike far from them scores
    /// nothing there, and near them the scores are the whole slice's to the bit.
    #[test]
    fn the_stacks_other_slices_are_scored_within_the_centre_structures_reach() {
        let templates: Vec<(Case, Vec<FeatureMap>)> = (0..2).map(rectangle_stack).collect();
        let config = TrainConfig {
            steps: 20,
            stack_anchor: true,
            ..TrainConfig::default()
        };
        let structures = Task::Structures { values: vec![1] };
        let adapters = train_task(
            &structures,
            Method::Classification,
            false,
            &templates,
            &[],
            &config,
            ("test", "0"),
        )
        .unwrap();
        let trained = Trained { adapters };
        let (centre, centre_fm) = rectangle_slice(20, 0);
        let mut anchor = crate::stack::Anchor::default();
        let (found, _) = slice_structures(
            &trained,
            &centre_fm,
            &centre,
            false,
            &mut anchor,
            0,
            &whole_slices,
            &[],
        )
        .unwrap();
        assert!(found[0].is_some(), "the centre slice's rectangle");
        // The next slice out has a second rectangle from row 48, far past the reach.
        let (mut lateral, _) = rectangle_slice(22, 0);
        let (far, _) = rectangle_slice(48, 0);
        let labels = lateral.labels.as_mut().unwrap();
        labels.zip_mut_with(far.labels.as_ref().unwrap(), |a, b| *a = (*a).max(*b));
        let data = Array3::from_shape_fn((2, 16, 16), |(ch, i, j)| {
            f32::from(labels[[i * 4 + 2, j * 4 + 2]]) * (ch + 1) as f32
        });
        let lateral_fm = FeatureMap::new(data, 64, 64);
        let cells = anchor
            .window((64, 64), (16, 16))
            .expect("the reach's cells");
        assert!(cells.first_row + cells.spans.len() <= 12, "{cells:?}");
        let whole = postprocess::upsample_scores(
            &trained.scores(&lateral_fm, &whole_slices).unwrap(),
            64,
            64,
        );
        let (found, up) = slice_structures(
            &trained,
            &lateral_fm,
            &lateral,
            false,
            &mut anchor,
            1,
            &whole_slices,
            &[],
        )
        .unwrap();
        // The far rectangle's pixels the window's cells do not reach.
        let far_pixels = || (52..64).flat_map(|r| (20..40).map(move |c| (r, c)));
        assert!(
            far_pixels().all(|(r, c)| whole[[0, r, c]] > 0.5),
            "a look-alike"
        );
        assert!(far_pixels().all(|(r, c)| up[[0, r, c]] == 0.0), "scored");
        let near = (20..40).flat_map(|r| (18..42).map(move |c| (r, c)));
        assert!(near
            .into_iter()
            .all(|(r, c)| up[[0, r, c]].to_bits() == whole[[0, r, c]].to_bits()));
        let region = found[0].as_ref().expect("the lateral rectangle");
        assert!(
            region.mask[[30, 30]] && !region.mask.slice(ndarray::s![44.., ..]).iter().any(|m| *m)
        );
    }

    /// Each factor of a change must be finite and above 0, the turn finite.
    #[test]
    fn only_finite_turns_and_factors_above_zero_are_valid() {
        let ok = Augment {
            rotate_deg: -10.0,
            scale: 0.9,
            stretch: 1.1,
            gamma: 1.4,
            shift: -0.1,
        };
        assert!(ok.is_valid() && Augment::default().is_valid());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            for a in [
                Augment { scale: bad, ..ok },
                Augment { stretch: bad, ..ok },
                Augment { gamma: bad, ..ok },
            ] {
                assert!(!a.is_valid(), "{a:?}");
            }
        }
        for bad in [f64::NAN, f64::INFINITY] {
            assert!(!Augment {
                rotate_deg: bad,
                ..ok
            }
            .is_valid());
            assert!(!Augment { shift: bad, ..ok }.is_valid());
        }
    }

    /// A bright blob and its landmark move together; labels follow; gamma keeps the range.
    #[test]
    fn augmentation_moves_image_labels_and_landmarks_together() {
        let (rows, cols) = (60, 80);
        let blob = (20.0, 55.0);
        let near = |r: usize, c: usize| (r as f64 - blob.0).hypot(c as f64 - blob.1) <= 3.0;
        let case = Case {
            name: "t".into(),
            slices: vec![Slice {
                pixels: Array2::from_shape_fn((rows, cols), |(r, c)| {
                    if near(r, c) {
                        1000.0
                    } else {
                        100.0
                    }
                }),
                labels: Some(Array2::from_shape_fn((rows, cols), |(r, c)| {
                    u8::from(near(r, c))
                })),
                k: None,
            }],
            center: 0,
            landmarks: BTreeMap::from([(
                "blob".to_string(),
                LandmarkTruth {
                    row: blob.0,
                    column: blob.1,
                    k: None,
                },
            )]),
        };
        // Turned, scaled and gamma-changed; stretched along the rows alone; turned and
        // moved up.
        let augs = [
            Augment {
                rotate_deg: 10.0,
                scale: 1.1,
                stretch: 1.0,
                gamma: 0.7,
                shift: 0.0,
            },
            Augment {
                stretch: 1.5,
                ..Augment::default()
            },
            Augment {
                rotate_deg: -10.0,
                shift: -0.2,
                ..Augment::default()
            },
        ];
        for aug in augs {
            let back = aug.inverse(aug.forward(blob, rows, cols), rows, cols);
            assert!((back.0 - blob.0).abs() < 1e-9 && (back.1 - blob.1).abs() < 1e-9);
            let out = aug.apply(&case);
            let t = &out.landmarks["blob"];
            let s = &out.slices[0];
            // The brightest pixels' centroid and the label's centroid sit on the moved
            // landmark.
            let centroid = |m: &[(usize, usize)]| {
                let n = m.len() as f64;
                (
                    m.iter().map(|p| p.0 as f64).sum::<f64>() / n,
                    m.iter().map(|p| p.1 as f64).sum::<f64>() / n,
                )
            };
            let bright: Vec<_> = s
                .pixels
                .indexed_iter()
                .filter(|(_, v)| **v > 900.0)
                .map(|(p, _)| p)
                .collect();
            let label: Vec<_> = s
                .labels
                .as_ref()
                .unwrap()
                .indexed_iter()
                .filter(|(_, v)| **v == 1)
                .map(|(p, _)| p)
                .collect();
            for c in [centroid(&bright), centroid(&label)] {
                assert!((c.0 - t.row).hypot(c.1 - t.column) < 0.75, "{c:?} vs {t:?}");
            }
            // The blob moved: about the centre, not a no-op.
            assert!((t.row - blob.0).hypot(t.column - blob.1) > 3.0, "{aug:?}");
            // A move goes along the rows alone, downwards for a positive share.
            if aug.shift != 0.0 {
                let unmoved = Augment { shift: 0.0, ..aug }.forward(blob, rows, cols);
                assert!((t.row - unmoved.0 - aug.shift * rows as f64).abs() < 1e-9);
                assert!((t.column - unmoved.1).abs() < 1e-9);
            }
            // The label's rows and columns span as the change scales them (a 7-px disk).
            let span = |axis: fn(&(usize, usize)) -> usize| {
                let v: Vec<_> = label.iter().map(axis).collect();
                (v.iter().max().unwrap() - v.iter().min().unwrap() + 1) as f64
            };
            if aug.rotate_deg == 0.0 {
                let (tall, wide) = (span(|p| p.0), span(|p| p.1));
                assert!(
                    (tall - 7.0 * aug.scale * aug.stretch).abs() <= 1.0,
                    "{tall}"
                );
                assert!((wide - 7.0 * aug.scale).abs() <= 1.0, "{wide}");
            }
            if aug.gamma != 1.0 {
                // Gamma maps the slice's range onto itself (corners left the field of
                // view: 0).
                let max = s.pixels.iter().fold(0f32, |a, &b| a.max(b));
                assert!((max - 1000.0).abs() < 1.0, "{max}");
                assert_eq!(s.pixels[[0, 0]], 0.0);
            }
        }
    }
}
