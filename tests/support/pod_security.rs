//! The Pod Security Standards' `baseline` and `restricted` levels as checks on a pod
//! template (`{metadata, spec}` as JSON, the way the API server returns it), for the
//! install test: the v1.20 test server has no Pod Security admission to ask.
//! Written from the standards' control list (policy version `latest`):
//! - baseline: no HostProcess, no host namespaces, no privileged containers,
//!   capabilities added only from the baseline set, no hostPath volumes, no host ports,
//!   AppArmor and SELinux only as the runtime's defaults, default /proc mount, seccomp
//!   never Unconfined, safe sysctls only;
//! - restricted, on top: only ephemeral-kind volume types, `allowPrivilegeEscalation:
//!   false`, `runAsNonRoot: true`, no uid 0, seccomp `RuntimeDefault` or `Localhost`,
//!   capabilities drop `ALL` and add at most `NET_BIND_SERVICE`.

use serde_json::Value;

/// A Pod Security Standards level, loosest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Privileged,
    Baseline,
    Restricted,
}

impl Level {
    /// The value of a `pod-security.kubernetes.io/*` label.
    pub fn parse(label: &str) -> Option<Self> {
        match label {
            "privileged" => Some(Self::Privileged),
            "baseline" => Some(Self::Baseline),
            "restricted" => Some(Self::Restricted),
            _ => None,
        }
    }
}

const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];
const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];
const SELINUX_TYPES: &[&str] = &[
    "",
    "container_t",
    "container_init_t",
    "container_kvm_t",
    "container_engine_t",
];
const RESTRICTED_VOLUMES: &[&str] = &[
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

/// The strictest level whose checks `template` passes.
pub fn strictest_level(template: &Value) -> Level {
    [Level::Restricted, Level::Baseline]
        .into_iter()
        .find(|&level| violations(level, template).is_empty())
        .unwrap_or(Level::Privileged)
}

/// What in `template` a namespace enforcing `level` would refuse; empty if admitted.
pub fn violations(level: Level, template: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if level == Level::Privileged {
        return out;
    }
    let spec = &template["spec"];
    let pod_sc = &spec["securityContext"];
    let containers: Vec<&Value> = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .filter_map(|k| spec[*k].as_array())
        .flatten()
        .collect();
    let name = |c: &Value| c["name"].as_str().unwrap_or("?").to_owned();
    let mut contexts = vec![("pod".to_owned(), pod_sc)];
    contexts.extend(containers.iter().map(|c| (name(c), &c["securityContext"])));

    // baseline
    for (who, sc) in &contexts {
        if sc["windowsOptions"]["hostProcess"] == true {
            out.push(format!("{who}: windowsOptions.hostProcess"));
        }
        let se = &sc["seLinuxOptions"];
        if !SELINUX_TYPES.contains(&se["type"].as_str().unwrap_or(""))
            || !se["user"].is_null()
            || !se["role"].is_null()
        {
            out.push(format!("{who}: seLinuxOptions {se}"));
        }
        if sc["seccompProfile"]["type"] == "Unconfined" {
            out.push(format!("{who}: seccompProfile Unconfined"));
        }
        let apparmor = sc["appArmorProfile"]["type"].as_str();
        if apparmor.is_some_and(|t| t != "RuntimeDefault" && t != "Localhost") {
            out.push(format!("{who}: appArmorProfile {apparmor:?}"));
        }
    }
    for key in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[key] == true {
            out.push(format!("pod: {key}"));
        }
    }
    for c in &containers {
        let sc = &c["securityContext"];
        if sc["privileged"] == true {
            out.push(format!("{}: privileged", name(c)));
        }
        for cap in strings(&sc["capabilities"]["add"]) {
            if !BASELINE_CAPABILITIES.contains(&cap) {
                out.push(format!("{}: adds capability {cap}", name(c)));
            }
        }
        if sc["procMount"].as_str().is_some_and(|m| m != "Default") {
            out.push(format!("{}: procMount {}", name(c), sc["procMount"]));
        }
        for port in c["ports"].as_array().into_iter().flatten() {
            if port["hostPort"].as_u64().is_some_and(|p| p != 0) {
                out.push(format!("{}: hostPort {}", name(c), port["hostPort"]));
            }
        }
    }
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        if !volume["hostPath"].is_null() {
            out.push(format!("volume {}: hostPath", volume["name"]));
        }
    }
    let annotations = template["metadata"]["annotations"].as_object();
    for (key, value) in annotations.into_iter().flatten() {
        let value = value.as_str().unwrap_or("");
        if key.starts_with("container.apparmor.security.beta.kubernetes.io/")
            && value != "runtime/default"
            && !value.starts_with("localhost/")
        {
            out.push(format!("annotation {key}: {value}"));
        }
    }
    for sysctl in pod_sc["sysctls"].as_array().into_iter().flatten() {
        let sysctl = sysctl["name"].as_str().unwrap_or("");
        if !SAFE_SYSCTLS.contains(&sysctl) {
            out.push(format!("pod: sysctl {sysctl}"));
        }
    }
    if level == Level::Baseline {
        return out;
    }

    // restricted
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        let kinds: Vec<&str> = volume
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k.as_str())
            .filter(|k| *k != "name")
            .collect();
        if kinds.iter().any(|k| !RESTRICTED_VOLUMES.contains(k)) {
            out.push(format!("volume {}: type {kinds:?}", volume["name"]));
        }
    }
    let pod_non_root = pod_sc["runAsNonRoot"] == true;
    let pod_seccomp = matches!(
        pod_sc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault" | "Localhost")
    );
    if pod_sc["runAsUser"] == 0 {
        out.push("pod: runAsUser 0".to_owned());
    }
    for c in &containers {
        let (who, sc) = (name(c), &c["securityContext"]);
        if sc["allowPrivilegeEscalation"] != false {
            out.push(format!("{who}: allowPrivilegeEscalation not false"));
        }
        let non_root = match sc["runAsNonRoot"].as_bool() {
            Some(v) => v,
            None => pod_non_root,
        };
        if !non_root {
            out.push(format!("{who}: runAsNonRoot not true"));
        }
        if sc["runAsUser"] == 0 {
            out.push(format!("{who}: runAsUser 0"));
        }
        let seccomp = match sc["seccompProfile"]["type"].as_str() {
            Some(t) => t == "RuntimeDefault" || t == "Localhost",
            None => pod_seccomp,
        };
        if !seccomp {
            out.push(format!(
                "{who}: seccompProfile not RuntimeDefault/Localhost"
            ));
        }
        let caps = &sc["capabilities"];
        if !strings(&caps["drop"]).any(|c| c == "ALL") {
            out.push(format!("{who}: capabilities do not drop ALL"));
        }
        for cap in strings(&caps["add"]).filter(|c| *c != "NET_BIND_SERVICE") {
            out.push(format!("{who}: adds capability {cap}"));
        }
    }
    out
}

fn strings(list: &Value) -> impl Iterator<Item = &str> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn restricted_pod() -> Value {
        json!({"metadata": {}, "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {
                "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}],
            "volumes": [{"name": "token", "projected": {"sources": []}}],
        }})
    }

    /// Sets the value at a JSON pointer, making the objects on the way.
    fn set(doc: &mut Value, path: &str, value: Value) {
        let mut at = doc;
        for key in path.trim_start_matches('/').split('/') {
            at = match key.parse::<usize>() {
                Ok(i) if at.is_array() => &mut at[i],
                _ => &mut at[key],
            };
        }
        *at = value;
    }

    #[test]
    fn each_rule_lowers_the_level_it_belongs_to() {
        assert_eq!(strictest_level(&restricted_pod()), Level::Restricted);
        let cases: &[(&str, Value, Level)] = &[
            ("/spec/hostNetwork", json!(true), Level::Privileged),
            (
                "/spec/volumes/0",
                json!({"name": "h", "hostPath": {"path": "/"}}),
                Level::Privileged,
            ),
            (
                "/spec/containers/0/securityContext/privileged",
                json!(true),
                Level::Privileged,
            ),
            (
                "/spec/containers/0/securityContext/capabilities/add",
                json!(["DAC_READ_SEARCH"]),
                Level::Privileged,
            ),
            (
                "/spec/containers/0/ports",
                json!([{"containerPort": 1, "hostPort": 1}]),
                Level::Privileged,
            ),
            (
                "/spec/securityContext/seccompProfile/type",
                json!("Unconfined"),
                Level::Privileged,
            ),
            (
                "/spec/containers/0/securityContext/capabilities/add",
                json!(["CHOWN"]),
                Level::Baseline,
            ),
            (
                "/spec/containers/0/securityContext/allowPrivilegeEscalation",
                json!(true),
                Level::Baseline,
            ),
            (
                "/spec/securityContext/runAsNonRoot",
                json!(false),
                Level::Baseline,
            ),
            ("/spec/securityContext/runAsUser", json!(0), Level::Baseline),
            (
                "/spec/securityContext/seccompProfile",
                json!({}),
                Level::Baseline,
            ),
            (
                "/spec/containers/0/securityContext/capabilities/drop",
                json!([]),
                Level::Baseline,
            ),
            (
                "/spec/volumes/0",
                json!({"name": "n", "nfs": {"server": "x", "path": "/"}}),
                Level::Baseline,
            ),
        ];
        for (path, value, level) in cases {
            let mut pod = restricted_pod();
            set(&mut pod, path, value.clone());
            assert_eq!(strictest_level(&pod), *level, "{path} = {value}");
        }
    }
}
