//! Command line: argument parsing only; the work lives in the library.

use clap::{Parser, Subcommand, ValueEnum};
use scout::adapter::Method;
use scout::config::Config;
use scout::geometry::Plane;
use scout::scu::{self, Outgoing, Peer};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "scout",
    version,
    about = "Edge agent for MR scanners: localizers in, landmarks out"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (Storage SCP, spool, series assembly) until SIGTERM.
    Serve {
        /// Configuration file; without it the embedded config/scout.toml is used.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and print every problem found.
    CheckConfig { file: PathBuf },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// C-ECHO a remote AE.
    Echo {
        host: String,
        port: u16,
        #[command(flatten)]
        ae: AeArgs,
    },
    /// C-STORE DICOM files (or every file under given directories) to a remote AE.
    Send {
        host: String,
        port: u16,
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        ae: AeArgs,
    },
    /// Write a synthetic MR series (Part-10 files) for trials.
    Synth {
        out: PathBuf,
        #[arg(long, default_value_t = 9)]
        slices: usize,
        /// Planes, one stack each: several make a multi-plane localizer.
        #[arg(long, value_delimiter = ',', default_value = "sagittal")]
        planes: Vec<PlaneArg>,
        #[arg(long, default_value_t = 256)]
        size: u16,
    },
    /// Train adapters on the first N cases of a data set and save them in one file.
    Train {
        /// Data set folder (volume or image layout, see README).
        dataset: PathBuf,
        #[arg(long, default_value_t = 5)]
        templates: usize,
        #[arg(long, value_enum, default_value_t = Method::Contrastive)]
        method: Method,
        /// Region radius around template landmark points, in pixels.
        #[arg(long, default_value_t = 10.0)]
        radius: f64,
        #[arg(long)]
        out: PathBuf,
        /// Landmarks: keep the templates for alignment; the agent then ranks candidate
        /// regions by where the aligned templates put each landmark and places a landmark
        /// the adapter found no region for (issue #7, `eval --align fill`).
        #[arg(long)]
        align: bool,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        context: ContextArgs,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Evaluate a method on a data set with the protocol of EVALUATION.md.
    Eval {
        dataset: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, default_value_t = 5)]
        templates: usize,
        #[arg(long, value_enum, default_value_t = Method::Contrastive)]
        method: Method,
        /// One binary adapter per label instead of one multi-label adapter.
        #[arg(long)]
        binary: bool,
        /// Refine structures with SAM's decoder, prompted from each localized region.
        #[arg(long)]
        sam: bool,
        /// How SAM is prompted (with --sam).
        #[arg(long, value_enum, default_value_t = scout::eval::SamPrompt::Points)]
        sam_prompt: scout::eval::SamPrompt,
        /// Keep SAM's mask only if its predicted IoU reaches this (else the region).
        #[arg(long, default_value_t = 0.0)]
        sam_min_iou: f32,
        /// Keep SAM's mask only if its IoU with the region reaches this.
        #[arg(long, default_value_t = 0.0)]
        sam_min_agreement: f64,
        /// Template-to-target alignment: `prior` lets the aligned templates' landmarks
        /// choose among candidate regions, `fill` also places landmarks with no region
        /// in slice k* (what the agent does), `only` reports the aligned landmarks alone.
        #[arg(long, value_enum)]
        align: Option<scout::eval::AlignMode>,
        /// Robustness: rotate the test images (not the templates) by this many degrees.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        rotate: f64,
        /// Robustness: scale the test images about their centre.
        #[arg(long, default_value_t = 1.0, value_parser = positive, allow_negative_numbers = true)]
        scale: f64,
        /// Robustness: scale the test images' rows by this much more than their columns.
        #[arg(long, default_value_t = 1.0, value_parser = positive, allow_negative_numbers = true)]
        stretch: f64,
        /// Robustness: intensity gamma of the test images (over each slice's range).
        #[arg(long, default_value_t = 1.0)]
        gamma: f64,
        /// Robustness: move the test images' content down by this share of their rows
        /// (negative: up), as a field of view placed higher or lower on the body.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        shift: f64,
        #[arg(long, default_value_t = 10.0)]
        radius: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Robustness: K disjoint template sets (cases 1–N, N+1–2N, …), each tested on
        /// every other case; reports mean and worst fold.
        #[arg(long, default_value_t = 1)]
        folds: usize,
        /// Write overlay PNGs (prediction vs truth) of each test case here.
        #[arg(long)]
        png: Option<PathBuf>,
        /// Train and measure only this kind of task (default: every one the data set has).
        #[arg(long, value_enum)]
        only: Option<scout::eval::TaskKind>,
        /// Volumes: test only each test case's localizer slice k* (as the agent analyses by
        /// default); the templates keep their 9-slice stacks. Read the 2D figures.
        #[arg(long)]
        localizer_only: bool,
        #[command(flatten)]
        context: ContextArgs,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Benchmarks, reported as ratios against a reference run in the same process.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Per-slice latency of each encoder variant (and the SAM decoder) in tract.
    /// benches/backbone.py runs this and onnxruntime on the same files side by side.
    Backbone {
        /// Backbones from the manifest (default: every LiteMedSAM variant).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        #[arg(long, default_value = "models/models.toml")]
        manifest: PathBuf,
        /// DICOM or PNG slice (default: the reference slice in models/testdata).
        #[arg(long, default_value = "models/testdata/slice.dcm")]
        slice: PathBuf,
        #[arg(long, default_value_t = 10)]
        runs: usize,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Where the models run (`cuda` needs a `--features cuda` build and an NVIDIA GPU).
        #[arg(long, value_enum, default_value_t = scout::backbone::Backend::Cpu)]
        device: scout::backbone::Backend,
    },
    /// Whole agent: last image acknowledged → SR at the destination, for a 9-slice
    /// localizer sent at scanner pace and all at once; peak RSS of the agent.
    /// Run from the repository root (the agent reads models/).
    E2e {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Pause between images in the paced case (ms).
        #[arg(long, default_value_t = 300)]
        gap_ms: u64,
        /// Slices the rules analyse (overrides the configuration's "center").
        #[arg(long, value_enum, default_value_t = SlicesArg::Center)]
        slices: SlicesArg,
        /// A data set's 6th case as the series: a volume data set's 9-slice stack as a
        /// sagittal localizer (e.g. ../shared/data/spine-mr), a 2D data set's image as a
        /// coronal chest localizer (e.g. ../shared/data/chest-xr, with --negatives);
        /// default: the synthetic phantom.
        #[arg(long)]
        dataset: Option<PathBuf>,
        /// The data set's images are negatives (air bright, as chest-xr's): sent as
        /// MONOCHROME1.
        #[arg(long, requires = "dataset")]
        negatives: bool,
        /// Adapter file of the spine rule (default: the shipped one), e.g. one trained
        /// with `scout train --align`.
        #[arg(long)]
        spine_adapter: Option<PathBuf>,
        #[arg(long)]
        work: Option<PathBuf>,
    },
    /// DCMTK storescu → scout vs DCMTK storescu → DCMTK storescp.
    Ingest {
        #[arg(long, default_value_t = 500)]
        count: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Working directory (default: a fresh directory under the system temp dir).
        #[arg(long)]
        work: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum SlicesArg {
    Center,
    All,
}

/// How a data set's images are read.
#[derive(clap::Args)]
struct DataArgs {
    /// The images are stored as negatives (air bright, as chest-xr's PNGs are): read them
    /// inverted, as the agent reads a MONOCHROME1 image, so that an adapter learns from
    /// what it will be shown.
    #[arg(long)]
    negatives: bool,
}

impl DataArgs {
    fn open(&self, dir: &std::path::Path) -> Result<scout::dataset::Dataset, String> {
        scout::dataset::Dataset::open(dir)
            .map(|d| d.inverted(self.negatives))
            .map_err(|e| e.to_string())
    }
}

/// Context appended to each cell's features (adapters remember it).
#[derive(clap::Args)]
struct ContextArgs {
    /// Box-averaged features over these windows (cells), e.g. 3,9.
    #[arg(long, value_delimiter = ',')]
    pools: Vec<usize>,
    /// The slice's mean feature.
    #[arg(long)]
    global_context: bool,
    /// The cell's position in the image.
    #[arg(long)]
    position: bool,
    /// The cell's position in the image, for the landmarks only: the structures are
    /// trained without it.
    #[arg(long, conflicts_with = "position")]
    landmark_position: bool,
    /// Landmarks: choose regions that fit the templates' landmark layout.
    #[arg(long)]
    shape: bool,
    /// Landmarks: move each point to where the templates' intensity patches around their
    /// landmark match best, within 3 feature cells.
    #[arg(long)]
    patches: bool,
    /// Train also on copies of the templates rotated by ±10°, scaled by 0.9 and 1.1 and
    /// with gamma 0.7 and 1.4 (label maps and landmarks moved with them).
    #[arg(long)]
    augment: bool,
    /// Structures, with --augment: train also on copies of the templates with the field of
    /// view 10 % higher and 10 % lower (label maps and landmarks moved with them); the
    /// landmarks are trained without these copies.
    #[arg(long, requires = "augment")]
    augment_shift: bool,
    /// Structures, with --augment: train also on copies of the templates with the rows
    /// scaled by 0.9 and 1.1 and the columns not (a flatter and a taller body); the
    /// landmarks are trained without these copies.
    #[arg(long, requires = "augment")]
    augment_stretch: bool,
    /// Structures: draw part of the negatives from just outside each region, where its
    /// edge lies.
    #[arg(long)]
    borders: bool,
    /// Also train adapters of these methods on the same cells and average their scores
    /// with the main method's (e.g. classification).
    #[arg(long, value_delimiter = ',')]
    ensemble: Vec<scout::adapter::Method>,
    /// Landmarks (with --shape): in the localizer slice, place a landmark with no region
    /// where the layout of the found ones puts it, when that is certain to the radius.
    #[arg(long)]
    layout_fill: bool,
    /// In a stack: only landmark findings near the localizer slice's point (within the
    /// radius, in-plane) vote for the 3D point; the localizer slice's structures are the
    /// prior of the structure layout in the other slices, and each structure's region there
    /// is cut to the reach of its section in the localizer slice, learned from the
    /// templates' stacks.
    #[arg(long)]
    stack_anchor: bool,
    /// With --stack-anchor: a stack's slices are taken outwards from the localizer slice,
    /// and each structure's region in a slice is joined with what lies deeper inside its
    /// region in the slice next in than a depth learned per structure and step out from
    /// the templates' stacks.
    #[arg(long, requires = "stack_anchor")]
    stack_fill: bool,
    /// With --stack-anchor: a stack's slices are taken outwards from the localizer slice,
    /// and each structure's region in a slice is cut to its region in the slice next in,
    /// grown by a margin learned per structure and step out from the templates' stacks.
    #[arg(long, requires = "stack_anchor")]
    stack_bound: bool,
    /// With --stack-anchor: at a stack's outermost slices each structure's region becomes
    /// the contour halfway between it and its region in the slice next in, scaled as the
    /// templates' sections narrow there (rows and columns learned per structure).
    #[arg(long, requires = "stack_anchor")]
    stack_blend: bool,
    /// With --stack-anchor: a structure a stack's slice misses while the slice next in has
    /// it takes its region there, where every template's section continues at that step.
    #[arg(long, requires = "stack_anchor")]
    stack_carry: bool,
    /// Structures: each slice's odds of a cell being in some structure weighed by how
    /// this patient's structures and their surroundings look in the localizer slice (the
    /// cells the adapter is sure of there).
    #[arg(long)]
    appearance: bool,
    /// Structures: refit the upsampled scores to the slice's intensity edges (guided
    /// filter, the slice as guide), so borders follow edges instead of the feature grid.
    #[arg(long)]
    guided: bool,
    /// Landmarks: each cell of a landmark's region votes for where it sees the point
    /// (offsets learned from the templates) instead of taking the region's centroid.
    #[arg(long)]
    votes: bool,
    /// Structures: weigh the scores by where the templates have each structure in the
    /// frame of all of them (an atlas of their label maps), cutting spill and filling holes.
    #[arg(long)]
    atlas: bool,
    /// Structures: weigh the scores of a structure that lies between the others in every
    /// template (the heart between the lungs) by the templates' share of it, in a frame
    /// that the structures found around it place (affine fit of their outlines).
    #[arg(long)]
    enclosed: bool,
    /// Structures, with --enclosed: take each template's enclosed structure at scales 0.8
    /// to 1.2 about its centroid into the frame's share, so that a heart larger or smaller
    /// against the lungs than every template's is not cut to their size.
    #[arg(long, requires = "enclosed")]
    enclosed_sizes: bool,
    /// Structures, with --enclosed: give an enclosed structure the background between it
    /// and a structure around it where that gap is at most two cells of the structures'
    /// grid along a row or a column (a heart whose faint edge fell short of a lung), then
    /// draw it convex again where --convex does.
    #[arg(long, requires = "enclosed")]
    enclosed_gaps: bool,
    /// Structures: draw a structure that every template shows convex (the heart) as the
    /// convex hull of its region, less the other structures' regions.
    #[arg(long)]
    convex: bool,
    /// Structures, with --convex: give each convex structure its moments' ellipse too, as
    /// large as the templates' own masks fill it, less the other structures' regions (a
    /// heart whose faint top or bottom the hull left flat is rounded).
    #[arg(long, requires = "convex")]
    ellipse: bool,
    /// Structures: let SAM's decoder redraw, from its region's box, each structure that
    /// SAM redraws from the templates' own boxes at IoU 0.85 or more (the lungs, not the
    /// heart); its mask is kept where SAM's predicted IoU is 0.8 or more and it overlaps the
    /// region at 0.5 or more.
    #[arg(long)]
    sam_redraw: bool,
    /// Landmarks, with --sam-redraw: place a landmark also at the extreme of a structure
    /// SAM redraws (the centroid of its top rows, its lowest lateral corner...) when the
    /// templates' masks give their landmarks back there, also without the detail finer
    /// than a cell of SAM's masks, and SAM's masks of them keep it within half the
    /// landmark radius: the mean of that point and the adapter's.
    #[arg(long, requires = "sam_redraw")]
    extremes: bool,
    /// Landmarks: take off each landmark's mean error over the templates, each left out in
    /// turn and placed by an adapter trained on the others (shrunk by that mean's standard
    /// error); one more landmark training per template.
    #[arg(long, conflicts_with = "align")]
    calibrate: bool,
    /// Structures: give each structure the foreground fragments (where the labels' scores
    /// sum to 0.5 or more) that touch its region and no other's.
    #[arg(long)]
    fragments: bool,
    /// With --shape: compare the layout in the target's pose (turned up to 20°, scaled
    /// 0.9–1.1), so a patient lying turned still fits the templates' layout.
    #[arg(long)]
    pose: bool,
    /// Landmark adapters read only the coarsest output of a multi-output backbone (e.g.
    /// `litemedsam-hyper`'s plain encoder output); structure adapters read all of it.
    #[arg(long)]
    coarse_landmarks: bool,
    /// Structures, with landmarks in the data set: score them only in the box of the
    /// landmarks found, grown by how far the templates' structures reach past their
    /// landmarks' box (× 1.25) and the landmark radius; the landmarks are then found first.
    #[arg(long, conflicts_with = "extremes")]
    window: bool,
    /// Structures, with landmarks in the data set: in the localizer slice, each structure
    /// that every template shows around one landmark is the region holding that landmark
    /// found (a region holding another structure's landmark is handed to it); the
    /// landmarks are then found first.
    #[arg(long, conflicts_with = "extremes")]
    identity: bool,
    /// Hidden units per layer of the adapters' nets (at least 1).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..))]
    hidden: u16,
}

impl ContextArgs {
    /// The adapters' training options these flags ask for (`scout train` and `scout eval`
    /// share them; each sets what only it has on top).
    fn train_config(&self) -> scout::adapter::TrainConfig {
        scout::adapter::TrainConfig {
            shape: self.shape,
            patches: self.patches,
            augment: self.augment,
            augment_shift: self.augment_shift,
            augment_stretch: self.augment_stretch,
            borders: self.borders,
            ensemble: self.ensemble.clone(),
            layout_fill: self.layout_fill,
            stack_anchor: self.stack_anchor,
            stack_fill: self.stack_fill,
            stack_bound: self.stack_bound,
            stack_blend: self.stack_blend,
            stack_carry: self.stack_carry,
            appearance: self.appearance,
            guided: self.guided,
            votes: self.votes,
            atlas: self.atlas,
            enclosed: self.enclosed,
            enclosed_sizes: self.enclosed_sizes,
            enclosed_gaps: self.enclosed_gaps,
            convex: self.convex,
            ellipse: self.ellipse,
            sam_redraw: self.sam_redraw,
            extremes: self.extremes,
            calibrate: self.calibrate,
            fragments: self.fragments,
            pose: self.pose,
            coarse_landmarks: self.coarse_landmarks,
            window: self.window,
            identity: self.identity,
            landmark_position: self.landmark_position,
            hidden: self.hidden.into(),
            context: scout::adapter::Context {
                pools: self.pools.clone(),
                global: self.global_context,
                position: self.position || self.landmark_position,
            },
            ..Default::default()
        }
    }
}

#[derive(clap::Args)]
struct ModelArgs {
    #[arg(long, default_value = "models/models.toml")]
    manifest: PathBuf,
    /// Backbone id from the manifest (default: the manifest's default).
    #[arg(long)]
    backbone: Option<String>,
    /// Feature cache directory.
    #[arg(long, default_value = "scout-data/features")]
    cache: PathBuf,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Where the models run; `cuda` needs a build with `--features cuda` and an NVIDIA GPU.
    #[arg(long, value_enum, default_value_t = scout::backbone::Backend::Cpu)]
    device: scout::backbone::Backend,
}

struct Models {
    manifest: scout::backbone::Manifest,
    backbone: scout::backbone::Backbone,
    cache: scout::features::FeatureCache,
}

fn load_models(m: &ModelArgs) -> Result<Models, String> {
    scout::backbone::set_threads(m.threads);
    scout::backbone::set_backend(m.device);
    let manifest = scout::backbone::Manifest::load(&m.manifest).map_err(|e| e.to_string())?;
    let id = m
        .backbone
        .clone()
        .unwrap_or_else(|| manifest.default_backbone.clone());
    let backbone = scout::backbone::Backbone::load(&manifest, &id).map_err(|e| e.to_string())?;
    let cache = scout::features::FeatureCache::new(&m.cache, &backbone);
    Ok(Models {
        manifest,
        backbone,
        cache,
    })
}

#[derive(clap::Args)]
struct AeArgs {
    /// Our (calling) AE title.
    #[arg(long, default_value = "SCOUT")]
    aet: String,
    /// The remote (called) AE title.
    #[arg(long, default_value = "ANY-SCP")]
    aec: String,
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum PlaneArg {
    Axial,
    Coronal,
    Sagittal,
}

impl From<PlaneArg> for Plane {
    fn from(p: PlaneArg) -> Plane {
        match p {
            PlaneArg::Axial => Plane::Axial,
            PlaneArg::Coronal => Plane::Coronal,
            PlaneArg::Sagittal => Plane::Sagittal,
        }
    }
}

/// A factor that scales an image: finite and above 0.
fn positive(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(f) if f.is_finite() && f > 0.0 => Ok(f),
        Ok(_) => Err(format!("{v} is not a finite number above 0")),
        Err(e) => Err(format!("{v}: {e}")),
    }
}

fn peer(host: String, port: u16, ae: AeArgs) -> Peer {
    Peer {
        host,
        port,
        called_ae_title: ae.aec,
        calling_ae_title: ae.aet,
        timeout: Duration::from_secs(ae.timeout_s),
    }
}

fn collect_files(paths: &[PathBuf], out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for p in paths {
        if p.is_dir() {
            let mut children: Vec<PathBuf> = std::fs::read_dir(p)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            children.sort();
            collect_files(&children, out)?;
        } else {
            out.push(p.clone());
        }
    }
    Ok(())
}

fn load_config(path: Option<&Path>) -> Result<Config, String> {
    match path {
        Some(p) => Config::load(p),
        None => Config::embedded(),
    }
    .map_err(|e| e.to_string())
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Cmd::Serve { config } => {
            let config = load_config(config.as_deref())?;
            limit_malloc_arenas();
            scout::pipeline::serve(&config).map_err(|e| e.to_string())
        }
        Cmd::CheckConfig { file } => {
            let config = load_config(Some(&file))?;
            if let Some(tls) = &config.scp.tls {
                scout::scp::tls_server_config(tls).map_err(|e| e.to_string())?;
            }
            // Models and adapters too: missing files, checksums, uncoded labels.
            scout::analysis::Engine::load(&config).map_err(|e| e.to_string())?;
            println!("{}: ok", file.display());
            Ok(())
        }
        Cmd::DefaultConfig => {
            print!("{}", scout::config::DEFAULT_CONFIG_TOML);
            Ok(())
        }
        Cmd::Echo { host, port, ae } => {
            let p = peer(host, port, ae);
            scu::echo(&p).map_err(|e| e.to_string())?;
            println!("C-ECHO {p}: success");
            Ok(())
        }
        Cmd::Send {
            host,
            port,
            files,
            ae,
        } => {
            let p = peer(host, port, ae);
            let mut paths = Vec::new();
            collect_files(&files, &mut paths).map_err(|e| e.to_string())?;
            let mut items = Vec::new();
            for path in &paths {
                match Outgoing::from_file(path) {
                    Ok(o) => items.push(o),
                    Err(e) => eprintln!("skipping {e}"),
                }
            }
            let results = scu::store(&p, &items).map_err(|e| e.to_string())?;
            let failed = results.iter().filter(|r| r.status != Some(0)).count();
            for r in results.iter().filter(|r| r.status != Some(0)) {
                eprintln!(
                    "{}: {} {}",
                    r.sop_instance_uid,
                    r.status
                        .map(|s| format!("status {s:#06x}"))
                        .unwrap_or_else(|| "not negotiated".into()),
                    r.error_comment.as_deref().unwrap_or("")
                );
            }
            println!("C-STORE {p}: {} sent, {failed} failed", results.len());
            if failed > 0 {
                Err(format!("{failed} instances were not stored"))
            } else {
                Ok(())
            }
        }
        Cmd::Synth {
            out,
            slices,
            planes,
            size,
        } => {
            let spec = scout::synth::SynthSpec {
                slices,
                rows: size,
                columns: size,
                planes: planes.into_iter().map(Plane::from).collect(),
                ..Default::default()
            };
            let s = scout::synth::write_series(&out, &spec)?;
            println!(
                "wrote {} files of series {} to {}",
                s.files.len(),
                s.series_instance_uid,
                out.display()
            );
            Ok(())
        }
        Cmd::Train {
            dataset,
            templates,
            method,
            radius,
            out,
            align,
            data,
            context,
            model,
        } => {
            let m = load_models(&model)?;
            let ds = data.open(&dataset)?;
            let config = scout::adapter::TrainConfig {
                align,
                ..context.train_config()
            };
            let decoder = if config.sam_redraw {
                Some(
                    scout::sam::Sam::for_backbone(&m.manifest, m.backbone.id())
                        .map_err(|e| e.to_string())?,
                )
            } else {
                None
            };
            let bundle = scout::train::train_dataset(
                &ds,
                &scout::train::Models {
                    backbone: &m.backbone,
                    cache: &m.cache,
                    sam: decoder.as_ref(),
                },
                templates,
                method,
                radius,
                &config,
            )
            .map_err(|e| e.to_string())?;
            bundle.save(&out).map_err(|e| e.to_string())?;
            println!("wrote {} ({})", out.display(), bundle.summary());
            Ok(())
        }
        Cmd::Eval {
            dataset,
            data,
            templates,
            method,
            binary,
            sam,
            sam_prompt,
            sam_min_iou,
            sam_min_agreement,
            align,
            rotate,
            scale,
            stretch,
            gamma,
            shift,
            radius,
            seed,
            json,
            folds,
            png,
            only,
            localizer_only,
            context,
            model,
        } => {
            if binary
                && (context.atlas
                    || context.enclosed
                    || context.convex
                    || context.sam_redraw
                    || context.extremes
                    || context.calibrate)
            {
                // The atlas's frame is the union of all the structures of one adapter, and
                // an enclosed structure is placed through the others of its adapter; the
                // structures' steps read the convex and SAM flags of that one adapter.
                return Err(
                    "--atlas, --enclosed, --convex, --sam-redraw, --extremes and --calibrate need one multi-label adapter, not --binary"
                        .into(),
                );
            }
            let m = load_models(&model)?;
            let ds = data.open(&dataset)?;
            let decoder = if sam || context.sam_redraw {
                Some(
                    scout::sam::Sam::for_backbone(&m.manifest, m.backbone.id())
                        .map_err(|e| e.to_string())?,
                )
            } else {
                None
            };
            let mut reports = Vec::new();
            for fold in 0..folds.max(1) {
                let opts = scout::eval::EvalOptions {
                    templates,
                    method,
                    binary,
                    sam: sam.then_some(scout::eval::SamRefine {
                        prompt: sam_prompt,
                        points: 10,
                        min_predicted_iou: sam_min_iou,
                        min_agreement: sam_min_agreement,
                    }),
                    align,
                    landmark_radius: radius,
                    train: scout::adapter::TrainConfig {
                        seed,
                        ..context.train_config()
                    },
                    png_dir: png.clone(),
                    template_offset: fold * templates.max(1),
                    only,
                    localizer_only,
                    augment: scout::eval::Augment {
                        rotate_deg: rotate,
                        scale,
                        stretch,
                        gamma,
                        shift,
                    },
                };
                let report =
                    scout::eval::evaluate(&ds, &m.backbone, &m.cache, decoder.as_ref(), &opts)
                        .map_err(|e| e.to_string())?;
                print!("{}", scout::eval::table(&report));
                reports.push(report);
            }
            if reports.len() > 1 {
                print!("{}", scout::eval::folds_table(&reports));
            }
            if let Some(path) = json {
                let text = if reports.len() == 1 {
                    serde_json::to_string_pretty(&reports[0])
                } else {
                    serde_json::to_string_pretty(&reports)
                }
                .map_err(|e| e.to_string())?;
                std::fs::write(&path, text + "\n")
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            Ok(())
        }
        Cmd::Bench {
            what:
                BenchCmd::Backbone {
                    models,
                    manifest,
                    slice,
                    runs,
                    threads,
                    device,
                },
        } => {
            scout::backbone::set_backend(device);
            let manifest = scout::backbone::Manifest::load(&manifest).map_err(|e| e.to_string())?;
            let ids = if models.is_empty() {
                manifest
                    .backbones
                    .keys()
                    .filter(|k| k.starts_with("litemedsam"))
                    .cloned()
                    .collect()
            } else {
                models
            };
            let pixels = scout::image::read_any(&slice).map_err(|e| e.to_string())?;
            let normalized = scout::image::normalize(&pixels).map_err(|e| e.to_string())?;
            let (figures, decoder_ms) =
                scout::bench::backbone(&manifest, &ids, &normalized, runs, threads)
                    .map_err(|e| e.to_string())?;
            println!(
                "tract ({device:?}), {threads} threads, median of {runs} runs on {}:",
                slice.display()
            );
            for f in &figures {
                println!(
                    "  {:<18} {:8.1} ms/slice (min {:.1}), load {:.2} s; 9 slices: {:.0} ms intra-op, {:.0} ms one slice per thread",
                    f.backbone, f.median_ms, f.min_ms, f.load_s, f.localizer9_intra_op_ms, f.localizer9_slice_per_thread_ms
                );
            }
            println!("  SAM decoder, 10 points: {decoder_ms:.1} ms");
            let peak = scout::bench::peak_rss_mib();
            println!("  peak RSS {peak:.0} MiB");
            let json = serde_json::json!({ "tract": figures, "decoder_ms": decoder_ms, "threads": threads, "peak_rss_mib": peak });
            println!("{json}");
            Ok(())
        }
        Cmd::Bench {
            what:
                BenchCmd::E2e {
                    rounds,
                    gap_ms,
                    slices,
                    dataset,
                    negatives,
                    spine_adapter,
                    work,
                },
        } => {
            let work = work.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("scout-bench-e2e-{}", std::process::id()))
            });
            let images = match &dataset {
                Some(d) => {
                    let ds = scout::dataset::Dataset::open(d).map_err(|e| e.to_string())?;
                    let name = ds
                        .cases
                        .get(5)
                        .ok_or("the data set has fewer than 6 cases")?
                        .clone();
                    let case = ds.load_case(&name).map_err(|e| e.to_string())?;
                    Some(scout::bench::BenchImages::of_case(
                        ds.layout, &case, negatives,
                    ))
                }
                None => None,
            };
            let slices = match slices {
                SlicesArg::Center => scout::rules::Slices::Center,
                SlicesArg::All => scout::rules::Slices::All,
            };
            let f = scout::bench::e2e(
                &work,
                rounds,
                Duration::from_millis(gap_ms),
                slices,
                images.as_ref(),
                spine_adapter.as_deref(),
            )
            .map_err(|e| e.to_string());
            let _ = std::fs::remove_dir_all(&work);
            let f = f?;
            println!(
                "end to end, {} images, slices = {}, median of {rounds} (last image acknowledged → SR stored at the destination):",
                f.images, f.slices
            );
            println!(
                "  paced ({} ms apart)  {:.2} s  {:?}",
                f.gap_ms, f.paced_s, f.paced_runs
            );
            println!(
                "  burst               {:.2} s  {:?}",
                f.burst_s, f.burst_runs
            );
            let both =
                |s: Option<f64>| s.map_or("a round without a SEG".into(), |s| format!("{s:.2} s"));
            println!(
                "  → SR and SEG        paced {}, burst {}",
                both(f.paced_both_s),
                both(f.burst_both_s)
            );
            println!("  agent peak RSS      {:.0} MiB", f.peak_rss_mb);
            println!(
                "{}",
                serde_json::json!({
                    "paced_s": f.paced_s,
                    "burst_s": f.burst_s,
                    "paced_both_s": f.paced_both_s,
                    "burst_both_s": f.burst_both_s,
                    "peak_rss_mb": f.peak_rss_mb,
                    "slices": f.slices,
                    "images": f.images,
                    "gap_ms": f.gap_ms,
                })
            );
            Ok(())
        }
        Cmd::Bench {
            what:
                BenchCmd::Ingest {
                    count,
                    rounds,
                    work,
                },
        } => {
            let tmp;
            let work = match work {
                Some(w) => w,
                None => {
                    tmp = std::env::temp_dir().join(format!("scout-bench-{}", std::process::id()));
                    tmp
                }
            };
            let f = scout::bench::ingest(count, rounds, &work).map_err(|e| e.to_string());
            let _ = std::fs::remove_dir_all(&work);
            let f = f?;
            let per_s = |t: f64| f.instances as f64 / t;
            println!(
                "ingest of {} instances x {} bytes, storescu on one association, median of {rounds} rounds:",
                f.instances, f.instance_bytes
            );
            println!(
                "  scout, journal + fdatasync     {:.3} s  ({:.0} instances/s)",
                f.scout_s,
                per_s(f.scout_s)
            );
            println!(
                "  scout, fsync file + directory  {:.3} s  ({:.0} instances/s)",
                f.scout_direct_s,
                per_s(f.scout_direct_s)
            );
            println!(
                "  dcmtk storescp, no fsync       {:.3} s  ({:.0} instances/s)",
                f.storescp_s,
                per_s(f.storescp_s)
            );
            println!(
                "  ratio scout/storescp           {:.3}",
                f.scout_s / f.storescp_s
            );
            let json = serde_json::json!({
                "instances": f.instances,
                "instance_bytes": f.instance_bytes,
                "rounds": rounds,
                "scout_s": f.scout_s,
                "scout_direct_fsync_s": f.scout_direct_s,
                "storescp_s": f.storescp_s,
                "ratio": f.scout_s / f.storescp_s,
                "ratio_direct_fsync": f.scout_direct_s / f.storescp_s,
            });
            println!("{json}");
            Ok(())
        }
    }
}

/// glibc gives threads their own malloc arenas and keeps freed memory in each; with the
/// encoder, matrix-product, prefetch and association threads the agent peaked at 751 MiB
/// analysing a 9-slice series (`bench e2e --slices all`) against 478 MiB with two
/// arenas, at the same speed. An explicit MALLOC_ARENA_MAX still wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes an allocator parameter; called before the agent
        // starts its threads.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

fn main() -> ExitCode {
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    // Under systemd (stderr connected to the journal): no timestamp (journald keeps its
    // own) and the sd-daemon(3) priority prefix, so `journalctl -p warning` works.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        use std::io::Write;
        logger.format(|buf, record| {
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(buf, "<{priority}>{}: {}", record.target(), record.args())
        });
    }
    logger.init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("scout: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scout::adapter::TrainConfig;

    /// `scout train` and `scout eval` read the adapters' options from the same flags: each
    /// flag sets its own option and no other, in both commands.
    #[test]
    fn each_flag_sets_its_own_training_option() {
        type Set = fn(&mut TrainConfig);
        let cases: [(&[&str], Set); 35] = [
            (&[], |_| {}),
            (&["--shape"], |c| c.shape = true),
            (&["--patches"], |c| c.patches = true),
            (&["--augment"], |c| c.augment = true),
            (&["--borders"], |c| c.borders = true),
            (&["--ensemble", "classification,basic"], |c| {
                c.ensemble = vec![Method::Classification, Method::Basic]
            }),
            (&["--layout-fill"], |c| c.layout_fill = true),
            (&["--stack-anchor"], |c| c.stack_anchor = true),
            (&["--stack-anchor", "--stack-fill"], |c| {
                c.stack_anchor = true;
                c.stack_fill = true
            }),
            (&["--stack-anchor", "--stack-bound"], |c| {
                c.stack_anchor = true;
                c.stack_bound = true
            }),
            (&["--stack-anchor", "--stack-blend"], |c| {
                c.stack_anchor = true;
                c.stack_blend = true
            }),
            (&["--stack-anchor", "--stack-carry"], |c| {
                c.stack_anchor = true;
                c.stack_carry = true
            }),
            (&["--appearance"], |c| c.appearance = true),
            (&["--guided"], |c| c.guided = true),
            (&["--votes"], |c| c.votes = true),
            (&["--atlas"], |c| c.atlas = true),
            (&["--enclosed"], |c| c.enclosed = true),
            (&["--enclosed", "--enclosed-sizes"], |c| {
                c.enclosed = true;
                c.enclosed_sizes = true
            }),
            (&["--enclosed", "--enclosed-gaps"], |c| {
                c.enclosed = true;
                c.enclosed_gaps = true
            }),
            (&["--convex"], |c| c.convex = true),
            (&["--convex", "--ellipse"], |c| {
                c.convex = true;
                c.ellipse = true
            }),
            (&["--sam-redraw"], |c| c.sam_redraw = true),
            (&["--sam-redraw", "--extremes"], |c| {
                c.sam_redraw = true;
                c.extremes = true
            }),
            (&["--calibrate"], |c| c.calibrate = true),
            (&["--fragments"], |c| c.fragments = true),
            (&["--pose"], |c| c.pose = true),
            (&["--coarse-landmarks"], |c| c.coarse_landmarks = true),
            (&["--window"], |c| c.window = true),
            (&["--identity"], |c| c.identity = true),
            (&["--augment", "--augment-shift"], |c| {
                c.augment = true;
                c.augment_shift = true
            }),
            (&["--augment", "--augment-stretch"], |c| {
                c.augment = true;
                c.augment_stretch = true
            }),
            (&["--hidden", "64"], |c| c.hidden = 64),
            (&["--pools", "3,9", "--position"], |c| {
                c.context.pools = vec![3, 9];
                c.context.position = true
            }),
            (&["--global-context"], |c| c.context.global = true),
            (&["--landmark-position"], |c| {
                c.context.position = true;
                c.landmark_position = true
            }),
        ];
        for (flags, set) in cases {
            let mut want = TrainConfig::default();
            set(&mut want);
            let want = serde_json::to_value(&want).unwrap();
            for command in [&["train", "ds", "--out", "a.adapter"][..], &["eval", "ds"]] {
                let args = ["scout"].iter().chain(command).chain(flags);
                let cli = Cli::try_parse_from(args).unwrap();
                let (Cmd::Train { context, .. } | Cmd::Eval { context, .. }) = cli.command else {
                    unreachable!("parsed as {:?}", command)
                };
                let got = serde_json::to_value(context.train_config()).unwrap();
                assert_eq!(got, want, "{command:?} {flags:?}");
            }
        }
        // The position for both tasks or for the landmarks alone, not both at once.
        let both = ["scout", "eval", "ds", "--position", "--landmark-position"];
        let e = Cli::try_parse_from(both)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("--landmark-position"), "{e}");
        // The structures' own copies are copies of the augmented templates; the ellipse
        // is a convex structure's, the sizes and gaps an enclosed structure's.
        for (flag, needs) in [
            ("--augment-shift", "--augment"),
            ("--augment-stretch", "--augment"),
            ("--ellipse", "--convex"),
            ("--enclosed-sizes", "--enclosed"),
            ("--enclosed-gaps", "--enclosed"),
        ] {
            let e = Cli::try_parse_from(["scout", "train", "ds", "--out", "a", flag])
                .err()
                .expect("refused")
                .to_string();
            assert!(e.lines().any(|l| l.trim() == needs), "{flag}: {e}");
        }
    }

    /// The robustness check's image changes take factors above 0, or a clear error.
    #[test]
    fn eval_changes_refuse_factors_that_are_not_above_zero() {
        let parse = |flag: &str, v: &str| Cli::try_parse_from(["scout", "eval", "ds", flag, v]);
        for flag in ["--scale", "--stretch"] {
            let Cmd::Eval { scale, stretch, .. } = parse(flag, "1.1").unwrap().command else {
                unreachable!()
            };
            let got = if flag == "--scale" { scale } else { stretch };
            assert_eq!(got, 1.1);
            for bad in ["0", "-0.9", "inf", "NaN", "x"] {
                let e = parse(flag, bad).err().expect(bad).to_string();
                assert!(e.contains(flag) && e.contains(bad), "{flag} {bad}: {e}");
            }
        }
        // A field of view placed lower on the body (towards the feet) moves the content up:
        // a negative share.
        let Cmd::Eval { shift, .. } = parse("--shift", "-0.1").unwrap().command else {
            unreachable!()
        };
        assert_eq!(shift, -0.1);
    }
}
