//! `ksmplusctl ... | head -1`: when the reader is gone, ksmplusctl ends quietly (SIGPIPE, as
//! Unix filters do), never with a Rust panic about a broken pipe.
use ksmplus_tests::target_bin;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

#[test]
fn a_closed_pipe_ends_ksmplusctl_quietly() {
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for the two descriptors pipe2 returns.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned here alone.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The reader is gone before ksmplusctl writes its first line.
    drop(reader);
    let out = Command::new(target_bin("ksmplusctl"))
        .args(["scan", "--pid", &std::process::id().to_string()])
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {stderr}",
        out.status
    );
}
