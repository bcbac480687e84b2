//! `deploy/kubernetes` and `deploy/docker`, checked offline (no cluster, no registry):
//!
//! - every manifest of a core kind validates strictly (unknown fields fail) against
//!   the Kubernetes API schemas that PyPI's `kubernetes-validate` carries, for the
//!   versions in [`KUBERNETES_VERSIONS`], as files and as `kubectl kustomize` renders
//!   them (when kubectl is installed); an apiVersion/kind it has no schema for fails
//!   unless it is one of the CRD kinds below;
//! - the CRD kinds (KEDA's ScaledObject and TriggerAuthentication, the Prometheus
//!   Operator's ServiceMonitor, kustomize's Kustomization) against JSON schemas written
//!   here from their documented specs ([`crd_schemas`]), with the `jsonschema` package
//!   kubernetes-validate depends on: the fields and the scalers used here, every key
//!   known, KEDA's trigger metadata strings;
//! - every `router_*` metric the manifests name is one the router exports, and every
//!   Prometheus query of a ScaledObject is valid PromQL (promtool);
//! - the ConfigMap's router.yaml passes `message-router validate`, with the
//!   environment the router container gets (the Secret's placeholder values);
//! - the files agree with each other: probes, ports, grace periods, secret keys, the
//!   downward API, Service and PDB selectors, ScaledObject targets and the
//!   subscriptions their triggers watch, the kustomization's resource list;
//! - broken copies of the manifests are refused by each of these checks;
//! - the Dockerfiles' structure (they cannot be built here).
//!
//! Not covered: anything a cluster decides (admission, defaults, KEDA's and the
//! operator's own validation webhooks, whether the images exist and run).
//!
//! kubernetes-validate, PyYAML and jsonschema live in the venv scripts/setup makes
//! (`~/.cache/message-router/venv`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::metrics::{exported, metric_names, not_exported};
use e2e::*;
use serde_json::{json, Value};

/// The Kubernetes versions the manifests are validated against: the oldest still
/// supported by the large managed offerings when this was written, and a recent one.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.34.0"];

/// apiVersion and kind of the kinds kubernetes-validate has no schema for, each checked
/// against [`crd_schemas`] instead.
const CRD_KINDS: &[(&str, &str)] = &[
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
];

/// Files of deploy/kubernetes that kustomization.yaml leaves out on purpose.
const APPLIED_ON_THEIR_OWN: &[&str] = &["servicemonitor.yaml", "php-worker.yaml"];

fn dir() -> PathBuf {
    root().join("deploy/kubernetes")
}

fn venv(tool: &str) -> PathBuf {
    let path = setup_cache().join("venv/bin").join(tool);
    assert!(
        path.exists(),
        "{} not found: run scripts/setup (it installs kubernetes-validate into its venv)",
        path.display()
    );
    path
}

/// Every `*.yaml` of `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read deploy/kubernetes")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Reads YAML documents to JSON and checks documents against JSON schemas, with the
/// venv's PyYAML and jsonschema (both dependencies of kubernetes-validate).
const PY: &str = r#"
import json, sys, yaml
mode, rest = sys.argv[1], sys.argv[2:]
def docs(paths):
    for path in paths:
        with open(path) as f:
            for i, doc in enumerate(yaml.safe_load_all(f)):
                if doc is not None:
                    yield path, i, doc
if mode == "load":
    json.dump([{"file": p, "index": i, "doc": d} for p, i, d in docs(rest)], sys.stdout)
elif mode == "crd":
    import jsonschema
    schemas = json.load(open(rest[0]))
    checked, errors = 0, []
    for path, i, doc in docs(rest[1:]):
        schema = schemas.get(f"{doc.get('apiVersion')} {doc.get('kind')}")
        if schema is None:
            continue
        checked += 1
        validator = jsonschema.Draft202012Validator(schema)
        for e in sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
            where = ".".join(str(p) for p in e.absolute_path) or "(top)"
            name = (doc.get("metadata") or {}).get("name")
            errors.append(f"{path}: {doc.get('kind')} {name}: {where}: {e.message}")
    json.dump({"checked": checked, "errors": errors}, sys.stdout)
"#;

fn python(args: &[&str]) -> Value {
    let out = Command::new(venv("python")).arg("-c").arg(PY).args(args).output().expect("run the venv's python");
    assert!(out.status.success(), "python {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("python printed JSON")
}

/// One YAML document of a manifest file.
#[derive(Clone, Debug)]
struct Doc {
    file: String,
    doc: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or_default()
    }
    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or_default()
    }
    fn is_crd(&self) -> bool {
        CRD_KINDS.iter().any(|(api, kind)| self.doc["apiVersion"] == *api && self.doc["kind"] == *kind)
    }
}

fn load(files: &[PathBuf]) -> Vec<Doc> {
    let args: Vec<&str> = files.iter().map(|p| p.to_str().expect("utf-8 path")).collect();
    let mut all = vec!["load"];
    all.extend(args);
    python(&all)
        .as_array()
        .expect("a list")
        .iter()
        .map(|d| Doc {
            file: Path::new(d["file"].as_str().unwrap_or_default())
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            doc: d["doc"].clone(),
        })
        .collect()
}

/// The one document of `kind` named `name`.
fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    docs.iter()
        .find(|d| d.kind() == kind && d.name() == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
}

/// kubernetes-validate, strict, over `files` for one version: `Ok(n)` with the number
/// of documents it validated, or every problem. A document whose apiVersion/kind has
/// no schema is a problem unless it is one of [`CRD_KINDS`] (kubernetes-validate only
/// warns about it, which would let `apps/v2` or `kind: Deploymnet` through).
fn kubernetes_validate(files: &[PathBuf], version: &str) -> Result<usize, String> {
    let out = Command::new(venv("kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", version])
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let mut problems = Vec::new();
    let mut passed = 0;
    for line in text.lines() {
        if line.contains(" passed for resource ") {
            passed += 1;
        } else if let Some(rest) = line.split("Couldn't find schema for kind ").nth(1) {
            // "... for kind K with api version A for kubernetes version V"
            let (kind, rest) = rest.split_once(" with api version ").unwrap_or((rest, ""));
            let api = rest.split(" for kubernetes version").next().unwrap_or_default();
            if !CRD_KINDS.contains(&(api, kind)) {
                problems.push(format!("no schema for {api} {kind} (a typo in apiVersion or kind?): {line}"));
            }
        } else if line.starts_with("ERROR") || line.contains("did not validate") {
            problems.push(line.to_string());
        }
    }
    if !out.status.success() && problems.is_empty() {
        problems.push(format!("kubernetes-validate failed:\n{text}"));
    }
    if problems.is_empty() {
        Ok(passed)
    } else {
        Err(problems.join("\n"))
    }
}

/// JSON schemas of the CRD kinds, by "apiVersion kind", written from the documented
/// specs (KEDA 2.16 ScaledObject and TriggerAuthentication with the prometheus, kafka,
/// rabbitmq and redis-streams scalers; prometheus-operator's ServiceMonitor;
/// kustomize's Kustomization) for the fields these manifests use and their
/// neighbours. Unknown keys are errors, as the strict core schemas make them.
fn crd_schemas() -> Value {
    let string = json!({ "type": "string" });
    let number_string = json!({ "type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$" });
    let bool_string = json!({ "type": "string", "enum": ["true", "false"] });
    let metadata = json!({
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": { "type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" },
            "namespace": string, "labels": { "type": "object", "additionalProperties": string },
            "annotations": { "type": "object", "additionalProperties": string },
        },
        "additionalProperties": false,
    });
    let scaler = |required: &[&str], props: Value, one_of: Option<Value>| {
        let mut s =
            json!({ "type": "object", "required": required, "properties": props, "additionalProperties": false });
        if let Some(o) = one_of {
            s["oneOf"] = o;
        }
        s
    };
    let prometheus = scaler(
        &["serverAddress", "query", "threshold"],
        json!({
            "serverAddress": { "type": "string", "pattern": "^https?://" }, "query": string,
            "threshold": number_string, "activationThreshold": number_string,
            "namespace": string, "customHeaders": string, "ignoreNullValues": bool_string,
            "queryParameters": string, "unsafeSsl": bool_string, "authModes": string,
        }),
        None,
    );
    let kafka = scaler(
        &["bootstrapServers", "consumerGroup"],
        json!({
            "bootstrapServers": string, "consumerGroup": string, "topic": string,
            "lagThreshold": number_string, "activationLagThreshold": number_string,
            "offsetResetPolicy": { "enum": ["latest", "earliest"] },
            "allowIdleConsumers": bool_string, "scaleToZeroOnInvalidOffset": bool_string,
            "excludePersistentLag": bool_string, "limitToPartitionsWithLag": bool_string,
            "version": string, "partitionLimitation": string,
            "sasl": { "enum": ["plaintext", "scram_sha256", "scram_sha512", "gssapi", "oauthbearer", "none"] },
            "tls": { "enum": ["enable", "disable"] }, "unsafeSsl": bool_string,
        }),
        None,
    );
    let rabbitmq = scaler(
        &["queueName", "mode", "value"],
        json!({
            "host": { "type": "string", "pattern": "^(amqps?|https?)://" }, "hostFromEnv": string,
            "usernameFromEnv": string, "passwordFromEnv": string,
            "protocol": { "enum": ["auto", "amqp", "http"] },
            "mode": { "enum": ["QueueLength", "MessageRate"] },
            "value": number_string, "activationValue": number_string, "queueName": string,
            "vhostName": string, "useRegex": bool_string, "excludeUnacknowledged": bool_string,
            "unsafeSsl": bool_string, "timeout": number_string,
        }),
        Some(json!([{ "required": ["host"] }, { "required": ["hostFromEnv"] }])),
    );
    let redis_streams = scaler(
        &["stream"],
        json!({
            "address": { "type": "string", "pattern": "^[^:/]+:[0-9]+$" }, "addressFromEnv": string,
            "host": string, "hostFromEnv": string, "port": number_string, "portFromEnv": string,
            "usernameFromEnv": string, "passwordFromEnv": string, "stream": string,
            "consumerGroup": string, "pendingEntriesCount": number_string,
            "streamLength": number_string, "lagCount": number_string,
            "activationLagCount": number_string, "enableTLS": bool_string,
            "unsafeSsl": bool_string, "databaseIndex": number_string,
        }),
        // lagCount needs a group (XINFO GROUPS) and, per KEDA's docs, activationLagCount.
        Some(json!([
            { "required": ["consumerGroup", "lagCount", "activationLagCount"], "not": { "anyOf": [{ "required": ["pendingEntriesCount"] }, { "required": ["streamLength"] }] } },
            { "required": ["consumerGroup", "pendingEntriesCount"], "not": { "anyOf": [{ "required": ["lagCount"] }, { "required": ["streamLength"] }] } },
            { "required": ["streamLength"], "not": { "anyOf": [{ "required": ["consumerGroup"] }, { "required": ["lagCount"] }, { "required": ["pendingEntriesCount"] }] } },
        ])),
    );
    let trigger = |kind: &str, metadata: Value| {
        json!({
            "type": "object",
            "required": ["type", "metadata"],
            "properties": {
                "type": { "const": kind }, "name": { "type": "string", "pattern": "^[a-z0-9-]+$" },
                "metadata": metadata, "useCachedMetrics": { "type": "boolean" },
                "metricType": { "enum": ["AverageValue", "Value"] },
                "authenticationRef": {
                    "type": "object", "required": ["name"], "additionalProperties": false,
                    "properties": { "name": string, "kind": { "enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"] } },
                },
            },
            "additionalProperties": false,
        })
    };
    let hpa_policies = json!({
        "type": "array", "minItems": 1,
        "items": {
            "type": "object", "required": ["type", "value", "periodSeconds"], "additionalProperties": false,
            "properties": {
                "type": { "enum": ["Pods", "Percent"] }, "value": { "type": "integer", "minimum": 1 },
                "periodSeconds": { "type": "integer", "minimum": 1, "maximum": 1800 },
            },
        },
    });
    let hpa_rules = json!({
        "type": "object", "additionalProperties": false,
        "properties": {
            "stabilizationWindowSeconds": { "type": "integer", "minimum": 0, "maximum": 3600 },
            "selectPolicy": { "enum": ["Max", "Min", "Disabled"] }, "policies": hpa_policies,
        },
    });
    let scaled_object = json!({
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": { "const": "keda.sh/v1alpha1" }, "kind": { "const": "ScaledObject" }, "metadata": metadata,
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": false,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object", "required": ["name"], "additionalProperties": false,
                        "properties": { "name": string, "apiVersion": string, "kind": string, "envSourceContainerName": string },
                    },
                    "pollingInterval": { "type": "integer", "minimum": 1 },
                    "cooldownPeriod": { "type": "integer", "minimum": 0 },
                    "initialCooldownPeriod": { "type": "integer", "minimum": 0 },
                    "idleReplicaCount": { "const": 0 },
                    "minReplicaCount": { "type": "integer", "minimum": 0 },
                    "maxReplicaCount": { "type": "integer", "minimum": 1 },
                    "fallback": {
                        "type": "object", "required": ["failureThreshold", "replicas"], "additionalProperties": false,
                        "properties": { "failureThreshold": { "type": "integer", "minimum": 1 }, "replicas": { "type": "integer", "minimum": 0 } },
                    },
                    "advanced": {
                        "type": "object", "additionalProperties": false,
                        "properties": {
                            "restoreToOriginalReplicaCount": { "type": "boolean" },
                            "horizontalPodAutoscalerConfig": {
                                "type": "object", "additionalProperties": false,
                                "properties": {
                                    "name": string,
                                    "behavior": {
                                        "type": "object", "additionalProperties": false,
                                        "properties": { "scaleUp": hpa_rules, "scaleDown": hpa_rules },
                                    },
                                },
                            },
                        },
                    },
                    "triggers": {
                        "type": "array", "minItems": 1,
                        "items": {
                            "type": "object", "required": ["type"],
                            "properties": { "type": { "enum": ["prometheus", "kafka", "rabbitmq", "redis-streams"] } },
                            "oneOf": [
                                trigger("prometheus", prometheus), trigger("kafka", kafka),
                                trigger("rabbitmq", rabbitmq), trigger("redis-streams", redis_streams),
                            ],
                        },
                    },
                },
            },
        },
        "additionalProperties": false,
    });
    let trigger_authentication = json!({
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": { "const": "keda.sh/v1alpha1" }, "kind": { "const": "TriggerAuthentication" }, "metadata": metadata,
            "spec": {
                "type": "object", "additionalProperties": false, "minProperties": 1,
                "properties": {
                    "secretTargetRef": {
                        "type": "array", "minItems": 1,
                        "items": {
                            "type": "object", "required": ["parameter", "name", "key"], "additionalProperties": false,
                            "properties": { "parameter": string, "name": string, "key": string },
                        },
                    },
                },
            },
        },
        "additionalProperties": false,
    });
    let service_monitor = json!({
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": { "const": "monitoring.coreos.com/v1" }, "kind": { "const": "ServiceMonitor" }, "metadata": metadata,
            "spec": {
                "type": "object", "required": ["selector", "endpoints"], "additionalProperties": false,
                "properties": {
                    "selector": {
                        "type": "object", "additionalProperties": false,
                        "properties": { "matchLabels": { "type": "object", "additionalProperties": string } },
                    },
                    "namespaceSelector": { "type": "object" },
                    "jobLabel": string,
                    "targetLabels": { "type": "array", "items": string },
                    "podTargetLabels": { "type": "array", "items": string },
                    "endpoints": {
                        "type": "array", "minItems": 1,
                        "items": {
                            "type": "object", "additionalProperties": false,
                            "properties": {
                                "port": string, "targetPort": {}, "path": { "type": "string", "pattern": "^/" },
                                "scheme": { "enum": ["http", "https"] },
                                "interval": { "type": "string", "pattern": "^[0-9]+(ms|s|m|h)$" },
                                "scrapeTimeout": { "type": "string", "pattern": "^[0-9]+(ms|s|m|h)$" },
                                "honorLabels": { "type": "boolean" },
                            },
                            "oneOf": [{ "required": ["port"] }, { "required": ["targetPort"] }],
                        },
                    },
                },
            },
        },
        "additionalProperties": false,
    });
    let kustomization = json!({
        "type": "object",
        "required": ["apiVersion", "kind", "resources"],
        "properties": {
            "apiVersion": { "const": "kustomize.config.k8s.io/v1beta1" }, "kind": { "const": "Kustomization" },
            "namespace": string,
            "resources": { "type": "array", "minItems": 1, "items": string, "uniqueItems": true },
            "images": {
                "type": "array",
                "items": {
                    "type": "object", "required": ["name"], "additionalProperties": false,
                    "properties": { "name": string, "newName": string, "newTag": string, "digest": string },
                },
            },
            "labels": { "type": "array" }, "commonAnnotations": { "type": "object" },
        },
        "additionalProperties": false,
    });
    json!({
        "keda.sh/v1alpha1 ScaledObject": scaled_object,
        "keda.sh/v1alpha1 TriggerAuthentication": trigger_authentication,
        "monitoring.coreos.com/v1 ServiceMonitor": service_monitor,
        "kustomize.config.k8s.io/v1beta1 Kustomization": kustomization,
    })
}

/// The CRD documents of `files` against [`crd_schemas`]: `Ok(n)` with how many were
/// checked, or every error.
fn check_crds(files: &[PathBuf], scratch: &Scratch) -> Result<usize, String> {
    let schemas = scratch.path("crd-schemas.json");
    std::fs::write(&schemas, serde_json::to_string_pretty(&crd_schemas()).expect("json")).expect("write schemas");
    let mut args = vec!["crd".to_string(), schemas.to_string_lossy().into_owned()];
    args.extend(files.iter().map(|p| p.to_string_lossy().into_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = python(&args);
    let errors: Vec<String> =
        out["errors"].as_array().expect("errors").iter().filter_map(|e| e.as_str().map(str::to_string)).collect();
    if errors.is_empty() {
        Ok(out["checked"].as_u64().unwrap_or_default() as usize)
    } else {
        Err(errors.join("\n"))
    }
}

/// Every Prometheus query of the ScaledObjects in `docs`.
fn prometheus_queries(docs: &[Doc]) -> Vec<String> {
    docs.iter()
        .filter(|d| d.kind() == "ScaledObject")
        .flat_map(|d| d.doc["spec"]["triggers"].as_array().cloned().unwrap_or_default())
        .filter(|t| t["type"] == "prometheus")
        .filter_map(|t| t["metadata"]["query"].as_str().map(str::to_string))
        .collect()
}

/// The `router_*` metrics named anywhere in `files` that the router does not export.
fn unknown_metrics(files: &[PathBuf], exported: &BTreeSet<String>) -> (BTreeSet<String>, Vec<String>) {
    let text: String =
        files.iter().map(|f| std::fs::read_to_string(f).expect("read manifest")).collect::<Vec<_>>().join("\n");
    let named = metric_names(&text);
    let unknown = not_exported(&named, exported);
    (named, unknown)
}

/// `promtool check rules` over the queries, each as a recording rule (as
/// tests/monitoring.rs does for the dashboard).
fn promql_valid(queries: &[String], scratch: &Scratch) -> Result<(), String> {
    let mut rules = String::from("groups:\n  - name: scaledobjects\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: keda:query_{i}\n        expr: {}\n",
            serde_json::to_string(q).expect("json")
        ));
    }
    let file = scratch.path("scaledobject-queries.yaml");
    std::fs::write(&file, rules).expect("write rules");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool runs (Debian's prometheus package; scripts/setup installs it)");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

#[test]
fn core_kinds_validate_strictly_against_the_kubernetes_schemas() {
    let files = yaml_files(&dir());
    let docs = load(&files);
    let core = docs.iter().filter(|d| !d.is_crd()).count();
    assert!(core >= 12, "only {core} core documents in deploy/kubernetes");
    for version in KUBERNETES_VERSIONS {
        match kubernetes_validate(&files, version) {
            Ok(passed) => assert_eq!(passed, core, "Kubernetes {version}: {passed} of {core} core documents validated"),
            Err(problems) => panic!("Kubernetes {version}:\n{problems}"),
        }
    }
}

#[test]
fn the_kustomization_lists_every_manifest_and_renders_valid_objects() {
    let files = yaml_files(&dir());
    let docs = load(&files);
    let kustomization = find(&docs, "Kustomization", "");
    let listed: BTreeSet<String> = kustomization.doc["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect();
    for name in &listed {
        assert!(dir().join(name).exists(), "kustomization.yaml lists {name}, which does not exist");
    }
    for file in &files {
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name != "kustomization.yaml" && !APPLIED_ON_THEIR_OWN.contains(&name.as_str()) {
            assert!(listed.contains(&name), "{name} is in deploy/kubernetes but not in kustomization.yaml");
        }
    }
    for name in APPLIED_ON_THEIR_OWN {
        assert!(!listed.contains(*name), "{name} is meant to be applied on its own");
    }
    // What `kubectl apply -k` would send, when kubectl (its built-in kustomize) is here.
    let Ok(out) = Command::new("kubectl").args(["kustomize"]).arg(dir()).output() else {
        eprintln!("kubectl not installed: the rendered kustomization is not checked");
        return;
    };
    assert!(out.status.success(), "kubectl kustomize failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let scratch = Scratch::new("deploy");
    let rendered = scratch.path("rendered.yaml");
    std::fs::write(&rendered, &out.stdout).expect("write rendered");
    let rendered_docs = load(std::slice::from_ref(&rendered));
    let core = rendered_docs.iter().filter(|d| !d.is_crd()).count();
    for version in KUBERNETES_VERSIONS {
        assert_eq!(
            kubernetes_validate(std::slice::from_ref(&rendered), version),
            Ok(core),
            "rendered, Kubernetes {version}"
        );
    }
    assert_eq!(check_crds(std::slice::from_ref(&rendered), &scratch), Ok(rendered_docs.len() - core));
    for d in &rendered_docs {
        assert_eq!(
            d.doc["metadata"]["namespace"] == "message-router",
            d.kind() != "Namespace",
            "{} {}",
            d.kind(),
            d.name()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("image: registry.example.com/message-router:0.1.0"), "the images: transform applies");
}

#[test]
fn crd_kinds_match_their_documented_schemas() {
    let files = yaml_files(&dir());
    let docs = load(&files);
    let crds = docs.iter().filter(|d| d.is_crd()).count();
    assert!(crds >= 5, "{crds} CRD documents");
    let scratch = Scratch::new("deploy");
    assert_eq!(check_crds(&files, &scratch), Ok(crds), "every CRD document checked, none failing");
}

#[test]
fn manifests_name_only_exported_metrics_in_valid_queries() {
    let files = yaml_files(&dir());
    let docs = load(&files);
    let (named, unknown) = unknown_metrics(&files, &exported());
    assert!(unknown.is_empty(), "named by deploy/kubernetes but not exported by the router: {unknown:?}");
    for must in ["router_in_flight", "router_backlog_messages"] {
        assert!(named.contains(must), "{must} drives the PHP-FPM ScaledObject but no manifest names it");
    }
    let queries = prometheus_queries(&docs);
    assert!(queries.len() >= 2, "{queries:?}");
    let scratch = Scratch::new("deploy");
    promql_valid(&queries, &scratch).unwrap_or_else(|e| panic!("a ScaledObject query is not valid PromQL:\n{e}"));
}

/// The env of container `container` of Deployment `deployment` as name → source:
/// `value:…`, `secret:<name>/<key>`, `field:<path>`.
fn env_of(docs: &[Doc], deployment: &str, container: &str) -> BTreeMap<String, String> {
    let c = containers(find(docs, "Deployment", deployment))
        .into_iter()
        .find(|c| c["name"] == container)
        .expect("container");
    c["env"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap_or_default().to_string();
            let from = &e["valueFrom"];
            let source = if let Some(v) = e["value"].as_str() {
                format!("value:{v}")
            } else if from["secretKeyRef"].is_object() {
                format!(
                    "secret:{}/{}",
                    from["secretKeyRef"]["name"].as_str().unwrap_or_default(),
                    from["secretKeyRef"]["key"].as_str().unwrap_or_default()
                )
            } else {
                format!("field:{}", from["fieldRef"]["fieldPath"].as_str().unwrap_or_default())
            };
            (name, source)
        })
        .collect()
}

fn containers(d: &Doc) -> Vec<Value> {
    d.doc["spec"]["template"]["spec"]["containers"].as_array().cloned().unwrap_or_default()
}

/// The `${VAR}` names of a config text (`${VAR:-default}` included).
fn referenced_vars(text: &str) -> BTreeSet<String> {
    text.split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once('}'))
        .map(|(inner, _)| inner.split(":-").next().unwrap_or(inner).to_string())
        .collect()
}

/// Seconds of a config duration such as `30s`, `1m`, `1h 30m`.
fn seconds(duration: &str) -> u64 {
    duration
        .split_whitespace()
        .map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            let n: u64 = digits.parse().expect("a number");
            match &part[digits.len()..] {
                "s" => n,
                "m" => n * 60,
                "h" => n * 3600,
                other => panic!("unit {other:?}"),
            }
        })
        .sum()
}

#[test]
fn the_configmaps_router_yaml_validates_with_the_containers_environment() {
    let files = yaml_files(&dir());
    let docs = load(&files);
    let text = find(&docs, "ConfigMap", "message-router-config").doc["data"]["router.yaml"]
        .as_str()
        .expect("router.yaml")
        .to_string();
    let secret = &find(&docs, "Secret", "message-router").doc["stringData"];
    let scratch = Scratch::new("deploy");
    let path = scratch.path("router.yaml");
    std::fs::write(&path, &text).expect("write router.yaml");
    let vars = referenced_vars(&text);
    assert!(vars.contains("POD_NAME") && vars.contains("ROUTER_ADMIN_TOKEN"), "{vars:?}");
    for (deployment, container) in [("message-router", "router"), ("php-worker", "worker")] {
        let env = env_of(&docs, deployment, container);
        let mut cmd = Command::new(router_bin());
        cmd.env_clear().args(["validate", "--config"]).arg(&path);
        for var in &vars {
            let source = env
                .get(var)
                .unwrap_or_else(|| panic!("router.yaml uses ${{{var}}}, which {deployment}'s container does not set"));
            // The Secret's placeholder, or the downward API's pod name.
            let value = match source.split_once(':') {
                Some(("secret", r)) => {
                    let (name, key) = r.split_once('/').expect("name/key");
                    assert_eq!(name, "message-router", "{var}");
                    secret[key].as_str().unwrap_or_else(|| panic!("{var}: the Secret has no key {key}")).to_string()
                }
                Some(("field", "metadata.name")) => format!("{deployment}-7c9f8d6b5-x2x4q"),
                Some(("value", v)) => v.to_string(),
                _ => panic!("{var}: {source}"),
            };
            cmd.env(var, value);
        }
        let out = cmd.output().expect("run message-router validate");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success(),
            "message-router validate refuses the ConfigMap's router.yaml ({deployment}'s env):\n{stdout}{stderr}"
        );
        assert!(stdout.contains("OK (3 transports, 1 handlers, 3 subscriptions, 1 routes)"), "{stdout}");
    }
}

/// The ConfigMap's router.yaml as JSON.
fn router_config(docs: &[Doc], scratch: &Scratch) -> Value {
    let text = find(docs, "ConfigMap", "message-router-config").doc["data"]["router.yaml"]
        .as_str()
        .expect("router.yaml")
        .to_string();
    let path = scratch.path("router-config.yaml");
    std::fs::write(&path, text).expect("write");
    load(&[path]).remove(0).doc
}

/// Labels `selector` (matchLabels, or a Service's plain map) selects.
fn selects(selector: &Value, labels: &Value) -> bool {
    let wanted = selector.get("matchLabels").unwrap_or(selector).as_object().cloned().unwrap_or_default();
    !wanted.is_empty() && wanted.iter().all(|(k, v)| &labels[k] == v)
}

#[test]
fn the_manifests_agree_with_each_other() {
    let files = yaml_files(&dir());
    let docs = load(&files);
    let scratch = Scratch::new("deploy");
    let config = router_config(&docs, &scratch);
    let router = find(&docs, "Deployment", "message-router");
    let pod = &router.doc["spec"]["template"]["spec"];
    let router_containers = containers(router);
    let c = &router_containers[0];

    // The command, and the ConfigMap mounted as a directory (a subPath mount never
    // sees an update, so a reload could not happen).
    assert_eq!(c["args"], json!(["run", "--config", "/etc/message-router/router.yaml"]));
    let mount = c["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["mountPath"] == "/etc/message-router")
        .expect("config mount");
    assert!(mount.get("subPath").is_none(), "the config must not be mounted with subPath");
    let volume =
        pod["volumes"].as_array().expect("volumes").iter().find(|v| v["name"] == mount["name"]).expect("config volume");
    assert_eq!(volume["configMap"]["name"], "message-router-config");

    // The grace periods: the kubelet's SIGKILL comes after the router's own drain.
    let grace = seconds(config["shutdown"]["grace_period"].as_str().expect("shutdown.grace_period"));
    let termination = pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    assert!(
        termination > grace,
        "terminationGracePeriodSeconds {termination} must be above shutdown.grace_period {grace}s"
    );
    let worker = find(&docs, "Deployment", "php-worker");
    assert!(worker.doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64() > Some(grace));
    let handler_timeout = seconds(config["handlers"]["php"]["timeout"].as_str().expect("timeout"));
    let fpm = find(&docs, "Deployment", "php-fpm");
    assert!(fpm.doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64() > Some(handler_timeout));

    // The admin listener, its probes, its Service, the scrape annotations.
    let listen = config["admin"]["listen"].as_str().expect("admin.listen");
    assert!(listen.starts_with("0.0.0.0:"), "admin.listen {listen}: probes come from outside the pod");
    assert_eq!(config["admin"]["token"], "${ROUTER_ADMIN_TOKEN}");
    let port: u64 = listen.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    let admin = c["ports"].as_array().expect("ports").iter().find(|p| p["name"] == "admin").expect("admin port");
    assert_eq!(admin["containerPort"].as_u64(), Some(port));
    assert_eq!(c["livenessProbe"]["httpGet"], json!({ "path": "/healthz", "port": "admin" }));
    assert_eq!(c["readinessProbe"]["httpGet"], json!({ "path": "/readyz", "port": "admin" }));
    let annotations = &router.doc["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let service = find(&docs, "Service", "message-router-admin");
    assert_eq!(service.doc["spec"]["ports"][0]["targetPort"], "admin");
    let monitor = find(&docs, "ServiceMonitor", "message-router");
    assert!(
        selects(&monitor.doc["spec"]["selector"], &service.doc["metadata"]["labels"]),
        "the ServiceMonitor selects the admin Service"
    );
    assert_eq!(monitor.doc["spec"]["endpoints"][0]["port"], service.doc["spec"]["ports"][0]["name"]);
    assert_eq!(monitor.doc["spec"]["endpoints"][0]["path"], "/metrics");
    // The label the ScaledObjects' queries select on comes from the pod's labels.
    assert_eq!(monitor.doc["spec"]["podTargetLabels"], json!(["app.kubernetes.io/name"]));
    assert_eq!(router.doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"], "message-router");
    for q in prometheus_queries(&docs) {
        assert!(q.contains(r#"app_kubernetes_io_name="message-router""#), "{q}");
    }

    // The Redis consumer is the pod's name.
    for (name, t) in config["transports"].as_object().expect("transports") {
        if t["type"] == "redis" {
            assert_eq!(t["consumer"], "${POD_NAME}", "transports.{name}.consumer");
        }
    }
    for (deployment, container) in [("message-router", "router"), ("php-worker", "worker")] {
        assert_eq!(
            env_of(&docs, deployment, container).get("POD_NAME").map(String::as_str),
            Some("field:metadata.name")
        );
    }

    // Every secret reference names a key the Secret has.
    let secret = find(&docs, "Secret", "message-router");
    let keys: BTreeSet<&String> = secret.doc["stringData"].as_object().expect("stringData").keys().collect();
    for (deployment, container) in [("message-router", "router"), ("php-worker", "worker"), ("php-fpm", "php-fpm")] {
        for (var, source) in env_of(&docs, deployment, container) {
            if let Some(r) = source.strip_prefix("secret:") {
                let (name, key) = r.split_once('/').expect("name/key");
                assert!(
                    name == "message-router" && keys.contains(&key.to_string()),
                    "{deployment}: {var} from {r}: no such Secret key"
                );
            }
        }
    }
    let auth = find(&docs, "TriggerAuthentication", "message-router-kafka");
    for r in auth.doc["spec"]["secretTargetRef"].as_array().expect("refs") {
        assert!(
            r["name"] == "message-router" && keys.contains(&r["key"].as_str().unwrap_or_default().to_string()),
            "{r}"
        );
    }

    // Services, PDBs and the ServiceMonitor select pods that exist; every container
    // has requests and a memory limit.
    let deployments: Vec<&Doc> = docs.iter().filter(|d| d.kind() == "Deployment").collect();
    for d in docs.iter().filter(|d| ["Service", "PodDisruptionBudget"].contains(&d.kind())) {
        let selector = &d.doc["spec"]["selector"];
        assert!(
            deployments.iter().any(|dep| selects(selector, &dep.doc["spec"]["template"]["metadata"]["labels"])),
            "{}: {} {} selects no Deployment's pods",
            d.file,
            d.kind(),
            d.name()
        );
    }
    for dep in &deployments {
        assert!(
            selects(&dep.doc["spec"]["selector"], &dep.doc["spec"]["template"]["metadata"]["labels"]),
            "{}",
            dep.name()
        );
        for c in containers(dep) {
            assert!(
                c["resources"]["requests"]["cpu"].is_string() && c["resources"]["requests"]["memory"].is_string(),
                "{}: requests",
                dep.name()
            );
            assert!(c["resources"]["limits"]["memory"].is_string(), "{}: memory limit", dep.name());
        }
        assert!(
            docs.iter().any(|d| d.kind() == "PodDisruptionBudget"
                && selects(&d.doc["spec"]["selector"], &dep.doc["spec"]["template"]["metadata"]["labels"])),
            "{} has no PodDisruptionBudget",
            dep.name()
        );
    }

    // The FastCGI handler reaches the PHP-FPM Service's port.
    let endpoints = config["handlers"]["php"]["endpoints"].as_array().expect("endpoints");
    assert_eq!(config["handlers"]["php"]["type"], "fastcgi");
    let fpm_service = find(&docs, "Service", "php-fpm");
    assert_eq!(endpoints, &[json!(format!("tcp://php-fpm:{}", fpm_service.doc["spec"]["ports"][0]["port"]))]);

    // ScaledObjects: their targets exist and have no `replicas` of their own (every
    // apply would reset the autoscaler's count); their triggers watch the
    // subscriptions of router.yaml and read env vars and auth objects that exist.
    let subscriptions = config["subscriptions"].as_object().expect("subscriptions");
    let transport_type = |s: &Value| {
        config["transports"][s["transport"].as_str().unwrap_or_default()]["type"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    for so in docs.iter().filter(|d| d.kind() == "ScaledObject") {
        let target = so.doc["spec"]["scaleTargetRef"]["name"].as_str().expect("target");
        let dep = find(&docs, "Deployment", target);
        assert!(
            dep.doc["spec"].get("replicas").is_none(),
            "{target} is scaled by ScaledObject {} and must not set replicas",
            so.name()
        );
        let container = match so.doc["spec"]["scaleTargetRef"]["envSourceContainerName"].as_str() {
            Some(c) => c.to_string(),
            None => containers(dep)[0]["name"].as_str().unwrap_or_default().to_string(),
        };
        let env = env_of(&docs, target, &container);
        for t in so.doc["spec"]["triggers"].as_array().expect("triggers") {
            let m = &t["metadata"];
            for (k, v) in m.as_object().expect("metadata") {
                if k.ends_with("FromEnv") {
                    assert!(
                        env.contains_key(v.as_str().unwrap_or_default()),
                        "{}: {k}: {v} is not in {target}'s env",
                        so.name()
                    );
                }
            }
            if let Some(name) = t["authenticationRef"]["name"].as_str() {
                find(&docs, "TriggerAuthentication", name);
            }
            let watched = |kind: &str, check: &dyn Fn(&Value) -> bool| {
                assert!(
                    subscriptions.values().any(|s| transport_type(s) == kind && check(s)),
                    "ScaledObject {}: the {} trigger {m} watches no {kind} subscription of router.yaml",
                    so.name(),
                    t["type"]
                )
            };
            match t["type"].as_str().unwrap_or_default() {
                "kafka" => watched("kafka", &|s| {
                    s["group"] == m["consumerGroup"]
                        && s["topics"].as_array().is_some_and(|ts| ts.contains(&m["topic"]))
                }),
                "rabbitmq" => watched("amqp", &|s| s["queue"] == m["queueName"]),
                "redis-streams" => watched("redis", &|s| {
                    s["group"] == m["consumerGroup"]
                        && s["streams"].as_array().is_some_and(|ss| ss.contains(&m["stream"]))
                }),
                "prometheus" => {}
                other => panic!("unexpected trigger {other}"),
            }
        }
    }
    // The routers scale on broker lag, the handlers on the routers' metrics.
    let triggers = |name: &str| -> BTreeSet<String> {
        find(&docs, "ScaledObject", name).doc["spec"]["triggers"]
            .as_array()
            .expect("triggers")
            .iter()
            .filter_map(|t| t["type"].as_str().map(str::to_string))
            .collect()
    };
    assert_eq!(triggers("message-router"), ["kafka", "rabbitmq", "redis-streams"].map(String::from).into());
    assert_eq!(triggers("php-fpm"), ["prometheus"].map(String::from).into());
}

#[test]
fn broken_manifests_are_refused() {
    let files = yaml_files(&dir());
    let scratch = Scratch::new("deploy-broken");
    let read = |name: &str| std::fs::read_to_string(dir().join(name)).expect("read");
    let write = |name: &str, text: String| {
        let path = scratch.path(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let broken = |text: &str, from: &str, to: &str| {
        assert!(text.contains(from), "{from:?} not found: update this test");
        text.replacen(from, to, 1)
    };
    let router = read("router.yaml");
    let version = KUBERNETES_VERSIONS[0];

    // A misspelt field, a wrong type, a wrong apiVersion: the strict core schemas.
    for (what, from, to, want) in [
        ("unknown field", "path: /healthz,", "pathh: /healthz,", "'pathh' was unexpected"),
        (
            "wrong type",
            "terminationGracePeriodSeconds: 45",
            "terminationGracePeriodSeconds: soon",
            "terminationGracePeriodSeconds",
        ),
        ("unknown apiVersion", "apiVersion: apps/v1", "apiVersion: apps/v2", "no schema for apps/v2 Deployment"),
    ] {
        let file = write("router.yaml", broken(&router, from, to));
        let err = kubernetes_validate(&[file], version).expect_err(what);
        assert!(err.contains(want), "{what}: {err}");
    }

    // A ScaledObject with a number where KEDA wants a string, an unknown trigger key,
    // a redis lag trigger without its activation count, and an unknown spec key.
    let scaling = read("autoscaling.yaml");
    for (what, from, to, want) in [
        ("number threshold", r#"threshold: "8""#, "threshold: 8", "ScaledObject php-fpm: spec.triggers.0"),
        ("unknown metadata key", "lagThreshold:", "lagTreshold:", "ScaledObject message-router: spec.triggers.0"),
        ("lagCount alone", "\n        activationLagCount: \"100\"", "", "ScaledObject message-router: spec.triggers.2"),
        ("unknown spec key", "  pollingInterval: 15", "  pollingIntervall: 15", "'pollingIntervall' was unexpected"),
    ] {
        let file = write("autoscaling.yaml", broken(&scaling, from, to));
        let err = check_crds(&[file], &scratch).expect_err(what);
        assert!(err.contains(want), "{what}: {err}");
    }

    // A metric the router does not export; a query that is not PromQL.
    let file = write("autoscaling.yaml", broken(&scaling, "sum(router_in_flight{", "sum(router_inflight{"));
    let (_, unknown) = unknown_metrics(std::slice::from_ref(&file), &exported());
    assert_eq!(unknown, vec!["router_inflight".to_string()]);
    let queries = prometheus_queries(&load(&[file]));
    assert!(promql_valid(&[format!("{})", queries[0])], &scratch).is_err(), "an unbalanced query passes promtool");

    // The real files still pass: the failures above are the edits'.
    assert!(kubernetes_validate(&files, version).is_ok());
}

#[test]
fn the_dockerfiles_are_multi_stage_and_run_as_non_root() {
    let docker = root().join("deploy/docker");
    let workspace = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    let rust_version: Vec<u32> = workspace
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("rust-version")
        .trim_matches('"')
        .split('.')
        .map(|n| n.parse().expect("number"))
        .collect();
    for (file, package) in [("daemon.Dockerfile", "router-daemon"), ("php-worker.Dockerfile", "router-php")] {
        let text = std::fs::read_to_string(docker.join(file)).expect("Dockerfile");
        assert!(text.contains("NOT BUILT HERE"), "{file} says it was never built");
        let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
        assert_eq!(froms.len(), 2, "{file}: a builder and a runtime stage: {froms:?}");
        let builder = froms[0].split_whitespace().nth(1).expect("image");
        let tag = builder
            .strip_prefix("rust:")
            .and_then(|t| t.strip_suffix("-bookworm"))
            .unwrap_or_else(|| panic!("{file}: builder {builder}"));
        let tag: Vec<u32> = tag.split('.').map(|n| n.parse().expect("rust:1.NN")).collect();
        assert!(tag >= rust_version[..2].to_vec(), "{file}: {builder} is older than rust-version {rust_version:?}");
        assert_eq!(froms[1], "FROM debian:bookworm-slim", "{file}");
        assert!(text.contains(&format!("cargo build --release --locked -p {package}")), "{file}");
        assert!(text.contains("COPY --from=build"), "{file}");
        let runtime = &text[text.rfind("FROM ").expect("FROM")..];
        assert!(runtime.contains("ca-certificates"), "{file}: ca-certificates in the runtime stage");
        assert!(runtime.lines().any(|l| l == "USER 10001:10001"), "{file}: the runtime runs as uid 10001");
        assert!(docker.join(format!("{file}.dockerignore")).exists(), "{file}: its .dockerignore keeps target/ out");
    }
    // The uid the Deployments run as is the images' user.
    let docs = load(&yaml_files(&dir()));
    for name in ["message-router", "php-worker"] {
        assert_eq!(
            find(&docs, "Deployment", name).doc["spec"]["template"]["spec"]["securityContext"]["runAsUser"],
            10001,
            "{name}"
        );
    }
}
