//! Every label, annotation and finalizer key localnfs writes or reads, in one place
//! (see the module above for who writes which, and when).

/// Claim label and PV annotation: the node whose agent owns the volume.
pub const NODE_KEY: &str = "localnfs.io/node";
/// Claim annotation: the [`VolumeRequest`] the node agent should create.
pub const REQUEST: &str = "localnfs.io/volume-request";
/// Claim annotation: the controller's signature of [`REQUEST`] (see `signed`).
pub const REQUEST_SIG: &str = "localnfs.io/volume-request-signature";
/// Claim annotation set by the node agent: the created volume's name.
pub const READY: &str = "localnfs.io/volume-ready";
/// Claim annotation: the node agent's signature of [`READY`].
pub const READY_SIG: &str = "localnfs.io/volume-ready-signature";
/// Claim annotation set by the node agent when it will not create the requested
/// volume (a different volume by that name exists, a bad size): why, for the
/// controller to hand the choice of node back to the scheduler.
pub const REFUSED: &str = "localnfs.io/volume-refused";
/// Claim annotation set by the controller: delete the volume, no PV will follow.
pub const ABANDON: &str = "localnfs.io/abandon";
/// Claim annotation: the controller's signature of [`ABANDON`].
pub const ABANDON_SIG: &str = "localnfs.io/abandon-signature";
/// Claim annotation set by the node agent once an abandoned volume is gone.
pub const REMOVED: &str = "localnfs.io/volume-removed";
/// Claim annotation: the node agent's signature of [`REMOVED`].
pub const REMOVED_SIG: &str = "localnfs.io/volume-removed-signature";
/// Claim finalizer held by the controller while provisioning is in progress.
pub const CLAIM_FINALIZER: &str = "localnfs.io/provisioning";
/// PV annotation: the size (bytes) the controller wants the volume to have.
pub const RESIZE_TO: &str = "localnfs.io/resize-to";
/// PV annotation: the size (bytes) the node agent has applied.
pub const SIZE: &str = "localnfs.io/size";
/// PV annotation set by the controller: the nodes that may mount the volume, as a
/// sorted JSON list of node names.
pub const PUBLISHED_NODES: &str = "localnfs.io/published-nodes";

/// Claim annotations kube-controller-manager's PV binder sets when it binds a claim;
/// the controller sets them when it completes the binding itself.
pub const BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
pub const BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";

/// Prefix of the per-node Leases the agents renew (heartbeat and free space).
pub const NODE_LEASE_PREFIX: &str = "localnfs-node-";
/// Node Lease annotation: bytes a new volume may still take on the node.
pub const FREE_BYTES: &str = "localnfs.io/free-bytes";
/// Node Lease annotation: bytes used in each of the node's volumes, as a JSON object
/// (volume name → bytes), for `localnfs status`. Left out on a node with so many volumes
/// that it would not fit comfortably in an annotation.
pub const USED_BYTES: &str = "localnfs.io/used-bytes";
/// Node Lease annotation: objects in each of the node's volumes and how many each may
/// hold, as a JSON object (volume name → `[used, limit]`), for `localnfs status`. Left
/// out like [`USED_BYTES`].
pub const USED_INODES: &str = "localnfs.io/used-inodes";
/// Node Lease annotation: the agent's NFS port.
pub const NFS_PORT: &str = "localnfs.io/nfs-port";
/// Node Lease annotation: the agent's peer port, where other agents fetch cross-node
/// clones (`node::peer`).
pub const PEER_PORT: &str = "localnfs.io/peer-port";
/// Key Lease annotation (heartbeat Lease annotation from agents before the key
/// Leases): the public half of the agent's signing key (hex), which checks its
/// answers on claims (see `signed`).
pub const AGENT_KEY: &str = "localnfs.io/agent-key";
/// Prefix of the per-node Leases that carry an agent's public key ([`AGENT_KEY`]),
/// written when the agent starts rather than at every heartbeat (see
/// `objects::agents`).
pub const KEY_LEASE_PREFIX: &str = "localnfs-key-";

/// Secret (in the install namespace) holding the controller's private signing key
/// (key [`CONTROLLER_KEY_FIELD`], PKCS#8); only the controller may read it.
pub const CONTROLLER_KEY_SECRET: &str = "localnfs-controller-key";
/// ConfigMap (in the install namespace) holding the public half of the controller's
/// key (key [`CONTROLLER_KEY_FIELD`], hex); only the controller may write it.
pub const CONTROLLER_KEY_CONFIGMAP: &str = "localnfs-controller-key";
pub const CONTROLLER_KEY_FIELD: &str = "ed25519";

/// What the controller asks a node agent to create.
pub use super::signed::VolumeRequest;

/// PV annotation: the volume's directory name on its node.
pub const VOLUME_KEY: &str = "localnfs.io/volume";
/// PV annotation: the class's `onDelete` when the PV was made.
pub const ON_DELETE_KEY: &str = "localnfs.io/on-delete";
/// PV annotation: the class's `locality` when the PV was made, so the scheduler helper
/// knows it even if the class changes or goes away.
pub const LOCALITY_KEY: &str = "localnfs.io/locality";
/// Finalizer on our PVs: removed by the node agent once the directory has been dealt
/// with, so a PV never disappears while its data is in an unknown state.
pub const PV_FINALIZER: &str = "localnfs.io/volume";

/// PV annotation Kubernetes reads: which provisioner made the PV.
pub const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// Claim annotation the scheduler sets under WaitForFirstConsumer: the pod's node.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// Node label: the node's name, as PV node affinity matches it.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// Claim annotations naming the claim's provisioner, set by the control plane
/// (the beta key up to 1.22, the GA key from 1.23).
pub const BETA_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
pub const GA_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
