//! Structures named by the landmarks found in the same slice (issue #7). A vertebral body
//! looks like its neighbours, and a structure adapter trained to find a body cut by the
//! field of view's edge may take a whole run of bodies one up (spine-mr, s08: every body
//! IoU 0), while the landmarks of the same slice, placed by their own adapter and layout,
//! are right. Where every template's landmark lies inside one structure in its localizer
//! slice, that structure is the region holding the landmark found: a region holding
//! another structure's landmark and not its own is handed to that structure.

use ndarray::{Array2, Array3};
use serde::{Deserialize, Serialize};

use crate::postprocess::{self, Finding, THRESHOLD};

/// Per structure (score order), the landmark that lies inside it in every template's
/// localizer slice: each names at most one structure and each structure at most one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LandmarkLinks {
    pub landmarks: Vec<Option<String>>,
}

/// A point in pixels (row, column).
type Point = (f64, f64);

/// The pixel a point falls on, when inside a (rows × columns) grid.
fn pixel(p: Point, dim: (usize, usize)) -> Option<(usize, usize)> {
    let (r, c) = (p.0.round(), p.1.round());
    let inside = p.0.is_finite()
        && p.1.is_finite()
        && r >= 0.0
        && c >= 0.0
        && (r as usize) < dim.0
        && (c as usize) < dim.1;
    inside.then_some((r as usize, c as usize))
}

fn holds(mask: &Array2<bool>, p: Point) -> bool {
    pixel(p, mask.dim()).is_some_and(|q| mask[q])
}

impl LandmarkLinks {
    /// Learns the links from the templates: per template, its landmarks' points (pixels,
    /// in `names`' order, `None` where it lacks one) and the label map of its localizer
    /// slice. A landmark names structure `values[l]` when it lies inside it in every
    /// template that has both, and in one at least. None when no pair is linked.
    pub fn learn<'a>(
        names: &[String],
        templates: impl Iterator<Item = (Vec<Option<Point>>, &'a Array2<u8>)>,
        values: &[u8],
    ) -> Option<LandmarkLinks> {
        // Per (structure, landmark): templates with both, and those with it inside.
        let mut both = vec![vec![0usize; names.len()]; values.len()];
        let mut inside = both.clone();
        for (points, map) in templates {
            for (l, &v) in values.iter().enumerate() {
                if !map.iter().any(|&x| x == v) {
                    continue;
                }
                for (i, p) in points.iter().enumerate().take(names.len()) {
                    let Some(p) = *p else { continue };
                    both[l][i] += 1;
                    inside[l][i] += usize::from(pixel(p, map.dim()).is_some_and(|q| map[q] == v));
                }
            }
        }
        let linked = |l: usize, i: usize| both[l][i] > 0 && inside[l][i] == both[l][i];
        let landmarks: Vec<Option<String>> = (0..values.len())
            .map(|l| {
                let mut own = (0..names.len()).filter(|&i| linked(l, i));
                let i = own.next()?;
                let shared = (0..values.len()).any(|m| m != l && linked(m, i));
                (own.next().is_none() && !shared).then(|| names[i].clone())
            })
            .collect();
        landmarks
            .iter()
            .any(Option::is_some)
            .then_some(LandmarkLinks { landmarks })
    }

    /// Per structure, the point of its landmark among `points` found for the landmarks
    /// `names` (a landmark task's, in its order).
    pub fn points_of(&self, names: &[String], points: &[Option<Point>]) -> Vec<Option<Point>> {
        self.landmarks
            .iter()
            .map(|l| {
                let i = names.iter().position(|n| Some(n) == l.as_ref())?;
                points.get(i).copied().flatten()
            })
            .collect()
    }

    pub fn is_valid(&self) -> bool {
        self.landmarks.iter().any(Option::is_some)
    }
}

/// Names the structures `found` (per label, image pixels) by the landmarks at `points`
/// (per label, `None` where unlinked or not found), on `scores` (labels × rows × columns):
/// a structure whose region holds its landmark keeps it; one whose region does not takes
/// the region of another structure holding its landmark and not that structure's own,
/// else the foreground (labels' scores summing to `THRESHOLD` or more) around its landmark
/// outside every region found, else keeps its region unless that holds another
/// structure's landmark. A region handed on is its first structure's no more.
pub fn name_by_landmarks(
    found: &mut [Option<Finding>],
    scores: &Array3<f32>,
    points: &[Option<Point>],
) {
    let n = found.len();
    let point = |l: usize| points.get(l).copied().flatten();
    let own = |l: usize| match (&found[l], point(l)) {
        (Some(f), Some(p)) => holds(&f.mask, p),
        _ => false,
    };
    let right: Vec<bool> = (0..n).map(own).collect();
    let mut given = vec![false; n];
    let mut taken: Vec<Option<Finding>> = vec![None; n];
    let mut foreground: Option<Array2<bool>> = None;
    for l in 0..n {
        let Some(p) = point(l).filter(|_| !right[l]) else {
            continue;
        };
        let donor = (0..n).find(|&m| {
            m != l && !right[m] && !given[m] && found[m].as_ref().is_some_and(|f| holds(&f.mask, p))
        });
        if let Some(m) = donor {
            given[m] = true;
            taken[l] = found[m].clone();
        } else {
            let free = foreground.get_or_insert_with(|| {
                let mut free = scores.sum_axis(ndarray::Axis(0)).mapv(|t| t >= THRESHOLD);
                for f in found.iter().flatten() {
                    ndarray::Zip::from(&mut free)
                        .and(&f.mask)
                        .for_each(|a, &m| *a &= !m);
                }
                free
            });
            taken[l] = around(free, p).map(|mask| Finding {
                label: l,
                mask,
                mass: 0.0,
                point: p,
                confidence: 0.0,
            });
        }
    }
    for l in 0..n {
        if right[l] {
            continue;
        }
        if let Some(mut f) = taken[l].take() {
            f.label = l;
            postprocess::measure(&mut f, scores);
            found[l] = Some(f);
        } else if given[l] {
            found[l] = None;
        } else if let Some(f) = &found[l] {
            let others = (0..n).any(|m| m != l && point(m).is_some_and(|p| holds(&f.mask, p)));
            if others {
                found[l] = None;
            }
        }
    }
}

/// The connected part of `free` holding `p` (and no longer free), if `p` is free.
fn around(free: &mut Array2<bool>, p: Point) -> Option<Array2<bool>> {
    let q = pixel(p, free.dim()).filter(|&q| free[q])?;
    let mut mask = Array2::from_elem(free.dim(), false);
    let mut stack = vec![q];
    free[q] = false;
    while let Some((r, c)) = stack.pop() {
        mask[[r, c]] = true;
        let (rows, cols) = free.dim();
        let near = [
            (r.wrapping_sub(1), c),
            (r + 1, c),
            (r, c.wrapping_sub(1)),
            (r, c + 1),
        ];
        for (y, x) in near {
            if y < rows && x < cols && free[[y, x]] {
                free[[y, x]] = false;
                stack.push((y, x));
            }
        }
    }
    Some(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of `label` over rows `rows` (columns 2..8) of a 40 × 10 slice.
    fn body(label: usize, rows: std::ops::Range<usize>) -> Finding {
        let mut mask = Array2::from_elem((40, 10), false);
        mask.slice_mut(ndarray::s![rows, 2..8]).fill(true);
        crate::stack::tests::finding(label, mask)
    }

    fn rows_of(f: &Option<Finding>) -> Option<(usize, usize)> {
        let f = f.as_ref()?;
        let rows: Vec<usize> = f
            .mask
            .indexed_iter()
            .filter(|(_, m)| **m)
            .map(|((r, _), _)| r)
            .collect();
        Some((*rows.iter().min()?, *rows.iter().max()?))
    }

    /// Bodies at rows 0–7, 10–17, 20–27 and 30–37, the scores 0.9 on every body.
    fn scores() -> Array3<f32> {
        let mut s = Array3::<f32>::zeros((3, 40, 10));
        for top in [0, 10, 20, 30] {
            s.slice_mut(ndarray::s![0, top..top + 8, 2..8]).fill(0.9);
        }
        s
    }

    /// A run of bodies taken one up (the first structure on the body above its own) is
    /// named again by the landmarks: each structure gets the region holding its landmark,
    /// and the last one, whose body no structure took, the foreground around its landmark.
    #[test]
    fn a_run_taken_one_up_is_named_by_its_landmarks() {
        let mut found = vec![
            Some(body(0, 0..8)),
            Some(body(1, 10..18)),
            Some(body(2, 20..28)),
        ];
        let points = [Some((14.0, 5.0)), Some((24.0, 5.0)), Some((34.0, 5.0))];
        name_by_landmarks(&mut found, &scores(), &points);
        let rows: Vec<_> = found.iter().map(rows_of).collect();
        assert_eq!(rows, [Some((10, 17)), Some((20, 27)), Some((30, 37))]);
        for (l, f) in found.iter().enumerate() {
            let f = f.as_ref().expect("named");
            assert_eq!(f.label, l);
            // Measured on the structure's own plane: the scores here are on plane 0.
            assert_eq!(f.mass > 0.0, l == 0, "structure {l}: mass {}", f.mass);
        }
    }

    /// Regions that hold their landmarks, a structure without a landmark and one whose
    /// landmark is missing are left as they are; a region holding another's landmark and
    /// its own stays its own.
    #[test]
    fn structures_holding_their_landmarks_are_left_alone() {
        let found = vec![
            Some(body(0, 0..18)),
            Some(body(1, 20..28)),
            Some(body(2, 30..38)),
        ];
        let mut named = found.clone();
        // Structure 0's region holds its landmark and structure 1's; 2 has none.
        let points = [Some((4.0, 5.0)), Some((14.0, 5.0)), None];
        name_by_landmarks(&mut named, &scores(), &points);
        let rows: Vec<_> = named.iter().map(rows_of).collect();
        assert_eq!(rows, found.iter().map(rows_of).collect::<Vec<_>>());
        assert_eq!(
            named.iter().flatten().map(|f| f.label).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        // Structure 1's landmark lies in 0's region, which keeps it, and no free
        // foreground holds it: 1 keeps its region, which holds no other's landmark.
    }

    /// A region that holds another structure's landmark and not its own, with no region
    /// for its own landmark, is dropped rather than reported as the wrong body.
    #[test]
    fn a_region_holding_only_another_landmark_is_dropped() {
        let mut found = vec![Some(body(0, 10..18)), Some(body(1, 20..28)), None];
        // Structure 0's landmark lies outside any foreground (row 8 is between bodies).
        let points = [Some((8.5, 5.0)), Some((14.0, 5.0)), None];
        name_by_landmarks(&mut found, &scores(), &points);
        assert_eq!(rows_of(&found[1]), Some((10, 17)));
        assert!(found[0].is_none(), "{:?}", rows_of(&found[0]));
        assert!(found[2].is_none());
    }

    /// A landmark inside one structure in every template links the two; one inside in some
    /// templates only, or inside two structures, links nothing.
    #[test]
    fn links_are_learned_where_every_template_agrees() {
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut map = Array2::<u8>::zeros((40, 10));
        map.slice_mut(ndarray::s![0..8, 2..8]).fill(1);
        map.slice_mut(ndarray::s![10..18, 2..8]).fill(2);
        map.slice_mut(ndarray::s![20..28, 2..8]).fill(3);
        // a in 1 always; b in 2 in the first template and beside it in the second; c in 3
        // (and not present in the second template).
        let first = vec![Some((4.0, 5.0)), Some((14.0, 5.0)), Some((24.0, 5.0))];
        let second = vec![Some((3.0, 4.0)), Some((14.0, 9.0)), None];
        let links = LandmarkLinks::learn(
            &names,
            [(first.clone(), &map), (second, &map)].into_iter(),
            &[1, 2, 3],
        )
        .expect("links");
        assert_eq!(
            links.landmarks,
            [Some("a".to_string()), None, Some("c".to_string())]
        );
        // Two landmarks inside one structure: neither names it.
        let both = vec![Some((4.0, 5.0)), Some((5.0, 5.0)), None];
        assert!(LandmarkLinks::learn(&names, [(both, &map)].into_iter(), &[1]).is_none());
        // Points by name, in the structures' order.
        let found = [Some((1.0, 1.0)), Some((2.0, 2.0)), Some((3.0, 3.0))];
        let order: Vec<String> = ["c", "b", "a"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            links.points_of(&order, &found),
            [Some((3.0, 3.0)), None, Some((1.0, 1.0))]
        );
    }
}
