//! Coverage of the whole anonymous address space: which parts of `/proc/self/maps` the shim
//! registers with origin `Maps` (memory that never passed through a hook: the brk heap, glibc's
//! thread arenas, allocators of toolkits, JITs and browsers).
//!
//! Pure functions over the text of `/proc/self/maps`; the client thread does the reading.
//! Kept out: shared and file mappings, non-writable ones (guards), `[stack]`, thread stacks
//! (a writable mapping right above a small PROT_NONE guard, as glibc lays them out), the
//! kernel's special mappings, and anything smaller than the region threshold.

use crate::view::Region;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapLine<'a> {
    pub start: usize,
    pub end: usize,
    pub perms: &'a str,
    pub inode: &'a str,
    pub name: &'a str,
}

/// Parses `/proc/self/maps`; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MapLine<'_>> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(6, ' ');
            let range = f.next()?;
            let perms = f.next()?;
            let _offset = f.next()?;
            let _dev = f.next()?;
            let inode = f.next()?;
            let name = f.next().unwrap_or("").trim_start();
            let (a, b) = range.split_once('-')?;
            Some(MapLine {
                start: usize::from_str_radix(a, 16).ok()?,
                end: usize::from_str_radix(b, 16).ok()?,
                perms,
                inode,
                name,
            })
        })
        .collect()
}

/// Private anonymous writable mapping (any name but the special ones).
pub fn is_private_anon_rw(m: &MapLine) -> bool {
    m.perms.starts_with("rw")
        && m.perms.ends_with('p')
        && m.inode == "0"
        && (m.name.is_empty() || m.name == "[heap]" || m.name.starts_with("[anon:"))
}

/// Largest PROT_NONE guard that marks a thread stack right above it.
const MAX_GUARD: usize = 1 << 20;

/// The `[start, end)` ranges the shim should cover with origin `Maps`: every private anonymous
/// writable mapping that is not a stack, minus what `registered` (sorted, non-overlapping
/// regions of other origins) already covers, in pieces of at least `min_len` bytes. Mappings
/// that contain one of the `own` addresses (the shim's own `.bss`) are left out.
pub fn candidates(
    lines: &[MapLine],
    registered: &[Region],
    min_len: usize,
    own: &[usize],
) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (i, m) in lines.iter().enumerate() {
        if !is_private_anon_rw(m)
            || m.name.contains("stack")
            || own.iter().any(|&a| (m.start..m.end).contains(&a))
        {
            continue;
        }
        let after_guard = i > 0 && {
            let p = &lines[i - 1];
            p.end == m.start && p.perms.starts_with("---") && p.end - p.start <= MAX_GUARD
        };
        if after_guard && m.name != "[heap]" {
            continue;
        }
        // Subtract the registered regions overlapping [m.start, m.end).
        let mut cur = m.start;
        let first = registered.partition_point(|r| r.end() <= m.start);
        for r in registered[first..].iter().take_while(|r| r.start < m.end) {
            if r.start > cur && r.start - cur >= min_len {
                out.push((cur, r.start));
            }
            cur = cur.max(r.end());
        }
        if m.end > cur && m.end - cur >= min_len {
            out.push((cur, m.end));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0000000-55d0c0001000 r--p 00000000 fe:00 247030                     /usr/bin/prog
55d0c1000000-55d0c1400000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000010000 ---p 00000000 00:00 0 
7f0000010000-7f0000810000 rw-p 00000000 00:00 0 
7f1000000000-7f1000400000 rw-p 00000000 00:00 0 
7f1000400000-7f1004000000 ---p 00000000 00:00 0 
7f2000000000-7f2000100000 rw-s 00000000 00:01 1234                       /dev/shm/x
7f3000000000-7f3000200000 rw-p 00000000 00:00 0                          [anon:glyphs]
7f4000000000-7f4000001000 rw-p 00000000 00:00 0 
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_and_picks_anonymous_non_stack() {
        let l = parse(MAPS);
        assert_eq!(l.len(), 11);
        assert_eq!(l[1].name, "[heap]");
        let c = candidates(&l, &[], 64 * 1024, &[0x7f4000000010]);
        assert_eq!(
            c,
            vec![
                (0x55d0c1000000, 0x55d0c1400000), // heap
                (0x7f1000000000, 0x7f1000400000), // an arena (its PROT_NONE tail follows it)
                (0x7f3000000000, 0x7f3000200000), // named anonymous memory
            ],
            "thread stack above a guard, shared, tiny and [stack] mappings are left out"
        );
        let c = candidates(&l, &[], 64 * 1024, &[0x7f3000000100]);
        assert_eq!(
            c.len(),
            2,
            "a mapping holding the shim's own statics is left out"
        );
    }

    #[test]
    fn registered_regions_are_subtracted() {
        let l = parse(MAPS);
        let reg = [
            Region {
                start: 0x7f1000100000,
                len: 0x100000,
                origin: 0,
            },
            Region {
                start: 0x7f10003f0000,
                len: 0x10000,
                origin: 1,
            },
        ];
        let c = candidates(&l, &reg, 64 * 1024, &[]);
        assert!(c.contains(&(0x7f1000000000, 0x7f1000100000)));
        assert!(c.contains(&(0x7f1000200000, 0x7f10003f0000)));
        assert!(!c
            .iter()
            .any(|&(s, e)| s < 0x7f1000200000 && e > 0x7f1000100000));
    }
}
