//! The shim's allocator contract, end to end: the thesis program, every hook's events as the
//! harness agent sees them, a multi-threaded stress run and forks under load.
//!
//! Needs `cargo build -p ksmplus-preload` first (see `ksmplus_tests::shim_lib`).
use ksmplus_common::protocol::{Message, Origin};
use ksmplus_tests::shim::{command, expected_comm};
use ksmplus_tests::{
    compile, field, num_field, page_size, procfs, run, HarnessAgent, Interactive, ShimMode,
};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);
const MIN_REGION: u64 = 65536;

fn on(agent: &HarnessAgent) -> ShimMode {
    ShimMode::On {
        socket: agent.socket_path().to_owned(),
    }
}

/// The byte pattern `shim_driver`'s `fill P N SEED` writes.
fn fill_pattern(n: usize, seed: u64) -> Vec<u8> {
    (0..n as u64)
        .map(|i| (i.wrapping_mul(7) + seed + i / 4096) as u8)
        .collect()
}

#[test]
fn thesis_program_buffer_is_page_aligned_and_registered() {
    let agent = HarnessAgent::start();
    let prog = compile("shim_thesis");
    let mut p = Interactive::spawn(&mut command(&prog, &on(&agent)));
    let pid = p.pid();
    let line = p.line(T);
    let (ptr, size) = (num_field(&line, "ptr"), num_field(&line, "size"));
    assert_eq!(size, 20 << 20);
    assert_eq!(
        ptr % page_size(),
        0,
        "20 MiB buffer not page-aligned: {line}"
    );
    // The program really holds i % 256 (read from outside, not trusted from its output).
    let mem = procfs::read_mem(pid, ptr, size as usize);
    assert!(mem.iter().enumerate().all(|(i, &b)| b == i as u8));
    assert_eq!(
        format!("{:016x}", procfs::fnv1a(&mem)),
        field(&line, "sum").unwrap()
    );

    let idx = agent.wait_hello(pid, T);
    let hello = agent.state().clients[idx].hello.clone().unwrap();
    assert_eq!(hello.pid, pid);
    assert_eq!(hello.ppid, std::process::id());
    // SAFETY: geteuid has no preconditions.
    assert_eq!(hello.uid, unsafe { libc::geteuid() });
    assert_eq!(hello.comm, expected_comm(&prog));
    assert_eq!(hello.page_size as u64, page_size());
    assert_eq!(hello.min_region, MIN_REGION);
    assert_eq!(
        std::path::Path::new(&hello.exe).canonicalize().ok(),
        prog.canonicalize().ok()
    );

    let region = agent.wait_for("a RegionAdded covering the buffer", T, |s| {
        s.clients[idx].messages.iter().find_map(|m| match *m {
            Message::RegionAdded {
                start, len, origin, ..
            } if start <= ptr && ptr + size <= start + len => Some((start, len, origin)),
            _ => None,
        })
    });
    assert!(region.1 >= size, "{region:x?}");
    assert_eq!(region.2, Origin::Malloc, "{region:x?}");

    let (status, rest) = p.finish(T);
    assert!(status.success(), "{status:?} {rest:?}");
    assert_eq!(rest, [format!("sum={}", field(&line, "sum").unwrap())]);
}

/// `shim_hooks.c` checks every entry point's C contract by itself; the shim must not change its
/// output (agent present, agent absent, or no shim at all).
#[test]
fn hook_contracts_hold_with_and_without_shim() {
    let prog = compile("shim_hooks");
    let agent = HarnessAgent::start();
    let absent = ShimMode::On {
        socket: agent.socket_path().with_file_name("absent.sock"),
    };
    let mut outputs = Vec::new();
    for mode in [ShimMode::Off, on(&agent), absent] {
        let out = run(&mut command(&prog, &mode), b"", Duration::from_secs(60));
        ksmplus_tests::shim::assert_preloaded(&out.stderr);
        assert!(
            out.status.success(),
            "{mode:?}: {}{}",
            out.stdout_str(),
            out.stderr_str()
        );
        outputs.push(out.stdout_str());
    }
    assert!(outputs[0].ends_with("failures=0\n"), "{}", outputs[0]);
    assert_eq!(outputs[1], outputs[0]);
    assert_eq!(outputs[2], outputs[0]);
}

/// A `shim_driver` under the shim, connected and resynced with `agent`.
fn driver(agent: &HarnessAgent) -> (Interactive, usize) {
    let mut p = Interactive::spawn(&mut command(compile("shim_driver"), &on(agent)));
    let pid = num_field(&p.cmd("pid", T), "pid") as u32;
    assert_eq!(pid, p.pid());
    let idx = agent.wait_synced(pid, T);
    (p, idx)
}

/// Allocates with `cmd` (a `shim_driver` command yielding `ptr=`), then checks: the pointer is
/// page-aligned and registered with origin Malloc covering `size` bytes, the content written
/// is what `/proc/PID/mem` shows, and `free` removes the region.
fn check_alloc_hook(cmd: &str, size: u64, align: u64) {
    let agent = HarnessAgent::start();
    let (mut p, idx) = driver(&agent);
    let r = p.cmd(cmd, T);
    let ptr = num_field(&r, "ptr");
    assert_ne!(ptr, 0, "{cmd}: {r}");
    assert_eq!(ptr % align.max(page_size()), 0, "{cmd}: {r}");
    assert!(num_field(&r, "usable") >= size, "{cmd}: {r}");
    let (start, len, origin) = agent.wait_for(&format!("{cmd}: region at {ptr:#x}"), T, |s| {
        s.clients[idx].region_containing(ptr)
    });
    assert!(
        ptr + size <= start + len,
        "{cmd}: region {start:#x}+{len:#x}"
    );
    assert_eq!(origin, Origin::Malloc, "{cmd}");
    if cmd.starts_with("calloc") {
        assert_eq!(p.cmd(&format!("zero {ptr} {size}"), T), "zero=1");
    }
    let sum = p.cmd(&format!("fill {ptr} {size} 3"), T);
    let mem = procfs::read_mem(p.pid(), ptr, size as usize);
    assert_eq!(mem, fill_pattern(size as usize, 3), "{cmd}");
    assert_eq!(sum, format!("sum={:016x}", procfs::fnv1a(&mem)));
    assert_eq!(
        num_field(&p.cmd(&format!("usable {ptr}"), T), "usable"),
        num_field(&r, "usable")
    );
    assert_eq!(p.cmd(&format!("free {ptr}"), T), "ok");
    agent.wait_for(&format!("{cmd}: region at {ptr:#x} removed"), T, |s| {
        s.clients[idx]
            .region_containing(ptr)
            .is_none()
            .then_some(())
    });
    let (status, _) = p.finish(T);
    assert!(status.success());
}

#[test]
fn hook_malloc() {
    check_alloc_hook("malloc 100000", 100000, 1);
}
#[test]
fn hook_malloc_exactly_threshold() {
    check_alloc_hook("malloc 65536", 65536, 1);
}
#[test]
fn hook_calloc() {
    check_alloc_hook("calloc 300000", 300000, 1);
}
#[test]
fn hook_memalign() {
    check_alloc_hook("memalign 65536 100000", 100000, 65536);
}
#[test]
fn hook_aligned_alloc() {
    check_alloc_hook("aligned_alloc 2097152 4194304", 4194304, 2 << 20);
}
#[test]
fn hook_posix_memalign() {
    check_alloc_hook("posix_memalign 2097152 100000", 100000, 2 << 20);
}
#[test]
fn hook_valloc() {
    check_alloc_hook("valloc 100000", 100000, 1);
}
#[test]
fn hook_pvalloc() {
    // pvalloc rounds the size up to whole pages.
    check_alloc_hook("pvalloc 100001", 100001_u64.div_ceil(4096) * 4096, 1);
}
#[test]
fn hook_reallocarray_from_null() {
    check_alloc_hook("reallocarray 0 1000 100", 100000, 1);
}
#[test]
fn hook_realloc_from_null() {
    check_alloc_hook("realloc 0 100000", 100000, 1);
}

#[test]
fn hook_realloc_grow_shrink_keeps_content_and_registry() {
    let agent = HarnessAgent::start();
    let (mut p, idx) = driver(&agent);
    let a = num_field(&p.cmd("malloc 100000", T), "ptr");
    p.cmd(&format!("fill {a} 100000 9"), T);
    let want = fill_pattern(100000, 9);
    // grow: the region is the new block, content kept.
    let r = p.cmd(&format!("realloc {a} 3000000"), T);
    let b = num_field(&r, "ptr");
    assert_eq!(b % page_size(), 0, "{r}");
    assert_eq!(procfs::read_mem(p.pid(), b, 100000), want);
    agent.wait_for("grown region registered", T, |s| {
        let c = &s.clients[idx];
        let (start, len, _) = c.region_containing(b)?;
        let old_gone = a == b || c.region_containing(a).is_none();
        (start <= b && b + 3000000 <= start + len && old_gone).then_some(())
    });
    // shrink below the threshold: back to glibc, the region goes away, the prefix stays.
    let r = p.cmd(&format!("realloc {b} 1000"), T);
    let c = num_field(&r, "ptr");
    assert_eq!(procfs::read_mem(p.pid(), c, 1000), want[..1000]);
    agent.wait_for("shrunk block unregistered", T, |s| {
        let cl = &s.clients[idx];
        (cl.region_containing(b).is_none() || b == c && cl.region_containing(c).is_some())
            .then_some(())
    });
    assert_eq!(p.cmd(&format!("free {c}"), T), "ok");
    assert!(p.finish(T).0.success());
}

#[test]
fn hook_reallocarray_overflow_is_enomem_and_keeps_block() {
    let agent = HarnessAgent::start();
    let (mut p, idx) = driver(&agent);
    let a = num_field(&p.cmd("malloc 200000", T), "ptr");
    let sum = p.cmd(&format!("fill {a} 200000 5"), T);
    let r = p.cmd(&format!("reallocarray {a} {} 2", u64::MAX / 2 + 2), T);
    assert_eq!(num_field(&r, "ptr"), 0, "{r}");
    assert_eq!(num_field(&r, "errno"), libc::ENOMEM as u64, "{r}");
    assert_eq!(p.cmd(&format!("sum {a} 200000"), T), sum);
    let r = p.cmd(&format!("reallocarray {a} {} 16", u64::MAX / 8), T);
    assert_eq!(num_field(&r, "ptr"), 0, "{r}");
    // Events reach the agent asynchronously: a later block's registration is the barrier
    // after which a (wrong) removal of `a` would already have arrived.
    let b = num_field(&p.cmd("malloc 300000", T), "ptr");
    agent.wait_for("later block registered", T, |s| {
        s.clients[idx].region_containing(b)
    });
    assert!(agent.state().clients[idx].region_containing(a).is_some());
    assert_eq!(p.cmd(&format!("free {b}"), T), "ok");
    assert_eq!(p.cmd(&format!("free {a}"), T), "ok");
    assert!(p.finish(T).0.success());
}

#[test]
fn hook_malloc_usable_size_on_both_kinds_of_pointer() {
    let agent = HarnessAgent::start();
    let (mut p, _) = driver(&agent);
    for size in [1u64, 100, 65535, 65536, 65537, 1 << 20] {
        let r = p.cmd(&format!("malloc {size}"), T);
        let ptr = num_field(&r, "ptr");
        let usable = num_field(&r, "usable");
        assert!(usable >= size, "{r}");
        if size >= MIN_REGION {
            assert!(usable < size + 2 * page_size(), "{r}: usable too large");
        }
        // usable bytes are really usable.
        p.cmd(&format!("fill {ptr} {usable} 1"), T);
        assert_eq!(p.cmd(&format!("free {ptr}"), T), "ok");
    }
    assert!(p.finish(T).0.success());
}

#[test]
fn hook_mmap_munmap_mremap_events() {
    let agent = HarnessAgent::start();
    let (mut p, idx) = driver(&agent);
    let kib = 1024u64;
    let wait_view = |what: &str, want: &dyn Fn(&ksmplus_tests::agent::RegionMap) -> bool| {
        agent.wait_for(what, T, |s| want(&s.clients[idx].regions()).then_some(()))
    };
    let region = |m: &ksmplus_tests::agent::RegionMap, s: u64| m.get(&s).copied();

    let a = num_field(&p.cmd(&format!("mmap {}", 1024 * kib), T), "ptr");
    wait_view("mmap registered", &|m| {
        region(m, a) == Some((1024 * kib, Origin::Mmap))
    });
    let b = num_field(&p.cmd(&format!("mmap64 {}", 512 * kib), T), "ptr");
    wait_view("mmap64 registered", &|m| {
        region(m, b) == Some((512 * kib, Origin::Mmap))
    });
    // Below the threshold: not registered.
    let small = num_field(&p.cmd("mmap 16384", T), "ptr");

    // Partial munmap in the middle cuts the region in two.
    let r = p.cmd(&format!("munmap {} {}", a + 256 * kib, 128 * kib), T);
    assert_eq!(num_field(&r, "ret"), 0);
    wait_view("partial munmap split the region", &|m| {
        region(m, a) == Some((256 * kib, Origin::Mmap))
            && region(m, a + 384 * kib) == Some((640 * kib, Origin::Mmap))
    });
    // mremap the tail piece to 2 MiB (may move).
    let r = p.cmd(
        &format!("mremap {} {} {}", a + 384 * kib, 640 * kib, 2048 * kib),
        T,
    );
    let c = num_field(&r, "ptr");
    assert_ne!(c, 0, "{r}");
    p.cmd(&format!("fill {c} {} 1", 2048 * kib), T);
    wait_view("mremap resized the region", &|m| {
        region(m, c) == Some((2048 * kib, Origin::Mmap))
            && (c == a + 384 * kib || region(m, a + 384 * kib).is_none())
    });
    assert!(agent.state().clients[idx]
        .messages
        .iter()
        .any(|m| matches!(m, Message::RegionResized { .. })));
    for (ptr, len) in [
        (a, 256 * kib),
        (b, 512 * kib),
        (c, 2048 * kib),
        (small, 16384),
    ] {
        assert_eq!(
            num_field(&p.cmd(&format!("munmap {ptr} {len}"), T), "ret"),
            0
        );
    }
    wait_view("every mapping removed", &|m| {
        m.values().all(|&(_, o)| o != Origin::Mmap)
    });
    let c = &agent.state().clients[idx];
    let seqs = c.seqs();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs not increasing: {seqs:?}"
    );
    assert!(
        !c.messages.iter().any(|m| matches!(m,
            Message::RegionAdded { start, .. } if *start == small)),
        "a 16 KiB mmap was registered"
    );
    drop(p);
}

#[test]
fn stress_threads_mixed_allocations() {
    let agent = HarnessAgent::start();
    let prog = compile("shim_stress");
    let out = run(
        command(&prog, &on(&agent)).args(["16", "100000", "5"]),
        b"",
        Duration::from_secs(150),
    );
    let text = out.stdout_str();
    assert!(
        out.status.success(),
        "{text}\n{}",
        ksmplus_tests::process::tail(&out.stderr)
    );
    let rss: Vec<u64> = text
        .lines()
        .filter_map(|l| field(l, "rss_kib").map(ksmplus_tests::parse_num))
        .collect();
    assert_eq!(rss.len(), 5, "{text}");
    assert!(
        rss[4] <= rss[1] + rss[1] / 6 + 16 * 1024,
        "RSS grows across rounds (leak?): {rss:?} KiB"
    );
    assert!(text.contains("ok ops=1600000"), "{text}");
    eprintln!("stress: {:?} RSS per round {rss:?} KiB", out.elapsed);
    agent.wait_for("a Hello (was the shim loaded?)", T, |s| {
        s.clients.iter().any(|c| c.hello.is_some()).then_some(())
    });
}

#[test]
fn forks_and_execs_under_allocation_load_do_not_deadlock() {
    let agent = HarnessAgent::start();
    let prog = compile("shim_fork");
    let out = run(
        command(&prog, &on(&agent)).args(["1000", "3"]),
        b"",
        Duration::from_secs(120),
    );
    assert!(
        out.status.success() && out.stdout_str().contains("ok forks=1000"),
        "{}\n{}",
        out.stdout_str(),
        ksmplus_tests::process::tail(&out.stderr)
    );
    let st = agent.state();
    let parent = out_pid_children(&st);
    eprintln!("fork: {:?}; {parent} child clients said Hello", out.elapsed);
}

fn out_pid_children(st: &ksmplus_tests::AgentState) -> usize {
    st.clients
        .iter()
        .filter(|c| {
            c.hello
                .as_ref()
                .is_some_and(|h| h.comm.starts_with("shim_fork"))
        })
        .count()
}

/// Regression test for a registry race (fails with the shim as of this commit): `realloc` that
/// moves a shim block via `mremap(MREMAP_MAYMOVE)` lets the kernel reuse the old address at once,
/// but the old registry entry is removed only afterwards. Another thread's fresh block at that
/// address then sees a stale length from `malloc_usable_size` (here 128 KiB for a 132+ KiB
/// request), and the late `TABLE.remove(old)` may remove the *new* owner's entry instead, after
/// which its `free` goes to glibc with a pointer glibc never gave out.
#[test]
fn realloc_move_does_not_corrupt_other_threads_blocks() {
    let prog = compile("shim_realloc_race");
    let out = run(
        command(
            &prog,
            &ShimMode::On {
                socket: "/nonexistent/agent.sock".into(),
            },
        )
        .args(["8", "20000"]),
        b"",
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "{}{}",
        out.stdout_str(),
        ksmplus_tests::process::tail(&out.stderr)
    );
}
