//! The next step for a claim: a pure function of what the claim, its PV, its class and
//! the agent of its node say now ([`next`]). The claim reconciler (`claims`) reads
//! those, asks for the step, does it, and comes back; since every step is decided from
//! the objects alone, a controller killed between any two steps resumes where it
//! stopped, and every rule here has a table test without a control plane.
//!
//! Every way provisioning can fail is a [`Failure`]: the reconciler handles all of
//! them in one place (metric, warning event, then retry, hand the node choice back to
//! the scheduler, or take the placement back).

use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;

use super::clone::{self, NotYet, Source, Wanted};
use super::pv::{ClaimRequest, needs_volume, validate_claim};
use crate::kubeclient::{annotation, has_finalizer};
use crate::objects::claim::pv_name;
use crate::objects::class::ClassParams;
use crate::objects::keys::*;
use crate::objects::signed::Verified;
use crate::volume::VolumeName;

/// What the reconciler knows about a claim when it decides.
pub struct Facts<'a> {
    pub claim: &'a PersistentVolumeClaim,
    /// The claim's StorageClass when it is one of ours (`None`: not ours, or gone).
    pub class: Option<&'a StorageClass>,
    /// Whether the claim's PV (`pvc-<uid>`) exists. Read only for claims of our classes.
    pub pv_exists: bool,
    /// Why the agent of the node the claim is placed on has been given up on (silent
    /// past its lease and the grace); `None` while it may still answer, or when the
    /// claim is not placed.
    pub agent_gone: Option<String>,
    /// What the claim's `localnfs.io/` keys say once their signatures are checked:
    /// only these are believed (the claim's tenant can write any annotation).
    pub signed: &'a Verified,
    /// For a claim that clones another ([`clone::wanted`]) and is not placed yet: the
    /// volume it copies, or why not now ([`clone::resolve`]). `None`: not read.
    pub source: Option<&'a Result<Source, NotYet>>,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing until the claim changes.
    Wait,
    /// The PV exists: complete the binding, release the claim, apply expansion.
    Finish,
    /// Hold the claim with our finalizer before anything is made for it.
    AddFinalizer,
    /// Pick a node and ask its agent for `volume`.
    Place(Placement),
    /// The agent has not answered yet: keep the space held and look again later.
    AwaitAgent { node: String, size_bytes: u64 },
    /// The volume exists on `node`: create the PV.
    CreatePv(Placement, String),
    /// A claim deleted before its PV: ask the agent to remove the volume.
    Abandon,
    /// The agent is asked to remove the volume; look again later.
    AwaitRemoval,
    /// The agent of a deleted claim's node is gone: let the claim go, saying what may
    /// be left on the node.
    LetGo {
        node: String,
        volume: String,
        why: String,
    },
    /// Nothing of ours is left on the claim: release our finalizer.
    Release,
    /// Provisioning cannot go on; see [`Failure`].
    Fail(Failure),
}

/// What a claim asks for, and of which volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub params: ClassParams,
    pub request: ClaimRequest,
    pub volume: VolumeName,
    /// For a clone: what it copies, on which node (only in [`Step::Place`]).
    pub clone: Option<Source>,
}

/// Why provisioning stopped, and what comes after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The `reason` label of the failure metric.
    pub metric: &'static str,
    /// The warning event's message.
    pub message: String,
    pub then: Then,
}

/// What follows a [`Failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Try again after this long (the claim or its class may change meanwhile).
    Retry(Duration),
    /// Remove the scheduler's selected node, so it picks again (as kube's
    /// external-provisioner does); the pod stays Pending meanwhile.
    HandBack,
    /// Take the placement back (and the selected node, if any), if the claim is
    /// unchanged since it was read, and place the claim again.
    PlaceAgain,
}

/// How long a claim or class that is wrong waits before it is looked at again (an
/// edit brings it back sooner).
pub const INVALID_RETRY: Duration = Duration::from_secs(300);
/// How long a claim that found no room waits (agents report free space every few
/// seconds).
pub const NO_ROOM_RETRY: Duration = Duration::from_secs(15);

impl Failure {
    fn invalid(message: String) -> Self {
        Self {
            metric: "invalid",
            message,
            then: Then::Retry(INVALID_RETRY),
        }
    }

    /// No node can take the claim (`message` says why). With a node the scheduler
    /// selected, the choice goes back to it.
    pub fn no_room(message: String, selected: bool) -> Self {
        if selected {
            return Self {
                metric: "no-room",
                message: format!("{message}; asking the scheduler to choose another node"),
                then: Then::HandBack,
            };
        }
        Self {
            metric: "no-room",
            message,
            then: Then::Retry(NO_ROOM_RETRY),
        }
    }
}

/// The next step for the claim `f` describes.
pub fn next(f: &Facts) -> Step {
    let pvc = f.claim;
    let deleting = pvc.metadata.deletion_timestamp.is_some();
    let Some(class) = f.class else {
        // Not ours, but clean up if we were mid-way when its class vanished.
        if has_finalizer(pvc, CLAIM_FINALIZER) && deleting {
            return abandon(f);
        }
        return Step::Wait;
    };
    if f.pv_exists {
        return Step::Finish;
    }
    if deleting {
        return abandon(f);
    }
    if !needs_volume(pvc) || f.signed.abandoned {
        return Step::Wait;
    }
    let placement = match placement(pvc, class) {
        Ok(p) => p,
        Err(message) => return Step::Fail(Failure::invalid(message)),
    };
    if !has_finalizer(pvc, CLAIM_FINALIZER) {
        return Step::AddFinalizer;
    }
    let selected = annotation(pvc, SELECTED_NODE).is_some();
    // Placed means: a request we signed for this claim, on the node it is labelled
    // with. A label or request anyone else wrote is overwritten by our placement.
    let Some(request) = &f.signed.request else {
        let wait_for_scheduler =
            class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer");
        if wait_for_scheduler && !selected {
            // The scheduler has not picked the pod's node yet; its annotation wakes us.
            return Step::Wait;
        }
        let source = match (clone::wanted(pvc), f.source) {
            (Wanted::Empty, _) => None,
            (Wanted::Claim(_), None) => return Step::Wait, // read, then asked again
            (Wanted::Claim(_), Some(Err(not_yet))) => {
                return Step::Fail(Failure {
                    metric: "clone-source",
                    message: not_yet.message.clone(),
                    then: Then::Retry(not_yet.retry),
                });
            }
            (Wanted::Claim(_), Some(Ok(source))) => Some(source.clone()),
        };
        // A clone goes where the scheduler chose (streamed from the source's node when
        // that is another) or, without a choice, where `place` finds room
        // (`clone::placement`).
        return Step::Place(Placement {
            clone: source,
            ..placement
        });
    };
    let node = request.node.clone();
    if f.signed.ready {
        return Step::CreatePv(placement, request.spec.name.to_string());
    }
    if let Some(why) = &f.agent_gone {
        return Step::Fail(Failure {
            metric: "agent-gone",
            message: format!(
                "node {node}'s agent {why} and has not created the volume: placing the claim again"
            ),
            then: Then::PlaceAgain,
        });
    }
    if let Some(refusal) = annotation(pvc, REFUSED) {
        if selected {
            return Step::Fail(Failure {
                metric: "refused",
                message: format!("{refusal}; asking the scheduler to choose another node"),
                then: Then::PlaceAgain,
            });
        }
        // Immediate binding: a person has to act (the agent's event says why).
        return Step::Fail(Failure {
            metric: "refused",
            message: refusal.to_owned(),
            then: Then::Retry(INVALID_RETRY),
        });
    }
    Step::AwaitAgent {
        node,
        size_bytes: placement.request.size_bytes,
    }
}

/// What the claim asks of its class, or why it cannot be provisioned.
fn placement(pvc: &PersistentVolumeClaim, class: &StorageClass) -> Result<Placement, String> {
    let params = ClassParams::parse(&class.parameters.clone().unwrap_or_default())?;
    let request = validate_claim(pvc)?;
    let (ns, name, uid) = (
        pvc.namespace().unwrap_or_default(),
        pvc.name_any(),
        pvc.uid().unwrap_or_default(),
    );
    let volume = params.volume_name(&pv_name(&uid), &ns, &name, &uid)?;
    Ok(Placement {
        params,
        request,
        volume,
        clone: None,
    })
}

/// A claim going away before its PV exists.
fn abandon(f: &Facts) -> Step {
    let pvc = f.claim;
    if !has_finalizer(pvc, CLAIM_FINALIZER) {
        return Step::Wait;
    }
    let Some(request) = &f.signed.request else {
        let Some(node) = pvc.labels().get(NODE_KEY) else {
            return Step::Release; // never placed: nothing was made for it
        };
        if annotation(pvc, REQUEST).is_none() {
            return Step::Release;
        }
        // Placed, but not by a request we signed (an earlier version placed it, or the
        // keys were written by hand): no agent acts on it, so we cannot have it removed.
        return Step::LetGo {
            node: node.clone(),
            volume: annotation(pvc, REQUEST)
                .and_then(|r| serde_json::from_str::<VolumeRequest>(r).ok())
                .map_or_else(|| "(unknown)".to_owned(), |r| r.spec.name.to_string()),
            why: "was not asked by a request this controller signed (placed by an earlier version, or written by hand)".to_owned(),
        };
    };
    if f.signed.removed {
        return Step::Release;
    }
    if !f.signed.abandoned {
        return Step::Abandon;
    }
    match &f.agent_gone {
        // Waiting longer could be forever (the node may be gone for good).
        Some(why) => Step::LetGo {
            node: request.node.clone(),
            volume: request.spec.name.to_string(),
            why: why.clone(),
        },
        None => Step::AwaitRemoval,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::signed::{self, Message, Signer, VolumeRequest};
    use serde_json::{Value, json};

    const GONE: &str = "has no heartbeat lease";

    fn claim(meta: Value, spec: Value) -> PersistentVolumeClaim {
        let mut metadata = json!({"name": "data", "namespace": "db", "uid": "u1"});
        if let (Some(m), Some(extra)) = (metadata.as_object_mut(), meta.as_object()) {
            m.extend(extra.clone());
        }
        let mut s = json!({
            "storageClassName": "fast",
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}},
        });
        if let (Some(s), Some(extra)) = (s.as_object_mut(), spec.as_object()) {
            s.extend(extra.clone());
        }
        serde_json::from_value(json!({"metadata": metadata, "spec": s})).expect("claim")
    }

    fn class(extra: Value) -> StorageClass {
        let mut c = json!({"metadata": {"name": "fast"}, "provisioner": "localnfs.io/nfs"});
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
        }
        serde_json::from_value(c).expect("class")
    }

    fn held() -> Value {
        json!({"finalizers": [CLAIM_FINALIZER]})
    }

    /// The controller's and node n1's agent's keys, for every test.
    static KEYS: std::sync::LazyLock<(Signer, Signer)> =
        std::sync::LazyLock::new(|| (signed::tests::key(), signed::tests::key()));

    /// A claim placed on n1 for volume pvc-u1, by the controller's signed request; the
    /// answers among `annotations` (READY, ABANDON, REMOVED) get their signer's
    /// signature, the rest is kept as given.
    fn placed(annotations: Value) -> Value {
        let (c, agent) = &*KEYS;
        let request = VolumeRequest::new(
            crate::volume::VolumeSpec::new(VolumeName::new("pvc-u1").expect("name"), 1),
            "u1".into(),
            "n1".into(),
        );
        let mut ann = annotations;
        for (k, v) in signed::request_annotations(c, &request).expect("sign") {
            ann[k] = json!(v);
        }
        let (claim_uid, node, volume) = ("u1", "n1", "pvc-u1");
        for (key, sig_key, signature) in [
            (
                READY,
                READY_SIG,
                agent.sign(&Message::Ready {
                    claim_uid,
                    node,
                    volume,
                }),
            ),
            (
                ABANDON,
                ABANDON_SIG,
                c.sign(&Message::Abandon {
                    claim_uid,
                    node,
                    volume,
                }),
            ),
            (
                REMOVED,
                REMOVED_SIG,
                agent.sign(&Message::Removed {
                    claim_uid,
                    node,
                    volume,
                }),
            ),
        ] {
            if ann.get(key).is_some() {
                ann[sig_key] = json!(signature);
            }
        }
        unsigned(ann)
    }

    /// A claim labelled with n1 carrying `annotations` that nobody signed.
    fn unsigned(annotations: Value) -> Value {
        json!({
            "finalizers": [CLAIM_FINALIZER],
            "labels": {NODE_KEY: "n1"},
            "annotations": annotations,
        })
    }

    fn facts_step(
        pvc: &PersistentVolumeClaim,
        class: Option<&StorageClass>,
        gone: bool,
        pv: bool,
    ) -> Step {
        let (c, agent) = &*KEYS;
        let verified = signed::verify(pvc, &c.public(), |n| (n == "n1").then(|| agent.public()));
        next(&Facts {
            claim: pvc,
            class,
            pv_exists: pv,
            agent_gone: gone.then(|| GONE.to_owned()),
            signed: &verified,
            source: None,
        })
    }

    fn step(pvc: &PersistentVolumeClaim, class: Option<&StorageClass>, gone: bool) -> Step {
        facts_step(pvc, class, gone, false)
    }

    fn name(s: &Step) -> String {
        format!("{s:?}")
            .split(['(', ' ', '{'])
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn a_claim_walks_from_finalizer_to_pv() {
        let immediate = class(json!({}));
        let wffc = class(json!({"volumeBindingMode": "WaitForFirstConsumer"}));
        let deleting = |mut m: Value| {
            m["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            m
        };
        let cases: Vec<(&str, Value, Option<&StorageClass>, bool, &str)> = vec![
            (
                "new claim",
                json!({}),
                Some(&immediate),
                false,
                "AddFinalizer",
            ),
            ("held, Immediate", held(), Some(&immediate), false, "Place"),
            (
                "held, WFFC before the scheduler",
                held(),
                Some(&wffc),
                false,
                "Wait",
            ),
            (
                "held, WFFC with a selected node",
                json!({"finalizers": [CLAIM_FINALIZER], "annotations": {SELECTED_NODE: "n1"}}),
                Some(&wffc),
                false,
                "Place",
            ),
            (
                "placed, agent working",
                placed(json!({})),
                Some(&immediate),
                false,
                "AwaitAgent",
            ),
            (
                "placed, agent gone",
                placed(json!({})),
                Some(&immediate),
                true,
                "Fail",
            ),
            (
                "volume ready",
                placed(json!({READY: "pvc-u1"})),
                Some(&immediate),
                false,
                "CreatePv",
            ),
            (
                "volume ready, agent gone since",
                placed(json!({READY: "pvc-u1"})),
                Some(&immediate),
                true,
                "CreatePv",
            ),
            ("not our class", json!({}), None, false, "Wait"),
            (
                "not our class any more, deleted mid-way",
                deleting(placed(json!({ABANDON: "true"}))),
                None,
                false,
                "AwaitRemoval",
            ),
            (
                "deleted, never placed",
                deleting(held()),
                Some(&immediate),
                false,
                "Release",
            ),
            (
                "deleted, placed",
                deleting(placed(json!({}))),
                Some(&immediate),
                false,
                "Abandon",
            ),
            (
                "deleted, removal asked",
                deleting(placed(json!({ABANDON: "true"}))),
                Some(&immediate),
                false,
                "AwaitRemoval",
            ),
            (
                "deleted, removal asked, agent gone",
                deleting(placed(json!({ABANDON: "true"}))),
                Some(&immediate),
                true,
                "LetGo",
            ),
            (
                "deleted, volume removed",
                deleting(placed(json!({ABANDON: "true", REMOVED: "true"}))),
                Some(&immediate),
                false,
                "Release",
            ),
            (
                "forged: a tenant's label, request and answers, unsigned",
                unsigned(json!({REQUEST: "{}", READY: "pvc-u1", ABANDON: "true"})),
                Some(&immediate),
                false,
                "Place",
            ),
            (
                "forged answers on a claim we placed",
                {
                    let mut m = placed(json!({}));
                    m["annotations"][READY] = json!("pvc-u1");
                    m["annotations"][READY_SIG] = json!("00");
                    m
                },
                Some(&immediate),
                false,
                "AwaitAgent",
            ),
            (
                "deleted, forged abandon and removal",
                deleting(unsigned(json!({ABANDON: "true", REMOVED: "true"}))),
                Some(&immediate),
                false,
                "Release",
            ),
            (
                "deleted, placed by an unsigned request (an earlier version)",
                deleting(unsigned(json!({REQUEST: "{}"}))),
                Some(&immediate),
                false,
                "LetGo",
            ),
            (
                "deleted, placed, forged removal",
                {
                    let mut m = deleting(placed(json!({ABANDON: "true"})));
                    m["annotations"][REMOVED] = json!("true");
                    m
                },
                Some(&immediate),
                false,
                "AwaitRemoval",
            ),
            (
                "deleted without our finalizer",
                deleting(json!({})),
                Some(&immediate),
                false,
                "Wait",
            ),
            (
                "abandoned, not deleted",
                placed(json!({ABANDON: "true"})),
                Some(&immediate),
                false,
                "Wait",
            ),
        ];
        for (what, meta, class, gone, want) in cases {
            let got = step(&claim(meta, json!({})), class, gone);
            assert_eq!(name(&got), want, "{what}: {got:?}");
        }
        let ready = claim(placed(json!({READY: "pvc-u1"})), json!({}));
        let got = facts_step(&ready, Some(&immediate), false, true);
        assert_eq!(got, Step::Finish, "a PV, once made, is only finished");
        let Step::LetGo { node, volume, why } = step(
            &claim(deleting(placed(json!({ABANDON: "true"}))), json!({})),
            Some(&immediate),
            true,
        ) else {
            panic!("let go")
        };
        assert_eq!(
            (node.as_str(), volume.as_str(), why.as_str()),
            ("n1", "pvc-u1", GONE)
        );
    }

    #[test]
    fn claims_we_do_not_serve_are_left_alone() {
        let c = class(json!({}));
        for (what, spec, meta) in [
            ("bound", json!({}), json!({"status": {"phase": "Bound"}})),
            (
                "names its PV",
                json!({"volumeName": "static-pv"}),
                json!({}),
            ),
        ] {
            let mut pvc = claim(json!({}), spec);
            if let Some(phase) = meta.pointer("/status/phase") {
                pvc.status = Some(serde_json::from_value(json!({"phase": phase})).expect("status"));
            }
            assert_eq!(step(&pvc, Some(&c), false), Step::Wait, "{what}");
        }
    }

    #[test]
    fn every_failure_says_why_and_what_follows() {
        let c = class(json!({}));
        let failure = |meta: Value, spec: Value, class: &StorageClass| match step(
            &claim(meta, spec),
            Some(class),
            false,
        ) {
            Step::Fail(f) => f,
            other => panic!("expected a failure, got {other:?}"),
        };
        let bad_class = class(json!({"parameters": {"color": "blue"}}));
        let f = failure(held(), json!({}), &bad_class);
        assert_eq!((f.metric, f.then), ("invalid", Then::Retry(INVALID_RETRY)));
        assert!(
            f.message.contains("unknown StorageClass parameter"),
            "{}",
            f.message
        );
        let f = failure(json!({}), json!({"volumeMode": "Block"}), &c);
        assert!(
            f.message.contains("Block"),
            "bad claims fail before the finalizer: {f:?}"
        );
        let pattern = class(json!({"parameters": {"pathPattern": "{name}-{uid}"}}));
        let f = failure(json!({"name": "UPPER"}), json!({}), &pattern);
        assert_eq!(f.metric, "invalid", "{f:?}");

        let refusal = "node n1: volume pvc-u1 exists with another size";
        let f = failure(placed(json!({REFUSED: refusal})), json!({}), &c);
        assert_eq!((f.metric, f.then), ("refused", Then::Retry(INVALID_RETRY)));
        let mut ann = json!({REFUSED: refusal});
        ann[SELECTED_NODE] = json!("n1");
        let f = failure(placed(ann), json!({}), &c);
        assert_eq!(f.then, Then::PlaceAgain, "the scheduler picks again: {f:?}");
        assert!(f.message.starts_with(refusal));

        let Step::Fail(f) = step(&claim(placed(json!({})), json!({})), Some(&c), true) else {
            panic!("agent gone")
        };
        assert_eq!((f.metric, f.then), ("agent-gone", Then::PlaceAgain));
        assert!(f.message.contains(GONE), "{}", f.message);

        assert_eq!(
            Failure::no_room("no node has room".into(), true).then,
            Then::HandBack
        );
        assert_eq!(
            Failure::no_room("no node has room".into(), false).then,
            Then::Retry(NO_ROOM_RETRY)
        );
    }

    fn clone_step(meta: Value, class: &StorageClass, source: &Result<Source, NotYet>) -> Step {
        let pvc = claim(
            meta,
            json!({"dataSource": {"kind": "PersistentVolumeClaim", "name": "data-0"}}),
        );
        let verified = Verified::default();
        next(&Facts {
            claim: &pvc,
            class: Some(class),
            pv_exists: false,
            agent_gone: None,
            signed: &verified,
            source: Some(source),
        })
    }

    fn source_on(node: &str) -> Source {
        Source {
            copy: crate::objects::request::CloneSource {
                volume: VolumeName::new("pvc-u0").expect("name"),
                claim_uid: "u0".into(),
                namespace: "db".into(),
                claim: "data-0".into(),
            },
            node: node.into(),
            size_bytes: 1,
        }
    }

    #[test]
    fn a_clone_is_placed_where_the_scheduler_chose_or_left_to_placement() {
        let immediate = class(json!({}));
        let wffc = class(json!({"volumeBindingMode": "WaitForFirstConsumer"}));
        let on_n1 = Ok(source_on("n1"));
        let Step::Place(p) = clone_step(held(), &immediate, &on_n1) else {
            panic!("placed")
        };
        assert_eq!(p.clone, Some(source_on("n1")));
        let selected = |node: &str| json!({"finalizers": [CLAIM_FINALIZER], "annotations": {SELECTED_NODE: node}});
        assert!(matches!(
            clone_step(selected("n1"), &wffc, &on_n1),
            Step::Place(Placement { clone: Some(_), .. })
        ));
        // The scheduler chose another node (no extender, or the source's node is
        // full): the clone is made there, streamed from n1.
        assert!(matches!(
            clone_step(selected("n2"), &wffc, &on_n1),
            Step::Place(Placement { clone: Some(_), .. })
        ));
        let waiting = Err(NotYet {
            message: "waiting for claim db/data-0".into(),
            retry: clone::SOURCE_RETRY,
        });
        let Step::Fail(f) = clone_step(held(), &immediate, &waiting) else {
            panic!("not yet")
        };
        assert_eq!(f.then, Then::Retry(clone::SOURCE_RETRY));
        assert_eq!(
            clone_step(held(), &wffc, &waiting),
            Step::Wait,
            "WaitForFirstConsumer: nothing until the scheduler picks"
        );
    }

    #[test]
    fn a_clone_whose_source_was_not_read_waits() {
        let pvc = claim(
            held(),
            json!({"dataSource": {"kind": "PersistentVolumeClaim", "name": "data-0"}}),
        );
        assert_eq!(step(&pvc, Some(&class(json!({}))), false), Step::Wait);
        let itself = claim(
            held(),
            json!({"dataSource": {"kind": "PersistentVolumeClaim", "name": "data"}}),
        );
        assert!(
            matches!(
                step(&itself, Some(&class(json!({}))), false),
                Step::Place(Placement { clone: None, .. })
            ),
            "a claim naming itself starts empty"
        );
    }
}
