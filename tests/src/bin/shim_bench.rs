//! `shim-bench [--reps N]`: the shim's micro-benchmark. Prints a table, not a pass/fail verdict.
//!
//! Runs `tests/c/malloc_bench.c` and `/bin/true` without `LD_PRELOAD` (glibc), under the release
//! `libksmplus.so` with no agent listening, and under it with a tracking harness agent. Each
//! configuration runs `--reps` times (default 5), modes interleaved, and the median is kept.
//! The C program times itself and prints a checksum of everything it allocated, so neither the
//! compiler nor the shim can skip the work.
//!
//! Build first: `cargo build --release -p ksmplus-preload`, then
//! `cargo run --release -p ksmplus-tests --bin shim-bench`.
use ksmplus_tests::shim::shim_lib_for;
use ksmplus_tests::{compile, num_field, run, HarnessAgent, ShimMode};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(300);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One timed run of `prog args` in `mode`: nanoseconds as printed by the program, and its checksum.
fn timed(prog: &Path, args: &[&str], mode: &ShimMode, lib: &Path) -> (f64, String) {
    let (ns, _, sum) = timed_ops(prog, args, mode, lib);
    (ns, sum)
}

/// [`timed`] with the operations the program reports.
fn timed_ops(prog: &Path, args: &[&str], mode: &ShimMode, lib: &Path) -> (f64, f64, String) {
    let (ns, ops, sum, _) = timed_full(prog, args, mode, lib);
    (ns, ops, sum)
}

/// [`timed_ops`] with the CPU time the program reports (`cpu_ns`, 0 when it prints none).
fn timed_full(prog: &Path, args: &[&str], mode: &ShimMode, lib: &Path) -> (f64, f64, String, f64) {
    let mut c = Command::new(prog);
    mode.apply(&mut c, lib);
    c.args(args);
    let out = run(&mut c, b"", DEADLINE);
    assert!(out.status.success(), "{c:?}: {}", out.stderr_str());
    let line = out.stdout_str();
    let sum = ksmplus_tests::field(&line, "sum").unwrap().to_owned();
    let cpu =
        ksmplus_tests::field(&line, "cpu_ns").map_or(0.0, |_| num_field(&line, "cpu_ns") as f64);
    (
        num_field(&line, "ns") as f64,
        num_field(&line, "ops") as f64,
        sum,
        cpu,
    )
}

/// Wall time of `n` sequential `/bin/true` runs.
fn startup(n: usize, mode: &ShimMode, lib: &Path) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        let mut c = Command::new("/bin/true");
        mode.apply(&mut c, lib);
        let st = c.status().expect("run /bin/true");
        assert!(st.success());
    }
    t.elapsed().as_nanos() as f64
}

fn main() {
    let mut reps = 5;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--reps" => reps = args.next().and_then(|v| v.parse().ok()).expect("--reps N"),
            _ => {
                eprintln!("usage: shim-bench [--reps N]");
                std::process::exit(2);
            }
        }
    }
    let lib = shim_lib_for(Some("release"));
    let prog = compile("malloc_bench");
    let agent = HarnessAgent::start();
    let modes = [
        ("glibc", ShimMode::Off),
        (
            "shim, no agent",
            ShimMode::On {
                socket: agent.socket_path().with_file_name("absent.sock"),
            },
        ),
        (
            "shim + agent",
            ShimMode::On {
                socket: agent.socket_path().to_owned(),
            },
        ),
    ];
    println!("shim: {}", lib.display());
    println!("workload: {} ({reps} reps, median)", prog.display());
    let cases: Vec<(&str, Vec<&str>, f64)> = vec![
        (
            "small 16B-4KiB, 1 thread",
            vec!["small", "1", "3000000"],
            3e6,
        ),
        (
            "small 16B-4KiB, 4 threads",
            vec!["small", "4", "1500000"],
            6e6,
        ),
        (
            "large 64KiB-8MiB alloc+touch+free",
            vec!["large", "2000"],
            2000.0,
        ),
    ];
    println!(
        "\n{:<36} {:>16} {:>16} {:>16}   {:>10} {:>10}",
        "case (time per op)", modes[0].0, modes[1].0, modes[2].0, "ratio", "ratio+agt"
    );
    for (name, args, ops) in &cases {
        let mut times = vec![Vec::new(); modes.len()];
        let mut sums = vec![String::new(); modes.len()];
        for _ in 0..reps {
            for (i, (_, mode)) in modes.iter().enumerate() {
                let (ns, sum) = timed(&prog, args, mode, &lib);
                times[i].push(ns / ops);
                sums[i] = sum;
            }
        }
        assert!(
            sums.iter().all(|s| *s == sums[0]),
            "{name}: checksums differ between modes: {sums:?}"
        );
        let m: Vec<f64> = times.into_iter().map(median).collect();
        let small = args[0] == "small";
        // Small objects: throughput ratio shim/glibc (higher is better, target >= 0.97).
        // Large objects: time ratio shim/glibc (lower is better, target <= 1.5).
        let ratio = |x: f64| if small { m[0] / x } else { x / m[0] };
        println!(
            "{:<36} {:>13.1} ns {:>13.1} ns {:>13.1} ns   {:>9.3}x {:>9.3}x  {}",
            name,
            m[0],
            m[1],
            m[2],
            ratio(m[1]),
            ratio(m[2]),
            if small {
                "throughput shim/glibc, target >= 0.97"
            } else {
                "time shim/glibc, target <= 1.5"
            }
        );
    }
    // Issue 12's probe: four threads allocate, fill, grow and free 64 KiB-4 MiB blocks while
    // the main thread forks 200 children. A fork holds the mmap lock while it copies the
    // address space: any system call or fault on fresh memory in a worker waits for it.
    let fork_args = ["forks", "4", "200"];
    let mut ops_s = vec![Vec::new(); modes.len()];
    let mut fork_ns = vec![Vec::new(); modes.len()];
    let mut fork_cpu = vec![Vec::new(); modes.len()];
    for _ in 0..reps {
        for (i, (_, mode)) in modes.iter().enumerate() {
            let (ns, ops, sum, cpu) = timed_full(&prog, &fork_args, mode, &lib);
            assert_eq!(sum, "4", "every worker made operations");
            ops_s[i].push(ops / ns * 1e9);
            fork_ns[i].push(ns);
            fork_cpu[i].push(cpu);
        }
    }
    let o: Vec<f64> = ops_s.into_iter().map(median).collect();
    let f: Vec<f64> = fork_ns.into_iter().map(median).collect();
    let fc: Vec<f64> = fork_cpu.into_iter().map(median).collect();
    println!(
        "{:<36} {:>11.0} op/s {:>11.0} op/s {:>11.0} op/s   {:>9.3}x {:>9.3}x  throughput shim/glibc, target >= 0.9",
        "threads+fork: 4 workers, large blocks", o[0], o[1], o[2], o[1] / o[0], o[2] / o[0]
    );
    println!(
        "{:<36} {:>13.1} ms {:>13.1} ms {:>13.1} ms   {:>9.3}x {:>9.3}x  time shim/glibc, target <= 1.1",
        "threads+fork: 200 forks meanwhile",
        f[0] / 1e6,
        f[1] / 1e6,
        f[2] / 1e6,
        f[1] / f[0],
        f[2] / f[0]
    );
    // On a machine with fewer cores than runnable threads the forks' wall time is mostly the
    // forking thread's share of the cores, which busier workers take: their CPU time is what
    // the forks themselves cost (forking thread + children).
    println!(
        "{:<36} {:>13.1} ms {:>13.1} ms {:>13.1} ms   {:>9.3}x {:>9.3}x  CPU shim/glibc (forking thread + children)",
        "threads+fork: CPU of the 200 forks",
        fc[0] / 1e6,
        fc[1] / 1e6,
        fc[2] / 1e6,
        fc[1] / fc[0],
        fc[2] / fc[0]
    );
    let n = 200;
    let mut times = vec![Vec::new(); modes.len()];
    for _ in 0..reps {
        for (i, (_, mode)) in modes.iter().enumerate() {
            times[i].push(startup(n, mode, &lib) / n as f64 / 1e3);
        }
    }
    let m: Vec<f64> = times.into_iter().map(median).collect();
    println!(
        "{:<36} {:>13.1} us {:>13.1} us {:>13.1} us   {:>9.3}x {:>9.3}x  time shim/glibc",
        format!("start-up: /bin/true x {n}"),
        m[0],
        m[1],
        m[2],
        m[1] / m[0],
        m[2] / m[0]
    );
    println!(
        "\n{} shim clients said Hello to the harness agent during the run.",
        agent.state().hellos.len()
    );
}
