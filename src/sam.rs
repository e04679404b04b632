//! SAM's prompt encoder + mask decoder: image embeddings and positive/negative points (or a
//! box) in image pixel coordinates → a mask at image resolution.
//!
//! The decoder takes any number of points N in one loaded model; prompts are never padded
//! with "not a point" entries (that changed the masks measurably).

use crate::backbone::{load_onnx, read_verified, BackboneError, FeatureMap, Manifest, Runnable};
use crate::image;
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

impl Sam {
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
        let (low_res_logits, predicted_iou) = self.decode_raw(&features.data, &prompts)?;
        let up = image::resize_bilinear(&low_res_logits, rows, cols);
        Ok(SamMask {
            mask: up.mapv(|v| v > 0.0),
            low_res_logits,
            predicted_iou,
        })
    }
}
