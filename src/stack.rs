//! How far a structure reaches past its section in a stack's localizer slice (issue #7).
//! A vertebral body cut by a lateral slice of a sagittal stack is a section nearer its
//! side, and such a section lies within the section through its middle: in the templates
//! (spine-mr, first five cases) the bodies' lateral sections lie within 1–5 pixels of
//! their section in slice k* for 99 % of their pixels. A region of the body's label that
//! reaches further out in a lateral slice is the adapter's spill into the soft tissue or a
//! neighbour around it. The reach is learned per structure from the templates' stacks (a
//! structure whose sections do not nest gets the larger reach its templates show), as a
//! share of the section's equivalent radius so that it keeps to another field of view.
//! The same centre slice also places the structures of the others (`prior`).

use ndarray::{Array2, Array3, Zip};

use crate::adapter::Adapter;
use crate::align::Prior;
use crate::postprocess::{self, Finding};

/// What a stack's centre slice passes on to the structures of its other slices, with
/// `TrainConfig::stack_anchor`: the layout prior (`prior`) and where
/// each structure's region may stay (`allowed`, `cut`). `scout eval` and the agent both take a
/// stack's structures through it, centre slice first.
#[derive(Debug, Default)]
pub struct Anchor {
    prior: Option<Prior>,
    allowed: Vec<Option<Array2<bool>>>,
}

impl Anchor {
    /// The structures of one slice from its upsampled `scores` (labels × rows × columns,
    /// changed in place), post-processed as `adapter` was trained to; `cell`: the side of
    /// a score cell in image pixels (`cell_side`).
    pub fn structures(
        &mut self,
        scores: &mut Array3<f32>,
        adapter: Option<&Adapter>,
        centre: bool,
        cell: f64,
    ) -> Vec<Option<Finding>> {
        let mut found = postprocess::structures(
            scores,
            adapter.and_then(|a| a.shape.as_ref()),
            adapter.and_then(|a| a.atlas.as_ref()),
            adapter.and_then(|a| a.enclosed.as_ref()),
            adapter.is_some_and(|a| a.train.fragments),
            adapter.map_or(&[][..], |a| &a.convex[..]),
            self.prior.as_ref(),
        );
        cut(&mut found, &self.allowed, scores);
        if let (true, Some(a)) = (centre, adapter.filter(|a| a.train.stack_anchor)) {
            self.prior = Some(prior(&found));
            self.allowed = allowed(&found, &a.stack_reach, cell);
        }
        found
    }
}

/// With `TrainConfig::stack_anchor`, the structures the stack's localizer slice found, as
/// the prior of its other slices' layout: each centred where the localizer slice has it,
/// with its equivalent radius (√(area/π)) as the spread. A body lies where the localizer
/// slice saw it in the slices beside it too, so a candidate a whole body away (a run of
/// look-alikes taken one body up or down) lies ≈ 2.4 σ off for a body seen whole (spine
/// s08), while the outline a lateral slice cuts through the same body moves its centre by
/// far less.
pub fn prior(anchor: &[Option<Finding>]) -> Prior {
    Prior {
        points: anchor
            .iter()
            .map(|f| {
                let f = f.as_ref()?;
                let pixels = f.mask.iter().filter(|m| **m).count();
                Some(crate::align::PriorPoint {
                    point: f.point,
                    spread: equivalent_radius(pixels).max(1.0),
                })
            })
            .collect(),
    }
}

/// The radius of a disk of `pixels` pixels, √(pixels/π): a section's size, whatever its
/// shape.
fn equivalent_radius(pixels: usize) -> f64 {
    (pixels as f64 / std::f64::consts::PI).sqrt()
}

/// The share of a structure's off-centre pixels the learned reach must hold, per template.
const HELD: f64 = 0.99;

/// Per structure (`values`, label values in score order), how far its sections in a
/// stack's other slices reach past its section in the centre slice: the largest, over the
/// templates, of the distance that holds `HELD` of those pixels, divided by the centre
/// section's equivalent radius √(area/π). `stacks`: each template's label maps in slice
/// order and the index of its centre slice. None for a structure no template shows both
/// in its centre slice and in another.
pub fn learn_reach<'a>(
    stacks: impl Iterator<Item = (Vec<&'a Array2<u8>>, usize)>,
    values: &[u8],
) -> Vec<Option<f64>> {
    let mut reach: Vec<Option<f64>> = vec![None; values.len()];
    for (maps, center) in stacks {
        let Some(middle) = maps.get(center) else {
            continue;
        };
        for (l, &v) in values.iter().enumerate() {
            let section = middle.mapv(|x| x == v);
            let area = section.iter().filter(|m| **m).count();
            if area == 0 {
                continue;
            }
            let distance = distance_outside(&section);
            let mut d: Vec<f32> = maps
                .iter()
                .enumerate()
                .filter(|(i, m)| *i != center && m.dim() == section.dim())
                .flat_map(|(_, m)| {
                    Zip::from(*m)
                        .and(&distance)
                        .fold(Vec::new(), |mut acc, &x, &dist| {
                            if x == v {
                                acc.push(dist);
                            }
                            acc
                        })
                })
                .collect();
            if d.is_empty() {
                continue;
            }
            d.sort_by(f32::total_cmp);
            // Nearest rank: the smallest distance that holds `HELD` of the pixels.
            let rank = ((HELD * d.len() as f64).ceil() as usize).clamp(1, d.len());
            let share = d[rank - 1] as f64 / equivalent_radius(area);
            reach[l] = Some(reach[l].map_or(share, |r: f64| r.max(share)));
        }
    }
    reach
}

/// Per structure, where its region may stay in the stack's other slices: within its
/// centre-slice finding, grown by `reach` × the finding's equivalent radius plus `slack`
/// pixels (the centre slice's own outline is a cell or so off). None where the centre
/// slice found nothing or nothing was learned: the region stays as it is.
pub fn allowed(
    centre: &[Option<Finding>],
    reach: &[Option<f64>],
    slack: f64,
) -> Vec<Option<Array2<bool>>> {
    centre
        .iter()
        .zip(reach.iter().chain(std::iter::repeat(&None)))
        .map(|(f, r)| {
            let (f, r) = (f.as_ref()?, (*r)?);
            let area = f.mask.iter().filter(|m| **m).count();
            if area == 0 {
                return None;
            }
            let grow = r * equivalent_radius(area) + slack;
            Some(distance_outside(&f.mask).mapv(|d| f64::from(d) <= grow))
        })
        .collect()
}

/// The side of a cell of `scores` (labels × cells) over a slice of `rows` × `cols`
/// pixels, the larger of its two: how far a region's outline may be off for the grid
/// alone.
pub fn cell_side(scores: &Array3<f32>, rows: usize, cols: usize) -> f64 {
    let (_, h, w) = scores.dim();
    let (a, b) = crate::patch::cell_px((rows, cols), (h, w));
    a.max(b)
}

/// Cuts each structure's region to where it may stay (`allowed`), after the regions are
/// taken; a region cut away entirely is absent. Mass, point and confidence are those of
/// what is left, from `scores` (labels × rows × columns). Cutting the scores before the
/// regions are taken instead measured far worse (spine-mr, first split, L2 / L3 IoU 82.7 /
/// 83.0 → 72.6 / 62.8; the cause was not traced).
pub fn cut(found: &mut [Option<Finding>], allowed: &[Option<Array2<bool>>], scores: &Array3<f32>) {
    for (f, region) in found.iter_mut().zip(allowed) {
        let (Some(finding), Some(region)) = (f.as_mut(), region) else {
            continue;
        };
        if finding.is_placed() || region.dim() != finding.mask.dim() {
            continue;
        }
        let mut removed = 0usize;
        Zip::from(&mut finding.mask)
            .and(region)
            .for_each(|m, &keep| {
                removed += usize::from(*m && !keep);
                *m &= keep;
            });
        if !finding.mask.iter().any(|m| *m) {
            *f = None;
            continue;
        }
        if removed > 0 {
            postprocess::measure(finding, scores);
        }
    }
}

/// Euclidean distance in pixels from every pixel to the nearest one of `mask` (0 on it;
/// infinite everywhere when the mask is empty): the exact transform of Felzenszwalb and
/// Huttenlocher, one pass of lower parabolas per column, then per row.
pub fn distance_outside(mask: &Array2<bool>) -> Array2<f32> {
    let (rows, cols) = mask.dim();
    let mut sq = mask.mapv(|m| if m { 0.0 } else { f64::INFINITY });
    let mut line = Vec::new();
    for c in 0..cols {
        line.clear();
        line.extend(sq.column(c).iter());
        let out = lower_envelope(&line);
        sq.column_mut(c)
            .iter_mut()
            .zip(out)
            .for_each(|(s, v)| *s = v);
    }
    for r in 0..rows {
        line.clear();
        line.extend(sq.row(r).iter());
        let out = lower_envelope(&line);
        sq.row_mut(r).iter_mut().zip(out).for_each(|(s, v)| *s = v);
    }
    sq.mapv(|v| v.sqrt() as f32)
}

/// min over q of (p − q)² + f(q), for every p.
fn lower_envelope(f: &[f64]) -> Vec<f64> {
    let n = f.len();
    let mut out = vec![f64::INFINITY; n];
    // Parabola vertices and where each starts to be the lowest.
    let mut v: Vec<usize> = Vec::with_capacity(n);
    let mut z: Vec<f64> = Vec::with_capacity(n + 1);
    for q in (0..n).filter(|&q| f[q].is_finite()) {
        loop {
            let Some(&p) = v.last() else {
                v.push(q);
                z.push(f64::NEG_INFINITY);
                break;
            };
            let s = ((f[q] + (q * q) as f64) - (f[p] + (p * p) as f64)) / (2.0 * (q - p) as f64);
            if s <= *z.last().unwrap_or(&f64::NEG_INFINITY) {
                v.pop();
                z.pop();
            } else {
                v.push(q);
                z.push(s);
                break;
            }
        }
    }
    if v.is_empty() {
        return out;
    }
    let mut k = 0;
    for (p, o) in out.iter_mut().enumerate() {
        while k + 1 < v.len() && z[k + 1] < p as f64 {
            k += 1;
        }
        let d = p as f64 - v[k] as f64;
        *o = d * d + f[v[k]];
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The pixels within `radius` of `centre`.
    pub(crate) fn disk(dim: (usize, usize), centre: (f64, f64), radius: f64) -> Array2<bool> {
        Array2::from_shape_fn(dim, |(r, c)| {
            (r as f64 - centre.0).hypot(c as f64 - centre.1) <= radius
        })
    }

    /// Through `Anchor`: a lateral slice's spill past the reach of the centre slice's
    /// section is cut; without the stack anchor it stays.
    #[test]
    fn a_lateral_slice_keeps_its_body_within_the_reach_of_the_centre_section() {
        use crate::adapter::{Method, TrainConfig, TrainingSlice};
        use crate::backbone::FeatureMap;
        let dim = (48, 48);
        let body = disk(dim, (20.0, 20.0), 8.0);
        // A basic adapter on two channels (its model plays no part here; its
        // post-processing does).
        let fm = FeatureMap::new(
            Array3::from_shape_fn((2, 12, 12), |(c, i, j)| {
                (c as f32 + 1.0) * f32::from(body[[i * 4 + 2, j * 4 + 2]])
            }),
            48,
            48,
        );
        let cells =
            Array2::from_shape_fn((12, 12), |(i, j)| u8::from(body[[i * 4 + 2, j * 4 + 2]]));
        let mut adapter = Adapter::train(
            Method::Basic,
            vec!["body".into()],
            &[TrainingSlice {
                features: &fm,
                cells,
            }],
            TrainConfig {
                stack_anchor: true,
                ..TrainConfig::default()
            },
            ("test", "0"),
        )
        .unwrap();
        adapter.stack_reach = vec![Some(0.25)];
        let scores = |mask: &Array2<bool>| {
            Array3::from_shape_fn(
                (1, dim.0, dim.1),
                |(_, r, c)| if mask[[r, c]] { 0.9 } else { 0.05 },
            )
        };
        // The lateral slice: a smaller section and, joined to it, spill down to row 40.
        let spill = disk(dim, (20.0, 20.0), 6.0)
            | Array2::from_shape_fn(dim, |(r, c)| (20..41).contains(&r) && (18..23).contains(&c));
        let lateral = |adapter: &Adapter| {
            let mut anchor = Anchor::default();
            let centre = anchor.structures(&mut scores(&body), Some(adapter), true, 4.0);
            assert!(centre[0].is_some());
            let found = anchor.structures(&mut scores(&spill), Some(adapter), false, 4.0);
            found[0]
                .as_ref()
                .map(|f| f.mask.clone())
                .expect("the lateral section")
        };
        // Reach: 0.25 × 7.92 (equivalent radius of the 197-pixel disk) + 4 = 5.98 pixels
        // past its last row, 28.
        let cut = lateral(&adapter);
        assert!(cut[[20, 20]] && cut[[33, 20]] && !cut[[34, 20]] && !cut[[40, 20]]);
        adapter.train.stack_anchor = false;
        let kept = lateral(&adapter);
        assert_eq!(kept, spill);
    }

    #[test]
    fn distances_are_euclidean_to_the_nearest_mask_pixel() {
        let mut mask = Array2::from_elem((13, 17), false);
        mask[[2, 3]] = true;
        mask[[9, 14]] = true;
        mask[[11, 1]] = true;
        let d = distance_outside(&mask);
        let on: Vec<(usize, usize)> = mask
            .indexed_iter()
            .filter(|(_, m)| **m)
            .map(|(p, _)| p)
            .collect();
        for ((r, c), &got) in d.indexed_iter() {
            let want = on
                .iter()
                .map(|&(a, b)| (r as f64 - a as f64).hypot(c as f64 - b as f64))
                .fold(f64::INFINITY, f64::min);
            assert!(
                (f64::from(got) - want).abs() < 1e-5,
                "({r}, {c}): {got} vs {want}"
            );
        }
        assert!(distance_outside(&Array2::from_elem((3, 4), false))
            .iter()
            .all(|d| d.is_infinite()));
    }

    #[test]
    fn reach_is_learned_from_sections_beside_the_centre() {
        // Squares of 20 × 20 pixels (equivalent radius √(400/π) = 11.28): a centre
        // section and others shifted down, whose last rows lie 1, 2, ... pixels past it.
        let square = |top: usize| {
            Array2::from_shape_fn((40, 40), |(r, c)| {
                u8::from((top..top + 20).contains(&r) && (10..30).contains(&c)) * 3
            })
        };
        let equivalent = (400.0 / std::f64::consts::PI).sqrt();
        // Shifted by 2 and by 1 (740 pixels at 0, 40 at 1, 20 at 2) and one stray pixel
        // 10.3 pixels out: 99 % needs the 793rd of 801, at 2.
        let mut stray = Array2::<u8>::zeros((40, 40));
        stray[[38, 5]] = 3;
        let a = [square(12), square(10), square(11), stray];
        // Shifted by 4 (the 396th pixel at 4) in another template: the larger wins.
        let b = [square(10), square(14)];
        let reach = learn_reach(
            [(a.iter().collect(), 1), (b.iter().collect(), 0)].into_iter(),
            &[3, 4],
        );
        let r = reach[0].expect("label 3 learned");
        assert!((r - 4.0 / equivalent).abs() < 1e-6, "{r}");
        let reach_a = learn_reach(std::iter::once((a.iter().collect(), 1)), &[3]);
        assert!((reach_a[0].unwrap_or(0.0) - 2.0 / equivalent).abs() < 1e-6);
        assert_eq!(reach[1], None, "a label no template has is not confined");
        // A structure seen only in its centre slice teaches nothing either.
        let only_middle = [Array2::<u8>::zeros((40, 40)), square(10)];
        assert_eq!(
            learn_reach(std::iter::once((only_middle.iter().collect(), 1)), &[3]),
            [None]
        );
    }

    #[test]
    fn regions_past_the_centre_sections_reach_are_cut() {
        let dim = (30, 30);
        let centre = Finding {
            label: 0,
            mask: disk(dim, (10.0, 10.0), 4.0),
            mass: 1.0,
            point: (10.0, 10.0),
            confidence: 1.0,
        };
        let centre_pixels = centre.mask.iter().filter(|m| **m).count();
        let allowed = allowed(&[Some(centre), None], &[Some(0.5), Some(0.5)], 1.0);
        let region = allowed[0].as_ref().expect("a region for the found label");
        // The 49-pixel disk (equivalent radius 3.95) grown by 0.5 of that plus 1 pixel:
        // 2.97 pixels past its edge at column 14.
        assert_eq!(centre_pixels, 49);
        assert!(region[[10, 16]] && !region[[10, 17]]);
        assert!(
            allowed[1].is_none(),
            "nothing found in the centre: no region"
        );
        // A region of label 0 from the disk out to column 25 along rows 8–12.
        let scores = Array3::from_elem((2, 30, 30), 0.5f32);
        let wide = |r: usize, c: usize| (8..13).contains(&r) && (6..26).contains(&c);
        let wide_region = |label| Finding {
            label,
            mask: Array2::from_shape_fn(dim, |(r, c)| wide(r, c)),
            mass: 50.0,
            point: (10.0, 15.5),
            confidence: 0.5,
        };
        let mut found = vec![Some(wide_region(0)), Some(wide_region(1))];
        cut(&mut found, &allowed, &scores);
        let kept = found[0]
            .as_ref()
            .expect("the part near the centre's section stays");
        assert!(kept.mask[[10, 12]] && kept.mask[[10, 16]] && !kept.mask[[10, 17]]);
        let n = kept.mask.iter().filter(|m| **m).count();
        assert_eq!(
            n,
            kept.mask
                .indexed_iter()
                .filter(|((r, c), _)| wide(*r, *c) && region[[*r, *c]])
                .count()
        );
        assert!((kept.mass - 0.5 * n as f64).abs() < 1e-9 && (kept.confidence - 0.5).abs() < 1e-9);
        assert!(
            (kept.point.0 - 10.0).abs() < 1e-9 && kept.point.1 < 12.0,
            "{:?}",
            kept.point
        );
        assert_eq!(
            found[1].as_ref().map(|f| f.mass),
            Some(50.0),
            "no region: untouched"
        );
        // A region wholly inside keeps its figures as the regions gave them.
        let mut inside = vec![Some(Finding {
            mask: disk(dim, (10.0, 10.0), 2.0),
            ..wide_region(0)
        })];
        cut(&mut inside, &allowed, &scores);
        assert_eq!(
            inside[0].as_ref().map(|f| (f.mass, f.point)),
            Some((50.0, (10.0, 15.5)))
        );
        // A region wholly outside is absent.
        let mut far = vec![Some(Finding {
            mask: Array2::from_shape_fn(dim, |(r, c)| r > 25 && c > 25),
            ..wide_region(0)
        })];
        cut(&mut far, &allowed, &scores);
        assert!(far[0].is_none());
    }
}
