//! Configuration: the TOML schema, the embedded defaults and validation.
//!
//! The default configuration is `config/scout.toml`, compiled in, so `scout serve` with no
//! file runs on exactly what the repository documents.

use crate::rules::{Destination, Rule};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The text of `config/scout.toml`, the configuration used when none is given.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config/scout.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration {origin} is invalid:\n  - {}", problems.join("\n  - "))]
    Invalid {
        origin: String,
        problems: Vec<String>,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub data_dir: PathBuf,
    pub scp: ScpConfig,
    pub spool: SpoolConfig,
    pub series: SeriesConfig,
    pub models: ModelsConfig,
    pub outbox: OutboxConfig,
    pub health: HealthConfig,
    #[serde(default)]
    pub destinations: Vec<Destination>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    /// `models.toml` of the backbones (relative paths: to the working directory).
    pub manifest: PathBuf,
    /// Backbone id in the manifest; empty: the manifest's default.
    #[serde(default)]
    pub backbone: String,
    /// Threads for the encoder; 0 = one per core.
    #[serde(default)]
    pub threads: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Address of the `/healthz` and `/metrics` HTTP endpoint; empty: off.
    pub bind: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// First wait after a failed send; doubles per failure up to `retry_max_s`.
    pub retry_initial_s: u64,
    pub retry_max_s: u64,
    /// A result the peer refused this many times (a failure status, not a connection
    /// problem) is moved to `outbox/<destination>/failed/` and reported.
    pub max_refusals: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScpConfig {
    pub ae_title: String,
    pub bind: String,
    pub port: u16,
    #[serde(default)]
    pub allowed_calling_ae_titles: Vec<String>,
    pub max_pdu_length: u32,
    pub max_associations: usize,
    pub read_timeout_s: u64,
    pub write_timeout_s: u64,
    pub max_instance_bytes: u64,
    pub sop_classes: Vec<String>,
    pub transfer_syntaxes: Vec<String>,
    /// DICOM over TLS (PS3.15 B.1, BCP 195) on `port` instead of plain TCP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: our certificate, then any intermediates.
    pub certificate: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
    /// PEM CA certificates; when set, peers must present a certificate they signed.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDuplicate {
    Replace,
    Ignore,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    pub max_bytes: u64,
    pub min_free_bytes: u64,
    pub on_duplicate: OnDuplicate,
    pub retention_hours: u64,
    /// Size of one write-ahead journal segment in MiB; 0 turns the journal off.
    pub journal_segment_mib: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesConfig {
    pub idle_ms: u64,
    pub complete_on_images_in_acquisition: bool,
    #[serde(default)]
    pub localizer_patterns: Vec<String>,
}

impl ScpConfig {
    pub fn read_timeout(&self) -> Duration {
        Duration::from_secs(self.read_timeout_s)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_s)
    }
}

impl SeriesConfig {
    pub fn idle(&self) -> Duration {
        Duration::from_millis(self.idle_ms)
    }
}

impl Config {
    /// The embedded default configuration.
    pub fn embedded() -> Result<Config, ConfigError> {
        Self::from_toml(DEFAULT_CONFIG_TOML, "embedded default")
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates; `origin` names the source in error messages. Every problem
    /// is reported at once, with its line: a key the schema rejects (unknown, wrong type)
    /// is set aside and parsing goes on, then the values are checked.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut work = text.to_string();
        let mut problems = Vec::new();
        let mut parsed = None;
        for _ in 0..MAX_PARSE_PROBLEMS {
            let e = match toml::from_str::<Config>(&work) {
                Ok(c) => {
                    parsed = Some(c);
                    break;
                }
                Err(e) => e,
            };
            let Some(span) = e.span().filter(|s| s.start < work.len()) else {
                problems.push(e.message().trim().to_string());
                break;
            };
            let start = work[..span.start].rfind('\n').map_or(0, |i| i + 1);
            let end = work[span.start..]
                .find('\n')
                .map_or(work.len(), |i| span.start + i);
            let line = work[..start].matches('\n').count() + 1;
            problems.push(format!("line {line}: {}", e.message().trim()));
            // Only a `key = value` line can be set aside without changing what the rest
            // of the file means: an unknown key is dropped, a known one gets the default.
            let l = work[start..end].trim_start();
            if l.is_empty() || l.starts_with('[') || !l.contains('=') {
                break;
            }
            let stand_in = if e.message().contains("unknown field") {
                String::new()
            } else {
                match default_line(&work, line) {
                    Some(d) => d.to_string(),
                    None => break,
                }
            };
            work.replace_range(start..end, &stand_in);
        }
        if let Some(config) = &parsed {
            problems.extend(
                config
                    .problems()
                    .into_iter()
                    .map(|p| match locate(text, &p) {
                        Some(line) => format!("line {line}: {p}"),
                        None => p,
                    }),
            );
        }
        match parsed {
            Some(config) if problems.is_empty() => Ok(config),
            _ => Err(ConfigError::Invalid {
                origin: origin.to_string(),
                problems,
            }),
        }
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.data_dir.join("spool")
    }

    pub fn outbox_dir(&self) -> PathBuf {
        self.data_dir.join("outbox")
    }

    pub fn results_dir(&self) -> PathBuf {
        self.data_dir.join("results")
    }

    /// Every problem at once, so an operator fixes the file in one go.
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Err(e) = check_ae_title(&self.scp.ae_title) {
            p.push(format!("scp.ae_title: {e}"));
        }
        for ae in &self.scp.allowed_calling_ae_titles {
            if let Err(e) = check_ae_title(ae) {
                p.push(format!("scp.allowed_calling_ae_titles: {ae:?}: {e}"));
            }
        }
        if self.scp.bind.parse::<std::net::IpAddr>().is_err() {
            p.push(format!(
                "scp.bind: {:?} is not an IP address",
                self.scp.bind
            ));
        }
        if !(4096..=4 * 1024 * 1024).contains(&self.scp.max_pdu_length) {
            p.push(format!(
                "scp.max_pdu_length: {} is outside 4096..=4194304",
                self.scp.max_pdu_length
            ));
        }
        if self.scp.max_associations == 0 {
            p.push("scp.max_associations must be at least 1".into());
        }
        if self.scp.read_timeout_s == 0 || self.scp.write_timeout_s == 0 {
            p.push("scp.read_timeout_s and scp.write_timeout_s must be at least 1".into());
        }
        if self.scp.max_instance_bytes == 0 {
            p.push("scp.max_instance_bytes must be positive".into());
        }
        if self.scp.sop_classes.is_empty() {
            p.push("scp.sop_classes is empty: nothing could be stored".into());
        }
        for uid in self.scp.sop_classes.iter() {
            if !is_valid_uid(uid) {
                p.push(format!("scp.sop_classes: {uid:?} is not a valid UID"));
            }
        }
        if self.scp.transfer_syntaxes.is_empty() {
            p.push("scp.transfer_syntaxes is empty".into());
        }
        for uid in self.scp.transfer_syntaxes.iter() {
            if !is_valid_uid(uid) {
                p.push(format!("scp.transfer_syntaxes: {uid:?} is not a valid UID"));
            } else if !dicom_ul::association::server::is_supported(uid) {
                p.push(format!(
                    "scp.transfer_syntaxes: {uid} cannot be decoded by this build"
                ));
            }
        }
        if self.spool.max_bytes == 0 {
            p.push("spool.max_bytes must be positive".into());
        }
        if self.series.idle_ms == 0 {
            p.push("series.idle_ms must be positive".into());
        }
        if self.outbox.retry_initial_s == 0 || self.outbox.retry_max_s < self.outbox.retry_initial_s
        {
            p.push("outbox: need 1 <= retry_initial_s <= retry_max_s".into());
        }
        if self.outbox.max_refusals == 0 {
            p.push("outbox.max_refusals must be at least 1".into());
        }
        if !self.health.bind.is_empty() && self.health.bind.parse::<std::net::SocketAddr>().is_err()
        {
            p.push(format!(
                "health.bind: {:?} is not an address:port",
                self.health.bind
            ));
        }
        p.extend(crate::rules::problems(&self.rules, &self.destinations));
        p
    }
}

const MAX_PARSE_PROBLEMS: usize = 50;

/// Every `key = value` line and table header of a TOML text with its key path; array
/// tables get their element index ("rules#1").
fn key_paths(text: &str) -> Vec<(usize, Vec<String>)> {
    let mut arrays: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut table: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if l.starts_with('#') {
            continue;
        }
        let full = if let Some(h) = l.strip_prefix("[[").and_then(|x| x.split("]]").next()) {
            let n = arrays.entry(h.trim().to_string()).or_insert(0);
            table = vec![format!("{}#{n}", h.trim())];
            *n += 1;
            table.clone()
        } else if let Some(h) = l.strip_prefix('[').and_then(|x| x.split(']').next()) {
            table = h
                .split('.')
                .map(|s| s.trim().to_string())
                .enumerate()
                .map(|(j, s)| match arrays.get(&s) {
                    Some(n) if j == 0 => format!("{s}#{}", n - 1),
                    _ => s,
                })
                .collect();
            table.clone()
        } else if let Some((k, _)) = l.split_once('=') {
            let mut f = table.clone();
            f.push(k.trim().trim_matches('"').to_string());
            f
        } else {
            continue;
        };
        out.push((i + 1, full));
    }
    out
}

/// The line of the key a problem is about ("scp.ae_title: …", "rules[1] (chest).landmarks.X: …").
fn locate(text: &str, problem: &str) -> Option<usize> {
    let mut path = String::new();
    let mut depth = 0;
    for ch in problem.replace(" (", "(").chars() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ':' | ' ' if depth == 0 => break,
            c if depth == 0 => path.push(c),
            _ => {}
        }
    }
    let want: Vec<String> = path
        .split('.')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('[', "#").replace(']', ""))
        .collect();
    let mut best: Option<(usize, usize)> = None;
    for (line, full) in key_paths(text) {
        let n = full.len();
        if n <= want.len() && full[..] == want[..n] && best.is_none_or(|(m, _)| n > m) {
            best = Some((n, line));
        }
    }
    best.map(|(_, line)| line)
}

/// The embedded default's line for the same key (array index ignored), to stand in for
/// a value of the wrong type so that the rest of the file can still be checked.
fn default_line(text: &str, line: usize) -> Option<&'static str> {
    let strip = |p: &[String]| -> Vec<String> {
        p.iter()
            .map(|s| s.split('#').next().unwrap_or(s).to_string())
            .collect()
    };
    let path = strip(&key_paths(text).into_iter().find(|(l, _)| *l == line)?.1);
    let (l, _) = key_paths(DEFAULT_CONFIG_TOML)
        .into_iter()
        .find(|(_, p)| strip(p) == path)?;
    DEFAULT_CONFIG_TOML.lines().nth(l - 1)
}

/// AE titles are 1–16 characters of the default repertoire, no backslash, not all spaces.
pub fn check_ae_title(ae: &str) -> Result<(), &'static str> {
    if ae.trim().is_empty() {
        return Err("AE title is empty");
    }
    if ae.len() > 16 {
        return Err("AE title is longer than 16 characters");
    }
    if ae.chars().any(|c| c == '\\' || !(' '..='~').contains(&c)) {
        return Err("AE title has a backslash or a character outside printable ASCII");
    }
    Ok(())
}

/// A UID per PS3.5 §9: digits and dots, at most 64 characters, no empty component,
/// no leading zero in a multi-digit component.
pub fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && !(c.len() > 1 && c.starts_with('0'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_documented_values_hold() {
        let c = Config::embedded().expect("embedded config must be valid");
        assert_eq!(c.scp.ae_title, "SCOUT");
        assert_eq!(c.scp.port, 11112);
        assert!(c
            .scp
            .sop_classes
            .contains(&"1.2.840.10008.5.1.4.1.1.4".to_string()));
        assert_eq!(c.spool_dir(), PathBuf::from("scout-data/spool"));
    }

    #[test]
    fn unknown_key_is_reported_with_its_line() {
        let text = DEFAULT_CONFIG_TOML.replace("[spool]", "[spool]\nmax_bytez = 3");
        let err = Config::from_toml(&text, "test").unwrap_err().to_string();
        assert!(err.contains("max_bytez"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn all_problems_are_listed_at_once() {
        let text = DEFAULT_CONFIG_TOML
            .replace(
                "ae_title = \"SCOUT\"",
                "ae_title = \"THIS_TITLE_IS_TOO_LONG\"",
            )
            .replace("max_associations = 8", "max_associations = 0")
            .replace("\"1.2.840.10008.5.1.4.1.1.4\",", "\"1.2.x\",");
        let err = Config::from_toml(&text, "test").unwrap_err().to_string();
        assert!(err.contains("scp.ae_title"), "{err}");
        assert!(err.contains("max_associations"), "{err}");
        assert!(err.contains("1.2.x"), "{err}");
    }

    #[test]
    fn unknown_keys_wrong_types_and_bad_values_are_all_reported_with_their_lines() {
        let text = DEFAULT_CONFIG_TOML
            .replace("[spool]", "[spool]\nmax_bytez = 3")
            .replace("idle_ms = 2000", "idle_ms = \"soon\"")
            .replace("max_refusals = 10", "max_refusals = 0")
            .replace(
                "L3 = { scheme = \"SCT\", value = \"36470004\"",
                "L3 = { scheme = \"\", value = \"36470004\"",
            )
            .replace("destinations = []", "destinations = [\"nowhere\"]");
        let line_of = |needle: &str| {
            text.lines()
                .position(|l| l.starts_with(needle))
                .map(|i| format!("line {}:", i + 1))
                .unwrap()
        };
        let err = Config::from_toml(&text, "test").unwrap_err().to_string();
        for (needle, what) in [
            ("max_bytez", "max_bytez"),
            ("idle_ms = \"soon\"", "invalid type"),
            ("max_refusals = 0", "max_refusals"),
            ("L3 = {", "landmarks.L3.scheme"),
            ("destinations = [\"nowhere\"]", "nowhere"),
        ] {
            let line = line_of(needle);
            assert!(
                err.lines().any(|l| l.contains(&line) && l.contains(what)),
                "{what} not reported at {line}:\n{err}"
            );
        }
    }

    /// The shipped chest rules each report one task of their adapter; a rule cannot write
    /// an output of a task it leaves out, nor name a task that does not exist.
    #[test]
    fn a_rule_reports_the_tasks_it_names_and_writes_only_their_outputs() {
        use crate::templates::TaskKind::{Landmarks, Structures};
        let c = Config::embedded().unwrap();
        let rule = |name: &str| c.rules.iter().find(|r| r.name == name).unwrap();
        let reports = |name: &str| {
            (
                rule(name).reports(Landmarks),
                rule(name).reports(Structures),
            )
        };
        assert_eq!(reports("spine"), (true, true));
        assert_eq!(reports("chest"), (false, true));
        assert_eq!(reports("chest-landmarks"), (true, false));
        assert_ne!(rule("chest").backbone, rule("chest-landmarks").backbone);

        let text = DEFAULT_CONFIG_TOML
            .replace(
                "outputs = [\"seg\"]",
                "outputs = [\"seg\", \"sr\", \"json\"]",
            )
            .replace(
                "tasks = [\"landmarks\"]\nslices = \"center\"\noutputs = [\"sr\", \"json\"]",
                "tasks = [\"landmarks\"]\nslices = \"center\"\noutputs = [\"sr\", \"seg\"]",
            );
        let line = |from: usize| {
            let at = text
                .lines()
                .skip(from)
                .position(|l| l.starts_with("outputs = "));
            format!("line {}:", from + at.unwrap() + 1)
        };
        let start = |name: &str| {
            let at = text.find(&format!("name = \"{name}\"")).unwrap();
            text[..at].lines().count()
        };
        let err = Config::from_toml(&text, "test").unwrap_err().to_string();
        for (name, what) in [
            (
                "chest",
                "outputs has \"sr\", but tasks leaves out the landmarks",
            ),
            (
                "chest",
                "outputs has \"json\", but tasks leaves out the landmarks",
            ),
            (
                "chest-landmarks",
                "outputs has \"seg\", but tasks leaves out the structures",
            ),
        ] {
            let l = line(start(name));
            assert!(
                err.lines().any(|x| x.contains(&l)
                    && x.contains(what)
                    && x.contains(&format!("({name})"))),
                "{name}: {what} not at {l}:\n{err}"
            );
        }
        assert_eq!(err.matches("tasks leaves out").count(), 3, "{err}");

        let text = DEFAULT_CONFIG_TOML.replace("tasks = [\"landmarks\"]", "tasks = [\"points\"]");
        let err = Config::from_toml(&text, "test").unwrap_err().to_string();
        assert!(err.contains("unknown variant `points`"), "{err}");
        // Written out empty: nothing to report, not "every task".
        let text = DEFAULT_CONFIG_TOML.replace("tasks = [\"landmarks\"]", "tasks = []");
        let err = Config::from_toml(&text, "test").unwrap_err().to_string();
        let l = text.lines().position(|l| l == "tasks = []").unwrap() + 1;
        assert!(
            err.lines().any(|x| x.contains(&format!("line {l}:"))
                && x.contains("(chest-landmarks).tasks is empty")),
            "{err}"
        );
    }

    #[test]
    fn uid_validation() {
        assert!(is_valid_uid("1.2.840.10008.1.2"));
        assert!(!is_valid_uid("1.2.840.01"));
        assert!(!is_valid_uid("1..2"));
        assert!(!is_valid_uid("../etc"));
        assert!(!is_valid_uid(""));
    }
}
