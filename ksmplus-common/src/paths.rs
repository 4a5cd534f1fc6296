//! Where things live: the one place that resolves the XDG base directories and the ksmplus paths
//! built on them (socket, policy, learned state), for the agent, ksmplusctl and the shim.

use std::path::{Path, PathBuf};

/// The default socket path: `$XDG_RUNTIME_DIR/ksmplus/agent.sock`, else
/// `/run/user/$UID/ksmplus/agent.sock`, else `/tmp/ksmplus-$UID/agent.sock`.
pub fn default_socket_path(xdg_runtime_dir: Option<&str>, uid: u32) -> PathBuf {
    match xdg_runtime_dir {
        Some(d) if !d.is_empty() => Path::new(d).join("ksmplus/agent.sock"),
        _ => {
            let run = format!("/run/user/{uid}");
            if Path::new(&run).is_dir() {
                Path::new(&run).join("ksmplus/agent.sock")
            } else {
                PathBuf::from(format!("/tmp/ksmplus-{uid}/agent.sock"))
            }
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The socket: `arg` (`--socket`), else `$KSMPLUS_SOCKET`, else [`default_socket_path`].
#[cfg(feature = "sys")]
pub fn socket_path(arg: Option<&Path>) -> PathBuf {
    if let Some(p) = arg {
        return p.to_owned();
    }
    if let Some(p) = std::env::var_os("KSMPLUS_SOCKET").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let uid = nix::unistd::getuid().as_raw();
    default_socket_path(env("XDG_RUNTIME_DIR").as_deref(), uid)
}

/// `$XDG_CONFIG_HOME/ksmplus/policy.toml`, else `$HOME/.config/...`, else `/etc/ksmplus/...`.
pub fn default_policy_path(xdg_config_home: Option<&str>, home: Option<&str>) -> PathBuf {
    match (xdg_config_home, home) {
        (Some(d), _) if !d.is_empty() => Path::new(d).join("ksmplus/policy.toml"),
        (_, Some(h)) if !h.is_empty() => Path::new(h).join(".config/ksmplus/policy.toml"),
        _ => PathBuf::from("/etc/ksmplus/policy.toml"),
    }
}

/// The policy file: `arg` (`--policy`), else [`default_policy_path`] from the environment.
pub fn policy_path(arg: Option<&Path>) -> PathBuf {
    match arg {
        Some(p) => p.to_owned(),
        None => default_policy_path(env("XDG_CONFIG_HOME").as_deref(), env("HOME").as_deref()),
    }
}

/// `$XDG_STATE_HOME/ksmplus/learned`, else `$HOME/.local/state/ksmplus/learned`.
pub fn default_state_path(xdg_state_home: Option<&str>, home: Option<&str>) -> Option<PathBuf> {
    match (xdg_state_home, home) {
        (Some(d), _) if !d.is_empty() => Some(Path::new(d).join("ksmplus/learned")),
        (_, Some(h)) if !h.is_empty() => Some(Path::new(h).join(".local/state/ksmplus/learned")),
        _ => None,
    }
}

/// The agent's learned state: `arg` (`--state`), else [`default_state_path`].
pub fn state_path(arg: Option<&Path>) -> Option<PathBuf> {
    match arg {
        Some(p) => Some(p.to_owned()),
        None => default_state_path(env("XDG_STATE_HOME").as_deref(), env("HOME").as_deref()),
    }
}

/// The XDG data directories desktop entries are looked up in and written to.
#[derive(Clone, Debug)]
pub struct XdgData {
    /// `$XDG_DATA_HOME` (default `~/.local/share`): overrides and backups go here.
    pub data_home: PathBuf,
    /// `$XDG_DATA_DIRS` (default `/usr/local/share:/usr/share`), most important first.
    pub data_dirs: Vec<PathBuf>,
}

impl XdgData {
    /// From the environment, with the specification's defaults.
    pub fn from_env() -> Result<XdgData, String> {
        let data_home = match env("XDG_DATA_HOME") {
            Some(d) => PathBuf::from(d),
            None => {
                let home = env("HOME").ok_or("neither XDG_DATA_HOME nor HOME is set")?;
                PathBuf::from(home).join(".local/share")
            }
        };
        let dirs = env("XDG_DATA_DIRS").unwrap_or_else(|| "/usr/local/share:/usr/share".into());
        Ok(XdgData {
            data_home,
            data_dirs: dirs
                .split(':')
                .filter(|d| d.starts_with('/'))
                .map(PathBuf::from)
                .collect(),
        })
    }
}

/// `(pid, uid)` of a connected unix socket's peer (`SO_PEERCRED`).
#[cfg(feature = "sys")]
pub fn peer_cred(sock: impl std::os::fd::AsFd) -> nix::Result<(u32, u32)> {
    let c = nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok((c.pid() as u32, c.uid()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        assert_eq!(
            default_socket_path(Some("/run/user/5"), 5),
            Path::new("/run/user/5/ksmplus/agent.sock")
        );
        assert_eq!(
            default_policy_path(Some("/cfg"), Some("/home/u")),
            Path::new("/cfg/ksmplus/policy.toml")
        );
        assert_eq!(
            default_policy_path(None, Some("/home/u")),
            Path::new("/home/u/.config/ksmplus/policy.toml")
        );
        assert_eq!(
            default_policy_path(None, None),
            Path::new("/etc/ksmplus/policy.toml")
        );
        assert_eq!(
            default_state_path(None, Some("/home/u")),
            Some(PathBuf::from("/home/u/.local/state/ksmplus/learned"))
        );
        assert_eq!(default_state_path(None, None), None);
    }

    #[cfg(feature = "sys")]
    #[test]
    fn peer_of_a_socketpair_is_this_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (pid, uid) = peer_cred(&a).unwrap();
        assert_eq!(pid, std::process::id());
        assert_eq!(uid, nix::unistd::getuid().as_raw());
    }
}
