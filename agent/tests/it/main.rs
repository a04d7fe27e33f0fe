//! The agent's integration tests as one binary (one link of the agent,
//! tonic, redb and NVML instead of one per file). Test names are
//! `module::test`:
//! - `agent_process`: the real `ringfenced` binary as a child process;
//! - `metrics_prometheus`: the `/metrics` endpoint scraped by a real Prometheus;
//! - `slurm`: the shipped Slurm hooks against a real slurmctld/slurmd/munge;
//! - `scheduler_examples`: README's scheduler examples (Python gRPC clients);
//! - `health_*`, `nvml_backend`: verdict rules, the simulated and NVML backends;
//! - `tasks_*`: the task engine (drain, patch, validate, journal, crash
//!   recovery, logging, sd_notify, profile policy).
//!
//! Shared helpers: `nvml_common` (the fake NVML library), `proc_common`
//! (agent processes), `tasks_common` (an engine over a temp dir).
// A failed fixture step is a failed test: test code unwraps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod nvml_common;
mod proc_common;
mod tasks_common;

mod agent_process;
mod health_evaluate;
mod health_sim;
mod metrics_prometheus;
mod nvml_backend;
mod scheduler_examples;
mod slurm;
mod tasks_crash;
mod tasks_drain;
mod tasks_journal;
mod tasks_logging;
mod tasks_notify;
mod tasks_patch;
mod tasks_policy;
