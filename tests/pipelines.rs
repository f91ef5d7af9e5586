//! Every pipeline file in pipelines/ parses, and default.toml states exactly the built-in
//! defaults (so the documentation by example cannot drift from the code).

use std::path::Path;

use plankton::config::PipelineConfig;

#[test]
fn every_pipeline_file_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            if path.file_name().is_some_and(|n| n == "camera-daemon.toml") {
                // A daemon config, not an image pipeline.
                plankton::serve::config::ServeConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
            } else if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("replay-"))
            {
                // A replay chain: it and every member pipeline it names must load.
                let cfg =
                    plankton::replay::ReplayConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
                let members = cfg
                    .member_pipelines(&path)
                    .unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(members.len(), cfg.members.len());
            } else {
                PipelineConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
            }
            n += 1;
        }
    }
    assert!(n >= 4, "expected the documented pipelines, found {n}");
}

#[test]
fn default_toml_spells_out_the_builtin_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/default.toml");
    let from_file = PipelineConfig::load(&path).unwrap();
    assert_eq!(from_file, PipelineConfig::reference_default());
}

#[test]
fn embedded_demo_pipeline_loads() {
    let demo = PipelineConfig::embedded_demo();
    assert_eq!(demo.name, "demo");
    assert_eq!(demo.patches.len(), 1);
    let train = plankton::demo::embedded_train_pipeline();
    assert_eq!(train.name, "demo-train");
    assert!(train.train.steps > 0 && train.model.width < 1.0);
}

#[test]
fn a_typo_names_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("typo.toml");
    std::fs::write(&p, "[batch]\nsiez = 3\n").unwrap();
    let msg = PipelineConfig::load(&p).unwrap_err().to_string();
    assert!(msg.contains("typo.toml") && msg.contains("siez"), "{msg}");
}

#[test]
fn the_docker_daemon_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/serve.toml");
    let cfg = plankton::serve::config::ServeConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        cfg.http.token_file.is_some(),
        "bound beyond loopback: a token is required"
    );
}

#[test]
fn the_docker_nats_daemon_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/serve-nats.toml");
    let cfg = plankton::serve::config::ServeConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.nats.enabled && !cfg.watch.enabled);
    assert_eq!(cfg.nats.servers, vec!["nats://nats:4222".to_string()]);
}

#[test]
fn the_docker_prometheus_configs_pass_promtool() {
    for file in ["prometheus.yml", "prometheus-nats.yml"] {
        promtool(&["check", "config", file]);
    }
}

/// The drift alert rules are valid, and promtool's own rule tests (a steady camera and a
/// shifted one) fire every alert for the shifted camera only.
#[test]
fn the_drift_alert_rules_pass_promtool_and_their_unit_tests() {
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts_test.yml"]);
}

/// Runs promtool in docker/prometheus.
fn promtool(args: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let local = root.join(".tools/bin/promtool");
    let promtool = if local.is_file() {
        local
    } else {
        std::path::PathBuf::from("promtool")
    };
    let out = std::process::Command::new(&promtool)
        .args(args)
        .current_dir(root.join("docker/prometheus"))
        .output();
    match out {
        Ok(o) => assert!(
            o.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) if std::env::var_os("PLANKTON_REQUIRE_PROMTOOL").is_none() => {
            eprintln!("skipping: no promtool ({e}); `make test` fetches it")
        }
        Err(e) => panic!("promtool required: {e}"),
    }
}
