//! Developer workflows that are not a plain cargo command: installing prerequisites, running the demo, the test
//! suite (including the privileged end-to-end tests) and benchmarks.

fn main() {}
