//! `kvh`: the kvhygiene command line.
fn main() {}
