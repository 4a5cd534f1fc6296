//! What the text tables of both benchmarks (head-to-head and desktop) share: figures that may
//! be missing, convergence times, and the row and footnote of a cell that did not run.

use std::fmt::Write as _;

pub const MIB: f64 = 1048576.0;

/// `v` with `prec` decimals, `-` when missing.
pub fn opt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

/// Seconds to converge, or `>N` (the seconds observed) when the cell never converged.
pub fn conv(converged: bool, converge_secs: f64, observed_secs: f64) -> String {
    if converged {
        format!("{converge_secs:.1}")
    } else {
        format!(">{observed_secs:.0}")
    }
}

/// A target's verdict in a list of targets: `words` for met, missed, and not measured (its
/// cells did not run).
pub fn verdict(v: Option<bool>, words: [&'static str; 3]) -> &'static str {
    match v {
        Some(true) => words[0],
        Some(false) => words[1],
        None => words[2],
    }
}

/// The row of a cell that did not run: `head` (its first columns), then the first word of its
/// `status` and the number of the footnote `name: status` added to `notes`.
pub fn not_ran(s: &mut String, notes: &mut Vec<String>, head: &str, name: &str, status: &str) {
    notes.push(format!("{name}: {status}"));
    let _ = writeln!(
        s,
        "{head} {} [{}]",
        status.split(':').next().unwrap_or(""),
        notes.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_figures_and_cells_that_did_not_run() {
        assert_eq!(opt(Some(1.256), 2), "1.26");
        assert_eq!(opt(None, 2), "-");
        assert_eq!(conv(true, 2.26, 90.0), "2.3");
        assert_eq!(conv(false, 2.25, 90.4), ">90");
        let words = ["PASS", "FAIL", "n/a "];
        assert_eq!(verdict(Some(false), words), "FAIL");
        assert_eq!(verdict(None, words), "n/a ");
        let (mut s, mut notes) = (String::new(), vec!["earlier".to_owned()]);
        not_ran(
            &mut s,
            &mut notes,
            "W1  ksmplus",
            "W1 ksmplus",
            "unavailable: no shim",
        );
        assert_eq!(s, "W1  ksmplus unavailable [2]\n");
        assert_eq!(notes[1], "W1 ksmplus: unavailable: no shim");
    }
}
