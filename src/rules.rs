//! Task rules: which adapter runs on which series, how its labels are coded in the DICOM
//! results, and where the results go. Part of the configuration (`[[rules]]`,
//! `[[destinations]]`); matching works on a series' stacks and, for streaming features,
//! on single instances before their series is complete.

use crate::geometry::Plane;
use crate::instance::InstanceMeta;
use crate::templates::TaskKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A coded concept (PS3.3 Table 8.8-1): scheme designator, value, meaning.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Code {
    pub scheme: String,
    pub value: String,
    pub meaning: String,
}

impl Code {
    pub fn new(scheme: &str, value: &str, meaning: &str) -> Code {
        Code {
            scheme: scheme.into(),
            value: value.into(),
            meaning: meaning.into(),
        }
    }

    fn problems(&self, at: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.scheme.trim().is_empty() || self.scheme.len() > 16 {
            p.push(format!("{at}.scheme must have 1..16 characters"));
        }
        if self.value.trim().is_empty() || self.value.len() > 64 {
            p.push(format!("{at}.value must have 1..64 characters"));
        }
        if self.meaning.trim().is_empty() || self.meaning.len() > 64 {
            p.push(format!("{at}.meaning must have 1..64 characters"));
        }
        p
    }
}

/// A DICOM peer that receives results.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    pub name: String,
    pub ae_title: String,
    pub host: String,
    pub port: u16,
    /// Our AE title towards this peer; defaults to `scp.ae_title`.
    #[serde(default)]
    pub calling_ae_title: Option<String>,
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
}

fn default_timeout_s() -> u64 {
    30
}

/// Which slices of each stack the adapters see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Slices {
    /// The middle slice of each stack (the 2D localizer variant): one encoder run per
    /// stack, so results are back within seconds.
    Center,
    /// Every slice; landmarks are voted in 3D over the slices (streamed: features are
    /// computed while the series arrives).
    All,
}

/// What is written for a matched series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// Comprehensive 3D SR (TID 1500) of the landmarks.
    Sr,
    /// Binary DICOM Segmentation of the structures, one per stack.
    Seg,
    /// JSON sidecar of the landmarks, kept under `data_dir/results` (not sent).
    Json,
}

/// Series-level criteria; every list that is not empty must match.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Modality (0008,0060), e.g. "MR".
    #[serde(default)]
    pub modalities: Vec<String>,
    /// Only localizers (ImageType LOCALIZER or a `series.localizer_patterns` match).
    #[serde(default)]
    pub localizer: bool,
    /// Stack planes the adapter was trained on ("axial", "coronal", "sagittal").
    #[serde(default)]
    pub planes: Vec<Plane>,
    /// Anatomy: the series matches when Series Description or Protocol Name contains
    /// one of these (case-insensitive) OR Body Part Examined is one of `body_parts`.
    /// Both empty: any anatomy.
    #[serde(default)]
    pub description_patterns: Vec<String>,
    #[serde(default)]
    pub body_parts: Vec<String>,
}

/// How one structure (an adapter label value) is described in a SEG.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StructureCode {
    pub label: String,
    pub category: Code,
    #[serde(rename = "type")]
    pub kind: Code,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    /// Adapter bundle written by `scout train` (relative paths: to the working directory).
    pub adapter: PathBuf,
    /// Backbone id from the manifest that the adapter was trained on; empty = the
    /// `[models] backbone`. Rules on the same backbone share its features.
    #[serde(default)]
    pub backbone: String,
    #[serde(rename = "match")]
    pub criteria: Match,
    pub slices: Slices,
    /// Which of the adapter's tasks the rule reports; absent: every one it has (an empty
    /// list would report nothing, and is refused). Two rules on one series may take its
    /// landmarks and its structures from different adapters (and backbones). A task left
    /// out still runs in the localizer slice where a reported one reads it: the
    /// structures SAM drew, where the landmarks lie on their extremes; the landmarks,
    /// where the structures are scored around them.
    #[serde(default)]
    pub tasks: Option<Vec<TaskKind>>,
    pub outputs: Vec<Output>,
    /// Names of `[[destinations]]`; empty: results are only kept under `data_dir/results`.
    #[serde(default)]
    pub destinations: Vec<String>,
    /// Finding Site code per landmark name of the adapter.
    #[serde(default)]
    pub landmarks: BTreeMap<String, Code>,
    /// Segment description per structure label value of the adapter ("1", "2", ...).
    #[serde(default)]
    pub structures: BTreeMap<String, StructureCode>,
}

impl Rule {
    pub fn reports(&self, kind: TaskKind) -> bool {
        self.tasks.as_ref().is_none_or(|t| t.contains(&kind))
    }
}

/// What is known of a series (or of one instance of it) for matching.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub modality: Option<&'a str>,
    pub is_localizer: bool,
    pub series_description: Option<&'a str>,
    pub protocol_name: Option<&'a str>,
    pub body_part_examined: Option<&'a str>,
    pub plane: Plane,
}

impl<'a> Candidate<'a> {
    /// An instance seen alone; `localizer_patterns` are the upper-case series patterns.
    pub fn of_instance(meta: &'a InstanceMeta, localizer_patterns: &[String]) -> Candidate<'a> {
        let text = |s: &Option<String>| {
            s.as_ref().is_some_and(|s| {
                let s = s.to_uppercase();
                localizer_patterns
                    .iter()
                    .any(|p| s.contains(&p.to_uppercase()))
            })
        };
        Candidate {
            modality: meta.modality.as_deref(),
            is_localizer: meta.image_type.iter().any(|t| t == "LOCALIZER")
                || text(&meta.series_description)
                || text(&meta.protocol_name),
            series_description: meta.series_description.as_deref(),
            protocol_name: meta.protocol_name.as_deref(),
            body_part_examined: meta.body_part_examined.as_deref(),
            plane: meta.geometry.plane(),
        }
    }
}

impl Match {
    pub fn matches(&self, c: &Candidate) -> bool {
        let eq_any = |list: &[String], v: Option<&str>| {
            v.is_some_and(|v| list.iter().any(|x| x.trim().eq_ignore_ascii_case(v.trim())))
        };
        if !self.modalities.is_empty() && !eq_any(&self.modalities, c.modality) {
            return false;
        }
        if self.localizer && !c.is_localizer {
            return false;
        }
        if !self.planes.is_empty() && !self.planes.contains(&c.plane) {
            return false;
        }
        if self.description_patterns.is_empty() && self.body_parts.is_empty() {
            return true;
        }
        let contains = |s: Option<&str>| {
            s.is_some_and(|s| {
                let s = s.to_uppercase();
                self.description_patterns
                    .iter()
                    .any(|p| s.contains(&p.to_uppercase()))
            })
        };
        contains(c.series_description)
            || contains(c.protocol_name)
            || eq_any(&self.body_parts, c.body_part_examined)
    }
}

/// Static problems of the rule and destination tables (model files are checked when
/// the engine loads them).
pub fn problems(rules: &[Rule], destinations: &[Destination]) -> Vec<String> {
    let mut p = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (i, d) in destinations.iter().enumerate() {
        let at = format!("destinations[{i}] ({})", d.name);
        if d.name.trim().is_empty() || !seen.insert(d.name.clone()) {
            p.push(format!("{at}: name must be non-empty and unique"));
        }
        if let Err(e) = crate::config::check_ae_title(&d.ae_title) {
            p.push(format!("{at}.ae_title: {e}"));
        }
        if let Some(ae) = &d.calling_ae_title {
            if let Err(e) = crate::config::check_ae_title(ae) {
                p.push(format!("{at}.calling_ae_title: {e}"));
            }
        }
        if d.host.trim().is_empty() || d.port == 0 {
            p.push(format!("{at}: host and port must be set"));
        }
        if d.timeout_s == 0 {
            p.push(format!("{at}.timeout_s must be at least 1"));
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, r) in rules.iter().enumerate() {
        let at = format!("rules[{i}] ({})", r.name);
        if r.name.trim().is_empty() || !names.insert(r.name.clone()) || r.name.contains(['/', '\\'])
        {
            p.push(format!(
                "{at}: name must be non-empty, unique and free of path separators"
            ));
        }
        if r.outputs.is_empty() {
            p.push(format!(
                "{at}.outputs is empty: the rule would produce nothing"
            ));
        }
        if r.tasks.as_ref().is_some_and(Vec::is_empty) {
            p.push(format!(
                "{at}.tasks is empty: the rule would report nothing (leave it out to report every task)"
            ));
        }
        // An SR or sidecar without landmarks, or a SEG without segments, would be empty.
        for (output, kind, key) in [
            (Output::Sr, TaskKind::Landmarks, "sr"),
            (Output::Json, TaskKind::Landmarks, "json"),
            (Output::Seg, TaskKind::Structures, "seg"),
        ] {
            if r.outputs.contains(&output) && !r.reports(kind) {
                p.push(format!(
                    "{at}.outputs has \"{key}\", but tasks leaves out the {}",
                    kind.name()
                ));
            }
        }
        for d in &r.destinations {
            if !destinations.iter().any(|x| &x.name == d) {
                p.push(format!("{at}.destinations: no destination named {d:?}"));
            }
        }
        for (name, code) in &r.landmarks {
            p.extend(code.problems(&format!("{at}.landmarks.{name}")));
        }
        for (value, s) in &r.structures {
            let at = format!("{at}.structures.{value}");
            if value.parse::<u8>().map_or(true, |v| v == 0) {
                p.push(format!("{at}: key must be a label value 1..255"));
            }
            if s.label.trim().is_empty() || s.label.len() > 64 {
                p.push(format!("{at}.label must have 1..64 characters"));
            }
            p.extend(s.category.problems(&format!("{at}.category")));
            p.extend(s.kind.problems(&format!("{at}.type")));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate<'a>(desc: Option<&'a str>, body: Option<&'a str>, plane: Plane) -> Candidate<'a> {
        Candidate {
            modality: Some("MR"),
            is_localizer: true,
            series_description: desc,
            protocol_name: None,
            body_part_examined: body,
            plane,
        }
    }

    #[test]
    fn anatomy_matches_description_or_body_part_and_other_lists_must_all_match() {
        let m = Match {
            modalities: vec!["MR".into()],
            localizer: true,
            planes: vec![Plane::Sagittal],
            description_patterns: vec!["spine".into()],
            body_parts: vec!["LSPINE".into()],
        };
        assert!(m.matches(&candidate(Some("L-Spine Localizer"), None, Plane::Sagittal)));
        assert!(m.matches(&candidate(Some("survey"), Some("lspine"), Plane::Sagittal)));
        assert!(!m.matches(&candidate(Some("survey"), Some("CHEST"), Plane::Sagittal)));
        assert!(!m.matches(&candidate(Some("SPINE"), None, Plane::Axial)));
        let mut c = candidate(Some("SPINE"), None, Plane::Sagittal);
        c.modality = Some("CT");
        assert!(!m.matches(&c));
        c.modality = Some("MR");
        c.is_localizer = false;
        assert!(!m.matches(&c));
        assert!(Match::default().matches(&c));
    }
}
