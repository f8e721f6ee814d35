//! The controller's signing key (see `objects::signed`): kept in a Secret of the
//! install namespace that only the controller reads, made by the first controller to
//! start, and its public half published in a ConfigMap beside it that only the
//! controller writes and the node agents read. Every replica loads the same key, so a
//! new leader's signatures match the last one's.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::error::{Error, Result};
use crate::objects::keys::{CONTROLLER_KEY_CONFIGMAP, CONTROLLER_KEY_FIELD, CONTROLLER_KEY_SECRET};
use crate::objects::signed::Signer;

/// Loads the controller's key from its Secret (making both on first start) and makes
/// sure the ConfigMap publishes its public half.
pub async fn controller_signer(client: &Client, namespace: &str) -> Result<Signer> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let what = format!("controller key Secret {namespace}/{CONTROLLER_KEY_SECRET}");
    let pkcs8 = match read_secret(&secrets, &what).await? {
        Some(bytes) => bytes,
        None => {
            let fresh = Signer::generate()
                .ok_or_else(|| Error::BuildObject("cannot generate a signing key".into()))?;
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(CONTROLLER_KEY_SECRET.into()),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(
                    CONTROLLER_KEY_FIELD.to_owned(),
                    ByteString(fresh),
                )])),
                type_: Some("Opaque".into()),
                ..Secret::default()
            };
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(_) => tracing::info!(
                    secret = CONTROLLER_KEY_SECRET,
                    "made the controller's signing key"
                ),
                // Another replica made it first: its key is the one.
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(Error::kube(format!("create {what}"))(e)),
            }
            read_secret(&secrets, &what)
                .await?
                .ok_or_else(|| Error::BuildObject(format!("{what} vanished after creation")))?
        }
    };
    let signer = Signer::from_pkcs8(&pkcs8).map_err(|why| {
        Error::BuildObject(format!(
            "{what}: {why}; delete it to make a new key (claims in flight are then placed again)"
        ))
    })?;
    publish(client, namespace, &signer).await?;
    Ok(signer)
}

/// How often the leader checks that its key is still the one in the Secret and the
/// one the ConfigMap publishes.
pub const KEY_CHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether `signer` is still the Secret's key; re-publishes its public half if the
/// ConfigMap says otherwise. A leader whose key was replaced (the Secret deleted and
/// made anew by a restarted replica) must restart: agents no longer believe it.
pub async fn still_current(client: &Client, namespace: &str, signer: &Signer) -> Result<bool> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let what = format!("controller key Secret {namespace}/{CONTROLLER_KEY_SECRET}");
    let Some(pkcs8) = read_secret(&secrets, &what).await? else {
        return Ok(false);
    };
    let current = Signer::from_pkcs8(&pkcs8).map(|s| s.public() == signer.public());
    if current != Ok(true) {
        return Ok(false);
    }
    publish(client, namespace, signer).await?;
    Ok(true)
}

async fn read_secret(secrets: &Api<Secret>, what: &str) -> Result<Option<Vec<u8>>> {
    let secret = secrets
        .get_opt(CONTROLLER_KEY_SECRET)
        .await
        .map_err(Error::kube(format!("read {what}")))?;
    Ok(secret
        .and_then(|s| s.data)
        .and_then(|mut d| d.remove(CONTROLLER_KEY_FIELD))
        .map(|b| b.0))
}

/// Keeps the ConfigMap's public key equal to `signer`'s.
async fn publish(client: &Client, namespace: &str, signer: &Signer) -> Result<()> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let what = format!("controller key ConfigMap {namespace}/{CONTROLLER_KEY_CONFIGMAP}");
    let public = signer.public().to_hex();
    let want = |resource_version: Option<String>| ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONTROLLER_KEY_CONFIGMAP.into()),
            resource_version,
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            CONTROLLER_KEY_FIELD.to_owned(),
            public.clone(),
        )])),
        ..ConfigMap::default()
    };
    let current = maps
        .get_opt(CONTROLLER_KEY_CONFIGMAP)
        .await
        .map_err(Error::kube(format!("read {what}")))?;
    let result = match current {
        None => maps.create(&PostParams::default(), &want(None)).await,
        Some(cm) if cm.data.as_ref().and_then(|d| d.get(CONTROLLER_KEY_FIELD)) == Some(&public) => {
            return Ok(());
        }
        Some(cm) => {
            tracing::warn!(
                configmap = CONTROLLER_KEY_CONFIGMAP,
                "the published key was not the controller's: replacing it"
            );
            maps.replace(
                CONTROLLER_KEY_CONFIGMAP,
                &PostParams::default(),
                &want(cm.metadata.resource_version),
            )
            .await
        }
    };
    match result {
        Ok(_) => Ok(()),
        // Another replica published it meanwhile (the same key: one Secret).
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(Error::kube(format!("publish {what}"))(e)),
    }
}
