//! The `steer` command line.
mod plot;
fn main() {}
