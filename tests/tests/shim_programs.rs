//! Real programs give byte-identical output and exit status with and without the shim, with the
//! harness agent absent and present: python3, bash, git, sort (50 MiB) and gcc.
//!
//! Needs `cargo build -p ksmplus-preload` first (see `ksmplus_tests::shim_lib`).
use ksmplus_tests::shim::{assert_preloaded, command};
use ksmplus_tests::{run, HarnessAgent, RunOutput, ShimMode};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(180);

/// Runs `job(mode, fresh work dir)` without the shim, under the shim with no agent listening, and
/// under the shim with a tracking harness agent; asserts identical results. With the agent, also
/// asserts that a process whose comm starts with `comm` said Hello (the shim really was loaded).
/// `code` is the exit code the program must have without the shim.
fn same_everywhere(comm: &str, code: i32, job: impl Fn(&ShimMode, &Path) -> (RunOutput, Vec<u8>)) {
    let agent = HarnessAgent::start();
    let modes = [
        ShimMode::Off,
        ShimMode::On {
            socket: agent.socket_path().with_file_name("absent.sock"),
        },
        ShimMode::On {
            socket: agent.socket_path().to_owned(),
        },
    ];
    let mut results = Vec::new();
    for mode in &modes {
        let dir = tempfile::tempdir().unwrap();
        let (out, extra) = job(mode, dir.path());
        assert_preloaded(&out.stderr);
        eprintln!("{comm}: {mode:?}: {:?}", out.elapsed);
        results.push((out, extra));
    }
    let (base, base_extra) = &results[0];
    assert_eq!(
        base.status.code(),
        Some(code),
        "{comm} without the shim: {}",
        base.stderr_str()
    );
    for (mode, (r, extra)) in modes.iter().zip(&results).skip(1) {
        assert_eq!(
            r.status,
            base.status,
            "{comm} {mode:?}: exit status differs; stderr: {}",
            r.stderr_str()
        );
        assert!(
            r.stdout == base.stdout,
            "{comm} {mode:?}: stdout differs:\n--- without shim\n{}\n--- with\n{}",
            ksmplus_tests::process::tail(&base.stdout),
            ksmplus_tests::process::tail(&r.stdout)
        );
        assert!(
            extra == base_extra,
            "{comm} {mode:?}: produced files differ"
        );
    }
    // The agent reads its socket on its own thread: a Hello sent just before the program exited
    // may still be on its way.
    agent.wait_for(
        &format!("a Hello from a `{comm}` process (was the shim loaded?)"),
        Duration::from_secs(10),
        |st| {
            st.hellos
                .iter()
                .any(|h| h.hello.comm.starts_with(comm))
                .then_some(())
        },
    );
}

fn sh(mode: &ShimMode, dir: &Path, script: &str) -> RunOutput {
    let mut c = command("bash", mode);
    c.arg("-c").arg(script).current_dir(dir);
    run(&mut c, b"", DEADLINE)
}

#[test]
fn python3_allocating_large_and_small_objects() {
    let script = r#"
import hashlib, sys
h = hashlib.sha256()
bufs = []
for i in range(40):
    b = bytearray((i * 7 + j) % 251 for j in range(1000)) * (64 + i * 300)   # 64 KB .. 12 MB
    bufs.append(b)
    h.update(b)
    if i % 3 == 0:
        bufs.pop(0)
small = [dict(k=str(i), v=list(range(i % 50))) for i in range(200000)]
h.update(repr(small[-5:]).encode())
d = {str(i): bytes(i % 300) for i in range(50000)}
h.update(b"".join(d[str(i)] for i in range(0, 50000, 7)))
big = b"".join(bytes(bufs[-1][:1 << 20]) for _ in range(30))
h.update(hashlib.sha256(big).digest())
big = big.replace(b"\x00", b"\x01")
print(len(small), len(d), sum(len(b) for b in bufs), len(big))
print(h.hexdigest())
sys.exit(3)
"#;
    same_everywhere("python3", 3, |mode, dir| {
        std::fs::write(dir.join("t.py"), script).unwrap();
        let mut c = command("python3", mode);
        c.arg("t.py").current_dir(dir).env("PYTHONHASHSEED", "0");
        (run(&mut c, b"", DEADLINE), Vec::new())
    });
}

#[test]
fn bash_script() {
    let script = r#"
declare -A m
for i in $(seq 1 20000); do m[$i]=$((i * i % 9973)); done
s=0; for k in "${!m[@]}"; do s=$(( (s + m[$k]) % 1000003 )); done
big=$(head -c 3000000 /dev/zero | tr '\0' 'a')
echo "sum=$s len=${#big}"
printf '%s\n' {1..50000} | sort -rn | head -3
head10=${big:0:10}; big2="$big$big"; echo "${#big2}"
arr=(); for i in $(seq 1 3000); do arr+=("item-$i-$head10"); done; echo "${#arr[@]} ${arr[2999]}"
exit 7
"#;
    same_everywhere("bash", 7, |mode, dir| (sh(mode, dir, script), Vec::new()));
}

#[test]
fn git_init_add_commit_log() {
    let script = r#"
set -e
git init -q -b main repo && cd repo
for i in $(seq 1 200); do seq 1 $((i * 50)) > "f$i.txt"; done
head -c 5000000 /dev/zero | tr '\0' 'x' > big.bin
git add . && git commit -q -m "first"
for i in $(seq 1 50); do echo change >> "f$i.txt"; done
git rm -q f200.txt && git commit -q -am "second"
git log --stat --format='%H %an %ad %s' | head -40
git rev-parse HEAD^{tree}
git gc -q && git count-objects -v | grep -v size
git diff HEAD~1 --stat | tail -1
"#;
    same_everywhere("git", 0, |mode, dir| {
        let mut c = command("bash", mode);
        c.arg("-c").arg(script).current_dir(dir);
        for (k, v) in [
            ("HOME", dir.to_str().unwrap()),
            ("GIT_CONFIG_NOSYSTEM", "1"),
            ("GIT_AUTHOR_NAME", "Test"),
            ("GIT_AUTHOR_EMAIL", "t@example.org"),
            ("GIT_AUTHOR_DATE", "2020-01-01T00:00:00Z"),
            ("GIT_COMMITTER_NAME", "Test"),
            ("GIT_COMMITTER_EMAIL", "t@example.org"),
            ("GIT_COMMITTER_DATE", "2020-01-01T00:00:00Z"),
        ] {
            c.env(k, v);
        }
        (run(&mut c, b"", DEADLINE), Vec::new())
    });
}

#[test]
fn sort_50_mib() {
    // Deterministic lines (xorshift), ~50 MiB.
    let mut input = Vec::with_capacity(52 << 20);
    let mut x: u64 = 0x2545F4914F6CDD1D;
    while input.len() < 50 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        input.extend_from_slice(format!("{:016x} {}\n", x, x % 1000).as_bytes());
    }
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("in.txt");
    std::fs::write(&file, &input).unwrap();
    same_everywhere("sort", 0, |mode, dir| {
        let out_file = dir.join("out.txt");
        let mut c = command("sort", mode);
        c.env("LC_ALL", "C")
            .args(["-S", "64M", "-T"])
            .arg(dir)
            .arg("-k2,2n")
            .arg("-k1,1")
            .arg("-o")
            .arg(&out_file)
            .arg(&file);
        let r = run(&mut c, b"", DEADLINE);
        let sorted = std::fs::read(&out_file).unwrap_or_default();
        assert_eq!(sorted.len(), input.len());
        (r, ksmplus_common::page_hash(&sorted).to_le_bytes().to_vec())
    });
}

#[test]
fn gcc_compiles_identically() {
    let src = ksmplus_tests::cc::c_dir().join("shim_gcc_input.c");
    same_everywhere("gcc", 0, |mode, dir| {
        let exe = dir.join("prog");
        let mut c = command("gcc", mode);
        c.args(["-O2", "-o"]).arg(&exe).arg(&src);
        let r = run(&mut c, b"", DEADLINE);
        assert!(r.status.success(), "{}", r.stderr_str());
        // The produced program behaves the same (run without the shim).
        let ran = run(&mut Command::new(&exe), b"", DEADLINE);
        let mut extra = ran.stdout.clone();
        extra.extend_from_slice(format!("{:?}", ran.status).as_bytes());
        extra.extend_from_slice(&std::fs::read(&exe).unwrap());
        (r, extra)
    });
}
