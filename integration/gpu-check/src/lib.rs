//! The real-GPU check kit (`integration/gpu-check`): compares what
//! `ringfenced health --once --json` reports with what nvidia-smi says on the
//! same host, turns a captured report into a fake-NVML scenario (so that a
//! real GPU becomes a test fixture), replays a scenario through the agent's
//! real NVML backend on the fake library, and times NVML against nvidia-smi.
//! `run.sh` beside this crate drives all of it on a GPU machine.
#![warn(missing_docs)]

pub mod compare;
pub mod convert;
pub mod render;
pub mod replay;
pub mod smi;
pub mod timing;
