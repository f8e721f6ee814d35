//! The validating webhook that keeps each node agent to its own node's objects
//! (`POST /validate`; rules in [`super::guard`]). This part does the I/O: it reads the
//! AdmissionReview, finds the calling agent's node by looking up the pod its token is
//! bound to, and answers.
//!
//! The pod must be in localnfs's namespace, have the uid the token names, run as the
//! agents' service account and be bound to a node; its `spec.nodeName` is the agent's
//! node. A pod's uid → node never changes once it is scheduled, so answers are cached
//! by uid (the API server already refuses tokens of pods that are gone). A lookup that
//! fails is a refusal with code 503: the agent retries, nothing slips through.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};

use super::guard::{self, Caller, Kind, Write};

/// Most pod uids remembered; the cache starts over when full (agent pods are one per
/// node, plus a few replaced by upgrades).
const CACHE_MAX: usize = 4096;

/// The agents' identity and how to look their pods up.
pub struct Agents {
    pods: Api<Pod>,
    namespace: String,
    /// Where the agents' heartbeat Leases are (the only Leases an agent may write).
    heartbeats: String,
    account: String,
    username: String,
    nodes: Mutex<HashMap<String, String>>,
}

/// Why a caller has no node: refused (403) or could not be checked now (503).
#[derive(Debug)]
enum NoNode {
    Refused(String),
    Unavailable(String),
}

impl Agents {
    /// Agents run as service account `account` in `namespace`, where their pods are;
    /// their heartbeat Leases are in `heartbeats`.
    pub fn new(client: kube::Client, namespace: &str, heartbeats: &str, account: &str) -> Self {
        Self {
            pods: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            heartbeats: heartbeats.to_owned(),
            account: account.to_owned(),
            username: format!("system:serviceaccount:{namespace}:{account}"),
            nodes: Mutex::default(),
        }
    }

    /// Answers one AdmissionReview.
    pub async fn review(
        &self,
        review: AdmissionReview<DynamicObject>,
    ) -> AdmissionReview<DynamicObject> {
        let req: AdmissionRequest<DynamicObject> = match review.try_into() {
            Ok(r) => r,
            Err(e) => return AdmissionResponse::invalid(e.to_string()).into_review(),
        };
        let resp = AdmissionResponse::from(&req);
        let (pod, uid) = match guard::caller(&req.user_info, &self.username) {
            Caller::Other => return resp.into_review(),
            Caller::Unbound => {
                return self.refuse(&req, resp, NoNode::Refused(format!(
                    "{} used a token bound to no pod (a legacy Secret token or an unbound TokenRequest); node agents must use their pod's projected service-account token",
                    self.username
                )));
            }
            Caller::Pod { name, uid } => (name.to_owned(), uid.to_owned()),
        };
        let node = match self.node_of(&pod, &uid).await {
            Ok(n) => n,
            Err(why) => return self.refuse(&req, resp, why),
        };
        let (old, new) = (
            req.old_object
                .as_ref()
                .and_then(|o| serde_json::to_value(o).ok()),
            req.object
                .as_ref()
                .and_then(|o| serde_json::to_value(o).ok()),
        );
        let name = if req.name.is_empty() {
            new.as_ref()
                .and_then(|n| n["metadata"]["name"].as_str())
                .unwrap_or_default()
                .to_owned()
        } else {
            req.name.clone()
        };
        let write = Write {
            operation: req.operation.clone(),
            kind: Kind::of(
                &req.resource.group,
                &req.resource.resource,
                req.sub_resource.as_deref(),
            ),
            namespace: req.namespace.as_deref().unwrap_or_default(),
            name: &name,
            old: old.as_ref(),
            new: new.as_ref(),
        };
        match guard::check(&node, &self.heartbeats, &write) {
            Ok(()) => resp.into_review(),
            Err(why) => self.refuse(
                &req,
                resp,
                NoNode::Refused(format!("node agent on {node} (pod {pod}): {why}")),
            ),
        }
    }

    fn refuse(
        &self,
        req: &AdmissionRequest<DynamicObject>,
        resp: AdmissionResponse,
        why: NoNode,
    ) -> AdmissionReview<DynamicObject> {
        let (code, reason, message) = match why {
            NoNode::Refused(m) => (403, "Forbidden", m),
            NoNode::Unavailable(m) => (503, "ServiceUnavailable", m),
        };
        tracing::warn!(
            user = req.user_info.username.as_deref().unwrap_or_default(),
            resource = %req.resource.resource,
            namespace = req.namespace.as_deref().unwrap_or_default(),
            name = %req.name,
            operation = ?req.operation,
            code,
            %message,
            "refused a node agent's write"
        );
        let mut resp = resp.deny(format!("localnfs: {message}"));
        resp.result.code = code;
        resp.result.reason = reason.into();
        resp.into_review()
    }

    /// The node of the agent pod `name` with uid `uid`.
    async fn node_of(&self, name: &str, uid: &str) -> Result<String, NoNode> {
        if let Some(node) = self.nodes.lock().ok().and_then(|c| c.get(uid).cloned()) {
            return Ok(node);
        }
        let pod = self.pods.get_opt(name).await.map_err(|e| {
            NoNode::Unavailable(format!(
                "cannot look up agent pod {}/{name}: {e}",
                self.namespace
            ))
        })?;
        let Some(pod) = pod else {
            return Err(NoNode::Refused(format!(
                "the token's pod {}/{name} does not exist",
                self.namespace
            )));
        };
        if pod.metadata.uid.as_deref() != Some(uid) {
            return Err(NoNode::Refused(format!(
                "the token's pod {}/{name} has another uid (it was replaced)",
                self.namespace
            )));
        }
        let spec = pod.spec.unwrap_or_default();
        if spec.service_account_name.as_deref() != Some(self.account.as_str()) {
            return Err(NoNode::Refused(format!(
                "pod {}/{name} does not run as service account {}",
                self.namespace, self.account
            )));
        }
        let Some(node) = spec.node_name.filter(|n| !n.is_empty()) else {
            return Err(NoNode::Refused(format!(
                "pod {}/{name} is not bound to a node",
                self.namespace
            )));
        };
        if let Ok(mut cache) = self.nodes.lock() {
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(uid.to_owned(), node.clone());
        }
        Ok(node)
    }
}
