//! ksmplus-agentd: the per-user agent running the KSM+ heuristic for programs under the shim.
//! (`ksmplusctl`, the control CLI, is the crate `ksmplus-ctl`.)
//!
//! Modules, from the edge inwards: `cli` (the command line and its man page), `server` (event loop; `server::socket`,
//! `server::tunables`, `server::control` (control requests)), `client` (one tracked process:
//! maps, mailbox), `wake` (wake-up signals), `signals` (SIGHUP/SIGTERM into the loop), `notify`
//! (the service manager's sd_notify protocol), `logger` (the `log` backend: journald
//! priorities or plain lines), `learned` (fork servers remembered across runs), `procfs`
//! (reading a process from outside), `engine` (the pure KSM+ state machine).
pub mod logger;
/// The logging macros every module uses (`crate::info!`, `use crate::{debug, warn}`): the
/// `log` facade's own; [`logger`] is the backend.
pub use log::{debug, error, info, warn};

pub mod cli;
pub mod client;
pub mod engine;
pub mod learned;
pub mod notify;
pub mod procfs;
pub mod server;
pub mod signals;
pub mod wake;
