//! Landmarks at a structure's extreme (issue #7). Many landmarks are defined on a
//! structure's outline: the apex of a lung is its top, a costophrenic angle its lowest
//! lateral corner (chest-xr's README: derived from the manual masks). Where SAM draws that
//! structure faithfully (`sam::Sam::redraw_structures`), its mask places the landmark
//! beside the landmark adapter's own point.
//!
//! A rule is learned per landmark from the templates, in two checks:
//! - on their true masks, the rule gives every template's landmark back within `EXACT_PX`:
//!   the centroid of the structure's pixels within `band` of its extreme along `direction`
//!   (one of the 8 grid directions, bands `BANDS`);
//! - so it does too from those masks opened by a disc of the pixels one cell of SAM's
//!   masks covers (`open`): a rule must not read a detail finer than SAM's masks can
//!   hold. SAM rounds a thin tip (the costophrenic recess) off, and with two or three
//!   templates the check below could pass such a rule by chance (chest-xr, session 51);
//! - on SAM's masks of the templates, each drawn when it was left out (`eval::
//!   left_out_sam_masks`), the rule's points lie within half the landmark radius of the
//!   templates' landmarks on average.
//!
//! At inference, a landmark with a rule is placed at the mean of the adapter's point and
//! the rule's point on SAM's mask of the structure, when SAM's mask was accepted on that
//! image: two estimates, one from the landmark's surroundings, one from the outline.
//!
//! A rule that fails the second or third check but still passes the first, with SAM's
//! masks keeping it within the landmark radius on average, is kept as a fallback: it
//! places the landmark only where the adapter found none (`Extreme::fallback`). The
//! costophrenic angles are such rules: SAM rounds the recess's tip off, so its corner
//! lies 7–8 px above the truth's (median over chest-xr's test cases, first split), too far
//! to average with the adapter's point, which is better where it has one, but an answer
//! where it has none (session 62: the adapter on the equalised slice left 11 of 570
//! angles out over three splits; the rule placed 9 of them within 10 px). Any rule places
//! a landmark the adapter left out. A fallback rule's point also ranks the adapter's
//! candidate regions before the layout chooses among them (`prior`), so SAM's masks are
//! drawn before the landmarks' regions are chosen.
//!
//! The rule's direction is turned into the target's pose as the landmarks' layout sees it
//! (`ShapeModel::turn`): a lung's apex is its top in the patient's frame, and read in the
//! image's frame it cost the apices of test images turned by ±10° 0.06–0.21 of their
//! accuracy (chest-xr, first split).

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::postprocess::Finding;

/// The templates' own pose (sin, cos): no turn.
pub const TEMPLATES_POSE: (f64, f64) = (0.0, 1.0);

/// Pixels: how closely a rule must give back every template's landmark from its true mask.
pub const EXACT_PX: f64 = 1.5;
/// Band depths tried (pixels along the direction; 0: the extreme pixels alone).
const BANDS: [f64; 3] = [0.0, 2.0, 5.0];

/// A landmark placed on a structure's extreme.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Extreme {
    /// The structure's label value (as in the structure task's `values`).
    pub structure: u8,
    /// (row, column) steps, each −1, 0 or 1, not both 0.
    pub direction: [i8; 2],
    /// Pixels within this depth of the extreme count (in units of the direction's steps).
    pub band: f64,
    /// The rule places the landmark only where the adapter found none (it failed the
    /// checks for the mean, not those for a fallback: see the module).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fallback: bool,
}

impl Extreme {
    /// Whether the rule can be applied (a damaged adapter file is refused at load).
    pub fn is_valid(&self) -> bool {
        self.direction != [0, 0]
            && self.direction.iter().all(|d| (-1..=1).contains(d))
            && self.band.is_finite()
            && self.band >= 0.0
    }

    /// The rule's point (row, column) on `mask`: the centroid of its pixels within `band`
    /// of the extreme along `direction`, turned by `turn` (sin, cos; `TEMPLATES_POSE` for
    /// none) into the target's pose as `ShapeModel::turn` estimates it: the apex is the
    /// top of the lung in the patient's frame, not the image's. None for an empty mask.
    pub fn point(&self, mask: &Array2<bool>, turn: (f64, f64)) -> Option<(f64, f64)> {
        let [r0, c0] = self.direction.map(f64::from);
        let (sin, cos) = turn;
        let (dr, dc) = (r0 * cos + c0 * sin, -r0 * sin + c0 * cos);
        let along = |r: usize, c: usize| dr * r as f64 + dc * c as f64;
        let top = mask
            .indexed_iter()
            .filter(|(_, m)| **m)
            .map(|((r, c), _)| along(r, c))
            .fold(f64::NEG_INFINITY, f64::max);
        if top == f64::NEG_INFINITY {
            return None;
        }
        let (mut sr, mut sc, mut n) = (0.0, 0.0, 0usize);
        for ((r, c), _) in mask.indexed_iter().filter(|(_, m)| **m) {
            // A small slack: the band's edge falls on whole pixels.
            if along(r, c) >= top - self.band - 1e-9 {
                sr += r as f64;
                sc += c as f64;
                n += 1;
            }
        }
        Some((sr / n as f64, sc / n as f64))
    }
}

/// Every rule tried: 8 directions × `BANDS`.
fn candidates(structure: u8) -> impl Iterator<Item = Extreme> {
    (-1i8..=1)
        .flat_map(|dr| (-1i8..=1).map(move |dc| [dr, dc]))
        .filter(|d| *d != [0, 0])
        .flat_map(move |direction| {
            BANDS.into_iter().map(move |band| Extreme {
                structure,
                direction,
                band,
                fallback: false,
            })
        })
}

/// One template's landmark and masks of a structure, for `learn`.
pub struct TemplateView<'a> {
    /// The landmark (row, column) in the template's slice k*.
    pub landmark: (f64, f64),
    /// The structure's true mask there.
    pub truth: &'a Array2<bool>,
    /// `truth` without the detail finer than a cell of SAM's masks on the template's
    /// image: opened by a disc of that radius (`open`, `Sam::mask_cell`).
    pub coarse: &'a Array2<bool>,
    /// SAM's mask of the structure, drawn when the template was left out (None: SAM's
    /// mask was not accepted).
    pub sam: Option<&'a Array2<bool>>,
}

/// The rule that gives every template's landmark back within `EXACT_PX` from its true
/// mask (the closest on average when several do) and from its `coarse` mask, if SAM's
/// masks keep it within `radius / 2` on average; else, as a `fallback`, the rule that
/// gives every landmark back from the true masks alone, if SAM's masks keep it within
/// `radius` on average. With the mean error on SAM's masks; None otherwise, or with fewer
/// than two templates.
pub fn learn(structure: u8, templates: &[TemplateView], radius: f64) -> Option<(Extreme, f64)> {
    if templates.len() < 2 {
        return None;
    }
    let error = |rule: &Extreme, mask: &Array2<bool>, p: (f64, f64)| {
        rule.point(mask, TEMPLATES_POSE)
            .map_or(f64::INFINITY, |q| (q.0 - p.0).hypot(q.1 - p.1))
    };
    let kept = |e: f64| e <= EXACT_PX;
    // The closest rule on the true masks among those `also` keeps, with its error on
    // SAM's masks.
    let best = |also: &dyn Fn(&Extreme) -> bool| {
        let (rule, _) = candidates(structure)
            .filter_map(|rule| {
                let errors: Vec<f64> = templates
                    .iter()
                    .map(|t| error(&rule, t.truth, t.landmark))
                    .collect();
                (errors.iter().all(|e| kept(*e)) && also(&rule))
                    .then(|| (rule, errors.iter().sum::<f64>() / errors.len() as f64))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))?;
        let on_sam = templates
            .iter()
            .map(|t| t.sam.map_or(f64::INFINITY, |m| error(&rule, m, t.landmark)))
            .sum::<f64>()
            / templates.len() as f64;
        Some((rule, on_sam))
    };
    let coarse = |rule: &Extreme| {
        templates
            .iter()
            .all(|t| kept(error(rule, t.coarse, t.landmark)))
    };
    if let Some(found) = best(&coarse).filter(|(_, on_sam)| *on_sam <= radius / 2.0) {
        return Some(found);
    }
    best(&|_| true)
        .filter(|(_, on_sam)| *on_sam <= radius)
        .map(|(rule, on_sam)| {
            let rule = Extreme {
                fallback: true,
                ..rule
            };
            (rule, on_sam)
        })
}

/// Where the fallback rules put their landmarks on `masks` (label value, SAM's accepted
/// mask on this image), each with a spread of `radius`: a prior that ranks the adapter's
/// candidate regions (`postprocess::shaped_findings`), so that where the layout would
/// take a region far from the structure's extreme while another lies near it, the near
/// one wins. Read in the templates' pose, as no landmark is placed yet. A landmark
/// without such a point keeps `aligned`'s (the aligned templates' prior, when there is
/// one). None when neither places any landmark. (chest-xr, second split: the left
/// angle's chosen region lay 38–99 px below the lung in six cases, a region 4–12 px from
/// the truth among the candidates in each.)
pub fn prior(
    rules: &[Option<Extreme>],
    masks: &[(u8, &Array2<bool>)],
    radius: f64,
    aligned: Option<&crate::align::Prior>,
) -> Option<crate::align::Prior> {
    // An adapter without rules has none stored (`Adapter::extremes` empty).
    let n = rules.len().max(aligned.map_or(0, |a| a.points.len()));
    let points: Vec<Option<crate::align::PriorPoint>> = (0..n)
        .map(|l| {
            let on_mask = || {
                let rule = rules.get(l)?.as_ref().filter(|r| r.fallback)?;
                let (_, mask) = masks.iter().find(|(v, _)| *v == rule.structure)?;
                Some(crate::align::PriorPoint {
                    point: rule.point(mask, TEMPLATES_POSE)?,
                    spread: radius,
                })
            };
            on_mask().or_else(|| *aligned?.points.get(l)?)
        })
        .collect();
    if !points.iter().any(Option::is_some) {
        return None;
    }
    Some(crate::align::Prior { points })
}

/// `mask` opened by a disc of `radius` pixels (erosion, then dilation, by Euclidean
/// distance): what is left where the disc fits, so parts narrower than its diameter go.
/// The image's edge is not the structure's. Under 1 pixel: `mask` as it is.
pub fn open(mask: &Array2<bool>, radius: f64) -> Array2<bool> {
    let inner = crate::stack::depth_inside(mask).mapv(|d| f64::from(d) > radius);
    crate::stack::within_reach(&inner, radius)
}

/// Moves each landmark of `found` whose rule's structure has a mask in `masks` (label
/// value, SAM's accepted mask on this image) to the mean of its point and the rule's
/// (not a `fallback` rule's), and places one the adapter left out at the rule's point
/// (no region of its own, as the layout places one). `layout`: the landmarks' layout,
/// whose pose turns the rules' directions (the templates' own pose without one).
pub fn refine_findings(
    found: &mut [Option<Finding>],
    rules: &[Option<Extreme>],
    masks: &[(u8, &Array2<bool>)],
    layout: Option<&crate::postprocess::ShapeModel>,
) {
    // Most adapters have no rule (spine): no pose search for them.
    if !rules.iter().any(Option::is_some) || masks.is_empty() {
        return;
    }
    let points: Vec<Option<(f64, f64)>> =
        found.iter().map(|f| f.as_ref().map(|f| f.point)).collect();
    let turn = layout.map_or(TEMPLATES_POSE, |s| s.turn(&points));
    for (label, (f, rule)) in found.iter_mut().zip(rules).enumerate() {
        let Some(rule) = rule else {
            continue;
        };
        let Some((q, mask)) = masks
            .iter()
            .find(|(v, _)| *v == rule.structure)
            .and_then(|(_, m)| Some((rule.point(m, turn)?, m)))
        else {
            continue;
        };
        match f {
            Some(f) if !rule.fallback => {
                f.point = ((f.point.0 + q.0) / 2.0, (f.point.1 + q.1) / 2.0);
            }
            Some(_) => {}
            None => *f = crate::postprocess::placed(label, q, mask.dim()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A lung-like mask: a triangle whose top is a 3-pixel plateau at row `top`, widening
    /// downwards, with a thin tip at its lower left.
    fn lung(top: usize, left: usize) -> Array2<bool> {
        Array2::from_shape_fn((60, 60), |(r, c)| {
            let r = r as i64 - top as i64;
            let c = c as i64 - left as i64;
            (0..30).contains(&r) && c >= 10 - r / 3 && c <= 12 + r / 3
        })
    }

    /// Lung 1's apex: the centroid of its top 3 rows.
    const APEX: Extreme = Extreme {
        structure: 1,
        direction: [-1, 0],
        band: 2.0,
        fallback: false,
    };

    /// Lung 1's lower lateral corner, as a fallback.
    const CORNER: Extreme = Extreme {
        direction: [1, -1],
        band: 0.0,
        fallback: true,
        ..APEX
    };

    /// A landmark found at `point` (no region of its own).
    fn finding(point: (f64, f64)) -> Finding {
        Finding {
            label: 0,
            mask: Array2::from_elem((60, 60), false),
            mass: 1.0,
            point,
            confidence: 1.0,
        }
    }

    #[test]
    fn a_rule_takes_the_centroid_of_the_band_at_the_extreme() {
        let mask = lung(5, 20);
        let up = APEX;
        // Rows 5–7: columns 30–32 each (r / 3 = 0).
        assert_eq!(up.point(&mask, TEMPLATES_POSE), Some((6.0, 31.0)));
        let down_left = Extreme {
            direction: [1, -1],
            band: 0.0,
            ..up
        };
        // Row 34 (r = 29) spans columns 21–41; row + (−column) is largest at (34, 21).
        assert_eq!(down_left.point(&mask, TEMPLATES_POSE), Some((34.0, 21.0)));
        assert!(up
            .point(&Array2::from_elem((4, 4), false), TEMPLATES_POSE)
            .is_none());
        // In a target turned by a quarter (sin ±1), the templates' up is the image's right
        // or left: the band of 3 columns at that side (rows 26–34, 18 pixels).
        assert_eq!(
            up.point(&mask, (1.0, 0.0)),
            Some((558.0 / 18.0, (3.0 * 39.0 + 3.0 * 79.0 + 3.0 * 120.0) / 18.0))
        );
        assert_eq!(
            up.point(&mask, (-1.0, 0.0)),
            Some((558.0 / 18.0, (3.0 * 23.0 + 3.0 * 45.0 + 3.0 * 66.0) / 18.0))
        );
        assert!(up.is_valid());
        assert!(!Extreme {
            direction: [0, 0],
            ..up
        }
        .is_valid());
        assert!(!Extreme {
            band: f64::NAN,
            ..up
        }
        .is_valid());
    }

    #[test]
    fn the_templates_choose_a_rule_and_sams_masks_confirm_it() {
        let masks: Vec<Array2<bool>> = [(5, 20), (9, 14), (3, 25)]
            .iter()
            .map(|&(t, l)| lung(t, l))
            .collect();
        let up = Extreme {
            structure: 2,
            ..APEX
        };
        let apices: Vec<(f64, f64)> = masks
            .iter()
            .map(|m| up.point(m, TEMPLATES_POSE).unwrap())
            .collect();
        let templates: Vec<TemplateView> = masks
            .iter()
            .zip(&apices)
            .map(|(m, &p)| TemplateView {
                landmark: p,
                truth: m,
                coarse: m,
                sam: Some(m),
            })
            .collect();
        let (rule, on_sam) = learn(2, &templates, 10.0).expect("a rule");
        assert_eq!(rule.direction, [-1, 0]);
        assert_eq!(rule.structure, 2);
        assert_eq!(on_sam, 0.0);

        // SAM's masks lose every row above row 16: the rule places the apices 7–13 px low.
        let cut: Vec<Array2<bool>> = masks
            .iter()
            .map(|m| {
                let mut m = m.clone();
                for mut row in m.rows_mut().into_iter().take(16) {
                    row.fill(false);
                }
                m
            })
            .collect();
        let templates: Vec<TemplateView> = masks
            .iter()
            .zip(&cut)
            .zip(&apices)
            .map(|((m, c), &p)| TemplateView {
                landmark: p,
                truth: m,
                coarse: m,
                sam: Some(c),
            })
            .collect();
        let fallback = Extreme {
            fallback: true,
            ..rule
        };
        let (_, off) = learn(2, &templates, 40.0).expect("within a 40 px radius's half");
        assert!((7.0..13.0).contains(&off), "{off}");
        assert_eq!(
            learn(2, &templates, 1.5 * off),
            Some((fallback, off)),
            "off by more than half the radius, less than all of it: a fallback"
        );
        assert_eq!(
            learn(2, &templates, 0.9 * off),
            None,
            "by more than the radius"
        );
        assert_eq!(learn(2, &templates, 2.0 * off), Some((rule, off)));

        // Landmarks no rule gives back: none.
        let templates: Vec<TemplateView> = masks
            .iter()
            .zip([(20.0, 20.0), (30.0, 40.0), (12.0, 33.0)])
            .map(|(m, p)| TemplateView {
                landmark: p,
                truth: m,
                coarse: m,
                sam: Some(m),
            })
            .collect();
        assert!(learn(2, &templates, 10.0).is_none());
        assert!(learn(2, &templates[..1], 10.0).is_none(), "one template");
    }

    /// A sharp corner is a detail SAM's masks may not hold: a rule on it is only a
    /// fallback even where SAM's masks of the templates keep it, while the rounded top
    /// keeps its rule.
    #[test]
    fn a_rule_on_a_detail_finer_than_sams_cells_is_only_a_fallback() {
        // A lung with an 11-pixel top and a recess: a tip 2 pixels wide, 8 long, running
        // down and out from its lower lateral corner.
        let tipped = |top: usize, left: usize| {
            Array2::from_shape_fn((60, 60), |(r, c)| {
                let r = r as i64 - top as i64;
                let c = c as i64 - left as i64;
                let body = (0..30).contains(&r) && c >= 6 - r / 3 && c <= 16 + r / 3;
                let tip = (30..38).contains(&r) && (0..2).contains(&(c + r - 30));
                body || tip
            })
        };
        let masks: Vec<Array2<bool>> = [(5, 20), (9, 14), (3, 25)]
            .iter()
            .map(|&(t, l)| tipped(t, l))
            .collect();
        let corner = Extreme {
            direction: [1, -1],
            band: 0.0,
            ..APEX
        };
        // The rule learned for the landmarks `rule` places, SAM's masks the true ones, each
        // mask opened by a disc of `cell` pixels.
        let learned = |rule: Extreme, cell: f64| {
            let coarse: Vec<Array2<bool>> = masks.iter().map(|m| open(m, cell)).collect();
            let views: Vec<TemplateView> = masks
                .iter()
                .zip(&coarse)
                .map(|(m, c)| TemplateView {
                    landmark: rule.point(m, TEMPLATES_POSE).unwrap(),
                    truth: m,
                    coarse: c,
                    sam: Some(m),
                })
                .collect();
            learn(1, &views, 10.0).map(|(r, _)| r)
        };
        let rule = |cell| learned(corner, cell);
        // The tip's end is its lowest lateral pixel and its most lateral one: either rule.
        let sharp = rule(0.0).expect("a rule on the true masks");
        assert!(!sharp.fallback);
        assert_eq!(rule(0.9), rule(0.0), "a disc under a pixel removes nothing");
        assert_eq!(
            rule(2.0),
            Some(Extreme {
                fallback: true,
                ..sharp
            })
        );
        assert_eq!(learned(APEX, 2.0), Some(APEX));
    }

    #[test]
    fn an_opening_removes_what_the_disc_does_not_fit_in() {
        let mask = lung(5, 20);
        assert_eq!(open(&mask, 0.9), mask);
        let opened = open(&mask, 2.0);
        assert!(
            opened.iter().zip(&mask).all(|(o, m)| !o || *m),
            "within the mask"
        );
        // The corner's pixel goes; the wide rows' middle stays.
        assert!(mask[[34, 21]] && !opened[[34, 21]]);
        assert!(opened[[30, 31]]);
        // A disc of radius 2 spans 5 pixels: a 4-pixel-wide bar goes, a 5-pixel one keeps
        // its width (but its corners, which the disc does not reach).
        let bar = |w: usize| {
            Array2::from_shape_fn((20, 20), |(r, c)| {
                (5..15).contains(&r) && (5..5 + w).contains(&c)
            })
        };
        assert!(!open(&bar(4), 2.0).iter().any(|m| *m));
        let opened = open(&bar(5), 2.0);
        assert!((5..10).all(|c| opened[[10, c]]));
        assert!(!opened[[5, 5]]);
        assert!(!open(&Array2::from_elem((5, 5), false), 2.0)
            .iter()
            .any(|m| *m));
    }

    /// A layout (with poses) of three landmarks from three templates, and the three as a
    /// target turned by 10° from it shows them; the first template's own points.
    #[allow(clippy::type_complexity)]
    pub(crate) fn turned_by_10_degrees() -> (
        crate::postprocess::ShapeModel,
        Vec<Option<(f64, f64)>>,
        Vec<Option<(f64, f64)>>,
    ) {
        let triangle = [(10.0, 30.0), (50.0, 10.0), (50.0, 50.0)];
        let templates: Vec<Vec<Option<(f64, f64)>>> = [0.0, 1.0, -1.0]
            .iter()
            .map(|j| triangle.iter().map(|p| Some((p.0 + j, p.1 - j))).collect())
            .collect();
        let layout = crate::postprocess::ShapeModel::fit(&templates)
            .unwrap()
            .with_pose(true);
        let (sin, cos) = 10f64.to_radians().sin_cos();
        // The templates' offsets from the first point, turned by 10°.
        let turned = triangle
            .iter()
            .map(|p| {
                let d = (p.0 - 10.0, p.1 - 30.0);
                Some((30.0 + cos * d.0 + sin * d.1, 40.0 - sin * d.0 + cos * d.1))
            })
            .collect();
        (layout, turned, templates[0].clone())
    }

    /// The rule is read in the pose the landmarks' layout explains: a target whose
    /// landmarks lie turned by 10° from the templates' layout turns the rule with them.
    #[test]
    fn the_rule_turns_with_the_targets_pose() {
        let (layout, turned, template) = turned_by_10_degrees();
        // The pose's own cost (its prior) draws the estimate towards the templates' pose.
        let turn = layout.turn(&turned);
        let degrees = turn.0.atan2(turn.1).to_degrees();
        assert!((5.0..=10.0 + 1e-9).contains(&degrees), "{degrees}");
        assert_eq!(layout.turn(&template), TEMPLATES_POSE);

        let mask = lung(5, 20);
        let rule = APEX;
        let mut found: Vec<Option<Finding>> = turned.iter().map(|p| p.map(finding)).collect();
        refine_findings(
            &mut found,
            &[Some(rule), None, None],
            &[(1, &mask)],
            Some(&layout),
        );
        let q = rule.point(&mask, turn).unwrap();
        assert_ne!(Some(q), rule.point(&mask, TEMPLATES_POSE));
        let p = turned[0].unwrap();
        assert_eq!(
            found[0].as_ref().unwrap().point,
            ((p.0 + q.0) / 2.0, (p.1 + q.1) / 2.0)
        );
    }

    #[test]
    fn a_landmark_moves_halfway_to_its_rules_point() {
        let mask = lung(5, 20);
        let rule = APEX;
        let mut found = vec![
            Some(finding((10.0, 35.0))),
            Some(finding((40.0, 40.0))),
            None,
        ];
        let rules = [
            Some(rule),
            Some(Extreme {
                structure: 3,
                ..rule
            }),
            Some(rule),
        ];
        refine_findings(&mut found, &rules, &[(1, &mask)], None);
        assert_eq!(found[0].as_ref().unwrap().point, (8.0, 33.0));
        assert_eq!(
            found[1].as_ref().unwrap().point,
            (40.0, 40.0),
            "its structure has no mask here"
        );
        // Left out by the adapter: placed at the rule's point, with no region of its own.
        let placed = found[2].as_ref().expect("placed by its rule");
        assert_eq!((placed.label, placed.point), (2, (6.0, 31.0)));
        assert_eq!(placed.confidence, 0.0);
        assert_eq!(placed.mask.dim(), mask.dim());
        assert!(!placed.mask.iter().any(|m| *m));
    }

    /// Only fallback rules on a mask of their structure rank the regions, at the rule's
    /// point with the radius as spread.
    #[test]
    fn fallback_rules_on_masks_make_a_prior() {
        let mask = lung(5, 20);
        let rules = [Some(APEX), Some(CORNER), None];
        let ranked = prior(&rules, &[(1, &mask)], 10.0, None).expect("a prior");
        assert_eq!(
            ranked.points,
            vec![
                None,
                Some(crate::align::PriorPoint {
                    point: (34.0, 21.0),
                    spread: 10.0
                }),
                None
            ]
        );
        assert!(
            prior(&rules, &[(2, &mask)], 10.0, None).is_none(),
            "no mask"
        );
        assert!(
            prior(&[Some(APEX)], &[(1, &mask)], 10.0, None).is_none(),
            "a mean rule"
        );
        // The aligned templates' prior for the landmarks the rules do not place; the
        // rule's point where it does.
        let at = |point| Some(crate::align::PriorPoint { point, spread: 4.0 });
        let aligned = crate::align::Prior {
            points: vec![at((1.0, 2.0)), at((3.0, 4.0)), None],
        };
        let both = prior(&rules, &[(1, &mask)], 10.0, Some(&aligned)).unwrap();
        assert_eq!(
            both.points,
            vec![at((1.0, 2.0)), ranked.points[1], None],
            "merged per landmark"
        );
        let alone = prior(&rules, &[(2, &mask)], 10.0, Some(&aligned)).unwrap();
        assert_eq!(alone, aligned, "no mask: the aligned templates' alone");
        assert_eq!(
            prior(&[], &[(1, &mask)], 10.0, Some(&aligned)),
            Some(aligned),
            "an adapter with no rules"
        );
    }

    /// A fallback rule places only a landmark the adapter left out, and leaves a found one
    /// where the adapter put it; with no mask of its structure, nothing.
    #[test]
    fn a_fallback_rule_places_only_what_the_adapter_left_out() {
        let mask = lung(5, 20);
        let rules = [Some(CORNER), Some(CORNER)];
        let mut found = vec![Some(finding((20.0, 25.0))), None];
        refine_findings(&mut found, &rules, &[(1, &mask)], None);
        assert_eq!(found[0].as_ref().unwrap().point, (20.0, 25.0));
        assert_eq!(found[1].as_ref().unwrap().point, (34.0, 21.0));
        let mut found = vec![Some(finding((20.0, 25.0))), None];
        refine_findings(&mut found, &rules, &[(2, &mask)], None);
        assert!(found[1].is_none(), "no mask of structure 1");
    }
}
