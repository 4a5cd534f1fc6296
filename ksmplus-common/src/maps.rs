//! `/proc/PID/maps`: the one parser, and which mappings ksmplus covers.
//!
//! Covered: every private mapping where anonymous pages can live — the brk heap, glibc's
//! arenas, the shim's own blocks, whatever other allocators map (mozjemalloc chunks,
//! PartitionAlloc super pages, JavaScript heaps, also when read-only), and the copy-on-write
//! pages of writable file mappings (`.data`, `.bss`) — coalesced where they touch, in ranges of
//! at least `min_len` bytes. Left out, each with a [`Skip`] reason that `ksmplusctl status`
//! shows: stacks (`[stack]`, and the mappings holding a thread's stack pointer — a guard-page
//! heuristic mistakes allocators' guarded pools for stacks), the shim's own pages, and pieces
//! smaller than `min_len`. Shared mappings and PROT_NONE reservations hold nothing KSM can merge.
//!
//! Pure functions over text; reading the file is the caller's business.

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapLine<'a> {
    pub start: u64,
    pub end: u64,
    pub perms: &'a str,
    pub inode: u64,
    pub name: &'a str,
}

impl MapLine<'_> {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
    /// Private and not backed by a file (anonymous, `[heap]`, `[anon:...]`, `[stack]`).
    pub fn is_private_anon(&self) -> bool {
        self.perms.ends_with('p')
            && self.inode == 0
            && (self.name.is_empty() || self.name.starts_with('['))
            && !matches!(
                self.name,
                "[vvar]" | "[vdso]" | "[vsyscall]" | "[vvar_vclock]"
            )
    }

    /// Where KSM can find anonymous pages to merge: a private mapping that is readable and
    /// either anonymous (written or read-only after initialisation, like a JIT's read-only
    /// heap) or a writable file mapping (its copy-on-write pages: `.data`, `.bss`).
    pub fn may_hold_anon_pages(&self) -> bool {
        self.perms.starts_with('r')
            && self.perms.ends_with('p')
            && (self.is_private_anon() || self.perms.as_bytes()[1] == b'w')
            && !matches!(
                self.name,
                "[vvar]" | "[vdso]" | "[vsyscall]" | "[vvar_vclock]"
            )
    }
}

/// Parses the text of a maps file; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MapLine<'_>> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(l: &str) -> Option<MapLine<'_>> {
    let mut f = l.splitn(6, ' ');
    let range = f.next()?;
    let perms = f.next()?;
    let _offset = f.next()?;
    let _dev = f.next()?;
    let inode = f.next()?.parse().ok()?;
    let name = f.next().unwrap_or("").trim_start();
    let (a, b) = range.split_once('-')?;
    let (start, end) = (
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    );
    (end >= start && perms.len() == 4).then_some(MapLine {
        start,
        end,
        perms,
        inode,
        name,
    })
}

/// Why a private anonymous writable mapping is not covered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Skip {
    /// `[stack]` or a thread stack (the mapping holding a thread's stack pointer).
    Stack,
    /// The shim's own memory (its `.bss`: registry, cache bookkeeping; its channel page).
    Shim,
    /// A piece smaller than the region threshold.
    Small,
    /// A freed block the shim keeps for reuse: garbage until a program allocation reuses it.
    Cache,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Stack => "stack",
            Skip::Shim => "shim",
            Skip::Small => "small",
            Skip::Cache => "cache",
        }
    }
}

/// The result of classifying a maps file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Covered ranges `(start, end)`, sorted, coalesced, each ≥ `min_len`.
    pub ranges: Vec<(u64, u64)>,
    /// Left-out private anonymous writable ranges with their reason, in address order.
    pub skipped: Vec<(u64, u64, Skip)>,
}

/// True for a mapping of the shim library itself (its file name).
fn is_shim_file(m: &MapLine) -> bool {
    m.inode != 0
        && m.name
            .rsplit('/')
            .next()
            .is_some_and(|b| b.starts_with("libksmplus"))
}

/// Classifies the mappings of `lines` that may hold anonymous pages (see the module doc).
/// `own` are extra ranges to treat as the shim's (its channel page); `stacks` are addresses
/// known to be inside a thread's stack (its stack pointer): the mappings holding them are
/// stacks. Ranges in `cache` (the shim's freed blocks) are cut out of what is covered.
pub fn coverage(
    lines: &[MapLine],
    min_len: u64,
    own: &[(u64, u64)],
    stacks: &[u64],
    cache: &[(u64, u64)],
) -> Coverage {
    let mut cov = Coverage::default();
    // Candidate pieces before coalescing: (start, end).
    let mut pieces: Vec<(u64, u64)> = Vec::new();
    for (i, m) in lines.iter().enumerate() {
        if !m.may_hold_anon_pages() || m.is_empty() {
            continue;
        }
        let prev = i.checked_sub(1).map(|j| &lines[j]);
        let touches = |p: &&MapLine| p.end == m.start;
        let thread_stack =
            m.is_private_anon() && stacks.iter().any(|&sp| m.start <= sp && sp < m.end);
        let skip = if m.name == "[stack]" || m.name.starts_with("[stack:") || thread_stack {
            Some(Skip::Stack)
        } else if is_shim_file(m)
            || (m.is_private_anon() && prev.filter(touches).is_some_and(is_shim_file))
            || own.iter().any(|&(s, e)| s < m.end && e > m.start)
        {
            Some(Skip::Shim)
        } else {
            None
        };
        match skip {
            Some(s) => cov.skipped.push((m.start, m.end, s)),
            None => match pieces.last_mut() {
                Some(last) if last.1 == m.start => last.1 = m.end,
                _ => pieces.push((m.start, m.end)),
            },
        }
    }
    let mut cache: Vec<(u64, u64)> = cache
        .iter()
        .filter(|&&(_, l)| l > 0)
        .map(|&(a, l)| (a, a.saturating_add(l)))
        .collect();
    cache.sort_unstable();
    for (s, e) in pieces {
        // Cut the cached pieces out.
        let mut cur = s;
        for &(cs, ce) in cache.iter().filter(|&&(cs, ce)| cs < e && ce > s) {
            if cs > cur {
                keep(&mut cov, cur, cs, min_len);
            }
            cov.skipped.push((cs.max(s), ce.min(e), Skip::Cache));
            cur = cur.max(ce);
        }
        if cur < e {
            keep(&mut cov, cur, e, min_len);
        }
    }
    cov.skipped.sort_unstable();
    cov
}

fn keep(cov: &mut Coverage, s: u64, e: u64, min_len: u64) {
    if e - s >= min_len {
        cov.ranges.push((s, e));
    } else {
        cov.skipped.push((s, e, Skip::Small));
    }
}

/// The writable mappings of the shim library's file (where its `.data` and anchor are).
pub fn shim_data(lines: &[MapLine]) -> Vec<(u64, u64)> {
    lines
        .iter()
        .filter(|m| is_shim_file(m) && m.perms.starts_with("rw"))
        .map(|m| (m.start, m.end))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0000000-55d0c0001000 r--p 00000000 fe:00 247030                     /usr/bin/prog
55d0c1000000-55d0c1400000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000010000 ---p 00000000 00:00 0 
7f0000010000-7f0000810000 rw-p 00000000 00:00 0 
7f1000000000-7f1000200000 rw-p 00000000 00:00 0 
7f1000200000-7f1000400000 rw-p 00000000 00:00 0 
7f1000400000-7f1004000000 ---p 00000000 00:00 0 
7f2000000000-7f2000100000 rw-s 00000000 00:01 1234                       /dev/shm/x
7f3000000000-7f3000200000 rw-p 00000000 00:00 0                          [anon:glyphs]
7f4000000000-7f4000001000 rw-p 00000000 00:00 0 
7f5000000000-7f5000010000 r-xp 00000000 fe:00 999                        /opt/k/libksmplus.so
7f5000010000-7f5000012000 rw-p 00010000 fe:00 999                        /opt/k/libksmplus.so
7f5000012000-7f5000200000 rw-p 00000000 00:00 0 
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn covers_anonymous_memory_and_says_why_not_the_rest() {
        let l = parse(MAPS);
        assert_eq!(l.len(), 15);
        assert_eq!(l[1].name, "[heap]");
        let c = coverage(&l, 64 * 1024, &[], &[0x7f0000010100], &[]);
        assert_eq!(
            c.ranges,
            vec![
                (0x55d0c1000000, 0x55d0c1400000), // heap
                (0x7f1000000000, 0x7f1000400000), // two touching VMAs, one range
                (0x7f3000000000, 0x7f3000200000), // named anonymous memory
            ]
        );
        let why: Vec<_> = c.skipped.iter().map(|s| s.2).collect();
        assert_eq!(
            why,
            vec![
                Skip::Stack,
                Skip::Small,
                Skip::Shim,
                Skip::Shim,
                Skip::Stack
            ],
            "{:x?}",
            c.skipped
        );
        assert_eq!(shim_data(&l), vec![(0x7f5000010000, 0x7f5000012000)]);
        let c = coverage(&l, 64 * 1024, &[(0x7f3000100000, 0x7f3000101000)], &[], &[]);
        assert!(!c.ranges.contains(&(0x7f3000000000, 0x7f3000200000)));
        // A cached freed block inside the heap is cut out.
        let c = coverage(&l, 64 * 1024, &[], &[], &[(0x55d0c1100000, 0x100000)]);
        assert!(c.ranges.contains(&(0x55d0c1000000, 0x55d0c1100000)));
        assert!(c.ranges.contains(&(0x55d0c1200000, 0x55d0c1400000)));
        assert!(c
            .skipped
            .contains(&(0x55d0c1100000, 0x55d0c1200000, Skip::Cache)));
    }

    #[test]
    fn a_guarded_pool_is_not_a_stack_unless_a_thread_runs_on_it() {
        let m = "\
7f0000000000-7f0000002000 ---p 00000000 00:00 0 
7f0000002000-7f0000200000 rw-p 00000000 00:00 0 
";
        let l = parse(m);
        assert_eq!(coverage(&l, 64 * 1024, &[], &[], &[]).ranges.len(), 1);
        let c = coverage(&l, 64 * 1024, &[], &[0x7f00001fff00], &[]);
        assert!(c.ranges.is_empty());
        assert_eq!(c.skipped[0].2, Skip::Stack);
    }

    #[test]
    fn read_only_anonymous_and_file_copy_on_write_pages_are_covered() {
        let m = "\
1000000-1100000 r--p 00000000 00:00 0 
2000000-2100000 rw-p 00010000 fe:00 77                         /usr/lib/libx.so
2100000-2200000 rw-p 00000000 00:00 0 
3000000-3100000 r--p 00000000 fe:00 77                         /usr/lib/libx.so
4000000-4100000 rw-s 00000000 00:01 9                          /dev/zero (deleted)
5000000-6000000 ---p 00000000 00:00 0 
";
        let c = coverage(&parse(m), 64 * 1024, &[], &[], &[]);
        assert_eq!(
            c.ranges,
            vec![(0x1000000, 0x1100000), (0x2000000, 0x2200000)]
        );
        assert!(c.skipped.is_empty());
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let l = parse("zzz\n1000-2000 rw-p 0 0 notanumber\n3000-2000 rw-p 0 00:00 0\n");
        assert!(l.is_empty());
    }
}
