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
//!
//! Every template shows the heart against the lungs: along a row, the background between
//! them is 0 px in half the rows of chest-xr's masks and at most 3 px in 65 % (right) and
//! 85 % (left) of them. A heart whose faint edge falls short of a lung leaves a strip of
//! background there, which no later step gives back. With `TrainConfig::enclosed_gaps`
//! (`close_gaps`) an enclosed structure takes the background between it and a structure
//! of its frame along a row or a column where that strip is at most `GAP_CELLS` cells of
//! the grid it was scored on: narrower than the grid resolves. The strips leave a heart
//! drawn convex concave where they meet it, so its outline rule is then taken again.

use ndarray::{Array2, Array3, ArrayView2, ArrayViewMut2, Axis, Zip};
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
/// With `enclosed_gaps`, the widest background gap (in cells of the grid the structures
/// were scored on) that an enclosed structure closes towards a structure of its frame:
/// two cells, one on each side of an edge the upsampled scores place to within a cell.
/// Set from the grid with chest-xr's offline curve in view (README, *The heart against
/// the lungs*): wider gaps scored higher on its test cases and were not taken.
pub const GAP_CELLS: f64 = 2.0;

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

    /// Gives each enclosed structure found with a region the background between it and a
    /// structure of its frame, first along its rows, then along its columns, where at most
    /// `GAP_CELLS` cells' pixels (`cell`: a cell's height and width in pixels) lie between
    /// its outermost pixel and that structure's nearest one; a pixel of any other
    /// structure on the way keeps the gap. A structure of `outlines` drawn convex whose
    /// gaps closed is then drawn by its outline rule again (`convex::fill`), as the last
    /// step: the strips leave its region concave where they meet it. Mass, point and
    /// confidence follow the mask, from `scores` (labels × rows × columns). Returns, per
    /// structure of `found`, whether its mask changed.
    pub fn close_gaps(
        &self,
        found: &mut [Option<Finding>],
        cell: (f64, f64),
        scores: &Array3<f32>,
        outlines: crate::convex::Outlines,
    ) -> Vec<bool> {
        let mut changed = vec![false; found.len()];
        for (l, frame) in self.frames.iter().enumerate() {
            let (Some(frame), Some(Some(finding))) = (frame, found.get(l)) else {
                continue;
            };
            if finding.is_placed() {
                continue;
            }
            let mut mask = finding.mask.clone();
            let dim = mask.dim();
            let (mut around, mut taken) =
                (Array2::from_elem(dim, false), Array2::from_elem(dim, false));
            for (k, f) in found.iter().enumerate() {
                let Some(f) = f.as_ref().filter(|f| k != l && f.mask.dim() == dim) else {
                    continue;
                };
                let near = frame.around.contains(&k);
                Zip::from(&mut taken)
                    .and(&mut around)
                    .and(&f.mask)
                    .for_each(|t, a, &m| {
                        *t |= m;
                        *a |= m && near;
                    });
            }
            let limit = |px: f64| (GAP_CELLS * px).floor().max(0.0) as usize;
            let filled = close_along(mask.view_mut(), around.view(), taken.view(), limit(cell.1))
                + close_along(
                    mask.view_mut().reversed_axes(),
                    around.view().reversed_axes(),
                    taken.view().reversed_axes(),
                    limit(cell.0),
                );
            if let (true, Some(Some(f))) = (filled > 0, found.get_mut(l)) {
                f.mask = mask;
                crate::postprocess::measure(f, scores);
                changed[l] = true;
            }
        }
        let convex: Vec<bool> = (changed.iter().zip(outlines.convex))
            .map(|(c, v)| *c && *v)
            .collect();
        let again = crate::convex::Outlines {
            convex: &convex,
            ellipse: outlines.ellipse,
        };
        crate::convex::fill(found, again, scores);
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

/// Along each row of `mask`, outwards from its first and from its last pixel: the pixels
/// up to the nearest one of `around` become the mask's when at most `limit` lie between
/// and none of them is `taken`. Returns how many were filled.
fn close_along(
    mut mask: ArrayViewMut2<bool>,
    around: ArrayView2<bool>,
    taken: ArrayView2<bool>,
    limit: usize,
) -> usize {
    let mut filled = 0;
    for ((mut lane, near), taken) in mask
        .outer_iter_mut()
        .zip(around.outer_iter())
        .zip(taken.outer_iter())
    {
        let n = lane.len();
        let Some(first) = (0..n).find(|&c| lane[c]) else {
            continue;
        };
        let last = (first..n).rfind(|&c| lane[c]).unwrap_or(first);
        let before: Vec<usize> = (0..first).rev().take(limit + 1).collect();
        let after: Vec<usize> = (last + 1..n).take(limit + 1).collect();
        for walk in [before, after] {
            let stop = walk.iter().position(|&c| near[c] || taken[c]);
            if let Some(k) = stop.filter(|&k| near[walk[k]]) {
                walk[..k].iter().for_each(|&c| lane[c] = true);
                filled += k;
            }
        }
    }
    filled
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

    /// The target's lungs as the templates' (shift 2, wide 1: rows 12..72, columns 8..36
    /// and 45..73) and its heart (rows 47..68) drawn over `columns` only: a heart whose
    /// edges fell short of the lungs.
    fn short_heart(columns: std::ops::Range<usize>) -> (Array2<u8>, Vec<Option<Finding>>) {
        let truth = template(2, 1);
        let mut drawn = truth.mapv(|v| if v == 3 { 0 } else { v });
        for r in 47..68 {
            for c in columns.clone() {
                drawn[[r, c]] = 3;
            }
        }
        (truth, Finding::regions_of(&drawn, 3))
    }

    /// Gaps of at most `GAP_CELLS` cells between the heart and a lung close, along rows
    /// and columns, scaled by the cell's size in pixels; wider ones, and a heart placed
    /// without a region, stay as they are.
    #[test]
    fn the_heart_reaches_the_lungs_across_a_gap_narrower_than_two_cells() {
        let m = model();
        let heart = |found: &[Option<Finding>]| found[2].as_ref().expect("a heart").mask.clone();
        // 2 px short on both sides: with 1-px cells the gaps are two cells.
        let (truth, mut found) = short_heart(38..43);
        let scores = sure_scores(&truth);
        let none = crate::convex::Outlines::default();
        let close =
            |found: &mut [Option<Finding>], px: f64| m.close_gaps(found, (px, px), &scores, none);
        const HEART: [bool; 3] = [false, false, true];
        assert_eq!(close(&mut found, 1.0), HEART);
        assert_eq!(heart(&found), truth.mapv(|v| v == 3));
        let f = found[2].as_ref().expect("a heart");
        assert!(
            (f.confidence - 0.9).abs() < 1e-6,
            "measured again: {}",
            f.confidence
        );
        assert!(
            (f.point.1 - 40.0).abs() < 1e-6,
            "centred again: {:?}",
            f.point
        );
        // The lungs are left as they were.
        assert_eq!(
            found[0].as_ref().expect("right lung").mask,
            truth.mapv(|v| v == 1)
        );

        // 3 px short on the left: wider than two 1-px cells, so only the right closes...
        let (_, mut found) = short_heart(39..43);
        assert_eq!(close(&mut found, 1.0), HEART);
        let h = heart(&found);
        assert!((47..68).all(|r| !h[[r, 36]] && !h[[r, 38]] && h[[r, 39]] && h[[r, 44]]));
        // ...and both with cells of 1.5 px (3 px).
        let (_, mut found) = short_heart(39..43);
        assert_eq!(close(&mut found, 1.5), HEART);
        assert_eq!(heart(&found), truth.mapv(|v| v == 3));

        // Along a column: a lung reaching over the heart's top 2 px above it.
        let (_, mut found) = short_heart(36..45);
        if let Some(lung) = found[1].as_mut() {
            (43..45).for_each(|r| (40..45).for_each(|c| lung.mask[[r, c]] = true));
        }
        assert_eq!(close(&mut found, 1.0), HEART);
        let h = heart(&found);
        assert!((45..47).all(|r| (40..45).all(|c| h[[r, c]]) && !h[[r, 39]]));

        // A heart placed without a region, or drawn against the lungs, is left alone.
        let (_, mut found) = short_heart(36..45);
        assert_eq!(close(&mut found, 1.0), [false; 3]);
        if let Some(f) = found[2].as_mut() {
            f.mask.fill(false);
        }
        assert_eq!(close(&mut found, 1.0), [false; 3]);
        assert!(found[2].as_ref().is_some_and(Finding::is_placed));
    }

    /// A heart drawn convex is drawn by its outline rule again once its gaps are closed:
    /// its narrower top, too far from the lungs to close, leaves a notch on each side
    /// that the hull fills.
    #[test]
    fn a_convex_heart_is_drawn_convex_again_after_its_gaps_close() {
        let m = model();
        let (truth, _) = short_heart(36..45);
        let scores = sure_scores(&truth);
        // Rows 50..68 2 px short of both lungs, rows 47..50 3 px short.
        let mut drawn = truth.mapv(|v| if v == 3 { 0 } else { v });
        (50..68).for_each(|r| (38..43).for_each(|c| drawn[[r, c]] = 3));
        (47..50).for_each(|r| (39..42).for_each(|c| drawn[[r, c]] = 3));
        let convex = [false, false, true];
        for (outlines, filled) in [
            (crate::convex::Outlines::default(), false),
            (
                crate::convex::Outlines {
                    convex: &convex,
                    ellipse: &[],
                },
                true,
            ),
        ] {
            let mut found = Finding::regions_of(&drawn, 3);
            let changed = m.close_gaps(&mut found, (1.0, 1.0), &scores, outlines);
            assert_eq!(changed, [false, false, true]);
            let h = &found[2].as_ref().expect("a heart").mask;
            assert!((50..68).all(|r| h[[r, 36]] && h[[r, 44]]), "gaps closed");
            assert!(
                (47..50).all(|r| !h[[r, 36]]) && !h[[47, 38]],
                "top not closed"
            );
            // The hull from the top's corner (47, 39) to the closed rows' (50, 36).
            assert_eq!(h[[49, 38]], filled, "convex: {filled}");
            assert!(h
                .iter()
                .zip(&drawn)
                .all(|(h, d)| !*h || (*d != 1 && *d != 2)));
        }
    }

    /// A pixel of a structure that is not around the enclosed one stops its gap; the
    /// nearest structure around it is what the gap is measured to.
    #[test]
    fn another_structure_in_the_gap_keeps_it_open() {
        let row = |s: &str| Array2::from_shape_fn((1, s.len()), |(_, c)| s.as_bytes()[c]);
        let close = |s: &str, limit: usize| {
            let lane = row(s);
            let mut mask = lane.mapv(|b| b == b'H');
            let around = lane.mapv(|b| b == b'L');
            let taken = lane.mapv(|b| b == b'L' || b == b'X');
            let n = close_along(mask.view_mut(), around.view(), taken.view(), limit);
            let out: String = (0..s.len())
                .map(|c| {
                    if mask[[0, c]] {
                        'H'
                    } else {
                        s.as_bytes()[c] as char
                    }
                })
                .collect();
            (n, out)
        };
        assert_eq!(close("L..HH..L", 2), (4, "LHHHHHHL".into()));
        assert_eq!(close("LX.HH..L", 2), (2, "LX.HHHHL".into()));
        assert_eq!(close("L...HH.L", 2), (1, "L...HHHL".into()));
        assert_eq!(close("L...HH.L", 3), (4, "LHHHHHHL".into()));
        assert_eq!(close("..HH..", 2), (0, "..HH..".into()));
        assert_eq!(close("LHHL", 0), (0, "LHHL".into()));
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
