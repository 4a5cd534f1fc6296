//! The four local pages of the browser scenarios (D5 firefox-esr, D6 chromium): text, a table,
//! an SVG drawing and a canvas drawn by a script — the kinds of content a browser keeps in
//! different memory (DOM and layout, style, vector paths, a pixel buffer). Written by the bench
//! into the run's `inputs/`, deterministically (a fixed PRNG), with no resource outside the
//! file: nothing is fetched, not even a font or an image.

use std::fmt::Write as _;
use std::path::Path;

/// The pages, in tab order: `(file name, what it shows)`. Each one's `<title>` is
/// `Local page N: WHAT`, which the readiness condition looks for in the window title.
pub const PAGES: &[(&str, &str)] = &[
    ("web1.html", "text"),
    ("web2.html", "table"),
    ("web3.html", "svg"),
    ("web4.html", "canvas"),
];

const WORDS: &[&str] = &[
    "memory",
    "page",
    "kernel",
    "merge",
    "scan",
    "share",
    "copy",
    "write",
    "fault",
    "anonymous",
    "region",
    "process",
    "desktop",
    "program",
    "library",
    "heap",
    "arena",
    "allocator",
    "buffer",
    "image",
    "document",
    "reader",
    "browser",
    "editor",
    "window",
    "toolkit",
    "render",
    "font",
    "glyph",
    "cache",
    "texture",
    "pixel",
    "layout",
    "paragraph",
    "table",
    "chapter",
    "section",
    "figure",
    "result",
    "thesis",
    "experiment",
    "measure",
    "saving",
    "profit",
    "overhead",
];

/// xorshift64*: the same bytes on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn word(&mut self) -> &'static str {
        WORDS[self.below(WORDS.len() as u64) as usize]
    }
    fn sentence(&mut self) -> String {
        let n = 6 + self.below(9);
        let mut s = String::new();
        for i in 0..n {
            let w = self.word();
            if i == 0 {
                let mut c = w.chars();
                if let Some(f) = c.next() {
                    s.extend(f.to_uppercase());
                    s.push_str(c.as_str());
                }
            } else {
                s.push(' ');
                s.push_str(w);
            }
        }
        s.push('.');
        s
    }
}

fn head(n: usize, what: &str, style: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Local page {n}: {what}</title>\n\
         <style>body{{font-family:serif;margin:2em;line-height:1.4}}{style}</style></head><body>\n\
         <h1>Local page {n}: {what}</h1>\n"
    )
}

/// About 60 KB of prose in sections, with headings, emphasis and lists.
fn text(rng: &mut Rng) -> String {
    let mut s = head(1, "text", "h2{color:#335} p{text-align:justify}");
    for sec in 1..=24 {
        let _ = writeln!(
            s,
            "<h2>{sec}. {}</h2>",
            rng.sentence().trim_end_matches('.')
        );
        for _ in 0..4 {
            s.push_str("<p>");
            for k in 0..6 {
                let sen = rng.sentence();
                if k == 2 {
                    let _ = write!(s, "<em>{sen}</em> ");
                } else {
                    let _ = write!(s, "{sen} ");
                }
            }
            s.push_str("</p>\n");
        }
        if sec % 4 == 0 {
            s.push_str("<ul>");
            for _ in 0..5 {
                let _ = write!(s, "<li>{}</li>", rng.sentence());
            }
            s.push_str("</ul>\n");
        }
    }
    s.push_str("</body></html>\n");
    s
}

/// A 600-row table of figures, striped rows, a sticky header.
fn table(rng: &mut Rng) -> String {
    let mut s = head(
        2,
        "table",
        "table{border-collapse:collapse;font-family:sans-serif;font-size:13px}\
         th,td{border:1px solid #999;padding:2px 6px;text-align:right}\
         th{background:#ddd;position:sticky;top:0} tr:nth-child(even){background:#f0f4ff}",
    );
    s.push_str(
        "<table><thead><tr><th>#</th><th>process</th><th>region</th><th>pages</th>\
         <th>merged</th><th>rmap</th><th>profit KiB</th><th>ratio</th></tr></thead><tbody>\n",
    );
    for i in 1..=600 {
        let pages = 64 + rng.below(65_536);
        let merged = rng.below(pages + 1);
        let rmap = merged + rng.below(pages - merged + 1);
        let _ = writeln!(
            s,
            "<tr><td>{i}</td><td style=\"text-align:left\">{}-{}</td><td>0x{:012x}</td>\
             <td>{pages}</td><td>{merged}</td><td>{rmap}</td><td>{}</td><td>{:.3}</td></tr>",
            rng.word(),
            rng.below(1000),
            rng.next() & 0x7fff_ffff_f000,
            merged as i64 * 4 - rmap as i64 / 16,
            merged as f64 / pages as f64,
        );
    }
    s.push_str("</tbody></table></body></html>\n");
    s
}

/// An inline SVG: 2 500 shapes (circles, rectangles, paths, text) over a gradient.
fn svg(rng: &mut Rng) -> String {
    let mut s = head(3, "svg", "svg{border:1px solid #888}");
    s.push_str(
        "<svg width=\"1400\" height=\"2000\" viewBox=\"0 0 1400 2000\">\n\
         <defs><linearGradient id=\"g\" x1=\"0\" y1=\"0\" x2=\"1\" y2=\"1\">\
         <stop offset=\"0\" stop-color=\"#eef\"/><stop offset=\"1\" stop-color=\"#fed\"/></linearGradient></defs>\n\
         <rect width=\"1400\" height=\"2000\" fill=\"url(#g)\"/>\n",
    );
    for i in 0..2500u64 {
        let (x, y) = (rng.below(1400), rng.below(2000));
        let hue = rng.below(360);
        match i % 4 {
            0 => {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{x}\" cy=\"{y}\" r=\"{}\" fill=\"hsl({hue},60%,55%)\" fill-opacity=\"0.6\"/>",
                    4 + rng.below(30)
                );
            }
            1 => {
                let _ = writeln!(
                    s,
                    "<rect x=\"{x}\" y=\"{y}\" width=\"{}\" height=\"{}\" fill=\"hsl({hue},50%,70%)\" stroke=\"#333\" stroke-width=\"0.5\"/>",
                    5 + rng.below(50),
                    5 + rng.below(50)
                );
            }
            2 => {
                let _ = writeln!(
                    s,
                    "<path d=\"M{x} {y} q {} {} {} {} t {} {}\" stroke=\"hsl({hue},70%,35%)\" fill=\"none\" stroke-width=\"1.5\"/>",
                    rng.below(80),
                    rng.below(80),
                    rng.below(120),
                    rng.below(40),
                    rng.below(120),
                    rng.below(40)
                );
            }
            _ => {
                let _ = writeln!(
                    s,
                    "<text x=\"{x}\" y=\"{y}\" font-size=\"{}\" fill=\"hsl({hue},40%,30%)\">{}</text>",
                    9 + rng.below(12),
                    rng.word()
                );
            }
        }
    }
    s.push_str("</svg></body></html>\n");
    s
}

/// A 1400×2000 canvas drawn by a script (gradients, shapes, text, a noise band written
/// through `putImageData`), then a second canvas that copies part of it.
fn canvas() -> String {
    let mut s = head(
        4,
        "canvas",
        "canvas{border:1px solid #888;display:block;margin-bottom:1em}",
    );
    s.push_str(
        "<canvas id=\"c\" width=\"1400\" height=\"2000\"></canvas>\n\
         <canvas id=\"d\" width=\"700\" height=\"500\"></canvas>\n\
         <script>\n\
         let seed = 12345;\n\
         function rnd(n) { seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n; }\n\
         const c = document.getElementById('c').getContext('2d');\n\
         const g = c.createLinearGradient(0, 0, 1400, 2000);\n\
         g.addColorStop(0, '#f8f8ff'); g.addColorStop(1, '#ffeedd');\n\
         c.fillStyle = g; c.fillRect(0, 0, 1400, 2000);\n\
         for (let i = 0; i < 6000; i++) {\n\
           c.fillStyle = 'hsla(' + rnd(360) + ',70%,50%,0.5)';\n\
           if (i % 3 == 0) { c.beginPath(); c.arc(rnd(1400), rnd(2000), 3 + rnd(25), 0, 6.2832); c.fill(); }\n\
           else if (i % 3 == 1) { c.fillRect(rnd(1400), rnd(2000), 4 + rnd(40), 4 + rnd(40)); }\n\
           else { c.font = (10 + rnd(14)) + 'px sans-serif'; c.fillText('ksm ' + i, rnd(1400), rnd(2000)); }\n\
         }\n\
         const band = c.createImageData(1400, 300);\n\
         for (let i = 0; i < band.data.length; i += 4) {\n\
           const v = rnd(256);\n\
           band.data[i] = v; band.data[i + 1] = (v * 3) & 255; band.data[i + 2] = 255 - v; band.data[i + 3] = 255;\n\
         }\n\
         c.putImageData(band, 0, 850);\n\
         const d = document.getElementById('d').getContext('2d');\n\
         d.drawImage(document.getElementById('c'), 0, 700, 1400, 1000, 0, 0, 700, 500);\n\
         document.title = 'Local page 4: canvas';\n\
         </script></body></html>\n",
    );
    s
}

/// Writes the pages into `dir` (mode 0755, the pages 0644: the browsers' user reads them);
/// their paths in tab order.
pub fn write(dir: &Path) -> Result<Vec<std::path::PathBuf>, String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m))
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    mode(dir, 0o755)?;
    let mut rng = Rng(0x6b73_6d70_6c75_7321);
    let mut out = Vec::new();
    for (name, what) in PAGES {
        let html = match *what {
            "text" => text(&mut rng),
            "table" => table(&mut rng),
            "svg" => svg(&mut rng),
            _ => canvas(),
        };
        let p = dir.join(name);
        std::fs::write(&p, html).map_err(|e| format!("{}: {e}", p.display()))?;
        mode(&p, 0o644)?;
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_deterministic_and_self_contained() {
        let a = tempdir("a");
        let b = tempdir("b");
        let pa = write(&a).unwrap();
        let pb = write(&b).unwrap();
        assert_eq!(pa.len(), 4);
        for (x, y) in pa.iter().zip(&pb) {
            let (tx, ty) = (std::fs::read(x).unwrap(), std::fs::read(y).unwrap());
            assert_eq!(tx, ty, "{} differs between runs", x.display());
            let t = String::from_utf8(tx).unwrap();
            assert!(t.contains("<title>Local page "));
            // Nothing to fetch: no URL of any scheme, no external resource.
            for needle in ["http:", "https:", "src=", "href=", "@import", "url(http"] {
                assert!(!t.contains(needle), "{} contains {needle}", x.display());
            }
        }
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
    }

    fn tempdir(tag: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("ksmplus-bench-pages-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
