//! Building a Kubernetes client: from `--kubeconfig` when given, else the standard
//! chain (in-cluster service account, then `$KUBECONFIG` / `~/.kube/config`).

use std::path::Path;

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::error::{Error, Result};

/// A client for `kubeconfig`, or the default one.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    match kubeconfig {
        Some(path) => from_kubeconfig(path).await,
        None => Client::try_default().await.map_err(Error::BuildClient),
    }
}

/// A client built from a kubeconfig file.
pub async fn from_kubeconfig(path: &Path) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path).map_err(|source| Error::ReadKubeconfig {
        path: path.to_owned(),
        source,
    })?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| Error::ReadKubeconfig {
            path: path.to_owned(),
            source,
        })?;
    Client::try_from(config).map_err(Error::BuildClient)
}

/// A JSON patch adding finalizer `f` to an object whose finalizers were `current`.
/// Appends when the list exists, so nobody else's concurrent addition is lost.
pub fn add_finalizer(current: &[String], f: &str) -> kube::api::Patch<()> {
    let ops = if current.is_empty() {
        serde_json::json!([{"op": "add", "path": "/metadata/finalizers", "value": [f]}])
    } else {
        serde_json::json!([{"op": "add", "path": "/metadata/finalizers/-", "value": f}])
    };
    kube::api::Patch::Json(serde_json::from_value(ops).unwrap_or(json_patch::Patch(Vec::new())))
}

/// A JSON patch removing finalizer `f`, guarded by a `test` that it is still where we
/// saw it (the API answers 422 otherwise and the reconciler retries on a fresh copy),
/// so other finalizers are never touched. `None` if `f` is absent.
pub fn remove_finalizer(current: &[String], f: &str) -> Option<kube::api::Patch<()>> {
    let i = current.iter().position(|x| x == f)?;
    let path = format!("/metadata/finalizers/{i}");
    let ops = serde_json::json!([
        {"op": "test", "path": path, "value": f},
        {"op": "remove", "path": path},
    ]);
    serde_json::from_value(ops).ok().map(kube::api::Patch::Json)
}

/// Whether a failed call lost a race (409 Conflict, or 422 from a failed patch test):
/// worth retrying at once on a fresh copy.
pub fn lost_race(e: &crate::error::Error) -> bool {
    matches!(e, crate::error::Error::Kube { source: kube::Error::Api(s), .. } if s.code == 409 || s.code == 422)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finalizer_patches_touch_only_our_entry() {
        let cur = vec!["a".to_owned(), "ours".to_owned(), "b".to_owned()];
        let remove = serde_json::to_value(match remove_finalizer(&cur, "ours") {
            Some(kube::api::Patch::Json(p)) => p,
            _ => panic!("expected a JSON patch"),
        })
        .expect("json");
        assert_eq!(remove[0]["op"], "test");
        assert_eq!(remove[1]["path"], "/metadata/finalizers/1");
        assert!(remove_finalizer(&cur, "absent").is_none());
        let add = serde_json::to_value(match add_finalizer(&cur, "ours") {
            kube::api::Patch::Json(p) => p,
            _ => panic!("expected a JSON patch"),
        })
        .expect("json");
        assert_eq!(add[0]["path"], "/metadata/finalizers/-");
    }
}
