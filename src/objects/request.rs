//! The controller→agent request (the claim's [`super::keys::REQUEST`] annotation): a
//! [`VolumeSpec`], the claim and node it is for, and a `version`, so either side can
//! be upgraded first.
//!
//! Versions: a request without `version` is version 1 (what every controller before
//! versioning wrote); this build writes and reads [`REQUEST_VERSION`]. A newer one is
//! read only as far as its version, claim and node ([`read`] gives
//! [`Read::Newer`]), never as the version we know: an agent refuses it with a reason
//! rather than make a volume it misunderstood. A new version is for a change an older
//! agent must not ignore; a new optional spec field is not one (an older agent ignores
//! fields it does not know, as the previous version ignores `version`).
//!
//! Wire shape: the spec's fields sit beside `claimUid` and `node`, in camelCase, as the
//! previous version wrote and reads them. The spec's own serde form is the on-disk
//! snake_case one (see `volume::VolumeSpec`); `camel` converts the keys by rule, so a
//! new spec field needs nothing here.

use serde::{Deserialize, Serialize};

use crate::volume::VolumeSpec;

/// The request version this build writes, and the newest it reads.
pub const REQUEST_VERSION: u32 = 1;

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
}

impl VolumeRequest {
    /// A request of this build's version.
    pub fn new(spec: VolumeSpec, claim_uid: String, node: String) -> Self {
        Self {
            version: REQUEST_VERSION,
            spec,
            claim_uid,
            node,
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
    let head: Head = serde_json::from_str(text).ok()?;
    if head.version > REQUEST_VERSION {
        return Some(Read::Newer {
            version: head.version,
            claim_uid: head.claim_uid,
            node: head.node,
        });
    }
    serde_json::from_str(text).ok().map(Read::Known)
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
        let newer = r#"{"version":2,"claimUid":"u1","node":"n1","volume":{"name":"x"}}"#;
        assert_eq!(
            read(newer),
            Some(Read::Newer {
                version: 2,
                claim_uid: "u1".into(),
                node: "n1".into()
            })
        );
        // Even when its fields happen to read as version 1's.
        let lookalike = PREVIOUS.replace(r#""node""#, r#""version":2,"node""#);
        assert!(matches!(
            read(&lookalike),
            Some(Read::Newer { version: 2, .. })
        ));
        assert_eq!(read("{}"), None);
    }

    #[test]
    fn every_spec_field_survives_the_trip() {
        let text = serde_json::to_string(&full()).expect("json");
        assert_eq!(read(&text), Some(Read::Known(full())));
    }
}
