//! The `phalanx` command line: parses flags and hands work to the library crates.
//! Nothing here computes, moves bytes or keeps state.

fn main() {}
