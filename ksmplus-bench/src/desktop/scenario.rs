//! The desktop scenarios of the thesis (sections 5.1.2 and 5.3), and the figures it reports.
//!
//! A scenario is a list of programs started one after another, as a user would; each program
//! has a command line (inputs live in the run's `inputs/` directory), a readiness condition,
//! and the keys a user would press (cycled: turning pages, scrolling, switching tabs).

use std::path::Path;

/// When a started program counts as ready (after its first visible window appeared).
#[derive(Clone, Debug)]
pub enum Ready {
    /// The first visible window is enough.
    Window,
    /// Some visible window's title contains this text (e.g. the last image GIMP opens).
    Title(String),
}

#[derive(Clone, Debug)]
pub struct Program {
    /// Label in the tables: `okular#1`, `gimp`, ...
    pub label: String,
    /// Group for per-program figures (`okular`, `epiphany`, ...).
    pub group: &'static str,
    pub argv: Vec<String>,
    pub ready: Ready,
    /// Keys pressed, cycled, each followed by a short pause.
    pub keys: Vec<&'static str>,
    /// How many keys to press while "reading" before ksmd starts.
    pub presses: usize,
    /// A key back to a start (the document's, the page's, a cleared terminal), pressed when a
    /// key of the cycle changed nothing: a long run's turns reach the end of okular's PDF (14
    /// pages), the bottom of a page, a terminal full of prompts, where the program still answers
    /// but its window stays the same.
    pub rewind: Option<&'static str>,
    /// Files written into the home template before the warm-up (`path` relative to `$HOME`).
    pub home_files: Vec<(&'static str, String)>,
    /// Started once under ksmplus before the measured cells, unmeasured, so the agent's learned
    /// store knows the program's fork server (Chromium's zygote) as a user's agent would from
    /// the program's previous start.
    pub learning_run: bool,
}

/// The thesis's figures for a scenario (Table and text of 5.1.2).
#[derive(Clone, Debug, Default)]
pub struct Thesis {
    pub saved_mb: Option<f64>,
    pub saved_pct: Option<f64>,
    pub pages_sharing: Option<u64>,
    pub converge: Option<&'static str>,
    /// Per-program percentages in the mixed session.
    pub per_group: Vec<(&'static str, f64)>,
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub id: &'static str,
    pub title: &'static str,
    pub programs: Vec<Program>,
    pub thesis: Thesis,
    /// Its programs run as the unprivileged bench user (with their sandboxes: Chromium's
    /// refuses root), and under ksmplus so does the agent.
    pub user: bool,
}

/// Every comm and executable name the scenarios start (the agent's policy tracks them).
pub const TRACK: &[&str] = &[
    "okular",
    "gimp",
    "gimp-2.10",
    "script-fu",
    "file-png",
    "file-jpeg",
    "epiphany",
    "WebKitWebProcess",
    "WebKitWebProces",
    "WebKitNetworkProcess",
    "WebKitNetworkPr",
    "abiword",
    "xterm",
    "bash",
    // D5, D6: every process of the browsers runs their executable (content processes,
    // renderers, zygotes, utilities). Their crash handlers (crashhelper,
    // chrome_crashpad_handler: daemons re-parented to init, ~0.5 MiB of anonymous memory) are
    // left out: Firefox's crashhelper, mapping the shim, was in some runs never seen by the agent
    // (no Hello arrived, and a walk from the browser cannot find a process re-parented to
    // init) -- an open finding, see the session note.
    "firefox-esr",
    "chromium",
];

/// Where `{home}` in a program's arguments points: the cell's `$HOME`.
pub const HOME: &str = "{home}";

fn s(x: &str) -> String {
    x.to_owned()
}

fn okular(i: usize, inputs: &Path, doc: usize) -> Program {
    Program {
        label: format!("okular#{i}"),
        group: "okular",
        argv: vec![
            s("okular"),
            inputs.join(format!("doc{doc}.pdf")).display().to_string(),
        ],
        ready: Ready::Window,
        keys: vec!["Next"],
        presses: 6,
        rewind: Some("ctrl+Home"),
        home_files: vec![],
        learning_run: false,
    }
}

fn epiphany(inputs: &Path, pages: &[usize]) -> Program {
    let mut argv = vec![s("epiphany"), s("--private-instance")];
    argv.extend(
        pages
            .iter()
            .map(|p| format!("file://{}", inputs.join(format!("page{p}.html")).display())),
    );
    Program {
        label: s("epiphany"),
        group: "epiphany",
        argv,
        ready: Ready::Title(s("Local page")),
        keys: vec!["Page_Down", "Page_Down", "ctrl+Page_Down"],
        presses: 8,
        rewind: Some("ctrl+Home"),
        home_files: vec![],
        learning_run: false,
    }
}

/// The local pages of the browser scenarios as `file://` URLs, the first `tabs` of them.
fn web_pages(web: &Path, tabs: usize) -> Vec<String> {
    super::pages::PAGES
        .iter()
        .take(tabs)
        .map(|(f, _)| format!("file://{}", web.join(f).display()))
        .collect()
}

/// Firefox's preferences for an unattended run: no first-run pages, no default-browser
/// question, no session restore or safe-mode question after the bench ended it, no telemetry,
/// no background fetches (they would fail on the dead proxy anyway), no accessibility bus (as
/// `NO_AT_BRIDGE=1` for the GTK programs).
const FIREFOX_PREFS: &str = r#"user_pref("browser.shell.checkDefaultBrowser", false);
user_pref("browser.startup.homepage_override.mstone", "ignore");
user_pref("startup.homepage_welcome_url", "");
user_pref("startup.homepage_welcome_url.additional", "");
user_pref("browser.aboutwelcome.enabled", false);
user_pref("trailhead.firstrun.didSeeAboutWelcome", true);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("datareporting.policy.firstRunURL", "");
user_pref("datareporting.healthreport.uploadEnabled", false);
user_pref("toolkit.telemetry.reportingpolicy.firstRun", false);
user_pref("toolkit.telemetry.enabled", false);
user_pref("browser.sessionstore.resume_from_crash", false);
user_pref("browser.sessionstore.max_resumed_crashes", 0);
user_pref("toolkit.startup.max_resumed_crashes", -1);
user_pref("browser.tabs.warnOnClose", false);
user_pref("browser.warnOnQuit", false);
user_pref("app.update.auto", false);
user_pref("app.update.enabled", false);
user_pref("app.normandy.enabled", false);
user_pref("extensions.update.enabled", false);
user_pref("extensions.getAddons.cache.enabled", false);
user_pref("browser.discovery.enabled", false);
user_pref("browser.newtabpage.enabled", false);
user_pref("browser.newtabpage.activity-stream.feeds.system.topstories", false);
user_pref("extensions.pocket.enabled", false);
user_pref("browser.safebrowsing.update.enabled", false);
user_pref("browser.safebrowsing.downloads.remote.enabled", false);
user_pref("network.captive-portal-service.enabled", false);
user_pref("network.connectivity-service.enabled", false);
user_pref("browser.translations.automaticallyPopup", false);
user_pref("browser.translations.enable", false);
user_pref("browser.ml.enable", false);
user_pref("accessibility.force_disabled", 1);
"#;

/// `firefox-esr` with `tabs` of the local pages, in a profile of the cell's home, sandbox on.
fn firefox(web: &Path, tabs: usize) -> Program {
    let argv = vec![
        s("firefox-esr"),
        s("--no-remote"),
        s("--profile"),
        format!("{HOME}/firefox-profile"),
    ];
    Program {
        home_files: vec![("firefox-profile/user.js", FIREFOX_PREFS.to_owned())],
        ..browser("firefox", argv, web, tabs)
    }
}

/// A browser (`group`, also its label) started with `argv` and `tabs` of the local pages,
/// ready when the first page's title shows.
fn browser(group: &'static str, mut argv: Vec<String>, web: &Path, tabs: usize) -> Program {
    argv.extend(web_pages(web, tabs));
    Program {
        label: s(group),
        group,
        argv,
        ready: Ready::Title(s("Local page")),
        // Scroll the tab, go to the next one: every tab is shown and scrolled.
        keys: vec!["Page_Down", "ctrl+Page_Down"],
        presses: 2 * tabs,
        rewind: Some("ctrl+Home"),
        home_files: vec![],
        learning_run: false,
    }
}

/// `chromium` with `tabs` of the local pages, its profile in the cell's home, sandbox on.
fn chromium(web: &Path, tabs: usize) -> Program {
    let argv = vec![
        s("chromium"),
        s("--no-first-run"),
        s("--disable-background-networking"),
        s("--disable-component-update"),
        s("--disable-sync"),
        s("--password-store=basic"),
        s("--hide-crash-restore-bubble"),
        format!("--user-data-dir={HOME}/chromium-profile"),
    ];
    Program {
        // Its renderers' seccomp filter refuses MADV_MERGEABLE: the agent's fallback puts the
        // zygote in merge-any mode from its start once it has learned it.
        learning_run: true,
        ..browser("chromium", argv, web, tabs)
    }
}

/// D1..D6; `smoke` gives CI's reduced D1 (two okular instances, fewer page turns) and D5
/// (firefox-esr with two tabs). The browsers' pages are in `web` (the unprivileged user must
/// read them: the results directory may be closed to others).
pub fn all(inputs: &Path, web: &Path, smoke: bool) -> Vec<Scenario> {
    if smoke {
        let mut progs: Vec<Program> = (1..=2).map(|i| okular(i, inputs, i)).collect();
        for p in &mut progs {
            p.presses = 3;
        }
        return vec![
            Scenario {
                id: "D1s",
                title: "okular x2 (CI reduced mode)",
                programs: progs,
                thesis: Thesis::default(),
                user: false,
            },
            Scenario {
                id: "D5s",
                title: "firefox-esr, 2 local pages, sandbox on (CI reduced mode)",
                programs: vec![firefox(web, 2)],
                thesis: Thesis::default(),
                user: true,
            },
        ];
    }
    let gimp_args = {
        let mut a = vec![s("gimp"), s("-n"), s("-s"), s("-d"), s("-f")];
        for (i, ext) in [(1, "png"), (2, "jpg"), (3, "png"), (4, "jpg"), (5, "png")] {
            let jpg = inputs.join(format!("img{i}.{ext}"));
            let p = if jpg.exists() {
                jpg
            } else {
                inputs.join(format!("img{i}.png"))
            };
            a.push(p.display().to_string());
        }
        a
    };
    let mut d4 = vec![okular(1, inputs, 1), epiphany(inputs, &[1, 2])];
    d4.push(Program {
        label: s("abiword"),
        group: "abiword",
        argv: vec![
            s("abiword"),
            inputs.join("letter.rtf").display().to_string(),
        ],
        ready: Ready::Window,
        keys: vec!["Page_Down"],
        presses: 4,
        rewind: Some("ctrl+Home"),
        home_files: vec![],
        learning_run: false,
    });
    for i in 1..=4 {
        d4.push(Program {
            label: format!("xterm#{i}"),
            group: "xterm+bash",
            argv: vec![s("xterm"), s("-e"), s("bash")],
            ready: Ready::Window,
            keys: vec!["Return"],
            presses: 2,
            rewind: Some("ctrl+l"),
            home_files: vec![],
            learning_run: false,
        });
    }
    vec![
        Scenario {
            id: "D1",
            title: "okular x4, a different PDF each, pages turned",
            programs: (1..=4).map(|i| okular(i, inputs, i)).collect(),
            thesis: Thesis {
                saved_mb: Some(14.4),
                saved_pct: Some(18.14),
                pages_sharing: Some(3668),
                converge: Some("~2 min"),
                per_group: vec![],
            },
            user: false,
        },
        Scenario {
            id: "D2",
            title: "gimp -n -s -d -f with 5 images (PNG and JPEG)",
            programs: vec![Program {
                label: s("gimp"),
                group: "gimp",
                argv: gimp_args,
                // GIMP numbers images as their loads complete (PNG before JPEG): the title of
                // image 5 means all five are open.
                ready: Ready::Title(s("-5.0 (")),
                keys: vec!["1", "shift+ctrl+j"],
                presses: 2,
                rewind: None,
                home_files: vec![],
                learning_run: false,
            }],
            thesis: Thesis {
                saved_mb: Some(14.7),
                saved_pct: Some(16.12),
                ..Default::default()
            },
            user: false,
        },
        Scenario {
            id: "D3",
            title: "epiphany offline, 4 local pages (file://)",
            programs: vec![epiphany(inputs, &[1, 2, 3, 4])],
            thesis: Thesis {
                saved_mb: Some(3.6),
                saved_pct: Some(3.97),
                ..Default::default()
            },
            user: false,
        },
        Scenario {
            id: "D4",
            title: "mixed: okular, epiphany (2 pages), abiword, 4 xterm+bash",
            programs: d4,
            thesis: Thesis {
                per_group: vec![("okular", 25.56), ("epiphany", 7.36)],
                ..Default::default()
            },
            user: false,
        },
        Scenario {
            id: "D5",
            title: "firefox-esr, 4 local pages (text, table, SVG, canvas), sandbox on, unprivileged user",
            programs: vec![firefox(web, 4)],
            thesis: Thesis::default(),
            user: true,
        },
        Scenario {
            id: "D6",
            title: "chromium, 4 local pages (text, table, SVG, canvas), sandbox on, unprivileged user",
            programs: vec![chromium(web, 4)],
            thesis: Thesis::default(),
            user: true,
        },
    ]
}

/// The programs a list of scenarios needs, with their Debian packages.
pub fn needed_programs(scenarios: &[Scenario]) -> Vec<(&'static str, &'static str)> {
    let mut v = Vec::new();
    for sc in scenarios {
        for p in &sc.programs {
            let pairs: &[(&'static str, &'static str)] = match p.group {
                "okular" => &[("okular", "okular")],
                "gimp" => &[("gimp", "gimp")],
                // WebKit's web processes run in its bubblewrap sandbox.
                "epiphany" => &[("epiphany", "epiphany-browser"), ("bwrap", "bubblewrap")],
                "abiword" => &[("abiword", "abiword")],
                "firefox" => &[("firefox-esr", "firefox-esr")],
                "chromium" => &[("chromium", "chromium")],
                _ => &[("xterm", "xterm")],
            };
            for pair in pairs {
                if !v.contains(pair) {
                    v.push(*pair);
                }
            }
        }
    }
    v
}
