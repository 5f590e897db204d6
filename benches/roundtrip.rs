//! Round-trip benchmarks (filled in below).
fn main() {}
