//! Operational counters bumped by the stages, and the small HTTP endpoint that exposes
//! them: `/metrics` (Prometheus text format 0.0.4) and `/healthz` (JSON; 200 when the
//! agent can do its job, 503 otherwise). Bound to localhost by default: it carries no
//! patient data, but nothing outside the box needs it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A latency histogram with fixed buckets (seconds).
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];

impl Histogram {
    const fn new() -> Histogram {
        Histogram {
            counts: [const { AtomicU64::new(0) }; BUCKETS.len()],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            if s <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            out.push_str(&format!(
                "{name}_bucket{{le=\"{b}\"}} {}\n",
                c.load(Ordering::Relaxed)
            ));
        }
        let n = self.count.load(Ordering::Relaxed);
        out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {n}\n"));
        out.push_str(&format!(
            "{name}_sum {}\n{name}_count {n}\n",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        ));
    }
}

pub struct Metrics {
    pub associations: AtomicU64,
    pub associations_rejected: AtomicU64,
    pub echoes: AtomicU64,
    pub instances_received: AtomicU64,
    pub instances_rejected: AtomicU64,
    pub series_completed: AtomicU64,
    pub series_analysed: AtomicU64,
    pub analysis_errors: AtomicU64,
    pub results_sent: AtomicU64,
    pub send_failures: AtomicU64,
    pub results_parked: AtomicU64,
    /// Unix seconds of the last accepted C-STORE to a destination (0 = none yet).
    pub last_send_unix: AtomicU64,
    pub encoder_seconds: Histogram,
    pub analysis_seconds: Histogram,
}

pub static METRICS: Metrics = Metrics {
    associations: AtomicU64::new(0),
    associations_rejected: AtomicU64::new(0),
    echoes: AtomicU64::new(0),
    instances_received: AtomicU64::new(0),
    instances_rejected: AtomicU64::new(0),
    series_completed: AtomicU64::new(0),
    series_analysed: AtomicU64::new(0),
    analysis_errors: AtomicU64::new(0),
    results_sent: AtomicU64::new(0),
    send_failures: AtomicU64::new(0),
    results_parked: AtomicU64::new(0),
    last_send_unix: AtomicU64::new(0),
    encoder_seconds: Histogram::new(),
    analysis_seconds: Histogram::new(),
};

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What `/healthz` and the gauges need from the running agent.
pub struct Probe {
    pub spool_dir: PathBuf,
    pub models_loaded: bool,
    pub rules: usize,
    /// Results waiting in the outbox, over all destinations.
    pub outbox_depth: Box<dyn Fn() -> usize + Send + Sync>,
    pub started_unix: u64,
}

impl Probe {
    /// Spool writable: a file can be created, synced and removed there.
    fn spool_writable(&self) -> Result<(), String> {
        let p = self.spool_dir.join(".tmp").join(".healthz");
        std::fs::create_dir_all(self.spool_dir.join(".tmp")).map_err(|e| e.to_string())?;
        let f = std::fs::File::create(&p).map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| e.to_string())?;
        std::fs::remove_file(&p).map_err(|e| e.to_string())
    }

    /// (healthy, JSON body).
    pub fn health(&self) -> (bool, serde_json::Value) {
        let spool = self.spool_writable();
        let last = METRICS.last_send_unix.load(Ordering::Relaxed);
        let healthy = spool.is_ok() && (self.models_loaded || self.rules == 0);
        (
            healthy,
            serde_json::json!({
                "status": if healthy { "ok" } else { "failing" },
                "spool_writable": spool.is_ok(),
                "spool_error": spool.err(),
                "models_loaded": self.models_loaded,
                "rules": self.rules,
                "outbox_depth": (self.outbox_depth)(),
                "last_successful_send_unix": (last > 0).then_some(last),
                "uptime_s": unix_now().saturating_sub(self.started_unix),
                "version": env!("CARGO_PKG_VERSION"),
            }),
        )
    }

    pub fn render(&self) -> String {
        let m = &METRICS;
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                v.load(Ordering::Relaxed)
            ));
        };
        counter(
            &mut out,
            "scout_associations_total",
            "DICOM associations established",
            &m.associations,
        );
        counter(
            &mut out,
            "scout_associations_rejected_total",
            "Associations rejected (AE title, limit, protocol)",
            &m.associations_rejected,
        );
        counter(
            &mut out,
            "scout_echoes_total",
            "C-ECHO requests answered",
            &m.echoes,
        );
        counter(
            &mut out,
            "scout_instances_received_total",
            "Instances stored and acknowledged",
            &m.instances_received,
        );
        counter(
            &mut out,
            "scout_instances_rejected_total",
            "C-STORE requests answered with a failure status",
            &m.instances_rejected,
        );
        counter(
            &mut out,
            "scout_series_completed_total",
            "Series completed by series assembly",
            &m.series_completed,
        );
        counter(
            &mut out,
            "scout_series_analysed_total",
            "Rule results produced",
            &m.series_analysed,
        );
        counter(
            &mut out,
            "scout_analysis_errors_total",
            "Rule results that failed",
            &m.analysis_errors,
        );
        counter(
            &mut out,
            "scout_results_sent_total",
            "Result objects accepted by a destination",
            &m.results_sent,
        );
        counter(
            &mut out,
            "scout_send_retries_total",
            "Failed send attempts (each is retried)",
            &m.send_failures,
        );
        counter(
            &mut out,
            "scout_results_parked_total",
            "Results given up after repeated refusals",
            &m.results_parked,
        );
        out.push_str(&format!(
            "# HELP scout_outbox_depth Results waiting to be sent\n# TYPE scout_outbox_depth gauge\nscout_outbox_depth {}\n",
            (self.outbox_depth)()
        ));
        out.push_str(&format!(
            "# HELP scout_last_send_timestamp_seconds Unix time of the last accepted result (0 = none)\n# TYPE scout_last_send_timestamp_seconds gauge\nscout_last_send_timestamp_seconds {}\n",
            m.last_send_unix.load(Ordering::Relaxed)
        ));
        m.encoder_seconds.render(
            "scout_encoder_seconds",
            "Backbone encoder latency per slice",
            &mut out,
        );
        m.analysis_seconds.render(
            "scout_analysis_seconds",
            "Series analysis latency (features, adapters and written results of all matching rules)",
            &mut out,
        );
        out
    }
}

/// Serves `/healthz` and `/metrics` on `addr` from a background thread.
pub fn serve(addr: &str, probe: Arc<Probe>) -> Result<(), String> {
    let server =
        tiny_http::Server::http(addr).map_err(|e| format!("health endpoint {addr}: {e}"))?;
    log::info!("health: http://{addr}/healthz and /metrics");
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let (code, body, ctype) = match req.url() {
                    "/metrics" => (200, probe.render(), "text/plain; version=0.0.4"),
                    "/healthz" => {
                        let (ok, json) = probe.health();
                        (
                            if ok { 200 } else { 503 },
                            json.to_string(),
                            "application/json",
                        )
                    }
                    _ => (404, "not found\n".into(), "text/plain"),
                };
                let header =
                    tiny_http::Header::from_bytes("Content-Type", ctype).unwrap_or_else(|_| {
                        tiny_http::Header::from_bytes("X", "Y").expect("static header")
                    });
                let resp = tiny_http::Response::from_string(body)
                    .with_status_code(code)
                    .with_header(header);
                if let Err(e) = req.respond(resp) {
                    log::debug!("health: response failed: {e}");
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = super::Histogram::new();
        h.observe(std::time::Duration::from_millis(70));
        h.observe(std::time::Duration::from_secs(3));
        let mut out = String::new();
        h.render("x", "help", &mut out);
        assert!(out.contains("x_bucket{le=\"0.05\"} 0\n"));
        assert!(out.contains("x_bucket{le=\"0.1\"} 1\n"));
        assert!(out.contains("x_bucket{le=\"5\"} 2\n"));
        assert!(out.contains("x_bucket{le=\"+Inf\"} 2\nx_sum 3.07\nx_count 2\n"));
    }
}
