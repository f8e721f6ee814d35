//! A real Kubernetes control plane for tests and the demo: etcd (Debian `etcd-server`),
//! kube-apiserver, kube-controller-manager and kube-scheduler v1.20.2, each on free
//! 127.0.0.1 ports in a private temporary directory. [`TestCluster::start`] returns once
//! the API answers, the scheduler is healthy and the `default` service account has its
//! token (pods are refused before that). Dropping the cluster kills every process by PID
//! and removes the directory; several clusters can run side by side.
//!
//! There is no kubelet: [`kubelet`] has the helpers a test uses to play one (Ready
//! Nodes, Running and Ready pods).
//!
//! Binaries: `LOCALNFS_K8S_BIN_DIR`, else `~/.cache/localnfs/k8s-1.20.2/bin`, filled by
//! `scripts/k8s-binaries`. Set `LOCALNFS_KEEP_CLUSTER_DIR=1` to keep the logs.

pub mod error;
mod process;

pub mod kernel;
pub mod kubelet;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{Api, Client};
use tracing::instrument::WithSubscriber;

pub use self::process::Process;
pub use crate::error::{Error, Result};

/// The Kubernetes version these binaries are.
pub const K8S_VERSION: &str = "v1.20.2";

/// How long each phase of start-up may take on a loaded 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Attempts at start-up: a free port picked by us can be taken by another test between
/// our probe and the component's bind; we then start again on new ports.
const START_ATTEMPTS: usize = 3;

/// Where the cached Kubernetes binaries are looked for.
pub fn default_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LOCALNFS_K8S_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    cache.join("localnfs/k8s-1.20.2/bin")
}

/// Options for [`TestCluster::start_with`].
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Directory holding kube-apiserver, kube-controller-manager and kube-scheduler.
    pub bin_dir: PathBuf,
    /// Extra entries for the scheduler configuration's `extenders:` list, as JSON.
    pub scheduler_extenders: Vec<serde_json::Value>,
    /// Extra kube-controller-manager flags (e.g. `--kube-api-qps=200`).
    pub controller_manager_args: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            bin_dir: default_bin_dir(),
            scheduler_extenders: Vec::new(),
            controller_manager_args: Vec::new(),
        }
    }
}

/// A running control plane. Drop it to tear everything down.
pub struct TestCluster {
    // Field order matters: processes die before their directory is removed.
    processes: Vec<Process>,
    client: Client,
    kubeconfig: PathBuf,
    api_url: String,
    startup: Vec<(&'static str, Duration)>,
    dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts a control plane with default options.
    pub async fn start() -> Result<Self> {
        Self::start_with(ClusterOptions::default()).await
    }

    /// Starts a control plane, retrying on new ports if a component dies at start-up.
    pub async fn start_with(opts: ClusterOptions) -> Result<Self> {
        let bins = Binaries::locate(&opts.bin_dir)?;
        let mut last = None;
        for attempt in 1..=START_ATTEMPTS {
            match Self::start_once(&bins, &opts).await {
                Ok(cluster) => return Ok(cluster),
                Err(e @ Error::ProcessExited { .. }) => {
                    tracing::warn!(attempt, error = %e, "control plane start failed; retrying");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Timeout {
            what: "control plane start".into(),
            after: START_TIMEOUT,
        }))
    }

    async fn start_once(bins: &Binaries, opts: &ClusterOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("localnfs-cluster-")
            .tempdir()
            .map_err(|source| Error::PrepareTestDir {
                path: std::env::temp_dir(),
                source,
            })?;
        let root = dir.path().to_owned();
        let io = |source| Error::PrepareTestDir {
            path: root.clone(),
            source,
        };
        let etcd_port = free_port().map_err(io)?;
        let etcd_peer_port = free_port().map_err(io)?;
        let api_port = free_port().map_err(io)?;
        let sched_port = free_port().map_err(io)?;
        let token = random_hex(16).map_err(io)?;
        let sa_key = root.join("sa.key");
        generate_rsa_key(&sa_key)?;
        std::fs::write(
            root.join("tokens.csv"),
            format!("{token},admin,admin,system:masters\n"),
        )
        .map_err(io)?;

        let begin = Instant::now();
        let mut startup = Vec::new();
        let mut processes = Vec::new();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        processes.push(Process::spawn(
            "etcd",
            Command::new(&bins.etcd)
                .arg("--data-dir")
                .arg(root.join("etcd"))
                .args(["--listen-client-urls", &etcd_url])
                .args(["--advertise-client-urls", &etcd_url])
                .arg(format!(
                    "--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}"
                ))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}"
                ))
                .arg(format!(
                    "--initial-cluster=default=http://127.0.0.1:{etcd_peer_port}"
                ))
                .args(["--log-level", "warn"]),
            &root.join("etcd.log"),
        )?);

        let cert_dir = root.join("certs");
        processes.push(Process::spawn(
            "kube-apiserver",
            Command::new(bins.k8s("kube-apiserver"))
                .arg(format!("--etcd-servers={etcd_url}"))
                .arg(format!("--secure-port={api_port}"))
                .arg("--bind-address=127.0.0.1")
                .arg("--advertise-address=127.0.0.1")
                .arg(format!("--cert-dir={}", cert_dir.display()))
                .arg(format!(
                    "--token-auth-file={}",
                    root.join("tokens.csv").display()
                ))
                .arg("--authorization-mode=RBAC")
                .arg("--service-account-issuer=https://kubernetes.default.svc")
                .arg(format!("--service-account-key-file={}", sa_key.display()))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    sa_key.display()
                ))
                .arg("--service-cluster-ip-range=10.0.0.0/24")
                .arg("--allow-privileged=true")
                .arg("--v=1"),
            &root.join("kube-apiserver.log"),
        )?);

        let api_url = format!("https://127.0.0.1:{api_port}");
        let ca = cert_dir.join("apiserver.crt");
        wait_for("kube-apiserver certificate", &mut processes, || async {
            Ok(ca.exists())
        })
        .await?;
        let kubeconfig = root.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &api_url, &ca, &token).map_err(io)?;
        let client = client_from_kubeconfig(&kubeconfig).await?;
        wait_for("kube-apiserver /readyz", &mut processes, || async {
            Ok(api_ready(&client).await)
        })
        .await?;
        startup.push(("kube-apiserver ready", begin.elapsed()));

        processes.push(Process::spawn(
            "kube-controller-manager",
            Command::new(bins.k8s("kube-controller-manager"))
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg(
                    "--controllers=persistentvolume-binder,persistentvolume-expander,\
                     statefulset,garbagecollector,serviceaccount,serviceaccount-token,\
                     pvc-protection,pv-protection",
                )
                .arg(format!(
                    "--service-account-private-key-file={}",
                    sa_key.display()
                ))
                .arg(format!("--root-ca-file={}", ca.display()))
                .arg("--leader-elect=false")
                .arg("--port=0")
                .arg("--secure-port=0")
                .arg("--v=1")
                .args(&opts.controller_manager_args),
            &root.join("kube-controller-manager.log"),
        )?);

        let sched_config = root.join("scheduler.json");
        write_scheduler_config(&sched_config, &kubeconfig, sched_port, opts).map_err(io)?;
        processes.push(Process::spawn(
            "kube-scheduler",
            Command::new(bins.k8s("kube-scheduler"))
                .arg(format!("--config={}", sched_config.display()))
                .arg("--secure-port=0")
                .arg("--v=1"),
            &root.join("kube-scheduler.log"),
        )?);

        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        wait_for(
            "the default service account token",
            &mut processes,
            || async {
                Ok(accounts
                    .get_opt("default")
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|sa| sa.secrets.is_some_and(|s| !s.is_empty())))
            },
        )
        .await?;
        startup.push(("service account token", begin.elapsed()));
        wait_for("kube-scheduler /healthz", &mut processes, || async {
            Ok(http_get_ok(sched_port).await)
        })
        .await?;
        startup.push(("all ready", begin.elapsed()));

        let dir = if std::env::var_os("LOCALNFS_KEEP_CLUSTER_DIR").is_some() {
            tracing::info!(dir = %root.display(), "keeping cluster directory");
            let mut d = dir;
            d.disable_cleanup(true);
            d
        } else {
            dir
        };
        Ok(Self {
            processes,
            client,
            kubeconfig,
            api_url,
            startup,
            dir,
        })
    }

    /// A client with cluster-admin rights.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A kubeconfig file (cluster-admin) for this cluster, usable by kubectl.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`.
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// The cluster's private directory (logs, certificates, etcd data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Time from the first process start to each start-up milestone, last one
    /// "all ready".
    pub fn startup_phases(&self) -> &[(&'static str, Duration)] {
        &self.startup
    }

    /// The running components.
    pub fn processes(&self) -> &[Process] {
        &self.processes
    }

    /// Kills one component (`"kube-apiserver"`, `"kube-controller-manager"`, ...) with
    /// SIGKILL and starts it again; for the apiserver, waits until it is ready.
    pub async fn restart(&mut self, name: &str) -> Result<()> {
        let p = self
            .processes
            .iter_mut()
            .find(|p| p.name() == name)
            .ok_or_else(|| Error::Timeout {
                what: format!("a component called {name}"),
                after: Duration::ZERO,
            })?;
        p.restart()?;
        if name == "kube-apiserver" {
            let client = self.client.clone();
            wait_for("kube-apiserver /readyz", &mut self.processes, || async {
                Ok(api_ready(&client).await)
            })
            .await?;
        }
        Ok(())
    }

    /// Stops every component (SIGTERM, then SIGKILL) and removes the directory.
    pub fn stop(mut self) {
        // Reverse start order: clients of the apiserver first, etcd last.
        for p in self.processes.iter_mut().rev() {
            p.stop(Duration::from_secs(5));
        }
    }
}

/// Programs the control plane runs.
struct Binaries {
    etcd: PathBuf,
    k8s_dir: PathBuf,
}

impl Binaries {
    fn locate(k8s_dir: &Path) -> Result<Self> {
        for name in [
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ] {
            if !k8s_dir.join(name).is_file() {
                return Err(Error::MissingTestBinaries {
                    dir: k8s_dir.to_owned(),
                });
            }
        }
        let etcd = find_on_path("etcd").ok_or(Error::MissingProgram {
            program: "etcd",
            hint: "apt-get install etcd-server",
        })?;
        if find_on_path("openssl").is_none() {
            return Err(Error::MissingProgram {
                program: "openssl",
                hint: "apt-get install openssl",
            });
        }
        Ok(Self {
            etcd,
            k8s_dir: k8s_dir.to_owned(),
        })
    }

    fn k8s(&self, name: &str) -> PathBuf {
        self.k8s_dir.join(name)
    }
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// A port that was free a moment ago on 127.0.0.1.
/// A free TCP port on 127.0.0.1, for listeners whose address must be known before the
/// process that opens them starts.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn random_hex(bytes: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The service-account signing key. kube-apiserver cannot make one itself.
fn generate_rsa_key(path: &Path) -> Result<()> {
    let out = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(path)
        .arg("2048")
        .output()
        .map_err(|source| Error::SpawnProcess {
            name: "openssl genrsa".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::ProcessExited {
            name: "openssl genrsa".into(),
            status: out.status.to_string(),
            log: path.to_owned(),
            tail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

/// Kubeconfig as JSON (which is YAML), trusting the apiserver's self-signed chain.
fn write_kubeconfig(path: &Path, server: &str, ca: &Path, token: &str) -> std::io::Result<()> {
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "localnfs-test", "cluster": {
            "server": server,
            "certificate-authority": ca,
        }}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "localnfs-test", "context": {
            "cluster": "localnfs-test", "user": "admin", "namespace": "default",
        }}],
        "current-context": "localnfs-test",
    });
    std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
}

fn write_scheduler_config(
    path: &Path,
    kubeconfig: &Path,
    port: u16,
    opts: &ClusterOptions,
) -> std::io::Result<()> {
    // healthz and metrics must not default to 0.0.0.0:10251, or parallel clusters clash.
    let doc = serde_json::json!({
        "apiVersion": "kubescheduler.config.k8s.io/v1beta1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": {"kubeconfig": kubeconfig},
        "leaderElection": {"leaderElect": false},
        "healthzBindAddress": format!("127.0.0.1:{port}"),
        "metricsBindAddress": format!("127.0.0.1:{port}"),
        "extenders": opts.scheduler_extenders,
    });
    std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
}

/// A client built from a kubeconfig file, the way every localnfs component builds one
/// when run outside a cluster.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let read_error = |source| Error::ReadKubeconfig {
        path: path.to_owned(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(read_error)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(read_error)?;
    Client::try_from(config).map_err(Error::BuildClient)
}

/// Polls `check` until it is true, failing early if a component dies; returns how long
/// it waited.
async fn wait_for<F, Fut>(what: &str, processes: &mut [Process], mut check: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    loop {
        for p in processes.iter_mut() {
            p.ensure_running()?;
        }
        if check().await? {
            tracing::debug!(what, elapsed = ?start.elapsed(), "ready");
            return Ok(start.elapsed());
        }
        if start.elapsed() > START_TIMEOUT {
            return Err(Error::Timeout {
                what: what.to_owned(),
                after: START_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /readyz` answers "ok". Every 500 before readiness would be logged as an error
/// by the client; they are expected here, so this probe logs nothing.
async fn api_ready(client: &Client) -> bool {
    match http::Request::get("/readyz").body(Vec::new()) {
        Ok(req) => client
            .request_text(req)
            .with_subscriber(tracing::subscriber::NoSubscriber::default())
            .await
            .is_ok_and(|t| t == "ok"),
        Err(_) => false,
    }
}

/// `GET /healthz` on a plain-HTTP port answers 200.
async fn http_get_ok(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let req = "GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    buf[..n].starts_with(b"HTTP/1.0 200") || buf[..n].starts_with(b"HTTP/1.1 200")
}
