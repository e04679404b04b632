//! `scout train`: adapters for every task a data set carries (landmarks from its CSV,
//! structures from its label maps), trained on its first N cases and saved together in
//! one `.adapter` file with their provenance.

use crate::adapter::{Adapter, AdapterError, Method, TrainConfig};
use crate::backbone::{Backbone, FeatureMap};
use crate::dataset::{Case, Dataset};
use crate::eval::{train_task, EvalError};
use crate::features::FeatureCache;
use crate::templates::Task;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Bundle formats this build reads: 1; 2 = adapters with ensemble members, which a build
/// that reads only 1 would otherwise load without them and score differently; 3 = any
/// step added since 2 (`Adapter::file_format`: votes, atlas, SAM redraw, extremes...),
/// which a build reading only 2 would leave out; 4 = the stack fill (`Adapter::stack_depth`),
/// which a build reading only 3 would leave out; 5 = the stack bound
/// (`Adapter::stack_bound`), which a build reading only 4 would leave out; 6 = the stack
/// blend (`Adapter::stack_blend`), which a build reading only 5 would leave out; 7 = the
/// stack carry (`Adapter::stack_carry`), which a build reading only 6 would leave out; 8 =
/// the patient's appearance (`TrainConfig::appearance`), which a build reading only 7
/// would leave out; 9 = the structures' names from the landmarks (`Adapter::identity`),
/// which a build reading only 8 would leave out; 10 = each landmark's own reach in the
/// structures' window (`LandmarkWindow::reach`), which a build reading only 9 would
/// leave out; 11 = a structure's extreme as a fallback (`extremes::Extreme::fallback`),
/// which a build reading only 10 would average with the adapter's point; 12 = a convex
/// structure's ellipse (`Adapter::ellipse`), which a build reading only 11 would leave out.
pub const FORMATS: std::ops::RangeInclusive<u32> = 1..=13;

/// The least format that holds `tasks`.
fn format_of(tasks: &[(Task, Adapter)]) -> u32 {
    tasks
        .iter()
        .map(|(_, a)| a.file_format())
        .max()
        .unwrap_or(1)
}

/// The content of a `.adapter` file: one adapter per task, same backbone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bundle {
    pub format: u32,
    pub tasks: Vec<(Task, Adapter)>,
    pub provenance: String,
}

impl Bundle {
    pub fn summary(&self) -> String {
        self.tasks
            .iter()
            .map(|(t, a)| {
                let kind = if matches!(t, Task::Landmarks { .. }) {
                    "landmarks"
                } else {
                    "structures"
                };
                let members: String = a.members.iter().map(|m| format!("+{}", m.method)).collect();
                format!("{}{members} {kind} [{}]", a.method, a.labels.join(","))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn save(&self, path: &Path) -> Result<(), AdapterError> {
        let err = |e: &dyn std::fmt::Display| file_error(path, e);
        let text = serde_json::to_string(self).map_err(|e| err(&e))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(|e| err(&e))?;
        std::fs::rename(&tmp, path).map_err(|e| err(&e))
    }

    /// The file as it is, unchecked.
    fn read(path: &Path) -> Result<Bundle, AdapterError> {
        let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
        serde_json::from_str(&text).map_err(|e| file_error(path, e))
    }

    /// The backbone id a bundle's adapters were trained on, without loading the backbone.
    pub fn backbone_id(path: &Path) -> Result<String, AdapterError> {
        Bundle::read(path)?
            .tasks
            .first()
            .map(|(_, a)| a.backbone.clone())
            .ok_or_else(|| file_error(path, "no adapters"))
    }

    /// Loads a bundle and checks that it was made for `backbone`.
    pub fn load(path: &Path, backbone: &Backbone) -> Result<Bundle, AdapterError> {
        let err = |d: String| file_error(path, d);
        let b = Bundle::read(path)?;
        if !FORMATS.contains(&b.format) {
            return Err(err(format!(
                "format {} is not supported (this build reads {} to {})",
                b.format,
                FORMATS.start(),
                FORMATS.end()
            )));
        }
        if b.format < format_of(&b.tasks) {
            return Err(err(format!(
                "format {} cannot hold what its adapters use (format {} at least)",
                b.format,
                format_of(&b.tasks)
            )));
        }
        for (_, a) in &b.tasks {
            a.validate()
                .map_err(|d| err(format!("adapter {}: {d}", a.labels.join(","))))?;
            a.check_backbone(backbone.id(), backbone.checksum())?;
        }
        // A landmark placed on a structure's extreme reads SAM's mask of that structure:
        // another adapter of the file must redraw it.
        let redrawn = |value: u8| {
            b.tasks.iter().any(|(t, a)| match t {
                Task::Structures { values } => values
                    .iter()
                    .position(|v| *v == value)
                    .is_some_and(|l| a.redraws(l)),
                Task::Landmarks { .. } => false,
            })
        };
        for (_, a) in &b.tasks {
            if let Some(e) = a.extremes.iter().flatten().find(|e| !redrawn(e.structure)) {
                return Err(err(format!(
                    "adapter {}: a landmark lies on structure {}'s extreme, which no adapter of the file has SAM redraw",
                    a.labels.join(","),
                    e.structure
                )));
            }
        }
        // Structures scored around the landmarks found: those landmarks must be the file's,
        // and found first, so not placed on the structures' extremes.
        let landmark_names: Vec<&String> = b
            .tasks
            .iter()
            .flat_map(|(t, _)| match t {
                Task::Landmarks { names, .. } => names.iter().collect(),
                Task::Structures { .. } => Vec::new(),
            })
            .collect();
        let extremes = b
            .tasks
            .iter()
            .any(|(_, a)| a.extremes.iter().any(Option::is_some));
        for (task, a) in &b.tasks {
            // Only the structures are named: on a landmark adapter the links would be
            // loaded and silently never used.
            if matches!(task, Task::Landmarks { .. }) && a.identity.is_some() {
                return Err(err(format!(
                    "adapter {}: landmarks are not named by landmarks (identity on a landmark adapter)",
                    a.labels.join(",")
                )));
            }
            if let Some(w) = &a.window {
                if let Some(n) = w.landmarks.iter().find(|n| !landmark_names.contains(n)) {
                    return Err(err(format!(
                        "adapter {}: its window is the box of landmark {n}, which no adapter of the file finds",
                        a.labels.join(",")
                    )));
                }
            }
            let named = a.identity.iter().flat_map(|i| i.landmarks.iter().flatten());
            if let Some(n) = named.clone().find(|n| !landmark_names.contains(n)) {
                return Err(err(format!(
                    "adapter {}: a structure is named by landmark {n}, which no adapter of the file finds",
                    a.labels.join(",")
                )));
            }
            if extremes && (a.window.is_some() || named.count() > 0) {
                return Err(err(format!(
                    "adapter {}: its window or its structures' names need the landmarks first, and the file places landmarks on the structures' extremes",
                    a.labels.join(",")
                )));
            }
        }
        Ok(b)
    }
}

fn file_error(path: &Path, detail: impl std::fmt::Display) -> AdapterError {
    AdapterError::File {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

/// The models `train_dataset` reads the templates with.
pub struct Models<'a> {
    pub backbone: &'a Backbone,
    pub cache: &'a FeatureCache,
    /// SAM's decoder for the backbone's maps: needed with `TrainConfig::sam_redraw` only.
    pub sam: Option<&'a crate::sam::Sam>,
}

pub fn train_dataset(
    ds: &Dataset,
    models: &Models,
    n_templates: usize,
    method: Method,
    radius: f64,
    config: &TrainConfig,
) -> Result<Bundle, EvalError> {
    let Models {
        backbone,
        cache,
        sam,
    } = *models;
    let sam = match (config.sam_redraw, sam) {
        (true, None) => {
            return Err(EvalError::Setup(
                "--sam-redraw needs a SAM decoder for this backbone in the manifest".into(),
            ))
        }
        (on, sam) => sam.filter(|_| on),
    };
    let names: Vec<&String> = ds.cases.iter().take(n_templates.max(1)).collect();
    let mut templates: Vec<(Case, Vec<FeatureMap>)> = Vec::new();
    for n in &names {
        let case = ds.load_case(n)?;
        let fms = crate::eval::case_features(&case, backbone, cache)?;
        templates.push((case, fms));
    }
    let augmented = if config.augment {
        crate::eval::augmented_templates(&templates, backbone, cache, config)?
    } else {
        Vec::new()
    };
    let bb = (backbone.id(), backbone.checksum());
    let recipe = crate::eval::Recipe {
        templates: &templates,
        augmented: &augmented,
        method,
        config,
        backbone: bb,
    };
    let mut tasks = Vec::new();
    if !ds.landmark_names.is_empty() {
        let task = Task::Landmarks {
            names: ds.landmark_names.clone(),
            radius,
        };
        for a in train_task(&task, method, false, &templates, &augmented, config, bb)? {
            tasks.push((task.clone(), a));
        }
    }
    let values = crate::templates::structure_values(templates.iter().map(|(c, _)| c));
    if !values.is_empty() {
        let task = Task::Structures { values };
        let mut adapters = train_task(&task, method, false, &templates, &augmented, config, bb)?;
        if let Some(sam) = sam {
            crate::eval::learn_sam_redraws(&mut adapters, &task, &templates, sam)?;
        }
        for a in adapters {
            tasks.push((task.clone(), a));
        }
    }
    if tasks.is_empty() {
        return Err(EvalError::Setup(
            "the data set has neither landmarks nor label maps".into(),
        ));
    }
    let left_out = if let (true, Some(sam)) = (config.extremes, sam) {
        let structures = tasks.iter().find_map(|(t, a)| match t {
            Task::Structures { values } => Some((a.clone(), values.clone())),
            Task::Landmarks { .. } => None,
        });
        if let Some((st, values)) = structures {
            let left_out = crate::eval::left_out_sam_masks(&st, &values, recipe, sam)?;
            for (task, a) in tasks.iter_mut() {
                crate::eval::learn_extremes(
                    std::slice::from_mut(a),
                    task,
                    &templates,
                    &left_out,
                    sam,
                );
            }
            left_out
        } else {
            Vec::new()
        }
    } else {
        Vec::new()
    };
    if config.calibrate {
        for (task, a) in tasks.iter_mut() {
            crate::eval::learn_calibration(a, task, recipe, &left_out)?;
        }
    }
    // The options as `scout train` spells them, so the line can be run again.
    let mut options = String::new();
    let ctx = &config.context;
    for (on, flag) in [
        (ds.negatives, " --negatives"),
        (config.shape, " --shape"),
        (ctx.global, " --global-context"),
        (ctx.position && !config.landmark_position, " --position"),
        (
            ctx.position && config.landmark_position,
            " --landmark-position",
        ),
        (config.align, " --align"),
        (config.patches, " --patches"),
        (config.augment, " --augment"),
        (config.augment_shift, " --augment-shift"),
        (config.augment_stretch, " --augment-stretch"),
        (config.borders, " --borders"),
        (config.layout_fill, " --layout-fill"),
        (config.stack_anchor, " --stack-anchor"),
        (config.stack_fill, " --stack-fill"),
        (config.stack_bound, " --stack-bound"),
        (config.stack_blend, " --stack-blend"),
        (config.stack_carry, " --stack-carry"),
        (config.appearance, " --appearance"),
        (config.guided, " --guided"),
        (config.votes, " --votes"),
        (config.atlas, " --atlas"),
        (config.enclosed, " --enclosed"),
        (config.enclosed_sizes, " --enclosed-sizes"),
        (config.enclosed_gaps, " --enclosed-gaps"),
        (config.convex, " --convex"),
        (config.ellipse, " --ellipse"),
        (config.sam_redraw, " --sam-redraw"),
        (config.extremes, " --extremes"),
        (config.calibrate, " --calibrate"),
        (config.fragments, " --fragments"),
        (config.pose, " --pose"),
        (config.coarse_landmarks, " --coarse-landmarks"),
        (config.window, " --window"),
        (config.identity, " --identity"),
    ] {
        if on {
            options.push_str(flag);
        }
    }
    if !config.ensemble.is_empty() {
        let methods: Vec<String> = config.ensemble.iter().map(|m| m.to_string()).collect();
        options.push_str(&format!(" --ensemble {}", methods.join(",")));
    }
    if !ctx.pools.is_empty() {
        let pools: Vec<String> = ctx.pools.iter().map(|p| p.to_string()).collect();
        options.push_str(&format!(" --pools {}", pools.join(",")));
    }
    let provenance = format!(
        "scout {} train {} --backbone {} --templates {} --method {method}{options} --radius {radius}: templates {}",
        env!("CARGO_PKG_VERSION"),
        ds.dir.display(),
        backbone.id(),
        n_templates,
        names
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    for (_, a) in tasks.iter_mut() {
        a.provenance = provenance.clone();
    }
    Ok(Bundle {
        format: format_of(&tasks),
        tasks,
        provenance,
    })
}
