//! From score maps to findings: upsample the per-label scores to the image, label each
//! pixel with its best label when that score reaches 0.5, keep per label the connected
//! component (8-neighbour) with the largest score mass, drop specks, and place the
//! landmark at the score-weighted centroid of that component. A label with no component
//! is absent — unless the adapter's templates, aligned to the slice, place it there
//! (`fill_from_prior`, adapters trained with `align`).

use crate::align::Prior;
use crate::image::resize_bilinear;
use ndarray::{Array2, Array3, Axis, Zip};

/// Components smaller than this many pixels are stray pixels, not findings.
pub const MIN_COMPONENT_PIXELS: usize = 12;
pub const THRESHOLD: f32 = 0.5;

/// One label's finding in one slice.
#[derive(Debug, Clone)]
pub struct Finding {
    /// Index of the label in the adapter (0-based).
    pub label: usize,
    pub mask: Array2<bool>,
    /// Sum of scores over the component: how much evidence it carries.
    pub mass: f64,
    /// Score-weighted centroid (row, column) in image pixels.
    pub point: (f64, f64),
    /// Mean score inside the component.
    pub confidence: f64,
}

impl Finding {
    /// Placed by the layout or the aligned templates, with no region of its own
    /// (`placed`); every found region has pixels.
    pub fn is_placed(&self) -> bool {
        !self.mask.iter().any(|m| *m)
    }

    /// Labels 1..=`count` of a label map as found regions (mass, point and confidence
    /// not set): the structures found in a test's slice.
    #[cfg(test)]
    pub(crate) fn regions_of(labels: &Array2<u8>, count: u8) -> Vec<Option<Finding>> {
        (1..=count)
            .map(|v| {
                Some(Finding {
                    label: v as usize - 1,
                    mask: labels.mapv(|x| x == v),
                    mass: 1.0,
                    point: (0.0, 0.0),
                    confidence: 1.0,
                })
            })
            .collect()
    }
}

/// Sets a finding's mass, point and confidence from its mask and its label's plane of
/// `scores` (labels × rows × columns), after its mask changed: the score-weighted centroid
/// as `findings` takes it. A finding with no pixel left keeps its point.
pub fn measure(finding: &mut Finding, scores: &Array3<f32>) {
    let plane = scores.index_axis(Axis(0), finding.label);
    let (mut mass, mut rows, mut cols, mut pixels) = (0.0, 0.0, 0.0, 0usize);
    for ((r, c), &m) in finding.mask.indexed_iter() {
        if m {
            let s = plane.get((r, c)).copied().unwrap_or(0.0) as f64;
            mass += s;
            rows += s * r as f64;
            cols += s * c as f64;
            pixels += 1;
        }
    }
    finding.mass = mass;
    if mass > 0.0 {
        finding.point = (rows / mass, cols / mass);
    }
    if pixels > 0 {
        finding.confidence = mass / pixels as f64;
    }
}

/// Per-label scores at image resolution (L × rows × cols).
pub fn upsample_scores(scores: &Array3<f32>, rows: usize, cols: usize) -> Array3<f32> {
    let n = scores.dim().0;
    let mut out = Array3::zeros((n, rows, cols));
    for l in 0..n {
        let up = resize_bilinear(&scores.index_axis(Axis(0), l).to_owned(), rows, cols);
        out.index_axis_mut(Axis(0), l).assign(&up);
    }
    out
}

/// Edge-aware refinement of upsampled scores (the guided filter of He, Sun and Tang,
/// 2013, with the slice itself as guide): within each window of radius `radius` pixels the
/// scores are refit as a linear function of the image intensity, so a region's border
/// moves to the intensity edge nearest to it instead of following the feature grid's
/// bilinear ramps. `guide` is the normalised slice (0..1); `eps` is the intensity variance
/// below which a window counts as flat (there the scores are only smoothed).
pub fn guided_refine(scores: &mut Array3<f32>, guide: &Array2<f32>, radius: usize, eps: f32) {
    // Asked once: the answer reads the process's CPU affinity and cgroup limits, and this
    // runs for every slice.
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |t| t.get()));
    guided_refine_on(scores, guide, radius, eps, cores);
}

/// `guided_refine` with the labels' planes, refined independently of each other, spread
/// over up to `threads` threads (the same arithmetic per plane, so the same result on any
/// number of them).
fn guided_refine_on(
    scores: &mut Array3<f32>,
    guide: &Array2<f32>,
    radius: usize,
    eps: f32,
    threads: usize,
) {
    let (n, h, w) = scores.dim();
    if guide.dim() != (h, w) || h == 0 || w == 0 {
        return;
    }
    let boxed = |plane: &[f32], row_sums: &mut [f32]| {
        let mut out = vec![0f32; h * w];
        crate::image::box_mean(plane, h, w, radius, row_sums, &mut out);
        out
    };
    let mut row_sums = vec![0f32; h * w];
    let g: Vec<f32> = guide.iter().copied().collect();
    let mean_g = boxed(&g, &mut row_sums);
    let gg: Vec<f32> = g.iter().map(|v| v * v).collect();
    let var_g: Vec<f32> = boxed(&gg, &mut row_sums)
        .iter()
        .zip(&mean_g)
        .map(|(m2, m)| (m2 - m * m).max(0.0))
        .collect();
    let refine = |mut plane: ndarray::ArrayViewMut2<f32>, row_sums: &mut [f32]| {
        let p: Vec<f32> = plane.iter().copied().collect();
        let mean_p = boxed(&p, row_sums);
        let gp: Vec<f32> = g.iter().zip(&p).map(|(a, b)| a * b).collect();
        let mean_gp = boxed(&gp, row_sums);
        // Zipped, not indexed: without bounds checks these loops vectorise.
        let a: Vec<f32> = mean_gp
            .iter()
            .zip(&mean_p)
            .zip(&mean_g)
            .zip(&var_g)
            .map(|(((gp, p), mg), vg)| (gp - mg * p) / (vg + eps))
            .collect();
        let b: Vec<f32> = mean_p
            .iter()
            .zip(&a)
            .zip(&mean_g)
            .map(|((p, a), mg)| p - a * mg)
            .collect();
        let (mean_a, mean_b) = (boxed(&a, row_sums), boxed(&b, row_sums));
        for (((v, a), g), b) in plane.iter_mut().zip(&mean_a).zip(&g).zip(&mean_b) {
            *v = a * g + b;
        }
    };
    let mut planes: Vec<_> = scores.axis_iter_mut(Axis(0)).collect();
    let per_thread = n.div_ceil(threads.clamp(1, n.max(1))).max(1);
    std::thread::scope(|scope| {
        for chunk in planes.chunks_mut(per_thread) {
            let refine = &refine;
            scope.spawn(move || {
                let mut row_sums = vec![0f32; h * w];
                for plane in chunk.iter_mut() {
                    refine(plane.view_mut(), &mut row_sums);
                }
            });
        }
    });
}

/// `guided_refine` as the adapters use it, settings fixed a priori: the window is one
/// feature cell of a grid with `grid_rows` rows (what bilinear upsampling blurs); flat
/// means an intensity spread under 0.1 of the normalised range.
pub fn refine_to_edges(scores: &mut Array3<f32>, guide: &Array2<f32>, grid_rows: usize) {
    let (_, rows, cols) = scores.dim();
    if guide.dim() != (rows, cols) {
        log::warn!(
            "edge refinement skipped: the slice is {:?}, its scores {rows}×{cols}",
            guide.dim()
        );
        return;
    }
    let radius = (scores.dim().1 as f64 / grid_rows.max(1) as f64)
        .round()
        .max(1.0) as usize;
    guided_refine(scores, guide, radius, 1e-2);
}

/// 0 = background, l + 1 = label l: the best label per pixel if its score ≥ 0.5.
pub fn label_map(scores: &Array3<f32>) -> Array2<u8> {
    let (_, rows, cols) = scores.dim();
    let mut best = Array2::<u8>::zeros((rows, cols));
    let mut best_score = Array2::from_elem((rows, cols), THRESHOLD);
    // Plane by plane: per pixel the same comparisons in the same label order as pixel by
    // pixel, over contiguous planes.
    for (l, plane) in scores.outer_iter().enumerate() {
        Zip::from(&mut best)
            .and(&mut best_score)
            .and(&plane)
            .for_each(|b, bs, &s| {
                if s >= *bs {
                    *bs = s;
                    *b = (l + 1) as u8;
                }
            });
    }
    best
}

/// The pixel and its 8 neighbours that lie inside a `dim`-sized image.
fn neighbours(
    (r, c): (usize, usize),
    (rows, cols): (usize, usize),
) -> impl Iterator<Item = (usize, usize)> {
    (r.saturating_sub(1)..(r + 2).min(rows))
        .flat_map(move |nr| (c.saturating_sub(1)..(c + 2).min(cols)).map(move |nc| (nr, nc)))
}

/// Connected components (8-neighbour) of a binary mask, as pixel lists: in the order of
/// their first pixel row by row, each component's pixels row by row.
///
/// Over runs of set pixels rather than pixels: it runs several times per label and slice
/// on 512 × 512 masks, where a pixel-by-pixel fill spent ~40 % of the structures' time.
/// Each run is joined (union-find) with the runs of the row above that it touches; the
/// components are numbered as their first runs come. The pixels' order within a component
/// is not a fill's: the masses and centroids summed over it in f64 are exact, so the same
/// in any order, for scores from 0.25 to 1 on slices up to 512 × 512 (the eval's results
/// on both data sets are the same to the bit as with a fill's order).
pub fn components(mask: &Array2<bool>) -> Vec<Vec<(usize, usize)>> {
    let (rows, cols) = mask.dim();
    if rows == 0 || cols == 0 {
        return Vec::new();
    }
    let owned;
    let flat: &[bool] = match mask.as_slice() {
        Some(flat) => flat,
        None => {
            owned = mask.iter().copied().collect::<Vec<bool>>();
            &owned
        }
    };
    // Runs as (row, first column, one past the last), in row-major order; `first[r]` is
    // the index of row r's first run.
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    let mut first = Vec::with_capacity(rows + 1);
    for (r, row) in flat.chunks(cols).enumerate() {
        first.push(runs.len());
        let mut c = 0;
        while let Some(start) = next_true(row, c) {
            let end = row[start..]
                .iter()
                .position(|&f| !f)
                .map_or(cols, |n| start + n);
            runs.push((r, start, end));
            c = end;
        }
    }
    first.push(runs.len());
    let mut parent: Vec<usize> = (0..runs.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for r in 1..rows {
        let above = first[r - 1]..first[r];
        let mut a = above.start;
        for b in first[r]..first[r + 1] {
            let (_, start, end) = runs[b];
            // Runs above that end left of this one's diagonal neighbour touch neither it
            // nor the runs right of it.
            while a < above.end && runs[a].2 < start {
                a += 1;
            }
            let mut k = a;
            while k < above.end && runs[k].1 <= end {
                let (x, y) = (root(&mut parent, k), root(&mut parent, b));
                parent[x.max(y)] = x.min(y);
                k += 1;
            }
        }
    }
    // A component's index by its root, and its pixel count, in the order of its first
    // run.
    let mut index = vec![usize::MAX; runs.len()];
    let mut sizes = Vec::new();
    for (i, &(_, start, end)) in runs.iter().enumerate() {
        let k = root(&mut parent, i);
        if index[k] == usize::MAX {
            index[k] = sizes.len();
            sizes.push(0);
        }
        sizes[index[k]] += end - start;
    }
    let mut out: Vec<Vec<(usize, usize)>> = sizes.iter().map(|&n| Vec::with_capacity(n)).collect();
    for (i, &(r, start, end)) in runs.iter().enumerate() {
        let k = index[root(&mut parent, i)];
        out[k].extend((start..end).map(|c| (r, c)));
    }
    out
}

/// The first index from `from` on where `flags` holds. Most of a mask is empty: the
/// blocks of 64 are OR-ed without branches (vectorised), and only the block with a hit is
/// searched.
fn next_true(flags: &[bool], from: usize) -> Option<usize> {
    let mut i = from.min(flags.len());
    while let Some(block) = flags.get(i..i + 64) {
        if block.iter().fold(false, |any, &f| any | f) {
            break;
        }
        i += 64;
    }
    flags[i..].iter().position(|&f| f).map(|p| i + p)
}

/// The finding of each label (None = absent) in a slice, from scores at image resolution.
pub fn findings(scores: &Array3<f32>) -> Vec<Option<Finding>> {
    let (n, rows, cols) = scores.dim();
    let labels = label_map(scores);
    (0..n)
        .map(|l| {
            let mask = labels.mapv(|v| v as usize == l + 1);
            let best = components(&mask)
                .into_iter()
                .filter(|c| c.len() >= MIN_COMPONENT_PIXELS)
                .map(|c| {
                    let mass: f64 = c.iter().map(|&(r, cc)| scores[[l, r, cc]] as f64).sum();
                    (mass, c)
                })
                .max_by(|a, b| a.0.total_cmp(&b.0))?;
            let (mass, pixels) = best;
            let mut m = Array2::from_elem((rows, cols), false);
            let (mut sr, mut sc) = (0.0, 0.0);
            for &(r, c) in &pixels {
                m[[r, c]] = true;
                let w = scores[[l, r, c]] as f64;
                sr += w * r as f64;
                sc += w * c as f64;
            }
            Some(Finding {
                label: l,
                mask: m,
                mass,
                point: (sr / mass, sc / mass),
                confidence: mass / pixels.len() as f64,
            })
        })
        .collect()
}

/// Structures: the findings of `findings` (their masks drawn at 0.5), except where the
/// templates' layout of the structures (`shape`), and the `prior` where there is one (a
/// stack's localizer slice, `stack::prior`), place a label elsewhere — a region the
/// arg-max gave to nothing or to a look-alike neighbour: there the layout's choice among
/// the candidate regions (`shaped_findings`) is taken, mask and all.
pub fn structure_findings(
    scores: &Array3<f32>,
    shape: Option<&ShapeModel>,
    prior: Option<&Prior>,
) -> Vec<Option<Finding>> {
    let mut found = findings(scores);
    if shape.is_none() && prior.is_none() {
        return found;
    }
    let shaped = choose_by_layout(scores, shape, prior, Some(&found));
    for (f, g) in found.iter_mut().zip(shaped) {
        let Some(g) = g else { continue };
        let (r, c) = (g.point.0.round(), g.point.1.round());
        let same_region = f.as_ref().is_some_and(|f| {
            r >= 0.0
                && c >= 0.0
                && f.mask
                    .get((r as usize, c as usize))
                    .copied()
                    .unwrap_or(false)
        });
        if !same_region {
            *f = Some(g);
        }
    }
    found
}

/// Structures as `structure_findings` finds them, weighed first by the templates' `atlas`
/// when the adapter has one (its frame is placed by the structures found without it, then
/// the scores are weighed and the structures found again), and the `enclosed` ones by the
/// templates' share of them in a frame placed by the structures found around them (the
/// same first structures), with `fragments` given the foreground fragments that touch
/// them (`merge_fragments`), and the convex ones drawn as their hulls, with their ellipses
/// where the adapter has them (`convex::fill`).
pub fn structures(
    scores: &mut Array3<f32>,
    shape: Option<&ShapeModel>,
    atlas: Option<&crate::atlas::StructureAtlas>,
    enclosed: Option<&crate::enclosed::EnclosedModel>,
    fragments: bool,
    outlines: crate::convex::Outlines,
    prior: Option<&Prior>,
) -> Vec<Option<Finding>> {
    let mut found = structure_findings(scores, shape, prior);
    // Both priors are placed by the structures found without either, and the structures
    // are found again once: each search with the layout and its poses takes ≈ 10 ms per
    // chest image (`profile_adapter`).
    let weighed = atlas.map(|a| a.apply(scores, &found)).is_some();
    if enclosed.is_some_and(|e| e.apply(scores, &found)) || weighed {
        found = structure_findings(scores, shape, prior);
    }
    if fragments {
        merge_fragments(scores, &mut found);
    }
    crate::convex::fill(&mut found, outlines, scores);
    found
}

/// Gives each structure the foreground fragments that touch its region and no other's:
/// where the scores split a body between a label and its look-alike neighbours, the
/// fragments the neighbours' own regions did not take are the body's. Foreground is
/// where the labels' scores sum to at least 0.5 (the background's share is below it).
pub fn merge_fragments(scores: &Array3<f32>, found: &mut [Option<Finding>]) {
    let (_, rows, cols) = scores.dim();
    let mut owner = Array2::<u8>::zeros((rows, cols));
    for f in found.iter().flatten() {
        Zip::from(&mut owner).and(&f.mask).for_each(|o, &m| {
            if m {
                *o = (f.label + 1) as u8;
            }
        });
    }
    // The labels' sum plane by plane, in label order as pixel by pixel.
    let mut total = Array2::<f32>::zeros((rows, cols));
    for plane in scores.outer_iter() {
        total += &plane;
    }
    let orphan = Zip::from(&owner)
        .and(&total)
        .map_collect(|&o, &t| o == 0 && t >= THRESHOLD);
    for comp in components(&orphan) {
        let mut touches = 0u8;
        let mut several = false;
        for &p in &comp {
            for q in neighbours(p, (rows, cols)) {
                let o = owner[q];
                if o != 0 {
                    several |= touches != 0 && touches != o;
                    touches = o;
                }
            }
        }
        if touches == 0 || several {
            continue;
        }
        let l = touches as usize - 1;
        if let Some(f) = found.iter_mut().flatten().find(|f| f.label == l) {
            for &(r, c) in &comp {
                f.mask[[r, c]] = true;
                f.mass += scores[[l, r, c]] as f64;
            }
            let pixels = f.mask.iter().filter(|m| **m).count();
            f.confidence = f.mass / pixels as f64;
        }
    }
}

/// `cands` (per label, its own regions) and, per label with a region of its own, the
/// arg-max region of another label (`findings`) nearest to its best one, unless one of its
/// own regions holds that region's point: scored by the label's own mass there and placed
/// at the region's point. One per label: the layout tries every combination of
/// candidates (and, with a pose, every pose of each).
fn with_look_alikes(
    scores: &Array3<f32>,
    argmax: &[Option<Finding>],
    mut cands: Vec<Vec<Finding>>,
) -> Vec<Vec<Finding>> {
    for (l, cs) in cands.iter_mut().enumerate() {
        let Some(best) = cs.first() else { continue };
        let distance = |f: &Finding| (f.point.0 - best.point.0).hypot(f.point.1 - best.point.1);
        let held = |f: &Finding| {
            let p = (f.point.0.round() as usize, f.point.1.round() as usize);
            cs.iter().any(|c| c.mask.get(p).copied().unwrap_or(false))
        };
        let Some(region) = argmax
            .iter()
            .flatten()
            .filter(|f| f.label != l && !held(f))
            .min_by(|a, b| distance(a).total_cmp(&distance(b)))
        else {
            continue;
        };
        let plane = scores.index_axis(Axis(0), l);
        let (mut mass, mut pixels) = (0.0, 0usize);
        Zip::from(&region.mask).and(&plane).for_each(|&m, &s| {
            if m {
                mass += s as f64;
                pixels += 1;
            }
        });
        cs.push(Finding {
            label: l,
            mask: region.mask.clone(),
            mass,
            point: region.point,
            confidence: mass / pixels.max(1) as f64,
        });
    }
    cands
}

/// Whether a landmark's finding at `point` in another slice of a stack may vote for the
/// 3D point (`TrainConfig::stack_anchor`): when the localizer slice has the landmark
/// (`anchor`, found or filled, in-plane pixels of that slice), only findings within
/// `radius` of it in-plane do — a vertebra is where the localizer saw it, and a region of
/// the same label over a neighbour in a lateral slice is the look-alike, however strong.
pub fn near_anchor(point: (f64, f64), anchor: Option<(f64, f64)>, radius: f64) -> bool {
    anchor.is_none_or(|a| (point.0 - a.0).hypot(point.1 - a.1) <= radius)
}

/// A 3D landmark from a stack of slices: the slices whose finding carries at least half
/// the mass of the strongest one vote, weighted by mass, for (row, column, k).
pub fn landmark_3d(per_slice: &[(f64, Option<&Finding>)]) -> Option<(f64, f64, f64)> {
    let candidates: Vec<(f64, [f64; 3])> = per_slice
        .iter()
        .filter_map(|(k, f)| f.map(|f| (f.mass, [f.point.0, f.point.1, *k])))
        .collect();
    vote(&candidates).map(|p| (p[0], p[1], p[2]))
}

/// Mass-weighted mean of the points whose mass is at least half the largest: weak
/// findings on neighbouring slices do not pull the point away. Any 3D coordinates
/// (row, column, slice) or patient millimetres.
pub fn vote(candidates: &[(f64, [f64; 3])]) -> Option<[f64; 3]> {
    let max = candidates.iter().map(|c| c.0).fold(0.0, f64::max);
    if max <= 0.0 {
        return None;
    }
    let mut w = 0.0;
    let mut acc = [0.0; 3];
    for (mass, p) in candidates.iter().filter(|c| c.0 >= 0.5 * max) {
        w += mass;
        for i in 0..3 {
            acc[i] += mass * p[i];
        }
    }
    Some(acc.map(|v| v / w))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `components` finds what a plain flood fill over 2-D indices finds: the same
    /// components in the same order, each with the same pixels, listed row by row; on
    /// masks from empty to full, with blocks of 64 pixels that hold nothing, runs that
    /// cross rows, U shapes whose arms join below, and masks not in row-major memory order.
    #[test]
    fn components_equal_a_plain_flood_fill() {
        fn plain(mask: &Array2<bool>) -> Vec<Vec<(usize, usize)>> {
            let (rows, cols) = mask.dim();
            let mut seen = Array2::from_elem((rows, cols), false);
            let mut out = Vec::new();
            for r0 in 0..rows {
                for c0 in 0..cols {
                    if !mask[[r0, c0]] || seen[[r0, c0]] {
                        continue;
                    }
                    let mut comp = Vec::new();
                    let mut stack = vec![(r0, c0)];
                    seen[[r0, c0]] = true;
                    while let Some((r, c)) = stack.pop() {
                        comp.push((r, c));
                        for q in neighbours((r, c), (rows, cols)) {
                            if mask[q] && !seen[q] {
                                seen[q] = true;
                                stack.push(q);
                            }
                        }
                    }
                    comp.sort_unstable();
                    out.push(comp);
                }
            }
            out
        }
        let mut rng = crate::adapter::Rng::new(7);
        for (rows, cols, density) in [
            (1, 1, 0.5),
            (3, 200, 0.3),
            (70, 90, 0.0),
            (70, 90, 0.02),
            (70, 90, 0.45),
            (64, 64, 1.0),
            (130, 1, 0.5),
            (0, 5, 0.5),
            (5, 0, 0.5),
            // Near 8-neighbour percolation: large components that branch and merge.
            (200, 300, 0.4),
            (200, 300, 0.6),
        ] {
            let mask = Array2::from_shape_fn((rows, cols), |_| rng.uniform() < density);
            assert_eq!(
                components(&mask),
                plain(&mask),
                "{rows}×{cols} at {density}"
            );
            // Transposed: the copy keeps the transposed memory order (not row-major).
            let turned = mask.t().to_owned();
            assert!(turned.as_slice().is_none() || rows <= 1 || cols <= 1);
            assert_eq!(components(&turned), plain(&turned), "{cols}×{rows}, turned");
        }
        // Arms that meet only rows below their tops (a U, a W), runs that touch only at
        // a corner, and a spiral.
        for picture in [
            &["#...#", "#...#", "#####"][..],
            &["#.#.#", "#.#.#", "#.#.#", ".#.#."],
            &["##...", "..##.", "....#", "...#."],
            &[
                "#######", "#.....#", "#.###.#", "#.#.#.#", "#.#...#", "#.#####",
            ],
        ] {
            let mask = Array2::from_shape_fn((picture.len(), picture[0].len()), |(r, c)| {
                picture[r].as_bytes()[c] == b'#'
            });
            assert_eq!(components(&mask), plain(&mask), "{picture:?}");
        }
        let u = components(&Array2::from_shape_fn((3, 5), |(r, c)| {
            r == 2 || c == 0 || c == 4
        }));
        assert_eq!(u.len(), 1);
        assert_eq!(u[0][..3], [(0, 0), (0, 4), (1, 0)]);
    }

    #[test]
    fn the_next_flag_is_found_across_blocks() {
        let mut flags = vec![false; 200];
        assert_eq!(next_true(&flags, 0), None);
        assert_eq!(next_true(&flags, 500), None);
        for at in [0, 63, 64, 130, 199] {
            flags[at] = true;
        }
        let mut found = Vec::new();
        let mut from = 0;
        while let Some(i) = next_true(&flags, from) {
            found.push(i);
            from = i + 1;
        }
        assert_eq!(found, [0, 63, 64, 130, 199]);
    }

    /// Plane by plane, the labels and ties come out as pixel by pixel.
    #[test]
    fn the_label_map_takes_the_last_best_label_from_one_half() {
        let mut rng = crate::adapter::Rng::new(9);
        // Scores on a coarse scale, so that ties and exact halves are common.
        let scores = Array3::from_shape_fn((4, 30, 40), |_| (rng.uniform() * 8.0).floor() / 8.0);
        let map = label_map(&scores);
        for ((r, c), &got) in map.indexed_iter() {
            let mut best = (0u8, THRESHOLD);
            for l in 0..4 {
                if scores[[l, r, c]] >= best.1 {
                    best = ((l + 1) as u8, scores[[l, r, c]]);
                }
            }
            assert_eq!(got, best.0, "at {r},{c}");
        }
        assert!(map.iter().any(|&v| v == 0) && map.iter().any(|&v| v == 4));
    }

    #[test]
    fn a_body_split_with_its_neighbours_is_taken_whole() {
        // A column of bodies, 10 columns wide: label 0 at rows 2..16, label 1's body at
        // rows 22..38 whose lower half scores as label 2, label 2's own body at 44..58,
        // and a label-2 fragment between bodies 0 and 1 that touches both.
        let mut s = Array3::<f32>::zeros((3, 60, 20));
        let mut set = |l: usize, rows: std::ops::Range<usize>| {
            for r in rows {
                for c in 5..15 {
                    s[[l, r, c]] = 0.8;
                }
            }
        };
        set(0, 2..16);
        set(1, 22..30);
        set(2, 30..38);
        set(2, 44..58);
        set(2, 16..22);
        let mut found = findings(&s);
        let before: Vec<Array2<bool>> = found.iter().map(|f| f.clone().unwrap().mask).collect();
        assert!(!before[1][[34, 10]], "the lower half is not label 1's yet");
        merge_fragments(&s, &mut found);
        let after: Vec<&Array2<bool>> = found.iter().map(|f| &f.as_ref().unwrap().mask).collect();
        assert!(
            (30..38).all(|r| (5..15).all(|c| after[1][[r, c]])),
            "taken whole"
        );
        assert!(
            (16..22).all(|r| after.iter().all(|m| !m[[r, 10]])),
            "a fragment touching two bodies belongs to neither"
        );
        assert_eq!(after[0], &before[0]);
        assert_eq!(after[2], &before[2]);
        // Its confidence is the label's own mean score over the whole body.
        assert!((found[1].as_ref().unwrap().confidence - 0.4).abs() < 1e-6);
    }

    #[test]
    fn the_landmark_layout_overrides_a_stronger_but_misplaced_region() {
        // Landmarks A above B, 20 rows apart. B's score has its strongest region right
        // next to A (a look-alike) and a weaker one where the layout puts it.
        let mut s = Array3::<f32>::zeros((2, 80, 40));
        let blob = |s: &mut Array3<f32>, l: usize, r0: usize, v: f32| {
            for r in r0..r0 + 6 {
                for c in 17..23 {
                    s[[l, r, c]] = v;
                }
            }
        };
        blob(&mut s, 0, 10, 0.9);
        blob(&mut s, 1, 2, 0.95); // look-alike, 8 rows above A
        blob(&mut s, 1, 30, 0.6); // the real B
        let plain = findings(&s);
        assert!(
            plain[1].as_ref().unwrap().point.0 < 10.0,
            "arg-max takes the look-alike"
        );
        let shape = ShapeModel::fit(&[
            vec![Some((12.0, 20.0)), Some((32.0, 20.0))],
            vec![Some((14.0, 20.0)), Some((33.0, 20.0))],
        ])
        .unwrap();
        let shaped = shaped_findings(&s, Some(&shape), None);
        let b = shaped[1].as_ref().unwrap().point;
        assert!((b.0 - 32.5).abs() < 1.0, "{b:?}");
        assert!((shaped[0].as_ref().unwrap().point.0 - 12.5).abs() < 1.0);
    }

    #[test]
    fn the_structure_layout_moves_misplaced_and_missing_regions_only() {
        // Structures A, B, C stacked 20 rows apart. A is found where the layout expects it,
        // with a weak halo that a 0.25 cut would add to its mask; B's strongest region is a
        // look-alike above A; C stays under 0.5 everywhere, so the arg-max has none.
        let mut s = Array3::<f32>::zeros((3, 80, 40));
        let blob = |s: &mut Array3<f32>, l: usize, r0: usize, c: (usize, usize), v: f32| {
            for r in r0..r0 + 6 {
                for cc in c.0..c.1 {
                    s[[l, r, cc]] = v;
                }
            }
        };
        blob(&mut s, 0, 10, (14, 26), 0.3);
        blob(&mut s, 0, 10, (17, 23), 0.9);
        blob(&mut s, 1, 1, (17, 23), 0.95);
        blob(&mut s, 1, 30, (17, 23), 0.6);
        blob(&mut s, 2, 50, (17, 23), 0.4);
        let plain = findings(&s);
        assert!(plain[1].as_ref().unwrap().point.0 < 10.0);
        assert!(plain[2].is_none());
        let shape = ShapeModel::fit(&[
            vec![Some((12.0, 20.0)), Some((32.0, 20.0)), Some((52.0, 20.0))],
            vec![Some((14.0, 20.0)), Some((33.0, 20.0)), Some((54.0, 20.0))],
        ])
        .unwrap();
        let found = structure_findings(&s, Some(&shape), None);
        let a = found[0].as_ref().unwrap();
        assert_eq!(
            a.mask,
            plain[0].as_ref().unwrap().mask,
            "A keeps its 0.5 mask"
        );
        assert_eq!(a.mask.iter().filter(|m| **m).count(), 36);
        let b = found[1].as_ref().unwrap().point;
        assert!((b.0 - 32.5).abs() < 1.0, "{b:?}");
        let c = found[2].as_ref().unwrap().point;
        assert!((c.0 - 52.5).abs() < 1.0, "{c:?}");
        // No layout: the arg-max findings as they are.
        let none = structure_findings(&s, None, None);
        assert_eq!(
            none[1].as_ref().unwrap().point,
            plain[1].as_ref().unwrap().point
        );
        assert!(none[2].is_none());
    }

    /// Label `l` scored `v` on body `b` of a column of bodies (8 × 8 pixels, 20 rows apart,
    /// in a 130 × 40 image of five labels).
    fn body(s: &mut Array3<f32>, l: usize, b: usize, v: f32) {
        for r in 5 + 20 * b..13 + 20 * b {
            for c in 16..24 {
                s[[l, r, c]] = v;
            }
        }
    }

    /// The layout of three templates with structures A–E on bodies 1–5 (`body`).
    fn five_bodies_layout() -> ShapeModel {
        let templates: Vec<Vec<Option<(f64, f64)>>> = (0..3)
            .map(|t| {
                (1..=5)
                    .map(|b| Some((9.5 + 20.0 * b as f64 + t as f64, 20.0)))
                    .collect()
            })
            .collect();
        ShapeModel::fit(&templates).unwrap()
    }

    /// The rows of body `first` and the four below it (their centroids, rounded).
    fn five_bodies_from(first: usize) -> Vec<Option<f64>> {
        (first..first + 5)
            .map(|b| Some((8.5 + 20.0 * b as f64).round()))
            .collect()
    }

    #[test]
    fn a_structure_scored_as_its_neighbour_is_placed_by_the_layout() {
        // Six bodies, structures A–E on bodies 1–5 in the templates. The target's scores
        // shift the top by one (as spine case s08's): A on body 0 (the one above), B on
        // body 1 (A's) and weakly on body 2, C on bodies 2 and 3; D and E where they
        // belong. A's own scores have no region on body 1.
        let mut s = Array3::<f32>::zeros((5, 130, 40));
        body(&mut s, 0, 0, 0.9);
        body(&mut s, 1, 1, 0.9);
        body(&mut s, 1, 2, 0.35);
        body(&mut s, 2, 2, 0.6);
        body(&mut s, 2, 3, 0.8);
        body(&mut s, 3, 4, 0.8);
        body(&mut s, 4, 5, 0.8);
        let shape = five_bodies_layout();
        let row = |f: &Option<Finding>| f.as_ref().map(|f| f.point.0.round());
        // Each label from its own scores: A stays on body 0.
        let own = shaped_findings(&s, Some(&shape), None);
        assert_eq!(row(&own[0]), Some(9.0));
        let found = structure_findings(&s, Some(&shape), None);
        let rows: Vec<_> = found.iter().map(row).collect();
        assert_eq!(rows, five_bodies_from(1));
        // A took body 1, B's arg-max region, with A's own (zero) mass.
        let a = found[0].as_ref().unwrap();
        assert!(a.mask[[30, 20]] && !a.mask[[10, 20]]);
        assert_eq!(a.mass, 0.0);
    }

    #[test]
    fn a_lateral_slice_keeps_the_bodies_its_localizer_slice_found() {
        // Six bodies, structures A–E on bodies 1–5. The localizer slice scores each on its
        // own body; a lateral slice scores each more on the body above (as spine case
        // s08's slices beside k*), so the layout, the same one body up, takes the whole
        // run up by one body there — unless the localizer slice's bodies are its prior.
        let mut localizer = Array3::<f32>::zeros((5, 130, 40));
        let mut lateral = localizer.clone();
        for l in 0..5 {
            body(&mut localizer, l, l + 1, 0.9);
            body(&mut lateral, l, l, 0.9);
            body(&mut lateral, l, l + 1, 0.6);
        }
        let shape = five_bodies_layout();
        let rows = |found: &[Option<Finding>]| -> Vec<Option<f64>> {
            found
                .iter()
                .map(|f| f.as_ref().map(|f| f.point.0.round()))
                .collect()
        };
        let bodies = five_bodies_from;
        let anchor = structure_findings(&localizer, Some(&shape), None);
        assert_eq!(rows(&anchor), bodies(1));
        let alone = structure_findings(&lateral, Some(&shape), None);
        assert_eq!(rows(&alone), bodies(0));
        let prior = crate::stack::prior(&anchor);
        // 8 × 8 pixels: the equivalent radius √(64/π).
        let spread = prior.points[0].map(|p| p.spread);
        assert!((spread.unwrap() - 4.51).abs() < 0.01, "{spread:?}");
        let anchored = structure_findings(&lateral, Some(&shape), Some(&prior));
        assert_eq!(rows(&anchored), bodies(1));
        // With the prior alone (no layout) too; and a structure the localizer slice did
        // not find has no prior.
        let mut partial = anchor.clone();
        partial[4] = None;
        let prior = crate::stack::prior(&partial);
        assert!(prior.points[4].is_none());
        let anchored = structure_findings(&lateral, None, Some(&prior));
        assert_eq!(rows(&anchored)[..4], bodies(1)[..4]);
        assert_eq!(rows(&anchored)[4], bodies(0)[4]);
    }

    /// A found landmark at `point` (mass 10, no mask) in an image of `dim`.
    fn placed_finding(label: usize, point: (f64, f64), dim: (usize, usize)) -> Option<Finding> {
        Some(Finding {
            label,
            mask: Array2::from_elem(dim, false),
            mass: 10.0,
            point,
            confidence: 0.8,
        })
    }

    #[test]
    fn a_turned_target_keeps_its_layout_with_pose() {
        // Four landmarks, a 60 × 80 rectangle in the templates; the target shows it turned
        // by 15° about its centre, and D has a look-alike (as strong) where the unturned
        // layout expects D from A, B and C.
        let corners = [(40.0, 40.0), (40.0, 120.0), (100.0, 40.0), (100.0, 120.0)];
        let jitter = |t: f64| -> Vec<Option<(f64, f64)>> {
            corners.iter().map(|&(r, c)| Some((r + t, c - t))).collect()
        };
        let plain = ShapeModel::fit(&[jitter(0.0), jitter(2.0), jitter(-1.0)]).unwrap();
        let posed = plain.clone().with_pose(true);
        let turned = Pose {
            sin: 15f64.to_radians().sin(),
            cos: 15f64.to_radians().cos(),
            scale: 1.0,
            cost: 0.0,
        };
        let centre = (70.0, 80.0);
        let truth: Vec<(f64, f64)> = corners
            .iter()
            .map(|&(r, c)| {
                let d = turned.to_target([r - centre.0, c - centre.1]);
                (centre.0 + d[0], centre.1 + d[1])
            })
            .collect();
        let at = |label, point| placed_finding(label, point, (200, 200));
        // Filling D from A, B and C: the unturned layout misses it, the posed one does not.
        let fill = |shape: &ShapeModel| {
            let mut found: Vec<Option<Finding>> = truth[..3]
                .iter()
                .enumerate()
                .map(|(l, &p)| at(l, p))
                .chain([None])
                .collect();
            fill_from_layout(&mut found, shape, 10.0, (200, 200));
            found[3].as_ref().expect("D filled").point
        };
        let off = |p: (f64, f64)| (p.0 - truth[3].0).hypot(p.1 - truth[3].1);
        let decoy = fill(&plain);
        assert!(off(decoy) > 10.0, "{decoy:?} vs {:?}", truth[3]);
        assert!(off(fill(&posed)) < 2.0, "{:?}", fill(&posed));
        // Choosing among D's two regions: the look-alike fits the unturned layout, the
        // true D the turned one.
        let mut s = Array3::<f32>::zeros((4, 200, 200));
        let mut blob = |l: usize, p: (f64, f64)| {
            let (r0, c0) = (p.0.round() as usize - 3, p.1.round() as usize - 3);
            for r in r0..r0 + 6 {
                for c in c0..c0 + 6 {
                    s[[l, r, c]] = 0.9;
                }
            }
        };
        for (l, &p) in truth.iter().enumerate() {
            blob(l, p);
        }
        blob(3, decoy);
        let d = |shape: &ShapeModel| {
            shaped_findings(&s, Some(shape), None)[3]
                .as_ref()
                .unwrap()
                .point
        };
        assert!(off(d(&plain)) > 10.0, "{:?}", d(&plain));
        assert!(off(d(&posed)) < 2.0, "{:?}", d(&posed));
        // The other three are found either way.
        let found = shaped_findings(&s, Some(&posed), None);
        for (f, t) in found.iter().zip(&truth).take(3) {
            let p = f.as_ref().unwrap().point;
            assert!((p.0 - t.0).hypot(p.1 - t.1) < 2.0, "{p:?} vs {t:?}");
        }
    }

    #[test]
    fn the_layout_fills_a_landmark_between_found_neighbours_only() {
        // A, B, C stacked 30 rows apart in the templates.
        let shape = ShapeModel::fit(&[
            vec![Some((10.0, 50.0)), Some((40.0, 51.0)), Some((70.0, 50.0))],
            vec![Some((12.0, 48.0)), Some((43.0, 49.0)), Some((72.0, 49.0))],
            vec![Some((11.0, 52.0)), Some((40.0, 52.0)), Some((71.0, 53.0))],
        ])
        .unwrap();
        let at = |label, point| placed_finding(label, point, (100, 100));
        // B between found A and C: placed between them, with no mass of its own.
        let mut found = vec![at(0, (20.0, 60.0)), None, at(2, (80.0, 60.0))];
        fill_from_layout(&mut found, &shape, 10.0, (100, 100));
        let b = found[1].as_ref().expect("B filled");
        assert!(
            (b.point.0 - 50.0).abs() < 2.0 && (b.point.1 - 60.5).abs() < 2.0,
            "{:?}",
            b.point
        );
        assert!(b.mass < 1e-3 && b.confidence == 0.0);
        assert_eq!(
            found[0].as_ref().unwrap().point,
            (20.0, 60.0),
            "found ones stay"
        );
        // From one neighbour the estimate is too loose: B stays absent.
        let mut one = vec![at(0, (20.0, 60.0)), None, None];
        fill_from_layout(&mut one, &shape, 10.0, (100, 100));
        assert!(one[1].is_none() && one[2].is_none());
        // A position outside the image is not invented.
        let mut outside = vec![None, at(1, (5.0, 60.0)), at(2, (35.0, 60.0))];
        fill_from_layout(&mut outside, &shape, 10.0, (100, 100));
        assert!(outside[0].is_none());
        // A layout for other labels changes nothing.
        let mut other = vec![at(0, (20.0, 60.0)), None];
        fill_from_layout(&mut other, &shape, 10.0, (100, 100));
        assert!(other[1].is_none());
    }

    #[test]
    fn a_filled_landmark_takes_its_depth_from_the_landmarks_the_slice_saw() {
        // B's offset to A varies half as much in the templates as its offset to C.
        let mut std = vec![vec![[3.0, 3.0]; 3]; 3];
        std[0][1] = [2.0, 2.0];
        std[2][1] = [4.0, 4.0];
        let shape = ShapeModel {
            mean: vec![vec![[0.0, 0.0]; 3]; 3],
            std,
            pose: false,
        };
        let depths = [Some(10.0), Some(30.0), Some(20.0)];
        let fill = |placed: [Option<bool>; 3], mut d: Vec<Option<f64>>| {
            fill_depths(&shape, &placed, &mut d);
            d
        };
        let (seen, filled) = (Some(false), Some(true));
        // A weighs 1/2² per axis, C 1/4²: (0.5 · 10 + 0.125 · 20) / 0.625.
        let b = fill([seen, filled, seen], depths.to_vec())[1].unwrap();
        assert!((b - 12.0).abs() < 1e-9, "{b}");
        assert_eq!(fill([seen, seen, seen], depths.to_vec()), depths.to_vec());
        // A filled landmark's depth is not used for another's.
        let d = fill([filled, filled, seen], depths.to_vec());
        assert!(d.iter().all(|d| (d.unwrap() - 20.0).abs() < 1e-9), "{d:?}");
        // Nothing seen, or no depth to replace: nothing changes.
        let d = fill([filled, filled, None], depths.to_vec());
        assert_eq!(d, depths.to_vec());
        let d = fill([seen, filled, seen], vec![Some(10.0), None, Some(20.0)]);
        assert_eq!(d, vec![Some(10.0), None, Some(20.0)]);
        // A layout for another number of landmarks changes nothing.
        let mut two = vec![Some(10.0), Some(30.0)];
        fill_depths(&shape, &[seen, filled], &mut two);
        assert_eq!(two, vec![Some(10.0), Some(30.0)]);
    }

    #[test]
    fn the_alignment_prior_picks_among_look_alikes_but_never_removes_a_landmark() {
        // One landmark, two look-alike regions: the stronger at row 10, the other at 40.
        let mut s = Array3::<f32>::zeros((1, 80, 40));
        for (r0, v) in [(10, 0.9), (40, 0.7)] {
            for r in r0..r0 + 6 {
                for c in 17..23 {
                    s[[0, r, c]] = v;
                }
            }
        }
        let at = |row: f64| Prior {
            points: vec![Some(crate::align::PriorPoint {
                point: (row, 20.0),
                spread: 8.0,
            })],
        };
        let row = |f: &[Option<Finding>]| f[0].as_ref().map(|f| f.point.0);
        assert!((row(&findings(&s)).unwrap() - 12.5).abs() < 1.0);
        let near_second = shaped_findings(&s, None, Some(&at(44.0)));
        assert!((row(&near_second).unwrap() - 42.5).abs() < 1.0);
        // A prior far from both: the stronger region stays, the landmark is not dropped.
        let far = shaped_findings(&s, None, Some(&at(200.0)));
        assert!((row(&far).unwrap() - 12.5).abs() < 1.0);
    }

    #[test]
    fn guided_refinement_moves_a_blurred_border_to_the_intensity_edge() {
        // A bright square (rows/cols 20..40) and a score that ramps over 12 pixels across
        // its border, as bilinear upsampling of a coarse grid does, centred 3 px outside.
        let guide = Array2::from_shape_fn((60, 60), |(r, c)| {
            if (20..40).contains(&r) && (20..40).contains(&c) {
                0.9
            } else {
                0.1
            }
        });
        let ramp = |x: usize| {
            // distance outside the square (negative inside), centre of the ramp at +3
            let d = if x < 20 {
                20.0 - x as f32
            } else if x >= 40 {
                x as f32 - 39.0
            } else {
                -1.0
            };
            (0.5 - (d - 3.0) / 12.0).clamp(0.0, 1.0)
        };
        let mut s = Array3::from_shape_fn((1, 60, 60), |(_, r, c)| ramp(r).min(ramp(c)));
        let before = label_map(&s).iter().filter(|v| **v == 1).count();
        guided_refine(&mut s, &guide, 4, 1e-2);
        let labels = label_map(&s);
        let after = labels.iter().filter(|v| **v == 1).count();
        let inside = labels
            .indexed_iter()
            .filter(|((r, c), v)| **v == 1 && (20..40).contains(r) && (20..40).contains(c))
            .count();
        // IoU with the square (400 pixels; the blurred region spills over its border).
        let iou_before = 400.0 / before as f64;
        let iou_after = inside as f64 / (after + 400 - inside) as f64;
        assert!(
            iou_after >= 0.85 && iou_after > iou_before + 0.15,
            "IoU {iou_before:.2} -> {iou_after:.2}"
        );
    }

    #[test]
    fn guided_refinement_gives_the_same_bits_on_any_number_of_threads() {
        let guide = Array2::from_shape_fn((40, 50), |(r, c)| ((r * 7 + c * 13) % 17) as f32 / 17.0);
        let scores = Array3::from_shape_fn((5, 40, 50), |(l, r, c)| {
            ((l * 11 + r * 3 + c * 5) % 23) as f32 / 23.0
        });
        let refined = |threads| {
            let mut s = scores.clone();
            guided_refine_on(&mut s, &guide, 3, 1e-2, threads);
            s
        };
        let one = refined(1);
        assert_ne!(one, scores, "nothing was refined");
        for threads in [2, 3, 5, 8] {
            let many = refined(threads);
            assert!(crate::same_bits(&one, &many), "{threads} threads");
        }
    }

    #[test]
    fn keeps_the_strongest_component_and_drops_specks() {
        let mut s = Array3::<f32>::zeros((2, 40, 40));
        // Label 0: a big blob (rows 5..15, cols 5..15) and a smaller one.
        for r in 5..15 {
            for c in 5..15 {
                s[[0, r, c]] = 0.9;
            }
        }
        for r in 30..34 {
            for c in 30..34 {
                s[[0, r, c]] = 0.95;
            }
        }
        // Label 1: only a 2×2 speck.
        for r in 20..22 {
            for c in 20..22 {
                s[[1, r, c]] = 0.99;
            }
        }
        let f = findings(&s);
        let f0 = f[0].as_ref().expect("label 0 found");
        assert_eq!(f0.mask.iter().filter(|v| **v).count(), 100);
        assert!((f0.point.0 - 9.5).abs() < 1e-9 && (f0.point.1 - 9.5).abs() < 1e-9);
        assert!(f[1].is_none(), "a speck is not a finding");
    }

    #[test]
    fn below_threshold_is_absent() {
        let s = Array3::<f32>::from_elem((1, 10, 10), 0.49);
        assert!(findings(&s)[0].is_none());
    }

    #[test]
    fn landmark_3d_weights_strong_slices() {
        let mk = |mass: f64, r: f64| Finding {
            label: 0,
            mask: Array2::from_elem((1, 1), true),
            mass,
            point: (r, 0.0),
            confidence: 1.0,
        };
        let a = mk(10.0, 100.0);
        let b = mk(10.0, 110.0);
        let weak = mk(1.0, 0.0);
        let p = landmark_3d(&[
            (5.0, Some(&a)),
            (10.0, Some(&b)),
            (15.0, Some(&weak)),
            (20.0, None),
        ])
        .unwrap();
        assert_eq!(p, (105.0, 0.0, 7.5));
        assert!(landmark_3d(&[(1.0, None)]).is_none());
        // Near the localizer slice's point, or anywhere when it has none.
        assert!(near_anchor((10.0, 10.0), Some((16.0, 18.0)), 10.0));
        assert!(!near_anchor((10.0, 10.0), Some((16.0, 19.0)), 10.0));
        assert!(near_anchor((10.0, 10.0), None, 10.0));
    }
}

/// How landmarks sit relative to each other in the templates: per ordered pair (i, j)
/// the mean and spread of the offset from i to j, in image pixels (row, column). Pixels,
/// not millimetres: the templates and the images it is applied to must share a pixel
/// scale (true of the shipped data sets; a caveat for localizers of other resolutions).
///
/// With `pose`, the layout is compared in the target's pose: the offsets seen are turned
/// and scaled back by the pose (`POSE_ROTATIONS_DEG` × `POSE_SCALES`) that explains them
/// best, each pose costing its distance from the templates' own, so a patient lying
/// turned or a larger field of view does not make the true set implausible.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShapeModel {
    pub mean: Vec<Vec<[f64; 2]>>,
    pub std: Vec<Vec<[f64; 2]>>,
    #[serde(default)]
    pub pose: bool,
}

/// The in-plane rotations (degrees) and scales a target may have relative to the
/// templates under `ShapeModel::pose`, every combination of them.
const POSE_ROTATIONS_DEG: [f64; 17] = [
    -20.0, -17.5, -15.0, -12.5, -10.0, -7.5, -5.0, -2.5, 0.0, 2.5, 5.0, 7.5, 10.0, 12.5, 15.0,
    17.5, 20.0,
];
const POSE_SCALES: [f64; 3] = [0.9, 1.0, 1.1];
/// A pose turned by 10°, or scaled by 10 %, costs as much as one pair's 1 σ displacement.
const POSE_SPREAD_DEG: f64 = 10.0;
const POSE_SPREAD_LOG_SCALE: f64 = 0.1;

/// A target's pose relative to the templates: offsets in the target are the templates'
/// turned by the angle and multiplied by the scale.
#[derive(Debug, Clone, Copy)]
struct Pose {
    sin: f64,
    cos: f64,
    scale: f64,
    /// −log prior plausibility of the pose.
    cost: f64,
}

impl Pose {
    const IDENTITY: Pose = Pose {
        sin: 0.0,
        cos: 1.0,
        scale: 1.0,
        cost: 0.0,
    };

    /// A templates' offset (rows, columns) as the target shows it.
    fn to_target(self, d: [f64; 2]) -> [f64; 2] {
        [
            self.scale * (self.cos * d[0] + self.sin * d[1]),
            self.scale * (-self.sin * d[0] + self.cos * d[1]),
        ]
    }

    /// A target's offset as the templates would show it (`to_target` undone).
    fn to_template(self, d: [f64; 2]) -> [f64; 2] {
        [
            (self.cos * d[0] - self.sin * d[1]) / self.scale,
            (self.sin * d[0] + self.cos * d[1]) / self.scale,
        ]
    }
}

/// Candidate regions kept per landmark, and the score threshold that makes them: lower
/// than `THRESHOLD`, so that a landmark whose region lost the arg-max to a neighbour
/// still has it as a candidate.
const SHAPE_CANDIDATES: usize = 4;
const SHAPE_THRESHOLD: f32 = 0.25;
/// Log-plausibility of leaving a landmark out: as unlikely as a 4.5 σ displacement.
const ABSENT_COST: f64 = 10.0;
/// The alignment prior's cost saturates at 3 σ: a wrong alignment can tip a choice
/// between candidates, not outweigh a much stronger one.
const PRIOR_CAP: f64 = 4.5;

fn prior_cost(prior: &Prior, l: usize, p: (f64, f64)) -> f64 {
    prior.points[l].map_or(0.0, |q| {
        let d = (p.0 - q.point.0).hypot(p.1 - q.point.1) / q.spread;
        (0.5 * d * d).min(PRIOR_CAP)
    })
}

impl ShapeModel {
    /// From the landmark points of the templates (one Vec per template, one entry per
    /// landmark). None when fewer than two templates have a landmark pair.
    pub fn fit(points: &[Vec<Option<(f64, f64)>>]) -> Option<ShapeModel> {
        let n = points.first()?.len();
        let mut mean = vec![vec![[0.0; 2]; n]; n];
        // A spread of 0 marks a pair the templates do not show (JSON has no infinity).
        let mut std = vec![vec![[0.0; 2]; n]; n];
        let mut any = false;
        for i in 0..n {
            for j in 0..n {
                let offs: Vec<[f64; 2]> = points
                    .iter()
                    .filter_map(|t| Some((t.get(i).copied()??, t.get(j).copied()??)))
                    .map(|(a, b)| [b.0 - a.0, b.1 - a.1])
                    .collect();
                if i == j || offs.len() < 2 {
                    continue;
                }
                any = true;
                for d in 0..2 {
                    let m = offs.iter().map(|o| o[d]).sum::<f64>() / offs.len() as f64;
                    let v = offs.iter().map(|o| (o[d] - m).powi(2)).sum::<f64>()
                        / (offs.len() - 1) as f64;
                    mean[i][j][d] = m;
                    // Few templates under-estimate the spread: floor it by a share of
                    // the distance, so that another patient's proportions still fit.
                    let dist = (mean[i][j][0].powi(2) + mean[i][j][1].powi(2)).sqrt();
                    std[i][j][d] = v.sqrt().max(0.15 * dist + 3.0);
                }
            }
        }
        any.then_some(ShapeModel {
            mean,
            std,
            pose: false,
        })
    }

    /// The same layout, compared in the target's pose when `pose` (see the type).
    pub fn with_pose(self, pose: bool) -> ShapeModel {
        ShapeModel { pose, ..self }
    }

    /// The in-plane turn (sin, cos) of the pose that explains `points` (per label, None =
    /// absent) best: a direction of the templates, d, shows in the target as (d_r·cos +
    /// d_c·sin, −d_r·sin + d_c·cos). No turn without `pose`.
    pub fn turn(&self, points: &[Option<(f64, f64)>]) -> (f64, f64) {
        let (_, pose) = self.set_cost(&self.poses(), points);
        (pose.sin, pose.cos)
    }

    /// The poses a target may take: the templates' own only, unless `pose`.
    fn poses(&self) -> Vec<Pose> {
        if !self.pose {
            return vec![Pose::IDENTITY];
        }
        let mut out = Vec::new();
        for deg in POSE_ROTATIONS_DEG {
            for scale in POSE_SCALES {
                let (sin, cos) = deg.to_radians().sin_cos();
                let (r, z) = (deg / POSE_SPREAD_DEG, scale.ln() / POSE_SPREAD_LOG_SCALE);
                out.push(Pose {
                    sin,
                    cos,
                    scale,
                    cost: 0.5 * (r * r + z * z),
                });
            }
        }
        out
    }

    /// −log plausibility of a set of points (None = absent) in the pose that explains
    /// them best, and that pose.
    fn set_cost(&self, poses: &[Pose], points: &[Option<(f64, f64)>]) -> (f64, Pose) {
        let mut best = (f64::INFINITY, Pose::IDENTITY);
        for pose in poses {
            let mut total = pose.cost;
            for (i, a) in points.iter().enumerate() {
                for (j, b) in points.iter().enumerate().skip(i + 1) {
                    if let (Some(a), Some(b)) = (a, b) {
                        total += self.cost(i, j, *a, *b, pose);
                    }
                }
            }
            if total < best.0 {
                best = (total, *pose);
            }
        }
        best
    }

    /// Whether the model is an n × n table of finite means and spreads (a damaged or
    /// hand-edited adapter file is refused at load instead of panicking here).
    pub fn fits(&self, n: usize) -> bool {
        let square = |t: &Vec<Vec<[f64; 2]>>| {
            t.len() == n
                && t.iter()
                    .all(|row| row.len() == n && row.iter().flatten().all(|v| v.is_finite()))
        };
        square(&self.mean) && square(&self.std)
    }

    /// How much landmark j's position weighs when the layout places landmark l from it:
    /// the inverse variance of their offset per axis, in the templates' pose; None for
    /// l itself or an unknown pair.
    fn fill_weights(&self, j: usize, l: usize) -> Option<[f64; 2]> {
        let s = self.std[j][l];
        (j != l && s[0] > 0.0 && s[1] > 0.0).then(|| [1.0 / (s[0] * s[0]), 1.0 / (s[1] * s[1])])
    }

    /// −log plausibility of points i and j in a target of pose `pose` (0 when the pair
    /// is unknown).
    fn cost(&self, i: usize, j: usize, a: (f64, f64), b: (f64, f64), pose: &Pose) -> f64 {
        let (m, s) = (self.mean[i][j], self.std[i][j]);
        if s[0] <= 0.0 || s[1] <= 0.0 {
            return 0.0;
        }
        let d = pose.to_template([b.0 - a.0, b.1 - a.1]);
        0.5 * (((d[0] - m[0]) / s[0]).powi(2) + ((d[1] - m[1]) / s[1]).powi(2))
    }
}

/// Landmarks with no region take the position the aligned templates give them, when it
/// lies in the image (`placed`).
pub fn fill_from_prior(found: &mut [Option<Finding>], prior: &Prior, dim: (usize, usize)) {
    for (label, (f, p)) in found.iter_mut().zip(&prior.points).enumerate() {
        let Some(p) = p else { continue };
        if f.is_none() {
            *f = placed(label, p.point, dim);
        }
    }
}

/// A landmark placed without a region of its own (by the aligned templates, the layout
/// or a structure's extreme, `extremes::refine_findings`): no mask, the least mass there
/// is (a region found in another slice of the stack outweighs it in `landmark_3d`),
/// confidence 0; None outside the image.
pub(crate) fn placed(label: usize, point: (f64, f64), dim: (usize, usize)) -> Option<Finding> {
    let (r, c) = point;
    let inside = r >= -0.5 && c >= -0.5 && r <= dim.0 as f64 - 0.5 && c <= dim.1 as f64 - 0.5;
    inside.then(|| Finding {
        label,
        mask: Array2::from_elem(dim, false),
        mass: 1e-6,
        point,
        confidence: 0.0,
    })
}

/// Landmarks with no region take the position the templates' layout gives them from the
/// landmarks that were found — per axis the spread-weighted mean of (found point + mean
/// offset) — when the combined spread of that estimate is within `tolerance` pixels and
/// the position lies in the image. Between two found neighbours a landmark is pinned
/// down; from one neighbour, or from far ones, it stays absent (`placed`).
pub fn fill_from_layout(
    found: &mut [Option<Finding>],
    shape: &ShapeModel,
    tolerance: f64,
    dim: (usize, usize),
) {
    let n = found.len();
    if !shape.fits(n) {
        return;
    }
    let points: Vec<Option<(f64, f64)>> =
        found.iter().map(|f| f.as_ref().map(|f| f.point)).collect();
    // The pose the found landmarks show (the templates' own from fewer than two).
    let pose = if points.iter().flatten().count() >= 2 {
        shape.set_cost(&shape.poses(), &points).1
    } else {
        Pose::IDENTITY
    };
    for (l, f) in found.iter_mut().enumerate() {
        if f.is_some() {
            continue;
        }
        let mut weighted = [0.0f64; 2];
        let mut weights = [0.0f64; 2];
        for (j, p) in points.iter().enumerate() {
            let (Some(p), Some(w)) = (p, shape.fill_weights(j, l)) else {
                continue;
            };
            // The spreads stay along the image's axes: the poses turn by at most 20°.
            let m = pose.to_target(shape.mean[j][l]);
            for (d, q) in [p.0, p.1].into_iter().enumerate() {
                let w = w[d] / (pose.scale * pose.scale);
                weighted[d] += w * (q + m[d]);
                weights[d] += w;
            }
        }
        if weights[0] <= 0.0 || weights[1] <= 0.0 {
            continue;
        }
        let spread = (1.0 / weights[0] + 1.0 / weights[1]).sqrt();
        if spread <= tolerance {
            *f = placed(l, (weighted[0] / weights[0], weighted[1] / weights[1]), dim);
        }
    }
}

/// The through-plane position (slice index, or mm along the slices' normal) of landmark
/// `l` in a stack whose localizer slice had to fill it (`fill_from_layout`): the mean of
/// the `depths` of the landmarks that slice did see, each weighted as the fill weighed
/// it (both axes' weights summed). Voted from the stack's other slices alone, a landmark
/// the localizer slice missed takes the depth of the slices where it was found, which
/// lie to one side of its centre. The layout holds no through-plane offsets, so the
/// landmarks are taken to lie near one plane — the one the localizer slice was placed
/// through. None when no seen landmark has a depth.
fn depth_from_layout(shape: &ShapeModel, depths: &[Option<f64>], l: usize) -> Option<f64> {
    if !shape.fits(depths.len()) {
        return None;
    }
    let (sum, weight) = depths
        .iter()
        .enumerate()
        .filter_map(|(j, d)| Some((d.as_ref()?, shape.fill_weights(j, l)?)))
        .fold((0.0, 0.0), |(s, ws), (d, w)| {
            (s + (w[0] + w[1]) * d, ws + w[0] + w[1])
        });
    (weight > 0.0).then(|| sum / weight)
}

/// A stack's 3D landmarks with the depths of those its localizer slice had to fill
/// replaced by `depth_from_layout`'s; `placed[l]` tells how that slice had landmark l
/// (Some(false): in a region of its own, Some(true): placed there without one by the
/// layout or the aligned templates, None: not at all). Only depths the slice saw count.
pub fn fill_depths(shape: &ShapeModel, placed: &[Option<bool>], depths: &mut [Option<f64>]) {
    let seen: Vec<Option<f64>> = depths
        .iter()
        .zip(placed)
        .map(|(d, p)| d.filter(|_| *p == Some(false)))
        .collect();
    for (l, (d, p)) in depths.iter_mut().zip(placed).enumerate() {
        if d.is_some() && *p == Some(true) {
            if let Some(filled) = depth_from_layout(shape, &seen, l) {
                *d = Some(filled);
            }
        }
    }
}

/// Like `findings`, but chooses each landmark among several candidate regions so that
/// the whole set is plausible (pictorial structures, exhaustive over the small sets):
/// maximises Σ ln(mass) − Σ pair costs (layout of the templates) − Σ prior costs
/// (distance to where the aligned templates put the landmark), a landmark left out
/// costing `ABSENT_COST`.
pub fn shaped_findings(
    scores: &Array3<f32>,
    shape: Option<&ShapeModel>,
    prior: Option<&Prior>,
) -> Vec<Option<Finding>> {
    choose_by_layout(scores, shape, prior, None)
}

/// `shaped_findings`; given the arg-max findings (`look_alikes`), each label may also take
/// another label's arg-max region (scored by its own mass there, `with_look_alikes`):
/// where the scores shift a run of look-alike structures by one (a vertebral body scored
/// as its neighbour), the region the label belongs to is then among its candidates, and
/// the layout can place it there.
fn choose_by_layout(
    scores: &Array3<f32>,
    shape: Option<&ShapeModel>,
    prior: Option<&Prior>,
    look_alikes: Option<&[Option<Finding>]>,
) -> Vec<Option<Finding>> {
    let (n, rows, cols) = scores.dim();
    let shape = shape.filter(|s| s.mean.len() == n);
    let prior = prior.filter(|p| p.points.len() == n);
    if shape.is_none() && prior.is_none() {
        return findings(scores);
    }
    let cands: Vec<Vec<Finding>> = (0..n)
        .map(|l| {
            let plane = scores.index_axis(Axis(0), l);
            let mask = plane.mapv(|s| s >= SHAPE_THRESHOLD);
            let mut found: Vec<(f64, Vec<(usize, usize)>)> = components(&mask)
                .into_iter()
                .filter(|c| c.len() >= MIN_COMPONENT_PIXELS)
                .map(|c| (c.iter().map(|&(r, cc)| plane[[r, cc]] as f64).sum(), c))
                .collect();
            found.sort_by(|a, b| b.0.total_cmp(&a.0));
            found.truncate(SHAPE_CANDIDATES);
            // Masks only for the candidates kept: each is a whole image.
            found
                .into_iter()
                .map(|(mass, c)| {
                    let mut m = Array2::from_elem((rows, cols), false);
                    let (mut sr, mut sc) = (0.0, 0.0);
                    for &(r, cc) in &c {
                        m[[r, cc]] = true;
                        let w = plane[[r, cc]] as f64;
                        sr += w * r as f64;
                        sc += w * cc as f64;
                    }
                    Finding {
                        label: l,
                        mask: m,
                        mass,
                        point: (sr / mass, sc / mass),
                        confidence: mass / c.len() as f64,
                    }
                })
                .collect()
        })
        .collect();
    let cands = match look_alikes {
        Some(argmax) => with_look_alikes(scores, argmax, cands),
        None => cands,
    };
    // Relative to each landmark's best-placed candidate: the prior ranks candidates, it
    // never makes leaving a landmark out more attractive.
    let prior_costs: Vec<Vec<f64>> = cands
        .iter()
        .enumerate()
        .map(|(l, cs)| {
            let c: Vec<f64> = cs
                .iter()
                .map(|c| prior.map_or(0.0, |p| prior_cost(p, l, c.point)))
                .collect();
            let min = c.iter().copied().fold(f64::INFINITY, f64::min);
            c.iter().map(|v| v - min).collect()
        })
        .collect();
    let poses = shape.map_or_else(Vec::new, |s| s.poses());
    // The chosen points, refilled per combination (the loop visits up to 5ⁿ of them).
    let mut points: Vec<Option<(f64, f64)>> = vec![None; n];
    // choice[l] = candidate index, or cands[l].len() for "absent".
    let mut choice = vec![0usize; n];
    let mut best: Option<(f64, Vec<usize>)> = None;
    loop {
        let mut total = 0.0;
        for l in 0..n {
            total += match cands[l].get(choice[l]) {
                Some(c) => c.mass.max(1.0).ln() - prior_costs[l][choice[l]],
                None => -ABSENT_COST,
            };
        }
        if let Some(shape) = shape {
            for (l, p) in points.iter_mut().enumerate() {
                *p = cands[l].get(choice[l]).map(|c| c.point);
            }
            total -= shape.set_cost(&poses, &points).0;
        }
        if best.as_ref().is_none_or(|(s, _)| total > *s) {
            best = Some((total, choice.clone()));
        }
        // Next combination (odometer).
        let mut l = 0;
        while l < n {
            choice[l] += 1;
            if choice[l] <= cands[l].len() {
                break;
            }
            choice[l] = 0;
            l += 1;
        }
        if l == n {
            break;
        }
    }
    let picked = best.map(|b| b.1).unwrap_or_default();
    let mut cands = cands;
    (0..n)
        .map(|l| {
            let k = *picked.get(l)?;
            (k < cands[l].len()).then(|| cands[l].swap_remove(k))
        })
        .collect()
}
