//! Series assembly: instances grouped by Series Instance UID, declared complete when no
//! instance arrived for `idle_ms` (or earlier, once Images in Acquisition are in),
//! localizers detected, and multi-plane localizers split into one stack per plane.
//!
//! An instance arriving for a series already handed on reopens it; it is handed on again,
//! whole, with a higher `revision`.

use crate::config::SeriesConfig;
use crate::geometry::Plane;
use crate::spool::Received;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// One plane's slices of a series, ordered along the slice normal.
#[derive(Debug, Clone, PartialEq)]
pub struct Stack {
    pub plane: Plane,
    pub instances: Vec<Received>,
}

/// A complete series, handed to the feature stage.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub modality: Option<String>,
    pub series_number: Option<i64>,
    pub series_description: Option<String>,
    pub protocol_name: Option<String>,
    pub body_part_examined: Option<String>,
    pub is_localizer: bool,
    /// 0 the first time the series is handed on, +1 for each reopening.
    pub revision: u32,
    /// One stack per plane present (a 3-plane localizer has three).
    pub stacks: Vec<Stack>,
    /// From the first instance of this revision to the last.
    pub arrival_span: Duration,
}

impl Series {
    pub fn instance_count(&self) -> usize {
        self.stacks.iter().map(|s| s.instances.len()).sum()
    }

    pub fn instances(&self) -> impl Iterator<Item = &Received> {
        self.stacks.iter().flat_map(|s| s.instances.iter())
    }
}

struct Pending {
    instances: BTreeMap<String, Received>,
    first_arrival: Instant,
    last_arrival: Instant,
}

/// The grouping logic, free of threads and clocks so it can be tested step by step.
pub struct Assembler {
    config: SeriesConfig,
    patterns: Vec<String>,
    pending: HashMap<String, Pending>,
    /// Series handed on recently: revision, when, and their instances, so that a late
    /// instance reopens the whole series. Forgotten after `EMITTED_MEMORY`.
    emitted: HashMap<String, Emitted>,
}

struct Emitted {
    revision: u32,
    at: Instant,
    instances: BTreeMap<String, Received>,
}

const EMITTED_MEMORY: Duration = Duration::from_secs(3600);

impl Assembler {
    pub fn new(config: SeriesConfig) -> Assembler {
        let patterns = config
            .localizer_patterns
            .iter()
            .map(|p| p.to_uppercase())
            .collect();
        Assembler {
            config,
            patterns,
            pending: HashMap::new(),
            emitted: HashMap::new(),
        }
    }

    pub fn add(&mut self, r: Received, now: Instant) {
        let uid = &r.meta.series_instance_uid;
        let earlier = || {
            self.emitted
                .get(uid)
                .map(|e| e.instances.clone())
                .unwrap_or_default()
        };
        let p = self.pending.entry(uid.clone()).or_insert_with(|| Pending {
            instances: earlier(),
            first_arrival: now,
            last_arrival: now,
        });
        p.last_arrival = now;
        // Same SOP Instance UID again: the newer copy wins, as in the spool.
        p.instances.insert(r.meta.sop_instance_uid.clone(), r);
    }

    fn is_complete(&self, p: &Pending, now: Instant) -> bool {
        if now.duration_since(p.last_arrival) >= self.config.idle() {
            return true;
        }
        if !self.config.complete_on_images_in_acquisition {
            return false;
        }
        let expected = p
            .instances
            .values()
            .filter_map(|r| r.meta.images_in_acquisition)
            .max();
        expected.is_some_and(|n| p.instances.len() >= n as usize)
    }

    /// Series that are complete at `now`, removed from the pending set.
    pub fn take_complete(&mut self, now: Instant) -> Vec<Series> {
        let done: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| self.is_complete(p, now))
            .map(|(k, _)| k.clone())
            .collect();
        self.emitted
            .retain(|_, e| now.duration_since(e.at) < EMITTED_MEMORY);
        let mut out = Vec::new();
        for uid in done {
            let Some(p) = self.pending.remove(&uid) else {
                continue;
            };
            let revision = self.emitted.get(&uid).map_or(0, |e| e.revision + 1);
            let instances = p.instances.clone();
            out.push(self.build(p, revision));
            self.emitted.insert(
                uid,
                Emitted {
                    revision,
                    at: now,
                    instances,
                },
            );
        }
        out.sort_by(|a, b| a.series_instance_uid.cmp(&b.series_instance_uid));
        out
    }

    /// When the next pending series could become complete by time alone.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending
            .values()
            .map(|p| p.last_arrival + self.config.idle())
            .min()
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    fn build(&self, p: Pending, revision: u32) -> Series {
        let instances: Vec<Received> = p.instances.into_values().collect();
        let first = &instances[0].meta;
        let text_match = |s: &Option<String>| {
            s.as_ref().is_some_and(|s| {
                let s = s.to_uppercase();
                self.patterns.iter().any(|p| s.contains(p.as_str()))
            })
        };
        let is_localizer = instances
            .iter()
            .any(|r| r.meta.image_type.iter().any(|t| t == "LOCALIZER"))
            || text_match(&first.series_description)
            || text_match(&first.protocol_name);
        let mut series = Series {
            study_instance_uid: first.study_instance_uid.clone(),
            series_instance_uid: first.series_instance_uid.clone(),
            modality: first.modality.clone(),
            series_number: first.series_number,
            series_description: first.series_description.clone(),
            protocol_name: first.protocol_name.clone(),
            body_part_examined: first.body_part_examined.clone(),
            is_localizer,
            revision,
            stacks: Vec::new(),
            arrival_span: p.last_arrival.duration_since(p.first_arrival),
        };
        let mut by_plane: BTreeMap<Plane, Vec<Received>> = BTreeMap::new();
        for r in instances {
            by_plane.entry(r.meta.geometry.plane()).or_default().push(r);
        }
        for (plane, mut v) in by_plane {
            v.sort_by(|a, b| {
                let ka = a.meta.geometry.position_along_normal().unwrap_or(0.0);
                let kb = b.meta.geometry.position_along_normal().unwrap_or(0.0);
                ka.total_cmp(&kb)
                    .then(a.meta.instance_number.cmp(&b.meta.instance_number))
                    .then(a.meta.sop_instance_uid.cmp(&b.meta.sop_instance_uid))
            });
            series.stacks.push(Stack {
                plane,
                instances: v,
            });
        }
        series
    }
}

/// Runs assembly until the input channel closes, then hands on what is pending. Sending
/// blocks when the next stage lags (back-pressure), it never drops a series.
pub fn run(config: SeriesConfig, input: Receiver<Received>, output: Sender<Series>) {
    let mut asm = Assembler::new(config);
    loop {
        let timeout = asm
            .next_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        match input.recv_timeout(timeout) {
            Ok(r) => asm.add(r, Instant::now()),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
                for s in asm.take_complete(far) {
                    let _ = output.send(s);
                }
                return;
            }
        }
        for s in asm.take_complete(Instant::now()) {
            log_series(&s);
            crate::metrics::inc(&crate::metrics::METRICS.series_completed);
            if output.send(s).is_err() {
                log::error!(
                    "series: next stage has stopped; series stay in the spool for recovery"
                );
                return;
            }
        }
    }
}

fn log_series(s: &Series) {
    let planes: Vec<String> = s
        .stacks
        .iter()
        .map(|st| format!("{}×{}", st.plane, st.instances.len()))
        .collect();
    log::info!(
        "series: {} complete (rev {}): {} instances [{}] received over {:.1} s, modality {}, {:?}{}",
        s.series_instance_uid,
        s.revision,
        s.instance_count(),
        planes.join(", "),
        s.arrival_span.as_secs_f64(),
        s.modality.as_deref().unwrap_or("?"),
        s.series_description.as_deref().unwrap_or(""),
        if s.is_localizer { ", localizer" } else { "" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::SliceGeometry;
    use crate::instance::InstanceMeta;

    fn config(idle_ms: u64) -> SeriesConfig {
        SeriesConfig {
            idle_ms,
            complete_on_images_in_acquisition: true,
            localizer_patterns: vec!["Localizer".into(), "pilot".into()],
        }
    }

    fn inst(
        series: &str,
        sop: &str,
        orientation: [f64; 6],
        pos: [f64; 3],
        expected: Option<u32>,
    ) -> Received {
        Received {
            path: format!("/spool/{sop}.dcm").into(),
            meta: InstanceMeta {
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.4".into(),
                sop_instance_uid: sop.into(),
                study_instance_uid: "1.2".into(),
                series_instance_uid: series.into(),
                modality: Some("MR".into()),
                series_number: Some(1),
                instance_number: None,
                acquisition_number: None,
                image_type: vec!["ORIGINAL".into(), "PRIMARY".into()],
                series_description: Some("t1 tri-pilot".into()),
                protocol_name: None,
                body_part_examined: None,
                images_in_acquisition: expected,
                number_of_frames: None,
                geometry: SliceGeometry {
                    rows: 8,
                    columns: 8,
                    pixel_spacing: Some([1.0, 1.0]),
                    orientation: Some(orientation),
                    position: Some(pos),
                    slice_thickness: None,
                    frame_of_reference_uid: None,
                },
            },
        }
    }

    const SAG: [f64; 6] = [0., 1., 0., 0., 0., -1.];
    const AX: [f64; 6] = [1., 0., 0., 0., 1., 0.];
    const COR: [f64; 6] = [1., 0., 0., 0., 0., -1.];

    #[test]
    fn completes_after_idle_time_only() {
        let mut a = Assembler::new(config(1000));
        let t0 = Instant::now();
        a.add(inst("1.9", "1", SAG, [5., 0., 0.], None), t0);
        a.add(
            inst("1.9", "2", SAG, [0., 0., 0.], None),
            t0 + Duration::from_millis(600),
        );
        assert!(
            a.take_complete(t0 + Duration::from_millis(1500)).is_empty(),
            "idle counts from the last arrival"
        );
        assert_eq!(a.next_deadline(), Some(t0 + Duration::from_millis(1600)));
        let done = a.take_complete(t0 + Duration::from_millis(1600));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].instance_count(), 2);
        // Ordered along the normal: sagittal normal here is -x, so x=5 comes first.
        let order: Vec<&str> = done[0]
            .instances()
            .map(|r| r.meta.sop_instance_uid.as_str())
            .collect();
        assert_eq!(order, ["1", "2"]);
        assert_eq!(a.pending_count(), 0);
    }

    #[test]
    fn images_in_acquisition_completes_early_and_planes_split() {
        let mut a = Assembler::new(config(60_000));
        let t0 = Instant::now();
        a.add(inst("1.9", "1", SAG, [0., 0., 0.], Some(3)), t0);
        a.add(inst("1.9", "2", AX, [0., 0., 0.], Some(3)), t0);
        assert!(a.take_complete(t0).is_empty());
        a.add(inst("1.9", "3", COR, [0., 0., 0.], Some(3)), t0);
        let done = a.take_complete(t0);
        assert_eq!(done.len(), 1);
        let s = &done[0];
        assert!(
            s.is_localizer,
            "description matches 'pilot' case-insensitively"
        );
        let planes: Vec<Plane> = s.stacks.iter().map(|s| s.plane).collect();
        assert_eq!(planes, [Plane::Axial, Plane::Coronal, Plane::Sagittal]);
    }

    #[test]
    fn late_instance_reopens_with_next_revision_and_duplicates_count_once() {
        let mut a = Assembler::new(config(100));
        let t0 = Instant::now();
        a.add(inst("1.9", "1", SAG, [0., 0., 0.], None), t0);
        a.add(inst("1.9", "1", SAG, [0., 0., 0.], None), t0);
        let first = a.take_complete(t0 + Duration::from_millis(100));
        assert_eq!((first[0].revision, first[0].instance_count()), (0, 1));
        // A late one: the series is handed on again, whole.
        a.add(
            inst("1.9", "2", SAG, [1., 0., 0.], None),
            t0 + Duration::from_millis(200),
        );
        let second = a.take_complete(t0 + Duration::from_millis(300));
        assert_eq!((second[0].revision, second[0].instance_count()), (1, 2));
    }

    #[test]
    fn not_a_localizer_without_type_or_pattern() {
        let mut a = Assembler::new(config(10));
        let mut r = inst("1.9", "1", AX, [0., 0., 0.], None);
        r.meta.series_description = Some("t2 tse ax".into());
        a.add(r.clone(), Instant::now());
        let s = a.take_complete(Instant::now() + Duration::from_millis(10));
        assert!(!s[0].is_localizer);
        let mut a = Assembler::new(config(10));
        r.meta.image_type.push("LOCALIZER".into());
        a.add(r, Instant::now());
        assert!(a.take_complete(Instant::now() + Duration::from_millis(10))[0].is_localizer);
    }
}
