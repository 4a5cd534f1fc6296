//! The systemd user unit for ksmplus-agentd (issue 5).
