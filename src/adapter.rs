//! Few-shot adapters on foundation features (paper §III): basic (cosine to the template
//! prototype, fixed threshold 0.5), classification (3-layer feed-forward net, cross-entropy,
//! balanced background) and contrastive (Siamese shared-weight net on reference/target
//! pairs, concatenated → softmax). Each is binary or multi-label: one adapter scores every
//! label it was trained on.
//!
//! Adapters work on the backbone's feature grid: a score map per label (values in [0, 1],
//! 0.5 is the decision threshold for every method) at h × w, which `postprocess` upsamples
//! to the image. Training is deterministic given the seed.

use crate::backbone::FeatureMap;
use crate::window::{Cells, Window};
use ndarray::{s, Array1, Array2, Array3, ArrayView2, Axis, ShapeBuilder};
use serde::{Deserialize, Serialize};
use std::ops::Range;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("no training material: {0}")]
    NoTraining(String),
    #[error("adapter file {path}: {detail}")]
    File { path: String, detail: String },
    #[error("adapter was trained on backbone {expected} ({expected_sha}), but features come from {actual} ({actual_sha})")]
    WrongBackbone {
        expected: String,
        expected_sha: String,
        actual: String,
        actual_sha: String,
    },
    #[error("feature maps have {actual} channels, the adapter expects {expected}")]
    Channels { expected: usize, actual: usize },
    #[error("{rows} feature rows for cells {cells:?} of a first layer over {planned} cells")]
    Cells {
        rows: usize,
        cells: Range<usize>,
        planned: usize,
    },
    #[error("coarse landmarks need a backbone with several outputs: these feature maps have one grid, no coarser part to read")]
    OneGrid,
    #[error("ensemble {ensemble:?} with method {method}: each method at most once (a second copy of one would be the same adapter)")]
    Ensemble {
        method: Method,
        ensemble: Vec<Method>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Basic,
    Classification,
    Contrastive,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Basic => "basic",
            Method::Classification => "classification",
            Method::Contrastive => "contrastive",
        })
    }
}

/// One template slice: its features and a label per feature cell (0 = background,
/// 1..=L = the adapter's labels in order).
pub struct TrainingSlice<'a> {
    pub features: &'a FeatureMap,
    pub cells: Array2<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub hidden: usize,
    pub embedding: usize,
    pub steps: usize,
    pub batch: usize,
    pub learning_rate: f32,
    pub seed: u64,
    /// Contrastive: reference cells kept per label for inference.
    pub references: usize,
    /// Context appended to every cell's features (none in adapters trained before).
    #[serde(default)]
    pub context: Context,
    /// Learn the templates' layout — of the landmarks, and of the structures' centroids in
    /// slice k* — and choose regions consistent with it (`postprocess::shaped_findings`,
    /// `postprocess::structure_findings`).
    #[serde(default)]
    pub shape: bool,
    /// Landmarks: keep the templates' most distinctive cells and landmarks, so that each
    /// target can be aligned to them (`align::Prior`): the prior ranks candidate regions
    /// and gives slice k* a landmark the adapter found no region for.
    #[serde(default)]
    pub align: bool,
    /// Landmarks: keep the mean of the templates' intensity patches around each landmark
    /// and move each found point to where the target matches it best (`patch`).
    #[serde(default)]
    pub patches: bool,
    /// Train also on copies of the templates rotated, scaled and with another gamma
    /// (`eval::TEMPLATE_AUGMENTS`), so that a change of pose or protocol is not new.
    #[serde(default)]
    pub augment: bool,
    /// Structures: draw part of the negatives from the cells just outside each region
    /// (within `BORDER_CELLS`), where the region's edge is decided; drawn uniformly from
    /// the background they are rare.
    #[serde(default)]
    pub borders: bool,
    /// Further adapters, one per method, trained on the same cells; the scores are the
    /// mean over this adapter and them (`Adapter::members`). Methods err differently —
    /// the classifier's edges are tighter, the contrastive adapter's identities steadier —
    /// so their mean is right more often than either.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ensemble: Vec<Method>,
    /// Landmarks (with `shape`): in the localizer slice, a landmark with no region takes
    /// the position the layout gives it from the found ones, when that estimate is certain
    /// to within the landmark radius (`postprocess::fill_from_layout`).
    #[serde(default)]
    pub layout_fill: bool,
    /// Landmarks in a stack of slices: only findings within the landmark radius (in-plane)
    /// of the localizer slice's point vote for the 3D point (`postprocess::near_anchor`).
    /// Structures: the localizer slice's structures are the prior of the layout in the
    /// stack's other slices (`stack::prior`), and a structure's region there
    /// is cut past the reach the templates' stacks show around its section in the
    /// localizer slice (`stack`).
    #[serde(default)]
    pub stack_anchor: bool,
    /// Structures, with `stack_anchor`: each slice of a stack fills its structures'
    /// regions with what lies deep inside them in the slice next to it towards the centre
    /// (`stack::fill_from_inner`), as deep as the templates' stacks show it safe
    /// (`stack::learn_depth`). Cleared for landmark adapters.
    #[serde(default)]
    pub stack_fill: bool,
    /// Structures, with `stack_anchor`: each slice of a stack bounds its structures'
    /// regions by their regions in the slice next to it towards the centre, grown by a
    /// margin the templates' stacks show (`stack::bound_by_inner`, `stack::learn_bound`).
    /// Cleared for landmark adapters.
    #[serde(default)]
    pub stack_bound: bool,
    /// Structures, with `stack_anchor`: at a stack's outermost slices, each structure's
    /// region becomes the contour halfway between it and its region in the slice next to
    /// it towards the centre, narrowed as the templates' stacks show
    /// (`stack::blend_with_inner`, `stack::learn_blend`). Cleared for landmark adapters.
    #[serde(default)]
    pub stack_blend: bool,
    /// Structures, with `stack_anchor`: a structure a slice of a stack misses while the
    /// slice next to it towards the centre has it takes its region there, where every
    /// template's section continues at that step (`stack::carry_from_inner`,
    /// `stack::learn_carry`). Cleared for landmark adapters.
    #[serde(default)]
    pub stack_carry: bool,
    /// Structures: weigh each slice's odds of a cell being in some structure by how this
    /// patient's structures and their surroundings look in the stack's localizer slice
    /// (`appearance::Appearance`, learned there from the cells the adapter is sure of).
    /// Cleared for landmark adapters.
    #[serde(default)]
    pub appearance: bool,
    /// Structures: refit the upsampled scores to the slice's intensity edges
    /// (`postprocess::refine_to_edges`) before the regions are taken.
    #[serde(default)]
    pub guided: bool,
    /// Landmarks: every cell of a landmark's region votes for where it sees the point
    /// (`votes`), instead of the region's centroid.
    #[serde(default)]
    pub votes: bool,
    /// Structures: weigh the scores by where the templates have each structure in the
    /// frame of all of them (`atlas`), so that spill far from it is cut and holes in it
    /// are filled.
    #[serde(default)]
    pub atlas: bool,
    /// Structures: weigh the scores of a structure that lies between others (in every
    /// template) by the templates' share of it in a frame that the structures found around
    /// it place on the target (`enclosed`).
    #[serde(default)]
    pub enclosed: bool,
    /// Structures, with `enclosed`: each template's enclosed structure enters the frame's
    /// share at the scales of `enclosed::SIZES` (0.8 to 1.2) about its centroid, so that
    /// a heart larger or smaller against the lungs than the templates' is not cut to theirs.
    #[serde(default)]
    pub enclosed_sizes: bool,
    /// Structures, with `enclosed`: an enclosed structure takes the background between it
    /// and a structure around it where that gap is at most `enclosed::GAP_CELLS` cells
    /// wide along a row or a column (`EnclosedModel::close_gaps`): a heart whose faint
    /// edge fell short of a lung reaches it, and is drawn by its outline rule again.
    #[serde(default)]
    pub enclosed_gaps: bool,
    /// Structures: draw a structure that every template shows convex (the heart) as the
    /// convex hull of its region, less the other structures' regions (`convex`).
    #[serde(default)]
    pub convex: bool,
    /// Structures, with `convex`: give each convex structure its moments' ellipse too, at
    /// the largest scale the templates' own masks fill (`convex::learn_ellipse`), less the
    /// other structures' regions: a top or bottom the hull left flat is rounded.
    #[serde(default)]
    pub ellipse: bool,
    /// Structures: let SAM's decoder redraw, from its region's box, each structure it
    /// redraws faithfully from the templates' own boxes (`sam::Sam::learn_redraws`).
    #[serde(default)]
    pub sam_redraw: bool,
    /// Landmarks, with `sam_redraw` on the structures: place a landmark also at the extreme
    /// of a structure SAM redraws, when the templates show it there (`extremes`).
    #[serde(default)]
    pub extremes: bool,
    /// Landmarks: take off each landmark's mean error over the templates, each left out in
    /// turn and placed by an adapter trained on the others (`calibration`).
    #[serde(default)]
    pub calibrate: bool,
    /// Structures: give each structure the foreground fragments that touch its region and
    /// no other's (`postprocess::merge_fragments`): a body whose scores are split with its
    /// look-alike neighbours is taken whole.
    #[serde(default)]
    pub fragments: bool,
    /// With `shape`: compare the layout in the target's pose (turned up to 20°, scaled
    /// 0.9–1.1, `postprocess::ShapeModel::pose`), not only in the templates'.
    #[serde(default)]
    pub pose: bool,
    /// Landmarks: trained and scored on the coarsest part of a multi-grid map alone (a
    /// hypercolumn's plain encoder output, `Adapter::features`). The finer stage draws
    /// structures' edges better, but a landmark adapter on it told neighbouring vertebrae
    /// apart less surely (spine first split: every landmark 1.00 → 0.93). Cleared for
    /// structure adapters, so on an adapter it says what that adapter reads.
    #[serde(default)]
    pub coarse_landmarks: bool,
    /// Structures, in a bundle with landmarks: scored only in the box of the landmarks
    /// found, grown by how far the templates' structures reach past theirs
    /// (`window::LandmarkWindow`). Cleared for landmark adapters.
    #[serde(default)]
    pub window: bool,
    /// Structures, in a bundle with landmarks: in the localizer slice each structure is
    /// the region holding the landmark that lies inside it in every template
    /// (`identity::LandmarkLinks`); the landmarks are then found first. Cleared for
    /// landmark adapters.
    #[serde(default)]
    pub identity: bool,
    /// Structures, with `augment`: trained also on copies of the templates with the field
    /// of view placed 10 % higher and 10 % lower (`eval::SHIFT_AUGMENTS`), so that a body
    /// cut by the image's edge is still one; the landmarks are trained without them.
    #[serde(default)]
    pub augment_shift: bool,
    /// Structures, with `augment`: trained also on copies of the templates with the rows
    /// scaled by 0.9 and by 1.1 and the columns not (`eval::STRETCH_AUGMENTS`), a flatter
    /// and a taller body; the landmarks are trained without them (on the chest they cost
    /// the landmarks' worst folds, where the heart gained).
    #[serde(default)]
    pub augment_stretch: bool,
    /// With `context.position`: the position columns for the landmark adapters only; the
    /// structure adapters are trained without them (their `context.position` cleared). The
    /// position tells a vertebra from its look-alike neighbours, but it also teaches the
    /// structures where a body may lie, and a body the field of view cuts at the image's
    /// edge lies where no template's did.
    #[serde(default)]
    pub landmark_position: bool,
}

/// How far (in cells, Chebyshev) outside a region `TrainConfig::borders` looks.
pub const BORDER_CELLS: usize = 2;

/// Context appended to each cell's feature vector, so that an adapter sees where a cell
/// is and what surrounds it, not only what it looks like: a vertebral body looks like its
/// neighbours, its surroundings and position tell which one it is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Context {
    /// Window sizes (in cells, odd) of box-averaged features appended per cell.
    pub pools: Vec<usize>,
    /// The mean feature over the whole slice.
    pub global: bool,
    /// The cell's position in the image (row, column in 0..1).
    pub position: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            hidden: 128,
            embedding: 64,
            steps: 1500,
            batch: 256,
            learning_rate: 1e-3,
            seed: 1,
            references: 32,
            context: Context::default(),
            shape: false,
            align: false,
            patches: false,
            augment: false,
            borders: false,
            ensemble: Vec::new(),
            layout_fill: false,
            stack_anchor: false,
            stack_fill: false,
            stack_bound: false,
            stack_blend: false,
            stack_carry: false,
            appearance: false,
            guided: false,
            votes: false,
            atlas: false,
            enclosed: false,
            enclosed_sizes: false,
            enclosed_gaps: false,
            convex: false,
            ellipse: false,
            sam_redraw: false,
            extremes: false,
            calibrate: false,
            fragments: false,
            pose: false,
            coarse_landmarks: false,
            window: false,
            identity: false,
            augment_shift: false,
            augment_stretch: false,
            landmark_position: false,
        }
    }
}

/// SplitMix64: small, fast and reproducible everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

/// A fully connected layer: y = x·Wᵀ + b, W is out × in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Linear {
    pub w: Array2<f32>,
    pub b: Array1<f32>,
}

impl Linear {
    fn new(inp: usize, out: usize, rng: &mut Rng) -> Linear {
        // He initialisation for ReLU nets.
        let scale = (2.0 / inp as f32).sqrt();
        Linear {
            w: Array2::from_shape_fn((out, inp), |_| rng.normal() * scale),
            b: Array1::zeros(out),
        }
    }
    fn forward(&self, x: ArrayView2<f32>) -> Array2<f32> {
        self.add_bias(x.dot(&self.w.t()))
    }

    fn add_bias(&self, mut y: Array2<f32>) -> Array2<f32> {
        // Column by column: broadcasting `+ &b` goes element by element (~5 ms per
        // slice) when y is column-major, as it is for context rows.
        for (mut col, &b) in y.columns_mut().into_iter().zip(&self.b) {
            col += b;
        }
        y
    }

    /// `add_bias`, then the ReLU, in one pass over `y`.
    fn add_bias_relu(&self, mut y: Array2<f32>) -> Array2<f32> {
        for (mut col, &b) in y.columns_mut().into_iter().zip(&self.b) {
            col.mapv_inplace(|v| (v + b).max(0.0));
        }
        y
    }
}

/// Feed-forward net with ReLU between layers (none after the last).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mlp {
    pub layers: Vec<Linear>,
}

/// Inputs of every layer, kept for the backward pass.
pub struct Trace {
    inputs: Vec<Array2<f32>>,
}

/// Gradients of every layer's (W, b).
pub type Grads = Vec<(Array2<f32>, Array1<f32>)>;

impl Mlp {
    pub fn new(sizes: &[usize], rng: &mut Rng) -> Mlp {
        Mlp {
            layers: sizes
                .windows(2)
                .map(|w| Linear::new(w[0], w[1], rng))
                .collect(),
        }
    }

    pub fn forward(&self, x: ArrayView2<f32>) -> Array2<f32> {
        match self.layers.first() {
            Some(first) => self.forward_from_product(x.dot(&first.w.t())),
            None => x.to_owned(),
        }
    }

    /// `forward` from the first layer's product x·W₁ᵀ, computed by the caller.
    fn forward_from_product(&self, product: Array2<f32>) -> Array2<f32> {
        let Some(last) = self.layers.last() else {
            return product;
        };
        // A layer's product is its bias and the ReLU away from the next layer's input.
        let mut h = product;
        for pair in self.layers.windows(2) {
            h = pair[0].add_bias_relu(h).dot(&pair[1].w.t());
        }
        last.add_bias(h)
    }

    pub fn forward_traced(&self, x: ArrayView2<f32>) -> (Array2<f32>, Trace) {
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut h = x.to_owned();
        for (i, l) in self.layers.iter().enumerate() {
            let y = l.forward(h.view());
            inputs.push(h);
            h = if i + 1 < self.layers.len() {
                y.mapv(|v| v.max(0.0))
            } else {
                y
            };
        }
        (h, Trace { inputs })
    }

    /// Backward pass from d(loss)/d(output); returns parameter gradients and d/d(input).
    pub fn backward(&self, trace: &Trace, grad_out: Array2<f32>) -> (Grads, Array2<f32>) {
        let mut grads: Grads = Vec::with_capacity(self.layers.len());
        let mut g = grad_out;
        for (i, l) in self.layers.iter().enumerate().rev() {
            let x = &trace.inputs[i];
            grads.push((g.t().dot(x), g.sum_axis(Axis(0))));
            let mut gx = g.dot(&l.w);
            if i > 0 {
                // ReLU of the previous layer: its output is this layer's input.
                gx.zip_mut_with(x, |d, v| {
                    if *v <= 0.0 {
                        *d = 0.0
                    }
                });
            }
            g = gx;
        }
        grads.reverse();
        (grads, g)
    }
}

/// Adam on a list of layers.
struct Adam {
    m: Grads,
    v: Grads,
    t: i32,
    lr: f32,
}

impl Adam {
    fn new(layers: &[Linear], lr: f32) -> Adam {
        let z = || {
            layers
                .iter()
                .map(|l| (Array2::zeros(l.w.dim()), Array1::zeros(l.b.dim())))
                .collect()
        };
        Adam {
            m: z(),
            v: z(),
            t: 0,
            lr,
        }
    }
    fn step(&mut self, layers: &mut [Linear], grads: &Grads) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        self.t += 1;
        let c1 = 1.0 - b1.powi(self.t);
        let c2 = 1.0 - b2.powi(self.t);
        for (i, l) in layers.iter_mut().enumerate() {
            let (gw, gb) = &grads[i];
            let (mw, mb) = &mut self.m[i];
            let (vw, vb) = &mut self.v[i];
            let lr = self.lr;
            let upd = |p: &mut f32, g: f32, m: &mut f32, v: &mut f32| {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *p -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
            };
            ndarray::Zip::from(&mut l.w)
                .and(gw)
                .and(mw)
                .and(vw)
                .for_each(|p, g, m, v| upd(p, *g, m, v));
            ndarray::Zip::from(&mut l.b)
                .and(gb)
                .and(mb)
                .and(vb)
                .for_each(|p, g, m, v| upd(p, *g, m, v));
        }
    }
}

/// Softmax cross-entropy: mean loss and d(loss)/d(logits).
pub fn softmax_xent(logits: &Array2<f32>, targets: &[usize]) -> (f32, Array2<f32>) {
    let n = logits.nrows().max(1);
    let mut grad = Array2::zeros(logits.dim());
    let mut loss = 0.0;
    for (r, (row, &t)) in logits.rows().into_iter().zip(targets).enumerate() {
        let max = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let exps: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        for (c, e) in exps.iter().enumerate() {
            let p = e / sum;
            grad[[r, c]] = (p - if c == t { 1.0 } else { 0.0 }) / n as f32;
        }
        loss -= (exps[t] / sum).max(1e-12).ln();
    }
    (loss / n as f32, grad)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Model {
    /// One unit-length prototype per label (mean of unit-length template features).
    Basic { prototypes: Array2<f32> },
    /// D → H → H → L+1 (class 0 = background).
    Classification { net: Mlp },
    /// Shared D → H → H → E branch; head 2E → L+1 on [reference, target]: class l when
    /// both are in label l's region, 0 when the target is outside the reference's region
    /// (for one label: same / different). Per label, the standardised reference features
    /// used at inference.
    Contrastive {
        branch: Mlp,
        head: Linear,
        references: Vec<Array2<f32>>,
    },
}

/// A trained adapter, as saved in a `.adapter` file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Adapter {
    pub format: u32,
    pub method: Method,
    /// Label names, in score order.
    pub labels: Vec<String>,
    pub backbone: String,
    pub backbone_sha256: String,
    /// Per-channel standardisation of the features (from the templates).
    pub feature_mean: Array1<f32>,
    pub feature_std: Array1<f32>,
    /// Landmarks: ROI radius (pixels) used to make training regions from points.
    pub landmark_radius: Option<f64>,
    /// Free-form provenance: templates, data set, seed, command line.
    pub provenance: String,
    pub train: TrainConfig,
    pub model: Model,
    /// Layout of the templates' landmarks or structure centroids, when trained with
    /// `shape`.
    #[serde(default)]
    pub shape: Option<crate::postprocess::ShapeModel>,
    /// The templates to align targets to, when trained with `align`.
    #[serde(default)]
    pub alignment: Vec<crate::align::AlignTemplate>,
    /// Per landmark, the templates' mean patch, when trained with `patches`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patches: Vec<Option<crate::patch::LandmarkPatch>>,
    /// The adapters of `TrainConfig::ensemble`: same labels and context, other methods,
    /// no members of their own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<Adapter>,
    /// Per landmark, the offset model its region's cells vote with, when trained with
    /// `votes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub votes: Vec<Option<crate::votes::LandmarkVotes>>,
    /// Structures: the templates' atlas, when trained with `atlas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub atlas: Option<crate::atlas::StructureAtlas>,
    /// Structures: per structure that lies between the others, its frame (the mean outline
    /// of those around it and the templates' share of it), when trained with `enclosed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enclosed: Option<crate::enclosed::EnclosedModel>,
    /// Structures: per structure, whether it is drawn as its convex hull (every template
    /// shows it convex), when trained with `convex` and some structure is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub convex: Vec<bool>,
    /// Structures: per structure, the scale of the moments' ellipse a convex one is given
    /// (`convex::learn_ellipse`), when trained with `ellipse` and some structure has one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ellipse: Vec<Option<f64>>,
    /// Structures: per structure, whether SAM's decoder redraws it (`sam::Sam::redraw`),
    /// when trained with `sam_redraw` and SAM redraws some structure faithfully.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sam_redraw: Vec<bool>,
    /// Landmarks: per landmark, the structure extreme that places it beside the adapter's
    /// point where SAM drew that structure (`extremes`), when trained with `extremes` and
    /// some landmark has one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extremes: Vec<Option<crate::extremes::Extreme>>,
    /// Landmarks: per landmark, the offset (row, column; pixels) taken off its point in
    /// slice k*, when trained with `calibrate` (`calibration`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calibration: Vec<Option<[f64; 2]>>,
    /// Structures, when trained with `stack_anchor` on stacks: per structure, how far its
    /// sections in a stack's other slices reach past its section in the centre slice, in
    /// equivalent radii of that section (`stack::learn_reach`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stack_reach: Vec<Option<f64>>,
    /// Structures, when trained with `stack_fill` on stacks: per structure, per step out
    /// from the centre slice (index 0: the slices beside it), how deep inside its section
    /// in the slice next to it towards the centre its section lies for sure, in equivalent
    /// radii of that section (`stack::learn_depth`); None (or no entry) for a step not
    /// filled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stack_depth: Vec<Vec<Option<f64>>>,
    /// Structures, when trained with `stack_bound` on stacks: per structure, per step out
    /// from the centre slice (index 0: the slices beside it), how far its section reaches
    /// past its section in the slice next to it towards the centre, in equivalent radii of
    /// that section (`stack::learn_bound`); None (or no entry) for a step not bounded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stack_bound: Vec<Vec<Option<f64>>>,
    /// Structures, when trained with `stack_blend` on stacks: per structure, per step out
    /// from the centre slice (index 0: the slices beside it), the scale of its section
    /// against its section in the slice next to it towards the centre, rows and columns
    /// (`stack::learn_blend`), at the outermost step the templates show; None (or no
    /// entry) for a step not blended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stack_blend: Vec<Vec<Option<[f64; 2]>>>,
    /// Structures, when trained with `stack_carry` on stacks: per structure, per step out
    /// from the centre slice (index 0: the slices beside it), the share of the templates'
    /// sections in the slice next to it towards the centre that continue into the slice
    /// (`stack::learn_carry`); None (or no entry) for a step no template shows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stack_carry: Vec<Vec<Option<f64>>>,
    /// Structures, when trained with `window`: how far they reach past the box of the
    /// landmarks, so that they are scored near the landmarks found and nowhere else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<crate::window::LandmarkWindow>,
    /// Structures, when trained with `identity`: the landmark inside each structure, which
    /// names its region in the localizer slice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<crate::identity::LandmarkLinks>,
}

/// Features of all cells as rows (h·w × columns, cells row-major over the grid): the
/// cell's C features, then per pool window the C features box-averaged over the window
/// (clipped at the border), C for the slice mean, 2 for the position (row, column in 0..1).
///
/// Built channel plane by channel plane into a column-major array: every column is one
/// contiguous plane, so pooling is two running sums per plane (the row-wise version cost
/// ~150 ms per slice); matrix products take either memory order.
pub fn context_rows(fm: &FeatureMap, ctx: &Context) -> Array2<f32> {
    build_context_rows(fm, ctx, Frame::whole(fm), |_, _| {})
}

/// `context_rows` with every column handed to `finish` (column index, values) as soon as
/// it is built, while it is still in cache: standardising the columns there instead of
/// over the whole matrix afterwards saves a pass over it (~25 MB per slice for the
/// 384-channel features on a 128 × 128 grid).
fn build_context_rows(
    fm: &FeatureMap,
    ctx: &Context,
    frame: Frame,
    finish: impl Fn(usize, &mut [f32]),
) -> Array2<f32> {
    let standard = fm.data.as_standard_layout();
    let columns = ContextColumns::new(standard.view(), ctx, frame);
    let cells = columns.cells;
    // Appended column by column, in order: the matrix is not zeroed first (a pass over
    // all of it).
    let mut data: Vec<f32> = Vec::with_capacity(cells * columns.width());
    for k in 0..columns.width() {
        columns.append(k, std::slice::from_ref(&(0..cells)), &mut data);
        finish(k, &mut data[k * cells..]);
    }
    Array2::from_shape_vec((cells, columns.width()).f(), data).expect("cells × columns values")
}

/// Where each column of `context_rows` comes from, so that the rows of any range of cells
/// can be written out: all of them, or a chunk at a time.
struct ContextColumns<'a> {
    cells: usize,
    grid: (usize, usize),
    frame: Frame,
    sources: Vec<Source<'a>>,
}

/// Where a map's cells lie on the grid its position columns are measured over: a crop
/// (`Adapter::scores_within`) keeps the whole slice's positions.
#[derive(Debug, Clone, Copy)]
struct Frame {
    /// The map's first cell on that grid.
    origin: (usize, usize),
    grid: (usize, usize),
}

impl Frame {
    /// A map that is the whole grid.
    fn whole(fm: &FeatureMap) -> Frame {
        Frame {
            origin: (0, 0),
            grid: fm.grid(),
        }
    }
}

enum Source<'a> {
    /// A feature plane as it is.
    Plane(&'a [f32]),
    /// A feature plane box-averaged over a window of ±`radius` cells.
    Pooled {
        plane: &'a [f32],
        radius: usize,
    },
    /// The same value in every cell (the slice mean).
    Constant(f32),
    /// The cell's row, or column, in 0..1.
    Row,
    Column,
}

impl<'a> ContextColumns<'a> {
    /// From the feature planes (C × h × w, in standard layout).
    fn new(data: ndarray::ArrayView3<'a, f32>, ctx: &Context, frame: Frame) -> Self {
        let (_, h, w) = data.dim();
        let cells = h * w;
        let planes = || data.to_slice().unwrap_or(&[]).chunks_exact(cells.max(1));
        let mut sources: Vec<Source> = planes().map(Source::Plane).collect();
        for &k in &ctx.pools {
            sources.extend(planes().map(|plane| Source::Pooled {
                plane,
                radius: k / 2,
            }));
        }
        if ctx.global {
            for plane in planes() {
                let mean = plane.iter().map(|&v| v as f64).sum::<f64>() / cells as f64;
                sources.push(Source::Constant(mean as f32));
            }
        }
        if ctx.position {
            sources.extend([Source::Row, Source::Column]);
        }
        ContextColumns {
            cells,
            grid: (h, w),
            frame,
            sources,
        }
    }

    fn width(&self) -> usize {
        self.sources.len()
    }

    /// Appends column `k`'s values at the cells `ranges` (ascending, apart), one range
    /// after the other, to `out`.
    fn append(&self, k: usize, ranges: &[Range<usize>], out: &mut Vec<f32>) {
        let (h, w) = self.grid;
        match &self.sources[k] {
            Source::Plane(p) => ranges
                .iter()
                .for_each(|range| out.extend_from_slice(&p[range.clone()])),
            Source::Pooled { plane, radius } => {
                // Box means are taken over the whole plane, straight into `out` (all of
                // it when the range is, as `context_rows` builds it), and the ranges'
                // values moved down to its start.
                let start = out.len();
                out.resize(start + self.cells, 0.0);
                let mut row_sums = vec![0f32; self.cells];
                crate::image::box_mean(plane, h, w, *radius, &mut row_sums, &mut out[start..]);
                let mut end = start;
                for range in ranges {
                    out.copy_within(start + range.start..start + range.end, end);
                    end += range.len();
                }
                out.truncate(end);
            }
            Source::Constant(v) => out.resize(out.len() + cells_in(ranges), *v),
            Source::Row => {
                let (first, n) = (self.frame.origin.0, self.frame.grid.0);
                for range in ranges {
                    out.extend(
                        range
                            .clone()
                            .map(|i| ((first + i / w) as f32 + 0.5) / n as f32),
                    )
                }
            }
            Source::Column => {
                let (first, n) = (self.frame.origin.1, self.frame.grid.1);
                for range in ranges {
                    out.extend(
                        range
                            .clone()
                            .map(|i| ((first + i % w) as f32 + 0.5) / n as f32),
                    )
                }
            }
        }
    }
}

/// A contrastive model's references of one label through its branch and the head's
/// reference half (`terms`, references × classes), and their row-wise exponentials.
struct ReferenceTerms {
    terms: Array2<f32>,
    exp: Array2<f32>,
}

/// How many cells `ranges` hold.
fn cells_in(ranges: &[Range<usize>]) -> usize {
    ranges.iter().map(|r| r.len()).sum()
}

/// Cells of `Adapter::scores` per chunk: its rows (384 columns) and hidden layers fit in
/// the cache. 512 to 2048 measured the same on the chest.
const SCORE_CHUNK: usize = 1024;

/// An adapter's first layer over a feature map's channels and their pools, when the map
/// has coarse channels (`FeatureMap::coarse`, the encoder's 64 × 64 output under the
/// 128 × 128 hypercolumn), taken as planes of hidden units rather than per cell:
/// - the coarse channels' product runs on their own grid and is resized. Bilinear
///   resizing weighs cells with weights that sum to one, and a column's standardisation is
///   affine, so W·std(resize(x)) = resize(W·std(x)): the same values but for rounding, for
///   a quarter of those products (chest: 256 of the 384 channels, 805 → 402 million
///   multiply-adds per slice);
/// - per pool, a box mean weighs cells with weights that sum to one too: the fine
///   channels are box-averaged (one plane per channel, 128, rather than per hidden unit,
///   256 on the spine's ensemble), and the coarse part's product is resized and
///   box-averaged in one separable pass (`image::box_of_bilinear_taps`);
/// - the fine channels and their pools' means take one product over the kept cells, and
///   every step writes only those: a window's cells (`Adapter::scores_within`) read the
///   whole map's planes around them, with no crop (the map's edges are the only ones).
///
/// The other columns (position, slice mean) are taken per cell and the two added (spine:
/// 1154 → 2 columns per cell). Every adapter of an ensemble reads the same planes, so
/// their weights are stacked into one product per part. (`scores` and `scores_and_rows`
/// both take this path when a map has coarse channels, so their scores stay the same
/// bits.)
struct CoarseFirstLayer {
    /// The first layer's weights over the other columns (hidden × their count).
    w_fine: Array2<f32>,
    /// The planes' part of the first layer's product (the kept cells × hidden,
    /// column-major: one plane per hidden unit).
    resized: Array2<f32>,
}

/// Along one axis, the taps from a coarse part's cells to the kept cells of the map's:
/// bilinear (`bilinear_taps`), and per pool its box mean of them (`box_of_bilinear_taps`),
/// their indices counted from `read`, the part's cells they read.
struct CoarseTaps {
    read: Range<usize>,
    resize: Vec<(usize, usize, f32)>,
    pooled: Vec<Vec<(usize, Vec<f32>)>>,
}

impl CoarseTaps {
    fn new(n_out: usize, n_in: usize, keep: &Range<usize>, pools: &[usize]) -> CoarseTaps {
        let resize = crate::image::bilinear_taps(n_out, n_in);
        let mut resize: Vec<_> = resize[keep.clone()]
            .iter()
            .map(|&(a, b, f)| (a, b, f as f32))
            .collect();
        let mut pooled: Vec<_> = pools
            .iter()
            .map(|k| crate::image::box_of_bilinear_taps(n_out, n_in, k / 2, keep.clone()))
            .collect();
        let spans = resize.iter().map(|&(a, b, _)| (a, b + 1));
        let spans = spans.chain(pooled.iter().flatten().map(|(a, w)| (*a, a + w.len())));
        let (first, end) = spans.fold((usize::MAX, 0), |(a, z), (b, y)| (a.min(b), z.max(y)));
        let first = first.min(end);
        for (a, b, _) in &mut resize {
            *a -= first;
            *b -= first;
        }
        for (a, _) in pooled.iter_mut().flatten() {
            *a -= first;
        }
        CoarseTaps {
            read: first..end,
            resize,
            pooled,
        }
    }
}

/// The runs of a map's channels that are no coarse part's; `None` when the map has no
/// coarse channels.
fn fine_channels(fm: &FeatureMap) -> Option<Vec<std::ops::Range<usize>>> {
    if fm.coarse.is_empty() {
        return None;
    }
    let mut parts: Vec<_> = fm.coarse.iter().map(|p| (p.first, p.map.dim().0)).collect();
    parts.sort_unstable();
    let mut runs = Vec::new();
    let mut start = 0;
    for (first, n) in parts {
        if first > start {
            runs.push(start..first);
        }
        start = start.max(first + n);
    }
    if start < fm.channels() {
        runs.push(start..fm.channels());
    }
    Some(runs)
}

/// `job` of every item, in order: the items are shared out over the machine's cores in
/// contiguous runs, each thread with its own scratch buffer.
pub(crate) fn in_parallel<T: Send, R: Send>(
    items: Vec<T>,
    job: impl Fn(&mut Vec<f32>, T) -> R + Sync,
) -> Vec<R> {
    // Asked once: on Linux the answer reads the cgroup's CPU quota from files.
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let threads = cores.clamp(1, items.len().max(1));
    let share = items.len().div_ceil(threads).max(1);
    let mut items = items.into_iter();
    let mut shares: Vec<Vec<T>> = Vec::with_capacity(threads);
    loop {
        let next: Vec<T> = items.by_ref().take(share).collect();
        if next.is_empty() {
            break;
        }
        shares.push(next);
    }
    let run = |share: Vec<T>| {
        let mut scratch = Vec::new();
        share
            .into_iter()
            .map(|item| job(&mut scratch, item))
            .collect::<Vec<R>>()
    };
    let run = &run;
    std::thread::scope(|scope| {
        let mut shares = shares.into_iter();
        let here = shares.next();
        let others: Vec<_> = shares
            .map(|share| scope.spawn(move || run(share)))
            .collect();
        let mut out = here.map(run).unwrap_or_default();
        for other in others {
            out.extend(
                other
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e)),
            );
        }
        out
    })
}

/// Scores as rows of cells (cells × L, cells row-major over an h × w grid) as planes
/// (L × h × w).
fn label_planes(rows: &Array2<f32>, h: usize, w: usize) -> Array3<f32> {
    Array3::from_shape_fn((rows.ncols(), h, w), |(l, i, j)| rows[[i * w + j, l]])
}

/// exp of every value minus its row's maximum.
fn exp_rows(x: &Array2<f32>) -> Array2<f32> {
    let mut out = x.clone();
    for mut row in out.rows_mut() {
        let max = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        row.mapv_inplace(|v| (v - max).exp());
    }
    out
}

/// softmax(a + b)[i], computed directly.
fn softmax_at(a: ndarray::ArrayView1<f32>, b: ndarray::ArrayView1<f32>, i: usize) -> f32 {
    let max = a
        .iter()
        .zip(b.iter())
        .fold(f32::NEG_INFINITY, |m, (x, y)| m.max(x + y));
    let sum: f32 = a
        .iter()
        .zip(b.iter())
        .map(|(x, y)| (x + y - max).exp())
        .sum();
    (a[i] + b[i] - max).exp() / sum
}

fn standardize(rows: &mut Array2<f32>, mean: &Array1<f32>, std: &Array1<f32>) {
    for ((mut col, m), s) in rows.columns_mut().into_iter().zip(mean).zip(std) {
        col.mapv_inplace(|v| (v - m) / s);
    }
}

fn unit_rows(rows: &Array2<f32>) -> Array2<f32> {
    let mut out = rows.clone();
    for mut r in out.rows_mut() {
        let n = r.dot(&r).sqrt().max(1e-12);
        r /= n;
    }
    out
}

impl Adapter {
    /// Trains on template slices. `labels` names labels 1..=L of the cell maps.
    pub fn train(
        method: Method,
        labels: Vec<String>,
        slices: &[TrainingSlice],
        config: TrainConfig,
        backbone: (&str, &str),
    ) -> Result<Adapter, AdapterError> {
        let n_labels = labels.len();
        if n_labels == 0 || slices.is_empty() {
            return Err(AdapterError::NoTraining(
                "no labels or no template slices".into(),
            ));
        }
        let mut methods = config.ensemble.clone();
        methods.push(method);
        methods.sort_by_key(|m| m.to_string());
        methods.dedup();
        if methods.len() != config.ensemble.len() + 1 {
            return Err(AdapterError::Ensemble {
                method,
                ensemble: config.ensemble.clone(),
            });
        }
        // Members first, one after the other: each holds the cells' rows (gigabytes for
        // augmented volumes) only while it trains.
        let members = config
            .ensemble
            .iter()
            .map(|&m| {
                let single = TrainConfig {
                    ensemble: Vec::new(),
                    ..config.clone()
                };
                Adapter::train(m, labels.clone(), slices, single, backbone)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let base_channels = slices[0].features.channels();
        if let Some(s) = slices
            .iter()
            .find(|s| s.features.channels() != base_channels)
        {
            return Err(AdapterError::Channels {
                expected: base_channels,
                actual: s.features.channels(),
            });
        }
        let rows = TrainingRows::build(slices, n_labels, &config, ROW_BUDGET_BYTES)?;
        let TrainingRows {
            all,
            by_label,
            near,
            feature_mean,
            feature_std,
        } = rows;
        let channels = all.ncols();
        for (l, name) in labels.iter().enumerate() {
            if by_label[l + 1].is_empty() {
                return Err(AdapterError::NoTraining(format!(
                    "label {name} has no template cell"
                )));
            }
        }
        let mut rng = Rng::new(config.seed);
        let model = match method {
            Method::Basic => {
                let unit = unit_rows(&all);
                let mut protos = Array2::zeros((n_labels, channels));
                for l in 0..n_labels {
                    let idx = &by_label[l + 1];
                    let mut p = Array1::<f32>::zeros(channels);
                    for &i in idx {
                        p += &unit.row(i);
                    }
                    let n = p.dot(&p).sqrt().max(1e-12);
                    protos.row_mut(l).assign(&(p / n));
                }
                Model::Basic { prototypes: protos }
            }
            Method::Classification => {
                let mut x = all;
                standardize(&mut x, &feature_mean, &feature_std);
                let net = train_classifier(&x, &by_label, &near, &config, &mut rng);
                Model::Classification { net }
            }
            Method::Contrastive => {
                let mut x = all;
                standardize(&mut x, &feature_mean, &feature_std);
                let (branch, head) = train_siamese(&x, &by_label, &near, &config, &mut rng);
                let references = (1..=n_labels)
                    .map(|l| {
                        let idx = &by_label[l];
                        let k = config.references.min(idx.len()).max(1);
                        let picks: Vec<usize> = (0..k).map(|_| idx[rng.below(idx.len())]).collect();
                        x.select(Axis(0), &picks)
                    })
                    .collect();
                Model::Contrastive {
                    branch,
                    head,
                    references,
                }
            }
        };
        Ok(Adapter {
            format: 1,
            method,
            labels,
            backbone: backbone.0.to_string(),
            backbone_sha256: backbone.1.to_string(),
            feature_mean,
            feature_std,
            landmark_radius: None,
            provenance: String::new(),
            train: config,
            model,
            shape: None,
            alignment: Vec::new(),
            patches: Vec::new(),
            members,
            votes: Vec::new(),
            atlas: None,
            enclosed: None,
            convex: Vec::new(),
            ellipse: Vec::new(),
            sam_redraw: Vec::new(),
            extremes: Vec::new(),
            calibration: Vec::new(),
            stack_reach: Vec::new(),
            stack_depth: Vec::new(),
            stack_bound: Vec::new(),
            stack_blend: Vec::new(),
            stack_carry: Vec::new(),
            window: None,
            identity: None,
        })
    }

    /// The least adapter-file format (`train::FORMATS`) a build must read to use this
    /// adapter as it was trained: 2 for ensemble members; 3 for anything added since 2
    /// that a build reading only 2 would load and silently leave out, so scoring or
    /// placing otherwise: stored models (votes, atlas, enclosed frame, convex and SAM
    /// flags, extremes, calibration, stack reach) and steps that are flags alone (stack
    /// anchor, edge refinement, fragments, pose, coarse landmarks); 4 for the stack fill,
    /// which a build reading only 3 would leave out; 5 for the stack bound, which a build
    /// reading only 4 would leave out; 6 for the stack blend, which a build reading only 5
    /// would leave out; 7 for the stack carry, which a build reading only 6 would leave
    /// out; 8 for the patient's appearance, a flag alone, which a build reading only 7
    /// would leave out; 9 for the structures' names from the landmarks, which a build
    /// reading only 8 would leave out; 10 for each landmark's reach in the structures'
    /// window, which a build reading only 9 would leave out; 11 for a structure's extreme
    /// that places a landmark only where the adapter found none, which a build reading
    /// only 10 would average with the adapter's point; 12 for a convex structure's ellipse,
    /// which a build reading only 11 would leave out; 13 for an enclosed structure's gaps
    /// closed, a flag alone, which a build reading only 12 would leave out.
    pub fn file_format(&self) -> u32 {
        let t = &self.train;
        let since_12 = t.enclosed_gaps && self.enclosed.is_some();
        let since_11 = self.ellipse.iter().any(Option::is_some);
        let since_10 = self.extremes.iter().flatten().any(|e| e.fallback);
        let since_9 = self.window.as_ref().is_some_and(|w| w.reach.is_some());
        let since_8 = self.identity.is_some();
        let since_7 = t.appearance;
        let since_6 = self.stack_carry.iter().flatten().any(Option::is_some);
        let since_5 = self.stack_blend.iter().flatten().any(Option::is_some);
        let since_4 = self.stack_bound.iter().flatten().any(Option::is_some);
        let since_3 = self.stack_depth.iter().flatten().any(Option::is_some);
        let since_2 = self.votes.iter().any(Option::is_some)
            || self.atlas.is_some()
            || self.enclosed.is_some()
            || self.convex.contains(&true)
            || self.sam_redraw.contains(&true)
            || self.extremes.iter().any(Option::is_some)
            || self.calibration.iter().any(Option::is_some)
            || self.stack_reach.iter().any(Option::is_some)
            || self.window.is_some()
            || t.stack_anchor
            || t.guided
            || t.fragments
            || t.pose
            || t.coarse_landmarks;
        let members = self.members.iter().map(Adapter::file_format).max();
        let own = if since_12 {
            13
        } else if since_11 {
            12
        } else if since_10 {
            11
        } else if since_9 {
            10
        } else if since_8 {
            9
        } else if since_7 {
            8
        } else if since_6 {
            7
        } else if since_5 {
            6
        } else if since_4 {
            5
        } else if since_3 {
            4
        } else if since_2 {
            3
        } else if !self.members.is_empty() {
            2
        } else {
            1
        };
        members.map_or(own, |m| m.max(own))
    }

    /// Checks that the stored weights fit together, so that a damaged or hand-edited
    /// adapter file is refused at load instead of failing inside a matrix product.
    pub fn validate(&self) -> Result<(), String> {
        let c = self.feature_mean.len();
        let n = self.labels.len();
        for t in &self.alignment {
            t.validate()?;
        }
        if !self.patches.is_empty() && self.patches.len() != self.labels.len() {
            return Err(format!(
                "{} landmark patches for {} labels",
                self.patches.len(),
                self.labels.len()
            ));
        }
        if let Some(i) = self
            .patches
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| !p.is_valid()))
        {
            return Err(format!("landmark patch {i} does not fit its size"));
        }
        if !self.votes.is_empty() && self.votes.len() != n {
            return Err(format!("{} vote models for {n} labels", self.votes.len()));
        }
        if let Some(i) = self
            .votes
            .iter()
            .position(|v| v.as_ref().is_some_and(|v| !v.fits(c)))
        {
            return Err(format!("vote model {i} does not fit {c} feature columns"));
        }
        // What the stack learned per structure: none, or one entry per label whose
        // figures all pass `ok`.
        fn per_label(
            len: usize,
            n: usize,
            mut figures: impl Iterator<Item = f64>,
            ok: fn(f64) -> bool,
        ) -> bool {
            len == 0 || (len == n && figures.all(ok))
        }
        let share = |x: f64| x.is_finite() && x >= 0.0;
        let reach = self.stack_reach.iter().flatten().copied();
        if !per_label(self.stack_reach.len(), n, reach, share) {
            return Err(format!(
                "{} stack reaches for {n} labels, or one not a finite share ≥ 0",
                self.stack_reach.len()
            ));
        }
        let fraction = |x: f64| (0.0..=1.0).contains(&x);
        for (per_step, what, ok, rule) in [
            (
                &self.stack_depth,
                "depths",
                share as fn(f64) -> bool,
                "a finite share ≥ 0",
            ),
            (&self.stack_bound, "bounds", share, "a finite share ≥ 0"),
            (&self.stack_carry, "carries", fraction, "a share in 0..=1"),
        ] {
            if !per_label(
                per_step.len(),
                n,
                per_step.iter().flatten().flatten().copied(),
                ok,
            ) {
                return Err(format!(
                    "{} stack {what} for {n} labels, or one not {rule}",
                    per_step.len()
                ));
            }
        }
        // A scale of 0 would draw nothing: above 0.
        let scales = self
            .stack_blend
            .iter()
            .flatten()
            .flatten()
            .flatten()
            .copied();
        if !per_label(self.stack_blend.len(), n, scales, |s| {
            s.is_finite() && s > 0.0
        }) {
            return Err(format!(
                "{} stack blends for {n} labels, or a scale not finite > 0",
                self.stack_blend.len()
            ));
        }
        if self
            .identity
            .as_ref()
            .is_some_and(|i| !i.is_valid() || i.landmarks.len() != n)
        {
            return Err(format!(
                "the structures' landmarks name none, or not {n} structures"
            ));
        }
        if self.window.as_ref().is_some_and(|w| !w.is_valid()) {
            return Err(
                "the landmark window names no landmark, or its share or a landmark's reach is not finite ≥ 0, or it holds a reach per landmark too few or many".into(),
            );
        }
        if self.atlas.as_ref().is_some_and(|a| !a.fits(n)) {
            return Err(format!(
                "the structure atlas does not fit {n} labels (map sizes, shares in 0..1)"
            ));
        }
        if !self.convex.is_empty() && self.convex.len() != n {
            return Err(format!("{} convex flags for {n} labels", self.convex.len()));
        }
        if !self.ellipse.is_empty() && self.ellipse.len() != n {
            return Err(format!(
                "{} ellipse scales for {n} labels",
                self.ellipse.len()
            ));
        }
        if let Some(bad) = self
            .ellipse
            .iter()
            .flatten()
            .find(|s| !(s.is_finite() && **s > 0.0 && **s <= 2.0))
        {
            return Err(format!("ellipse scale {bad} outside (0, 2]"));
        }
        if let Some(l) = (0..self.ellipse.len())
            .find(|&l| self.ellipse[l].is_some() && !self.convex.get(l).copied().unwrap_or(false))
        {
            return Err(format!(
                "an ellipse scale for label {l}, which is not drawn convex"
            ));
        }
        if !self.sam_redraw.is_empty() && self.sam_redraw.len() != n {
            return Err(format!(
                "{} SAM redraw flags for {n} labels",
                self.sam_redraw.len()
            ));
        }
        if !self.extremes.is_empty()
            && (self.extremes.len() != n || self.extremes.iter().flatten().any(|e| !e.is_valid()))
        {
            return Err(format!(
                "{} structure extremes for {n} labels, or one with no direction or band",
                self.extremes.len()
            ));
        }
        crate::calibration::validate(
            &self.calibration,
            n,
            self.landmark_radius.unwrap_or(f64::INFINITY),
        )?;
        if self.enclosed.as_ref().is_some_and(|e| !e.fits(n)) {
            return Err(format!(
                "the enclosed structures' frames do not fit {n} labels (outlines, shares)"
            ));
        }
        if let Some(shape) = &self.shape {
            if !shape.fits(n) {
                return Err(format!("the layout does not describe {n} labels"));
            }
        }
        for m in &self.members {
            if m.labels != self.labels
                || m.feature_mean.len() != c
                || m.train.context != self.train.context
                || !m.members.is_empty()
            {
                return Err(format!(
                    "ensemble member ({}) does not match the adapter's labels and features",
                    m.method
                ));
            }
            m.validate()
                .map_err(|e| format!("ensemble member ({}): {e}", m.method))?;
        }
        if n == 0 || c == 0 || self.feature_std.len() != c {
            return Err(format!(
                "{n} labels, {c} feature means, {} stds",
                self.feature_std.len()
            ));
        }
        let chain = |net: &Mlp, inp: usize| -> Result<usize, String> {
            let mut width = inp;
            for (i, l) in net.layers.iter().enumerate() {
                if l.w.ncols() != width || l.b.len() != l.w.nrows() {
                    return Err(format!(
                        "layer {i} is {:?} with {} biases after width {width}",
                        l.w.dim(),
                        l.b.len()
                    ));
                }
                width = l.w.nrows();
            }
            Ok(width)
        };
        match &self.model {
            Model::Basic { prototypes } if prototypes.dim() != (n, c) => Err(format!(
                "prototypes {:?}, expected ({n}, {c})",
                prototypes.dim()
            )),
            Model::Basic { .. } => Ok(()),
            Model::Classification { net } => match chain(net, c)? {
                out if out == n + 1 => Ok(()),
                out => Err(format!(
                    "classifier gives {out} classes, expected {}",
                    n + 1
                )),
            },
            Model::Contrastive {
                branch,
                head,
                references,
            } => {
                let e = chain(branch, c)?;
                if head.w.dim() != (n + 1, 2 * e) || head.b.len() != n + 1 {
                    return Err(format!(
                        "head {:?}, expected ({}, {})",
                        head.w.dim(),
                        n + 1,
                        2 * e
                    ));
                }
                if references.len() != n
                    || references.iter().any(|r| r.ncols() != c || r.nrows() == 0)
                {
                    return Err("reference features do not match the labels or channels".into());
                }
                Ok(())
            }
        }
    }

    /// The map this adapter reads: with `coarse_landmarks`, the map's coarsest part.
    pub fn features<'a>(&self, fm: &'a FeatureMap) -> std::borrow::Cow<'a, FeatureMap> {
        match self.train.coarse_landmarks.then(|| fm.coarsest()).flatten() {
            Some(part) => std::borrow::Cow::Owned(part),
            None => std::borrow::Cow::Borrowed(fm),
        }
    }

    /// Checks that features come from the backbone this adapter was trained on.
    pub fn check_backbone(&self, id: &str, sha256: &str) -> Result<(), AdapterError> {
        for m in &self.members {
            m.check_backbone(id, sha256)?;
        }
        if !self.backbone_sha256.eq_ignore_ascii_case(sha256) {
            return Err(AdapterError::WrongBackbone {
                expected: self.backbone.clone(),
                expected_sha: self.backbone_sha256.clone(),
                actual: id.to_string(),
                actual_sha: sha256.to_string(),
            });
        }
        Ok(())
    }

    /// Score maps (L × h × w) in [0, 1]; ≥ 0.5 means "this label". With ensemble
    /// members, the mean of their scores and this adapter's.
    ///
    /// A chunk of `SCORE_CHUNK` cells at a time: the chunk's standardised rows and the
    /// models' layers stay in cache, where the whole slice's rows (25 MB for the
    /// 384-channel features on a 128 × 128 grid) and hidden layers went through memory
    /// (chest: 24 → 20 ms per slice); the chunks are shared out over the cores. Rows are
    /// independent and each chunk's matrix products sum over the same columns in the same
    /// order, so the scores are the same bits as `scores_and_rows`'s.
    pub fn scores(&self, fm: &FeatureMap) -> Result<Array3<f32>, AdapterError> {
        let (h, w) = fm.grid();
        let all = Window {
            rows: 0..h,
            columns: 0..w,
        };
        self.scores_in(fm, Frame::whole(fm), &all, &vec![0..w; h])
    }

    /// `scores` of `cells` (labels × the map's grid), 0 elsewhere; there the scores are
    /// those of the whole map but for rounding, and the models run on those cells only.
    /// A map with coarse channels has its planes taken over the cells and those they read
    /// (`coarse_first_layers`); another is cropped to the cells' box and the cells its
    /// pools read (`window::crop`). A slice mean (`Context::global`) is the whole map's:
    /// with it the whole map is scored.
    pub fn scores_within(
        &self,
        fm: &FeatureMap,
        cells: &Cells,
    ) -> Result<Array3<f32>, AdapterError> {
        let (h, w) = fm.grid();
        let ctx = &self.train.context;
        // Cells past the grid are cut to it.
        let cells = cells.and(&Window::whole((h, w)).into());
        if ctx.global || !cells.crops((h, w)) {
            return self.scores(fm);
        }
        let mut scores = Array3::zeros((self.labels.len(), h, w));
        let Some(window) = cells.bounds() else {
            return Ok(scores);
        };
        let spans = cells.within(&window);
        let (rows, columns) = (window.rows.clone(), window.columns.clone());
        let within = if fm.coarse.is_empty() {
            let reach = ctx.pools.iter().map(|k| k / 2).max().unwrap_or(0);
            let (crop, origin) = crate::window::crop(fm, &window, reach);
            let inside = Window {
                rows: rows.start - origin.0..rows.end - origin.0,
                columns: columns.start - origin.1..columns.end - origin.1,
            };
            let frame = Frame {
                origin,
                grid: (h, w),
            };
            self.scores_in(&crop, frame, &inside, &spans)?
        } else {
            self.scores_in(fm, Frame::whole(fm), &window, &spans)?
        };
        scores.slice_mut(s![.., rows, columns]).assign(&within);
        Ok(scores)
    }

    /// `scores` of `fm`'s cells in `keep` (labels × its rows × its columns), `keep` on
    /// `fm`'s grid and within it; per row of `keep`, the cells of its span in `spans`
    /// (columns from `keep`'s first), 0 elsewhere.
    fn scores_in(
        &self,
        fm: &FeatureMap,
        frame: Frame,
        keep: &Window,
        spans: &[Range<usize>],
    ) -> Result<Array3<f32>, AdapterError> {
        let all = || self.members.iter().chain(std::iter::once(self));
        let (_, h, w) = fm.data.dim();
        let cells = h * w;
        let (kh, kw) = (keep.rows.len(), keep.columns.len());
        let n_labels = self.labels.len();
        // Pooled columns are box means over whole planes: per chunk they would be taken
        // again or copied (the spine's scores, 4096 cells and 770 columns, took 1 ms more
        // either way); on a map with coarse channels they are not columns of the chunks
        // (`CoarseFirstLayer`). A basic model, or another standardisation, reads other
        // rows.
        if (!self.train.context.pools.is_empty() && fm.coarse.is_empty())
            || cells <= SCORE_CHUNK
            || all().any(|a| matches!(a.model, Model::Basic { .. }) || !a.shares(self))
        {
            let (scores, _) = self.scores_and_rows_in(fm, frame)?;
            if kh == h && kw == w && spans.iter().all(|s| s.len() == w) {
                return Ok(scores);
            }
            let mut kept = Array3::zeros((n_labels, kh, kw));
            for ((r, span), mut line) in keep
                .rows
                .clone()
                .zip(spans)
                .zip(kept.axis_iter_mut(Axis(1)))
            {
                let at = keep.columns.start + span.start..keep.columns.start + span.end;
                line.slice_mut(s![.., span.clone()])
                    .assign(&scores.slice(s![.., r, at]));
            }
            return Ok(kept);
        }
        let standard = fm.data.as_standard_layout();
        let columns = ContextColumns::new(standard.view(), &self.train.context, frame);
        if columns.width() != self.feature_mean.len() {
            return Err(AdapterError::Channels {
                expected: self.feature_mean.len(),
                actual: columns.width(),
            });
        }
        let split = self.coarse_first_layers(fm, columns.width(), keep, spans);
        // With the channels and their pools taken as planes, a chunk needs only the other
        // columns.
        let built: Vec<usize> = match &split {
            Some((per_cell, _)) => per_cell.clone().collect(),
            None => (0..columns.width()).collect(),
        };
        let refs: Vec<_> = all().map(|a| a.reference_terms()).collect();
        // Per row of `keep`, the number of its kept cells before it.
        let starts: Vec<usize> = spans
            .iter()
            .scan(0, |n, s| {
                let start = *n;
                *n += s.len();
                Some(start)
            })
            .collect();
        let kept: usize = spans.iter().map(|s| s.len()).sum();
        let mut sum = Array2::zeros((kept, n_labels));
        // The kept cells in order, `SCORE_CHUNK` at a time; a chunk's cells on `fm`'s
        // grid are a run per row it touches, joined where one ends as the next begins
        // (one run when `keep` spans the grid).
        let runs_of = |cells: Range<usize>| -> Vec<Range<usize>> {
            let mut runs: Vec<Range<usize>> = Vec::new();
            let first = starts
                .partition_point(|&s| s <= cells.start)
                .saturating_sub(1);
            for (i, span) in spans.iter().enumerate().skip(first) {
                let Some(&a) = starts.get(i).filter(|&&a| a < cells.end) else {
                    break;
                };
                let (lo, hi) = (cells.start.max(a), cells.end.min(a + span.len()));
                if lo >= hi {
                    continue;
                }
                let at = (keep.rows.start + i) * w + keep.columns.start + span.start + lo - a;
                match runs.last_mut() {
                    Some(run) if run.end == at => run.end += hi - lo,
                    _ => runs.push(at..at + hi - lo),
                }
            }
            runs
        };
        // The chunks over the cores: besides the products, the rows' columns, the
        // activations and the softmax run in each chunk's own thread.
        let chunks: Vec<_> = sum
            .as_slice_mut()
            .map(|s| s.chunks_mut(SCORE_CHUNK * n_labels.max(1)))
            .into_iter()
            .flatten()
            .enumerate()
            .collect();
        let done = in_parallel(chunks, |_, (i, out)| {
            let chunk = i * SCORE_CHUNK..(i * SCORE_CHUNK + SCORE_CHUNK).min(kept);
            let runs = runs_of(chunk.clone());
            let n = cells_in(&runs);
            let mut x = Vec::with_capacity(n * built.len());
            for &k in &built {
                columns.append(k, &runs, &mut x);
                let column = x.len() - n;
                self.standardize_column(k, &mut x[column..]);
            }
            let x =
                Array2::from_shape_vec((n, built.len()).f(), x).expect("chunk × columns values");
            let mut chunk_sum = ndarray::ArrayViewMut2::from_shape((n, n_labels), out)
                .expect("chunk × labels scores");
            match &split {
                Some((_, layers)) => {
                    for ((a, layer), refs) in all().zip(layers).zip(&refs) {
                        chunk_sum += &a.split_scores(layer, x.view(), chunk.clone(), refs)?;
                    }
                }
                None => {
                    for (a, refs) in all().zip(&refs) {
                        chunk_sum += &a.row_scores(None, x.view(), refs)?;
                    }
                }
            }
            Ok::<_, AdapterError>(())
        });
        done.into_iter().collect::<Result<Vec<()>, _>>()?;
        sum /= (1 + self.members.len()) as f32;
        let mut planes = Array3::zeros((n_labels, kh, kw));
        let cells = spans
            .iter()
            .enumerate()
            .flat_map(|(r, span)| span.clone().map(move |c| (r, c)));
        for ((r, c), scores) in cells.zip(sum.rows()) {
            planes.slice_mut(s![.., r, c]).assign(&scores);
        }
        Ok(planes)
    }

    /// `scores`, and the feature rows they were computed from, standardised as this
    /// adapter's models see them (what `votes` reads): the context columns are built and
    /// standardised once, for this adapter and every member with the same standardisation.
    pub fn scores_and_rows(
        &self,
        fm: &FeatureMap,
    ) -> Result<(Array3<f32>, Array2<f32>), AdapterError> {
        self.scores_and_rows_in(fm, Frame::whole(fm))
    }

    fn scores_and_rows_in(
        &self,
        fm: &FeatureMap,
        frame: Frame,
    ) -> Result<(Array3<f32>, Array2<f32>), AdapterError> {
        let (_, h, w) = fm.data.dim();
        let all = || self.members.iter().chain(std::iter::once(self));
        // The raw rows are kept only for a basic model or another standardisation.
        let keep_raw = all().any(|a| matches!(a.model, Model::Basic { .. }) || !a.shares(self));
        let (standard, raw) = if keep_raw {
            let raw = self.context_of(fm, frame)?;
            let mut standard = raw.clone();
            standardize(&mut standard, &self.feature_mean, &self.feature_std);
            (standard, Some(raw))
        } else {
            (self.standardized_rows_in(fm, frame)?, None)
        };
        let mut sum = Array2::zeros((h * w, self.labels.len()));
        let all_cells = Window {
            rows: 0..h,
            columns: 0..w,
        };
        let every = vec![0..w; h];
        if let (None, Some((per_cell, layers))) = (
            &raw,
            self.coarse_first_layers(fm, standard.ncols(), &all_cells, &every),
        ) {
            let x = standard.slice(s![.., per_cell]);
            for (a, layer) in all().zip(&layers) {
                sum += &a.split_scores(layer, x.view(), 0..h * w, &a.reference_terms())?;
            }
            sum /= (1 + self.members.len()) as f32;
            return Ok((label_planes(&sum, h, w), standard));
        }
        for a in all() {
            sum += &match &raw {
                Some(raw) if !a.shares(self) => {
                    let mut x = raw.clone();
                    standardize(&mut x, &a.feature_mean, &a.feature_std);
                    a.row_scores(Some(raw), x.view(), &a.reference_terms())?
                }
                raw => a.row_scores(raw.as_ref(), standard.view(), &a.reference_terms())?,
            };
        }
        sum /= (1 + self.members.len()) as f32;
        Ok((label_planes(&sum, h, w), standard))
    }

    /// The feature rows of `fm` standardised as this adapter's models see them.
    pub fn standardized_rows(&self, fm: &FeatureMap) -> Result<Array2<f32>, AdapterError> {
        self.standardized_rows_in(fm, Frame::whole(fm))
    }

    fn standardized_rows_in(
        &self,
        fm: &FeatureMap,
        frame: Frame,
    ) -> Result<Array2<f32>, AdapterError> {
        let rows = build_context_rows(fm, &self.train.context, frame, |k, column| {
            self.standardize_column(k, column)
        });
        self.checked_columns(rows)
    }

    /// Standardises the values of context column `k` as `standardize` does (a column this
    /// adapter does not have is left alone; `checked_columns` refuses such rows).
    fn standardize_column(&self, k: usize, column: &mut [f32]) {
        if let (Some(m), Some(s)) = (self.feature_mean.get(k), self.feature_std.get(k)) {
            column.iter_mut().for_each(|v| *v = (*v - m) / s);
        }
    }

    /// `context_rows` with this adapter's context, checked against its columns.
    fn context_of(&self, fm: &FeatureMap, frame: Frame) -> Result<Array2<f32>, AdapterError> {
        self.checked_columns(build_context_rows(
            fm,
            &self.train.context,
            frame,
            |_, _| {},
        ))
    }

    /// `rows`, when they have as many columns as this adapter's features.
    fn checked_columns(&self, rows: Array2<f32>) -> Result<Array2<f32>, AdapterError> {
        if rows.ncols() != self.feature_mean.len() {
            return Err(AdapterError::Channels {
                expected: self.feature_mean.len(),
                actual: rows.ncols(),
            });
        }
        Ok(rows)
    }

    /// Whether this adapter standardises features as `other` does.
    fn shares(&self, other: &Adapter) -> bool {
        self.feature_mean == other.feature_mean && self.feature_std == other.feature_std
    }

    /// Scores (cells × L) of this adapter's own model: a basic one reads the `raw` rows of
    /// `context_rows`, the others the rows `x` standardised with this adapter's mean and
    /// spread.
    fn row_scores(
        &self,
        raw: Option<&Array2<f32>>,
        x: ArrayView2<f32>,
        refs: &[ReferenceTerms],
    ) -> Result<Array2<f32>, AdapterError> {
        if x.ncols() != self.feature_mean.len() {
            return Err(AdapterError::Channels {
                expected: self.feature_mean.len(),
                actual: x.ncols(),
            });
        }
        self.scores_from(raw, x.nrows(), refs, |net| net.forward(x))
    }

    /// A contrastive model's `ReferenceTerms`, one per label (none for the other models):
    /// the same for every cell, so taken once per slice rather than once per chunk of
    /// cells (the spine structures' 5 × 32 references through the branch cost as much as
    /// a tenth of the slice's cells).
    fn reference_terms(&self) -> Vec<ReferenceTerms> {
        let Model::Contrastive {
            branch,
            head,
            references,
        } = &self.model
        else {
            return Vec::new();
        };
        let e = head.w.ncols() / 2;
        references
            .iter()
            .map(|refs| {
                let terms = branch
                    .forward(refs.view())
                    .dot(&head.w.slice(s![.., ..e]).t());
                let exp = exp_rows(&terms);
                ReferenceTerms { terms, exp }
            })
            .collect()
    }

    /// How its structures' outlines are drawn (`convex::fill`).
    pub fn outlines(&self) -> crate::convex::Outlines<'_> {
        crate::convex::Outlines {
            convex: &self.convex,
            ellipse: &self.ellipse,
        }
    }

    /// With `enclosed_gaps`, gives the enclosed structures among the structures `found`
    /// in a slice the narrow gaps between them and those around them, and draws a convex
    /// one by its outline rule again (`EnclosedModel::close_gaps`; `cell`: a grid cell's
    /// height and width in pixels, `scores`: per label at image resolution). Whether any
    /// changed.
    pub fn close_gaps(
        &self,
        found: &mut [Option<crate::postprocess::Finding>],
        cell: (f64, f64),
        scores: &Array3<f32>,
    ) -> bool {
        match (&self.enclosed, self.train.enclosed_gaps) {
            (Some(model), true) => model
                .close_gaps(found, cell, scores, self.outlines())
                .contains(&true),
            _ => false,
        }
    }

    /// Whether SAM's decoder redraws structure `l` (`sam_redraw`).
    pub fn redraws(&self, l: usize) -> bool {
        self.sam_redraw.get(l).copied().unwrap_or(false)
    }

    /// The net that reads the cells' rows: the classifier, or the contrastive branch.
    fn net(&self) -> Option<&Mlp> {
        match &self.model {
            Model::Basic { .. } => None,
            Model::Classification { net } => Some(net),
            Model::Contrastive { branch, .. } => Some(branch),
        }
    }

    /// Per adapter of `scores` (the members, then this one), its `CoarseFirstLayer` on
    /// `fm`'s cells in `keep`, per row those of its span in `spans` (columns from `keep`'s
    /// first; row by row, `scores_in`'s order), with the columns taken per cell among `width`
    /// context columns (those after the channels and their pools: position, slice mean;
    /// possibly none); `None` when the map has no coarse channels, a model has no first
    /// layer to split, or `keep` is empty or not within the grid.
    ///
    /// The planes are packed once per product, not once per adapter and block; the fine
    /// channels' box means and the coarse planes' resizes are spread over the cores.
    fn coarse_first_layers(
        &self,
        fm: &FeatureMap,
        width: usize,
        keep: &Window,
        spans: &[Range<usize>],
    ) -> Option<(std::ops::Range<usize>, Vec<CoarseFirstLayer>)> {
        let pools = &self.train.context.pools;
        let fine_channels = fine_channels(fm)?;
        let (h, w) = fm.grid();
        let cells = h * w;
        let (kh, kw) = (keep.rows.len(), keep.columns.len());
        let kept: usize = spans.iter().map(|s| s.len()).sum();
        let within = spans.len() == kh && spans.iter().all(|s| s.end <= kw);
        if keep.rows.end > h || keep.columns.end > w || kept == 0 || !within {
            return None;
        }
        let channels = fm.channels();
        let blocks = 1 + pools.len();
        let per_cell = blocks * channels..width;
        let data = fm.data.as_standard_layout();
        let data = data.to_shape((channels, cells)).ok()?;
        let adapters: Vec<&Adapter> = self.members.iter().chain(std::iter::once(self)).collect();
        let firsts = adapters
            .iter()
            .map(|a| {
                let first = a.net()?.layers.first()?;
                (first.w.ncols() == width && a.feature_mean.len() == width).then_some(first)
            })
            .collect::<Option<Vec<_>>>()?;
        // One hidden width for all, so that the stacked products' rows are (block, adapter,
        // unit) in a plain order (an ensemble's methods are trained with one config).
        let hidden = firsts.first()?.w.nrows();
        if firsts.iter().any(|f| f.w.nrows() != hidden) || blocks * channels > width {
            return None;
        }
        let units = adapters.len() * hidden;
        // W·((x − m)/s) = (W/s)·x − (W/s)·m: the planes are read as they are, with no
        // standardised copy of them, and every (W/s)·m is taken off once at the end (each
        // resize and box mean keeps a constant). Per block of columns (0: the channels as
        // they are, then each pool's block of every channel), W/s over the columns `within`
        // the map's channels, every adapter's stacked: (adapter, unit) × columns.
        let scaled = |block: usize, within: std::ops::Range<usize>| {
            let columns = block * channels + within.start..block * channels + within.end;
            let mut weights = Vec::with_capacity(adapters.len());
            for (a, first) in adapters.iter().zip(&firsts) {
                let mut scaled = first.w.slice(s![.., columns.clone()]).to_owned();
                for (mut column, s) in scaled
                    .columns_mut()
                    .into_iter()
                    .zip(a.feature_std.slice(s![columns.clone()]))
                {
                    column /= *s;
                }
                weights.push(scaled);
            }
            let views: Vec<_> = weights.iter().map(|w| w.view()).collect();
            ndarray::concatenate(Axis(0), &views).ok()
        };
        // Per (adapter, unit), (W/s)·m over every column taken as planes.
        let mut offsets = Vec::with_capacity(units);
        for (a, first) in adapters.iter().zip(&firsts) {
            let planar = ..blocks * channels;
            let mean = &a.feature_mean.slice(s![planar]) / &a.feature_std.slice(s![planar]);
            offsets.extend(first.w.slice(s![.., planar]).dot(&mean));
        }
        // The fine channels over `keep`'s cells, a plane per row: per block, the channels
        // as they are (block 0), then per pool their box means (one plane per channel,
        // not per hidden unit: 128 against 256 on the spine's ensemble), so that a
        // single product over the kept cells takes every block.
        let fine: Vec<usize> = fine_channels.iter().flat_map(|run| run.clone()).collect();
        // Over the whole grid, the channels as they are are read in place (a copy of them
        // cost more than it saved).
        let built = if kept == cells { 1 } else { 0 }..blocks;
        let mut planes = Array2::<f32>::zeros((built.len() * fine.len(), kept));
        let jobs: Vec<_> = planes
            .as_slice_mut()?
            .chunks_exact_mut(kept)
            .enumerate()
            .collect();
        // A pool's box means over the cells it reads around `keep`: those cells' plane,
        // copied out of the channel's.
        let around = |r: usize, n: usize, cut: &Range<usize>| {
            cut.start.saturating_sub(r)..(cut.end + r).min(n)
        };
        // Row-major (standard layout), checked once: a channel's plane is one slice.
        let all_planes = data.as_slice()?;
        in_parallel(jobs, |scratch, (i, out)| {
            let (block, channel) = (built.start + i / fine.len(), fine[i % fine.len()]);
            let plane = &all_planes[channel * cells..(channel + 1) * cells];
            let (source, width, origin) = match block.checked_sub(1).and_then(|p| pools.get(p)) {
                Some(k) => {
                    let rows = around(k / 2, h, &keep.rows);
                    let columns = around(k / 2, w, &keep.columns);
                    let (rh, rw) = (rows.len(), columns.len());
                    scratch.resize(3 * rh * rw, 0.0);
                    let (region, rest) = scratch.split_at_mut(rh * rw);
                    let (row_sums, means) = rest.split_at_mut(rh * rw);
                    for (r, line) in rows.clone().zip(region.chunks_exact_mut(rw)) {
                        let at = r * w + columns.start;
                        line.copy_from_slice(&plane[at..at + rw]);
                    }
                    crate::image::box_mean(region, rh, rw, k / 2, row_sums, means);
                    (&*means, rw, (rows.start, columns.start))
                }
                None => (plane, w, (0, 0)),
            };
            let mut line = 0;
            for (r, span) in keep.rows.clone().zip(spans) {
                let at = (r - origin.0) * width + keep.columns.start + span.start - origin.1;
                out[line..line + span.len()].copy_from_slice(&source[at..at + span.len()]);
                line += span.len();
            }
        });
        // The planes (a plane per row) and W/s over them, (adapter, unit) × planes.
        let weights_over = |blocks: Range<usize>| {
            let weights = blocks
                .flat_map(|block| fine_channels.iter().map(move |run| (block, run.clone())))
                .map(|(block, run)| scaled(block, run))
                .collect::<Option<Vec<_>>>()?;
            let views: Vec<_> = weights.iter().map(|w| w.view()).collect();
            ndarray::concatenate(Axis(1), &views).ok()
        };
        let mut sources = Vec::with_capacity(fine_channels.len() + 1);
        if built.start > 0 {
            for run in &fine_channels {
                sources.push((data.slice(s![run.clone(), ..]), scaled(0, run.clone())?));
            }
        }
        if !built.is_empty() {
            sources.push((planes.view(), weights_over(built.clone())?));
        }
        // The planes' product per adapter: its hidden units' planes (kept cells × hidden,
        // column-major: a plane per column). The first product writes, not adds: the
        // zeroed pages are not read. No array here reaches 32 MiB: glibc maps those
        // afresh on every call, and on a VM their pages' faults cost more than the
        // products.
        let mut resized = Vec::with_capacity(adapters.len());
        for i in 0..adapters.len() {
            let mut product = Array2::<f32>::zeros((kept, hidden).f());
            for (j, (planes, weights)) in sources.iter().enumerate() {
                let weights = weights.slice(s![i * hidden..(i + 1) * hidden, ..]);
                let beta = if j == 0 { 0.0 } else { 1.0 };
                ndarray::linalg::general_mat_mul(
                    1.0,
                    &planes.t(),
                    &weights.t(),
                    beta,
                    &mut product,
                );
            }
            resized.push(product);
        }
        // Per coarse part, its planes' products over the part's cells the kept cells read,
        // and the taps that take them to the kept cells: block 0 resized (`add_resized`),
        // each pool's block resized and box-averaged in one separable pass
        // (`box_of_bilinear_taps`, `add_spread`).
        let mut parts = Vec::with_capacity(fm.coarse.len());
        for part in &fm.coarse {
            let (n, ph, pw) = part.map.dim();
            let (ys, xs) = (
                CoarseTaps::new(h, ph, &keep.rows, pools),
                CoarseTaps::new(w, pw, &keep.columns, pools),
            );
            let (rows, columns) = (ys.read.clone(), xs.read.clone());
            let (rh, rw) = (rows.len(), columns.len());
            let weights = |blocks: Range<usize>| {
                let weights = blocks
                    .map(|block| scaled(block, part.first..part.first + n))
                    .collect::<Option<Vec<_>>>()?;
                let views: Vec<_> = weights.iter().map(|w| w.view()).collect();
                ndarray::concatenate(Axis(0), &views).ok()
            };
            let coarse = part.map.slice(s![.., rows, columns]);
            let planes = coarse.as_standard_layout();
            let planes = planes.to_shape((n, rh * rw)).ok()?;
            // Block 0's planes, (adapter, unit) × the part's cells; the pools' transposed
            // (`add_spread`), (pool, adapter, unit) × the cells column by column.
            let product = weights(0..1)?.dot(&planes);
            let pooled = match blocks {
                1 => Array2::zeros((0, rw * rh)),
                _ => {
                    let transposed = coarse.permuted_axes([0, 2, 1]);
                    let transposed = transposed.as_standard_layout();
                    let transposed = transposed.to_shape((n, rw * rh)).ok()?;
                    weights(1..blocks)?.dot(&transposed)
                }
            };
            parts.push((
                product,
                pooled,
                (rh, rw),
                (ys.resize, xs.resize),
                (ys.pooled, xs.pooled),
            ));
        }
        let mut targets = Vec::with_capacity(units);
        for planes in resized.iter_mut() {
            targets.extend(planes.as_slice_memory_order_mut()?.chunks_exact_mut(kept));
        }
        let jobs: Vec<_> = targets.into_iter().zip(&offsets).enumerate().collect();
        in_parallel(jobs, |across, (unit, (out, &offset))| {
            for (product, pooled, (rh, rw), (ys, xs), (y_pools, x_pools)) in &parts {
                let pooled = (0..pools.len()).map(|p| pooled.row(p * units + unit));
                for ((columns, ys), xs) in pooled.zip(y_pools).zip(x_pools) {
                    if let Some(columns) = columns.to_slice() {
                        let spans = Some(spans);
                        crate::image::add_spread(columns, *rh, ys, xs, spans, across, out);
                    }
                }
                if let Ok(plane) = product.row(unit).to_shape((*rh, *rw)) {
                    crate::image::add_resized(plane.view(), ys, xs, Some(spans), across, out);
                }
            }
            out.iter_mut().for_each(|o| *o -= offset);
        });
        let layers = firsts
            .iter()
            .zip(resized)
            .map(|(first, resized)| CoarseFirstLayer {
                w_fine: first.w.slice(s![.., per_cell.clone()]).to_owned(),
                resized,
            })
            .collect();
        Some((per_cell, layers))
    }

    /// `row_scores` of the cells `kept` of the `CoarseFirstLayer`'s kept cells from their
    /// columns taken per cell `x` (those `coarse_first_layers` names) and the planes'
    /// product in `layer`.
    fn split_scores(
        &self,
        layer: &CoarseFirstLayer,
        x: ArrayView2<f32>,
        kept: Range<usize>,
        refs: &[ReferenceTerms],
    ) -> Result<Array2<f32>, AdapterError> {
        if x.ncols() != layer.w_fine.ncols() {
            return Err(AdapterError::Channels {
                expected: layer.w_fine.ncols(),
                actual: x.ncols(),
            });
        }
        if x.nrows() != kept.len() || kept.end > layer.resized.nrows() {
            return Err(AdapterError::Cells {
                rows: x.nrows(),
                cells: kept,
                planned: layer.resized.nrows(),
            });
        }
        self.scores_from(None, x.nrows(), refs, |net| {
            // Column-major like `resized` and the layers after it.
            let mut product = Array2::<f32>::zeros((x.nrows(), layer.resized.ncols()).f());
            for (mut p, r) in product
                .columns_mut()
                .into_iter()
                .zip(layer.resized.columns())
            {
                p.assign(&r.slice(s![kept.clone()]));
            }
            // Not with no columns (the chest's): matrixmultiply then only scales the
            // product by beta, element by element, which took longer than the products.
            if x.ncols() > 0 {
                ndarray::linalg::general_mat_mul(1.0, &x, &layer.w_fine.t(), 1.0, &mut product);
            }
            net.forward_from_product(product)
        })
    }

    /// Scores (cells × L) of this adapter's own model, from `forward`, which runs a net
    /// (classifier, or contrastive branch) on the cells; a basic model reads `raw`, a
    /// contrastive one its `reference_terms` `refs`.
    fn scores_from(
        &self,
        raw: Option<&Array2<f32>>,
        cells: usize,
        refs: &[ReferenceTerms],
        forward: impl FnOnce(&Mlp) -> Array2<f32>,
    ) -> Result<Array2<f32>, AdapterError> {
        let n = self.labels.len();
        Ok(match &self.model {
            Model::Basic { prototypes } => match raw {
                Some(raw) => unit_rows(raw).dot(&prototypes.t()),
                None => {
                    return Err(AdapterError::NoTraining(
                        "a basic model needs the unstandardised rows".into(),
                    ))
                }
            },
            Model::Classification { net } => {
                let logits = forward(net);
                let mut p = Array2::zeros((cells, n));
                for (r, row) in logits.rows().into_iter().enumerate() {
                    let max = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
                    for l in 0..n {
                        p[[r, l]] = (row[l + 1] - max).exp() / sum;
                    }
                }
                p
            }
            Model::Contrastive { branch, head, .. } => {
                if refs.len() != n {
                    return Err(AdapterError::NoTraining(format!(
                        "{} labels' reference terms for {n} labels",
                        refs.len()
                    )));
                }
                let e = head.w.ncols() / 2;
                // The head is linear in [e_ref, e_tgt]: split it into its two halves.
                let target_terms = forward(branch).dot(&head.w.slice(s![.., e..]).t()) + &head.b;
                // p(label | ref, target) = softmax(ref_terms + target_terms)[label + 1],
                // averaged over the label's references. exp(a + b) = exp(a)·exp(b), so
                // the softmax denominators of all (target, reference) pairs are one
                // matrix product of row-wise exponentials (each row shifted by its own
                // maximum; the shifts cancel in the ratio).
                let target_exp = exp_rows(&target_terms);
                let mut p = Array2::zeros((cells, n));
                for (
                    l,
                    ReferenceTerms {
                        terms: ref_terms,
                        exp: ref_exp,
                    },
                ) in refs.iter().enumerate()
                {
                    let denominators = target_exp.dot(&ref_exp.t());
                    let n_refs = ref_terms.nrows().max(1) as f32;
                    // The label's terms of the references and the cells read as slices,
                    // not through a checked index per (cell, reference).
                    let numerators = ref_exp.column(l + 1).to_vec();
                    let targets = target_exp.column(l + 1);
                    for (r, ((dens, &t), p)) in denominators
                        .rows()
                        .into_iter()
                        .zip(targets)
                        .zip(p.column_mut(l))
                        .enumerate()
                    {
                        let mut acc = 0.0;
                        for (k, (&den, &e)) in dens.iter().zip(&numerators).enumerate() {
                            acc += if den > 1e-30 {
                                t * e / den
                            } else {
                                // Both rows' mass far from each other: no shortcut.
                                softmax_at(target_terms.row(r), ref_terms.row(k), l + 1)
                            };
                        }
                        *p = acc / n_refs;
                    }
                }
                p
            }
        })
    }
}

/// Training rows are held in memory all at once (one matrix, the methods draw from it at
/// random); past this size the background cells away from every region are sampled.
/// The spine templates augmented on the 128×128 grid of `litemedsam-hyper` would take
/// ~8 GB in full; the shipped configurations on the 64×64 grid stay under it.
pub const ROW_BUDGET_BYTES: usize = 4 << 30;

/// The cells an adapter trains on, as rows of `context_rows`, with their pools.
struct TrainingRows {
    all: Array2<f32>,
    /// Row indices per label, 0 = background.
    by_label: Vec<Vec<usize>>,
    /// With `borders`: per label, the rows within `BORDER_CELLS` outside its regions
    /// (other labels' cells included); for 0, the background rows near any region.
    near: Vec<Vec<usize>>,
    feature_mean: Array1<f32>,
    feature_std: Array1<f32>,
}

impl TrainingRows {
    /// Every cell of every slice, unless that would pass `budget` bytes: then every
    /// region cell and every cell of a region's border are kept and the other background
    /// cells with the probability that fits the budget (seeded). Negatives are drawn from
    /// the background uniformly anyway, so a uniform sample of it changes what is drawn,
    /// not how; the standardisation is computed over all cells either way.
    fn build(
        slices: &[TrainingSlice],
        n_labels: usize,
        config: &TrainConfig,
        budget: usize,
    ) -> Result<TrainingRows, AdapterError> {
        let channels = slices.first().map_or(0, |s| s.features.channels());
        let columns = context_width(channels, &config.context);
        let labels: Vec<Vec<u8>> = slices
            .iter()
            .map(|s| s.cells.iter().copied().collect())
            .collect();
        let marks: Vec<Vec<Vec<bool>>> = slices
            .iter()
            .map(|s| border_marks(&s.cells, n_labels))
            .collect();
        for (s, l) in slices.iter().zip(&labels) {
            let (_, h, w) = s.features.data.dim();
            if h * w != l.len() {
                return Err(AdapterError::NoTraining(
                    "cell label maps do not match the feature grids".into(),
                ));
            }
        }
        let total: usize = labels.iter().map(|l| l.len()).sum();
        let must: usize = labels
            .iter()
            .zip(&marks)
            .map(|(l, m)| (0..l.len()).filter(|&c| l[c] != 0 || m[0][c]).count())
            .sum();
        let row_bytes = columns * std::mem::size_of::<f32>();
        let budget_rows = budget / row_bytes.max(1);
        let fraction = if total <= budget_rows {
            1.0
        } else {
            // Never none of the far background: it is what the adapter must reject most.
            let far = (total - must).max(1);
            (budget_rows.saturating_sub(must) as f64 / far as f64).clamp(1.0 / 16.0, 1.0)
        };
        let sampled = fraction < 1.0;
        if sampled {
            log::info!(
                "training rows: {total} cells × {columns} columns would take {:.1} GiB; \
                 keeping the {must} region and border cells and {:.0} % of the other {}",
                (total * row_bytes) as f64 / (1u64 << 30) as f64,
                fraction * 100.0,
                total - must
            );
        }
        let mut rng = Rng::new(config.seed ^ 0x005e_ed0f_c311);
        let kept: Vec<Vec<usize>> = labels
            .iter()
            .zip(&marks)
            .map(|(l, m)| {
                (0..l.len())
                    .filter(|&c| {
                        !sampled || l[c] != 0 || m[0][c] || (rng.uniform() as f64) < fraction
                    })
                    .collect()
            })
            .collect();
        let n_rows: usize = kept.iter().map(|k| k.len()).sum();
        // Appended slice by slice into one allocation (what `concatenate` does, without
        // holding every slice's rows beside the result).
        let mut all =
            Array2::<f32>::from_shape_vec((0, columns), Vec::with_capacity(n_rows * columns))
                .map_err(|e| AdapterError::NoTraining(e.to_string()))?;
        let mut stats = ColumnStats::new(columns);
        let mut by_label = vec![Vec::new(); n_labels + 1];
        let mut near = vec![Vec::new(); n_labels + 1];
        for (((s, l), m), k) in slices.iter().zip(&labels).zip(&marks).zip(&kept) {
            let offset = all.nrows();
            let rows = context_rows(s.features, &config.context);
            let append = if sampled {
                stats.add(&rows);
                all.append(Axis(0), rows.select(Axis(0), k).view())
            } else {
                all.append(Axis(0), rows.view())
            };
            append.map_err(|e| AdapterError::NoTraining(e.to_string()))?;
            for (i, &c) in k.iter().enumerate() {
                if let Some(pool) = by_label.get_mut(l[c] as usize) {
                    pool.push(offset + i);
                }
            }
            if config.borders {
                for (pool, mark) in near.iter_mut().zip(m) {
                    pool.extend(
                        k.iter()
                            .enumerate()
                            .filter(|(_, &c)| mark[c])
                            .map(|(i, _)| offset + i),
                    );
                }
            }
        }
        let (feature_mean, feature_std) = if sampled {
            stats.mean_std()
        } else {
            (
                all.mean_axis(Axis(0))
                    .unwrap_or_else(|| Array1::zeros(columns)),
                all.std_axis(Axis(0), 0.0),
            )
        };
        Ok(TrainingRows {
            all,
            by_label,
            near,
            feature_mean,
            feature_std: feature_std.mapv(|s| s.max(1e-6)),
        })
    }
}

/// Per-column mean and standard deviation accumulated slice by slice (f64).
struct ColumnStats {
    n: usize,
    sum: Vec<f64>,
    squares: Vec<f64>,
}

impl ColumnStats {
    fn new(columns: usize) -> ColumnStats {
        ColumnStats {
            n: 0,
            sum: vec![0.0; columns],
            squares: vec![0.0; columns],
        }
    }

    fn add(&mut self, rows: &Array2<f32>) {
        self.n += rows.nrows();
        for ((col, sum), sq) in rows
            .columns()
            .into_iter()
            .zip(&mut self.sum)
            .zip(&mut self.squares)
        {
            for &v in col {
                *sum += v as f64;
                *sq += (v as f64) * (v as f64);
            }
        }
    }

    fn mean_std(&self) -> (Array1<f32>, Array1<f32>) {
        let n = self.n.max(1) as f64;
        let mean: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let std = self
            .squares
            .iter()
            .zip(&mean)
            .map(|(sq, m)| (sq / n - m * m).max(0.0).sqrt() as f32)
            .collect();
        (
            mean.iter().map(|&m| m as f32).collect(),
            Array1::from_vec(std),
        )
    }
}

/// Columns of `context_rows` for features of `channels` channels.
fn context_width(channels: usize, ctx: &Context) -> usize {
    channels * (1 + ctx.pools.len() + usize::from(ctx.global)) + if ctx.position { 2 } else { 0 }
}

/// Per label (0 = background), the cells of one slice within `BORDER_CELLS` (Chebyshev)
/// of one of its regions and not in it; for 0, the background cells near any region.
fn border_marks(cells: &Array2<u8>, n_labels: usize) -> Vec<Vec<bool>> {
    let (h, w) = cells.dim();
    let mut marks = vec![vec![false; h * w]; n_labels + 1];
    for ((i, j), &v) in cells.indexed_iter() {
        let l = v as usize;
        if l == 0 || l > n_labels {
            continue;
        }
        for y in i.saturating_sub(BORDER_CELLS)..(i + BORDER_CELLS + 1).min(h) {
            for x in j.saturating_sub(BORDER_CELLS)..(j + BORDER_CELLS + 1).min(w) {
                let other = cells[[y, x]] as usize;
                if other != l {
                    marks[l][y * w + x] = true;
                    if other == 0 {
                        marks[0][y * w + x] = true;
                    }
                }
            }
        }
    }
    marks
}

/// Balanced minibatches: every batch draws half its rows from label cells (labels taken in
/// turn) and half from background (with `borders`, half of those near a region).
fn train_classifier(
    x: &Array2<f32>,
    by_label: &[Vec<usize>],
    near: &[Vec<usize>],
    cfg: &TrainConfig,
    rng: &mut Rng,
) -> Mlp {
    let n_labels = by_label.len() - 1;
    let mut net = Mlp::new(&[x.ncols(), cfg.hidden, cfg.hidden, n_labels + 1], rng);
    let mut adam = Adam::new(&net.layers, cfg.learning_rate);
    let background = &by_label[0];
    for _ in 0..cfg.steps {
        let mut picks = Vec::with_capacity(cfg.batch);
        let mut targets = Vec::with_capacity(cfg.batch);
        for b in 0..cfg.batch {
            let class = if b % 2 == 0 || background.is_empty() {
                1 + (b / 2) % n_labels
            } else {
                0
            };
            let pool = if class == 0 && !near[0].is_empty() && rng.below(2) == 1 {
                &near[0]
            } else {
                &by_label[class]
            };
            picks.push(pool[rng.below(pool.len())]);
            targets.push(class);
        }
        let xb = x.select(Axis(0), &picks);
        let (out, trace) = net.forward_traced(xb.view());
        let (_, g) = softmax_xent(&out, &targets);
        let (grads, _) = net.backward(&trace, g);
        adam.step(&mut net.layers, &grads);
    }
    net
}

/// Pairs per batch: half positive (both cells in the same label's region), half negative
/// (one in the region, one anywhere outside it — with `borders`, half of those just
/// outside it), labels taken in turn.
fn train_siamese(
    x: &Array2<f32>,
    by_label: &[Vec<usize>],
    near: &[Vec<usize>],
    cfg: &TrainConfig,
    rng: &mut Rng,
) -> (Mlp, Linear) {
    let n_labels = by_label.len() - 1;
    let mut branch = Mlp::new(&[x.ncols(), cfg.hidden, cfg.hidden, cfg.embedding], rng);
    let mut head = Linear::new(2 * cfg.embedding, n_labels + 1, rng);
    let mut adam_branch = Adam::new(&branch.layers, cfg.learning_rate);
    let mut adam_head = Adam::new(std::slice::from_ref(&head), cfg.learning_rate);
    let total = x.nrows();
    for _ in 0..cfg.steps {
        let mut a = Vec::with_capacity(cfg.batch);
        let mut b = Vec::with_capacity(cfg.batch);
        let mut t = Vec::with_capacity(cfg.batch);
        for k in 0..cfg.batch {
            let l = 1 + (k / 2) % n_labels;
            let region = &by_label[l];
            a.push(region[rng.below(region.len())]);
            if k % 2 == 0 {
                b.push(region[rng.below(region.len())]);
                t.push(l);
            } else {
                // Outside this label's region. Half of the negatives come from the other
                // labels' regions: drawn from everywhere they would be rare, and the net
                // would only learn "not background" instead of which region is which.
                let c = if n_labels > 1 && rng.below(2) == 1 {
                    let other = 1 + (l + rng.below(n_labels - 1)) % n_labels;
                    by_label[other][rng.below(by_label[other].len())]
                } else if !near[l].is_empty() && rng.below(2) == 1 {
                    near[l][rng.below(near[l].len())]
                } else {
                    let mut c = rng.below(total);
                    for _ in 0..64 {
                        if region.binary_search(&c).is_err() {
                            break;
                        }
                        c = rng.below(total);
                    }
                    c
                };
                b.push(c);
                t.push(0);
            }
        }
        let (ea, ta) = branch.forward_traced(x.select(Axis(0), &a).view());
        let (eb, tb) = branch.forward_traced(x.select(Axis(0), &b).view());
        let z = ndarray::concatenate(Axis(1), &[ea.view(), eb.view()]).expect("same rows");
        let logits = head.forward(z.view());
        let (_, g) = softmax_xent(&logits, &t);
        let gw = g.t().dot(&z);
        let gb = g.sum_axis(Axis(0));
        let gz = g.dot(&head.w);
        let e = cfg.embedding;
        // Shared weights: the two branches' gradients add up.
        let (mut ga, _) = branch.backward(&ta, gz.slice(s![.., ..e]).to_owned());
        let (gb2, _) = branch.backward(&tb, gz.slice(s![.., e..]).to_owned());
        for (acc, add) in ga.iter_mut().zip(gb2) {
            acc.0 += &add.0;
            acc.1 += &add.1;
        }
        adam_branch.step(&mut branch.layers, &ga);
        adam_head.step(std::slice::from_mut(&mut head), &vec![(gw, gb)]);
    }
    (branch, head)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Context columns equal their definitions computed cell by cell.
    #[test]
    fn context_rows_match_direct_definitions() {
        let mut rng = Rng::new(3);
        let (c, h, w) = (3, 7, 10);
        let fm = FeatureMap::new(Array3::from_shape_fn((c, h, w), |_| rng.normal()), 28, 40);
        let ctx = Context {
            pools: vec![3, 5],
            global: true,
            position: true,
        };
        let rows = context_rows(&fm, &ctx);
        assert_eq!(rows.dim(), (h * w, c * 4 + 2));
        for y in 0..h {
            for x in 0..w {
                let row = rows.row(y * w + x);
                for ch in 0..c {
                    assert_eq!(row[ch], fm.data[[ch, y, x]]);
                    for (p, k) in [3usize, 5].into_iter().enumerate() {
                        let r = k / 2;
                        let (mut sum, mut n) = (0.0f64, 0);
                        for yy in y.saturating_sub(r)..(y + r + 1).min(h) {
                            for xx in x.saturating_sub(r)..(x + r + 1).min(w) {
                                sum += fm.data[[ch, yy, xx]] as f64;
                                n += 1;
                            }
                        }
                        let got = row[(1 + p) * c + ch] as f64;
                        assert!((got - sum / n as f64).abs() < 1e-5, "pool {k} at {y},{x}");
                    }
                    let mean = fm.data.index_axis(Axis(0), ch).mean().unwrap();
                    assert!((row[3 * c + ch] - mean).abs() < 1e-5);
                }
                assert_eq!(row[4 * c], (y as f32 + 0.5) / h as f32);
                assert_eq!(row[4 * c + 1], (x as f32 + 0.5) / w as f32);
            }
        }
    }

    /// The ring around a region is the cells within `BORDER_CELLS` of it that are not
    /// in it (another region's cells included), counted per slice.
    #[test]
    fn border_cells_ring_each_region() {
        let fm = FeatureMap::new(Array3::zeros((1, 9, 9)), 9, 9);
        let mut cells = Array2::<u8>::zeros((9, 9));
        cells[[4, 4]] = 1;
        cells[[4, 6]] = 2;
        let slices = [
            TrainingSlice {
                features: &fm,
                cells: cells.clone(),
            },
            TrainingSlice {
                features: &fm,
                cells,
            },
        ];
        let config = TrainConfig {
            borders: true,
            ..TrainConfig::default()
        };
        let near = TrainingRows::build(&slices, 2, &config, ROW_BUDGET_BYTES)
            .expect("rows")
            .near;
        let ring = |centre: (usize, usize), except: (usize, usize)| -> Vec<usize> {
            let mut v: Vec<usize> = (0..81usize)
                .filter(|&c| {
                    let (y, x): (usize, usize) = (c / 9, c % 9);
                    y.abs_diff(centre.0) <= 2 && x.abs_diff(centre.1) <= 2 && (y, x) != except
                })
                .collect();
            v.extend(v.clone().iter().map(|c| c + 81));
            v
        };
        assert_eq!(
            near[1],
            ring((4, 4), (4, 4)),
            "label 1, label 2's cell included"
        );
        assert_eq!(near[2], ring((4, 6), (4, 6)));
        let mut background: Vec<usize> = (0..81usize)
            .filter(|&c| {
                let (y, x) = (c / 9, c % 9);
                (2..=6).contains(&y) && (2..=8).contains(&x) && c != 4 * 9 + 4 && c != 4 * 9 + 6
            })
            .collect();
        background.extend(background.clone().iter().map(|c| c + 81));
        assert_eq!(near[0], background);
    }

    /// Over the budget, every region and border cell stays, a seeded part of the far
    /// background is dropped, and the standardisation is still that of all cells.
    #[test]
    fn rows_over_the_budget_sample_the_far_background() {
        let mut rng = Rng::new(3);
        let fms: Vec<FeatureMap> = (0..4)
            .map(|_| FeatureMap::new(Array3::from_shape_fn((3, 16, 16), |_| rng.normal()), 64, 64))
            .collect();
        let slices: Vec<TrainingSlice> = fms
            .iter()
            .map(|fm| {
                let mut cells = Array2::<u8>::zeros((16, 16));
                cells.slice_mut(s![3..6, 3..6]).fill(1);
                cells.slice_mut(s![10..12, 9..13]).fill(2);
                TrainingSlice {
                    features: fm,
                    cells,
                }
            })
            .collect();
        let config = TrainConfig {
            borders: true,
            context: Context {
                pools: vec![3],
                global: false,
                position: true,
            },
            ..TrainConfig::default()
        };
        let full = TrainingRows::build(&slices, 2, &config, usize::MAX).expect("full");
        let row_bytes = (3 * 2 + 2) * 4;
        let part = TrainingRows::build(&slices, 2, &config, 600 * row_bytes).expect("sampled");
        assert_eq!(full.all.nrows(), 4 * 256);
        // Per slice 9 + 8 region cells and 40 + 40 ring cells (the two rings do not meet).
        let must = 4 * (9 + 8 + 40 + 40);
        assert_eq!(full.by_label[1].len() + full.by_label[2].len(), 4 * 17);
        assert_eq!(full.near[0].len(), 4 * 80);
        let kept = part.all.nrows();
        assert!(kept > must && kept < 700, "{kept} rows kept");
        for l in 0..3 {
            assert_eq!(part.near[l].len(), full.near[l].len(), "ring of {l}");
        }
        assert_eq!(part.by_label[1].len(), full.by_label[1].len());
        assert_eq!(part.by_label[2].len(), full.by_label[2].len());
        assert_eq!(part.by_label[0].len(), kept - 4 * 17);
        // The kept rows are the cells they claim to be.
        let label_one = full.all.row(full.by_label[1][5]).to_owned();
        assert_eq!(part.all.row(part.by_label[1][5]), label_one);
        for (a, b) in part.feature_mean.iter().zip(&full.feature_mean) {
            assert!((a - b).abs() < 1e-5, "mean {a} vs {b}");
        }
        for (a, b) in part.feature_std.iter().zip(&full.feature_std) {
            assert!((a - b).abs() < 1e-5, "std {a} vs {b}");
        }
        let again = TrainingRows::build(&slices, 2, &config, 600 * row_bytes).expect("again");
        assert_eq!(again.all, part.all, "seeded");
    }

    /// Finite differences agree with backpropagation through the MLP and the loss.
    #[test]
    fn gradient_check() {
        let mut rng = Rng::new(7);
        let net = Mlp::new(&[5, 7, 6, 3], &mut rng);
        let x = Array2::from_shape_fn((4, 5), |_| rng.normal());
        let targets = [0usize, 2, 1, 2];
        let loss = |n: &Mlp| softmax_xent(&n.forward(x.view()), &targets).0 as f64;
        let (out, trace) = net.forward_traced(x.view());
        let (_, g) = softmax_xent(&out, &targets);
        let (grads, _) = net.backward(&trace, g);
        let eps = 1e-3f32;
        let mut worst = 0f64;
        for (l, (gw, gb)) in grads.iter().enumerate() {
            for idx in [(0, 0), (1, 2), (2, 1)] {
                let mut p = net.clone();
                p.layers[l].w[idx] += eps;
                let mut m = net.clone();
                m.layers[l].w[idx] -= eps;
                let numeric = (loss(&p) - loss(&m)) / (2.0 * eps as f64);
                let analytic = gw[idx] as f64;
                worst = worst
                    .max((numeric - analytic).abs() / (numeric.abs() + analytic.abs()).max(1e-4));
            }
            let mut p = net.clone();
            p.layers[l].b[1] += eps;
            let mut m = net.clone();
            m.layers[l].b[1] -= eps;
            let numeric = (loss(&p) - loss(&m)) / (2.0 * eps as f64);
            let analytic = gb[1] as f64;
            worst =
                worst.max((numeric - analytic).abs() / (numeric.abs() + analytic.abs()).max(1e-4));
        }
        assert!(worst < 2e-2, "relative gradient error {worst}");
    }

    #[test]
    fn rng_is_reproducible() {
        let a: Vec<u64> = {
            let mut r = Rng::new(3);
            (0..5).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(3);
            (0..5).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
    }
}

#[cfg(test)]
mod synthetic {
    //! Adapters on synthetic feature maps with known regions: two labelled blobs whose
    //! features differ from the background, and slices without them.
    use super::*;
    use crate::postprocess;

    const C: usize = 12;
    const G: usize = 24;

    /// Feature map with label 1 at `a` and label 2 at `b` (cell centres, radius 3 cells),
    /// noisy features per class. Returns the map and its cell labels.
    fn slice(
        a: Option<(usize, usize)>,
        b: Option<(usize, usize)>,
        rng: &mut Rng,
    ) -> (FeatureMap, Array2<u8>) {
        slice_on((G, G), a, b, rng)
    }

    /// `slice` on a grid of `(h, w)` cells.
    fn slice_on(
        (h, w): (usize, usize),
        a: Option<(usize, usize)>,
        b: Option<(usize, usize)>,
        rng: &mut Rng,
    ) -> (FeatureMap, Array2<u8>) {
        let cells = Array2::from_shape_fn((h, w), |(i, j)| {
            let near = |p: Option<(usize, usize)>| {
                p.is_some_and(|(r, c)| (i as f64 - r as f64).hypot(j as f64 - c as f64) <= 3.0)
            };
            if near(a) {
                1
            } else if near(b) {
                2
            } else {
                0
            }
        });
        let data = Array3::from_shape_fn((C, h, w), |(ch, i, j)| {
            let class = cells[[i, j]] as usize;
            // Each class is strong on its own channels, plus a smooth gradient shared by all.
            let base = if ch % 3 == class { 1.0 } else { 0.0 };
            base + 0.005 * (i + j) as f32 + 0.15 * rng.normal()
        });
        (FeatureMap::new(data, h * 4, w * 4), cells)
    }

    fn check(method: Method) {
        let mut rng = Rng::new(11);
        let templates: Vec<(FeatureMap, Array2<u8>)> = vec![
            slice(Some((6, 6)), Some((16, 17)), &mut rng),
            slice(Some((8, 15)), Some((17, 5)), &mut rng),
            slice(None, None, &mut rng),
        ];
        let training: Vec<TrainingSlice> = templates
            .iter()
            .map(|(f, c)| TrainingSlice {
                features: f,
                cells: c.clone(),
            })
            .collect();
        let config = TrainConfig {
            steps: 300,
            ..TrainConfig::default()
        };
        let adapter = Adapter::train(
            method,
            vec!["A".into(), "B".into()],
            &training,
            config,
            ("synthetic", "0"),
        )
        .unwrap();

        // A new slice with both blobs elsewhere: both found, near their centres (in pixels:
        // 4 per cell, centre of cell i at 4i + 1.5).
        let (fm, _) = slice(Some((12, 5)), Some((5, 18)), &mut rng);
        let raw = adapter.scores(&fm).unwrap();
        let up = postprocess::upsample_scores(&raw, G * 4, G * 4);
        let f = postprocess::findings(&up);
        for (l, (r, c)) in [(0, (12.0, 5.0)), (1, (5.0, 18.0))] {
            let found = f[l]
                .as_ref()
                .unwrap_or_else(|| panic!("{method}: label {l} not found"));
            let expect = (4.0 * r + 1.5, 4.0 * c + 1.5);
            let err = (found.point.0 - expect.0).hypot(found.point.1 - expect.1);
            assert!(
                err < 6.0,
                "{method}: label {l} at {:?}, expected {expect:?}",
                found.point
            );
        }
        // An empty slice: nothing is invented.
        let (empty, _) = slice(None, None, &mut rng);
        let up = postprocess::upsample_scores(&adapter.scores(&empty).unwrap(), G * 4, G * 4);
        assert!(
            postprocess::findings(&up).iter().all(|f| f.is_none()),
            "{method}: found something on an empty slice"
        );

        // Serialised and read back (as in an .adapter file), it scores the same.
        let back: Adapter =
            serde_json::from_str(&serde_json::to_string(&adapter).unwrap()).unwrap();
        assert_eq!(back.scores(&fm).unwrap(), adapter.scores(&fm).unwrap());
        assert!(back.check_backbone("other", "1").is_err());

        // The contrastive shortcut (softmax denominators as one matrix product) equals
        // the definition: the mean over references of softmax(ref + target)[label].
        if let Model::Contrastive {
            branch,
            head,
            references,
        } = &adapter.model
        {
            let mut x = context_rows(&fm, &adapter.train.context);
            standardize(&mut x, &adapter.feature_mean, &adapter.feature_std);
            let e = head.w.ncols() / 2;
            let tt = branch.forward(x.view()).dot(&head.w.slice(s![.., e..]).t()) + &head.b;
            for (l, refs) in references.iter().enumerate() {
                let rt = branch
                    .forward(refs.view())
                    .dot(&head.w.slice(s![.., ..e]).t());
                for cell in [0, 77, G * G - 1] {
                    let direct = rt
                        .rows()
                        .into_iter()
                        .map(|r| softmax_at(tt.row(cell), r, l + 1))
                        .sum::<f32>()
                        / rt.nrows() as f32;
                    let got = raw[[l, cell / G, cell % G]];
                    assert!(
                        (got - direct).abs() < 1e-5,
                        "label {l} cell {cell}: {got} vs {direct}"
                    );
                }
            }
        }
    }

    #[test]
    fn basic_adapter() {
        check(Method::Basic);
    }

    #[test]
    fn classification_adapter() {
        check(Method::Classification);
    }

    #[test]
    fn contrastive_adapter() {
        check(Method::Contrastive);
    }

    /// Standardising each column as it is built gives the same bits as standardising the
    /// whole matrix afterwards, for every kind of context column.
    #[test]
    fn rows_standardised_while_built_equal_rows_standardised_after() {
        let mut rng = Rng::new(5);
        let (fm, cells) = slice(Some((6, 6)), Some((16, 17)), &mut rng);
        let config = TrainConfig {
            steps: 5,
            context: Context {
                pools: vec![3, 9],
                global: true,
                position: true,
            },
            ..TrainConfig::default()
        };
        let training = [TrainingSlice {
            features: &fm,
            cells,
        }];
        let adapter = Adapter::train(
            Method::Classification,
            vec!["A".into(), "B".into()],
            &training,
            config,
            ("synthetic", "0"),
        )
        .unwrap();
        let (target, _) = slice(Some((12, 5)), None, &mut rng);
        let mut after = context_rows(&target, &adapter.train.context);
        standardize(&mut after, &adapter.feature_mean, &adapter.feature_std);
        let during = adapter.standardized_rows(&target).unwrap();
        assert_eq!(during.dim(), (G * G, C * 4 + 2));
        assert!(crate::same_bits(&during, &after));
    }

    /// A contrastive adapter with a classification member, on the features, the pools
    /// given and the position (no slice mean: a larger target grid's would lie far from
    /// the template's).
    fn position_ensemble(training: &[TrainingSlice], pools: Vec<usize>) -> Adapter {
        let config = TrainConfig {
            steps: 100,
            context: Context {
                pools,
                global: false,
                position: true,
            },
            ensemble: vec![Method::Classification],
            ..TrainConfig::default()
        };
        Adapter::train(
            Method::Contrastive,
            vec!["A".into(), "B".into()],
            training,
            config,
            ("synthetic", "0"),
        )
        .unwrap()
    }

    /// A training slice (its map and cells) and a target of `h` × `w` cells, more than two
    /// chunks and a partial one, with features as `slice` makes them and a blob of each
    /// label.
    fn over_chunks(seed: u64, (h, w): (usize, usize)) -> (FeatureMap, Array2<u8>, FeatureMap) {
        assert!(h * w > 2 * SCORE_CHUNK && (h * w) % SCORE_CHUNK != 0);
        let mut rng = Rng::new(seed);
        let (fm, cells) = slice(Some((6, 6)), Some((16, 17)), &mut rng);
        let (target, _) = slice_on((h, w), Some((20, 20)), Some((35, 10)), &mut rng);
        (fm, cells, target)
    }

    /// The planes `channels` of `data` at half the resolution (2 × 2 means), as a coarser
    /// grid gives them.
    fn halved(data: &Array3<f32>, channels: std::ops::Range<usize>) -> Array3<f32> {
        let (_, h, w) = data.dim();
        Array3::from_shape_fn((channels.len(), h / 2, w / 2), |(c, i, j)| {
            let (d, c) = (data, channels.start + c);
            (d[[c, 2 * i, 2 * j]]
                + d[[c, 2 * i + 1, 2 * j]]
                + d[[c, 2 * i, 2 * j + 1]]
                + d[[c, 2 * i + 1, 2 * j + 1]])
                / 4.0
        })
    }

    /// `scores` a chunk of cells at a time gives the bits of `scores_and_rows` over the
    /// whole slice: with the slice mean and position columns, over several chunks and a
    /// partial one, for an ensemble of contrastive and classification models.
    #[test]
    fn scores_by_chunks_equal_scores_over_the_whole_slice() {
        // 2.4 chunks of cells.
        let (h, w) = (50, 49);
        let (fm, cells, target) = over_chunks(8, (h, w));
        let training = [TrainingSlice {
            features: &fm,
            cells,
        }];
        // With pools the whole slice is scored at once; the same bits either way.
        for pools in [vec![], vec![3]] {
            let adapter = position_ensemble(&training, pools);
            assert_eq!(adapter.members.len(), 1);
            let chunked = adapter.scores(&target).unwrap();
            let (whole, _) = adapter.scores_and_rows(&target).unwrap();
            assert_eq!(chunked.dim(), (2, h, w));
            // Scores short of 0 and 1, where a change in the rows would show.
            let unsure = whole.iter().filter(|p| (0.01..0.99).contains(*p)).count();
            assert!(unsure > 20, "{unsure} scores in 0.01..0.99");
            assert!(crate::same_bits(&chunked, &whole));
        }
    }

    /// A map whose first channels came from a coarser grid is scored with the first
    /// layer over them on that grid (and over the pooled columns as planes): the scores
    /// equal those of the same values taken as one grid but for rounding, and chunks and
    /// the whole slice give the same bits.
    #[test]
    fn coarse_channels_are_scored_on_their_grid() {
        let (h, w) = (50, 48);
        let (fm, cells, target) = over_chunks(9, (h, w));
        let training = [TrainingSlice {
            features: &fm,
            cells,
        }];
        // Channels at half the resolution (2 × 2 means), the others as they are: the
        // first ones coarse, or a coarse run between two fine ones.
        let halved = |channels| halved(&target.data, channels);
        let as_is =
            |channels: std::ops::Range<usize>| target.data.slice(s![channels, .., ..]).to_owned();
        let first = C / 2 + 1;
        let layouts = || {
            [
                vec![halved(0..first), as_is(first..C)],
                vec![as_is(0..3), halved(3..first), as_is(first..C)],
            ]
        };
        let cases =
            layouts()
                .into_iter()
                .chain(layouts())
                .zip([vec![], vec![], vec![3], vec![3, 5]]);
        for (maps, pools) in cases {
            let split = FeatureMap::stacked(maps, h * 4, w * 4);
            assert_eq!(split.coarse.len(), 1);
            let one_grid = FeatureMap::new(split.data.clone(), h * 4, w * 4);
            let adapter = position_ensemble(&training, pools);
            let width = adapter.feature_mean.len();
            let all = crate::window::Window {
                rows: 0..h,
                columns: 0..w,
            };
            let every = vec![0..w; h];
            let Some((per_cell, layers)) = adapter.coarse_first_layers(&split, width, &all, &every)
            else {
                panic!("the coarse channels were not split off");
            };
            // Every channel and pooled column is taken as planes: per cell, the position.
            let pools = adapter.train.context.pools.len();
            assert_eq!(per_cell, (1 + pools) * C..width);
            assert_eq!(width - (1 + pools) * C, 2);
            assert_eq!(layers.len(), 2);
            assert!(adapter
                .coarse_first_layers(&one_grid, width, &all, &every)
                .is_none());
            // Rows that do not fit the layer are refused, each mismatch by its own name.
            let layer = layers.last().expect("the adapter's own layer");
            let refs = adapter.reference_terms();
            let rows = |n, columns| Array2::<f32>::zeros((n, columns));
            let fits = adapter.split_scores(layer, rows(3, per_cell.len()).view(), 5..8, &refs);
            assert_eq!(fits.map(|s| s.dim()).ok(), Some((3, 2)));
            let narrow = adapter.split_scores(layer, rows(3, 1).view(), 5..8, &refs);
            assert!(matches!(
                narrow,
                Err(AdapterError::Channels {
                    expected: 2,
                    actual: 1
                })
            ));
            let short = adapter.split_scores(layer, rows(3, 2).view(), 5..9, &refs);
            assert!(matches!(short, Err(AdapterError::Cells { rows: 3, .. })));
            let past = adapter.split_scores(layer, rows(3, 2).view(), h * w..h * w + 3, &refs);
            assert!(matches!(past, Err(AdapterError::Cells { planned, .. }) if planned == h * w));
            let chunked = adapter.scores(&split).unwrap();
            let (whole, _) = adapter.scores_and_rows(&split).unwrap();
            assert!(crate::same_bits(&chunked, &whole));
            let plain = adapter.scores(&one_grid).unwrap();
            let unsure = plain.iter().filter(|p| (0.01..0.99).contains(*p)).count();
            assert!(unsure > 20, "{unsure} scores in 0.01..0.99");
            let worst = plain
                .iter()
                .zip(&chunked)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "scores differ by up to {worst}");
        }
    }

    /// Scores within a window are the whole map's there (pools and position, on maps
    /// with a coarse part first or between two fine runs, its planes taken around the
    /// window, and on a map of one grid, cropped), and 0 elsewhere; a window past the grid
    /// is cut to it.
    #[test]
    fn scores_within_a_window_are_the_whole_maps_there() {
        use crate::window::{Cells, Window};
        let (h, w) = (50, 48);
        let (fm, cells, target) = over_chunks(9, (h, w));
        let training = [TrainingSlice {
            features: &fm,
            cells,
        }];
        let first = C / 2 + 1;
        let fine = target.data.slice(s![first.., .., ..]).to_owned();
        let split = FeatureMap::stacked(vec![halved(&target.data, 0..first), fine], h * 4, w * 4);
        assert_eq!(split.coarse.len(), 1);
        let one_grid = FeatureMap::new(split.data.clone(), h * 4, w * 4);
        // A coarse run between two fine ones: the fine channels gathered from two runs.
        let between = FeatureMap::stacked(
            vec![
                target.data.slice(s![0..3, .., ..]).to_owned(),
                halved(&target.data, 3..first),
                target.data.slice(s![first.., .., ..]).to_owned(),
            ],
            h * 4,
            w * 4,
        );
        assert_eq!(between.coarse.len(), 1);
        let adapter = position_ensemble(&training, vec![3, 5]);
        let windows = [
            Window {
                rows: 11..30,
                columns: 13..41,
            },
            Window {
                rows: 0..24,
                columns: 0..26,
            },
            Window {
                rows: 30..50,
                columns: 0..20,
            },
            Window {
                rows: 21..22,
                columns: 0..48,
            },
            // Two chunks of cells, the second from within a row.
            Window {
                rows: 2..48,
                columns: 3..45,
            },
            // Past the grid: cut to it.
            Window {
                rows: 30..70,
                columns: 0..25,
            },
        ];
        // Cells row by row: a staircase with rows left out between, from row 4 on, and
        // one row's span past the grid.
        let stairs = Cells {
            first_row: 4,
            spans: (0..40)
                .map(|i| match i % 9 {
                    7 => 0..0,
                    8 => 40..60,
                    _ => 12 + i / 2..15 + i / 2 + i % 5,
                })
                .collect(),
        };
        let mut cells: Vec<Cells> = windows.iter().cloned().map(Cells::from).collect();
        cells.push(stairs);
        for map in [&split, &between, &one_grid] {
            let whole = adapter.scores(map).unwrap();
            for cells in &cells {
                let within = adapter.scores_within(map, cells).unwrap();
                assert_eq!(within.dim(), whole.dim());
                let held = |r: usize, c: usize| {
                    r.checked_sub(cells.first_row)
                        .and_then(|i| cells.spans.get(i))
                        .is_some_and(|s| s.contains(&c))
                };
                // Within the cells' box the same bits as the box's own cells.
                let bounds = cells.and(&Window::whole((h, w)).into()).bounds().unwrap();
                let boxed = adapter.scores_within(map, &Cells::from(bounds)).unwrap();
                let (mut worst, mut unsure) = (0f32, 0);
                for ((l, r, c), v) in within.indexed_iter() {
                    if held(r, c) {
                        worst = worst.max((v - whole[[l, r, c]]).abs());
                        unsure += usize::from((0.01..0.99).contains(v));
                        assert_eq!(v.to_bits(), boxed[[l, r, c]].to_bits(), "({r}, {c})");
                    } else {
                        assert_eq!(*v, 0.0, "label {l} at ({r}, {c}), outside {cells:?}");
                    }
                }
                assert!(worst < 1e-5, "{cells:?}: scores differ by up to {worst}");
                assert!(unsure > 5, "{cells:?}: {unsure} scores in 0.01..0.99");
            }
        }
    }

    #[test]
    fn training_is_deterministic() {
        let mut rng = Rng::new(5);
        let (f, c) = slice(Some((6, 6)), Some((15, 15)), &mut rng);
        let t = [TrainingSlice {
            features: &f,
            cells: c,
        }];
        let cfg = TrainConfig {
            steps: 50,
            ..TrainConfig::default()
        };
        let a = Adapter::train(
            Method::Contrastive,
            vec!["A".into(), "B".into()],
            &t,
            cfg.clone(),
            ("s", "0"),
        )
        .unwrap();
        let b = Adapter::train(
            Method::Contrastive,
            vec!["A".into(), "B".into()],
            &t,
            cfg,
            ("s", "0"),
        )
        .unwrap();
        assert_eq!(a.scores(&f).unwrap(), b.scores(&f).unwrap());
    }

    /// An ensemble scores the mean of its methods' own adapters, survives the file, and a
    /// member that does not fit its adapter is refused.
    #[test]
    fn ensemble_scores_the_mean_of_its_methods() {
        let mut rng = Rng::new(9);
        let (f, c) = slice(Some((6, 6)), Some((15, 15)), &mut rng);
        let t = [TrainingSlice {
            features: &f,
            cells: c,
        }];
        let single = TrainConfig {
            steps: 50,
            ..TrainConfig::default()
        };
        let labels = vec!["A".to_string(), "B".to_string()];
        let train = |m: Method, cfg: &TrainConfig| {
            Adapter::train(m, labels.clone(), &t, cfg.clone(), ("s", "0")).unwrap()
        };
        let both = train(
            Method::Contrastive,
            &TrainConfig {
                ensemble: vec![Method::Classification],
                ..single.clone()
            },
        );
        let (contrastive, classification) = (
            train(Method::Contrastive, &single),
            train(Method::Classification, &single),
        );
        let (target, _) = slice(Some((12, 5)), Some((5, 18)), &mut rng);
        let mean =
            (contrastive.scores(&target).unwrap() + classification.scores(&target).unwrap()) / 2.0;
        let got = both.scores(&target).unwrap();
        assert!(got.iter().zip(&mean).all(|(a, b)| (a - b).abs() < 1e-6));
        assert_ne!(got, contrastive.scores(&target).unwrap());
        assert!(both.validate().is_ok());
        // A basic member (raw rows) and one with its own standardisation score as they do
        // alone; the rows handed out are the adapter's own standardised ones.
        let basic = train(Method::Basic, &single);
        let mut odd = classification.clone();
        odd.feature_mean.mapv_inplace(|m| m + 0.5);
        let mut mixed = contrastive.clone();
        mixed.members = vec![basic.clone(), odd.clone()];
        let want = (contrastive.scores(&target).unwrap()
            + basic.scores(&target).unwrap()
            + odd.scores(&target).unwrap())
            / 3.0;
        let (got3, rows) = mixed.scores_and_rows(&target).unwrap();
        assert!(got3.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6));
        assert_eq!(rows, contrastive.standardized_rows(&target).unwrap());
        let twice = TrainConfig {
            ensemble: vec![Method::Contrastive],
            ..single.clone()
        };
        let err = Adapter::train(Method::Contrastive, labels.clone(), &t, twice, ("s", "0"));
        assert!(matches!(err, Err(AdapterError::Ensemble { .. })));

        let back: Adapter = serde_json::from_str(&serde_json::to_string(&both).unwrap()).unwrap();
        assert_eq!(back.scores(&target).unwrap(), got);
        assert!(back.check_backbone("other", "1").is_err());

        let mut other_labels = both.clone();
        other_labels.members[0].labels = vec!["A".into(), "C".into()];
        assert!(other_labels
            .validate()
            .unwrap_err()
            .contains("ensemble member"));
        let mut damaged = both.clone();
        damaged.members[0].feature_std = Array1::zeros(3);
        assert!(damaged.validate().unwrap_err().contains("ensemble member"));
        let mut flags = both.clone();
        flags.convex = vec![true];
        assert!(flags.validate().unwrap_err().contains("convex flags"));
        flags.convex = vec![true, false];
        flags.sam_redraw = vec![true];
        assert!(flags.validate().unwrap_err().contains("SAM redraw flags"));
        flags.sam_redraw = vec![true, false];
        assert!(flags.validate().is_ok());
    }

    #[test]
    fn a_file_needs_the_format_of_the_newest_step_it_holds() {
        let mut rng = Rng::new(4);
        let (f, c) = slice(Some((6, 6)), Some((15, 15)), &mut rng);
        let t = [TrainingSlice {
            features: &f,
            cells: c,
        }];
        let plain = Adapter::train(
            Method::Classification,
            vec!["A".into(), "B".into()],
            &t,
            TrainConfig {
                steps: 10,
                ..TrainConfig::default()
            },
            ("s", "0"),
        )
        .unwrap();
        assert_eq!(plain.file_format(), 1);
        let mut ensemble = plain.clone();
        ensemble.members = vec![plain.clone()];
        assert_eq!(ensemble.file_format(), 2);
        // Each step added since format 2, alone, and in a member alone.
        let steps: [fn(&mut Adapter); 11] = [
            |a| a.convex = vec![false, true],
            |a| a.sam_redraw = vec![true, false],
            |a| a.stack_reach = vec![Some(0.5), None],
            |a| {
                a.extremes = vec![
                    None,
                    Some(crate::extremes::Extreme {
                        structure: 1,
                        direction: [-1, 0],
                        band: 2.0,
                        fallback: false,
                    }),
                ]
            },
            |a| a.train.stack_anchor = true,
            |a| a.train.guided = true,
            |a| a.train.fragments = true,
            |a| a.train.pose = true,
            |a| a.train.coarse_landmarks = true,
            |a| a.calibration = vec![Some([0.5, -1.0]), None],
            |a| {
                a.window = Some(crate::window::LandmarkWindow {
                    landmarks: vec!["L1".into()],
                    share: 0.2,
                    reach: None,
                })
            },
        ];
        for step in steps {
            let mut a = plain.clone();
            step(&mut a);
            assert_eq!(a.file_format(), 3);
            let mut m = ensemble.clone();
            step(&mut m.members[0]);
            assert_eq!(m.file_format(), 3);
        }
        // The stack fill, since 3, over any of them.
        let mut filled = plain.clone();
        filled.stack_depth = vec![vec![None, Some(0.07)], Vec::new()];
        assert_eq!(filled.file_format(), 4);
        filled.votes = vec![None, None];
        filled.train.stack_anchor = true;
        assert_eq!(filled.file_format(), 4);
        let mut m = ensemble.clone();
        m.members[0].stack_depth = vec![Vec::new(), vec![Some(0.0)]];
        assert_eq!(m.file_format(), 4);
        // The stack bound, since 4, over the fill too.
        let mut bounded = plain.clone();
        bounded.stack_bound = vec![vec![Some(0.2)], Vec::new()];
        assert_eq!(bounded.file_format(), 5);
        bounded.stack_depth = vec![vec![Some(0.1)], Vec::new()];
        assert_eq!(bounded.file_format(), 5);
        m.members[0].stack_bound = vec![Vec::new(), vec![None, Some(0.0)]];
        assert_eq!(m.file_format(), 5);
        // The stack blend, since 5, over the bound too.
        let mut blended = plain.clone();
        blended.stack_blend = vec![vec![None, Some([0.9, 0.8])], Vec::new()];
        assert_eq!(blended.file_format(), 6);
        blended.stack_bound = vec![vec![Some(0.1)], Vec::new()];
        assert_eq!(blended.file_format(), 6);
        m.members[0].stack_blend = vec![Vec::new(), vec![Some([1.0, 1.0])]];
        assert_eq!(m.file_format(), 6);
        // The stack carry, since 6, over the blend too.
        let mut carried = plain.clone();
        carried.stack_carry = vec![vec![None, Some(1.0)], Vec::new()];
        assert_eq!(carried.file_format(), 7);
        carried.stack_blend = blended.stack_blend.clone();
        assert_eq!(carried.file_format(), 7);
        m.members[0].stack_carry = vec![Vec::new(), vec![Some(0.5)]];
        assert_eq!(m.file_format(), 7);
        // The patient's appearance, a flag alone since 7, over the carry too.
        let mut weighed = plain.clone();
        weighed.train.appearance = true;
        assert_eq!(weighed.file_format(), 8);
        weighed.stack_carry = carried.stack_carry.clone();
        assert_eq!(weighed.file_format(), 8);
        m.members[0].train.appearance = true;
        assert_eq!(m.file_format(), 8);
        // The structures' names from the landmarks, since 8, over the appearance too.
        let mut named = plain.clone();
        named.identity = Some(crate::identity::LandmarkLinks {
            landmarks: vec![Some("L1".into()), None],
        });
        assert_eq!(named.file_format(), 9);
        named.train.appearance = true;
        assert_eq!(named.file_format(), 9);
        m.members[0].identity = named.identity.clone();
        assert_eq!(m.file_format(), 9);
        // Each landmark's reach in the structures' window, since 9, over the names too.
        let mut reached = plain.clone();
        reached.window = Some(crate::window::LandmarkWindow {
            landmarks: vec!["L1".into()],
            share: 0.2,
            reach: Some(vec![[0.1, 0.2, 0.1, 0.1]]),
        });
        assert_eq!(reached.file_format(), 10);
        reached.identity = named.identity.clone();
        assert_eq!(reached.file_format(), 10);
        m.members[0].window = reached.window.clone();
        assert_eq!(m.file_format(), 10);
        // A structure's extreme as a fallback, since 10: a build reading only 10 would
        // average it with the adapter's point.
        let mut fallback = plain.clone();
        let rule = crate::extremes::Extreme {
            structure: 1,
            direction: [1, 1],
            band: 0.0,
            fallback: true,
        };
        fallback.extremes = vec![None, Some(rule)];
        assert_eq!(fallback.file_format(), 11);
        m.members[0].extremes = fallback.extremes.clone();
        assert_eq!(m.file_format(), 11);
        // A convex structure's ellipse, since 11; an enclosed structure's gaps closed, a
        // flag alone since 12, which a frame must be there to close them towards.
        let mut rounded = fallback.clone();
        rounded.ellipse = vec![None, Some(0.95)];
        assert_eq!(rounded.file_format(), 12);
        let mut closed = rounded.clone();
        closed.train.enclosed_gaps = true;
        assert_eq!(closed.file_format(), 12, "no frame: nothing to close");
        closed.enclosed = Some(crate::enclosed::EnclosedModel {
            grid: 2,
            frames: vec![None, None],
        });
        assert_eq!(closed.file_format(), 13);
        m.members[0].train.enclosed_gaps = true;
        m.members[0].enclosed = closed.enclosed.clone();
        assert_eq!(m.file_format(), 13);
        // Flags that stored nothing change nothing.
        let mut unused = plain.clone();
        unused.convex = vec![false, false];
        unused.sam_redraw = vec![false, false];
        unused.stack_reach = vec![None, None];
        unused.stack_depth = vec![vec![None], vec![None, None]];
        unused.train.stack_fill = true;
        unused.stack_bound = vec![vec![None, None], Vec::new()];
        unused.train.stack_bound = true;
        unused.stack_blend = vec![vec![None], vec![None, None]];
        unused.train.stack_blend = true;
        unused.stack_carry = vec![vec![None], Vec::new()];
        unused.train.stack_carry = true;
        unused.train.atlas = true;
        unused.train.window = true;
        unused.train.identity = true;
        assert_eq!(unused.file_format(), 1);
    }
}
