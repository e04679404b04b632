"""scout's preprocessing in numpy, for the one-off Python tools (models/export.py,
benches/encoder_variants.py). It must stay identical to src/image.rs; tests/backbone.rs
checks the export's reference input against the Rust side.
"""
import numpy as np
import pydicom


def percentile_nearest(values, p):
    """Nearest-rank percentile on the sorted values: index floor(p/100*(n-1) + 0.5)."""
    s = np.sort(values.reshape(-1).astype(np.float64))
    idx = int(np.floor(p / 100.0 * (len(s) - 1) + 0.5))
    return float(s[idx])


# At most this many distinct values inside the window: a posterised image, smoothed.
COARSE_LEVELS = 32


def gaussian_blur(img, sigma):
    """Separable Gaussian (+-3 sigma), the edge repeated beyond the image."""
    radius = int(np.ceil(3.0 * sigma))
    d = np.arange(-radius, radius + 1)
    k = np.exp(-(d * d) / (2.0 * sigma * sigma))
    k /= k.sum()
    out = img.astype(np.float64)
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)],
                        mode="edge")
        n = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(t, t + n), axis=axis) for t, w in enumerate(k))
    return out.astype(np.float32)


def normalize(pixels, low_pct=0.5, high_pct=99.5):
    """Robust to MR scaling: clip to the [0.5, 99.5] percentiles and map to [0, 1];
    a posterised image (at most COARSE_LEVELS values in the window) is then smoothed
    by a Gaussian of sigma = 1/256 of its larger side."""
    lo = percentile_nearest(pixels, low_pct)
    hi = percentile_nearest(pixels, high_pct)
    if not hi > lo:
        return np.zeros(pixels.shape, np.float32)
    out = (pixels.astype(np.float64) - lo) / (hi - lo)
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    values = pixels.astype(np.float32).reshape(-1)
    inside = np.unique(values[(values >= lo) & (values <= hi)])
    if len(inside) <= COARSE_LEVELS:
        out = gaussian_blur(out, max(pixels.shape) / 256.0)
    return out


def resize_bilinear(img, out_h, out_w):
    """Half-pixel-centre bilinear resize (align_corners=False), no antialiasing."""
    in_h, in_w = img.shape

    def axis(n_out, n_in):
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0.0, n_in - 1)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0)

    y0, y1, fy = axis(out_h, in_h)
    x0, x1, fx = axis(out_w, in_w)
    img = img.astype(np.float64)
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return (top * (1 - fy)[:, None] + bottom * fy[:, None]).astype(np.float32)


def read_slice(path):
    ds = pydicom.dcmread(path)
    px = ds.pixel_array.astype(np.float64)
    slope = float(getattr(ds, "RescaleSlope", 1.0))
    intercept = float(getattr(ds, "RescaleIntercept", 0.0))
    return (px * slope + intercept).astype(np.float32)
