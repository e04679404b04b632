//! Landmark refinement by template matching. The feature grid places a landmark to within
//! a cell or two (8 px on a 512-pixel radiograph), and a landmark defined by an outline —
//! a lung apex, a costophrenic angle — sits where the region's centroid is not. The
//! templates' own pixels around their landmark say where it is to the pixel: each landmark
//! keeps the mean of its templates' zero-mean, unit-norm intensity patches, and at
//! inference the point moves, within a few cells, to where the target correlates best
//! with them. Correlating with the mean patch and dividing by the target window's norm
//! gives exactly the mean of the per-template correlations, for the price of one.
//!
//! Patches are cut and compared in feature-cell units (pixels per cell of each image), the
//! scale the backbone sees, so templates and targets of different matrix sizes compare.

use crate::backbone::FeatureMap;
use crate::postprocess::Finding;
use ndarray::Array2;
use serde::{Deserialize, Serialize};

/// Patch half-size and search radius in feature cells, fixed a priori: the patch spans the
/// structure around the landmark, the search the grid's usual error (1–3 cells) without
/// reaching far for a look-alike.
const PATCH_CELLS: f64 = 3.0;
const SEARCH_CELLS: f64 = 3.0;
/// Below this mean correlation with the templates the match is not trusted: the point
/// stays where the adapter put it.
pub const MIN_CORRELATION: f32 = 0.3;
/// On the templates (leave-one-out) the patch must at least halve the error of a
/// displaced point to be used.
const MAX_CHECK_RATIO: f64 = 0.5;

/// One landmark's template patch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LandmarkPatch {
    /// Pixels per feature cell (rows, columns) of the scale the patch is sampled at.
    pub cell_px: [f64; 2],
    /// Half-size in those pixels (rows, columns): the patch is (2r+1) × (2c+1).
    pub radius: [usize; 2],
    /// Mean of the templates' zero-mean, unit-norm patches, row-major.
    pub mean: Vec<f32>,
    /// How many templates went into the mean.
    pub templates: usize,
}

/// Where the patch matched best, and how well.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Match {
    pub point: (f64, f64),
    /// Mean correlation with the template patches, in −1..1.
    pub correlation: f32,
}

/// One template's view of one landmark: its normalised slice, the slice's pixels per
/// feature cell (rows, columns), and the landmark (row, column).
#[derive(Clone, Copy)]
pub struct TemplateView<'a> {
    pub pixels: &'a Array2<f32>,
    pub cell_px: (f64, f64),
    pub point: (f64, f64),
}

impl LandmarkPatch {
    /// The mean patch of the templates that show the landmark; None when none does or
    /// every patch is flat.
    pub fn fit(views: &[TemplateView]) -> Option<LandmarkPatch> {
        let first = views.first()?;
        let cell_px = [first.cell_px.0, first.cell_px.1];
        if !(cell_px.iter().all(|c| c.is_finite() && *c > 0.0)) {
            return None;
        }
        let radius = [
            (PATCH_CELLS * cell_px[0]).round().max(1.0) as usize,
            (PATCH_CELLS * cell_px[1]).round().max(1.0) as usize,
        ];
        let mut mean = vec![0f32; (2 * radius[0] + 1) * (2 * radius[1] + 1)];
        let mut templates = 0;
        for v in views {
            let step = (v.cell_px.0 / cell_px[0], v.cell_px.1 / cell_px[1]);
            let Some(p) = zero_mean_unit(sample(v.pixels, v.point, step, radius)) else {
                continue;
            };
            mean.iter_mut().zip(&p).for_each(|(m, x)| *m += x);
            templates += 1;
        }
        if templates == 0 {
            return None;
        }
        mean.iter_mut().for_each(|m| *m /= templates as f32);
        Some(LandmarkPatch {
            cell_px,
            radius,
            mean,
            templates,
        })
    }

    /// Like `fit`, but only when the patch proves itself on the templates: each template in
    /// turn is the target, its landmark displaced by 1 and 2 cells in 8 directions, and
    /// the other templates' patch must at least halve its mean error (leave-one-out; so a
    /// landmark whose look varies too much between patients, or that sits on a straight
    /// edge the patch can slide along, keeps the adapter's point).
    /// Also returns the mean error before and after, in cells, when it could be checked.
    pub fn fit_checked(views: &[TemplateView]) -> (Option<LandmarkPatch>, Option<(f64, f64)>) {
        let check = cross_check(views);
        match check {
            Some((before, after)) if after <= MAX_CHECK_RATIO * before => {
                (LandmarkPatch::fit(views), check)
            }
            _ => (None, check),
        }
    }

    /// A patch that is not what `fit` makes (hand-edited or damaged file).
    pub fn is_valid(&self) -> bool {
        // The search window follows from cell_px: bounded like the patch.
        self.cell_px
            .iter()
            .all(|c| c.is_finite() && *c > 0.0 && SEARCH_CELLS * c <= 4096.0)
            && self.radius.iter().all(|r| *r > 0 && *r <= 4096)
            && self.mean.len() == (2 * self.radius[0] + 1) * (2 * self.radius[1] + 1)
            && self.mean.iter().all(|v| v.is_finite())
    }

    /// The best match within the search radius of `point` in a normalised slice with
    /// `cell_px` pixels per feature cell.
    pub fn best_match(
        &self,
        pixels: &Array2<f32>,
        cell_px: (f64, f64),
        point: (f64, f64),
    ) -> Option<Match> {
        if !self.is_valid() || pixels.is_empty() {
            return None;
        }
        let step = (cell_px.0 / self.cell_px[0], cell_px.1 / self.cell_px[1]);
        if !(step.0.is_finite() && step.1.is_finite() && step.0 > 0.0 && step.1 > 0.0) {
            return None;
        }
        let [pr, pc] = self.radius;
        let (sr, sc) = (
            (SEARCH_CELLS * self.cell_px[0]).round() as usize,
            (SEARCH_CELLS * self.cell_px[1]).round() as usize,
        );
        let (hr, hc) = (pr + sr, pc + sc);
        let region = sample(pixels, point, step, [hr, hc]);
        let (rw, pw) = (2 * hc + 1, 2 * pc + 1);
        let n = ((2 * pr + 1) * pw) as f64;
        // Summed-area tables of the region and its square for each window's norm.
        let (ar, ac) = (2 * hr + 2, 2 * hc + 2);
        let mut s1 = vec![0f64; ar * ac];
        let mut s2 = vec![0f64; ar * ac];
        for r in 0..2 * hr + 1 {
            for c in 0..rw {
                let v = region[r * rw + c] as f64;
                let i = (r + 1) * ac + c + 1;
                s1[i] = v + s1[i - 1] + s1[i - ac] - s1[i - ac - 1];
                s2[i] = v * v + s2[i - 1] + s2[i - ac] - s2[i - ac - 1];
            }
        }
        let window = |t: &[f64], r: usize, c: usize| {
            let (r1, c1) = (r + 2 * pr + 1, c + 2 * pc + 1);
            t[r1 * ac + c1] - t[r * ac + c1] - t[r1 * ac + c] + t[r * ac + c]
        };
        let mut best: Option<(f32, usize, usize)> = None;
        for r in 0..=2 * sr {
            for c in 0..=2 * sc {
                let (a, b) = (window(&s1, r, c), window(&s2, r, c));
                let var = b - a * a / n;
                if var <= 1e-9 * n {
                    continue;
                }
                let mut dot = 0f32;
                for i in 0..2 * pr + 1 {
                    let row = &region[(r + i) * rw + c..(r + i) * rw + c + pw];
                    let tpl = &self.mean[i * pw..(i + 1) * pw];
                    dot += row.iter().zip(tpl).map(|(x, y)| x * y).sum::<f32>();
                }
                let corr = (dot as f64 / var.sqrt()) as f32;
                if best.is_none_or(|(b, _, _)| corr > b) {
                    best = Some((corr, r, c));
                }
            }
        }
        let (correlation, r, c) = best?;
        Some(Match {
            point: (
                point.0 + (r as f64 - sr as f64) * step.0,
                point.1 + (c as f64 - sc as f64) * step.1,
            ),
            correlation,
        })
    }

    /// `point` moved to the best match when that match is convincing, else unchanged.
    pub fn refine(
        &self,
        pixels: &Array2<f32>,
        cell_px: (f64, f64),
        point: (f64, f64),
    ) -> (f64, f64) {
        match self.best_match(pixels, cell_px, point) {
            Some(m) if m.correlation >= MIN_CORRELATION => m.point,
            _ => point,
        }
    }
}

/// Leave-one-template-out errors (before, after refinement; mean, in cells) of
/// `LandmarkPatch::fit_checked`; None with fewer than two templates.
fn cross_check(views: &[TemplateView]) -> Option<(f64, f64)> {
    if views.len() < 2 {
        return None;
    }
    let (mut before, mut after, mut n) = (0.0, 0.0, 0usize);
    for (i, target) in views.iter().enumerate() {
        let others: Vec<TemplateView> = views
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, v)| *v)
            .collect();
        let Some(p) = LandmarkPatch::fit(&others) else {
            continue;
        };
        let (cr, cc) = target.cell_px;
        for cells in [1.0, 2.0] {
            for k in 0..8 {
                let a = k as f64 * std::f64::consts::FRAC_PI_4;
                let (dr, dc) = (cells * a.sin(), cells * a.cos());
                let start = (target.point.0 + dr * cr, target.point.1 + dc * cc);
                let end = p.refine(target.pixels, target.cell_px, start);
                before += cells;
                after += ((end.0 - target.point.0) / cr).hypot((end.1 - target.point.1) / cc);
                n += 1;
            }
        }
    }
    (n > 0).then(|| (before / n as f64, after / n as f64))
}

/// Moves every found landmark of a slice to where its template patch matches best
/// (`patches`: per label of the adapter, as `found`; `pixels`: the normalised slice).
pub fn refine_findings(
    found: &mut [Option<Finding>],
    patches: &[Option<LandmarkPatch>],
    pixels: &Array2<f32>,
    fm: &FeatureMap,
) {
    let cell_px = cell_px((fm.image_rows, fm.image_columns), fm.grid());
    for (f, p) in found.iter_mut().zip(patches) {
        if let (Some(f), Some(p)) = (f, p) {
            f.point = p.refine(pixels, cell_px, f.point);
        }
    }
}

/// Pixels per feature cell (rows, columns) of a slice of `image` pixels on a `grid`.
pub fn cell_px(image: (usize, usize), grid: (usize, usize)) -> (f64, f64) {
    (
        image.0 as f64 / grid.0.max(1) as f64,
        image.1 as f64 / grid.1.max(1) as f64,
    )
}

/// Bilinear samples of `img` on a (2r+1) × (2c+1) lattice centred on `center` with `step`
/// image pixels between samples; outside the image the border pixel is repeated.
fn sample(img: &Array2<f32>, center: (f64, f64), step: (f64, f64), half: [usize; 2]) -> Vec<f32> {
    let (rows, cols) = img.dim();
    let mut out = Vec::with_capacity((2 * half[0] + 1) * (2 * half[1] + 1));
    if rows == 0 || cols == 0 {
        out.resize((2 * half[0] + 1) * (2 * half[1] + 1), 0.0);
        return out;
    }
    for i in 0..2 * half[0] + 1 {
        let y = center.0 + (i as f64 - half[0] as f64) * step.0;
        for j in 0..2 * half[1] + 1 {
            let x = center.1 + (j as f64 - half[1] as f64) * step.1;
            out.push(crate::image::bilinear_at(img, y, x));
        }
    }
    out
}

fn zero_mean_unit(mut p: Vec<f32>) -> Option<Vec<f32>> {
    let m = p.iter().map(|v| *v as f64).sum::<f64>() / p.len().max(1) as f64;
    p.iter_mut().for_each(|v| *v -= m as f32);
    let norm = p.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    if norm.is_nan() || norm <= 1e-6 {
        return None;
    }
    p.iter_mut().for_each(|v| *v /= norm as f32);
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth random-looking image (sum of sines), so that every window is distinctive.
    fn texture(rows: usize, cols: usize, phase: f64) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |(r, c)| {
            let (r, c) = (r as f64, c as f64);
            ((r * 0.31 + phase).sin() + (c * 0.23 - phase).cos() + (0.11 * r + 0.17 * c).sin())
                as f32
        })
    }

    #[test]
    fn finds_the_template_position_in_a_shifted_copy() {
        let img = texture(128, 128, 0.0);
        let cell = (2.0, 2.0);
        let truth = (60.0, 70.0);
        let p = LandmarkPatch::fit(&[TemplateView {
            pixels: &img,
            cell_px: cell,
            point: truth,
        }])
        .unwrap();
        assert_eq!(p.radius, [6, 6]);
        // The adapter's point is 4 px off; the search (±6 px) brings it back exactly.
        let m = p.best_match(&img, cell, (64.0, 67.0)).unwrap();
        assert!((m.point.0 - truth.0).abs() < 1e-9 && (m.point.1 - truth.1).abs() < 1e-9);
        assert!(m.correlation > 0.999, "{m:?}");
        assert_eq!(p.refine(&img, cell, (64.0, 67.0)), truth);
    }

    #[test]
    fn compares_in_cell_units_across_matrix_sizes() {
        // The template is the target at half the resolution: 1 px per cell vs 2.
        let big = texture(128, 128, 0.4);
        let small = crate::image::resize_bilinear(&big, 64, 64);
        let p = LandmarkPatch::fit(&[TemplateView {
            pixels: &small,
            cell_px: (1.0, 1.0),
            point: (30.0, 25.0),
        }])
        .unwrap();
        // (30, 25) in the small image is (60.5, 50.5) in the big one (pixel centres).
        let m = p.best_match(&big, (2.0, 2.0), (56.5, 54.5)).unwrap();
        assert!(
            (m.point.0 - 60.5).abs() <= 2.0 && (m.point.1 - 50.5).abs() <= 2.0,
            "{m:?}"
        );
        assert!(m.correlation > 0.9, "{m:?}");
    }

    #[test]
    fn an_unconvincing_match_leaves_the_point_alone() {
        let tpl = texture(96, 96, 0.0);
        let p = LandmarkPatch::fit(&[TemplateView {
            pixels: &tpl,
            cell_px: (2.0, 2.0),
            point: (40.0, 40.0),
        }])
        .unwrap();
        // A flat target has no correlation anywhere; noise only a chance one.
        let flat = Array2::from_elem((96, 96), 0.5f32);
        assert!(p.best_match(&flat, (2.0, 2.0), (40.0, 40.0)).is_none());
        assert_eq!(p.refine(&flat, (2.0, 2.0), (41.0, 39.0)), (41.0, 39.0));
        let mut state = 7u64;
        let noise = Array2::from_shape_fn((96, 96), |_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        });
        let m = p.best_match(&noise, (2.0, 2.0), (40.0, 40.0)).unwrap();
        assert!(m.correlation < MIN_CORRELATION, "{m:?}");
        assert_eq!(p.refine(&noise, (2.0, 2.0), (40.0, 40.0)), (40.0, 40.0));
    }

    #[test]
    fn flat_templates_and_damaged_patches_are_refused() {
        let flat = Array2::from_elem((64, 64), 1.0f32);
        let view = TemplateView {
            pixels: &flat,
            cell_px: (1.0, 1.0),
            point: (30.0, 30.0),
        };
        assert!(LandmarkPatch::fit(&[view]).is_none());
        let img = texture(64, 64, 0.2);
        let mut p = LandmarkPatch::fit(&[TemplateView {
            pixels: &img,
            cell_px: (1.0, 1.0),
            point: (30.0, 30.0),
        }])
        .unwrap();
        let mut huge = p.clone();
        huge.cell_px = [1e12, 1.0];
        assert!(!huge.is_valid());
        assert!(huge.best_match(&img, (1.0, 1.0), (30.0, 30.0)).is_none());
        p.mean.pop();
        assert!(!p.is_valid());
        assert!(p.best_match(&img, (1.0, 1.0), (30.0, 30.0)).is_none());
        assert_eq!(p.refine(&img, (1.0, 1.0), (31.0, 30.0)), (31.0, 30.0));
    }
}
