//! What travels on Kubernetes objects: the vocabulary every component shares.
//!
//! How the controller and the node agents talk: through the API server only, with
//! labels, annotations and finalizers on the claim and its PV. No network API between
//! them, so what each may do is RBAC plus, for the agents, the scheduler helper's
//! write guard (`scheduler::guard`: an agent writes only the answers below on its own
//! node's objects); every step survives restarts of either side because the state
//! lives on the objects.
//!
//! Anyone who may edit a claim can write these keys, so none is believed unsigned:
//! C signs what it asks ([`keys::REQUEST_SIG`], [`keys::ABANDON_SIG`]), N signs what
//! it answers ([`keys::READY_SIG`], [`keys::REMOVED_SIG`]), every statement names the
//! claim's uid, and each reader acts only on what verifies ([`signed`]). N records the
//! claim as the volume's owner on disk and makes, answers for and removes a volume only
//! for its owner.
//!
//! Provisioning (controller C, node agent N):
//! 1. C adds [`keys::CLAIM_FINALIZER`] to the claim, picks a node, and sets the
//!    [`keys::NODE_KEY`] label and the [`keys::REQUEST`] annotation (a [`keys::VolumeRequest`]
//!    naming the claim's uid and the node) with its signature.
//! 2. N (watching claims labelled with its node) creates the directory with its size
//!    limit and owner (for a clone, a copy of the volume the request names, if that
//!    volume's owner is the named claim of the same namespace: [`request`]), then sets [`keys::READY`] to the volume name with its signature —
//!    with a JSON patch that first tests the claim is still labelled with N's node.
//!
//! An agent that will not create the volume sets [`keys::REFUSED`] (with the same label
//! test); under WaitForFirstConsumer C then takes the placement back and removes the
//! scheduler's selected node, so the scheduler picks again.
//!
//! An agent silent past its lease and the controller's `--agent-grace`: C takes back
//! a placement not yet READY (removes [`keys::NODE_KEY`], [`keys::REQUEST`] and the scheduler's
//! selected node, if the claim is unchanged since C read it) and places it again; a
//! deleted claim waiting for [`keys::REMOVED`] is let go with an event naming what may be
//! left on the node.
//! 3. C creates the pre-bound PV (with [`keys::PV_FINALIZER`]), completes the
//!    binding (claim `volumeName` and [`keys::BIND_COMPLETED`], PV and claim phase Bound),
//!    then removes [`keys::CLAIM_FINALIZER`]. A PV therefore exists only after its directory
//!    (so a PV never points at nothing).
//!
//! A claim deleted before its PV exists: C sets [`keys::ABANDON`] (and from then on never
//! creates a PV for it); N, after checking the claim is being deleted, no PV names the
//! volume and the volume is the claim's, deletes the directory and sets
//! [`keys::REMOVED`]; C removes [`keys::CLAIM_FINALIZER`]. Nothing is left behind.
//!
//! Reclaim ([`reclaim`]): a PV with policy Delete, Released or with its claim seen
//! deleted, is deleted by C once a fresh read shows its claim gone; its finalizer holds it until N, reading the
//! claim again, has deleted or archived the directory (per the class's `onDelete`)
//! and removed the finalizer. A PV deleted while its claim exists (say `kubectl delete
//! pv` on a Bound PV) stays Terminating with its data until the claim is deleted.
//! Retain PVs, and `onDelete` values N does not know, keep the directory: N just lets
//! the PV go (with a warning event for an unknown value).
//!
//! Expansion: C sets [`keys::RESIZE_TO`] on the PV; N raises the limit and sets
//! [`keys::SIZE`]; C then updates the PV capacity and the claim's status capacity.
//!
//! Access: C keeps [`keys::PUBLISHED_NODES`] on each PV equal to the nodes that may
//! mount it (those running pods that use its claim, one at a time for ReadWriteOnce;
//! see `provisioner::publish`), creating PVs with `[]`; N serves the volume to those
//! nodes' InternalIPs only, checked on every call (`node::grants`).
//!
//! This module is the bottom layer every component shares: those keys ([`keys`]),
//! the StorageClass vocabulary ([`class`]), what a claim asks for ([`claim`]), when
//! a volume's data may go ([`reclaim`]), which nodes may mount a volume
//! ([`published`]), what the controller asks an agent for ([`request`]), what agents
//! say to each other for a cross-node clone ([`peer`]), which keys
//! localnfs wrote ([`signed`]) and the agents' heartbeat Leases ([`agents`]: what a
//! Lease says; reading and writing them is `crate::heartbeat`) and their per-volume
//! usage reports ([`usage`]), and the backup and restore objects ([`backups`]:
//! VolumeBackup, VolumeBackupSchedule, VolumeRestore). It depends on no
//! component and does no API I/O: it uses only the NFS crate's volume types and
//! `kubeclient::annotation`, a pure accessor of the same layer (kubeclient imports
//! nothing but `error`). The provisioner, scheduler helper, node agent and `status`
//! depend on it and not on each other.

pub mod agents;
pub mod backups;
pub mod claim;
pub mod class;
pub mod keys;
pub mod peer;
pub mod published;
pub mod reclaim;
pub mod request;
pub mod signed;
pub mod usage;
