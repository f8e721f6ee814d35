//! The scheduler helper (`localnfs scheduler`): keeps pods near their data and new
//! volumes off nodes without room.
//!
//! - A **mutating admission webhook** (HTTPS, `POST /mutate`) gives each new pod node
//!   affinity for the node its localnfs volumes live on ([`affinity`]).
//! - A **validating admission webhook** (HTTPS, `POST /validate`) keeps each node agent
//!   to its own node's claims, PVs, heartbeat Lease and usage Leases ([`guard`] decides, [`agents`]
//!   finds the calling agent's node), as NodeRestriction does for kubelets.
//! - A **validating admission webhook** for claims (HTTPS, `POST /validate-claims`)
//!   refuses localnfs's own keys on claims from anyone but the controller and the
//!   agents ([`claims_guard`] decides, [`claims_review`] reads and answers); a help,
//!   not the trust boundary (it fails open).
//! - A **kube-scheduler extender** (`POST /filter`, `POST /prioritize`) refuses nodes
//!   that cannot hold the pod's WaitForFirstConsumer volumes or are not the home of its
//!   `strict` volumes, and scores the home node highest ([`decide`]).
//!
//! Decisions are pure functions over a compact [`inventory::Inventory`] that
//! [`watch`] keeps current; [`wire`] translates the JSON; [`routes`] serves it; [`tls`]
//! provides the webhook's certificate.

pub mod affinity;
pub mod agents;
pub mod claims_guard;
pub mod claims_review;
pub mod config;
pub mod decide;
pub mod guard;
pub mod inventory;
pub mod routes;
pub mod run;
pub mod tls;
pub mod watch;
pub mod wire;
