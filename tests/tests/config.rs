//! Every configuration the repository shows is one that works: each Envoy YAML
//! under `envoy/` passes `envoy --mode validate`, each filter configuration in
//! those files, the Istio manifests and the README is accepted by the filter's
//! own configuration code, and the Docker Compose file is valid and runs the
//! same `gateway.yaml` the tests run.

// Test code: a failed expectation is a panic with a message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aigw_shared::meter::Meter;
use aigw_shared::router::Router;
use aigw_shared::stage::Filter;
use aigw_tests::harness::{envoy_bin, root};
use serde_norway::Value as Yaml;
use std::path::{Path, PathBuf};
use std::process::Command;

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p);
        }
    }
}

fn yaml_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    files(&root().join("envoy"), &mut out);
    assert!(!out.is_empty());
    out
}

fn is_envoy_bootstrap(doc: &Yaml) -> bool {
    doc.get("static_resources").is_some() || doc.get("admin").is_some()
}

/// Checks one filter configuration with the code of the filter it is for.
fn check_filter_config(plugin: &str, json: &str, origin: &str) {
    match plugin {
        "token-meter" => {
            if let Err(e) = Meter::from_json(json.as_bytes()) {
                panic!("{origin}: token-meter rejects its configuration: {e}\n{json}");
            }
        }
        "model-router" => {
            if let Err(e) = Router::from_json(json.as_bytes()) {
                panic!("{origin}: model-router rejects its configuration: {e}\n{json}");
            }
        }
        "gateway" => {
            if let Err(e) = aigw_shared::bundle::Bundle::from_config(json.as_bytes()) {
                panic!("{origin}: the bundle rejects its configuration: {e}\n{json}");
            }
        }
        "content-screen" => {
            if let Err(e) = aigw_shared::screen::Screen::from_json(json.as_bytes()) {
                panic!(
                    "{origin}: content-screen rejects its configuration: {e}
{json}"
                );
            }
        }
        "rate-limit" => {
            if let Err(e) = aigw_shared::ratelimit::RateLimit::from_json(json.as_bytes()) {
                panic!(
                    "{origin}: rate-limit rejects its configuration: {e}
{json}"
                );
            }
        }
        "prompt-cache" => {
            if let Err(e) = aigw_shared::cache::Cache::from_json(json.as_bytes()) {
                panic!("{origin}: prompt-cache rejects its configuration: {e}\n{json}");
            }
        }
        other => panic!("{origin}: no filter named {other:?}"),
    }
}

/// Every wasm filter config (`config.name`, `configuration.value`) below a YAML value.
fn wasm_configs(v: &Yaml, out: &mut Vec<(String, String)>) {
    match v {
        Yaml::Mapping(m) => {
            let is_wasm = m
                .get("@type")
                .and_then(Yaml::as_str)
                .is_some_and(|t| t.ends_with("filters.http.wasm.v3.Wasm"));
            if is_wasm {
                let config = &m["config"];
                let name = config["name"].as_str().unwrap_or_default().to_string();
                let value = config["configuration"]["value"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                out.push((name, value));
            }
            for (_, child) in m {
                wasm_configs(child, out);
            }
        }
        Yaml::Sequence(s) => s.iter().for_each(|c| wasm_configs(c, out)),
        _ => {}
    }
}

#[test]
fn every_envoy_yaml_validates() {
    std::fs::create_dir_all(root().join("logs")).unwrap();
    let mut validated = 0;
    for path in yaml_files() {
        let doc: Yaml = serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if !is_envoy_bootstrap(&doc) {
            continue;
        }
        let out = Command::new(envoy_bin())
            .args(["--mode", "validate", "-c"])
            .arg(&path)
            .current_dir(root())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("OK"),
            "{}:\n{text}",
            path.display()
        );
        validated += 1;
    }
    assert!(validated >= 2, "gateway.yaml and token-meter.yaml at least");
}

#[test]
fn every_filter_configuration_shown_is_accepted() {
    let mut checked = 0;
    for path in yaml_files() {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: Yaml = serde_norway::from_str(&text).unwrap();
        let mut configs = Vec::new();
        wasm_configs(&doc, &mut configs);
        for (plugin, json) in configs {
            check_filter_config(&plugin, &json, &origin);
            checked += 1;
        }
        // Istio: the plugin's configuration is YAML under spec.pluginConfig.
        if doc["kind"].as_str() == Some("WasmPlugin") {
            let name = doc["metadata"]["name"].as_str().unwrap();
            let plugin = name.strip_prefix("aigw-").unwrap();
            let json = serde_json::to_string(&doc["spec"]["pluginConfig"]).unwrap();
            check_filter_config(plugin, &json, &origin);
            checked += 1;
        }
    }
    // README examples: fenced blocks whose info string is `json <filter>`.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.trim().strip_prefix("```json ") else {
            continue;
        };
        let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        check_filter_config(info.trim(), &block.join("\n"), "README.md");
        checked += 1;
    }
    assert!(checked >= 4, "found only {checked} configurations");
}

/// The filters, in the order DESIGN.md gives for the chain (request path).
const ORDER: &[&str] = &[
    "token-meter",
    "content-screen",
    "rate-limit",
    "prompt-cache",
    "model-router",
];

fn filter_configs(yaml: &str) -> Vec<(String, String)> {
    let doc: Yaml =
        serde_norway::from_str(&std::fs::read_to_string(root().join(yaml)).unwrap()).unwrap();
    let mut configs = Vec::new();
    wasm_configs(&doc, &mut configs);
    configs
}

fn json(text: &str) -> serde_json::Value {
    if text.trim().is_empty() {
        return serde_json::json!({});
    }
    serde_json::from_str(text).unwrap()
}

#[test]
fn gateway_yaml_chains_the_filters_in_order_and_the_bundle_is_the_same_gateway() {
    let separate = filter_configs("envoy/gateway.yaml");
    let names: Vec<&str> = separate.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names.first(),
        Some(&"token-meter"),
        "the meter is outermost"
    );
    let positions: Vec<usize> = names
        .iter()
        .map(|n| ORDER.iter().position(|o| o == n).unwrap())
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "gateway.yaml chains {names:?}, not in the order {ORDER:?}"
    );

    let bundle = filter_configs("envoy/gateway-bundle.yaml");
    assert_eq!(bundle.len(), 1, "the bundle is one module");
    assert_eq!(bundle[0].0, "gateway");
    let stages = json(&bundle[0].1);
    let stages = stages.as_object().unwrap();
    for (name, config) in &separate {
        let key = name.replace('-', "_");
        assert_eq!(
            stages.get(&key),
            Some(&json(config)),
            "gateway-bundle.yaml's {key} differs from gateway.yaml's {name}"
        );
    }
    assert_eq!(stages.len(), separate.len(), "{:?}", stages.keys());
}

#[test]
fn every_metric_label_has_a_tag_rule_in_every_envoy_yaml() {
    for path in yaml_files() {
        let doc: Yaml = serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if !is_envoy_bootstrap(&doc) {
            continue;
        }
        let rules: Vec<(&str, &str)> = doc["stats_config"]["stats_tags"]
            .as_sequence()
            .map(|s| {
                s.iter()
                    .filter_map(|r| Some((r["tag_name"].as_str()?, r["regex"].as_str()?)))
                    .collect()
            })
            .unwrap_or_default();
        for label in aigw_shared::metrics::LABELS {
            let want = format!("(;{label}=([^;]*))");
            assert!(
                rules
                    .iter()
                    .any(|(name, regex)| name == label && *regex == want),
                "{}: no stats_tags rule `{want}` for label {label}",
                path.display()
            );
        }
    }
}

#[test]
fn docker_compose_runs_the_same_gateway_yaml() {
    let compose = root().join("envoy/docker-compose.yaml");
    let doc: Yaml = serde_norway::from_str(&std::fs::read_to_string(&compose).unwrap()).unwrap();
    let svc = &doc["services"]["aigw"];
    let command: Vec<&str> = svc["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(command.contains(&"/aigw/envoy/gateway.yaml"), "{command:?}");
    assert_eq!(svc["working_dir"].as_str(), Some("/aigw"));
    assert_eq!(svc["volumes"][0].as_str(), Some("..:/aigw"));
    assert!(
        svc["image"].as_str().unwrap().ends_with(":v1.40.0"),
        "same Envoy as the wheel"
    );

    match Command::new("docker-compose")
        .arg("-f")
        .arg(&compose)
        .arg("config")
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "docker-compose config: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!("docker-compose not installed ({e}); its own check was skipped"),
    }
}
