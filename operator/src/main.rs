//! The cluster operator (filled by the operator issue).
fn main() {}
