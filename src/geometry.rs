//! Image geometry: Image Orientation/Position (Patient) and Pixel Spacing, the patient
//! coordinate system (LPS, millimetres) and anatomical planes. Pure functions, no I/O.

use serde::{Deserialize, Serialize};

/// Where one image (or frame) sits in the patient coordinate system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SliceGeometry {
    pub rows: u16,
    pub columns: u16,
    /// Row spacing then column spacing (mm), as in Pixel Spacing (0028,0030).
    pub pixel_spacing: Option<[f64; 2]>,
    /// Row direction cosines then column direction cosines (0020,0037).
    pub orientation: Option<[f64; 6]>,
    /// Centre of the first transmitted pixel, mm (0020,0032).
    pub position: Option<[f64; 3]>,
    pub slice_thickness: Option<f64>,
    pub frame_of_reference_uid: Option<String>,
}

/// Anatomical plane of a slice, from the dominant axis of its normal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plane {
    Axial,
    Coronal,
    Sagittal,
    /// No usable orientation (missing or degenerate).
    Unknown,
}

impl std::fmt::Display for Plane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Plane::Axial => "axial",
            Plane::Coronal => "coronal",
            Plane::Sagittal => "sagittal",
            Plane::Unknown => "unknown",
        })
    }
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

pub(crate) fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

impl SliceGeometry {
    /// Unit normal (row × column); None when the orientation is missing or degenerate.
    pub fn normal(&self) -> Option<[f64; 3]> {
        let o = self.orientation?;
        let n = cross([o[0], o[1], o[2]], [o[3], o[4], o[5]]);
        let len = dot(n, n).sqrt();
        if !len.is_finite() || len < 1e-6 {
            return None;
        }
        Some([n[0] / len, n[1] / len, n[2] / len])
    }

    /// Axial when the normal runs mostly head–feet (z), coronal when mostly
    /// anterior–posterior (y), sagittal when mostly left–right (x). Oblique slices go to
    /// the closest plane, which is what a planning localizer needs.
    pub fn plane(&self) -> Plane {
        match self.normal() {
            None => Plane::Unknown,
            Some(n) => {
                let (x, y, z) = (n[0].abs(), n[1].abs(), n[2].abs());
                if z >= x && z >= y {
                    Plane::Axial
                } else if y >= x {
                    Plane::Coronal
                } else {
                    Plane::Sagittal
                }
            }
        }
    }

    /// Signed distance of the slice along its normal, for ordering slices of a stack.
    pub fn position_along_normal(&self) -> Option<f64> {
        Some(dot(self.normal()?, self.position?))
    }

    /// The inverse of `pixel_to_patient` for a point on (or projected onto) the slice
    /// plane: (row, column) of its foot point.
    pub fn patient_to_pixel(&self, p: [f64; 3]) -> Option<(f64, f64)> {
        let o = self.orientation?;
        let pos = self.position?;
        let [dr, dc] = self.pixel_spacing?;
        if dr <= 0.0 || dc <= 0.0 {
            return None;
        }
        let d = [p[0] - pos[0], p[1] - pos[1], p[2] - pos[2]];
        let column = dot(d, [o[0], o[1], o[2]]) / dc;
        let row = dot(d, [o[3], o[4], o[5]]) / dr;
        Some((row, column))
    }

    /// Whether `other` lies on this slice's pixel grid moved along the normal: same size,
    /// parallel, and its first and last pixels over this slice's own (within half a
    /// pixel). What a stack's centre slice passes on to the others by pixel (`stack`)
    /// holds only then. False when either lacks its geometry.
    pub fn same_grid(&self, other: &SliceGeometry) -> bool {
        if (self.rows, self.columns) != (other.rows, other.columns) {
            return false;
        }
        let (Some(a), Some(b)) = (self.normal(), other.normal()) else {
            return false;
        };
        if dot(a, b).abs() < 0.9999 {
            return false;
        }
        let last = (
            f64::from(self.rows.max(1) - 1),
            f64::from(self.columns.max(1) - 1),
        );
        [(0.0, 0.0), last].iter().all(|&(r, c)| {
            other
                .pixel_to_patient(r, c)
                .and_then(|p| self.patient_to_pixel(p))
                .is_some_and(|(pr, pc)| (pr - r).abs() <= 0.5 && (pc - c).abs() <= 0.5)
        })
    }

    /// Patient coordinates (mm) of the centre of pixel (row, column), PS3.3 C.7.6.2.1.1.
    pub fn pixel_to_patient(&self, row: f64, column: f64) -> Option<[f64; 3]> {
        let o = self.orientation?;
        let p = self.position?;
        let [dr, dc] = self.pixel_spacing?;
        Some([
            p[0] + o[0] * dc * column + o[3] * dr * row,
            p[1] + o[1] * dc * column + o[4] * dr * row,
            p[2] + o[2] * dc * column + o[5] * dr * row,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_share_a_grid_only_when_moved_along_their_normal() {
        // Sagittal: rows along z, columns along y; the normal is x.
        let centre = g([0.0, 1.0, 0.0, 0.0, 0.0, -1.0]);
        let moved = |d: [f64; 3]| SliceGeometry {
            position: centre
                .position
                .map(|p| [p[0] + d[0], p[1] + d[1], p[2] + d[2]]),
            ..centre.clone()
        };
        assert!(centre.same_grid(&moved([5.0, 0.0, 0.0])));
        assert!(
            centre.same_grid(&moved([-20.0, 0.2, 0.0])),
            "0.4 of a column off"
        );
        assert!(
            !centre.same_grid(&moved([5.0, 2.0, 0.0])),
            "four columns off"
        );
        assert!(!centre.same_grid(&moved([5.0, 0.0, 1.0])), "one row off");
        let smaller = SliceGeometry {
            rows: 128,
            ..moved([5.0, 0.0, 0.0])
        };
        assert!(!centre.same_grid(&smaller));
        let tilted = g([0.0, 1.0, 0.0, 0.1, 0.0, -0.995]);
        assert!(!centre.same_grid(&tilted));
        let unknown = SliceGeometry {
            orientation: None,
            ..centre.clone()
        };
        assert!(!centre.same_grid(&unknown) && !unknown.same_grid(&centre));
    }

    fn g(o: [f64; 6]) -> SliceGeometry {
        SliceGeometry {
            rows: 256,
            columns: 256,
            pixel_spacing: Some([1.0, 0.5]),
            orientation: Some(o),
            position: Some([10.0, 20.0, 30.0]),
            slice_thickness: None,
            frame_of_reference_uid: None,
        }
    }

    #[test]
    fn planes_from_orientation() {
        assert_eq!(g([1., 0., 0., 0., 1., 0.]).plane(), Plane::Axial);
        assert_eq!(g([1., 0., 0., 0., 0., -1.]).plane(), Plane::Coronal);
        assert_eq!(g([0., 1., 0., 0., 0., -1.]).plane(), Plane::Sagittal);
        // 20 degrees oblique sagittal is still sagittal
        let (s, c) = (20f64.to_radians().sin(), 20f64.to_radians().cos());
        assert_eq!(g([s, c, 0., 0., 0., -1.]).plane(), Plane::Sagittal);
        assert_eq!(g([0., 0., 0., 0., 0., 0.]).plane(), Plane::Unknown);
    }

    #[test]
    fn pixel_to_patient_follows_ps3_3() {
        let s = g([1., 0., 0., 0., 1., 0.]);
        // column step 0.5 mm along x, row step 1 mm along y
        assert_eq!(s.pixel_to_patient(0., 0.), Some([10., 20., 30.]));
        assert_eq!(s.pixel_to_patient(4., 2.), Some([11., 24., 30.]));
    }
}
