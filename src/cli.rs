//! Command-line interface. Every flag has an environment fallback (`LOCALNFS_*`) so the
//! same binary is configured by flags on a laptop and by env in a Pod spec. Values are
//! typed (addresses, paths, durations) and validated once, here, at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::nfs::Network;
use crate::objects::class::{parse_squash, quantity_bytes};
use crate::telemetry::LogFormat;
use crate::volume::parse_mode;
use crate::volume::{Squash, VolumeName};

/// localnfs: local disks served as NFSv3 PersistentVolumes for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "localnfs", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub telemetry: TelemetryArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// Logging flags shared by every subcommand.
#[derive(Debug, Args)]
pub struct TelemetryArgs {
    /// Log line format.
    #[arg(
        long,
        env = "LOCALNFS_LOG_FORMAT",
        value_enum,
        default_value_t,
        global = true
    )]
    pub log_format: LogFormat,

    /// Log filter, `RUST_LOG` syntax (e.g. `info,localnfs=debug`).
    #[arg(
        long = "log",
        env = "LOCALNFS_LOG",
        default_value = "info",
        global = true
    )]
    pub log_filter: String,
}

/// The admin listener (`/healthz`, `/readyz`, `/metrics`).
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Address for the admin HTTP listener; port 0 picks a free one.
    #[arg(long, env = "LOCALNFS_ADMIN_ADDR", default_value = "127.0.0.1:9808")]
    pub admin_addr: SocketAddr,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole flow on an embedded single-node test cluster.
    Demo(DemoArgs),
    /// Node agent: serve this node's volumes over NFSv3.
    Node(NodeArgs),
    /// Create, resize, delete or list volumes in a node root (standalone mode).
    Volume(VolumeArgs),
    /// Provisioner: turn claims of localnfs classes into volumes and PVs.
    Controller(ControllerArgs),
    /// Scheduler helper: admission webhook (node affinity) and scheduler extender.
    Scheduler(SchedulerArgs),
    /// Show the volumes of each node (size, used, claim, phase) as a table.
    Status(StatusArgs),
}

/// How to reach the API server.
#[derive(Debug, Args)]
pub struct KubeArgs {
    /// kubeconfig file; without it, the in-cluster service account (or
    /// `$KUBECONFIG`, `~/.kube/config`).
    #[arg(long, env = "LOCALNFS_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Client-side limit on API requests per second (average; watches count once per
    /// connection); 0: none. Default per command: controller 1000, scheduler helper
    /// 20, node agent 100, status 20.
    #[arg(long, env = "LOCALNFS_KUBE_QPS")]
    pub kube_qps: Option<f64>,

    /// Requests that may be sent at once above `--kube-qps`. Default per command:
    /// controller 2000, scheduler helper 40, node agent 200, status 40.
    #[arg(long, env = "LOCALNFS_KUBE_BURST")]
    pub kube_burst: Option<u32>,
}

impl KubeArgs {
    /// The request rate these flags ask for, `default` for what they leave out.
    pub fn rate(&self, default: crate::kubeclient::Rate) -> crate::kubeclient::Rate {
        crate::kubeclient::Rate {
            qps: self.kube_qps.unwrap_or(default.qps),
            burst: self.kube_burst.unwrap_or(default.burst),
        }
    }
}

/// Which localnfs installation a cluster-side command works for.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// The `provisioner` name of the StorageClasses (and PVs) that are ours.
    #[arg(long, env = "LOCALNFS_PROVISIONER", default_value = "localnfs.io/nfs")]
    pub provisioner_name: String,

    /// localnfs's namespace: the controller's leader Lease, the scheduler helper's
    /// certificate Secret, the agents' pods.
    #[arg(long, env = "LOCALNFS_NAMESPACE", default_value = "localnfs-system")]
    pub namespace: String,

    #[command(flatten)]
    pub heartbeats: HeartbeatArgs,
}

/// Where the node agents' heartbeat Leases live.
#[derive(Debug, Args)]
pub struct HeartbeatArgs {
    /// Namespace of the node agents' heartbeat Leases, and nothing else: the agents
    /// may write Leases there only, so they can never touch the controller's leader
    /// Lease in `--namespace`, and the write guard's webhook on Leases is never
    /// called for it.
    #[arg(
        long,
        env = "LOCALNFS_HEARTBEAT_NAMESPACE",
        default_value = crate::objects::agents::HEARTBEAT_NAMESPACE
    )]
    pub heartbeat_namespace: String,
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub admin: AdminArgs,

    #[command(flatten)]
    pub kube: KubeArgs,

    #[command(flatten)]
    pub install: InstallArgs,

    /// This replica's name in leader election (default: hostname-pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// How long past its heartbeat lease a node agent may stay silent before the
    /// controller stops waiting for it: a claim placed there but not yet created is
    /// placed again, a claim deleted meanwhile is let go (its volume left on the node).
    #[arg(long, env = "LOCALNFS_AGENT_GRACE", default_value = "60s", value_parser = parse_duration)]
    pub agent_grace: Duration,

    /// How long a VolumeBackup may stay without any node agent taking it up before
    /// the controller looks at its claim and, if no agent can run it (claim missing,
    /// not Bound, or not a localnfs volume), marks it Failed.
    #[arg(long, env = "LOCALNFS_BACKUP_GRACE", default_value = "120s", value_parser = parse_duration)]
    pub backup_grace: Duration,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub kube: KubeArgs,

    #[command(flatten)]
    pub install: InstallArgs,
}

#[derive(Debug, Args)]
pub struct SchedulerArgs {
    #[command(flatten)]
    pub admin: AdminArgs,

    #[command(flatten)]
    pub kube: KubeArgs,

    #[command(flatten)]
    pub install: InstallArgs,

    /// HTTPS listener for the admission webhook (`/mutate`; extender routes too).
    #[arg(long, env = "LOCALNFS_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub webhook_listen: SocketAddr,

    /// Plain-HTTP listener for kube-scheduler's extender calls (`/filter`,
    /// `/prioritize`).
    #[arg(long, env = "LOCALNFS_EXTENDER_LISTEN", default_value = "0.0.0.0:8099")]
    pub extender_listen: SocketAddr,

    /// Serving certificate (PEM) for the webhook, e.g. from cert-manager; re-read every
    /// 6 hours. Without it the helper manages its own certificate in a Secret.
    #[arg(long, env = "LOCALNFS_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// Private key (PEM) for `--tls-cert-file`.
    #[arg(long, env = "LOCALNFS_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// Secret (in `--namespace`) holding the self-managed CA and serving certificate.
    #[arg(
        long,
        env = "LOCALNFS_TLS_SECRET",
        default_value = "localnfs-scheduler-tls"
    )]
    pub tls_secret: String,

    /// The webhook Service's name; the certificate covers its DNS names.
    #[arg(
        long,
        env = "LOCALNFS_SERVICE_NAME",
        default_value = "localnfs-scheduler"
    )]
    pub service_name: String,

    /// Extra certificate names (DNS names or IP addresses); repeatable.
    #[arg(long = "tls-san", env = "LOCALNFS_TLS_SANS", value_delimiter = ',')]
    pub tls_san: Vec<String>,

    /// MutatingWebhookConfiguration whose `caBundle` the helper fills in with its CA
    /// (self-managed certificate only); empty: leave it to someone else.
    #[arg(
        long,
        env = "LOCALNFS_WEBHOOK_CONFIG",
        default_value = "localnfs-scheduler"
    )]
    pub webhook_config: String,

    /// ValidatingWebhookConfiguration (the node agents' write guard, `/validate`)
    /// whose `caBundle` the helper fills in with its CA (self-managed certificate only);
    /// empty: leave it to someone else.
    #[arg(
        long,
        env = "LOCALNFS_AGENT_WEBHOOK_CONFIG",
        default_value = "localnfs-agents"
    )]
    pub agent_webhook_config: String,

    /// ValidatingWebhookConfiguration (localnfs's keys on claims, `/validate-claims`)
    /// whose `caBundle` the helper fills in with its CA (self-managed certificate
    /// only); empty: leave it to someone else.
    #[arg(
        long,
        env = "LOCALNFS_CLAIM_WEBHOOK_CONFIG",
        default_value = "localnfs-claims"
    )]
    pub claim_webhook_config: String,

    /// The controller's service account (in `--namespace`): with the agents', the
    /// only writer of localnfs's keys on claims that `/validate-claims` allows.
    #[arg(
        long,
        env = "LOCALNFS_CONTROLLER_SERVICE_ACCOUNT",
        default_value = "localnfs-controller"
    )]
    pub controller_service_account: String,

    /// The node agents' service account (in `--namespace`): its writes are held to
    /// the agent's own node by `/validate`.
    #[arg(
        long,
        env = "LOCALNFS_NODE_SERVICE_ACCOUNT",
        default_value = "localnfs-node"
    )]
    pub node_service_account: String,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub admin: AdminArgs,

    /// Directory holding volumes/, meta/ and the node key.
    #[arg(long, env = "LOCALNFS_ROOT", default_value = "/var/lib/localnfs")]
    pub root: PathBuf,

    /// NFS + MOUNT listen address (one port for both; port 0 picks a free one).
    #[arg(long, env = "LOCALNFS_NFS_ADDR", default_value = "0.0.0.0:2049")]
    pub listen: SocketAddr,

    /// Port of the peer channel on the `--listen` address, where other node agents
    /// fetch cross-node clones (TLS, agents only; see docs/security.md). Default: the
    /// NFS port + 1 (a free port when the NFS port is 0).
    #[arg(long, env = "LOCALNFS_PEER_PORT")]
    pub peer_port: Option<u16>,

    /// Client networks allowed to connect (CIDR, comma-separated or repeated); anyone
    /// else is disconnected before any RPC is read.
    #[arg(
        long,
        env = "LOCALNFS_ALLOW",
        value_delimiter = ',',
        default_value = "127.0.0.0/8"
    )]
    pub allow: Vec<Network>,

    /// Most NFS connections served at once; more wait in the accept backlog. Lowered
    /// at start to a quarter of the descriptors the open-file limit leaves (logged), so
    /// connections never take the descriptors calls need.
    #[arg(long, env = "LOCALNFS_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// An NFS connection with no call in flight and nothing received for this long is
    /// closed (clients reconnect on their next call).
    #[arg(long, env = "LOCALNFS_IDLE_TIMEOUT", value_parser = parse_duration, default_value = "6m")]
    pub idle_timeout: Duration,

    /// An RPC record must arrive whole within this long of its first byte, else the
    /// connection is closed.
    #[arg(long, env = "LOCALNFS_RECORD_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub record_timeout: Duration,

    /// A reply must be taken by the client within this long, else the connection is
    /// closed.
    #[arg(long, env = "LOCALNFS_SEND_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub send_timeout: Duration,

    /// Bytes of RPC records and replies held for all clients together, including
    /// replies still in the sockets' kernel send buffers; past it, connections stop
    /// reading until replies leave. Keep it well inside the container's memory limit
    /// (about 60 MiB more is the rest of the agent, plus 256 KiB of kernel receive
    /// buffer per connection at most).
    #[arg(long, env = "LOCALNFS_MAX_BYTES_IN_FLIGHT", value_parser = quantity_bytes, default_value = "128Mi")]
    pub max_bytes_in_flight: u64,

    /// On SIGTERM, how long connections may take to send the replies of calls already
    /// received before they are cut and the agent exits (every reply sent was durable;
    /// keep it below the pod's termination grace period, 30 s by default).
    #[arg(long, env = "LOCALNFS_DRAIN_TIMEOUT", value_parser = parse_duration, default_value = "20s")]
    pub drain_timeout: Duration,

    /// Accept NFS and MOUNT calls from source ports >= 1024 (knfsd's `insecure`).
    /// Off by default: the Linux kernel client uses reserved ports; userspace clients
    /// such as libnfs need this.
    #[arg(long, env = "LOCALNFS_INSECURE_PORTS")]
    pub insecure_ports: bool,

    /// Run without a Kubernetes cluster (volumes managed with `localnfs volume`).
    #[arg(long, env = "LOCALNFS_STANDALONE")]
    pub standalone: bool,

    /// Let MKNOD make block and character device nodes in volumes (off: NFS3ERR_NOTSUPP).
    /// For conformance runs; a device node in a volume reaches the node's hardware.
    #[arg(long, env = "LOCALNFS_ALLOW_DEVICE_NODES")]
    pub allow_device_nodes: bool,

    /// Bytes this node offers to volumes in total (default: whatever the disk has
    /// free). New volumes are placed only where their full size still fits.
    #[arg(long, env = "LOCALNFS_CAPACITY", value_parser = quantity_bytes)]
    pub capacity: Option<u64>,

    /// This node's name (cluster mode); from the downward API in the DaemonSet.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// A backup target VolumeBackups may name, as `NAME=DIR` (repeatable): DIR is a
    /// directory mounted into the agent that survives this node (an NFS export, or a
    /// localnfs volume of another node). Objects name targets by NAME only.
    #[arg(
        long = "backup-target",
        env = "LOCALNFS_BACKUP_TARGETS",
        value_name = "NAME=DIR",
        value_delimiter = ',',
        value_parser = crate::node::targets::parse_target
    )]
    pub backup_targets: Vec<crate::node::targets::BackupTarget>,

    /// localnfs's namespace.
    #[arg(long, env = "LOCALNFS_NAMESPACE", default_value = "localnfs-system")]
    pub namespace: String,

    #[command(flatten)]
    pub heartbeats: HeartbeatArgs,

    #[command(flatten)]
    pub kube: KubeArgs,
}

impl NodeArgs {
    /// Where the peer channel listens (`--peer-port`, see its help).
    pub fn peer_addr(&self, nfs_port: u16) -> SocketAddr {
        let port = self.peer_port.unwrap_or(match nfs_port {
            0 => 0,
            p => p.saturating_add(1),
        });
        SocketAddr::new(self.listen.ip(), port)
    }

    /// The NFS server's limits, from the flags.
    pub fn nfs_limits(&self) -> crate::nfs::Limits {
        crate::nfs::Limits {
            max_connections: self.max_connections,
            idle_timeout: self.idle_timeout,
            record_timeout: self.record_timeout,
            send_timeout: self.send_timeout,
            bytes_in_flight: usize::try_from(self.max_bytes_in_flight).unwrap_or(usize::MAX),
            require_reserved_port: !self.insecure_ports,
            drain_timeout: self.drain_timeout,
        }
    }
}

#[derive(Debug, Args)]
pub struct VolumeArgs {
    /// The node root the volumes live in.
    #[arg(long, env = "LOCALNFS_ROOT", default_value = "/var/lib/localnfs")]
    pub root: PathBuf,

    #[command(subcommand)]
    pub command: VolumeCommand,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume (succeeds if it exists with the same settings).
    Create(CreateVolume),
    /// Change a volume's size limit (not below what it stores).
    Resize {
        name: VolumeName,
        /// New size: bytes or with a unit (Ki, Mi, Gi, Ti, K, M, G, T).
        #[arg(long, value_parser = quantity_bytes)]
        size: u64,
    },
    /// Delete a volume and its data.
    Delete { name: VolumeName },
    /// Copy a volume as it is at one instant into a new volume, while it is served
    /// and written: the node agent serving ROOT makes the copy (it must be running);
    /// this asks it, waits and prints the result (see the README).
    Copy(CopyVolume),
    /// Back up a volume as it is at one instant into a new set under DIR (a directory
    /// that survives the node, e.g. a network volume mounted there): the node agent
    /// serving ROOT writes it (it must be running); incremental after the first set.
    Backup(BackupVolume),
    /// List the backup sets under DIR (of VOLUME, or of every volume there).
    Backups {
        /// The backup target directory.
        #[arg(long)]
        to: std::path::PathBuf,
        volume: Option<VolumeName>,
    },
    /// Restore a backup set (DIR/VOLUME/SET) into a new volume (never an existing one).
    Restore(RestoreVolume),
    /// List volumes with size and usage.
    List,
}

#[derive(Debug, Args)]
pub struct BackupVolume {
    /// The volume to back up.
    pub volume: VolumeName,
    /// The backup target directory (sets go to DIR/VOLUME/SET-ID).
    #[arg(long)]
    pub to: std::path::PathBuf,
    /// Keep the newest N complete sets (with --max-age: a set either keeps stays).
    #[arg(long)]
    pub keep: Option<usize>,
    /// Keep complete sets younger than this (e.g. 7d, 12h).
    #[arg(long, value_parser = parse_duration)]
    pub max_age: Option<std::time::Duration>,
    /// Accept a target on the same disk as ROOT (tests, single-disk labs): such a
    /// backup does not survive that disk.
    #[arg(long)]
    pub allow_same_device: bool,
    /// How long to wait for the agent's result.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct RestoreVolume {
    /// The set to restore: DIR/VOLUME/SET-ID.
    #[arg(long)]
    pub from: std::path::PathBuf,
    /// The new volume (must not exist).
    pub name: VolumeName,
    /// The new volume's size limit (default: the backed-up volume's).
    #[arg(long, value_parser = quantity_bytes)]
    pub size: Option<u64>,
    /// Restore the set's character and block device nodes (as the agent's
    /// `--allow-device-nodes`); off: a set holding one is refused.
    #[arg(long, env = "LOCALNFS_ALLOW_DEVICE_NODES")]
    pub allow_device_nodes: bool,
}

#[derive(Debug, Args)]
pub struct CopyVolume {
    /// The volume to copy.
    pub source: VolumeName,
    /// The new volume (must not exist).
    pub name: VolumeName,
    /// The new volume's size limit (default: the source's): bytes or with a unit.
    #[arg(long, value_parser = quantity_bytes)]
    pub size: Option<u64>,
    /// How long to wait for the agent's result.
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct CreateVolume {
    pub name: VolumeName,
    /// Size limit: bytes or with a unit (Ki, Mi, Gi, Ti, K, M, G, T).
    #[arg(long, value_parser = quantity_bytes)]
    pub size: u64,
    /// Owner of the volume's root directory.
    #[arg(long, default_value_t = 0)]
    pub uid: u32,
    #[arg(long, default_value_t = 0)]
    pub gid: u32,
    /// Mode of the volume's root directory (octal).
    #[arg(long, value_parser = parse_mode, default_value = "0777")]
    pub mode: u32,
    /// Identity squashing: none, root or all.
    #[arg(long, value_parser = parse_squash, default_value = "none")]
    pub squash: Squash,
    /// uid squashed callers become.
    #[arg(long, default_value_t = 65534)]
    pub anon_uid: u32,
    /// gid squashed callers become.
    #[arg(long, default_value_t = 65534)]
    pub anon_gid: u32,
    /// Most objects (files, directories, links) the volume may hold (default: one
    /// per 4 KiB of its size, at least 1,024).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_files: Option<u64>,
    /// A StorageClass volume parameter as `KEY=VALUE` (`readIOPS=200`,
    /// `writeBandwidth=50Mi`, `weight=300`, …), repeatable; applied after the flags.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_volume_param)]
    pub params: Vec<(String, String)>,
}

/// A `KEY=VALUE` volume parameter, checked against [`VolumeSpec::set_param`] so a bad
/// key or value fails at parse time with the class's own message.
fn parse_volume_param(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    match crate::volume::VolumeSpec::template().set_param(key, value) {
        None => Err(format!(
            "`{key}` is not a volume parameter: {}",
            crate::volume::VolumeSpec::PARAMS.join(", ")
        )),
        Some(Err(expected)) => Err(format!("{key}: expected {expected}")),
        Some(Ok(())) => Ok((key.to_owned(), value.to_owned())),
    }
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub admin: AdminArgs,

    /// Directory with the v1.20.2 kube-apiserver, kube-controller-manager and
    /// kube-scheduler (filled by scripts/k8s-binaries).
    #[arg(long, env = "LOCALNFS_K8S_BIN_DIR")]
    pub k8s_bin_dir: Option<PathBuf>,

    /// Stop after this long instead of waiting for Ctrl-C (e.g. `30s`, `5m`, `0s`).
    #[arg(long, value_parser = parse_duration)]
    pub run_for: Option<Duration>,
}

/// Parses `500ms`, `30s`, `5m`, `2h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 30s, 5m, 500ms)"))?;
    let secs = |k: u64| {
        n.checked_mul(k)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("`{s}` is too long"))
    };
    match unit {
        "" | "s" => secs(1),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => Err(format!(
            "unknown unit `{unit}` in `{s}` (use ms, s, m, h or d)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    }

    #[test]
    fn bad_durations_say_why() {
        assert!(parse_duration("").unwrap_err().contains("not a duration"));
        assert!(
            parse_duration("5 days")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(
            parse_duration("-1s")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(
            parse_duration("99999999999999999999h")
                .unwrap_err()
                .contains("not a duration")
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
