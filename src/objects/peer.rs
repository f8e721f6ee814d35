//! The peer channel's messages: how two node agents talk when one streams a clone's
//! source volume to the other (`node::peer` does the I/O). Pure: frames in and out,
//! and the rules the source agent applies before any data flows ([`check_ask`]).
//!
//! The conversation, over TLS (ephemeral self-signed certificates: the TLS layer only
//! encrypts; who is at each end is proven inside it):
//! 1. the receiving agent sends [`Frame::Hello`]: its node and its agent key's
//!    signature of [`Message::Peer`] with role [`RECEIVER`] and the session's exported
//!    keying material ([`binding_hex`], RFC 5705 / RFC 8446 §7.5). The source agent
//!    checks it with the key in that node's key Lease, which only that node's
//!    agent writes: a signature made for another session, another role or by another
//!    key does not verify;
//! 2. the source agent answers with its own Hello (role [`SOURCE`]), checked the same
//!    way against the Lease of the node the receiver meant to reach;
//! 3. the receiver sends [`Frame::Ask`]: the claim and its controller-signed request
//!    (the claim's REQUEST and REQUEST_SIG annotations). The source agent checks it
//!    ([`check_ask`]), then the source volume's owner record (`node::step::clone_check`);
//! 4. the source takes a point-in-time copy, answers [`Frame::Accepted`], then streams:
//!    per object an [`Frame::Entry`] (a directory's attributes come in a
//!    [`Frame::DirEnd`] after its contents, so writing them does not change them), a
//!    regular file's bytes in [`Frame::Data`] chunks then its sha256 in
//!    [`Frame::FileEnd`]; then the copy's manifest in [`Frame::Manifest`] chunks and
//!    [`Frame::Done`]. Any refusal is one [`Frame::Refused`]; a failure mid-stream one
//!    [`Frame::Failed`].
//!
//! A frame is a kind byte, a big-endian u32 length and that many bytes (JSON, or raw
//! for data). No frame is longer than [`MAX_FRAME`]: neither end holds more than a
//! few frames, whatever the volume holds.

use serde::{Deserialize, Serialize};

use super::request::{Read, VolumeRequest};
use super::signed::{Message, PublicKey, Signer};

/// Role of the agent that makes the clone.
pub const RECEIVER: &str = "receiver";
/// Role of the agent that holds the source volume.
pub const SOURCE: &str = "source";
/// The TLS exporter label (RFC 5705 §4) of the channel binding.
pub const EXPORTER_LABEL: &[u8] = b"EXPERIMENTAL-localnfs-peer-v1";
/// Bytes of exported keying material signed by each side.
pub const BINDING_LEN: usize = 32;
/// Bytes of file data per [`Frame::Data`].
pub const CHUNK: usize = 256 * 1024;
/// The longest frame either side accepts (a data chunk plus room).
pub const MAX_FRAME: usize = CHUNK + 64 * 1024;

/// What one agent tells the other it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub node: String,
    /// Hex signature of [`Message::Peer`] for this role, node and session.
    pub sig: String,
}

/// The receiver's request for the copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ask {
    /// The new claim (namespace, name): the source agent reads it to learn its
    /// namespace and check the request is the one it carries now.
    pub namespace: String,
    pub claim: String,
    /// The claim's REQUEST annotation, exactly.
    pub request: String,
    /// The claim's REQUEST_SIG annotation.
    pub request_sig: String,
}

/// What the source's point-in-time copy holds (sent before the stream).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    pub bytes: u64,
    pub files: u64,
    /// How long the source's writes were held to mark the instant, in microseconds.
    pub pause_micros: u64,
}

/// An object's attributes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attrs {
    /// Permission bits with setuid/setgid/sticky (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// (seconds, nanoseconds) since the epoch.
    pub mtime: (i64, i64),
    pub atime: (i64, i64),
}

/// What kind of object an [`Entry`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Its contents follow, then a [`Frame::DirEnd`] with its attributes.
    Dir,
    /// Its bytes follow in [`Frame::Data`], then [`Frame::FileEnd`].
    File,
    /// Another name of the regular file first sent with the same `group`.
    Link,
    Symlink,
    Fifo,
    Socket,
    Char,
    Block,
}

/// One object of the copy, named within the directory the stream is in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// One path component (checked by [`valid_name`]).
    pub name: Vec<u8>,
    pub kind: Kind,
    pub attrs: Attrs,
    /// A regular file's size.
    #[serde(default)]
    pub size: u64,
    /// A symlink's target.
    #[serde(default)]
    pub target: Vec<u8>,
    /// The hard-link group of a regular file with more than one name.
    #[serde(default)]
    pub group: Option<u64>,
    /// A device's number.
    #[serde(default)]
    pub rdev: u64,
}

/// One message of the channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Ask(Ask),
    Refused(String),
    Accepted(Accepted),
    Entry(Entry),
    Data(Vec<u8>),
    /// The sha256 (hex) of the regular file just sent.
    FileEnd(String),
    /// The directory the stream is in is complete: its attributes; the stream goes
    /// back to its parent.
    DirEnd(Attrs),
    Manifest(Vec<u8>),
    Done,
    Failed(String),
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Hello(_) => 1,
            Frame::Ask(_) => 2,
            Frame::Refused(_) => 3,
            Frame::Accepted(_) => 4,
            Frame::Entry(_) => 5,
            Frame::Data(_) => 6,
            Frame::FileEnd(_) => 7,
            Frame::DirEnd(_) => 8,
            Frame::Manifest(_) => 9,
            Frame::Done => 10,
            Frame::Failed(_) => 11,
        }
    }

    /// The frame as bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let json = |v: Result<Vec<u8>, serde_json::Error>| v.unwrap_or_default();
        let body = match self {
            Frame::Hello(h) => json(serde_json::to_vec(h)),
            Frame::Ask(a) => json(serde_json::to_vec(a)),
            Frame::Accepted(a) => json(serde_json::to_vec(a)),
            Frame::Entry(e) => json(serde_json::to_vec(e)),
            Frame::DirEnd(a) => json(serde_json::to_vec(a)),
            Frame::Refused(s) | Frame::FileEnd(s) | Frame::Failed(s) => s.as_bytes().to_vec(),
            Frame::Data(d) | Frame::Manifest(d) => d.clone(),
            Frame::Done => Vec::new(),
        };
        let mut out = Vec::with_capacity(5 + body.len());
        out.push(self.kind());
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Reads a frame of `kind` from its `body`.
    pub fn decode(kind: u8, body: Vec<u8>) -> Result<Frame, String> {
        fn json<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T, String> {
            serde_json::from_slice(b).map_err(|e| format!("malformed peer frame: {e}"))
        }
        let text = |b: Vec<u8>| {
            String::from_utf8(b).map_err(|_| "peer frame text is not UTF-8".to_owned())
        };
        Ok(match kind {
            1 => Frame::Hello(json(&body)?),
            2 => Frame::Ask(json(&body)?),
            3 => Frame::Refused(text(body)?),
            4 => Frame::Accepted(json(&body)?),
            5 => Frame::Entry(json(&body)?),
            6 => Frame::Data(body),
            7 => Frame::FileEnd(text(body)?),
            8 => Frame::DirEnd(json(&body)?),
            9 => Frame::Manifest(body),
            10 => Frame::Done,
            11 => Frame::Failed(text(body)?),
            k => return Err(format!("unknown peer frame kind {k}")),
        })
    }
}

/// A frame header's kind and length, refused past [`MAX_FRAME`].
pub fn header(bytes: [u8; 5]) -> Result<(u8, usize), String> {
    let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    if len > MAX_FRAME {
        return Err(format!("peer frame of {len} bytes, more than {MAX_FRAME}"));
    }
    Ok((bytes[0], len))
}

/// The channel binding as signed: hex of the exported keying material.
pub fn binding_hex(ekm: &[u8]) -> String {
    ekm.iter().map(|b| format!("{b:02x}")).collect()
}

/// This agent's Hello for `role` in the session bound to `ekm`.
pub fn hello(signer: &Signer, role: &str, node: &str, ekm: &[u8]) -> Hello {
    let binding = binding_hex(ekm);
    Hello {
        node: node.to_owned(),
        sig: signer.sign(&Message::Peer {
            role,
            node,
            binding: &binding,
        }),
    }
}

/// Whether `hello` proves its sender is the agent holding `key` (the key in the
/// key Lease of the node it names), at the `role` end of the session bound to
/// `ekm`.
pub fn hello_verifies(hello: &Hello, role: &str, ekm: &[u8], key: Option<&PublicKey>) -> bool {
    let binding = binding_hex(ekm);
    key.is_some_and(|k| {
        k.verifies(
            &Message::Peer {
                role,
                node: &hello.node,
                binding: &binding,
            },
            &hello.sig,
        )
    })
}

/// What the source agent knows of the claim an [`Ask`] names, read from the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimSeen {
    pub uid: String,
    pub namespace: String,
    pub deleting: bool,
    /// Its REQUEST annotation now.
    pub request: Option<String>,
}

/// Whether the source agent streams the copy `ask` wants to the agent of node `peer`
/// (authenticated by its Hello); `claim` is the claim the Ask names as the API server
/// has it (`None`: not found); `signed` whether the controller's key verifies the
/// request's signature. The request must be the claim's current one, signed by the
/// controller, of a version this agent reads, for that claim (its uid), placed on
/// `peer`, and a clone: then its source is returned, for the owner check
/// (`node::step::clone_check`, with the claim's namespace).
pub fn check_ask(
    ask: &Ask,
    signed: bool,
    peer: &str,
    claim: Option<&ClaimSeen>,
) -> Result<(VolumeRequest, String), String> {
    if !signed {
        return Err("the request is not signed by the controller".into());
    }
    let request = match super::request::read(&ask.request) {
        Some(Read::Known(r)) => r,
        Some(Read::Newer { version, .. }) => {
            return Err(format!(
                "the request is version {version}, newer than this agent reads"
            ));
        }
        None => return Err("the request does not parse".into()),
    };
    if request.node != peer {
        return Err(format!(
            "the request places the claim on node {}, not on node {peer}",
            request.node
        ));
    }
    let Some(claim) = claim else {
        return Err(format!(
            "claim {}/{} does not exist",
            ask.namespace, ask.claim
        ));
    };
    if claim.uid != request.claim_uid {
        return Err(format!(
            "the request is for claim uid {}, not for claim {}/{} (uid {})",
            request.claim_uid, ask.namespace, ask.claim, claim.uid
        ));
    }
    if claim.deleting {
        return Err(format!(
            "claim {}/{} is being deleted",
            ask.namespace, ask.claim
        ));
    }
    if claim.request.as_deref() != Some(ask.request.as_str()) {
        return Err(format!(
            "the request is not the one claim {}/{} carries now",
            ask.namespace, ask.claim
        ));
    }
    if request.clone.is_none() {
        return Err("the request is not a clone".into());
    }
    Ok((request, claim.namespace.clone()))
}

/// Whether `name` is one path component a receiver may create: not empty, not `.` or
/// `..`, no `/` or NUL. The stream names objects within the directory it is in, so a
/// sender cannot reach outside the copy being made.
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.iter().any(|&b| b == b'/' || b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::request::CloneSource;
    use crate::objects::signed::request_annotations;
    use crate::volume::{VolumeName, VolumeSpec};

    fn key() -> Signer {
        Signer::from_pkcs8(&Signer::generate().expect("key")).expect("key")
    }

    #[test]
    fn every_frame_survives_the_wire() {
        let attrs = Attrs {
            mode: 0o4755,
            uid: 999,
            gid: 998,
            mtime: (1_700_000_000, 5),
            atime: (1, 2),
        };
        let frames = [
            Frame::Hello(Hello {
                node: "n1".into(),
                sig: "ab".into(),
            }),
            Frame::Ask(Ask {
                namespace: "db".into(),
                claim: "c".into(),
                request: "{}".into(),
                request_sig: "00".into(),
            }),
            Frame::Refused("no".into()),
            Frame::Accepted(Accepted {
                bytes: 1,
                files: 2,
                pause_micros: 3,
            }),
            Frame::Entry(Entry {
                name: b"caf\xe9\n".to_vec(),
                kind: Kind::Symlink,
                attrs,
                size: 0,
                target: b"../x".to_vec(),
                group: Some(4),
                rdev: 0,
            }),
            Frame::Data(vec![0, 1, 2]),
            Frame::FileEnd("ff".into()),
            Frame::DirEnd(attrs),
            Frame::Manifest(b"line\n".to_vec()),
            Frame::Done,
            Frame::Failed("gone".into()),
        ];
        for f in frames {
            let bytes = f.encode();
            let (kind, len) = header(bytes[..5].try_into().expect("header")).expect("header");
            assert_eq!(len, bytes.len() - 5, "{f:?}");
            assert_eq!(Frame::decode(kind, bytes[5..].to_vec()), Ok(f));
        }
    }

    #[test]
    fn an_oversized_or_unknown_frame_is_refused_before_it_is_read() {
        let mut big = [6u8, 0, 0, 0, 0];
        big[1..].copy_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
        assert!(header(big).is_err());
        assert!(Frame::decode(99, vec![]).is_err());
        assert!(Frame::decode(1, b"not json".to_vec()).is_err());
    }

    #[test]
    fn a_hello_verifies_only_for_its_key_role_node_and_session() {
        let (agent, other) = (key(), key());
        let ekm = [7u8; BINDING_LEN];
        let h = hello(&agent, RECEIVER, "n2", &ekm);
        let pk = agent.public();
        assert!(hello_verifies(&h, RECEIVER, &ekm, Some(&pk)));
        let cases = [
            ("no key in the Lease", RECEIVER, ekm, None),
            ("another node's key", RECEIVER, ekm, Some(other.public())),
            (
                "another session",
                RECEIVER,
                [8u8; BINDING_LEN],
                Some(pk.clone()),
            ),
            ("reflected as the source's", SOURCE, ekm, Some(pk.clone())),
        ];
        for (what, role, ekm, key) in cases {
            assert!(!hello_verifies(&h, role, &ekm, key.as_ref()), "{what}");
        }
        let mut renamed = h.clone();
        renamed.node = "n3".into();
        assert!(!hello_verifies(&renamed, RECEIVER, &ekm, Some(&pk)));
    }

    fn clone_ask(node: &str) -> (Ask, ClaimSeen) {
        let source = CloneSource {
            volume: VolumeName::new("pvc-u0").expect("name"),
            claim_uid: "u0".into(),
            namespace: "db".into(),
            claim: "data-0".into(),
        };
        let req = VolumeRequest::clone_of(
            VolumeSpec::new(VolumeName::new("pvc-u1").expect("name"), 1 << 20),
            "u1".into(),
            node.into(),
            source,
        );
        let ann = request_annotations(&key(), &req).expect("sign");
        let text = ann[0].1.clone();
        let ask = Ask {
            namespace: "db".into(),
            claim: "data-1".into(),
            request: text.clone(),
            request_sig: ann[1].1.clone(),
        };
        let seen = ClaimSeen {
            uid: "u1".into(),
            namespace: "db".into(),
            deleting: false,
            request: Some(text),
        };
        (ask, seen)
    }

    #[test]
    fn only_the_claims_current_signed_clone_request_for_the_peer_is_served() {
        let (ask, seen) = clone_ask("n2");
        let (req, ns) = check_ask(&ask, true, "n2", Some(&seen)).expect("served");
        assert_eq!((req.node.as_str(), ns.as_str()), ("n2", "db"));
        assert!(req.clone.is_some());
        let other_uid = ClaimSeen {
            uid: "u9".into(),
            ..seen.clone()
        };
        let deleting = ClaimSeen {
            deleting: true,
            ..seen.clone()
        };
        let replaced = ClaimSeen {
            request: Some("{}".into()),
            ..seen.clone()
        };
        let (plain_ask, plain_seen) = {
            let req = VolumeRequest::new(
                VolumeSpec::new(VolumeName::new("pvc-u1").expect("name"), 1 << 20),
                "u1".into(),
                "n2".into(),
            );
            let text = serde_json::to_string(&req).expect("json");
            (
                Ask {
                    request: text.clone(),
                    ..ask.clone()
                },
                ClaimSeen {
                    request: Some(text),
                    ..seen.clone()
                },
            )
        };
        let cases = [
            ("not signed", &ask, false, "n2", Some(&seen), "not signed"),
            (
                "for another node",
                &ask,
                true,
                "n3",
                Some(&seen),
                "not on node n3",
            ),
            ("claim gone", &ask, true, "n2", None, "does not exist"),
            (
                "another claim",
                &ask,
                true,
                "n2",
                Some(&other_uid),
                "(uid u9)",
            ),
            (
                "being deleted",
                &ask,
                true,
                "n2",
                Some(&deleting),
                "being deleted",
            ),
            (
                "stale request",
                &ask,
                true,
                "n2",
                Some(&replaced),
                "carries now",
            ),
            (
                "not a clone",
                &plain_ask,
                true,
                "n2",
                Some(&plain_seen),
                "not a clone",
            ),
        ];
        for (what, ask, signed, peer, claim, want) in cases {
            match check_ask(ask, signed, peer, claim) {
                Ok(_) => panic!("{what}: served"),
                Err(why) => assert!(why.contains(want), "{what}: {why}"),
            }
        }
    }

    #[test]
    fn names_that_leave_their_directory_are_not_valid() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        for good in [&b"a"[..], b"...", b".hidden", b"caf\xe9"] {
            assert!(valid_name(good), "{good:?}");
        }
    }
}
