//! The operator's files as the commands read them: settings, trust file,
//! TLS identity, inventory, wave spec, keys, approval files; and the mTLS
//! connector built from them. Every failure here is an [`InputError`]
//! (exit 3: fix the file or the flag).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ringfence::config::{ConfigError, Source};
use ringfence::keys::KeyError;
use ringfence::pb;
use ringfence::time::{Clock, SystemClock};
use ringfence::tls::{ClientIdentity, TlsError};
use ringfence::trust::{TrustError, TrustSet};

use crate::approvals::{self, ApprovalError};
use crate::inventory::Inventory;
use crate::settings::Settings;
use crate::spec::WaveSpec;
use crate::wave::TlsConnector;

/// An operator file (or a flag naming one) is unusable.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The coordinator settings (`--config`).
    #[error(transparent)]
    Settings(ConfigError),
    /// The trust file.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// The operator's TLS certificate, key, CA bundle or CRL.
    #[error(transparent)]
    Identity(#[from] TlsError),
    /// The inventory.
    #[error(transparent)]
    Inventory(ConfigError),
    /// A wave spec (a file, or the text stored with a wave).
    #[error(transparent)]
    Spec(ConfigError),
    /// A signing key (the coordinator's or an approver's).
    #[error(transparent)]
    Key(#[from] KeyError),
    /// An approval or break-glass file could not be read.
    #[error(transparent)]
    Approval(#[from] ApprovalError),
    /// A signed file holds a payload that does not decode.
    #[error("{}: {source}", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// Why the payload does not decode.
        source: prost::DecodeError,
    },
    /// `--trust` is needed: no settings name a trust file.
    #[error("no trust file: pass --trust")]
    NoTrustFile,
}

/// Load the settings from `--config` or the default paths.
pub fn settings(config: Option<&Path>) -> Result<Settings, InputError> {
    Settings::load(config).map_err(InputError::Settings)
}

/// Load an inventory file.
pub fn inventory(path: &Path) -> Result<Inventory, InputError> {
    Inventory::load(path).map_err(InputError::Inventory)
}

/// Load a trust file.
pub fn trust(path: &Path) -> Result<TrustSet, InputError> {
    Ok(TrustSet::load(path)?)
}

/// Parse a wave spec file; the spec and its text (stored with the wave).
pub fn spec(path: &Path) -> Result<(WaveSpec, String), InputError> {
    let src = Source::read(path).map_err(InputError::Spec)?;
    let spec = WaveSpec::from_source(&src).map_err(InputError::Spec)?;
    Ok((spec, src.text))
}

/// Read a signed approval or break-glass file and decode its payload.
pub fn signed_file<M: prost::Message + Default>(
    path: &Path,
) -> Result<(pb::Envelope, M), InputError> {
    let env = approvals::read_file(path)?;
    let msg = M::decode(env.payload.as_slice()).map_err(|source| InputError::Decode {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((env, msg))
}

/// The `ringfence` command's wall clock: the one place the CLI builds its
/// [`SystemClock`]. Commands read "now" from it (approval and break-glass
/// stamps, halt requests, attestation ages) and hand it to the wave engine
/// and the wave store.
pub(crate) fn clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// What every command that talks to agents needs: settings, the trust
/// file they name, and the operator's TLS identity.
pub struct Env {
    /// The coordinator settings.
    pub settings: Settings,
    /// The trust file named by the settings.
    pub trust: TrustSet,
    /// The operator's client identity.
    pub identity: ClientIdentity,
}

impl Env {
    /// Load settings, trust file and TLS identity.
    pub fn load(config: Option<&Path>) -> Result<Self, InputError> {
        let settings = settings(config)?;
        let trust = trust(&settings.trust_file)?;
        let identity = settings.tls.client_identity()?;
        Ok(Self {
            settings,
            trust,
            identity,
        })
    }

    /// An mTLS connector to the inventory's agents.
    pub fn connector(&self, inv: &Inventory) -> TlsConnector {
        TlsConnector {
            identity: self.identity.clone(),
            trust_domain: inv.trust_domain.clone(),
            connect_timeout: self.settings.timeouts.connect(),
            rpc_timeout: self.settings.timeouts.rpc(),
        }
    }

    /// The trust policy's `max_clock_skew_s` in ms: the clock difference
    /// with the agents the coordinator tolerates, as the agents do.
    pub fn skew_ms(&self) -> i64 {
        i64::try_from(self.trust.policy.max_clock_skew_s)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000)
    }
}
