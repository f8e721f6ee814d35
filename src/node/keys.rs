//! The node agent's keys (see `objects::signed`): its own signing key, kept on its
//! node's disk beside the handle key (`<root>/agent.key`, 0600) so a restart or an
//! upgrade keeps it, and the controller's public key, watched in the ConfigMap only
//! the controller writes. Until that ConfigMap is read the agent acts on no claim:
//! nothing it cannot check is believed.

use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::objects::keys::{CONTROLLER_KEY_CONFIGMAP, CONTROLLER_KEY_FIELD};
use crate::objects::signed::{PublicKey, Signer};
use crate::volume::VolumeStore;

/// The file under the node root holding the agent's signing key (PKCS#8).
const AGENT_KEY_FILE: &str = "agent.key";

/// The agent's signing key, made on first use. A key file that does not parse is
/// moved aside and replaced: a new key only means claims in flight are answered again,
/// while refusing to start would stop NFS service for every volume on the node.
pub fn agent_signer(store: &VolumeStore) -> Result<Signer> {
    let bytes = store.secret(AGENT_KEY_FILE, Signer::generate)?;
    match Signer::from_pkcs8(&bytes) {
        Ok(signer) => Ok(signer),
        Err(why) => {
            let path = store.root().join(AGENT_KEY_FILE);
            let aside = path.with_extension(format!("bad-{}", crate::objects::agents::unix_now()));
            tracing::error!(key = %path.display(), moved_to = %aside.display(), %why, "the agent's signing key does not parse: making a new one");
            std::fs::rename(&path, &aside)
                .map_err(|e| Error::BuildObject(format!("move aside {}: {e}", path.display())))?;
            let bytes = store.secret(AGENT_KEY_FILE, Signer::generate)?;
            Signer::from_pkcs8(&bytes)
                .map_err(|why| Error::BuildObject(format!("{}: {why}", path.display())))
        }
    }
}

/// The controller's public key as last read; `None` until it is.
#[derive(Clone, Default)]
pub struct ControllerKey(Arc<RwLock<Option<PublicKey>>>);

impl ControllerKey {
    pub fn get(&self) -> Option<PublicKey> {
        self.0.read().ok().and_then(|k| k.clone())
    }

    fn set(&self, key: Option<PublicKey>) {
        if let Ok(mut k) = self.0.write() {
            *k = key;
        }
    }

    /// Keeps the key equal to the ConfigMap in `namespace` until `shutdown`; calls
    /// `changed` after each change (claims waiting on it are looked at again).
    pub async fn watch(
        &self,
        client: Client,
        namespace: &str,
        changed: impl Fn(),
        shutdown: CancellationToken,
    ) {
        let api: Api<ConfigMap> = Api::namespaced(client, namespace);
        let config =
            watcher::Config::default().fields(&format!("metadata.name={CONTROLLER_KEY_CONFIGMAP}"));
        let mut stream = std::pin::pin!(watcher(api, config).default_backoff().touched_objects());
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = stream.next() => n,
            };
            match next {
                Some(Ok(cm)) => {
                    let key = cm
                        .data
                        .as_ref()
                        .and_then(|d| d.get(CONTROLLER_KEY_FIELD))
                        .and_then(|h| PublicKey::from_hex(h));
                    if key.is_none() {
                        tracing::error!(
                            configmap = CONTROLLER_KEY_CONFIGMAP,
                            "the controller's public key does not parse: acting on no claim"
                        );
                    }
                    if key != self.get() {
                        self.set(key);
                        changed();
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching the controller's public key");
                }
                None => return,
            }
        }
    }
}
