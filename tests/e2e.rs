//! The whole agent against real peers: `scout serve` in a child process, DCMTK `storescu`
//! as the scanner and DCMTK `storescp` as the destination; every object that arrives is
//! checked with dicom3tools' `dciodvfy` and DCMTK's `dsrdump`.

mod common;

use common::*;
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::{open_file, InMemDicomObject};
use scout::geometry::SliceGeometry;
use scout::synth::{self, SynthSeries, SynthSpec};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    obj.get(tag)?
        .to_str()
        .ok()
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
}

fn items(obj: &InMemDicomObject, tag: Tag) -> Vec<InMemDicomObject> {
    obj.get(tag)
        .and_then(|e| e.items())
        .map(|i| i.to_vec())
        .unwrap_or_default()
}

fn concept(item: &InMemDicomObject) -> Option<String> {
    items(item, tags::CONCEPT_NAME_CODE_SEQUENCE)
        .first()
        .and_then(|c| text(c, tags::CODE_MEANING))
}

/// Per Tracking Identifier: the SCOORD3D point, or None when reported absent.
fn sr_landmarks(sr: &InMemDicomObject) -> BTreeMap<String, Option<[f64; 3]>> {
    let mut out = BTreeMap::new();
    let content = items(sr, tags::CONTENT_SEQUENCE);
    let measurements = content
        .iter()
        .find(|i| concept(i).as_deref() == Some("Imaging Measurements"))
        .expect("Imaging Measurements container");
    for group in items(measurements, tags::CONTENT_SEQUENCE) {
        assert_eq!(concept(&group).as_deref(), Some("Measurement Group"));
        let children = items(&group, tags::CONTENT_SEQUENCE);
        let name = children
            .iter()
            .find(|c| concept(c).as_deref() == Some("Tracking Identifier"))
            .and_then(|c| text(c, tags::TEXT_VALUE))
            .expect("tracking identifier");
        let point = children
            .iter()
            .find(|c| text(c, tags::VALUE_TYPE).as_deref() == Some("SCOORD3D"))
            .map(|c| {
                assert_eq!(text(c, tags::GRAPHIC_TYPE).as_deref(), Some("POINT"));
                let v: Vec<f32> = c
                    .get(tags::GRAPHIC_DATA)
                    .unwrap()
                    .to_multi_float32()
                    .unwrap();
                [v[0] as f64, v[1] as f64, v[2] as f64]
            });
        if point.is_none() {
            assert!(
                children
                    .iter()
                    .any(|c| concept(c).as_deref() == Some("Finding")),
                "{name}: neither a point nor a Finding = Absent"
            );
        }
        out.insert(name, point);
    }
    out
}

fn geometry_of(files: &[PathBuf], sop: &str) -> SliceGeometry {
    files
        .iter()
        .map(|f| scout::spool::read_meta(f).unwrap())
        .find(|m| m.sop_instance_uid == sop)
        .unwrap_or_else(|| panic!("no source image {sop}"))
        .geometry
}

struct Run {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    cfg: PathBuf,
    port: u16,
    dest_port: u16,
    out: PathBuf,
}

fn setup(edits: &[(&str, &str)]) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (port, dest_port) = (free_port(), free_port());
    let cfg = tmp.path().join("scout.toml");
    std::fs::write(&cfg, agent_config(port, &data, dest_port, edits)).unwrap();
    let out = tmp.path().join("received");
    Run {
        data,
        cfg,
        port,
        dest_port,
        out,
        _tmp: tmp,
    }
}

fn storescu(port: u16, files: &[PathBuf]) {
    let (ok, text) = dcmtk_to_scout("storescu", &[], port, files);
    assert!(ok, "storescu failed: {text}");
}

fn write_series(dir: &Path, spec: SynthSpec) -> SynthSeries {
    synth::write_series(dir, &spec).unwrap()
}

/// The synthetic 9-slice sagittal localizer (Body Part SPINE: the spine rule matches),
/// complete as soon as its 9 images are in.
fn localizer(dir: &Path, description: &str) -> SynthSeries {
    write_series(
        dir,
        SynthSpec {
            images_in_acquisition: true,
            series_description: description.into(),
            ..SynthSpec::default()
        },
    )
}

/// Checks an SR that arrived: valid per dciodvfy, rendered by dsrdump, patient and
/// study of the source, and every point equal to the sidecar's and on its pixel (with
/// `three_d`, points voted over a stack: projecting onto it).
fn check_sr(
    sr_file: &Path,
    sidecar: &Path,
    source: &SynthSeries,
    three_d: bool,
) -> BTreeMap<String, Option<[f64; 3]>> {
    let errors = dciodvfy_errors(sr_file);
    assert!(errors.is_empty(), "dciodvfy: {errors:#?}");
    let (ok, dump) = dcmtk_run("dsrdump", &[sr_file.to_str().unwrap()]);
    assert!(
        ok && dump.contains("Imaging Measurement Report"),
        "dsrdump: {dump}"
    );
    let sr = open_file(sr_file).unwrap();
    assert_eq!(
        text(&sr, tags::SOP_CLASS_UID).as_deref(),
        Some("1.2.840.10008.5.1.4.1.1.88.34")
    );
    assert_eq!(text(&sr, tags::PATIENT_ID).as_deref(), Some("SYNTH-0001"));
    assert_eq!(
        text(&sr, tags::STUDY_INSTANCE_UID).as_deref(),
        Some(source.study_instance_uid.as_str())
    );
    assert_ne!(
        text(&sr, tags::SERIES_INSTANCE_UID).as_deref(),
        Some(source.series_instance_uid.as_str()),
        "the SR is a new series"
    );
    let points = sr_landmarks(&sr);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(sidecar).unwrap()).unwrap();
    let listed = json["landmarks"].as_array().unwrap();
    assert_eq!(listed.len(), points.len());
    for l in listed {
        let name = l["name"].as_str().unwrap();
        let sr_point = points[name];
        match (&l["found"], sr_point) {
            (serde_json::Value::Null, None) => {}
            (found, Some(p)) if found.is_object() => {
                let mm: Vec<f64> = found["patient_mm"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                for i in 0..3 {
                    assert!(
                        (mm[i] - p[i]).abs() < 1e-3,
                        "{name}: SR {p:?} vs JSON {mm:?}"
                    );
                }
                // The named pixel is the point's projection onto its image (the point
                // itself when it lies in that plane; a stack's 3D vote may lie between).
                let g = geometry_of(&source.files, found["sop_instance_uid"].as_str().unwrap());
                let (row, column) = (
                    found["row"].as_f64().unwrap(),
                    found["column"].as_f64().unwrap(),
                );
                let (r, c) = g.patient_to_pixel(p).unwrap();
                assert!(
                    (r - row).abs() < 1e-2 && (c - column).abs() < 1e-2,
                    "{name}: SR {p:?} projects to ({r}, {c}), JSON names ({row}, {column})"
                );
                if !three_d {
                    let back = g.pixel_to_patient(row, column).unwrap();
                    for i in 0..3 {
                        assert!(
                            (back[i] - p[i]).abs() < 1e-3,
                            "{name}: pixel maps to {back:?}, SR says {p:?}"
                        );
                    }
                }
            }
            (found, p) => panic!("{name}: JSON {found} but SR {p:?}"),
        }
    }
    points
}

fn check_seg(seg_file: &Path, source: &SynthSeries) {
    let errors = dciodvfy_errors(seg_file);
    assert!(errors.is_empty(), "dciodvfy: {errors:#?}");
    let seg = open_file(seg_file).unwrap();
    assert_eq!(text(&seg, tags::MODALITY).as_deref(), Some("SEG"));
    let frames: usize = text(&seg, tags::NUMBER_OF_FRAMES).unwrap().parse().unwrap();
    let segments = items(&seg, tags::SEGMENT_SEQUENCE).len();
    assert!(frames >= 1 && segments >= 1);
    let rows = seg.get(tags::ROWS).unwrap().to_int::<usize>().unwrap();
    let cols = seg.get(tags::COLUMNS).unwrap().to_int::<usize>().unwrap();
    let bytes = seg.get(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
    assert_eq!(
        bytes.len(),
        (frames * rows * cols).div_ceil(8).next_multiple_of(2)
    );
    let referenced: Vec<String> = items(&seg, tags::REFERENCED_SERIES_SEQUENCE)
        .iter()
        .flat_map(|s| items(s, tags::REFERENCED_INSTANCE_SEQUENCE))
        .filter_map(|i| text(&i, tags::REFERENCED_SOP_INSTANCE_UID))
        .collect();
    assert_eq!(referenced.len(), source.files.len());
}

/// The shipped spine adapter file, on its backbone.
fn shipped_spine_bundle() -> scout::train::Bundle {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (backbone, _) = shipped_backbone("litemedsam-hyper");
    scout::train::Bundle::load(&root.join("models/adapters/spine.adapter"), &backbone).unwrap()
}

/// A backbone of the shipped manifest and the tests' feature cache for it.
fn shipped_backbone(id: &str) -> (scout::backbone::Backbone, scout::features::FeatureCache) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = scout::backbone::Manifest::load(&root.join("models/models.toml")).unwrap();
    let backbone = scout::backbone::Backbone::load(&manifest, id).unwrap();
    let cache = scout::features::FeatureCache::new(
        &Path::new(env!("CARGO_TARGET_TMPDIR")).join("feature-cache"),
        &backbone,
    );
    (backbone, cache)
}

/// A one-image SEG's masks by segment label (each segment has at most one frame there).
fn seg_masks(seg_file: &Path) -> BTreeMap<String, ndarray::Array2<bool>> {
    seg_frames(seg_file)
        .into_iter()
        .map(|(label, _, mask)| (label, mask))
        .collect()
}

/// Every frame of a SEG: its segment's label, the SOP Instance UID of the image it was
/// derived from, and its mask.
fn seg_frames(seg_file: &Path) -> Vec<(String, String, ndarray::Array2<bool>)> {
    let seg = open_file(seg_file).unwrap();
    let int = |o: &InMemDicomObject, t: Tag| o.get(t).unwrap().to_int::<usize>().unwrap();
    let (rows, cols) = (int(&seg, tags::ROWS), int(&seg, tags::COLUMNS));
    let labels: BTreeMap<usize, String> = items(&seg, tags::SEGMENT_SEQUENCE)
        .iter()
        .map(|s| {
            (
                int(s, tags::SEGMENT_NUMBER),
                text(s, tags::SEGMENT_LABEL).unwrap(),
            )
        })
        .collect();
    let bits = seg.get(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
    items(&seg, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .iter()
        .enumerate()
        .map(|(f, frame)| {
            let ident = &items(frame, tags::SEGMENT_IDENTIFICATION_SEQUENCE)[0];
            let first = f * rows * cols;
            // BINARY segmentation: one bit per pixel, frames back to back, LSB first.
            let mask = ndarray::Array2::from_shape_fn((rows, cols), |(r, c)| {
                let b = first + r * cols + c;
                (bits[b / 8] >> (b % 8)) & 1 == 1
            });
            let derivation = &items(frame, tags::DERIVATION_IMAGE_SEQUENCE)[0];
            let source = &items(derivation, tags::SOURCE_IMAGE_SEQUENCE)[0];
            (
                labels[&int(ident, tags::REFERENCED_SEGMENT_NUMBER)].clone(),
                text(source, tags::REFERENCED_SOP_INSTANCE_UID).unwrap(),
                mask,
            )
        })
        .collect()
}

/// The one SEG file the destination received in `dir`.
fn the_seg(dir: &Path) -> PathBuf {
    let segs = received_in(dir, "SG");
    assert_eq!(segs.len(), 1, "{segs:?}");
    segs.into_iter().next().unwrap()
}

fn iou(a: &ndarray::Array2<bool>, b: &ndarray::Array2<bool>) -> f64 {
    let both = a.iter().zip(b).filter(|(x, y)| **x && **y).count();
    let either = a.iter().zip(b).filter(|(x, y)| **x || **y).count();
    both as f64 / either.max(1) as f64
}

fn sidecar(data: &Path, s: &SynthSeries, rule: &str) -> PathBuf {
    data.join("results")
        .join(&s.study_instance_uid)
        .join(&s.series_instance_uid)
        .join(format!("{rule}.json"))
}

#[test]
fn localizer_in_sr_and_seg_out_valid_and_on_the_right_pixels() {
    let t = "localizer_in_sr_and_seg_out_valid_and_on_the_right_pixels";
    if !dcmtk(t) || !dicom3tools(t) {
        return;
    }
    let run = setup(&[]);
    let dest = Storescp::start(run.dest_port, &run.out);
    let _agent = Daemon::start(&run.cfg, run.port);
    let series = localizer(&run.data.with_file_name("series"), "SYNTH LOCALIZER");
    storescu(run.port, &series.files);
    let srs = dest.wait_for("SR3", 1, Duration::from_secs(60));
    assert_eq!(srs.len(), 1, "one SR expected: {srs:?}");
    let segs = dest.wait_for("SG", 1, Duration::from_secs(10));
    let points = check_sr(
        &srs[0],
        &sidecar(&run.data, &series, "spine"),
        &series,
        false,
    );
    assert_eq!(points.len(), 5, "L1..L5 each reported, found or absent");
    for s in &segs {
        check_seg(s, &series);
    }
    // The chest rules (coronal) did not match this sagittal series.
    assert!(!sidecar(&run.data, &series, "chest-landmarks").exists());
}

/// A rule on a second backbone (the tiny DINOv2 fixture, an adapter trained on synthetic
/// images) beside the default rules: both rules answer the same localizer, each from its
/// own backbone's features (the tiny rule analyses every slice, so its store is filled
/// while the series arrives). The tiny adapter's two tasks are split over two rules
/// (`tasks`): the tiny rule reports its landmarks, a third rule its structures and writes
/// the SEG; neither reports the other's task, though both have every label's code. A
/// rule whose adapter was made on another backbone, that names a backbone the manifest
/// lacks, whose adapter has SAM redraw a structure on a backbone with no SAM decoder, or
/// whose `tasks` names one its adapter lacks, is refused at load with the rule's name.
#[test]
fn rules_on_two_backbones_answer_the_same_localizer() {
    let t = "rules_on_two_backbones_answer_the_same_localizer";
    if !dcmtk(t) || !dicom3tools(t) {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = scout::backbone::Manifest::load(&root.join("models/models.toml")).unwrap();
    let tiny = scout::backbone::Backbone::load(&manifest, "tiny-dinov2-test").unwrap();
    let work = tempfile::tempdir().unwrap();
    synthetic_image_dataset(&work.path().join("ds"), 3);
    let ds = scout::dataset::Dataset::open(&work.path().join("ds")).unwrap();
    let cache = scout::features::FeatureCache::new(&work.path().join("features"), &tiny);
    let bundle = scout::train::train_dataset(
        &ds,
        &scout::train::Models {
            backbone: &tiny,
            cache: &cache,
            sam: None,
        },
        3,
        scout::adapter::Method::Classification,
        // The fixture's grid is 4×4 cells of 64 pixels: a landmark's disk must hold one.
        60.0,
        &scout::adapter::TrainConfig {
            steps: 200,
            ..Default::default()
        },
    )
    .unwrap();
    let adapter = work.path().join("tiny.adapter");
    bundle.save(&adapter).unwrap();
    // The same adapter with SAM to redraw a structure: this backbone has no decoder.
    let mut redrawn = bundle.clone();
    redrawn.tasks[1].1.sam_redraw = vec![true, false];
    redrawn.format = 3;
    let redrawn_adapter = work.path().join("tiny-sam.adapter");
    redrawn.save(&redrawn_adapter).unwrap();
    // The same adapter without its structures: a rule reporting them has nothing to report.
    let mut points_only = bundle.clone();
    points_only.tasks.truncate(1);
    let points_adapter = work.path().join("tiny-points.adapter");
    points_only.save(&points_adapter).unwrap();
    // Every label coded: the rule reports the task its name says (`tasks`), its codes
    // of the other task notwithstanding.
    let rule_of = |name: &str, task: &str, outputs: &str, adapter: &Path, backbone: &str| {
        let code =
            |v: &str| format!("{{ scheme = \"99SCOUT\", value = \"{v}\", meaning = \"{v}\" }}");
        let segment = |v: &str| {
            format!(
                "{{ label = \"{v}\", category = {}, type = {} }}",
                code("T"),
                code(v)
            )
        };
        format!(
            "\n[[rules]]\nname = \"{name}\"\nadapter = {:?}\nbackbone = \"{backbone}\"\nslices = \"all\"\n\
             tasks = [\"{task}\"]\noutputs = [{outputs}]\ndestinations = [\"dest\"]\n[rules.match]\nmodalities = [\"MR\"]\n\
             localizer = true\nplanes = [\"sagittal\"]\n[rules.landmarks]\nsquare = {}\ndisk = {}\n\
             [rules.structures]\n1 = {}\n2 = {}\n",
            adapter.display().to_string(),
            code("SQUARE"),
            code("DISK"),
            segment("SQUARE"),
            segment("DISK"),
        )
    };
    let rule = |adapter: &Path, backbone: &str| {
        rule_of("tiny", "landmarks", "\"sr\", \"json\"", adapter, backbone)
    };
    let structures_rule = |adapter: &Path| {
        rule_of(
            "tiny-seg",
            "structures",
            "\"seg\"",
            adapter,
            "tiny-dinov2-test",
        )
    };

    // Refused at load, naming the rule.
    let shipped = root.join("models/adapters/spine.adapter");
    for (adapter, backbone, expect) in [
        (shipped.as_path(), "tiny-dinov2-test", "rule tiny: adapter"),
        (
            adapter.as_path(),
            "no-such-backbone",
            "rule tiny: backbone no-such-backbone",
        ),
        (
            redrawn_adapter.as_path(),
            "tiny-dinov2-test",
            "rule tiny: the adapter has SAM redraw structures",
        ),
        (
            points_adapter.as_path(),
            "tiny-dinov2-test",
            "rule tiny-seg: tasks names the structures, which the adapter does not have",
        ),
    ] {
        let run = setup(&[]);
        let mut text = std::fs::read_to_string(&run.cfg).unwrap();
        if adapter == points_adapter {
            text += &structures_rule(adapter);
        } else {
            text += &rule(adapter, backbone);
        }
        if backbone == "no-such-backbone" {
            // A second rule on the same missing backbone is reported too (loaded once):
            // the first rule that names a backbone, spine.
            text = text.replacen(
                "backbone = \"litemedsam-hyper\"",
                "backbone = \"no-such-backbone\"",
                1,
            );
        }
        std::fs::write(&run.cfg, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_scout"))
            .arg("check-config")
            .arg(&run.cfg)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{backbone}: accepted");
        assert!(stderr.contains(expect), "{backbone}: {stderr}");
        if backbone == "no-such-backbone" {
            assert!(
                stderr.contains("rule spine: backbone no-such-backbone"),
                "{stderr}"
            );
        }
        if adapter == shipped {
            assert!(
                stderr.contains("trained on backbone litemedsam-hyper")
                    && stderr.contains("from tiny-dinov2-test"),
                "{stderr}"
            );
        }
    }

    let run = setup(&[]);
    let text = std::fs::read_to_string(&run.cfg).unwrap()
        + &rule(&adapter, "tiny-dinov2-test")
        + &structures_rule(&adapter);
    std::fs::write(&run.cfg, text).unwrap();
    let dest = Storescp::start(run.dest_port, &run.out);
    let agent = Daemon::start(&run.cfg, run.port);
    assert!(
        agent
            .wait_log(
                &["analysis: backbone litemedsam-hyper, litemedsam-hyper-eq, tiny-dinov2-test,"],
                Duration::from_secs(30)
            )
            .is_some(),
        "both backbones loaded: {:?}",
        agent.log_lines()
    );
    let series = localizer(&run.data.with_file_name("series"), "SYNTH LOCALIZER");
    storescu(run.port, &series.files);
    let srs = dest.wait_for("SR3", 2, Duration::from_secs(90));
    assert_eq!(srs.len(), 2, "one SR per rule: {srs:?}");
    let mut names: Vec<Vec<String>> = Vec::new();
    for sr in &srs {
        let obj = open_file(sr).unwrap();
        let keys: Vec<String> = sr_landmarks(&obj).into_keys().collect();
        let rule = if keys.iter().any(|k| k == "square") {
            "tiny"
        } else {
            "spine"
        };
        check_sr(
            sr,
            &sidecar(&run.data, &series, rule),
            &series,
            rule == "tiny",
        );
        names.push(keys);
    }
    names.sort();
    assert_eq!(names[0], ["L1", "L2", "L3", "L4", "L5"]);
    assert_eq!(names[1], ["disk", "square"]);
    // One SEG from the spine rule, one from the structures-only rule (the tiny adapter,
    // trained on squares and disks, finds what it finds in a spine).
    let segs = dest.wait_for("SG", 2, Duration::from_secs(30));
    assert_eq!(segs.len(), 2, "{segs:?}");
    let mut tiny = 0;
    for s in &segs {
        check_seg(s, &series);
        let labels: std::collections::BTreeSet<String> =
            seg_frames(s).into_iter().map(|(l, _, _)| l).collect();
        let of =
            |set: &[&str]| !labels.is_empty() && labels.iter().all(|l| set.contains(&l.as_str()));
        if of(&["SQUARE", "DISK"]) {
            tiny += 1;
        } else {
            assert!(of(&["L1", "L2", "L3", "L4", "L5"]), "{labels:?}");
        }
    }
    assert_eq!(tiny, 1, "one SEG of the tiny adapter's structures");
    expect_logged(
        &agent,
        &[
            ("rule tiny: series", "/2 landmarks, 0 structure masks"),
            ("rule tiny-seg: series", ": 0/0 landmarks, "),
        ],
    );
}

/// Each rule's line about the series, with what it must say (waited for briefly: the
/// results are in by now).
fn expect_logged(agent: &Daemon, lines: &[(&str, &str)]) {
    for (rule, what) in lines {
        assert!(
            agent
                .wait_log(&[rule, what], Duration::from_secs(5))
                .is_some(),
            "{rule} … {what}: {:?}",
            agent.log_lines()
        );
    }
}

/// Real images as one localizer series (one stack in `plane`) through the agent with
/// `edits` to its configuration: waits for the rule's SR and checks it and every SEG.
/// Returns the run (its folder holds the series' files), the series, the SR's points
/// (`three_d`: voted over a stack) and the agent, still running (its log).
fn real_images_through_the_agent(
    images: Vec<ndarray::Array2<u16>>,
    negatives: bool,
    plane: scout::geometry::Plane,
    description: &str,
    rule: &str,
    edits: &[(&str, &str)],
) -> (Run, SynthSeries, BTreeMap<String, Option<[f64; 3]>>, Daemon) {
    let (rows, cols) = images[0].dim();
    // The series carries Images in Acquisition, so the agent takes it as complete when its
    // last instance is in. The tests' short idle time (500 ms) would also end it early
    // where a delivery stalls that long: with `slices = "all"` the agent encodes each
    // slice as it arrives, both cores busy while storescu still sends, and a series cut
    // one instance short gave a SEG referencing fewer images than were sent (`check_seg`
    // failed so, once in about ten runs of the stack tests).
    let mut edits = edits.to_vec();
    edits.push(("idle_ms = 500", "idle_ms = 30000"));
    let run = setup(&edits);
    let dest = Storescp::start(run.dest_port, &run.out);
    let agent = Daemon::start(&run.cfg, run.port);
    let series = write_series(
        &run.data.with_file_name("series"),
        SynthSpec {
            slices: images.len(),
            rows: rows as u16,
            columns: cols as u16,
            planes: vec![plane],
            series_description: description.into(),
            images_in_acquisition: true,
            images,
            negatives,
            ..SynthSpec::default()
        },
    );
    storescu(run.port, &series.files);
    // With `slices = "all"` every slice of a stack is encoded: ~40 s with the machine to
    // itself, once over 60 s while the suite's other tests shared the two cores. The wait
    // ends as soon as the SR is in.
    let srs = dest.wait_for("SR3", 1, Duration::from_secs(180));
    assert_eq!(srs.len(), 1, "one SR expected: {srs:?}");
    let three_d = edits.iter().any(|(_, to)| to.contains("slices = \"all\""));
    let points = check_sr(
        &srs[0],
        &sidecar(&run.data, &series, rule),
        &series,
        three_d,
    );
    let segs = dest.wait_for("SG", 1, Duration::from_secs(10));
    assert!(!segs.is_empty(), "no SEG");
    for s in &segs {
        check_seg(s, &series);
    }
    (run, series, points, agent)
}

/// Sends the shared stack `name` (s06, s08: not one of the adapters' templates s01–s05)
/// through the agent with `edits` to its configuration; per vertebra, the distance of the SR's point
/// (projected onto the centre slice k*) from the centroid of that body there, and how far
/// it lies across the slices from the body's 3D centroid, in voxels (None: absent); and,
/// when the centre slice alone was analysed, per SEG segment the IoU of its mask with the
/// body there that it overlaps best; when the stack was, per SEG segment (its label) its
/// mask in each slice of the stack (None where it has none), and the case.
fn spine_through_the_agent(
    shared: &Path,
    name: &str,
    edits: &[(&str, &str)],
) -> (Vec<Option<[f64; 2]>>, Vec<f64>, StackMasks) {
    let ds = scout::dataset::Dataset::open(&shared.join("spine-mr")).unwrap();
    let case = ds.load_case(name).unwrap();
    let (run, series, points, _agent) = real_images_through_the_agent(
        case.slices
            .iter()
            .map(|s| s.pixels.mapv(|v| v.clamp(0.0, 65535.0) as u16))
            .collect(),
        false,
        scout::geometry::Plane::Sagittal,
        "SYNTH LOCALIZER",
        "spine",
        edits,
    );
    // Back to pixels of the centre slice (k*), against the centroid of each vertebral
    // body there: the agent's output must agree with `scout eval`'s 2D variant.
    let geometry = |i: usize| scout::spool::read_meta(&series.files[i]).unwrap().geometry;
    let centre = geometry(case.center);
    // The slices are evenly spaced: volume index k from the position across them.
    let along = |i: usize| geometry(i).position_along_normal().unwrap();
    let normal = centre.normal().unwrap();
    let (p0, p1) = (along(0), along(1));
    let k_of = |i: usize| case.slices[i].k.unwrap() as f64;
    let (k0, k1) = (k_of(0), k_of(1));
    let labels = case.slices[case.center].labels.as_ref().unwrap();
    let three_d = edits.iter().any(|(_, to)| to.contains("slices = \"all\""));
    let mut ious = Vec::new();
    let mut stack = StackMasks {
        masks: BTreeMap::new(),
        case: case.clone(),
    };
    if !three_d {
        for mask in seg_masks(&the_seg(&run.out)).values() {
            let best = (1..=5u8)
                .map(|v| iou(mask, &labels.mapv(|x| x == v)))
                .fold(0.0, f64::max);
            ious.push(best);
        }
    } else {
        let uids: Vec<String> = (0..series.files.len())
            .map(|i| {
                scout::spool::read_meta(&series.files[i])
                    .unwrap()
                    .sop_instance_uid
            })
            .collect();
        for (label, uid, mask) in seg_frames(&the_seg(&run.out)) {
            let i = uids
                .iter()
                .position(|u| *u == uid)
                .expect("a frame of the series");
            stack
                .masks
                .entry(label)
                .or_insert_with(|| vec![None; uids.len()])[i] = Some(mask);
        }
    }
    let errors = ["L1", "L2", "L3", "L4", "L5"]
        .iter()
        .enumerate()
        .map(|(l, name)| {
            let mask: Vec<(usize, usize)> = labels
                .indexed_iter()
                .filter(|(_, v)| **v as usize == l + 1)
                .map(|(p, _)| p)
                .collect();
            let n = mask.len() as f64;
            let truth = (
                mask.iter().map(|p| p.0 as f64).sum::<f64>() / n,
                mask.iter().map(|p| p.1 as f64).sum::<f64>() / n,
            );
            points[*name].map(|p| {
                let (r, c) = centre.patient_to_pixel(p).unwrap();
                let f = ((0..3).map(|i| p[i] * normal[i]).sum::<f64>() - p0) / (p1 - p0);
                let k = k0 + f * (k1 - k0);
                [
                    ((r - truth.0).powi(2) + (c - truth.1).powi(2)).sqrt(),
                    (k - case.landmarks[*name].k.unwrap()).abs(),
                ]
            })
        })
        .collect();
    (errors, ious, stack)
}

/// The configuration edit that has the agent analyse every slice of a stack.
const ALL_SLICES: (&str, &str) = ("slices = \"center\"", "slices = \"all\"");

/// The SEG's masks of a stack sent through the agent: per segment label, per slice.
struct StackMasks {
    masks: BTreeMap<String, Vec<Option<ndarray::Array2<bool>>>>,
    case: scout::dataset::Case,
}

/// The shared stack `name` through the agent's stack path (`slices = "all"`) for test
/// `t`, with the shipped spine adapter or the adapter file `adapter` in its place: every
/// vertebra reported, most within 10 px in the centre slice; per vertebra its errors and
/// the SEG's masks (`spine_through_the_agent`). None, said loudly, without the shared data
/// or the DICOM tools.
fn spine_stack_through_the_agent(
    t: &str,
    name: &str,
    adapter: Option<&Path>,
) -> Option<(Vec<Option<[f64; 2]>>, StackMasks)> {
    let shared = shared_data(t)?;
    if !dcmtk(t) || !dicom3tools(t) {
        return None;
    }
    let shipped = format!(
        "adapter = \"{}/models/adapters/spine.adapter\"",
        env!("CARGO_MANIFEST_DIR")
    );
    let other = adapter.map(|p| format!("adapter = {:?}", p.display().to_string()));
    let mut edits = vec![ALL_SLICES];
    edits.extend(other.as_deref().map(|o| (shipped.as_str(), o)));
    let (errors, _, stack) = spine_through_the_agent(&shared, name, &edits);
    let which = adapter.map_or("shipped adapter".into(), |p| p.display().to_string());
    eprintln!("{name} stack through the agent ({which}): {errors:?}");
    assert_all_found_and_most_within_10px(&errors);
    Some((errors, stack))
}

/// A SEG segment's IoU over the stack (`label` of `stack`), against the body it overlaps
/// best in the centre slice.
fn over_the_stack(stack: &StackMasks, label: &str) -> f64 {
    let (case, masks) = (&stack.case, &stack.masks[label]);
    let center = case.center;
    let centre_mask = masks[center]
        .as_ref()
        .expect("every body in the centre slice");
    let body = (1..=5u8)
        .max_by_key(|v| {
            let truth = case.slices[center]
                .labels
                .as_ref()
                .unwrap()
                .mapv(|x| x == *v);
            (iou(centre_mask, &truth) * 1e6) as i64
        })
        .unwrap();
    let (mut both, mut either) = (0usize, 0usize);
    for (s, m) in case.slices.iter().zip(masks) {
        let truth = s.labels.as_ref().unwrap().mapv(|x| x == body);
        let m = m
            .clone()
            .unwrap_or_else(|| ndarray::Array2::from_elem(truth.dim(), false));
        both += ndarray::Zip::from(&m)
            .and(&truth)
            .fold(0, |n, a, b| n + usize::from(*a && *b));
        either += ndarray::Zip::from(&m)
            .and(&truth)
            .fold(0, |n, a, b| n + usize::from(*a || *b));
    }
    both as f64 / either.max(1) as f64
}

/// Vertebrae within 10 px of the centroid in the centre slice.
fn hits(errors: &[Option<[f64; 2]>]) -> usize {
    errors
        .iter()
        .filter(|e| e.is_some_and(|[e, _]| e <= 10.0))
        .count()
}

/// Every vertebra reported, at least 4 of the 5 within 10 px in the centre slice.
fn assert_all_found_and_most_within_10px(errors: &[Option<[f64; 2]>]) {
    assert!(
        errors.iter().all(Option::is_some),
        "a vertebra is absent: {errors:?}"
    );
    assert!(
        hits(errors) >= 4,
        "fewer than 4 of 5 vertebrae within 10 px: {errors:?}"
    );
}

/// The regions of `adapter`'s structures on `fm` as `scout eval` draws them: scores
/// refined to the edges of `guide` (the slice normalised), then the structure steps (atlas,
/// the heart placed through the lungs, fragments, convex hulls and their ellipses); the
/// refined scores too.
fn edged_regions(
    adapter: &scout::adapter::Adapter,
    fm: &scout::backbone::FeatureMap,
    guide: &ndarray::Array2<f32>,
) -> (
    ndarray::Array3<f32>,
    Vec<Option<scout::postprocess::Finding>>,
) {
    let mut edged = scout::postprocess::upsample_scores(
        &adapter.scores(fm).unwrap(),
        fm.image_rows,
        fm.image_columns,
    );
    scout::postprocess::refine_to_edges(&mut edged, guide, fm.grid().0);
    let refined = scout::postprocess::structures(
        &mut edged,
        adapter.shape.as_ref(),
        adapter.atlas.as_ref(),
        adapter.enclosed.as_ref(),
        adapter.train.fragments,
        adapter.outlines(),
        None,
    );
    (edged, refined)
}

/// `scout eval --backbone litemedsam-hyper-eq`'s landmark steps with the shipped chest
/// landmark adapter on one image, each stage's findings.
struct ChestLandmarkSteps {
    /// The regions the layout chooses without the costophrenic angles' prior.
    unranked: Vec<Option<scout::postprocess::Finding>>,
    /// The regions it chooses with that prior, read on SAM's lungs.
    ranked: Vec<Option<scout::postprocess::Finding>>,
    /// `ranked` after the layout fill.
    filled: Vec<Option<scout::postprocess::Finding>>,
    /// `filled` after the region votes.
    voted: Vec<Option<scout::postprocess::Finding>>,
    /// `voted` after the lungs' extremes: the apices halfway to the top of SAM's lung, an
    /// angle the adapter leaves out on the lung's corner.
    placed: Vec<Option<scout::postprocess::Finding>>,
}

/// The shipped chest landmark adapter's bundle, and its `ChestLandmarkSteps` on each chest
/// radiograph of `images` (positives, as the adapter learned).
fn chest_landmark_steps(
    images: &[&ndarray::Array2<f32>],
    names: &[String],
) -> (scout::train::Bundle, Vec<ChestLandmarkSteps>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = scout::backbone::Manifest::load(&root.join("models/models.toml")).unwrap();
    let (backbone, cache) = shipped_backbone("litemedsam-hyper-eq");
    let bundle = scout::train::Bundle::load(
        &root.join("models/adapters/chest-landmarks.adapter"),
        &backbone,
    )
    .unwrap();
    let (landmarks, adapter) = (&bundle.tasks[0].1, &bundle.tasks[1].1);
    assert_eq!(landmarks.labels, names);
    assert_eq!(
        adapter.sam_redraw,
        [true, true, false],
        "trained as the chest adapter"
    );
    assert!(
        !landmarks.votes.is_empty(),
        "the shipped chest landmark adapter votes"
    );
    let on_extremes: Vec<Option<(u8, [i8; 2], bool)>> = landmarks
        .extremes
        .iter()
        .map(|e| e.map(|e| (e.structure, e.direction, e.fallback)))
        .collect();
    assert_eq!(
        on_extremes,
        [
            Some((1, [-1, 0], false)),
            Some((1, [1, -1], true)),
            Some((2, [-1, 0], false)),
            Some((2, [1, 1], true))
        ],
        "the shipped chest landmark adapter places the apices on the lungs' tops, the costophrenic angles on their corners as a fallback"
    );
    let sam = scout::sam::Sam::for_backbone(&manifest, backbone.id()).unwrap();
    let steps = images
        .iter()
        .map(|pixels| {
            let (fm, _) = cache.features(&backbone, pixels).unwrap();
            // The lungs the landmark adapter's own structures draw there (not reported).
            let guide = scout::image::normalize(pixels).unwrap();
            let (edged, mut regions) = edged_regions(adapter, &fm, &guide);
            sam.redraw_structures(&fm, &mut regions, |l| adapter.redraws(l), &edged)
                .unwrap();
            let lungs: Vec<(u8, &ndarray::Array2<bool>)> = (0..2)
                .map(|l| (l as u8 + 1, &regions[l].as_ref().unwrap().mask))
                .collect();
            let scores = landmarks.scores(&fm).unwrap();
            let up = scout::postprocess::upsample_scores(&scores, fm.image_rows, fm.image_columns);
            let prior = scout::extremes::prior(&landmarks.extremes, &lungs, 10.0, None);
            assert!(prior.is_some(), "the angles' rules rank the regions");
            let shape = landmarks.shape.as_ref();
            let unranked = scout::postprocess::shaped_findings(&up, shape, None);
            let ranked = scout::postprocess::shaped_findings(&up, shape, prior.as_ref());
            let mut filled = ranked.clone();
            scout::postprocess::fill_from_layout(
                &mut filled,
                shape.unwrap(),
                10.0,
                (fm.image_rows, fm.image_columns),
            );
            let mut voted = filled.clone();
            let rows = landmarks.standardized_rows(&fm).unwrap();
            scout::votes::refine_findings(
                &mut voted,
                &landmarks.votes,
                rows.view(),
                &fm,
                scores.view(),
            );
            let mut placed = voted.clone();
            scout::extremes::refine_findings(&mut placed, &landmarks.extremes, &lungs, shape);
            ChestLandmarkSteps {
                unranked,
                ranked,
                filled,
                voted,
                placed,
            }
        })
        .collect();
    (bundle, steps)
}

/// The shipped chest rules through the agent: a chest radiograph that is not one of the
/// adapters' templates, sent as a one-image coronal localizer, comes back as an SR with all
/// four lung landmarks on their pixels (SR point = sidecar pixel, checked by `check_sr`)
/// and a valid SEG of the lungs and heart. The SEG is the structures of the chest adapter
/// on the multi-layer features (rule `chest`), the SR the landmarks of the chest
/// landmark adapter on those of the equalised slice (rule `chest-landmarks`); each rule
/// reports only its own task. The data set's PNGs are negatives (air bright) and the
/// adapters learned from their positives (`scout train --negatives`): the image goes out
/// with its stored values as MONOCHROME1, which the agent must read inverted to find the
/// lungs.
#[test]
fn real_chest_landmarks_through_the_multi_layer_backbone() {
    let t = "real_chest_landmarks_through_the_multi_layer_backbone";
    let Some(shared) = shared_data(t) else { return };
    if !dcmtk(t) || !dicom3tools(t) {
        return;
    }
    let stored = scout::dataset::Dataset::open(&shared.join("chest-xr")).unwrap();
    // The data set's reader gives the 8-bit PNG as 0..1: back to its grey values.
    let grey_of = |name: &str| {
        stored.load_case(name).unwrap().slices[0]
            .pixels
            .mapv(|v| (v * 255.0).round().clamp(0.0, 255.0) as u16)
    };
    let grey = grey_of("JPCLN020");
    let ds = stored.clone().inverted(true);
    let case = ds.load_case("JPCLN020").unwrap();
    // The landmarks' rule given codes for the structures too: its structures run in the
    // localizer slice (SAM's lungs place the apices) and are still not reported.
    let lcpa = "left_costophrenic_angle = { scheme = \"99SCOUT\", value = \"LCPA\", meaning = \"Left costophrenic angle\" }";
    let code = |v: &str| format!("{{ scheme = \"99SCOUT\", value = \"{v}\", meaning = \"{v}\" }}");
    let coded = format!(
        "{lcpa}\n[rules.structures]\n{}",
        ["1", "2", "3"]
            .map(|v| format!(
                "{v} = {{ label = \"S{v}\", category = {}, type = {} }}\n",
                code("T"),
                code(v)
            ))
            .concat()
    );
    let (run, series, points, agent) = real_images_through_the_agent(
        vec![grey],
        true,
        scout::geometry::Plane::Coronal,
        "CHEST LOCALIZER",
        "chest-landmarks",
        &[(lcpa, &coded)],
    );
    // The structures' rule writes no sidecar: it holds landmarks, which that rule leaves out.
    assert!(!sidecar(&run.data, &series, "chest").exists());
    expect_logged(
        &agent,
        &[
            (
                "rule chest-landmarks: series",
                ": 4/4 landmarks, 0 structure masks",
            ),
            ("rule chest: series", ": 0/0 landmarks, 3 structure masks"),
        ],
    );
    // The landmarks' rule comes first and its SR leaves as soon as it is done, while the
    // structures' rule still runs (its encoder alone takes over a second).
    let srs = received_in(&run.out, "SR");
    assert_eq!(srs.len(), 1, "{srs:?}");
    let sr_uid = open_file(&srs[0])
        .unwrap()
        .element(tags::SOP_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string();
    let lines = agent.log_lines();
    let at = |what: &str| lines.iter().position(|l| l.contains(what));
    let sent = at(&format!("send: dest accepted {sr_uid}")).expect("the SR's delivery logged");
    let structures = at("rule chest: series").expect("the structures' rule logged");
    assert!(
        sent < structures,
        "the SR waited for the structures' rule: {lines:?}"
    );
    let geometry = scout::spool::read_meta(&series.files[0]).unwrap().geometry;
    let errors: Vec<Option<f64>> = ds
        .landmark_names
        .iter()
        .map(|name| {
            let truth = &case.landmarks[name];
            points[name].map(|p| {
                let (r, c) = geometry.patient_to_pixel(p).unwrap();
                (r - truth.row).hypot(c - truth.column)
            })
        })
        .collect();
    eprintln!("{:?}: {errors:?} px", ds.landmark_names);
    assert!(
        errors.iter().all(Option::is_some),
        "a landmark is absent: {errors:?}"
    );
    assert!(
        errors.iter().flatten().filter(|e| **e <= 10.0).count() >= 3,
        "fewer than 3 of 4 within 10 px: {errors:?}"
    );

    // Structures: the SEG's masks against the truth, and against the same adapter run
    // in-process the way `scout eval` runs it, with and without its edge refinement.
    let masks = seg_masks(&the_seg(&run.out));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (backbone, cache) = shipped_backbone("litemedsam-hyper");
    let bundle =
        scout::train::Bundle::load(&root.join("models/adapters/chest.adapter"), &backbone).unwrap();
    // `scout train` writes the landmark task first, then the structures.
    let adapter = &bundle.tasks[1].1;
    assert!(
        adapter.train.guided,
        "the shipped chest adapter refines its edges"
    );
    let slice = &case.slices[0];
    let (fm, _) = cache.features(&backbone, &slice.pixels).unwrap();
    let plain = scout::postprocess::upsample_scores(
        &adapter.scores(&fm).unwrap(),
        fm.image_rows,
        fm.image_columns,
    );
    // `scout eval`'s steps: edges, then the atlas, the heart placed through the lungs,
    // the fragments, the heart drawn convex and rounded by its ellipse, and the lungs
    // redrawn by SAM.
    assert!(
        adapter.atlas.is_some(),
        "the shipped chest adapter has an atlas"
    );
    let enclosed: Vec<bool> = adapter
        .enclosed
        .as_ref()
        .map(|e| e.frames.iter().map(Option::is_some).collect())
        .unwrap_or_default();
    assert_eq!(
        enclosed,
        [false, false, true],
        "the shipped chest adapter places the heart through the lungs"
    );
    // ...at the templates' hearts scaled from 0.8 to 1.2: some shares under the fifth
    // that one of the 5 templates gives alone.
    assert!(adapter.train.enclosed_sizes);
    let share = &adapter.enclosed.as_ref().unwrap().frames[2]
        .as_ref()
        .unwrap()
        .share;
    assert!(
        share.iter().any(|v| *v > 0.0 && *v < 0.2),
        "the shipped chest adapter's heart frame tapers off past the templates' hearts"
    );
    assert_eq!(
        adapter.convex,
        [false, false, true],
        "the shipped chest adapter draws the heart, and only the heart, convex"
    );
    assert_eq!(
        adapter.sam_redraw,
        [true, true, false],
        "the shipped chest adapter has SAM redraw the lungs, not the heart"
    );
    assert_eq!(
        adapter
            .ellipse
            .iter()
            .map(Option::is_some)
            .collect::<Vec<_>>(),
        [false, false, true],
        "the shipped chest adapter rounds the heart, and only the heart, by its ellipse"
    );
    // A build from before the heart's gaps were closed refuses the file rather than leave
    // them open.
    assert!(adapter.train.enclosed_gaps);
    assert_eq!(bundle.format, 13);
    let guide = scout::image::normalize(&slice.pixels).unwrap();
    let (edged, mut refined) = edged_regions(adapter, &fm, &guide);
    let manifest = scout::backbone::Manifest::load(&root.join("models/models.toml")).unwrap();
    let sam = scout::sam::Sam::for_backbone(&manifest, backbone.id()).unwrap();
    let truth = slice.labels.as_ref().unwrap();
    let mut redrawn = 0;
    for (l, f) in refined.iter().enumerate() {
        let f = f.as_ref().unwrap();
        if adapter.redraws(l) {
            let mask = sam
                .redraw(&fm, &f.mask)
                .unwrap()
                .expect("SAM's lung accepted");
            let agreement = iou(&mask, &f.mask);
            let label = truth.mapv(|v| v as usize == l + 1);
            eprintln!(
                "structure {l}: SAM's mask against the adapter's region, IoU {agreement:.4}; against the truth, the region {:.3}, SAM's mask {:.3}",
                iou(&f.mask, &label),
                iou(&mask, &label)
            );
            redrawn += usize::from(agreement < 0.98);
        }
    }
    assert_eq!(
        redrawn, 2,
        "SAM left a lung as the adapter drew it: no teeth"
    );
    // The lungs redrawn, and the heart's region gives way to them where they meet.
    let heart = refined[2].as_ref().unwrap().mask.clone();
    let accepted = sam
        .redraw_structures(&fm, &mut refined, |l| adapter.redraws(l), &edged)
        .unwrap();
    assert_eq!(accepted, [(0, true), (1, true)]);
    let after = &refined[2].as_ref().unwrap().mask;
    let label = truth.mapv(|v| v == 3);
    eprintln!(
        "Heart: the region after the lungs were redrawn against before, IoU {:.4}; against the truth {:.3} -> {:.3}",
        iou(after, &heart),
        iou(&heart, &label),
        iou(after, &label)
    );
    // Then the heart reaches the lungs across gaps of at most two of the grid's cells and
    // is drawn by its outline rule again.
    let open = after.clone();
    let cell = scout::patch::cell_px((fm.image_rows, fm.image_columns), fm.grid());
    assert!(
        adapter.close_gaps(&mut refined, cell, &edged),
        "the heart has no gap to the lungs to close: no teeth"
    );
    let closed = &refined[2].as_ref().unwrap().mask;
    eprintln!(
        "Heart: its gaps to the lungs closed and drawn convex again, {} pixels more; against the truth {:.3} -> {:.3}",
        closed.iter().filter(|m| **m).count() as i64 - open.iter().filter(|m| **m).count() as i64,
        iou(&open, &label),
        iou(closed, &label)
    );
    let plain = scout::postprocess::structure_findings(&plain, adapter.shape.as_ref(), None);
    for (l, name) in ["Right lung", "Left lung", "Heart"].iter().enumerate() {
        let got = &masks[*name];
        let to_truth = iou(got, &truth.mapv(|v| v as usize == l + 1));
        let to_refined = iou(got, &refined[l].as_ref().unwrap().mask);
        let to_plain = iou(got, &plain[l].as_ref().unwrap().mask);
        eprintln!(
            "{name}: IoU with the truth {to_truth:.3}, with eval's refined mask {to_refined:.4}, unrefined {to_plain:.4}"
        );
        assert!(
            to_truth >= if l < 2 { 0.85 } else { 0.6 },
            "{name}: {to_truth}"
        );
        assert!(to_refined >= 0.99 && to_refined > to_plain, "{name}");
        if l == 2 {
            assert!(
                to_refined > iou(got, &open),
                "the agent left the heart's gaps open"
            );
        }
    }

    // Landmarks: the agent's points are where `scout eval --backbone
    // litemedsam-hyper-eq`'s steps put them (`chest_landmark_steps`); JPCLN089's steps for
    // the calibrated run below.
    let ranked_case = ds.load_case("JPCLN089").unwrap();
    let (eq_bundle, steps) = chest_landmark_steps(
        &[&slice.pixels, &ranked_case.slices[0].pixels],
        &ds.landmark_names,
    );
    let landmarks = &eq_bundle.tasks[0].1;
    let (placed, voted, filled) = (&steps[0].placed, &steps[0].voted, &steps[0].filled);
    let mut moved = 0.0f64;
    let mut to_extreme = 0.0f64;
    for (l, name) in ds.landmark_names.iter().enumerate() {
        let (r, c) = geometry.patient_to_pixel(points[name].unwrap()).unwrap();
        let (e, v, p) = (
            placed[l].as_ref().unwrap().point,
            voted[l].as_ref().unwrap().point,
            filled[l].as_ref().unwrap().point,
        );
        let truth = &case.landmarks[name];
        eprintln!(
            "{name}: the votes' point {:.1} px from the truth, the agent's {:.1} ({:.3} px from eval's, which moved {:.2} px on the extreme)",
            (v.0 - truth.row).hypot(v.1 - truth.column),
            (r - truth.row).hypot(c - truth.column),
            (r - e.0).hypot(c - e.1),
            (e.0 - v.0).hypot(e.1 - v.1)
        );
        assert!(
            (r - e.0).hypot(c - e.1) < 0.05,
            "{name}: agent ({r}, {c}), eval {e:?}"
        );
        moved = moved.max((p.0 - v.0).hypot(p.1 - v.1));
        to_extreme = to_extreme.max((e.0 - v.0).hypot(e.1 - v.1));
    }
    assert!(
        moved > 1.0,
        "the votes moved no landmark: the check has no teeth"
    );
    assert!(
        to_extreme > 0.25,
        "the lungs' tops moved no apex past the check's tolerance: it has no teeth"
    );

    // An adapter trained with `--calibrate` (the shipped ones are not): the same bundle with
    // offsets, which the agent takes off after the extremes, turned into the layout's pose.
    // Sent JPCLN089, the one image of the 95 left out of the shipped adapter's templates
    // whose regions the angles' prior ranks otherwise (its right angle's region, 29 px
    // away; JPCLN020's are the same either way): an agent that chose regions without the
    // prior would miss eval's steps here.
    assert!(landmarks.calibration.is_empty());
    let jpcln089 = &steps[1];
    let reranked = jpcln089
        .ranked
        .iter()
        .zip(&jpcln089.unranked)
        .filter(|(a, b)| match (a, b) {
            (Some(a), Some(b)) => (a.point.0 - b.point.0).hypot(a.point.1 - b.point.1) > 1.0,
            (a, b) => a.is_some() != b.is_some(),
        })
        .count();
    assert!(
        reranked > 0,
        "the angles' prior chose no other region: the check has no teeth"
    );
    let placed = &jpcln089.placed;
    let mut calibrated = eq_bundle.clone();
    let offsets = vec![Some([0.0, -3.0]), None, Some([2.0, 1.5]), None];
    calibrated.tasks[0].1.calibration = offsets.clone();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chest-calibrated.adapter");
    calibrated.save(&file).unwrap();
    let shipped_line = format!(
        "adapter = \"{}/models/adapters/chest-landmarks.adapter\"",
        root.display()
    );
    let calibrated_line = format!("adapter = {:?}", file.display().to_string());
    let (_run, series, offset_points, _agent) = real_images_through_the_agent(
        vec![grey_of("JPCLN089")],
        true,
        scout::geometry::Plane::Coronal,
        "CHEST LOCALIZER",
        "chest-landmarks",
        &[(&shipped_line, &calibrated_line)],
    );
    let geometry = scout::spool::read_meta(&series.files[0]).unwrap().geometry;
    let mut calibrated_steps = placed.clone();
    scout::calibration::refine_findings(&mut calibrated_steps, &offsets, landmarks.shape.as_ref());
    for (l, name) in ds.landmark_names.iter().enumerate() {
        let (r, c) = geometry
            .patient_to_pixel(offset_points[name].unwrap())
            .unwrap();
        let (e, before) = (
            calibrated_steps[l].as_ref().unwrap().point,
            placed[l].as_ref().unwrap().point,
        );
        eprintln!(
            "{name}: calibrated, the agent's point {:.3} px from eval's steps, {:.2} px from the uncalibrated",
            (r - e.0).hypot(c - e.1),
            (r - before.0).hypot(c - before.1)
        );
        assert!(
            (r - e.0).hypot(c - e.1) < 0.05,
            "{name}: agent ({r}, {c}), eval {e:?}"
        );
        let shift = offsets[l].map_or(0.0, |[a, b]: [f64; 2]| a.hypot(b));
        assert!(
            ((r - before.0).hypot(c - before.1) - shift).abs() < 0.05,
            "{name}: moved by its offset"
        );
    }
}

#[test]
fn real_spine_localizer_landmarks_land_on_the_vertebrae() {
    let t = "real_spine_localizer_landmarks_land_on_the_vertebrae";
    let Some(shared) = shared_data(t) else { return };
    if !dcmtk(t) || !dicom3tools(t) {
        return;
    }
    let (errors, ious, _) = spine_through_the_agent(&shared, "s06", &[]);
    eprintln!("s06 through the agent (shipped adapter): {errors:?}, bodies' IoU {ious:?}");
    // Measured: all five within 3.9 px (earlier shipped adapters left L3 absent here).
    assert_all_found_and_most_within_10px(&errors);
    // The bodies are scored only around the landmarks found (`window`), which must hold
    // them whole: measured IoU 0.86–0.92.
    let bundle = shipped_spine_bundle();
    assert!(
        bundle.tasks.iter().any(|(_, a)| a.window.is_some()),
        "the shipped spine adapter scores its structures within the landmarks' window"
    );
    assert_eq!(ious.len(), 5, "a body segment per vertebra: {ious:?}");
    assert!(
        ious.iter().all(|&i| i >= 0.8),
        "a body's mask is cut or misplaced: {ious:?}"
    );
}

/// An adapter whose structures are named by the landmarks (`identity`) is followed by
/// the agent: the shipped spine adapter with bodies 1 and 2 linked to the other's
/// landmark hands each the other's region in the SEG, on the same real series.
#[test]
fn the_agent_names_structures_by_their_landmarks() {
    let t = "the_agent_names_structures_by_their_landmarks";
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = root.join("models/adapters/spine.adapter");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&shipped).unwrap()).unwrap();
    // The names need format 9, the shipped file's window 10 (its reach per landmark).
    let format = json["format"].as_u64().expect("a format").max(9);
    json["format"] = serde_json::json!(format);
    let structures = json["tasks"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|t| t[0].get("structures").is_some())
        .expect("a structure adapter");
    structures[1]["identity"] = serde_json::json!({"landmarks": ["L2", "L1", "L3", "L4", "L5"]});
    let dir = tempfile::tempdir().unwrap();
    let swapped = dir.path().join("swapped.adapter");
    std::fs::write(&swapped, json.to_string()).unwrap();
    let Some((_, named)) = spine_stack_through_the_agent(t, "s06", Some(&swapped)) else {
        return;
    };
    let Some((_, plain)) = spine_stack_through_the_agent(t, "s06", None) else {
        return;
    };
    // In the centre slice: bodies 1 and 2 swapped, the others as shipped.
    let center = plain.case.center;
    let at = |stack: &StackMasks, label: &str| {
        stack.masks[label][center]
            .clone()
            .expect("every body in the centre slice")
    };
    assert!(at(&plain, "L1") != at(&plain, "L2"));
    assert!(at(&named, "L1") == at(&plain, "L2"), "L1 has L2's region");
    assert!(at(&named, "L2") == at(&plain, "L1"), "L2 has L1's region");
    for label in ["L3", "L4", "L5"] {
        assert!(at(&named, label) == at(&plain, label), "{label} as shipped");
    }
}

/// The agent's stack path (`slices = "all"`: every slice analysed, each landmark voted
/// over the stack, anchored to the centre slice's point) on the same real series.
#[test]
fn real_spine_stack_landmarks_land_on_the_vertebrae() {
    let t = "real_spine_stack_landmarks_land_on_the_vertebrae";
    let Some((errors, stack)) = spine_stack_through_the_agent(t, "s06", None) else {
        return;
    };
    // Across the slices too: the vote lands within 10 voxels of each body's 3D centroid
    // (a stack slice is 5 voxels from the next).
    assert!(
        errors.iter().flatten().all(|[_, k]| *k <= 10.0),
        "a vertebra is off across the slices: {errors:?}"
    );
    // The bodies over the stack. The shipped adapter fills and bounds each slice's bodies
    // by the slice next in (`--stack-fill`, `--stack-bound`), outwards from the centre:
    // wherever a slice has a body, it lies within that body in the slice next in grown by
    // the learned margin, and it holds what lies deeper than the learned depth inside it,
    // but for other bodies' pixels. Taken in another order, or neither bounded nor filled,
    // the outer sections are the adapter's own, which do not nest so. At the outermost
    // slices (`--stack-blend`) a body is the contour halfway between that and the body in
    // the slice next in, scaled as learned: it lies within the two, and holds what both
    // hold.
    let bundle = shipped_spine_bundle();
    let (values, adapter) = bundle
        .tasks
        .iter()
        .find_map(|(t, a)| match t {
            scout::templates::Task::Structures { values } => Some((values, a)),
            _ => None,
        })
        .expect("the shipped spine adapter has structures");
    assert!(
        !adapter.stack_depth.is_empty()
            && !adapter.stack_bound.is_empty()
            && adapter.stack_blend.iter().flatten().any(Option::is_some)
            && adapter.train.stack_anchor,
        "the shipped spine adapter fills, bounds and blends its stacks"
    );
    // Every template's body continues to every slice of its stack: a body a slice misses
    // is carried over from the slice next in (s06 misses none).
    assert!(
        adapter.stack_carry.len() == values.len()
            && adapter
                .stack_carry
                .iter()
                .all(|steps| !steps.is_empty() && steps.iter().all(|s| *s == Some(1.0))),
        "the shipped spine adapter carries missed sections: {:?}",
        adapter.stack_carry
    );
    let case = &stack.case;
    let center = case.center;
    assert_eq!(
        stack.masks.len(),
        5,
        "a segment per body: {:?}",
        stack.masks.keys()
    );
    let (mut checked, mut bounded, mut blended) = (0, 0, 0);
    let mut ious = Vec::new();
    for (label, masks) in &stack.masks {
        let value: u8 = label.trim_start_matches('L').parse().unwrap();
        let l = values.iter().position(|v| *v == value).unwrap();
        for i in (0..masks.len()).filter(|&i| i != center) {
            let inner_i = if i > center { i - 1 } else { i + 1 };
            let step = i.abs_diff(center);
            let (Some(outer), Some(inner)) = (&masks[i], &masks[inner_i]) else {
                continue;
            };
            let area = inner.iter().filter(|m| **m).count() as f64;
            let radius = (area / std::f64::consts::PI).sqrt();
            let others: Vec<&ndarray::Array2<bool>> = stack
                .masks
                .iter()
                .filter(|(o, _)| *o != label)
                .filter_map(|(_, m)| m[i].as_ref())
                .collect();
            let learned = |per_step: &[Vec<Option<f64>>]| per_step[l].get(step - 1).copied();
            if let Some(Some(scale)) = adapter.stack_blend[l].get(step - 1) {
                let Some(Some(margin)) = learned(&adapter.stack_bound) else {
                    panic!("{label}: blended at step {step}, not bounded");
                };
                // Not filled where no depth was learned (L5's outermost step).
                let depth = learned(&adapter.stack_depth).flatten();
                let narrowed = scout::stack::scaled(inner, *scale);
                let near = scout::stack::distance_outside(inner);
                let inside = scout::stack::distance_outside(&inner.mapv(|m| !m));
                let (mut past, mut missing) = (0usize, 0usize);
                ndarray::Zip::indexed(outer)
                    .and(&narrowed)
                    .and(&near)
                    .and(&inside)
                    .for_each(|p, &m, &n, &d_out, &d_in| {
                        let allowed = n || f64::from(d_out) <= margin * radius;
                        let held = n
                            && depth.is_some_and(|depth| f64::from(d_in) > depth * radius)
                            && !others.iter().any(|o| o[p]);
                        past += usize::from(m && !allowed);
                        missing += usize::from(held && !m);
                    });
                assert_eq!(
                    (past, missing),
                    (0, 0),
                    "{label}, slice {i}: pixels past the bound and the scaled section, pixels both hold missing"
                );
                blended += 1;
                continue;
            }
            if let Some(Some(margin)) = learned(&adapter.stack_bound) {
                let near = scout::stack::distance_outside(inner);
                let past = ndarray::Zip::from(&near)
                    .and(outer)
                    .fold(0usize, |n, &d, &m| {
                        n + usize::from(m && f64::from(d) > margin * radius)
                    });
                assert_eq!(
                    past, 0,
                    "{label}, slice {i}: {past} pixels past slice {inner_i}'s section grown by {margin}"
                );
                bounded += 1;
            }
            let Some(Some(depth)) = learned(&adapter.stack_depth) else {
                continue;
            };
            let keep = depth * radius;
            let inside = scout::stack::distance_outside(&inner.mapv(|m| !m));
            let missing = ndarray::Zip::indexed(&inside)
                .and(outer)
                .fold(0usize, |n, p, &d, &m| {
                    let deep = f64::from(d) > keep && !others.iter().any(|o| o[p]);
                    n + usize::from(deep && !m)
                });
            assert_eq!(
                missing, 0,
                "{label}, slice {i}: the fill from slice {inner_i} is not held"
            );
            checked += 1;
        }
        ious.push(over_the_stack(&stack, label));
    }
    eprintln!("s06 stack: {bounded} outer sections bounded, {checked} filled and {blended} blended as learned; bodies' IoU over the stack {ious:?}");
    // Measured: 30 sections filled and 30 bounded checked, 10 blended (the outermost
    // slices, five bodies on both sides; L5 is not filled there, no depth holding it).
    // Taken centre first, then in slice order, the slices before the centre are not
    // filled and it fails; without the bound 21 of the 40 outer sections reach past it.
    // IoU 0.84–0.88, `scout eval`'s own figures for s06 in the first split to 1e-15.
    assert!(
        checked >= 25 && bounded >= 25 && blended >= 8,
        "too few outer sections to check: {checked} filled, {bounded} bounded, {blended} blended"
    );
    assert!(
        ious.iter().all(|&i| i >= 0.75),
        "a body is cut or misplaced over the stack: {ious:?}"
    );
    // The agent weighs every slice by the patient's appearance (`--appearance`): the same
    // stack through the shipped adapter with that flag off comes out otherwise, and worse
    // here. Measured: mean IoU over the bodies 0.871 with it, 0.856 without, `scout
    // eval`'s first-split figures for s06 both ways; without the agent's weighing the
    // two runs are the same and this fails.
    let dir = tempfile::tempdir().unwrap();
    let without = spine_adapter_without_appearance(dir.path());
    let (_, plain) = spine_stack_through_the_agent(t, "s06", Some(&without))
        .expect("the shared data and DICOM tools were there a moment ago");
    let plain: Vec<f64> = stack
        .masks
        .keys()
        .map(|label| over_the_stack(&plain, label))
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    eprintln!("s06 stack without the appearance: bodies' IoU over the stack {plain:?}");
    assert!(
        mean(&ious) > mean(&plain) + 0.005,
        "the appearance changes nothing, or not for the better: {ious:?} against {plain:?}"
    );
}

/// A copy, in `dir`, of the shipped spine adapter with its appearance step
/// (`--appearance`) turned off: the same weights and every other step.
fn spine_adapter_without_appearance(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(root.join("models/adapters/spine.adapter")).unwrap();
    assert!(
        shipped.contains("\"appearance\":true"),
        "the shipped spine adapter weighs its structures by the patient's appearance"
    );
    let without = dir.join("spine-without-appearance.adapter");
    std::fs::write(
        &without,
        shipped.replace("\"appearance\":true", "\"appearance\":false"),
    )
    .unwrap();
    without
}

/// The agent's stack path on s08, whose L1 the shipped adapter without its appearance
/// step finds in every slice but the first (k* − 20): that slice takes L1's section in
/// the slice next in (`--stack-carry`), blended as the outermost slices are. (With the
/// appearance, `--appearance`, the shipped adapter finds L1 there itself: IoU 0.53 in
/// that slice, 0.830 over the stack, `scout eval`'s first-split figure for s08.)
#[test]
fn real_spine_stack_carries_a_missed_body_section() {
    let t = "real_spine_stack_carries_a_missed_body_section";
    let dir = tempfile::tempdir().unwrap();
    let without = spine_adapter_without_appearance(dir.path());
    let Some((_, stack)) = spine_stack_through_the_agent(t, "s08", Some(&without)) else {
        return;
    };
    let l1 = &stack.masks["L1"];
    let (Some(first), Some(next)) = (&l1[0], &l1[1]) else {
        panic!("L1 missing in the first two slices");
    };
    let truth = stack.case.slices[0]
        .labels
        .as_ref()
        .unwrap()
        .mapv(|x| x == 1);
    let (first_iou, stack_iou) = (iou(first, &truth), over_the_stack(&stack, "L1"));
    eprintln!("s08 L1: IoU {first_iou} in the first slice, {stack_iou} over the stack");
    // Carried, then blended: within the section next in and that section scaled.
    let bundle = shipped_spine_bundle();
    let scale = bundle
        .tasks
        .iter()
        .find_map(|(_, a)| a.stack_blend.first()?.last().copied().flatten())
        .expect("L1 blended at its outermost step");
    let narrowed = scout::stack::scaled(next, scale);
    let past = ndarray::Zip::from(first)
        .and(next)
        .and(&narrowed)
        .fold(0usize, |n, &m, &a, &b| n + usize::from(m && !a && !b));
    assert_eq!(
        past, 0,
        "L1 in the first slice reaches past the slice next in"
    );
    // Measured: IoU over the stack 0.840, `scout eval`'s for s08 in the first split
    // (0.786 without the carry, where the first slice has no L1).
    assert!(
        stack_iou >= 0.82 && first_iou >= 0.5,
        "L1 not carried into the first slice: {first_iou}, {stack_iou}"
    );
}

/// Issue #7, idea 5, in the agent: the centre slice's bodies are scored only in each
/// landmark's own box (`LandmarkWindow::cells`, 34–39 % of the cells on spine-mr, against
/// the landmarks' window's 40–53 %), and after the centre slice, a stack's slices only
/// within the cells where the centre slice's bodies may stay (`stack::Anchor::window`,
/// 15–21 %), as `scout eval` scores them: the agent must give `scout eval`'s first-split
/// figures for s15, which the shipped adapter without its reach per landmark does not.
#[test]
fn real_spine_stack_is_scored_within_the_centre_bodies_reach() {
    let t = "real_spine_stack_is_scored_within_the_centre_bodies_reach";
    let Some((_, stack)) = spine_stack_through_the_agent(t, "s15", None) else {
        return;
    };
    let bodies = ["L1", "L2", "L3", "L4", "L5"];
    let over = |stack: &StackMasks| -> Vec<f64> {
        bodies.iter().map(|l| over_the_stack(stack, l)).collect()
    };
    let ious = over(&stack);
    eprintln!("s15 stack: bodies' IoU over the stack {ious:?}");
    // The shipped adapter as it was before (format 8): the landmarks' window alone.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("models/adapters/spine.adapter")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["tasks"][1][1]["window"]
        .as_object_mut()
        .expect("the structures' window")
        .remove("reach")
        .expect("a reach per landmark");
    json["format"] = serde_json::json!(8);
    let dir = tempfile::tempdir().unwrap();
    let boxed_file = dir.path().join("spine-box.adapter");
    std::fs::write(&boxed_file, json.to_string()).unwrap();
    let (_, boxed) = spine_stack_through_the_agent(t, "s15", Some(&boxed_file)).unwrap();
    let boxed = over(&boxed);
    eprintln!("s15 stack, the landmarks' window alone: {boxed:?}");
    // Measured: 0.783 / 0.882 / 0.876 / 0.882 / 0.834, `scout eval`'s first-split figures
    // for s15 to 1e-15; in the landmarks' window alone 0.792 / 0.881 / 0.884 / 0.878 /
    // 0.833 (eval's with the box, to 1e-15); and with the agent's narrowing after the
    // centre slice taken out (a temporary edit) 0.788 / 0.882 / 0.876 / 0.882 / 0.831.
    assert!(
        ious.iter().all(|&i| i >= 0.75) && ious[4] > 0.8325,
        "s15's stack is not scored within the centre bodies' reach: {ious:?}"
    );
    assert!(
        ious.iter().zip(&boxed).any(|(a, b)| (a - b).abs() > 1e-6) && ious[3] > boxed[3],
        "each landmark's own box is not used: {ious:?} against {boxed:?}"
    );
}

/// Issue #7, idea 3, in the agent: an adapter trained with `align` (templates s01–s05,
/// like the shipped one, which cannot carry them: the shared data may not be copied into
/// the repository) aligns its templates to the series' centre slice, so every vertebra is
/// reported, including those the adapter found no region for.
#[test]
fn aligned_spine_adapter_reports_every_vertebra_through_the_agent() {
    let t = "aligned_spine_adapter_reports_every_vertebra_through_the_agent";
    let Some(shared) = shared_data(t) else { return };
    if !dcmtk(t) || !dicom3tools(t) {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (backbone, cache) = shipped_backbone("litemedsam");
    let ds = scout::dataset::Dataset::open(&shared.join("spine-mr")).unwrap();
    let config = shipped_spine_config(true);
    let bundle = scout::train::train_dataset(
        &ds,
        &scout::train::Models {
            backbone: &backbone,
            cache: &cache,
            sam: None,
        },
        5,
        scout::adapter::Method::Contrastive,
        10.0,
        &config,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spine-aligned.adapter");
    bundle.save(&file).unwrap();
    let landmarks = &bundle.tasks[0].1;
    assert_eq!(
        landmarks.alignment.len(),
        5,
        "one alignment template per template case"
    );
    let shipped = format!("{}/models/adapters/spine.adapter", root.display());
    // This adapter reads the plain encoder's features (the shipped one the multi-layer
    // features, `litemedsam-hyper`): the spine rule is moved to `litemedsam` with it.
    let on_plain = (
        "backbone = \"litemedsam-hyper\"\n# \"center\"",
        "backbone = \"litemedsam\"\n# \"center\"",
    );
    let through_the_agent = |file: &Path| {
        let file = file.display().to_string();
        spine_through_the_agent(&shared, "s06", &[(&shipped, &file), on_plain]).0
    };
    let errors = through_the_agent(&file);
    eprintln!("s06 through the agent (aligned adapter): {errors:?}");
    assert_all_found_and_most_within_10px(&errors);

    // The agent refines points with an adapter's template patches. Here L5's patch is
    // made without the leave-one-out check (which keeps none on spine): L5 moves, stays
    // on its body, and the other vertebrae stay where they were.
    let mut bundle = bundle;
    let landmarks = &mut bundle.tasks[0].1;
    // Per template: normalised slice k*, pixels per cell, L5.
    type Cut = (ndarray::Array2<f32>, (f64, f64), (f64, f64));
    let views: Vec<Cut> = ds.cases[..5]
        .iter()
        .map(|name| {
            let case = ds.load_case(name).unwrap();
            let s = &case.slices[case.center];
            let (fm, _) = cache.features(&backbone, &s.pixels).unwrap();
            let t = &case.landmarks["L5"];
            (
                scout::image::normalize(&s.pixels).unwrap(),
                scout::patch::cell_px((fm.image_rows, fm.image_columns), fm.grid()),
                (t.row, t.column),
            )
        })
        .collect();
    let views: Vec<scout::patch::TemplateView> = views
        .iter()
        .map(|(pixels, cell_px, point)| scout::patch::TemplateView {
            pixels,
            cell_px: *cell_px,
            point: *point,
        })
        .collect();
    landmarks.patches = vec![None; 5];
    landmarks.patches[4] = scout::patch::LandmarkPatch::fit(&views);
    assert!(landmarks.patches[4].is_some());
    let file = dir.path().join("spine-patches.adapter");
    bundle.save(&file).unwrap();
    let refined = through_the_agent(&file);
    eprintln!("s06 through the agent (aligned adapter, L5 patch): {refined:?}");
    for l in 0..4 {
        let (a, b) = (errors[l].unwrap()[0], refined[l].unwrap()[0]);
        assert!((a - b).abs() < 1e-6, "L{} moved: {a} -> {b}", l + 1);
    }
    let (a, b) = (errors[4].unwrap()[0], refined[4].unwrap()[0]);
    assert!((a - b).abs() > 1e-3 && b <= 10.0, "L5: {a} -> {b}");
}

#[test]
fn destination_down_then_up_and_kill_9_deliver_each_series_exactly_once() {
    let t = "destination_down_then_up_and_kill_9_deliver_each_series_exactly_once";
    if !dcmtk(t) || !dicom3tools(t) {
        return;
    }
    let run = setup(&[(
        "outputs = [\"sr\", \"seg\", \"json\"]",
        "outputs = [\"sr\", \"json\"]",
    )]);
    let mut agent = Daemon::start(&run.cfg, run.port);
    // 1. Destination down: the result waits in the outbox, retried.
    let first = localizer(&run.data.with_file_name("first"), "SYNTH LOCALIZER");
    storescu(run.port, &first.files);
    assert!(
        agent
            .wait_log(&["send: dest", "next try"], Duration::from_secs(60))
            .is_some(),
        "no retry logged: {:#?}",
        agent.log_lines()
    );
    // 2. A second series, killed right after it was acknowledged (before or during its
    //    analysis): nothing was queued for it yet.
    let second = localizer(&run.data.with_file_name("second"), "SPINE LOCALIZER 2");
    storescu(run.port, &second.files);
    agent.kill9();
    // 3. Destination up, agent restarted: both SRs arrive, once each.
    let dest = Storescp::start(run.dest_port, &run.out);
    let agent = Daemon::start(&run.cfg, run.port);
    let srs = dest.wait_for("SR3", 2, Duration::from_secs(90));
    assert_eq!(srs.len(), 2, "{:#?}", agent.log_lines());
    let series_of = |f: &PathBuf| {
        let sr = open_file(f).unwrap();
        items(&sr, tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE)
            .iter()
            .flat_map(|s| items(s, tags::REFERENCED_SERIES_SEQUENCE))
            .filter_map(|s| text(&s, tags::SERIES_INSTANCE_UID))
            .next()
            .unwrap()
    };
    let mut got: Vec<String> = srs.iter().map(series_of).collect();
    got.sort();
    let mut want = vec![
        first.series_instance_uid.clone(),
        second.series_instance_uid.clone(),
    ];
    want.sort();
    assert_eq!(got, want);
    // 4. Clean stop, then one more start: nothing is delivered again.
    let pid = agent.child.id();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut agent = agent;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(st) = agent.child.try_wait().unwrap() {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "no exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit}");
    assert!(agent
        .wait_log(&["scout: stopped"], Duration::from_secs(1))
        .is_some());
    let _agent = Daemon::start(&run.cfg, run.port);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        dest.received("SR3").len(),
        2,
        "delivered again after restart"
    );
}

#[test]
fn refusing_destination_is_retried_then_the_result_is_parked() {
    // The destination is scout's own SCP with a spool that can hold nothing: every
    // C-STORE is answered 0xA700 (Out of Resources).
    let tmp = tempfile::tempdir().unwrap();
    let mut dest_cfg = scout::config::Config::embedded().unwrap();
    dest_cfg.data_dir = tmp.path().join("dest");
    dest_cfg.scp.ae_title = "DEST".into();
    dest_cfg.scp.bind = "127.0.0.1".into();
    dest_cfg.scp.port = 0;
    dest_cfg.spool.max_bytes = 1;
    dest_cfg.spool.min_free_bytes = 0;
    dest_cfg.spool.journal_segment_mib = 0;
    let dest = scout::pipeline::start_ingest(&dest_cfg).unwrap();

    let series = write_series(
        &tmp.path().join("src"),
        SynthSpec {
            slices: 1,
            ..SynthSpec::default()
        },
    );
    let outbox =
        std::sync::Arc::new(scout::outbox::Outbox::open(&tmp.path().join("outbox")).unwrap());
    assert!(outbox
        .put(
            "dest",
            "x.sr.dcm",
            &std::fs::read(&series.files[0]).unwrap()
        )
        .unwrap());
    let destination: scout::rules::Destination = toml::from_str(&format!(
        "name = \"dest\"\nae_title = \"DEST\"\nhost = \"127.0.0.1\"\nport = {}",
        dest.scp.local_addr.port()
    ))
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (_wake_tx, wake) = crossbeam_channel::bounded(1);
    let sender = {
        let (outbox, stop) = (outbox.clone(), stop.clone());
        std::thread::spawn(move || {
            scout::outbox::run_sender(
                outbox,
                vec![destination],
                "SCOUT".into(),
                scout::config::OutboxConfig {
                    retry_initial_s: 1,
                    retry_max_s: 1,
                    max_refusals: 2,
                },
                wake,
                stop,
            )
        })
    };
    let parked = tmp.path().join("outbox/dest/failed/x.sr.dcm");
    wait_for_path(
        &parked,
        Duration::from_secs(20),
        "not parked after 2 refusals",
    );
    assert!(outbox.pending("dest").is_empty());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.join().unwrap();
    dest.scp.stop();
}

/// A point placed without a region of its own (layout or aligned templates, confidence 0)
/// carries Derivation = estimated in the SR, a found one does not, an absent one stays a
/// Finding = Absent; the SR stays valid for dciodvfy and dsrdump.
#[test]
fn estimated_landmarks_are_marked_as_such_in_the_sr() {
    if !dcmtk("estimated_landmarks_are_marked_as_such_in_the_sr") {
        return;
    }
    use scout::results::{Landmark, LandmarkPoint, SeriesResult, SourceImage, StackResult};
    let tmp = tempfile::tempdir().unwrap();
    let series = localizer(tmp.path(), "LOCALIZER");
    let meta = scout::spool::read_meta(&series.files[4]).unwrap();
    let point = |row: f64, confidence: f64| LandmarkPoint {
        patient_mm: meta.geometry.pixel_to_patient(row, 30.0).unwrap(),
        frame_of_reference_uid: meta.geometry.frame_of_reference_uid.clone().unwrap(),
        sop_instance_uid: meta.sop_instance_uid.clone(),
        row,
        column: 30.0,
        confidence,
        stack: 0,
    };
    let landmark = |name: &str, found: Option<LandmarkPoint>| Landmark {
        name: name.into(),
        code: scout::rules::Code::new("99LOCAL", name, name),
        found,
    };
    let r = SeriesResult {
        rule: "spine".into(),
        key: "estimated-test".into(),
        study_instance_uid: series.study_instance_uid.clone(),
        series_instance_uid: series.series_instance_uid.clone(),
        algorithm_name: "scout test".into(),
        algorithm_version: "0".into(),
        landmarks: vec![
            landmark("L1", Some(point(20.0, 0.7))),
            landmark("L2", Some(point(40.0, 0.0))),
            landmark("L3", None),
        ],
        stacks: vec![StackResult {
            plane: meta.geometry.plane(),
            images: vec![SourceImage {
                sop_class_uid: meta.sop_class_uid.clone(),
                sop_instance_uid: meta.sop_instance_uid.clone(),
                geometry: meta.geometry.clone(),
                path: series.files[4].clone(),
            }],
            analysed: vec![0],
            structures: vec![],
        }],
    };
    let source = scout::derived::source_header(&series.files[4]).unwrap();
    let file = tmp.path().join("sr.dcm");
    std::fs::write(&file, scout::sr::build(&r, &source).unwrap()).unwrap();
    let errors = dciodvfy_errors(&file);
    assert!(errors.is_empty(), "dciodvfy: {errors:#?}");
    let (ok, dump) = dcmtk_run("dsrdump", &[file.to_str().unwrap()]);
    assert!(ok && dump.contains("Derivation"), "dsrdump: {dump}");

    let sr = open_file(&file).unwrap();
    let points = sr_landmarks(&sr);
    assert!(points["L1"].is_some() && points["L2"].is_some() && points["L3"].is_none());
    let measurements = items(&sr, tags::CONTENT_SEQUENCE)
        .into_iter()
        .find(|i| concept(i).as_deref() == Some("Imaging Measurements"))
        .unwrap();
    let estimated = scout::sr::estimated_code();
    for group in items(&measurements, tags::CONTENT_SEQUENCE) {
        let children = items(&group, tags::CONTENT_SEQUENCE);
        let name = children
            .iter()
            .find(|c| concept(c).as_deref() == Some("Tracking Identifier"))
            .and_then(|c| text(c, tags::TEXT_VALUE))
            .unwrap();
        let derivation: Vec<String> = children
            .iter()
            .filter(|c| concept(c).as_deref() == Some("Derivation"))
            .flat_map(|c| items(c, tags::CONCEPT_CODE_SEQUENCE))
            .filter_map(|c| text(&c, tags::CODE_VALUE))
            .collect();
        let expected = if name == "L2" {
            vec![estimated.value.clone()]
        } else {
            vec![]
        };
        assert_eq!(derivation, expected, "{name}");
    }
    // The local scheme of the derivation code is declared.
    let schemes: Vec<String> = items(&sr, tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE)
        .iter()
        .filter_map(|s| text(s, tags::CODING_SCHEME_DESIGNATOR))
        .collect();
    assert!(schemes.contains(&estimated.scheme), "{schemes:?}");
}
