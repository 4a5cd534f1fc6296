//! The client thread's view of the process's registered regions: non-overlapping ranges with
//! their origin, updated from ring events with range semantics (a partial munmap cuts a region).
//!
//! Pure data structure; owned by the client thread under the state lock (see `client.rs`).

use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: usize,
    pub len: usize,
    pub origin: u8,
}

impl Region {
    pub fn end(&self) -> usize {
        self.start + self.len
    }
}

#[derive(Default, Debug)]
pub struct View {
    map: BTreeMap<usize, (usize, u8)>,
    bytes: usize,
}

impl View {
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn iter(&self) -> impl Iterator<Item = Region> + '_ {
        self.map
            .iter()
            .map(|(&start, &(len, origin))| Region { start, len, origin })
    }

    /// Adds a region, replacing whatever overlapped it.
    pub fn add(&mut self, start: usize, len: usize, origin: u8) {
        if len == 0 {
            return;
        }
        self.remove(start, len);
        self.map.insert(start, (len, origin));
        self.bytes += len;
    }

    /// Removes `[start, start+len)` from every region it overlaps. True if anything was removed.
    pub fn remove(&mut self, start: usize, len: usize) -> bool {
        let end = start.saturating_add(len);
        let hits: Vec<Region> = self
            .map
            .range(..end)
            .rev()
            .map(|(&s, &(l, o))| Region {
                start: s,
                len: l,
                origin: o,
            })
            .take_while(|r| r.end() > start)
            .collect();
        for r in &hits {
            self.map.remove(&r.start);
            self.bytes -= r.len;
            if r.start < start {
                self.map.insert(r.start, (start - r.start, r.origin));
                self.bytes += start - r.start;
            }
            if r.end() > end {
                self.map.insert(end, (r.end() - end, r.origin));
                self.bytes += r.end() - end;
            }
        }
        !hits.is_empty()
    }

    /// An mremap: a region that started at `old` moves/resizes as a whole. Returns the region's
    /// origin if it was known; otherwise only the old range is forgotten.
    pub fn resize(&mut self, old: usize, old_len: usize, new: usize, new_len: usize) -> Option<u8> {
        match self.map.get(&old) {
            Some(&(len, origin)) if len <= old_len || old_len == 0 => {
                self.remove(old, len);
                self.add(new, new_len, origin);
                Some(origin)
            }
            _ => {
                self.remove(old, old_len);
                None
            }
        }
    }

    /// The region that contains all of `[start, start+len)`, if one does.
    pub fn containing(&self, start: usize, len: usize) -> Option<Region> {
        let (&s, &(l, o)) = self.map.range(..=start).next_back()?;
        (start.checked_add(len)? <= s + l).then_some(Region {
            start: s,
            len: l,
            origin: o,
        })
    }

    /// Keeps only the regions for which `f` is true.
    pub fn retain(&mut self, mut f: impl FnMut(&Region) -> bool) {
        let mut bytes = 0;
        self.map.retain(|&start, &mut (len, origin)| {
            let keep = f(&Region { start, len, origin });
            if keep {
                bytes += len;
            }
            keep
        });
        self.bytes = bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const P: usize = 4096;

    #[test]
    fn add_remove_split_resize() {
        let mut v = View::default();
        v.add(10 * P, 10 * P, 1);
        v.add(30 * P, 5 * P, 0);
        assert_eq!(v.bytes(), 15 * P);
        assert!(v.containing(12 * P, 3 * P).is_some());
        assert!(v.containing(19 * P, 2 * P).is_none());
        // Cut a hole in the middle.
        assert!(v.remove(13 * P, 2 * P));
        let r: Vec<_> = v.iter().map(|r| (r.start / P, r.len / P)).collect();
        assert_eq!(r, vec![(10, 3), (15, 5), (30, 5)]);
        assert_eq!(v.bytes(), 13 * P);
        assert!(!v.remove(50 * P, P));
        // Resize a whole region.
        assert_eq!(v.resize(30 * P, 5 * P, 40 * P, 8 * P), Some(0));
        assert!(v.containing(40 * P, 8 * P).is_some());
        assert!(v.containing(30 * P, P).is_none());
        // An unknown resize forgets the old range only.
        assert_eq!(v.resize(16 * P, P, 60 * P, 2 * P), None);
        let r: Vec<_> = v.iter().map(|r| (r.start / P, r.len / P)).collect();
        assert_eq!(r, vec![(10, 3), (15, 1), (17, 3), (40, 8)]);
        // Adding over an overlap replaces it.
        v.add(9 * P, 20 * P, 2);
        let r: Vec<_> = v
            .iter()
            .map(|r| (r.start / P, r.len / P, r.origin))
            .collect();
        assert_eq!(r, vec![(9, 20, 2), (40, 8, 0)]);
        assert_eq!(v.bytes(), 28 * P);
        v.retain(|r| r.origin == 0);
        assert_eq!((v.len(), v.bytes()), (1, 8 * P));
    }
}
