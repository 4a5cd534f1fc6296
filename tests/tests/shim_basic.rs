//! The shim's allocator contract, end to end: the thesis program, every hook (its C contract,
//! and what the shim's channel page then says), fork children, a multi-threaded stress run and
//! forks under load.
//!
//! Needs `cargo build -p ksmplus-preload` first (see `ksmplus_tests::shim_lib`).
use ksmplus_common::channel::{flag, verdict, Snapshot};
use ksmplus_common::maps;
use ksmplus_tests::shim::{command, expected_comm};
use ksmplus_tests::{
    compile, field, num_field, page_size, procfs, run, HarnessAgent, Interactive, ShimChannel,
    ShimMode,
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

/// True if the agent, reading `pid`'s maps, would cover all of `[start, start+len)`.
fn covered(pid: u32, start: u64, len: u64) -> bool {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps::coverage(&maps::parse(&text), MIN_REGION, &[], &[], &[])
        .ranges
        .iter()
        .any(|&(s, e)| s <= start && start + len <= e)
}

#[test]
fn thesis_program_buffer_is_page_aligned_and_covered() {
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

    let h = agent.wait_hello(pid, T);
    let hello = h.hello;
    assert_eq!(h.peer.pid, pid);
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
    // The channel the Hello names is the one the anchor points at, with the same nonce.
    let ch = ShimChannel::wait(pid, T);
    assert_eq!(ch.addr, hello.channel);
    assert_eq!(ch.doorbell, hello.doorbell);
    let s = ch.wait_for("the harness's verdict", T, |s| {
        (s.verdict == verdict::TRACK).then(|| s.clone())
    });
    assert_eq!(s.nonce, hello.nonce);
    assert_eq!(s.ns_pid, pid);
    assert_eq!(s.parent_nonce, 0, "exec'd, not forked");
    assert!(s.blocks >= 1 && s.block_bytes >= size, "{s:?}");
    assert!(
        covered(pid, ptr, size),
        "the agent would not see the buffer"
    );

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

/// A `shim_driver` under the shim, its Hello answered, and its channel.
fn driver(agent: &HarnessAgent) -> (Interactive, ShimChannel) {
    let mut p = Interactive::spawn(&mut command(compile("shim_driver"), &on(agent)));
    let pid = num_field(&p.cmd("pid", T), "pid") as u32;
    assert_eq!(pid, p.pid());
    agent.wait_hello(pid, T);
    let ch = ShimChannel::wait(pid, T);
    ch.wait_for("verdict TRACK", T, |s| {
        (s.verdict == verdict::TRACK).then_some(())
    });
    (p, ch)
}

/// A harness agent and [`driver`] under it.
fn driven() -> (HarnessAgent, Interactive, ShimChannel) {
    let agent = HarnessAgent::start();
    let (p, ch) = driver(&agent);
    (agent, p, ch)
}

/// Allocates with `cmd` (a `shim_driver` command yielding `ptr=`), then checks: the pointer is
/// page-aligned, counted as a shim block of at least `size` bytes, covered by what the agent
/// reads of the maps, the content written is what `/proc/PID/mem` shows, and `free` gives the
/// block back (count and `map_gen`).
fn check_alloc_hook(cmd: &str, size: u64, align: u64) {
    let (_agent, mut p, ch) = driven();
    let before = ch.snapshot();
    let r = p.cmd(cmd, T);
    let ptr = num_field(&r, "ptr");
    assert_ne!(ptr, 0, "{cmd}: {r}");
    assert_eq!(ptr % align.max(page_size()), 0, "{cmd}: {r}");
    assert!(num_field(&r, "usable") >= size, "{cmd}: {r}");
    let after = ch.snapshot();
    assert_eq!(after.blocks, before.blocks + 1, "{cmd}");
    assert!(
        after.block_bytes >= before.block_bytes + size,
        "{cmd}: {} -> {}",
        before.block_bytes,
        after.block_bytes
    );
    assert!(
        after.map_gen > before.map_gen,
        "{cmd}: map_gen did not move"
    );
    assert!(covered(p.pid(), ptr, size), "{cmd}: not covered");
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
    let freed = ch.snapshot();
    assert_eq!(freed.blocks, before.blocks, "{cmd}: free");
    assert_eq!(freed.block_bytes, before.block_bytes, "{cmd}: free");
    let (status, _) = p.finish(T);
    assert!(status.success());
}

/// One test per allocation hook: `name: (driver command, size, alignment)`.
macro_rules! alloc_hook_tests {
    ($($name:ident: $args:expr,)*) => {
        $(
            #[test]
            fn $name() {
                let (cmd, size, align) = $args;
                check_alloc_hook(cmd, size, align);
            }
        )*
    };
}

alloc_hook_tests! {
    hook_malloc: ("malloc 100000", 100000, 1),
    hook_malloc_exactly_threshold: ("malloc 65536", 65536, 1),
    hook_calloc: ("calloc 300000", 300000, 1),
    hook_memalign: ("memalign 65536 100000", 100000, 65536),
    hook_aligned_alloc: ("aligned_alloc 2097152 4194304", 4194304, 2 << 20),
    hook_posix_memalign: ("posix_memalign 2097152 100000", 100000, 2 << 20),
    hook_valloc: ("valloc 100000", 100000, 1),
    // pvalloc rounds the size up to whole pages.
    hook_pvalloc: ("pvalloc 100001", 100001_u64.div_ceil(4096) * 4096, 1),
    hook_reallocarray_from_null: ("reallocarray 0 1000 100", 100000, 1),
    hook_realloc_from_null: ("realloc 0 100000", 100000, 1),
}

#[test]
fn hook_realloc_grow_shrink_keeps_content_and_records_the_move() {
    let (_agent, mut p, ch) = driven();
    let a = num_field(&p.cmd("malloc 100000", T), "ptr");
    p.cmd(&format!("fill {a} 100000 9"), T);
    let want = fill_pattern(100000, 9);
    let before = ch.snapshot();
    // grow: the block moves or grows in place (mremap), content kept, and the move is recorded
    // for the agent with its exact addresses.
    let r = p.cmd(&format!("realloc {a} 3000000"), T);
    let b = num_field(&r, "ptr");
    assert_eq!(b % page_size(), 0, "{r}");
    assert_eq!(procfs::read_mem(p.pid(), b, 100000), want);
    let s = ch.snapshot();
    assert_eq!(s.moves_head, before.moves_head + 1);
    let m = s.moves[((s.moves_head - 1) % 16) as usize];
    assert_eq!(
        m,
        (
            s.moves_head,
            a,
            100000u64.div_ceil(4096) * 4096,
            b,
            3000000u64.div_ceil(4096) * 4096
        )
    );
    assert_eq!(s.blocks, before.blocks);
    assert!(covered(p.pid(), b, 3000000));
    // shrink below the threshold: back to glibc, the block goes, the prefix stays.
    let r = p.cmd(&format!("realloc {b} 1000"), T);
    let c = num_field(&r, "ptr");
    assert_eq!(procfs::read_mem(p.pid(), c, 1000), want[..1000]);
    assert_eq!(ch.snapshot().blocks, before.blocks - 1);
    assert_eq!(p.cmd(&format!("free {c}"), T), "ok");
    assert!(p.finish(T).0.success());
}

/// realloc grows a block without moving it and without a system call when a cached freed
/// piece follows it (as glibc grows into the free space after a chunk), copies into a cached
/// piece that fits when none follows, and grows in place with a fresh mapping when the
/// address space after the block is free. Content is kept every time.
#[test]
fn hook_realloc_grows_into_cached_pieces_and_free_space() {
    let (_agent, mut p, ch) = driven();
    let ps = page_size();
    let round = |n: u64| n.div_ceil(ps) * ps;

    // 1. A freed 1 MiB block is cached; a 100 000-byte block is cut from its start, and the
    //    rest stays cached right after it: growing to 600 000 bytes takes that rest in place.
    let x = num_field(&p.cmd("malloc 1048576", T), "ptr");
    assert_eq!(p.cmd(&format!("free {x}"), T), "ok");
    assert_eq!(ch.snapshot().cache_bytes, 1 << 20);
    let a = num_field(&p.cmd("malloc 100000", T), "ptr");
    assert_eq!(a, x, "cut from the start of the cached piece");
    p.cmd(&format!("fill {a} 100000 3"), T);
    let want = fill_pattern(100000, 3);
    let moves = ch.snapshot().moves_head;
    let r = p.cmd(&format!("realloc {a} 600000"), T);
    assert_eq!(num_field(&r, "ptr"), a, "grown in place: {r}");
    assert!(num_field(&r, "usable") >= 600000, "{r}");
    assert_eq!(procfs::read_mem(p.pid(), a, 100000), want);
    let s = ch.snapshot();
    assert_eq!(s.cache_bytes, (1 << 20) - round(600000));
    assert_eq!(s.moves_head, moves, "nothing moved");
    assert!(covered(p.pid(), a, 600000));

    // 2. A block with no cached piece after it copies into a cached piece that fits.
    let b = num_field(&p.cmd("malloc 100000", T), "ptr");
    p.cmd(&format!("fill {b} 100000 5"), T);
    let want_b = fill_pattern(100000, 5);
    let y = num_field(&p.cmd("malloc 2097152", T), "ptr");
    assert_eq!(p.cmd(&format!("free {y}"), T), "ok");
    let r = p.cmd(&format!("realloc {b} 1000000"), T);
    let b2 = num_field(&r, "ptr");
    assert_ne!(b2, b, "{r}");
    assert!(
        (y..y + (2 << 20)).contains(&b2),
        "served from the cached 2 MiB piece at {y:#x}: {r}"
    );
    assert_eq!(procfs::read_mem(p.pid(), b2, 100000), want_b);

    // 3. Free address space after a block: a fresh mapping there, the block stays put. The
    //    block comes from calloc (never from the cache) just below a raw mapping (the kernel
    //    places new mappings top-down), which is then unmapped; no cached piece holds 3 MB.
    //    Gaps higher up are filled first: blocks are taken until one lands below the hole.
    let hole = num_field(&p.cmd("mmap 4194304", T), "ptr");
    let mut fillers = Vec::new();
    let c = loop {
        let c = num_field(&p.cmd("calloc 100000", T), "ptr");
        if c + round(100000) == hole {
            break c;
        }
        fillers.push(c);
        assert!(
            fillers.len() < 10_000,
            "no block ever landed below {hole:#x}"
        );
    };
    assert!(p
        .cmd(&format!("munmap {hole} 4194304"), T)
        .starts_with("ret=0"));
    p.cmd(&format!("fill {c} 100000 7"), T);
    let r = p.cmd(&format!("realloc {c} 3000000"), T);
    assert_eq!(num_field(&r, "ptr"), c, "grown in place into the hole: {r}");
    assert_eq!(
        procfs::read_mem(p.pid(), c, 100000),
        fill_pattern(100000, 7)
    );
    assert!(covered(p.pid(), c, 3000000));
    assert_eq!(ch.snapshot().moves_head, moves, "nothing moved");
    for f in fillers {
        assert_eq!(p.cmd(&format!("free {f}"), T), "ok");
    }
    assert!(p.finish(T).0.success());
}

#[test]
fn hook_reallocarray_overflow_is_enomem_and_keeps_block() {
    let (_agent, mut p, ch) = driven();
    let a = num_field(&p.cmd("malloc 200000", T), "ptr");
    let blocks = ch.snapshot().blocks;
    let sum = p.cmd(&format!("fill {a} 200000 5"), T);
    let r = p.cmd(&format!("reallocarray {a} {} 2", u64::MAX / 2 + 2), T);
    assert_eq!(num_field(&r, "ptr"), 0, "{r}");
    assert_eq!(num_field(&r, "errno"), libc::ENOMEM as u64, "{r}");
    assert_eq!(p.cmd(&format!("sum {a} 200000"), T), sum);
    let r = p.cmd(&format!("reallocarray {a} {} 16", u64::MAX / 8), T);
    assert_eq!(num_field(&r, "ptr"), 0, "{r}");
    assert_eq!(
        ch.snapshot().blocks,
        blocks,
        "the block is still a shim block"
    );
    assert_eq!(
        num_field(&p.cmd(&format!("usable {a}"), T), "usable"),
        200000u64.div_ceil(4096) * 4096
    );
    assert_eq!(p.cmd(&format!("free {a}"), T), "ok");
    assert_eq!(ch.snapshot().blocks, blocks - 1);
    assert!(p.finish(T).0.success());
}

#[test]
fn hook_malloc_usable_size_on_both_kinds_of_pointer() {
    let (_agent, mut p, _) = driven();
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

/// mmap, munmap and mremap each move `map_gen` (so the agent re-reads the maps), and an mremap
/// is recorded with its addresses; what the maps then show is what the agent covers.
#[test]
fn hook_mmap_munmap_mremap_bump_map_gen_and_record_moves() {
    let (_agent, mut p, ch) = driven();
    let pid = p.pid();
    let kib = 1024u64;
    let gen = |ch: &ShimChannel| ch.snapshot().map_gen;
    let g0 = gen(&ch);
    let a = num_field(&p.cmd(&format!("mmap {}", 1024 * kib), T), "ptr");
    let g1 = gen(&ch);
    assert!(g1 > g0, "mmap");
    assert!(covered(pid, a, 1024 * kib));
    let b = num_field(&p.cmd(&format!("mmap64 {}", 512 * kib), T), "ptr");
    let g2 = gen(&ch);
    assert!(g2 > g1, "mmap64");
    assert!(covered(pid, b, 512 * kib));
    let r = p.cmd(&format!("munmap {} {}", a + 256 * kib, 128 * kib), T);
    assert_eq!(num_field(&r, "ret"), 0);
    let g3 = gen(&ch);
    assert!(g3 > g2, "munmap");
    assert!(covered(pid, a, 256 * kib) && covered(pid, a + 384 * kib, 640 * kib));
    assert!(!covered(pid, a + 256 * kib, 128 * kib));
    let before = ch.snapshot().moves_head;
    let r = p.cmd(
        &format!("mremap {} {} {}", a + 384 * kib, 640 * kib, 2048 * kib),
        T,
    );
    let c = num_field(&r, "ptr");
    assert_ne!(c, 0, "{r}");
    let s = ch.snapshot();
    assert!(s.map_gen > g3, "mremap");
    assert_eq!(s.moves_head, before + 1);
    assert_eq!(
        s.moves[(before % 16) as usize],
        (before + 1, a + 384 * kib, 640 * kib, c, 2048 * kib)
    );
    p.cmd(&format!("fill {c} {} 1", 2048 * kib), T);
    assert!(covered(pid, c, 2048 * kib));
    for (ptr, len) in [(a, 256 * kib), (b, 512 * kib), (c, 2048 * kib)] {
        assert_eq!(
            num_field(&p.cmd(&format!("munmap {ptr} {len}"), T), "ret"),
            0
        );
    }
    assert!(!covered(pid, c, 2048 * kib));
    drop(p);
}

/// A forked child — by fork() or by a raw clone that runs no atfork handler — gets its own
/// channel at the same address (wiped on fork, re-initialised by its first hook): a new nonce,
/// its parent's as `parent_nonce`, the fork flag, and one ring of the family doorbell. It says
/// no Hello (it may be sandboxed): the agent finds it through the doorbell.
fn fork_child_gets_its_own_channel(how: &str) {
    let agent = HarnessAgent::start();
    let prog = compile("shim_forkchild");
    let mut p = Interactive::spawn(command(&prog, &on(&agent)).arg(how));
    let parent = num_field(&p.line(T), "pid") as u32;
    let pch = ShimChannel::wait(parent, T);
    let pnonce = pch.snapshot().nonce;
    let line = p.line(T);
    let child = num_field(&line, "pid") as u32;
    assert_ne!(child, parent, "{line}");
    let cch = ShimChannel::wait(child, T);
    assert_eq!(cch.addr, pch.addr, "fork keeps addresses");
    assert_eq!(cch.doorbell, pch.doorbell);
    let s: Snapshot = cch.snapshot();
    assert_ne!(s.nonce, pnonce);
    assert_eq!(s.parent_nonce, pnonce);
    assert_eq!(s.ns_pid, child);
    assert!(s.flags & flag::FORK_CHILD != 0);
    assert_eq!(
        s.verdict,
        verdict::PENDING,
        "the agent decides, not the parent's verdict"
    );
    assert_eq!(
        s.blocks,
        pch.snapshot().blocks + 1,
        "its own block counted on its page"
    );
    assert_eq!(pch.rings(), 1, "one ring of the shared doorbell");
    // The parent's Hello is in (a barrier: the harness records asynchronously), the child's not.
    agent.wait_hello(parent, T);
    assert!(agent.state().hellos_of(child).is_empty());
    assert_eq!(agent.state().hellos.len(), 1);
    let (status, rest) = p.finish(T);
    assert!(status.success());
    assert_eq!(rest, ["done status=0"]);
}

#[test]
fn fork_child_gets_its_own_channel_fork() {
    fork_child_gets_its_own_channel("fork");
}

#[test]
fn fork_child_gets_its_own_channel_raw_clone() {
    fork_child_gets_its_own_channel("clone");
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
        (!s.hellos.is_empty()).then_some(())
    });
}

/// 1000 forks under allocation load, every 10th exec'ing /bin/true: no deadlock, and exactly
/// the exec'd children say Hello (the others ring the doorbell instead).
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
    let count = |comm: &str| {
        agent
            .state()
            .hellos
            .iter()
            .filter(|h| h.hello.comm == comm)
            .count()
    };
    agent.wait_for("100 Hellos from the exec'd children", T, |s| {
        (s.hellos.iter().filter(|h| h.hello.comm == "true").count() == 100).then_some(())
    });
    assert_eq!(
        count(&expected_comm(&prog)),
        1,
        "only the parent; fork children do not say Hello"
    );
    assert!(
        agent.state().errors.is_empty(),
        "{:?}",
        agent.state().errors
    );
}

/// Regression test for a registry race: `realloc` that moves a shim block via
/// `mremap(MREMAP_MAYMOVE)` lets the kernel reuse the old address at once, but the old registry
/// entry used to be removed only afterwards. Another thread's fresh block at that address then
/// saw a stale length from `malloc_usable_size`, and the late removal could remove the *new*
/// owner's entry instead.
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
