//! The deployment files under deploy/, each checked by a tool, and against the code: the
//! Kubernetes manifests and the systemd unit grant exactly the capabilities `collector check`
//! lists, and every metric the dashboard and the alerts query is one the agent exports.

mod support;

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use support::COLLECTOR;

fn deploy(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(deploy(relative)).unwrap()
}

fn run_ok(command: &mut Command, what: &str) -> String {
    let out = command
        .output()
        .unwrap_or_else(|err| panic!("{what}: {err} (cargo xtask prereqs installs it)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what}:\n{text}");
    text
}

/// The documents of a YAML file as JSON, parsed by `PyYAML` (yamllint's own parser).
fn yaml(relative: &str) -> Vec<serde_json::Value> {
    let out = run_ok(
        // Debian's, which yamllint's package brings PyYAML to; another python3 first on
        // PATH (pyenv's) may lack it.
        Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
            ])
            .arg(deploy(relative)),
        "python3 with PyYAML (yamllint needs both)",
    );
    serde_json::from_str(&out).unwrap()
}

/// The pod spec of a manifest's workload (its `DaemonSet` or `Deployment`).
fn pod_spec(manifest: &str) -> serde_json::Value {
    let workload = yaml(manifest)
        .into_iter()
        .find(|doc| matches!(doc["kind"].as_str(), Some("DaemonSet" | "Deployment")))
        .unwrap_or_else(|| panic!("{manifest}: no DaemonSet or Deployment"));
    workload["spec"]["template"]["spec"].clone()
}

/// The collector's container in a pod spec: an ordinary container (the `DaemonSet`'s) or a
/// native sidecar, an init container (the sidecar example's).
fn collector_container(spec: &serde_json::Value) -> &serde_json::Value {
    ["containers", "initContainers"]
        .iter()
        .filter_map(|list| spec[*list].as_array())
        .flatten()
        .find(|c| c["name"] == "collector")
        .expect("a container named collector")
}

/// The capabilities `collector check` requires on a host where bpffs and cgroup2 are mounted
/// (as the manifests mount them), without the `CAP_` prefix.
fn checked_capabilities() -> BTreeSet<String> {
    let out = Command::new(COLLECTOR).arg("check").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| !line.starts_with("skip"))
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter_map(|name| name.strip_prefix("CAP_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_yaml_files_pass_yamllint() {
    run_ok(
        Command::new("yamllint")
            .arg("-c")
            .arg(deploy(".yamllint"))
            .arg(deploy("kubernetes"))
            .arg(deploy("prometheus")),
        "yamllint",
    );
}

#[test]
fn the_kubernetes_manifests_grant_what_check_lists_and_probe_the_health_endpoints() {
    let capabilities = checked_capabilities();
    assert_eq!(capabilities.len(), 3, "{capabilities:?}");
    assert!(!capabilities.contains("SYS_ADMIN"), "{capabilities:?}");
    let listed: Vec<String> = capabilities.iter().map(|c| format!("\"{c}\"")).collect();
    for manifest in ["kubernetes/daemonset.yaml", "kubernetes/sidecar.yaml"] {
        let text = read(manifest);
        let add = text
            .lines()
            .find_map(|line| line.trim().strip_prefix("add: ["))
            .unwrap_or_else(|| panic!("{manifest}: no capabilities added"));
        let added: BTreeSet<&str> = add.trim_end_matches(']').split(", ").collect();
        let expected: BTreeSet<&str> = listed.iter().map(String::as_str).collect();
        assert_eq!(added, expected, "{manifest}");
        for needed in [
            "drop: [\"ALL\"]",
            "privileged: false",
            "path: /healthz",
            "mountPath: /sys/fs/bpf",
            // A directory of the host's bpffs, not all of it (no other tool's pins).
            "path: /sys/fs/bpf/collectors\n            type: DirectoryOrCreate",
            "mountPath: /sys/fs/cgroup",
            "mountPath: /etc/collector/tls",
            "scheme: HTTPS",
            "bearer_token_file",
        ] {
            assert!(
                text.contains(needed)
                    || manifest.contains("sidecar") && needed == "bearer_token_file",
                "{manifest} lacks {needed}"
            );
        }
    }
    for manifest in ["kubernetes/daemonset.yaml", "kubernetes/sidecar.yaml"] {
        // The runtime's default AppArmor profile denies writes under /sys/fs/bpf, and
        // SELinux's container_t may not create files on bpffs: pinning would fail. Runtime
        // default seccomp profiles allow bpf() only with SYS_ADMIN: loading would.
        let spec = pod_spec(manifest);
        let security = &collector_container(&spec)["securityContext"];
        assert_eq!(
            security["appArmorProfile"]["type"], "Unconfined",
            "{manifest}"
        );
        assert_eq!(security["seLinuxOptions"]["type"], "spc_t", "{manifest}");
        assert_eq!(
            security["seccompProfile"]["type"], "Unconfined",
            "{manifest}"
        );
    }
    // The DaemonSet is Ready once its programs are attached and read.
    let daemonset = pod_spec("kubernetes/daemonset.yaml");
    let collector = collector_container(&daemonset);
    assert_eq!(collector["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(collector["livenessProbe"]["httpGet"]["path"], "/healthz");
    // A slow start is given minutes before liveness counts, as systemd gives it.
    let startup = &collector["startupProbe"];
    assert_eq!(startup["httpGet"]["path"], "/healthz");
    let budget =
        startup["periodSeconds"].as_u64().unwrap() * startup["failureThreshold"].as_u64().unwrap();
    assert!(budget >= 300, "{budget} s for a start");
    assert!(read("kubernetes/daemonset.yaml").contains("hostNetwork: true"));
    for (manifest, ip) in [
        ("kubernetes/daemonset.yaml", "NODE_IP"),
        ("kubernetes/sidecar.yaml", "POD_IP"),
    ] {
        // Settings as environment, which `kubectl exec` commands inherit.
        let spec = pod_spec(manifest);
        let container = collector_container(&spec);
        assert_eq!(container["args"], serde_json::json!(["run"]), "{manifest}");
        let env = environment(container);
        assert_eq!(
            setting(&env, "COLLECTOR_CONFIG"),
            "/etc/collector/collector.toml",
            "{manifest}"
        );
        assert_eq!(
            setting(&env, "COLLECTOR_LISTEN"),
            format!("$({ip}):9464"),
            "{manifest}"
        );
        // `$(X_IP):9464` is refused for an IPv6 address: each manifest says how.
        assert!(
            read(manifest).contains(&format!("\"[$({ip})]:9464\"")),
            "{manifest}"
        );
    }
    // One collector per pin directory: each sidecar pod pins under its own.
    let sidecar = pod_spec("kubernetes/sidecar.yaml");
    let env = environment(collector_container(&sidecar));
    assert_eq!(
        setting(&env, "COLLECTOR_PIN_DIR"),
        "/sys/fs/bpf/collector-$(POD_UID)",
        "the sidecar needs a pin directory of its own pod"
    );
    assert_eq!(setting(&env, "POD_UID"), "fieldRef metadata.uid");
}

/// A container's environment in order: each variable's value, or `fieldRef PATH` for one
/// taken from the pod. Each `$(NAME)` in a value names a variable above it: Kubernetes
/// leaves any other as written (`--listen $(NODE_IP):9464` would then be refused).
fn environment(container: &serde_json::Value) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for variable in container["env"].as_array().expect("an env list") {
        let name = variable["name"].as_str().unwrap().to_owned();
        let value = match variable["value"].as_str() {
            Some(value) => value.to_owned(),
            None => format!(
                "fieldRef {}",
                variable["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{variable}"))
            ),
        };
        for reference in value.split("$(").skip(1) {
            let referred = reference.split(')').next().unwrap();
            assert!(
                env.iter().any(|(above, _)| above == referred),
                "{name} refers to $({referred}), which no variable above it sets"
            );
        }
        env.push((name, value));
    }
    env
}

/// The value of `name` in `env`.
fn setting<'a>(env: &'a [(String, String)], name: &str) -> &'a str {
    env.iter().find(|(set, _)| set == name).map_or_else(
        || panic!("no {name} in {env:?}"),
        |(_, value)| value.as_str(),
    )
}

/// The sidecar is a native sidecar, stopped after the proxy, and never gates it.
#[test]
fn the_sidecar_is_native_and_never_gates_the_proxy() {
    // The sidecar must never gate the proxy: a pod is Ready only when every container is,
    // and a container with a startup probe is not Ready until that passes. A volume the pod
    // lacks holds it, proxy included, in ContainerCreating.
    let sidecar = pod_spec("kubernetes/sidecar.yaml");
    let collector = collector_container(&sidecar);
    for gate in ["readinessProbe", "startupProbe"] {
        assert!(
            collector.get(gate).is_none(),
            "the sidecar's {gate} gates the proxy pod's readiness"
        );
    }
    // A native sidecar (an init container with restartPolicy Always), which the kubelet stops
    // after the proxy: an ordinary container stopped at once while the proxy drained, and its
    // pod's target read up 0 (CollectorDown) on every rollout. The proxy starts once the
    // collector runs: a postStart hook would hold it back as a startup probe would.
    let native = sidecar["initContainers"].as_array().map_or(0, |init| {
        init.iter()
            .filter(|c| c["name"] == "collector" && c["restartPolicy"] == "Always")
            .count()
    });
    assert_eq!(native, 1, "the collector is not a native sidecar");
    assert!(
        sidecar["containers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["name"] != "collector"),
        "the collector is an ordinary container too"
    );
    assert_eq!(
        sidecar["initContainers"].as_array().unwrap().len(),
        1,
        "an init container before the collector delays its start, one after it the proxy's"
    );
    assert!(collector["lifecycle"]["postStart"].is_null());
    // Before Kubernetes 1.29 the field is dropped and the init container never ends: the
    // manifest says what to do there instead.
    let text = read("kubernetes/sidecar.yaml");
    assert!(
        text.contains("Before 1.29") && text.contains("preStop"),
        "the sidecar says nothing of Kubernetes before 1.29"
    );
    assert_eq!(collector["livenessProbe"]["httpGet"]["path"], "/healthz");
    let mut optional = 0;
    for volume in sidecar["volumes"].as_array().unwrap() {
        if let Some(source) = volume.get("secret").or_else(|| volume.get("configMap")) {
            assert_eq!(
                source["optional"], true,
                "the sidecar's volume {} would hold the proxy back",
                volume["name"]
            );
            optional += 1;
        }
    }
    assert_eq!(optional, 3, "the config, token and tls volumes");
}

/// What a production rollout needs of the manifests: probes that a loaded node answers in
/// time, an image that names one build, and room for the slowest stop.
#[test]
fn the_manifests_give_a_rollout_what_it_needs() {
    // The stop's worst: 5 s for HTTP requests under way, a killed nft and the table's
    // removal at the ConfigMap's nft_timeout_ms each, the runtime's second; twice that, for a
    // SIGTERM that waits for a start's attach. A kill past it leaves the programs attached.
    let configmap = yaml("kubernetes/daemonset.yaml")
        .into_iter()
        .find(|doc| doc["kind"] == "ConfigMap")
        .expect("the DaemonSet's ConfigMap");
    let config: toml::Table =
        toml::from_str(configmap["data"]["collector.toml"].as_str().unwrap()).unwrap();
    let nft_timeout_s = config
        .get("nftables")
        .and_then(|nft| nft.get("nft_timeout_ms"))
        .and_then(toml::Value::as_integer)
        .map_or(10, |ms| u64::try_from(ms).unwrap().div_ceil(1000));
    let worst_stop = 5 + 2 * nft_timeout_s + 1;
    for manifest in ["kubernetes/daemonset.yaml", "kubernetes/sidecar.yaml"] {
        let spec = pod_spec(manifest);
        let container = collector_container(&spec);
        // The kubelet's default of 1 s fails a loaded node's TLS handshake now and then.
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            if container[probe].is_object() {
                let timeout = container[probe]["timeoutSeconds"].as_u64().unwrap_or(1);
                assert!(timeout >= 5, "{manifest} {probe}: {timeout} s");
            }
        }
        // One build, not pulled at every start: a digest, or a tag other than latest (a
        // name without one is latest).
        let image = container["image"].as_str().unwrap();
        let name = image.rsplit('/').next().unwrap();
        let tag = name.split_once(':').map(|(_, tag)| tag);
        assert!(
            image.contains("@sha256:") || tag.is_some_and(|tag| tag != "latest"),
            "{manifest}: {image}"
        );
        assert_eq!(container["imagePullPolicy"], "IfNotPresent", "{manifest}");
        // /healthz fails on a stalled poll loop, most likely a poll stuck in a read, where
        // the agent cannot act on the SIGTERM: the kill comes after the probe's own grace,
        // not the pod's (330 s in the sidecar, for the proxy's drain), and still leaves a
        // clean stop its time.
        let probe_grace = container["livenessProbe"]["terminationGracePeriodSeconds"].as_u64();
        assert!(
            probe_grace.is_some_and(|grace| (worst_stop..=30).contains(&grace)),
            "{manifest}: liveness kill after {probe_grace:?} s, a stop taking up to {worst_stop} s"
        );
        assert!(
            container["resources"]["requests"]["memory"]
                .as_str()
                .is_some_and(|request| request
                    .strip_suffix("Mi")
                    .and_then(|mi| mi.parse::<u64>().ok())
                    .is_some_and(|mi| mi >= 80)),
            "{manifest}: the request leaves out the maps of a node of 192 CPUs"
        );
    }
    let daemonset = pod_spec("kubernetes/daemonset.yaml");
    let grace = daemonset["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace >= 2 * worst_stop,
        "{grace} s for a stop of up to {worst_stop} s"
    );
    let unit = read("systemd/collector.service");
    assert!(
        unit.contains(&format!("\nTimeoutStopSec={grace}s\n")),
        "the unit gives the stop other than the DaemonSet's {grace} s"
    );
    assert!(
        pod_spec("kubernetes/sidecar.yaml")["terminationGracePeriodSeconds"]
            .as_u64()
            .is_some_and(|grace| grace >= 300 + worst_stop),
        "the sidecar's pod leaves the collector no time after a 300 s drain"
    );
}

#[test]
fn the_daemonset_config_is_valid_and_watches_every_up_interface() {
    let configmap = yaml("kubernetes/daemonset.yaml")
        .into_iter()
        .find(|doc| doc["kind"] == "ConfigMap")
        .expect("the DaemonSet's ConfigMap");
    let toml = configmap["data"]["collector.toml"].as_str().unwrap();
    // Node NIC names differ (eth0, ens5, enp0s3, bond0) and a listed name a node lacks goes
    // uncounted there: the DaemonSet leaves `interfaces` to the default, every up interface
    // (absent or empty).
    let config: toml::Table = toml::from_str(toml).unwrap();
    let interfaces = config.get("interfaces");
    assert!(
        interfaces.is_none_or(|list| list.as_array().is_some_and(Vec::is_empty)),
        "interfaces = {}",
        interfaces.unwrap()
    );
    // The agent's own check, as a pipeline would run it on the ConfigMap, with the address
    // the pods listen on (`COLLECTOR_LISTEN`, `$(NODE_IP):9464`), given as the pods give it:
    // valid, and nothing a start would warn of.
    let scratch = support::ScratchDir::new("configmap");
    let dir = &scratch.0;
    let path = dir.join("collector.toml");
    std::fs::write(&path, toml).unwrap();
    let env = environment(collector_container(&pod_spec("kubernetes/daemonset.yaml")));
    let out = Command::new(COLLECTOR)
        .args(["check", "--config-only"])
        .env(
            "COLLECTOR_LISTEN",
            setting(&env, "COLLECTOR_LISTEN").replace("$(NODE_IP)", "192.0.2.1"),
        )
        .env("COLLECTOR_CONFIG", &path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.is_empty(), "{out:?}");
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_and_grants_what_check_lists() {
    let unit = read("systemd/collector.service");
    let capabilities = checked_capabilities();
    for key in ["CapabilityBoundingSet=", "AmbientCapabilities="] {
        let granted: BTreeSet<String> = unit
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key}"))
            .split_whitespace()
            .map(|c| c.trim_start_matches("CAP_").to_owned())
            .collect();
        assert_eq!(granted, capabilities, "{key}");
    }
    // systemd-analyze checks that ExecStart exists: point it at the binary under test.
    let scratch = support::ScratchDir::new("unit");
    let dir = &scratch.0;
    let path = dir.join("collector.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/collector", COLLECTOR)).unwrap();
    run_ok(
        Command::new("systemd-analyze").arg("verify").arg(&path),
        "systemd-analyze verify",
    );
}

#[test]
fn the_kubernetes_scrape_job_finds_the_manifests_collectors_and_passes_promtool() {
    let mut config = yaml("prometheus/kubernetes.yml").remove(0);
    let job = &config["scrape_configs"][0];
    assert_eq!(job["scheme"], "https");
    assert!(
        job["authorization"]["credentials_file"].is_string(),
        "{job}"
    );
    assert!(job["tls_config"]["ca_file"].is_string(), "{job}");
    let discovery = &job["kubernetes_sd_configs"][0];
    assert_eq!(discovery["role"], "pod");
    let relabel = job["relabel_configs"].as_array().unwrap();
    let keep = relabel
        .iter()
        .find(|r| r["action"] == "keep")
        .expect("a keep");
    assert_eq!(
        keep["source_labels"],
        serde_json::json!([
            "__meta_kubernetes_pod_container_name",
            "__meta_kubernetes_pod_container_port_name"
        ])
    );
    // The DaemonSet's pods and the sidecars: their namespace, container and port.
    for manifest in ["kubernetes/daemonset.yaml", "kubernetes/sidecar.yaml"] {
        let workload = yaml(manifest)
            .into_iter()
            .find(|doc| matches!(doc["kind"].as_str(), Some("DaemonSet" | "Deployment")))
            .unwrap();
        let namespace = &workload["metadata"]["namespace"];
        assert!(
            discovery["namespaces"]["names"]
                .as_array()
                .unwrap()
                .contains(namespace),
            "{manifest}: {namespace} is not discovered"
        );
        let spec = pod_spec(manifest);
        let container = collector_container(&spec);
        let port = container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["containerPort"] == 9464)
            .expect("the metrics port");
        let matched = format!(
            "{};{}",
            container["name"].as_str().unwrap(),
            port["name"].as_str().unwrap()
        );
        assert_eq!(keep["regex"], matched, "{manifest}");
    }

    // The sidecar is an init container: a job that dropped those would lose it.
    assert!(
        relabel.iter().all(|r| !r
            .to_string()
            .contains("__meta_kubernetes_pod_container_init")),
        "{relabel:?}"
    );

    // Every scrape job sets the label the alerts select on, whatever the job is called.
    assert!(
        relabel
            .iter()
            .any(|r| r["target_label"] == "exporter" && r["replacement"] == "collector"),
        "{relabel:?}"
    );
    let loopback = yaml("prometheus/prometheus.yml").remove(0);
    assert_eq!(
        loopback["scrape_configs"][0]["static_configs"][0]["labels"]["exporter"],
        "collector"
    );
    let alerts = read("prometheus/alerts.yml");
    let collector_down = yaml("prometheus/alerts.yml")[0]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap().clone())
        .find(|rule| rule["alert"] == "CollectorDown")
        .unwrap();
    let expr = collector_down["expr"].as_str().unwrap();
    assert!(
        expr.starts_with("up{exporter=\"collector\"} == 0"),
        "{expr}"
    );
    assert!(alerts.contains("expr: absent(up{exporter=\"collector\"})"));
    assert!(!alerts.contains("job="));

    // Debian's promtool is built without Kubernetes discovery: the rest of the job (scheme,
    // authorization, TLS, relabelings) is checked with file discovery in its place, syntax
    // only (the credential files are the Prometheus pod's).
    let job = &mut config["scrape_configs"][0];
    job.as_object_mut().unwrap().remove("kubernetes_sd_configs");
    job["file_sd_configs"] = serde_json::json!([{ "files": ["targets.json"] }]);
    let scratch = support::ScratchDir::new("kubernetes");
    let dir = &scratch.0;
    let path = dir.join("kubernetes.yml");
    std::fs::write(&path, config.to_string()).unwrap();
    run_ok(
        Command::new("promtool")
            .args(["check", "config", "--syntax-only"])
            .arg(&path),
        "promtool check config (the Kubernetes job, file discovery in its place)",
    );
}

/// A section of README.md: from its `## heading` line to the next `## ` heading.
fn readme_section(heading: &str) -> String {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let start = readme
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("README.md has no section {heading}"));
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |at| at + 4);
    rest[..end].to_owned()
}

/// The fenced code blocks of a Markdown text whose info string is `lang`.
fn fenced_blocks(text: &str, lang: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(&format!("```{lang}\n")) {
        let body = &rest[at + lang.len() + 4..];
        let end = body.find("```").expect("a closed code block");
        blocks.push(body[..end].to_owned());
        rest = &body[end + 3..];
    }
    blocks
}

/// The server name Prometheus checks the collectors' certificate for (kubernetes.yml's and
/// podmonitor.yaml's, which must agree).
fn scraped_server_name() -> String {
    let job = yaml("prometheus/kubernetes.yml").remove(0)["scrape_configs"][0].clone();
    let monitor = yaml("prometheus/podmonitor.yaml").remove(0);
    let name = job["tls_config"]["server_name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        monitor["spec"]["podMetricsEndpoints"][0]["tlsConfig"]["serverName"],
        name.as_str()
    );
    name
}

/// The Secrets a manifest's pods mount.
fn mounted_secrets(manifest: &str) -> Vec<String> {
    pod_spec(manifest)["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["secret"]["secretName"].as_str().map(str::to_owned))
        .collect()
}

/// cert-manager's certificate.yaml issues the Secret the manifests mount as their TLS files,
/// for the name Prometheus checks, from a CA of its own (whose `ca.crt` survives renewals).
#[test]
fn the_certificate_is_issued_for_what_prometheus_checks_into_the_mounted_secret() {
    let docs = yaml("kubernetes/certificate.yaml");
    let named = |kind: &str, name: &serde_json::Value| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == *name)
            .unwrap_or_else(|| panic!("no {kind} {name} in certificate.yaml"))
            .clone()
    };
    let leaf = named("Certificate", &serde_json::json!("collector"));
    let tls_secret = pod_spec("kubernetes/daemonset.yaml")["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "tls")
        .expect("the tls volume")["secret"]["secretName"]
        .clone();
    assert_eq!(leaf["spec"]["secretName"], tls_secret);
    assert!(
        mounted_secrets("kubernetes/sidecar.yaml")
            .contains(&tls_secret.as_str().unwrap().to_owned())
    );
    assert_eq!(
        leaf["spec"]["dnsNames"],
        serde_json::json!([scraped_server_name()])
    );
    assert_ne!(
        leaf["spec"]["isCA"], true,
        "the CLI refuses a CA as the agent's own"
    );
    for doc in &docs {
        assert_eq!(doc["metadata"]["namespace"], "ingress");
    }
    // The leaf's issuer signs with a CA certificate, which a self-signed issuer made.
    let issuer = named("Issuer", &leaf["spec"]["issuerRef"]["name"]);
    let ca = docs
        .iter()
        .find(|d| {
            d["kind"] == "Certificate"
                && d["spec"]["secretName"] == issuer["spec"]["ca"]["secretName"]
        })
        .expect("the CA issuer's Certificate");
    assert_eq!(ca["spec"]["isCA"], true);
    let root = named("Issuer", &ca["spec"]["issuerRef"]["name"]);
    assert!(root["spec"]["selfSigned"].is_object());
}

/// README's "Deploy to Kubernetes" makes every Secret the manifests mount before it applies
/// them.
#[test]
fn the_readmes_kubernetes_steps_make_what_the_manifests_need() {
    let section = readme_section("Deploy to Kubernetes");
    assert!(
        section.contains(
            "kubectl label namespace ingress pod-security.kubernetes.io/enforce=privileged"
        )
    );
    let daemonset = pod_spec("kubernetes/daemonset.yaml");
    for (label, value) in daemonset["nodeSelector"].as_object().unwrap() {
        let value = value.as_str().unwrap();
        assert!(
            section.contains(&format!("kubectl label node NODE {label}={value}\n")),
            "{label}={value}"
        );
        // One a kubelet may set on itself: node pools label their new nodes with it.
        assert!(
            !label.contains("kubernetes.io/") || label.starts_with("node.kubernetes.io/"),
            "{label}: NodeRestriction keeps kubelets from setting it"
        );
    }
    let apply = section
        .find("kubectl apply -f deploy/kubernetes/daemonset.yaml")
        .expect("the DaemonSet applied");
    for secret in mounted_secrets("kubernetes/daemonset.yaml") {
        let made = section
            .find(&format!("create secret generic {secret} "))
            .unwrap_or_else(|| panic!("README makes no Secret {secret}"));
        if secret == "collector-tls" {
            // cert-manager's way comes first; openssl's is the alternative.
            let issued = section
                .find("kubectl apply -f deploy/kubernetes/certificate.yaml")
                .expect("the certificate applied");
            assert!(issued < apply, "the certificate after the DaemonSet");
        } else {
            assert!(made < apply, "{secret} after the DaemonSet");
        }
    }
    // The key the ConfigMap's bearer_token_file reads.
    assert!(section.contains("create secret generic collector-token --from-literal=token="));
    assert!(read("kubernetes/daemonset.yaml").contains("/etc/collector/token/token"));
}

/// README's openssl commands (kubectl's left out, in a directory of their own) make a
/// certificate the agent loads, and Prometheus and the CLI accept for the scrape configs'
/// server name.
#[test]
fn the_readmes_openssl_commands_make_a_certificate_for_the_scraped_name() {
    let section = readme_section("Deploy to Kubernetes");
    let block = fenced_blocks(&section, "sh")
        .into_iter()
        .find(|b| b.contains("openssl req -x509"))
        .expect("the openssl commands");
    let commands: Vec<String> = block
        .replace("\\\n", " ")
        .lines()
        .filter(|line| !line.starts_with("kubectl"))
        .map(str::to_owned)
        .collect();
    let scratch = support::ScratchDir::new("readme-tls");
    let dir = &scratch.0;
    run_ok(
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", &commands.join("\n")])
            .current_dir(dir),
        "README's openssl commands",
    );
    let server_name = scraped_server_name();
    run_ok(
        Command::new("openssl")
            .args([
                "verify",
                "-CAfile",
                "ca.crt",
                "-verify_hostname",
                &server_name,
                "tls.crt",
            ])
            .current_dir(dir),
        "the certificate for the scrape configs' server name",
    );
    let constraints = run_ok(
        Command::new("openssl")
            .args([
                "x509",
                "-in",
                "tls.crt",
                "-noout",
                "-ext",
                "basicConstraints",
            ])
            .current_dir(dir),
        "openssl x509",
    );
    assert!(constraints.contains("CA:FALSE"), "{constraints}");
    let config = dir.join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "pin_dir = \"/sys/fs/bpf/collector-readme-tls\"\n[http]\ntls_cert_file = \"{0}/tls.crt\"\ntls_key_file = \"{0}/tls.key\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let out = Command::new(COLLECTOR)
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|line| line.starts_with("pass") && line.split_whitespace().nth(1) == Some("http")),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// README's configuration block is the embedded default: the same keys and values as
/// collector/src/default.toml (the comments differ).
#[test]
fn the_readmes_config_is_the_embedded_default() {
    let block = fenced_blocks(&readme_section("Configuration"), "toml")
        .into_iter()
        .next()
        .expect("README's config block");
    let readme: toml::Table = toml::from_str(&block).unwrap();
    let default: toml::Table = toml::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/default.toml"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(readme, default);
    // What default.toml leaves commented out, the README shows commented out too.
    for key in [
        "cgroup2",
        "bearer_token_file",
        "basic_auth_users_file",
        "tls_cert_file",
        "tls_key_file",
        "sni",
    ] {
        assert!(block.contains(&format!("# {key} = ")), "{key}");
    }
}

/// The fields of a relabeling, in Prometheus's spelling.
const RELABEL_FIELDS: [&str; 5] = [
    "source_labels",
    "regex",
    "action",
    "target_label",
    "replacement",
];

/// A relabeling in Prometheus's spelling, with only the fields it sets; `names` are its
/// fields' names in `rule` (the Operator's are camelCase).
fn spelled(rule: &serde_json::Value, names: [&str; 5]) -> serde_json::Value {
    RELABEL_FIELDS
        .iter()
        .zip(names)
        .filter(|(_, name)| !rule[*name].is_null())
        .map(|(field, name)| ((*field).to_owned(), rule[name].clone()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The `PodMonitor` (for the Prometheus Operator) scrapes what the plain Kubernetes job does:
/// the same namespace, the collector containers' metrics port, HTTPS with the same server
/// name, the token and CA from the Secrets the manifests mount, the same relabelings. (No
/// Operator here: its schema was checked by hand, see docs/DESIGN.md, "Deployment".)
/// The Role for Prometheus grants pod discovery where `kubernetes.yml` discovers, bound to
/// it: a Prometheus without it finds no target (`CollectorTargetsAbsent`).
#[test]
fn the_prometheus_role_lets_the_kubernetes_job_list_its_pods() {
    let job = yaml("prometheus/kubernetes.yml").remove(0)["scrape_configs"][0].clone();
    let discovered = &job["kubernetes_sd_configs"][0];
    assert_eq!(discovered["role"], "pod");
    let namespaces = discovered["namespaces"]["names"].as_array().unwrap();
    let rbac = yaml("kubernetes/prometheus-rbac.yaml");
    let role = rbac.iter().find(|doc| doc["kind"] == "Role").unwrap();
    let binding = rbac
        .iter()
        .find(|doc| doc["kind"] == "RoleBinding")
        .unwrap();
    assert_eq!(namespaces, &[role["metadata"]["namespace"].clone()]);
    assert_eq!(
        binding["metadata"]["namespace"],
        role["metadata"]["namespace"]
    );
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let granted = &role["rules"][0];
    assert_eq!(granted["resources"], serde_json::json!(["pods"]));
    assert_eq!(
        granted["verbs"],
        serde_json::json!(["get", "list", "watch"])
    );
}

#[test]
fn the_pod_monitor_scrapes_what_the_kubernetes_job_does() {
    let monitor = yaml("prometheus/podmonitor.yaml").remove(0);
    assert_eq!(monitor["kind"], "PodMonitor");
    let job = yaml("prometheus/kubernetes.yml").remove(0)["scrape_configs"][0].clone();
    let spec = &monitor["spec"];
    assert_eq!(
        spec["namespaceSelector"]["matchNames"],
        job["kubernetes_sd_configs"][0]["namespaces"]["names"]
    );
    assert_eq!(
        monitor["metadata"]["namespace"], spec["namespaceSelector"]["matchNames"][0],
        "the Operator reads the Secrets from the PodMonitor's namespace"
    );
    let endpoint = &spec["podMetricsEndpoints"][0];
    assert_eq!(endpoint["scheme"], job["scheme"]);
    assert_eq!(
        endpoint["tlsConfig"]["serverName"],
        job["tls_config"]["server_name"]
    );
    assert_eq!(endpoint["authorization"]["type"], "Bearer");
    for manifest in ["kubernetes/daemonset.yaml", "kubernetes/sidecar.yaml"] {
        let pod = pod_spec(manifest);
        let container = collector_container(&pod);
        assert!(
            container["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == endpoint["port"] && p["containerPort"] == 9464),
            "{manifest}: no port {} on the collector container",
            endpoint["port"]
        );
        let secrets: Vec<&serde_json::Value> = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.get("secret").map(|s| &s["secretName"]))
            .collect();
        for secret in [
            &endpoint["authorization"]["credentials"]["name"],
            &endpoint["tlsConfig"]["ca"]["secret"]["name"],
        ] {
            assert!(secrets.contains(&secret), "{manifest}: no Secret {secret}");
        }
    }
    // The agent reads the token from the Secret's key `token` (the ConfigMap's path).
    assert_eq!(endpoint["authorization"]["credentials"]["key"], "token");
    assert!(read("kubernetes/daemonset.yaml").contains("/etc/collector/token/token"));

    // The relabelings, in the job's spelling and without the fields left out: the job's,
    // but for its keep, whose port is the endpoint's here, and namespace and pod, which the
    // Operator sets itself.
    let ours: Vec<serde_json::Value> = endpoint["relabelings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            spelled(
                r,
                [
                    "sourceLabels",
                    "regex",
                    "action",
                    "targetLabel",
                    "replacement",
                ],
            )
        })
        .collect();
    for rule in job["relabel_configs"].as_array().unwrap() {
        let mut expected = spelled(rule, RELABEL_FIELDS);
        if matches!(rule["target_label"].as_str(), Some("namespace" | "pod")) {
            continue;
        }
        if rule["action"] == "keep" {
            let (container, port) = rule["regex"].as_str().unwrap().split_once(';').unwrap();
            assert_eq!(endpoint["port"], port);
            expected = serde_json::json!({
                "source_labels": ["__meta_kubernetes_pod_container_name"],
                "regex": container,
                "action": "keep",
            });
        }
        assert!(ours.contains(&expected), "{expected} is not in {ours:?}");
    }
    assert_eq!(ours.len(), 4, "{ours:?}");
}

/// `CollectorPodsUnavailable` picks the `DaemonSet` by name (kube-state-metrics exports no
/// workload labels by default): each of its matchers must name the manifest's `DaemonSet`
/// and its namespace, or the alert never fires (or fires for another namespace's).
#[test]
fn the_pods_unavailable_alert_selects_the_manifests_daemonset() {
    let daemonset = yaml("kubernetes/daemonset.yaml")
        .into_iter()
        .find(|doc| doc["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let name = daemonset["metadata"]["name"].as_str().unwrap();
    let namespace = daemonset["metadata"]["namespace"].as_str().unwrap();
    let alerts = yaml("prometheus/alerts.yml").remove(0);
    let rule = alerts["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap())
        .find(|rule| rule["alert"] == "CollectorPodsUnavailable")
        .expect("the CollectorPodsUnavailable rule");
    let expr = rule["expr"].as_str().unwrap();
    // The values `label` is matched to, in order.
    let matched = |label: &str| -> Vec<&str> {
        expr.split(&format!("{label}=\""))
            .skip(1)
            .map(|rest| rest.split('"').next().unwrap())
            .collect()
    };
    // Desired, available and updated pods: the three places its comment speaks of.
    assert_eq!(matched("daemonset"), [name; 3], "{expr}");
    assert_eq!(matched("namespace"), [namespace; 3], "{expr}");
}

/// The head of deploy/prometheus/prometheusrule.yaml; `spec:` follows, then alerts.yml's
/// groups.
const PROMETHEUS_RULE_HEAD: &str = "\
# alerts.yml's groups as a PrometheusRule, for a Prometheus run by the Prometheus Operator
# (kube-prometheus-stack), beside podmonitor.yaml, whose `exporter` label the rules key on.
# Written from alerts.yml, comments and all, and checked against it by collector/tests/deploy.rs:
# edit alerts.yml, then `UPDATE_DEPLOY=1 cargo test --test deploy prometheus_rule` rewrites this.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: collector
  namespace: ingress
  labels:
    # EDIT: what your Prometheus's ruleSelector matches.
    release: kube-prometheus-stack
spec:
";

/// alerts.yml as a `PrometheusRule`: its lines from `groups:` on (its head comment is about
/// promtool), indented under `spec:`.
fn prometheus_rule(alerts: &str) -> String {
    let groups = alerts
        .find("\ngroups:")
        .map(|at| &alerts[at + 1..])
        .expect("alerts.yml starts its rules with `groups:`");
    let mut rule = String::from(PROMETHEUS_RULE_HEAD);
    for line in groups.lines() {
        if line.is_empty() {
            rule.push('\n');
        } else {
            let _ = writeln!(rule, "  {line}");
        }
    }
    rule
}

/// The Operator's users get the same alerts as everyone else: prometheusrule.yaml is
/// alerts.yml's text under a `PrometheusRule` head, and parses to the same groups.
#[test]
fn the_prometheus_rule_carries_the_alerts_groups() {
    let path = deploy("prometheus/prometheusrule.yaml");
    let expected = prometheus_rule(&read("prometheus/alerts.yml"));
    if std::env::var_os("UPDATE_DEPLOY").is_some() {
        std::fs::write(&path, &expected).unwrap();
    }
    let written = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        written == expected,
        "{} is not alerts.yml's groups as a PrometheusRule; after editing alerts.yml, rewrite it \
         with `UPDATE_DEPLOY=1 cargo test --test deploy prometheus_rule`",
        path.display()
    );
    let rule = yaml("prometheus/prometheusrule.yaml").remove(0);
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    let alerts = yaml("prometheus/alerts.yml").remove(0);
    assert_eq!(rule["spec"]["groups"], alerts["groups"]);
    assert!(
        rule["spec"]["groups"]
            .as_array()
            .is_some_and(|g| !g.is_empty())
    );
    // Deployed beside the PodMonitor, so selected alike.
    let monitor = yaml("prometheus/podmonitor.yaml").remove(0);
    assert_eq!(
        rule["metadata"]["namespace"],
        monitor["metadata"]["namespace"]
    );
    assert_eq!(rule["metadata"]["labels"], monitor["metadata"]["labels"]);
}

#[test]
fn the_alerts_pass_their_promtool_unit_tests() {
    run_ok(
        Command::new("promtool")
            .args(["test", "rules"])
            .arg(deploy("prometheus/alerts_test.yml")),
        "promtool test rules",
    );
}

/// Metric names (`collector_...`) in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("collector_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// The golden exposition: a snapshot with every kind of figure set.
fn golden() -> String {
    std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/testdata/metrics.golden"),
    )
    .unwrap()
}

/// Every sample name of the golden exposition.
fn exported() -> BTreeSet<String> {
    golden()
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The panels that label a figure with the build join `collector_build_info`. With
/// `hostNetwork` a new pod has its old one's address, so both pods' build series are within
/// the lookback after a rollout (without staleness markers: Prometheus restarted meanwhile):
/// a join on the address alone then fails the whole panel (many-to-many). Run by promtool on
/// such series: one result per pod, each with its own build.
fn assert_build_info_joins_hold_over_a_pod_replacement(exprs: &[String], dir: &Path) {
    const PODS: [(&str, &str); 2] = [("old", "aaa"), ("new", "bbb")];
    let joins: Vec<&String> = exprs
        .iter()
        .filter(|expr| expr.contains("collector_build_info"))
        .collect();
    assert!(!joins.is_empty(), "no panel names the build");
    let mut rules = String::from("groups:\n  - name: joins\n    rules:\n");
    let mut tests = String::new();
    for (i, expr) in joins.iter().enumerate() {
        let promql = expr
            .replace("$__rate_interval", "2m")
            .replace("$instance", ".*");
        let promql = serde_json::to_string(&promql).unwrap();
        writeln!(rules, "      - record: join_{i}\n        expr: {promql}").unwrap();
        writeln!(
            tests,
            "      - expr: count by (pod, revision) (join_{i})\n        eval_time: 5m\n        \
             exp_samples:"
        )
        .unwrap();
        for (pod, revision) in PODS {
            writeln!(
                tests,
                "          - labels: '{{pod=\"{pod}\", revision=\"{revision}\"}}'\n            \
                 value: 1"
            )
            .unwrap();
        }
    }
    let mut series = String::new();
    for (pod, revision) in PODS {
        let target = format!("instance=\"10.0.0.1:9464\", job=\"collector\", pod=\"{pod}\"");
        for (name, values) in [
            (format!("process_cpu_seconds_total{{{target}}}"), "0+1x10"),
            (
                format!("process_resident_memory_bytes{{{target}}}"),
                "1000x10",
            ),
            (
                format!(
                    "collector_build_info{{{target}, version=\"0.1.0\", revision=\"{revision}\"}}"
                ),
                "1x10",
            ),
        ] {
            writeln!(
                series,
                "      - series: '{name}'\n        values: '{values}'"
            )
            .unwrap();
        }
    }
    std::fs::write(dir.join("joins.yml"), rules).unwrap();
    let test = dir.join("joins_test.yml");
    std::fs::write(
        &test,
        format!(
            "rule_files: [joins.yml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    \
             input_series:\n{series}    promql_expr_test:\n{tests}"
        ),
    )
    .unwrap();
    run_ok(
        Command::new("promtool")
            .args(["test", "rules"])
            .arg(&test)
            .current_dir(dir),
        "promtool test rules (the build joins)",
    );
}

#[test]
fn the_dashboard_and_alerts_query_valid_promql_over_metrics_we_export() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana/collector-dashboard.json")).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");

    // promtool checks PromQL in rule files: each panel query as a recording rule, with
    // Grafana's variables filled in as Grafana would.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let promql = expr
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*");
        writeln!(
            rules,
            "      - record: dashboard:panel_{i}\n        expr: {}",
            serde_json::to_string(&promql).unwrap()
        )
        .unwrap();
    }
    let scratch = support::ScratchDir::new("dashboard");
    let dir = &scratch.0;
    let path = dir.join("dashboard-rules.yml");
    std::fs::write(&path, rules).unwrap();
    run_ok(
        Command::new("promtool").args(["check", "rules"]).arg(&path),
        "promtool check rules (dashboard queries)",
    );
    assert_build_info_joins_hold_over_a_pod_replacement(&exprs, dir);

    let exported = exported();
    let queried = metric_names(&exprs.join("\n"))
        .into_iter()
        .chain(metric_names(&read("prometheus/alerts.yml")));
    for name in queried {
        assert!(
            exported.contains(&name),
            "{name} is queried but not exported"
        );
    }
    // A label value matched exactly must be one the agent exports: an alert on a histogram
    // bucket the agent does not have (`le="0.5"` where its edges are powers of two) never
    // fires, and promtool's own tests, fed the same made-up series, cannot tell.
    let golden = golden();
    let promql = format!("{}\n{}", exprs.join("\n"), read("prometheus/alerts.yml"));
    let matchers = equality_matchers(&promql);
    assert!(matchers.len() >= 10, "{matchers:?}");
    for (name, label, value) in matchers {
        let pair = format!("{label}=\"{value}\"");
        let exported = golden.lines().any(|line| {
            line.strip_prefix(name.as_str())
                .and_then(|rest| rest.strip_prefix('{'))
                .and_then(|rest| rest.split_once('}'))
                .is_some_and(|(labels, _)| labels.split(',').any(|p| p == pair))
        });
        assert!(
            exported,
            "{name}{{{pair}}} is queried but no such series is exported"
        );
    }
}

/// The `metric{label="value"}` matchers (`=` only, not `=~` or `!=`) of `PromQL` text, for
/// the `collector_` metrics.
fn equality_matchers(text: &str) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for name in metric_names(text) {
        let opening = format!("{name}{{");
        for (at, _) in text.match_indices(&opening) {
            let inside = &text[at + opening.len()..];
            let Some(end) = inside.find('}') else {
                continue;
            };
            for matcher in inside[..end].split(',') {
                let Some((label, value)) = matcher.split_once('=') else {
                    continue;
                };
                let label = label.trim();
                if label.ends_with('!') || value.starts_with('~') {
                    continue;
                }
                let value = value.trim().trim_matches('"');
                found.push((name.clone(), label.to_owned(), value.to_owned()));
            }
        }
    }
    found
}

/// The head of docs/METRICS.md, before the table [`metrics_reference`] writes.
const METRICS_REFERENCE_HEAD: &str = "# Metrics

Every metric family `/metrics` serves, with its type, its labels and its help text, as the
agent renders them for a snapshot with every kind of figure set
(`collector/src/testdata/metrics.golden`, which a unit test keeps equal to the rendering).
Some appear only where their figures exist (upstreams, routes by server name, nftables
counting, the local address table): their help says when. Also absent: every
`collector_dns_*` family with `[dns] enabled = false`; the latency, cache, unanswered,
unmatched, duplicate, in-flight, untracked and sample-ratio families with
`match_responses = false`; `collector_config_file_*` when the agent runs with the
embedded default (no file) or a file that cannot be read again (a pipe, a FIFO);
`collector_http_tls_certificate_expiration_timestamp_seconds`
without TLS; and `process_max_fds` where the limit is unlimited. An `absent()` rule over
them fires there. `le` (histogram buckets) is Prometheus's own label and left out. Labels
and their values are bounded by the configuration (README, How it counts), but for
`interface`: with the default selection (`interfaces = []`) it takes every watched
interface's name, a pod's veth on a Kubernetes node among them, so its series come and go
with the pods (a veth's go with it). Client addresses and domains are never labels.

Written from the golden exposition by `collector/tests/deploy.rs`: after a change to the
exposition, `UPDATE_DEPLOY=1 cargo test --test deploy metrics_reference` rewrites this file.

| series | type | labels | what |
|---|---|---|---|
";

/// The label names of one sample line (`name{a=\"x\",b=\"y\"} 1`), in order.
fn label_names(line: &str) -> Vec<String> {
    let Some((_, rest)) = line.split_once('{') else {
        return Vec::new();
    };
    let mut names = Vec::new();
    let mut chars = rest.chars();
    loop {
        let name: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if name.is_empty() {
            return names;
        }
        names.push(name.trim_start_matches(',').to_owned());
        // The quoted value, escapes and all.
        assert_eq!(chars.next(), Some('"'), "{line}");
        let mut escaped = false;
        for c in chars.by_ref() {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => break,
                _ => escaped = false,
            }
        }
        if chars.next() != Some(',') {
            return names;
        }
    }
}

/// docs/METRICS.md as the golden exposition makes it: one row per family.
fn metrics_reference(golden: &str) -> String {
    struct Family {
        name: String,
        kind: String,
        help: String,
        labels: Vec<String>,
    }
    let mut families: Vec<Family> = Vec::new();
    for line in golden.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            families.push(Family {
                name: name.to_owned(),
                kind: String::new(),
                help: help.to_owned(),
                labels: Vec::new(),
            });
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            let family = families.last_mut().unwrap();
            assert_eq!(family.name, name, "TYPE without its HELP before it");
            kind.clone_into(&mut family.kind);
        } else if !line.starts_with('#') && !line.is_empty() {
            let family = families.last_mut().unwrap();
            assert!(line.starts_with(&family.name), "{line} outside its family");
            for label in label_names(line) {
                if label != "le" && !family.labels.contains(&label) {
                    family.labels.push(label);
                }
            }
        }
    }
    let mut out = METRICS_REFERENCE_HEAD.to_owned();
    for family in &families {
        let series = match family.kind.as_str() {
            "counter" => format!("`{}_total`", family.name),
            "info" => format!("`{}_info`", family.name),
            "histogram" => format!("`{0}_bucket`, `{0}_sum`, `{0}_count`", family.name),
            _ => format!("`{}`", family.name),
        };
        let labels = if family.labels.is_empty() {
            "-".to_owned()
        } else {
            family
                .labels
                .iter()
                .map(|label| format!("`{label}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            out,
            "| {series} | {} | {labels} | {} |",
            family.kind,
            family.help.replace('|', "\\|")
        )
        .unwrap();
    }
    out
}

#[test]
fn the_metrics_reference_lists_every_family_the_agent_renders() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/METRICS.md");
    let expected = metrics_reference(&golden());
    if std::env::var_os("UPDATE_DEPLOY").is_some() {
        std::fs::write(&path, &expected).unwrap();
    }
    let written = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        written == expected,
        "{} is not the golden exposition's families; after a change to the exposition, \
         rewrite it with `UPDATE_DEPLOY=1 cargo test --test deploy metrics_reference`",
        path.display()
    );
    // Every family, each once.
    let families = golden()
        .lines()
        .filter(|line| line.starts_with("# HELP "))
        .count();
    assert_eq!(
        written
            .lines()
            .filter(|line| line.starts_with("| `"))
            .count(),
        families
    );
    assert!(families > 80, "{families}");
}
