//! Counters of things that happen, as opposed to the state the health report
//! describes: tasks that ended (by action and final state), how long each
//! task step took, failed NVML queries, and what the transport and the task
//! verifier refused (counted in `ringfence::refusals`, read at scrape time).
//!
//! The counters are process-wide: the hooks are single calls from the task
//! engine and the NVML backend, which know nothing of a registry.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use ringfence::pb::{self, TaskState};

use crate::tasks::is_terminal;

/// Upper bounds (seconds) of the step duration buckets: from a hook that
/// returns at once to a driver install or a drain that waits for jobs.
const STEP_BUCKETS: [f64; 14] = [
    0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
];

/// The actions a task can carry (`TaskStatus.action`).
const ACTIONS: [&str; 5] = ["drain", "patch", "validate", "undrain", "ack_faults"];
/// The final states, as label values.
const FINAL_STATES: [TaskState; 3] = [
    TaskState::Succeeded,
    TaskState::Failed,
    TaskState::Interrupted,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    action: String,
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    action: String,
    step: String,
}

fn step_histogram() -> Histogram {
    Histogram::new(STEP_BUCKETS)
}

type StepFamily = Family<StepLabels, Histogram, fn() -> Histogram>;

#[derive(Debug)]
struct Events {
    tasks: Family<TaskLabels, Counter>,
    steps: StepFamily,
    nvml_failures: Counter,
    /// The step each unfinished task is in, and since when.
    current: Mutex<HashMap<String, (String, Instant)>>,
}

static EVENTS: LazyLock<Events> = LazyLock::new(|| {
    let tasks = Family::<TaskLabels, Counter>::default();
    // Every action and final state from zero, so that a first failure is
    // an increase and the series exist before anything ran.
    for action in ACTIONS {
        for state in FINAL_STATES {
            drop(tasks.get_or_create(&TaskLabels {
                action: action.to_owned(),
                state: state_label(state),
            }));
        }
    }
    Events {
        tasks,
        steps: StepFamily::new_with_constructor(step_histogram),
        nvml_failures: Counter::default(),
        current: Mutex::new(HashMap::new()),
    }
});

/// `TASK_STATE_SUCCEEDED` -> `succeeded`.
fn state_label(state: TaskState) -> String {
    state
        .as_str_name()
        .trim_start_matches("TASK_STATE_")
        .to_ascii_lowercase()
}

/// Hook: a task status was journalled. A change of step ends the previous
/// step (its duration is observed); a final state ends the task (counted by
/// action and state); AWAITING_REBOOT / AWAITING_RESTART end the step, as
/// the process is about to go away.
pub fn task_status(status: &pb::TaskStatus) {
    let ev = &*EVENTS;
    let state = status.state();
    let ends = is_terminal(state)
        || matches!(
            state,
            TaskState::AwaitingReboot | TaskState::AwaitingRestart
        );
    let now = Instant::now();
    let mut current = ev
        .current
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let previous = current.get(&status.task_id).cloned();
    if let Some((step, since)) = &previous
        && (ends || *step != status.step)
    {
        ev.steps
            .get_or_create(&StepLabels {
                action: status.action.clone(),
                step: step.clone(),
            })
            .observe(now.duration_since(*since).as_secs_f64());
    }
    if ends {
        current.remove(&status.task_id);
    } else if previous
        .as_ref()
        .is_none_or(|(step, _)| *step != status.step)
    {
        current.insert(status.task_id.clone(), (status.step.clone(), now));
    }
    drop(current);
    if is_terminal(state) {
        ev.tasks
            .get_or_create(&TaskLabels {
                action: status.action.clone(),
                state: state_label(state),
            })
            .inc();
    }
}

/// Hook: `n` NVML queries failed in one collection.
pub fn nvml_query_failures(n: usize) {
    if n > 0 {
        EVENTS.nvml_failures.inc_by(n as u64);
    }
}

/// Register the event counters and the refusal counts in `registry`.
pub(super) fn register(registry: &mut Registry) {
    let ev = &*EVENTS;
    registry.register(
        "ringfence_tasks",
        "Tasks that reached a final state, by action and state",
        ev.tasks.clone(),
    );
    registry.register_with_unit(
        "ringfence_task_step_duration",
        "How long task steps took, by action and step",
        Unit::Seconds,
        ev.steps.clone(),
    );
    registry.register(
        "ringfence_nvml_query_failures",
        "NVML queries that failed with an error other than NotSupported (a failed NVML load counts one per collection)",
        ev.nvml_failures.clone(),
    );
    registry.register_collector(Box::new(Refusals));
}

/// `ringfence::refusals` as series.
#[derive(Debug)]
struct Refusals;

impl Collector for Refusals {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut m = encoder.encode_descriptor(
            "ringfence_task_rejections",
            "Signed tasks rejected, by the name of the check they failed (a security signal).",
            None,
            MetricType::Counter,
        )?;
        for (check, n) in ringfence::refusals::task_rejections() {
            ConstCounter::new(n).encode(m.encode_family(&[("check", check)])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "ringfence_tls_handshake_failures",
            "TLS handshakes of the gRPC and metrics listeners that failed, by reason.",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in ringfence::refusals::handshake_failures() {
            ConstCounter::new(n).encode(m.encode_family(&[("reason", reason.as_str())])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(task: &str, action: &str, step: &str, state: TaskState) -> pb::TaskStatus {
        let mut s = pb::TaskStatus {
            task_id: task.into(),
            action: action.into(),
            step: step.into(),
            ..Default::default()
        };
        s.set_state(state);
        s
    }

    fn steps(action: &str, step: &str) -> u64 {
        EVENTS
            .steps
            .get(&StepLabels {
                action: action.into(),
                step: step.into(),
            })
            .map_or(0, |h| h.count())
    }

    fn tasks(action: &str, state: &str) -> u64 {
        EVENTS
            .tasks
            .get(&TaskLabels {
                action: action.into(),
                state: state.into(),
            })
            .map_or(0, |c| c.get())
    }

    /// Labels unique to this test: the counters are process-wide.
    #[test]
    fn steps_are_timed_on_change_and_tasks_counted_at_their_end() {
        let (a, t) = ("test-action-1", "test-task-1");
        task_status(&status(t, a, "hook", TaskState::Running));
        task_status(&status(t, a, "hook", TaskState::Running));
        assert_eq!(steps(a, "hook"), 0, "same step again is not an end");
        task_status(&status(t, a, "wait", TaskState::Running));
        assert_eq!(steps(a, "hook"), 1);
        assert_eq!(tasks(a, "failed"), 0);
        task_status(&status(t, a, "wait", TaskState::Failed));
        assert_eq!(steps(a, "wait"), 1, "the last step ends with the task");
        assert_eq!(tasks(a, "failed"), 1);
        // A final status read again (recovery) counts no step.
        task_status(&status(t, a, "wait", TaskState::Failed));
        assert_eq!(steps(a, "wait"), 1);
        assert_eq!(tasks(a, "failed"), 2);
    }

    #[test]
    fn awaiting_a_reboot_ends_the_step_but_not_the_task() {
        let (a, t) = ("test-action-2", "test-task-2");
        task_status(&status(t, a, "command", TaskState::Running));
        task_status(&status(t, a, "command", TaskState::AwaitingReboot));
        assert_eq!(steps(a, "command"), 1);
        for s in ["succeeded", "failed", "interrupted"] {
            assert_eq!(tasks(a, s), 0);
        }
    }

    #[test]
    fn every_action_and_final_state_starts_at_zero() {
        for action in ACTIONS {
            for state in ["succeeded", "failed", "interrupted"] {
                let labels = TaskLabels {
                    action: action.into(),
                    state: state.into(),
                };
                assert!(EVENTS.tasks.get(&labels).is_some(), "{action}/{state}");
            }
        }
    }
}
