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
];

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
    }
}

/// D1..D4; `smoke` gives the reduced D1 of CI (two okular instances, fewer page turns).
pub fn all(inputs: &Path, smoke: bool) -> Vec<Scenario> {
    if smoke {
        let mut progs: Vec<Program> = (1..=2).map(|i| okular(i, inputs, i)).collect();
        for p in &mut progs {
            p.presses = 3;
        }
        return vec![Scenario {
            id: "D1s",
            title: "okular x2 (CI reduced mode)",
            programs: progs,
            thesis: Thesis::default(),
        }];
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
    });
    for i in 1..=4 {
        d4.push(Program {
            label: format!("xterm#{i}"),
            group: "xterm+bash",
            argv: vec![s("xterm"), s("-e"), s("bash")],
            ready: Ready::Window,
            keys: vec!["Return"],
            presses: 2,
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
            }],
            thesis: Thesis {
                saved_mb: Some(14.7),
                saved_pct: Some(16.12),
                ..Default::default()
            },
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
        },
        Scenario {
            id: "D4",
            title: "mixed: okular, epiphany (2 pages), abiword, 4 xterm+bash",
            programs: d4,
            thesis: Thesis {
                per_group: vec![("okular", 25.56), ("epiphany", 7.36)],
                ..Default::default()
            },
        },
    ]
}

/// The programs a list of scenarios needs, with their Debian packages.
pub fn needed_programs(scenarios: &[Scenario]) -> Vec<(&'static str, &'static str)> {
    let mut v = Vec::new();
    for sc in scenarios {
        for p in &sc.programs {
            let pair = match p.group {
                "okular" => ("okular", "okular"),
                "gimp" => ("gimp", "gimp"),
                "epiphany" => ("epiphany", "epiphany-browser"),
                "abiword" => ("abiword", "abiword"),
                _ => ("xterm", "xterm"),
            };
            if !v.contains(&pair) {
                v.push(pair);
            }
        }
    }
    v
}
