//! Placeholder; the shim micro-benchmark lands in the next commit.
fn main() {}
