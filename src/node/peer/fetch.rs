//! The receiving end of the peer channel: [`Peer::fetch`] connects to the source
//! node's agent, proves who it is, presents the claim's request and builds the clone
//! from the stream (`tree::receive`). The conversation is in `objects::peer`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim};
use kube::ResourceExt;
use kube::api::Api;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

use super::{
    COPY_TIMEOUT, FetchError, Fetched, IO_TIMEOUT, Peer, QUEUE, TLS_NAME, read_frame, tree,
    write_frame,
};
use crate::kubeclient::annotation;
use crate::objects::keys::{REQUEST, REQUEST_SIG};
use crate::objects::peer::{
    self as wire, Ask, BINDING_LEN, EXPORTER_LABEL, Frame, RECEIVER, SOURCE,
};
use crate::objects::request::VolumeRequest;
use crate::volume::Owner;

impl Peer {
    /// Makes the clone `request` asks for (its source on node `from`) by streaming it
    /// from that node's agent, for `owner`.
    pub async fn fetch(
        &self,
        pvc: &PersistentVolumeClaim,
        request: &VolumeRequest,
        from: &str,
        owner: Owner,
    ) -> Result<Fetched, FetchError> {
        let started = Instant::now();
        let failed = FetchError::Failed;
        let agent = self
            .agent_of(from)
            .await
            .map_err(failed)?
            .ok_or_else(|| failed(format!("node {from} has no agent heartbeat")))?;
        let (Some(key), Some(port)) = (agent.key, agent.peer_port) else {
            return Err(failed(format!(
                "node {from}'s agent does not serve clones to other nodes (upgrade it)"
            )));
        };
        let node = Api::<Node>::all(self.client.clone())
            .get(from)
            .await
            .map_err(|e| failed(format!("read node {from}: {e}")))?;
        let ip: std::net::IpAddr = crate::kubeclient::internal_ips(&node)
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| failed(format!("node {from} has no InternalIP")))?;
        let addr = SocketAddr::new(ip, port);
        let tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| failed(format!("connect to {addr} timed out")))?
            .map_err(|e| failed(format!("connect to node {from}'s agent at {addr}: {e}")))?;
        let name = ServerName::try_from(TLS_NAME)
            .map_err(|e| failed(format!("TLS name: {e}")))?
            .to_owned();
        let mut tls = tokio::time::timeout(
            IO_TIMEOUT,
            TlsConnector::from(self.client_tls.clone()).connect(name, tcp),
        )
        .await
        .map_err(|_| failed("TLS handshake timed out".into()))?
        .map_err(|e| failed(format!("TLS handshake with {addr}: {e}")))?;
        let ekm = tls
            .get_ref()
            .1
            .export_keying_material([0u8; BINDING_LEN], EXPORTER_LABEL, None)
            .map_err(|e| failed(format!("export keying material: {e}")))?;
        let hello = wire::hello(&self.signer, RECEIVER, &self.node, &ekm);
        write_frame(&mut tls, &Frame::Hello(hello))
            .await
            .map_err(failed)?;
        match read_frame(&mut tls, IO_TIMEOUT).await.map_err(failed)? {
            Frame::Hello(h)
                if h.node == from && wire::hello_verifies(&h, SOURCE, &ekm, Some(&key)) => {}
            // Before the source has proven who it is, nothing it says is final:
            // whatever answers on that port could refuse every clone otherwise.
            Frame::Refused(why) => {
                return Err(failed(format!(
                    "node {from}'s agent (not yet verified) refused: {why}"
                )));
            }
            Frame::Failed(why) => return Err(failed(why)),
            _ => {
                return Err(failed(format!(
                    "whatever answers at {addr} is not node {from}'s agent (its hello does not verify)"
                )));
            }
        }
        let ask = Ask {
            namespace: pvc.namespace().unwrap_or_default(),
            claim: pvc.name_any(),
            request: annotation(pvc, REQUEST).unwrap_or_default().to_owned(),
            request_sig: annotation(pvc, REQUEST_SIG).unwrap_or_default().to_owned(),
        };
        write_frame(&mut tls, &Frame::Ask(ask))
            .await
            .map_err(failed)?;
        let accepted = match read_frame(&mut tls, COPY_TIMEOUT).await.map_err(failed)? {
            Frame::Accepted(a) => a,
            Frame::Refused(why) => {
                return Err(FetchError::Refused(format!(
                    "node {from}'s agent refused: {why}"
                )));
            }
            Frame::Failed(why) => return Err(failed(why)),
            other => {
                return Err(failed(format!(
                    "unexpected {} from node {from}'s agent",
                    tree::frame_name(&other)
                )));
            }
        };
        let (tx, mut rx) = mpsc::channel::<Frame>(QUEUE);
        let (exports, spec) = (self.exports.clone(), request.spec.clone());
        let writer =
            tokio::task::spawn_blocking(move || tree::receive(&exports, &spec, &owner, &mut rx));
        let mut cut = None;
        loop {
            let f = match read_frame(&mut tls, IO_TIMEOUT).await {
                Ok(f) => f,
                Err(e) => {
                    cut = Some(e);
                    break;
                }
            };
            let last = matches!(f, Frame::Done | Frame::Failed(_));
            if let Frame::Data(d) = &f {
                self.metrics.received_bytes.inc_by(d.len() as u64);
            }
            if tx.send(f).await.is_err() || last {
                break; // the writer stopped (it says why) or the stream is complete
            }
        }
        drop(tx);
        let made = writer
            .await
            .map_err(|e| failed(format!("receive task failed: {e}")))?;
        let _ = tls.shutdown().await;
        match made {
            Ok((meta, got)) => Ok(Fetched {
                meta,
                bytes: got.bytes,
                files: got.files,
                pause: Duration::from_micros(accepted.pause_micros),
                took: started.elapsed(),
                from: from.to_owned(),
            }),
            Err(why) => Err(failed(match cut {
                Some(c) => format!("{c}; {why}"),
                None => why,
            })),
        }
    }
}
