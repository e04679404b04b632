//! Landmark offset votes. A landmark's region is where the adapter recognises the
//! surroundings of its point, but nothing makes the region centred on the point: at a
//! corner such as the costophrenic angle the lung side is recognised further out than the
//! soft tissue below, and the region's centroid is pulled into the lung. Instead, every
//! cell of the region votes for where it sees the landmark: per landmark, a ridge
//! regression from a cell's standardised features to its offset from the point, fit on
//! the templates' cells near their point (Hough voting with a linear offset model). The
//! cells within that distance of the voted point then vote again until it settles.

use crate::backbone::FeatureMap;
use crate::postprocess::Finding;
use ndarray::{Array1, Array2, ArrayView2, Axis};
use serde::{Deserialize, Serialize};

/// Ridge strengths tried (per sample, on standardised features); the templates choose
/// among them by leaving each template out in turn.
const LAMBDAS: [f64; 6] = [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0];

/// Votes of the cells near the point, at most this many rounds after the region's.
const REVOTES: usize = 10;
/// A round that moves the point less than this (pixels) ends the voting.
const SETTLED_PX: f64 = 0.5;

/// One landmark's offset model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LandmarkVotes {
    /// Pixels: cells within this distance of a template's point were fit, and offsets are
    /// in units of it.
    pub reach: f64,
    /// Per feature column, the weights of the (row, column) offset.
    pub weights: Vec<[f32; 2]>,
    pub bias: [f32; 2],
    /// The ridge strength the templates chose.
    pub lambda: f64,
}

/// Training material of one landmark: standardised feature rows of cells near the point,
/// their offsets to it (pixels, row and column) and which template they come from.
#[derive(Default)]
pub struct Samples {
    pub rows: Vec<Vec<f32>>,
    pub offsets: Vec<[f64; 2]>,
    pub template: Vec<usize>,
}

impl Samples {
    /// Adds the cells of `fm` whose centres lie within `reach` pixels of `point`.
    pub fn add(
        &mut self,
        rows: ArrayView2<f32>,
        fm: &FeatureMap,
        point: (f64, f64),
        reach: f64,
        template: usize,
    ) {
        let (h, w) = fm.grid();
        for i in 0..h {
            for j in 0..w {
                let c = fm.cell_to_pixel(i as f64, j as f64);
                let d = [point.0 - c.0, point.1 - c.1];
                if d[0].hypot(d[1]) <= reach {
                    self.rows.push(rows.row(i * w + j).to_vec());
                    self.offsets.push(d);
                    self.template.push(template);
                }
            }
        }
    }
}

impl LandmarkVotes {
    /// None without cells from at least two templates (the strength could not be chosen).
    pub fn fit(samples: &Samples, reach: f64) -> Option<LandmarkVotes> {
        let mut groups: Vec<usize> = samples.template.clone();
        groups.sort_unstable();
        groups.dedup();
        if groups.len() < 2 || samples.rows.is_empty() {
            return None;
        }
        let all: Vec<usize> = (0..samples.rows.len()).collect();
        // Leave one template out: mean squared offset error on its cells.
        let lambda = LAMBDAS
            .iter()
            .copied()
            .map(|lambda| {
                let mut err = 0.0;
                let mut n = 0usize;
                for &g in &groups {
                    let (train, test): (Vec<usize>, Vec<usize>) =
                        all.iter().partition(|&&k| samples.template[k] != g);
                    let Some(m) = solve(samples, &train, reach, lambda) else {
                        return (lambda, f64::INFINITY);
                    };
                    for k in test {
                        let p = m.offset(samples.rows[k].iter());
                        let o = samples.offsets[k];
                        err += (p[0] - o[0]).powi(2) + (p[1] - o[1]).powi(2);
                        n += 1;
                    }
                }
                (lambda, err / n.max(1) as f64)
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))?;
        log::debug!(
            "votes: {} cells of {} templates, ridge strength {} (left-out error {:.1} px rms)",
            all.len(),
            groups.len(),
            lambda.0,
            lambda.1.sqrt()
        );
        solve(samples, &all, reach, lambda.0)
    }

    /// Whether the model has one finite weight pair per column of `columns` and a
    /// usable reach (a damaged adapter file is refused at load).
    pub fn fits(&self, columns: usize) -> bool {
        self.weights.len() == columns
            && self.reach.is_finite()
            && self.reach > 0.0
            && self
                .weights
                .iter()
                .chain([&self.bias])
                .flatten()
                .all(|v| v.is_finite())
    }

    /// The offset (pixels) from a cell with these standardised features to the landmark.
    fn offset<'a>(&self, row: impl Iterator<Item = &'a f32>) -> [f64; 2] {
        let mut o = [self.bias[0] as f64, self.bias[1] as f64];
        for (x, w) in row.zip(&self.weights) {
            o[0] += (*x * w[0]) as f64;
            o[1] += (*x * w[1]) as f64;
        }
        [o[0] * self.reach, o[1] * self.reach]
    }

    /// Where the cells that `take` accepts (by their centre, image pixels) see the
    /// landmark: the mean of their votes, each weighted by the cell's score. None when it
    /// accepts no cell with a positive score.
    fn vote(
        &self,
        rows: ArrayView2<f32>,
        fm: &FeatureMap,
        scores: ArrayView2<f32>,
        take: impl Fn((f64, f64)) -> bool,
    ) -> Option<(f64, f64)> {
        let (h, w) = fm.grid();
        let (mut sr, mut sc, mut sw) = (0.0, 0.0, 0.0);
        for i in 0..h {
            for j in 0..w {
                let c = fm.cell_to_pixel(i as f64, j as f64);
                if !take(c) {
                    continue;
                }
                let o = self.offset(rows.row(i * w + j).iter());
                let wt = scores[[i, j]].max(0.0) as f64;
                sr += wt * (c.0 + o[0]);
                sc += wt * (c.1 + o[1]);
                sw += wt;
            }
        }
        (sw > 0.0).then(|| (sr / sw, sc / sw))
    }

    /// Where the cells of the region `mask` see the landmark, then, until the point
    /// settles, where the cells within `reach` of it do; None when the region's vote
    /// lies outside the image. The model was fit on the cells
    /// within `reach` of the templates' points; a region's cells are where the adapter
    /// recognises the landmark, which at a corner lies off to one side, and their votes
    /// fall short where they are further out than the fit saw (mean shift on the votes).
    fn locate(
        &self,
        rows: ArrayView2<f32>,
        fm: &FeatureMap,
        mask: &Array2<bool>,
        scores: ArrayView2<f32>,
    ) -> Option<(f64, f64)> {
        // A landmark is not put outside the image (as `postprocess` does not place one
        // there): a vote that lands outside is not taken.
        let inside = |p: &(f64, f64)| {
            p.0 >= -0.5
                && p.1 >= -0.5
                && p.0 <= fm.image_rows as f64 - 0.5
                && p.1 <= fm.image_columns as f64 - 0.5
        };
        let mut p = self
            .vote(rows, fm, scores, |c| in_mask(mask, c))
            .filter(inside)?;
        for _ in 0..REVOTES {
            let near = |c: (f64, f64)| (c.0 - p.0).hypot(c.1 - p.1) <= self.reach;
            let Some(q) = self.vote(rows, fm, scores, near).filter(inside) else {
                break;
            };
            let moved = (q.0 - p.0).hypot(q.1 - p.1);
            p = q;
            if moved < SETTLED_PX {
                break;
            }
        }
        Some(p)
    }
}

/// Whether the pixel nearest to `c` (row, column) lies in `mask`.
fn in_mask(mask: &Array2<bool>, c: (f64, f64)) -> bool {
    let (r, cc) = (c.0.round(), c.1.round());
    r >= 0.0
        && cc >= 0.0
        && mask
            .get((r as usize, cc as usize))
            .copied()
            .unwrap_or(false)
}

/// Ridge regression on the samples `idx`: features centred, offsets in units of `reach`.
fn solve(samples: &Samples, idx: &[usize], reach: f64, lambda: f64) -> Option<LandmarkVotes> {
    let n = idx.len();
    let d = samples.rows.first()?.len();
    if n == 0 {
        return None;
    }
    let x = Array2::from_shape_fn((n, d), |(k, c)| samples.rows[idx[k]][c] as f64);
    let y = Array2::from_shape_fn((n, 2), |(k, c)| samples.offsets[idx[k]][c] / reach);
    let xm: Array1<f64> = x.mean_axis(Axis(0))?;
    let ym: Array1<f64> = y.mean_axis(Axis(0))?;
    let xc = &x - &xm;
    let yc = &y - &ym;
    let mut a = xc.t().dot(&xc);
    for i in 0..d {
        a[[i, i]] += lambda * n as f64;
    }
    let b = xc.t().dot(&yc);
    let wts = cholesky_solve(a, b)?;
    let bias = &ym - &xm.dot(&wts);
    Some(LandmarkVotes {
        reach,
        weights: wts
            .rows()
            .into_iter()
            .map(|r| [r[0] as f32, r[1] as f32])
            .collect(),
        bias: [bias[0] as f32, bias[1] as f32],
        lambda,
    })
}

/// Solves A X = B for a symmetric positive definite A (Cholesky); None if it is not.
fn cholesky_solve(mut a: Array2<f64>, b: Array2<f64>) -> Option<Array2<f64>> {
    let d = a.nrows();
    for j in 0..d {
        let mut s = a[[j, j]];
        for k in 0..j {
            s -= a[[j, k]] * a[[j, k]];
        }
        if s <= 0.0 || !s.is_finite() {
            return None;
        }
        let l = s.sqrt();
        a[[j, j]] = l;
        for i in j + 1..d {
            let mut s = a[[i, j]];
            for k in 0..j {
                s -= a[[i, k]] * a[[j, k]];
            }
            a[[i, j]] = s / l;
        }
    }
    let mut x = b;
    for c in 0..x.ncols() {
        for i in 0..d {
            let mut s = x[[i, c]];
            for k in 0..i {
                s -= a[[i, k]] * x[[k, c]];
            }
            x[[i, c]] = s / a[[i, i]];
        }
        for i in (0..d).rev() {
            let mut s = x[[i, c]];
            for k in i + 1..d {
                s -= a[[k, i]] * x[[k, c]];
            }
            x[[i, c]] = s / a[[i, i]];
        }
    }
    Some(x)
}

/// Moves each found landmark with a region (not one placed without) to where its region's
/// cells vote for it. `rows`: the slice's standardised feature rows; `scores`: the
/// adapter's scores on the grid (labels × h × w).
pub fn refine_findings(
    found: &mut [Option<Finding>],
    votes: &[Option<LandmarkVotes>],
    rows: ArrayView2<f32>,
    fm: &FeatureMap,
    scores: ndarray::ArrayView3<f32>,
) {
    for (l, (f, v)) in found.iter_mut().zip(votes).enumerate() {
        if let (Some(f), Some(v)) = (f, v) {
            if let Some(p) = v.locate(rows, fm, &f.mask, scores.index_axis(Axis(0), l)) {
                f.point = p;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::Rng;

    /// A 16 × 16 grid over a 64 × 64 image whose cells see the offset to `point` (in
    /// units of 5 px: about unit spread, as standardised) in their first two features, beside three of noise: cells × 5 rows.
    fn scene(point: (f64, f64), rng: &mut Rng) -> (FeatureMap, Array2<f32>) {
        scene_seeing(point, f64::INFINITY, rng)
    }

    /// As `scene`, but cells further than `sight` px from the point see it at `sight`.
    fn scene_seeing(point: (f64, f64), sight: f64, rng: &mut Rng) -> (FeatureMap, Array2<f32>) {
        let fm = FeatureMap::new(ndarray::Array3::zeros((5, 16, 16)), 64, 64);
        let rows = Array2::from_shape_fn((256, 5), |(k, c)| {
            let p = fm.cell_to_pixel((k / 16) as f64, (k % 16) as f64);
            let noise = rng.uniform() - 0.5;
            let d = (point.0 - p.0, point.1 - p.1);
            let seen = (sight / d.0.hypot(d.1)).min(1.0);
            match c {
                0 => (d.0 * seen / 5.0) as f32 + 0.05 * noise,
                1 => (d.1 * seen / 5.0) as f32 + 0.05 * noise,
                _ => noise,
            }
        });
        (fm, rows)
    }

    /// The cells within 14 px of the point in three templates' scenes (`scene_seeing`).
    fn template_samples(sight: f64, rng: &mut Rng) -> Samples {
        let mut samples = Samples::default();
        for (t, p) in [(20.0, 30.0), (35.5, 22.0), (28.0, 41.0)]
            .into_iter()
            .enumerate()
        {
            let (fm, rows) = scene_seeing(p, sight, rng);
            samples.add(rows.view(), &fm, p, 14.0, t);
        }
        samples
    }

    #[test]
    fn cells_of_a_lopsided_region_vote_for_the_point() {
        let mut rng = Rng::new(3);
        let samples = template_samples(f64::INFINITY, &mut rng);
        let one = Samples {
            template: vec![0; samples.rows.len()],
            rows: samples.rows.clone(),
            offsets: samples.offsets.clone(),
        };
        assert!(LandmarkVotes::fit(&one, 14.0).is_none(), "one template");
        let votes = LandmarkVotes::fit(&samples, 14.0).expect("a model");
        assert!(votes.fits(5) && !votes.fits(4));
        assert!(votes.lambda <= 1.0, "little noise wants little shrinkage");

        // The target's region lies above its point: the centroid is 6 px too high.
        let point = (32.0, 30.0);
        let (fm, rows) = scene(point, &mut rng);
        let mask = Array2::from_shape_fn((64, 64), |(r, c)| {
            (r as f64) < point.0 && (r as f64 - 26.0).hypot(c as f64 - point.1) <= 8.0
        });
        let mut found = vec![
            Some(Finding {
                label: 0,
                mask: mask.clone(),
                mass: 1.0,
                point: (26.0, 30.0),
                confidence: 1.0,
            }),
            None,
        ];
        let scores = ndarray::Array3::from_elem((2, 16, 16), 1.0f32);
        refine_findings(
            &mut found,
            &[Some(votes.clone()), Some(votes)],
            rows.view(),
            &fm,
            scores.view(),
        );
        let p = found[0].as_ref().unwrap().point;
        assert!(
            (p.0 - point.0).hypot(p.1 - point.1) < 1.0,
            "voted {p:?}, truth {point:?}"
        );
        assert!(found[1].is_none(), "an absent landmark stays absent");
    }

    #[test]
    fn cells_near_the_voted_point_vote_again_until_it_settles() {
        let mut rng = Rng::new(5);
        let votes = LandmarkVotes::fit(&template_samples(14.0, &mut rng), 14.0).expect("a model");

        // Cells further than 14 px see the point only 14 px away: the region, 16-28 px
        // above its point, votes short of it.
        let point = (44.0, 30.0);
        let (fm, rows) = scene_seeing(point, 14.0, &mut rng);
        let mask = Array2::from_shape_fn((64, 64), |(r, c)| {
            (16..=28).contains(&r) && (c as f64 - point.1).abs() <= 6.0
        });
        let scores = ndarray::Array2::from_elem((16, 16), 1.0f32);
        let once = votes
            .vote(rows.view(), &fm, scores.view(), |c| in_mask(&mask, c))
            .expect("a vote");
        assert!(
            point.0 - once.0 > 3.0,
            "the region alone votes short: {once:?}"
        );
        let p = votes
            .locate(rows.view(), &fm, &mask, scores.view())
            .expect("a point");
        assert!(
            (p.0 - point.0).hypot(p.1 - point.1) < 1.0,
            "voted {p:?} (region alone {once:?}), truth {point:?}"
        );
        // A point beyond the image's lower edge: the votes follow it down to the edge,
        // not past it.
        let beyond = (76.0, 30.0);
        let (fm, rows) = scene_seeing(beyond, 14.0, &mut rng);
        let p = votes
            .locate(rows.view(), &fm, &mask, scores.view())
            .expect("a point");
        assert!(
            p.0 > 50.0 && p.0 <= 63.5,
            "voted {p:?} for a point at {beyond:?}"
        );
        let empty = Array2::from_elem((64, 64), false);
        assert!(votes
            .locate(rows.view(), &fm, &empty, scores.view())
            .is_none());
    }
}
