//! The controller→agent request (the claim's [`super::keys::REQUEST`] annotation): a
//! [`VolumeSpec`], the claim and node it is for, for a clone the volume to copy
//! ([`CloneSource`]), for a restore the backup set to restore ([`RestoreSource`]), and
//! a `version`, so either side can be upgraded first.
//!
//! Versions: a request without `version` is version 1 (what every controller before
//! versioning wrote); this build reads up to [`REQUEST_VERSION`]. A newer one is
//! read only as far as its version, claim and node ([`read`] gives
//! [`Read::Newer`]), never as the version we know: an agent refuses it with a reason
//! rather than make a volume it misunderstood. A new version is for a change an older
//! agent must not ignore; a new optional spec field is not one (an older agent ignores
//! fields it does not know, as the previous version ignores `version`).
//!
//! - Version 1: make an empty volume.
//! - Version 2: the same, filled with a copy of [`CloneSource`]'s volume. An agent
//!   that ignored `clone` would make an empty volume and answer ready, so a database
//!   replica would start from nothing believing it holds the primary's data: clone
//!   requests are written as version 2, which agents before it refuse. Requests that
//!   do not clone stay version 1, so an agent not yet upgraded still serves them; a
//!   version-1 text carrying `clone` is not a request at all.
//! - Version 3: the same, filled from a backup set ([`RestoreSource`], for a
//!   `VolumeRestore`). An agent of version 2 reads it as newer and refuses it, never
//!   makes an empty volume in place of the restored data; a text of an older version
//!   carrying `restore`, or carrying both `clone` and `restore`, is not a request.
//!
//! Wire shape: the spec's fields sit beside `claimUid` and `node`, in camelCase, as the
//! previous version wrote and reads them. The spec's own serde form is the on-disk
//! snake_case one (see `volume::VolumeSpec`); `camel` converts the keys by rule, so a
//! new spec field needs nothing here.

use serde::{Deserialize, Serialize};

use crate::volume::{VolumeName, VolumeSpec};

/// The newest request version this build reads (and writes, for restores).
pub const REQUEST_VERSION: u32 = 3;

/// The version of a request that clones (see the module doc).
pub const CLONE_VERSION: u32 = 2;

/// The version of a request that restores a backup set (see the module doc).
pub const RESTORE_VERSION: u32 = 3;

fn first_version() -> u32 {
    1
}

/// What the controller asks a node agent to create: the volume spec plus the claim and
/// node it is for. An agent of the previous version reads the spec's fields and
/// ignores the rest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRequest {
    /// The shape of this request (absent: 1).
    #[serde(default = "first_version")]
    pub version: u32,
    #[serde(flatten, with = "camel")]
    pub spec: VolumeSpec,
    /// The uid of the claim the volume is for.
    pub claim_uid: String,
    /// The node whose agent is to create it.
    pub node: String,
    /// For a clone: the volume whose data the new one starts with (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<CloneSource>,
    /// For a restore: the backup set the new volume starts with (version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreSource>,
}

/// The backup set a restore reads, as the controller found it in the claim's
/// `VolumeRestore` (matched by the claim's uid in the status only localnfs writes).
/// The agent resolves `target` among the targets its operator configured, and
/// restores only a set whose owner record is in `namespace` (the claim's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSource {
    /// An operator-configured backup target's name (never a path).
    pub target: String,
    /// The backed-up volume: the directory under the target.
    pub volume: VolumeName,
    /// A set id, or `latest` (the newest complete set when the agent restores).
    pub set: String,
    /// The namespace of the claim (and of the `VolumeRestore`).
    pub namespace: String,
}

/// The volume a clone copies, as the controller found it: the source claim's PV (which
/// only the controller writes) names the volume and its node, the API server the
/// claim's uid and namespace. The agent copies it only if the volume's owner record is
/// this claim and its namespace is the new claim's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloneSource {
    /// The source volume, on the request's node.
    pub volume: VolumeName,
    /// The uid of the claim that owns it.
    pub claim_uid: String,
    /// That claim's namespace and name.
    pub namespace: String,
    pub claim: String,
}

impl VolumeRequest {
    /// A request for an empty volume (version 1: every agent reads it).
    pub fn new(spec: VolumeSpec, claim_uid: String, node: String) -> Self {
        Self {
            version: 1,
            spec,
            claim_uid,
            node,
            clone: None,
            restore: None,
        }
    }

    /// A request for a volume holding a copy of `source` (version 2).
    pub fn clone_of(
        spec: VolumeSpec,
        claim_uid: String,
        node: String,
        source: CloneSource,
    ) -> Self {
        Self {
            version: CLONE_VERSION,
            clone: Some(source),
            ..Self::new(spec, claim_uid, node)
        }
    }

    /// A request for a volume holding backup set `source` (version 3).
    pub fn restore_of(
        spec: VolumeSpec,
        claim_uid: String,
        node: String,
        source: RestoreSource,
    ) -> Self {
        Self {
            version: RESTORE_VERSION,
            restore: Some(source),
            ..Self::new(spec, claim_uid, node)
        }
    }
}

/// What every version of a request keeps: enough to say who it is for and that it is
/// too new.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    #[serde(default = "first_version")]
    version: u32,
    claim_uid: String,
    node: String,
}

/// A request's text, read.
#[derive(Clone, Debug, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "made once per claim read and taken apart at once; a box would only add an allocation"
)]
pub enum Read {
    /// A version this build knows.
    Known(VolumeRequest),
    /// A newer version, for `claim_uid` on `node`: not to be acted on, only refused.
    Newer {
        version: u32,
        claim_uid: String,
        node: String,
    },
}

/// Reads a request's text; `None` if it is not a request at all.
pub fn read(text: &str) -> Option<Read> {
    read_up_to(text, REQUEST_VERSION)
}

/// [`read`] by a reader of versions up to `newest` (what an agent of that version did).
fn read_up_to(text: &str, newest: u32) -> Option<Read> {
    let head: Head = serde_json::from_str(text).ok()?;
    if head.version > newest {
        return Some(Read::Newer {
            version: head.version,
            claim_uid: head.claim_uid,
            node: head.node,
        });
    }
    let request: VolumeRequest = serde_json::from_str(text).ok()?;
    // Only version 2 may clone: a clone in an older version's clothes is not one we wrote.
    if request.clone.is_some() && request.version < CLONE_VERSION {
        return None;
    }
    // Likewise a restore below version 3; and a request is one thing, never both.
    if request.restore.is_some() && (request.version < RESTORE_VERSION || request.clone.is_some()) {
        return None;
    }
    Some(Read::Known(request))
}

/// The spec with camelCase keys: `size_bytes` ↔ `sizeBytes`, by rule, for every field.
mod camel {
    use serde::de::Error as _;
    use serde::ser::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::{Map, Value};

    use crate::volume::VolumeSpec;

    fn to_camel(key: &str) -> String {
        let mut out = String::with_capacity(key.len());
        let mut upper = false;
        for c in key.chars() {
            match c {
                '_' => upper = true,
                c if upper => {
                    out.push(c.to_ascii_uppercase());
                    upper = false;
                }
                c => out.push(c),
            }
        }
        out
    }

    fn to_snake(key: &str) -> String {
        let mut out = String::with_capacity(key.len() + 4);
        for c in key.chars() {
            if c.is_ascii_uppercase() {
                out.push('_');
                out.push(c.to_ascii_lowercase());
            } else {
                out.push(c);
            }
        }
        out
    }

    fn rekey(map: Map<String, Value>, f: fn(&str) -> String) -> Map<String, Value> {
        map.into_iter().map(|(k, v)| (f(&k), v)).collect()
    }

    pub fn serialize<S: Serializer>(spec: &VolumeSpec, s: S) -> Result<S::Ok, S::Error> {
        match serde_json::to_value(spec).map_err(S::Error::custom)? {
            Value::Object(map) => rekey(map, to_camel).serialize(s),
            _ => Err(S::Error::custom("a volume spec encodes as an object")),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VolumeSpec, D::Error> {
        let map = Map::<String, Value>::deserialize(d)?;
        serde_json::from_value(Value::Object(rekey(map, to_snake))).map_err(D::Error::custom)
    }

    #[cfg(test)]
    #[test]
    fn keys_convert_both_ways() {
        for (snake, camel) in [("size_bytes", "sizeBytes"), ("uid", "uid")] {
            assert_eq!(
                (to_camel(snake), to_snake(camel)),
                (camel.into(), snake.into())
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::{Squash, VolumeName};

    /// The request exactly as the previous version's controller wrote it (f13a0d4:
    /// no `version`; the spec's fields in camelCase beside `claimUid` and `node`).
    const PREVIOUS: &str = r#"{"name":"pvc-u1","sizeBytes":1048576,"uid":999,"gid":998,"mode":488,"squash":"all","anonUid":1000,"anonGid":1001,"maxFiles":5000,"claimUid":"u1","node":"n1"}"#;

    fn full() -> VolumeRequest {
        let spec = VolumeSpec {
            uid: 999,
            gid: 998,
            mode: 0o750,
            squash: Squash::All,
            anon_uid: 1000,
            anon_gid: 1001,
            max_files: Some(5000),
            ..VolumeSpec::new(VolumeName::new("pvc-u1").expect("name"), 1 << 20)
        };
        VolumeRequest::new(spec, "u1".into(), "n1".into())
    }

    #[test]
    fn a_request_from_the_previous_controller_reads_as_version_1() {
        assert_eq!(read(PREVIOUS), Some(Read::Known(full())));
    }

    /// The previous version's request and spec, field for field: what an agent not
    /// yet upgraded reads our requests with.
    #[derive(Deserialize, PartialEq, Debug)]
    #[serde(rename_all = "camelCase")]
    struct OldSpec {
        name: String,
        size_bytes: u64,
        uid: u32,
        gid: u32,
        mode: u32,
        squash: Squash,
        anon_uid: u32,
        anon_gid: u32,
        #[serde(default)]
        max_files: Option<u64>,
    }

    #[derive(Deserialize, PartialEq, Debug)]
    #[serde(rename_all = "camelCase")]
    struct OldRequest {
        #[serde(flatten)]
        spec: OldSpec,
        claim_uid: String,
        node: String,
    }

    #[test]
    fn a_previous_agent_reads_what_we_write_as_we_meant_it() {
        let ours = serde_json::to_string(&full()).expect("json");
        let old: OldRequest = serde_json::from_str(&ours).expect("old reader");
        let want: OldRequest = serde_json::from_str(PREVIOUS).expect("old reader");
        assert_eq!(old, want);
        assert!(ours.contains(r#""version":1"#), "{ours}");
    }

    #[test]
    fn a_newer_request_is_recognised_not_misread() {
        let newer = r#"{"version":4,"claimUid":"u1","node":"n1","volume":{"name":"x"}}"#;
        assert_eq!(
            read(newer),
            Some(Read::Newer {
                version: 4,
                claim_uid: "u1".into(),
                node: "n1".into()
            })
        );
        // Even when its fields happen to read as an older version's.
        let lookalike = PREVIOUS.replace(r#""node""#, r#""version":4,"node""#);
        assert!(matches!(
            read(&lookalike),
            Some(Read::Newer { version: 4, .. })
        ));
        assert_eq!(read("{}"), None);
    }

    fn a_clone() -> VolumeRequest {
        let source = CloneSource {
            volume: VolumeName::new("pvc-u0").expect("name"),
            claim_uid: "u0".into(),
            namespace: "db".into(),
            claim: "data-0".into(),
        };
        let VolumeRequest {
            spec,
            claim_uid,
            node,
            ..
        } = full();
        VolumeRequest::clone_of(spec, claim_uid, node, source)
    }

    #[test]
    fn only_clones_are_written_as_version_2() {
        let plain = serde_json::to_string(&full()).expect("json");
        assert!(!plain.contains("clone"), "{plain}");
        let clone = serde_json::to_string(&a_clone()).expect("json");
        assert!(clone.contains(r#""version":2"#), "{clone}");
        assert!(
            clone.contains(
                r#""clone":{"volume":"pvc-u0","claimUid":"u0","namespace":"db","claim":"data-0"}"#
            ),
            "{clone}"
        );
        assert_eq!(read(&clone), Some(Read::Known(a_clone())));
    }

    /// What an agent of version 1 does with a clone request: it finds a newer version
    /// and refuses it (its `read` compared the version with 1), so it never makes an
    /// empty volume in place of the copy.
    #[test]
    fn an_agent_before_clones_refuses_a_clone_request() {
        let clone = serde_json::to_string(&a_clone()).expect("json");
        let head: Head = serde_json::from_str(&clone).expect("head");
        assert!(head.version > 1, "a version-1 agent must see it as newer");
    }

    #[test]
    fn a_clone_dressed_as_version_1_is_not_a_request() {
        let clone = serde_json::to_string(&a_clone()).expect("json");
        assert_eq!(
            read(&clone.replace(r#""version":2"#, r#""version":1"#)),
            None
        );
        assert_eq!(read(&clone.replace(r#""version":2,"#, "")), None);
    }

    #[test]
    fn every_spec_field_survives_the_trip() {
        let text = serde_json::to_string(&full()).expect("json");
        assert_eq!(read(&text), Some(Read::Known(full())));
    }

    fn a_restore() -> VolumeRequest {
        let source = RestoreSource {
            target: "nightly".into(),
            volume: VolumeName::new("pvc-u0").expect("name"),
            set: "20261207T011500.123Z".into(),
            namespace: "db".into(),
        };
        let VolumeRequest {
            spec,
            claim_uid,
            node,
            ..
        } = full();
        VolumeRequest::restore_of(spec, claim_uid, node, source)
    }

    #[test]
    fn only_restores_are_written_as_version_3() {
        let text = serde_json::to_string(&a_restore()).expect("json");
        assert!(text.contains(r#""version":3"#), "{text}");
        assert!(
            text.contains(
                r#""restore":{"target":"nightly","volume":"pvc-u0","set":"20261207T011500.123Z","namespace":"db"}"#
            ),
            "{text}"
        );
        assert_eq!(read(&text), Some(Read::Known(a_restore())));
        let clone = serde_json::to_string(&a_clone()).expect("json");
        assert!(!clone.contains("restore"), "{clone}");
    }

    /// What an agent of version 2 (clones, no restores) does with a restore request:
    /// its `read` compared the version with 2 and found it newer, so it refused the
    /// request instead of making an empty volume and answering ready.
    #[test]
    fn an_agent_before_restores_refuses_a_restore_request() {
        let text = serde_json::to_string(&a_restore()).expect("json");
        assert_eq!(
            read_up_to(&text, CLONE_VERSION),
            Some(Read::Newer {
                version: 3,
                claim_uid: "u1".into(),
                node: "n1".into()
            })
        );
        // A clone and a plain request are still what that agent reads as its own.
        let clone = serde_json::to_string(&a_clone()).expect("json");
        assert_eq!(
            read_up_to(&clone, CLONE_VERSION),
            Some(Read::Known(a_clone()))
        );
    }

    #[test]
    fn a_restore_dressed_as_an_older_version_or_with_a_clone_is_not_a_request() {
        let text = serde_json::to_string(&a_restore()).expect("json");
        for older in [r#""version":2"#, r#""version":1"#] {
            assert_eq!(
                read(&text.replace(r#""version":3"#, older)),
                None,
                "{older}"
            );
        }
        assert_eq!(read(&text.replace(r#""version":3,"#, "")), None);
        let both = text.replace(
            r#""restore":"#,
            r#""clone":{"volume":"pvc-u0","claimUid":"u0","namespace":"db","claim":"data-0"},"restore":"#,
        );
        assert_eq!(read(&both), None);
    }
}
