//! What a page's content looks like: all-zero, all-0xff, periodic (smallest period ≤ 64 bytes)
//! or other — the scan's top list shows it next to each repeated content.

/// The longest period the classifier looks for, in bytes.
pub const MAX_PERIOD: usize = 64;
/// Bytes of a periodic pattern kept for display.
pub const PATTERN_HEAD: usize = 16;

/// What a page's content looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Every byte 0x00.
    Zero,
    /// Every byte 0xff.
    Ones,
    /// The page repeats a pattern of `period` bytes (the smallest such period, 1..=64); `head`
    /// holds its first `min(period, 16)` bytes.
    Periodic {
        period: u8,
        head: [u8; PATTERN_HEAD],
    },
    /// Anything else.
    Other,
}

impl Class {
    /// Short name: `all-zero`, `all-0xff`, `periodic`, `other`.
    pub fn kind(&self) -> &'static str {
        match self {
            Class::Zero => "all-zero",
            Class::Ones => "all-0xff",
            Class::Periodic { .. } => "periodic",
            Class::Other => "other",
        }
    }

    /// The period in bytes (1 for all-zero and all-0xff), if periodic at all.
    pub fn period(&self) -> Option<usize> {
        match self {
            Class::Zero | Class::Ones => Some(1),
            Class::Periodic { period, .. } => Some(*period as usize),
            Class::Other => None,
        }
    }

    /// The repeating pattern in upper-case hex (`FFFFFF00`), `…` when longer than 16 bytes.
    pub fn pattern_hex(&self) -> Option<String> {
        match self {
            Class::Zero => Some("00".into()),
            Class::Ones => Some("FF".into()),
            Class::Periodic { period, head } => {
                let n = (*period as usize).min(PATTERN_HEAD);
                let mut s: String = head[..n].iter().map(|b| format!("{b:02X}")).collect();
                if *period as usize > PATTERN_HEAD {
                    s.push('…');
                }
                Some(s)
            }
            Class::Other => None,
        }
    }

    /// Human-readable: `all-zero`, `all-0xff`, `periodic 4 B: FFFFFF00`, `other`.
    pub fn describe(&self) -> String {
        match self {
            Class::Periodic { period, .. } => {
                format!(
                    "periodic {period} B: {}",
                    self.pattern_hex().unwrap_or_default()
                )
            }
            c => c.kind().into(),
        }
    }
}

/// Classifies one page: all-zero, all-0xff, periodic with the smallest period ≤ 64 bytes, other.
pub fn classify(page: &[u8]) -> Class {
    if page.is_empty() {
        return Class::Other;
    }
    for period in 1..=MAX_PERIOD.min(page.len() / 2) {
        // Period p: every byte equals the byte p before it.
        if page[period..] == page[..page.len() - period] {
            if period == 1 && page[0] == 0 {
                return Class::Zero;
            }
            if period == 1 && page[0] == 0xff {
                return Class::Ones;
            }
            let mut head = [0u8; PATTERN_HEAD];
            let n = period.min(PATTERN_HEAD);
            head[..n].copy_from_slice(&page[..n]);
            return Class::Periodic {
                period: period as u8,
                head,
            };
        }
    }
    Class::Other
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::page_of;

    #[test]
    fn zero_and_ones() {
        assert_eq!(classify(&[0u8; 4096]), Class::Zero);
        assert_eq!(classify(&[0xffu8; 4096]), Class::Ones);
        assert_eq!(Class::Zero.period(), Some(1));
    }

    #[test]
    fn periodic_smallest_period() {
        let c = classify(&page_of(&[0xff, 0xff, 0xff, 0x00]));
        assert_eq!(c.period(), Some(4));
        assert_eq!(c.pattern_hex().unwrap(), "FFFFFF00");
        assert_eq!(c.describe(), "periodic 4 B: FFFFFF00");
        // A pattern of 8 that is really two copies of 4 is period 4.
        let c = classify(&page_of(&[1, 2, 3, 4, 1, 2, 3, 4]));
        assert_eq!(c.period(), Some(4));
        // A single non-zero byte repeated.
        assert_eq!(classify(&page_of(&[0x41])).period(), Some(1));
        assert_eq!(classify(&page_of(&[0x41])).kind(), "periodic");
        // A period not dividing the page size still counts.
        assert_eq!(classify(&page_of(&[7, 8, 9])).period(), Some(3));
    }

    #[test]
    fn long_periods_and_limit() {
        let pat: Vec<u8> = (0..64u8).collect();
        let c = classify(&page_of(&pat));
        assert_eq!(c.period(), Some(64));
        assert!(c.pattern_hex().unwrap().ends_with('…'));
        assert!(c.pattern_hex().unwrap().starts_with("000102030405"));
        let pat: Vec<u8> = (0..65u8).collect();
        assert_eq!(classify(&page_of(&pat)), Class::Other);
    }

    #[test]
    fn other() {
        let mut p = vec![0u8; 4096];
        p[4095] = 1;
        assert_eq!(classify(&p), Class::Other);
        let mut p = page_of(&[0xff, 0xff, 0xff, 0x00]);
        p[100] ^= 1;
        assert_eq!(classify(&p), Class::Other);
        assert_eq!(classify(&[]), Class::Other);
    }
}
