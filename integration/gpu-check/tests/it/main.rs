//! The kit's one integration-test binary: the comparator on the nvidia-smi
//! samples, the report → scenario round trip, and run.sh end to end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod nvml_common;
mod roundtrip;
mod run_script;
mod samples;
