//! Clones: a claim whose `dataSource` names another claim of its namespace gets a new
//! volume holding a copy of that claim's volume. This decides which volume that is
//! ([`resolve`]), a pure function of the source claim and its PV as the API server has
//! them; the claim reconciler reads those two and puts the answer in the request it
//! signs (`objects::request::CloneSource`).
//!
//! Rules, in order:
//! 1. The source claim exists, is not being deleted and is Bound to PV `pvc-<its uid>`
//!    (the name this controller gives a claim's PV: a claim bound to a PV made by hand,
//!    or re-bound, is not ours to copy). Until it is Bound the clone waits (a
//!    StatefulSet with `podManagementPolicy: Parallel` creates every claim at once).
//! 2. That PV was made by this provisioner, is not being deleted, its claimRef holds
//!    the source claim's uid, and it names its node and volume. These are PV fields
//!    only the controller writes (PVs are cluster-scoped: a tenant cannot edit them,
//!    and the agents' write guard lets an agent change only its size annotation); no
//!    annotation on a claim decides what is copied.
//! 3. The new claim asks for at least the source's size: the PV's capacity, or the
//!    size its agent applied after an expansion, whichever is larger.
//! 4. The copy is made on the node the scheduler chose (WaitForFirstConsumer: the
//!    scheduler helper steers the pod to the source's node while it has room); without
//!    a choice (Immediate binding) on the source's node when it has room, else on any
//!    node with room ([`candidates`]). On another node than the source's, that node's
//!    agent streams the copy from the source's agent (`node::peer`), and the
//!    `Provisioning` event says so and why ([`note`]).
//!
//! A claim naming itself starts empty: that is how a StatefulSet's template says "new
//! replicas start from ordinal 0" (ordinal 0's claim is made from the same template).

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;

use crate::kubeclient::annotation;
use crate::objects::claim::{DataSource, data_source, pv_name};
use crate::objects::class::quantity_bytes;
use crate::objects::keys::{NODE_KEY, PROVISIONED_BY, SIZE, VOLUME_KEY};
use crate::objects::request::CloneSource;
use crate::volume::VolumeName;

/// The volume a clone copies, and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// What the request tells the agent to copy.
    pub copy: CloneSource,
    /// The node holding it: the clone is made there.
    pub node: String,
    /// Its size, the least the clone may ask for.
    pub size_bytes: u64,
}

/// Why the clone cannot be placed now, and when to look again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotYet {
    pub message: String,
    pub retry: Duration,
}

/// How long a clone waits for its source claim to be bound (or to appear).
pub const SOURCE_RETRY: Duration = Duration::from_secs(10);
/// How long a clone whose source can never be copied as it stands waits (an edit of
/// the clone claim brings it back sooner).
pub const REFUSED_RETRY: Duration = Duration::from_secs(300);

/// What the claim asks to start from, as far as placement goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted<'a> {
    /// An empty volume (no data source, or the claim names itself).
    Empty,
    /// A copy of the claim of this name.
    Claim(&'a str),
}

/// Reads the claim's data source (an unsupported one is refused by `pv::validate_claim`
/// before this is asked, and reads here as empty).
pub fn wanted(pvc: &PersistentVolumeClaim) -> Wanted<'_> {
    match data_source(pvc) {
        DataSource::Claim(name) if name != pvc.name_any() => Wanted::Claim(name),
        _ => Wanted::Empty,
    }
}

/// Whether the claim names itself as its data source (it starts empty; see the module
/// doc).
pub fn names_itself(pvc: &PersistentVolumeClaim) -> bool {
    matches!(data_source(pvc), DataSource::Claim(name) if name == pvc.name_any())
}

/// The volume claim `pvc` (asking for `requested` bytes) clones, from the source claim
/// `source` (`None`: not found) and the PV made for it (`None`: not found), made by
/// `provisioner`.
pub fn resolve(
    pvc: &PersistentVolumeClaim,
    source: Option<&PersistentVolumeClaim>,
    pv: Option<&PersistentVolume>,
    provisioner: &str,
    requested: u64,
) -> Result<Source, NotYet> {
    let ns = pvc.namespace().unwrap_or_default();
    let wait = |message: String| NotYet {
        message,
        retry: SOURCE_RETRY,
    };
    let refuse = |message: String| NotYet {
        message,
        retry: REFUSED_RETRY,
    };
    let Wanted::Claim(name) = wanted(pvc) else {
        return Err(refuse(
            "the claim does not name another claim to clone".into(),
        ));
    };
    let Some(src) = source else {
        return Err(wait(format!(
            "waiting for claim {ns}/{name}, the clone's dataSource, to exist"
        )));
    };
    if src.metadata.deletion_timestamp.is_some() {
        return Err(refuse(format!(
            "claim {ns}/{name}, the clone's dataSource, is being deleted"
        )));
    }
    let uid = src.uid().unwrap_or_default();
    let phase = src.status.as_ref().and_then(|s| s.phase.as_deref());
    let bound_to = src.spec.as_ref().and_then(|s| s.volume_name.as_deref());
    if phase != Some("Bound") {
        return Err(wait(format!(
            "waiting for claim {ns}/{name}, the clone's dataSource, to be Bound (it is {})",
            phase.unwrap_or("Pending")
        )));
    }
    let own_pv = pv_name(&uid);
    let not_ours = || {
        refuse(format!(
            "claim {ns}/{name}, the clone's dataSource, is not bound to a volume localnfs made for it: localnfs clones only its own volumes"
        ))
    };
    if bound_to != Some(own_pv.as_str()) {
        return Err(not_ours());
    }
    let Some(pv) = pv.filter(|pv| pv.name_any() == own_pv) else {
        return Err(not_ours());
    };
    let claim_ref_uid = pv
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .and_then(|r| r.uid.as_deref());
    if annotation(pv, PROVISIONED_BY) != Some(provisioner) || claim_ref_uid != Some(&uid) {
        return Err(not_ours());
    }
    if pv.metadata.deletion_timestamp.is_some() {
        return Err(refuse(format!(
            "PV {own_pv} of claim {ns}/{name}, the clone's dataSource, is being deleted"
        )));
    }
    let (Some(node), Some(volume)) = (
        annotation(pv, NODE_KEY),
        annotation(pv, VOLUME_KEY).and_then(|v| VolumeName::new(v).ok()),
    ) else {
        return Err(refuse(format!(
            "PV {own_pv} of claim {ns}/{name} names no node or volume: it cannot be cloned"
        )));
    };
    let capacity = pv
        .spec
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .and_then(|q| quantity_bytes(&q.0).ok())
        .unwrap_or(0);
    let applied = annotation(pv, SIZE)
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    let size_bytes = capacity.max(applied);
    if requested < size_bytes {
        return Err(refuse(format!(
            "the clone asks for {requested} bytes, less than its dataSource claim {ns}/{name} ({size_bytes} bytes): ask for at least as much"
        )));
    }
    Ok(Source {
        copy: CloneSource {
            volume,
            claim_uid: uid,
            namespace: ns,
            claim: name.to_owned(),
        },
        node: node.to_owned(),
        size_bytes,
    })
}

/// The nodes to try for a clone of `source`, in order (`None`: any node with room):
/// the scheduler's choice alone when it made one, else the source's node, then any.
pub fn candidates<'a>(source: &'a Source, selected: Option<&'a str>) -> Vec<Option<&'a str>> {
    match selected {
        Some(node) => vec![Some(node)],
        None => vec![Some(source.node.as_str()), None],
    }
}

/// The `Provisioning` event's note for a clone of `source` into `volume` (`size`
/// bytes) placed on `node`; `selected`: the scheduler's choice; `refused`: why the
/// nodes tried before `node` were not taken.
pub fn note(
    source: &Source,
    volume: &str,
    size: u64,
    node: &str,
    selected: Option<&str>,
    refused: &[String],
) -> String {
    let c = &source.copy;
    let what = format!(
        "cloning claim {}/{} (volume {}) into volume {volume} ({size} bytes) on node {node}",
        c.namespace, c.claim, c.volume
    );
    if node == source.node {
        return what;
    }
    let why = match (selected, refused.first()) {
        (Some(sel), _) => format!("the scheduler chose node {sel}"),
        (None, Some(r)) => format!("node {} has no room for it ({r})", source.node),
        (None, None) => format!("node {} was not chosen", source.node),
    };
    format!(
        "{what}, streamed from node {} by its agent: {why}",
        source.node
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const ME: &str = "localnfs.io/nfs";

    fn clone_claim(size: &str) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": "data-1", "namespace": "db", "uid": "u1"},
            "spec": {"dataSource": {"kind": "PersistentVolumeClaim", "name": "data-0"},
                     "resources": {"requests": {"storage": size}}},
        }))
        .expect("claim")
    }

    fn source(extra: Value) -> PersistentVolumeClaim {
        let mut c = json!({
            "metadata": {"name": "data-0", "namespace": "db", "uid": "u0"},
            "spec": {"volumeName": "pvc-u0"},
            "status": {"phase": "Bound"},
        });
        merge(&mut c, extra);
        serde_json::from_value(c).expect("source")
    }

    fn pv(extra: Value) -> PersistentVolume {
        let mut p = json!({
            "metadata": {"name": "pvc-u0", "annotations": {
                PROVISIONED_BY: ME, NODE_KEY: "n1", VOLUME_KEY: "pvc-u0"}},
            "spec": {"capacity": {"storage": "1Gi"},
                     "claimRef": {"namespace": "db", "name": "data-0", "uid": "u0"}},
        });
        merge(&mut p, extra);
        serde_json::from_value(p).expect("pv")
    }

    fn merge(into: &mut Value, extra: Value) {
        match (into, extra) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    if v.is_null() {
                        a.remove(&k);
                    } else {
                        merge(a.entry(k).or_insert(Value::Null), v);
                    }
                }
            }
            (slot, v) => *slot = v,
        }
    }

    #[test]
    fn a_bound_source_of_ours_is_copied_on_its_node() {
        let got = resolve(
            &clone_claim("1Gi"),
            Some(&source(json!({}))),
            Some(&pv(json!({}))),
            ME,
            1 << 30,
        );
        assert_eq!(
            got,
            Ok(Source {
                copy: CloneSource {
                    volume: VolumeName::new("pvc-u0").expect("name"),
                    claim_uid: "u0".into(),
                    namespace: "db".into(),
                    claim: "data-0".into(),
                },
                node: "n1".into(),
                size_bytes: 1 << 30,
            })
        );
    }

    /// (what, source claim, its PV, bytes asked for, words of the refusal, retry)
    type Case = (
        &'static str,
        Option<PersistentVolumeClaim>,
        Option<PersistentVolume>,
        u64,
        &'static str,
        Duration,
    );

    #[test]
    fn sources_that_cannot_be_copied_say_why_and_when_to_look_again() {
        let gi = 1u64 << 30;
        let deleting = json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}});
        let cases: Vec<Case> = vec![
            (
                "source missing",
                None,
                Some(pv(json!({}))),
                gi,
                "to exist",
                SOURCE_RETRY,
            ),
            (
                "source pending",
                Some(source(json!({"status": {"phase": "Pending"}}))),
                None,
                gi,
                "to be Bound (it is Pending)",
                SOURCE_RETRY,
            ),
            (
                "source deleted",
                Some(source(deleting.clone())),
                Some(pv(json!({}))),
                gi,
                "is being deleted",
                REFUSED_RETRY,
            ),
            (
                "bound to a PV made by hand",
                Some(source(json!({"spec": {"volumeName": "static"}}))),
                Some(pv(json!({}))),
                gi,
                "not bound to a volume localnfs made",
                REFUSED_RETRY,
            ),
            (
                "PV missing",
                Some(source(json!({}))),
                None,
                gi,
                "not bound to a volume localnfs made",
                REFUSED_RETRY,
            ),
            (
                "PV by another provisioner",
                Some(source(json!({}))),
                Some(pv(
                    json!({"metadata": {"annotations": {PROVISIONED_BY: "other.io/x"}}}),
                )),
                gi,
                "not bound to a volume localnfs made",
                REFUSED_RETRY,
            ),
            (
                "PV for another claim",
                Some(source(json!({}))),
                Some(pv(json!({"spec": {"claimRef": {"uid": "u9"}}}))),
                gi,
                "not bound to a volume localnfs made",
                REFUSED_RETRY,
            ),
            (
                "PV deleted",
                Some(source(json!({}))),
                Some(pv(deleting)),
                gi,
                "is being deleted",
                REFUSED_RETRY,
            ),
            (
                "PV without node",
                Some(source(json!({}))),
                Some(pv(json!({"metadata": {"annotations": {NODE_KEY: null}}}))),
                gi,
                "names no node",
                REFUSED_RETRY,
            ),
            (
                "smaller than the source",
                Some(source(json!({}))),
                Some(pv(json!({}))),
                gi - 1,
                "less than its dataSource",
                REFUSED_RETRY,
            ),
            (
                "smaller than the source grew to",
                Some(source(json!({}))),
                Some(pv(
                    json!({"metadata": {"annotations": {SIZE: (2 * gi).to_string()}}}),
                )),
                gi,
                "(2147483648 bytes)",
                REFUSED_RETRY,
            ),
        ];
        for (what, src, pv, requested, want, retry) in cases {
            let got = resolve(
                &clone_claim("1Gi"),
                src.as_ref(),
                pv.as_ref(),
                ME,
                requested,
            );
            let Err(e) = got else {
                panic!("{what}: {got:?}")
            };
            assert!(e.message.contains(want), "{what}: {}", e.message);
            assert_eq!(e.retry, retry, "{what}");
        }
    }

    #[test]
    fn a_clone_tries_the_schedulers_choice_else_its_sources_node_then_any() {
        let src = resolve(
            &clone_claim("1Gi"),
            Some(&source(json!({}))),
            Some(&pv(json!({}))),
            ME,
            1 << 30,
        )
        .expect("source");
        assert_eq!(candidates(&src, Some("n2")), vec![Some("n2")]);
        assert_eq!(candidates(&src, None), vec![Some("n1"), None]);
        let here = note(&src, "pvc-u1", 1, "n1", None, &[]);
        assert!(!here.contains("streamed"), "{here}");
        let full = note(&src, "pvc-u1", 1, "n2", None, &["not enough room".into()]);
        assert!(
            full.contains("on node n2, streamed from node n1")
                && full.contains("node n1 has no room for it (not enough room)"),
            "{full}"
        );
        let chosen = note(&src, "pvc-u1", 1, "n2", Some("n2"), &[]);
        assert!(chosen.contains("the scheduler chose node n2"), "{chosen}");
    }

    #[test]
    fn a_claim_naming_itself_starts_empty() {
        let mut own: PersistentVolumeClaim = clone_claim("1Gi");
        own.metadata.name = Some("data-0".into());
        assert_eq!(wanted(&own), Wanted::Empty);
        assert!(names_itself(&own));
        assert_eq!(wanted(&clone_claim("1Gi")), Wanted::Claim("data-0"));
        assert!(!names_itself(&clone_claim("1Gi")));
    }
}
