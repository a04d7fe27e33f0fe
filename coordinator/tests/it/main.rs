//! The coordinator's integration tests as one binary (one link of the
//! coordinator, the agent, tonic and redb instead of one per file). Test
//! names are `module::test`:
//! - `plan_sequencer`, `approvals`, `wave_engine`, `evidence`: the
//!   sequencer, approvals, one host's run and whole waves, and evidence
//!   packets against simulated hosts;
//! - `fleet_inprocess`, `cli_operator`, most of `soak`: real agents in this
//!   process over mTLS;
//! - `fleet_processes`, `governance` and one `soak` test: fleets of real
//!   `ringfenced` processes and the `ringfence` binary, helpers in `common`;
//!   `metrics_prometheus` scrapes such a wave with the real Prometheus;
//! - `quickstart`: README's "Your first real wave", run verbatim.
// A failed fixture step is a failed test: test code unwraps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod approvals;
mod cli_operator;
mod etcd_waves;
mod evidence;
mod fleet_inprocess;
mod fleet_processes;
mod governance;
mod hostile_hosts;
mod hung_hosts;
mod metrics_prometheus;
mod operator_week;
mod plan_sequencer;
mod quickstart;
mod soak;
mod store_backends;
mod wave_engine;
