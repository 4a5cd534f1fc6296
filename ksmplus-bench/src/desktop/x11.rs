//! The headless desktop: an Xvfb server and a private D-Bus session bus per run, and the X11
//! tools that drive and observe the programs (`xdotool`, `xwd`, ImageMagick's `convert`).
//!
//! Invariants: the server and the bus are children of the bench, killed and reaped on drop; a
//! tool call never waits without a deadline; a window is looked up by the `_NET_WM_PID` of the
//! process that was started (no window manager runs, so no window ever moves or gets decorated).

use crate::sys;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Screen size of the virtual display.
pub const SCREEN: &str = "1600x1200x24";

/// What a desktop run needs from the system, with the Debian package that provides it.
/// (`dbus-daemon` is used when present: epiphany and GIMP run without a session bus too.)
pub const TOOLS: &[(&str, &str)] = &[
    ("Xvfb", "xvfb"),
    ("xdotool", "xdotool"),
    ("xwd", "x11-apps"),
    ("convert", "imagemagick"),
    ("python3", "python3"),
];

/// True when `name` is an executable in `$PATH`.
pub fn have(name: &str) -> bool {
    which(name).is_some()
}

pub fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A virtual X server and a session bus, for one run.
pub struct Desktop {
    xvfb: Child,
    /// Root's session bus, when one could be started.
    pub bus: Option<Bus>,
    /// `:N`
    pub display: String,
}

/// A private D-Bus session bus (`dbus-daemon --session`), killed and reaped on drop.
pub struct Bus {
    child: Child,
    /// `DBUS_SESSION_BUS_ADDRESS`
    pub address: String,
}

impl Bus {
    /// A session bus of root, or of the user `(uid, gid)` (a bus refuses clients of other
    /// users); `None` without `dbus-daemon` (the programs run without a bus then).
    pub fn start(user: Option<(u32, u32)>) -> Option<Bus> {
        if !have("dbus-daemon") {
            return None;
        }
        let mut cmd = Command::new("dbus-daemon");
        cmd.args(["--session", "--nofork", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
            cmd.env_clear()
                .env("PATH", "/usr/bin:/bin")
                .current_dir("/");
        }
        let mut child = cmd.spawn().ok()?;
        match read_line_with_deadline(&mut child, "dbus-daemon", 10) {
            Ok(a) if !a.is_empty() => Some(Bus { child, address: a }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                None
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        end_child(&mut self.child);
    }
}

/// SIGTERM, up to 3 s to exit, then SIGKILL; reaped.
fn end_child(c: &mut Child) {
    sys::kill(c.id(), libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

fn read_line_with_deadline(child: &mut Child, what: &str, secs: u64) -> Result<String, String> {
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .map(|l| l.trim().to_owned())
        .map_err(|_| format!("{what} did not start within {secs} s"))
}

impl Desktop {
    pub fn start(log_dir: &Path) -> Result<Desktop, String> {
        let log = std::fs::File::create(log_dir.join("xvfb.log")).map_err(|e| e.to_string())?;
        let mut xvfb = Command::new("Xvfb")
            .args([
                "-displayfd",
                "1",
                "-screen",
                "0",
                SCREEN,
                "-nolisten",
                "tcp",
                "-noreset",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start Xvfb: {e}"))?;
        let n = match read_line_with_deadline(&mut xvfb, "Xvfb", 15) {
            Ok(n) if !n.is_empty() => n,
            other => {
                let _ = xvfb.kill();
                let _ = xvfb.wait();
                return Err(format!("Xvfb gave no display number: {other:?}"));
            }
        };
        Ok(Desktop {
            xvfb,
            bus: Bus::start(None),
            display: format!(":{n}"),
        })
    }

    /// The environment every tool and program of this desktop runs with.
    pub fn env(&self) -> Vec<(String, String)> {
        self.env_with(self.bus.as_ref())
    }

    /// The display, and `bus` as the session bus (none: no bus address at all).
    pub fn env_with(&self, bus: Option<&Bus>) -> Vec<(String, String)> {
        let mut v = vec![("DISPLAY".to_owned(), self.display.clone())];
        if let Some(b) = bus {
            v.push(("DBUS_SESSION_BUS_ADDRESS".into(), b.address.clone()));
        }
        v
    }

    fn tool(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.envs(self.env())
            .stdin(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    /// Runs a tool to completion within `secs`; its stdout, or `None` on failure or timeout.
    fn run(&self, prog: &str, args: &[&str], secs: f64) -> Option<Vec<u8>> {
        let mut child = self
            .tool(prog)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        let mut out = child.stdout.take()?;
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = out.read_to_end(&mut buf);
            buf
        });
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        loop {
            match child.try_wait() {
                Ok(Some(st)) => {
                    let buf = reader.join().ok()?;
                    return st.success().then_some(buf);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
        }
    }

    /// Visible windows whose `_NET_WM_PID` is `pid`.
    pub fn windows_of(&self, pid: u32) -> Vec<u64> {
        let out = self
            .run(
                "xdotool",
                &["search", "--onlyvisible", "--pid", &pid.to_string()],
                5.0,
            )
            .unwrap_or_default();
        String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    pub fn window_name(&self, w: u64) -> String {
        self.run("xdotool", &["getwindowname", &w.to_string()], 5.0)
            .map(|o| String::from_utf8_lossy(&o).trim().to_owned())
            .unwrap_or_default()
    }

    /// `(width, height)` of a window.
    pub fn geometry(&self, w: u64) -> (u32, u32) {
        let out = self
            .run("xdotool", &["getwindowgeometry", &w.to_string()], 5.0)
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&out);
        text.lines()
            .find_map(|l| l.trim().strip_prefix("Geometry:"))
            .and_then(|g| {
                let (a, b) = g.trim().split_once('x')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            })
            .unwrap_or((0, 0))
    }

    /// The largest visible window of `pid` (a program's main window), if any.
    pub fn main_window(&self, pid: u32) -> Option<u64> {
        self.windows_of(pid).into_iter().max_by_key(|&w| {
            let (a, b) = self.geometry(w);
            a as u64 * b as u64
        })
    }

    /// Raises a window, gives it the focus and the pointer: the next keys go to it.
    pub fn focus(&self, w: u64) {
        let id = w.to_string();
        let _ = self.run("xdotool", &["windowraise", &id], 5.0);
        let _ = self.run("xdotool", &["windowfocus", &id], 5.0);
        let _ = self.run(
            "xdotool",
            &["mousemove", "--window", &id, "300", "300"],
            5.0,
        );
    }

    /// Types one key combination (`Next`, `ctrl+Page_Down`, ...) to the focused window; true
    /// when xdotool returned in time.
    pub fn key(&self, key: &str) -> bool {
        self.run("xdotool", &["key", "--delay", "30", key], 5.0)
            .is_some()
    }

    /// The window's pixels as an `xwd` dump (None when the window is gone or unviewable).
    pub fn capture(&self, w: u64) -> Option<Vec<u8>> {
        let _ = self.run("xdotool", &["windowraise", &w.to_string()], 5.0);
        self.run("xwd", &["-silent", "-id", &w.to_string()], 15.0)
            .filter(|b| b.len() > 100)
    }

    /// Writes an `xwd` dump as PNG.
    pub fn save_png(&self, xwd: &[u8], path: &Path) -> Result<(), String> {
        let tmp = path.with_extension("xwd");
        std::fs::write(&tmp, xwd).map_err(|e| e.to_string())?;
        let ok = self
            .run(
                "convert",
                &[
                    &format!("xwd:{}", tmp.display()),
                    &path.display().to_string(),
                ],
                30.0,
            )
            .is_some();
        let _ = std::fs::remove_file(&tmp);
        if ok {
            Ok(())
        } else {
            Err(format!("convert could not write {}", path.display()))
        }
    }
}

/// A short fingerprint of a window dump, to tell whether a key changed what is shown.
pub fn digest(xwd: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    xwd.hash(&mut h);
    h.finish()
}

impl Drop for Desktop {
    fn drop(&mut self) {
        self.bus = None;
        end_child(&mut self.xvfb);
    }
}
