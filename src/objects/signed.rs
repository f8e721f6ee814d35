//! Which of a claim's `localnfs.io/` annotations were written by localnfs: the
//! controller signs what it asks of an agent, each agent signs what it answers, and
//! every reader checks the signature before it acts ([`verify`]).
//!
//! Why: a claim's labels and annotations are writable by anyone who may edit the claim
//! (its tenant included), and a claim re-created from saved YAML carries the old
//! claim's annotations. Before this, a tenant could copy another claim's request onto
//! their own claim, mark it abandoned and delete it, and the agent deleted the other
//! claim's live volume. Now:
//! - the controller signs each request ([`Message::Request`]: its exact bytes, which
//!   name the claim's uid and the node) and each abandon ([`Message::Abandon`]) with
//!   its Ed25519 key, kept in a Secret only it reads; agents check them with the public
//!   half, published in a ConfigMap only the controller writes;
//! - each agent signs its answers ([`Message::Ready`], [`Message::Removed`]) with its
//!   own key, made on its node's disk, whose public half it publishes in its
//!   heartbeat Lease (which only that agent writes); the controller checks them with
//!   the key of the node the request named.
//!
//! Every signed message names the claim's uid, which the API server assigns and no
//! one can choose: a signature copied to another claim, or kept by a claim deleted and
//! re-created from YAML, does not verify there and is ignored (with an event). A node
//! agent's key signs only for its node: a compromised node cannot answer for another.
//! The admission webhook that refuses these keys from tenants is a second line;
//! nothing here depends on it.
//!
//! Pure functions (keys in, verdicts out), tested below; fetching keys is I/O and lives
//! with each component.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::ResourceExt;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use super::keys::{
    ABANDON, ABANDON_SIG, NODE_KEY, READY, READY_SIG, REMOVED, REMOVED_SIG, REQUEST, REQUEST_SIG,
};
use super::request::{self, Read};
use crate::kubeclient::annotation;
use crate::volume::VolumeName;

/// What the controller asks a node agent to create, as the [`REQUEST`] annotation
/// holds it (versioned; see `objects::request`).
pub use super::request::VolumeRequest;

/// A statement one side signs; its bytes name what it is, so a signature of one kind
/// never verifies as another.
#[derive(Clone, Copy, Debug)]
pub enum Message<'a> {
    /// The controller asks for the volume: the [`REQUEST`] annotation's exact text.
    Request(&'a str),
    /// The controller gives up a volume whose claim went away before its PV existed.
    Abandon {
        claim_uid: &'a str,
        node: &'a str,
        volume: &'a str,
    },
    /// An agent has made the volume for the claim.
    Ready {
        claim_uid: &'a str,
        node: &'a str,
        volume: &'a str,
    },
    /// An agent has removed an abandoned claim's volume.
    Removed {
        claim_uid: &'a str,
        node: &'a str,
        volume: &'a str,
    },
    /// An agent on the peer channel (`objects::peer`): it is `node`'s agent, at this
    /// `role`'s end of the TLS session whose exported keying material is `binding`
    /// (hex), so the signature holds for that one session only.
    Peer {
        role: &'a str,
        node: &'a str,
        binding: &'a str,
    },
}

impl Message<'_> {
    fn bytes(&self) -> Vec<u8> {
        let (kind, fields): (&str, [&str; 3]) = match *self {
            Message::Request(text) => ("request", [text, "", ""]),
            Message::Abandon {
                claim_uid,
                node,
                volume,
            } => ("abandon", [claim_uid, node, volume]),
            Message::Ready {
                claim_uid,
                node,
                volume,
            } => ("ready", [claim_uid, node, volume]),
            Message::Removed {
                claim_uid,
                node,
                volume,
            } => ("removed", [claim_uid, node, volume]),
            Message::Peer {
                role,
                node,
                binding,
            } => ("peer", [role, node, binding]),
        };
        // Fields are separated by a byte none of them can hold (uids, node and volume
        // names are DNS-like; a request is JSON, whose strings escape control bytes).
        let mut out = format!("localnfs/{kind}/v1").into_bytes();
        for f in fields {
            out.push(0);
            out.extend_from_slice(f.as_bytes());
        }
        out
    }
}

/// A private signing key (the controller's, or one agent's).
pub struct Signer(Ed25519KeyPair);

impl Signer {
    /// A new key, as PKCS#8 bytes to keep.
    pub fn generate() -> Option<Vec<u8>> {
        Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .ok()
            .map(|doc| doc.as_ref().to_vec())
    }

    /// The key kept as PKCS#8 bytes.
    pub fn from_pkcs8(bytes: &[u8]) -> Result<Self, String> {
        Ed25519KeyPair::from_pkcs8(bytes)
            .map(Self)
            .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))
    }

    /// The signature of `m`, as hex (for an annotation).
    pub fn sign(&self, m: &Message) -> String {
        hex(self.0.sign(&m.bytes()).as_ref())
    }

    /// The public half, as hex.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.public_key().as_ref().to_vec())
    }
}

/// A public key that checks a [`Signer`]'s signatures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey(Vec<u8>);

impl PublicKey {
    /// Reads the hex form [`PublicKey::to_hex`] writes.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = unhex(s.trim())?;
        (bytes.len() == 32).then_some(Self(bytes))
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Whether `sig` (hex) is this key's signature of `m`.
    ///
    /// A signature that verified once is remembered ([`GoodSignatures`]; not a peer
    /// hello's, which is checked once per session): every event of a claim is read
    /// again, and re-checking its unchanged signatures was a third of the leader's CPU
    /// in a 10,000-claim burst.
    pub fn verifies(&self, m: &Message, sig: &str) -> bool {
        let Some(sig) = unhex(sig.trim()) else {
            return false;
        };
        let bytes = m.bytes();
        let seen = GoodSignatures::digest(&self.0, &bytes, &sig);
        if GOOD.knows(&seen) {
            return true;
        }
        let good = UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(&bytes, &sig)
            .is_ok();
        // A peer hello binds one channel session: it is never checked again, and
        // would only push out signatures that are.
        if good && !matches!(m, Message::Peer { .. }) {
            GOOD.learn(seen);
        }
        good
    }
}

/// (key, message, signature) triples that verified, by their SHA-256: a hit is as
/// good as the check (finding another triple with the same digest is finding a
/// SHA-256 collision). Only good signatures are kept, so what a tenant writes adds
/// nothing; bounded all the same, emptied when full.
struct GoodSignatures(std::sync::Mutex<std::collections::HashSet<[u8; 32]>>);

/// The most triples remembered: a claim carries two signed keys while it lives (the
/// request and the agent's ready), four at most; past this the set starts over.
const GOOD_MAX: usize = 65_536;

static GOOD: std::sync::LazyLock<GoodSignatures> =
    std::sync::LazyLock::new(|| GoodSignatures(Default::default()));

impl GoodSignatures {
    fn digest(key: &[u8], message: &[u8], sig: &[u8]) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [key, message, sig] {
            // Each part's length first, so no two splits of the same bytes match.
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let mut out = [0; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    fn knows(&self, d: &[u8; 32]) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(d)
    }

    fn learn(&self, d: [u8; 32]) {
        let mut set = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if set.len() >= GOOD_MAX {
            set.clear();
        }
        set.insert(d);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 256 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What a claim's `localnfs.io/` keys say once every signature is checked: only what
/// verified is here; the keys that were present but did not verify are in `ignored`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verified {
    /// The controller's request for this claim, on the node it is labelled with.
    pub request: Option<VolumeRequest>,
    /// A request the controller signed for this claim and node in a version newer
    /// than this build reads: its version and node (`request` is then `None`).
    pub newer: Option<(u32, String)>,
    /// The agent of the request's node made the requested volume.
    pub ready: bool,
    /// The controller abandoned the requested volume.
    pub abandoned: bool,
    /// The agent of the request's node removed the abandoned volume.
    pub removed: bool,
    /// Keys present that are not localnfs's word for this claim (forged, copied from
    /// another claim, kept from a deleted one, or signed by a key since replaced).
    pub ignored: Vec<&'static str>,
}

/// Checks a claim's keys: the request against `controller`, the answers against the
/// key `agent_key` gives for the request's node (`None`: not known, so unverifiable).
pub fn verify(
    pvc: &PersistentVolumeClaim,
    controller: &PublicKey,
    agent_key: impl Fn(&str) -> Option<PublicKey>,
) -> Verified {
    let mut v = Verified::default();
    let uid = pvc.uid().unwrap_or_default();
    let label = pvc.labels().get(NODE_KEY).map(String::as_str);
    let present = |k: &str| annotation(pvc, k).is_some();
    let ours =
        |claim_uid: &str, node: &str| !uid.is_empty() && claim_uid == uid && Some(node) == label;
    let read = annotation(pvc, REQUEST).and_then(|text| {
        let sig = annotation(pvc, REQUEST_SIG)?;
        if !controller.verifies(&Message::Request(text), sig) {
            return None;
        }
        request::read(text)
    });
    let request = match read {
        Some(Read::Known(r)) => ours(&r.claim_uid, &r.node).then_some(r),
        Some(Read::Newer {
            version,
            claim_uid,
            node,
        }) => {
            // Signed and ours, but not readable here: only to be refused.
            if ours(&claim_uid, &node) {
                v.newer = Some((version, node));
                return v;
            }
            None
        }
        None => None,
    };
    let Some(request) = request else {
        v.ignored = [REQUEST, READY, ABANDON, REMOVED]
            .into_iter()
            .filter(|k| present(k))
            .collect();
        return v;
    };
    let (node, volume) = (request.node.as_str(), request.spec.name.as_str());
    let agent = agent_key(node);
    let signed = |key: &str, sig_key: &str, by: Option<&PublicKey>, m: Message| {
        let (Some(_), Some(sig), Some(by)) = (annotation(pvc, key), annotation(pvc, sig_key), by)
        else {
            return false;
        };
        by.verifies(&m, sig)
    };
    v.ready = annotation(pvc, READY) == Some(volume)
        && signed(
            READY,
            READY_SIG,
            agent.as_ref(),
            Message::Ready {
                claim_uid: &uid,
                node,
                volume,
            },
        );
    v.abandoned = signed(
        ABANDON,
        ABANDON_SIG,
        Some(controller),
        Message::Abandon {
            claim_uid: &uid,
            node,
            volume,
        },
    );
    v.removed = v.abandoned
        && signed(
            REMOVED,
            REMOVED_SIG,
            agent.as_ref(),
            Message::Removed {
                claim_uid: &uid,
                node,
                volume,
            },
        );
    v.ignored = [
        (READY, v.ready),
        (ABANDON, v.abandoned),
        (REMOVED, v.removed),
    ]
    .into_iter()
    .filter(|(k, ok)| !ok && present(k))
    .map(|(k, _)| k)
    .collect();
    v.request = Some(request);
    v
}

/// The annotations that put `request` on a claim: its text and the controller's
/// signature of it.
pub fn request_annotations(
    signer: &Signer,
    request: &VolumeRequest,
) -> Result<[(&'static str, String); 2], String> {
    let text = serde_json::to_string(request).map_err(|e| format!("encode request: {e}"))?;
    let sig = signer.sign(&Message::Request(&text));
    Ok([(REQUEST, text), (REQUEST_SIG, sig)])
}

/// The name of the volume a verified request asks for.
pub fn requested_volume(v: &Verified) -> Option<&VolumeName> {
    v.request.as_ref().map(|r| &r.spec.name)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn key() -> Signer {
        Signer::from_pkcs8(&Signer::generate().expect("key")).expect("pkcs8")
    }

    fn claim(
        uid: &str,
        labels: serde_json::Value,
        ann: serde_json::Value,
    ) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": "data-0", "namespace": "db", "uid": uid,
                         "labels": labels, "annotations": ann},
        }))
        .expect("claim")
    }

    fn request(uid: &str, node: &str) -> VolumeRequest {
        VolumeRequest::new(
            crate::volume::VolumeSpec::new(
                VolumeName::new(&format!("pvc-{uid}")).expect("name"),
                1 << 20,
            ),
            uid.into(),
            node.into(),
        )
    }

    /// A claim as localnfs leaves it: placed on `node`, answered ready by `agent`,
    /// and (with `abandon`) abandoned and removed.
    fn signed_claim(
        uid: &str,
        node: &str,
        c: &Signer,
        agent: &Signer,
        abandon: bool,
    ) -> serde_json::Value {
        let r = request(uid, node);
        let [(k1, text), (k2, sig)] = request_annotations(c, &r).expect("sign");
        let vol = r.spec.name.to_string();
        let mut ann = json!({k1: text, k2: sig, READY: vol});
        let f = |claim_uid, volume| (claim_uid, volume);
        let (u, v) = f(uid, vol.as_str());
        ann[READY_SIG] = json!(agent.sign(&Message::Ready {
            claim_uid: u,
            node,
            volume: v
        }));
        if abandon {
            ann[ABANDON] = json!("true");
            ann[ABANDON_SIG] = json!(c.sign(&Message::Abandon {
                claim_uid: u,
                node,
                volume: v
            }));
            ann[REMOVED] = json!("true");
            ann[REMOVED_SIG] = json!(agent.sign(&Message::Removed {
                claim_uid: u,
                node,
                volume: v
            }));
        }
        ann
    }

    #[test]
    fn a_remembered_signature_verifies_only_what_it_signed() {
        let (c, other) = (key(), key());
        let m = Message::Request("{\"claimUid\":\"u-remembered\"}");
        let sig = c.sign(&m);
        let digest = |m: &Message, sig: &str| {
            GoodSignatures::digest(&c.public().0, &m.bytes(), &unhex(sig).expect("hex"))
        };
        for round in 0..2 {
            assert!(c.public().verifies(&m, &sig), "round {round}");
            assert!(GOOD.knows(&digest(&m, &sig)), "remembered, round {round}");
            assert!(
                !c.public()
                    .verifies(&Message::Request("{\"claimUid\":\"u-other\"}"), &sig),
                "another message, round {round}"
            );
            assert!(
                !other.public().verifies(&m, &sig),
                "another key, round {round}"
            );
            let mut bad = sig.clone().into_bytes();
            bad[0] = if bad[0] == b'0' { b'1' } else { b'0' };
            let bad = String::from_utf8(bad).expect("hex");
            assert!(
                !c.public().verifies(&m, &bad),
                "another signature, round {round}"
            );
        }
    }

    #[test]
    fn a_peer_hello_verifies_but_is_not_remembered() {
        let c = key();
        let hello = Message::Peer {
            role: "client",
            node: "n1",
            binding: "session-binding-remembered-test",
        };
        let sig = c.sign(&hello);
        assert!(c.public().verifies(&hello, &sig));
        let d = GoodSignatures::digest(&c.public().0, &hello.bytes(), &unhex(&sig).expect("hex"));
        assert!(!GOOD.knows(&d));
    }

    #[test]
    fn bytes_moved_between_message_and_signature_are_not_remembered_as_good() {
        let c = key();
        let good = Message::Ready {
            claim_uid: "u-moved",
            node: "n1",
            volume: "vol",
        };
        let sig = c.sign(&good);
        assert!(c.public().verifies(&good, &sig));
        let shorter = Message::Ready {
            claim_uid: "u-moved",
            node: "n1",
            volume: "vo",
        };
        // The message's last byte moved to the front of the signature: the same bytes
        // in a row, split elsewhere.
        let moved = format!("{}{sig}", hex(b"l"));
        assert!(!c.public().verifies(&shorter, &moved));
    }

    #[test]
    fn what_localnfs_signed_verifies() {
        let (c, a) = (key(), key());
        let pvc = claim(
            "u1",
            json!({NODE_KEY: "n1"}),
            signed_claim("u1", "n1", &c, &a, true),
        );
        let v = verify(&pvc, &c.public(), |n| (n == "n1").then(|| a.public()));
        assert_eq!(v.request, Some(request("u1", "n1")));
        assert!(v.ready && v.abandoned && v.removed);
        assert!(v.ignored.is_empty(), "{:?}", v.ignored);
    }

    #[test]
    fn annotations_copied_to_another_claim_do_not_verify() {
        let (c, a) = (key(), key());
        // Another tenant's claim (uid u1) copied onto claim u2, label and all: the
        // attack that deleted a live volume.
        let pvc = claim(
            "u2",
            json!({NODE_KEY: "n1"}),
            signed_claim("u1", "n1", &c, &a, true),
        );
        let v = verify(&pvc, &c.public(), |_| Some(a.public()));
        assert_eq!(v.request, None);
        assert!(!v.ready && !v.abandoned && !v.removed);
        assert_eq!(v.ignored, vec![REQUEST, READY, ABANDON, REMOVED]);
    }

    #[test]
    fn a_request_relabelled_to_another_node_does_not_verify() {
        let (c, a) = (key(), key());
        let pvc = claim(
            "u1",
            json!({NODE_KEY: "n2"}),
            signed_claim("u1", "n1", &c, &a, false),
        );
        let v = verify(&pvc, &c.public(), |_| Some(a.public()));
        assert_eq!(v.request, None);
    }

    #[test]
    fn a_request_not_signed_by_the_controller_does_not_verify() {
        let (c, a, tenant) = (key(), key(), key());
        let pvc = claim(
            "u1",
            json!({NODE_KEY: "n1"}),
            signed_claim("u1", "n1", &tenant, &a, false),
        );
        assert_eq!(
            verify(&pvc, &c.public(), |_| Some(a.public())).request,
            None
        );
        let mut unsigned = signed_claim("u1", "n1", &c, &a, false);
        if let Some(m) = unsigned.as_object_mut() {
            m.remove(REQUEST_SIG);
        }
        let pvc = claim("u1", json!({NODE_KEY: "n1"}), unsigned);
        assert_eq!(
            verify(&pvc, &c.public(), |_| Some(a.public())).request,
            None
        );
    }

    #[test]
    fn answers_count_only_from_the_requested_nodes_agent() {
        let (c, a, other) = (key(), key(), key());
        let pvc = claim(
            "u1",
            json!({NODE_KEY: "n1"}),
            signed_claim("u1", "n1", &c, &other, true),
        );
        // n1's key is `a`; the answers were signed by another node's agent.
        let v = verify(&pvc, &c.public(), |n| (n == "n1").then(|| a.public()));
        assert!(v.request.is_some() && v.abandoned);
        assert!(!v.ready && !v.removed);
        assert_eq!(v.ignored, vec![READY, REMOVED]);
        // The agent's key unknown (no heartbeat): nothing it said can be believed.
        let v = verify(&pvc, &c.public(), |_| None);
        assert!(!v.ready && !v.removed);
    }

    #[test]
    fn a_ready_naming_another_volume_does_not_verify() {
        let (c, a) = (key(), key());
        let mut ann = signed_claim("u1", "n1", &c, &a, false);
        ann[READY] = json!("pvc-someone-else");
        let pvc = claim("u1", json!({NODE_KEY: "n1"}), ann);
        let v = verify(&pvc, &c.public(), |_| Some(a.public()));
        assert!(!v.ready);
        assert_eq!(v.ignored, vec![READY]);
    }

    #[test]
    fn a_signature_of_one_kind_is_not_another() {
        let c = key();
        let m = |k| match k {
            0 => Message::Abandon {
                claim_uid: "u",
                node: "n",
                volume: "v",
            },
            1 => Message::Ready {
                claim_uid: "u",
                node: "n",
                volume: "v",
            },
            _ => Message::Removed {
                claim_uid: "u",
                node: "n",
                volume: "v",
            },
        };
        for signed in 0..3 {
            let sig = c.sign(&m(signed));
            for checked in 0..3 {
                assert_eq!(c.public().verifies(&m(checked), &sig), signed == checked);
            }
        }
        assert!(!c.public().verifies(&m(0), "zz"));
        assert_eq!(PublicKey::from_hex(&c.public().to_hex()), Some(c.public()));
    }
}
