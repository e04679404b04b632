//! Foundation features: an ONNX ViT image encoder run by tract turns a normalised slice
//! into a `C × h × w` feature map, plus the geometry mapping feature cells to pixels.
//!
//! Models are described in `models/models.toml` (the manifest): file, SHA-256 (checked at
//! load), input size, per-channel mean/std and the output layout — a feature map
//! (LiteMedSAM's encoder) or ViT tokens with CLS/register tokens first (DINOv2). A site's
//! own DINOv2 export is added by editing the manifest only.

use crate::image::{self, ImageError};
use ndarray::{Array2, Array3, Array4};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tract_onnx::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    #[error("model manifest {path}: {detail}")]
    Manifest { path: PathBuf, detail: String },
    #[error("model {id:?} is not in the manifest (known: {known})")]
    Unknown { id: String, known: String },
    #[error("{path}: SHA-256 is {actual}, the manifest expects {expected}; the file is damaged or not the one the manifest describes")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("cannot read model {path}: {detail}")]
    Io { path: PathBuf, detail: String },
    #[error("model {id}: {detail}")]
    Model { id: String, detail: String },
    #[error(transparent)]
    Image(#[from] ImageError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFormat {
    /// 1 × C × h × w.
    FeatureMap,
    /// 1 × (prefix + h·w) × C, patches row-major.
    Tokens,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneEntry {
    pub file: PathBuf,
    pub sha256: String,
    /// Height, width of the model input.
    pub input_size: [usize; 2],
    pub format: OutputFormat,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Tokens only: pixels per patch side.
    pub patch_size: Option<usize>,
    /// Tokens only: CLS + register tokens before the patches.
    pub prefix_tokens: Option<usize>,
    pub source: String,
    pub license: String,
    pub quantization: Option<String>,
    /// Hypercolumn: more tensors of the same graph (ONNX names, each 1 × C × h × w) put
    /// beside the output, every map resized bilinearly to the finest grid among them.
    #[serde(default)]
    pub extra_outputs: Vec<String>,
    /// CLAHE of the normalised slice before it is resized for the model.
    #[serde(default)]
    pub equalise: Option<image::Equalise>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderEntry {
    pub file: PathBuf,
    pub sha256: String,
    pub input_size: [usize; 2],
    /// The backbone whose embeddings it takes.
    pub backbone: String,
    pub source: String,
    pub license: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub default_backbone: String,
    pub backbones: BTreeMap<String, BackboneEntry>,
    #[serde(default)]
    pub decoders: BTreeMap<String, DecoderEntry>,
    /// Directory the file paths are relative to (the manifest's own).
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Manifest, BackboneError> {
        let err = |detail: String| BackboneError::Manifest {
            path: path.to_path_buf(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut m: Manifest = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        m.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if !m.backbones.contains_key(&m.default_backbone) {
            return Err(err(format!(
                "default_backbone {:?} has no [backbones] entry",
                m.default_backbone
            )));
        }
        for (id, b) in &m.backbones {
            if b.format == OutputFormat::Tokens
                && (b.patch_size.is_none() || b.prefix_tokens.is_none())
            {
                return Err(err(format!(
                    "backbone {id}: format \"tokens\" needs patch_size and prefix_tokens"
                )));
            }
            if b.std.iter().any(|s| *s <= 0.0) || b.input_size.contains(&0) {
                return Err(err(format!(
                    "backbone {id}: std and input_size must be positive"
                )));
            }
            if let Some(e) = &b.equalise {
                e.check().map_err(|d| err(format!("backbone {id}: {d}")))?;
            }
        }
        Ok(m)
    }

    pub fn backbone(&self, id: &str) -> Result<&BackboneEntry, BackboneError> {
        self.backbones
            .get(id)
            .ok_or_else(|| BackboneError::Unknown {
                id: id.to_string(),
                known: self
                    .backbones
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// Reads a model file and checks its SHA-256 against the manifest.
pub fn read_verified(path: &Path, expected: &str) -> Result<Vec<u8>, BackboneError> {
    let bytes = std::fs::read(path).map_err(|e| BackboneError::Io {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let actual = hex(&Sha256::digest(&bytes));
    if !actual.eq_ignore_ascii_case(expected.trim()) {
        return Err(BackboneError::Checksum {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(bytes)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Uses `threads` cores for tract's matrix products (process-wide).
pub fn set_threads(threads: usize) {
    use tract_linalg::multithread::{set_default_executor, Executor};
    let executor = if threads <= 1 {
        Executor::SingleThread
    } else {
        Executor::multithread(threads)
    };
    set_default_executor(executor);
}

/// Where models run: the CPU (default), or an NVIDIA GPU through tract's CUDA backend
/// in a build with the `cuda` feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Cpu,
    Cuda,
}

static BACKEND: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Chooses the backend for models loaded from now on (process-wide).
pub fn set_backend(backend: Backend) {
    BACKEND.store(
        backend == Backend::Cuda,
        std::sync::atomic::Ordering::Relaxed,
    );
}

fn backend() -> Backend {
    if BACKEND.load(std::sync::atomic::Ordering::Relaxed) {
        Backend::Cuda
    } else {
        Backend::Cpu
    }
}

pub(crate) type Runnable = std::sync::Arc<TypedSimplePlan>;

/// Runs a plan; outputs come back in RAM (a GPU backend hands them back still on the
/// device, read lazily).
pub(crate) fn run(plan: &Runnable, inputs: TVec<TValue>) -> TractResult<TVec<Tensor>> {
    plan.run(inputs)?
        .into_iter()
        .map(|t| t.into_tensor().into_plain_ram())
        .collect()
}

pub(crate) fn load_onnx(
    id: &str,
    bytes: &[u8],
    inputs: &[(usize, Vec<usize>)],
    extra_outputs: &[String],
) -> Result<Runnable, BackboneError> {
    let err = |e: TractError| BackboneError::Model {
        id: id.to_string(),
        detail: format!("{e:#}"),
    };
    let mut model = tract_onnx::onnx()
        .model_for_read(&mut std::io::Cursor::new(bytes))
        .map_err(err)?;
    if !extra_outputs.is_empty() {
        let mut outlets = model.output_outlets().map_err(err)?.to_vec();
        for name in extra_outputs {
            outlets.push(
                model
                    .find_outlet_label(name)
                    .ok_or_else(|| BackboneError::Model {
                        id: id.to_string(),
                        detail: format!("extra output {name:?} is no tensor of the model"),
                    })?,
            );
        }
        model.select_output_outlets(&outlets).map_err(err)?;
    }
    for (ix, shape) in inputs {
        model = model
            .with_input_fact(*ix, f32::fact(shape).into())
            .map_err(err)?;
    }
    let typed = if backend() == Backend::Cuda {
        // The GPU transform takes the decluttered graph: the CPU optimiser packs weights
        // into layouts that only its own kernels read.
        #[cfg(feature = "cuda")]
        {
            use tract_core::transform::ModelTransform;
            let mut typed = model
                .into_typed()
                .and_then(|m| m.into_decluttered())
                .map_err(err)?;
            tract_cuda::CudaTransform
                .transform(&mut typed)
                .map_err(err)?;
            typed.into_optimized().map_err(err)?
        }
        #[cfg(not(feature = "cuda"))]
        return Err(BackboneError::Model {
            id: id.to_string(),
            detail: "the CUDA backend was asked for, but this build has no `cuda` feature".into(),
        });
    } else {
        model.into_optimized().map_err(err)?
    };
    typed.into_runnable().map_err(err)
}

/// Features of one slice: `data` is C × h × w; cell (i, j) covers the image region whose
/// centre is [`FeatureMap::cell_to_pixel`].
#[derive(Debug, Clone)]
pub struct FeatureMap {
    pub data: Array3<f32>,
    pub image_rows: usize,
    pub image_columns: usize,
    /// Channels of `data` that were resized from a coarser grid (a hypercolumn's), also
    /// kept on their own grid: a linear layer over them can run there and have its output
    /// resized instead, with a quarter of the products (`adapter`). Whoever changes those
    /// channels of `data` changes these too, or clears them.
    pub coarse: Vec<CoarseChannels>,
}

/// `map`'s channels are those of `FeatureMap::data` from `first` on, resized bilinearly.
#[derive(Debug, Clone)]
pub struct CoarseChannels {
    pub first: usize,
    pub map: Array3<f32>,
}

impl FeatureMap {
    /// A map of one grid's channels.
    pub fn new(data: Array3<f32>, image_rows: usize, image_columns: usize) -> FeatureMap {
        FeatureMap {
            data,
            image_rows,
            image_columns,
            coarse: Vec::new(),
        }
    }

    /// Maps of one image stacked channel by channel on the finest grid among them
    /// (bilinear, half-pixel centres, so every map's cells stay where they were over the
    /// image); the coarser ones are kept as `coarse` too.
    pub fn stacked(
        mut maps: Vec<Array3<f32>>,
        image_rows: usize,
        image_columns: usize,
    ) -> FeatureMap {
        if maps.len() == 1 {
            let data = maps.pop().unwrap_or_default();
            return FeatureMap::new(data, image_rows, image_columns);
        }
        let h = maps.iter().map(|m| m.dim().1).max().unwrap_or(0);
        let w = maps.iter().map(|m| m.dim().2).max().unwrap_or(0);
        let channels: usize = maps.iter().map(|m| m.dim().0).sum();
        let mut data = Array3::zeros((channels, h, w));
        let mut coarse = Vec::new();
        let mut c = 0;
        for m in maps {
            let n = m.dim().0;
            let (_, mh, mw) = m.dim();
            for (k, plane) in m.outer_iter().enumerate() {
                let mut out = data.index_axis_mut(ndarray::Axis(0), c + k);
                if (mh, mw) == (h, w) {
                    out.assign(&plane);
                } else {
                    out.assign(&image::resize_bilinear(&plane.to_owned(), h, w));
                }
            }
            if (mh, mw) != (h, w) && n > 0 {
                coarse.push(CoarseChannels { first: c, map: m });
            }
            c += n;
        }
        FeatureMap {
            data,
            image_rows,
            image_columns,
            coarse,
        }
    }

    /// The coarsest of the maps `stacked` built this map from (the first among equals), as
    /// a map of its own; None for a map of one grid.
    pub fn coarsest(&self) -> Option<FeatureMap> {
        Some(FeatureMap::new(
            self.coarsest_part()?.clone(),
            self.image_rows,
            self.image_columns,
        ))
    }

    /// `coarsest`'s channels, borrowed.
    pub fn coarsest_part(&self) -> Option<&Array3<f32>> {
        self.coarse
            .iter()
            .map(|p| &p.map)
            .filter(|m| m.dim().0 > 0)
            .min_by_key(|m| m.dim().1 * m.dim().2)
    }

    /// The maps `stacked` builds this map from, in channel order: each coarse part on its
    /// grid, and the runs of channels between them on the map's.
    pub fn parts(&self) -> Vec<ndarray::ArrayView3<'_, f32>> {
        let mut parts = Vec::new();
        let mut c = 0;
        let channels = self.channels();
        while c < channels {
            match self
                .coarse
                .iter()
                .find(|p| p.first == c && p.map.dim().0 > 0)
            {
                Some(p) => {
                    parts.push(p.map.view());
                    c += p.map.dim().0;
                }
                None => {
                    let end = self
                        .coarse
                        .iter()
                        .map(|p| p.first)
                        .filter(|&f| f > c)
                        .min()
                        .unwrap_or(channels);
                    parts.push(self.data.slice(ndarray::s![c..end, .., ..]));
                    c = end;
                }
            }
        }
        parts
    }

    pub fn channels(&self) -> usize {
        self.data.dim().0
    }

    pub fn grid(&self) -> (usize, usize) {
        let (_, h, w) = self.data.dim();
        (h, w)
    }

    /// Image pixel (row, column) at the centre of feature cell (i, j).
    pub fn cell_to_pixel(&self, i: f64, j: f64) -> (f64, f64) {
        let (h, w) = self.grid();
        (
            (i + 0.5) * self.image_rows as f64 / h as f64 - 0.5,
            (j + 0.5) * self.image_columns as f64 / w as f64 - 0.5,
        )
    }

    /// Feature cell coordinates (fractional) of image pixel (row, column).
    pub fn pixel_to_cell(&self, row: f64, col: f64) -> (f64, f64) {
        let (h, w) = self.grid();
        (
            (row + 0.5) * h as f64 / self.image_rows as f64 - 0.5,
            (col + 0.5) * w as f64 / self.image_columns as f64 - 0.5,
        )
    }

    /// The feature vector at an image pixel, bilinearly interpolated between cells.
    pub fn at_pixel(&self, row: f64, col: f64) -> Vec<f32> {
        let (h, w) = self.grid();
        let (ci, cj) = self.pixel_to_cell(row, col);
        let ci = ci.clamp(0.0, (h - 1) as f64);
        let cj = cj.clamp(0.0, (w - 1) as f64);
        let (i0, j0) = (ci.floor() as usize, cj.floor() as usize);
        let (i1, j1) = ((i0 + 1).min(h - 1), (j0 + 1).min(w - 1));
        let (fi, fj) = ((ci - i0 as f64) as f32, (cj - j0 as f64) as f32);
        (0..self.channels())
            .map(|c| {
                let d = &self.data;
                let top = d[[c, i0, j0]] * (1.0 - fj) + d[[c, i0, j1]] * fj;
                let bottom = d[[c, i1, j0]] * (1.0 - fj) + d[[c, i1, j1]] * fj;
                top * (1.0 - fi) + bottom * fi
            })
            .collect()
    }

    /// Pixel-level features: every channel upsampled to the image size (C × rows × cols).
    pub fn upsample(&self) -> Array3<f32> {
        let mut out = Array3::zeros((self.channels(), self.image_rows, self.image_columns));
        for c in 0..self.channels() {
            let up = image::resize_bilinear(
                &self.data.index_axis(ndarray::Axis(0), c).to_owned(),
                self.image_rows,
                self.image_columns,
            );
            out.index_axis_mut(ndarray::Axis(0), c).assign(&up);
        }
        out
    }
}

/// A 1 × C × h × w output as C × h × w.
fn feature_map(t: &ndarray::ArrayViewD<f32>) -> Result<Array3<f32>, String> {
    let s = t.shape();
    if s.len() != 4 || s[0] != 1 {
        return Err(format!("expected a 1×C×h×w output, got {s:?}"));
    }
    t.to_shape((s[1], s[2], s[3]))
        .map(|a| a.to_owned())
        .map_err(|e| e.to_string())
}

/// What an entry's features are keyed by: the model file's SHA-256, plus a digest of
/// whatever else changes them (extra outputs, equalisation). An entry with neither keeps
/// the bare SHA-256, and one with extra outputs alone the digest of their names, so the
/// caches and adapters made before equalisation existed stay valid.
fn identity(entry: &BackboneEntry) -> String {
    if entry.extra_outputs.is_empty() && entry.equalise.is_none() {
        return entry.sha256.clone();
    }
    let mut what = entry.extra_outputs.join("\n");
    if let Some(e) = &entry.equalise {
        what.push_str(&format!("\n#equalise tiles {} clip {}", e.tiles, e.clip));
    }
    format!("{}-x{}", entry.sha256, &hex(&Sha256::digest(what))[..12])
}

/// A loaded image encoder.
pub struct Backbone {
    id: String,
    /// What features are keyed by (`identity`).
    identity: String,
    entry: BackboneEntry,
    model: Runnable,
}

impl Backbone {
    pub fn load(manifest: &Manifest, id: &str) -> Result<Backbone, BackboneError> {
        Backbone::load_sharing(manifest, id, std::iter::empty())
    }

    /// `load`, taking the model of one of `loaded` that runs the same graph (file, extra
    /// outputs, input size): entries that differ only in how the slice is prepared
    /// (`equalise`, `mean`, `std`) then hold one copy of the weights between them.
    pub fn load_sharing<'a>(
        manifest: &Manifest,
        id: &str,
        loaded: impl IntoIterator<Item = &'a Backbone>,
    ) -> Result<Backbone, BackboneError> {
        let entry = manifest.backbone(id)?.clone();
        let same_graph = |b: &&Backbone| {
            b.entry.sha256.eq_ignore_ascii_case(&entry.sha256)
                && b.entry.extra_outputs == entry.extra_outputs
                && b.entry.input_size == entry.input_size
        };
        let model = match loaded.into_iter().find(same_graph) {
            Some(b) => b.model.clone(),
            None => {
                let bytes = read_verified(&manifest.dir.join(&entry.file), &entry.sha256)?;
                let [h, w] = entry.input_size;
                load_onnx(id, &bytes, &[(0, vec![1, 3, h, w])], &entry.extra_outputs)?
            }
        };
        let identity = identity(&entry);
        Ok(Backbone {
            id: id.to_string(),
            identity,
            entry,
            model,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// What adapters and feature caches are keyed by (see `identity`).
    pub fn checksum(&self) -> &str {
        &self.identity
    }

    pub fn entry(&self) -> &BackboneEntry {
        &self.entry
    }

    /// The model input for a normalised slice: resized, 3 channels, mean/std applied.
    pub fn input_tensor(&self, normalized: &Array2<f32>) -> Result<Array4<f32>, BackboneError> {
        image::validate(normalized)?;
        let [h, w] = self.entry.input_size;
        let equalised = self.entry.equalise.map(|e| e.apply(normalized));
        let resized = image::resize_bilinear(equalised.as_ref().unwrap_or(normalized), h, w);
        let (mean, std) = (self.entry.mean, self.entry.std);
        Ok(Array4::from_shape_fn((1, 3, h, w), |(_, c, y, x)| {
            (resized[[y, x]] - mean[c]) / std[c]
        }))
    }

    /// Features of a slice already normalised to [0, 1] (see `image::normalize`).
    pub fn features(&self, normalized: &Array2<f32>) -> Result<FeatureMap, BackboneError> {
        let input = self.input_tensor(normalized)?;
        self.features_of_input(input, normalized.dim())
    }

    /// Runs the model on a prepared input tensor (1 × 3 × H × W).
    pub fn features_of_input(
        &self,
        input: Array4<f32>,
        image_dim: (usize, usize),
    ) -> Result<FeatureMap, BackboneError> {
        let err = |detail: String| BackboneError::Model {
            id: self.id.clone(),
            detail,
        };
        let out = run(&self.model, tvec!(Tensor::from(input).into()))
            .map_err(|e| err(format!("{e:#}")))?;
        let t = out[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| err(format!("{e:#}")))?;
        let data = match self.entry.format {
            OutputFormat::FeatureMap => feature_map(&t).map_err(err)?,
            OutputFormat::Tokens => {
                let (patch, prefix) = (
                    self.entry.patch_size.unwrap_or(1),
                    self.entry.prefix_tokens.unwrap_or(0),
                );
                let (gh, gw) = (
                    self.entry.input_size[0] / patch,
                    self.entry.input_size[1] / patch,
                );
                let s = t.shape();
                if s.len() != 3 || s[0] != 1 || s[1] != prefix + gh * gw {
                    return Err(err(format!(
                        "expected 1×{}×C tokens, got {s:?}",
                        prefix + gh * gw
                    )));
                }
                let c = s[2];
                Array3::from_shape_fn((c, gh, gw), |(k, i, j)| t[[0, prefix + i * gw + j, k]])
            }
        };
        let mut maps = vec![data];
        for extra in &out[1..] {
            let t = extra
                .to_plain_array_view::<f32>()
                .map_err(|e| err(format!("{e:#}")))?;
            maps.push(feature_map(&t).map_err(|e| err(format!("extra output: {e}")))?);
        }
        Ok(FeatureMap::stacked(maps, image_dim.0, image_dim.1))
    }
}

#[cfg(all(test, not(feature = "cuda")))]
mod tests {
    use super::*;

    /// A hypercolumn keeps its coarse map, and `parts` gives back the maps it was
    /// stacked from, bit for bit.
    #[test]
    fn stacked_maps_come_apart_as_they_were_given() {
        let coarse = Array3::from_shape_fn((3, 4, 5), |(c, i, j)| (c * 20 + i * 5 + j) as f32);
        let fine = Array3::from_shape_fn((2, 8, 10), |(c, i, j)| -((c * 80 + i * 10 + j) as f32));
        let fm = FeatureMap::stacked(vec![fine.clone(), coarse.clone()], 32, 40);
        assert_eq!(fm.data.dim(), (5, 8, 10));
        assert_eq!(fm.coarse.len(), 1);
        assert_eq!(fm.coarse[0].first, 2);
        let resized =
            image::resize_bilinear(&coarse.index_axis(ndarray::Axis(0), 1).to_owned(), 8, 10);
        assert_eq!(fm.data.index_axis(ndarray::Axis(0), 3), resized);
        let parts = fm.parts();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], fine.view());
        assert_eq!(parts[1], coarse.view());
        let again = FeatureMap::stacked(parts.iter().map(|p| p.to_owned()).collect(), 32, 40);
        assert!(crate::same_bits(&again.data, &fm.data));
        let one = FeatureMap::stacked(vec![fine.clone()], 32, 40);
        assert!(one.coarse.is_empty());
        assert_eq!(one.parts(), [fine.view()]);
    }

    /// Caches and adapters made before equalisation existed keep their key; an entry
    /// that equalises gets a key of its own, and the manifest refuses a setting it
    /// cannot use.
    #[test]
    fn equalised_features_have_a_key_of_their_own() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/models.toml");
        let manifest = Manifest::load(&path).unwrap();
        let key = |id: &str| identity(&manifest.backbones[id]);
        let sha = "e214fc3c6cf225caf22ed006e51d134d22acd37467cf7cf74e6137c0233efbae";
        assert_eq!(key("litemedsam"), sha);
        assert_eq!(key("litemedsam-hyper"), format!("{sha}-xb31e47739e3b"));
        let eq = key("litemedsam-hyper-eq");
        assert!(eq.starts_with(sha) && eq != key("litemedsam-hyper"), "{eq}");
        let mut plain = manifest.backbones["litemedsam"].clone();
        plain.equalise = Some(image::Equalise {
            tiles: 4,
            clip: 2.0,
        });
        let other = identity(&plain);
        assert!(
            other.starts_with(sha) && other != sha && other != eq,
            "{other}"
        );

        let text = std::fs::read_to_string(&path).unwrap().replace(
            "equalise = { tiles = 4, clip = 2.0 }",
            "equalise = { tiles = 0, clip = 2.0 }",
        );
        let dir = std::env::temp_dir().join(format!("scout-eq-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("models.toml"), text).unwrap();
        let e = Manifest::load(&dir.join("models.toml"))
            .err()
            .map(|e| e.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("litemedsam-hyper-eq") && e.contains("tiles")),
            "{e:?}"
        );
    }

    /// Entries that run the same graph and differ only in how the slice is prepared hold
    /// one model between them, each keeping its own preparation and key.
    #[test]
    fn entries_of_one_graph_share_its_model() {
        let manifest =
            Manifest::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/models.toml"))
                .unwrap();
        let hyper = Backbone::load(&manifest, "litemedsam-hyper").unwrap();
        let load = |id: &str| Backbone::load_sharing(&manifest, id, [&hyper]).unwrap();
        let eq = load("litemedsam-hyper-eq");
        assert!(std::sync::Arc::ptr_eq(&eq.model, &hyper.model));
        assert_eq!(eq.id(), "litemedsam-hyper-eq");
        assert!(eq.entry().equalise.is_some() && eq.checksum() != hyper.checksum());
        // Not the same graph: other outputs (the plain encoder), other weights (int8).
        for id in ["litemedsam", "litemedsam-int8"] {
            assert!(
                !std::sync::Arc::ptr_eq(&load(id).model, &hyper.model),
                "{id}"
            );
        }
    }

    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let manifest =
            Manifest::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/models.toml"))
                .unwrap();
        set_backend(Backend::Cuda);
        let r = Backbone::load(&manifest, "tiny-dinov2-test");
        set_backend(Backend::Cpu);
        let Err(e) = r else {
            panic!("loaded for CUDA without the feature")
        };
        assert!(e.to_string().contains("`cuda` feature"), "{e}");
        assert!(Backbone::load(&manifest, "tiny-dinov2-test").is_ok());
    }
}
