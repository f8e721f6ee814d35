//! The peer channel: how a node agent makes a clone whose source volume is on another
//! node. The agent holding the source ([`Peer::serve`], on `--peer-port`, advertised
//! in its heartbeat Lease) streams a point-in-time copy to the agent making the clone
//! ([`Peer::fetch`], in `fetch.rs`). The messages and the source's rules are in `objects::peer`; the
//! two ends of the stream in [`tree`].
//!
//! Who may use it: only agents, each proven by its Ed25519 agent key (the one whose
//! public half is in its node's key Lease, `localnfs-key-<node>`, which only that node's agent may
//! write: `scheduler::guard`). TLS 1.3 with an ephemeral self-signed certificate
//! encrypts the session; each side then signs the session's exported keying material
//! (channel binding), so a signature is good for that session only and a relay in the
//! middle (two sessions) is caught. Then the receiver presents the claim's
//! controller-signed request, which must name the receiver's node and the source's
//! claim; the source agent checks its owner record of the source volume as for a local
//! clone (`step::clone_check`). Anything else is refused (a `Refused` frame, a warning
//! in the log, `localnfs_peer_refusals_total`) before a byte of data is sent.
//!
//! What a clone costs the source's node: room for one point-in-time copy in its
//! staging (shared extents where the file system has reflinks) for as long as the
//! stream runs, removed after; each side holds at most [`QUEUE`] chunks of
//! `objects::peer::CHUNK` in memory. A connection has [`AUTH_TIMEOUT`] for each step
//! until it is a checked agent, and is closed once quiet for [`IO_TIMEOUT`] after;
//! at most [`MAX_CONNECTIONS`] are open and [`MAX_STREAMS`] stream at once.

mod fetch;
pub mod tree;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::Api;
use kube::{Client, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime,
};
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme,
};
use tokio_util::sync::CancellationToken;

use super::keys::ControllerKey;
use crate::kubeclient::annotation;
use crate::nfs::Exports;
use crate::objects::agents::{AgentInfo, Agents, key_lease_name, lease_name};
use crate::objects::claim::pv_name;
use crate::objects::keys::{NODE_KEY, REQUEST};
use crate::objects::peer::{
    self as wire, Accepted, Ask, BINDING_LEN, ClaimSeen, EXPORTER_LABEL, Frame, RECEIVER, SOURCE,
};
use crate::objects::request::{CloneSource, VolumeRequest};
use crate::objects::signed::{Message, Signer};
use crate::volume::VolumeMeta;

/// Frames queued between a connection and its stream's blocking thread.
pub const QUEUE: usize = 8;
/// Most frame reads and writes wait this long (the handshake, the hellos and the ask
/// included) before the connection is closed.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the receiver waits for the source's point-in-time copy to be taken.
pub const COPY_TIMEOUT: Duration = Duration::from_secs(3600);
/// Clones streamed out at once; more authenticated ones wait for a turn.
pub const MAX_STREAMS: usize = 4;
/// Connections open at once, most of them not yet authenticated; more wait in the
/// accept backlog. Well above [`MAX_STREAMS`], so a few idle connections from the
/// node network cannot take every turn from the agents.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection has for its TLS handshake, and then for each of its hello
/// and its request: a connection that is not an agent asking is closed soon.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// The name the receiver asks the TLS layer for (certificates are not checked by name:
/// see [`AnyCertificate`]).
const TLS_NAME: &str = "localnfs-peer";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    /// Which check refused: `hello` (not a known agent), `ask` (no valid request for
    /// that agent), `owner` (the source volume is not the request's claim's).
    stage: String,
}

/// The peer channel's counters (`docs/metrics.md`).
#[derive(Clone, Default)]
pub struct PeerMetrics {
    refusals: Family<RefusalLabels, Counter>,
    sent_bytes: Counter,
    received_bytes: Counter,
}

impl PeerMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "peer_refusals",
            "Peer-channel connections refused before any data, by the check that refused",
            self.refusals.clone(),
        );
        registry.register(
            "peer_sent_bytes",
            "File bytes streamed to other agents for cross-node clones",
            self.sent_bytes.clone(),
        );
        registry.register(
            "peer_received_bytes",
            "File bytes received from other agents for cross-node clones",
            self.received_bytes.clone(),
        );
    }
}

/// One agent's end of the peer channel.
pub struct Peer {
    pub client: Client,
    pub node: String,
    pub heartbeat_namespace: String,
    pub exports: Arc<Exports>,
    pub signer: Signer,
    pub controller_key: ControllerKey,
    pub metrics: PeerMetrics,
    /// Turns for streaming out ([`MAX_STREAMS`]), taken only once a peer is checked.
    streams: Arc<tokio::sync::Semaphore>,
    server_tls: Arc<ServerConfig>,
    client_tls: Arc<ClientConfig>,
}

/// Why a cross-node clone was not made.
#[derive(Debug)]
pub enum FetchError {
    /// The source agent refused, or the request cannot be served as it stands: the
    /// claim is refused (the controller places it again).
    Refused(String),
    /// It may work later (the source agent down or restarting, a connection cut):
    /// tried again from the start.
    Failed(String),
}

/// What a cross-node clone did.
#[derive(Debug)]
pub struct Fetched {
    pub meta: VolumeMeta,
    pub bytes: u64,
    pub files: u64,
    pub pause: Duration,
    pub took: Duration,
    pub from: String,
}

/// The TLS client's certificate check: none. The certificate is ephemeral and
/// self-signed, so no chain can vouch for it; the peer is proven by its agent key's
/// signature of this session's keying material instead (module docs). The handshake
/// signature is still checked, so the server holds the certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "the peer channel uses TLS 1.3 only".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS server side: a certificate made now, for this process only.
pub fn server_tls() -> Result<Arc<ServerConfig>, String> {
    let made = rcgen::generate_simple_self_signed(vec![TLS_NAME.to_owned()])
        .map_err(|e| format!("make the peer certificate: {e}"))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
    let config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("peer TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(vec![made.cert.der().clone()], key)
        .map_err(|e| format!("peer TLS certificate: {e}"))?;
    Ok(Arc::new(config))
}

/// The TLS client side (TLS 1.3 only: its exporter is what the agents sign).
pub fn client_tls() -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(default_provider());
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("peer TLS versions: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Reads one frame (bounded by `objects::peer::MAX_FRAME`) within `limit`.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, limit: Duration) -> Result<Frame, String> {
    let read = async {
        let mut head = [0u8; 5];
        r.read_exact(&mut head)
            .await
            .map_err(|e| format!("read from the peer: {e}"))?;
        let (kind, len) = wire::header(head)?;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)
            .await
            .map_err(|e| format!("read from the peer: {e}"))?;
        Frame::decode(kind, body)
    };
    tokio::time::timeout(limit, read)
        .await
        .map_err(|_| format!("the peer sent nothing for {limit:?}"))?
}

/// Writes one frame within [`IO_TIMEOUT`].
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<(), String> {
    let write = async {
        w.write_all(&f.encode())
            .await
            .map_err(|e| format!("write to the peer: {e}"))
    };
    tokio::time::timeout(IO_TIMEOUT, write)
        .await
        .map_err(|_| format!("the peer took nothing for {IO_TIMEOUT:?}"))?
}

/// Whether `node` can be a Node's name (so it can name a Lease): lower-case letters,
/// digits, `-` and `.`, at most 253.
fn node_name_ok(node: &str) -> bool {
    !node.is_empty()
        && node.len() <= 253
        && node
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The node holding `source`'s volume: its PV's node annotation (PVs only the
/// controller writes); `None` when the PV is gone or names none.
pub async fn source_node(client: &Client, source: &CloneSource) -> crate::Result<Option<String>> {
    let name = pv_name(&source.claim_uid);
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get_opt(&name)
        .await
        .map_err(crate::Error::kube(format!(
            "read PV {name}, a clone's source"
        )))?;
    Ok(pv.and_then(|pv| annotation(&pv, NODE_KEY).map(str::to_owned)))
}

impl Peer {
    pub fn new(
        client: Client,
        node: String,
        heartbeat_namespace: String,
        exports: Arc<Exports>,
        signer: Signer,
        controller_key: ControllerKey,
        metrics: PeerMetrics,
    ) -> Result<Self, String> {
        Ok(Self {
            client,
            node,
            heartbeat_namespace,
            exports,
            signer,
            controller_key,
            metrics,
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
            server_tls: server_tls()?,
            client_tls: client_tls()?,
        })
    }

    /// `node`'s heartbeat as its Leases say now (`Ok(None)`: no Lease, or none of
    /// ours; `Err`: the API server could not be asked, which may pass).
    async fn agent_of(&self, node: &str) -> Result<Option<AgentInfo>, String> {
        if !node_name_ok(node) {
            return Ok(None);
        }
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.heartbeat_namespace);
        // The key is in the node's key Lease (agents before key Leases: in the
        // heartbeat itself); `Agents` joins the two as every other reader does.
        let read = |e: kube::Error| format!("read node {node}'s Leases: {e}");
        let mut agents = Agents::default();
        if let Some(key) = leases.get_opt(&key_lease_name(node)).await.map_err(read)? {
            agents.see(&key, 0);
        }
        let Some(lease) = leases.get_opt(&lease_name(node)).await.map_err(read)? else {
            return Ok(None);
        };
        Ok(match agents.see(&lease, 0) {
            Some((named, info)) if named == node => info,
            _ => None,
        })
    }

    /// Serves other agents' clone requests on `listener` until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        crate::server::serve(
            "peer",
            listener,
            MAX_CONNECTIONS,
            shutdown,
            |tcp, from, stop| {
                let me = self.clone();
                async move {
                    tokio::select! {
                        _ = stop.cancelled() => {
                            tracing::info!(%from, "peer stream cut: the agent is stopping");
                        }
                        r = me.source(tcp, from) => {
                            if let Err(why) = r {
                                tracing::warn!(%from, %why, "peer stream failed");
                            }
                        }
                    }
                }
            },
        )
        .await;
    }

    /// Logs and counts a refusal and tells the peer why.
    async fn refuse<W: AsyncWrite + Unpin>(
        &self,
        w: &mut W,
        from: SocketAddr,
        stage: &str,
        who: &str,
        why: String,
    ) -> Result<(), String> {
        tracing::warn!(%from, claimed_node = who, stage, %why, "refused a peer-channel connection");
        self.metrics
            .refusals
            .get_or_create(&RefusalLabels {
                stage: stage.to_owned(),
            })
            .inc();
        let _ = write_frame(w, &Frame::Refused(why)).await;
        let _ = w.shutdown().await;
        Ok(())
    }

    /// Tells the peer this try failed for a reason that may pass (it starts over),
    /// rather than refusing it.
    async fn fail<W: AsyncWrite + Unpin>(&self, w: &mut W, why: String) -> Result<(), String> {
        let _ = write_frame(w, &Frame::Failed(why.clone())).await;
        let _ = w.shutdown().await;
        Err(why)
    }

    /// The source side of one connection.
    async fn source(&self, tcp: TcpStream, from: SocketAddr) -> Result<(), String> {
        let acceptor = TlsAcceptor::from(self.server_tls.clone());
        let mut tls = tokio::time::timeout(AUTH_TIMEOUT, acceptor.accept(tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_owned())?
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let ekm = tls
            .get_ref()
            .1
            .export_keying_material([0u8; BINDING_LEN], EXPORTER_LABEL, None)
            .map_err(|e| format!("export keying material: {e}"))?;
        let hello = match read_frame(&mut tls, AUTH_TIMEOUT).await? {
            Frame::Hello(h) => h,
            other => {
                let why = format!("expected a hello, got {}", tree::frame_name(&other));
                return self.refuse(&mut tls, from, "hello", "", why).await;
            }
        };
        let key = match self.agent_of(&hello.node).await {
            Ok(agent) => agent.and_then(|a| a.key),
            // Not a refusal: the caller may be that agent; it tries again.
            Err(e) => return self.fail(&mut tls, e).await,
        };
        if !wire::hello_verifies(&hello, RECEIVER, &ekm, key.as_ref()) {
            let why = format!(
                "not node {}'s agent: the hello is not signed for this session by the key in that node's key Lease",
                hello.node
            );
            return self.refuse(&mut tls, from, "hello", &hello.node, why).await;
        }
        let mine = wire::hello(&self.signer, SOURCE, &self.node, &ekm);
        write_frame(&mut tls, &Frame::Hello(mine)).await?;
        let ask = match read_frame(&mut tls, AUTH_TIMEOUT).await? {
            Frame::Ask(a) => a,
            other => {
                let why = format!("expected a request, got {}", tree::frame_name(&other));
                return self.refuse(&mut tls, from, "ask", &hello.node, why).await;
            }
        };
        let (request, namespace) = match self.check(&ask, &hello.node).await {
            Ok(r) => r,
            Err(("api", why)) => return self.fail(&mut tls, why).await,
            Err((stage, why)) => {
                return self.refuse(&mut tls, from, stage, &hello.node, why).await;
            }
        };
        let Some(source) = request.clone.clone() else {
            return Ok(()); // check() lets only clones through
        };
        let recorded = self
            .exports
            .by_name(&source.volume)
            .map(|v| v.meta.owner.clone());
        if let Err(why) =
            super::step::clone_check(&source, &namespace, recorded.as_ref().map(Option::as_ref))
        {
            return self.refuse(&mut tls, from, "owner", &hello.node, why).await;
        }
        // A checked agent waits here for a turn; the connection stays open.
        let _turn = self
            .streams
            .acquire()
            .await
            .map_err(|e| format!("stream turns: {e}"))?;
        tracing::info!(%from, peer = %hello.node, source = %source.volume, volume = %request.spec.name, "streaming a clone to another node");
        let (exports, spec, volume) = (
            self.exports.clone(),
            request.spec.clone(),
            source.volume.clone(),
        );
        let snap = tokio::task::spawn_blocking(move || exports.snapshot_volume(&volume, &spec))
            .await
            .map_err(|e| format!("copy task failed: {e}"))?;
        let (staging, report) = match snap {
            Ok(s) => s,
            Err(e) => {
                let why = format!("node {}: the copy failed: {e}", self.node);
                let _ = write_frame(&mut tls, &Frame::Failed(why.clone())).await;
                return Err(why);
            }
        };
        let accepted = Accepted {
            bytes: report.bytes,
            files: report.files,
            pause_micros: u64::try_from(report.pause.as_micros()).unwrap_or(u64::MAX),
        };
        write_frame(&mut tls, &Frame::Accepted(accepted)).await?;
        let (tx, mut rx) = mpsc::channel::<Frame>(QUEUE);
        let walker = tokio::task::spawn_blocking(move || {
            let sent = tree::send(&staging.data(), &staging.manifest(), &tx);
            drop(staging); // the snapshot goes as soon as it is sent
            sent
        });
        let mut cut = None;
        while let Some(f) = rx.recv().await {
            if let Frame::Data(d) = &f {
                self.metrics.sent_bytes.inc_by(d.len() as u64);
            }
            if let Err(e) = write_frame(&mut tls, &f).await {
                cut = Some(e);
                break;
            }
        }
        drop(rx);
        let walked = walker
            .await
            .map_err(|e| format!("stream task failed: {e}"))?;
        if let Some(e) = cut {
            return Err(e);
        }
        if let Err(why) = walked {
            let _ = write_frame(&mut tls, &Frame::Failed(why.clone())).await;
            return Err(why);
        }
        let _ = tls.shutdown().await;
        Ok(())
    }

    /// The request check (`objects::peer::check_ask`) with what it needs read: the
    /// controller's key and the claim as the API server has it.
    async fn check(
        &self,
        ask: &Ask,
        peer: &str,
    ) -> Result<(VolumeRequest, String), (&'static str, String)> {
        let signed = self
            .controller_key
            .get()
            .is_some_and(|k| k.verifies(&Message::Request(&ask.request), &ask.request_sig));
        let claim = if ask.namespace.is_empty() || ask.claim.is_empty() {
            None
        } else {
            Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &ask.namespace)
                .get_opt(&ask.claim)
                .await
                .map_err(|e| ("api", format!("cannot read the claim: {e}")))?
        };
        let seen = claim.map(|c| ClaimSeen {
            uid: c.uid().unwrap_or_default(),
            namespace: c.namespace().unwrap_or_default(),
            deleting: c.metadata.deletion_timestamp.is_some(),
            request: annotation(&c, REQUEST).map(str::to_owned),
        });
        wire::check_ask(ask, signed, peer, seen.as_ref()).map_err(|why| ("ask", why))
    }
}
