//! Annotated data sets in the two layouts of `EVALUATION.md`, read as localizer-like
//! slices: volume data sets (`*_image.nii.gz`, `*_labels.nii.gz`, `landmarks.csv` with
//! `case,landmark,i,j,k`) become 9 sagittal slices k* + 5m (m = −4..4, clipped); image data
//! sets (`images/*.png`, `labels/*.png`, `landmarks.csv` with `case,landmark,x,y`) one slice
//! each (`images/*.dcm` DICOM slices work too). Labels or landmarks may be missing; landmark names are whatever the CSV says.

use crate::image::{self, ImageError};
use ndarray::Array2;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("{0}: neither *_image.nii.gz files nor an images/ folder: not a data set")]
    Layout(PathBuf),
    #[error(transparent)]
    Image(#[from] ImageError),
}

fn read_err(path: &Path, detail: impl std::fmt::Display) -> DatasetError {
    DatasetError::Read {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Volume,
    Image,
}

/// A landmark's ground truth: (row, column) in the slice, and for volumes the slice
/// coordinate k (sagittal index) too.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LandmarkTruth {
    pub row: f64,
    pub column: f64,
    pub k: Option<f64>,
}

/// One 2D slice with its annotations.
#[derive(Debug, Clone)]
pub struct Slice {
    /// Raw pixel values (not normalised).
    pub pixels: Array2<f32>,
    /// Label values (0 = background), same size, when the data set has label maps.
    pub labels: Option<Array2<u8>>,
    /// Sagittal index for volume slices.
    pub k: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub slices: Vec<Slice>,
    /// Index into `slices` of the localizer slice k* (volumes) or 0 (images).
    pub center: usize,
    pub landmarks: BTreeMap<String, LandmarkTruth>,
}

impl Case {
    /// The case with its localizer slice k* alone.
    pub fn localizer(&self) -> Case {
        Case {
            name: self.name.clone(),
            slices: self.slices.get(self.center).cloned().into_iter().collect(),
            center: 0,
            landmarks: self.landmarks.clone(),
        }
    }
}

/// A data set folder: its layout, case names in sorted order, and landmarks.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub dir: PathBuf,
    pub layout: Layout,
    pub cases: Vec<String>,
    pub landmarks: LandmarkTable,
    /// Landmark names in first-seen order of the CSV.
    pub landmark_names: Vec<String>,
    /// Whether the images are stored as negatives (air bright) and are read inverted
    /// (`inverted`).
    pub negatives: bool,
}

/// Slices per volume case and their spacing, per EVALUATION.md.
/// Landmarks of every case, by case then landmark name.
pub type LandmarkTable = BTreeMap<String, BTreeMap<String, LandmarkTruth>>;

pub const STACK_OFFSETS: [i64; 9] = [-20, -15, -10, -5, 0, 5, 10, 15, 20];

impl Dataset {
    pub fn open(dir: &Path) -> Result<Dataset, DatasetError> {
        let entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| read_err(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        let volumes: Vec<String> = entries
            .iter()
            .filter_map(|p| {
                p.file_name()?
                    .to_str()?
                    .strip_suffix("_image.nii.gz")
                    .map(String::from)
            })
            .collect();
        let (layout, mut cases) = if !volumes.is_empty() {
            (Layout::Volume, volumes)
        } else if dir.join("images").is_dir() {
            let imgs = std::fs::read_dir(dir.join("images"))
                .map_err(|e| read_err(&dir.join("images"), e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension().is_some_and(|x| {
                        x.eq_ignore_ascii_case("png") || x.eq_ignore_ascii_case("dcm")
                    })
                })
                .filter_map(|p| p.file_stem()?.to_str().map(String::from))
                .collect();
            (Layout::Image, imgs)
        } else {
            return Err(DatasetError::Layout(dir.to_path_buf()));
        };
        cases.sort();
        let (landmarks, landmark_names) = read_landmarks(&dir.join("landmarks.csv"), layout)?;
        Ok(Dataset {
            dir: dir.to_path_buf(),
            layout,
            cases,
            landmarks,
            landmark_names,
            negatives: false,
        })
    }

    /// The same data set, its images read inverted when `negatives`: a set stored as
    /// negatives, as the chest-xr PNGs are (air bright: in every one of their label maps
    /// the lungs are brighter than the heart), reaches the adapters as positives, the way
    /// the agent reads any image (`image::read_dicom` inverts MONOCHROME1), so templates
    /// and the images an adapter later sees agree.
    pub fn inverted(self, negatives: bool) -> Dataset {
        Dataset { negatives, ..self }
    }

    /// An image of the data set as the adapters are to see it: inverted within its own
    /// range when the set is stored as negatives.
    fn positive(&self, mut pixels: Array2<f32>) -> Array2<f32> {
        if self.negatives {
            image::invert(&mut pixels);
        }
        pixels
    }

    /// Reads one case: its slices (the 9-slice stack for volumes) and landmarks.
    pub fn load_case(&self, name: &str) -> Result<Case, DatasetError> {
        let landmarks = self.landmarks.get(name).cloned().unwrap_or_default();
        match self.layout {
            Layout::Image => {
                // PNG or DICOM images; labels are PNG label maps of the same size.
                let png = self.dir.join("images").join(format!("{name}.png"));
                let img = if png.exists() {
                    png
                } else {
                    self.dir.join("images").join(format!("{name}.dcm"))
                };
                let pixels = self.positive(image::read_any(&img)?);
                let lab = self.dir.join("labels").join(format!("{name}.png"));
                let labels = if lab.exists() {
                    Some(read_label_png(&lab)?)
                } else {
                    None
                };
                if let Some(l) = &labels {
                    if l.dim() != pixels.dim() {
                        return Err(read_err(
                            &lab,
                            format!(
                                "label map {:?} differs from image {:?}",
                                l.dim(),
                                pixels.dim()
                            ),
                        ));
                    }
                }
                Ok(Case {
                    name: name.into(),
                    slices: vec![Slice {
                        pixels,
                        labels,
                        k: None,
                    }],
                    center: 0,
                    landmarks,
                })
            }
            Layout::Volume => {
                let img_path = self.dir.join(format!("{name}_image.nii.gz"));
                let lab_path = self.dir.join(format!("{name}_labels.nii.gz"));
                let img = read_nifti(&img_path)?;
                let lab = if lab_path.exists() {
                    Some(read_nifti(&lab_path)?)
                } else {
                    None
                };
                let nk = img.dims[2] as i64;
                let k_star = self
                    .k_star(name, &landmarks, lab.as_ref())
                    .unwrap_or(nk / 2)
                    .clamp(0, nk - 1);
                let mut ks: Vec<usize> = STACK_OFFSETS
                    .iter()
                    .map(|o| (k_star + o).clamp(0, nk - 1) as usize)
                    .collect();
                ks.dedup();
                let center = ks.iter().position(|k| *k as i64 == k_star).unwrap_or(0);
                let slices = ks
                    .iter()
                    .map(|&k| Slice {
                        pixels: self.positive(img.slice_k(k)),
                        labels: lab
                            .as_ref()
                            .map(|l| l.slice_k(k).mapv(|v| v.round().clamp(0.0, 255.0) as u8)),
                        k: Some(k),
                    })
                    .collect();
                Ok(Case {
                    name: name.into(),
                    slices,
                    center,
                    landmarks,
                })
            }
        }
    }

    /// k* = round(mean of the case's landmark k values); without landmarks, the label
    /// centroid's k.
    fn k_star(
        &self,
        _name: &str,
        landmarks: &BTreeMap<String, LandmarkTruth>,
        labels: Option<&Volume>,
    ) -> Option<i64> {
        let ks: Vec<f64> = landmarks.values().filter_map(|l| l.k).collect();
        if !ks.is_empty() {
            return Some((ks.iter().sum::<f64>() / ks.len() as f64).round() as i64);
        }
        let l = labels?;
        let (mut sum, mut n) = (0.0, 0.0);
        for k in 0..l.dims[2] {
            let c = l.slice_k(k).iter().filter(|v| **v > 0.0).count() as f64;
            sum += c * k as f64;
            n += c;
        }
        (n > 0.0).then(|| (sum / n).round() as i64)
    }
}

fn read_landmarks(
    path: &Path,
    layout: Layout,
) -> Result<(LandmarkTable, Vec<String>), DatasetError> {
    let mut out: LandmarkTable = BTreeMap::new();
    let mut names = Vec::new();
    if !path.exists() {
        return Ok((out, names));
    }
    let text = std::fs::read_to_string(path).map_err(|e| read_err(path, e))?;
    let mut lines = text.lines().enumerate();
    let header: Vec<String> = lines
        .next()
        .map(|(_, h)| h.split(',').map(|s| s.trim().to_lowercase()).collect())
        .unwrap_or_default();
    let col = |n: &str| header.iter().position(|h| h == n);
    let (case_c, name_c) = (col("case"), col("landmark"));
    let coords: Vec<Option<usize>> = match layout {
        Layout::Volume => vec![col("i"), col("j"), col("k")],
        Layout::Image => vec![col("x"), col("y")],
    };
    let (Some(case_c), Some(name_c)) = (case_c, name_c) else {
        return Err(read_err(
            path,
            "header must name the columns case and landmark",
        ));
    };
    if coords.iter().any(|c| c.is_none()) {
        return Err(read_err(
            path,
            "missing coordinate columns (i,j,k for volumes, x,y for images)",
        ));
    }
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let num = |c: Option<usize>| -> Result<f64, DatasetError> {
            let c = c.unwrap_or(0);
            f.get(c)
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite())
                .ok_or_else(|| {
                    read_err(
                        path,
                        format!("line {}: bad number in column {}", n + 1, c + 1),
                    )
                })
        };
        let (Some(case), Some(name)) = (f.get(case_c), f.get(name_c)) else {
            return Err(read_err(path, format!("line {}: too few fields", n + 1)));
        };
        let truth = match layout {
            // i runs along rows (head→feet), j along columns, k across slices.
            Layout::Volume => LandmarkTruth {
                row: num(coords[0])?,
                column: num(coords[1])?,
                k: Some(num(coords[2])?),
            },
            Layout::Image => LandmarkTruth {
                row: num(coords[1])?,
                column: num(coords[0])?,
                k: None,
            },
        };
        if !names.iter().any(|x| x == name) {
            names.push(name.to_string());
        }
        out.entry(case.to_string())
            .or_default()
            .insert(name.to_string(), truth);
    }
    Ok((out, names))
}

fn read_label_png(path: &Path) -> Result<Array2<u8>, DatasetError> {
    let img = ::image::open(path)
        .map_err(|e| read_err(path, e))?
        .to_luma8();
    let (w, h) = img.dimensions();
    Array2::from_shape_vec((h as usize, w as usize), img.into_raw()).map_err(|e| read_err(path, e))
}

/// A 3D volume, Fortran order as stored (i fastest).
struct Volume {
    dims: [usize; 3],
    data: Vec<f32>,
}

impl Volume {
    /// Sagittal slice k: rows = i (axis 0), columns = j (axis 1).
    fn slice_k(&self, k: usize) -> Array2<f32> {
        let [ni, nj, _] = self.dims;
        Array2::from_shape_fn((ni, nj), |(i, j)| self.data[i + ni * (j + nj * k)])
    }
}

fn read_nifti(path: &Path) -> Result<Volume, DatasetError> {
    use nifti::{NiftiObject, NiftiVolume, RandomAccessNiftiVolume, ReaderOptions};
    let obj = ReaderOptions::new()
        .read_file(path)
        .map_err(|e| read_err(path, e))?;
    let vol = obj.volume();
    let d = vol.dim();
    if d.len() < 3 || d[..3].contains(&0) || d[3..].iter().any(|v| *v > 1) {
        return Err(read_err(
            path,
            format!("expected a 3D volume, dimensions {d:?}"),
        ));
    }
    let dims = [d[0] as usize, d[1] as usize, d[2] as usize];
    let mut data = Vec::with_capacity(dims.iter().product());
    for k in 0..d[2] {
        for j in 0..d[1] {
            for i in 0..d[0] {
                data.push(vol.get_f32(&[i, j, k]).map_err(|e| read_err(path, e))?);
            }
        }
    }
    Ok(Volume { dims, data })
}
