//! Foundation features: tract against onnxruntime references made once by
//! models/export.py, the manifest's checksums, and bad input.

use ndarray::{Array2, Array4};
use scout::backbone::{Backbone, BackboneError, Manifest};
use scout::image;
use scout::sam::{Point, PointLabel, Sam};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

fn manifest() -> Manifest {
    Manifest::load(&models().join("models.toml")).expect("manifest")
}

fn read_f32(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(models().join("testdata").join(name)).unwrap();
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// SCOUT_TEST_BACKEND=cuda runs these parity tests on the GPU (a `--features cuda` build).
fn choose_backend() {
    if std::env::var("SCOUT_TEST_BACKEND").is_ok_and(|b| b == "cuda") {
        scout::backbone::set_backend(scout::backbone::Backend::Cuda);
    }
}

fn litemedsam() -> &'static Backbone {
    static B: OnceLock<Backbone> = OnceLock::new();
    B.get_or_init(|| {
        choose_backend();
        scout::backbone::set_threads(2);
        Backbone::load(&manifest(), "litemedsam").expect("load encoder")
    })
}

fn slice_input() -> Array2<f32> {
    Array2::from_shape_vec((256, 256), read_f32("slice_input.f32")).unwrap()
}

/// A temporary models folder with the tiny DINOv2 fixture and `manifest` as its
/// models.toml, loaded.
fn tiny_manifest(tmp: &Path, manifest: &str) -> Result<Manifest, BackboneError> {
    std::fs::create_dir_all(tmp.join("testdata")).unwrap();
    std::fs::copy(
        models().join("testdata/tiny_dinov2.onnx"),
        tmp.join("testdata/tiny_dinov2.onnx"),
    )
    .unwrap();
    std::fs::write(tmp.join("models.toml"), manifest).unwrap();
    Manifest::load(&tmp.join("models.toml"))
}

fn max_abs_diff(a: impl IntoIterator<Item = f32>, b: impl IntoIterator<Item = f32>) -> f32 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn preprocessing_matches_the_export_script() {
    let pixels = image::read_dicom(&models().join("testdata/slice.dcm")).unwrap();
    let ours = image::resize_bilinear(&image::normalize(&pixels).unwrap(), 256, 256);
    let d = max_abs_diff(ours.iter().copied(), slice_input().iter().copied());
    assert!(d <= 1e-5, "max abs diff {d}");
}

#[test]
fn encoder_matches_onnxruntime() {
    let b = litemedsam();
    let fm = b.features(&slice_input()).unwrap();
    assert_eq!(fm.data.dim(), (256, 64, 64));
    let reference = read_f32("embeddings_every8.f32");
    let ours: Vec<f32> = (0..256)
        .step_by(8)
        .flat_map(|c| {
            fm.data
                .index_axis(ndarray::Axis(0), c)
                .iter()
                .copied()
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(ours.len(), reference.len());
    let d = max_abs_diff(ours, reference);
    eprintln!("encoder: tract vs onnxruntime max abs diff {d:e}");
    assert!(d <= 1e-3, "max abs diff {d}");
}

#[test]
fn decoder_matches_onnxruntime_and_takes_any_number_of_points() {
    let b = litemedsam();
    choose_backend();
    let sam = Sam::load(&manifest(), "litemedsam").unwrap();
    assert_eq!(sam.backbone(), "litemedsam");
    let fm = b.features(&slice_input()).unwrap();
    let prompt = [(128.0, 96.0, 1.0), (120.0, 140.0, 1.0), (30.0, 30.0, 0.0)];
    let (logits, iou) = sam.decode_raw(&fm.data, &prompt).unwrap();
    let d = max_abs_diff(logits.iter().copied(), read_f32("decoder_logits.f32"));
    eprintln!("decoder: tract vs onnxruntime max abs diff {d:e}, predicted IoU {iou}");
    assert!(d <= 1e-3, "max abs diff {d}");
    for n in [1, 2, 10] {
        let pts: Vec<(f32, f32, f32)> = (0..n).map(|i| (100.0 + i as f32, 120.0, 1.0)).collect();
        let (l, _) = sam.decode_raw(&fm.data, &pts).unwrap();
        assert_eq!(l.dim(), (256, 256), "N = {n}");
    }
    // Image-pixel prompts on a 512×384 image give a mask at that size.
    let fm = scout::backbone::FeatureMap {
        image_rows: 512,
        image_columns: 384,
        ..fm
    };
    let m = sam
        .mask(
            &fm,
            &[Point {
                row: 250.0,
                column: 190.0,
                label: PointLabel::Foreground,
            }],
        )
        .unwrap();
    assert_eq!(m.mask.dim(), (512, 384));
}

/// SAM prompted with a region's bounding box answers inside that box. The image is not
/// square and the box is off-centre, so a box mapped with rows and columns swapped, or
/// to the wrong frame, would put the mask elsewhere.
#[test]
fn sam_box_prompt_stays_in_the_box() {
    use scout::eval::{refine_with_sam, SamPrompt, SamRefine};
    let b = litemedsam();
    choose_backend();
    let sam = Sam::load(&manifest(), "litemedsam").unwrap();
    let fm = scout::backbone::FeatureMap {
        image_rows: 512,
        image_columns: 384,
        ..b.features(&slice_input()).unwrap()
    };
    let (r0, r1, c0, c1) = (200, 330, 60, 200);
    let region = Array2::from_shape_fn((512, 384), |(r, c)| {
        (r0..=r1).contains(&r) && (c0..=c1).contains(&c)
    });
    let finding = scout::postprocess::Finding {
        label: 0,
        point: ((r0 + r1) as f64 / 2.0, (c0 + c1) as f64 / 2.0),
        mask: region.clone(),
        mass: 1.0,
        confidence: 1.0,
    };
    let how = SamRefine {
        prompt: SamPrompt::Box,
        points: 0,
        min_predicted_iou: 0.0,
        min_agreement: 0.0,
    };
    let m = refine_with_sam(&sam, &fm, &finding, &how, 1).unwrap();
    let total = m.mask.iter().filter(|v| **v).count();
    // The box prompt carries a 5 % margin.
    let inside = m
        .mask
        .indexed_iter()
        .filter(|((r, c), v)| **v && (193..=337).contains(r) && (53..=207).contains(c))
        .count();
    eprintln!(
        "box prompt: {total} pixels, {inside} inside the box, predicted IoU {}",
        m.predicted_iou
    );
    assert!(total >= 500, "{total} pixels");
    assert!(
        inside as f64 >= 0.9 * total as f64,
        "{inside} of {total} inside"
    );
}

#[test]
fn tiny_dinov2_tokens_become_a_feature_map() {
    choose_backend();
    let m = manifest();
    let b = Backbone::load(&m, "tiny-dinov2-test").unwrap();
    let small = Array2::from_shape_vec((56, 56), read_f32("tiny_dinov2_input.f32")).unwrap();
    let fm = b.features(&small).unwrap();
    assert_eq!(fm.data.dim(), (24, 4, 4));
    let tokens = read_f32("tiny_dinov2_tokens.f32"); // 19 × 24, 3 prefix tokens
    let expected: Vec<f32> = (0..24)
        .flat_map(|c| (0..16).map(move |p| (c, p)))
        .map(|(c, p)| tokens[(3 + p) * 24 + c])
        .collect();
    let d = max_abs_diff(fm.data.iter().copied(), expected);
    assert!(d <= 1e-4, "max abs diff {d}");
    // Geometry: cell centres map to pixel centres of the original image.
    let fm = scout::backbone::FeatureMap {
        image_rows: 112,
        image_columns: 112,
        ..fm
    };
    assert_eq!(fm.cell_to_pixel(0.0, 0.0), (13.5, 13.5));
    assert_eq!(fm.pixel_to_cell(13.5, 13.5), (0.0, 0.0));
}

#[test]
fn int8_encoder_stays_close_to_fp32() {
    let fp32 = litemedsam().features(&slice_input()).unwrap();
    let int8 = Backbone::load(&manifest(), "litemedsam-int8")
        .unwrap()
        .features(&slice_input())
        .unwrap();
    let dot: f64 = fp32
        .data
        .iter()
        .zip(int8.data.iter())
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum();
    let na: f64 = fp32
        .data
        .iter()
        .map(|a| (*a as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let nb: f64 = int8
        .data
        .iter()
        .map(|a| (*a as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let cos = dot / na / nb;
    eprintln!("int8 vs fp32 in tract: cosine {cos:.4}");
    assert!(cos >= 0.99, "cosine {cos}");
}

#[test]
fn checksum_mismatch_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(models().join("models.toml")).unwrap();
    let m = manifest();
    let real = &m.backbones["tiny-dinov2-test"].sha256;
    let m = tiny_manifest(tmp.path(), &text.replace(real.as_str(), &"0".repeat(64))).unwrap();
    let Err(err) = Backbone::load(&m, "tiny-dinov2-test") else {
        panic!("loaded a model with a wrong checksum")
    };
    assert!(matches!(err, BackboneError::Checksum { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("SHA-256") && msg.contains(real.as_str()) && msg.contains("tiny_dinov2.onnx"),
        "{msg}"
    );
    let Err(err) = Backbone::load(&m, "no-such-model") else {
        panic!()
    };
    assert!(err.to_string().contains("tiny-dinov2-test"), "{err}");
}

#[test]
fn bad_images_are_errors_not_panics() {
    let b = Backbone::load(&manifest(), "tiny-dinov2-test").unwrap();
    for (what, img) in [
        ("0×0", Array2::<f32>::zeros((0, 0))),
        ("1 pixel wide", Array2::<f32>::ones((64, 1))),
        (
            "NaN",
            Array2::from_shape_fn((32, 32), |(r, _)| if r == 5 { f32::NAN } else { 1.0 }),
        ),
    ] {
        let r = b.features(&img);
        assert!(matches!(r, Err(BackboneError::Image(_))), "{what}: {r:?}");
        assert!(image::normalize(&img).is_err(), "{what}");
    }
    // A wrongly shaped tensor is the model's error, not a panic.
    let wrong = Array4::<f32>::zeros((1, 3, 10, 10));
    assert!(b.features_of_input(wrong, (10, 10)).is_err());
}

/// An entry with `equalise` feeds the model the equalised slice: its input is the plain
/// entry's input for the slice after `Equalise::apply`, to the bit, and not the plain
/// slice's; its features are keyed apart from the plain entry's.
#[test]
fn an_equalising_entry_feeds_the_model_the_equalised_slice() {
    let m = manifest();
    let eq = Backbone::load(&m, "litemedsam-hyper-eq").expect("load equalising entry");
    let setting = m.backbones["litemedsam-hyper-eq"]
        .equalise
        .expect("equalise set");
    let plain = litemedsam();
    let slice = slice_input();
    let fed = eq.input_tensor(&slice).unwrap();
    let want = plain.input_tensor(&setting.apply(&slice)).unwrap();
    assert!(fed == want, "not the equalised slice");
    let unequalised = plain.input_tensor(&slice).unwrap();
    assert!(
        max_abs_diff(fed.iter().copied(), unequalised.iter().copied()) > 0.05,
        "equalising changed nothing: the check has no teeth"
    );
    assert!(eq.checksum().starts_with(plain.checksum()) && eq.checksum() != plain.checksum());
}

/// The hypercolumn entry (same file, `extra_outputs`): the encoder's output upsampled to
/// the stage-2 grid, then the stage-2 output, from one run, keyed apart from the plain
/// features; a name that is no tensor of the graph is a clear error at load.
#[test]
fn hypercolumn_stacks_the_output_and_stage_two() {
    let hyper = Backbone::load(&manifest(), "litemedsam-hyper").expect("load hypercolumn");
    let plain = litemedsam();
    assert_ne!(hyper.checksum(), plain.checksum());
    assert!(hyper.checksum().starts_with(plain.checksum()));
    let fm = hyper.features(&slice_input()).unwrap();
    assert_eq!(fm.data.dim(), (384, 128, 128));
    assert_eq!((fm.image_rows, fm.image_columns), (256, 256));
    let reference = plain.features(&slice_input()).unwrap();
    for c in (0..256).step_by(15) {
        let up = image::resize_bilinear(
            &reference.data.index_axis(ndarray::Axis(0), c).to_owned(),
            128,
            128,
        );
        let ours = fm.data.index_axis(ndarray::Axis(0), c);
        let d = max_abs_diff(up.iter().copied(), ours.iter().copied());
        assert!(d <= 1e-4, "channel {c}: max abs diff {d}");
    }
    // The output is also kept on its own grid, and the cache gives it back so.
    assert_eq!(fm.coarse.len(), 1);
    assert_eq!(
        (fm.coarse[0].first, fm.coarse[0].map.dim()),
        (0, (256, 64, 64))
    );
    let d = max_abs_diff(
        fm.coarse[0].map.iter().copied(),
        reference.data.iter().copied(),
    );
    assert!(d <= 1e-4, "coarse part: max abs diff {d}");
    let dir = tempfile::tempdir().unwrap();
    let cache = scout::features::FeatureCache::new(dir.path(), &hyper);
    let (stored, computed) = cache.features(&hyper, &slice_input()).unwrap();
    assert!(computed);
    let (loaded, computed) = cache.features(&hyper, &slice_input()).unwrap();
    assert!(!computed);
    assert_eq!(loaded.data, stored.data);
    assert_eq!(loaded.coarse[0].map, stored.coarse[0].map);
    // A file under the key of a slice of another size is damage, computed again.
    let smaller = image::resize_bilinear(&slice_input(), 128, 128);
    let file = |pixels: &Array2<f32>| {
        let key = scout::features::pixel_hash(pixels);
        dir.path().join(hyper.checksum()).join(format!("{key}.fm"))
    };
    std::fs::copy(file(&slice_input()), file(&smaller)).unwrap();
    let (fresh, computed) = cache.features(&hyper, &smaller).unwrap();
    assert!(computed);
    assert_eq!((fresh.image_rows, fresh.image_columns), (128, 128));
    // Stage 2 is its own map: finite, and varying over the slice in every channel.
    for c in 256..384 {
        let plane = fm.data.index_axis(ndarray::Axis(0), c);
        assert!(plane.iter().all(|v| v.is_finite()), "channel {c}");
        let (lo, hi) = plane
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        assert!(hi > lo, "channel {c} is constant");
    }

    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(models().join("models.toml"))
        .unwrap()
        .replace(
            "prefix_tokens = 3\n",
            "prefix_tokens = 3\nextra_outputs = [\"no/such/tensor\"]\n",
        );
    let m = tiny_manifest(tmp.path(), &text).unwrap();
    let Err(err) = Backbone::load(&m, "tiny-dinov2-test") else {
        panic!("loaded a model with an unknown extra output")
    };
    assert!(err.to_string().contains("no/such/tensor"), "{err}");
}
