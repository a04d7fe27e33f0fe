//! The benchmark's integration tests as one binary: the bench binary end to
//! end with tiny windows (`smoke`) and the scale run on 200 simulated hosts
//! (`scale_smoke`). Test names are `module::test`.
// A failed fixture step is a failed test: test code unwraps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod scale_smoke;
mod smoke;
