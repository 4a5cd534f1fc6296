//! Hand-written SVG line plots (no plotting dependency), shared by the head-to-head bench (the
//! W2 plot) and the desktop bench's long run: panels stacked over one time axis, one coloured
//! line per approach, the legend at the right.

use std::fmt::Write as _;

/// A panel's vertical scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scale {
    /// From min(0, lowest value) to 1.1 × the highest (at least 1).
    Linear,
    /// Decades from 1 (0 is drawn at 1) to the highest value's.
    Log,
}

/// One line: `(x, y)` points in x order.
pub struct Line<'a> {
    pub name: &'a str,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
}

pub struct Panel<'a> {
    pub label: &'a str,
    pub scale: Scale,
    pub lines: Vec<Line<'a>>,
}

/// The colour of an approach, the same in every plot.
pub fn color(ap: &str) -> &'static str {
    match ap {
        "none" => "#888888",
        "madvise-all" => "#1f77b4",
        "merge_any" => "#d62728",
        "smart_scan" => "#ff7f0e",
        _ => "#2ca02c",
    }
}

pub fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The panels, top to bottom, over a shared x axis labelled `x_label`; the legend lists the
/// first panel's lines.
pub fn svg(title: &str, x_label: &str, panels: &[Panel]) -> String {
    let (w, left, right, top, gap, panel) = (900.0, 80.0, 160.0, 40.0, 60.0, 250.0);
    let n = panels.len().max(1) as f64;
    let h = top + n * panel + (n - 1.0) * gap + 40.0;
    let plot_w = w - left - right;
    let xmax = panels
        .iter()
        .flat_map(|p| p.lines.iter())
        .flat_map(|l| l.points.last().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let x = |t: f64| left + t / xmax * plot_w;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="22" font-size="13">{}</text>"#,
        xml(title)
    );
    let mut ty = top;
    for p in panels {
        let values = || p.lines.iter().flat_map(|l| l.points.iter().map(|q| q.1));
        let y: Box<dyn Fn(f64) -> f64> = match p.scale {
            Scale::Linear => {
                let ymax = values().fold(1.0f64, f64::max) * 1.1;
                let ymin = values().fold(0.0f64, f64::min) * 1.1;
                let y = move |v: f64| ty + panel - (v - ymin) / (ymax - ymin) * panel;
                for i in 0..=4 {
                    let v = ymin + (ymax - ymin) * i as f64 / 4.0;
                    let _ = writeln!(
                        s,
                        r#"<text x="{}" y="{:.1}" text-anchor="end">{v:.2}</text>"#,
                        left - 5.0,
                        y(v) + 4.0
                    );
                }
                if ymin < 0.0 {
                    let _ = writeln!(
                        s,
                        r##"<line x1="{left}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/>"##,
                        left + plot_w,
                        y(0.0),
                        y(0.0)
                    );
                }
                Box::new(y)
            }
            Scale::Log => {
                let vmax = values().fold(10.0f64, f64::max);
                let decades = vmax.log10().ceil().max(1.0);
                // 0 is drawn at 10^0 (the bottom).
                let y = move |v: f64| ty + panel - v.max(1.0).log10() / decades * panel;
                for d in 0..=decades as u32 {
                    let v = 10u64.pow(d);
                    let _ = writeln!(
                        s,
                        r##"<text x="{}" y="{:.1}" text-anchor="end">{v}</text><line x1="{left}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/>"##,
                        left - 5.0,
                        y(v as f64) + 4.0,
                        left + plot_w,
                        y(v as f64),
                        y(v as f64)
                    );
                }
                Box::new(y)
            }
        };
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{ty}" width="{plot_w}" height="{panel}" fill="none" stroke="#000"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>"#,
            ty + panel / 2.0,
            ty + panel / 2.0,
            xml(p.label)
        );
        for i in 0..=5 {
            let t = xmax * i as f64 / 5.0;
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{t:.1}</text>"#,
                x(t),
                ty + panel + 15.0
            );
        }
        for l in &p.lines {
            let pts: Vec<String> = l
                .points
                .iter()
                .map(|&(a, b)| format!("{:.1},{:.1}", x(a), y(b)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
                l.color,
                pts.join(" ")
            );
        }
        ty += panel + gap;
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        left + plot_w / 2.0,
        ty - gap + 35.0,
        xml(x_label)
    );
    for (i, l) in panels.iter().take(1).flat_map(|p| &p.lines).enumerate() {
        let ly = top + 15.0 + 20.0 * i as f64;
        let lx = left + plot_w + 15.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            lx + 20.0,
            l.color,
            lx + 25.0,
            ly + 4.0,
            xml(l.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_lines_and_escaping() {
        let line = |name, pts: Vec<(f64, f64)>| Line {
            name,
            color: color(name),
            points: pts,
        };
        let panels = [
            Panel {
                label: "saved <MiB>",
                scale: Scale::Linear,
                lines: vec![
                    line("merge_any", vec![(0.0, 0.0), (10.0, 40.0)]),
                    line("ksmplus", vec![(0.0, 0.0), (10.0, 35.0)]),
                ],
            },
            Panel {
                label: "rmap",
                scale: Scale::Log,
                lines: vec![line("ksmplus", vec![(0.0, 0.0), (20.0, 1000.0)])],
            },
        ];
        let s = svg("a & b", "seconds", &panels);
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert_eq!(s.matches("<polyline").count(), 3);
        assert!(s.contains("a &amp; b") && s.contains("saved &lt;MiB&gt;"));
        // x axis to the last point of any line (20 s): 10 s is half-way (80 + 330).
        assert!(s.contains("410.0,"), "{s}");
        // The legend names the first panel's lines.
        assert_eq!(s.matches("stroke-width=\"3\"").count(), 2);
        // A negative value on a linear panel draws the zero line.
        let neg = [Panel {
            label: "whole %",
            scale: Scale::Linear,
            lines: vec![line("ksmplus", vec![(0.0, -1.0), (10.0, 4.0)])],
        }];
        assert!(svg("t", "s", &neg).contains("stroke=\"#ddd\""));
    }
}
