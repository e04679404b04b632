//! How far a structure reaches past its section in a stack's localizer slice (issue #7).
//! A vertebral body cut by a lateral slice of a sagittal stack is a section nearer its
//! side, and such a section lies within the section through its middle: in the templates
//! (spine-mr, first five cases) the bodies' lateral sections lie within 1–5 pixels of
//! their section in slice k* for 99 % of their pixels. A region of the body's label that
//! reaches further out in a lateral slice is the adapter's spill into the soft tissue or a
//! neighbour around it. The reach is learned per structure from the templates' stacks (a
//! structure whose sections do not nest gets the larger reach its templates show), as a
//! share of the section's equivalent radius so that it keeps to another field of view.
//! The same centre slice also places the structures of the others (`prior`), and with
//! `TrainConfig::stack_fill` each slice fills its structures from the slice next to it
//! towards the centre (`fill_from_inner`): the outer slices lose most (spine-mr, first split,
//! stack IoU 70 at k* ± 20 against 86–87 within k* ± 10), mostly whole parts of a body that
//! the next slice in has. With `TrainConfig::stack_bound` each slice's structures are
//! then cut to their regions in the slice next in, grown by a learned margin
//! (`bound_by_inner`): the centre slice's reach bounds a lateral section loosely, the
//! section next to it closer. With `TrainConfig::stack_blend` the stack's outermost slices,
//! which cut the bodies near their sides, where the adapter is least sure (spine-mr, IoU
//! 70–76 there against 85–89 within), take the contour halfway between their region and
//! the section next in, scaled as the templates' sections narrow (`blend_with_inner`).
//! With `TrainConfig::stack_carry` a structure a slice misses while the slice next in has
//! it takes its region there, first, where every template's section continues
//! (`carry_from_inner`): a body's section does not vanish between two slices, and a missed
//! one stopped the fill, bound and blend at it on its side.

use ndarray::{Array2, Array3, Zip};

use crate::adapter::Adapter;
use crate::align::Prior;
use crate::appearance::Appearance;
use crate::backbone::FeatureMap;
use crate::postprocess::{self, Finding};
use crate::window::Cells;

/// What a stack's centre slice passes on to the structures of its other slices, with
/// `TrainConfig::stack_anchor`: the layout prior (`prior`) and where
/// each structure's region may stay (`allowed`, `cut`); with a learned stack carry, depth,
/// bound or blend, each slice's regions to the next slice out (`carry_from_inner`,
/// `fill_from_inner`, `bound_by_inner`, `blend_with_inner`); with
/// `TrainConfig::appearance`, the patient's appearance to every slice's scores (`weigh`).
/// `scout eval` and the agent
/// both take a stack's structures through it, centre slice first, then outwards
/// (`outwards`).
#[derive(Debug, Default)]
pub struct Anchor {
    prior: Option<Prior>,
    allowed: Vec<Option<Array2<bool>>>,
    /// With a learned `Adapter::stack_carry`, `stack_depth`, `stack_bound` or
    /// `stack_blend`: per side of the centre slice (before it, after it), the last slice
    /// taken there, which carries, fills, bounds and blends the next slice out.
    inner: [Option<Taken>; 2],
    /// With `TrainConfig::appearance`: this patient's appearance, learned in the centre
    /// slice.
    appearance: Option<Appearance>,
}

/// A slice's place in steps out from the centre slice, and its structures' regions.
type Taken = (usize, Vec<Option<Array2<bool>>>);

impl Anchor {
    /// Weighs one slice's `scores` (labels × h × w, on `fm`'s grid, before upsampling) by
    /// the patient's appearance when `adapter` was trained with it: learned in the centre
    /// slice (`step` 0), from its own scores, then applied to every slice of the stack,
    /// the centre slice first.
    pub fn weigh(
        &mut self,
        scores: &mut Array3<f32>,
        fm: &FeatureMap,
        adapter: Option<&Adapter>,
        step: isize,
    ) {
        if !adapter.is_some_and(|a| a.train.appearance) {
            return;
        }
        if step == 0 {
            self.appearance = Appearance::learn(scores, fm);
        }
        if let Some(appearance) = &self.appearance {
            appearance.weigh(scores, fm);
        }
    }

    /// The cells of a `grid` over an `image` (rows × columns, pixels) that a slice after
    /// the centre one needs scored (issue #7, idea 5): its regions are cut to where their
    /// structures may stay (`allowed`, `cut`), so the scores of the cells whose upsampling
    /// (`postprocess::upsample_scores`) reaches none of those pixels could only have
    /// chosen a component that the cut then takes away. Per row of cells, from the first
    /// column such a pixel reads to the last: on the spine's stacks 15–21 % of the
    /// slice's cells (their box 24–32 %, the landmarks' window, `window`, 40–53 %).
    /// None before the centre slice's structures are taken, or while a
    /// structure may stay anywhere (the centre slice lacks it, or no reach was learned).
    pub fn window(&self, image: (usize, usize), grid: (usize, usize)) -> Option<Cells> {
        if self.allowed.is_empty() {
            return None;
        }
        let regions = self
            .allowed
            .iter()
            .map(|r| r.as_ref().filter(|r| r.dim() == image))
            .collect::<Option<Vec<_>>>()?;
        // Per row of pixels, its first and last column where a region may stay.
        let mut ends: Vec<Option<(usize, usize)>> = vec![None; image.0];
        for region in &regions {
            for ((r, c), _) in region.indexed_iter().filter(|(_, keep)| **keep) {
                let e = &mut ends[r];
                *e = Some(e.map_or((c, c), |(a, z)| (a.min(c), z.max(c))));
            }
        }
        // The cells those pixels read, as the upsampling reads them: the taps rise with
        // the pixel, so a row's first and last pixels bound the cells it reads.
        let (ys, xs) = (
            crate::image::bilinear_taps(image.0, grid.0),
            crate::image::bilinear_taps(image.1, grid.1),
        );
        let mut spans: Vec<Option<(usize, usize)>> = vec![None; grid.0];
        for (y, (a, z)) in ys.iter().zip(&ends).filter_map(|(y, e)| Some((y, (*e)?))) {
            let (Some(first), Some(last)) = (xs.get(a), xs.get(z)) else {
                continue;
            };
            let read = (first.0.min(first.1), last.0.max(last.1));
            for row in [y.0, y.1] {
                let Some(span) = spans.get_mut(row) else {
                    continue;
                };
                *span = Some(span.map_or(read, |(a, z)| (a.min(read.0), z.max(read.1))));
            }
        }
        let first = spans.iter().position(Option::is_some)?;
        let last = spans.iter().rposition(Option::is_some)?;
        Some(Cells {
            first_row: first,
            spans: spans[first..=last]
                .iter()
                .map(|s| s.map_or(0..0, |(a, z)| a..z + 1))
                .collect(),
        })
    }

    /// The structures of one slice from its upsampled `scores` (labels × rows × columns,
    /// changed in place), post-processed as `adapter` was trained to; `step`: the slice's
    /// place in the stack from the centre slice (0; negative before it), the slices taken
    /// outwards from it (0, −1, 1, −2, 2...: `outwards`); `cell`: the side of a score cell
    /// in image pixels (`cell_side`); `named`: per structure, the point of the landmark that
    /// names it in the centre slice (`identity`; empty for none), before the other slices
    /// take the centre slice's structures as their prior.
    pub fn structures(
        &mut self,
        scores: &mut Array3<f32>,
        adapter: Option<&Adapter>,
        step: isize,
        cell: f64,
        named: &[Option<(f64, f64)>],
    ) -> Vec<Option<Finding>> {
        let mut found = postprocess::structures(
            scores,
            adapter.and_then(|a| a.shape.as_ref()),
            adapter.and_then(|a| a.atlas.as_ref()),
            adapter.and_then(|a| a.enclosed.as_ref()),
            adapter.is_some_and(|a| a.train.fragments),
            adapter.map(Adapter::outlines).unwrap_or_default(),
            self.prior.as_ref(),
        );
        if step == 0 && named.iter().any(Option::is_some) {
            crate::identity::name_by_landmarks(&mut found, scores, named);
        }
        cut(&mut found, &self.allowed, scores);
        let Some(a) = adapter.filter(|a| a.train.stack_anchor) else {
            return found;
        };
        if step == 0 {
            self.prior = Some(prior(&found));
            self.allowed = allowed(&found, &a.stack_reach, cell);
        }
        if a.stack_carry.is_empty()
            && a.stack_depth.is_empty()
            && a.stack_bound.is_empty()
            && a.stack_blend.is_empty()
        {
            return found;
        }
        let (side, out) = (usize::from(step > 0), step.unsigned_abs());
        if let (Some((_, inner)), Some(i)) = (
            self.inner[side].as_ref().filter(|(at, _)| at + 1 == out),
            out.checked_sub(1),
        ) {
            // Per structure, what was learned for this step out.
            fn at<T: Copy>(learned: &[Vec<Option<T>>], i: usize) -> Vec<Option<T>> {
                learned
                    .iter()
                    .map(|d| d.get(i).copied().flatten())
                    .collect()
            }
            // Carried first: a section the adapter missed is then filled, bounded and
            // blended as one it found (the fill and the bound leave it as it is).
            carry_from_inner(&mut found, inner, &at(&a.stack_carry, i), scores);
            // Filled before bounded: how far a region reaches is the slice next in's to
            // say too. Bounded first, a speck the adapter took for a body beside its
            // section was cut away and the body's section not filled (spine-mr, third
            // split, s21's L1 at k* − 15: 1 pixel found, 599 in truth; its IoU over the
            // stack 83.6 → 71.7).
            fill_from_inner(&mut found, inner, &at(&a.stack_depth, i), scores);
            bound_by_inner(&mut found, inner, &at(&a.stack_bound, i), scores);
            // Last: the halfway contour weighs the region as filled and bounded.
            blend_with_inner(&mut found, inner, &at(&a.stack_blend, i), scores);
        }
        let regions: Vec<Option<Array2<bool>>> = found
            .iter()
            .map(|f| f.as_ref().map(|f| f.mask.clone()))
            .collect();
        if step == 0 {
            self.inner = [Some((0, regions.clone())), Some((0, regions))];
        } else {
            self.inner[side] = Some((out, regions));
        }
        found
    }
}

/// The slices of a stack of `len` slices in the order `Anchor` takes them: the centre
/// slice `center`, then outwards, one step at a time, the slice before the centre first
/// (4, 3, 5, 2, 6...).
pub fn outwards(len: usize, center: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.sort_by_key(|&i| (i.abs_diff(center), i > center));
    order
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

/// The share of an inner section's pixels, eroded by the learned depth, that must lie
/// within the next outer section, on mean over the templates' sections.
const FILLED_WITHIN: f64 = 0.95;

/// The share of an outer section's pixels that must lie within the next inner section
/// grown by the learned margin, on mean over the templates' sections: as the reach's
/// (`HELD`), it removes pixels, so it holds nearly all of them.
const BOUNDED_WITHIN: f64 = 0.99;

/// The depths and margins `learn_depth` and `learn_bound` try, in hundredths of the inner
/// section's equivalent radius.
const SHARES: std::ops::RangeInclusive<u32> = 0..=60;

/// A depth or margin of `SHARES` in equivalent radii.
fn share_of(s: u32) -> f64 {
    f64::from(s) / 100.0
}

/// Per structure (`values`, label values in score order) and per step out from the centre
/// slice (index 0: the slices beside it), how deep inside its section in the slice next
/// to it towards the centre its section in the slice lies for sure, from the templates'
/// label stacks (`stacks`: each template's label maps in slice order and the index of its
/// centre slice): the least depth, in equivalent radii of the inner section, at which
/// that section, eroded, lies on mean `FILLED_WITHIN` within the outer one, over every
/// template and side with both sections. A section nearer its side is smaller, and
/// shrinks the faster the further out; per structure, as the structures' sections do not
/// shrink alike (one depth for all cost L5 1.7 IoU in a split of spine-mr; per structure,
/// L5's are the largest at the first steps). None for a step no template shows with both
/// sections, or where no depth up to 0.6 holds.
pub fn learn_depth<'a>(
    stacks: impl Iterator<Item = (Vec<&'a Array2<u8>>, usize)>,
    values: &[u8],
) -> Vec<Vec<Option<f64>>> {
    let within = shares_per_step(
        stacks,
        values,
        both(|section, radius, outer, v| {
            // Per pixel of the inner section: how deep it lies, and whether the outer
            // section has it.
            let depth = depth_inside(section);
            let pixels: Vec<(f64, bool)> = Zip::from(section).and(&depth).and(outer).fold(
                Vec::new(),
                |mut acc, &m, &d, &x| {
                    if m {
                        acc.push((f64::from(d), x == v));
                    }
                    acc
                },
            );
            let shares = SHARES
                .map(|s| {
                    let keep = share_of(s) * radius;
                    let (kept, held) = pixels
                        .iter()
                        .filter(|(d, _)| *d > keep)
                        .fold((0usize, 0usize), |(k, h), (_, x)| {
                            (k + 1, h + usize::from(*x))
                        });
                    // Eroded away: nothing of it lies outside.
                    if kept == 0 {
                        1.0
                    } else {
                        held as f64 / kept as f64
                    }
                })
                .collect();
            Some(shares)
        }),
    );
    least_share(&within, FILLED_WITHIN)
}

/// Per structure (`values`) and per step out from the centre slice (index 0: the slices
/// beside it), how far its section in the slice reaches past its section in the slice
/// next to it towards the centre, from the templates' label stacks (`stacks`, as for
/// `learn_depth`): the least margin, in equivalent radii of the inner section, within
/// which the inner section, grown by it, holds on mean `BOUNDED_WITHIN` of the outer
/// section, over every template and side with both sections. A body's section narrows
/// towards its side: in the stacks of spine-mr's templates s01–s05 an outer section lies
/// 93–98 % within the inner one as it is (mean per step out). The reach (`learn_reach`)
/// bounds every slice by the centre slice's section; this bounds each by the one next in,
/// as a section's neighbour outlines it closer. None for a step no template shows with
/// both sections, or where no margin up to 0.6 holds.
pub fn learn_bound<'a>(
    stacks: impl Iterator<Item = (Vec<&'a Array2<u8>>, usize)>,
    values: &[u8],
) -> Vec<Vec<Option<f64>>> {
    let within = shares_per_step(
        stacks,
        values,
        both(|section, radius, outer, v| {
            let distance = distance_outside(section);
            let outside: Vec<f32> =
                Zip::from(outer)
                    .and(&distance)
                    .fold(Vec::new(), |mut acc, &x, &d| {
                        if x == v {
                            acc.push(d);
                        }
                        acc
                    });
            let shares = SHARES
                .map(|s| {
                    let margin = share_of(s) * radius;
                    let held = outside.iter().filter(|d| f64::from(**d) <= margin).count();
                    held as f64 / outside.len() as f64
                })
                .collect();
            Some(shares)
        }),
    );
    least_share(&within, BOUNDED_WITHIN)
}

/// Per structure (`values`) and per step out from the centre slice (index 0: the slices
/// beside it), how a section narrows from the slice next to it towards the centre, from
/// the templates' label stacks (`stacks`, as for `learn_depth`): the mean over every
/// template and side with both sections of the ratio of the outer section's spread to the
/// inner one's (standard deviation of its pixels' rows, of their columns), learned at the
/// structure's outermost step out only, where a stack's slices cut the structure near its
/// side; None elsewhere. In spine-mr's templates s01–s05 the bodies lose less of their
/// height there than of their depth (rows 0.85–0.96, columns 0.76–0.81); a step further
/// in, they keep their height and lose a tenth of their depth (0.97–1.03, 0.87–0.93).
pub fn learn_blend<'a>(
    stacks: impl Iterator<Item = (Vec<&'a Array2<u8>>, usize)>,
    values: &[u8],
) -> Vec<Vec<Option<[f64; 2]>>> {
    let ratios = shares_per_step(
        stacks,
        values,
        both(|section, _, outer, v| {
            let inner = spread(section.indexed_iter().filter(|(_, m)| **m).map(|(p, _)| p))?;
            let outer = spread(
                outer
                    .indexed_iter()
                    .filter(|(_, x)| **x == v)
                    .map(|(p, _)| p),
            )?;
            Some(vec![outer[0] / inner[0], outer[1] / inner[1]])
        }),
    );
    ratios
        .iter()
        .map(|steps| {
            let last = steps.iter().rposition(|(_, n)| *n > 0);
            steps
                .iter()
                .enumerate()
                .map(|(i, (sums, n))| {
                    (Some(i) == last).then(|| [sums[0] / *n as f64, sums[1] / *n as f64])
                })
                .collect()
        })
        .collect()
}

/// Per structure (`values`) and per step out from the centre slice (index 0: the slices
/// beside it), how often its section continues from the slice next to it towards the
/// centre, from the templates' label stacks (`stacks`, as for `learn_depth`): the share of
/// the templates' pairs of neighbouring slices, the inner one having the structure, whose
/// outer one has it too. In spine-mr's stacks every body continues out to every slice
/// but one (s16's L5 at k* + 20); the adapter misses a body's whole section in a few
/// (spine-mr, 3 folds: 10 of the 1,800 sections off the centre slices, 7 of them the
/// outermost). None for a step no template's slice in has.
pub fn learn_carry<'a>(
    stacks: impl Iterator<Item = (Vec<&'a Array2<u8>>, usize)>,
    values: &[u8],
) -> Vec<Vec<Option<f64>>> {
    let held = shares_per_step(stacks, values, |_, _, outer, v| {
        Some(vec![f64::from(u8::from(outer.iter().any(|x| *x == v)))])
    });
    held.iter()
        .map(|steps| {
            steps
                .iter()
                .map(|(sums, n)| (*n > 0).then(|| sums.first().copied().unwrap_or(0.0) / *n as f64))
                .collect()
        })
        .collect()
}

/// The standard deviation of `pixels`' rows and of their columns; None for no pixels or
/// for a spread of 0 in either, which no ratio can be taken of.
fn spread(pixels: impl Iterator<Item = (usize, usize)>) -> Option<[f64; 2]> {
    let (mut n, mut sum, mut sq) = (0.0, [0.0f64; 2], [0.0f64; 2]);
    for (r, c) in pixels {
        n += 1.0;
        for (k, x) in [r as f64, c as f64].into_iter().enumerate() {
            sum[k] += x;
            sq[k] += x * x;
        }
    }
    let sd = |k: usize| ((sq[k] / n - (sum[k] / n).powi(2)).max(0.0)).sqrt();
    let out = [sd(0), sd(1)];
    (n > 0.0 && out.iter().all(|s| *s > 0.0)).then_some(out)
}

/// Per structure, per step out, per entry (of `SHARES`, or what a caller measures): the
/// sum of what `share` gave over the templates' pairs of neighbouring sections, and how
/// many pairs.
type SharesPerStep = Vec<Vec<(Vec<f64>, usize)>>;

/// Visits every pair of neighbouring sections of each structure in the templates' stacks
/// (`stacks`, `values` as for `learn_depth`) where the inner slice, next to the outer one
/// towards the centre slice, has it: `share(inner section, its equivalent radius, outer
/// label map, label value)` gives per entry (of `SHARES` for a share in 0..=1) a value,
/// summed per structure and step out; None leaves the pair uncounted. Measures of two
/// sections take the pairs whose outer slice has the structure too (`both`).
fn shares_per_step<'a>(
    stacks: impl Iterator<Item = (Vec<&'a Array2<u8>>, usize)>,
    values: &[u8],
    mut share: impl FnMut(&Array2<bool>, f64, &Array2<u8>, u8) -> Option<Vec<f64>>,
) -> SharesPerStep {
    let mut within: SharesPerStep = vec![Vec::new(); values.len()];
    for (maps, center) in stacks {
        for (i, outer) in maps.iter().enumerate() {
            let out = i.abs_diff(center);
            let Some(inner) = (out > 0)
                .then(|| if i > center { i - 1 } else { i + 1 })
                .and_then(|j| maps.get(j))
                .filter(|m| m.dim() == outer.dim())
            else {
                continue;
            };
            for (&v, steps) in values.iter().zip(within.iter_mut()) {
                let section = inner.mapv(|x| x == v);
                let area = section.iter().filter(|m| **m).count();
                if area == 0 {
                    continue;
                }
                let Some(shares) = share(&section, equivalent_radius(area), outer, v) else {
                    continue;
                };
                if steps.len() < out {
                    steps.resize(out, (Vec::new(), 0));
                }
                let (sums, n) = &mut steps[out - 1];
                *n += 1;
                sums.resize(shares.len().max(sums.len()), 0.0);
                for (sum, s) in sums.iter_mut().zip(shares) {
                    *sum += s;
                }
            }
        }
    }
    within
}

/// `share` for the pairs whose outer slice has the structure too; None for the others.
fn both(
    mut share: impl FnMut(&Array2<bool>, f64, &Array2<u8>, u8) -> Option<Vec<f64>>,
) -> impl FnMut(&Array2<bool>, f64, &Array2<u8>, u8) -> Option<Vec<f64>> {
    move |section, radius, outer, v| {
        if outer.iter().any(|x| *x == v) {
            share(section, radius, outer, v)
        } else {
            None
        }
    }
}

/// Per structure and step out, the least entry of `SHARES` whose mean share reaches
/// `criterion`, in equivalent radii; None for a step without pairs or where none does.
fn least_share(within: &SharesPerStep, criterion: f64) -> Vec<Vec<Option<f64>>> {
    within
        .iter()
        .map(|steps| {
            steps
                .iter()
                .map(|(sums, n)| {
                    let n = (*n > 0).then_some(*n as f64)?;
                    SHARES
                        .zip(sums)
                        .find(|(_, sum)| *sum / n >= criterion)
                        .map(|(s, _)| share_of(s))
                })
                .collect()
        })
        .collect()
}

/// Where a section's pixels lie: how many, and their box grown by a pixel on each side
/// (within the slice), which holds the nearest pixel outside the section of every pixel
/// inside it (a pixel further out is further in both axes).
struct SectionBox {
    area: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

impl SectionBox {
    /// None for an empty section.
    fn of(section: &Array2<bool>) -> Option<SectionBox> {
        let (rows, cols) = section.dim();
        let (mut area, mut r0, mut r1, mut c0, mut c1) = (0, usize::MAX, 0, usize::MAX, 0);
        for ((r, c), _) in section.indexed_iter().filter(|(_, m)| **m) {
            area += 1;
            (r0, r1, c0, c1) = (r0.min(r), r1.max(r), c0.min(c), c1.max(c));
        }
        (area > 0).then(|| SectionBox {
            area,
            rows: r0.saturating_sub(1)..(r1 + 2).min(rows),
            cols: c0.saturating_sub(1)..(c1 + 2).min(cols),
        })
    }

    /// The box grown by `by` more pixels on each side, within a slice of `dim`.
    fn grown(&self, by: usize, (rows, cols): (usize, usize)) -> SectionBox {
        SectionBox {
            area: self.area,
            rows: self.rows.start.saturating_sub(by)..self.rows.end.saturating_add(by).min(rows),
            cols: self.cols.start.saturating_sub(by)..self.cols.end.saturating_add(by).min(cols),
        }
    }

    /// `depth_inside` over the box alone.
    fn depth(&self, section: &Array2<bool>) -> Array2<f32> {
        let crop = section.slice(ndarray::s![self.rows.clone(), self.cols.clone()]);
        distance_outside(&crop.mapv(|m| !m))
    }
}

/// Euclidean distance in pixels from every pixel of `section` to the nearest pixel of the
/// slice outside it (0 outside it; infinite in a section that fills the slice): what
/// `distance_outside` of its complement gives, computed over the section's box alone
/// (`SectionBox`). A body's box is a small part of its slice: over the whole slice the
/// transform took most of the fill's time.
pub fn depth_inside(section: &Array2<bool>) -> Array2<f32> {
    let mut out = Array2::zeros(section.dim());
    if let Some(b) = SectionBox::of(section) {
        out.slice_mut(ndarray::s![b.rows.clone(), b.cols.clone()])
            .assign(&b.depth(section));
    }
    out
}

/// Fills each structure's region in a slice (`found`, with its `scores`) with the part of
/// its region in the slice next to it towards the centre (`inner`, already filled) that
/// lies deeper inside than its `depth` (per structure) equivalent radii of that region: a
/// body's section lies within the one next to it towards its middle, less a margin that
/// `learn_depth` learns. Only a structure the slice has and a depth was learned for is
/// filled, and not over another's region (on spine-mr's 3 folds none of the 75,995 pixels
/// the fill added was). Mass, point and confidence are those of the filled region.
pub fn fill_from_inner(
    found: &mut [Option<Finding>],
    inner: &[Option<Array2<bool>>],
    depth: &[Option<f64>],
    scores: &Array3<f32>,
) {
    // Per structure, the pixels to add, over the box of its inner section.
    let added: Vec<Option<(SectionBox, Array2<bool>)>> = found
        .iter()
        .zip(inner)
        .zip(depth)
        .enumerate()
        .map(|(l, ((f, section), depth))| {
            let depth = (*depth)?;
            let f = f.as_ref().filter(|f| !f.is_placed())?;
            let section = section.as_ref().filter(|s| s.dim() == f.mask.dim())?;
            let b = SectionBox::of(section)?;
            let keep = depth * equivalent_radius(b.area);
            let window = ndarray::s![b.rows.clone(), b.cols.clone()];
            let mut add = Zip::from(&b.depth(section))
                .and(f.mask.slice(window))
                .map_collect(|&d, &m| !m && f64::from(d) > keep);
            for other in found.iter().enumerate().filter(|(k, _)| *k != l) {
                if let Some(o) = other.1.as_ref().filter(|o| o.mask.dim() == f.mask.dim()) {
                    Zip::from(&mut add)
                        .and(o.mask.slice(window))
                        .for_each(|a, &m| *a &= !m);
                }
            }
            add.iter().any(|a| *a).then_some((b, add))
        })
        .collect();
    for (f, add) in found.iter_mut().zip(added) {
        if let (Some(f), Some((b, add))) = (f.as_mut(), add) {
            Zip::from(f.mask.slice_mut(ndarray::s![b.rows, b.cols]))
                .and(&add)
                .for_each(|m, &a| *m |= a);
            postprocess::measure(f, scores);
        }
    }
}

/// Bounds each structure's region in a slice (`found`, with its `scores`; `Anchor` fills it
/// first) by its region in the slice next to it towards the centre (`inner`, as that one
/// was taken), grown by its `margin` (per structure) equivalent radii of that region
/// (`learn_bound`): a body's section lies within its neighbour's towards its middle, so
/// what reaches further is spill. Only a structure both slices have and a margin was learned for is bounded; a
/// region bounded away entirely is absent. Mass, point and confidence are those of what
/// is left.
pub fn bound_by_inner(
    found: &mut [Option<Finding>],
    inner: &[Option<Array2<bool>>],
    margin: &[Option<f64>],
    scores: &Array3<f32>,
) {
    for ((f, section), margin) in found.iter_mut().zip(inner).zip(margin) {
        let (Some(finding), Some(section), Some(margin)) = (f.as_mut(), section, margin) else {
            continue;
        };
        if finding.is_placed() || section.dim() != finding.mask.dim() {
            continue;
        }
        let Some(b) = SectionBox::of(section) else {
            continue;
        };
        let reach = margin * equivalent_radius(b.area);
        // A pixel outside the section's box grown past the reach lies further than it
        // from the section in one axis at least.
        let b = b.grown((reach.ceil() as usize).saturating_add(1), section.dim());
        let window = ndarray::s![b.rows.clone(), b.cols.clone()];
        let distance = distance_outside(&section.slice(window).to_owned());
        let mut removed = 0usize;
        for ((r, c), m) in finding.mask.indexed_iter_mut().filter(|(_, m)| **m) {
            let near = b.rows.contains(&r)
                && b.cols.contains(&c)
                && f64::from(distance[[r - b.rows.start, c - b.cols.start]]) <= reach;
            if !near {
                *m = false;
                removed += 1;
            }
        }
        if !finding.mask.iter().any(|m| *m) {
            *f = None;
        } else if removed > 0 {
            postprocess::measure(finding, scores);
        }
    }
}

/// Blends each structure's region in a slice (`found`, with its `scores`; `Anchor` fills
/// and bounds it first) with its region in the slice next to it towards the centre
/// (`inner`, as that one was taken), scaled about its centroid by `scale` (per structure,
/// rows and columns: `learn_blend`): the region becomes the contour halfway between the
/// two, where the signed distances to both outlines sum below 0. The outermost slices cut
/// the structures near their sides, where the adapter finds their outline worst and the
/// section next in, narrowed as the templates' narrow, is a second estimate as good
/// (spine-mr, first split, IoU at k* ± 20: 74–75 the adapter's, 78 the true section next
/// in, scaled). Only a structure both slices have and a scale was learned for is blended,
/// and not over another's region; where the two do not meet, the region stays.
pub fn blend_with_inner(
    found: &mut [Option<Finding>],
    inner: &[Option<Array2<bool>>],
    scale: &[Option<[f64; 2]>],
    scores: &Array3<f32>,
) {
    for l in 0..found.len() {
        let (Some(Some(finding)), Some(Some(section)), Some(Some(scale))) =
            (found.get(l), inner.get(l), scale.get(l))
        else {
            continue;
        };
        if finding.is_placed() || section.dim() != finding.mask.dim() {
            continue;
        }
        let narrowed = scaled(section, *scale);
        let (Some(a), Some(b)) = (SectionBox::of(&finding.mask), SectionBox::of(&narrowed)) else {
            continue;
        };
        // Both regions' boxes, grown by a pixel each: every pixel within either lies here
        // with its nearest pixel outside; a pixel outside both is outside the blend.
        let (rows, cols) = (
            a.rows.start.min(b.rows.start)..a.rows.end.max(b.rows.end),
            a.cols.start.min(b.cols.start)..a.cols.end.max(b.cols.end),
        );
        let window = ndarray::s![rows.clone(), cols.clone()];
        let signed = |m: &Array2<bool>| {
            let crop = m.slice(window).to_owned();
            let outside = distance_outside(&crop);
            let inside = distance_outside(&crop.mapv(|x| !x));
            outside - inside
        };
        let mut blend = (signed(&finding.mask) + signed(&narrowed)).mapv(|d| d < 0.0);
        for (_, other) in found.iter().enumerate().filter(|(k, _)| *k != l) {
            if let Some(o) = other.as_ref().filter(|o| o.mask.dim() == section.dim()) {
                Zip::from(&mut blend)
                    .and(o.mask.slice(window))
                    .for_each(|b, &m| *b &= !m);
            }
        }
        if !blend.iter().any(|b| *b) {
            continue;
        }
        if let Some(Some(finding)) = found.get_mut(l) {
            finding.mask.fill(false);
            finding.mask.slice_mut(window).assign(&blend);
            postprocess::measure(finding, scores);
        }
    }
}

/// The least share of the templates' pairs of neighbouring sections that continue
/// (`learn_carry`) at which a structure the adapter misses is carried over from the slice
/// next in: every pair, so that a structure the templates show ending there is not.
const CARRIED: f64 = 1.0;

/// Carries each structure a slice misses (`found`, with its `scores`: absent, or placed
/// with no region of its own) over from the slice next to it towards the centre (`inner`,
/// as that one was taken): its region there becomes its region here, less what other
/// structures hold, where every template's section continues at this step (`carried`, per
/// structure: `learn_carry`). A body's sections continue from one slice to the next, so a
/// slice whose adapter finds none of it while the slice next in has it missed it: on
/// spine-mr's 3 folds the 10 sections missed this way were all there in truth (393–1,138
/// pixels), and with them missing, the fill, bound and blend stopped at that slice on its
/// side. Mass, point and confidence are those of the carried region.
pub fn carry_from_inner(
    found: &mut [Option<Finding>],
    inner: &[Option<Array2<bool>>],
    carried: &[Option<f64>],
    scores: &Array3<f32>,
) {
    let dim = (scores.dim().1, scores.dim().2);
    for l in 0..found.len() {
        let (Some(Some(section)), Some(Some(share))) = (inner.get(l), carried.get(l)) else {
            continue;
        };
        let missed = found[l].as_ref().is_none_or(Finding::is_placed);
        if !missed || *share < CARRIED || section.dim() != dim {
            continue;
        }
        let mut region = section.clone();
        for (_, other) in found.iter().enumerate().filter(|(k, _)| *k != l) {
            if let Some(o) = other.as_ref().filter(|o| o.mask.dim() == dim) {
                Zip::from(&mut region)
                    .and(&o.mask)
                    .for_each(|r, &m| *r &= !m);
            }
        }
        let Some(b) = SectionBox::of(&region) else {
            continue;
        };
        let finding = found[l].get_or_insert_with(|| Finding {
            label: l,
            mask: Array2::from_elem(dim, false),
            mass: 0.0,
            // Where scores of 0 leave it, the middle of the region's box.
            point: (
                (b.rows.start + b.rows.end - 1) as f64 / 2.0,
                (b.cols.start + b.cols.end - 1) as f64 / 2.0,
            ),
            confidence: 0.0,
        });
        finding.mask = region;
        postprocess::measure(finding, scores);
    }
}

/// `section` scaled about its centroid by `scale` (rows, columns), each pixel taking the
/// section's pixel it comes from (nearest, ties to even).
pub fn scaled(section: &Array2<bool>, [sr, sc]: [f64; 2]) -> Array2<bool> {
    let (rows, cols) = section.dim();
    let mut out = Array2::from_elem((rows, cols), false);
    let (mut n, mut r0, mut c0) = (0.0, 0.0, 0.0);
    let (mut lo, mut hi) = ([f64::INFINITY; 2], [f64::NEG_INFINITY; 2]);
    for ((r, c), _) in section.indexed_iter().filter(|(_, m)| **m) {
        let (r, c) = (r as f64, c as f64);
        n += 1.0;
        r0 += r;
        c0 += c;
        lo = [lo[0].min(r), lo[1].min(c)];
        hi = [hi[0].max(r), hi[1].max(c)];
    }
    if n == 0.0 || !(sr > 0.0 && sc > 0.0 && sr.is_finite() && sc.is_finite()) {
        return out;
    }
    let (r0, c0) = (r0 / n, c0 / n);
    // Only pixels that come from within half a pixel of the section's box can take one
    // of its pixels; a pixel more on each side for the rounding.
    let span = |centre: f64, lo: f64, hi: f64, s: f64, len: usize| {
        let a = (centre + (lo - 0.5 - centre) * s).floor() - 1.0;
        let b = (centre + (hi + 0.5 - centre) * s).ceil() + 1.0;
        (a.max(0.0) as usize)..(b.max(0.0) as usize).saturating_add(1).min(len)
    };
    let (rs, cs) = (
        span(r0, lo[0], hi[0], sr, rows),
        span(c0, lo[1], hi[1], sc, cols),
    );
    for r in rs {
        let from_r = (r0 + (r as f64 - r0) / sr).round_ties_even();
        if from_r < 0.0 || from_r as usize >= rows {
            continue;
        }
        for c in cs.clone() {
            let from_c = (c0 + (c as f64 - c0) / sc).round_ties_even();
            out[[r, c]] = from_c >= 0.0
                && (from_c as usize) < cols
                && section[[from_r as usize, from_c as usize]];
        }
    }
    out
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
            Some(within_reach(&f.mask, r * equivalent_radius(area) + slack))
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

/// The pixels within `reach` pixels (Euclidean) of `mask`: `distance_outside` of it at
/// most `reach`, computed over the mask's box grown by `reach` alone (`SectionBox`), as
/// no pixel past it is that near. Over the whole slice, `allowed`'s transforms took most
/// of the centre slice's structure steps (spine-mr, warm: 5.6 of 8.1 ms for five bodies).
pub fn within_reach(mask: &Array2<bool>, reach: f64) -> Array2<bool> {
    let mut out = Array2::from_elem(mask.dim(), false);
    let Some(b) = SectionBox::of(mask) else {
        return out;
    };
    // A reach that is not a finite number of pixels is taken over the whole slice.
    let b = match reach.ceil() {
        r if r.is_finite() && r >= 0.0 && r < (mask.nrows() + mask.ncols()) as f64 => {
            b.grown(r as usize, mask.dim())
        }
        _ => b.grown(mask.nrows().max(mask.ncols()), mask.dim()),
    };
    let window = ndarray::s![b.rows.clone(), b.cols.clone()];
    let distance = distance_outside(&mask.slice(window).to_owned());
    out.slice_mut(window)
        .zip_mut_with(&distance, |o, &d| *o = f64::from(d) <= reach);
    out
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

    /// A basic adapter for one structure, `body` (48 × 48 pixels), with the stack anchor,
    /// on two channels (its model plays no part here; its post-processing does).
    fn body_adapter(body: &Array2<bool>) -> Adapter {
        use crate::adapter::{Method, TrainConfig, TrainingSlice};
        use crate::backbone::FeatureMap;
        let fm = FeatureMap::new(
            Array3::from_shape_fn((2, 12, 12), |(c, i, j)| {
                (c as f32 + 1.0) * f32::from(body[[i * 4 + 2, j * 4 + 2]])
            }),
            48,
            48,
        );
        let cells =
            Array2::from_shape_fn((12, 12), |(i, j)| u8::from(body[[i * 4 + 2, j * 4 + 2]]));
        Adapter::train(
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
        .unwrap()
    }

    #[test]
    fn the_centre_slices_appearance_weighs_the_stack_when_trained_with_it() {
        use crate::backbone::FeatureMap;
        let body = disk((48, 48), (24.0, 24.0), 12.0);
        let in_body = |i: usize, j: usize| body[[i * 4 + 2, j * 4 + 2]];
        // The body's cells look alike in every slice; a little wobble on top, so that
        // every channel's spread is measured.
        let fm = FeatureMap::new(
            Array3::from_shape_fn((2, 12, 12), |(k, i, j)| {
                f32::from(in_body(i, j)) * (k as f32 + 1.0)
                    + ((i * 5 + j * 3 + k) % 7) as f32 * 0.01
            }),
            48,
            48,
        );
        let sure = Array3::from_shape_fn(
            (1, 12, 12),
            |(_, i, j)| {
                if in_body(i, j) {
                    0.95
                } else {
                    0.02
                }
            },
        );
        let unsure = Array3::from_elem((1, 12, 12), 0.45);
        let mut adapter = body_adapter(&body);
        for on in [false, true] {
            adapter.train.appearance = on;
            let mut anchor = Anchor::default();
            let mut centre = sure.clone();
            anchor.weigh(&mut centre, &fm, Some(&adapter), 0);
            let mut outer = unsure.clone();
            anchor.weigh(&mut outer, &fm, Some(&adapter), -1);
            if !on {
                assert_eq!((centre, outer), (sure.clone(), unsure.clone()));
                continue;
            }
            for ((_, i, j), &v) in outer.indexed_iter() {
                assert_eq!(v > 0.5, in_body(i, j), "({i}, {j}) {v}");
            }
        }
        // Learned in the centre slice only: an anchor that has not seen it leaves a slice
        // as it is, and so does a slice without an adapter.
        let mut outer = unsure.clone();
        Anchor::default().weigh(&mut outer, &fm, Some(&adapter), 1);
        assert_eq!(outer, unsure);
        Anchor::default().weigh(&mut outer, &fm, None, 0);
        assert_eq!(outer, unsure);
    }

    /// The landmarks name the structures in the centre slice only: there a region holding
    /// another structure's landmark is handed to it; the other slices keep their own.
    #[test]
    fn landmarks_name_the_centre_slice_structures_only() {
        // Structure 0 scored on rows 2..10, structure 1 on rows 14..22.
        let slice = || {
            Array3::from_shape_fn((2, 30, 10), |(l, r, c)| {
                let body = if l == 0 { 2..10 } else { 14..22 };
                if body.contains(&r) && (2..8).contains(&c) {
                    0.9
                } else {
                    0.02
                }
            })
        };
        // Structure 0's landmark lies in the lower body, structure 1's is not found.
        let named = [Some((18.0, 5.0)), None];
        let top = |f: &Option<Finding>| {
            f.as_ref().and_then(|f| {
                f.mask
                    .indexed_iter()
                    .find(|(_, m)| **m)
                    .map(|((r, _), _)| r)
            })
        };
        let mut anchor = Anchor::default();
        let centre = anchor.structures(&mut slice(), None, 0, 4.0, &named);
        assert_eq!(centre[0].as_ref().map(|f| f.label), Some(0));
        assert_eq!((top(&centre[0]), top(&centre[1])), (Some(14), None));
        let beside = anchor.structures(&mut slice(), None, 1, 4.0, &named);
        assert_eq!((top(&beside[0]), top(&beside[1])), (Some(2), Some(14)));
        let unnamed = Anchor::default().structures(&mut slice(), None, 0, 4.0, &[]);
        assert_eq!((top(&unnamed[0]), top(&unnamed[1])), (Some(2), Some(14)));
    }

    /// Scores that make a structure's region `mask` on a slice.
    fn scores(mask: &Array2<bool>) -> Array3<f32> {
        let (rows, cols) = mask.dim();
        Array3::from_shape_fn(
            (1, rows, cols),
            |(_, r, c)| if mask[[r, c]] { 0.9 } else { 0.05 },
        )
    }

    /// A finding of `label` whose region is `mask`, its figures 1 and its point (0, 0).
    pub(crate) fn finding(label: usize, mask: Array2<bool>) -> Finding {
        Finding {
            label,
            mask,
            mass: 1.0,
            point: (0.0, 0.0),
            confidence: 1.0,
        }
    }

    /// A 40 × 40 label map with label 3 on `rows` × `cols`: a template's section.
    fn rect(rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) -> Array2<u8> {
        Array2::from_shape_fn((40, 40), |(r, c)| {
            u8::from(rows.contains(&r) && cols.contains(&c)) * 3
        })
    }

    /// Through one `Anchor`, the body's region in each of `steps` (the slice's step from
    /// the centre, the region its scores make), in that order.
    fn run_stack(adapter: &Adapter, steps: &[(isize, &Array2<bool>)]) -> Vec<Array2<bool>> {
        run_stack_found(adapter, steps)
            .into_iter()
            .map(|m| m.expect("the body"))
            .collect()
    }

    /// `run_stack`, where a slice may have no body.
    fn run_stack_found(
        adapter: &Adapter,
        steps: &[(isize, &Array2<bool>)],
    ) -> Vec<Option<Array2<bool>>> {
        let mut anchor = Anchor::default();
        steps
            .iter()
            .map(|(step, mask)| {
                let found = anchor.structures(&mut scores(mask), Some(adapter), *step, 4.0, &[]);
                found[0].as_ref().map(|f| f.mask.clone())
            })
            .collect()
    }

    /// Through `Anchor`: a lateral slice's spill past the reach of the centre slice's
    /// section is cut; without the stack anchor it stays.
    #[test]
    fn a_lateral_slice_keeps_its_body_within_the_reach_of_the_centre_section() {
        let dim = (48, 48);
        let body = disk(dim, (20.0, 20.0), 8.0);
        let mut adapter = body_adapter(&body);
        adapter.stack_reach = vec![Some(0.25)];
        // The lateral slice: a smaller section and, joined to it, spill down to row 40.
        let spill = disk(dim, (20.0, 20.0), 6.0)
            | Array2::from_shape_fn(dim, |(r, c)| (20..41).contains(&r) && (18..23).contains(&c));
        let lateral = |adapter: &Adapter| {
            let mut anchor = Anchor::default();
            let centre = anchor.structures(&mut scores(&body), Some(adapter), 0, 4.0, &[]);
            assert!(centre[0].is_some());
            let found = anchor.structures(&mut scores(&spill), Some(adapter), 1, 4.0, &[]);
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

    /// Sections of a 23 × 31 slice whose boxes are a part of it, or all of it: inside
    /// (a ring, a small disk), on the edges, in a corner, filling the slice, and none.
    fn sections() -> Vec<Array2<bool>> {
        let dim = (23, 31);
        vec![
            disk(dim, (11.0, 15.0), 9.0) & !disk(dim, (11.0, 15.0), 3.0),
            Array2::from_shape_fn(dim, |(r, c)| r < 7 && c + r < 12),
            Array2::from_shape_fn(dim, |(r, _)| (5..9).contains(&r)),
            disk(dim, (22.0, 30.0), 4.0),
            disk(dim, (3.0, 20.0), 1.5),
            Array2::from_elem(dim, true),
            Array2::from_elem(dim, false),
        ]
    }

    /// Over the section's box, as over the whole slice.
    #[test]
    fn depth_inside_is_the_distance_to_the_outside() {
        for section in sections() {
            let want = distance_outside(&section.mapv(|m| !m));
            assert_eq!(depth_inside(&section), want);
        }
    }

    /// Over the mask's grown box, as over the whole slice, for reaches of none, part of a
    /// pixel, a few, more than the slice, below none and not a number.
    #[test]
    fn within_reach_is_the_distance_over_the_whole_slice() {
        for mask in sections() {
            let distance = distance_outside(&mask);
            for reach in [0.0, 0.5, 1.0, 2.9, 3.0, 4.2, 7.5, 40.0, -1.0, f64::NAN] {
                let want = distance.mapv(|d| f64::from(d) <= reach);
                assert_eq!(within_reach(&mask, reach), want, "reach {reach}");
            }
        }
    }

    #[test]
    fn reach_is_learned_from_sections_beside_the_centre() {
        // Squares of 20 × 20 pixels (equivalent radius √(400/π) = 11.28): a centre
        // section and others shifted down, whose last rows lie 1, 2, ... pixels past it.
        let square = |top: usize| rect(top..top + 20, 10..30);
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

    #[test]
    fn a_slice_after_the_centre_is_scored_only_where_its_structures_may_stay() {
        // Two bodies on a 56 × 56 slice over a 32 × 32 grid (1.75 pixels a cell, as the
        // spine's 224 × 224 slices over the hypercolumn's 128 × 128).
        let (image, grid) = ((56, 56), (32, 32));
        let body = |label, centre: (f64, f64)| {
            Some(Finding {
                label,
                mask: disk(image, centre, 5.0),
                mass: 1.0,
                point: centre,
                confidence: 1.0,
            })
        };
        let centre = [body(0, (20.0, 24.0)), body(1, (34.0, 30.0))];
        let mut anchor = Anchor::default();
        assert!(
            anchor.window(image, grid).is_none(),
            "before the centre slice"
        );
        anchor.allowed = allowed(&centre, &[Some(0.5), Some(0.5)], 1.0);
        let cells = anchor.window(image, grid).expect("a window");
        let bounds = cells.bounds().expect("cells");
        assert!(
            cells.crops(grid) && cells.count() * 5 < bounds.rows.len() * bounds.columns.len() * 4,
            "{cells:?}"
        );
        // Scores zeroed outside the cells upsample to the same bits wherever a region
        // may stay; one cell less at either end of any row changes some of them.
        let scores = Array3::from_shape_fn((2, grid.0, grid.1), |(l, i, j)| {
            ((l * 7 + i * 13 + j * 29) % 17) as f32 / 17.0 + 0.01
        });
        let kept_in = |cells: &Cells| {
            let mut kept = Array3::zeros(scores.dim());
            for (r, span) in cells.rows() {
                kept.slice_mut(ndarray::s![.., r, span.clone()])
                    .assign(&scores.slice(ndarray::s![.., r, span.clone()]));
            }
            postprocess::upsample_scores(&kept, image.0, image.1)
        };
        let whole = postprocess::upsample_scores(&scores, image.0, image.1);
        let where_allowed = |up: &Array3<f32>| {
            let mut differ = 0;
            for region in anchor.allowed.iter().flatten() {
                for ((r, c), _) in region.indexed_iter().filter(|(_, k)| **k) {
                    for l in 0..2 {
                        differ +=
                            usize::from(up[[l, r, c]].to_bits() != whole[[l, r, c]].to_bits());
                    }
                }
            }
            differ
        };
        assert_eq!(where_allowed(&kept_in(&cells)), 0);
        let mut smaller = 0;
        for (i, span) in cells.spans.iter().enumerate() {
            assert!(!span.is_empty(), "no row between two is left out here");
            for less in [span.start + 1..span.end, span.start..span.end - 1] {
                let mut fewer = cells.clone();
                fewer.spans[i] = less;
                assert!(where_allowed(&kept_in(&fewer)) > 0, "{fewer:?} is enough");
                smaller += 1;
            }
        }
        assert_eq!(smaller, 2 * bounds.rows.len());
        assert_eq!(
            (cells.first_row, cells.spans.len()),
            (bounds.rows.start, bounds.rows.len())
        );
        // A structure the centre slice lacks may stay anywhere; a slice of another size
        // is not the centre slice's.
        anchor.allowed = allowed(&[centre[0].clone(), None], &[Some(0.5), Some(0.5)], 1.0);
        assert!(anchor.window(image, grid).is_none());
        anchor.allowed = allowed(&centre, &[Some(0.5), None], 1.0);
        assert!(anchor.window(image, grid).is_none(), "no reach learned");
        anchor.allowed = allowed(&centre, &[Some(0.5), Some(0.5)], 1.0);
        assert!(anchor.window((60, 56), grid).is_none());
    }

    #[test]
    fn a_stack_is_taken_outwards_from_its_centre() {
        assert_eq!(outwards(9, 4), [4, 3, 5, 2, 6, 1, 7, 0, 8]);
        assert_eq!(outwards(4, 2), [2, 1, 3, 0]);
        assert_eq!(outwards(3, 0), [0, 1, 2]);
        assert_eq!(outwards(1, 0), [0]);
        assert!(outwards(0, 0).is_empty());
    }

    #[test]
    fn depth_is_learned_from_sections_next_to_each_other() {
        // Label 3 as 20 × 20 squares (equivalent radius √(400/π) = 11.28) in the centre
        // slice (1); the slice before it lacks the square's last 4 columns, the one after
        // it is the same square.
        let square = |last: usize| rect(10..30, 10..last);
        let equivalent = (400.0 / std::f64::consts::PI).sqrt();
        let least = |d: f64| (d / equivalent * 100.0).ceil() / 100.0;
        // Before alone: its section eroded by less than 4 pixels keeps pixels in the
        // missing columns (0.93 within at 3); by 4, none (1.0 within).
        let one = [square(26), square(30)];
        let depth = learn_depth(std::iter::once((one.iter().collect(), 1)), &[3, 4]);
        assert_eq!(depth.len(), 2);
        assert_eq!(depth[0].len(), 1);
        assert!(
            (depth[0][0].expect("step 1") - least(4.0)).abs() < 1e-9,
            "{depth:?}"
        );
        assert!(depth[1].is_empty(), "a structure no template has");
        // With the side after it (1.0 within at any depth), the mean: 0.96 at 3 pixels,
        // 0.94 at 2.
        let both = [square(26), square(30), square(30)];
        let depth = learn_depth(std::iter::once((both.iter().collect(), 1)), &[3]);
        assert!(
            (depth[0][0].expect("step 1") - least(3.0)).abs() < 1e-9,
            "{depth:?}"
        );
        // Per structure: label 4, a square beside label 3's that is the same in every
        // slice, needs no depth.
        let with_4 = |m: &Array2<u8>| {
            Array2::from_shape_fn((40, 80), |(r, c)| {
                if c < 40 {
                    m[[r, c]]
                } else {
                    u8::from((10..30).contains(&r) && (50..70).contains(&c)) * 4
                }
            })
        };
        let pair: Vec<Array2<u8>> = both.iter().map(with_4).collect();
        let depth = learn_depth(std::iter::once((pair.iter().collect(), 1)), &[3, 4]);
        assert!(
            (depth[0][0].expect("label 3") - least(3.0)).abs() < 1e-9,
            "{depth:?}"
        );
        assert_eq!(depth[1], [Some(0.0)]);
        // A step out where no template has the structure on both sides teaches nothing.
        let empty = Array2::<u8>::zeros((40, 40));
        let far = [empty.clone(), square(30), square(30), square(30), empty];
        let depth = learn_depth(std::iter::once((far.iter().collect(), 2)), &[3]);
        assert_eq!(depth, [[Some(0.0)]]);
    }

    #[test]
    fn a_slice_is_filled_from_deep_inside_the_next_slice_in() {
        let dim = (30, 30);
        let section = disk(dim, (12.0, 12.0), 8.0);
        let inner = vec![Some(section.clone()), None, Some(section.clone())];
        // Structure 0 found small in this slice; structure 1 over part of 0's section;
        // structure 2 not found here.
        let small = disk(dim, (12.0, 12.0), 3.0);
        let other = Array2::from_shape_fn(dim, |(r, c)| (10..13).contains(&r) && c >= 15);
        let mut found = vec![
            Some(finding(0, small.clone())),
            Some(finding(1, other.clone())),
            None,
        ];
        let scores = Array3::from_elem((3, 30, 30), 0.5f32);
        let depth = 0.25;
        // No depth learned for structure 0: nothing filled.
        let mut unlearned = found.clone();
        fill_from_inner(
            &mut unlearned,
            &inner,
            &[None, Some(0.0), Some(0.0)],
            &scores,
        );
        assert_eq!(unlearned[0].as_ref().map(|f| &f.mask), Some(&small));
        fill_from_inner(&mut found, &inner, &[Some(depth); 3], &scores);
        // What lies deeper than 0.25 × its equivalent radius inside the section, by brute
        // force, less structure 1's region.
        let area = section.iter().filter(|m| **m).count() as f64;
        let keep = depth * (area / std::f64::consts::PI).sqrt();
        let outside: Vec<(usize, usize)> = section
            .indexed_iter()
            .filter(|(_, m)| !**m)
            .map(|(p, _)| p)
            .collect();
        let deep = Array2::from_shape_fn(dim, |(r, c)| {
            outside
                .iter()
                .map(|&(a, b)| (r as f64 - a as f64).hypot(c as f64 - b as f64))
                .fold(f64::INFINITY, f64::min)
                > keep
        });
        let want = &small | &(&deep & &other.mapv(|m| !m));
        let filled = found[0].as_ref().expect("structure 0 stays");
        assert_eq!(filled.mask, want);
        assert!(
            filled.mask.iter().filter(|m| **m).count() > 4 * small.iter().filter(|m| **m).count()
        );
        assert!(
            !filled.mask[[11, 15]] && deep[[11, 15]],
            "not over structure 1"
        );
        assert!(
            !filled.mask[[12, 4]] && section[[12, 4]],
            "the section's rim stays out"
        );
        // Measured again from the scores.
        let n = filled.mask.iter().filter(|m| **m).count() as f64;
        assert!((filled.mass - 0.5 * n).abs() < 1e-9 && (filled.point.0 - 12.0).abs() < 1.0);
        assert_eq!(
            found[1].as_ref().map(|f| &f.mask),
            Some(&other),
            "no section in"
        );
        assert!(
            found[2].is_none(),
            "a structure this slice lacks stays absent"
        );
    }

    /// Through `Anchor`, with a learned depth: each slice out is filled from the one next
    /// in as it was filled, on its own side, and only from that one.
    #[test]
    fn a_stack_fills_its_slices_outwards() {
        let dim = (48, 48);
        let body = disk(dim, (20.0, 20.0), 8.0);
        let upper = Array2::from_shape_fn(dim, |(r, c)| body[[r, c]] && r <= 20);
        let small = disk(dim, (20.0, 20.0), 3.0);
        let mut adapter = body_adapter(&body);
        adapter.stack_depth = vec![vec![Some(0.0), Some(0.0)]];
        let got = run_stack(
            &adapter,
            &[(0, &body), (-1, &upper), (-2, &small), (2, &small)],
        );
        assert_eq!(got[1], body, "the half section filled from the centre's");
        assert_eq!(got[2], body, "step 2 from step 1 as filled");
        assert_eq!(
            got[3], small,
            "step 2 on the other side: step 1 there not taken"
        );
        // Without the learned depth, or without the anchor, nothing is filled.
        let mut plain = adapter.clone();
        plain.stack_depth.clear();
        assert_eq!(run_stack(&plain, &[(0, &body), (-1, &upper)])[1], upper);
        plain = adapter.clone();
        plain.train.stack_anchor = false;
        assert_eq!(run_stack(&plain, &[(0, &body), (-1, &upper)])[1], upper);
    }

    #[test]
    fn bound_is_learned_from_sections_next_to_each_other() {
        // Label 3 as 20 × 20 squares (equivalent radius 11.28) in the centre slice (1);
        // the slice before it reaches 2 columns further right, the one after it 1 row
        // lower and 2 columns less wide.
        let equivalent = (400.0 / std::f64::consts::PI).sqrt();
        let least = |d: f64| (d / equivalent * 100.0).ceil() / 100.0;
        let centre = rect(10..30, 10..30);
        // Before alone: 40 of its 440 pixels lie 1 or 2 pixels past the centre's
        // section; 99 % are held only at 2 pixels.
        let one = [rect(10..30, 10..32), centre.clone()];
        let bound = learn_bound(std::iter::once((one.iter().collect(), 1)), &[3, 4]);
        assert_eq!(bound.len(), 2);
        assert!(
            (bound[0][0].expect("step 1") - least(2.0)).abs() < 1e-9,
            "{bound:?}"
        );
        assert!(bound[1].is_empty(), "a structure no template has");
        // With the side after it (18 of 360 pixels 1 past: 0.95 held at 0, 1.0 at 1),
        // the mean: 0.93 at 0 pixels, 0.977 at 1, 1.0 at 2.
        let both = [rect(10..30, 10..32), centre.clone(), rect(11..31, 11..29)];
        let bound = learn_bound(std::iter::once((both.iter().collect(), 1)), &[3]);
        assert!(
            (bound[0][0].expect("step 1") - least(2.0)).abs() < 1e-9,
            "{bound:?}"
        );
        // A narrowing stack needs no margin; a step without both sections teaches
        // nothing.
        let empty = Array2::<u8>::zeros((40, 40));
        let narrowing = [
            empty.clone(),
            rect(12..28, 12..28),
            centre.clone(),
            rect(11..29, 11..29),
            empty,
        ];
        let bound = learn_bound(std::iter::once((narrowing.iter().collect(), 2)), &[3]);
        assert_eq!(bound, [[Some(0.0)]]);
    }

    #[test]
    fn a_slice_is_bounded_by_the_next_slice_in_grown() {
        let dim = (30, 30);
        let section = disk(dim, (12.0, 12.0), 6.0);
        let inner = vec![
            Some(section.clone()),
            None,
            Some(section.clone()),
            Some(section.clone()),
        ];
        // Structure 0 spills down to row 27; structure 1 has no section in; structure
        // 2 lies wholly past the margin; structure 3 wholly within it.
        let spill = disk(dim, (12.0, 12.0), 5.0)
            | Array2::from_shape_fn(dim, |(r, c)| (12..28).contains(&r) && (10..15).contains(&c));
        let far = disk(dim, (26.0, 26.0), 2.0);
        let near = disk(dim, (12.0, 12.0), 4.0);
        let mut found = vec![
            Some(finding(0, spill.clone())),
            Some(finding(1, spill.clone())),
            Some(finding(2, far)),
            Some(finding(3, near.clone())),
        ];
        let scores = Array3::from_elem((4, 30, 30), 0.5f32);
        // No margin learned for structure 0: untouched.
        let mut unlearned = found.clone();
        bound_by_inner(&mut unlearned, &inner, &[None; 4], &scores);
        assert_eq!(unlearned[0].as_ref().map(|f| &f.mask), Some(&spill));
        let margin = 0.3;
        bound_by_inner(&mut found, &inner, &[Some(margin); 4], &scores);
        // Within 0.3 × the section's equivalent radius of it, by brute force.
        let area = section.iter().filter(|m| **m).count() as f64;
        let reach = margin * (area / std::f64::consts::PI).sqrt();
        let on: Vec<(usize, usize)> = section
            .indexed_iter()
            .filter(|(_, m)| **m)
            .map(|(p, _)| p)
            .collect();
        let within = Array2::from_shape_fn(dim, |(r, c)| {
            on.iter()
                .map(|&(a, b)| (r as f64 - a as f64).hypot(c as f64 - b as f64))
                .fold(f64::INFINITY, f64::min)
                <= reach
        });
        let bounded = found[0].as_ref().expect("structure 0 stays");
        assert_eq!(bounded.mask, &spill & &within);
        assert!(bounded.mask[[19, 12]] && !bounded.mask[[20, 12]]);
        // Measured again from the scores.
        let n = bounded.mask.iter().filter(|m| **m).count() as f64;
        assert!((bounded.mass - 0.5 * n).abs() < 1e-9 && bounded.point.0 > 12.0);
        assert_eq!(
            found[1].as_ref().map(|f| &f.mask),
            Some(&spill),
            "no section in"
        );
        assert!(found[2].is_none(), "bounded away entirely: absent");
        let kept = found[3].as_ref().expect("structure 3 stays");
        assert_eq!((&kept.mask, kept.mass), (&near, 1.0), "within: untouched");
        // A margin past any slice (a hand-edited file may hold one) keeps everything.
        let mut wide = vec![Some(finding(0, spill.clone()))];
        bound_by_inner(&mut wide, &inner[..1], &[Some(1e300)], &scores);
        assert_eq!(wide[0].as_ref().map(|f| &f.mask), Some(&spill));
    }

    /// Through `Anchor`, with a learned margin: each slice out is bounded by the one next
    /// in as it was bounded, on its own side, and only by that one.
    #[test]
    fn a_stack_bounds_its_slices_outwards() {
        let dim = (48, 48);
        let body = disk(dim, (20.0, 20.0), 8.0);
        let upper = Array2::from_shape_fn(dim, |(r, c)| body[[r, c]] && r <= 20);
        let spill = |r0: usize| {
            &body
                | &Array2::from_shape_fn(dim, |(r, c)| {
                    (20..r0).contains(&r) && (18..23).contains(&c)
                })
        };
        let mut adapter = body_adapter(&body);
        adapter.stack_bound = vec![vec![Some(0.0), Some(0.0)]];
        let (down, further) = (spill(36), spill(44));
        let got = run_stack(
            &adapter,
            &[
                (0, &body),
                (-1, &down),
                (-2, &further),
                (1, &upper),
                (2, &down),
            ],
        );
        assert_eq!(got[1], body, "the spill past the centre's section cut");
        assert_eq!(got[2], body, "step 2 by step 1 as bounded");
        assert_eq!(got[3], upper, "within: as found");
        assert_eq!(got[4], upper, "step 2 on the other side, by its step 1");
        // Filled, then bounded: a speck found beside the section in is cut away, and the
        // section the fill gives the slice stays.
        let speck = disk(dim, (42.0, 42.0), 2.0);
        let mut both = adapter.clone();
        both.stack_depth = vec![vec![Some(0.0)]];
        assert_eq!(run_stack(&both, &[(0, &body), (1, &speck)])[1], body);
        // Without the learned margin, or without the anchor, nothing is bounded by the
        // slice next in.
        let mut plain = adapter.clone();
        plain.stack_bound.clear();
        assert_eq!(run_stack(&plain, &[(0, &body), (-1, &down)])[1], down);
        plain = adapter.clone();
        plain.train.stack_anchor = false;
        assert_eq!(run_stack(&plain, &[(0, &body), (-1, &down)])[1], down);
    }

    #[test]
    fn blend_is_learned_at_the_outermost_step() {
        // Label 3 as rectangles: two steps out on the side after the centre slice (2),
        // the outer one narrower in both axes, and one step before it.
        // The standard deviation of n consecutive rows or columns: √((n² − 1) / 12).
        let sd = |n: f64| ((n * n - 1.0) / 12.0).sqrt();
        let centre = rect(10..30, 5..35);
        let stack = [
            Array2::zeros((40, 40)),
            rect(10..30, 5..35),
            centre.clone(),
            rect(10..30, 5..35),
            rect(11..29, 11..29),
        ];
        let blend = learn_blend(std::iter::once((stack.iter().collect(), 2)), &[3, 4]);
        assert_eq!(blend.len(), 2);
        assert_eq!(blend[0].len(), 2, "{blend:?}");
        assert_eq!(blend[0][0], None, "a step further in: not blended");
        let [rows, cols] = blend[0][1].expect("the outermost step");
        assert!((rows - sd(18.0) / sd(20.0)).abs() < 1e-9, "{rows}");
        assert!((cols - sd(18.0) / sd(30.0)).abs() < 1e-9, "{cols}");
        assert!(blend[1].is_empty(), "a structure no template has");
        // Both sides of a step: the mean of their ratios. A section of one row has no
        // spread to scale: the pair teaches nothing.
        let both = [rect(10..30, 11..29), centre.clone(), rect(12..28, 5..35)];
        let blend = learn_blend(std::iter::once((both.iter().collect(), 1)), &[3]);
        let [rows, cols] = blend[0][0].expect("step 1");
        assert!((rows - (1.0 + sd(16.0) / sd(20.0)) / 2.0).abs() < 1e-9);
        assert!((cols - (sd(18.0) / sd(30.0) + 1.0) / 2.0).abs() < 1e-9);
        let flat = [rect(20..21, 5..35), centre];
        assert_eq!(
            learn_blend(std::iter::once((flat.iter().collect(), 1)), &[3]),
            [Vec::<Option<[f64; 2]>>::new()]
        );
    }

    /// The signed distance to a mask's outline by brute force: to its nearest pixel from
    /// outside, less the distance to the nearest pixel outside it from inside.
    fn signed_brute(mask: &Array2<bool>) -> Array2<f64> {
        let pixels: Vec<((usize, usize), bool)> =
            mask.indexed_iter().map(|(p, m)| (p, *m)).collect();
        Array2::from_shape_fn(mask.dim(), |(r, c)| {
            let inside = mask[[r, c]];
            let nearest = pixels
                .iter()
                .filter(|(_, m)| *m != inside)
                .map(|((a, b), _)| (r as f64 - *a as f64).hypot(c as f64 - *b as f64))
                .fold(f64::INFINITY, f64::min);
            if inside {
                -nearest
            } else {
                nearest
            }
        })
    }

    #[test]
    fn a_blended_region_lies_halfway_to_the_section_in_scaled() {
        let dim = (40, 40);
        let section = disk(dim, (20.0, 20.0), 9.0);
        // The section in, scaled about its centre (20, 20): 0.5 in rows, 1 in columns.
        let narrowed = scaled(&section, [0.5, 1.0]);
        let by_hand = Array2::from_shape_fn(dim, |(r, c)| {
            let from = 2 * r as i64 - 20;
            (0..40).contains(&from) && section[[from as usize, c]]
        });
        assert_eq!(narrowed, by_hand);
        assert!(narrowed[[24, 20]] && !narrowed[[25, 20]] && narrowed[[20, 29]]);
        // Grown in one axis and shrunk in the other, off-centre and past the slice's
        // edge: every pixel of the slice takes the one it comes from.
        let corner = disk(dim, (6.0, 30.0), 5.0);
        let (n, r0, c0) = corner
            .indexed_iter()
            .filter(|(_, m)| **m)
            .fold((0.0, 0.0, 0.0), |(n, a, b), ((r, c), _)| {
                (n + 1.0, a + r as f64, b + c as f64)
            });
        let (r0, c0) = (r0 / n, c0 / n);
        for scale in [[1.7, 0.6], [0.3, 1.9]] {
            let by_hand = Array2::from_shape_fn(dim, |(r, c)| {
                let from_r = (r0 + (r as f64 - r0) / scale[0]).round_ties_even();
                let from_c = (c0 + (c as f64 - c0) / scale[1]).round_ties_even();
                (0.0..40.0).contains(&from_r)
                    && (0.0..40.0).contains(&from_c)
                    && corner[[from_r as usize, from_c as usize]]
            });
            assert_eq!(scaled(&corner, scale), by_hand, "{scale:?}");
        }
        // Structure 0: a region shifted right of the section in; 1: another structure's
        // region between the two, which the blend does not take.
        let shifted = disk(dim, (20.0, 26.0), 7.0);
        let beside = disk(dim, (20.0, 17.0), 1.5);
        let inner = vec![Some(section.clone()), None];
        let mut found = vec![
            Some(finding(0, shifted.clone())),
            Some(finding(1, beside.clone())),
        ];
        let scores = Array3::from_elem((2, 40, 40), 0.5f32);
        let scale = [Some([0.5, 1.0]), Some([0.5, 1.0])];
        blend_with_inner(&mut found, &inner, &scale, &scores);
        let halfway = (signed_brute(&shifted) + signed_brute(&narrowed)).mapv(|d| d < 0.0);
        let blended = found[0].as_ref().expect("structure 0");
        assert_eq!(blended.mask, &halfway & &beside.mapv(|b| !b));
        assert!(blended.mask != shifted && blended.mask != halfway);
        let n = blended.mask.iter().filter(|m| **m).count() as f64;
        assert!((blended.mass - 0.5 * n).abs() < 1e-9, "measured again");
        assert_eq!(
            found[1].as_ref().map(|f| &f.mask),
            Some(&beside),
            "no section in: as found"
        );
        // As found: without a scale, a region that does not meet the section in, a
        // structure placed by the layout (no region).
        let apart = disk(dim, (36.0, 36.0), 2.0);
        let placed = Array2::from_elem(dim, false);
        for (region, scale) in [
            (&shifted, None),
            (&apart, Some([0.5, 1.0])),
            (&placed, Some([0.5, 1.0])),
        ] {
            let mut one = vec![Some(finding(0, region.clone()))];
            blend_with_inner(&mut one, &inner[..1], &[scale], &scores);
            assert_eq!(one[0].as_ref().map(|f| &f.mask), Some(region));
        }
    }

    /// Through `Anchor`: only the step a scale was learned for is blended, with the slice
    /// next in as it was taken.
    #[test]
    fn a_stack_blends_its_outermost_slices() {
        let dim = (48, 48);
        let body = disk(dim, (20.0, 20.0), 8.0);
        let right = disk(dim, (20.0, 24.0), 8.0);
        let mut adapter = body_adapter(&body);
        adapter.stack_blend = vec![vec![None, Some([1.0, 1.0])]];
        let got = run_stack(&adapter, &[(0, &body), (1, &right), (2, &right)]);
        assert_eq!(got[1], right, "step 1: no scale, as found");
        let halfway = (signed_brute(&right) + signed_brute(&right)).mapv(|d| d < 0.0);
        assert_eq!(halfway, right, "a region blended with itself stays");
        let got = run_stack(&adapter, &[(0, &body), (1, &body), (2, &right)]);
        let halfway = (signed_brute(&right) + signed_brute(&body)).mapv(|d| d < 0.0);
        assert_eq!(got[2], halfway, "step 2 halfway to step 1");
        assert!(got[2] != right && got[2] != body);
        let mut plain = adapter.clone();
        plain.train.stack_anchor = false;
        assert_eq!(
            run_stack(&plain, &[(0, &body), (1, &body), (2, &right)])[2],
            right
        );
    }

    #[test]
    fn carry_is_learned_as_the_share_of_sections_continuing() {
        let square = rect(10..30, 10..30);
        let empty = Array2::<u8>::zeros((40, 40));
        // Centre slice 2: the section continues to both sides at step 1, and ends before
        // it at step 2 while it continues after it.
        let open = [
            empty.clone(),
            square.clone(),
            square.clone(),
            square.clone(),
            square.clone(),
        ];
        let carry = learn_carry(std::iter::once((open.iter().collect(), 2)), &[3, 4]);
        assert_eq!(carry[0], [Some(1.0), Some(0.5)]);
        assert!(carry[1].is_empty(), "a structure no template has");
        // A second template, centre slice 1, whose section ends after it: 3 of 4 pairs
        // continue at step 1; at step 2 only the first template's pairs count.
        let ends = [square.clone(), square.clone(), empty.clone()];
        let two = [(open.iter().collect(), 2), (ends.iter().collect(), 1)];
        let carry = learn_carry(two.into_iter(), &[3]);
        assert_eq!(carry, [[Some(0.75), Some(0.5)]]);
        // No pair at a step whose slices in lack the section.
        let hole = [square.clone(), square.clone(), empty.clone(), empty];
        let carry = learn_carry(std::iter::once((hole.iter().collect(), 2)), &[3]);
        assert_eq!(carry, [[None, Some(1.0)]]);
    }

    #[test]
    fn a_missed_section_is_carried_from_the_slice_next_in() {
        let dim = (30, 30);
        let section = disk(dim, (12.0, 12.0), 8.0);
        let apart = disk(dim, (24.0, 24.0), 4.0);
        let inner = vec![
            Some(section.clone()),
            Some(section.clone()),
            Some(apart.clone()),
            Some(section.clone()),
            None,
        ];
        // Structure 0 missed; 1 found over part of 0's section; 2 placed with no region;
        // 3 missed where a template's section ends; 4 missed with no section in.
        let other = Array2::from_shape_fn(dim, |(r, c)| (10..13).contains(&r) && c >= 15);
        let mut placed = finding(2, Array2::from_elem(dim, false));
        placed.point = (5.0, 5.0);
        let mut found = vec![
            None,
            Some(finding(1, other.clone())),
            Some(placed),
            None,
            None,
        ];
        let scores = Array3::from_elem((5, 30, 30), 0.5f32);
        let shares = [Some(1.0), Some(1.0), Some(1.0), Some(0.9), Some(1.0)];
        carry_from_inner(&mut found, &inner, &shares, &scores);
        let carried = found[0].as_ref().expect("structure 0 carried");
        assert_eq!(carried.label, 0);
        assert_eq!(carried.mask, &section & &other.mapv(|m| !m), "not over 1");
        // Measured from the scores: the part under structure 1 is off to the right.
        let n = carried.mask.iter().filter(|m| **m).count() as f64;
        assert!((carried.mass - 0.5 * n).abs() < 1e-9);
        assert!((carried.confidence - 0.5).abs() < 1e-9);
        assert!((carried.point.0 - 12.0).abs() < 0.5 && carried.point.1 < 11.8);
        let found_1 = found[1].as_ref().expect("structure 1 stays");
        assert_eq!(
            (&found_1.mask, found_1.mass),
            (&other, 1.0),
            "found: as it was"
        );
        let was_placed = found[2].as_ref().expect("structure 2");
        assert_eq!((was_placed.label, &was_placed.mask), (2, &apart));
        assert!(
            (was_placed.point.0 - 24.0).abs() < 1e-9 && (was_placed.point.1 - 24.0).abs() < 1e-9
        );
        assert!(found[3].is_none(), "not every template's section continues");
        assert!(found[4].is_none(), "no section in");
        // Nothing learned, or a section wholly another structure's: nothing carried.
        let mut unlearned = vec![None];
        carry_from_inner(&mut unlearned, &inner[..1], &[None], &scores);
        assert!(unlearned[0].is_none());
        let mut covered = vec![None, Some(finding(1, section.clone()))];
        carry_from_inner(&mut covered, &inner[..2], &[Some(1.0); 2], &scores);
        assert!(covered[0].is_none());
        // Scores of 0 leave its point in the middle of the region's box.
        let mut zero = vec![None];
        carry_from_inner(
            &mut zero,
            &inner[..1],
            &[Some(1.0)],
            &Array3::zeros((1, 30, 30)),
        );
        let f = zero[0].as_ref().expect("carried");
        assert_eq!(
            (f.mask.clone(), f.mass, f.point),
            (section, 0.0, (12.0, 12.0))
        );
    }

    /// Through `Anchor`: a slice that misses the body takes the one next in's, and the
    /// slices further out are filled from it as from a body found.
    #[test]
    fn a_stack_carries_a_missed_section_outwards() {
        let dim = (48, 48);
        let body = disk(dim, (20.0, 20.0), 8.0);
        let none = Array2::from_elem(dim, false);
        let small = disk(dim, (20.0, 20.0), 3.0);
        let mut adapter = body_adapter(&body);
        adapter.stack_carry = vec![vec![Some(1.0), Some(1.0)]];
        adapter.stack_depth = vec![vec![Some(0.0), Some(0.0)]];
        let steps = [(0, &body), (-1, &none), (-2, &small), (1, &none)];
        let got = run_stack_found(&adapter, &steps);
        assert_eq!(got[1].as_ref(), Some(&body), "step −1 carried");
        assert_eq!(got[2].as_ref(), Some(&body), "step −2 filled from it");
        assert_eq!(got[3].as_ref(), Some(&body), "step 1 carried");
        // Without the carry, a share below 1, or without the anchor: missed, and the
        // slice past it is not filled.
        let mut plain = adapter.clone();
        plain.stack_carry.clear();
        let got = run_stack_found(&plain, &steps);
        assert_eq!((got[1].as_ref(), got[2].as_ref()), (None, Some(&small)));
        plain.stack_carry = vec![vec![Some(0.9), Some(1.0)]];
        assert_eq!(run_stack_found(&plain, &steps)[1], None);
        plain = adapter.clone();
        plain.train.stack_anchor = false;
        assert_eq!(run_stack_found(&plain, &steps)[1], None);
    }
}
