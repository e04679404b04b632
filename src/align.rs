//! Template-to-target alignment (issue #7, idea 3): where would each template's landmarks
//! lie in the target slice if the two bodies differed by a similarity transform?
//!
//! Feature cells of the template and the target are matched by mutual nearest neighbour
//! (cosine) and kept only when distinctive: the best match must be clearly better than the
//! best one away from it, so flat background and repeated structures (one vertebra against
//! its neighbours) do not vote. RANSAC over pairs of matches finds the similarity most
//! matches agree with; the templates' landmarks mapped through it, combined over templates,
//! give a prior position per landmark that knows *which* of several look-alike regions is
//! meant — the adapters' pixel scores do not.

use crate::adapter::Rng;
use crate::backbone::FeatureMap;
use ndarray::{Array2, Axis};
use serde::{Deserialize, Serialize};

/// Distinctiveness: 1 − best similarity must be below this share of 1 − the best similarity
/// outside `EXCLUSION` cells of the best match (Lowe's ratio test on cosine distances).
const RATIO: f32 = 0.8;
/// Cells around the best match that do not count as a competitor: neighbouring cells of
/// a smooth feature map are nearly the same vector.
const EXCLUSION: usize = 2;
/// RANSAC: hypotheses tried, inlier tolerance (in target feature cells), least matches.
const ITERATIONS: usize = 400;
const TOLERANCE_CELLS: f64 = 1.5;
const MIN_INLIERS: usize = 6;
/// An alignment is accepted only if chance explains its inliers this rarely over all
/// hypotheses tried (a-contrario: matches scattered uniformly over the target).
const MAX_FALSE_ALARMS: f64 = 0.01;
/// Plausible change between two localizers: scale and in-plane rotation.
const SCALE_RANGE: (f64, f64) = (0.67, 1.5);
const MAX_ROTATION_DEG: f64 = 30.0;

/// (row, column) in image pixels.
type Point = (f64, f64);
/// A template point and the target point it matched.
type Pair = (Point, Point);

/// q = z·p + t on (row, column) points taken as complex numbers row + i·column:
/// z carries scale and rotation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Similarity {
    pub z: (f64, f64),
    pub t: (f64, f64),
}

impl Similarity {
    pub fn apply(&self, p: (f64, f64)) -> (f64, f64) {
        let (a, b) = self.z;
        (a * p.0 - b * p.1 + self.t.0, b * p.0 + a * p.1 + self.t.1)
    }

    pub fn scale(&self) -> f64 {
        self.z.0.hypot(self.z.1)
    }

    pub fn rotation_deg(&self) -> f64 {
        self.z.1.atan2(self.z.0).to_degrees()
    }

    /// Through two point pairs; None when the template points coincide.
    fn through(p: [(f64, f64); 2], q: [(f64, f64); 2]) -> Option<Similarity> {
        let dp = (p[1].0 - p[0].0, p[1].1 - p[0].1);
        let dq = (q[1].0 - q[0].0, q[1].1 - q[0].1);
        let n = dp.0 * dp.0 + dp.1 * dp.1;
        if n < 1e-9 {
            return None;
        }
        // z = dq / dp in complex arithmetic.
        let z = (
            (dq.0 * dp.0 + dq.1 * dp.1) / n,
            (dq.1 * dp.0 - dq.0 * dp.1) / n,
        );
        Some(Similarity::with_z(z, p[0], q[0]))
    }

    fn with_z(z: (f64, f64), p: (f64, f64), q: (f64, f64)) -> Similarity {
        let zp = (z.0 * p.0 - z.1 * p.1, z.1 * p.0 + z.0 * p.1);
        Similarity {
            z,
            t: (q.0 - zp.0, q.1 - zp.1),
        }
    }

    /// Least squares over point pairs (Umeyama without reflection, in complex form).
    fn fit(pairs: &[Pair]) -> Option<Similarity> {
        let n = pairs.len() as f64;
        if pairs.len() < 2 {
            return None;
        }
        let mean = |f: &dyn Fn(&Pair) -> Point| {
            let s = pairs
                .iter()
                .map(f)
                .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            (s.0 / n, s.1 / n)
        };
        let pm = mean(&|m| m.0);
        let qm = mean(&|m| m.1);
        let (mut num, mut den) = ((0.0, 0.0), 0.0);
        for &(p, q) in pairs {
            let dp = (p.0 - pm.0, p.1 - pm.1);
            let dq = (q.0 - qm.0, q.1 - qm.1);
            // Σ dq · conj(dp)
            num.0 += dq.0 * dp.0 + dq.1 * dp.1;
            num.1 += dq.1 * dp.0 - dq.0 * dp.1;
            den += dp.0 * dp.0 + dp.1 * dp.1;
        }
        (den > 1e-9).then(|| Similarity::with_z((num.0 / den, num.1 / den), pm, qm))
    }

    fn plausible(&self) -> bool {
        let s = self.scale();
        s >= SCALE_RANGE.0 && s <= SCALE_RANGE.1 && self.rotation_deg().abs() <= MAX_ROTATION_DEG
    }
}

/// A template aligned to a target: the transform from template pixels to target pixels,
/// and how many distinctive matches agree with it.
#[derive(Debug, Clone, Copy)]
pub struct Alignment {
    pub transform: Similarity,
    pub inliers: usize,
    pub matches: usize,
}

/// Feature cells as matched: unit vectors (rows) of some cells of a grid pooled to at
/// most `MAX_GRID` cells a side, with each row's cell index (row-major) in the grid.
#[derive(Debug, Clone)]
pub struct Cells {
    unit: Array2<f32>,
    index: Vec<usize>,
    grid: (usize, usize),
    image: (usize, usize),
}

const MAX_GRID: usize = 64;
/// Cells a template keeps: its most distinctive ones (least like anything in its own slice
/// away from themselves). Flat background and repeated structures could not vote anyway;
/// dropping them makes matching 4× cheaper and the template 4× smaller.
const TEMPLATE_CELLS: usize = 1024;

impl Cells {
    pub fn from_map(fm: &FeatureMap) -> Cells {
        let (c, h, w) = fm.data.dim();
        let pool = h.max(w).div_ceil(MAX_GRID).max(1);
        let (gh, gw) = (h.div_ceil(pool), w.div_ceil(pool));
        let mut unit = Array2::<f32>::zeros((gh * gw, c));
        for i in 0..h {
            for j in 0..w {
                let mut row = unit.row_mut((i / pool) * gw + j / pool);
                for ch in 0..c {
                    row[ch] += fm.data[[ch, i, j]];
                }
            }
        }
        for mut r in unit.axis_iter_mut(Axis(0)) {
            let n = r.dot(&r).sqrt().max(1e-12);
            r.mapv_inplace(|v| v / n);
        }
        Cells {
            unit,
            index: (0..gh * gw).collect(),
            grid: (gh, gw),
            image: (fm.image_rows, fm.image_columns),
        }
    }

    /// The `keep` cells least similar to any cell of the same grid outside their own
    /// neighbourhood.
    fn most_distinctive(self, keep: usize) -> Cells {
        if self.index.len() <= keep {
            return self;
        }
        let sim = self.unit.dot(&self.unit.t());
        let mut far: Vec<(f32, usize)> = (0..sim.nrows())
            .map(|i| (self.best_away_from(sim.row(i), self.index[i]), i))
            .collect();
        far.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut rows: Vec<usize> = far.iter().take(keep).map(|f| f.1).collect();
        rows.sort_unstable();
        Cells {
            unit: self.unit.select(Axis(0), &rows),
            index: rows.iter().map(|&r| self.index[r]).collect(),
            grid: self.grid,
            image: self.image,
        }
    }

    /// Best similarity in `row` (one value per cell of this grid) outside `EXCLUSION`
    /// cells of grid cell `center`.
    fn best_away_from(&self, row: ndarray::ArrayView1<f32>, center: usize) -> f32 {
        let w = self.grid.1;
        let (cr, cc) = (center / w, center % w);
        row.iter()
            .zip(&self.index)
            .filter(|(_, &k)| (k / w).abs_diff(cr) > EXCLUSION || (k % w).abs_diff(cc) > EXCLUSION)
            .map(|(&s, _)| s)
            .fold(f32::NEG_INFINITY, f32::max)
    }

    /// Image pixel at the centre of row k's cell.
    fn pixel(&self, k: usize) -> (f64, f64) {
        let (h, w) = self.grid;
        let k = self.index[k];
        (
            ((k / w) as f64 + 0.5) * self.image.0 as f64 / h as f64 - 0.5,
            ((k % w) as f64 + 0.5) * self.image.1 as f64 / w as f64 - 0.5,
        )
    }

    fn cell_size(&self) -> f64 {
        self.image.0 as f64 / self.grid.0 as f64
    }
}

/// A template as an adapter keeps it: the cells of the slice its landmarks were marked
/// on (unit vectors × 127 as i8, base64 in the JSON file) and those landmarks, in that
/// slice's pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlignTemplate {
    pub grid: [usize; 2],
    pub image: [usize; 2],
    pub channels: usize,
    /// Grid cell (row-major) of each kept cell.
    pub cells: Vec<u32>,
    #[serde(with = "base64_i8")]
    pub features: Vec<i8>,
    pub points: Vec<Option<(f64, f64)>>,
}

impl AlignTemplate {
    pub fn new(fm: &FeatureMap, points: Vec<Option<(f64, f64)>>) -> AlignTemplate {
        let cells = Cells::from_map(fm).most_distinctive(TEMPLATE_CELLS);
        AlignTemplate {
            grid: [cells.grid.0, cells.grid.1],
            image: [cells.image.0, cells.image.1],
            channels: cells.unit.ncols(),
            cells: cells.index.iter().map(|&k| k as u32).collect(),
            features: cells
                .unit
                .iter()
                .map(|v| (v * 127.0).round().clamp(-127.0, 127.0) as i8)
                .collect(),
            points,
        }
    }

    /// Checks what a file could get wrong, so that matching never indexes out of range.
    pub fn validate(&self) -> Result<(), String> {
        let grid = self.grid[0].checked_mul(self.grid[1]).unwrap_or(0);
        if grid == 0 || self.image[0] == 0 || self.image[1] == 0 || self.channels == 0 {
            return Err("alignment template with an empty or impossible grid or image".into());
        }
        if let Some(k) = self.cells.iter().find(|&&k| k as usize >= grid) {
            return Err(format!(
                "alignment template names cell {k} of a {}×{} grid",
                self.grid[0], self.grid[1]
            ));
        }
        if Some(self.features.len()) != self.cells.len().checked_mul(self.channels) {
            return Err(format!(
                "alignment template has {} feature values, its {} cells of {} channels need {}",
                self.features.len(),
                self.cells.len(),
                self.channels,
                self.cells.len() * self.channels
            ));
        }
        Ok(())
    }

    fn cells(&self) -> Cells {
        let unit = Array2::from_shape_fn((self.cells.len(), self.channels), |(k, c)| {
            self.features[k * self.channels + c] as f32 / 127.0
        });
        Cells {
            unit,
            index: self.cells.iter().map(|&k| k as usize).collect(),
            grid: (self.grid[0], self.grid[1]),
            image: (self.image[0], self.image[1]),
        }
    }
}

mod base64_i8 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[i8], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = v.iter().map(|&b| b as u8).collect();
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map(|b| b.into_iter().map(|x| x as i8).collect())
            .map_err(serde::de::Error::custom)
    }
}

/// Distinctive mutual nearest neighbours, as (template pixel, target pixel) pairs.
fn matches(template: &Cells, target: &Cells) -> Vec<Pair> {
    if template.unit.ncols() != target.unit.ncols() {
        return Vec::new();
    }
    let sim = template.unit.dot(&target.unit.t());
    let argmax = |v: ndarray::ArrayView1<f32>| {
        v.iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &s)| {
                if s > best.1 {
                    (i, s)
                } else {
                    best
                }
            })
    };
    // Column maxima row by row: the matrix is row-major, a column walk strides memory.
    let mut col_best = vec![(0usize, f32::NEG_INFINITY); sim.ncols()];
    for (i, row) in sim.rows().into_iter().enumerate() {
        for (b, &v) in col_best.iter_mut().zip(row) {
            if v > b.1 {
                *b = (i, v);
            }
        }
    }
    let best_row: Vec<usize> = col_best.iter().map(|b| b.0).collect();
    let mut out = Vec::new();
    for i in 0..sim.nrows() {
        let row = sim.row(i);
        let (j, best) = argmax(row);
        if best_row[j] != i {
            continue;
        }
        let far = target.best_away_from(row, target.index[j]);
        if (1.0 - best) >= RATIO * (1.0 - far) {
            continue;
        }
        out.push((template.pixel(i), target.pixel(j)));
    }
    out
}

/// The similarity most distinctive matches agree with (RANSAC, then least squares on the
/// inliers); None when fewer than `MIN_INLIERS` agree with any plausible one.
pub fn align(template: &Cells, target: &Cells, seed: u64) -> Option<Alignment> {
    let pairs = matches(template, target);
    if pairs.len() < MIN_INLIERS {
        return None;
    }
    let tol = TOLERANCE_CELLS * target.cell_size();
    let inliers = |s: &Similarity| -> Vec<Pair> {
        pairs
            .iter()
            .copied()
            .filter(|&(p, q)| {
                let m = s.apply(p);
                (m.0 - q.0).hypot(m.1 - q.1) <= tol
            })
            .collect()
    };
    let mut rng = Rng::new(seed);
    let mut best: Option<(usize, Similarity)> = None;
    for _ in 0..ITERATIONS {
        let i = rng.below(pairs.len());
        let j = rng.below(pairs.len());
        if i == j {
            continue;
        }
        let Some(s) = Similarity::through([pairs[i].0, pairs[j].0], [pairs[i].1, pairs[j].1])
        else {
            continue;
        };
        if !s.plausible() {
            continue;
        }
        let n = inliers(&s).len();
        if best.is_none_or(|(m, _)| n > m) {
            best = Some((n, s));
        }
    }
    let (_, mut s) = best?;
    for _ in 0..3 {
        let fitted = Similarity::fit(&inliers(&s)).filter(Similarity::plausible)?;
        s = fitted;
    }
    let n = inliers(&s).len();
    let area = (target.image.0 * target.image.1) as f64;
    let p = (std::f64::consts::PI * tol * tol / area).min(1.0);
    // The two matches a hypothesis is drawn through are inliers by construction.
    let false_alarms = ITERATIONS as f64 * binomial_tail(pairs.len() - 2, p, n.saturating_sub(2));
    (n >= MIN_INLIERS && false_alarms < MAX_FALSE_ALARMS).then_some(Alignment {
        transform: s,
        inliers: n,
        matches: pairs.len(),
    })
}

/// P(X ≥ k) for X ~ Binomial(n, p), summed in log space so that no term underflows.
fn binomial_tail(n: usize, p: f64, k: usize) -> f64 {
    if k == 0 || p >= 1.0 {
        return 1.0;
    }
    if p <= 0.0 {
        return 0.0;
    }
    let odds = (p / (1.0 - p)).ln();
    let mut log_term = n as f64 * (1.0 - p).ln();
    let mut tail = 0.0;
    for i in 0..=n {
        if i >= k {
            tail += log_term.exp();
        }
        if i < n {
            log_term += ((n - i) as f64 / (i + 1) as f64).ln() + odds;
        }
    }
    tail.min(1.0)
}

/// Where the templates put each landmark in the target: the inlier-weighted median of
/// the mapped positions, and their spread (floored, since a few templates under-estimate
/// it). None for a landmark no aligned template has.
#[derive(Debug, Clone, PartialEq)]
pub struct Prior {
    pub points: Vec<Option<PriorPoint>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PriorPoint {
    pub point: (f64, f64),
    pub spread: f64,
}

/// Spread floor, in (pooled) target cells.
const SPREAD_FLOOR_CELLS: f64 = 2.0;

impl Prior {
    pub fn estimate(templates: &[AlignTemplate], target: &FeatureMap, seed: u64) -> Prior {
        let target = Cells::from_map(target);
        let n = templates.iter().map(|t| t.points.len()).max().unwrap_or(0);
        let aligned: Vec<(Alignment, &Vec<Option<Point>>)> = templates
            .iter()
            .enumerate()
            .filter_map(|(k, t)| Some((align(&t.cells(), &target, seed ^ k as u64)?, &t.points)))
            .collect();
        let floor = SPREAD_FLOOR_CELLS * target.cell_size();
        let points = (0..n)
            .map(|l| {
                let mapped: Vec<((f64, f64), f64)> = aligned
                    .iter()
                    .filter_map(|(a, pts)| {
                        let p = pts.get(l).copied().flatten()?;
                        Some((a.transform.apply(p), a.inliers as f64))
                    })
                    .collect();
                if mapped.is_empty() {
                    return None;
                }
                let point = (
                    weighted_median(mapped.iter().map(|m| (m.0 .0, m.1)).collect()),
                    weighted_median(mapped.iter().map(|m| (m.0 .1, m.1)).collect()),
                );
                let total: f64 = mapped.iter().map(|m| m.1).sum();
                let var = mapped
                    .iter()
                    .map(|m| m.1 * ((m.0 .0 - point.0).powi(2) + (m.0 .1 - point.1).powi(2)))
                    .sum::<f64>()
                    / total;
                Some(PriorPoint {
                    point,
                    spread: var.sqrt().max(floor),
                })
            })
            .collect();
        Prior { points }
    }
}

fn weighted_median(mut v: Vec<(f64, f64)>) -> f64 {
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let half = v.iter().map(|x| x.1).sum::<f64>() / 2.0;
    let mut acc = 0.0;
    for &(x, w) in &v {
        acc += w;
        if acc >= half {
            return x;
        }
    }
    v.last().map_or(0.0, |x| x.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    /// Random, distinctive cell features on a 32×32 grid over a 128×128 image.
    fn random_map(rng: &mut Rng) -> FeatureMap {
        FeatureMap::new(
            Array3::from_shape_fn((16, 32, 32), |_| rng.normal()),
            128,
            128,
        )
    }

    #[test]
    fn similarity_through_two_pairs_and_least_squares_agree() {
        let truth = Similarity::with_z(
            (1.1 * 0.2f64.cos(), 1.1 * 0.2f64.sin()),
            (0.0, 0.0),
            (5.0, -3.0),
        );
        let ps = [(0.0, 0.0), (10.0, 3.0), (-4.0, 8.0), (7.0, -6.0)];
        let pairs: Vec<_> = ps.iter().map(|&p| (p, truth.apply(p))).collect();
        let s = Similarity::through([pairs[0].0, pairs[1].0], [pairs[0].1, pairs[1].1]).unwrap();
        let f = Similarity::fit(&pairs).unwrap();
        for t in [s, f] {
            assert!((t.scale() - 1.1).abs() < 1e-9, "{t:?}");
            assert!(
                (t.rotation_deg() - 0.2f64.to_degrees()).abs() < 1e-9,
                "{t:?}"
            );
            let q = t.apply((2.0, 2.0));
            let e = truth.apply((2.0, 2.0));
            assert!((q.0 - e.0).abs() < 1e-9 && (q.1 - e.1).abs() < 1e-9);
        }
        assert!(Similarity::through([(1.0, 1.0); 2], [(0.0, 0.0), (1.0, 1.0)]).is_none());
    }

    #[test]
    fn a_shifted_target_is_found_and_landmarks_follow() {
        let mut rng = Rng::new(7);
        let template = random_map(&mut rng);
        // The target shows the same body 3 cells lower and 2 cells left; what enters
        // the field of view is new.
        let mut target = random_map(&mut rng);
        let (di, dj) = (3usize, 2usize);
        for i in 0..32 - di {
            for j in dj..32 {
                for c in 0..16 {
                    target.data[[c, i + di, j - dj]] = template.data[[c, i, j]];
                }
            }
        }
        let a = align(&Cells::from_map(&template), &Cells::from_map(&target), 1).expect("aligned");
        let cell = 4.0;
        let t = a.transform;
        assert!(
            (t.scale() - 1.0).abs() < 1e-6 && t.rotation_deg().abs() < 1e-6,
            "{t:?}"
        );
        assert!((t.t.0 - di as f64 * cell).abs() < 1e-6 && (t.t.1 + dj as f64 * cell).abs() < 1e-6);
        assert!(a.inliers > 500, "{a:?}");

        let landmarks = vec![Some((40.0, 60.0)), None];
        let t = AlignTemplate::new(&template, landmarks);
        // What an adapter file holds comes back the same.
        let json = serde_json::to_string(&t).unwrap();
        let back: AlignTemplate = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        back.validate().unwrap();
        let prior = Prior::estimate(&[t.clone(), back], &target, 3);
        let p = prior.points[0].expect("prior");
        assert!(
            (p.point.0 - 52.0).abs() < 1e-6 && (p.point.1 - 52.0).abs() < 1e-6,
            "{p:?}"
        );
        assert_eq!(p.spread, 2.0 * cell);
        let broken = AlignTemplate {
            features: vec![0; 5],
            ..t.clone()
        };
        assert!(broken.validate().unwrap_err().contains("feature values"));
        let huge = AlignTemplate {
            grid: [usize::MAX, 2],
            ..t
        };
        assert!(huge.validate().unwrap_err().contains("impossible"));
        assert_eq!(prior.points[1], None);
    }

    #[test]
    fn large_grids_are_pooled_and_templates_keep_their_most_distinctive_cells() {
        let mut rng = Rng::new(3);
        let mut fm = FeatureMap::new(Array3::from_shape_fn((4, 128, 96), |_| 1.0), 256, 192);
        // One distinctive 2×2 block (pooled cell (10, 20)); the rest is uniform noise-free.
        for c in 0..4 {
            for (i, j) in [(20, 40), (20, 41), (21, 40), (21, 41)] {
                fm.data[[c, i, j]] = rng.normal();
            }
        }
        let t = AlignTemplate::new(&fm, vec![]);
        assert_eq!((t.grid, t.image, t.channels), ([64, 48], [256, 192], 4));
        assert_eq!(t.cells.len(), TEMPLATE_CELLS);
        assert!(t.cells.contains(&(10 * 48 + 20)));
        t.validate().unwrap();
        // Cell 0 covers pixels 0..4: its centre is pixel 1.5.
        let cells = AlignTemplate {
            cells: vec![0],
            features: vec![0; 4],
            ..t
        }
        .cells();
        assert_eq!(cells.pixel(0), (1.5, 1.5));
    }

    #[test]
    fn binomial_tail_matches_direct_sums() {
        assert_eq!(binomial_tail(10, 0.3, 0), 1.0);
        let direct: f64 = (3..=4).map(|i| [4.0, 1.0][i - 3] * 0.5f64.powi(4)).sum();
        assert!((binomial_tail(4, 0.5, 3) - direct).abs() < 1e-12);
        assert!(binomial_tail(200, 0.01, 40) < 1e-30);
        // (1 − p)^n alone underflows here; the tail is still about one half.
        let t = binomial_tail(4000, 0.2, 800);
        assert!((t - 0.5).abs() < 0.05, "{t}");
    }

    #[test]
    fn unrelated_images_do_not_align() {
        let mut rng = Rng::new(11);
        let a = random_map(&mut rng);
        let b = random_map(&mut rng);
        let (ca, cb) = (Cells::from_map(&a), Cells::from_map(&b));
        let al = align(&ca, &cb, 1);
        assert!(
            al.is_none(),
            "{al:?} of {} matches",
            matches(&ca, &cb).len()
        );
        let prior = Prior::estimate(&[AlignTemplate::new(&a, vec![Some((1.0, 1.0))])], &b, 1);
        assert_eq!(prior.points, vec![None]);
    }
}
