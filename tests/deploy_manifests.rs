//! The deployment files under `deploy/` agree with the binary they deploy: every port
//! (container, Service, probes, compose, Dockerfile) is the port of the configured
//! `listen` address; every `KEYWARDEN_*` variable they set is a setting the configuration
//! reads, with a value it accepts; the probes name health services the server reports
//! SERVING; and the migration Job, the compose `migrate` service and the servers run
//! subcommands the real binary has, with the environment the manifests give it.
//!
//! Values the manifests leave to the operator (`${ADMIN_TOKEN_SHA256}` in the Secret
//! template, `${KEK_V1_BASE64:?...}` in compose) are filled with real ones made here, as
//! `keywarden token` and `keywarden kek new` make them.

mod common;
mod process_harness;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use base64::Engine;
use figment::Figment;
use figment::providers::Serialized;
use keywarden::api::auth::generate_token;
use keywarden::config::{Config, Settings};
use keywarden::domain::key_format::KeyHash;
use keywarden::proto;
use process_harness::{Process, Server, keywarden};
use serde::Deserialize;
use serde_json::Value;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn deploy_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(relative)
}

/// Every document of a YAML file (`---` separates them), merge keys (`<<: *anchor`)
/// applied, as JSON.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|document| {
            let mut yaml = serde_norway::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
            // A mapping merged in may carry a `<<` of its own (compose's replicas merge
            // `x-replica`, which merges `x-keywarden`): apply until nothing changes.
            loop {
                let before = yaml.clone();
                yaml.apply_merge()
                    .unwrap_or_else(|e| panic!("{}: bad merge key: {e}", path.display()));
                if yaml == before {
                    break;
                }
            }
            serde_json::to_value(yaml)
                .unwrap_or_else(|e| panic!("{}: not JSON-like: {e}", path.display()))
        })
        .filter(|document| !document.is_null())
        .collect()
}

/// Every document of every YAML file under deploy/kubernetes/.
fn kubernetes_documents() -> Vec<Value> {
    let dir = deploy_path("kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|p| {
            p.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 6,
        "expected the manifests in {}",
        dir.display()
    );
    files.iter().flat_map(|f| yaml_documents(f)).collect()
}

/// The one manifest of `kind` named `name`.
fn manifest<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = documents
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} named {name}");
    found[0]
}

fn only<'a>(documents: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = documents.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}");
    found[0]
}

fn str_of(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("expected a string, found {value}"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("expected a list, found {value}"))
        .iter()
        .map(|v| str_of(v).to_owned())
        .collect()
}

/// Real values for what the manifests leave to the operator.
struct Placeholders {
    admin_token: String,
    values: HashMap<&'static str, String>,
}

impl Placeholders {
    fn new() -> Placeholders {
        let token = || {
            let token = generate_token().unwrap();
            let sha256 = KeyHash::of(&token).to_hex();
            (token, sha256)
        };
        let (admin_token, admin_sha256) = token();
        let kek = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let values = HashMap::from([
            ("ADMIN_TOKEN_SHA256", admin_sha256),
            ("VERIFIER_TOKEN_SHA256", token().1),
            ("EDGE_TOKEN_SHA256", token().1),
            ("RESOLVER_TOKEN_SHA256", token().1),
            ("KEK_V1_BASE64", kek),
            (
                "DATABASE_URL",
                "postgres://keywarden:placeholder@db.invalid:5432/keywarden".to_owned(),
            ),
            (
                "REDIS_URL",
                "redis://:placeholder@redis.invalid:6379".to_owned(),
            ),
            ("POSTGRES_PASSWORD", "placeholder".to_owned()),
        ]);
        Placeholders {
            admin_token,
            values,
        }
    }

    /// Replaces `${NAME}`, `${NAME:-default}` and `${NAME:?message}` (the forms compose
    /// and envsubst read) with this test's values; a name with no value here and no
    /// default is a failure, so a new variable in the manifests gets a value in this test.
    fn interpolate(&self, text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {text:?}"));
            let expression = &after[..end];
            let name_end = expression.find([':', '-', '?']).unwrap_or(expression.len());
            let (name, modifier) = expression.split_at(name_end);
            let default = modifier
                .strip_prefix(":-")
                .or_else(|| modifier.strip_prefix('-'));
            match (self.values.get(name), default) {
                (Some(value), _) => out.push_str(value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => panic!("the manifests use ${{{name}}}: give it a value here"),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }
}

type Env = BTreeMap<String, String>;

/// The environment Kubernetes gives `container` of a pod template: `envFrom` ConfigMaps
/// and Secrets (which must be among the manifests), then `env` entries.
fn kubernetes_env(documents: &[Value], container: &Value, placeholders: &Placeholders) -> Env {
    let mut env = Env::new();
    let secret_data = |name: &str| -> BTreeMap<String, String> {
        let secret = manifest(documents, "Secret", name);
        let mut data = BTreeMap::new();
        if let Some(encoded) = secret["data"].as_object() {
            for (k, v) in encoded {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(str_of(v))
                    .unwrap();
                data.insert(k.clone(), String::from_utf8(bytes).unwrap());
            }
        }
        if let Some(plain) = secret["stringData"].as_object() {
            for (k, v) in plain {
                data.insert(k.clone(), str_of(v).to_owned());
            }
        }
        data
    };
    let config_map_data = |name: &str| -> BTreeMap<String, String> {
        let map = manifest(documents, "ConfigMap", name);
        map["data"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), str_of(v).to_owned()))
            .collect()
    };
    for source in container["envFrom"].as_array().into_iter().flatten() {
        if let Some(name) = source["configMapRef"]["name"].as_str() {
            env.extend(config_map_data(name));
        } else if let Some(name) = source["secretRef"]["name"].as_str() {
            env.extend(secret_data(name));
        } else {
            panic!("unexpected envFrom {source}");
        }
    }
    for entry in container["env"].as_array().into_iter().flatten() {
        let name = str_of(&entry["name"]).to_owned();
        let value = if let Some(value) = entry["value"].as_str() {
            value.to_owned()
        } else if let Some(r) = entry["valueFrom"]["secretKeyRef"].as_object() {
            secret_data(str_of(&r["name"]))[str_of(&r["key"])].clone()
        } else if let Some(r) = entry["valueFrom"]["configMapKeyRef"].as_object() {
            config_map_data(str_of(&r["name"]))[str_of(&r["key"])].clone()
        } else {
            panic!("unexpected env entry {entry}");
        };
        env.insert(name, value);
    }
    env.into_iter()
        .map(|(k, v)| (k, placeholders.interpolate(&v)))
        .collect()
}

/// A compose service's `environment` (a mapping, or a list of `NAME=value`).
fn compose_env(service: &Value, placeholders: &Placeholders) -> Env {
    let environment = &service["environment"];
    let pairs: Vec<(String, String)> = match environment {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), value)
            })
            .collect(),
        Value::Array(list) => list
            .iter()
            .map(|v| {
                let (k, v) = str_of(v).split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        other => panic!("unexpected environment {other}"),
    };
    pairs
        .into_iter()
        .map(|(k, v)| (k, placeholders.interpolate(&v)))
        .collect()
}

/// The configuration the binary builds from `env`, strictly: every `KEYWARDEN_*`
/// variable goes through figment as `Config::load` passes it (prefix stripped, lowercased,
/// nested on `__`, the value parsed by figment), but none is filtered out, so a variable
/// naming no setting is refused by `Config`'s `deny_unknown_fields` instead of being
/// ignored. Then the same validation `serve` applies. No process environment is touched.
fn try_settings_from(env: &Env) -> Result<Settings, String> {
    let mut figment = Figment::new();
    for (name, value) in env {
        let Some(key) = name.strip_prefix("KEYWARDEN_") else {
            continue;
        };
        // Read by the CLI (`--config`), not a setting.
        if name == "KEYWARDEN_CONFIG" {
            continue;
        }
        let key = key.to_ascii_lowercase().replace("__", ".");
        let value: figment::value::Value = value.parse().unwrap();
        figment = figment.merge(Serialized::defaults(figment::util::nest(&key, value)));
    }
    let config: Config = figment
        .extract()
        .map_err(|e| format!("the KEYWARDEN_* variables are not a valid configuration: {e}"))?;
    config
        .into_settings()
        .map_err(|e| format!("the configuration is refused: {e}"))
}

fn settings_from(env: &Env) -> Settings {
    try_settings_from(env).unwrap_or_else(|e| panic!("{e}"))
}

/// Whether `settings` let `token` call the admin services.
fn is_admin(settings: &Settings, token: &str) -> bool {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert("authorization", format!("Bearer {token}").parse().unwrap());
    settings
        .tokens
        .authorize(&metadata, keywarden::api::auth::Role::Admin)
        .is_ok()
}

/// The pod spec of the template of a Deployment or a Job.
fn pod_spec<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    &manifest(documents, kind, name)["spec"]["template"]["spec"]
}

fn container<'a>(pod_spec: &'a Value, name: &str) -> &'a Value {
    pod_spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container named {name}"))
}

fn port_number(value: &Value) -> u16 {
    value
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("expected a port number, found {value}"))
}

const PROBES: [&str; 3] = ["startupProbe", "readinessProbe", "livenessProbe"];

#[test]
fn every_kubernetes_port_is_the_port_of_the_configured_listen_address() {
    let docs = kubernetes_documents();
    let placeholders = Placeholders::new();
    let spec = pod_spec(&docs, "Deployment", "keywarden");
    let server = container(spec, "keywarden");
    let listen = settings_from(&kubernetes_env(&docs, server, &placeholders)).listen;
    assert!(
        !listen.ip().is_loopback(),
        "the pods must listen beyond loopback (KEYWARDEN_LISTEN), not on {listen}"
    );
    let port = listen.port();

    let container_ports = server["ports"].as_array().unwrap();
    let grpc = container_ports
        .iter()
        .find(|p| p["name"] == "grpc")
        .expect("a container port named grpc");
    assert_eq!(port_number(&grpc["containerPort"]), port);

    // The metrics port: configured beyond loopback, declared, and where scrapers look.
    let metrics = settings_from(&kubernetes_env(&docs, server, &placeholders))
        .metrics_listen
        .expect("KEYWARDEN_METRICS__LISTEN is set");
    assert!(!metrics.ip().is_loopback(), "{metrics}");
    let declared = container_ports
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a container port named metrics");
    assert_eq!(port_number(&declared["containerPort"]), metrics.port());
    let deployment = manifest(&docs, "Deployment", "keywarden");
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        str_of(&annotations["prometheus.io/port"]),
        metrics.port().to_string()
    );
    assert_eq!(str_of(&annotations["prometheus.io/path"]), "/metrics");
    assert_ne!(
        metrics.port(),
        port,
        "metrics and gRPC need ports of their own"
    );

    for probe in PROBES {
        let probe = &server[probe];
        assert!(probe["grpc"].is_object(), "a native gRPC probe: {probe}");
        assert_eq!(port_number(&probe["grpc"]["port"]), port, "{probe}");
    }

    let service = manifest(&docs, "Service", "keywarden");
    let service_ports = service["spec"]["ports"].as_array().unwrap();
    assert_eq!(service_ports.len(), 1, "{service}");
    let target = &service_ports[0]["targetPort"];
    // A named targetPort is resolved through the container's ports.
    let target = match target.as_str() {
        Some(name) => port_number(
            &container_ports
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("targetPort {name} names no container port"))["containerPort"],
        ),
        None => port_number(target),
    };
    assert_eq!(target, port);
    assert_eq!(service_ports[0]["appProtocol"], "grpc");
}

#[test]
fn the_service_and_the_disruption_budget_select_the_deployments_pods() {
    let docs = kubernetes_documents();
    let deployment = manifest(&docs, "Deployment", "keywarden");
    let pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap();
    let selects_pods = |selector: &Value| {
        let selector = selector.as_object().unwrap();
        assert!(!selector.is_empty());
        selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
    };
    assert!(selects_pods(&deployment["spec"]["selector"]["matchLabels"]));
    assert!(selects_pods(
        &manifest(&docs, "Service", "keywarden")["spec"]["selector"]
    ));
    let budget = only(&docs, "PodDisruptionBudget");
    assert!(selects_pods(&budget["spec"]["selector"]["matchLabels"]));

    // The budget leaves at least two of the three replicas serving.
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap();
    assert_eq!(replicas, 3);
    let available = match (
        budget["spec"]["minAvailable"].as_u64(),
        budget["spec"]["maxUnavailable"].as_u64(),
    ) {
        (Some(min), None) => min,
        (None, Some(max)) => replicas - max,
        _ => panic!("one of minAvailable / maxUnavailable, as a number: {budget}"),
    };
    assert!(available >= 2, "{budget}");
}

#[test]
fn pods_run_unprivileged_on_a_read_only_root_file_system() {
    let docs = kubernetes_documents();
    for (kind, name, container_name) in [
        ("Deployment", "keywarden", "keywarden"),
        ("Job", "keywarden-migrate", "migrate"),
    ] {
        let spec = pod_spec(&docs, kind, name);
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{kind}");
        assert_ne!(spec["securityContext"]["runAsUser"], 0, "{kind}");
        let c = container(spec, container_name);
        let security = &c["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true, "{kind}");
        assert_eq!(security["allowPrivilegeEscalation"], false, "{kind}");
        assert_eq!(
            strings(&security["capabilities"]["drop"]),
            ["ALL"],
            "{kind}"
        );
        assert!(
            c["resources"]["limits"]["memory"].is_string(),
            "{kind}: a memory limit"
        );
    }
}

#[test]
fn every_keywarden_variable_of_the_kubernetes_manifests_is_a_setting_the_binary_reads() {
    let docs = kubernetes_documents();
    let placeholders = Placeholders::new();
    // Every KEYWARDEN_* name of the ConfigMaps and Secrets, used by a pod or not.
    let mut names: Vec<String> = Vec::new();
    for doc in &docs {
        for field in ["data", "stringData"] {
            if let Some(map) = doc[field].as_object() {
                names.extend(map.keys().filter(|k| k.starts_with("KEYWARDEN_")).cloned());
            }
        }
    }
    let spec = pod_spec(&docs, "Deployment", "keywarden");
    let server_env = kubernetes_env(&docs, container(spec, "keywarden"), &placeholders);
    for name in &names {
        assert!(
            server_env.contains_key(name),
            "{name} is defined but the servers do not get it"
        );
    }
    // The caller tokens, the KEK, the shared Redis counters and the database all arrive.
    let settings = settings_from(&server_env);
    assert_eq!(settings.keks.len(), 1);
    assert!(matches!(
        settings.limiter,
        keywarden::config::LimiterSettings::Redis { .. }
    ));
    assert!(is_admin(&settings, &placeholders.admin_token));

    // The Job validates the same configuration before migrating: it gets the same env.
    let job_spec = pod_spec(&docs, "Job", "keywarden-migrate");
    let job_env = kubernetes_env(&docs, container(job_spec, "migrate"), &placeholders);
    assert_eq!(job_env, server_env);
}

#[test]
fn a_misspelt_variable_is_refused_by_the_strict_configuration_check() {
    // The check above must be able to fail: a name that is no setting, or a nested key
    // that is none, or a value of the wrong shape.
    for (name, value) in [
        ("KEYWARDEN_LISTNE", "0.0.0.0:50051"),
        ("KEYWARDEN_CACHE__MAX_KEY", "10"),
        ("KEYWARDEN_RATE_LIMITS_BACKEND", "redis"),
        ("KEYWARDEN_TOKENS", "[{name=\"x\", sha256=\"abc\"}]"),
    ] {
        let env = Env::from([
            (
                "KEYWARDEN_DATABASE_URL".to_owned(),
                "sqlite::memory:".to_owned(),
            ),
            (name.to_owned(), value.to_owned()),
        ]);
        assert!(
            try_settings_from(&env).is_err(),
            "{name}={value} was accepted"
        );
    }
}

/// The compose services that run Keywarden (built from deploy/Dockerfile).
fn compose_keywarden_services(compose: &Value) -> Vec<(&String, &Value)> {
    compose["services"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, s)| s["build"]["dockerfile"] == "deploy/Dockerfile")
        .collect()
}

fn compose() -> Value {
    let mut docs = yaml_documents(&deploy_path("compose.yaml"));
    assert_eq!(docs.len(), 1);
    docs.remove(0)
}

#[test]
fn compose_runs_a_migration_then_replicas_on_distinct_host_ports() {
    let compose = compose();
    let placeholders = Placeholders::new();
    let services = compose_keywarden_services(&compose);
    let (migrations, replicas): (Vec<_>, Vec<_>) = services
        .into_iter()
        .partition(|(_, s)| strings(&s["command"]) == ["migrate"]);
    assert_eq!(migrations.len(), 1, "one migrate service");
    let (migrate_name, migrate) = migrations[0];
    assert_eq!(
        migrate["depends_on"]["postgres"]["condition"],
        "service_healthy"
    );
    assert!(replicas.len() >= 2, "several replicas");

    let mut host_ports = Vec::new();
    for (name, replica) in &replicas {
        assert_eq!(strings(&replica["command"]), ["serve"], "{name}");
        assert_eq!(
            replica["depends_on"][migrate_name.as_str()]["condition"],
            "service_completed_successfully",
            "{name}"
        );
        let settings = settings_from(&compose_env(replica, &placeholders));
        assert!(!settings.listen.ip().is_loopback(), "{name}");
        let port = settings.listen.port();
        let mappings = strings(&replica["ports"]);
        assert_eq!(mappings.len(), 1, "{name}");
        let (host, container) = mappings[0].rsplit_once(':').unwrap();
        assert_eq!(container.parse::<u16>().unwrap(), port, "{name}");
        host_ports.push(host.parse::<u16>().unwrap());
        let check = strings(&replica["healthcheck"]["test"]).join(" ");
        let checked_port = check
            .split_whitespace()
            .find_map(|word| word.split_once("/dev/tcp/"))
            .and_then(|(_, target)| target.rsplit('/').next())
            .unwrap_or_else(|| panic!("{name}'s healthcheck opens no /dev/tcp port: {check}"));
        assert_eq!(checked_port, port.to_string(), "{name}'s healthcheck");
        assert!(matches!(
            settings.limiter,
            keywarden::config::LimiterSettings::Redis { .. }
        ));
    }
    let mut distinct = host_ports.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), host_ports.len(), "{host_ports:?}");

    for dependency in ["postgres", "redis"] {
        assert!(
            compose["services"][dependency]["healthcheck"]["test"].is_array(),
            "{dependency} has a healthcheck"
        );
    }
}

#[test]
fn every_keywarden_variable_of_compose_is_a_setting_the_binary_reads() {
    let compose = compose();
    let placeholders = Placeholders::new();
    let services = compose_keywarden_services(&compose);
    assert!(services.len() >= 3);
    for (name, service) in services {
        let settings = settings_from(&compose_env(service, &placeholders));
        assert_eq!(settings.keks.len(), 1, "{name}");
        assert!(is_admin(&settings, &placeholders.admin_token), "{name}");
    }
}

/// The instructions of the Dockerfile, `(INSTRUCTION, arguments)`, continuations joined.
fn dockerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy_path("Dockerfile")).unwrap();
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                let (instruction, args) = current.split_once(' ').unwrap();
                instructions.push((instruction.to_ascii_uppercase(), args.trim().to_owned()));
                current.clear();
            }
        }
    }
    instructions
}

#[test]
fn the_image_builder_copies_every_workspace_member() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    // `members = ["a", "b"]` of [workspace]: the quoted names between the brackets.
    let list = manifest
        .split_once("members = [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .unwrap()
        .0;
    let members: Vec<&str> = list.split('"').skip(1).step_by(2).collect();
    assert!(members.contains(&"edge"), "{members:?}");
    let instructions = dockerfile();
    let first_build = instructions
        .iter()
        .position(|(i, a)| i == "RUN" && a.contains("cargo build"))
        .unwrap();
    let copied: Vec<&str> = instructions[..first_build]
        .iter()
        .filter(|(i, _)| i == "COPY")
        .flat_map(|(_, a)| a.split_whitespace().next())
        .collect();
    for member in members {
        // A member is copied itself, or inside a folder copied whole.
        assert!(
            copied
                .iter()
                .any(|c| member == *c || member.starts_with(&format!("{c}/"))),
            "the image's builder does not copy workspace member {member} before building: {copied:?}"
        );
    }
}

#[test]
fn the_image_exposes_the_listen_port_and_runs_serve_unprivileged() {
    let docs = kubernetes_documents();
    let placeholders = Placeholders::new();
    let spec = pod_spec(&docs, "Deployment", "keywarden");
    let port = settings_from(&kubernetes_env(
        &docs,
        container(spec, "keywarden"),
        &placeholders,
    ))
    .listen
    .port();

    let instructions = dockerfile();
    // The runtime stage: everything after the last FROM.
    let last_from = instructions.iter().rposition(|(i, _)| i == "FROM").unwrap();
    let runtime = &instructions[last_from..];
    let args_of = |name: &str| -> Vec<&str> {
        runtime
            .iter()
            .filter(|(i, _)| i == name)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    let exposed: Vec<u16> = args_of("EXPOSE")
        .iter()
        .flat_map(|a| a.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    assert_eq!(exposed, [port]);
    let exec_form = |name: &str| -> Vec<String> {
        let args = args_of(name);
        assert_eq!(args.len(), 1, "one {name}");
        serde_json::from_str(args[0]).unwrap_or_else(|e| panic!("{name} in exec form: {e}"))
    };
    assert_eq!(exec_form("ENTRYPOINT"), ["keywarden"]);
    // The image's default is what the Deployment runs.
    let deployment_args = strings(&container(spec, "keywarden")["args"]);
    assert_eq!(exec_form("CMD"), deployment_args);
    let user = args_of("USER");
    assert_eq!(user.len(), 1);
    let uid = user[0].split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "USER {uid}");
    assert_eq!(
        uid,
        spec["securityContext"]["runAsUser"].to_string(),
        "the image's user is the pods' runAsUser"
    );
}

/// The manifests' environment for a run on this machine: SQLite in `dir` instead of
/// the cluster's database, this machine's Redis, and metrics on an ephemeral loopback
/// port (the configured one could be taken here).
fn local_env(mut env: Env, dir: &Path) -> Env {
    if env.contains_key("KEYWARDEN_METRICS__LISTEN") {
        env.insert("KEYWARDEN_METRICS__LISTEN".into(), "127.0.0.1:0".into());
    }
    let db = dir.join("keywarden.db");
    env.insert(
        "KEYWARDEN_DATABASE_URL".into(),
        format!("sqlite://{}", db.display()),
    );
    env.insert(
        "KEYWARDEN_RATE_LIMITS__REDIS_URL".into(),
        std::env::var("KEYWARDEN_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
    );
    env
}

/// Runs `keywarden <migrate args>` to completion, then `keywarden <serve args>` (on an
/// ephemeral port: the configured one could be taken on this machine) with `env`, and
/// checks that the server reports `health_services` SERVING, that the configured admin
/// token is accepted and that the configured KEK encrypts provider keys.
async fn run_real_binary(
    env: &Env,
    migrate_args: &[String],
    serve_args: &[String],
    health_services: &[String],
    admin_token: &str,
) {
    let mut migrate = keywarden(migrate_args);
    migrate.envs(env);
    let mut migrate = Process::spawn(migrate);
    let status = migrate.wait().await;
    assert!(status.success(), "{}", migrate.transcript());
    assert!(
        migrate.stdout().contains("migrations applied"),
        "{}",
        migrate.transcript()
    );

    let mut args = serve_args.to_vec();
    args.extend(["--listen".to_owned(), "127.0.0.1:0".to_owned()]);
    let mut serve = keywarden(&args);
    serve.envs(env);
    let mut server = Server::start(serve).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in health_services {
        let status = health
            .check(HealthCheckRequest {
                service: service.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?}: {e}"))
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    server.create_workspace(admin_token, "ws_deploy").await;
    let put = proto::provider_key_service_client::ProviderKeyServiceClient::with_interceptor(
        server.channel().await,
        common::bearer(admin_token),
    )
    .put_provider_key(proto::PutProviderKeyRequest {
        workspace_id: "ws_deploy".into(),
        provider: proto::Provider::Anthropic as i32,
        api_key: format!("sk-ant-api03-{}", "x".repeat(40)),
        actor: Some(common::actor()),
    })
    .await;
    assert!(put.is_ok(), "{put:?}\n{}", server.process.transcript());
    let status = server.terminate().await;
    assert!(status.success(), "{}", server.process.transcript());
}

#[tokio::test]
async fn the_kubernetes_job_and_deployment_run_the_real_binary_and_its_probes_see_serving() {
    let docs = kubernetes_documents();
    let placeholders = Placeholders::new();
    let dir = tempfile::tempdir().unwrap();
    let job = container(pod_spec(&docs, "Job", "keywarden-migrate"), "migrate");
    let server = container(pod_spec(&docs, "Deployment", "keywarden"), "keywarden");
    // The image's ENTRYPOINT is the binary: the containers give only its arguments.
    assert!(job["command"].is_null() && server["command"].is_null());
    let migrate_args = strings(&job["args"]);
    assert_eq!(migrate_args, ["migrate"]);
    let probe_services: Vec<String> = PROBES
        .iter()
        .map(|p| str_of(&server[*p]["grpc"]["service"]).to_owned())
        .collect();
    let env = local_env(kubernetes_env(&docs, server, &placeholders), dir.path());
    run_real_binary(
        &env,
        &migrate_args,
        &strings(&server["args"]),
        &probe_services,
        &placeholders.admin_token,
    )
    .await;
}

#[tokio::test]
async fn the_compose_migrate_service_and_replicas_run_the_real_binary() {
    let compose = compose();
    let placeholders = Placeholders::new();
    let dir = tempfile::tempdir().unwrap();
    let services = compose_keywarden_services(&compose);
    let (_, migrate) = services
        .iter()
        .find(|(n, _)| n.as_str() == "migrate")
        .unwrap();
    let (_, replica) = services
        .iter()
        .find(|(_, s)| strings(&s["command"]) == ["serve"])
        .unwrap();
    assert_eq!(
        compose_env(migrate, &placeholders),
        compose_env(replica, &placeholders)
    );
    let env = local_env(compose_env(replica, &placeholders), dir.path());
    run_real_binary(
        &env,
        &strings(&migrate["command"]),
        &strings(&replica["command"]),
        &[String::new()],
        &placeholders.admin_token,
    )
    .await;
}
