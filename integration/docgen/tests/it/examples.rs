//! The example files the `ringfence` package ships in
//! /usr/share/doc/ringfence/examples/ load as what they claim to be: the
//! coordinator settings with every key set (the inventory and wave spec are
//! kept valid by the coordinator's plan_sequencer tests).

use std::path::Path;

#[test]
fn the_packaged_coordinator_settings_example_loads_with_every_key() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../coordinator/examples-config/ringfence.toml");
    let settings = ringfence_coordinator::settings::Settings::load(Some(&path))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        settings.state_dir,
        Path::new("/var/lib/ringfence-coordinator")
    );
    assert_eq!(settings.signing.key_id, "coord-2026");
    assert_eq!(
        settings.tls.ca_bundle,
        Path::new("/etc/ringfence/tls/ca.pem")
    );
    assert_eq!(settings.timeouts.halt_grace_s, 120);
}
