//! Enclosed structures (issue #7, idea 3 for masks): a structure that lies between others
//! — the heart between the lungs — is placed also by where the templates have it, in a
//! frame that the structures around it place on the target. Where no edge shows where a
//! structure ends (the heart's top on the great vessels, its bottom on the diaphragm), the
//! adapter's scores spill or stop short; the structures around it are found well and say
//! where its outline should run.
//!
//! The templates' slices k* are brought into one frame per enclosed structure: each
//! template's outlines of the other structures (`RAYS` points each: the farthest pixel of
//! the mask along rays from its centroid at equal angles) are mapped onto their mean by an
//! affine map (least squares, the mean taken twice); the frame keeps that mean outline and,
//! on a `GRID` × `GRID` grid over it, the share of templates that have the enclosed
//! structure at each place. Only these aggregates are kept, no template's own mask or
//! outline (the data sets' annotations are not redistributable). At inference an affine
//! map takes the frame's outline onto the outlines of the structures found; the share,
//! mapped through it, is a prior that weighs the scores as the atlas's prior does. A
//! structure counts as enclosed when, in every template, its centroid lies inside the
//! convex hull of the other structures' outlines: there the map interpolates; a structure
//! beside the others (a lung beside the heart and the other lung) would be extrapolated
//! to, which cost the lungs 4–8 IoU when measured. Where a structure's own edges show (the
//! vertebral bodies between their neighbours), the frame's blurred share pulled them off:
//! spine bodies −2 to −7 IoU, so the option is the chest adapter's alone.
//!
//! Five templates' shares stop where the largest of their structures stops: outside it
//! the prior is `EPS`, and a heart wider against the lungs than every template's is cut
//! back to theirs. On chest-xr the third split's templates (JPCLN011–015) have the
//! smallest hearts of the three (0.28 of the lungs' area, against 0.35 and 0.29; 0.30 over
//! the data set), and its largest test hearts came out at 0.84 of their area. With
//! `SIZES` each template's structure enters the share at five scales about its centroid,
//! from 0.8 to 1.2: the share tapers off outside the templates' outlines instead of
//! stopping there.

use ndarray::{Array2, Array3, Axis};
use serde::{Deserialize, Serialize};

use crate::postprocess::Finding;

/// Outline points per structure.
const RAYS: usize = 64;
/// Cells per side of the grid a frame's share is kept on.
const GRID: usize = 128;
/// The prior never says never or always (as the atlas's).
const EPS: f32 = 0.05;
/// With `sizes` (`TrainConfig::enclosed_sizes`), the scales about its centroid at which
/// each template's structure enters the share: a heart's width against the chest (the
/// cardiothoracic ratio) runs from under 0.4 to over 0.5 between healthy adults and more
/// with an enlarged heart, a fifth either way of its mean, which five templates do not
/// show. Equal steps of a tenth keep the share a staircase of the templates' outlines.
pub const SIZES: [f32; 5] = [0.8, 0.9, 1.0, 1.1, 1.2];

/// A point in image coordinates normalised to 0..1 (row, column), so templates and targets
/// of other sizes compare.
type Point = [f32; 2];

/// One template's slice k*: per structure (score order) its mask and its outline (empty
/// where the template does not have it). Used while training only, never saved.
struct TemplateSlice {
    masks: Vec<Array2<bool>>,
    outlines: Vec<Vec<Point>>,
}

/// The templates' frame for one enclosed structure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnclosedFrame {
    /// The structures around it (score order) whose outlines place the frame.
    pub around: Vec<usize>,
    /// Their mean outlines in the frame, `RAYS` points per structure of `around`, in order.
    pub outline: Vec<Point>,
    /// Per cell of the `grid` × `grid` grid over the frame (0..1 both ways, row-major),
    /// the share of templates that have the structure there (of the templates' structures
    /// at each scale of `SIZES`, when fitted with them).
    pub share: Vec<f32>,
}

/// Per structure, its frame when it is enclosed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnclosedModel {
    pub grid: usize,
    pub frames: Vec<Option<EnclosedFrame>>,
}

impl EnclosedModel {
    /// From the templates' label maps of slice k* (`values`: each structure's label value
    /// in score order), each template's enclosed structure taken at every scale of `sizes`
    /// about its centroid (`[1.0]`: as drawn; `SIZES`). None when no structure is
    /// enclosed: the file stays as it was.
    pub fn fit<'a>(
        label_maps: impl Iterator<Item = &'a Array2<u8>>,
        values: &[u8],
        sizes: &[f32],
    ) -> Option<EnclosedModel> {
        let templates: Vec<TemplateSlice> = label_maps
            .map(|labels| {
                let masks: Vec<Array2<bool>> =
                    values.iter().map(|v| labels.mapv(|x| x == *v)).collect();
                let outlines = masks.iter().map(outline).collect();
                TemplateSlice { masks, outlines }
            })
            .collect();
        let frames: Vec<Option<EnclosedFrame>> = (0..values.len())
            .map(|l| {
                // The structures every template has besides this one.
                let around: Vec<usize> = (0..values.len())
                    .filter(|&k| k != l && templates.iter().all(|t| !t.outlines[k].is_empty()))
                    .collect();
                let enclosed = !templates.is_empty()
                    && templates.iter().all(|t| {
                        let points: Vec<Point> =
                            around.iter().flat_map(|&k| t.outlines[k].clone()).collect();
                        centroid(&t.masks[l]).is_some_and(|c| inside_hull(c, &points))
                    });
                enclosed
                    .then(|| frame(&templates, l, around, sizes))
                    .flatten()
            })
            .collect();
        frames
            .iter()
            .any(Option::is_some)
            .then_some(EnclosedModel { grid: GRID, frames })
    }

    /// Whether the model describes `labels` structures with whole outlines and grids.
    pub fn fits(&self, labels: usize) -> bool {
        let Some(cells) = self.grid.checked_mul(self.grid) else {
            return false;
        };
        self.grid >= 2
            && self.frames.len() == labels
            && self.frames.iter().enumerate().all(|(l, f)| {
                f.as_ref().is_none_or(|f| {
                    !f.around.is_empty()
                        && f.around.iter().all(|&k| k < labels && k != l)
                        && f.outline.len() == f.around.len() * RAYS
                        && f.outline.iter().flatten().all(|v| v.is_finite())
                        && f.share.len() == cells
                        && f.share.iter().all(|v| (0.0..=1.0).contains(v))
                })
            })
    }

    /// Weighs the scores of each enclosed structure by its frame's share, mapped through
    /// the structures `found` around it, as independent evidence: s·p / (s·p + (1−s)(1−p)),
    /// p kept within `EPS`..1 − `EPS`. Only when every structure of the frame was found
    /// with a region of its own; else the scores stay. Returns whether any changed.
    pub fn apply(&self, scores: &mut Array3<f32>, found: &[Option<Finding>]) -> bool {
        let (n, rows, cols) = scores.dim();
        let mut changed = false;
        let mut prior = vec![0f32; cols];
        for (l, frame) in self.frames.iter().enumerate().take(n) {
            let Some((frame, (forward, back))) = frame.as_ref().zip(self.placement(l, found))
            else {
                continue;
            };
            // Outside the mapped grid's box the prior is `EPS`: only the pixels inside it
            // are sampled (the shipped heart frame's box: 23 % of the frame).
            let box_of = mapped_box(&forward, &frame.share, self.grid);
            let pixel = |t: f32, n: usize| (t * n as f32).floor().clamp(0.0, n as f32) as usize;
            let (r0, r1, c0, c1) = box_of.map_or((0, 0, 0, 0), |[y0, y1, x0, x1]| {
                // One pixel more each way: bilinear sampling reaches half a cell out.
                (
                    pixel(y0, rows).saturating_sub(1),
                    (pixel(y1, rows) + 2).min(rows),
                    pixel(x0, cols).saturating_sub(1),
                    (pixel(x1, cols) + 2).min(cols),
                )
            });
            let mut plane = scores.index_axis_mut(Axis(0), l);
            for (r, row) in plane.outer_iter_mut().enumerate() {
                // A row's prior first (never NaN here), then the scores weighed by it in
                // one pass, as the atlas's.
                prior.fill(EPS);
                if (r0..r1).contains(&r) {
                    let y = (r as f32 + 0.5) / rows as f32;
                    for (c, p) in prior.iter_mut().enumerate().take(c1).skip(c0) {
                        let x = (c as f32 + 0.5) / cols as f32;
                        let u = back[0] * y + back[1] * x + back[2];
                        let v = back[3] * y + back[4] * x + back[5];
                        *p = sample(&frame.share, self.grid, u, v).clamp(EPS, 1.0 - EPS);
                    }
                }
                crate::atlas::weigh_row(row, &prior);
            }
            changed = true;
        }
        changed
    }

    /// The maps from frame to image coordinates (normalised rows and columns) of enclosed
    /// structure `l` and back, fitted to the outlines of the structures `found` around
    /// it; None unless each of them was found with a region of its own and the fit can be
    /// inverted.
    fn placement(&self, l: usize, found: &[Option<Finding>]) -> Option<([f32; 6], [f32; 6])> {
        let frame = self.frames.get(l)?.as_ref()?;
        let to: Vec<Point> = frame
            .around
            .iter()
            .map(|&k| {
                found
                    .iter()
                    .flatten()
                    .find(|f| f.label == k && !f.is_placed())
                    .map(|f| outline(&f.mask))
            })
            .collect::<Option<Vec<_>>>()?
            .concat();
        let forward = fit_affine(&frame.outline, &to)?;
        Some((forward, invert(&forward)?))
    }
}

/// The frame of structure `l` placed by the structures `around` it: their mean outline
/// over the templates, each template mapped onto it (the mean taken from the first
/// template's outline, then again from the mapped ones), and the share of the mapped
/// templates that have `l` at each grid cell, each template's `l` scaled about its
/// centroid by each of `sizes` in turn. None when a map cannot be fitted.
fn frame(
    templates: &[TemplateSlice],
    l: usize,
    around: Vec<usize>,
    sizes: &[f32],
) -> Option<EnclosedFrame> {
    let points: Vec<Vec<Point>> = templates
        .iter()
        .map(|t| around.iter().flat_map(|&k| t.outlines[k].clone()).collect())
        .collect();
    let mut mean = points.first()?.clone();
    for _ in 0..2 {
        let maps = points
            .iter()
            .map(|p| fit_affine(p, &mean))
            .collect::<Option<Vec<_>>>()?;
        let mut next = vec![[0f32; 2]; mean.len()];
        for (m, p) in maps.iter().zip(&points) {
            for (acc, q) in next.iter_mut().zip(p) {
                let [u, v] = apply_affine(m, *q);
                acc[0] += u / points.len() as f32;
                acc[1] += v / points.len() as f32;
            }
        }
        mean = next;
    }
    let maps = points
        .iter()
        .map(|p| fit_affine(p, &mean))
        .collect::<Option<Vec<_>>>()?;
    let sizes = if sizes.is_empty() { &[1.0][..] } else { sizes };
    let mut share = vec![0f32; GRID * GRID];
    let each = 1.0 / (templates.len() * sizes.len()) as f32;
    for (m, t) in maps.iter().zip(templates) {
        let back = invert(m)?;
        let mask = &t.masks[l];
        let (rows, cols) = mask.dim();
        let Some([cy, cx]) = centroid(mask) else {
            continue;
        };
        for (k, cell) in share.iter_mut().enumerate() {
            let (i, j) = (k / GRID, k % GRID);
            let here = [
                (i as f32 + 0.5) / GRID as f32,
                (j as f32 + 0.5) / GRID as f32,
            ];
            let [y, x] = apply_affine(&back, here);
            for &size in sizes {
                let (y, x) = (cy + (y - cy) / size, cx + (x - cx) / size);
                let (r, c) = ((y * rows as f32).floor(), (x * cols as f32).floor());
                if r >= 0.0
                    && c >= 0.0
                    && r < rows as f32
                    && c < cols as f32
                    && mask[[r as usize, c as usize]]
                {
                    *cell += each;
                }
            }
        }
    }
    share.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
    Some(EnclosedFrame {
        around,
        outline: mean,
        share,
    })
}

fn apply_affine(m: &[f32; 6], [y, x]: Point) -> Point {
    [m[0] * y + m[1] * x + m[2], m[3] * y + m[4] * x + m[5]]
}

/// Centroid of a mask, normalised; None when it is empty.
fn centroid(mask: &Array2<bool>) -> Option<Point> {
    let (rows, cols) = mask.dim();
    let (r, c) = crate::templates::centroid_where(mask, |m| *m)?;
    Some([
        ((r + 0.5) / rows as f64) as f32,
        ((c + 0.5) / cols as f64) as f32,
    ])
}

/// `RAYS` outline points of a mask, normalised: along each ray from the centroid (at
/// equal angles, the first pointing down the rows), the farthest pixel of the mask, or
/// the centroid where the ray meets none. Empty for an empty mask.
fn outline(mask: &Array2<bool>) -> Vec<Point> {
    let (rows, cols) = mask.dim();
    let Some([cy, cx]) = centroid(mask) else {
        return Vec::new();
    };
    let (cy, cx) = (cy * rows as f32 - 0.5, cx * cols as f32 - 0.5);
    let reach = (rows + cols) as f32;
    (0..RAYS)
        .map(|k| {
            let t = k as f32 * std::f32::consts::TAU / RAYS as f32;
            let (dy, dx) = (t.cos(), t.sin());
            let mut last = (cy, cx);
            let mut s = 0.0f32;
            while s < reach {
                let (y, x) = ((cy + dy * s).round(), (cx + dx * s).round());
                if y < 0.0 || x < 0.0 || y >= rows as f32 || x >= cols as f32 {
                    break;
                }
                if mask[[y as usize, x as usize]] {
                    last = (y, x);
                }
                s += 1.0;
            }
            [(last.0 + 0.5) / rows as f32, (last.1 + 0.5) / cols as f32]
        })
        .collect()
}

/// Whether `p` lies strictly inside the convex hull of `points`.
fn inside_hull(p: Point, points: &[Point]) -> bool {
    let hull =
        crate::convex::convex_hull(points.iter().map(|q| (q[0] as f64, q[1] as f64)).collect());
    let p = (p[0] as f64, p[1] as f64);
    hull.len() >= 3
        && (0..hull.len())
            .all(|i| crate::convex::cross(hull[i], hull[(i + 1) % hull.len()], p) > 0.0)
}

/// The share at normalised (u, v), bilinear between cell centres, 0 outside.
fn sample(share: &[f32], grid: usize, u: f32, v: f32) -> f32 {
    let at = |i: i64, j: i64| -> f32 {
        if i < 0 || j < 0 || i >= grid as i64 || j >= grid as i64 {
            return 0.0;
        }
        share
            .get(i as usize * grid + j as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let (y, x) = (u * grid as f32 - 0.5, v * grid as f32 - 0.5);
    if !(y > -1.0 && x > -1.0 && y < grid as f32 && x < grid as f32) {
        return 0.0;
    }
    let (i, j) = (y.floor() as i64, x.floor() as i64);
    let (fy, fx) = (y - i as f32, x - j as f32);
    at(i, j) * (1.0 - fy) * (1.0 - fx)
        + at(i, j + 1) * (1.0 - fy) * fx
        + at(i + 1, j) * fy * (1.0 - fx)
        + at(i + 1, j + 1) * fy * fx
}

/// The normalised box [row from, row to, column from, column to] that the grid's cells
/// with a share cover once mapped by `forward`; None when no cell has one.
fn mapped_box(forward: &[f32; 6], share: &[f32], grid: usize) -> Option<[f32; 4]> {
    let (mut i0, mut i1, mut j0, mut j1) = (grid, 0, grid, 0);
    for (k, _) in share.iter().enumerate().filter(|(_, v)| **v > 0.0) {
        let (i, j) = (k / grid, k % grid);
        i0 = i0.min(i);
        i1 = i1.max(i + 1);
        j0 = j0.min(j);
        j1 = j1.max(j + 1);
    }
    if i0 >= i1 {
        return None;
    }
    let g = grid as f32;
    let corners = [(i0, j0), (i0, j1), (i1, j0), (i1, j1)]
        .map(|(i, j)| apply_affine(forward, [i as f32 / g, j as f32 / g]));
    let fold =
        |f: fn(f32, f32) -> f32, k: usize, init: f32| corners.iter().map(|c| c[k]).fold(init, f);
    Some([
        fold(f32::min, 0, f32::INFINITY),
        fold(f32::max, 0, f32::NEG_INFINITY),
        fold(f32::min, 1, f32::INFINITY),
        fold(f32::max, 1, f32::NEG_INFINITY),
    ])
}

/// The affine map [u v] = M·[y x 1] taking `from` onto `to` in least squares, as
/// (m00 m01 m02 m10 m11 m12); None for fewer than 3 pairs or points on a line.
fn fit_affine(from: &[Point], to: &[Point]) -> Option<[f32; 6]> {
    if from.len() != to.len() || from.len() < 3 {
        return None;
    }
    // Normal equations over [y x 1], centred for conditioning.
    let n = from.len() as f64;
    let mean = |ps: &[Point], k: usize| ps.iter().map(|p| p[k] as f64).sum::<f64>() / n;
    let (fy, fx, ty, tx) = (mean(from, 0), mean(from, 1), mean(to, 0), mean(to, 1));
    let (mut syy, mut syx, mut sxx) = (0f64, 0f64, 0f64);
    let (mut a, mut b, mut c, mut d) = (0f64, 0f64, 0f64, 0f64);
    for (p, q) in from.iter().zip(to) {
        let (y, x) = (p[0] as f64 - fy, p[1] as f64 - fx);
        let (u, v) = (q[0] as f64 - ty, q[1] as f64 - tx);
        syy += y * y;
        syx += y * x;
        sxx += x * x;
        a += u * y;
        b += u * x;
        c += v * y;
        d += v * x;
    }
    let det = syy * sxx - syx * syx;
    if det.abs() <= 1e-12 * (syy * sxx).max(1e-30) {
        return None;
    }
    // [m00 m01] = [a b]·inv([[syy syx],[syx sxx]]), likewise for the second row.
    let m00 = (a * sxx - b * syx) / det;
    let m01 = (b * syy - a * syx) / det;
    let m10 = (c * sxx - d * syx) / det;
    let m11 = (d * syy - c * syx) / det;
    let m02 = ty - m00 * fy - m01 * fx;
    let m12 = tx - m10 * fy - m11 * fx;
    let m = [m00, m01, m02, m10, m11, m12].map(|v| v as f32);
    m.iter().all(|v| v.is_finite()).then_some(m)
}

/// The inverse of an affine map; None when it is singular.
fn invert(m: &[f32; 6]) -> Option<[f32; 6]> {
    let [a, b, c, d, e, f] = m.map(f64::from);
    let det = a * e - b * d;
    if det.abs() < 1e-9 {
        return None;
    }
    let (ia, ib, id, ie) = (e / det, -b / det, -d / det, a / det);
    let out = [ia, ib, -(ia * c + ib * f), id, ie, -(id * c + ie * f)].map(|v| v as f32);
    out.iter().all(|v| v.is_finite()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postprocess::structures;

    /// Two "lungs" side by side and a "heart" low between them, each template shifted and
    /// widened a little, as patients are.
    fn template(shift: usize, wide: usize) -> Array2<u8> {
        let mut m = Array2::<u8>::zeros((96, 96));
        for r in 10 + shift..70 + shift {
            for c in 8..36 {
                m[[r, c]] = 1;
            }
            for c in 44 + wide..72 + wide {
                m[[r, c]] = 2;
            }
        }
        for r in 45 + shift..66 + shift {
            for c in 36..44 + wide {
                m[[r, c]] = 3;
            }
        }
        m
    }

    /// Scores of 0.9 for each structure where `truth` has it, 0 elsewhere.
    fn sure_scores(truth: &Array2<u8>) -> Array3<f32> {
        let mut scores = Array3::<f32>::zeros((3, 96, 96));
        for ((r, c), v) in truth.indexed_iter() {
            if *v > 0 {
                scores[[*v as usize - 1, r, c]] = 0.9;
            }
        }
        scores
    }

    fn model() -> EnclosedModel {
        let maps: Vec<Array2<u8>> = (0..4).map(|k| template(k, k % 2)).collect();
        EnclosedModel::fit(maps.iter(), &[1, 2, 3], &[1.0])
            .expect("the heart lies between the lungs")
    }

    #[test]
    fn a_structure_between_the_others_is_enclosed_and_the_others_are_not() {
        let m = model();
        let enclosed: Vec<bool> = m.frames.iter().map(Option::is_some).collect();
        assert_eq!(enclosed, vec![false, false, true]);
        let heart = m.frames[2].as_ref().expect("the heart's frame");
        assert_eq!(heart.around, vec![0, 1]);
        // Only aggregates are kept: a share per cell (in quarters, 4 templates), no
        // template's own mask or outline.
        assert!(heart.share.contains(&1.0));
        assert!(heart.share.iter().any(|v| *v > 0.0 && *v < 1.0));
        assert!(heart.share.iter().all(|v| (v * 4.0).fract() == 0.0));
        assert!(m.fits(3));
        assert!(!m.fits(2));
        // Lungs alone enclose nothing: the file stays as it was.
        let lungs: Vec<Array2<u8>> = (0..3).map(|k| template(k, 0).mapv(|v| v % 3)).collect();
        assert!(EnclosedModel::fit(lungs.iter(), &[1, 2], &SIZES).is_none());
        // A damaged file: an outline cut short, a share past 1, a frame placed by itself.
        let damaged = |f: fn(&mut EnclosedFrame)| {
            let mut bad = m.clone();
            if let Some(frame) = bad.frames[2].as_mut() {
                f(frame);
            }
            bad.fits(3)
        };
        assert!(!damaged(|f| {
            f.outline.pop();
        }));
        assert!(!damaged(|f| f.share[0] = 1.5));
        assert!(!damaged(|f| f.around = vec![0, 2]));
        let text = serde_json::to_string(&m).expect("serialises");
        let back: EnclosedModel = serde_json::from_str(&text).expect("reads back");
        assert!(back.fits(3));
    }

    /// With `SIZES` the share tapers off outside the templates' hearts: a target heart
    /// taller than every template's keeps the rows they lack where its scores are sure,
    /// which the templates' own share cuts; spill well below it is still cut.
    #[test]
    fn with_sizes_a_heart_larger_than_the_templates_keeps_its_outline() {
        let maps: Vec<Array2<u8>> = (0..4).map(|k| template(k, k % 2)).collect();
        let sized = EnclosedModel::fit(maps.iter(), &[1, 2, 3], &SIZES).expect("enclosed");
        let share = &sized.frames[2].as_ref().expect("the heart's frame").share;
        // Twentieths: 4 templates at 5 sizes; some cells reached by the larger sizes only,
        // under the least share one template gives without them (a quarter).
        let n = (maps.len() * SIZES.len()) as f32;
        assert!(share.iter().all(|v| ((v * n).round() - v * n).abs() < 1e-3));
        assert!(share.iter().any(|v| *v > 0.0 && *v < 0.25));
        assert!(share.contains(&1.0));
        let plain = model();
        let plain_share = &plain.frames[2].as_ref().expect("the heart's frame").share;
        let reached = |s: &[f32]| s.iter().filter(|v| **v > 0.0).count();
        assert!(reached(share) > reached(plain_share));

        // The target: the templates' layout (shift 2) with a heart of rows 45..70, where
        // the templates' run 45 + k..66 + k (k = 0..3, the heart moving with the lungs).
        let mut truth = template(2, 1);
        for r in 45..70 {
            for c in 36..45 {
                truth[[r, c]] = 3;
            }
        }
        let mut scores = sure_scores(&truth);
        // Spill well below the heart, joined to it, fairly sure.
        for r in 70..80 {
            for c in 37..44 {
                scores[[2, r, c]] = 0.6;
            }
        }
        let none = crate::convex::Outlines::default();
        let heart = |m: &EnclosedModel| {
            let found = structures(&mut scores.clone(), None, None, Some(m), false, none, None);
            let h = found[2].as_ref().expect("a heart").mask.clone();
            let top = (45..47).all(|r| (38..43).all(|c| h[[r, c]]));
            let spill = (74..80).any(|r| (37..44).any(|c| h[[r, c]]));
            (top, spill)
        };
        assert_eq!(
            heart(&plain),
            (false, false),
            "the templates' share cuts the top"
        );
        assert_eq!(heart(&sized), (true, false));
    }

    #[test]
    fn the_affine_fit_recovers_a_known_map() {
        let truth = [1.1f32, 0.1, 0.05, -0.2, 0.9, 0.1];
        let from: Vec<Point> = (0..20)
            .map(|k| [(k % 5) as f32 / 5.0, (k / 5) as f32 / 4.0 + 0.01 * k as f32])
            .collect();
        let to: Vec<Point> = from
            .iter()
            .map(|p| {
                [
                    truth[0] * p[0] + truth[1] * p[1] + truth[2],
                    truth[3] * p[0] + truth[4] * p[1] + truth[5],
                ]
            })
            .collect();
        let m = fit_affine(&from, &to).expect("a map");
        assert!(
            m.iter().zip(truth).all(|(a, b)| (a - b).abs() < 1e-4),
            "{m:?}"
        );
        let back = invert(&m).expect("invertible");
        let p = [0.3f32, 0.7];
        let q = [
            m[0] * p[0] + m[1] * p[1] + m[2],
            m[3] * p[0] + m[4] * p[1] + m[5],
        ];
        let r = [
            back[0] * q[0] + back[1] * q[1] + back[2],
            back[3] * q[0] + back[4] * q[1] + back[5],
        ];
        assert!((r[0] - p[0]).abs() < 1e-5 && (r[1] - p[1]).abs() < 1e-5);
        // Points on a line give no map.
        let line: Vec<Point> = (0..5).map(|k| [k as f32 * 0.1, k as f32 * 0.2]).collect();
        assert!(fit_affine(&line, &line).is_none());
    }

    /// The target's heart scores stop short of its bottom and spill below it, as on the
    /// diaphragm; its lungs are scored right. Mapped through the lungs, the templates'
    /// hearts give it its bottom back and cut the spill.
    #[test]
    fn the_templates_hearts_mapped_through_the_lungs_bound_the_heart() {
        let m = model();
        let truth = template(2, 1);
        let mut scores = sure_scores(&truth);
        // The middle of the heart's bottom rows scored unsure, and spill below it, joined
        // to the heart's sides, fairly sure.
        for r in 62..68 {
            for c in 38..43 {
                scores[[2, r, c]] = 0.4;
            }
        }
        for r in 68..80 {
            for c in 37..44 {
                scores[[2, r, c]] = 0.6;
            }
        }
        let heart = |found: &[Option<Finding>]| {
            let h = &found[2].as_ref().expect("a heart").mask;
            let bottom = (62..68).all(|r| (38..43).all(|c| h[[r, c]]));
            let spill = (72..80).any(|r| (37..44).any(|c| h[[r, c]]));
            (bottom, spill)
        };
        let none = crate::convex::Outlines::default();
        let plain = structures(&mut scores.clone(), None, None, None, false, none, None);
        assert_eq!(
            heart(&plain),
            (false, true),
            "the test's scores miss and spill"
        );
        let mut weighed = scores.clone();
        let with = structures(&mut weighed, None, None, Some(&m), false, none, None);
        assert_eq!(heart(&with), (true, false));
        // The lungs' scores are not touched.
        assert!(crate::same_bits(
            weighed.slice(ndarray::s![..2, .., ..]).iter(),
            scores.slice(ndarray::s![..2, .., ..]).iter()
        ));
        // Without the lungs found there is nothing to map through: the scores stay.
        let mut alone = scores.clone();
        alone.slice_mut(ndarray::s![..2, .., ..]).fill(0.0);
        let before = alone.clone();
        let found = structures(&mut alone.clone(), None, None, None, false, none, None);
        assert!(!m.apply(&mut alone, &found));
        assert!(crate::same_bits(alone.iter(), before.iter()));
    }

    /// Weighed a row at a time within the mapped grid's box, the scores have the bits of
    /// the rule applied to every pixel of the slice: the frame's share sampled where the
    /// pixel lies in the frame, kept within `EPS`..1 − `EPS`, as independent evidence. The
    /// lungs' scores stay.
    #[test]
    fn weighed_row_by_row_the_scores_have_the_bits_of_the_per_pixel_rule() {
        let m = model();
        // A patient lying lower than the templates, with a wider heart.
        let truth = template(6, 3);
        let mut rng = crate::adapter::Rng::new(5);
        let scores = Array3::from_shape_fn((3, 96, 96), |_| rng.uniform());
        let found = Finding::regions_of(&truth, 3);
        let mut weighed = scores.clone();
        assert!(m.apply(&mut weighed, &found));
        let frame = m.frames[2].as_ref().expect("the heart's frame");
        let (_, back) = m.placement(2, &found).expect("placed by the lungs");
        let mut sampled = 0;
        for ((l, r, c), &s) in scores.indexed_iter() {
            let expected = if l == 2 {
                let (y, x) = ((r as f32 + 0.5) / 96.0, (c as f32 + 0.5) / 96.0);
                let u = back[0] * y + back[1] * x + back[2];
                let v = back[3] * y + back[4] * x + back[5];
                let p = sample(&frame.share, m.grid, u, v);
                sampled += (p > EPS && p < 1.0 - EPS) as usize;
                crate::atlas::weigh(s, p.clamp(EPS, 1.0 - EPS))
            } else {
                s
            };
            assert_eq!(
                weighed[[l, r, c]].to_bits(),
                expected.to_bits(),
                "label {l} at {r},{c}"
            );
        }
        assert!(sampled > 0, "the share is sampled between its bounds");
    }

    #[test]
    fn a_point_is_inside_a_hull_only_strictly_within_it() {
        let square = [
            [0.0f32, 0.0],
            [0.0, 1.0],
            [1.0, 0.0],
            [1.0, 1.0],
            [0.5, 0.5],
        ];
        assert!(inside_hull([0.5, 0.5], &square));
        assert!(inside_hull([0.1, 0.9], &square));
        assert!(!inside_hull([1.2, 0.5], &square));
        assert!(
            !inside_hull([1.0, 0.5], &square),
            "on the edge is not inside"
        );
        assert!(
            !inside_hull([0.5, 0.5], &square[..2]),
            "two points span no area"
        );
    }
}
