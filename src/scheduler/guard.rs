//! Which writes a node agent may make (the rules of the helper's validating webhook,
//! `POST /validate`): an agent changes only what belongs to its own node, as kube's
//! NodeRestriction admission does for kubelets. RBAC cannot say this (it has no
//! "objects labelled with my node"), so every agent's service account may patch every
//! claim and PV, and this is what narrows it.
//!
//! - **Who**: a request by the agents' service account carries, with a pod-bound token
//!   (the projected token every agent pod mounts), the pod's name and uid in
//!   `userInfo.extra`; [`caller`] reads them and [`super::agents`] looks the pod up for
//!   its node. A token not bound to a pod (a legacy Secret token, a TokenRequest
//!   without a pod) names no node and is refused outright.
//! - **What** ([`check`]), for an agent on node N:
//!   - a claim: UPDATE only, labelled `localnfs.io/node=N` before and after, and only
//!     the agent's answer annotations ([`READY`], [`REFUSED`], [`REMOVED`]) change;
//!   - a PV: UPDATE only, labelled with N before and after, and only its [`SIZE`]
//!     annotation changes or our finalizer ([`PV_FINALIZER`]) is removed;
//!   - a Lease: only `localnfs-node-N` (heartbeat), `localnfs-key-N` (its public key,
//!     which the controller checks its answers with) and `localnfs-usage-<shard>-N`
//!     (usage, `objects::usage`) in the heartbeat namespace, labelled with N
//!     (RBAC gives the agents Leases in that namespace only, so the controller's
//!     leader Lease, in localnfs's namespace, is out of their reach without this);
//!   - anything else: refused.
//!
//! Fields the API server itself maintains (`resourceVersion`, `managedFields`,
//! `generation`, and `status`, which a write of the main resource cannot change) are
//! ignored in the comparison. Callers other than the agents' service account are not
//! this module's business and are always allowed.
//!
//! Pure functions over JSON values, tested below; the I/O (pod lookup) and the
//! AdmissionReview wire format are in [`super::agents`].

use k8s_openapi::api::authentication::v1::UserInfo;
use kube::core::admission::Operation;
use serde_json::Value;

use crate::objects::agents::key_lease_name;
use crate::objects::keys::{
    NODE_KEY, NODE_LEASE_PREFIX, PV_FINALIZER, READY, READY_SIG, REFUSED, REMOVED, REMOVED_SIG,
    SIZE,
};
use crate::objects::usage;

/// `userInfo.extra` keys a pod-bound service-account token adds.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// Who made a request, as far as the guard is concerned.
#[derive(Debug, PartialEq, Eq)]
pub enum Caller<'a> {
    /// Not the agents' service account: not restricted here.
    Other,
    /// The agents' service account with a token bound to no pod.
    Unbound,
    /// The agents' service account with a token bound to this pod.
    Pod { name: &'a str, uid: &'a str },
}

/// Classifies `user` against the agents' service account `account`
/// (`system:serviceaccount:<namespace>:<name>`).
pub fn caller<'a>(user: &'a UserInfo, account: &str) -> Caller<'a> {
    if user.username.as_deref() != Some(account) {
        return Caller::Other;
    }
    let one = |key: &str| match user.extra.as_ref().and_then(|e| e.get(key)) {
        Some(values) if values.len() == 1 && !values[0].is_empty() => Some(values[0].as_str()),
        _ => None,
    };
    match (one(POD_NAME_EXTRA), one(POD_UID_EXTRA)) {
        (Some(name), Some(uid)) => Caller::Pod { name, uid },
        _ => Caller::Unbound,
    }
}

/// The kinds of object the webhook is registered for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Claim,
    Volume,
    Lease,
    /// Anything else (another resource, a subresource): never an agent's to write.
    Other,
}

impl Kind {
    /// From the request's `resource` (group, resource) and `subResource`.
    pub fn of(group: &str, resource: &str, sub_resource: Option<&str>) -> Kind {
        if sub_resource.is_some_and(|s| !s.is_empty()) {
            return Kind::Other;
        }
        match (group, resource) {
            ("", "persistentvolumeclaims") => Kind::Claim,
            ("", "persistentvolumes") => Kind::Volume,
            ("coordination.k8s.io", "leases") => Kind::Lease,
            _ => Kind::Other,
        }
    }
}

/// One write, as the API server describes it to the webhook.
#[derive(Debug)]
pub struct Write<'a> {
    pub operation: Operation,
    pub kind: Kind,
    pub namespace: &'a str,
    pub name: &'a str,
    /// The object as stored (UPDATE, DELETE).
    pub old: Option<&'a Value>,
    /// The object as it would be stored (CREATE, UPDATE).
    pub new: Option<&'a Value>,
}

/// The heartbeat Lease of the agent on `node`.
pub fn lease_name(node: &str) -> String {
    format!("{NODE_LEASE_PREFIX}{node}")
}

/// Whether the agent on `node` may make `write`; `Err` says why not. `namespace` is
/// the heartbeat namespace (where the agents' Leases live).
pub fn check(node: &str, namespace: &str, write: &Write<'_>) -> Result<(), String> {
    let what = match write.kind {
        Kind::Claim => format!("claim {}/{}", write.namespace, write.name),
        Kind::Volume => format!("PV {}", write.name),
        Kind::Lease => format!("Lease {}/{}", write.namespace, write.name),
        Kind::Other => return Err("node agents may only write claims, PVs and their Lease".into()),
    };
    let refuse = |why: String| Err(format!("{what}: {why}"));
    if write.kind == Kind::Lease {
        let own = lease_name(node);
        let own_key = key_lease_name(node);
        let own_usage = usage::parse_lease_name(write.name)
            .filter(|(_, n)| *n == node)
            .map(|(shard, _)| shard);
        if write.namespace != namespace
            || (write.name != own && write.name != own_key && own_usage.is_none())
        {
            return refuse(format!(
                "the agent on node {node} may only write its own Lease {namespace}/{own} (and its key Lease {namespace}/{own_key} and usage Leases {namespace}/{}N-{node})",
                usage::USAGE_LEASE_PREFIX
            ));
        }
        if write.operation == Operation::Delete {
            return Ok(());
        }
        if !matches!(write.operation, Operation::Create | Operation::Update) {
            return refuse(format!("{:?} is not an agent's to make", write.operation));
        }
        // The shard label is what keeps usage Leases out of the heartbeat watches
        // (they select `!usage-shard`): a usage Lease must carry its own shard, and
        // a heartbeat none.
        let shard_label = write
            .new
            .and_then(|o| o["metadata"]["labels"][usage::USAGE_LABEL].as_str());
        let want_shard = own_usage.map(|s| s.to_string());
        if shard_label != want_shard.as_deref() {
            return refuse(match want_shard {
                Some(s) => format!(
                    "a usage Lease must carry the label {}={s}",
                    usage::USAGE_LABEL
                ),
                None => format!(
                    "a heartbeat Lease must not carry the label {}",
                    usage::USAGE_LABEL
                ),
            });
        }
        return match write.new.and_then(node_label) {
            Some(n) if n == node => Ok(()),
            _ => refuse(format!("the Lease must carry the label {NODE_KEY}={node}")),
        };
    }
    if write.operation != Operation::Update {
        return refuse(format!(
            "node agents only update claims and PVs, never {:?}",
            write.operation
        ));
    }
    let (Some(old), Some(new)) = (write.old, write.new) else {
        return refuse("an update without its old and new object".into());
    };
    for (state, obj) in [("is not", old), ("would no longer be", new)] {
        if node_label(obj) != Some(node) {
            return refuse(format!(
                "{state} placed on node {node} (label {NODE_KEY}={}), so the agent on {node} may not make this change",
                node_label(obj).unwrap_or("<none>")
            ));
        }
    }
    let allowed = match write.kind {
        Kind::Claim => Allowed {
            annotations: &[READY, READY_SIG, REFUSED, REMOVED, REMOVED_SIG],
            removable_finalizer: None,
        },
        _ => Allowed {
            annotations: &[SIZE],
            removable_finalizer: Some(PV_FINALIZER),
        },
    };
    allowed.only_change(old, new).or_else(refuse)
}

/// What an agent may change on a claim or PV of its node.
struct Allowed {
    annotations: &'static [&'static str],
    removable_finalizer: Option<&'static str>,
}

/// Metadata the API server maintains on every write.
const SERVER_KEPT: &[&str] = &["resourceVersion", "managedFields", "generation"];

impl Allowed {
    fn only_change(&self, old: &Value, new: &Value) -> Result<(), String> {
        let finalizers = |v: &Value| -> Vec<String> {
            v["metadata"]["finalizers"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|f| f.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let (before, after) = (finalizers(old), finalizers(new));
        if before != after {
            let without: Vec<String> = before
                .iter()
                .filter(|f| Some(f.as_str()) != self.removable_finalizer)
                .cloned()
                .collect();
            if after != without || self.removable_finalizer.is_none() {
                return Err(match self.removable_finalizer {
                    Some(f) => format!("may only remove the finalizer {f}"),
                    None => "may not change finalizers".into(),
                });
            }
        }
        let (old, new) = (self.strip(old), self.strip(new));
        match first_difference(&old, &new) {
            None => Ok(()),
            Some(path) => Err(format!(
                "may only change {}{}, not {path}",
                self.annotations
                    .iter()
                    .map(|a| format!("annotation {a}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                match self.removable_finalizer {
                    Some(f) => format!(" and remove finalizer {f}"),
                    None => String::new(),
                },
            )),
        }
    }

    /// The object without what the agent may change and what the server keeps.
    fn strip(&self, obj: &Value) -> Value {
        let mut v = obj.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("status");
        }
        if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            for k in SERVER_KEPT {
                meta.remove(*k);
            }
            meta.remove("finalizers");
            if let Some(ann) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
                for k in self.annotations {
                    ann.remove(*k);
                }
                if ann.is_empty() {
                    meta.remove("annotations");
                }
            }
        }
        v
    }
}

/// The node label of an object, if any.
fn node_label(obj: &Value) -> Option<&str> {
    obj["metadata"]["labels"][NODE_KEY].as_str()
}

/// The first field (as `a.b.c`, objects only) where `a` and `b` differ.
fn first_difference(a: &Value, b: &Value) -> Option<String> {
    if a == b {
        return None;
    }
    let (Some(x), Some(y)) = (a.as_object(), b.as_object()) else {
        return Some("the object".into());
    };
    let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        let (va, vb) = (x.get(k), y.get(k));
        if va == vb {
            continue;
        }
        return Some(match (va, vb) {
            (Some(va), Some(vb)) if va.is_object() && vb.is_object() => {
                match first_difference(va, vb) {
                    Some(inner) if inner != "the object" => format!("{k}.{inner}"),
                    _ => k.clone(),
                }
            }
            _ => k.clone(),
        });
    }
    Some("the object".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NS: &str = "localnfs-heartbeats";

    fn claim(node: &str, annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data-0", "namespace": "db", "resourceVersion": "7",
                "labels": {NODE_KEY: node},
                "annotations": annotations,
                "finalizers": ["kubernetes.io/pvc-protection", "localnfs.io/provisioning"]},
            "spec": {"resources": {"requests": {"storage": "1Gi"}}},
            "status": {"phase": "Pending"},
        })
    }

    fn pv(node: &str, annotations: Value, finalizers: &[&str]) -> Value {
        json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": "pvc-1", "resourceVersion": "9",
                "labels": {NODE_KEY: node},
                "annotations": annotations,
                "finalizers": finalizers},
            "spec": {"persistentVolumeReclaimPolicy": "Delete",
                "nfs": {"server": "10.0.0.1", "path": "/pvc-1"}},
        })
    }

    fn update<'a>(kind: Kind, old: &'a Value, new: &'a Value) -> Write<'a> {
        Write {
            operation: Operation::Update,
            kind,
            namespace: "db",
            name: "x",
            old: Some(old),
            new: Some(new),
        }
    }

    #[test]
    fn an_agent_may_answer_for_claims_placed_on_its_node_only() {
        let old = claim("n1", json!({"localnfs.io/volume-request": "{}"}));
        let mut ready = old.clone();
        ready["metadata"]["annotations"][READY] = json!("pvc-1");
        ready["metadata"]["resourceVersion"] = json!("8");
        assert_eq!(check("n1", NS, &update(Kind::Claim, &old, &ready)), Ok(()));
        let mut refused = old.clone();
        refused["metadata"]["annotations"][REFUSED] = json!("no room");
        assert_eq!(
            check("n1", NS, &update(Kind::Claim, &old, &refused)),
            Ok(())
        );

        let err = check("n2", NS, &update(Kind::Claim, &old, &ready)).expect_err("other node");
        assert!(err.contains("not placed on node n2"), "{err}");

        // Moving a claim to its own node, or away from it, is the controller's job.
        let mut on_n2 = claim("n2", json!({"localnfs.io/volume-request": "{}"}));
        on_n2["metadata"]["annotations"][READY] = json!("pvc-1");
        let err = check("n2", NS, &update(Kind::Claim, &old, &on_n2)).expect_err("take");
        assert!(err.contains("is not placed on node n2"), "{err}");
        let stolen = on_n2;
        let err = check("n2", NS, &update(Kind::Claim, &stolen, &ready)).expect_err("hand");
        assert!(
            err.contains("would no longer be placed on node n2"),
            "{err}"
        );
        let err = check("n1", NS, &update(Kind::Claim, &old, &stolen)).expect_err("give away");
        assert!(
            err.contains("would no longer be placed on node n1"),
            "{err}"
        );
    }

    #[test]
    fn an_agent_may_not_change_anything_else_on_its_claims() {
        let old = claim("n1", json!({"localnfs.io/volume-request": "{}"}));
        let mut request = old.clone();
        request["metadata"]["annotations"]["localnfs.io/volume-request"] = json!("{\"size\":1}");
        let err = check("n1", NS, &update(Kind::Claim, &old, &request)).expect_err("request");
        assert!(
            err.contains("not metadata.annotations.localnfs.io/volume-request"),
            "{err}"
        );
        let mut spec = old.clone();
        spec["spec"]["resources"]["requests"]["storage"] = json!("2Gi");
        let err = check("n1", NS, &update(Kind::Claim, &old, &spec)).expect_err("spec");
        assert!(err.contains("not spec"), "{err}");
        let mut fin = old.clone();
        fin["metadata"]["finalizers"] = json!(["kubernetes.io/pvc-protection"]);
        let err = check("n1", NS, &update(Kind::Claim, &old, &fin)).expect_err("finalizer");
        assert!(err.contains("may not change finalizers"), "{err}");
        let delete = Write {
            operation: Operation::Delete,
            new: None,
            ..update(Kind::Claim, &old, &old)
        };
        assert!(check("n1", NS, &delete).is_err());
    }

    #[test]
    fn an_agent_may_resize_and_release_its_own_pvs_only() {
        let old = pv("n1", json!({"localnfs.io/resize-to": "2"}), &[PV_FINALIZER]);
        let mut sized = old.clone();
        sized["metadata"]["annotations"][SIZE] = json!("2");
        assert_eq!(check("n1", NS, &update(Kind::Volume, &old, &sized)), Ok(()));
        let mut released = old.clone();
        released["metadata"]["finalizers"] = json!([]);
        assert_eq!(
            check("n1", NS, &update(Kind::Volume, &old, &released)),
            Ok(())
        );
        let no_list = {
            let mut v = old.clone();
            if let Some(m) = v["metadata"].as_object_mut() {
                m.remove("finalizers");
            }
            v
        };
        assert_eq!(
            check("n1", NS, &update(Kind::Volume, &old, &no_list)),
            Ok(())
        );

        let err = check("n2", NS, &update(Kind::Volume, &old, &sized)).expect_err("node 2");
        assert!(err.starts_with("PV x: is not placed on node n2"), "{err}");
        let mut policy = old.clone();
        policy["spec"]["persistentVolumeReclaimPolicy"] = json!("Retain");
        let err = check("n1", NS, &update(Kind::Volume, &old, &policy)).expect_err("spec");
        assert!(
            err.contains("not spec.persistentVolumeReclaimPolicy"),
            "{err}"
        );
        let mut want = old.clone();
        want["metadata"]["annotations"]["localnfs.io/resize-to"] = json!("9");
        assert!(check("n1", NS, &update(Kind::Volume, &old, &want)).is_err());
        let both = pv(
            "n1",
            json!({}),
            &["kubernetes.io/pv-protection", PV_FINALIZER],
        );
        let mut theirs = both.clone();
        theirs["metadata"]["finalizers"] = json!([PV_FINALIZER]);
        let err = check("n1", NS, &update(Kind::Volume, &both, &theirs)).expect_err("theirs");
        assert!(err.contains("may only remove the finalizer"), "{err}");
    }

    #[test]
    fn an_agent_may_write_its_own_heartbeat_and_key_leases_only() {
        let lease = |name: &str, node: &str| {
            json!({"metadata": {"name": name, "namespace": NS, "labels": {NODE_KEY: node}},
                   "spec": {"holderIdentity": node}})
        };
        let own = lease("localnfs-node-n1", "n1");
        let create = Write {
            operation: Operation::Create,
            kind: Kind::Lease,
            namespace: NS,
            name: "localnfs-node-n1",
            old: None,
            new: Some(&own),
        };
        assert_eq!(check("n1", NS, &create), Ok(()));
        let upd = || Write {
            operation: Operation::Update,
            kind: Kind::Lease,
            namespace: NS,
            name: "localnfs-node-n1",
            old: Some(&own),
            new: Some(&own),
        };
        assert_eq!(check("n1", NS, &upd()), Ok(()));
        // Its usage Leases too, each labelled with its shard.
        let mut usage = lease("localnfs-usage-3-n1", "n1");
        usage["metadata"]["labels"][usage::USAGE_LABEL] = json!("3");
        let w = Write {
            name: "localnfs-usage-3-n1",
            new: Some(&usage),
            ..upd()
        };
        assert_eq!(check("n1", NS, &w), Ok(()));
        // Its key Lease (the key its answers are checked with).
        let key = lease("localnfs-key-n1", "n1");
        let w = Write {
            name: "localnfs-key-n1",
            new: Some(&key),
            ..upd()
        };
        assert_eq!(check("n1", NS, &w), Ok(()));
        // Without the shard label (it would reach the heartbeat watches), with
        // another shard's, or a heartbeat carrying one.
        let unlabelled = lease("localnfs-usage-3-n1", "n1");
        let mut wrong = usage.clone();
        wrong["metadata"]["labels"][usage::USAGE_LABEL] = json!("4");
        for (name, new) in [
            ("localnfs-usage-3-n1", &unlabelled),
            ("localnfs-usage-3-n1", &wrong),
            ("localnfs-node-n1", &usage),
        ] {
            let w = Write {
                name,
                new: Some(new),
                ..upd()
            };
            let err = check("n1", NS, &w).expect_err(name);
            assert!(err.contains(usage::USAGE_LABEL), "{err}");
        }
        // Another node's (heartbeat or usage), the controller's, or its own in another
        // namespace.
        for (ns, name) in [
            (NS, "localnfs-node-n2"),
            (NS, "localnfs-key-n2"),
            (NS, "localnfs-usage-0-n2"),
            (NS, "localnfs-usage-0-n1-x"),
            (NS, "localnfs-controller"),
            ("localnfs-system", "localnfs-node-n1"),
        ] {
            let w = Write {
                operation: Operation::Update,
                kind: Kind::Lease,
                namespace: ns,
                name,
                old: Some(&own),
                new: Some(&own),
            };
            let err = check("n1", NS, &w).expect_err(name);
            assert!(err.contains("may only write its own Lease"), "{err}");
        }
        let unlabelled = json!({"metadata": {"name": "localnfs-node-n1"}});
        let w = Write {
            new: Some(&unlabelled),
            ..upd()
        };
        assert!(check("n1", NS, &w).expect_err("label").contains("label"));
        let other_label = lease("localnfs-node-n1", "n2");
        let w = Write {
            new: Some(&other_label),
            ..upd()
        };
        assert!(check("n1", NS, &w).is_err());
    }

    #[test]
    fn only_bound_tokens_of_the_agents_account_name_a_pod() {
        let account = "system:serviceaccount:localnfs-system:localnfs-node";
        let user = |name: &str, extra: Value| -> UserInfo {
            serde_json::from_value(json!({"username": name, "extra": extra})).expect("user")
        };
        let bound = user(
            account,
            json!({POD_NAME_EXTRA: ["localnfs-node-abcde"], POD_UID_EXTRA: ["u-1"]}),
        );
        assert_eq!(
            caller(&bound, account),
            Caller::Pod {
                name: "localnfs-node-abcde",
                uid: "u-1"
            }
        );
        assert_eq!(caller(&user(account, json!({})), account), Caller::Unbound);
        assert_eq!(
            caller(
                &user(
                    account,
                    json!({POD_NAME_EXTRA: ["a", "b"], POD_UID_EXTRA: ["u"]})
                ),
                account
            ),
            Caller::Unbound
        );
        assert_eq!(
            caller(
                &user("system:serviceaccount:kube-system:pv-binder", json!({})),
                account
            ),
            Caller::Other
        );
    }

    #[test]
    fn other_kinds_and_subresources_are_never_an_agents() {
        assert_eq!(
            Kind::of("", "persistentvolumes", Some("status")),
            Kind::Other
        );
        assert_eq!(Kind::of("", "pods", None), Kind::Other);
        assert_eq!(Kind::of("", "persistentvolumeclaims", None), Kind::Claim);
        let v = json!({});
        let w = Write {
            operation: Operation::Update,
            kind: Kind::Other,
            namespace: "",
            name: "n",
            old: Some(&v),
            new: Some(&v),
        };
        assert!(check("n1", NS, &w).is_err());
    }
}
