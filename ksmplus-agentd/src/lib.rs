//! ksmplus-agentd: the per-user agent running the KSM+ heuristic for programs under the shim.
pub mod engine;
