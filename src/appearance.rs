//! The patient's own appearance (issue #7): the templates show how structures look in
//! other patients; the localizer slice shows how they look in this one. Its cells that
//! the adapter is sure of — inside a structure, or beside one and in none — give, per
//! feature channel, this patient's mean inside and outside the structures and their
//! spread (one per channel, pooled). In every slice of the stack, the log-odds of a
//! cell's being in some structure then gains the log-likelihood ratio of those two
//! diagonal Gaussians, weighed by `WEIGHT`; how the gain is shared among the structures
//! stays the adapter's. With a shared spread the ratio is linear in the features
//! (a linear discriminant), so weighing a slice costs one product per channel and cell.
//!
//! Where it helps: a lateral slice of a sagittal spine stack cuts the vertebral bodies
//! near their sides, where the marrow looks unlike the templates' middle slices and the
//! adapter is least sure (spine-mr IoU ≈ 70 at k* ± 20 against 85–89 within). Tried
//! first in throwaway Python on the `litemedsam-hyper` maps with a plain logistic
//! regression (body or not, pools 3 and 9, 3 folds, prototypes from the whole stack):
//! IoU over the stacks 76.2 / 75.3 / 76.9 → 77.5 / 76.0 / 78.2 with `WEIGHT` 0.5 (0.25
//! and 1 gained in every split too, 2 lost in one). As built, from the localizer slice
//! alone, on the shipped spine adapter (`scout eval --folds 3`): the bodies over the
//! stacks 84.07 → 84.37, every split up.

use ndarray::{Array2, Array3, Axis};

use crate::backbone::FeatureMap;

/// A cell whose scores sum to at least this is surely in a structure.
pub const INSIDE: f32 = 0.9;
/// A cell whose scores sum to less than this, within `NEAR` cells of a sure structure
/// cell, is surely beside one: the background the structures must be told from, not the
/// whole slice's.
pub const OUTSIDE: f32 = 0.1;
/// How far (cells, Chebyshev) from a sure structure cell a background cell is counted.
pub const NEAR: usize = 8;
/// Fewer sure cells of either kind than this give no appearance.
pub const LEAST_CELLS: usize = 10;
/// The weight of the log-likelihood ratio, whose channels are far from independent: it is
/// divided by the channels' number over 16 (`CHANNELS_PER_VOTE`) as well.
pub const WEIGHT: f32 = 0.5;
/// Neighbouring channels of an encoder map say much the same: the ratio summed over them
/// counts as one over this many.
pub const CHANNELS_PER_VOTE: f32 = 16.0;

/// This patient's linear discriminant of structure against background, on one map's
/// channels: the log-likelihood ratio of a cell's features is `weights · f + bias`.
#[derive(Debug, Clone, PartialEq)]
pub struct Appearance {
    weights: Vec<f32>,
    bias: f32,
}

impl Appearance {
    /// From a slice's `scores` (labels × h × w, in 0..1) and its feature map on the same
    /// grid. None when the grids differ or the slice has too few sure cells.
    pub fn learn(scores: &Array3<f32>, fm: &FeatureMap) -> Option<Appearance> {
        let (_, h, w) = scores.dim();
        let (channels, fh, fw) = fm.data.dim();
        if (fh, fw) != (h, w) || channels == 0 {
            return None;
        }
        let total = scores.sum_axis(Axis(0));
        let inside: Vec<(usize, usize)> = total
            .indexed_iter()
            .filter(|(_, p)| **p >= INSIDE)
            .map(|(at, _)| at)
            .collect();
        if inside.len() < LEAST_CELLS {
            return None;
        }
        let mut near = Array2::from_elem((h, w), false);
        for &(r, c) in &inside {
            let rows = r.saturating_sub(NEAR)..(r + NEAR + 1).min(h);
            let cols = c.saturating_sub(NEAR)..(c + NEAR + 1).min(w);
            near.slice_mut(ndarray::s![rows, cols]).fill(true);
        }
        let outside: Vec<(usize, usize)> = total
            .indexed_iter()
            .filter(|(at, p)| **p < OUTSIDE && near[*at])
            .map(|(at, _)| at)
            .collect();
        if outside.len() < LEAST_CELLS {
            return None;
        }
        let cells = (inside.len() + outside.len()) as f64;
        // The cells as offsets into a plane, and the planes as one slice: every channel
        // reads the same few thousand cells, and an indexed read per cell cost more than
        // the sums (9 ms of a spine slice's ≈ 12). The channels are shared out over the
        // cores; each one's sums keep their order, so the bits are those of one loop.
        let flat = |at: Vec<(usize, usize)>| -> Vec<usize> {
            at.into_iter().map(|(r, c)| r * w + c).collect()
        };
        let (inside, outside) = (flat(inside), flat(outside));
        let data = fm.data.as_standard_layout();
        let planes = data.as_slice()?;
        let per_channel = crate::adapter::in_parallel(
            planes.chunks_exact(h * w).collect(),
            |_, plane: &[f32]| {
                let mean = |at: &[usize]| {
                    at.iter().map(|&i| plane[i] as f64).sum::<f64>() / at.len() as f64
                };
                let (m1, m0) = (mean(&inside), mean(&outside));
                let squares = |at: &[usize], m: f64| {
                    at.iter()
                        .map(|&i| (plane[i] as f64 - m).powi(2))
                        .sum::<f64>()
                };
                // The floor keeps a channel that is constant over the sure cells from
                // deciding alone.
                let spread = (squares(&inside, m1) + squares(&outside, m0)) / cells + 1e-3;
                // The log-likelihood ratio ((f − m0)² − (f − m1)²) / 2 spread
                // = (m1 − m0) f / spread + (m0² − m1²) / 2 spread.
                (
                    ((m1 - m0) / spread) as f32,
                    (m0 * m0 - m1 * m1) / (2.0 * spread),
                )
            },
        );
        let weights: Vec<f32> = per_channel.iter().map(|p| p.0).collect();
        let bias = per_channel.iter().fold(0f64, |b, p| b + p.1);
        let scale = WEIGHT * CHANNELS_PER_VOTE / channels as f32;
        Some(Appearance {
            weights: weights.iter().map(|w| w * scale).collect(),
            bias: bias as f32 * scale,
        })
    }

    /// Weighs `scores` (labels × h × w, changed in place) by this appearance on `fm`'s
    /// channels: each cell's odds of being in some structure times the likelihood ratio,
    /// shared among the structures as their scores were. A cell scored 0 everywhere
    /// (outside the window the scores were taken in) stays 0; one whose channels are
    /// not those learned from is left as it is.
    pub fn weigh(&self, scores: &mut Array3<f32>, fm: &FeatureMap) {
        let (_, h, w) = scores.dim();
        if fm.data.dim() != (self.weights.len(), h, w) {
            return;
        }
        let total = scores.sum_axis(Axis(0));
        // Only cells with a score are weighed: outside the window a slice was scored
        // within (`window`) there are none, so the ratio is taken over their box alone.
        let scored = total.indexed_iter().filter(|(_, p)| **p > 0.0);
        let Some([r0, r1, c0, c1]) = crate::window::bounds(scored.map(|(at, _)| at)) else {
            return;
        };
        let mut ratio = Array2::from_elem((r1 - r0 + 1, c1 - c0 + 1), self.bias);
        // The box's rows shared out over the cores, each cell summed over the channels in
        // their order (the bits of one loop).
        let band = (r1 - r0 + 1).div_ceil(2).max(1);
        let bands: Vec<_> = ratio
            .axis_chunks_iter_mut(Axis(0), band)
            .enumerate()
            .collect();
        crate::adapter::in_parallel(bands, |_, (i, mut part)| {
            let rows = r0 + i * band..r0 + i * band + part.nrows();
            let cells = ndarray::s![rows, c0..=c1];
            for (plane, &k) in fm.data.outer_iter().zip(&self.weights) {
                part.zip_mut_with(&plane.slice(cells), |r, &f| *r += k * f);
            }
        });
        for ((r, c), &p) in total.indexed_iter() {
            if p <= 0.0 {
                continue;
            }
            let sure = p.clamp(1e-6, 1.0 - 1e-6);
            let odds = (sure / (1.0 - sure)).ln() + ratio[[r - r0, c - c0]];
            let weighed = 1.0 / (1.0 + (-odds).exp());
            scores
                .slice_mut(ndarray::s![.., r, c])
                .mapv_inplace(|s| s * weighed / p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRID: usize = 32;

    /// A deterministic wobble in −0.1..0.1 per channel and cell, so that every spread is
    /// measured, not floored.
    fn wobble(k: usize, r: usize, c: usize) -> f32 {
        (((k * 7 + r * 13 + c * 31) % 17) as f32 / 16.0 - 0.5) * 0.2
    }

    /// A map of three channels on which `body` cells look like this patient's structure
    /// (channel 0 near 1, channel 1 near 0.5) and the rest like its background (near 0);
    /// channel 2 is noise alone.
    fn map(body: impl Fn(usize, usize) -> bool) -> FeatureMap {
        let data = Array3::from_shape_fn((3, GRID, GRID), |(k, r, c)| {
            let inside = body(r, c);
            let level = match (k, inside) {
                (0, true) => 1.0,
                (1, true) => 0.5,
                _ => 0.0,
            };
            level + wobble(k, r, c)
        });
        FeatureMap::new(data, GRID * 4, GRID * 4)
    }

    fn block(r: usize, c: usize) -> bool {
        (8..20).contains(&r) && (10..22).contains(&c)
    }

    /// One label's scores: `inside` on the block, `outside` elsewhere.
    fn scores(inside: f32, outside: f32) -> Array3<f32> {
        Array3::from_shape_fn(
            (1, GRID, GRID),
            |(_, r, c)| {
                if block(r, c) {
                    inside
                } else {
                    outside
                }
            },
        )
    }

    #[test]
    fn the_centre_slices_sure_cells_tip_another_slices_unsure_ones() {
        let centre = map(block);
        let appearance = Appearance::learn(&scores(0.95, 0.02), &centre).expect("learned");
        // Another slice: the structure has moved and the adapter is unsure everywhere
        // near it; cells that look like the patient's structure rise past 0.5, cells that
        // look like its background fall further, and the score 0 (outside the window the
        // scores were taken in) stays 0.
        let moved = |r: usize, c: usize| (10..22).contains(&r) && (12..24).contains(&c);
        let fm = map(moved);
        let mut s = Array3::from_shape_fn((1, GRID, GRID), |(_, r, c)| match (r, c) {
            (0, _) => 0.0,
            _ if moved(r, c) => 0.4,
            _ => 0.45,
        });
        appearance.weigh(&mut s, &fm);
        for ((_, r, c), &v) in s.indexed_iter() {
            if r == 0 {
                assert_eq!(v, 0.0);
            } else if moved(r, c) {
                assert!(v > 0.5, "({r}, {c}) {v}");
            } else {
                assert!(v < 0.45, "({r}, {c}) {v}");
            }
        }
    }

    /// Scores taken within a window (0 outside it) are weighed inside it to the same
    /// bits as the whole slice's scores; scores of 0 everywhere stay 0.
    #[test]
    fn a_window_is_weighed_as_the_whole_slice_is_inside_it() {
        let fm = map(block);
        let appearance = Appearance::learn(&scores(0.95, 0.02), &fm).expect("learned");
        let whole = Array3::from_shape_fn((2, GRID, GRID), |(l, r, c)| {
            0.05 + ((l * 5 + r * 3 + c * 7) % 11) as f32 / 25.0
        });
        let inside = |r: usize, c: usize| (6..21).contains(&r) && (9..30).contains(&c);
        let mut within = whole.clone();
        within.indexed_iter_mut().for_each(|((_, r, c), v)| {
            if !inside(r, c) {
                *v = 0.0;
            }
        });
        // Each cell by the formula, with the same arithmetic in the same order.
        let mut weighed = whole.clone();
        for r in 0..GRID {
            for c in 0..GRID {
                let mut ratio = appearance.bias;
                for (k, w) in appearance.weights.iter().enumerate() {
                    ratio += w * fm.data[[k, r, c]];
                }
                let p: f32 = whole.slice(ndarray::s![.., r, c]).sum();
                let sure = p.clamp(1e-6, 1.0 - 1e-6);
                let odds = (sure / (1.0 - sure)).ln() + ratio;
                let weight = 1.0 / (1.0 + (-odds).exp());
                weighed
                    .slice_mut(ndarray::s![.., r, c])
                    .mapv_inplace(|s| s * weight / p);
            }
        }
        let mut all = whole.clone();
        appearance.weigh(&mut all, &fm);
        assert!(all
            .iter()
            .zip(&weighed)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        appearance.weigh(&mut within, &fm);
        for ((l, r, c), &v) in within.indexed_iter() {
            let expected = if inside(r, c) {
                weighed[[l, r, c]]
            } else {
                0.0
            };
            assert_eq!(v.to_bits(), expected.to_bits(), "({l}, {r}, {c})");
        }
        let mut none = Array3::zeros((2, GRID, GRID));
        appearance.weigh(&mut none, &fm);
        assert!(none.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn the_structures_keep_their_shares_of_a_weighed_cell() {
        let fm = map(block);
        let appearance = Appearance::learn(&scores(0.95, 0.02), &fm).expect("learned");
        let mut s =
            Array3::from_shape_fn((2, GRID, GRID), |(l, _, _)| if l == 0 { 0.3 } else { 0.1 });
        appearance.weigh(&mut s, &fm);
        for r in 0..GRID {
            for c in 0..GRID {
                let (a, b) = (s[[0, r, c]], s[[1, r, c]]);
                // A background cell here falls to 0 (its look is far from the structure's).
                assert!(b == 0.0 || (a / b - 3.0).abs() < 1e-4, "({r}, {c}) {a} {b}");
                assert!(a + b <= 1.0);
                assert_eq!(a + b > 0.4, block(r, c), "({r}, {c}) {a} {b}");
            }
        }
    }

    #[test]
    fn no_appearance_without_enough_sure_cells_or_on_another_grid() {
        let fm = map(block);
        // Nothing sure inside (0.85 < INSIDE).
        assert!(Appearance::learn(&scores(0.85, 0.02), &fm).is_none());
        // Nothing sure outside (0.2 ≥ OUTSIDE).
        assert!(Appearance::learn(&scores(0.95, 0.2), &fm).is_none());
        // Sure outside only far from the structure: nothing counts as its background.
        let far = Array3::from_shape_fn((1, GRID, GRID), |(_, r, c)| {
            if block(r, c) {
                0.95
            } else if r > 20 + NEAR {
                0.0
            } else {
                0.5
            }
        });
        assert!(Appearance::learn(&far, &fm).is_none());
        // Fewer than LEAST_CELLS sure structure cells.
        let few = Array3::from_shape_fn((1, GRID, GRID), |(_, r, c)| {
            if r == 10 && (10..10 + LEAST_CELLS - 1).contains(&c) {
                0.95
            } else {
                0.02
            }
        });
        assert!(Appearance::learn(&few, &fm).is_none());
        // Scores on another grid than the map's.
        let coarse = Array3::from_elem((1, GRID / 2, GRID / 2), 0.95);
        assert!(Appearance::learn(&coarse, &fm).is_none());
        // Learned on three channels, a map of two leaves the scores as they are.
        let appearance = Appearance::learn(&scores(0.95, 0.02), &fm).expect("learned");
        let two = FeatureMap::new(fm.data.slice(ndarray::s![..2, .., ..]).to_owned(), 128, 128);
        let mut s = scores(0.4, 0.45);
        appearance.weigh(&mut s, &two);
        assert_eq!(s, scores(0.4, 0.45));
    }
}
