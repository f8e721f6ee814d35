//! The PV annotation [`PUBLISHED_NODES`]: which nodes may mount a volume, written by
//! the controller (`provisioner::publish` decides it) and enforced by the node agent
//! (`node::grants`).

use std::collections::BTreeSet;

use super::keys::PUBLISHED_NODES;

/// The annotation's value for `nodes`: a JSON list of names, sorted, so an unchanged
/// set is an unchanged string (and no write).
pub fn encode(nodes: &[String]) -> String {
    let sorted: BTreeSet<&String> = nodes.iter().collect();
    serde_json::to_string(&sorted).unwrap_or_else(|_| "[]".into())
}

/// Reads the annotation's value: a JSON list of node names.
pub fn parse(value: &str) -> Result<Vec<String>, String> {
    let nodes: BTreeSet<String> = serde_json::from_str(value)
        .map_err(|e| format!("{PUBLISHED_NODES} is not a JSON list of node names: {e}"))?;
    Ok(nodes.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_annotation_is_a_sorted_json_list() {
        assert_eq!(encode(&strings(&["b", "a", "b"])), r#"["a","b"]"#);
        assert_eq!(encode(&[]), "[]");
        assert_eq!(parse(r#"["b","a"]"#), Ok(strings(&["a", "b"])));
        for bad in ["", "node-1", r#"{"a":1}"#, "[1]"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
