//! Events on the objects we act on (events.k8s.io/v1), as `kubectl describe` shows them.
//!
//! Warnings go through kube's `Recorder`, which folds a repeated warning into one event
//! series (a claim that cannot be placed is retried every few seconds). The recorder
//! keeps every event it sent for six minutes to do that, so normal events, which happen
//! once per step of an object's life, are created directly and not remembered: a
//! controller provisioning 5,000 claims would otherwise hold 10,000 events in memory.
//!
//! Events about cluster-scoped objects (PVs) go to `kube-system`, created directly
//! whatever their type: the API server refuses an events.k8s.io/v1 event about a
//! cluster-scoped object in any other namespace up to 1.21 (later ones also take
//! `default`), and kube's recorder always uses `default`. Callers publish such
//! warnings once per occurrence, not on every retry.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};

/// Where events about cluster-scoped objects go (see the module doc).
pub const CLUSTER_SCOPED_NS: &str = "kube-system";

/// Publishes events as one component instance (`reportingController`/`Instance`).
pub struct Events {
    client: Client,
    controller: String,
    instance: String,
    warnings: Recorder,
}

impl Events {
    pub fn new(client: Client, controller: &str, instance: &str) -> Events {
        let warnings = Recorder::new(
            client.clone(),
            Reporter {
                controller: controller.into(),
                instance: Some(instance.into()),
            },
        );
        Events {
            client,
            controller: controller.into(),
            instance: instance.into(),
            warnings,
        }
    }

    /// Records an event about `obj`; failures are logged, never returned (an event is
    /// a courtesy, not a step the reconcile depends on).
    pub async fn publish<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let regarding = obj.object_ref(&());
        let sent = match type_ {
            EventType::Warning if regarding.namespace.is_some() => {
                let ev = Event {
                    type_,
                    reason: reason.into(),
                    note: Some(note),
                    action: action.into(),
                    secondary: None,
                };
                self.warnings.publish(&ev, &regarding).await
            }
            _ => {
                let ev = self.direct(regarding, type_, reason, action, note);
                let ns = ev
                    .metadata
                    .namespace
                    .as_deref()
                    .unwrap_or(CLUSTER_SCOPED_NS);
                Api::<K8sEvent>::namespaced(self.client.clone(), ns)
                    .create(&PostParams::default(), &ev)
                    .await
                    .map(drop)
            }
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, reason, "cannot record event");
        }
    }

    /// An event created directly, named like kube's recorder names them (object name
    /// and the time in nanoseconds, so two events never share a name in practice).
    fn direct(
        &self,
        regarding: ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) -> K8sEvent {
        let now = Timestamp::now();
        let base = regarding.name.as_deref().unwrap_or(&self.controller);
        K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!("{base}.{:x}", now.as_nanosecond())),
                namespace: Some(
                    regarding
                        .namespace
                        .clone()
                        .unwrap_or_else(|| CLUSTER_SCOPED_NS.into()),
                ),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(
                match type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            reason: Some(reason.into()),
            action: Some(action.into()),
            note: Some(note),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            regarding: Some(regarding),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn normal_events_name_their_object_and_reporter() {
        let client = Client::try_from(kube::Config::new(
            "http://127.0.0.1:1".parse().expect("url"),
        ))
        .expect("client");
        let events = Events::new(client, "localnfs-controller", "ctl-1");
        let regarding = ObjectReference {
            kind: Some("PersistentVolumeClaim".into()),
            namespace: Some("db".into()),
            name: Some("data-0".into()),
            ..Default::default()
        };
        let ev = events.direct(
            regarding,
            EventType::Normal,
            "ProvisioningSucceeded",
            "Provision",
            "made".into(),
        );
        let name = ev.metadata.name.as_deref().expect("name");
        assert!(name.starts_with("data-0."), "{name}");
        assert_eq!(ev.metadata.namespace.as_deref(), Some("db"));
        assert_eq!(ev.type_.as_deref(), Some("Normal"));
        assert_eq!(
            ev.reporting_controller.as_deref(),
            Some("localnfs-controller")
        );
        assert_eq!(ev.reporting_instance.as_deref(), Some("ctl-1"));
        assert_eq!(ev.regarding.and_then(|r| r.name).as_deref(), Some("data-0"));
        assert!(
            ev.event_time.is_some(),
            "events.k8s.io/v1 requires eventTime"
        );
    }

    #[tokio::test]
    async fn events_about_cluster_scoped_objects_go_to_kube_system() {
        let client = Client::try_from(kube::Config::new(
            "http://127.0.0.1:1".parse().expect("url"),
        ))
        .expect("client");
        let events = Events::new(client, "localnfs-node", "node-1");
        let regarding = ObjectReference {
            kind: Some("PersistentVolume".into()),
            name: Some("pvc-1".into()),
            ..Default::default()
        };
        let ev = events.direct(
            regarding,
            EventType::Warning,
            "VolumeInUse",
            "Reclaim",
            "kept".into(),
        );
        assert_eq!(ev.metadata.namespace.as_deref(), Some(CLUSTER_SCOPED_NS));
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
    }
}
