//! Helpers shared by the integration tests: DCMTK and shared-data availability (skipping
//! loudly, or failing in CI where they must be present), a scout daemon in a child
//! process, and a comparison of DICOM files.
#![allow(dead_code)]

use dicom_core::header::Header;
use dicom_object::{open_file, InMemDicomObject};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// True when the DCMTK tools are on PATH. Otherwise prints why the test is skipped, or
/// panics when SCOUT_REQUIRE_DCMTK is set (CI sets it: there a skip would hide a gap).
pub fn dcmtk(test: &str) -> bool {
    let ok = Command::new("storescu")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        if std::env::var_os("SCOUT_REQUIRE_DCMTK").is_some() {
            panic!("{test}: DCMTK (storescu) is required but not installed");
        }
        eprintln!("\n*** SKIPPED {test}: DCMTK is not installed (apt-get install dcmtk) ***\n");
    }
    ok
}

/// `../shared/data` beside the repository, when present (see the README's test section).
pub fn shared_data(test: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var_os("SCOUT_REQUIRE_SHARED").is_some() {
        panic!("{test}: ../shared/data is required but absent");
    }
    eprintln!("\n*** SKIPPED {test}: ../shared/data is absent ***\n");
    None
}

/// How the shipped spine adapter was trained (contrastive + shape + pools 3,9 + position
/// for the landmarks, border negatives for the structures), with or without alignment
/// templates — but
/// without `augment`, whose 270 extra encoder runs per training would cost CI several
/// minutes per test.
pub fn shipped_spine_config(align: bool) -> scout::adapter::TrainConfig {
    scout::adapter::TrainConfig {
        shape: true,
        align,
        borders: true,
        context: scout::adapter::Context {
            pools: vec![3, 9],
            global: false,
            position: true,
        },
        landmark_position: true,
        ..Default::default()
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `path` exists; fails the test with `what` after `timeout`.
pub fn wait_for_path(path: &Path, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what}: {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Configuration text: the embedded default with test values substituted.
pub fn config_text(port: u16, data_dir: &Path, edits: &[(&str, &str)]) -> String {
    let mut t = scout::config::DEFAULT_CONFIG_TOML
        .replace(
            "data_dir = \"scout-data\"",
            &format!("data_dir = {:?}", data_dir.display().to_string()),
        )
        .replace("port = 11112", &format!("port = {port}"))
        .replace("bind = \"0.0.0.0\"", "bind = \"127.0.0.1\"")
        .replace("idle_ms = 2000", "idle_ms = 500")
        .replace("bind = \"127.0.0.1:9112\"", "bind = \"\"")
        .replace("min_free_bytes = 536870912", "min_free_bytes = 0")
        // Small journal segments: every test opens its own spool.
        .replace("journal_segment_mib = 32", "journal_segment_mib = 4");
    // Ingest tests run without task rules: no models to load, no analysis competing
    // for the CPU; `agent_config` keeps them.
    if let Some(i) = t.find("\n[[rules]]") {
        t.truncate(i + 1);
    }
    for (from, to) in edits {
        assert!(t.contains(from), "config has no {from:?}");
        t = t.replace(from, to);
    }
    t
}

/// The full agent: the default rules with absolute model paths, every rule sending to a
/// destination "dest" on `dest_port`.
pub fn agent_config(port: u16, data_dir: &Path, dest_port: u16, edits: &[(&str, &str)]) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut t = config_text(port, data_dir, &[])
        + &scout::config::DEFAULT_CONFIG_TOML[scout::config::DEFAULT_CONFIG_TOML
            .find("\n[[rules]]")
            .expect("default config has rules")
            + 1..];
    t = t
        .replace("manifest = \"models/", &format!("manifest = \"{root}/models/"))
        .replace("adapter = \"models/", &format!("adapter = \"{root}/models/"))
        .replace("destinations = []", "destinations = [\"dest\"]")
        .replace(
            "# Where results are sent (C-STORE).",
            &format!(
                "[[destinations]]\nname = \"dest\"\nae_title = \"DEST\"\nhost = \"127.0.0.1\"\nport = {dest_port}\ntimeout_s = 5\n\n#"
            ),
        )
        .replace("retry_initial_s = 2", "retry_initial_s = 1")
        .replace("retry_max_s = 300", "retry_max_s = 2");
    for (from, to) in edits {
        assert!(t.contains(from), "config has no {from:?}");
        t = t.replace(from, to);
    }
    t
}

/// True when dicom3tools' dciodvfy is on PATH; skips loudly or panics like `dcmtk`.
pub fn dicom3tools(test: &str) -> bool {
    let ok = Command::new("which")
        .arg("dciodvfy")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var_os("SCOUT_REQUIRE_DCMTK").is_some() {
            panic!("{test}: dicom3tools (dciodvfy) is required but not installed");
        }
        eprintln!("\n*** SKIPPED {test}: dicom3tools is not installed (apt-get install dicom3tools) ***\n");
    }
    ok
}

/// `dciodvfy` on a file: the lines that report errors (empty = valid).
pub fn dciodvfy_errors(file: &Path) -> Vec<String> {
    let out = Command::new("dciodvfy")
        .arg(file)
        .output()
        .expect("run dciodvfy");
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|l| l.contains("Error"))
        .map(String::from)
        .collect()
}

/// DCMTK `storescp` writing every received instance under a unique file name (so a
/// duplicate delivery shows as a second file); killed when dropped.
pub struct Storescp {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl Storescp {
    pub fn start(port: u16, dir: &Path) -> Storescp {
        std::fs::create_dir_all(dir).unwrap();
        // storescp names a file before it has written all of it (in 4 KiB blocks, the
        // pixel data last), and a file cut where a top-level element ends parses as an
        // object without the rest. So a marker is written beside each file once storescp
        // has saved and closed it (`--exec-on-reception`, run before the next message,
        // `--exec-sync`); `wait_for` hands on only files with one.
        let marker = format!("touch \"#p/#f{WHOLE}\"");
        let child = Command::new("storescp")
            .args(["-aet", "DEST", "+uf", "-xs", "-xcr", &marker, "-od"])
            .arg(dir)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start storescp");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "storescp not listening");
            std::thread::sleep(Duration::from_millis(25));
        }
        Storescp {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    /// Received files whose name starts with `prefix` (`received_in`).
    pub fn received(&self, prefix: &str) -> Vec<PathBuf> {
        received_in(&self.dir, prefix)
    }

    /// At least `count` received files of `prefix` that storescp has finished writing
    /// (those finished by `timeout`, if fewer).
    pub fn wait_for(&self, prefix: &str, count: usize, timeout: Duration) -> Vec<PathBuf> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut v = self.received(prefix);
            v.retain(|p| {
                let mut marker = p.clone().into_os_string();
                marker.push(WHOLE);
                Path::new(&marker).exists()
            });
            if v.len() >= count || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The suffix of the marker storescp writes beside a file it has finished.
const WHOLE: &str = ".whole";

/// The files a `Storescp` received in `dir` whose name starts with `prefix` ("SR3" =
/// Comprehensive 3D SR, "SG" = Segmentation), whole or still being written. storescp has
/// saved a file before it answers the C-STORE, so a sender that has its answer finds it
/// here.
pub fn received_in(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(prefix) && !n.ends_with(".tmp") && !n.ends_with(WHOLE))
    });
    v.sort();
    v
}

impl Drop for Storescp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `scout serve` in a child process; killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub port: u16,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// CPU time (user + system) the daemon has used so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("daemon /proc stat");
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
        // SAFETY: sysconf only reads a system constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        ticks / if hz > 0 { hz as f64 } else { 100.0 }
    }

    pub fn start(config_path: &Path, port: u16) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_scout"))
            .args(["serve", "--config"])
            .arg(config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start scout");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("scout exited early ({st}): {:?}", log.lock().unwrap());
            }
            assert!(
                Instant::now() < deadline,
                "scout not listening: {:?}",
                log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        Daemon { child, port, log }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits for a log line containing every fragment; returns it.
    pub fn wait_log(&self, fragments: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .log_lines()
                .into_iter()
                .find(|l| fragments.iter().all(|f| l.contains(f)))
            {
                return Some(l);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a DCMTK tool; returns (success, stdout+stderr).
pub fn dcmtk_run(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A DCMTK tool (`storescu`, `echoscu`) towards scout at 127.0.0.1:`port`, called AE
/// SCOUT, with `options` before and `files` after the address.
pub fn dcmtk_to_scout(
    tool: &str,
    options: &[&str],
    port: u16,
    files: &[PathBuf],
) -> (bool, String) {
    let mut args: Vec<String> = options.iter().map(|s| s.to_string()).collect();
    args.extend([
        "-aec".into(),
        "SCOUT".into(),
        "127.0.0.1".into(),
        port.to_string(),
    ]);
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    dcmtk_run(tool, &args)
}

/// Every `.dcm` file under `dir` (spool layout), excluding partial writes.
pub fn spooled_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "dcm") {
                out.push(p);
            }
        }
    }
    walk(dir, &mut out);
    out.sort();
    out
}

pub fn tmp_is_empty(spool: &Path) -> bool {
    std::fs::read_dir(spool.join(".tmp"))
        .map(|mut r| r.next().is_none())
        .unwrap_or(true)
}

/// Data sets equal element by element (tag, VR and encoded value), file meta ignored.
pub fn same_dataset(a: &Path, b: &Path) -> Result<(), String> {
    let oa = open_file(a).map_err(|e| format!("{}: {e}", a.display()))?;
    let ob = open_file(b).map_err(|e| format!("{}: {e}", b.display()))?;
    compare(&oa, &ob)
}

fn compare(a: &InMemDicomObject, b: &InMemDicomObject) -> Result<(), String> {
    let ta: Vec<_> = a.iter().map(|e| e.tag()).collect();
    let tb: Vec<_> = b.iter().map(|e| e.tag()).collect();
    if ta != tb {
        return Err(format!("different tags: {ta:?} vs {tb:?}"));
    }
    for (ea, eb) in a.iter().zip(b.iter()) {
        if ea.vr() != eb.vr() {
            return Err(format!("{}: VR {:?} vs {:?}", ea.tag(), ea.vr(), eb.vr()));
        }
        match (ea.items(), eb.items()) {
            (Some(ia), Some(ib)) => {
                if ia.len() != ib.len() {
                    return Err(format!("{}: {} vs {} items", ea.tag(), ia.len(), ib.len()));
                }
                for (x, y) in ia.iter().zip(ib.iter()) {
                    compare(x, y)?;
                }
            }
            _ => {
                // Primitive values and encapsulated pixel fragments alike.
                if ea.value() != eb.value() {
                    return Err(format!("{}: values differ", ea.tag()));
                }
            }
        }
    }
    Ok(())
}

/// Image data set: a bright square (label 1) and a darker disk (label 2) on a textured
/// background, at positions that move from case to case; landmarks at their centres.
pub fn synthetic_image_dataset(dir: &Path, cases: usize) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("labels")).unwrap();
    let mut csv = String::from("case,landmark,x,y\n");
    for n in 0..cases {
        let (sr, sc) = (60.0 + 9.0 * n as f64, 70.0 + 6.0 * n as f64); // square centre
        let (dr, dc) = (170.0 - 7.0 * n as f64, 160.0 + 5.0 * n as f64); // disk centre
        let mut img = ::image::GrayImage::new(256, 256);
        let mut lab = ::image::GrayImage::new(256, 256);
        for r in 0..256u32 {
            for c in 0..256u32 {
                let (rf, cf) = (r as f64, c as f64);
                let in_square = (rf - sr).abs() <= 22.0 && (cf - sc).abs() <= 22.0;
                let in_disk = (rf - dr).hypot(cf - dc) <= 24.0;
                let texture = 40.0 + 15.0 * ((rf / 9.0).sin() * (cf / 7.0).cos());
                let (v, l) = if in_square {
                    (220.0, 1)
                } else if in_disk {
                    (130.0 + 30.0 * ((rf - dr) / 24.0), 2)
                } else {
                    (texture, 0)
                };
                img.put_pixel(c, r, ::image::Luma([v as u8]));
                lab.put_pixel(c, r, ::image::Luma([l]));
            }
        }
        let name = format!("case{n:02}");
        img.save(dir.join("images").join(format!("{name}.png")))
            .unwrap();
        lab.save(dir.join("labels").join(format!("{name}.png")))
            .unwrap();
        csv += &format!("{name},square,{sc},{sr}\n{name},disk,{dc},{dr}\n");
    }
    std::fs::write(dir.join("landmarks.csv"), csv).unwrap();
}
