//! localnfs on the test control plane: node agents and controllers as real processes,
//! and a test-kubelet that mounts each pod's volumes over NFS before reporting it Ready.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, Namespace, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use localnfs_testbed::kernel::{KernelNode, TestNetwork, quote};
use localnfs_testbed::{TestCluster, kubelet};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use super::eventually;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use localnfs::scheduler::config::WEBHOOK_CONFIG;

pub const NAMESPACE: &str = "localnfs-system";
/// Where the agents' heartbeat Leases are (the default `--heartbeat-namespace`).
pub const HEARTBEATS: &str = localnfs::objects::agents::HEARTBEAT_NAMESPACE;

/// A running localnfs installation on a test cluster.
pub struct Localnfs {
    pub kubeconfig: PathBuf,
    pub dir: tempfile::TempDir,
    pub agents: BTreeMap<String, Child>,
    /// The kubeconfig each node's agent runs with, when not the cluster admin's
    /// (see [`Localnfs::use_pod_credentials`]).
    pub agent_kubeconfigs: BTreeMap<String, PathBuf>,
    pub controllers: Vec<Child>,
    pub scheduler: Option<Child>,
    /// Admin listeners (`/metrics`): `agent/<node>`, `controller/<index>`, `scheduler`.
    pub admin: BTreeMap<String, SocketAddr>,
}

/// A free TCP port on 127.0.0.1 (for listeners whose address must be known before the
/// process that opens them starts, such as the extender kube-scheduler calls).
pub fn free_port() -> u16 {
    localnfs_testbed::free_port().expect("free port")
}

/// Waits until `node`'s agent has announced itself (its heartbeat Lease exists).
pub async fn wait_for_heartbeat(client: &Client, node: &str) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), HEARTBEATS);
    let name = format!("localnfs-node-{node}");
    eventually(
        &format!("{node} agent heartbeat"),
        Duration::from_secs(90),
        || async { leases.get_opt(&name).await.ok()?.map(|_| ()) },
    )
    .await;
}

/// Writes node `node`'s heartbeat Lease as an agent whose clock reads `renewed` would
/// (no agent runs): `free` bytes free, valid for 3 s after its renewal.
pub async fn fake_heartbeat(leases: &Api<Lease>, node: &str, renewed: Timestamp, free: u64) {
    let name = format!("localnfs-node-{node}");
    let body = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "labels": {"localnfs.io/node": node},
            // A public key (any 32 bytes): the controller places volumes only on
            // agents that publish one.
            "annotations": {"localnfs.io/free-bytes": free.to_string(),
                            "localnfs.io/agent-key": "11".repeat(32)}},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": 3,
            "renewTime": MicroTime(renewed)},
    });
    leases
        .patch(
            &name,
            &PatchParams::apply("test-agent").force(),
            &Patch::Apply(&body),
        )
        .await
        .expect("heartbeat");
}

/// `offset` seconds from now on the test's clock.
pub fn at(offset: i64) -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second() + offset).expect("time")
}

/// Starts `localnfs ARGS` with its admin listener on a free port, recorded in `admin`
/// under `who`.
fn spawn(
    args: &[&str],
    kubeconfig: &Path,
    log: &Path,
    admin: &mut BTreeMap<String, SocketAddr>,
    who: String,
) -> Child {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    admin.insert(who, addr);
    let out = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(env!("CARGO_BIN_EXE_localnfs"))
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--namespace", NAMESPACE, "--admin-addr", &addr.to_string()])
        .env("LOCALNFS_LOG", "info,kube=warn")
        .stdout(Stdio::null())
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .expect("start localnfs")
}

impl Localnfs {
    /// Creates the namespaces; nothing runs yet.
    pub async fn new(cluster: &TestCluster) -> Localnfs {
        let ns: Api<Namespace> = Api::all(cluster.client());
        for name in [NAMESPACE, HEARTBEATS] {
            let body: Namespace =
                serde_json::from_value(json!({"metadata": {"name": name}})).expect("ns");
            ns.create(&PostParams::default(), &body)
                .await
                .expect("create namespace");
        }
        Localnfs {
            kubeconfig: cluster.kubeconfig().to_owned(),
            dir: tempfile::tempdir().expect("tempdir"),
            agents: BTreeMap::new(),
            agent_kubeconfigs: BTreeMap::new(),
            controllers: Vec::new(),
            scheduler: None,
            admin: BTreeMap::new(),
        }
    }

    pub fn root(&self, node: &str) -> PathBuf {
        self.dir.path().join(node)
    }

    /// Registers each `(node, address, capacity)` as a Ready Node and starts its agent
    /// with `--capacity`, then starts the controller.
    pub async fn start_nodes_and_controller(
        &mut self,
        client: &Client,
        nodes: &[(&str, IpAddr, &str)],
    ) {
        for (name, addr, capacity) in nodes {
            kubelet::add_node(client, name, *addr).await.expect("node");
            self.start_agent_with(name, *addr, &["--capacity", capacity]);
        }
        self.start_controller();
    }

    /// Starts (or restarts) the node agent for `node`, serving NFS on `ip`.
    pub fn start_agent(&mut self, node: &str, ip: IpAddr) {
        self.start_agent_with(node, ip, &[]);
    }

    /// Same, with extra flags (e.g. `--capacity 2Gi`).
    pub fn start_agent_with(&mut self, node: &str, ip: IpAddr, extra: &[&str]) {
        // Userspace test clients (libnfs, nfs3_client) bind unreserved source ports.
        let mut all = vec!["--insecure-ports"];
        all.extend_from_slice(extra);
        self.start_agent_args(node, ip, &all);
    }

    /// Starts the agent with exactly these extra flags (the default port check: for
    /// kernel test nodes, whose client uses reserved ports).
    fn start_agent_args(&mut self, node: &str, ip: IpAddr, extra: &[&str]) {
        self.start_agent_on(node, SocketAddr::new(ip, 0), extra);
    }

    /// Starts the agent listening on `listen` (a fixed port: a restarted agent where
    /// its PVs point), with these extra flags.
    pub fn start_agent_on(&mut self, node: &str, listen: SocketAddr, extra: &[&str]) {
        let root = self.root(node);
        let listen = listen.to_string();
        let log = self.dir.path().join(format!("agent-{node}.log"));
        let root = root.to_str().expect("utf8").to_owned();
        let mut args = vec![
            "node",
            "--node-name",
            node,
            "--root",
            &root,
            "--listen",
            &listen,
        ];
        args.extend_from_slice(extra);
        let kubeconfig = self.agent_kubeconfigs.get(node).unwrap_or(&self.kubeconfig);
        let who = format!("agent/{node}");
        let child = spawn(&args, kubeconfig, &log, &mut self.admin, who);
        self.agents.insert(node.to_owned(), child);
    }

    /// From now on, `node`'s agent runs as the install runs it: as the agents' service
    /// account of the shipped RBAC, with a token bound to an agent pod on `node` made
    /// from the DaemonSet template. Returns that pod.
    pub async fn use_pod_credentials(&mut self, client: &Client, node: &str) -> Pod {
        use super::credentials::{agent_pod, agent_token, kubeconfig_with_token};
        let pod = agent_pod(client, &self.kubeconfig, node).await;
        let token = agent_token(client, Some(&pod)).await;
        let path = self.dir.path().join(format!("agent-{node}.kubeconfig"));
        kubeconfig_with_token(&self.kubeconfig, &token, &path);
        self.agent_kubeconfigs.insert(node.to_owned(), path);
        pod
    }

    pub async fn stop_agent(&mut self, node: &str) {
        if let Some(mut c) = self.agents.remove(node) {
            let _ = c.kill().await;
        }
    }

    pub fn start_controller(&mut self) -> usize {
        self.start_controller_with(&[])
    }

    /// Same, with extra flags (e.g. `--agent-grace 1s`).
    pub fn start_controller_with(&mut self, extra: &[&str]) -> usize {
        let log = self
            .dir
            .path()
            .join(format!("controller-{}.log", self.controllers.len()));
        let mut args = vec!["controller"];
        args.extend_from_slice(extra);
        let who = format!("controller/{}", self.controllers.len());
        let child = spawn(&args, &self.kubeconfig, &log, &mut self.admin, who);
        self.controllers.push(child);
        self.controllers.len() - 1
    }

    /// Which of [`Localnfs::controllers`] has process id `pid`.
    pub fn controller_with_pid(&self, pid: u32) -> usize {
        self.controllers
            .iter()
            .position(|c| c.id() == Some(pid))
            .expect("the leader is one of ours")
    }

    pub async fn kill_controller(&mut self, i: usize) {
        let _ = self.controllers[i].kill().await;
    }

    /// Registers the webhook (at `https://127.0.0.1:<webhook_port>/mutate`) and starts
    /// the scheduler helper with its self-managed certificate; returns once the helper
    /// has written its CA into the webhook configuration (and into the agents' write
    /// guard, when the test registered it).
    pub async fn start_scheduler(
        &mut self,
        client: &Client,
        webhook_port: u16,
        extender_port: u16,
    ) {
        let config = localnfs::scheduler::config::webhook_configuration(json!({
            "url": format!("https://127.0.0.1:{webhook_port}/mutate"),
        }))
        .expect("webhook configuration");
        let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        if api.get_opt(WEBHOOK_CONFIG).await.expect("read").is_none() {
            api.create(&PostParams::default(), &config)
                .await
                .expect("create webhook config");
        }
        self.restart_scheduler(webhook_port, extender_port);
        // As a Service in front of it would, the scheduler reaches the helper once it
        // is ready: before its caches are synced it knows no volume to pin a pod to (a
        // fresh-clone CI run scheduled a clone's pod in that window, onto the wrong node).
        self.scheduler_ready().await;
        eventually(
            "the helper's CA in the webhook configuration",
            Duration::from_secs(60),
            || async {
                let c = api.get(WEBHOOK_CONFIG).await.ok()?;
                c.webhooks?
                    .first()?
                    .client_config
                    .ca_bundle
                    .as_ref()
                    .map(|_| ())
            },
        )
        .await;
        let guard: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
        for name in [
            super::credentials::AGENT_GUARD,
            super::credentials::CLAIM_GUARD,
        ] {
            if guard.get_opt(name).await.expect("read").is_some() {
                eventually(
                    &format!("the helper's CA in {name}"),
                    Duration::from_secs(60),
                    || async {
                        super::credentials::validating_trusted(client, name)
                            .await
                            .then_some(())
                    },
                )
                .await;
            }
        }
    }

    /// Waits for the helper's `/readyz`; if it exits or is not ready within 90 s,
    /// fails with the end of its log.
    async fn scheduler_ready(&mut self) {
        let admin = self.admin["scheduler"];
        let start = std::time::Instant::now();
        let why = loop {
            if let Some(status) = self
                .scheduler
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                break format!("exited ({status})");
            }
            if tokio::net::TcpStream::connect(admin).await.is_ok()
                && super::http_get(admin, "/readyz").await.0 == 200
            {
                return;
            }
            if start.elapsed() > Duration::from_secs(90) {
                break "not ready after 90 s".to_owned();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let log =
            std::fs::read_to_string(self.dir.path().join("scheduler.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "the scheduler helper {why}; its log ends:\n{}",
            tail.join("\n")
        );
    }

    /// Starts the helper process (again) on the same ports.
    pub fn restart_scheduler(&mut self, webhook_port: u16, extender_port: u16) {
        let log = self.dir.path().join("scheduler.log");
        let (w, e) = (
            format!("127.0.0.1:{webhook_port}"),
            format!("127.0.0.1:{extender_port}"),
        );
        let args = [
            "scheduler",
            "--webhook-listen",
            &w,
            "--extender-listen",
            &e,
            "--tls-san",
            "127.0.0.1",
        ];
        let child = spawn(
            &args,
            &self.kubeconfig,
            &log,
            &mut self.admin,
            "scheduler".into(),
        );
        self.scheduler = Some(child);
    }

    pub async fn stop_scheduler(&mut self) {
        if let Some(mut c) = self.scheduler.take() {
            let _ = c.kill().await;
        }
    }

    /// Everything the processes logged, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    out.push_str(&format!("--- {}\n", e.path().display()));
                    for l in tail.into_iter().rev() {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }
}

/// What `localnfs status` prints for this cluster.
pub async fn status(kubeconfig: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_localnfs"))
        .args(["status", "--namespace", NAMESPACE, "--kubeconfig"])
        .arg(kubeconfig)
        .output()
        .await
        .expect("run localnfs status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

/// Creates a localnfs StorageClass.
pub async fn storage_class(client: &Client, name: &str, extra: serde_json::Value) {
    let mut body = json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name},
        "provisioner": "localnfs.io/nfs",
        "volumeBindingMode": "WaitForFirstConsumer",
        "allowVolumeExpansion": true,
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let class: StorageClass = serde_json::from_value(body).expect("class");
    Api::<StorageClass>::all(client.clone())
        .create(&PostParams::default(), &class)
        .await
        .expect("create StorageClass");
}

/// What the test-kubelet did for each pod: volume → "wrote" or "found" (data from a
/// previous incarnation was already there).
pub type KubeletLog = Arc<Mutex<BTreeMap<String, Vec<String>>>>;

/// Test nodes that are real kernels (User-Mode Linux), one per Node, on one private
/// network; see `localnfs_testbed::kernel`.
pub struct KernelNodes {
    // Field order matters: the guests stop before their network is removed.
    pub nodes: BTreeMap<String, Arc<KernelNode>>,
    /// Each node's agent address (its first InternalIP, the one PVs point at).
    pub agent_ips: BTreeMap<String, IpAddr>,
    pub net: TestNetwork,
}

impl KernelNodes {
    pub fn node(&self, name: &str) -> &KernelNode {
        &self.nodes[name]
    }

    pub fn agent_ip(&self, name: &str) -> IpAddr {
        self.agent_ips[name]
    }
}

impl Localnfs {
    /// Boots one kernel test node per `(node, capacity)`, registers each as a Ready
    /// Node whose InternalIPs are its agent's address and its kernel's address, starts
    /// each agent on its address with `--capacity`, then the controller.
    pub async fn start_kernel_nodes_and_controller(
        &mut self,
        client: &Client,
        nodes: &[(&str, &str)],
    ) -> KernelNodes {
        let net = TestNetwork::create().expect("test network");
        let guests = futures::future::join_all(
            nodes
                .iter()
                .zip(101u8..)
                .map(|((name, _), host)| KernelNode::boot(&net, name, net.address(host))),
        )
        .await;
        let mut kernel = KernelNodes {
            nodes: BTreeMap::new(),
            agent_ips: BTreeMap::new(),
            net,
        };
        for (((name, capacity), guest), host) in nodes.iter().zip(guests).zip(1u8..) {
            let guest = guest.expect("boot test node");
            let agent_ip = kernel.net.address(host);
            if host > 1 {
                kernel
                    .net
                    .add_host_address(agent_ip)
                    .expect("agent address");
            }
            kubelet::add_node_with_addresses(client, name, &[agent_ip, guest.address()])
                .await
                .expect("node");
            self.start_agent_args(name, agent_ip, &["--capacity", capacity]);
            kernel.nodes.insert(name.to_string(), Arc::new(guest));
            kernel.agent_ips.insert(name.to_string(), agent_ip);
        }
        self.start_controller();
        kernel
    }
}

/// A kubelet stand-in: for each pod scheduled to a node, mounts every PV of the pod
/// inside that node's kernel exactly as kubelet does (`mount -t nfs` with the PV's
/// server, path and mountOptions), retrying a refused mount with a growing pause as
/// kubelet does (for as long as the pod exists, at most [`MOUNT_RETRY_FOR`]), then
/// does the container's work on the mount: reads `<claim>.txt` if it exists (checking
/// its content), else writes and syncs it; then reports the pod Running and Ready. A
/// deleted pod's start is stopped and its mounts unmounted before its deletion is
/// finished.
pub struct NfsKubelet {
    task: JoinHandle<()>,
    pub log: KubeletLog,
    /// Each pod's failed mount attempts: what mount said.
    pub mount_errors: KubeletLog,
}

/// How long the test-kubelet keeps retrying a pod's refused mount.
pub const MOUNT_RETRY_FOR: Duration = Duration::from_secs(300);

impl Drop for NfsKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A pod start under way: stopped by the token, awaited before the pod's unmount.
type Start = (tokio_util::sync::CancellationToken, JoinHandle<()>);

impl NfsKubelet {
    pub fn start(client: Client, namespace: &str, nodes: &KernelNodes) -> Self {
        let log: KubeletLog = Arc::default();
        let mount_errors: KubeletLog = Arc::default();
        let ns = namespace.to_owned();
        let (record, errors) = (log.clone(), mount_errors.clone());
        let guests = nodes.nodes.clone();
        let task = tokio::spawn(async move {
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let mut events = watcher(pods, watcher::Config::default())
                .applied_objects()
                .boxed();
            // Pods whose start is under way or done: one mount per pod and volume.
            let mut started: BTreeMap<String, Start> = BTreeMap::new();
            let mut deleting = std::collections::BTreeSet::new();
            while let Some(Ok(pod)) = events.next().await {
                let node = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .and_then(|n| guests.get(n))
                    .cloned();
                let uid = pod.uid().unwrap_or_default();
                if pod.metadata.deletion_timestamp.is_some() {
                    if !deleting.insert(uid.clone()) {
                        continue;
                    }
                    let start = started.remove(&uid);
                    let client = client.clone();
                    tokio::spawn(async move {
                        if let Some((stop, task)) = start {
                            stop.cancel();
                            let _ = task.await;
                        }
                        if let Some(node) = &node {
                            let umount = format!(
                                "for m in /mnt/pods/{uid}/*; do [ -d \"$m\" ] && umount \"$m\"; done; true"
                            );
                            if let Err(e) = node.run_ok(&umount, Duration::from_secs(60)).await {
                                eprintln!("test-kubelet: unmounting pod {}: {e}", pod.name_any());
                            }
                        }
                        let _ = kubelet::finish_pod_deletion(&client, &pod).await;
                    });
                    continue;
                }
                let Some(node) = node else { continue };
                if kubelet::is_running_and_ready(&pod) || started.contains_key(&uid) {
                    continue;
                }
                let (client, ns, record, errors) =
                    (client.clone(), ns.clone(), record.clone(), errors.clone());
                let stop = tokio_util::sync::CancellationToken::new();
                let cancelled = stop.clone();
                let task = tokio::spawn(async move {
                    let name = pod.name_any();
                    match start_pod(&client, &ns, &pod, &node, &cancelled, &errors).await {
                        Ok(done) => {
                            record.lock().expect("log").insert(name.clone(), done);
                            if let Err(e) = kubelet::mark_pod_ready(&client, &ns, &name).await {
                                eprintln!("test-kubelet: {e}");
                            }
                        }
                        Err(e) => eprintln!("test-kubelet: pod {name}: {e}"),
                    }
                });
                started.insert(uid, (stop, task));
            }
        });
        Self {
            task,
            log,
            mount_errors,
        }
    }

    /// The failed mount attempts of `pod` so far.
    pub fn mount_errors_of(&self, pod: &str) -> Vec<String> {
        self.mount_errors
            .lock()
            .expect("log")
            .get(pod)
            .cloned()
            .unwrap_or_default()
    }
}

/// The NFS server and port a PV points at.
pub fn nfs_target(pv: &PersistentVolume) -> (IpAddr, u16, String) {
    let spec = pv.spec.as_ref().expect("spec");
    let nfs = spec.nfs.as_ref().expect("nfs source");
    let port = spec
        .mount_options
        .iter()
        .flatten()
        .find_map(|o| o.strip_prefix("port="))
        .and_then(|p| p.parse().ok())
        .unwrap_or(2049);
    (
        nfs.server.parse().expect("server ip"),
        port,
        nfs.path.trim_start_matches('/').to_owned(),
    )
}

/// Where the test-kubelet mounts a pod's volume inside its node.
pub fn pod_mount(pod_uid: &str, volume: &str) -> String {
    format!("/mnt/pods/{pod_uid}/{volume}")
}

async fn start_pod(
    client: &Client,
    ns: &str,
    pod: &Pod,
    node: &KernelNode,
    stop: &tokio_util::sync::CancellationToken,
    errors: &KubeletLog,
) -> Result<Vec<String>, String> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let uid = pod.uid().ok_or("pod without uid")?;
    let mut done = Vec::new();
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for v in volumes {
        let Some(claim) = v.persistent_volume_claim.map(|c| c.claim_name) else {
            continue;
        };
        // The scheduler only binds pods whose claims are bound; still, wait briefly.
        let mut pv_name = None;
        for _ in 0..100 {
            let c = claims.get(&claim).await.map_err(|e| e.to_string())?;
            if let Some(n) = c.spec.and_then(|s| s.volume_name) {
                pv_name = Some(n);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pv = pvs
            .get(&pv_name.ok_or("claim never bound")?)
            .await
            .map_err(|e| e.to_string())?;
        let target = pod_mount(&uid, &v.name);
        // As kubelet: a refused mount is tried again, pausing longer each time.
        let deadline = tokio::time::Instant::now() + MOUNT_RETRY_FOR;
        let mut pause = Duration::from_millis(250);
        loop {
            if stop.is_cancelled() {
                return Err("pod deleted while starting".into());
            }
            match node.mount_pv(&pv, &target).await {
                Ok(()) => break,
                Err(e) => {
                    errors
                        .lock()
                        .expect("log")
                        .entry(pod.name_any())
                        .or_default()
                        .push(e.to_string());
                    if tokio::time::Instant::now() >= deadline {
                        return Err(format!("mount still refused: {e}"));
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(2));
        }
        if stop.is_cancelled() {
            // Mounted after all; the deletion's unmount runs once this returns.
            return Err("pod deleted while starting".into());
        }
        let file = quote(&format!("{target}/{claim}.txt"));
        let work = format!(
            // From the server, not from a cache of an earlier mount of the same export.
            "echo 3 > /proc/sys/vm/drop_caches; if [ -e {file} ]; then echo found; cat {file}; \
             else printf %s {c} > {file} && sync {file} && echo wrote; fi",
            c = quote(&claim),
        );
        let out = node
            .run_ok(&work, Duration::from_secs(60))
            .await
            .map_err(|e| e.to_string())?;
        let state = match out.split_once('\n') {
            Some(("found", data)) if data == claim => "found",
            Some(("found", data)) => return Err(format!("{claim}.txt holds {data:?}")),
            _ => "wrote",
        };
        done.push(format!("{claim}:{state}"));
    }
    Ok(done)
}

/// Creates pod `name` in `default` bound to `node` (no scheduler, no kubelet needed:
/// the controller publishes the claims' volumes to its node) using `claims`.
pub async fn pod_on(client: &Client, name: &str, node: &str, claims: &[&str]) -> Pod {
    let volumes: Vec<_> = claims
        .iter()
        .map(|c| json!({"name": c, "persistentVolumeClaim": {"claimName": c}}))
        .collect();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "c"}],
                 "volumes": volumes},
    }))
    .expect("pod");
    Api::<Pod>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod")
}

/// Deletes pod `name` in `default` at once (as a kubelet finishing its deletion).
pub async fn delete_pod_now(client: &Client, name: &str) {
    let params = kube::api::DeleteParams {
        grace_period_seconds: Some(0),
        ..kube::api::DeleteParams::default()
    };
    Api::<Pod>::namespaced(client.clone(), "default")
        .delete(name, &params)
        .await
        .expect("delete pod");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    eventually(
        &format!("pod {name} gone"),
        Duration::from_secs(60),
        || async { pods.get_opt(name).await.ok()?.is_none().then_some(()) },
    )
    .await;
}

/// The nodes PV `pv` is published to (`None`: no annotation).
pub async fn published(client: &Client, pv: &str) -> Option<Vec<String>> {
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get(pv)
        .await
        .expect("read PV");
    let value = pv
        .annotations()
        .get(localnfs::objects::keys::PUBLISHED_NODES)?;
    Some(localnfs::objects::published::parse(value).expect("annotation"))
}

/// Waits (90 s at most) until PV `pv` is published to exactly `nodes`.
pub async fn wait_published(client: &Client, pv: &str, nodes: &[&str]) {
    let want: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
    eventually(
        &format!("PV {pv} published to {nodes:?}"),
        Duration::from_secs(90),
        || async { (published(client, pv).await.as_ref() == Some(&want)).then_some(()) },
    )
    .await;
}

/// A claim in `default` of `class` asking for `size`; `extra` is merged into its spec.
pub fn claim(
    name: &str,
    class: &str,
    size: &str,
    extra: serde_json::Value,
) -> PersistentVolumeClaim {
    let mut spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": class,
        "resources": {"requests": {"storage": size}},
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("claim")
}

/// Creates claim `name` (1Mi) of class `now` in `default`, waits for its PV and writes
/// `rows` into a file `precious` in the volume's directory on node-1; returns the PV
/// and the file.
pub async fn claim_with_data(
    client: &Client,
    lnfs: &Localnfs,
    name: &str,
) -> (PersistentVolume, PathBuf) {
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .create(
            &PostParams::default(),
            &claim(name, "now", "1Mi", json!({})),
        )
        .await
        .expect("create claim");
    let pv = bound_pv(client, name).await;
    let file = lnfs
        .root("node-1")
        .join("volumes")
        .join(nfs_target(&pv).2)
        .join("precious");
    std::fs::write(&file, b"rows").expect("write data");
    (pv, file)
}

/// Waits (90 s at most) for claim `name` in `default` to be Bound; returns its PV.
pub async fn bound_pv(client: &Client, name: &str) -> PersistentVolume {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv_name = eventually(
        &format!("{name} Bound"),
        Duration::from_secs(90),
        || async {
            let c = claims.get(name).await.ok()?;
            if c.status.as_ref()?.phase.as_deref()? != "Bound" {
                return None;
            }
            c.spec?.volume_name
        },
    )
    .await;
    pvs.get(&pv_name).await.expect("pv")
}

/// Waits (90 s at most) until PV `name` no longer exists (reclaimed and let go).
pub async fn wait_pv_gone(client: &Client, name: &str) {
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    eventually(
        &format!("PV {name} gone"),
        Duration::from_secs(90),
        || async { pvs.get_opt(name).await.ok()?.is_none().then_some(()) },
    )
    .await;
}

/// Events about an object in `default`: (reason, message).
pub async fn events(client: &Client, name: &str) -> Vec<(String, String)> {
    events_in(client, "default", name).await
}

/// Events about a PV (they live in `kube-system`): (reason, message).
pub async fn pv_events(client: &Client, name: &str) -> Vec<(String, String)> {
    events_in(client, "kube-system", name).await
}

async fn events_in(client: &Client, ns: &str, name: &str) -> Vec<(String, String)> {
    let evs: Api<Event> = Api::namespaced(client.clone(), ns);
    evs.list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|e| e.involved_object.name.as_deref() == Some(name))
                .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
}

/// The volume directories on `node`'s disk.
pub fn volume_dirs(lnfs: &Localnfs, node: &str) -> Vec<String> {
    std::fs::read_dir(lnfs.root(node).join("volumes"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A test control plane with `nodes` (see [`Localnfs::start_nodes_and_controller`]).
pub async fn start_localnfs(nodes: &[(&str, IpAddr, &str)]) -> (TestCluster, Localnfs) {
    let cluster = TestCluster::start().await.expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    lnfs.start_nodes_and_controller(&client, nodes).await;
    (cluster, lnfs)
}

/// The identity holding the controllers' leader Lease, if any.
pub async fn leader_holder(client: &Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), NAMESPACE)
        .get_opt("localnfs-controller")
        .await
        .ok()??
        .spec?
        .holder_identity
}

/// Waits for a leader; returns its identity and PID (test identities end in the PID).
pub async fn wait_for_leader(client: &Client) -> (String, u32) {
    let id = eventually("a leader", Duration::from_secs(120), || {
        leader_holder(client)
    })
    .await;
    let pid = id
        .rsplit('-')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("identity ends in the pid");
    (id, pid)
}

/// Waits (120 s at most) for an event `reason` on claim `ns/name` whose message
/// contains `words`; returns the message.
pub async fn event_saying(
    client: &Client,
    ns: &str,
    name: &str,
    reason: &str,
    words: &str,
) -> String {
    let evs: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("{reason} event on {ns}/{name} saying {words:?}"),
        Duration::from_secs(120),
        || async {
            let list = evs.list(&Default::default()).await.ok()?;
            list.items
                .into_iter()
                .filter(|e| e.involved_object.name.as_deref() == Some(name))
                .filter(|e| e.reason.as_deref() == Some(reason))
                .filter_map(|e| e.message)
                .find(|m| m.contains(words))
        },
    )
    .await
}

/// Creates `pvc` (in `default` unless it names a namespace).
pub async fn create_claim(client: &Client, pvc: &PersistentVolumeClaim) -> PersistentVolumeClaim {
    let ns = pvc.namespace().unwrap_or_else(|| "default".into());
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), pvc)
        .await
        .expect("create claim")
}

/// The claim spec fields of a clone of claim `source`.
pub fn clone_of(source: &str) -> serde_json::Value {
    json!({"dataSource": {"kind": "PersistentVolumeClaim", "name": source}})
}
