//! Program names: how a policy entry matches a process, and the programs ksmplus never touches.
//!
//! Kept out of the `policy` feature because the shim needs it too: `KSMPLUS_MADVISE_ALL=1` runs
//! without an agent, and the exclusion list holds in every mode.

/// Programs that are never tracked unless the policy overrides `exclude`: holders of secrets,
/// for which a memory-deduplication side channel (timing of a copy-on-write fault) is a risk.
pub const DEFAULT_EXCLUDE: &[&str] = &[
    "ssh-agent",
    "gpg-agent",
    "gnome-keyring-daemon",
    "gnome-keyring-d", // comm of gnome-keyring-daemon, cut to 15 bytes
    "keepassxc",
    "keepassx",
    "keepass",
    "KeePass",
    "1password",
    "bitwarden",
    "Bitwarden",
    "pass",
    "kwalletd5",
    "kwalletd6",
    "kwalletd",
    "seahorse",
    "pinentry",
    "pinentry-gnome3",
    "pinentry-qt",
    "pinentry-curses",
    "sshd",
    "sudo",
    "su",
    "polkit-agent-helper-1",
];

/// Kernel limit on the length of `comm` (TASK_COMM_LEN - 1).
pub const COMM_LEN: usize = 15;

/// Whether policy entry `name` names the process with this `comm` and executable path: by
/// comm, by the executable's basename, by its full path when `name` has a slash, and a name
/// longer than 15 bytes by the comm the kernel cut it to.
pub fn name_matches(name: &str, comm: &str, exe: &str) -> bool {
    if name.is_empty() {
        return false;
    }
    let base = exe.rsplit('/').next().unwrap_or("");
    // A deleted executable reads as "/path/prog (deleted)".
    let base = base.strip_suffix(" (deleted)").unwrap_or(base);
    if name == comm || name == base || (name.contains('/') && name == exe) {
        return true;
    }
    name.len() > COMM_LEN
        && comm.len() == COMM_LEN
        && name.as_bytes()[..COMM_LEN] == *comm.as_bytes()
}

/// True if the default exclusion list names this process.
pub fn excluded_by_default(comm: &str, exe: &str) -> bool {
    DEFAULT_EXCLUDE.iter().any(|n| name_matches(n, comm, exe))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_comm_basename_path_and_cut_comm() {
        assert!(name_matches("okular", "okular", "/usr/bin/okular"));
        assert!(name_matches("okular", "x", "/usr/bin/okular (deleted)"));
        assert!(name_matches("/usr/bin/okular", "x", "/usr/bin/okular"));
        assert!(!name_matches("bin/okular", "x", "/usr/bin/okular"));
        assert!(name_matches(
            "gnome-keyring-daemon",
            "gnome-keyring-d",
            "/x"
        ));
        assert!(!name_matches("", "", ""));
        assert!(excluded_by_default("ssh-agent", "/usr/bin/ssh-agent"));
        assert!(!excluded_by_default("python3", "/usr/bin/python3.11"));
    }
}
