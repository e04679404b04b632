//! Pixels in, normalised slices out: DICOM (after Rescale Slope/Intercept), PNG and raw
//! arrays become `Array2<f32>` (rows × columns), and `normalize` maps any MR scaling to
//! [0, 1] robustly.
//!
//! Normalisation (identical in `models/export.py`): the 0.5th and 99.5th percentiles
//! (nearest rank on the sorted values, index ⌊p/100·(n−1) + ½⌋) are mapped to 0 and 1 and
//! everything is clipped to [0, 1]. MR has no absolute intensity scale and a few very
//! bright pixels (fat, vessels, coil proximity) would otherwise compress the anatomy.
//! A constant image becomes all zeros.

use ndarray::Array2;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image is empty ({rows}×{columns})")]
    Empty { rows: usize, columns: usize },
    #[error("image has {count} non-finite pixel values (NaN or infinite)")]
    NonFinite { count: usize },
    #[error("image {rows}×{columns} is too small: at least 2×2 pixels are needed")]
    TooSmall { rows: usize, columns: usize },
    #[error("{path}: {detail}")]
    Read { path: String, detail: String },
}

fn read_err(path: &Path, detail: impl std::fmt::Display) -> ImageError {
    ImageError::Read {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

pub const LOW_PERCENTILE: f64 = 0.5;
pub const HIGH_PERCENTILE: f64 = 99.5;

/// Checks that an image can be normalised and fed to a model.
pub fn validate(pixels: &Array2<f32>) -> Result<(), ImageError> {
    let (rows, columns) = pixels.dim();
    if rows == 0 || columns == 0 {
        return Err(ImageError::Empty { rows, columns });
    }
    if rows < 2 || columns < 2 {
        return Err(ImageError::TooSmall { rows, columns });
    }
    let count = pixels.iter().filter(|v| !v.is_finite()).count();
    if count > 0 {
        return Err(ImageError::NonFinite { count });
    }
    Ok(())
}

/// Nearest-rank percentile of already sorted values.
fn percentile(sorted: &[f32], p: f64) -> f64 {
    let idx = (p / 100.0 * (sorted.len() - 1) as f64 + 0.5).floor() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64
}

/// Percentile clipping to [0, 1]; see the module documentation.
pub fn normalize(pixels: &Array2<f32>) -> Result<Array2<f32>, ImageError> {
    validate(pixels)?;
    let mut sorted: Vec<f32> = pixels.iter().copied().collect();
    sorted.sort_unstable_by(f32::total_cmp);
    let lo = percentile(&sorted, LOW_PERCENTILE);
    let hi = percentile(&sorted, HIGH_PERCENTILE);
    if hi <= lo {
        return Ok(Array2::zeros(pixels.dim()));
    }
    Ok(pixels.mapv(|v| (((v as f64 - lo) / (hi - lo)).clamp(0.0, 1.0)) as f32))
}

/// Half-pixel-centre bilinear resize (PyTorch `align_corners=False`, no antialiasing).
pub fn resize_bilinear(img: &Array2<f32>, out_rows: usize, out_cols: usize) -> Array2<f32> {
    let (in_rows, in_cols) = img.dim();
    let axis = |n_out: usize, n_in: usize| -> Vec<(usize, usize, f64)> {
        (0..n_out)
            .map(|i| {
                let src = ((i as f64 + 0.5) * (n_in as f64 / n_out as f64) - 0.5)
                    .clamp(0.0, (n_in - 1) as f64);
                let i0 = src.floor() as usize;
                let i1 = (i0 + 1).min(n_in - 1);
                (i0, i1, src - i0 as f64)
            })
            .collect()
    };
    let ys = axis(out_rows, in_rows);
    let xs = axis(out_cols, in_cols);
    Array2::from_shape_fn((out_rows, out_cols), |(r, c)| {
        let (y0, y1, fy) = ys[r];
        let (x0, x1, fx) = xs[c];
        let at = |y: usize, x: usize| img[[y, x]] as f64;
        let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
        let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
        (top * (1.0 - fy) + bottom * fy) as f32
    })
}

/// The image bilinearly interpolated at (row, column); outside it, the nearest border
/// value. The image must not be empty.
pub fn bilinear_at(img: &Array2<f32>, row: f64, col: f64) -> f32 {
    let (rows, cols) = img.dim();
    let y = row.clamp(0.0, rows.saturating_sub(1) as f64);
    let x = col.clamp(0.0, cols.saturating_sub(1) as f64);
    let (y0, x0) = (y.floor() as usize, x.floor() as usize);
    let (y1, x1) = ((y0 + 1).min(rows - 1), (x0 + 1).min(cols - 1));
    let (fy, fx) = ((y - y0 as f64) as f32, (x - x0 as f64) as f32);
    let top = img[[y0, x0]] * (1.0 - fx) + img[[y0, x1]] * fx;
    let bottom = img[[y1, x0]] * (1.0 - fx) + img[[y1, x1]] * fx;
    top * (1.0 - fy) + bottom * fy
}

/// First frame of a DICOM image, with the Modality LUT (Rescale Slope/Intercept) applied.
pub fn read_dicom(path: &Path) -> Result<Array2<f32>, ImageError> {
    use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder};
    let obj = dicom_object::open_file(path).map_err(|e| read_err(path, e))?;
    let decoded = obj.decode_pixel_data().map_err(|e| read_err(path, e))?;
    if decoded.samples_per_pixel() != 1 {
        return Err(read_err(
            path,
            format!(
                "{} samples per pixel; only grayscale is supported",
                decoded.samples_per_pixel()
            ),
        ));
    }
    let (rows, cols) = (decoded.rows() as usize, decoded.columns() as usize);
    let options = ConvertOptions::new().with_modality_lut(ModalityLutOption::Default);
    let values: Vec<f32> = decoded
        .to_vec_frame_with_options(0, &options)
        .map_err(|e| read_err(path, e))?;
    Array2::from_shape_vec((rows, cols), values).map_err(|e| read_err(path, e))
}

/// A grayscale PNG (8 or 16 bit); colour images are converted to luma.
pub fn read_png(path: &Path) -> Result<Array2<f32>, ImageError> {
    let img = image::open(path).map_err(|e| read_err(path, e))?;
    let gray = img.to_luma32f();
    let (w, h) = gray.dimensions();
    Array2::from_shape_vec((h as usize, w as usize), gray.into_raw()).map_err(|e| read_err(path, e))
}

/// Reads a DICOM or PNG file by its content.
pub fn read_any(path: &Path) -> Result<Array2<f32>, ImageError> {
    let is_png = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if is_png {
        read_png(path)
    } else {
        read_dicom(path)
    }
}

/// Mean over the (2r+1)² window around each cell of an h×w plane (row-major), the window clipped at
/// the border: window sums along each row, then along each column (a column's running
/// sum advances a whole row of cells at a time, which vectorises).
pub fn box_mean(
    plane: &[f32],
    h: usize,
    w: usize,
    r: usize,
    row_sums: &mut [f32],
    out: &mut [f32],
) {
    let span = |i: usize, n: usize| (i.saturating_sub(r), (i + r + 1).min(n));
    for (src, dst) in plane.chunks_exact(w).zip(row_sums.chunks_exact_mut(w)) {
        let mut sum: f32 = src[..r.min(w)].iter().sum();
        for (x, d) in dst.iter_mut().enumerate() {
            let (x0, x1) = span(x, w);
            if x + r < w {
                sum += src[x + r];
            }
            if x > r {
                sum -= src[x - r - 1];
            }
            *d = sum / (x1 - x0) as f32;
        }
    }
    let mut sum = vec![0f32; w];
    for y in 0..r.min(h) {
        for (s, v) in sum.iter_mut().zip(&row_sums[y * w..(y + 1) * w]) {
            *s += v;
        }
    }
    for y in 0..h {
        let (y0, y1) = span(y, h);
        if y + r < h {
            for (s, v) in sum.iter_mut().zip(&row_sums[(y + r) * w..(y + r + 1) * w]) {
                *s += v;
            }
        }
        if y > r {
            for (s, v) in sum.iter_mut().zip(&row_sums[(y - r - 1) * w..(y - r) * w]) {
                *s -= v;
            }
        }
        let n = (y1 - y0) as f32;
        for (o, s) in out[y * w..(y + 1) * w].iter_mut().zip(&sum) {
            *o = s / n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_clips_outliers_and_handles_flat_images() {
        // 1000 pixels 0..999 plus one huge outlier.
        let mut v: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        v.push(1e9);
        let img = Array2::from_shape_vec((1, 1001), v).unwrap();
        let err = normalize(&img).unwrap_err();
        assert!(matches!(err, ImageError::TooSmall { .. }), "{err}");
        let img = Array2::from_shape_fn((7, 143), |(r, c)| {
            if r == 0 && c == 0 {
                1e9
            } else {
                (r * 143 + c) as f32
            }
        });
        let n = normalize(&img).unwrap();
        assert_eq!(n[[0, 0]], 1.0, "outlier clipped");
        assert!(n.iter().all(|v| (0.0..=1.0).contains(v)));
        // 99.5th percentile of ~1000 values is ~995, so pixel 500 maps near 0.5.
        assert!((n[[3, 71]] - 0.5).abs() < 0.02, "{}", n[[3, 71]]);
        assert!(normalize(&Array2::from_elem((4, 4), 7.0))
            .unwrap()
            .iter()
            .all(|v| *v == 0.0));
    }

    #[test]
    fn bad_images_are_errors() {
        assert!(matches!(
            normalize(&Array2::zeros((0, 0))),
            Err(ImageError::Empty { .. })
        ));
        assert!(matches!(
            normalize(&Array2::zeros((1, 64))),
            Err(ImageError::TooSmall { .. })
        ));
        let mut img = Array2::zeros((8, 8));
        img[[2, 2]] = f32::NAN;
        img[[3, 3]] = f32::INFINITY;
        assert!(matches!(
            normalize(&img),
            Err(ImageError::NonFinite { count: 2 })
        ));
    }

    #[test]
    fn bilinear_matches_half_pixel_convention() {
        let img = Array2::from_shape_vec((2, 2), vec![0.0, 1.0, 2.0, 3.0]).unwrap();
        let up = resize_bilinear(&img, 4, 4);
        // Output pixel 1 samples source 0.25 in both axes.
        assert!((up[[1, 1]] - (0.25 * 2.0 + 0.25 * 1.0)).abs() < 1e-6);
        assert_eq!(up[[0, 0]], 0.0);
        assert_eq!(up[[3, 3]], 3.0);
        let same = resize_bilinear(&img, 2, 2);
        assert_eq!(same, img);
    }
}
