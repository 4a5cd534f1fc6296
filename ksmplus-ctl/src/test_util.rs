//! What the unit tests of several modules share.

/// A 4 KiB page filled with `pattern`, repeated.
pub fn page_of(pattern: &[u8]) -> Vec<u8> {
    pattern.iter().copied().cycle().take(4096).collect()
}

/// Panics naming the first of `want` that is not one of `have` (`context` is shown with it).
pub fn assert_has_each(have: &[&str], want: &[&str], context: &str) {
    for w in want {
        assert!(have.contains(w), "{w} missing:\n{context}");
    }
}
