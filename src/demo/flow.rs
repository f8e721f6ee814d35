//! The demo's volume flow on the embedded cluster: a node agent, a controller and the
//! scheduler helper (this same binary, as child processes), the default StorageClass,
//! a `mysql` StatefulSet scaled 1 → 3 by clone (its claim template's dataSource names
//! ordinal 0's claim, so the new replicas' volumes start as copies of mysql-0's), each
//! pod's volume mounted by the node's Linux kernel exactly as kubelet mounts it
//! (`mount -t nfs` with the PV's server, path and mountOptions) and the pod's data
//! written there, and a pod deleted and rebuilt that finds its data again through the
//! same kernel client.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::objects::agents::HEARTBEAT_NAMESPACE;
use localnfs_testbed::kernel::{KernelNode, quote};
use localnfs_testbed::{Process, kubelet};

const NAMESPACE: &str = "localnfs-system";
const WAIT: Duration = Duration::from_secs(120);

fn step(msg: &str) -> Error {
    Error::DemoStep(msg.to_owned())
}

/// Creates the localnfs namespace and registers the scheduler helper's webhook at
/// `https://127.0.0.1:<webhook_port>/mutate`; the helper fills in its CA when it starts.
pub async fn prepare(client: &Client, webhook_port: u16) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in [NAMESPACE, HEARTBEAT_NAMESPACE] {
        create(&namespaces, json!({"metadata": {"name": ns}}), "namespace").await?;
    }
    let config = crate::scheduler::config::webhook_configuration(json!({
        "url": format!("https://127.0.0.1:{webhook_port}/mutate"),
    }))?;
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    create_obj(&api, &config, "MutatingWebhookConfiguration").await
}

/// Starts `localnfs node` for `node`, `localnfs controller` and `localnfs scheduler`
/// (webhook and extender on the given ports), all logging into `dir`.
pub fn start_components(
    dir: &Path,
    kubeconfig: &Path,
    node: &str,
    ip: IpAddr,
    (webhook_port, extender_port): (u16, u16),
) -> Result<Vec<Process>> {
    let exe = std::env::current_exe().map_err(|source| {
        Error::from(localnfs_testbed::Error::SpawnProcess {
            name: "localnfs".into(),
            source,
        })
    })?;
    let common = |cmd: &mut Command| {
        cmd.arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--namespace", NAMESPACE, "--admin-addr", "127.0.0.1:0"])
            .env("LOCALNFS_LOG", "info,kube=warn");
    };
    let mut agent = Command::new(&exe);
    agent
        .args([
            "node",
            "--node-name",
            node,
            "--listen",
            &format!("{ip}:0"),
            "--root",
        ])
        .arg(dir.join(node))
        .arg("--backup-target")
        .arg(format!(
            "{}={}",
            super::restore::TARGET,
            super::restore::target_dir(dir).display()
        ));
    common(&mut agent);
    let mut controller = Command::new(&exe);
    controller.arg("controller");
    common(&mut controller);
    let mut helper = Command::new(&exe);
    helper.args([
        "scheduler",
        "--webhook-listen",
        &format!("127.0.0.1:{webhook_port}"),
        "--extender-listen",
        &format!("127.0.0.1:{extender_port}"),
        "--tls-san",
        "127.0.0.1",
        // The demo's agent runs with the admin kubeconfig, not as the agents' service
        // account, so no write guard is registered (see deploy/base/webhook.yaml).
        "--agent-webhook-config",
        "",
    ]);
    common(&mut helper);
    Ok(vec![
        Process::spawn("localnfs node", &mut agent, &dir.join("localnfs-node.log"))?,
        Process::spawn(
            "localnfs controller",
            &mut controller,
            &dir.join("localnfs-controller.log"),
        )?,
        Process::spawn(
            "localnfs scheduler",
            &mut helper,
            &dir.join("localnfs-scheduler.log"),
        )?,
    ])
}

pub(super) async fn create<K>(api: &Api<K>, value: serde_json::Value, what: &str) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K =
        serde_json::from_value(value).map_err(|e| Error::BuildObject(format!("{what}: {e}")))?;
    create_obj(api, &obj, what).await
}

/// Creates `obj`; one that already exists counts as created.
async fn create_obj<K>(api: &Api<K>, obj: &K, what: &str) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(Error::kube(format!("create {what}"))(e)),
    }
}

/// Polls `check` every 200 ms, printing a dot every few seconds so a person sees
/// progress.
pub(super) async fn wait_until<T, F, Fut>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut dots = 0;
    loop {
        if let Some(v) = check().await {
            if dots > 0 {
                println!();
            }
            return Ok(v);
        }
        if start.elapsed() > WAIT {
            return Err(Error::Timeout {
                what: what.into(),
                after: WAIT,
            });
        }
        if start.elapsed().as_secs() / 3 > dots {
            dots += 1;
            print!(
                "{}",
                if dots == 1 {
                    format!("  waiting for {what} .")
                } else {
                    ".".into()
                }
            );
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the demo did, for the report.
#[derive(Debug, Default)]
pub struct Outcome {
    /// pod → (claim, PV, node, the kubelet's mount command, what the pod found).
    pub volumes: BTreeMap<String, (String, String, String, String, String)>,
    pub rebuilt: Option<(String, String)>,
}

/// Runs the flow; returns what happened.
pub async fn run(client: &Client, node: Arc<KernelNode>) -> Result<Outcome> {
    println!("waiting for the node agent's heartbeat...");
    let leases: Api<Lease> = Api::namespaced(client.clone(), HEARTBEAT_NAMESPACE);
    wait_until("node agent heartbeat", || async {
        leases
            .get_opt("localnfs-node-node-1")
            .await
            .ok()
            .flatten()
            .map(|_| ())
    })
    .await?;

    let classes: Api<StorageClass> = Api::all(client.clone());
    create(
        &classes,
        json!({
            "metadata": {"name": "localnfs"},
            "provisioner": "localnfs.io/nfs",
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "WaitForFirstConsumer",
            "allowVolumeExpansion": true,
            "parameters": {"locality": "preferred"},
        }),
        "StorageClass localnfs",
    )
    .await?;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    create(&sets, mysql_cloned(1, "localnfs"), "StatefulSet mysql").await?;
    println!(
        "StorageClass localnfs and StatefulSet mysql (1 replica; new replicas' volumes start as copies of mysql-0's) applied"
    );
    let log = Shared::default();
    let _kubelet = DemoKubelet::start(client.clone(), log.clone(), node);
    wait_ready(client, 1).await?;
    println!(
        "scaling mysql to 3 replicas by clone (kubectl scale statefulset mysql --replicas=3): mysql-1 and mysql-2 get copies of mysql-0's volume"
    );
    sets.patch_scale(
        "mysql",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3}})),
    )
    .await
    .map_err(Error::kube("scale mysql"))?;
    wait_ready(client, 3).await?;

    let mut outcome = Outcome::default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for i in 0..3 {
        let pod = format!("mysql-{i}");
        let claim = format!("data-{pod}");
        let pv = bound_pv(client, &claim).await?;
        let pv_name = pv.name_any();
        let node = pods
            .get(&pod)
            .await
            .ok()
            .and_then(|p| p.spec?.node_name)
            .unwrap_or_default();
        let mount = mount_command(&pv).unwrap_or_default();
        let found = log.get(&pod).unwrap_or_default();
        outcome
            .volumes
            .insert(pod, (claim, pv_name, node, mount, found));
    }

    println!("deleting pod mysql-1 to show it coming back to its data...");
    let old_uid = pods
        .get("mysql-1")
        .await
        .ok()
        .and_then(|p| p.uid())
        .unwrap_or_default();
    pods.delete("mysql-1", &DeleteParams::default())
        .await
        .map_err(Error::kube("delete pod mysql-1"))?;
    let rebuilt = wait_until("mysql-1 to be rebuilt and Ready", || async {
        let p = pods.get("mysql-1").await.ok()?;
        (p.uid()? != old_uid && kubelet::is_running_and_ready(&p)).then_some(p)
    })
    .await?;
    let spec = rebuilt.spec.unwrap_or_default();
    let node = spec.node_name.clone().unwrap_or_default();
    let homed = spec
        .affinity
        .and_then(|a| a.node_affinity)
        .and_then(|n| n.preferred_during_scheduling_ignored_during_execution)
        .unwrap_or_default()
        .iter()
        .flat_map(|t| t.preference.match_expressions.iter().flatten())
        .flat_map(|e| e.values.clone().unwrap_or_default())
        .collect::<Vec<_>>();
    let found = log.get("mysql-1").unwrap_or_default();
    let found = match homed.as_slice() {
        [] => format!("{found} (no node affinity: was the scheduler helper up?)"),
        nodes => format!(
            "{found}; the scheduler helper gave it preferred node affinity for {}",
            nodes.join(", ")
        ),
    };
    outcome.rebuilt = Some((node, found));
    Ok(outcome)
}

/// The seed workload: StatefulSet `mysql` with one `data` volume claim template of
/// class `class` (the demo and the provisioner's seed test both run it).
pub fn mysql(replicas: i32, class: &str) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "mysql"},
        "spec": {
            "serviceName": "mysql",
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "mysql"}},
            "template": {
                "metadata": {"labels": {"app": "mysql"}},
                "spec": {"containers": [{
                    "name": "mysql", "image": "mysql:8",
                    "volumeMounts": [{"name": "data", "mountPath": "/var/lib/mysql"}],
                }]},
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": class,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            }],
        },
    })
}

/// [`mysql`] whose claim template's dataSource names ordinal 0's claim: new replicas'
/// volumes start as copies of mysql-0's (README, "Clones").
pub fn mysql_cloned(replicas: i32, class: &str) -> serde_json::Value {
    let mut sts = mysql(replicas, class);
    sts["spec"]["volumeClaimTemplates"][0]["spec"]["dataSource"] =
        json!({"kind": "PersistentVolumeClaim", "name": "data-mysql-0"});
    sts
}

async fn wait_ready(client: &Client, n: usize) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    wait_until(&format!("{n} mysql pod(s) Ready"), || async {
        let list = pods.list(&ListParams::default()).await.ok()?;
        let ready = list
            .items
            .iter()
            .filter(|p| kubelet::is_running_and_ready(p))
            .count();
        (ready == n).then_some(())
    })
    .await?;
    println!("{n} pod(s) Ready, each with its volume mounted by the node's kernel NFS client");
    Ok(())
}

/// The mount kubelet runs for a PV: `mount -t nfs -o <mountOptions> <server>:<path>`.
fn mount_command(pv: &PersistentVolume) -> Option<String> {
    let spec = pv.spec.as_ref()?;
    let nfs = spec.nfs.as_ref()?;
    let options = spec.mount_options.as_deref().unwrap_or_default().join(",");
    Some(format!(
        "mount -t nfs -o {options} {}:{}",
        nfs.server, nfs.path
    ))
}

/// What the kubelet stand-in did per pod.
#[derive(Clone, Default)]
struct Shared(std::sync::Arc<std::sync::Mutex<BTreeMap<String, String>>>);

impl Shared {
    fn set(&self, pod: &str, what: String) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pod.into(), what);
    }
    fn get(&self, pod: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(pod)
            .cloned()
    }
}

/// Plays kubelet: for each scheduled pod, mounts its volume in the node's kernel as
/// kubelet would (retrying a refused mount), reads `<claim>.txt` there or writes it if missing, then reports the
/// pod Ready; a deleted pod's mount is unmounted before its deletion is finished.
struct DemoKubelet(JoinHandle<()>);

impl Drop for DemoKubelet {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl DemoKubelet {
    fn start(client: Client, log: Shared, node: Arc<KernelNode>) -> Self {
        Self(tokio::spawn(async move {
            let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
            let mut events = watcher(pods, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Some(Ok(pod)) = events.next().await {
                let name = pod.name_any();
                let target = format!("/mnt/pods/{}/data", pod.uid().unwrap_or_default());
                if pod.metadata.deletion_timestamp.is_some() {
                    let umount = format!("umount {} || true", quote(&target));
                    let _ = node.run(&umount, Duration::from_secs(60)).await;
                    let _ = kubelet::finish_pod_deletion(&client, &pod).await;
                    continue;
                }
                let scheduled = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
                if !scheduled || kubelet::is_running_and_ready(&pod) {
                    continue;
                }
                match mount_and_touch(&client, &name, &node, &target).await {
                    Ok(what) => {
                        log.set(&name, what);
                        let _ = kubelet::mark_pod_ready(&client, "default", &name).await;
                    }
                    Err(e) => eprintln!("demo kubelet: pod {name}: {e}"),
                }
            }
        }))
    }
}

/// The PV bound to claim `claim` in `default`.
pub(super) async fn bound_pv(client: &Client, claim: &str) -> Result<PersistentVolume> {
    let c = Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .get(claim)
        .await
        .map_err(Error::kube(format!("read claim {claim}")))?;
    let pv_name = c
        .spec
        .and_then(|s| s.volume_name)
        .ok_or_else(|| step("claim not bound yet"))?;
    Api::<PersistentVolume>::all(client.clone())
        .get(&pv_name)
        .await
        .map_err(Error::kube(format!("read PV {pv_name}")))
}

async fn mount_and_touch(
    client: &Client,
    pod: &str,
    node: &KernelNode,
    target: &str,
) -> Result<String> {
    let claim = format!("data-{pod}");
    let pv = bound_pv(client, &claim).await?;
    // A repeated event for a pod being started mounts nothing twice.
    let mounted = node
        .run(&format!("mountpoint -q {}", quote(target)), WAIT)
        .await?;
    if mounted.rc != 0 {
        // As kubelet: a refused mount (the controller has not published the volume to
        // this node yet) is tried again, pausing longer each time.
        let start = std::time::Instant::now();
        let mut pause = Duration::from_millis(250);
        while let Err(e) = node.mount_pv(&pv, target).await {
            if start.elapsed() > WAIT {
                return Err(e.into());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
    let file = quote(&format!("{target}/{claim}.txt"));
    let text = format!(
        "{pod} wrote this at {}",
        k8s_openapi::jiff::Timestamp::now()
    );
    // A cloned volume also holds what the replica it was copied from wrote.
    let work = format!(
        "echo 3 > /proc/sys/vm/drop_caches; \
         if [ -e {file} ]; then printf 'found its data: %s' \"$(cat {file})\"; \
         else printf %s {t} > {file} && sync {file} && printf 'wrote: %s' {t}; fi; \
         for g in {dir}/data-*.txt; do [ -e \"$g\" ] && [ \"$g\" != {file} ] && \
         printf '; its volume is a copy holding %s: %s' \"$(basename \"$g\")\" \"$(cat \"$g\")\"; done; true",
        t = quote(&text),
        dir = quote(target),
    );
    let did = node.run_ok(&work, WAIT).await?;
    Ok(format!(
        "{did} (mounted by the Linux kernel NFS client on {})",
        node.name()
    ))
}
