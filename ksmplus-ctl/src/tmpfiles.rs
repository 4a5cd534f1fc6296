//! `ksmplusctl tmpfiles`: the tmpfiles.d file that switches ksmd on at every boot with the
//! `[ksmd]` table of a policy (`pages_to_scan`, `sleep_millisecs`, `use_zero_pages`, `run`).
//!
//! ksmd's tunables are root's, and the agent is a per-user service: it applies `[ksmd]` only
//! when it runs as root. So the boot-time file is where the policy's tunables reach ksmd for
//! everyone else. `make install` and the package install this command's output for the
//! example policy (`examples/policy.toml`) as `PREFIX/lib/tmpfiles.d/ksmplus.conf`; an
//! administrator writes one from their own policy into `/etc/tmpfiles.d/ksmplus.conf`, which
//! replaces it.
//!
//! Invariants: `run` is the last line (ksmd starts with its settings in place), and is 1 when
//! the policy leaves it unset (the file exists to switch ksmd on); a tunable the policy leaves
//! unset gets no line (the kernel's value stays); the output depends on the policy only.
use ksmplus_common::policy::{Ksmd, Policy};
use std::path::PathBuf;

/// `ksmplusctl tmpfiles` options.
#[derive(clap::Args, Debug, Clone)]
pub struct TmpfilesArgs {
    /// The policy whose [ksmd] table to carry [default: $XDG_CONFIG_HOME/ksmplus/policy.toml]
    #[arg(long, value_name = "PATH")]
    pub policy: Option<PathBuf>,
}

const KSM: &str = "/sys/kernel/mm/ksm";

/// The file, for the `[ksmd]` table `k` of the policy at `source` (named in its header).
pub fn render(k: &Ksmd, source: &str) -> String {
    let mut s = format!(
        "\
# ksmplus: switch the kernel's same-page merging daemon (ksmd) on at every boot, with the
# [ksmd] settings of the policy {source}, through systemd-tmpfiles.
# Written by `ksmplusctl tmpfiles`; installed as PREFIX/lib/tmpfiles.d/ksmplus.conf. ksmd only
# scans memory a program marked mergeable, and ksmplus marks only what pays, so a running
# ksmd costs next to nothing where nothing is marked. Without KSM these lines do nothing.
#
# Apply now, without a reboot:   systemd-tmpfiles --create ksmplus.conf
# Your own policy's settings: a file of the same name in /etc/tmpfiles.d replaces this one:
#   ksmplusctl tmpfiles | sudo tee /etc/tmpfiles.d/ksmplus.conf
# Switch ksmd off for good (a link to /dev/null masks this file, across upgrades too):
#   ln -s /dev/null /etc/tmpfiles.d/ksmplus.conf
#   echo 0 > {KSM}/run        (stop now; 2 would also unmerge every merged page)
"
    );
    for (name, v) in [
        ("pages_to_scan", k.pages_to_scan),
        ("sleep_millisecs", k.sleep_millisecs),
        ("use_zero_pages", k.use_zero_pages),
        ("run", Some(k.run.unwrap_or(1))),
    ] {
        if let Some(v) = v {
            s += &format!("w {KSM}/{name} - - - - {v}\n");
        }
    }
    s
}

/// Runs `ksmplusctl tmpfiles`: the file on stdout. A missing default policy means the
/// defaults, as for the agent; a missing `--policy PATH` is an error (a typo would otherwise
/// print a file without the tunables meant).
pub fn cli(args: &TmpfilesArgs) -> i32 {
    let path = ksmplus_common::paths::policy_path(args.policy.as_deref());
    if args.policy.is_some() && !path.exists() {
        let e = format!("{}: no such policy file", path.display());
        return crate::output::fail(&e, false);
    }
    match Policy::load(&path) {
        Ok(p) => {
            print!("{}", render(&p.ksmd, &path.display().to_string()));
            crate::output::exit::OK
        }
        Err(e) => crate::output::fail(&e.to_string(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<&str> {
        s.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn an_empty_table_only_switches_ksmd_on() {
        assert_eq!(
            lines(&render(&Ksmd::default(), "p")),
            ["w /sys/kernel/mm/ksm/run - - - - 1"]
        );
    }

    #[test]
    fn every_set_key_gets_a_line_and_run_comes_last() {
        let k = Ksmd {
            run: Some(2),
            pages_to_scan: Some(1000),
            sleep_millisecs: Some(20),
            use_zero_pages: Some(0),
        };
        assert_eq!(
            lines(&render(&k, "/home/u/.config/ksmplus/policy.toml")),
            [
                "w /sys/kernel/mm/ksm/pages_to_scan - - - - 1000",
                "w /sys/kernel/mm/ksm/sleep_millisecs - - - - 20",
                "w /sys/kernel/mm/ksm/use_zero_pages - - - - 0",
                "w /sys/kernel/mm/ksm/run - - - - 2",
            ]
        );
        assert!(render(&k, "/x/policy.toml").contains("the policy /x/policy.toml"));
    }

    /// What `make install` installs: the example policy's tunables.
    #[test]
    fn the_example_policy_carries_its_tunables() {
        let text = include_str!("../../examples/policy.toml");
        let p = Policy::parse(text, std::path::Path::new("examples/policy.toml")).unwrap();
        let out = render(&p.ksmd, "examples/policy.toml");
        let l = lines(&out);
        assert!(
            l.contains(&"w /sys/kernel/mm/ksm/pages_to_scan - - - - 1000"),
            "{out}"
        );
        assert!(
            l.contains(&"w /sys/kernel/mm/ksm/sleep_millisecs - - - - 20"),
            "{out}"
        );
        assert_eq!(
            l.last(),
            Some(&"w /sys/kernel/mm/ksm/run - - - - 1"),
            "{out}"
        );
    }
}
