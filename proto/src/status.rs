//! The one place where library errors become gRPC statuses. Every rejected
//! task is answered with a status whose message names the failed check, and
//! with the check's name in the `ringfence-check` metadata key.

use tonic::{Code, Status};

use crate::envelope::TaskRejection;

/// Metadata key carrying the failed check's stable name.
pub const CHECK_METADATA_KEY: &str = "ringfence-check";

/// The gRPC code for a rejected task.
pub fn task_rejection_code(r: &TaskRejection) -> Code {
    use TaskRejection as R;
    match r {
        R::Oversized { .. } => Code::ResourceExhausted,
        R::Malformed { .. } | R::WrongPayloadType { .. } => Code::InvalidArgument,
        R::Unsigned { .. }
        | R::BadSignature { .. }
        | R::UnknownKey { .. }
        | R::RevokedKey { .. }
        | R::NoCoordinatorSignature { .. }
        | R::ApprovalWrongType { .. }
        | R::CoordinatorKeyAsApprover { .. }
        | R::ApprovalScope { .. }
        | R::ApprovalLifetime { .. }
        | R::ApprovalExpired { .. }
        | R::ApprovalThreshold { .. }
        | R::WrongHost { .. }
        | R::WrongRing { .. } => Code::PermissionDenied,
        R::NotYetValid { .. }
        | R::Expired { .. }
        | R::LifetimeTooLong { .. }
        | R::SequenceNotIncreasing { .. }
        | R::SequenceJump { .. }
        | R::BeforeJournal { .. } => Code::FailedPrecondition,
        R::ActionRefused { .. } => Code::InvalidArgument,
        R::Journal { .. } => Code::Internal,
    }
}

/// A rejected task as a gRPC status: ``task rejected by check `<name>`: <reason>``.
pub fn task_rejection(r: &TaskRejection) -> Status {
    let mut status = Status::new(
        task_rejection_code(r),
        format!("task rejected by check `{}`: {r}", r.check()),
    );
    if let Ok(v) = r.check().parse() {
        status.metadata_mut().insert(CHECK_METADATA_KEY, v);
    }
    status
}

/// The failed check named in a status returned by an agent, if any.
pub fn rejected_check(status: &Status) -> Option<String> {
    status
        .metadata()
        .get(CHECK_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

impl From<TaskRejection> for Status {
    fn from(r: TaskRejection) -> Self {
        task_rejection(&r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_the_check() {
        let s = task_rejection(&TaskRejection::SequenceNotIncreasing {
            sequence: 3,
            high_water: 5,
        });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("check `sequence`"), "{}", s.message());
        assert_eq!(rejected_check(&s).as_deref(), Some("sequence"));
    }
}
