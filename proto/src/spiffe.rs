//! SPIFFE identities and the roles they carry.
//!
//! Every certificate in a ringfence fleet has exactly one URI SAN of the form
//! `spiffe://<trust-domain>/<role>/<name>`, where role is `host` (an agent),
//! `ops` (an operator or coordinator) or `scheduler` (reads health only).

use std::fmt;

/// What a peer is allowed to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A GPU host running ringfenced.
    Host,
    /// An operator or the coordinator: may submit tasks.
    Ops,
    /// A scheduler: may read health, never submit tasks.
    Scheduler,
}

impl Role {
    /// The path segment naming this role.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Ops => "ops",
            Role::Scheduler => "scheduler",
        }
    }

    /// Parse a role segment.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "host" => Some(Role::Host),
            "ops" => Some(Role::Ops),
            "scheduler" => Some(Role::Scheduler),
            _ => None,
        }
    }

    /// Whether this role may call the gRPC method at `path`
    /// (e.g. `/ringfence.v1.Agent/SubmitTask`). Unknown paths are denied.
    pub fn may_call(self, path: &str) -> bool {
        const READ: &[&str] = &[
            "/ringfence.v1.Agent/GetIdentity",
            "/ringfence.v1.Agent/GetHealth",
            "/ringfence.v1.Agent/WatchHealth",
            "/ringfence.v1.Agent/Attest",
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
        ];
        match self {
            Role::Ops => {
                path.starts_with("/ringfence.v1.Agent/")
                    || path.starts_with("/grpc.health.v1.Health/")
            }
            Role::Scheduler => READ.contains(&path),
            Role::Host => path == "/ringfence.v1.Agent/GetIdentity",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed `spiffe://<trust-domain>/<role>/<name>` id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    /// The trust domain, e.g. `gpu.example.com`.
    pub trust_domain: String,
    /// The role segment.
    pub role: Role,
    /// The name segment: host id, operator or scheduler name.
    pub name: String,
}

/// A URI is not a ringfence SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{uri}` is not a ringfence SPIFFE id (spiffe://<trust-domain>/<host|ops|scheduler>/<name>): {reason}"
)]
pub struct SpiffeError {
    /// The offending URI.
    pub uri: String,
    /// What is wrong with it.
    pub reason: String,
}

impl SpiffeId {
    /// Build an id.
    pub fn new(trust_domain: &str, role: Role, name: &str) -> Result<Self, SpiffeError> {
        let id = Self {
            trust_domain: trust_domain.to_string(),
            role,
            name: name.to_string(),
        };
        Self::parse(&id.to_string())
    }

    /// Parse and validate a URI.
    pub fn parse(uri: &str) -> Result<Self, SpiffeError> {
        let err = |reason: &str| SpiffeError {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("scheme must be spiffe://"))?;
        let mut parts = rest.split('/');
        let td = parts.next().unwrap_or("");
        let role = parts.next().ok_or_else(|| err("missing role"))?;
        let name = parts.next().ok_or_else(|| err("missing name"))?;
        if parts.next().is_some() {
            return Err(err("too many path segments"));
        }
        if td.is_empty()
            || !td.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-' || c == '_'
            })
        {
            return Err(err(
                "trust domain must be lowercase letters, digits, '.', '-', '_'",
            ));
        }
        let role = Role::parse(role).ok_or_else(|| err("role must be host, ops or scheduler"))?;
        if !valid_name(name) {
            return Err(err("name must be 1-253 of [A-Za-z0-9._-]"));
        }
        Ok(Self {
            trust_domain: td.to_string(),
            role,
            name: name.to_string(),
        })
    }
}

/// Whether `name` may be a host id or principal name: 1-253 of `[A-Za-z0-9._-]`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/{}/{}",
            self.trust_domain, self.role, self.name
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id = SpiffeId::parse("spiffe://gpu.example/host/gpu-001").unwrap();
        assert_eq!(id.role, Role::Host);
        assert_eq!(id.name, "gpu-001");
        assert_eq!(id.to_string(), "spiffe://gpu.example/host/gpu-001");
    }

    #[test]
    fn rejects_bad_ids() {
        for bad in [
            "https://gpu.example/host/a",
            "spiffe://gpu.example/admin/a",
            "spiffe://gpu.example/host",
            "spiffe://gpu.example/host/a/b",
            "spiffe:///host/a",
            "spiffe://GPU/host/a",
            "spiffe://gpu.example/host/a b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scheduler_reads_but_never_submits() {
        assert!(Role::Scheduler.may_call("/ringfence.v1.Agent/GetHealth"));
        assert!(!Role::Scheduler.may_call("/ringfence.v1.Agent/SubmitTask"));
        assert!(!Role::Scheduler.may_call("/ringfence.v1.Agent/ListTasks"));
        assert!(Role::Ops.may_call("/ringfence.v1.Agent/SubmitTask"));
        assert!(!Role::Host.may_call("/ringfence.v1.Agent/GetHealth"));
        assert!(!Role::Ops.may_call("/other.Service/Do"));
    }
}
