//! The adapters stage of the agent: loads each rule's backbone and adapter bundle once,
//! and turns a completed series into one `SeriesResult` per matching rule. Features come
//! from one `FeatureStore` per backbone, shared by the rules on it, so slices computed
//! while the series arrived are not computed again.

use crate::adapter::AdapterError;
use crate::align::Prior;
use crate::backbone::{self, Backbone, BackboneError, Manifest};
use crate::config::Config;
use crate::features::FeatureStore;
use crate::instance::InstanceMeta;
use crate::patch;
use crate::postprocess;
use crate::results::{Landmark, LandmarkPoint, SeriesResult, SourceImage, StackResult, Structure};
use crate::rules::{Candidate, Rule, Slices};
use crate::series::{Series, Stack};
use crate::templates::{Task, TaskKind};
use crate::train::Bundle;
use crate::votes;
use crate::window::Cells;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    #[error(transparent)]
    Backbone(#[from] BackboneError),
    #[error("rule {rule}: adapter {path}: {source}")]
    Adapter {
        rule: String,
        path: PathBuf,
        source: Box<AdapterError>,
    },
    #[error("rule {rule}: {detail}")]
    Rule { rule: String, detail: String },
    #[error("rules cannot be loaded:\n  - {}", .0.join("\n  - "))]
    Rules(Vec<String>),
    #[error("rule {rule}: instance {sop_instance_uid}: {source}")]
    Instance {
        rule: String,
        sop_instance_uid: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A rule's adapter bundle, checked against the rule's backbone and codes.
/// `decoders`: SAM decoders loaded so far, by decoder id, shared by the rules on backbones
/// that run the same encoder.
fn load_rule(
    rule: &Rule,
    store: Arc<FeatureStore>,
    manifest: &Manifest,
    decoders: &mut Vec<(String, Arc<crate::sam::Sam>)>,
) -> Result<LoadedRule, AnalysisError> {
    let bb = store.backbone();
    let err = |detail: String| AnalysisError::Rule {
        rule: rule.name.clone(),
        detail,
    };
    let bundle = Bundle::load(&rule.adapter, bb).map_err(|source| AnalysisError::Adapter {
        rule: rule.name.clone(),
        path: rule.adapter.clone(),
        source: Box::new(source),
    })?;
    let bytes = std::fs::read(&rule.adapter)
        .map_err(|e| err(format!("{}: {e}", rule.adapter.display())))?;
    let kinds: Vec<TaskKind> = bundle.tasks.iter().map(|(t, _)| t.kind()).collect();
    if let Some(k) = rule.tasks.iter().flatten().find(|k| !kinds.contains(k)) {
        return Err(err(format!(
            "tasks names the {}, which the adapter does not have",
            k.name()
        )));
    }
    let mut missing = Vec::new();
    for (task, _) in bundle.tasks.iter().filter(|(t, _)| rule.reports(t.kind())) {
        match task {
            Task::Landmarks { names, .. } => missing.extend(
                names
                    .iter()
                    .filter(|n| !rule.landmarks.contains_key(*n))
                    .map(|n| format!("landmarks.{n}")),
            ),
            Task::Structures { values } => missing.extend(
                values
                    .iter()
                    .filter(|v| !rule.structures.contains_key(&v.to_string()))
                    .map(|v| format!("structures.{v}")),
            ),
        }
    }
    if !missing.is_empty() {
        return Err(err(format!(
            "the adapter has labels without a code in the rule: {}",
            missing.join(", ")
        )));
    }
    let reports = match &rule.tasks {
        None => String::new(),
        Some(tasks) => {
            let names: Vec<&str> = tasks.iter().map(|k| k.name()).collect();
            format!("; reports its {} only", names.join(" and "))
        }
    };
    log::info!(
        "rule {}: adapter {} ({}{reports})",
        rule.name,
        rule.adapter.display(),
        bundle.summary()
    );
    // Loaded only for an adapter that has SAM redraw a structure: a missing decoder is then
    // the rule's error at start-up, not a mask drawn otherwise than measured.
    let sam = if bundle
        .tasks
        .iter()
        .any(|(_, a)| a.sam_redraw.contains(&true))
    {
        let redraw = |e: BackboneError| err(format!("the adapter has SAM redraw structures: {e}"));
        let id = crate::sam::Sam::decoder_for(manifest, bb.id()).map_err(redraw)?;
        match decoders.iter().find(|(d, _)| *d == id) {
            Some((_, sam)) => Some(sam.clone()),
            None => {
                let sam = Arc::new(crate::sam::Sam::load(manifest, &id).map_err(redraw)?);
                decoders.push((id, sam.clone()));
                Some(sam)
            }
        }
    } else {
        None
    };
    // A task's results leave the box only with their codes: those of a task the rule does
    // not report are dropped, so that nothing of it is reported.
    let mut rule = rule.clone();
    if !rule.reports(TaskKind::Landmarks) {
        rule.landmarks.clear();
    }
    if !rule.reports(TaskKind::Structures) {
        rule.structures.clear();
    }
    Ok(LoadedRule {
        rule,
        bundle,
        bundle_sha: backbone::hex(&Sha256::digest(&bytes))[..16].to_string(),
        store,
        sam,
    })
}

struct LoadedRule {
    rule: Rule,
    bundle: Bundle,
    /// First 16 hex digits of the bundle file's SHA-256: which adapter made a result.
    bundle_sha: String,
    /// Features from the rule's backbone.
    store: Arc<FeatureStore>,
    /// SAM's decoder, for an adapter that has it redraw structures.
    sam: Option<Arc<crate::sam::Sam>>,
}

pub struct Engine {
    /// One per backbone the rules use, in the order the rules first name them.
    stores: Vec<Arc<FeatureStore>>,
    rules: Vec<LoadedRule>,
    localizer_patterns: Vec<String>,
}

impl Engine {
    /// Loads models and adapters for the configured rules; None when there are no rules.
    /// Every adapter label must have its code in the rule, so no result goes out uncoded.
    pub fn load(config: &Config) -> Result<Option<Engine>, AnalysisError> {
        if config.rules.is_empty() {
            return Ok(None);
        }
        let manifest = Manifest::load(&config.models.manifest)?;
        let default_id = if config.models.backbone.is_empty() {
            manifest.default_backbone.clone()
        } else {
            config.models.backbone.clone()
        };
        let threads = match config.models.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        backbone::set_threads(threads);
        let mut stores: Vec<Arc<FeatureStore>> = Vec::new();
        // Backbones that did not load, with why: tried once, reported for every rule.
        let mut failed: Vec<(String, String)> = Vec::new();
        let mut decoders = Vec::new();
        let mut rules = Vec::new();
        let mut problems = Vec::new();
        for rule in &config.rules {
            let id = if rule.backbone.is_empty() {
                &default_id
            } else {
                &rule.backbone
            };
            if let Some((_, e)) = failed.iter().find(|(f, _)| f == id) {
                problems.push(format!("rule {}: backbone {id}: {e}", rule.name));
                continue;
            }
            let store = match stores.iter().find(|s| s.backbone().id() == id) {
                Some(s) => s.clone(),
                None => {
                    match Backbone::load_sharing(&manifest, id, stores.iter().map(|s| s.backbone()))
                    {
                        Ok(bb) => {
                            let s = Arc::new(FeatureStore::new(Arc::new(bb)));
                            stores.push(s.clone());
                            s
                        }
                        Err(e) => {
                            problems.push(format!("rule {}: backbone {id}: {e}", rule.name));
                            failed.push((id.clone(), e.to_string()));
                            continue;
                        }
                    }
                }
            };
            match load_rule(rule, store, &manifest, &mut decoders) {
                Ok(r) => rules.push(r),
                Err(e) => problems.push(e.to_string()),
            }
        }
        if !problems.is_empty() {
            return Err(AnalysisError::Rules(problems));
        }
        let ids: Vec<&str> = stores.iter().map(|s| s.backbone().id()).collect();
        log::info!(
            "analysis: backbone {}, {threads} threads, {} rules",
            ids.join(", "),
            rules.len()
        );
        Ok(Some(Engine {
            stores,
            rules,
            localizer_patterns: config.series.localizer_patterns.clone(),
        }))
    }

    /// The feature stores to fill as soon as this instance arrives: those of the rules
    /// that analyse every slice and could match its series (empty: none).
    pub fn prefetch_stores(&self, meta: &InstanceMeta) -> Vec<Arc<FeatureStore>> {
        if !is_image(&meta.sop_class_uid) {
            return Vec::new();
        }
        let c = Candidate::of_instance(meta, &self.localizer_patterns);
        let mut out: Vec<Arc<FeatureStore>> = Vec::new();
        for r in &self.rules {
            if r.rule.slices == Slices::All
                && r.rule.criteria.matches(&c)
                && !out.iter().any(|s| Arc::ptr_eq(s, &r.store))
            {
                out.push(r.store.clone());
            }
        }
        out
    }

    /// Whether some rule analyses every slice (only those gain from prefetching).
    pub fn has_streaming_rules(&self) -> bool {
        self.rules.iter().any(|r| r.rule.slices == Slices::All)
    }

    /// One result per matching rule, in the configuration's order, each handed to `each`
    /// as soon as its rule is done: a rule's results need not wait for the rules after it
    /// (the chest's landmarks go out before its structures are drawn on the other
    /// backbone). Features of the series are released afterwards.
    pub fn analyze(
        &self,
        series: &Series,
        mut each: impl FnMut(Result<SeriesResult, AnalysisError>),
    ) {
        for r in &self.rules {
            let stacks = matching_stacks(&r.rule, series);
            if !stacks.is_empty() {
                each(self.analyze_rule(r, series, &stacks));
            }
        }
        for store in &self.stores {
            store.forget(series.instances().map(|r| r.meta.sop_instance_uid.as_str()));
        }
    }

    fn analyze_rule(
        &self,
        lr: &LoadedRule,
        series: &Series,
        stacks: &[&Stack],
    ) -> Result<SeriesResult, AnalysisError> {
        let rule = &lr.rule;
        let mut uids: Vec<&str> = stacks
            .iter()
            .flat_map(|s| s.instances.iter().map(|r| r.meta.sop_instance_uid.as_str()))
            .collect();
        uids.sort_unstable();
        let mut h = Sha256::new();
        h.update(rule.name.as_bytes());
        for u in &uids {
            h.update(b"\n");
            h.update(u.as_bytes());
        }
        let key = backbone::hex(&h.finalize())[..32].to_string();

        // Per landmark name: (mass, patient point, stack, image, confidence, FoR).
        let mut candidates: Vec<(String, Vec<Candidate3d>)> = Vec::new();
        let mut stack_results = Vec::new();
        for (si, stack) in stacks.iter().enumerate() {
            let images: Vec<SourceImage> = stack
                .instances
                .iter()
                .map(|r| SourceImage {
                    sop_class_uid: r.meta.sop_class_uid.clone(),
                    sop_instance_uid: r.meta.sop_instance_uid.clone(),
                    geometry: r.meta.geometry.clone(),
                    path: r.path.clone(),
                })
                .collect();
            let analysed: Vec<usize> = match rule.slices {
                Slices::Center => vec![images.len() / 2],
                Slices::All => (0..images.len()).collect(),
            };
            // Templates aligned to the stack's centre slice (the localizer slice k* the
            // templates were marked on): one prior per landmark adapter, for every slice.
            let center = images.len() / 2;
            let priors: Vec<Option<Prior>> =
                if lr.bundle.tasks.iter().any(|(_, a)| !a.alignment.is_empty()) {
                    let img = &images[center];
                    let fm = lr
                        .store
                        .get(&img.sop_instance_uid, &img.path)
                        .map_err(|e| AnalysisError::Instance {
                            rule: rule.name.clone(),
                            sop_instance_uid: img.sop_instance_uid.clone(),
                            source: Box::new(e),
                        })?;
                    let t = std::time::Instant::now();
                    let p = lr
                        .bundle
                        .tasks
                        .iter()
                        .map(|(_, a)| {
                            (!a.alignment.is_empty())
                                .then(|| Prior::estimate(&a.alignment, &a.features(&fm), 1))
                        })
                        .collect();
                    log::debug!(
                        "rule {}: templates aligned to {} in {:.0} ms",
                        rule.name,
                        img.sop_instance_uid,
                        t.elapsed().as_secs_f64() * 1000.0
                    );
                    p
                } else {
                    vec![None; lr.bundle.tasks.len()]
                };
            let mut structures: Vec<Structure> = Vec::new();
            // The centre slice first: with `stack_anchor`, the structures it finds are the
            // prior of the stack's other slices and bound how far their regions reach there
            // (`stack::Anchor`), per adapter, and with `appearance` how the patient's
            // structures look there weighs every slice's scores; then outwards, each slice
            // carried, filled, bounded and (the outermost) blended by the one next in with
            // `stack_carry`, `stack_fill`, `stack_bound` and `stack_blend`.
            let mut anchors: Vec<crate::stack::Anchor> =
                lr.bundle.tasks.iter().map(|_| Default::default()).collect();
            let order = crate::stack::outwards(images.len(), center)
                .into_iter()
                .filter(|ii| analysed.contains(ii));
            // The landmarks the centre slice found (name, point, radius): with a
            // structure adapter's `window`, the stack's structures are scored around them,
            // and with its `identity` they name its structures in the centre slice.
            let mut centre_points: Vec<(String, (f64, f64), f64)> = Vec::new();
            let tasks = &lr.bundle.tasks;
            let windowed = tasks.iter().any(|(t, a)| {
                matches!(t, Task::Structures { .. }) && (a.window.is_some() || a.identity.is_some())
            });
            // SAM's masks are kept only for a landmark adapter with extremes to read.
            let keep_drawn = tasks
                .iter()
                .any(|(_, a)| a.extremes.iter().any(Option::is_some));
            // A task the rule does not report runs only in the localizer slice, and only
            // when a reported task reads it there.
            let runs = |t: &Task, ii: usize| {
                rule.reports(t.kind())
                    || ii == center
                        && match t {
                            Task::Structures { .. } => {
                                keep_drawn && rule.reports(TaskKind::Landmarks)
                            }
                            Task::Landmarks { .. } => {
                                windowed && rule.reports(TaskKind::Structures)
                            }
                        }
            };
            for ii in order {
                let img = &images[ii];
                let inst_err =
                    |source: Box<dyn std::error::Error + Send + Sync>| AnalysisError::Instance {
                        rule: rule.name.clone(),
                        sop_instance_uid: img.sop_instance_uid.clone(),
                        source,
                    };
                let on_centre_grid =
                    ii == center || images[center].geometry.same_grid(&img.geometry);
                if !on_centre_grid {
                    log::debug!(
                        "rule {}: {} is off the centre slice's pixel grid; its structures are not anchored",
                        rule.name,
                        img.sop_instance_uid
                    );
                }
                let t = std::time::Instant::now();
                let fm = lr
                    .store
                    .get(&img.sop_instance_uid, &img.path)
                    .map_err(|e| inst_err(Box::new(e)))?;
                let t_features = t.elapsed();
                // The encoder's input is not kept: the slice is read once more, when an
                // adapter refines with its intensities.
                let mut pixels: Option<ndarray::Array2<f32>> = None;
                // Structures first: the masks SAM draws place landmarks on their extremes
                // (`extremes`); landmarks first where the structures are scored around
                // or named by them (`window`, `identity`; training refuses both).
                let is_structures = |t: &usize| matches!(tasks[*t].0, Task::Structures { .. });
                let task_order: Vec<usize> = if windowed {
                    (0..tasks.len())
                        .filter(|t| !is_structures(t))
                        .chain((0..tasks.len()).filter(is_structures))
                        .collect()
                } else {
                    (0..tasks.len())
                        .filter(is_structures)
                        .chain((0..tasks.len()).filter(|t| !is_structures(t)))
                        .collect()
                };
                let task_order = task_order.into_iter().filter(|t| runs(&tasks[*t].0, ii));
                let mut drawn: Vec<(u8, ndarray::Array2<bool>)> = Vec::new();
                for ti in task_order {
                    let ((task, adapter), prior) = (&tasks[ti], &priors[ti]);
                    let anchor = &mut anchors[ti];
                    let fm = adapter.features(&fm);
                    // The standardised rows only for the votes: without them the scores
                    // are computed a chunk of cells at a time (`Adapter::scores`).
                    let window = adapter
                        .window
                        .as_ref()
                        .filter(|_| on_centre_grid)
                        .and_then(|w| {
                            let points: Vec<Option<(f64, f64)>> = w
                                .landmarks
                                .iter()
                                .map(|n| centre_points.iter().find(|c| &c.0 == n).map(|c| c.1))
                                .collect();
                            let slack = centre_points.first()?.2;
                            w.cells(&points, slack, (fm.image_rows, fm.image_columns), fm.grid())
                        });
                    // After the centre slice, a stack's structures only where the centre
                    // slice's reach lets them stay (`Anchor::window`).
                    let cells = match task {
                        Task::Structures { .. } if on_centre_grid => Cells::narrowed(
                            window,
                            anchor.window((fm.image_rows, fm.image_columns), fm.grid()),
                            fm.grid(),
                        ),
                        _ => window,
                    };
                    let (mut scores, rows) = if let Some(cells) = &cells {
                        adapter.scores_within(&fm, cells).map(|s| (s, None))
                    } else if adapter.votes.is_empty() {
                        adapter.scores(&fm).map(|s| (s, None))
                    } else {
                        adapter.scores_and_rows(&fm).map(|(s, r)| (s, Some(r)))
                    }
                    .map_err(|e| inst_err(Box::new(e)))?;
                    // The patient's appearance is the centre slice's, so a slice off its
                    // grid is not weighed by it.
                    if matches!(task, Task::Structures { .. }) && on_centre_grid {
                        anchor.weigh(
                            &mut scores,
                            &fm,
                            Some(adapter),
                            ii as isize - center as isize,
                        );
                    }
                    let mut up =
                        postprocess::upsample_scores(&scores, fm.image_rows, fm.image_columns);
                    if adapter.train.guided && matches!(task, Task::Structures { .. }) {
                        let guide = normalized_pixels(&mut pixels, &img.path)
                            .map_err(|e| inst_err(Box::new(e)))?;
                        postprocess::refine_to_edges(&mut up, guide, fm.grid().0);
                    }
                    let mut found = match task {
                        Task::Landmarks { radius, .. } => {
                            // As `scout eval` chooses them: in the localizer slice, the
                            // structures' extremes on SAM's masks rank the regions.
                            let ranked = if ii == center {
                                let masks: Vec<(u8, &ndarray::Array2<bool>)> =
                                    drawn.iter().map(|(v, m)| (*v, m)).collect();
                                crate::extremes::prior(
                                    &adapter.extremes,
                                    &masks,
                                    *radius,
                                    prior.as_ref(),
                                )
                            } else {
                                prior.clone()
                            };
                            postprocess::shaped_findings(
                                &up,
                                adapter.shape.as_ref(),
                                ranked.as_ref(),
                            )
                        }
                        Task::Structures { .. } => {
                            // The centre slice's structures reach the others by pixel: a
                            // slice off its grid is taken on its own.
                            let mut alone = crate::stack::Anchor::default();
                            let anchor = if on_centre_grid { anchor } else { &mut alone };
                            let named: Vec<Option<(f64, f64)>> = adapter
                                .identity
                                .iter()
                                .flat_map(|i| &i.landmarks)
                                .map(|n| {
                                    let n = n.as_ref()?;
                                    centre_points.iter().find(|c| &c.0 == n).map(|c| c.1)
                                })
                                .collect();
                            let mut found = anchor.structures(
                                &mut up,
                                Some(adapter),
                                ii as isize - center as isize,
                                crate::stack::cell_side(&scores, fm.image_rows, fm.image_columns),
                                &named,
                            );
                            // After the anchor: the other slices' prior is the adapter's
                            // own region, as `scout eval` measures it.
                            if let (Some(sam), Task::Structures { values }) = (&lr.sam, task) {
                                let calls = sam
                                    .redraw_structures(&fm, &mut found, |l| adapter.redraws(l), &up)
                                    .map_err(|e| inst_err(Box::new(e)))?;
                                for (l, _) in calls.into_iter().filter(|c| c.1 && keep_drawn) {
                                    if let (Some(&v), Some(Some(f))) = (values.get(l), found.get(l))
                                    {
                                        drawn.push((v, f.mask.clone()));
                                    }
                                }
                            }
                            // Against the structures as drawn last, SAM's included.
                            let cell =
                                crate::patch::cell_px((fm.image_rows, fm.image_columns), fm.grid());
                            adapter.close_gaps(&mut found, cell, &up);
                            found
                        }
                    };
                    if let (Some(prior), true) = (prior, ii == center) {
                        postprocess::fill_from_prior(
                            &mut found,
                            prior,
                            (fm.image_rows, fm.image_columns),
                        );
                    }
                    if let (Task::Landmarks { radius, .. }, Some(shape), true) = (
                        task,
                        &adapter.shape,
                        adapter.train.layout_fill && ii == center,
                    ) {
                        postprocess::fill_from_layout(
                            &mut found,
                            shape,
                            *radius,
                            (fm.image_rows, fm.image_columns),
                        );
                    }
                    if let Some(rows) = &rows {
                        votes::refine_findings(
                            &mut found,
                            &adapter.votes,
                            rows.view(),
                            &fm,
                            scores.view(),
                        );
                    }
                    if adapter.patches.iter().any(Option::is_some) {
                        let slice = normalized_pixels(&mut pixels, &img.path)
                            .map_err(|e| inst_err(Box::new(e)))?;
                        patch::refine_findings(&mut found, &adapter.patches, slice, &fm);
                    }
                    // As `scout eval` places them: in the localizer slice.
                    if matches!(task, Task::Landmarks { .. }) && ii == center {
                        let masks: Vec<(u8, &ndarray::Array2<bool>)> =
                            drawn.iter().map(|(v, m)| (*v, m)).collect();
                        crate::extremes::refine_findings(
                            &mut found,
                            &adapter.extremes,
                            &masks,
                            adapter.shape.as_ref(),
                        );
                        crate::calibration::refine_findings(
                            &mut found,
                            &adapter.calibration,
                            adapter.shape.as_ref(),
                        );
                    }
                    match task {
                        Task::Landmarks { names, radius } => {
                            if ii == center {
                                centre_points.extend(names.iter().zip(&found).filter_map(
                                    |(n, f)| Some((n.clone(), f.as_ref()?.point, *radius)),
                                ));
                            }
                            for (name, f) in names.iter().zip(&found) {
                                let Some(f) = f else { continue };
                                let (Some(p), Some(frame)) = (
                                    img.geometry.pixel_to_patient(f.point.0, f.point.1),
                                    img.geometry.frame_of_reference_uid.clone(),
                                ) else {
                                    log::warn!(
                                        "rule {}: {} has no usable geometry or frame of reference; landmark {name} not placed",
                                        rule.name,
                                        img.sop_instance_uid
                                    );
                                    continue;
                                };
                                let c = Candidate3d {
                                    placed: f.is_placed(),
                                    mass: f.mass,
                                    patient: p,
                                    stack: si,
                                    image: ii,
                                    confidence: f.confidence,
                                    frame,
                                    anchor_radius: adapter.train.stack_anchor.then_some(*radius),
                                };
                                match candidates.iter_mut().find(|(n, _)| n == name) {
                                    Some((_, v)) => v.push(c),
                                    None => candidates.push((name.clone(), vec![c])),
                                }
                            }
                        }
                        Task::Structures { values } => {
                            for (&value, f) in values.iter().zip(found) {
                                let Some(f) = f else { continue };
                                let Some(code) = rule.structures.get(&value.to_string()) else {
                                    continue;
                                };
                                match structures.iter_mut().find(|s| s.value == value) {
                                    Some(s) => s.masks.push((ii, f.mask)),
                                    None => structures.push(Structure {
                                        value,
                                        code: code.clone(),
                                        masks: vec![(ii, f.mask)],
                                    }),
                                }
                            }
                        }
                    }
                }
                log::debug!(
                    "rule {}: {}: features {:.0} ms, adapters {:.0} ms",
                    rule.name,
                    img.sop_instance_uid,
                    t_features.as_secs_f64() * 1000.0,
                    (t.elapsed() - t_features).as_secs_f64() * 1000.0
                );
            }
            structures.sort_by_key(|s| s.value);
            for s in &mut structures {
                s.masks.sort_by_key(|(ii, _)| *ii);
            }
            stack_results.push(StackResult {
                plane: stack.plane,
                images,
                analysed,
                structures,
            });
        }

        let mut landmarks = Vec::new();
        for (task, adapter) in &lr.bundle.tasks {
            let Task::Landmarks { names, .. } = task else {
                continue;
            };
            let cands: Vec<&[Candidate3d]> = names
                .iter()
                .map(|name| {
                    candidates
                        .iter()
                        .find(|(n, _)| n == name)
                        .map_or(&[][..], |(_, c)| c.as_slice())
                })
                .collect();
            let mut points: Vec<Option<LandmarkPoint>> =
                cands.iter().map(|c| place(c, &stack_results)).collect();
            if let (Some(shape), true) = (&adapter.shape, adapter.train.layout_fill) {
                fill_depths(shape, &cands, &stack_results, &mut points);
            }
            for (name, found) in names.iter().zip(points) {
                let Some(code) = rule.landmarks.get(name) else {
                    continue;
                };
                landmarks.push(Landmark {
                    name: name.clone(),
                    code: code.clone(),
                    found,
                });
            }
        }
        Ok(SeriesResult {
            rule: rule.name.clone(),
            key,
            study_instance_uid: series.study_instance_uid.clone(),
            series_instance_uid: series.series_instance_uid.clone(),
            algorithm_name: format!("scout {}", rule.name),
            algorithm_version: format!(
                "scout {} adapter {}",
                env!("CARGO_PKG_VERSION"),
                lr.bundle_sha
            ),
            landmarks,
            stacks: stack_results,
        })
    }
}

struct Candidate3d {
    /// Placed by the layout or the aligned templates, with no region of its own.
    placed: bool,
    mass: f64,
    patient: [f64; 3],
    stack: usize,
    image: usize,
    confidence: f64,
    frame: String,
    /// With `TrainConfig::stack_anchor`: the landmark radius (pixels) around the stack's
    /// centre-slice candidate within which the stack's other candidates may vote.
    anchor_radius: Option<f64>,
}

/// Votes the candidates of one landmark (in the frame of reference of the strongest) and
/// projects the point onto the image with the strongest evidence.
fn place(cands: &[Candidate3d], stacks: &[StackResult]) -> Option<LandmarkPoint> {
    // Each stack's candidates near its centre slice's own (in that slice's pixels).
    let near = |c: &Candidate3d| -> bool {
        let Some(radius) = c.anchor_radius else {
            return true;
        };
        let centre = stacks[c.stack].images.len() / 2;
        let Some(anchor) = cands
            .iter()
            .find(|a| a.stack == c.stack && a.image == centre)
        else {
            return true;
        };
        let geometry = &stacks[c.stack].images[centre].geometry;
        match (
            geometry.patient_to_pixel(c.patient),
            geometry.patient_to_pixel(anchor.patient),
        ) {
            (Some(p), Some(a)) => postprocess::near_anchor(p, Some(a), radius),
            _ => true,
        }
    };
    let cands: Vec<&Candidate3d> = cands.iter().filter(|c| near(c)).collect();
    let best = cands.iter().max_by(|a, b| a.mass.total_cmp(&b.mass))?;
    let same_frame: Vec<(f64, [f64; 3])> = cands
        .iter()
        .filter(|c| c.frame == best.frame)
        .map(|c| (c.mass, c.patient))
        .collect();
    let p = postprocess::vote(&same_frame)?;
    let img = &stacks[best.stack].images[best.image];
    let (row, column) = img.geometry.patient_to_pixel(p)?;
    Some(LandmarkPoint {
        patient_mm: p,
        frame_of_reference_uid: best.frame.clone(),
        sop_instance_uid: img.sop_instance_uid.clone(),
        row,
        column,
        confidence: best.confidence,
        stack: best.stack,
    })
}

/// `postprocess::fill_depths` in patient coordinates, per stack: depth is the distance
/// along the normal of the stack's centre slice (the localizer slice, where the layout
/// fills), for the landmarks whose point that stack gave.
fn fill_depths(
    shape: &postprocess::ShapeModel,
    cands: &[&[Candidate3d]],
    stacks: &[StackResult],
    points: &mut [Option<LandmarkPoint>],
) {
    use crate::geometry::dot;
    for (si, stack) in stacks.iter().enumerate() {
        let centre = stack.images.len() / 2;
        let Some(normal) = stack.images[centre].geometry.normal() else {
            continue;
        };
        let placed: Vec<Option<bool>> = cands
            .iter()
            .map(|c| {
                c.iter()
                    .find(|c| c.stack == si && c.image == centre)
                    .map(|c| c.placed)
            })
            .collect();
        let mut depths: Vec<Option<f64>> = points
            .iter()
            .map(|p| {
                p.as_ref()
                    .filter(|p| p.stack == si)
                    .map(|p| dot(normal, p.patient_mm))
            })
            .collect();
        postprocess::fill_depths(shape, &placed, &mut depths);
        for (p, d) in points.iter_mut().zip(depths) {
            let (Some(p), Some(d)) = (p.as_mut().filter(|p| p.stack == si), d) else {
                continue;
            };
            let shift = d - dot(normal, p.patient_mm);
            for (x, n) in p.patient_mm.iter_mut().zip(normal) {
                *x += shift * n;
            }
        }
    }
}

/// The slice's pixels, normalised as the encoder saw them: read on first use, then kept.
fn normalized_pixels<'a>(
    kept: &'a mut Option<ndarray::Array2<f32>>,
    path: &std::path::Path,
) -> Result<&'a ndarray::Array2<f32>, crate::image::ImageError> {
    let pixels = match kept.take() {
        Some(p) => p,
        None => crate::image::normalize(&crate::image::read_dicom(path)?)?,
    };
    Ok(kept.insert(pixels))
}

/// Structured reports, segmentations (scout's own results among them, when a PACS
/// forwards them back) and other non-image objects are never analysed.
fn is_image(sop_class_uid: &str) -> bool {
    !(sop_class_uid.starts_with("1.2.840.10008.5.1.4.1.1.88.")
        || sop_class_uid.starts_with("1.2.840.10008.5.1.4.1.1.66")
        || sop_class_uid.starts_with("1.2.840.10008.5.1.4.1.1.104.")
        || sop_class_uid.starts_with("1.2.840.10008.5.1.4.1.1.11."))
}

fn matching_stacks<'a>(rule: &Rule, series: &'a Series) -> Vec<&'a Stack> {
    series
        .stacks
        .iter()
        .filter(|st| st.instances.iter().all(|r| is_image(&r.meta.sop_class_uid)))
        .filter(|st| {
            rule.criteria.matches(&Candidate {
                modality: series.modality.as_deref(),
                is_localizer: series.is_localizer,
                series_description: series.series_description.as_deref(),
                protocol_name: series.protocol_name.as_deref(),
                body_part_examined: series.body_part_examined.as_deref(),
                plane: st.plane,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::{Plane, SliceGeometry};

    /// A sagittal stack of 3 slices, 1 mm pixels, 5 mm apart; a landmark found weakly in
    /// the centre slice and strongly 20 px away in a lateral one (a look-alike).
    fn stack_and_candidates(anchor: Option<f64>) -> (Vec<StackResult>, Vec<Candidate3d>) {
        let images: Vec<SourceImage> = (0..3)
            .map(|i| SourceImage {
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.4".into(),
                sop_instance_uid: format!("1.2.3.{i}"),
                geometry: SliceGeometry {
                    rows: 100,
                    columns: 100,
                    pixel_spacing: Some([1.0, 1.0]),
                    orientation: Some([0.0, 1.0, 0.0, 0.0, 0.0, -1.0]),
                    position: Some([5.0 * i as f64, 0.0, 0.0]),
                    slice_thickness: Some(5.0),
                    frame_of_reference_uid: Some("1.2.3".into()),
                },
                path: PathBuf::new(),
            })
            .collect();
        let at = |image: usize, mass: f64, row: f64, column: f64| Candidate3d {
            placed: false,
            mass,
            patient: images[image]
                .geometry
                .pixel_to_patient(row, column)
                .unwrap(),
            stack: 0,
            image,
            confidence: 0.5,
            frame: "1.2.3".into(),
            anchor_radius: anchor,
        };
        let cands = vec![at(1, 10.0, 50.0, 50.0), at(0, 100.0, 70.0, 50.0)];
        let stacks = vec![StackResult {
            plane: Plane::Sagittal,
            images,
            analysed: vec![0, 1, 2],
            structures: Vec::new(),
        }];
        (stacks, cands)
    }

    #[test]
    fn stack_anchor_keeps_the_3d_point_on_the_localizer_slices_landmark() {
        let (stacks, cands) = stack_and_candidates(None);
        let free = place(&cands, &stacks).unwrap();
        assert!(
            (free.row - 70.0).abs() < 1e-6,
            "the stronger look-alike wins: {}",
            free.row
        );
        let (stacks, cands) = stack_and_candidates(Some(10.0));
        let anchored = place(&cands, &stacks).unwrap();
        assert!((anchored.row - 50.0).abs() < 1e-6, "{}", anchored.row);
        assert_eq!(anchored.sop_instance_uid, "1.2.3.1");
    }

    #[test]
    fn a_landmark_the_localizer_slice_filled_takes_the_depth_of_those_it_saw() {
        // Three landmarks down the stack's centre slice (x = 5 mm); the middle one was
        // only placed there by the layout, and found in a lateral slice (x = 0 mm).
        let (stacks, one) = stack_and_candidates(Some(10.0));
        let at = |image: usize, row: f64, placed: bool| Candidate3d {
            placed,
            mass: if placed { 1e-6 } else { 50.0 },
            patient: stacks[0].images[image]
                .geometry
                .pixel_to_patient(row, 50.0)
                .unwrap(),
            stack: 0,
            image,
            confidence: if placed { 0.0 } else { 0.5 },
            frame: one[0].frame.clone(),
            anchor_radius: one[0].anchor_radius,
        };
        let a = [at(1, 20.0, false)];
        let b = [at(1, 50.0, true), at(0, 52.0, false)];
        let c = [at(1, 80.0, false)];
        let cands: Vec<&[Candidate3d]> = vec![&a, &b, &c];
        let mut points: Vec<Option<LandmarkPoint>> =
            cands.iter().map(|c| place(c, &stacks)).collect();
        let depth = |p: &Option<LandmarkPoint>| p.as_ref().unwrap().patient_mm[0];
        assert!(
            depth(&points[1]).abs() < 1e-3,
            "voted: {}",
            depth(&points[1])
        );
        let shape = postprocess::ShapeModel {
            mean: vec![vec![[0.0, 0.0]; 3]; 3],
            std: vec![vec![[5.0, 5.0]; 3]; 3],
            pose: false,
        };
        let before = points[1].clone().unwrap();
        fill_depths(&shape, &cands, &stacks, &mut points);
        let after = points[1].as_ref().unwrap();
        assert!(
            (depth(&points[1]) - 5.0).abs() < 1e-9,
            "{}",
            depth(&points[1])
        );
        // In the plane nothing moves; the landmarks it was filled from stay.
        assert_eq!((after.row, after.column), (before.row, before.column));
        assert!((depth(&points[0]) - 5.0).abs() < 1e-9 && (depth(&points[2]) - 5.0).abs() < 1e-9);
        // Without a region of its own in the centre slice nothing is filled from it.
        let c = [at(1, 80.0, true)];
        let a = [at(0, 20.0, false)];
        let cands: Vec<&[Candidate3d]> = vec![&a, &b, &c];
        let mut points: Vec<Option<LandmarkPoint>> =
            cands.iter().map(|c| place(c, &stacks)).collect();
        let voted: Vec<f64> = points.iter().map(depth).collect();
        fill_depths(&shape, &cands, &stacks, &mut points);
        assert_eq!(points.iter().map(depth).collect::<Vec<_>>(), voted);
    }
}
