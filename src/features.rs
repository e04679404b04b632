//! Feature maps cached on disk, keyed by the backbone's checksum and a hash of the pixels,
//! so repeated evaluations (and re-sent series) do not run the encoder again.
//!
//! Layout: `<dir>/<model sha256>/<pixel sha256>.fm`: magic `SCFM1`, then C, h, w, rows,
//! columns (u32 LE) and C·h·w f32 LE. Written to a temp name and renamed; a file that does
//! not parse is recomputed, never trusted.

use crate::backbone::{Backbone, BackboneError, FeatureMap};
use ndarray::{Array2, Array3};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 5] = b"SCFM1";

pub struct FeatureCache {
    dir: PathBuf,
}

/// SHA-256 of a slice's size and pixel values.
pub fn pixel_hash(pixels: &Array2<f32>) -> String {
    let mut h = Sha256::new();
    let (r, c) = pixels.dim();
    h.update((r as u64).to_le_bytes());
    h.update((c as u64).to_le_bytes());
    for v in pixels.iter() {
        h.update(v.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl FeatureCache {
    pub fn new(root: &Path, backbone: &Backbone) -> FeatureCache {
        FeatureCache {
            dir: root.join(backbone.checksum()),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.fm"))
    }

    pub fn load(&self, key: &str) -> Option<FeatureMap> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        if bytes.len() < 25 || &bytes[..5] != MAGIC {
            return None;
        }
        let u = |i: usize| {
            u32::from_le_bytes([
                bytes[5 + 4 * i],
                bytes[6 + 4 * i],
                bytes[7 + 4 * i],
                bytes[8 + 4 * i],
            ]) as usize
        };
        let (c, h, w, rows, cols) = (u(0), u(1), u(2), u(3), u(4));
        let n = c.checked_mul(h)?.checked_mul(w)?;
        if bytes.len() != 25 + 4 * n {
            return None;
        }
        let data: Vec<f32> = bytes[25..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Some(FeatureMap {
            data: Array3::from_shape_vec((c, h, w), data).ok()?,
            image_rows: rows,
            image_columns: cols,
        })
    }

    pub fn store(&self, key: &str, fm: &FeatureMap) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let (c, h, w) = fm.data.dim();
        let mut bytes = Vec::with_capacity(25 + 4 * fm.data.len());
        bytes.extend_from_slice(MAGIC);
        for v in [c, h, w, fm.image_rows, fm.image_columns] {
            bytes.extend_from_slice(&(v as u32).to_le_bytes());
        }
        for v in fm.data.iter() {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let tmp = self.dir.join(format!(".{key}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, self.path(key))
    }

    /// Cached features of a raw slice, computing (and caching) them when missing. The
    /// second value says whether the encoder ran.
    pub fn features(
        &self,
        backbone: &Backbone,
        pixels: &Array2<f32>,
    ) -> Result<(FeatureMap, bool), BackboneError> {
        let key = pixel_hash(pixels);
        if let Some(fm) = self.load(&key) {
            return Ok((fm, false));
        }
        let normalized = crate::image::normalize(pixels)?;
        let fm = backbone.features(&normalized)?;
        if let Err(e) = self.store(&key, &fm) {
            log::warn!("features: cannot cache in {}: {e}", self.dir.display());
        }
        Ok((fm, true))
    }
}
