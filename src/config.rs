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
    #[error("configuration {origin}: {source}")]
    Parse {
        origin: String,
        source: Box<toml::de::Error>,
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

    /// Parses and validates; `origin` names the source in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            source: Box::new(e),
        })?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                origin: origin.to_string(),
                problems,
            })
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
        p.extend(crate::rules::problems(&self.rules, &self.destinations));
        p
    }
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
    fn uid_validation() {
        assert!(is_valid_uid("1.2.840.10008.1.2"));
        assert!(!is_valid_uid("1.2.840.01"));
        assert!(!is_valid_uid("1..2"));
        assert!(!is_valid_uid("../etc"));
        assert!(!is_valid_uid(""));
    }
}
