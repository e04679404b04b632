//! Unattended operation: health and metrics endpoint under traffic, configuration
//! validation, the systemd unit.

mod common;

use common::*;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A plain HTTP/1.0 GET: (status code, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect health");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (code, body)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

#[test]
fn healthz_and_metrics_scraped_while_traffic_flows() {
    let t = "healthz_and_metrics_scraped_while_traffic_flows";
    if !dcmtk(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (port, dest_port, health) = (free_port(), free_port(), free_port());
    let cfg = tmp.path().join("scout.toml");
    let bind = format!("bind = \"127.0.0.1:{health}\"");
    std::fs::write(
        &cfg,
        agent_config(
            port,
            &tmp.path().join("data"),
            dest_port,
            &[("bind = \"\"", &bind)],
        ),
    )
    .unwrap();
    let dest = Storescp::start(dest_port, &tmp.path().join("received"));
    let agent = Daemon::start(&cfg, port);
    // The endpoint is bound before the SCP opens; if it is not up, the log says why.
    assert!(
        agent
            .wait_log(&["health: http://"], Duration::from_secs(5))
            .is_some(),
        "health endpoint not started: {:?}",
        agent.log_lines()
    );

    let (code, body) = get(health, "/healthz");
    assert_eq!(code, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["spool_writable"], true);
    assert_eq!(h["models_loaded"], true);
    assert!(h["last_successful_send_unix"].is_null());
    let before = get(health, "/metrics").1;
    assert_eq!(metric(&before, "scout_instances_received_total"), 0.0);

    // Traffic: two series, scraped while they are being sent and processed.
    let mut files: Vec<PathBuf> = Vec::new();
    for i in 0..2 {
        let s = scout::synth::write_series(
            &tmp.path().join(format!("series{i}")),
            &scout::synth::SynthSpec {
                images_in_acquisition: true,
                ..Default::default()
            },
        )
        .unwrap();
        files.extend(s.files);
    }
    let sender = std::thread::spawn(move || dcmtk_to_scout("storescu", &[], port, &files));
    let mut scrapes = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    let text = loop {
        let (code, text) = get(health, "/metrics");
        assert_eq!(code, 200);
        scrapes += 1;
        if metric(&text, "scout_results_sent_total") >= 4.0 {
            break text;
        }
        assert!(Instant::now() < deadline, "results not sent:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(sender.join().unwrap().0);
    assert!(scrapes > 2);
    assert_eq!(metric(&text, "scout_instances_received_total"), 18.0);
    assert_eq!(metric(&text, "scout_associations_total"), 1.0);
    assert_eq!(metric(&text, "scout_series_completed_total"), 2.0);
    assert_eq!(metric(&text, "scout_series_analysed_total"), 2.0);
    assert_eq!(metric(&text, "scout_outbox_depth"), 0.0);
    assert_eq!(
        metric(&text, "scout_encoder_seconds_count"),
        2.0,
        "center slices only"
    );
    assert_eq!(metric(&text, "scout_analysis_seconds_count"), 2.0);
    assert!(metric(&text, "scout_last_send_timestamp_seconds") > 1.7e9);
    assert_eq!(dest.received("SR3").len(), 2);
    let h: serde_json::Value = serde_json::from_str(&get(health, "/healthz").1).unwrap();
    assert!(h["last_successful_send_unix"].as_u64().is_some());
    assert_eq!(get(health, "/nothing").0, 404);
}

fn scout(args: &[&str], cwd: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scout"))
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn check_config_reports_every_problem_with_lines_and_serve_refuses_the_same() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.toml");
    std::fs::write(&good, scout::config::DEFAULT_CONFIG_TOML).unwrap();
    let (ok, text) = scout(&["check-config", good.to_str().unwrap()], root);
    assert!(ok, "{text}");

    // Schema and value problems: all listed, each with its line.
    let bad = tmp.path().join("bad.toml");
    let text = scout::config::DEFAULT_CONFIG_TOML
        .replace("[scp]", "[scp]\ncolour = \"blue\"")
        .replace("port = 11112", "port = \"eleven\"")
        .replace(
            "ae_title = \"SCOUT\"",
            "ae_title = \"A_TITLE_THAT_IS_TOO_LONG\"",
        );
    std::fs::write(&bad, &text).unwrap();
    let line = |needle: &str| text.lines().position(|l| l.starts_with(needle)).unwrap() + 1;
    let (ok, out) = scout(&["check-config", bad.to_str().unwrap()], root);
    assert!(!ok);
    for (needle, what) in [
        ("colour", "unknown field `colour`"),
        ("port = \"eleven\"", "invalid type"),
        ("ae_title = \"A_TITLE", "scp.ae_title"),
    ] {
        let l = format!("line {}:", line(needle));
        assert!(
            out.lines().any(|x| x.contains(&l) && x.contains(what)),
            "{what} not at {l}:\n{out}"
        );
    }
    // The daemon refuses to start with the same message.
    let (ok, served) = scout(&["serve", "--config", bad.to_str().unwrap()], root);
    assert!(!ok);
    for l in out.lines().filter(|l| l.contains("line ")) {
        assert!(
            served.contains(l.trim()),
            "serve did not say {l:?}:\n{served}"
        );
    }

    // Files: a missing adapter for one rule and a damaged model: each named.
    let models = tmp.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    for e in std::fs::read_dir(root.join("models")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "onnx") {
            std::os::unix::fs::symlink(e.path(), models.join(e.file_name())).unwrap();
        }
    }
    let manifest = std::fs::read_to_string(root.join("models/models.toml")).unwrap();
    let files = tmp.path().join("files.toml");
    let cfg = scout::config::DEFAULT_CONFIG_TOML
        .replace(
            "models/models.toml",
            &models.join("models.toml").display().to_string(),
        )
        .replace(
            "adapter = \"models/adapters/spine.adapter\"",
            &format!(
                "adapter = {:?}",
                root.join("models/adapters/spine.adapter")
                    .display()
                    .to_string()
            ),
        )
        .replace(
            "adapter = \"models/adapters/chest.adapter\"",
            "adapter = \"/nonexistent/chest.adapter\"",
        );
    std::fs::write(&files, &cfg).unwrap();
    std::fs::write(models.join("models.toml"), &manifest).unwrap();
    let (ok, out) = scout(&["check-config", files.to_str().unwrap()], root);
    assert!(!ok);
    assert!(
        out.contains("rule chest") && out.contains("/nonexistent/chest.adapter"),
        "{out}"
    );
    assert!(!out.contains("rule spine"), "{out}");
    // A damaged model: the manifest's checksum no longer matches (the encoder's, under
    // both backbones that run it).
    let sha = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("sha256 = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    std::fs::write(
        models.join("models.toml"),
        manifest.replace(&sha, &"0".repeat(64)),
    )
    .unwrap();
    let (ok, out) = scout(&["check-config", files.to_str().unwrap()], root);
    assert!(!ok);
    assert!(out.contains("SHA-256"), "{out}");
}

#[test]
fn systemd_unit_verifies_and_the_daemon_speaks_sd_notify() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(root.join("systemd/scout.service")).unwrap();
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "DynamicUser=yes",
        "StateDirectory=scout",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "RestrictAddressFamilies=",
        "CapabilityBoundingSet=\n",
    ] {
        assert!(unit.contains(needed), "unit lacks {needed}");
    }
    match std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    {
        Ok(_) => {
            // Verified with the binary under test in place of /opt/scout/bin/scout.
            let path = tmp.path().join("scout.service");
            std::fs::write(
                &path,
                unit.replace("/opt/scout/bin/scout", env!("CARGO_BIN_EXE_scout")),
            )
            .unwrap();
            let out = std::process::Command::new("systemd-analyze")
                .arg("verify")
                .arg(&path)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                out.status.success() && text.trim().is_empty(),
                "systemd-analyze verify:\n{text}"
            );
        }
        Err(_) => eprintln!(
            "\n*** SKIPPED systemd-analyze verify: systemd-analyze is not installed ***\n"
        ),
    }

    // The notify protocol: READY once listening, then WATCHDOG pets; STOPPING on SIGTERM.
    let sock_path = tmp.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let port = free_port();
    let cfg = tmp.path().join("scout.toml");
    std::fs::write(&cfg, config_text(port, &tmp.path().join("data"), &[])).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_scout"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let mut messages = Vec::new();
    while messages
        .iter()
        .filter(|m: &&String| m.as_str() == "WATCHDOG=1")
        .count()
        < 2
    {
        let n = sock.recv(&mut buf).expect("no sd_notify message");
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        messages[0].starts_with("READY=1\nSTATUS=listening on port"),
        "{messages:?}"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    loop {
        let n = sock.recv(&mut buf).expect("no STOPPING=1");
        if &buf[..n] == b"STOPPING=1" {
            break;
        }
    }
    assert!(child.wait().unwrap().success());
}

#[test]
fn tls_associations_with_dcmtk_storescu() {
    let t = "tls_associations_with_dcmtk_storescu";
    if !dcmtk(t) {
        return;
    }
    let tls = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls");
    let f = |n: &str| tls.join(n).display().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = tmp.path().join("data");
    let block = format!(
        "[scp.tls]\ncertificate = {:?}\nprivate_key = {:?}\nclient_ca = {:?}\n\n[spool]",
        f("server.pem"),
        f("server.key"),
        f("ca.pem")
    );
    let cfg = tmp.path().join("scout.toml");
    std::fs::write(
        &cfg,
        config_text(port, &data, &[("\n[spool]", &format!("\n{block}"))]),
    )
    .unwrap();
    let agent = Daemon::start(&cfg, port);
    // Health-check probes and a client giving up mid-ClientHello: dicom-ul alone would
    // spin on each (see scp::await_opening); the idle agent must stay idle.
    for opening in [&[][..], &[], &[0x16, 0x03, 0x01, 0x00]] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(opening).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = agent.cpu_seconds();
    std::thread::sleep(Duration::from_secs(1));
    let busy = agent.cpu_seconds() - before;
    assert!(busy < 0.3, "idle agent used {busy:.2} s of CPU in 1 s");
    let series = scout::synth::write_series(
        &tmp.path().join("series"),
        &scout::synth::SynthSpec {
            slices: 3,
            ..Default::default()
        },
    )
    .unwrap();
    let (key, cert, ca) = (f("client.key"), f("client.pem"), f("ca.pem"));
    let mutual = ["+tls", key.as_str(), cert.as_str(), "+cf", ca.as_str()];
    // Mutual TLS, as a scanner with its own certificate would connect.
    let (ok, out) = dcmtk_to_scout("storescu", &mutual, port, &series.files[..1]);
    assert!(ok, "storescu +tls: {out}\n{:#?}", agent.log_lines());
    // Plain TCP to the TLS port, and TLS without a client certificate: refused.
    let (ok, _) = dcmtk_to_scout("storescu", &[], port, &series.files[..1]);
    assert!(!ok, "plain association accepted on the TLS port");
    let (ok, _) = dcmtk_to_scout("storescu", &["+tla", "+cf", &ca], port, &series.files[..1]);
    assert!(!ok, "TLS without a client certificate accepted");
    // Still serving: the other two files arrive over TLS, and C-ECHO works.
    let (ok, out) = dcmtk_to_scout("storescu", &mutual, port, &series.files[1..]);
    assert!(ok, "{out}");
    let (ok, out) = dcmtk_to_scout("echoscu", &mutual, port, &[]);
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while spooled_files(&data.join("spool")).len() < 3 {
        assert!(Instant::now() < deadline, "{:#?}", agent.log_lines());
        std::thread::sleep(Duration::from_millis(50));
    }
    for f in spooled_files(&data.join("spool")) {
        let name = f
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches(".dcm")
            .to_string();
        let src = series
            .files
            .iter()
            .find(|s| scout::spool::read_meta(s).unwrap().sop_instance_uid == name)
            .expect("spooled file is one of ours");
        same_dataset(src, &f).unwrap();
    }
}
