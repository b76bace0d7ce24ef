//! The deploy files are part of the product: the example configuration
//! parses, validates and names every option; the Kubernetes manifests are
//! valid YAML whose probes, ports and grace period match the configuration
//! they ship.

use idem::config::{Config, HandlerKind};
use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_example_config_parses_validates_and_names_every_option() {
    let path = root().join("deploy/idem.example.toml");
    let c = Config::load(Some(&path), Vec::new()).unwrap();
    c.validate().unwrap();
    assert_eq!(c.handler, HandlerKind::Http);
    assert_eq!(c.http.url, "http://127.0.0.1:8080/events");
    assert_eq!(c.metrics.listen, "127.0.0.1:9464");
    assert_eq!(c.topics, vec!["payments".to_string()]);

    // Every field of the configuration, and of its sections, is in the file
    // (set or commented out).
    let text = std::fs::read_to_string(&path).unwrap();
    let defaults = toml::Value::try_from(Config::default()).unwrap();
    let mut missing = Vec::new();
    let mentioned = |name: &str| {
        text.lines().any(|l| {
            let l = l.trim_start_matches(['#', ' ']);
            l.starts_with(&format!("{name} ="))
                || l.starts_with(&format!("[{name}]"))
                || l.starts_with(&format!("[{name}."))
                || l.starts_with(&format!("\"{name}\" ="))
        })
    };
    for (name, value) in defaults.as_table().unwrap() {
        if !mentioned(name) {
            missing.push(name.clone());
        }
        if let (toml::Value::Table(section), true) =
            (value, ["http", "retry", "metrics"].contains(&name.as_str()))
        {
            for field in section.keys() {
                if !mentioned(field) {
                    missing.push(format!("{name}.{field}"));
                }
            }
        }
    }
    for optional in ["scope", "key"] {
        if !mentioned(optional) {
            missing.push(optional.to_string());
        }
    }
    assert!(missing.is_empty(), "not in the example: {missing:?}");
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap()
}

#[test]
fn the_sidecar_manifest_wires_probes_ports_and_grace_period_to_its_config() {
    let text = std::fs::read_to_string(root().join("deploy/kubernetes/sidecar.yaml")).unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        vec!["ConfigMap", "PersistentVolumeClaim", "Deployment"]
    );

    // The shipped configuration is a valid one (secrets are references).
    let toml_text = docs[0]["data"]["idem.toml"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("idem.toml");
    std::fs::write(&file, toml_text).unwrap();
    let mut config = Config::load(Some(&file), Vec::new()).unwrap();
    assert_eq!(
        config.kafka["sasl.password"].as_str(),
        Some("${file:/run/secrets/kafka/password}")
    );
    assert_eq!(
        config.kafka["sasl.username"].as_str(),
        Some("${env:KAFKA_USERNAME}")
    );
    config.kafka.clear();
    config.validate().unwrap();
    assert_eq!(config.handler, HandlerKind::Http);

    let deployment = &docs[2];
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_sequence().unwrap();
    let idem = containers.iter().find(|c| c["name"] == "idem").unwrap();
    let app = containers.iter().find(|c| c["name"] == "app").unwrap();
    let metrics_port = port_of(&config.metrics.listen);
    assert!(
        config.metrics.listen.starts_with("0.0.0.0:"),
        "probes reach the pod IP, not loopback"
    );
    assert_eq!(idem["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(idem["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(
        idem["livenessProbe"]["httpGet"]["port"].as_u64(),
        Some(metrics_port)
    );
    assert_eq!(
        idem["readinessProbe"]["httpGet"]["port"].as_u64(),
        Some(metrics_port)
    );
    assert_eq!(
        idem["ports"][0]["containerPort"].as_u64(),
        Some(metrics_port)
    );
    assert_eq!(
        app["ports"][0]["containerPort"].as_u64(),
        Some(port_of(config.http.url.trim_end_matches("/events")))
    );
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > config.shutdown_timeout_secs,
        "grace {grace} s must exceed the shutdown deadline"
    );
    // The store is on the claim, the config from the ConfigMap.
    let volumes = pod["volumes"].as_sequence().unwrap();
    assert!(volumes
        .iter()
        .any(|v| v["persistentVolumeClaim"]["claimName"] == docs[1]["metadata"]["name"]));
    assert!(volumes
        .iter()
        .any(|v| v["configMap"]["name"] == docs[0]["metadata"]["name"]));
    let mounts = idem["volumeMounts"].as_sequence().unwrap();
    assert!(mounts
        .iter()
        .any(|m| m["mountPath"].as_str() == config.store_dir.to_str()));
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
}

#[test]
fn the_systemd_unit_waits_longer_than_the_shutdown_deadline() {
    let text = std::fs::read_to_string(root().join("deploy/idem.service")).unwrap();
    let stop: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(stop > Config::default().shutdown_timeout_secs);
    assert!(text.contains("ExecStart=/usr/local/bin/idem run --config /etc/idem/idem.toml"));
}
