//! SAM's prompt encoder + mask decoder: image embeddings and positive/negative points (or a
//! box) in image pixel coordinates → a mask at image resolution.
//!
//! The decoder takes any number of points N in one loaded model; prompts are never padded
//! with "not a point" entries (that changed the masks measurably).

use crate::backbone::{load_onnx, read_verified, BackboneError, FeatureMap, Manifest, Runnable};
use crate::image;
use crate::postprocess::{self, Finding};
use ndarray::{Array2, Array3};
use tract_onnx::prelude::*;

/// A prompt point in image pixel coordinates (row, column).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub row: f64,
    pub column: f64,
    pub label: PointLabel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointLabel {
    Background = 0,
    Foreground = 1,
    BoxTopLeft = 2,
    BoxBottomRight = 3,
}

/// The decoder's answer.
#[derive(Debug, Clone)]
pub struct SamMask {
    /// Inside the structure, at image resolution.
    pub mask: Array2<bool>,
    /// Raw logits in the model frame (input_size), > 0 inside.
    pub low_res_logits: Array2<f32>,
    /// The decoder's own estimate of the mask's IoU.
    pub predicted_iou: f32,
}

pub struct Sam {
    id: String,
    input_size: [usize; 2],
    backbone: String,
    model: Runnable,
}

/// SAM's mask replaces a structure's region only when the decoder's own estimate of its IoU
/// reaches this...
pub const MIN_PREDICTED_IOU: f32 = 0.8;
/// ...and it overlaps the region at this IoU at least: a box around a region SAM reads as
/// another structure gives a mask elsewhere. Both were set before the first measurement.
pub const MIN_AGREEMENT: f64 = 0.5;
/// SAM redraws a structure (`learn_redraws`) when, prompted with the box of each
/// template's own mask, it gives that mask back at this IoU on average: the IoU
/// goal. What it cannot draw from a perfect box (the heart on a chest radiograph, a
/// vertebral body: 0.69–0.75 on chest-xr's and spine-mr's test cases) it would draw worse
/// than the adapter.
pub const FAITHFUL_IOU: f64 = 0.85;

impl Sam {
    /// The decoder for `backbone`'s maps: one made for it, or for a backbone that runs the
    /// same model file (a map of several outputs keeps that model's embedding as its
    /// coarsest part, which `mask` reads).
    pub fn for_backbone(manifest: &Manifest, backbone: &str) -> Result<Sam, BackboneError> {
        Sam::load(manifest, &Sam::decoder_for(manifest, backbone)?)
    }

    /// The manifest id of the decoder `for_backbone` loads.
    pub fn decoder_for(manifest: &Manifest, backbone: &str) -> Result<String, BackboneError> {
        let sha = manifest.backbones.get(backbone).map(|b| &b.sha256);
        let same_model = |d: &crate::backbone::DecoderEntry| {
            d.backbone == backbone
                || (sha.is_some() && manifest.backbones.get(&d.backbone).map(|b| &b.sha256) == sha)
        };
        match manifest.decoders.iter().find(|(_, d)| same_model(d)) {
            Some((id, _)) => Ok(id.clone()),
            None => Err(BackboneError::Unknown {
                id: format!("SAM decoder for backbone {backbone}"),
                known: manifest
                    .decoders
                    .iter()
                    .map(|(id, d)| format!("{id} (backbone {})", d.backbone))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    pub fn load(manifest: &Manifest, id: &str) -> Result<Sam, BackboneError> {
        let entry = manifest
            .decoders
            .get(id)
            .ok_or_else(|| BackboneError::Unknown {
                id: id.to_string(),
                known: manifest
                    .decoders
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let bytes = read_verified(&manifest.dir.join(&entry.file), &entry.sha256)?;
        let model = load_onnx(id, &bytes, &[], &[])?;
        Ok(Sam {
            id: id.to_string(),
            input_size: entry.input_size,
            backbone: entry.backbone.clone(),
            model,
        })
    }

    /// Image pixels per cell of the decoder's masks on an image of `rows` × `cols`: the
    /// finest detail they hold (2 on a 512 × 512 radiograph, whose masks come at the
    /// model's 256 × 256 and are resized).
    pub fn mask_cell(&self, rows: usize, cols: usize) -> f64 {
        let [mh, mw] = self.input_size;
        (rows as f64 / mh.max(1) as f64).max(cols as f64 / mw.max(1) as f64)
    }

    /// The backbone whose embeddings this decoder takes.
    pub fn backbone(&self) -> &str {
        &self.backbone
    }

    /// Runs the decoder on embeddings and points given in the model frame (x, y, label).
    pub fn decode_raw(
        &self,
        embeddings: &Array3<f32>,
        points: &[(f32, f32, f32)],
    ) -> Result<(Array2<f32>, f32), BackboneError> {
        let err = |detail: String| BackboneError::Model {
            id: self.id.clone(),
            detail,
        };
        if points.is_empty() {
            return Err(err("at least one prompt point is needed".into()));
        }
        let (c, h, w) = embeddings.dim();
        let emb = Tensor::from(
            embeddings
                .to_shape((1, c, h, w))
                .map_err(|e| err(e.to_string()))?
                .to_owned(),
        );
        let coords = tract_ndarray::Array3::from_shape_fn((1, points.len(), 2), |(_, i, k)| {
            if k == 0 {
                points[i].0
            } else {
                points[i].1
            }
        });
        let labels = tract_ndarray::Array2::from_shape_fn((1, points.len()), |(_, i)| points[i].2);
        let out = crate::backbone::run(
            &self.model,
            tvec!(
                emb.into(),
                Tensor::from(coords).into(),
                Tensor::from(labels).into()
            ),
        )
        .map_err(|e| err(format!("{e:#}")))?;
        let logits = out[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| err(format!("{e:#}")))?;
        let s = logits.shape().to_vec();
        if s.len() != 4 || s[0] != 1 || s[1] != 1 {
            return Err(err(format!("unexpected mask shape {s:?}")));
        }
        let logits = Array2::from_shape_vec((s[2], s[3]), logits.iter().copied().collect())
            .map_err(|e| err(e.to_string()))?;
        let iou = out[1]
            .to_plain_array_view::<f32>()
            .ok()
            .and_then(|v| v.iter().next().copied())
            .unwrap_or(f32::NAN);
        Ok((logits, iou))
    }

    /// A mask at the image's resolution from image-pixel prompts.
    pub fn mask(&self, features: &FeatureMap, points: &[Point]) -> Result<SamMask, BackboneError> {
        let (rows, cols) = (features.image_rows, features.image_columns);
        let [mh, mw] = self.input_size;
        // Pixel centres map between frames like the bilinear resize of the encoder input.
        let to_model = |p: &Point| {
            let x = (p.column + 0.5) * mw as f64 / cols as f64 - 0.5;
            let y = (p.row + 0.5) * mh as f64 / rows as f64 - 0.5;
            (x as f32, y as f32, p.label as i32 as f32)
        };
        let prompts: Vec<(f32, f32, f32)> = points.iter().map(to_model).collect();
        // A map of several outputs (`litemedsam-hyper`) holds the decoder's embedding as
        // its coarsest part; the finer channels were never SAM's.
        let embedding = features.coarsest_part().unwrap_or(&features.data);
        let (low_res_logits, predicted_iou) = self.decode_raw(embedding, &prompts)?;
        let up = image::resize_bilinear(&low_res_logits, rows, cols);
        Ok(SamMask {
            mask: up.mapv(|v| v > 0.0),
            low_res_logits,
            predicted_iou,
        })
    }

    /// SAM's mask for `region`, prompted with the region's box, when it passes
    /// `MIN_PREDICTED_IOU` and `MIN_AGREEMENT`; None otherwise (and for an empty region).
    pub fn redraw(
        &self,
        features: &FeatureMap,
        region: &Array2<bool>,
    ) -> Result<Option<Array2<bool>>, BackboneError> {
        let Some(prompt) = box_prompt(region) else {
            return Ok(None);
        };
        let m = self.mask(features, &prompt)?;
        let agreement = mask_iou(&m.mask, region);
        Ok((m.predicted_iou >= MIN_PREDICTED_IOU && agreement >= MIN_AGREEMENT).then_some(m.mask))
    }

    /// Redraws the structures of `found` (score order) that `redraws` names (`redraw`),
    /// and takes each accepted mask's pixels out of the other structures' regions:
    /// the templates' label maps give each pixel one structure, and where SAM's outline
    /// and another structure's region meet (the lungs and the heart's side), SAM's is the
    /// one it was accepted for. A region that would lose every pixel keeps them. Returns,
    /// per decoder call, the structure and whether its mask was accepted. `scores`: the labels' scores at
    /// image resolution, which place the changed findings' points (`postprocess::measure`).
    pub fn redraw_structures(
        &self,
        features: &FeatureMap,
        found: &mut [Option<Finding>],
        redraws: impl Fn(usize) -> bool,
        scores: &Array3<f32>,
    ) -> Result<Vec<(usize, bool)>, BackboneError> {
        let mut accepted = Vec::new();
        let mut drawn: Vec<usize> = Vec::new();
        for (l, f) in found.iter_mut().enumerate() {
            let Some(f) = f.as_mut().filter(|f| redraws(l) && !f.is_placed()) else {
                continue;
            };
            let mask = self.redraw(features, &f.mask)?;
            accepted.push((l, mask.is_some()));
            if let Some(mask) = mask {
                f.mask = mask;
                postprocess::measure(f, scores);
                drawn.push(l);
            }
        }
        give_way(found, &drawn, scores);
        Ok(accepted)
    }

    /// Per structure value, whether SAM redraws it faithfully (`FAITHFUL_IOU`): prompted with
    /// the box of each template's mask of it, its mean IoU with those masks. `templates`:
    /// each template's map of slice k* and that slice's label map.
    pub fn learn_redraws<'a>(
        &self,
        templates: impl Iterator<Item = (&'a FeatureMap, &'a Array2<u8>)>,
        values: &[u8],
    ) -> Result<Vec<bool>, BackboneError> {
        let mut sums = vec![(0.0, 0usize); values.len()];
        for (fm, labels) in templates {
            for (&v, sum) in values.iter().zip(&mut sums) {
                let truth = labels.mapv(|x| x == v);
                if let Some(prompt) = box_prompt(&truth) {
                    sum.0 += mask_iou(&self.mask(fm, &prompt)?.mask, &truth);
                    sum.1 += 1;
                }
            }
        }
        Ok(values
            .iter()
            .zip(sums)
            .map(|(v, (sum, n))| {
                let mean = sum / n.max(1) as f64;
                log::info!(
                    "structure {v}: SAM redraws its {n} templates' masks from their boxes at mean IoU {mean:.3}: {}",
                    if n > 0 && mean >= FAITHFUL_IOU { "redrawn" } else { "not redrawn" }
                );
                n > 0 && mean >= FAITHFUL_IOU
            })
            .collect())
    }
}

/// Takes the pixels of the structures `drawn` (indices into `found`) out of the others'
/// regions (`Sam::redraw_structures`); a region that would lose every pixel keeps them.
fn give_way(found: &mut [Option<Finding>], drawn: &[usize], scores: &Array3<f32>) {
    for &d in drawn {
        let Some(taken) = found
            .get(d)
            .and_then(|f| f.as_ref())
            .map(|f| f.mask.clone())
        else {
            continue;
        };
        for (l, f) in found.iter_mut().enumerate() {
            let Some(f) = f.as_mut().filter(|_| !drawn.contains(&l)) else {
                continue;
            };
            if f.mask.dim() != taken.dim() {
                continue;
            }
            let left = ndarray::Zip::from(&f.mask)
                .and(&taken)
                .map_collect(|&m, &t| m && !t);
            if left != f.mask && left.iter().any(|m| *m) {
                f.mask = left;
                postprocess::measure(f, scores);
            }
        }
    }
}

/// A box around `mask` with a margin of 5 % of its size on each side, as a box drawn by
/// hand would have, as SAM's two corner points; None for an empty mask.
pub fn box_prompt(mask: &Array2<bool>) -> Option<[Point; 2]> {
    let (rows, cols) = mask.dim();
    let (mut r0, mut c0, mut r1, mut c1) = (usize::MAX, usize::MAX, 0, 0);
    for ((r, c), _) in mask.indexed_iter().filter(|(_, v)| **v) {
        (r0, c0, r1, c1) = (r0.min(r), c0.min(c), r1.max(r), c1.max(c));
    }
    if r0 > r1 {
        return None;
    }
    let (mr, mc) = ((r1 - r0) as f64 * 0.05, (c1 - c0) as f64 * 0.05);
    Some([
        Point {
            row: (r0 as f64 - mr).max(0.0),
            column: (c0 as f64 - mc).max(0.0),
            label: PointLabel::BoxTopLeft,
        },
        Point {
            row: (r1 as f64 + mr).min(rows as f64 - 1.0),
            column: (c1 as f64 + mc).min(cols as f64 - 1.0),
            label: PointLabel::BoxBottomRight,
        },
    ])
}

/// Intersection over union of two masks (1 when both are empty).
pub fn mask_iou(a: &Array2<bool>, b: &Array2<bool>) -> f64 {
    let (mut inter, mut union) = (0usize, 0usize);
    for (x, y) in a.iter().zip(b.iter()) {
        inter += usize::from(*x && *y);
        union += usize::from(*x || *y);
    }
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_box_prompt_frames_the_mask_with_a_margin() {
        let mut mask = Array2::from_elem((50, 60), false);
        assert!(box_prompt(&mask).is_none());
        mask.slice_mut(ndarray::s![10..=30, 20..=40]).fill(true);
        let [a, b] = box_prompt(&mask).unwrap();
        assert_eq!(
            (a.row, a.column, a.label),
            (9.0, 19.0, PointLabel::BoxTopLeft)
        );
        assert_eq!(
            (b.row, b.column, b.label),
            (31.0, 41.0, PointLabel::BoxBottomRight)
        );
        // The margin stops at the image's edge.
        mask.fill(false);
        mask.slice_mut(ndarray::s![0..50, 0..=9]).fill(true);
        let [a, b] = box_prompt(&mask).unwrap();
        assert_eq!((a.row, a.column, b.row, b.column), (0.0, 0.0, 49.0, 9.45));
        let mut other = mask.clone();
        other.slice_mut(ndarray::s![0..50, 0..5]).fill(false);
        assert_eq!(mask_iou(&mask, &other), 0.5);
        assert_eq!(
            mask_iou(
                &Array2::from_elem((2, 2), false),
                &Array2::from_elem((2, 2), false)
            ),
            1.0
        );
    }

    /// A backbone that runs the decoder's model file with extra outputs shares its decoder;
    /// one that runs another model has none.
    /// A redrawn structure's pixels leave the others' regions, whose points follow; a
    /// region it covers whole keeps its pixels, and redrawn ones are not touched.
    #[test]
    fn other_structures_give_way_to_a_redrawn_one() {
        let region = |r: std::ops::Range<usize>, c: std::ops::Range<usize>, label| {
            let mut mask = Array2::from_elem((20, 20), false);
            mask.slice_mut(ndarray::s![r, c]).fill(true);
            let mut f = Finding {
                label,
                mask,
                mass: 0.0,
                point: (0.0, 0.0),
                confidence: 0.0,
            };
            postprocess::measure(&mut f, &Array3::from_elem((4, 20, 20), 1.0));
            f
        };
        let mut found = vec![
            Some(region(0..10, 0..10, 0)),
            Some(region(0..10, 5..15, 1)),
            Some(region(2..4, 2..4, 2)),
            None,
            Some(region(0..10, 8..12, 3)),
        ];
        // 0 was redrawn; 4 too, over 1's right edge.
        let drawn = [0, 4];
        let before = found.clone();
        give_way(&mut found, &drawn, &Array3::from_elem((5, 20, 20), 1.0));
        let f1 = found[1].as_ref().unwrap();
        let expected = region(0..10, 12..15, 1);
        assert_eq!(f1.mask, expected.mask);
        assert_eq!(f1.point, (4.5, 13.0));
        let same = |l: usize| {
            let (a, b) = (found[l].as_ref().unwrap(), before[l].as_ref().unwrap());
            a.mask == b.mask && a.point == b.point
        };
        assert!(same(2), "wholly covered: kept");
        assert!(same(0) && same(4), "redrawn: not touched");
        assert!(found[3].is_none());
    }

    #[test]
    fn a_decoder_serves_the_backbones_of_its_model() {
        let m = Manifest::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/models.toml"))
            .unwrap();
        for id in ["litemedsam", "litemedsam-hyper"] {
            assert_eq!(Sam::for_backbone(&m, id).unwrap().backbone(), "litemedsam");
        }
        // The same decoder id: the agent loads it once for both chest rules.
        assert_eq!(
            Sam::decoder_for(&m, "litemedsam-hyper-eq").unwrap(),
            "litemedsam"
        );
        let err = Sam::for_backbone(&m, "tiny-dinov2-test").err().unwrap();
        assert!(
            err.to_string().contains("litemedsam (backbone litemedsam)"),
            "{err}"
        );
    }
}
