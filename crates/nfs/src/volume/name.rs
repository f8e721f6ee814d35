//! Volume names: the directory name of a volume under `<root>/volumes/`, and the path
//! clients mount (`/<name>`). Validated once so nothing downstream can be handed `..`,
//! a slash, or a name the filesystem would refuse.

use std::fmt;

/// A validated volume name: 1–253 bytes of `[a-z0-9._-]`, starting with a letter or
/// digit (a DNS-1123 subdomain, so `pvc-<uid>` and PVC-derived names fit).
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeName(String);

/// Why a string is not a volume name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid volume name {name:?}: {reason}")]
pub struct InvalidName {
    pub name: String,
    pub reason: &'static str,
}

impl VolumeName {
    pub fn new(name: &str) -> Result<Self, InvalidName> {
        let bad = |reason| InvalidName {
            name: name.to_owned(),
            reason,
        };
        if name.is_empty() || name.len() > 253 {
            return Err(bad("must be 1 to 253 characters"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(bad("only a-z, 0-9, '.', '_' and '-' are allowed"));
        }
        if !name.as_bytes()[0].is_ascii_alphanumeric() {
            return Err(bad("must start with a letter or digit"));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name a [`super::VolumeSpec::template`] carries until the real one is known
    /// (valid by construction, so no error to handle).
    pub(super) fn placeholder() -> Self {
        Self("template".to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VolumeName {
    type Error = InvalidName;
    fn try_from(s: String) -> Result<Self, InvalidName> {
        Self::new(&s)
    }
}

impl From<VolumeName> for String {
    fn from(n: VolumeName) -> String {
        n.0
    }
}

impl std::str::FromStr for VolumeName {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, InvalidName> {
        Self::new(s)
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::VolumeName;

    #[test]
    fn names_that_could_escape_the_root_are_refused() {
        for bad in [
            "", "..", ".", "../x", "a/b", "/abs", "-x", "A", "a b", "a\0b",
        ] {
            assert!(VolumeName::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(VolumeName::new(&"a".repeat(254)).is_err());
    }

    #[test]
    fn pvc_style_names_are_accepted() {
        for good in [
            "pvc-6f1c0b8e-1d2a-4c3b-9e8f-0a1b2c3d4e5f",
            "db.data-0",
            "a",
            "0_x",
        ] {
            assert!(VolumeName::new(good).is_ok(), "{good:?} refused");
        }
    }
}
