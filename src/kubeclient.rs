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
