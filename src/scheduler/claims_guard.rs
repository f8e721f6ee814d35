//! Which claim writes may carry localnfs's own keys (the rules of the helper's claim
//! webhook, `POST /validate-claims`). Every label, annotation and finalizer under
//! `localnfs.io/` (or a subdomain of it) on a claim is written by the controller or
//! the node agents; a tenant who writes one is forging an answer or a request, and a
//! claim re-created from saved YAML carries the original's. This webhook refuses them
//! with a message that says what to do.
//!
//! - **Who** ([`writer`]): the controller's and the agents' service accounts are
//!   localnfs; anyone else (tenants, cluster admins, other controllers) is not. The
//!   agents are held to their own node's claims by the write guard ([`super::guard`]),
//!   not here.
//! - **What** ([`check`]), for anyone but localnfs:
//!   - CREATE: no localnfs key at all;
//!   - UPDATE: every localnfs key as it was (none added, changed or removed); every
//!     other field is not this module's business, so a resize or a label of the
//!     tenant's own still goes through on a claim that carries ours.
//!
//! The keys are matched by their prefix, not listed, so a key added later is covered
//! without a change here.
//!
//! This is a convenience, not the trust boundary: the webhook is registered with
//! `failurePolicy: Ignore` (deploy/base/webhook.yaml), because the controller and the
//! agents verify what they read themselves (signed requests and answers, DESIGN.md
//! invariant 11) and a claim webhook that failed closed would block every claim in
//! the cluster while the helper is down.
//!
//! Pure functions over JSON values, tested below; the AdmissionReview wire format is
//! in [`super::claims_review`].

use kube::core::admission::Operation;
use serde_json::Value;

/// Whether a label, annotation or finalizer key is localnfs's: `localnfs.io/...` or
/// `<sub>.localnfs.io/...`.
pub fn is_ours(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, _)) => prefix == "localnfs.io" || prefix.ends_with(".localnfs.io"),
        None => false,
    }
}

/// Who wrote a claim, as far as this webhook is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// The controller's or the agents' service account.
    Localnfs,
    /// Anyone else.
    Other,
}

/// Classifies `username` against localnfs's service accounts (full usernames,
/// `system:serviceaccount:<namespace>:<name>`).
pub fn writer(username: Option<&str>, localnfs: &[&str]) -> Writer {
    match username {
        Some(u) if localnfs.contains(&u) => Writer::Localnfs,
        _ => Writer::Other,
    }
}

/// One of our keys on a claim, with its value (`None` for a finalizer).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    what: &'static str,
    key: String,
    value: Option<String>,
}

/// Our labels, annotations and finalizers on `obj`, sorted.
fn ours(obj: &Value) -> Vec<Key> {
    let meta = &obj["metadata"];
    let mut keys: Vec<Key> = Vec::new();
    for (what, field) in [("label", "labels"), ("annotation", "annotations")] {
        for (k, v) in meta[field].as_object().into_iter().flatten() {
            if is_ours(k) {
                keys.push(Key {
                    what,
                    key: k.clone(),
                    value: Some(v.as_str().map_or_else(|| v.to_string(), str::to_owned)),
                });
            }
        }
    }
    for f in meta["finalizers"].as_array().into_iter().flatten() {
        if let Some(f) = f.as_str().filter(|f| is_ours(f)) {
            keys.push(Key {
                what: "finalizer",
                key: f.to_owned(),
                value: None,
            });
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// The advice every refusal ends with.
const WHY: &str = "(a claim re-created from saved YAML must drop its localnfs.io/ keys)";

/// Whether `writer` may make this claim write; `Err` says why not, naming the key.
/// `old` is the claim as stored (UPDATE), `new` as it would be stored.
pub fn check(
    operation: &Operation,
    writer: Writer,
    old: Option<&Value>,
    new: Option<&Value>,
) -> Result<(), String> {
    if writer == Writer::Localnfs {
        return Ok(());
    }
    let after = new.map(ours).unwrap_or_default();
    match operation {
        Operation::Create => match after.first() {
            None => Ok(()),
            Some(k) => Err(format!(
                "{} {} is written by localnfs only: remove it {WHY}",
                k.what, k.key
            )),
        },
        Operation::Update => {
            let before = old.map(ours).unwrap_or_default();
            if let Some(k) = after.iter().find(|k| !before.contains(k)) {
                let verb = if before.iter().any(|b| b.what == k.what && b.key == k.key) {
                    "change"
                } else {
                    "add"
                };
                return Err(format!(
                    "{} {} is written by localnfs only: only the controller and the node agents {verb} it {WHY}",
                    k.what, k.key
                ));
            }
            match before.iter().find(|k| !after.contains(k)) {
                None => Ok(()),
                Some(k) => Err(format!(
                    "{} {} is written by localnfs only: only the controller and the node agents remove it",
                    k.what, k.key
                )),
            }
        }
        // Not registered for anything else; deleting a claim is its owner's right.
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claim(labels: Value, annotations: Value, finalizers: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data-0", "namespace": "db", "labels": labels,
                "annotations": annotations, "finalizers": finalizers},
            "spec": {"resources": {"requests": {"storage": "1Gi"}}},
        })
    }

    fn plain() -> Value {
        claim(
            json!({"app": "db"}),
            json!({"volume.kubernetes.io/selected-node": "n1"}),
            json!(["kubernetes.io/pvc-protection"]),
        )
    }

    /// A claim as the controller and an agent left it.
    fn placed() -> Value {
        claim(
            json!({"app": "db", "localnfs.io/node": "n1"}),
            json!({"localnfs.io/volume-request": "{}", "localnfs.io/volume-ready": "v1"}),
            json!(["kubernetes.io/pvc-protection", "localnfs.io/provisioning"]),
        )
    }

    fn create(new: &Value) -> Result<(), String> {
        check(&Operation::Create, Writer::Other, None, Some(new))
    }

    fn update(old: &Value, new: &Value) -> Result<(), String> {
        check(&Operation::Update, Writer::Other, Some(old), Some(new))
    }

    #[test]
    fn our_keys_are_recognised_by_prefix_so_new_keys_are_covered() {
        for (key, want) in [
            ("localnfs.io/volume-ready", true),
            ("localnfs.io/volume-request-signature", true),
            ("localnfs.io/a-key-added-next-year", true),
            ("agents.localnfs.io/x", true),
            ("localnfs.io", false),
            ("notlocalnfs.io/x", false),
            ("example.com/localnfs.io", false),
            ("app", false),
            ("kubernetes.io/pvc-protection", false),
        ] {
            assert_eq!(is_ours(key), want, "{key}");
        }
    }

    #[test]
    fn a_tenant_may_create_claims_without_our_keys() {
        assert_eq!(create(&plain()), Ok(()));
        assert_eq!(
            create(&claim(json!(null), json!(null), json!(null))),
            Ok(())
        );
    }

    #[test]
    fn a_tenant_may_not_create_a_claim_carrying_any_of_our_keys() {
        for (new, named) in [
            (
                claim(json!({"localnfs.io/node": "n2"}), json!({}), json!([])),
                "label localnfs.io/node",
            ),
            (
                claim(
                    json!({}),
                    json!({"localnfs.io/volume-ready": "v1"}),
                    json!([]),
                ),
                "annotation localnfs.io/volume-ready",
            ),
            (
                claim(json!({}), json!({"localnfs.io/abandon": "true"}), json!([])),
                "annotation localnfs.io/abandon",
            ),
            (
                claim(json!({}), json!({}), json!(["localnfs.io/provisioning"])),
                "finalizer localnfs.io/provisioning",
            ),
            (
                claim(json!({}), json!({"localnfs.io/future-key": "x"}), json!([])),
                "annotation localnfs.io/future-key",
            ),
        ] {
            let err = create(&new).expect_err(named);
            assert_eq!(
                err,
                format!(
                    "{named} is written by localnfs only: remove it (a claim re-created from saved YAML must drop its localnfs.io/ keys)"
                )
            );
        }
    }

    #[test]
    fn a_tenant_may_change_everything_else_on_a_claim_carrying_our_keys() {
        let old = placed();
        let mut resized = old.clone();
        resized["spec"]["resources"]["requests"]["storage"] = json!("2Gi");
        resized["metadata"]["labels"]["tier"] = json!("gold");
        resized["metadata"]["annotations"]["note"] = json!("mine");
        resized["metadata"]["finalizers"] = json!(["localnfs.io/provisioning", "mine/keep"]);
        assert_eq!(update(&old, &resized), Ok(()));
        assert_eq!(update(&plain(), &plain()), Ok(()));
    }

    #[test]
    fn a_tenant_may_not_add_change_or_remove_our_keys() {
        let old = placed();
        let mut added = old.clone();
        added["metadata"]["annotations"]["localnfs.io/abandon"] = json!("true");
        let err = update(&old, &added).expect_err("add");
        assert!(
            err.starts_with("annotation localnfs.io/abandon is written by localnfs only: only the controller and the node agents add it"),
            "{err}"
        );
        let mut changed = old.clone();
        changed["metadata"]["annotations"]["localnfs.io/volume-ready"] = json!("v2");
        let err = update(&old, &changed).expect_err("change");
        assert!(err.contains("volume-ready is written by localnfs only: only the controller and the node agents change it"), "{err}");
        let mut moved = old.clone();
        moved["metadata"]["labels"]["localnfs.io/node"] = json!("n2");
        assert!(
            update(&old, &moved)
                .expect_err("move")
                .starts_with("label localnfs.io/node")
        );
        let mut unlabelled = old.clone();
        if let Some(l) = unlabelled["metadata"]["labels"].as_object_mut() {
            l.remove("localnfs.io/node");
        }
        let err = update(&old, &unlabelled).expect_err("remove");
        assert_eq!(
            err,
            "label localnfs.io/node is written by localnfs only: only the controller and the node agents remove it"
        );
        let mut unfinalized = old.clone();
        unfinalized["metadata"]["finalizers"] = json!(["kubernetes.io/pvc-protection"]);
        let err = update(&old, &unfinalized).expect_err("finalizer");
        assert!(
            err.starts_with("finalizer localnfs.io/provisioning"),
            "{err}"
        );
        // A plain claim gaining one of ours is the same forgery as creating it so.
        let mut forged = plain();
        forged["metadata"]["labels"]["localnfs.io/node"] = json!("n1");
        assert!(update(&plain(), &forged).is_err());
    }

    #[test]
    fn the_controller_and_the_agents_write_our_keys() {
        let accounts = [
            "system:serviceaccount:localnfs-system:localnfs-controller",
            "system:serviceaccount:localnfs-system:localnfs-node",
        ];
        for a in accounts {
            let w = writer(Some(a), &accounts);
            assert_eq!(w, Writer::Localnfs);
            assert_eq!(
                check(&Operation::Update, w, Some(&plain()), Some(&placed())),
                Ok(())
            );
            assert_eq!(check(&Operation::Create, w, None, Some(&placed())), Ok(()));
        }
        for other in [
            Some("kubernetes-admin"),
            Some("system:serviceaccount:db:localnfs-controller"),
            Some("system:serviceaccount:localnfs-system:default"),
            None,
        ] {
            assert_eq!(writer(other, &accounts), Writer::Other, "{other:?}");
        }
    }

    #[test]
    fn deleting_a_claim_is_its_owners_right() {
        assert_eq!(
            check(&Operation::Delete, Writer::Other, Some(&placed()), None),
            Ok(())
        );
    }
}
