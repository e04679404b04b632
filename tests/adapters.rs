//! The method end to end: data set folders → LiteMedSAM features → adapters →
//! post-processing → the evaluation protocol, on a synthetic image data set (always) and on
//! the shared spine MR data (when present).

mod common;

use ndarray::Array2;
use scout::adapter::{Method, TrainConfig};
use scout::backbone::{Backbone, FeatureMap, Manifest};
use scout::dataset::{Case, Dataset};
use scout::eval::{evaluate, EvalOptions, TaskKind};
use scout::features::FeatureCache;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn backbone() -> &'static Backbone {
    static B: OnceLock<Backbone> = OnceLock::new();
    B.get_or_init(|| {
        scout::backbone::set_threads(2);
        let m = Manifest::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/models.toml"))
            .unwrap();
        Backbone::load(&m, "litemedsam").unwrap()
    })
}

/// SAM's decoder for `backbone()`'s maps.
fn decoder() -> scout::sam::Sam {
    let m =
        Manifest::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/models.toml")).unwrap();
    scout::sam::Sam::for_backbone(&m, backbone().id()).unwrap()
}

/// The first `n` cases of `ds` with their features, as templates.
fn templates_of(ds: &Dataset, n: usize) -> Vec<(Case, Vec<FeatureMap>)> {
    ds.cases
        .iter()
        .take(n)
        .map(|name| {
            let case = ds.load_case(name).unwrap();
            let fms = scout::eval::case_features(&case, backbone(), &cache()).unwrap();
            (case, fms)
        })
        .collect()
}

/// How the leave-one-template-out steps train: classification on `templates` alone.
fn classification_recipe<'a>(
    templates: &'a [(Case, Vec<FeatureMap>)],
    config: &'a TrainConfig,
) -> scout::eval::Recipe<'a> {
    scout::eval::Recipe {
        templates,
        augmented: &[],
        method: Method::Classification,
        config,
        backbone: (backbone().id(), backbone().checksum()),
    }
}

/// Classification adapters for `task`, trained on `templates` alone (no augmented copies).
fn classification_adapters(
    task: &scout::templates::Task,
    templates: &[(Case, Vec<FeatureMap>)],
    config: &TrainConfig,
) -> Vec<scout::adapter::Adapter> {
    let bb = (backbone().id(), backbone().checksum());
    scout::eval::train_task(
        task,
        Method::Classification,
        false,
        templates,
        &[],
        config,
        bb,
    )
    .unwrap()
}

/// Feature cache shared by test runs (keyed by model checksum and pixels, so always valid).
fn cache() -> FeatureCache {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("feature-cache");
    FeatureCache::new(&dir, backbone())
}

fn options(method: Method) -> EvalOptions {
    EvalOptions {
        templates: 3,
        method,
        binary: false,
        sam: None,
        align: None,
        augment: Default::default(),
        landmark_radius: 10.0,
        train: TrainConfig {
            steps: 600,
            ..TrainConfig::default()
        },
        png_dir: None,
        template_offset: 0,
        only: None,
        localizer_only: false,
    }
}

#[test]
fn every_adapter_localizes_synthetic_structures_and_landmarks() {
    let tmp = tempfile::tempdir().unwrap();
    common::synthetic_image_dataset(tmp.path(), 6);
    let ds = Dataset::open(tmp.path()).unwrap();
    assert_eq!(ds.landmark_names, ["square", "disk"]);
    let truths: std::collections::BTreeMap<String, _> = ds
        .cases
        .iter()
        .map(|c| (c.clone(), ds.load_case(c).unwrap().landmarks))
        .collect();
    for method in [Method::Classification, Method::Contrastive, Method::Basic] {
        let report = evaluate(&ds, backbone(), &cache(), None, &options(method)).unwrap();
        eprint!("{}", scout::eval::table(&report));
        assert_eq!(report.templates, ["case00", "case01", "case02"]);
        assert_eq!(report.test_cases, 3);
        // The per-case results are what the summaries are made of.
        assert_eq!(
            report.cases.keys().collect::<Vec<_>>(),
            ["case03", "case04", "case05"]
        );
        for (name, s) in &report.landmarks {
            let errors: Vec<Option<f64>> =
                report.cases.values().map(|c| c.landmarks[name]).collect();
            let hits = errors
                .iter()
                .flatten()
                .filter(|e| **e <= scout::eval::HIT_DISTANCE)
                .count();
            assert_eq!(hits as f64 / 3.0, s.accuracy, "{method}: {name} {errors:?}");
            // Each answer is in the report, at its error's distance from the truth.
            for (case, c) in &report.cases {
                let t = &truths[case][name];
                let truth = [t.row, t.column];
                let what = format!("{method}: {name}");
                answer_at_its_error(&c.points[name], c.landmarks[name], &truth, case, &what);
            }
        }
        for (label, s) in &report.segmentation {
            let mean = report.cases.values().map(|c| c.iou[label]).sum::<f64>() / 3.0;
            assert!(
                (mean - s.iou).abs() < 1e-9,
                "{method}: {label} {mean} vs {}",
                s.iou
            );
        }
        if method == Method::Basic {
            continue; // no threshold tuning: the basic adapter is reported, not required to work
        }
        for (name, s) in &report.landmarks {
            assert!(s.accuracy >= 2.0 / 3.0, "{method}: landmark {name} {s:?}");
        }
        for (label, s) in &report.segmentation {
            assert!(s.iou >= 60.0, "{method}: structure {label} IoU {}", s.iou);
        }
    }
}

/// `--window`: the structures are scored only around the landmarks found and lose
/// nothing: every case's IoU at least as without, the landmarks the same. The window is
/// learned from the templates, holds every labelled pixel of the test cases around their
/// landmarks and leaves out part of the slice; without the landmarks task it is refused.
#[test]
fn a_window_around_the_landmarks_keeps_the_structures() {
    let tmp = tempfile::tempdir().unwrap();
    common::synthetic_image_dataset(tmp.path(), 6);
    let ds = Dataset::open(tmp.path()).unwrap();
    let windowed = || {
        let plain = options(Method::Classification);
        EvalOptions {
            train: TrainConfig {
                window: true,
                ..plain.train.clone()
            },
            ..plain
        }
    };
    let with = evaluate(&ds, backbone(), &cache(), None, &windowed()).unwrap();
    let plain = options(Method::Classification);
    let without = evaluate(&ds, backbone(), &cache(), None, &plain).unwrap();
    let mut windowed_cases = 0;
    for (case, c) in &without.cases {
        assert_eq!(
            c.points, with.cases[case].points,
            "{case}: the landmarks moved"
        );
        // Scored within a window that leaves part of the slice out, and only with it.
        // Scored within a window that leaves part of the slice out where every landmark
        // was found, over the whole slice where one is missing, and only with --window.
        assert!(
            c.window_share.is_none(),
            "{case}: a window without --window"
        );
        let share = with.cases[case].window_share;
        if c.points.values().all(Option::is_some) {
            assert!(
                share.is_some_and(|s| s > 0.0 && s < 1.0),
                "{case}: window share {share:?}"
            );
            windowed_cases += 1;
        } else {
            assert_eq!(share, None, "{case}: a window around a missing landmark");
        }
        for (label, iou) in &c.iou {
            let w = with.cases[case].iou[label];
            assert!(
                w >= iou - 1e-9,
                "{case}, structure {label}: IoU {iou} → {w}"
            );
        }
    }
    assert!(
        windowed_cases >= 2,
        "{windowed_cases} cases scored within a window"
    );
    // The window as `scout eval --window` trains it, at the test cases' own landmarks.
    let templates = templates_of(&ds, 3);
    let task = scout::templates::Task::Structures { values: vec![1, 2] };
    let none: &[(Case, Vec<FeatureMap>)] = &[];
    let adapters = scout::eval::train_task(
        &task,
        Method::Classification,
        false,
        &templates,
        none,
        &windowed().train,
        (backbone().id(), backbone().checksum()),
    )
    .unwrap();
    let w = adapters[0].window.as_ref().expect("a window learned");
    assert_eq!(w.landmarks, ["disk", "square"]);
    let grid = templates[0].1[0].grid();
    for name in &ds.cases[3..] {
        let case = ds.load_case(name).unwrap();
        let points: Vec<_> = (w.landmarks.iter())
            .map(|n| case.landmarks.get(n).map(|t| (t.row, t.column)))
            .collect();
        let window = w.around(&points, 10.0, (256, 256), grid).unwrap();
        assert!(
            window.rows.len() * window.columns.len() < grid.0 * grid.1,
            "{name}: {window:?}"
        );
        // Each landmark's own box, learned from the templates, holds a new case's too.
        let cells = w.cells(&points, 10.0, (256, 256), grid).unwrap();
        assert!(cells.count() < window.rows.len() * window.columns.len());
        let labels = case.slices[0].labels.as_ref().unwrap();
        let (per_row, per_column) = (256 / grid.0, 256 / grid.1);
        for ((r, c), v) in labels.indexed_iter() {
            if *v != 0 {
                let cell = (r / per_row, c / per_column);
                assert!(
                    window.rows.contains(&cell.0) && window.columns.contains(&cell.1),
                    "{name}: pixel ({r}, {c}) outside {window:?}"
                );
                let held = cell
                    .0
                    .checked_sub(cells.first_row)
                    .and_then(|i| cells.spans.get(i));
                assert!(
                    held.is_some_and(|s| s.contains(&cell.1)),
                    "{name}: pixel ({r}, {c}) outside {cells:?}"
                );
            }
        }
    }
    let only = EvalOptions {
        only: Some(TaskKind::Structures),
        ..windowed()
    };
    let err = evaluate(&ds, backbone(), &cache(), None, &only).expect_err("no landmarks");
    assert!(
        err.to_string()
            .contains("--window and --identity need the landmarks task"),
        "{err}"
    );
}

/// `--folds`: a fold's templates may be the data set's last cases, tested on all the
/// others (the cases before them); templates past the last case are an error.
#[test]
fn the_last_fold_is_tested_on_the_cases_before_its_templates() {
    let tmp = tempfile::tempdir().unwrap();
    common::synthetic_image_dataset(tmp.path(), 4);
    let ds = Dataset::open(tmp.path()).unwrap();
    let fold = |template_offset: usize| EvalOptions {
        templates: 2,
        template_offset,
        only: Some(TaskKind::Landmarks),
        train: TrainConfig {
            steps: 100,
            ..TrainConfig::default()
        },
        ..options(Method::Classification)
    };
    let report = evaluate(&ds, backbone(), &cache(), None, &fold(2)).unwrap();
    assert_eq!(report.templates, ["case02", "case03"]);
    assert_eq!(
        report.cases.keys().collect::<Vec<_>>(),
        ["case00", "case01"]
    );
    let err = evaluate(&ds, backbone(), &cache(), None, &fold(3)).expect_err("past the last");
    assert!(err.to_string().contains("no templates 4–5"), "{err}");
}

/// `--only` a kind of task the data set lacks is an error, not an empty report.
#[test]
fn only_a_missing_task_kind_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    common::synthetic_image_dataset(tmp.path(), 4);
    std::fs::remove_dir_all(tmp.path().join("labels")).unwrap();
    let ds = Dataset::open(tmp.path()).unwrap();
    let opts = EvalOptions {
        only: Some(TaskKind::Structures),
        ..options(Method::Classification)
    };
    let err = evaluate(&ds, backbone(), &cache(), None, &opts)
        .expect_err("structures of a data set without label maps");
    assert!(err.to_string().contains("no label maps"), "{err}");
}

/// The structures' steps that read one adapter's per-structure state refuse `--binary`
/// (one adapter per label) instead of reading the first adapter's alone.
#[test]
fn one_adapter_steps_refuse_binary_adapters() {
    for option in ["--atlas", "--enclosed", "--convex", "--sam-redraw"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_scout"))
            .args(["eval", "no-such-dataset", "--binary", option])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{option}: accepted");
        assert!(
            stderr.contains("need one multi-label adapter, not --binary"),
            "{option}: {stderr}"
        );
    }
}

#[test]
fn trained_adapters_round_trip_through_an_adapter_file() {
    let tmp = tempfile::tempdir().unwrap();
    common::synthetic_image_dataset(&tmp.path().join("ds"), 3);
    let ds = Dataset::open(&tmp.path().join("ds")).unwrap();
    let bundle = scout::train::train_dataset(
        &ds,
        &scout::train::Models {
            backbone: backbone(),
            cache: &cache(),
            sam: None,
        },
        2,
        Method::Classification,
        10.0,
        &TrainConfig {
            patches: true,
            borders: true,
            shape: true,
            ensemble: vec![Method::Contrastive],
            layout_fill: true,
            stack_anchor: true,
            votes: true,
            atlas: true,
            enclosed: true,
            convex: true,
            ellipse: true,
            fragments: true,
            pose: true,
            window: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(bundle.tasks.len(), 2, "landmarks and structures");
    // Ensembles need format 2, the steps since (votes, atlas, stack anchor, ...) 3, the
    // window's reach per landmark 10 and the convex structures' ellipses 12: a build that
    // reads less refuses the file instead of scoring or placing without them.
    assert_eq!(bundle.format, 12);
    assert!(bundle.tasks.iter().all(|(_, a)| a.members.len() == 1));
    let (landmarks, structures) = (&bundle.tasks[0].1, &bundle.tasks[1].1);
    assert_eq!(landmarks.patches.len(), landmarks.labels.len());
    assert_eq!(landmarks.votes.len(), landmarks.labels.len());
    assert!(landmarks.votes.iter().all(Option::is_some));
    assert!(structures.votes.is_empty(), "votes are for landmarks");
    assert!(
        (structures.window.as_ref()).is_some_and(|w| w.share > 0.0 && w.landmarks.len() == 2),
        "the structures' window around both landmarks"
    );
    assert!(landmarks.window.is_none() && !landmarks.train.window);
    assert!(landmarks.atlas.is_none(), "the atlas is for structures");
    assert!(structures
        .atlas
        .as_ref()
        .is_some_and(|a| a.fits(structures.labels.len())));
    // Side by side, the square and the disk enclose nothing: no frame, the file as before
    // (the shipped chest adapter's heart frame is checked in `e2e.rs`).
    assert!(structures.train.enclosed && structures.enclosed.is_none());
    // The square and the disk are convex in every template; landmarks have no regions.
    assert_eq!(structures.convex, vec![true, true]);
    assert!(landmarks.convex.is_empty());
    // Each fills its moments' ellipse to some scale: the disk (label 2) to the full one, the
    // square (label 1) to less, as the ellipse reaches past its sides.
    assert!(
        matches!(structures.ellipse[..], [Some(square), Some(disk)]
            if (0.9..1.0).contains(&square) && disk == 1.0),
        "{:?}",
        structures.ellipse
    );
    assert!(landmarks.ellipse.is_empty());
    // Border negatives are for structures only.
    assert!(!landmarks.train.borders && structures.train.borders);
    assert!(
        bundle.provenance.contains("case00,case01")
            && bundle.provenance.contains("--borders")
            && bundle.provenance.contains("--ensemble contrastive")
            && bundle.provenance.contains("--layout-fill")
            && bundle.provenance.contains("--stack-anchor")
            && bundle.provenance.contains("--votes")
            && bundle.provenance.contains("--atlas")
            && bundle.provenance.contains("--enclosed")
            && bundle.provenance.contains("--convex")
            && bundle.provenance.contains("--ellipse")
            && bundle.provenance.contains("--fragments")
            && bundle.provenance.contains("--pose"),
        "{}",
        bundle.provenance
    );
    let path = tmp.path().join("synthetic.adapter");
    bundle.save(&path).unwrap();
    let back = scout::train::Bundle::load(&path, backbone()).unwrap();
    let case = ds.load_case("case02").unwrap();
    let (fm, _) = cache()
        .features(backbone(), &case.slices[0].pixels)
        .unwrap();
    for ((_, a), (_, b)) in bundle.tasks.iter().zip(&back.tasks) {
        assert_eq!(a.scores(&fm).unwrap(), b.scores(&fm).unwrap());
        assert_eq!(a.patches, b.patches);
        assert_eq!(
            a.atlas.as_ref().map(|a| &a.maps),
            b.atlas.as_ref().map(|b| &b.maps)
        );
        let enclosed = |x: &scout::adapter::Adapter| serde_json::to_string(&x.enclosed).unwrap();
        assert_eq!(enclosed(a), enclosed(b));
        assert_eq!((&a.convex, &a.ellipse), (&b.convex, &b.ellipse));
        // JSON keeps the share to the last digit or so (serde_json's float parser).
        let window = |w: &Option<scout::window::LandmarkWindow>| {
            w.as_ref()
                .map(|w| (w.landmarks.clone(), (w.share * 1e12).round()))
        };
        assert_eq!(window(&a.window), window(&b.window));
        assert_eq!(a.votes.len(), b.votes.len());
        for (va, vb) in a.votes.iter().flatten().zip(b.votes.iter().flatten()) {
            assert_eq!((&va.weights, va.bias), (&vb.weights, vb.bias));
            assert!((va.reach - vb.reach).abs() < 1e-9 && (va.lambda - vb.lambda).abs() < 1e-12);
        }
        // JSON keeps the layout to the last digit or so (serde_json's default float parser).
        let flat = |s: &Option<scout::postprocess::ShapeModel>| -> Vec<f64> {
            s.iter()
                .flat_map(|s| s.mean.iter().chain(&s.std))
                .flatten()
                .flatten()
                .copied()
                .collect()
        };
        let (fa, fb) = (flat(&a.shape), flat(&b.shape));
        assert_eq!(a.shape.is_some(), b.shape.is_some());
        assert!(
            a.shape.iter().chain(&b.shape).all(|s| s.pose),
            "posed layouts"
        );
        assert_eq!(fa.len(), fb.len());
        assert!(fa.iter().zip(&fb).all(|(x, y)| (x - y).abs() < 1e-9));
    }
    // The file edited by `edit` is refused at load; the error. Edited from the file
    // without the window's reach per landmark, format 3, so that each step below is
    // refused for its own format.
    let broken = tmp.path().join("broken.adapter");
    let refused = |edit: &dyn Fn(&mut serde_json::Value)| -> String {
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if let Some(window) = json["tasks"][1][1]["window"].as_object_mut() {
            window.remove("reach");
        }
        // What format 3 cannot hold either.
        if let Some(structures) = json["tasks"][1][1].as_object_mut() {
            structures.remove("ellipse");
        }
        json["format"] = serde_json::json!(3);
        edit(&mut json);
        std::fs::write(&broken, json.to_string()).unwrap();
        scout::train::Bundle::load(&broken, backbone())
            .unwrap_err()
            .to_string()
    };
    // A landmark patch that does not fit its stated size.
    let err = refused(&|json| {
        json["tasks"][0][1]["patches"][0] = serde_json::json!(
            {"cell_px": [4.0, 4.0], "radius": [3, 3], "mean": [0.5], "templates": 2}
        );
    });
    assert!(err.contains("landmark patch 0"), "{err}");
    // A vote model with fewer weights than the adapter has feature columns.
    let err = refused(&|json| {
        json["tasks"][0][1]["votes"][1]["weights"] = serde_json::json!([[0.0, 0.0]]);
    });
    assert!(err.contains("vote model 1"), "{err}");
    // A structure atlas with a value that is no share of templates.
    let err = refused(&|json| json["tasks"][1][1]["atlas"]["maps"][0][5] = serde_json::json!(2.0));
    assert!(err.contains("structure atlas"), "{err}");
    // A stack reach that is no distance (images teach none: the field is added here).
    assert!(structures.stack_reach.is_empty(), "one-slice templates");
    let labels = structures.labels.len();
    let err = refused(&|json| {
        let mut reach = vec![serde_json::Value::Null; labels];
        reach[0] = serde_json::json!(-0.5);
        json["tasks"][1][1]["stack_reach"] = serde_json::json!(reach);
    });
    assert!(err.contains("stack reach"), "{err}");
    // A stack depth that is no share, and one in a file of format 3, which a build that
    // reads only 3 would load and fill nothing with.
    let err = refused(&|json| {
        json["format"] = serde_json::json!(4);
        let mut depth = vec![serde_json::json!([]); labels];
        depth[0] = serde_json::json!([0.1, -0.1]);
        json["tasks"][1][1]["stack_depth"] = serde_json::json!(depth);
    });
    assert!(err.contains("stack depths"), "{err}");
    let err = refused(&|json| {
        json["format"] = serde_json::json!(4);
        let depth = vec![serde_json::json!([0.1]); labels + 1];
        json["tasks"][1][1]["stack_depth"] = serde_json::json!(depth);
    });
    let want = format!("{} stack depths for {labels} labels", labels + 1);
    assert!(err.contains(&want), "{err}");
    let err = refused(&|json| {
        let depth = vec![serde_json::json!([0.1]); labels];
        json["tasks"][1][1]["stack_depth"] = serde_json::json!(depth);
    });
    assert!(err.contains("format 4 at least"), "{err}");
    // A stack bound that is no share, and one in a file of format 4, which a build that
    // reads only 4 would load and bound nothing with.
    let err = refused(&|json| {
        json["format"] = serde_json::json!(5);
        let mut bound = vec![serde_json::json!([]); labels];
        bound[0] = serde_json::json!([null, -0.2]);
        json["tasks"][1][1]["stack_bound"] = serde_json::json!(bound);
    });
    assert!(err.contains("stack bounds"), "{err}");
    let err = refused(&|json| {
        json["format"] = serde_json::json!(4);
        let bound = vec![serde_json::json!([0.1]); labels];
        json["tasks"][1][1]["stack_bound"] = serde_json::json!(bound);
    });
    assert!(err.contains("format 5 at least"), "{err}");
    // A stack blend's scale that is not above 0, and one in a file of format 5, which a
    // build that reads only 5 would load and blend nothing with.
    let err = refused(&|json| {
        json["format"] = serde_json::json!(6);
        let mut blend = vec![serde_json::json!([]); labels];
        blend[0] = serde_json::json!([null, [0.9, 0.0]]);
        json["tasks"][1][1]["stack_blend"] = serde_json::json!(blend);
    });
    assert!(err.contains("stack blends"), "{err}");
    let err = refused(&|json| {
        json["format"] = serde_json::json!(5);
        let blend = vec![serde_json::json!([[0.9, 0.8]]); labels];
        json["tasks"][1][1]["stack_blend"] = serde_json::json!(blend);
    });
    assert!(err.contains("format 6 at least"), "{err}");
    // A stack carry's share past 1, and one in a file of format 6, which a build that
    // reads only 6 would load and carry nothing with.
    let err = refused(&|json| {
        json["format"] = serde_json::json!(7);
        let mut carry = vec![serde_json::json!([]); labels];
        carry[0] = serde_json::json!([null, 1.5]);
        json["tasks"][1][1]["stack_carry"] = serde_json::json!(carry);
    });
    assert!(err.contains("stack carries"), "{err}");
    let err = refused(&|json| {
        json["format"] = serde_json::json!(6);
        let carry = vec![serde_json::json!([1.0]); labels];
        json["tasks"][1][1]["stack_carry"] = serde_json::json!(carry);
    });
    assert!(err.contains("format 7 at least"), "{err}");
    // The patient's appearance in a file of format 7, which a build that reads only 7
    // would load and not weigh the scores with.
    let err = refused(&|json| {
        json["format"] = serde_json::json!(7);
        json["tasks"][1][1]["train"]["appearance"] = serde_json::json!(true);
    });
    assert!(err.contains("format 8 at least"), "{err}");
    // A structures' window with no reach, or around a landmark the file does not find.
    let err = refused(&|json| {
        json["tasks"][1][1]["window"] = serde_json::json!({"landmarks": ["A"], "share": -0.1});
    });
    assert!(err.contains("landmark window"), "{err}");
    let landmark = landmarks.labels[0].clone();
    let err = refused(&|json| {
        json["tasks"][1][1]["window"] =
            serde_json::json!({"landmarks": [landmark.clone(), "elsewhere"], "share": 0.1});
    });
    assert!(err.contains("landmark elsewhere"), "{err}");
    // Each landmark's reach in the window: one per landmark, none below 0; and in a file
    // of format 9, which a build that reads only 9 would load and score the whole box with.
    for reach in [
        serde_json::json!([[0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]]),
        serde_json::json!([[0.1, -0.1, 0.1, 0.1]]),
    ] {
        let err = refused(&|json| {
            json["format"] = serde_json::json!(10);
            json["tasks"][1][1]["window"] = serde_json::json!(
                {"landmarks": [landmark.clone()], "share": 0.1, "reach": reach.clone()}
            );
        });
        assert!(err.contains("landmark window"), "{err}");
    }
    let err = refused(&|json| {
        json["format"] = serde_json::json!(9);
        json["tasks"][1][1]["window"] = serde_json::json!(
            {"landmarks": [landmark.clone()], "share": 0.1, "reach": [[0.1, 0.1, 0.1, 0.1]]}
        );
    });
    assert!(err.contains("format 10 at least"), "{err}");
    // Structures named by a landmark the file does not find, by none, or for another
    // number of structures; and named in a file of format 8, which a build that reads only
    // 8 would load and not name them with.
    let named = |first: serde_json::Value, n: usize| {
        let mut links = vec![serde_json::Value::Null; n];
        links[0] = first;
        serde_json::json!({ "landmarks": links })
    };
    let err = refused(&|json| {
        json["format"] = serde_json::json!(9);
        json["tasks"][1][1]["identity"] = named(serde_json::json!("elsewhere"), labels);
    });
    assert!(err.contains("named by landmark elsewhere"), "{err}");
    for links in [
        named(serde_json::Value::Null, labels),
        named(serde_json::json!(landmark.clone()), labels + 1),
    ] {
        let err = refused(&|json| {
            json["format"] = serde_json::json!(9);
            json["tasks"][1][1]["identity"] = links.clone();
        });
        assert!(err.contains("structures' landmarks"), "{err}");
    }
    let err = refused(&|json| {
        json["format"] = serde_json::json!(8);
        json["tasks"][1][1]["identity"] = named(serde_json::json!(landmark.clone()), labels);
    });
    assert!(err.contains("format 9 at least"), "{err}");
    let err = refused(&|json| {
        json["format"] = serde_json::json!(9);
        json["tasks"][0][1]["identity"] =
            named(serde_json::json!(landmark.clone()), landmarks.labels.len());
    });
    assert!(err.contains("identity on a landmark adapter"), "{err}");
    // A landmark offset beyond the landmark radius, or one per label too few.
    let err = refused(&|json| {
        json["tasks"][0][1]["calibration"] = serde_json::json!([[0.0, 12.0], null]);
    });
    assert!(err.contains("landmark offset 0"), "{err}");
    let err = refused(&|json| json["tasks"][0][1]["calibration"] = serde_json::json!([null]));
    assert!(err.contains("landmark offsets"), "{err}");
    // A layout that does not describe the adapter's labels.
    let err = refused(&|json| {
        json["tasks"][1][1]["shape"] =
            serde_json::json!({"mean": [[[0.0, 0.0]]], "std": [[[1.0, 1.0]]]});
    });
    assert!(err.contains("layout"), "{err}");
    // An ensemble member that does not fit its adapter.
    let err = refused(&|json| {
        json["tasks"][1][1]["members"][0]["labels"] = serde_json::json!(["1"]);
    });
    assert!(err.contains("ensemble member"), "{err}");
    // A format this build does not know.
    let unknown = scout::train::FORMATS.end() + 1;
    let err = refused(&|json| json["format"] = serde_json::json!(unknown));
    assert!(err.contains(&format!("format {unknown}")), "{err}");
    // A format too old for what the file holds.
    for old in [1, 2] {
        let err = refused(&|json| json["format"] = serde_json::json!(old));
        assert!(err.contains("format 3 at least"), "{err}");
    }
    // Landmarks on structure extremes: one rule per landmark, each on a structure another
    // adapter of the file has SAM redraw (none here).
    let landmark_count = landmarks.labels.len();
    let extremes = |n: usize| {
        let mut rules = vec![serde_json::Value::Null; n];
        rules[0] = serde_json::json!({"structure": 1, "direction": [-1, 0], "band": 2.0});
        serde_json::json!(rules)
    };
    let err = refused(&|json| {
        json["tasks"][0][1]["extremes"] = extremes(landmark_count + 1);
    });
    assert!(err.contains("structure extremes"), "{err}");
    let err = refused(&|json| {
        json["tasks"][0][1]["extremes"] = extremes(landmark_count);
    });
    assert!(
        err.contains("no adapter of the file has SAM redraw"),
        "{err}"
    );
    // The same rule on a structure the structures' adapter redraws is taken (the file's
    // ellipses, of format 12, are left out until the formats below are checked).
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["tasks"][1][1]
        .as_object_mut()
        .unwrap()
        .remove("ellipse");
    json["tasks"][1][1]["sam_redraw"] = serde_json::json!(vec![true; labels]);
    json["tasks"][0][1]["extremes"] = extremes(landmark_count);
    // Not beside the structures' window, which needs the landmarks first.
    std::fs::write(&broken, json.to_string()).unwrap();
    let err = scout::train::Bundle::load(&broken, backbone()).unwrap_err();
    assert!(
        err.to_string().contains("need the landmarks first"),
        "{err}"
    );
    json["tasks"][1][1]
        .as_object_mut()
        .unwrap()
        .remove("window");
    std::fs::write(&broken, json.to_string()).unwrap();
    let taken = scout::train::Bundle::load(&broken, backbone()).unwrap();
    assert!(taken.tasks[0].1.extremes[0].is_some_and(|e| !e.fallback));
    // The rule as a fallback, which a build reading only format 10 would average with the
    // adapter's point: refused in a file of format 10, taken in one of 11.
    json["tasks"][0][1]["extremes"][0]["fallback"] = serde_json::json!(true);
    json["format"] = serde_json::json!(10);
    std::fs::write(&broken, json.to_string()).unwrap();
    let err = scout::train::Bundle::load(&broken, backbone()).unwrap_err();
    assert!(err.to_string().contains("format 11 at least"), "{err}");
    json["format"] = serde_json::json!(11);
    std::fs::write(&broken, json.to_string()).unwrap();
    let taken = scout::train::Bundle::load(&broken, backbone()).unwrap();
    assert!(taken.tasks[0].1.extremes[0].is_some_and(|e| e.fallback));
    // A convex structure's ellipse: a scale per label, each within (0, 2] and for a
    // structure drawn convex; a build reading only format 11 would leave it out.
    let scales = |scale: f64, n: usize| serde_json::json!(vec![Some(scale); n]);
    for (convex, ellipse, says) in [
        (true, scales(0.95, labels + 1), "ellipse scales"),
        (true, scales(-1.0, labels), "ellipse scale -1"),
        (true, scales(2.5, labels), "ellipse scale 2.5"),
        (false, scales(0.95, labels), "not drawn convex"),
    ] {
        let err = refused(&|json| {
            json["format"] = serde_json::json!(12);
            json["tasks"][1][1]["convex"] = serde_json::json!(vec![convex; labels]);
            json["tasks"][1][1]["ellipse"] = ellipse.clone();
        });
        assert!(err.contains(says), "{err}");
    }
    json["tasks"][1][1]["ellipse"] = scales(0.95, labels);
    std::fs::write(&broken, json.to_string()).unwrap();
    let err = scout::train::Bundle::load(&broken, backbone()).unwrap_err();
    assert!(err.to_string().contains("format 12 at least"), "{err}");
    json["format"] = serde_json::json!(12);
    std::fs::write(&broken, json.to_string()).unwrap();
    let taken = scout::train::Bundle::load(&broken, backbone()).unwrap();
    assert_eq!(taken.tasks[1].1.ellipse, vec![Some(0.95); labels]);
    // An adapter made for another backbone is refused with a clear error.
    let m =
        Manifest::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/models.toml")).unwrap();
    let other = Backbone::load(&m, "tiny-dinov2-test").unwrap();
    let err = scout::train::Bundle::load(&path, &other)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("litemedsam") && err.contains("tiny-dinov2-test"),
        "{err}"
    );
}

#[test]
fn dataset_reader_rejects_what_it_cannot_read() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(
        Dataset::open(tmp.path()).is_err(),
        "empty folder is not a data set"
    );
    std::fs::create_dir_all(tmp.path().join("images")).unwrap();
    ::image::GrayImage::new(8, 8)
        .save(tmp.path().join("images/a.png"))
        .unwrap();
    std::fs::write(
        tmp.path().join("landmarks.csv"),
        "case,landmark,x,y\na,p,1,notanumber\n",
    )
    .unwrap();
    let err = Dataset::open(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("line 2"), "{err}");
    std::fs::write(
        tmp.path().join("landmarks.csv"),
        "case,landmark,x,y\na,p,1,2\n",
    )
    .unwrap();
    let ds = Dataset::open(tmp.path()).unwrap();
    let case = ds.load_case("a").unwrap();
    assert!(
        case.slices[0].labels.is_none(),
        "a data set without labels/ is fine"
    );
    assert_eq!(case.slices[0].pixels, Array2::<f32>::zeros((8, 8)));
    // DICOM slices are images too.
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/testdata/slice.dcm"),
        tmp.path().join("images/b.dcm"),
    )
    .unwrap();
    let ds = Dataset::open(tmp.path()).unwrap();
    assert_eq!(ds.cases, ["a", "b"]);
    let b = ds.load_case("b").unwrap();
    assert!(b.slices[0].pixels.iter().any(|v| *v > 0.0));
}

/// A data set stored as negatives (air bright, as chest-xr's PNGs are) is read as the
/// positive the agent would be shown, within each image's own range; by default images
/// are read as stored.
#[test]
fn a_data_set_of_negatives_is_read_inverted() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("images")).unwrap();
    ::image::GrayImage::from_fn(8, 8, |x, y| ::image::Luma([(10 + 8 * y + x) as u8]))
        .save(tmp.path().join("images/a.png"))
        .unwrap();
    let stored = Dataset::open(tmp.path()).unwrap();
    assert!(!stored.negatives);
    let as_stored = stored.load_case("a").unwrap().slices[0].pixels.clone();
    assert!(
        (as_stored[[0, 0]] - 10.0 / 255.0).abs() < 1e-6,
        "{as_stored}"
    );
    let inverted = stored.inverted(true).load_case("a").unwrap().slices[0]
        .pixels
        .clone();
    // Lowest 10, highest 73: the darkest pixel becomes the brightest and back.
    let expected = as_stored.mapv(|v| (10.0 + 73.0) / 255.0 - v);
    assert!(
        inverted
            .iter()
            .zip(&expected)
            .all(|(a, b)| (a - b).abs() < 1e-6),
        "{inverted}"
    );
    assert!((inverted[[7, 7]] - 10.0 / 255.0).abs() < 1e-6);
}

/// The paper's claim on the shared spine MR data: contrastive beats basic on landmarks.
/// Slice k* of each test case (the templates keep their stacks), as the agent analyses a
/// localizer by default; measured mean acc@10 0.36 (basic) and 0.69 (contrastive).
#[test]
fn contrastive_beats_basic_on_spine_landmarks() {
    let Some(shared) = common::shared_data("contrastive_beats_basic_on_spine_landmarks") else {
        return;
    };
    let ds = Dataset::open(&shared.join("spine-mr")).unwrap();
    let evaluated = |method| {
        let opts = EvalOptions {
            templates: 5,
            train: TrainConfig::default(),
            only: Some(TaskKind::Landmarks),
            localizer_only: true,
            ..options(method)
        };
        let r = report(&ds, opts);
        assert!(
            r.segmentation.is_empty(),
            "--only landmarks measured structures"
        );
        r
    };
    let mean_acc = |r: &scout::eval::Report| {
        let m = &r.landmarks_2d;
        m.values().map(|s| s.accuracy).sum::<f64>() / m.len() as f64
    };
    let contrastive = evaluated(Method::Contrastive);
    let (basic, contrastive_acc) = (mean_acc(&evaluated(Method::Basic)), mean_acc(&contrastive));
    assert!(
        contrastive_acc > basic + 0.2,
        "contrastive {contrastive_acc:.2} vs basic {basic:.2}"
    );
    // A volume's answers are 3D (row, column, slice), at their errors' distance from the
    // 3D centroids; those of the 2D variant at theirs from the label's centroid in k*.
    for (case, c) in &contrastive.cases {
        let case_data = ds.load_case(case).unwrap();
        let center = &case_data.slices[case_data.center];
        for (l, name) in ds.landmark_names.iter().enumerate() {
            let t = &case_data.landmarks[name];
            let truth = [t.row, t.column, t.k.unwrap()];
            answer_at_its_error(&c.points[name], c.landmarks[name], &truth, case, name);
            let labels = center.labels.as_ref().unwrap();
            let (row, column) = scout::templates::label_centroid(labels, l as u8 + 1).unwrap();
            let e = c.landmarks_2d[name];
            answer_at_its_error(&c.points_2d[name], e, &[row, column], case, name);
        }
    }
}

/// A case's answer for one landmark (`None`: absent) lies at its reported error from the
/// truth, in as many dimensions as the truth has.
fn answer_at_its_error(
    answer: &Option<Vec<f64>>,
    error: Option<f64>,
    truth: &[f64],
    case: &str,
    name: &str,
) {
    match (answer, error) {
        (Some(p), Some(e)) => {
            assert_eq!(p.len(), truth.len(), "{case} {name} {p:?}");
            let d = p
                .iter()
                .zip(truth)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(
                (d - e).abs() < 1e-9,
                "{case} {name}: {d} from the truth, error {e}"
            );
        }
        (None, None) => {}
        (p, e) => panic!("{case} {name}: answer {p:?}, error {e:?}"),
    }
}

/// Idea 4, a refinement that helps: SAM's decoder, prompted with the box of each
/// template's own mask, gives chest-xr's lungs back (mean IoU 0.95 over JPCLN001–005)
/// but not its heart (0.80) nor spine-mr's vertebral bodies, so `--sam-redraw` has it
/// redraw the lungs alone (measured on the test cases: from their true boxes, lungs
/// 0.96 / 0.94, heart 0.69, bodies 0.70–0.75).
#[test]
fn sam_redraws_the_lungs_and_neither_the_heart_nor_the_vertebrae() {
    let Some(shared) =
        common::shared_data("sam_redraws_the_lungs_and_neither_the_heart_nor_the_vertebrae")
    else {
        return;
    };
    let sam = decoder();
    let redrawn = |ds: &Dataset| {
        let cases: Vec<_> = ds
            .cases
            .iter()
            .take(5)
            .map(|n| ds.load_case(n).unwrap())
            .collect();
        let maps: Vec<_> = cases
            .iter()
            .map(|c| {
                cache()
                    .features(backbone(), &c.slices[c.center].pixels)
                    .unwrap()
                    .0
            })
            .collect();
        let slices = cases
            .iter()
            .zip(&maps)
            .map(|(c, fm)| (fm, c.slices[c.center].labels.as_ref().unwrap()));
        let values = scout::templates::structure_values(&cases);
        sam.learn_redraws(slices, &values).unwrap()
    };
    // As the shipped chest adapter reads chest-xr: positives (air dark).
    let chest = Dataset::open(&shared.join("chest-xr"))
        .unwrap()
        .inverted(true);
    assert_eq!(redrawn(&chest), [true, true, false]);
    let spine = Dataset::open(&shared.join("spine-mr")).unwrap();
    assert_eq!(redrawn(&spine), [false; 5]);
}

/// `scout eval` with `--extremes` takes slice k*'s structures (SAM's redraws included)
/// once, for the landmarks, and hands them to the structures task: every case's IoU and
/// SAM's acceptances are those the structures task finds alone. The synthetic square's
/// top edge is a landmark whose rule SAM's squares keep, so the landmarks do take them.
#[test]
fn the_landmarks_hand_their_structures_to_the_structures_task() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    common::synthetic_image_dataset(&dir, 6);
    // The square's top edge (its centre column, its top row) for its centre.
    let csv = std::fs::read_to_string(dir.join("landmarks.csv")).unwrap();
    let moved: String = csv
        .lines()
        .map(|line| match line.split(',').collect::<Vec<_>>()[..] {
            [case, "square", x, y] => {
                let y: f64 = y.parse().unwrap();
                format!("{case},square_top,{x},{}\n", y - 22.0)
            }
            _ => format!("{line}\n"),
        })
        .collect();
    std::fs::write(dir.join("landmarks.csv"), moved).unwrap();
    let ds = Dataset::open(&dir).unwrap();
    let sam = decoder();
    let run = |extremes: bool, only: Option<TaskKind>| {
        let opts = EvalOptions {
            templates: 4,
            only,
            train: TrainConfig {
                steps: 300,
                shape: true,
                sam_redraw: true,
                extremes,
                ..TrainConfig::default()
            },
            ..options(Method::Classification)
        };
        evaluate(&ds, backbone(), &cache(), Some(&sam), &opts).unwrap()
    };
    let both = run(true, None);
    let alone = run(true, Some(TaskKind::Structures));
    let without = run(false, Some(TaskKind::Landmarks));
    let points = |r: &scout::eval::Report| -> Vec<_> {
        r.cases
            .values()
            .map(|c| c.points["square_top"].clone())
            .collect()
    };
    assert_ne!(
        points(&both),
        points(&without),
        "no rule moved the square's top"
    );
    assert_eq!(both.cases.len(), 2);
    for (case, result) in &both.cases {
        assert_eq!(result.iou, alone.cases[case].iou, "{case}");
    }
    assert!(both.timing.sam_accepted.is_some());
    assert_eq!(both.timing.sam_accepted, alone.timing.sam_accepted);
}

/// Issue #7: chest-xr's lung apices lie on the lungs' tops (the centroid of their top 3
/// rows), and SAM's lungs keep them there on templates the structure adapter did not see;
/// its costophrenic angles lie on the lungs' lower lateral corners (the pixel farthest
/// down and out), whose thin tip SAM's lungs lose when drawn from an adapter's region (a
/// box around the true lung would hand SAM the corner), so they get only a fallback.
#[test]
fn the_apices_lie_on_the_lungs_tops_and_the_corners_get_a_fallback() {
    let Some(shared) =
        common::shared_data("the_apices_lie_on_the_lungs_tops_and_the_corners_get_a_fallback")
    else {
        return;
    };
    let sam = decoder();
    let ds = Dataset::open(&shared.join("chest-xr"))
        .unwrap()
        .inverted(true);
    let templates = templates_of(&ds, 5);
    let config = TrainConfig {
        shape: true,
        guided: true,
        sam_redraw: true,
        extremes: true,
        ..TrainConfig::default()
    };
    let values = scout::templates::structure_values(templates.iter().map(|(c, _)| c));
    let task = scout::templates::Task::Structures {
        values: values.clone(),
    };
    let train = |task: &scout::templates::Task| classification_adapters(task, &templates, &config);
    let mut structures = train(&task);
    scout::eval::learn_sam_redraws(&mut structures, &task, &templates, &sam).unwrap();
    assert_eq!(structures[0].sam_redraw, [true, true, false]);
    let recipe = classification_recipe(&templates, &config);
    let left_out = scout::eval::left_out_sam_masks(&structures[0], &values, recipe, &sam).unwrap();
    let drawn: Vec<Vec<u8>> = left_out
        .iter()
        .map(|t| {
            t.iter()
                .filter(|(_, m)| m.is_some())
                .map(|(v, _)| *v)
                .collect()
        })
        .collect();
    assert_eq!(
        drawn,
        vec![vec![1, 2]; 5],
        "SAM drew both lungs of every template"
    );
    let task = scout::templates::Task::Landmarks {
        names: ds.landmark_names.clone(),
        radius: 10.0,
    };
    let mut landmarks = train(&task);
    scout::eval::learn_extremes(&mut landmarks, &task, &templates, &left_out, &sam);
    let expected = |n: &str| match n {
        "right_lung_apex" => Some((1, [-1, 0], 2.0, false)),
        "left_lung_apex" => Some((2, [-1, 0], 2.0, false)),
        "right_costophrenic_angle" => Some((1, [1, -1], 0.0, true)),
        "left_costophrenic_angle" => Some((2, [1, 1], 0.0, true)),
        _ => None,
    };
    assert_eq!(landmarks[0].extremes.len(), landmarks[0].labels.len());
    for (n, e) in landmarks[0].labels.iter().zip(&landmarks[0].extremes) {
        let rule = e.map(|e| (e.structure, e.direction, e.band, e.fallback));
        assert_eq!(rule, expected(n), "{n}");
    }
}

/// Issue #7: chest-xr's costophrenic angles are the lungs' sharpest corners, a detail
/// finer than SAM's masks hold (a cell of its 256 × 256 masks covers 2 × 2 pixels of a
/// 512 × 512 radiograph): they get only a fallback rule from two templates even were SAM
/// to draw both templates' lungs exactly, while the apices, on the lungs' rounded tops,
/// keep theirs.
/// (Session 51: with two templates SAM's masks of the templates happened to keep the
/// corners within the check, and the test cases' angles lost up to half their hits.)
#[test]
fn the_corners_are_finer_than_sams_masks() {
    let Some(shared) = common::shared_data("the_corners_are_finer_than_sams_masks") else {
        return;
    };
    let sam = decoder();
    let ds = Dataset::open(&shared.join("chest-xr")).unwrap();
    let cases: Vec<_> = ds
        .cases
        .iter()
        .take(2)
        .map(|n| ds.load_case(n).unwrap())
        .collect();
    let truths = |v: u8| -> Vec<Array2<bool>> {
        cases
            .iter()
            .map(|c| c.slices[c.center].labels.as_ref().unwrap().mapv(|x| x == v))
            .collect()
    };
    for name in &ds.landmark_names {
        let v = if name.starts_with("right_") { 1 } else { 2 };
        let truths = truths(v);
        let (rows, cols) = truths[0].dim();
        assert_eq!(sam.mask_cell(rows, cols), 2.0);
        let rule = |cell| {
            let coarse: Vec<_> = truths
                .iter()
                .map(|m| scout::extremes::open(m, cell))
                .collect();
            let views: Vec<_> = cases
                .iter()
                .zip(&truths)
                .zip(&coarse)
                .map(|((c, m), coarse)| {
                    let t = &c.landmarks[name];
                    scout::extremes::TemplateView {
                        landmark: (t.row, t.column),
                        truth: m,
                        coarse,
                        sam: Some(m),
                    }
                })
                .collect();
            scout::extremes::learn(v, &views, 10.0).map(|(r, _)| r)
        };
        assert!(
            rule(0.0).is_some(),
            "{name}: a rule on the true masks alone"
        );
        let kept = rule(sam.mask_cell(rows, cols)).map(|r| (r.direction, r.band, r.fallback));
        if name.ends_with("apex") {
            assert_eq!(kept, Some(([-1, 0], 2.0, false)), "{name}");
        } else {
            // Downwards: with two templates the lowest pixel may give the corner back too.
            assert!(
                kept.is_some_and(|(d, _, fallback)| fallback && d[0] == 1),
                "{name}: {kept:?}"
            );
        }
    }
}

/// One template leaves none to train on without it: the leave-one-template-out steps
/// (`--extremes`' SAM masks, `--calibrate`'s offsets) learn nothing instead of failing (each
/// failed with "no training material" before), so the shipped chest options train from a
/// single template (the protocol's N = 1).
#[test]
fn one_template_leaves_nothing_out() {
    let tmp = tempfile::tempdir().unwrap();
    common::synthetic_image_dataset(&tmp.path().join("ds"), 2);
    let ds = Dataset::open(&tmp.path().join("ds")).unwrap();
    let templates = templates_of(&ds, 1);
    let config = TrainConfig {
        steps: 100,
        shape: true,
        extremes: true,
        calibrate: true,
        ..TrainConfig::default()
    };
    let values = scout::templates::structure_values(templates.iter().map(|(c, _)| c));
    let train = |task: &scout::templates::Task| {
        classification_adapters(task, &templates, &config).remove(0)
    };
    let mut structures = train(&scout::templates::Task::Structures {
        values: values.clone(),
    });
    // As if SAM redrew every structure: the masks are then drawn for each template left out.
    structures.sam_redraw = vec![true; structures.labels.len()];
    let recipe = classification_recipe(&templates, &config);
    let left_out = scout::eval::left_out_sam_masks(&structures, &values, recipe, &decoder())
        .expect("one template: no masks to draw, no error");
    assert_eq!(left_out, vec![Vec::new()]);
    let task = scout::templates::Task::Landmarks {
        names: ds.landmark_names.clone(),
        radius: 10.0,
    };
    let mut landmarks = train(&task);
    scout::eval::learn_calibration(&mut landmarks, &task, recipe, &left_out)
        .expect("one template: no offsets to learn, no error");
    assert!(landmarks.calibration.is_empty());
}

/// `--calibrate`: each landmark's offset is the shrunk mean of its errors over the
/// templates, each placed by an adapter trained on the others, as the agent would place
/// it; here the steps are the layout's choice of regions alone, taken again by hand.
#[test]
fn calibration_pools_the_errors_of_the_templates_left_out() {
    let tmp = tempfile::tempdir().unwrap();
    common::synthetic_image_dataset(&tmp.path().join("ds"), 4);
    let ds = Dataset::open(&tmp.path().join("ds")).unwrap();
    let templates = templates_of(&ds, 4);
    let config = TrainConfig {
        steps: 100,
        shape: true,
        calibrate: true,
        ..TrainConfig::default()
    };
    let task = scout::templates::Task::Landmarks {
        names: ds.landmark_names.clone(),
        radius: 10.0,
    };
    let train = |templates: &[(Case, Vec<FeatureMap>)]| {
        classification_adapters(&task, templates, &config).remove(0)
    };
    let mut adapter = train(&templates);
    let recipe = classification_recipe(&templates, &config);
    scout::eval::learn_calibration(&mut adapter, &task, recipe, &[]).unwrap();
    let mut errors = vec![Vec::new(); adapter.labels.len()];
    for (i, (case, fms)) in templates.iter().enumerate() {
        let mut others = templates.clone();
        others.remove(i);
        let a = train(&others);
        let fm = &fms[case.center];
        let (rows, cols) = case.slices[case.center].pixels.dim();
        let up = scout::postprocess::upsample_scores(&a.scores(fm).unwrap(), rows, cols);
        let found = scout::postprocess::shaped_findings(&up, a.shape.as_ref(), None);
        for ((name, f), e) in a.labels.iter().zip(&found).zip(errors.iter_mut()) {
            let (f, t) = (f.as_ref().unwrap(), &case.landmarks[name]);
            e.push((f.point.0 - t.row, f.point.1 - t.column));
        }
    }
    let want: Vec<Option<[f64; 2]>> = errors
        .iter()
        .map(|e| scout::calibration::learn(e))
        .collect();
    eprintln!(
        "left-out errors {errors:?}: offsets {:?}",
        adapter.calibration
    );
    assert_eq!(adapter.calibration.len(), want.len());
    for (got, want) in adapter.calibration.iter().zip(&want) {
        let (got, want) = (got.unwrap(), want.unwrap());
        assert!((got[0] - want[0]).abs() < 1e-9 && (got[1] - want[1]).abs() < 1e-9);
    }
    assert!(
        want.iter().flatten().any(|o| o[0].hypot(o[1]) > 0.1),
        "no offset to take off: the check has no teeth"
    );
    assert_eq!(adapter.file_format(), 3);
    // The agent's steps are checked against `scout eval`'s in `e2e.rs` (chest).
    // `scout eval` refuses what the left-out templates would not be placed like.
    for (binary, align) in [(true, None), (false, Some(scout::eval::AlignMode::Prior))] {
        let opts = EvalOptions {
            binary,
            align,
            train: config.clone(),
            ..options(Method::Classification)
        };
        let err = evaluate(&ds, backbone(), &cache(), None, &opts).unwrap_err();
        assert!(err.to_string().contains("--calibrate"), "{err}");
    }
}

/// The shipped adapters: listed with their SHA-256 and provenance in
/// models/adapters/adapters.toml, and loadable against the backbone each names.
#[test]
fn shipped_adapters_match_their_manifest_and_backbone() {
    use sha2::Digest;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/adapters");
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.join("adapters.toml")).unwrap()).unwrap();
    let adapters = manifest["adapters"].as_table().unwrap();
    for name in ["spine", "chest", "chest-landmarks"] {
        assert!(adapters.contains_key(name), "{name}");
    }
    let models =
        Manifest::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/models.toml")).unwrap();
    for (name, entry) in adapters {
        let file = dir.join(entry["file"].as_str().unwrap());
        let bytes = std::fs::read(&file).unwrap();
        let sha: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            sha,
            entry["sha256"].as_str().unwrap(),
            "{name}: {} changed",
            file.display()
        );
        assert!(!entry["provenance"].as_str().unwrap().is_empty());
        let id = entry["backbone"].as_str().unwrap();
        let bundle = scout::train::Bundle::load(&file, &Backbone::load(&models, id).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(bundle.tasks.len(), 2, "{name}: landmarks and structures");
    }
}

/// Issue #7: the templates' landmark layout (pictorial structures over candidate regions)
/// plus context features fix most off-by-one-vertebra misses of the plain adapter.
/// Slice k* of each test case; measured mean acc@10 0.69 → 0.89.
#[test]
fn shape_and_context_raise_spine_landmark_accuracy() {
    let Some(shared) = common::shared_data("shape_and_context_raise_spine_landmark_accuracy")
    else {
        return;
    };
    let ds = Dataset::open(&shared.join("spine-mr")).unwrap();
    let run = |shape: bool, context: scout::adapter::Context| {
        let opts = EvalOptions {
            templates: 5,
            train: TrainConfig {
                shape,
                context,
                ..TrainConfig::default()
            },
            only: Some(TaskKind::Landmarks),
            localizer_only: true,
            ..options(Method::Contrastive)
        };
        let r = report(&ds, opts);
        let m = &r.landmarks_2d;
        m.values().map(|s| s.accuracy).sum::<f64>() / m.len() as f64
    };
    let plain = run(false, Default::default());
    let best = run(
        true,
        scout::adapter::Context {
            pools: vec![3, 9],
            global: false,
            position: true,
        },
    );
    assert!(
        best >= 0.85 && best > plain + 0.1,
        "plain {plain:.2}, shape+context {best:.2}"
    );
}

/// Issue #7: the landmarks the adapter found no region for on slice k* (mostly L2/L3,
/// which look like their neighbours) are placed — by the templates aligned to each test
/// case (idea 3), or by the layout from the found neighbours (`layout_fill`) — so every
/// landmark is reported and more of them are right. Measured (2D mean acc@10, absent):
/// plain 0.89 / 7, layout fill 0.99 / 0 on earlier sessions' VM (AVX-512); plain
/// 0.85 / 6, aligned 0.96 / 0, layout fill 0.92 / 0 on one with AVX2 only, same code
/// (most likely tract's kernels, picked by the CPU: features differ in the last digits
/// and retraining moves single cases), so the floor is the goal, 0.90.
#[test]
fn alignment_or_layout_fills_absent_spine_landmarks() {
    let Some(shared) = common::shared_data("alignment_or_layout_fills_absent_spine_landmarks")
    else {
        return;
    };
    let ds = Dataset::open(&shared.join("spine-mr")).unwrap();
    let run = |align: Option<scout::eval::AlignMode>, layout_fill: bool| {
        let opts = EvalOptions {
            templates: 5,
            align,
            train: TrainConfig {
                layout_fill,
                ..common::shipped_spine_config(false)
            },
            only: Some(TaskKind::Landmarks),
            localizer_only: true,
            ..options(Method::Contrastive)
        };
        let r = report(&ds, opts);
        let m = &r.landmarks_2d;
        let acc = m.values().map(|s| s.accuracy).sum::<f64>() / m.len() as f64;
        let absent: usize = m.values().map(|s| s.absent).sum();
        (acc, absent)
    };
    let (plain, plain_absent) = run(None, false);
    let (filled, filled_absent) = run(Some(scout::eval::AlignMode::Fill), false);
    assert!(plain_absent > 0, "nothing to fill: the test lost its point");
    assert_eq!(filled_absent, 0);
    assert!(
        filled >= 0.90 && filled > plain,
        "2D acc@10: plain {plain:.2} ({plain_absent} absent), aligned {filled:.2}"
    );
    let (laid_out, laid_out_absent) = run(None, true);
    assert_eq!(laid_out_absent, 0);
    assert!(
        laid_out >= 0.90 && laid_out > plain,
        "2D acc@10: plain {plain:.2} ({plain_absent} absent), layout fill {laid_out:.2}"
    );
}

/// The chest adapters' landmark layout (`--shape`), the option every chest variant keeps.
fn chest_config() -> TrainConfig {
    TrainConfig {
        shape: true,
        ..TrainConfig::default()
    }
}

/// A landmark's figures are exactly what they were (an option that must not touch it).
fn assert_same_landmark(
    a: &scout::eval::LandmarkStats,
    b: &scout::eval::LandmarkStats,
    name: &str,
) {
    assert_eq!(
        (a.accuracy, a.median_error, a.p90_error, a.absent),
        (b.accuracy, b.median_error, b.p90_error, b.absent),
        "{name}"
    );
}

/// The protocol on chest-xr with contrastive adapters trained as `train` says, for the
/// tasks `only` names (all when None). The chest tests read the data set as stored, as
/// negatives (air bright), the way their claims were measured; the shipped chest adapter
/// learns from the positives (`--negatives`). Measured on the positives (2026-12-03): the
/// augmentation and the votes keep their claims (mean acc@10 0.75 → 0.78, left lung IoU
/// 78.8 → 82.1; votes mean 0.78 → 0.84), the border negatives gain the heart 1.7 (75.1 →
/// 76.8) instead of more than 2, and the patches do not sharpen the apices (left median
/// 5.12 → 5.17 px, right acc@10 0.94 → 0.79).
fn chest_report(
    ds: &Dataset,
    train: TrainConfig,
    only: Option<TaskKind>,
) -> std::sync::Arc<scout::eval::Report> {
    report(
        ds,
        EvalOptions {
            templates: 5,
            train,
            only,
            ..options(Method::Contrastive)
        },
    )
}

/// The protocol's report, and its table on stderr. Several tests start from the same
/// training, and on a slow 2-core CI machine one evaluation takes a minute or more, so
/// each (data set, options) is evaluated once per test binary; training is seeded, so a
/// second run would give the same report.
fn report(ds: &Dataset, opts: EvalOptions) -> std::sync::Arc<scout::eval::Report> {
    type Slot = std::sync::Arc<OnceLock<std::sync::Arc<scout::eval::Report>>>;
    static REPORTS: OnceLock<std::sync::Mutex<std::collections::HashMap<String, Slot>>> =
        OnceLock::new();
    let key = format!("{:?} {} {opts:?}", ds.dir, ds.negatives);
    // The map's lock is held only to find the slot: different reports are computed in
    // parallel, a test asking for one being computed waits for it.
    let slot = REPORTS
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(key)
        .or_default()
        .clone();
    slot.get_or_init(|| {
        let r = evaluate(ds, backbone(), &cache(), None, &opts).unwrap();
        eprint!("{}", scout::eval::table(&r));
        std::sync::Arc::new(r)
    })
    .clone()
}

/// Issue #7: the templates' intensity patches refine the landmarks they prove themselves
/// on (leave-one-template-out: on chest-xr the lung apices, not the costophrenic angles,
/// whose look varies too much), and leave the others exactly as they were.
#[test]
fn template_patches_sharpen_the_lung_apices_and_leave_the_rest_alone() {
    let Some(shared) =
        common::shared_data("template_patches_sharpen_the_lung_apices_and_leave_the_rest_alone")
    else {
        return;
    };
    let ds = Dataset::open(&shared.join("chest-xr")).unwrap();
    let landmarks = Some(TaskKind::Landmarks);
    // All tasks: the same report as the augmentation test's baseline (landmarks are
    // trained and measured before, and apart from, the structures).
    let plain = chest_report(&ds, chest_config(), None).landmarks.clone();
    let refined = chest_report(
        &ds,
        TrainConfig {
            patches: true,
            ..chest_config()
        },
        landmarks,
    )
    .landmarks
    .clone();
    let hits = |m: &std::collections::BTreeMap<String, scout::eval::LandmarkStats>| {
        ["left_lung_apex", "right_lung_apex"]
            .iter()
            .map(|n| m[*n].accuracy * m[*n].cases as f64)
            .sum::<f64>()
    };
    for apex in ["left_lung_apex", "right_lung_apex"] {
        let (a, b) = (&plain[apex], &refined[apex]);
        assert!(
            b.median_error.unwrap() < a.median_error.unwrap() - 1.0,
            "{apex}: median error {:?} -> {:?}",
            a.median_error,
            b.median_error
        );
    }
    assert!(
        hits(&refined) > hits(&plain),
        "apex hits {} -> {}",
        hits(&plain),
        hits(&refined)
    );
    for angle in ["left_costophrenic_angle", "right_costophrenic_angle"] {
        assert_same_landmark(&plain[angle], &refined[angle], angle);
    }
}

/// Issue #7: every cell of a landmark's region votes for where it sees the point (offsets
/// learned from the templates' cells) instead of the region's centroid: on chest-xr the
/// lung corners, whose regions reach further into the lung than below it, come closer.
/// With augmented templates, as both shipped adapters are trained: from the 5 templates
/// alone (~190 cells per landmark for 256 features) the offsets are not learned well
/// enough (measured: mean acc@10 0.60 → 0.59). Measured with the cells near the voted
/// point voting again until it settles: mean 0.655 → 0.740 (costophrenic angles L 0.41 →
/// 0.58, R 0.60 → 0.77); the region's votes alone gave 0.65 → 0.70.
#[test]
fn region_votes_bring_the_lung_corners_closer() {
    let Some(shared) = common::shared_data("region_votes_bring_the_lung_corners_closer") else {
        return;
    };
    let ds = Dataset::open(&shared.join("chest-xr")).unwrap();
    let landmarks = Some(TaskKind::Landmarks);
    let augmented = TrainConfig {
        augment: true,
        ..chest_config()
    };
    // All tasks: the same report as the border test's baseline.
    let plain = chest_report(&ds, augmented.clone(), None).landmarks.clone();
    let voted = chest_report(
        &ds,
        TrainConfig {
            votes: true,
            ..augmented
        },
        landmarks,
    )
    .landmarks
    .clone();
    let mean = |m: &std::collections::BTreeMap<String, scout::eval::LandmarkStats>| {
        m.values().map(|s| s.accuracy).sum::<f64>() / m.len() as f64
    };
    assert!(
        mean(&voted) > mean(&plain) + 0.06,
        "mean acc@10 {:.3} -> {:.3}",
        mean(&plain),
        mean(&voted)
    );
    for angle in ["left_costophrenic_angle", "right_costophrenic_angle"] {
        let (a, b) = (&plain[angle], &voted[angle]);
        assert!(
            b.median_error.unwrap() < a.median_error.unwrap(),
            "{angle}: median error {:?} -> {:?}",
            a.median_error,
            b.median_error
        );
        assert_eq!(
            a.absent, b.absent,
            "{angle}: votes move points, never drop them"
        );
    }
}

/// Issue #7: training also on rotated, scaled and re-gammaed copies of the templates
/// (what the shipped chest adapter does) finds more lung corners and draws the lungs
/// better on patients the templates never saw.
#[test]
fn augmented_templates_raise_chest_landmarks_and_lung_iou() {
    let Some(shared) =
        common::shared_data("augmented_templates_raise_chest_landmarks_and_lung_iou")
    else {
        return;
    };
    let ds = Dataset::open(&shared.join("chest-xr")).unwrap();
    let run = |augment: bool| {
        let r = chest_report(
            &ds,
            TrainConfig {
                augment,
                ..chest_config()
            },
            None,
        );
        let m = &r.landmarks;
        let acc = m.values().map(|s| s.accuracy).sum::<f64>() / m.len() as f64;
        (acc, r.segmentation["2"].iou)
    };
    let (plain, plain_lung) = run(false);
    let (augmented, augmented_lung) = run(true);
    assert!(
        augmented > plain + 0.02,
        "mean acc@10 {plain:.3} -> {augmented:.3}"
    );
    assert!(
        augmented_lung > plain_lung + 3.0,
        "left lung IoU {plain_lung:.1} -> {augmented_lung:.1}"
    );
}

/// Issue #7: negatives drawn from just outside each structure teach the adapter where the
/// structure ends: the heart, whose border is faint on a radiograph, is drawn better
/// (measured 66.4 → 71.1), the lungs no worse, and the landmarks (disks around points, no
/// edge to learn) are untouched.
/// Three claims on one chain of trainings (as the shipped chest adapter is made, step by
/// step): border negatives sharpen the structures and leave the landmarks alone; an
/// ensemble with a classifier then raises the landmarks and keeps the structures (their
/// mean, none more than 1.5 lower); the
/// structure atlas then draws the heart better and keeps the lungs.
#[test]
fn border_negatives_an_ensemble_and_an_atlas_sharpen_chest_adapters() {
    let Some(shared) =
        common::shared_data("border_negatives_an_ensemble_and_an_atlas_sharpen_chest_adapters")
    else {
        return;
    };
    let ds = Dataset::open(&shared.join("chest-xr")).unwrap();
    // As the shipped chest adapter is trained: with augmented templates (without them
    // the 5 templates are too little material for the border to matter: heart 66.9 → 67.0).
    let augmented = TrainConfig {
        augment: true,
        ..chest_config()
    };
    let plain = chest_report(&ds, augmented.clone(), None);
    let bordered_config = TrainConfig {
        borders: true,
        ..augmented
    };
    let bordered = chest_report(&ds, bordered_config.clone(), None);
    let iou = |r: &scout::eval::Report, v: &str| r.segmentation[v].iou;
    // The heart (label 3) gains more than 2 IoU points, the lungs lose at most 0.5.
    let heart_up_lungs_kept = |before: &scout::eval::Report, after: &scout::eval::Report| {
        assert!(
            iou(after, "3") > iou(before, "3") + 2.0,
            "heart IoU {:.1} -> {:.1}",
            iou(before, "3"),
            iou(after, "3")
        );
        for lung in ["1", "2"] {
            assert!(
                iou(after, lung) > iou(before, lung) - 0.5,
                "lung {lung} IoU {:.1} -> {:.1}",
                iou(before, lung),
                iou(after, lung)
            );
        }
    };
    heart_up_lungs_kept(&plain, &bordered);
    for (name, a) in &plain.landmarks {
        assert_same_landmark(a, &bordered.landmarks[name], name);
    }

    // Measured (posterised images smoothed, 2026-12-02): IoU 90.6 / 87.3 / 69.2 -> 92.1 /
    // 88.0 / 73.4 with borders; mean acc@10 0.655 -> 0.710, IoU -> 91.2 / 88.6 / 74.6 with
    // the ensemble (before the smoothing no structure lost 0.5; now the right lung gives
    // 0.9 of what the heart and the left lung gain).
    let ensemble = chest_report(
        &ds,
        TrainConfig {
            ensemble: vec![Method::Classification],
            ..bordered_config.clone()
        },
        None,
    );
    let mean_acc = |r: &scout::eval::Report| {
        r.landmarks.values().map(|s| s.accuracy).sum::<f64>() / r.landmarks.len() as f64
    };
    assert!(
        mean_acc(&ensemble) > mean_acc(&bordered) + 0.03,
        "mean acc@10 {:.3} -> {:.3}",
        mean_acc(&bordered),
        mean_acc(&ensemble)
    );
    let mean_iou = |r: &scout::eval::Report| (iou(r, "1") + iou(r, "2") + iou(r, "3")) / 3.0;
    assert!(
        mean_iou(&ensemble) >= mean_iou(&bordered),
        "mean IoU {:.2} -> {:.2}",
        mean_iou(&bordered),
        mean_iou(&ensemble)
    );
    for v in ["1", "2", "3"] {
        assert!(
            iou(&ensemble, v) > iou(&bordered, v) - 1.5,
            "structure {v} IoU {:.1} -> {:.1}",
            iou(&bordered, v),
            iou(&ensemble, v)
        );
    }

    // The structure atlas cuts the heart's spill into the abdomen and the great vessels
    // and fills holes. Measured: 87.8 / 86.1 / 72.5 -> 88.1 / 86.3 / 76.2; with posterised
    // images smoothed 91.2 / 88.6 / 74.6 -> 92.0 / 88.4 / 78.5.
    let atlas = chest_report(
        &ds,
        TrainConfig {
            ensemble: vec![Method::Classification],
            atlas: true,
            ..bordered_config
        },
        Some(TaskKind::Structures),
    );
    heart_up_lungs_kept(&ensemble, &atlas);
}

/// Issue #7: the templates' layout of the vertebral bodies (part of `--shape`) gives a
/// body the arg-max left to no label or to a look-alike neighbour its place back; bodies
/// found where the layout expects them keep their masks; fragment merging then makes them
/// whole. Shipped spine configuration without augmentation, slice k* of each test case
/// (what the agent analyses); measured mean IoU 60.6 → 65.4 → 74.5 (over all 9 slices
/// before: 55.7 → 59.7 → 66.7).
#[test]
fn structure_layout_puts_spine_bodies_back_in_place() {
    let Some(shared) = common::shared_data("structure_layout_puts_spine_bodies_back_in_place")
    else {
        return;
    };
    let ds = Dataset::open(&shared.join("spine-mr")).unwrap();
    let ious = |shape: bool, fragments: bool| {
        let opts = EvalOptions {
            templates: 5,
            train: TrainConfig {
                shape,
                fragments,
                ..common::shipped_spine_config(false)
            },
            only: Some(TaskKind::Structures),
            localizer_only: true,
            ..options(Method::Contrastive)
        };
        let r = report(&ds, opts);
        assert!(
            r.landmarks.is_empty(),
            "--only structures measured landmarks"
        );
        r.segmentation.values().map(|s| s.iou).collect::<Vec<f64>>()
    };
    let (plain, laid_out) = (ious(false, false), ious(true, false));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        mean(&laid_out) > mean(&plain) + 2.0,
        "mean IoU {plain:?} -> {laid_out:?}"
    );
    for (a, b) in plain.iter().zip(&laid_out) {
        assert!(*b > a - 1.0, "a body lost: {plain:?} -> {laid_out:?}");
    }
    // With `--fragments` each body also takes the parts its neighbours' scores won but
    // their regions did not. Measured: 68.7 / 63.0 / 50.5 / 73.0 / 71.9 -> 74.7 / 76.2 /
    // 69.9 / 74.5 / 77.1.
    let whole = ious(true, true);
    assert!(
        mean(&whole) > mean(&laid_out) + 3.0,
        "mean IoU {laid_out:?} -> {whole:?}"
    );
    for (a, b) in laid_out.iter().zip(&whole) {
        assert!(*b > a - 1.0, "a body lost: {laid_out:?} -> {whole:?}");
    }
}
