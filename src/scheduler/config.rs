//! How kube-scheduler and the API server are told about the helper: the extender
//! entry of a `KubeSchedulerConfiguration` and the MutatingWebhookConfiguration. The
//! demo and the tests register the helper with these; `deploy/` holds the same
//! settings as YAML.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use serde_json::json;

use crate::error::{Error, Result};

/// Name of the MutatingWebhookConfiguration (and the `--webhook-config` default).
pub const WEBHOOK_CONFIG: &str = "localnfs-scheduler";

/// Extender weight: a home node's score (10) times this times kube-scheduler's
/// scaling (×10) outweighs the built-in spreading and balancing scores (each 0–100).
pub const EXTENDER_WEIGHT: i64 = 5;

/// The `extenders:` entry for a helper whose extender listener is at `url_prefix`.
/// `ignorable`: a helper that is down does not stop scheduling.
pub fn extender_entry(url_prefix: &str) -> serde_json::Value {
    json!({
        "urlPrefix": url_prefix,
        "filterVerb": "filter",
        "prioritizeVerb": "prioritize",
        "weight": EXTENDER_WEIGHT,
        "nodeCacheCapable": true,
        "ignorable": true,
        "httpTimeout": "5s",
    })
}

/// The webhook configuration: pod CREATE only, `failurePolicy: Ignore` (a down helper
/// never blocks pod creation), 2 s timeout (as `deploy/base/webhook.yaml`: a hung
/// helper delays each pod CREATE by at most that), called again if another webhook
/// changes the pod.
/// `client_config` is `{"url": ...}` or `{"service": {...}}`; the helper fills in the
/// `caBundle`.
pub fn webhook_configuration(
    client_config: serde_json::Value,
) -> Result<MutatingWebhookConfiguration> {
    serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_CONFIG},
        "webhooks": [{
            "name": "pods.scheduler.localnfs.io",
            "clientConfig": client_config,
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "failurePolicy": "Ignore",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 2,
            "reinvocationPolicy": "IfNeeded",
            "namespaceSelector": {"matchExpressions": [{
                "key": "kubernetes.io/metadata.name", "operator": "NotIn",
                "values": ["kube-system"]}]},
        }],
    }))
    .map_err(|e| Error::BuildObject(format!("MutatingWebhookConfiguration: {e}")))
}
