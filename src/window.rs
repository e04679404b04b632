//! Structures scored only near the landmarks (issue #7, idea 5). The spine's structures
//! read 1154 columns per cell on the hypercolumn's 128 × 128 grid (≈ 85 ms per slice),
//! while the vertebral bodies lie around the landmarks the same bundle finds first (on
//! the coarse grid, ≈ 22 ms). The templates show how far a structure reaches past the box
//! of their landmarks, as a share of that box's larger side; at inference the structures
//! are scored in the box of the landmarks found, grown by that share (with `SAFETY`) and
//! the landmark radius, and nowhere else. Inside the window the scores are those of the
//! whole slice (`Adapter::scores_within` crops the map with the cells its pools and
//! resizes read); outside, they are 0.

use std::ops::Range;

use ndarray::{s, Array2};
use serde::{Deserialize, Serialize};

use crate::backbone::FeatureMap;

/// How far the structures reach past the box of the landmarks `landmarks` (names of a
/// landmark task of the same bundle), as a share of the box's larger side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LandmarkWindow {
    pub landmarks: Vec<String>,
    pub share: f64,
    /// Per landmark, how far the structures' pixels nearest to it reach from it (up,
    /// down, left, right), as shares of the same side: where the structures follow their
    /// landmarks (a spine's bodies along its curve), their boxes hold far fewer cells than
    /// the one box (`cells`). None in files from before (format 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reach: Option<Vec<[f64; 4]>>,
}

/// The learned share is the largest over a few templates: a new patient's structures may
/// reach a little further.
const SAFETY: f64 = 1.25;

/// The box of `cells` (row, column): first row, last row, first column, last column;
/// None when there are none.
pub fn bounds(cells: impl Iterator<Item = (usize, usize)>) -> Option<[usize; 4]> {
    cells.fold(None, |b, (r, c)| {
        Some(b.map_or([r, r, c, c], |[r0, r1, c0, c1]: [usize; 4]| {
            [r0.min(r), r1.max(r), c0.min(c), c1.max(c)]
        }))
    })
}

/// Cells of a map's grid: rows × columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub rows: Range<usize>,
    pub columns: Range<usize>,
}

impl Window {
    /// Every cell of a (rows × columns) grid.
    pub fn whole(grid: (usize, usize)) -> Window {
        Window {
            rows: 0..grid.0,
            columns: 0..grid.1,
        }
    }
}

/// Cells of a map's grid row by row: from row `first_row` on, per row the columns of
/// its span (possibly none). Where a slice's structures may lie follows their shape,
/// which a box of rows × columns holds with many cells to spare (`stack::Anchor::window`:
/// the spine's bodies after the centre slice reach 13–20 % of a slice's pixels, the cells
/// those read 15–21 % of its cells, their box 24–32 %), and a cell's scores cost about the
/// same wherever it lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cells {
    pub first_row: usize,
    pub spans: Vec<Range<usize>>,
}

impl From<Window> for Cells {
    fn from(w: Window) -> Cells {
        Cells::trimmed(w.rows.start, std::iter::repeat_n(w.columns, w.rows.len()))
    }
}

impl Cells {
    /// Each row of `rows` with its span.
    pub fn rows(&self) -> impl Iterator<Item = (usize, &Range<usize>)> + '_ {
        (self.first_row..).zip(&self.spans)
    }

    /// The number of cells.
    pub fn count(&self) -> usize {
        self.spans.iter().map(|s| s.len()).sum()
    }

    /// The box of the cells, None when there are none.
    pub fn bounds(&self) -> Option<Window> {
        let mut held = self.rows().filter(|(_, s)| !s.is_empty());
        let (first, span) = held.next()?;
        let (mut last, mut columns) = (first, span.clone());
        for (r, s) in held {
            last = r;
            columns = columns.start.min(s.start)..columns.end.max(s.end);
        }
        Some(Window {
            rows: first..last + 1,
            columns,
        })
    }

    /// Whether they leave out any cell of a (rows × columns) grid.
    pub fn crops(&self, grid: (usize, usize)) -> bool {
        self.count() < grid.0 * grid.1
    }

    /// The share of a (rows × columns) grid's cells among them.
    pub fn share_of(&self, grid: (usize, usize)) -> f64 {
        self.count() as f64 / (grid.0 * grid.1).max(1) as f64
    }

    /// The cells also in `other`.
    pub fn and(&self, other: &Cells) -> Cells {
        let first = self.first_row.max(other.first_row);
        let end = (self.first_row + self.spans.len()).min(other.first_row + other.spans.len());
        let spans = (first..end.max(first)).map(|r| {
            let (a, b) = (
                &self.spans[r - self.first_row],
                &other.spans[r - other.first_row],
            );
            a.start.max(b.start)..a.end.min(b.end)
        });
        Cells::trimmed(first, spans)
    }

    /// `window` narrowed to `to` where there is one; None where neither is.
    pub fn narrowed(
        window: Option<Cells>,
        to: Option<Cells>,
        grid: (usize, usize),
    ) -> Option<Cells> {
        match (window, to) {
            (w, None) => w,
            (w, Some(to)) => Some(to.and(&w.unwrap_or_else(|| Window::whole(grid).into()))),
        }
    }

    /// Per row of `window`, the cells also in it, columns from `window`'s first (empty
    /// where there are none).
    pub fn within(&self, window: &Window) -> Vec<Range<usize>> {
        let (a, z) = (window.columns.start, window.columns.end);
        window
            .rows
            .clone()
            .map(|r| {
                let span = r
                    .checked_sub(self.first_row)
                    .and_then(|i| self.spans.get(i))
                    .map_or(0..0, |s| s.start.max(a)..s.end.min(z));
                if span.is_empty() {
                    0..0
                } else {
                    span.start - a..span.end - a
                }
            })
            .collect()
    }

    /// The rows from `first` on with `spans` (empty ones as 0..0), from the first row
    /// with cells to the last: one set of cells, one value.
    fn trimmed(first: usize, spans: impl Iterator<Item = Range<usize>>) -> Cells {
        let spans: Vec<Range<usize>> = spans.map(|s| if s.is_empty() { 0..0 } else { s }).collect();
        let Some(a) = spans.iter().position(|s| !s.is_empty()) else {
            return Cells {
                first_row: first,
                spans: Vec::new(),
            };
        };
        let z = spans.iter().rposition(|s| !s.is_empty()).unwrap_or(a);
        Cells {
            first_row: first + a,
            spans: spans[a..=z].to_vec(),
        }
    }
}

impl LandmarkWindow {
    /// Learns the share and the reach from the templates: per template, its landmarks'
    /// points (row, column; pixels, in the localizer slice, `None` where it lacks one) and
    /// the label maps of its slices. A template lacking a landmark, or with a box of less
    /// than a pixel, teaches nothing; None when no template teaches anything.
    pub fn learn<'a>(
        landmarks: Vec<String>,
        templates: impl Iterator<Item = (Vec<Option<(f64, f64)>>, Vec<&'a Array2<u8>>)>,
        values: &[u8],
    ) -> Option<LandmarkWindow> {
        let mut share: Option<f64> = None;
        let mut reach: Vec<[f64; 4]> = Vec::new();
        for (points, maps) in templates {
            let Some(points) = points.into_iter().collect::<Option<Vec<_>>>() else {
                continue;
            };
            let Some(b) = BoxOf::points(&points) else {
                continue;
            };
            let mut past = 0.0f64;
            reach.resize(points.len(), [0.0; 4]);
            for map in maps {
                for ((r, c), v) in map.indexed_iter() {
                    if *v == 0 || !values.contains(v) {
                        continue;
                    }
                    // Pixel indices, as the landmarks are given.
                    let (r, c) = (r as f64, c as f64);
                    past = past.max(b.outside(r, c));
                    let nearest = points
                        .iter()
                        .map(|&(pr, pc)| (pr - r).powi(2) + (pc - c).powi(2))
                        .enumerate()
                        .fold(
                            (0, f64::INFINITY),
                            |m, (i, d)| if d < m.1 { (i, d) } else { m },
                        )
                        .0;
                    let (pr, pc) = points[nearest];
                    let far = [pr - r, r - pr, pc - c, c - pc].map(|d| d / b.side());
                    let e = &mut reach[nearest];
                    *e = [0, 1, 2, 3].map(|k| e[k].max(far[k]));
                }
            }
            let s = past / b.side();
            share = Some(share.map_or(s, |m: f64| m.max(s)));
        }
        Some(LandmarkWindow {
            landmarks,
            share: share?,
            reach: Some(reach),
        })
    }

    /// The points of this window's landmarks, from `points` found for the landmarks
    /// `names` (a landmark task's, in its order).
    pub fn points_of(
        &self,
        names: &[String],
        points: &[Option<(f64, f64)>],
    ) -> Vec<Option<(f64, f64)>> {
        self.landmarks
            .iter()
            .map(|l| {
                let i = names.iter().position(|n| n == l)?;
                points.get(i).copied().flatten()
            })
            .collect()
    }

    /// Whether the share can be used (finite, ≥ 0) and names landmarks, with a reach
    /// (where learned) per landmark, finite and ≥ 0.
    pub fn is_valid(&self) -> bool {
        let reach = self.reach.as_ref().is_none_or(|r| {
            r.len() == self.landmarks.len()
                && r.iter().flatten().all(|v| v.is_finite() && *v >= 0.0)
        });
        self.share.is_finite() && self.share >= 0.0 && !self.landmarks.is_empty() && reach
    }

    /// The window, in cells of a `grid` over an `image` (rows × columns, pixels), around
    /// the landmarks found at `points` (pixels, in `landmarks`' order): their box grown by
    /// `SAFETY` × share × its larger side, plus `slack` pixels (the landmarks' own error).
    /// None when one of them was not found, or their box is under a pixel: the structures
    /// are then scored over the whole slice.
    pub fn around(
        &self,
        points: &[Option<(f64, f64)>],
        slack: f64,
        image: (usize, usize),
        grid: (usize, usize),
    ) -> Option<Window> {
        if points.len() != self.landmarks.len() || !self.is_valid() {
            return None;
        }
        let points: Vec<(f64, f64)> = points.iter().copied().collect::<Option<_>>()?;
        let b = BoxOf::points(&points)?;
        let grow = SAFETY * self.share * b.side() + slack.max(0.0);
        Some(Window {
            rows: cells_of(b.rows.0 - grow, b.rows.1 + grow, image.0, grid.0),
            columns: cells_of(b.columns.0 - grow, b.columns.1 + grow, image.1, grid.1),
        })
    }

    /// The cells to score around the landmarks found at `points`: `around`'s window, and
    /// where a reach was learned only the cells of each landmark's own box within it, the
    /// landmark grown by `SAFETY` × its reach × the side of the landmarks' box, plus
    /// `slack` pixels, per row from the first of the boxes there to the last. On spine-mr's
    /// localizer slices 34–39 % of the cells, where the window holds 40–53 % (`scout
    /// eval`, first split).
    pub fn cells(
        &self,
        points: &[Option<(f64, f64)>],
        slack: f64,
        image: (usize, usize),
        grid: (usize, usize),
    ) -> Option<Cells> {
        let window = Cells::from(self.around(points, slack, image, grid)?);
        let Some(reach) = &self.reach else {
            return Some(window);
        };
        let points: Vec<(f64, f64)> = points.iter().copied().collect::<Option<_>>()?;
        let side = BoxOf::points(&points)?.side();
        let grow = |share: f64| SAFETY * share * side + slack.max(0.0);
        let mut spans: Vec<Range<usize>> = vec![0..0; grid.0];
        for (&(r, c), [up, down, left, right]) in points.iter().zip(reach) {
            let columns = cells_of(c - grow(*left), c + grow(*right), image.1, grid.1);
            if columns.is_empty() {
                continue;
            }
            for row in cells_of(r - grow(*up), r + grow(*down), image.0, grid.0) {
                let Some(span) = spans.get_mut(row) else {
                    continue;
                };
                *span = if span.start >= span.end {
                    columns.clone()
                } else {
                    span.start.min(columns.start)..span.end.max(columns.end)
                };
            }
        }
        Some(Cells::trimmed(0, spans.into_iter()).and(&window))
    }
}

/// The cells of a line of `cells` over `pixels` that hold the pixels from `lo` to `hi`;
/// pixel i's centre lies at i + 0.5 on the cells' scale, as
/// `postprocess::upsample_scores` places it.
fn cells_of(lo: f64, hi: f64, pixels: usize, cells: usize) -> Range<usize> {
    let per = pixels as f64 / cells.max(1) as f64;
    let cell = |i: f64| ((i + 0.5) / per).floor().clamp(0.0, cells as f64) as usize;
    let a = cell(lo);
    let z = (cell(hi) + 1).min(cells);
    a..z.max(a)
}

/// An axis-aligned box of points (pixels).
struct BoxOf {
    rows: (f64, f64),
    columns: (f64, f64),
}

impl BoxOf {
    fn points(points: &[(f64, f64)]) -> Option<BoxOf> {
        let finite = points.iter().all(|p| p.0.is_finite() && p.1.is_finite());
        if points.is_empty() || !finite {
            return None;
        }
        let fold = |f: fn(&(f64, f64)) -> f64| {
            points
                .iter()
                .map(f)
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, z), v| {
                    (a.min(v), z.max(v))
                })
        };
        let b = BoxOf {
            rows: fold(|p| p.0),
            columns: fold(|p| p.1),
        };
        (b.side() >= 1.0).then_some(b)
    }

    fn side(&self) -> f64 {
        (self.rows.1 - self.rows.0).max(self.columns.1 - self.columns.0)
    }

    /// How far (r, c) lies outside the box, along the farther axis (0 inside).
    fn outside(&self, r: f64, c: f64) -> f64 {
        let d = |v: f64, (a, z): (f64, f64)| (a - v).max(v - z).max(0.0);
        d(r, self.rows).max(d(c, self.columns))
    }
}

/// The crop of `fm` holding `window` and every cell its scores read within `reach` cells
/// (pools), with its first cell's place on `fm`'s grid. Coarse parts are dropped: their
/// resized channels in `fm.data` are read instead (the same values; a map with coarse
/// parts is scored from the whole map, `Adapter::scores_within`).
pub(crate) fn crop(fm: &FeatureMap, window: &Window, reach: usize) -> (FeatureMap, (usize, usize)) {
    let (h, w) = fm.grid();
    let bounds = |range: &Range<usize>, n: usize| {
        range.start.saturating_sub(reach).min(n)..(range.end + reach).min(n)
    };
    let rows = bounds(&window.rows, h);
    let columns = bounds(&window.columns, w);
    let data = fm
        .data
        .slice(s![.., rows.clone(), columns.clone()])
        .to_owned();
    (
        FeatureMap {
            data,
            image_rows: fm.image_rows,
            image_columns: fm.image_columns,
            coarse: Vec::new(),
        },
        (rows.start, columns.start),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::CoarseChannels;
    use ndarray::Array3;

    fn named(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("L{i}")).collect()
    }

    /// The share is the farthest labelled pixel past the landmarks' box, over the box's
    /// larger side, the largest over the templates; a template lacking a landmark or a
    /// label value not asked for teaches nothing.
    #[test]
    fn the_share_is_the_farthest_reach_past_the_landmarks_box() {
        // Box rows 10..50, columns 20..30: side 40.
        let points = vec![Some((10.0, 20.0)), Some((50.0, 30.0))];
        let mut a = Array2::<u8>::zeros((64, 64));
        a[[55, 25]] = 1; // 5 past the bottom edge
        a[[30, 5]] = 9; // not a structure asked for
        let mut b = Array2::<u8>::zeros((64, 64));
        b[[30, 41]] = 2; // 11 right of the box, in another slice
        let c = Array2::<u8>::from_elem((64, 64), 1); // its template lacks a landmark
        let learnt = LandmarkWindow::learn(
            named(2),
            [
                (points.clone(), vec![&a]),
                (points.clone(), vec![&Array2::zeros((64, 64)), &b]),
                (vec![Some((10.0, 20.0)), None], vec![&c]),
            ]
            .into_iter(),
            &[1, 2],
        )
        .unwrap();
        assert_eq!(learnt.landmarks, named(2));
        assert!(
            (learnt.share - 11.0 / 40.0).abs() < 1e-12,
            "{}",
            learnt.share
        );
        // Both labelled pixels lie nearest the second landmark (50, 30): 5 below it and 5
        // left, then 20 above and 11 right, over the side 40 (up, down, left, right).
        assert_eq!(
            learnt.reach,
            Some(vec![
                [0.0; 4],
                [20.0 / 40.0, 5.0 / 40.0, 5.0 / 40.0, 11.0 / 40.0]
            ])
        );
        let none = LandmarkWindow::learn(
            named(2),
            [(vec![Some((1.0, 1.0)), None], vec![&a])].into_iter(),
            &[1],
        );
        assert!(none.is_none());
    }

    /// With a reach per landmark, the cells of each landmark's own box, grown by 1.25 ×
    /// its reach × the side plus the slack, per row from the first box there to the last,
    /// within the window; rows between two boxes have none. Without one, the window.
    #[test]
    fn the_cells_are_each_landmarks_own_box() {
        let mut lw = LandmarkWindow {
            landmarks: named(2),
            share: 0.1,
            reach: Some(vec![[0.1, 0.1, 0.1, 0.1], [0.2, 0.0, 0.0, 0.3]]),
        };
        // Side 80 (see the window's test: rows 21..50, columns 11..30). The first box
        // grows by 1.25 × 0.1 × 80 + 6 = 16 px each way: pixels 84..=116 and 44..=76,
        // cells 21..30 and 11..20. The second: 26 px up, 6 down and left, 36 right:
        // pixels 154..=186 and 94..=136, cells 38..47 and 23..35, cut to the window's
        // columns, 23..30.
        let points = [Some((100.0, 60.0)), Some((180.0, 100.0))];
        let cells = lw.cells(&points, 6.0, (256, 256), (64, 64)).unwrap();
        let mut spans = vec![11..20; 9];
        spans.extend(vec![0..0; 8]);
        spans.extend(vec![23..30; 9]);
        assert_eq!(
            cells,
            Cells {
                first_row: 21,
                spans
            }
        );
        assert_eq!(cells.count(), 9 * 9 + 9 * 7);
        // Boxes that overlap in a row join there.
        let close = [Some((100.0, 60.0)), Some((112.0, 100.0))];
        let joined = lw.cells(&close, 6.0, (256, 256), (64, 64)).unwrap();
        let window = lw.around(&close, 6.0, (256, 256), (64, 64)).unwrap();
        assert!(joined.spans.iter().all(|s| !s.is_empty()));
        assert!(joined.count() < Cells::from(window.clone()).count());
        lw.reach = None;
        assert_eq!(
            lw.cells(&close, 6.0, (256, 256), (64, 64)),
            Some(Cells::from(window))
        );
        assert!(lw
            .cells(&[points[0], None], 6.0, (256, 256), (64, 64))
            .is_none());
        lw.reach = Some(vec![[0.1; 4]]);
        assert!(!lw.is_valid(), "a reach for each landmark");
        lw.reach = Some(vec![[0.1; 4], [0.1, f64::NAN, 0.1, 0.1]]);
        assert!(!lw.is_valid());
    }

    /// The window is the cells of the pixels in the found landmarks' box grown by 1.25 ×
    /// share × side plus the slack, clamped to the grid; None with a landmark missing.
    #[test]
    fn the_window_grows_the_found_landmarks_box() {
        let lw = LandmarkWindow {
            landmarks: named(2),
            share: 0.1,
            reach: None,
        };
        // Box rows 100..180, columns 60..100 on a 256 × 256 image, 64 × 64 cells (4 px):
        // grown by 1.25 × 0.1 × 80 + 6 = 16 px, pixels 84..=196 and 44..=116, whose
        // centres (+ 0.5) lie in cells 21..=49 and 11..=29.
        let points = [Some((100.0, 60.0)), Some((180.0, 100.0))];
        let w = lw.around(&points, 6.0, (256, 256), (64, 64)).unwrap();
        assert_eq!(w.rows, 21..50);
        assert_eq!(w.columns, 11..30);
        let cells = Cells::from(w.clone());
        assert!(cells.crops((64, 64)));
        assert!((cells.share_of((64, 64)) - (29.0 * 19.0) / 4096.0).abs() < 1e-12);
        // Past a cell's edge: (183 + 16.375 + 0.5) / 4 = 49.97 lies in cell 49,
        // (184 + 16.5 + 0.5) / 4 = 50.25 in cell 50.
        let past = |row: f64| {
            let w = lw.around(
                &[Some((100.0, 60.0)), Some((row, 100.0))],
                6.0,
                (256, 256),
                (64, 64),
            );
            w.unwrap().rows.end
        };
        assert_eq!((past(183.0), past(184.0)), (50, 51));
        // Near the edge it stops at the grid.
        let edge = lw
            .around(
                &[Some((2.0, 60.0)), Some((82.0, 250.0))],
                6.0,
                (256, 256),
                (64, 64),
            )
            .unwrap();
        // Side 190: grown by 29.75 px, rows to pixel 111.75 (cell 28), columns from 30.25.
        assert_eq!((edge.rows, edge.columns), (0..29, 7..64));
        assert!(lw
            .around(&[Some((1.0, 1.0)), None], 6.0, (256, 256), (64, 64))
            .is_none());
        assert!(lw.around(&points[..1], 6.0, (256, 256), (64, 64)).is_none());
        let names = vec!["x".to_string(), "L1".to_string(), "L0".to_string()];
        let found = [Some((1.0, 2.0)), Some((3.0, 4.0)), None];
        assert_eq!(lw.points_of(&names, &found), vec![None, Some((3.0, 4.0))]);
    }

    #[test]
    fn windows_narrow_to_the_cells_in_both() {
        let w = |rows: Range<usize>, columns: Range<usize>| Window { rows, columns };
        let grid = (20, 30);
        let cells = |w: Window| Some(Cells::from(w));
        assert_eq!(Cells::narrowed(None, None, grid), None);
        assert_eq!(
            Cells::narrowed(cells(w(1..3, 1..3)), None, grid),
            cells(w(1..3, 1..3))
        );
        assert_eq!(
            Cells::narrowed(None, cells(w(15..25, 2..4)), grid),
            cells(w(15..20, 2..4))
        );
        assert_eq!(
            Cells::narrowed(cells(w(1..16, 1..3)), cells(w(15..25, 2..4)), grid),
            cells(w(15..16, 2..3))
        );
        assert_eq!(
            Cells::narrowed(cells(w(2..4, 5..8)), cells(w(6..9, 10..12)), grid).map(|c| c.count()),
            Some(0),
            "apart: none"
        );
        assert!(!Cells::from(Window::whole(grid)).crops(grid));
    }

    /// Cells row by row: their count, box and share, and the cells also in a window.
    #[test]
    fn cells_are_taken_row_by_row() {
        let stairs = Cells {
            first_row: 3,
            spans: vec![2..5, 0..0, 4..9, 6..7, 0..0],
        };
        assert_eq!(stairs.count(), 9);
        assert_eq!(
            stairs.bounds(),
            Some(Window {
                rows: 3..7,
                columns: 2..9
            })
        );
        assert!((stairs.share_of((10, 10)) - 0.09).abs() < 1e-12);
        assert!(stairs.crops((10, 10)));
        let rows: Vec<_> = stairs.rows().map(|(r, s)| (r, s.clone())).collect();
        assert_eq!(rows[2], (5, 4..9));
        let window = Window {
            rows: 2..6,
            columns: 3..8,
        };
        // The spans cut to the window's columns, from the first row that has one.
        assert_eq!(
            stairs.and(&window.clone().into()),
            Cells {
                first_row: 3,
                spans: vec![3..5, 0..0, 4..8],
            }
        );
        // Relative to the window's first column.
        assert_eq!(stairs.within(&window), vec![0..0, 0..2, 0..0, 1..5]);
        let apart = Window {
            rows: 0..3,
            columns: 0..10,
        };
        let apart = Cells::from(apart);
        assert_eq!(stairs.and(&apart).bounds(), None);
        assert_eq!(stairs.and(&apart).count(), 0);
        let whole = Cells::from(Window::whole((4, 5)));
        assert!(!whole.crops((4, 5)) && whole.count() == 20);
    }

    /// The crop holds the window and `reach` cells around it, cut at the grid's edges,
    /// and drops the coarse parts.
    #[test]
    fn the_crop_keeps_the_cells_the_window_reads() {
        let data = Array3::from_shape_fn((3, 40, 40), |(c, i, j)| (c * 10000 + i * 100 + j) as f32);
        let fm = FeatureMap {
            data: data.clone(),
            image_rows: 160,
            image_columns: 160,
            coarse: vec![CoarseChannels {
                first: 0,
                map: Array3::zeros((2, 20, 20)),
            }],
        };
        let window = Window {
            rows: 15..21,
            columns: 0..7,
        };
        let (cropped, origin) = crop(&fm, &window, 4);
        assert_eq!(origin, (11, 0));
        assert_eq!(cropped.grid(), (14, 11));
        assert_eq!(cropped.data, data.slice(s![.., 11..25, 0..11]));
        assert!(cropped.coarse.is_empty());
        let window = Window {
            rows: 30..40,
            columns: 2..38,
        };
        let (cropped, origin) = crop(&fm, &window, 3);
        assert_eq!((origin, cropped.grid()), ((27, 0), (13, 40)));
    }
}
