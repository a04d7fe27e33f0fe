//! The fleet inventory (TOML): pools with their capacity reserve, and hosts
//! with address, pool, ring, enrolled attestation key and GPU count.
//!
//! ```toml
//! trust_domain = "gpu.example.com"        # SPIFFE trust domain of the fleet
//!
//! [[pool]]
//! name = "h100-train"
//! reserve_percent = 15                    # optional: default 15, or 20 when early_launch
//! early_launch = false
//!
//! [[host]]
//! id = "gpu-0001"
//! address = "10.0.0.11:7443"              # host:port the agent listens on
//! pool = "h100-train"
//! ring = 2                                # 0 internal, 1 UAT, 2 canary, 3 broad, 4 sensitive
//! attestation_key = "ed25519:BASE64..."   # optional until `ringfence inventory enroll`
//! expected_gpus = 8
//! ```
//! Errors name the file, line and key: duplicate host ids, unknown pool,
//! ring outside 0–4, bad address, bad or weak key, reserve outside 0–50%.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use ringfence::config::{ConfigError, Source};
use ringfence::keys::{self, VerifyingKey};
use serde::Deserialize;
use toml::Spanned;

/// Default capacity reserve, percent of a pool.
pub const DEFAULT_RESERVE_PERCENT: u32 = 15;
/// Default reserve of pools marked `early_launch`.
pub const EARLY_LAUNCH_RESERVE_PERCENT: u32 = 20;
/// Highest reserve accepted.
pub const MAX_RESERVE_PERCENT: u32 = 50;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: Spanned<String>,
    #[serde(default)]
    reserve_percent: Option<Spanned<u32>>,
    #[serde(default)]
    early_launch: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    id: Spanned<String>,
    address: Spanned<String>,
    pool: Spanned<String>,
    ring: Spanned<i64>,
    #[serde(default)]
    attestation_key: Option<Spanned<String>>,
    #[serde(default = "default_gpus")]
    expected_gpus: u32,
}

fn default_gpus() -> u32 {
    8
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    trust_domain: Spanned<String>,
    #[serde(default, rename = "pool")]
    pools: Vec<RawPool>,
    #[serde(default, rename = "host")]
    hosts: Vec<RawHost>,
}

/// A pool of interchangeable hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Pool name.
    pub name: String,
    /// Most of the pool that may be out of service at once, percent.
    pub reserve_percent: u32,
    /// Early-launch pools default to a larger reserve.
    pub early_launch: bool,
}

/// One GPU host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Host id (the name in its certificate).
    pub id: String,
    /// `host:port` of its agent.
    pub address: String,
    /// Pool name.
    pub pool: String,
    /// Ring 0-4.
    pub ring: u32,
    /// Enrolled attestation key, if any.
    pub attestation_key: Option<VerifyingKey>,
    /// GPUs it must have.
    pub expected_gpus: u32,
}

/// The validated inventory.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Pools by name.
    pub pools: BTreeMap<String, Pool>,
    /// Hosts, in file order.
    pub hosts: Vec<Host>,
}

/// What an agent says about its own ring (`GetIdentity`), against the
/// inventory. Agents decide their ring from their local config; a host
/// whose agent disagrees with the inventory is refused by `wave run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingFinding {
    /// The agent is configured in the inventory's ring.
    Agrees(u32),
    /// The agent is configured in another ring.
    Mismatch {
        /// The inventory's ring.
        inventory: u32,
        /// The agent's own ring.
        agent: u32,
    },
    /// The agent has no ring configured (it treats itself as protected).
    NotConfigured {
        /// The inventory's ring.
        inventory: u32,
    },
}

impl RingFinding {
    /// Whether `wave run` refuses to start over this host.
    pub fn blocks_wave(&self) -> bool {
        !matches!(self, Self::Agrees(_))
    }
}

/// What `wave run` / `wave resume` say when agents' own rings block the
/// wave: `hosts` are `host: finding` lines.
pub fn ring_mismatch_message(wave: &str, inventory: &Path, hosts: &[String]) -> String {
    format!(
        "wave {wave} refused: the inventory's ring differs from the agent's own ring for {} host(s):\n{}\nagents decide their ring from their own agent.toml; fix the inventory or the agents (check with `ringfence inventory check --live {}`)",
        hosts.len(),
        hosts
            .iter()
            .map(|h| format!("  {h}"))
            .collect::<Vec<_>>()
            .join("\n"),
        inventory.display()
    )
}

impl std::fmt::Display for RingFinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Agrees(r) => write!(f, "ring {r}, as the agent says"),
            Self::Mismatch { inventory, agent } => write!(
                f,
                "RING MISMATCH: inventory ring {inventory}, agent configured in ring {agent}"
            ),
            Self::NotConfigured { inventory } => write!(
                f,
                "NO RING CONFIGURED on the agent (it treats itself as protected); inventory ring {inventory}: set `ring = {inventory}` in its agent.toml"
            ),
        }
    }
}

impl Host {
    /// Compare the inventory's ring with the ring the agent reports.
    pub fn ring_finding(&self, agent_ring: Option<u32>) -> RingFinding {
        match agent_ring {
            Some(a) if a == self.ring => RingFinding::Agrees(a),
            Some(a) => RingFinding::Mismatch {
                inventory: self.ring,
                agent: a,
            },
            None => RingFinding::NotConfigured {
                inventory: self.ring,
            },
        }
    }
}

/// Summary printed by `ringfence inventory check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Hosts per ring.
    pub per_ring: BTreeMap<u32, usize>,
    /// Hosts per pool.
    pub per_pool: BTreeMap<String, usize>,
    /// Hosts without an enrolled key.
    pub unenrolled: Vec<String>,
}

impl Inventory {
    /// Load and validate an inventory file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_source(&Source::read(path)?)
    }

    /// Validate inventory text.
    pub fn from_source(src: &Source) -> Result<Self, ConfigError> {
        let raw: RawInventory = src.parse()?;
        let td = raw.trust_domain.get_ref();
        if ringfence::spiffe::SpiffeId::new(td, ringfence::spiffe::Role::Ops, "x").is_err() {
            return Err(src.invalid(
                raw.trust_domain.span(),
                "trust_domain",
                format!("`{td}` is not a valid SPIFFE trust domain"),
            ));
        }
        let mut pools = BTreeMap::new();
        for p in raw.pools {
            let name = p.name.get_ref().clone();
            if name.is_empty() {
                return Err(src.invalid(p.name.span(), "pool.name", "empty pool name"));
            }
            let reserve_percent = match &p.reserve_percent {
                Some(r) if *r.get_ref() > MAX_RESERVE_PERCENT => {
                    return Err(src.invalid(
                        r.span(),
                        "pool.reserve_percent",
                        format!("{}% is outside 0-{MAX_RESERVE_PERCENT}%", r.get_ref()),
                    ));
                }
                Some(r) => *r.get_ref(),
                None if p.early_launch => EARLY_LAUNCH_RESERVE_PERCENT,
                None => DEFAULT_RESERVE_PERCENT,
            };
            if pools
                .insert(
                    name.clone(),
                    Pool {
                        name: name.clone(),
                        reserve_percent,
                        early_launch: p.early_launch,
                    },
                )
                .is_some()
            {
                return Err(src.invalid(
                    p.name.span(),
                    "pool.name",
                    format!("pool `{name}` is defined twice"),
                ));
            }
        }
        let mut seen = HashSet::new();
        let mut hosts = Vec::new();
        for h in raw.hosts {
            let id = h.id.get_ref().clone();
            if !ringfence::spiffe::valid_name(&id) {
                return Err(src.invalid(
                    h.id.span(),
                    "host.id",
                    format!("`{id}` is not a valid host id (1-253 of [A-Za-z0-9._-])"),
                ));
            }
            if !seen.insert(id.clone()) {
                return Err(src.invalid(
                    h.id.span(),
                    "host.id",
                    format!("duplicate host id `{id}`"),
                ));
            }
            if !pools.contains_key(h.pool.get_ref()) {
                return Err(src.invalid(
                    h.pool.span(),
                    "host.pool",
                    format!(
                        "unknown pool `{}` (pools: {})",
                        h.pool.get_ref(),
                        pools.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            let ring = *h.ring.get_ref();
            if !(0..=4).contains(&ring) {
                return Err(src.invalid(
                    h.ring.span(),
                    "host.ring",
                    format!("ring {ring} is outside 0-4"),
                ));
            }
            check_address(h.address.get_ref())
                .map_err(|m| src.invalid(h.address.span(), "host.address", m))?;
            let attestation_key =
                match &h.attestation_key {
                    Some(k) => Some(keys::parse_public_key(k.get_ref()).map_err(|e| {
                        src.invalid(k.span(), "host.attestation_key", e.to_string())
                    })?),
                    None => None,
                };
            hosts.push(Host {
                id,
                address: h.address.into_inner(),
                pool: h.pool.into_inner(),
                ring: u32::try_from(ring).unwrap_or(0),
                attestation_key,
                expected_gpus: h.expected_gpus,
            });
        }
        Ok(Self {
            path: src.path.clone(),
            trust_domain: raw.trust_domain.into_inner(),
            pools,
            hosts,
        })
    }

    /// A host by id.
    pub fn host(&self, id: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.id == id)
    }

    /// Counts for `inventory check`.
    pub fn summary(&self) -> Summary {
        let mut s = Summary {
            per_ring: BTreeMap::new(),
            per_pool: BTreeMap::new(),
            unenrolled: Vec::new(),
        };
        for h in &self.hosts {
            *s.per_ring.entry(h.ring).or_default() += 1;
            *s.per_pool.entry(h.pool.clone()).or_default() += 1;
            if h.attestation_key.is_none() {
                s.unenrolled.push(h.id.clone());
            }
        }
        s
    }

    /// Enrolled keys by host id.
    pub fn enrolled_keys(&self) -> BTreeMap<String, VerifyingKey> {
        self.hosts
            .iter()
            .filter_map(|h| h.attestation_key.map(|k| (h.id.clone(), k)))
            .collect()
    }

    /// Hosts that share one attestation key, in groups of two or more (a
    /// cloned image: one host's key would sign for the others, so `inventory
    /// check` and `inventory enroll` refuse them).
    pub fn shared_keys(&self) -> Vec<Vec<String>> {
        let mut by_key: BTreeMap<[u8; 32], Vec<String>> = BTreeMap::new();
        for h in &self.hosts {
            if let Some(k) = h.attestation_key {
                by_key.entry(k.to_bytes()).or_default().push(h.id.clone());
            }
        }
        by_key.into_values().filter(|hs| hs.len() > 1).collect()
    }

    /// Write `host`'s attestation key into the inventory file, keeping the
    /// rest of the file (comments, order) as it is.
    pub fn set_attestation_key(path: &Path, host: &str, key_text: &str) -> Result<(), ConfigError> {
        let src = Source::read(path)?;
        let mut doc: toml_edit::DocumentMut =
            src.text
                .parse()
                .map_err(|e: toml_edit::TomlError| ConfigError::Parse {
                    path: path.to_path_buf(),
                    line: 0,
                    column: 0,
                    message: e.to_string(),
                })?;
        let mut found = false;
        if let Some(hosts) = doc.get_mut("host").and_then(|h| h.as_array_of_tables_mut()) {
            for t in hosts.iter_mut() {
                if t.get("id").and_then(|v| v.as_str()) == Some(host) {
                    t.insert("attestation_key", toml_edit::value(key_text));
                    found = true;
                }
            }
        }
        if !found {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                line: 0,
                column: 0,
                message: format!("no [[host]] with id `{host}`"),
            });
        }
        crate::store::write_atomic(path, doc.to_string().as_bytes()).map_err(|e| {
            ConfigError::Parse {
                path: path.to_path_buf(),
                line: 0,
                column: 0,
                message: e.to_string(),
            }
        })
    }
}

/// `host:port` with a non-empty host and a port 1-65535.
fn check_address(a: &str) -> Result<(), String> {
    let (host, port) = a
        .rsplit_once(':')
        .ok_or_else(|| format!("`{a}` is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
    {
        return Err(format!("`{a}`: bad host part"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("`{a}`: port must be 1-65535")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"trust_domain = "gpu.example.com"

[[pool]]
name = "a"

[[pool]]
name = "b"
early_launch = true

[[host]]
id = "gpu-1"
address = "10.0.0.1:7443"
pool = "a"
ring = 0

[[host]]
id = "gpu-2"
address = "node-2.example.com:7443"
pool = "b"
ring = 3
"#;

    fn err(text: &str) -> String {
        Inventory::from_source(&Source::from_text("inv.toml", text))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn loads_with_defaults() {
        let inv = Inventory::from_source(&Source::from_text("inv.toml", GOOD)).unwrap();
        assert_eq!(inv.pools["a"].reserve_percent, 15);
        assert_eq!(inv.pools["b"].reserve_percent, 20);
        assert_eq!(inv.hosts[1].ring, 3);
        assert_eq!(inv.summary().unenrolled.len(), 2);
    }

    #[test]
    fn each_mistake_names_file_line_and_key() {
        let cases = [
            (
                GOOD.replace("id = \"gpu-2\"", "id = \"gpu-1\""),
                "inv.toml:17:",
                "host.id",
                "duplicate",
            ),
            (
                GOOD.replace("pool = \"b\"\nring", "pool = \"c\"\nring"),
                "inv.toml:19:",
                "host.pool",
                "unknown pool",
            ),
            (
                GOOD.replace("ring = 3", "ring = 5"),
                "inv.toml:20:",
                "host.ring",
                "outside 0-4",
            ),
            (
                GOOD.replace("10.0.0.1:7443", "10.0.0.1"),
                "inv.toml:12:",
                "host.address",
                "host:port",
            ),
            (
                GOOD.replace("name = \"a\"", "name = \"a\"\nreserve_percent = 60"),
                "inv.toml:5:",
                "pool.reserve_percent",
                "outside",
            ),
            (
                GOOD.replace("ring = 0", "ring = 0\nattestation_key = \"ed25519:AAAA\""),
                "inv.toml:15:",
                "host.attestation_key",
                "32 bytes",
            ),
        ];
        for (text, at, key, what) in cases {
            let e = err(&text);
            assert!(e.starts_with(at), "{e}");
            assert!(e.contains(&format!("key `{key}`")), "{e}");
            assert!(e.contains(what), "{e}");
        }
        let e = err(&GOOD.replace("ring = 0", "ring = 0\nrack = 4"));
        assert!(e.contains("rack"), "{e}");
    }

    #[test]
    fn hosts_sharing_an_attestation_key_are_found() {
        let key = keys::public_key_text(&keys::generate().verifying_key());
        let other = keys::public_key_text(&keys::generate().verifying_key());
        let with = |a: &str, b: &str| {
            GOOD.replace("ring = 0", &format!("ring = 0\nattestation_key = \"{a}\""))
                .replace("ring = 3", &format!("ring = 3\nattestation_key = \"{b}\""))
        };
        let load = |t: &str| Inventory::from_source(&Source::from_text("inv.toml", t)).unwrap();
        assert_eq!(load(&with(&key, &key)).shared_keys(), [["gpu-1", "gpu-2"]]);
        assert!(load(&with(&key, &other)).shared_keys().is_empty());
        assert!(load(GOOD).shared_keys().is_empty());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = err(&GOOD.replace("ring = 0", "ring = 0\nrack = 4"));
        assert!(e.contains("rack"), "{e}");
    }
}
