//! The desktop path end to end: a GUI PDF viewer from Debian, launched through its *wrapped*
//! desktop entry (`ksmplusctl wrap` in temporary XDG dirs, then `gtk-launch`/`gio launch` — what a
//! menu does), runs under the shim, is tracked by the real `ksmplus-agentd`, and ksmd merges.
//!
//! Needs: root + KSM (KsmdGuard), `Xvfb`, `gtk-launch` (libgtk-3-bin) or `gio` (libglib2.0-bin),
//! a viewer (okular, else evince, else mupdf), and `cargo build -p ksmplus-agentd -p
//! ksmplus-preload` in the same target dir. Missing pieces skip the test with a message, unless
//! `KSMPLUS_REQUIRE_KSM=1`.
//!
//! Everything started here carries `KSMPLUS_E2E_TAG=<unique>` in its environment; the guard kills
//! exactly those processes (by pid, found through `/proc/PID/environ`), on every path.
use ksmplus_tests::ksmd::skip_or_fail as skip;
use ksmplus_tests::{require_ksm, shim_lib, which, KsmdGuard};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ksmplus_tests::target_bin as bin;

/// A viewer: its program, desktop-file id, and comm.
struct Viewer {
    prog: &'static str,
    id: &'static str,
}

const VIEWERS: &[Viewer] = &[
    Viewer {
        prog: "okular",
        id: "org.kde.okular",
    },
    Viewer {
        prog: "evince",
        id: "org.gnome.Evince",
    },
    Viewer {
        prog: "mupdf",
        id: "mupdf",
    },
];

/// Kills, on drop, every process whose environment carries our tag, then our direct children.
struct Guard {
    tag: String,
    children: Vec<Child>,
}

impl Guard {
    fn tagged_pids(&self) -> Vec<u32> {
        let needle = format!("KSMPLUS_E2E_TAG={}", self.tag);
        let me = std::process::id();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != me)
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .map(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
                    .unwrap_or(false)
            })
            .collect()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for sig in [libc::SIGTERM, libc::SIGKILL] {
            for pid in self.tagged_pids() {
                // SAFETY: kill has no memory preconditions; pids are ours (tagged environment).
                unsafe { libc::kill(pid as i32, sig) };
            }
            while Instant::now() < deadline && !self.tagged_pids().is_empty() {
                std::thread::sleep(Duration::from_millis(100));
            }
            if self.tagged_pids().is_empty() {
                break;
            }
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A small valid PDF: `pages` pages of text, different per `seed`.
fn make_pdf(path: &Path, pages: usize, seed: usize) {
    let mut objs = vec![
        "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
        format!(
            "<< /Type /Pages /Kids [{}] /Count {pages} >>",
            (0..pages)
                .map(|i| format!("{} 0 R", 3 + 2 * i))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    ];
    for i in 0..pages {
        let mut s = String::new();
        for j in 0..50 {
            s.push_str(&format!(
                "BT /F1 11 Tf 50 {} Td (Document {seed} page {} line {j}: the quick brown fox jumps over the lazy dog) Tj ET\n",
                780 - 14 * j,
                i + 1
            ));
        }
        objs.push(format!(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {} 0 R /Resources << /Font << /F1 {} 0 R >> >> >>",
            4 + 2 * i,
            3 + 2 * pages
        ));
        objs.push(format!("<< /Length {} >>\nstream\n{s}endstream", s.len()));
    }
    objs.push("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".into());
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offs = Vec::new();
    for (n, o) in objs.iter().enumerate() {
        offs.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n{o}\nendobj\n", n + 1).as_bytes());
    }
    let xref = out.len();
    out.extend_from_slice(format!("xref\n0 {}\n0000000000 65535 f \n", objs.len() + 1).as_bytes());
    for o in offs {
        out.extend_from_slice(format!("{o:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objs.len() + 1
        )
        .as_bytes(),
    );
    std::fs::write(path, out).unwrap();
}

/// Starts Xvfb on a display it picks itself (`-displayfd`); returns the child and `:N`.
fn start_xvfb(tag: &str) -> (Child, String) {
    let mut fds = [0i32; 2];
    // SAFETY: a valid two-int array. No O_CLOEXEC: Xvfb inherits the write end.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let child = Command::new("Xvfb")
        .args(["-displayfd", &fds[1].to_string()])
        .args(["-screen", "0", "1280x1024x24", "-nolisten", "tcp"])
        .env("KSMPLUS_E2E_TAG", tag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn Xvfb");
    // SAFETY: our own fds; the read end is wrapped once, the write end closed once.
    let mut r = unsafe {
        libc::close(fds[1]);
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0])
    };
    // Xvfb writes "N\n" once it listens, and keeps the fd open.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut r), &mut line);
        let _ = tx.send(line);
    });
    let n = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("Xvfb did not report a display within 20 s");
    let n = n.trim();
    assert!(!n.is_empty(), "Xvfb exited without a display");
    (child, format!(":{n}"))
}

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[test]
fn viewer_from_wrapped_entry_runs_under_shim_tracked_and_merged() {
    if !require_ksm() {
        return;
    }
    let Some(viewer) = VIEWERS.iter().find(|v| {
        which(v.prog).is_some()
            && Path::new(&format!("/usr/share/applications/{}.desktop", v.id)).is_file()
    }) else {
        return skip("no GUI PDF viewer (apt-get install okular, or evince, or mupdf)");
    };
    if which("Xvfb").is_none() {
        return skip("Xvfb is not installed (apt-get install xvfb)");
    }
    let launcher = if which("gtk-launch").is_some() {
        "gtk-launch"
    } else if which("gio").is_some() {
        "gio"
    } else {
        return skip("neither gtk-launch (libgtk-3-bin) nor gio (libglib2.0-bin) is installed");
    };
    let ctl = bin("ksmplusctl");
    let agentd = bin("ksmplus-agentd");
    let lib = shim_lib();

    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let tag = format!("{}-{}", std::process::id(), t.display());
    let rt = t.join("rt");
    let share = t.join("share");
    let cfg = t.join("config");
    std::fs::create_dir_all(rt.join("ksmplus")).unwrap();
    std::fs::create_dir_all(cfg.join("ksmplus")).unwrap();
    std::fs::set_permissions(&rt, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let policy = cfg.join("ksmplus/policy.toml");
    std::fs::write(&policy, format!("track = [\"{}\"]\n", viewer.prog)).unwrap();
    let socket = rt.join("ksmplus/agent.sock");
    const INSTANCES: usize = 3;
    let pdfs: Vec<PathBuf> = (0..INSTANCES)
        .map(|k| {
            let p = t.join(format!("doc{k}.pdf"));
            make_pdf(&p, 6, k);
            p
        })
        .collect();

    let ksmd = KsmdGuard::acquire();
    let mut guard = Guard {
        tag: tag.clone(),
        children: Vec::new(),
    };
    let (xvfb, display) = start_xvfb(&tag);
    guard.children.push(xvfb);
    let agent = Command::new(&agentd)
        .arg("--socket")
        .arg(&socket)
        .arg("--policy")
        .arg(&policy)
        .env("KSMPLUS_E2E_TAG", &tag)
        .env("KSMPLUS_LOG", "info")
        .env_remove("LD_PRELOAD")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ksmplus-agentd");
    guard.children.push(agent);
    wait_until("the agent's socket", Duration::from_secs(10), || {
        socket.exists().then_some(())
    });

    // The environment of a desktop session, with our private XDG dirs.
    let session = |c: &mut Command| {
        c.env("DISPLAY", &display)
            .env("XDG_RUNTIME_DIR", &rt)
            .env("XDG_DATA_HOME", &share)
            .env("XDG_CONFIG_HOME", &cfg)
            .env("XDG_DATA_DIRS", "/usr/local/share:/usr/share")
            .env("KSMPLUS_E2E_TAG", &tag)
            .env("QT_QPA_PLATFORM", "xcb")
            .env_remove("LD_PRELOAD")
            .env_remove("KSMPLUS_SOCKET")
            .env_remove("DBUS_SESSION_BUS_ADDRESS");
    };

    // Wrap, the way a user would.
    let mut c = Command::new(&ctl);
    session(&mut c);
    let out = c
        .args(["wrap", viewer.id, "--lib"])
        .arg(&lib)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wrap failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entry = share.join(format!("applications/{}.desktop", viewer.id));
    let text = std::fs::read_to_string(&entry).unwrap();
    assert!(text.contains(&format!(
        "LD_PRELOAD={}",
        lib.canonicalize().unwrap().display()
    )));

    // Launch every document through the wrapped entry.
    let t0 = Instant::now();
    for pdf in &pdfs {
        let mut c = Command::new(launcher);
        session(&mut c);
        if launcher == "gtk-launch" {
            c.arg(viewer.id);
        } else {
            c.arg("launch").arg(&entry);
        }
        let st = c
            .arg(pdf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "{launcher} failed for {}", pdf.display());
    }
    let pids: Vec<u32> = wait_until(
        &format!("{INSTANCES} {} processes", viewer.prog),
        Duration::from_secs(60),
        || {
            let v: Vec<u32> = guard
                .tagged_pids()
                .into_iter()
                .filter(|p| comm(*p) == viewer.prog)
                .collect();
            (v.len() >= INSTANCES).then_some(v)
        },
    );
    eprintln!(
        "{INSTANCES} {} started through {launcher} in {:.1}s: pids {pids:?}",
        viewer.prog,
        t0.elapsed().as_secs_f64()
    );
    // A process is named after its program from its exec on, a moment before the dynamic
    // loader maps the preloaded shim (CI once caught the third instance in between).
    for pid in &pids {
        wait_until(
            &format!("pid {pid} runs under the shim"),
            Duration::from_secs(10),
            || {
                let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
                maps.contains("libksmplus.so").then_some(())
            },
        );
    }

    // The agent tracks every instance.
    let status = || {
        let out = Command::new(&ctl)
            .arg("--socket")
            .arg(&socket)
            .args(["status", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    let listed = |json: &serde_json::Value, pid: u32| {
        json["processes"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["pid"] == pid))
    };
    wait_until(
        "the agent lists every instance",
        Duration::from_secs(30),
        || {
            let j = status();
            pids.iter().all(|p| listed(&j, *p)).then_some(())
        },
    );

    // The agent samples and marks, ksmd merges: within the deadline every instance has pages
    // merging and a positive `ksm_process_profit` (ksmplus marks only pages it found duplicated,
    // so each merge pays for its rmap item), and so do the totals.
    let scans0 = ksmd.full_scans();
    let deadline = Instant::now() + Duration::from_secs(120);
    let merged = |j: &serde_json::Value| {
        let ps = j["processes"].as_array()?;
        let all = pids.iter().all(|pid| {
            ps.iter().any(|p| {
                p["pid"] == *pid
                    && p["merging_pages"].as_u64().unwrap_or(0) > 0
                    && p["profit"].as_i64().unwrap_or(0) > 0
            })
        });
        let t = &j["totals"];
        let (merging, profit) = (
            t["merging_pages"].as_i64().unwrap_or(0),
            t["profit"].as_i64().unwrap_or(0),
        );
        (all && merging > 0 && profit > 0).then_some((merging, profit))
    };
    let mut best = loop {
        let j = status();
        if let Some(m) = merged(&j) {
            break (m.0, m.1, j["totals"].to_string());
        }
        assert!(
            Instant::now() < deadline,
            "not every {} instance merged with a positive profit within 120 s ({} full scans); \
             status: {j}",
            viewer.prog,
            ksmd.full_scans() - scans0
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    // Then until merging has stopped growing for 5 polls, or the deadline, for the figure.
    let mut flat = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && flat < 5 {
        std::thread::sleep(Duration::from_secs(2));
        let j = status();
        let Some((merging, profit)) = merged(&j) else {
            panic!("merging or profit fell back to zero after {best:?}; status: {j}");
        };
        if merging > best.0 {
            best = (merging, profit, j["totals"].to_string());
            flat = 0;
        } else {
            flat += 1;
        }
    }
    eprintln!(
        "agent: {} pages merging, profit {} KiB across {INSTANCES} {} ({} full scans); totals {}",
        best.0,
        best.1 / 1024,
        viewer.prog,
        ksmd.full_scans() - scans0,
        best.2
    );

    // What a full merge could give, for comparison (the scanner reads every anonymous page).
    let mut c = Command::new(&ctl);
    c.args(["scan", "--top", "5"]);
    for p in &pids {
        c.arg("--pid").arg(p.to_string());
    }
    let out = c.output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success());

    // Unwrap puts the menu back.
    let mut c = Command::new(&ctl);
    session(&mut c);
    assert!(c.args(["unwrap", viewer.id]).status().unwrap().success());
    assert!(!entry.exists());
    drop(guard);
    drop(ksmd);
}
