//! Where an adapter's time per slice goes:
//! `cargo run --release --example profile_adapter -- models/adapters/spine.adapter FEATURES.fm [BACKBONE]`
//! (a feature map from the cache, e.g. scout-data/features/<model>/<hash>.fm; BACKBONE: the
//! manifest id the adapter was trained on, default the manifest's default).
use scout::adapter::context_rows;
use scout::backbone::{Backbone, FeatureMap, Manifest};
use scout::features::FeatureCache;
use scout::postprocess;
use std::path::Path;
use std::time::Instant;

/// A landmark task's names, the points it found and its radius.
type Found = (Vec<String>, Vec<Option<(f64, f64)>>, f64);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (bundle, fm_path, id) = match args.as_slice() {
        [_, b, f, rest @ ..] => (Path::new(b), Path::new(f), rest.first()),
        _ => return Err("usage: profile_adapter ADAPTER FEATURES.fm [BACKBONE]".into()),
    };
    let manifest = Manifest::load(Path::new("models/models.toml"))?;
    let backbone = Backbone::load(&manifest, id.unwrap_or(&manifest.default_backbone))?;
    let bundle = scout::train::Bundle::load(bundle, &backbone)?;
    // The cache's layout is <root>/<model sha256>/<key>.fm.
    let root = fm_path
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    let key = fm_path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let fm = FeatureCache::new(root, &backbone)
        .load(key)
        .ok_or_else(|| format!("{}: not a feature map of this backbone", fm_path.display()))?;
    let (rows, cols) = (fm.image_rows, fm.image_columns);
    const N: u32 = 20;
    let whole = fm;
    // The landmarks found on this map (layout and fill, as the agent places them before
    // the votes): a structure adapter with a window is timed within their box too.
    let mut found: Vec<Found> = Vec::new();
    for (task, adapter) in &bundle.tasks {
        if let scout::templates::Task::Landmarks { names, radius } = task {
            let fm = adapter.features(&whole);
            let up = postprocess::upsample_scores(&adapter.scores(&fm)?, rows, cols);
            let mut f = postprocess::shaped_findings(&up, adapter.shape.as_ref(), None);
            if let (Some(shape), true) = (&adapter.shape, adapter.train.layout_fill) {
                postprocess::fill_from_layout(&mut f, shape, *radius, (rows, cols));
            }
            let points = f.iter().map(|f| f.as_ref().map(|f| f.point)).collect();
            found.push((names.clone(), points, *radius));
        }
    }
    for (task, adapter) in &bundle.tasks {
        let fm = adapter.features(&whole);
        let time = |f: &mut dyn FnMut()| {
            f();
            let t = Instant::now();
            for _ in 0..N {
                f();
            }
            t.elapsed().as_secs_f64() * 1000.0 / N as f64
        };
        let ctx = time(&mut || {
            std::hint::black_box(context_rows(&fm, &adapter.train.context));
        });
        let scores = adapter.scores(&fm)?;
        // A hypercolumn's coarse channels are scored on their own grid; the same values
        // taken as one grid (the code before that) are timed beside it, alternately.
        let one_grid = FeatureMap::new(fm.data.clone(), rows, cols);
        let mut sc = 0.0;
        let mut alone = Vec::new();
        for _ in 0..2 {
            sc = time(&mut || {
                std::hint::black_box(adapter.scores(&fm).ok());
            });
            if !fm.coarse.is_empty() {
                let with = |m: &FeatureMap| {
                    if adapter.votes.is_empty() {
                        adapter.scores(m).map(|_| ())
                    } else {
                        adapter.scores_and_rows(m).map(|_| ())
                    }
                };
                let split = time(&mut || {
                    std::hint::black_box(with(&fm).ok());
                });
                let one = time(&mut || {
                    std::hint::black_box(with(&one_grid).ok());
                });
                alone.push(format!("{split:.1} / {one:.1}"));
            }
        }
        let sc_grids = if alone.is_empty() {
            String::new()
        } else {
            let what = if adapter.votes.is_empty() {
                "scores"
            } else {
                "scores with rows"
            };
            format!(
                " ({what}, coarse channels on their grid / as one grid: {} ms)",
                alone.join(", ")
            )
        };
        let window = adapter.window.as_ref().and_then(|w| {
            let (names, points, radius) = found.first()?;
            w.cells(
                &w.points_of(names, points),
                *radius,
                (rows, cols),
                fm.grid(),
            )
        });
        let windowed = match &window {
            Some(window) => {
                // Alternated with the whole slice's, three times each.
                let mut pairs = Vec::new();
                for _ in 0..3 {
                    let within = time(&mut || {
                        std::hint::black_box(adapter.scores_within(&fm, window).ok());
                    });
                    let all = time(&mut || {
                        std::hint::black_box(adapter.scores(&fm).ok());
                    });
                    pairs.push(format!("{within:.1} / {all:.1}"));
                }
                format!(
                    ", scores within the landmarks' window ({:.1} % of the cells) / whole: {} ms",
                    100.0 * window.share_of(fm.grid()),
                    pairs.join(", ")
                )
            }
            None => String::new(),
        };
        let up = postprocess::upsample_scores(&scores, rows, cols);
        let ups = time(&mut || {
            std::hint::black_box(postprocess::upsample_scores(&scores, rows, cols));
        });
        let post = time(&mut || {
            std::hint::black_box(match &adapter.shape {
                Some(shape) => postprocess::shaped_findings(&up, Some(shape), None),
                None => postprocess::findings(&up),
            });
        });
        // The refinement's cost does not depend on the guide's values: any plane will do.
        let structures = matches!(task, scout::templates::Task::Structures { .. });
        let edges = if adapter.train.guided && structures {
            let guide = up.index_axis(ndarray::Axis(0), 0).to_owned();
            let ms = time(&mut || {
                let mut s = up.clone();
                postprocess::refine_to_edges(&mut s, &guide, fm.grid().0);
                std::hint::black_box(s);
            });
            format!(", edge refinement {ms:.1} ms")
        } else {
            String::new()
        };
        // Taking the structures: as `structure_findings` alone, then with the adapter's
        // atlas, enclosed structures, fragment merging and convex structures, where it has
        // them.
        let atlas = if structures
            && (adapter.atlas.is_some()
                || adapter.enclosed.is_some()
                || adapter.train.fragments
                || !adapter.convex.is_empty())
        {
            let with = |atlas, enclosed, fragments, outlines: scout::convex::Outlines| {
                time(&mut || {
                    let mut s = up.clone();
                    let f = postprocess::structures(
                        &mut s,
                        adapter.shape.as_ref(),
                        atlas,
                        enclosed,
                        fragments,
                        outlines,
                        None,
                    );
                    std::hint::black_box(f);
                })
            };
            let none = scout::convex::Outlines::default();
            let plain = with(None, None, false, none);
            let weighed = with(adapter.atlas.as_ref(), None, false, none);
            let enclosed = with(
                adapter.atlas.as_ref(),
                adapter.enclosed.as_ref(),
                false,
                none,
            );
            let fragments = with(
                adapter.atlas.as_ref(),
                adapter.enclosed.as_ref(),
                adapter.train.fragments,
                none,
            );
            let full = with(
                adapter.atlas.as_ref(),
                adapter.enclosed.as_ref(),
                adapter.train.fragments,
                adapter.outlines(),
            );
            // The convex step alone, on what the steps before it found: its cost is below
            // the spread of the whole chain's.
            let mut taken = up.clone();
            let found = postprocess::structures(
                &mut taken,
                adapter.shape.as_ref(),
                adapter.atlas.as_ref(),
                adapter.enclosed.as_ref(),
                adapter.train.fragments,
                none,
                None,
            );
            let alone = time(&mut || {
                let mut f = found.clone();
                scout::convex::fill(&mut f, adapter.outlines(), &taken);
                std::hint::black_box(f);
            });
            // The atlas's weighing alone, on the structures found without it, less the
            // copy of the scores each run weighs.
            let atlas_alone = adapter.atlas.as_ref().map(|a| {
                let first = postprocess::structure_findings(&up, adapter.shape.as_ref(), None);
                let copy = time(&mut || {
                    std::hint::black_box(up.clone());
                });
                let weigh = time(&mut || {
                    let mut s = up.clone();
                    a.apply(&mut s, &first);
                    std::hint::black_box(s);
                });
                format!(", the atlas's weighing alone {:.2} ms", weigh - copy)
            });
            format!(
                ", structures {plain:.1} ms, with the atlas {weighed:.1} ms, the enclosed {enclosed:.1} ms, fragments {fragments:.1} ms, and convex {full:.1} ms (the convex step alone {alone:.2} ms{})",
                atlas_alone.unwrap_or_default()
            )
        } else {
            String::new()
        };
        // The patient's appearance: learned once per stack (its centre slice), applied to
        // every slice's scores, within the window where the adapter has one.
        let appearance = if adapter.train.appearance && structures {
            let sure = match &window {
                Some(window) => adapter.scores_within(&fm, window)?,
                None => scores.clone(),
            };
            let learn = time(&mut || {
                std::hint::black_box(scout::appearance::Appearance::learn(&sure, &fm));
            });
            match scout::appearance::Appearance::learn(&sure, &fm) {
                Some(a) => {
                    let weigh = time(&mut || {
                        let mut s = sure.clone();
                        a.weigh(&mut s, &fm);
                        std::hint::black_box(s);
                    });
                    let copy = time(&mut || {
                        std::hint::black_box(sure.clone());
                    });
                    format!(", appearance learned {learn:.1} ms, applied {weigh:.1} ms (a copy of the scores {copy:.2} ms of it)")
                }
                None => format!(", appearance not learned on this map ({learn:.1} ms)"),
            }
        } else {
            String::new()
        };
        let votes = if adapter.votes.is_empty() {
            String::new()
        } else {
            let found = match &adapter.shape {
                Some(shape) => postprocess::shaped_findings(&up, Some(shape), None),
                None => postprocess::findings(&up),
            };
            // The standardised rows come with the scores (`scores_and_rows`).
            let (_, rows) = adapter.scores_and_rows(&fm)?;
            let ms = time(&mut || {
                let mut f = found.clone();
                scout::votes::refine_findings(
                    &mut f,
                    &adapter.votes,
                    rows.view(),
                    &fm,
                    scores.view(),
                );
                std::hint::black_box(f);
            });
            format!(", votes {ms:.1} ms")
        };
        println!(
            "{task:?}: context rows {ctx:.1} ms, scores (incl. context) {sc:.1} ms{sc_grids}{windowed}, upsample to {rows}×{cols} {ups:.1} ms, findings {post:.1} ms{edges}{atlas}{appearance}{votes}"
        );
    }
    Ok(())
}
