//! Structure atlas (issue #7): where each structure lies in the frame of all the
//! adapter's structures, learned from the templates' label maps, used as a prior on the
//! adapter's scores. Pixel features alone do not know a structure's shape: a heart region
//! spills into the upper abdomen or the great vessels where they look alike, a lung mask
//! gets holes at a nodule. The frame is the middle 80 % (10th to 90th percentile of rows
//! and of columns) of the union of the structures — found well where the large ones are
//! (the lungs) — so one structure's place and extent come from the others'.

use ndarray::{Array1, Array2, Array3, ArrayViewMut1, Axis, Zip};
use serde::{Deserialize, Serialize};

use crate::postprocess::Finding;

/// The atlas covers the frame from `LO` to `HI` (0..1 = the 10th to 90th percentile).
const LO: f64 = -1.0;
const HI: f64 = 2.0;
/// Bins per axis of the atlas over `LO..HI`.
const BINS: usize = 96;
/// Gaussian blur of the templates' mean mask, in bins: a few templates' masks, each a
/// hard edge, blurred into a prior that tolerates the next patient's outline.
const BLUR_BINS: f64 = 1.0;
/// The prior never says never or always: a structure larger than every template's can
/// still be found where the adapter is sure of it.
const EPS: f32 = 0.05;
/// Where at most this share of the templates has a structure, or at least 1 − this, the
/// templates agree (with 5 templates: none, or all of them, blurred).
const AGREE: f32 = 0.1;

/// The 10th–90th percentile box of a set of pixels, rows and columns separately.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Frame {
    r0: f64,
    r1: f64,
    c0: f64,
    c1: f64,
}

impl Frame {
    /// The frame of the pixels set in `inside`; None when it covers under 2 pixels along
    /// either axis.
    fn of(inside: &Array2<bool>) -> Option<Frame> {
        let mut per_row = vec![0usize; inside.nrows()];
        let mut per_col = Array1::<usize>::zeros(inside.ncols());
        for (row, n_r) in inside.outer_iter().zip(&mut per_row) {
            Zip::from(&mut per_col)
                .and(&row)
                .for_each(|n_c, &v| *n_c += v as usize);
            *n_r = row.iter().filter(|v| **v).count();
        }
        let (r0, r1) = percentiles(&per_row)?;
        let (c0, c1) = percentiles(&per_col.to_vec())?;
        (r1 - r0 >= 2.0 && c1 - c0 >= 2.0).then_some(Frame { r0, r1, c0, c1 })
    }

    /// Frame coordinates (0..1 across the middle 80 %) of a pixel.
    fn to_frame(self, r: f64, c: f64) -> (f64, f64) {
        (
            (r - self.r0) / (self.r1 - self.r0),
            (c - self.c0) / (self.c1 - self.c0),
        )
    }

    fn to_pixel(self, u: f64, v: f64) -> (f64, f64) {
        (
            self.r0 + u * (self.r1 - self.r0),
            self.c0 + v * (self.c1 - self.c0),
        )
    }
}

/// The 10th and 90th percentile positions of a histogram.
fn percentiles(counts: &[usize]) -> Option<(f64, f64)> {
    let total: usize = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let at = |q: f64| {
        let target = q * total as f64;
        let mut acc = 0usize;
        for (i, n) in counts.iter().enumerate() {
            acc += n;
            if acc as f64 >= target {
                return i as f64;
            }
        }
        (counts.len() - 1) as f64
    };
    Some((at(0.1), at(0.9)))
}

/// Per label, the share of template slices that have it at each place of the frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StructureAtlas {
    pub bins: usize,
    /// Per label, `bins`² values in 0..1, row-major over the frame (rows, then columns).
    pub maps: Vec<Vec<f32>>,
}

impl StructureAtlas {
    /// From the template slices' label maps (`values`: the label value of each structure
    /// in score order); slices without any of the structures are skipped. None when no
    /// slice has a frame.
    pub fn fit<'a>(
        label_maps: impl Iterator<Item = &'a Array2<u8>>,
        values: &[u8],
    ) -> Option<StructureAtlas> {
        let mut maps = vec![vec![0f32; BINS * BINS]; values.len()];
        let mut slices = 0usize;
        for labels in label_maps {
            let (rows, cols) = labels.dim();
            let Some(frame) = Frame::of(&labels.mapv(|v| values.contains(&v))) else {
                continue;
            };
            slices += 1;
            for i in 0..BINS {
                for j in 0..BINS {
                    let (r, c) = frame.to_pixel(bin_centre(i), bin_centre(j));
                    let (r, c) = (r.round(), c.round());
                    if r < 0.0 || c < 0.0 || r >= rows as f64 || c >= cols as f64 {
                        continue;
                    }
                    let v = labels[[r as usize, c as usize]];
                    if let Some(l) = values.iter().position(|x| *x == v) {
                        maps[l][i * BINS + j] += 1.0;
                    }
                }
            }
        }
        if slices == 0 {
            return None;
        }
        for m in &mut maps {
            m.iter_mut().for_each(|v| *v /= slices as f32);
            blur(m, BINS, BLUR_BINS);
            // Rounding must not carry a share past 1: `fits` would refuse the file.
            m.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
        }
        Some(StructureAtlas { bins: BINS, maps })
    }

    /// Whether the atlas describes `labels` structures with values in 0..1.
    pub fn fits(&self, labels: usize) -> bool {
        // A damaged `bins` must not wrap around to the maps' length.
        let Some(cells) = self.bins.checked_mul(self.bins) else {
            return false;
        };
        self.bins >= 2
            && self.maps.len() == labels
            && self.maps.iter().all(|m| {
                m.len() == cells && m.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v))
            })
    }

    /// The first half of the bilinear interpolation between bin centres, for one row of
    /// pixels at bin position (i, fx) — (integer part, fraction) along rows: per bin
    /// column j in −1..=bins (at j + 1), the share of templates with `label` at bin rows i
    /// and i + 1, weighed by 1 − fx and by fx (0 outside the atlas). `share` finishes it.
    fn row_weights(&self, label: usize, (i, fx): (i64, f32), upper: &mut [f32], lower: &mut [f32]) {
        let n = self.bins as i64;
        let m = &self.maps[label];
        let at = |i: i64, j: i64| -> f32 {
            if i < 0 || j < 0 || i >= n || j >= n {
                0.0
            } else {
                m[(i * n + j) as usize]
            }
        };
        for (k, (u, l)) in upper.iter_mut().zip(lower.iter_mut()).enumerate() {
            let j = k as i64 - 1;
            *u = at(i, j) * (1.0 - fx);
            *l = at(i + 1, j) * fx;
        }
    }

    /// The share of templates with a label at bin column position (k − 1, fy) of the row
    /// whose `row_weights` are `upper` and `lower`: bilinear between bin centres; 0 for
    /// k = None, a column outside the atlas (`column`).
    fn share(upper: &[f32], lower: &[f32], (k, fy): (Option<usize>, f32)) -> f32 {
        let Some(k) = k else { return 0.0 };
        upper[k] * (1.0 - fy) + lower[k] * (1.0 - fy) + upper[k + 1] * fy + lower[k + 1] * fy
    }

    /// `share` at each of the row's column positions `ys` (`column`), into `out`. Only
    /// columns that reach a bin with a share in this row are interpolated: elsewhere the
    /// share is 0, as the formula gives, and most of a slice lies outside each structure.
    fn row_shares(upper: &[f32], lower: &[f32], ys: &[(Option<usize>, f32)], out: &mut [f32]) {
        let held = |(u, l): (&f32, &f32)| *u != 0.0 || *l != 0.0;
        let first = upper.iter().zip(lower).position(held);
        let last = upper.iter().zip(lower).rposition(held);
        for (o, &y) in out.iter_mut().zip(ys) {
            *o = match (y.0, first, last) {
                (Some(k), Some(a), Some(b)) if k + 1 >= a && k <= b => Self::share(upper, lower, y),
                _ => 0.0,
            };
        }
    }

    /// Bin column position (j, fy) as `share` takes it: k = j + 1 (bin columns j and j + 1
    /// at k and k + 1 of the row weights), None where either lies outside them.
    fn column(&self, (j, fy): (i64, f32)) -> (Option<usize>, f32) {
        let k = usize::try_from(j + 1)
            .ok()
            .filter(|k| k + 1 < self.bins + 2);
        (k, fy)
    }

    /// Weighs the scores by the prior in the frame of `found` (the structures found
    /// without it), as two independent pieces of evidence: s·p / (s·p + (1−s)(1−p)).
    /// The prior speaks only where the templates agree: p = `EPS` where (almost) none has
    /// the structure, 1 − `EPS` where (almost) all have it, and 0.5 — the scores stay —
    /// in the band where their outlines differ. (A prior following the share itself cut
    /// the lungs' costophrenic recesses, which vary between patients: chest first split,
    /// lungs −0.4 / −1.2 IoU.) Where nothing was found there is no frame, and the scores
    /// stay.
    pub fn apply(&self, scores: &mut Array3<f32>, found: &[Option<Finding>]) {
        let (n, rows, cols) = scores.dim();
        let mut union = Array2::from_elem((rows, cols), false);
        for f in found
            .iter()
            .flatten()
            .filter(|f| f.mask.dim() == (rows, cols))
        {
            Zip::from(&mut union).and(&f.mask).for_each(|u, &m| *u |= m);
        }
        let Some(frame) = Frame::of(&union) else {
            return;
        };
        // Bin positions of every row and column: the frame is axis-aligned.
        let bin = |t: f64| {
            let x = (t - LO) / (HI - LO) * self.bins as f64 - 0.5;
            (x.floor() as i64, (x - x.floor()) as f32)
        };
        let xs: Vec<_> = (0..rows)
            .map(|r| bin(frame.to_frame(r as f64, 0.0).0))
            .collect();
        let ys: Vec<_> = (0..cols)
            .map(|c| self.column(bin(frame.to_frame(0.0, c as f64).1)))
            .collect();
        // The row's half of the interpolation once per row, then each column's prior (NaN
        // in the band where the templates differ) before the scores are weighed by it in
        // one branch-free pass: per pixel and label over the whole slice, the
        // interpolation and the weighing were most of the time this takes.
        let (mut upper, mut lower) = (vec![0f32; self.bins + 2], vec![0f32; self.bins + 2]);
        let mut prior = vec![0f32; cols];
        for l in 0..n.min(self.maps.len()) {
            let mut plane = scores.index_axis_mut(Axis(0), l);
            for (row, &x) in plane.outer_iter_mut().zip(&xs) {
                self.row_weights(l, x, &mut upper, &mut lower);
                Self::row_shares(&upper, &lower, &ys, &mut prior);
                for p in prior.iter_mut() {
                    *p = if *p <= AGREE {
                        EPS
                    } else if *p >= 1.0 - AGREE {
                        1.0 - EPS
                    } else {
                        f32::NAN
                    };
                }
                weigh_row(row, &prior);
            }
        }
    }
}

/// A row of scores, each weighed (`weigh`) by its column's prior, kept where the prior is
/// NaN: one pass without branches, which the compiler vectorises over a contiguous row.
pub(crate) fn weigh_row(mut row: ArrayViewMut1<f32>, prior: &[f32]) {
    let one = |s: &mut f32, &p: &f32| {
        let weighed = weigh(*s, p);
        *s = if p.is_nan() { *s } else { weighed };
    };
    match row.as_slice_mut() {
        Some(row) => row.iter_mut().zip(prior).for_each(|(s, p)| one(s, p)),
        None => row.iter_mut().zip(prior).for_each(|(s, p)| one(s, p)),
    }
}

/// A score s weighed by a prior p as two independent pieces of evidence: s·p / (s·p +
/// (1−s)(1−p)); 0 where both are certain and disagree.
pub(crate) fn weigh(s: f32, p: f32) -> f32 {
    let a = s * p;
    let b = (1.0 - s) * (1.0 - p);
    if a + b > 0.0 {
        a / (a + b)
    } else {
        0.0
    }
}

fn bin_centre(i: usize) -> f64 {
    LO + (i as f64 + 0.5) * (HI - LO) / BINS as f64
}

/// Separable Gaussian blur of an n×n map (zero outside).
fn blur(m: &mut [f32], n: usize, sigma: f64) {
    let radius = (3.0 * sigma).ceil() as i64;
    let kernel: Vec<f32> = (-radius..=radius)
        .map(|d| (-(d * d) as f64 / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let sum: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / sum).collect();
    for pass in 0..2 {
        let src = m.to_vec();
        for i in 0..n {
            for j in 0..n {
                let mut acc = 0f32;
                for (t, k) in kernel.iter().enumerate() {
                    let d = t as i64 - radius;
                    let (a, b) = if pass == 0 {
                        (i as i64 + d, j as i64)
                    } else {
                        (i as i64, j as i64 + d)
                    };
                    if a >= 0 && b >= 0 && (a as usize) < n && (b as usize) < n {
                        acc += k * src[a as usize * n + b as usize];
                    }
                }
                m[i * n + j] = acc;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postprocess::structures;

    /// Two "lungs" side by side and a "heart" low between them; each template shifted a
    /// little, as patients are.
    fn template(shift: usize) -> Array2<u8> {
        let mut m = Array2::<u8>::zeros((64, 64));
        for r in 10 + shift..50 + shift {
            for c in 5..25 {
                m[[r, c]] = 1;
            }
            for c in 37..57 {
                m[[r, c]] = 2;
            }
        }
        for r in 34 + shift..50 + shift {
            for c in 25 + shift..37 {
                m[[r, c]] = 3;
            }
        }
        m
    }

    #[test]
    fn the_atlas_cuts_spill_and_fills_holes() {
        let maps: Vec<Array2<u8>> = (0..3).map(template).collect();
        let atlas = StructureAtlas::fit(maps.iter(), &[1, 2, 3]).expect("an atlas");
        assert!(atlas.fits(3));
        // The target: template 1's anatomy; the heart's scores have a hole and spill
        // down into what would be the abdomen, connected to it.
        let truth = template(1);
        let mut scores = Array3::<f32>::zeros((3, 64, 64));
        for ((r, c), v) in truth.indexed_iter() {
            if *v > 0 {
                scores[[*v as usize - 1, r, c]] = 0.9;
            }
        }
        for r in 40..45 {
            for c in 29..33 {
                scores[[2, r, c]] = 0.3;
            }
        }
        for r in 51..62 {
            for c in 28..34 {
                scores[[2, r, c]] = 0.7;
            }
        }
        let heart = |found: &[Option<Finding>]| {
            let m = &found[2].as_ref().expect("a heart").mask;
            let hole = (40..45).all(|r| (29..33).all(|c| m[[r, c]]));
            let spill = (55..62).any(|r| (28..34).any(|c| m[[r, c]]));
            (hole, spill)
        };
        let none = crate::convex::Outlines::default();
        let plain = structures(&mut scores.clone(), None, None, None, false, none, None);
        assert_eq!(
            heart(&plain),
            (false, true),
            "the hole and the spill are there"
        );
        let with = structures(&mut scores, None, Some(&atlas), None, false, none, None);
        assert_eq!(heart(&with), (true, false), "filled and cut");
        // The lungs the adapter was sure of stay as they were.
        for l in 0..2 {
            assert_eq!(
                plain[l].as_ref().map(|f| &f.mask),
                with[l].as_ref().map(|f| &f.mask)
            );
        }
    }

    /// The bilinear share between bin centres of an n×n `map` at bin position (i, fx),
    /// (j, fy), pixel by pixel (0 outside the atlas).
    fn per_pixel(map: &[f32], n: usize, (i, fx): (i64, f32), (j, fy): (i64, f32)) -> f32 {
        let n = n as i64;
        let at = |i: i64, j: i64| {
            if i < 0 || j < 0 || i >= n || j >= n {
                0.0
            } else {
                map[(i * n + j) as usize]
            }
        };
        at(i, j) * (1.0 - fx) * (1.0 - fy)
            + at(i + 1, j) * fx * (1.0 - fy)
            + at(i, j + 1) * (1.0 - fx) * fy
            + at(i + 1, j + 1) * fx * fy
    }

    /// Interpolated in two halves (per row, then per pixel), a share has the bits of the
    /// bilinear formula evaluated per pixel, inside the atlas, on its edges and outside,
    /// beside and between bins with no share.
    #[test]
    fn shares_interpolated_row_by_row_equal_the_per_pixel_formula() {
        let bins = 8usize;
        let mut rng = crate::adapter::Rng::new(4);
        // Zero in bin rows 0 and 5, bin columns 0, 1 and 6, and at random cells.
        let map: Vec<f32> = (0..bins * bins)
            .map(|k| {
                let (i, j) = (k / bins, k % bins);
                let v = rng.uniform();
                let empty = [0, 5].contains(&i) || [0, 1, 6].contains(&j) || v < 0.2;
                if empty {
                    0.0
                } else {
                    v
                }
            })
            .collect();
        let per_pixel = |i, j| per_pixel(&map, bins, i, j);
        let atlas = StructureAtlas {
            bins,
            maps: vec![map.clone()],
        };
        let (mut upper, mut lower) = (vec![0f32; bins + 2], vec![0f32; bins + 2]);
        let fractions = [0.0, 0.37, 0.5, 0.999];
        let positions: Vec<(i64, f32)> = (-3..bins as i64 + 3)
            .flat_map(|j| fractions.map(|fy| (j, fy)))
            .collect();
        let ys: Vec<_> = positions.iter().map(|&y| atlas.column(y)).collect();
        let mut shares = vec![0f32; ys.len()];
        let mut nonzero = 0;
        for i in -3..bins as i64 + 3 {
            for fx in fractions {
                atlas.row_weights(0, (i, fx), &mut upper, &mut lower);
                StructureAtlas::row_shares(&upper, &lower, &ys, &mut shares);
                for (&two_halves, &(j, fy)) in shares.iter().zip(&positions) {
                    let formula = per_pixel((i, fx), (j, fy));
                    assert_eq!(
                        two_halves.to_bits(),
                        formula.to_bits(),
                        "{i}+{fx}, {j}+{fy}"
                    );
                    nonzero += (formula != 0.0) as usize;
                }
            }
        }
        assert!(nonzero > 0);
    }

    /// Weighed a row at a time (the frame from the union of the masks, each column's
    /// prior, then one pass over the row), the scores have the bits of the rule applied
    /// pixel by pixel: the frame from the pixels in any mask, the bilinear share at the
    /// pixel, the score weighed by `EPS` or 1 − `EPS` where the templates agree and kept
    /// where they differ.
    #[test]
    fn weighed_row_by_row_the_scores_have_the_bits_of_the_per_pixel_rule() {
        let maps: Vec<Array2<u8>> = (0..3).map(template).collect();
        let atlas = StructureAtlas::fit(maps.iter(), &[1, 2, 3]).expect("an atlas");
        let mut rng = crate::adapter::Rng::new(11);
        let scores = Array3::from_shape_fn((3, 64, 64), |_| rng.uniform());
        // The structures as found in a patient lying lower than the templates.
        let truth = template(7);
        let found = Finding::regions_of(&truth, 3);
        let mut weighed = scores.clone();
        atlas.apply(&mut weighed, &found);
        let (mut per_row, mut per_col) = (vec![0usize; 64], vec![0usize; 64]);
        for ((r, c), v) in truth.indexed_iter() {
            if *v > 0 {
                per_row[r] += 1;
                per_col[c] += 1;
            }
        }
        let (r0, r1) = percentiles(&per_row).expect("rows");
        let (c0, c1) = percentiles(&per_col).expect("columns");
        let frame = Frame { r0, r1, c0, c1 };
        let bin = |t: f64| {
            let x = (t - LO) / (HI - LO) * atlas.bins as f64 - 0.5;
            (x.floor() as i64, (x - x.floor()) as f32)
        };
        let mut cases = [0usize; 3];
        for ((l, r, c), &s) in scores.indexed_iter() {
            let (u, v) = frame.to_frame(r as f64, c as f64);
            let share = per_pixel(&atlas.maps[l], atlas.bins, bin(u), bin(v));
            let (case, expected) = if share <= AGREE {
                (0, weigh(s, EPS))
            } else if share >= 1.0 - AGREE {
                (1, weigh(s, 1.0 - EPS))
            } else {
                (2, s)
            };
            cases[case] += 1;
            assert_eq!(
                weighed[[l, r, c]].to_bits(),
                expected.to_bits(),
                "label {l} at {r},{c}"
            );
        }
        assert!(cases.iter().all(|&n| n > 0), "every case met: {cases:?}");
    }

    #[test]
    fn a_damaged_atlas_is_refused() {
        let maps = [template(0)];
        let atlas = StructureAtlas::fit(maps.iter(), &[1, 2, 3]).expect("an atlas");
        assert!(!atlas.fits(2));
        let mut bad = atlas.clone();
        bad.maps[1][7] = f32::NAN;
        assert!(!bad.fits(3));
        let mut short = atlas.clone();
        short.maps[0].pop();
        assert!(!short.fits(3));
        let wrapped = StructureAtlas {
            bins: 1 << (usize::BITS / 2),
            maps: vec![Vec::new(); 3],
        };
        assert!(!wrapped.fits(3), "bins² wraps to 0 = the maps' length");
        assert!(StructureAtlas::fit([Array2::<u8>::zeros((8, 8))].iter(), &[1]).is_none());
    }
}
