//! How the controller and the node agents talk: through the API server only, with
//! labels, annotations and finalizers on the claim and its PV. No network API between
//! them, so nothing to authenticate beyond RBAC, and every step survives restarts of
//! either side because the state lives on the objects.
//!
//! Provisioning (controller C, node agent N):
//! 1. C adds [`CLAIM_FINALIZER`] to the claim, picks a node, and sets the
//!    [`NODE_LABEL`] label and the [`REQUEST`] annotation (a [`VolumeRequest`]).
//! 2. N (watching claims labelled with its node) creates the directory with its size
//!    limit, then sets [`READY`] to the volume name — with a JSON patch that first
//!    tests the claim is still labelled with N's node.
//!
//! An agent that will not create the volume sets [`REFUSED`] (with the same label
//! test); under WaitForFirstConsumer C then takes the placement back and removes the
//! scheduler's selected node, so the scheduler picks again.
//!
//! An agent silent past its lease and the controller's `--agent-grace`: C takes back
//! a placement not yet READY (removes [`NODE_LABEL`], [`REQUEST`] and the scheduler's
//! selected node, if the claim is unchanged since C read it) and places it again; a
//! deleted claim waiting for [`REMOVED`] is let go with an event naming what may be
//! left on the node.
//! 3. C creates the pre-bound PV (with [`super::pv::PV_FINALIZER`]), completes the
//!    binding (claim `volumeName` and [`BIND_COMPLETED`], PV and claim phase Bound),
//!    then removes [`CLAIM_FINALIZER`]. A PV therefore exists only after its directory
//!    (invariant 1).
//!
//! A claim deleted before its PV exists: C sets [`ABANDON`] (and from then on never
//! creates a PV for it); N, after checking the claim is being deleted and no PV
//! `pvc-<uid>` exists, deletes the directory and sets [`REMOVED`]; C removes
//! [`CLAIM_FINALIZER`]. Nothing is left behind.
//!
//! Reclaim (`super::reclaim`): a Released PV with policy Delete is deleted by C once
//! a fresh read shows its claim gone; its finalizer holds it until N, reading the
//! claim again, has deleted or archived the directory (per the class's `onDelete`)
//! and removed the finalizer. A PV deleted while its claim exists (say `kubectl delete
//! pv` on a Bound PV) stays Terminating with its data until the claim is deleted.
//! Retain PVs, and `onDelete` values N does not know, keep the directory: N just lets
//! the PV go (with a warning event for an unknown value).
//!
//! Expansion: C sets [`RESIZE_TO`] on the PV; N raises the limit and sets
//! [`SIZE`]; C then updates the PV capacity and the claim's status capacity.

use crate::volume::VolumeSpec;

/// Claim label: the node whose agent owns this claim's volume.
pub const NODE_LABEL: &str = "localnfs.io/node";
/// Claim annotation: the [`VolumeRequest`] the node agent should create.
pub const REQUEST: &str = "localnfs.io/volume-request";
/// Claim annotation set by the node agent: the created volume's name.
pub const READY: &str = "localnfs.io/volume-ready";
/// Claim annotation set by the node agent when it will not create the requested
/// volume (a different volume by that name exists, a bad size): why, for the
/// controller to hand the choice of node back to the scheduler.
pub const REFUSED: &str = "localnfs.io/volume-refused";
/// Claim annotation set by the controller: delete the volume, no PV will follow.
pub const ABANDON: &str = "localnfs.io/abandon";
/// Claim annotation set by the node agent once an abandoned volume is gone.
pub const REMOVED: &str = "localnfs.io/volume-removed";
/// Claim finalizer held by the controller while provisioning is in progress.
pub const CLAIM_FINALIZER: &str = "localnfs.io/provisioning";
/// PV annotation: the size (bytes) the controller wants the volume to have.
pub const RESIZE_TO: &str = "localnfs.io/resize-to";
/// PV annotation: the size (bytes) the node agent has applied.
pub const SIZE: &str = "localnfs.io/size";

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

/// What the controller asks a node agent to create: a volume spec, as JSON.
pub type VolumeRequest = VolumeSpec;
