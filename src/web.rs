//! HTTP/1.1 serving on top of the common accept loop ([`crate::server::serve`]), in
//! plain text or TLS. Routes are plain functions from a request with its whole body to
//! a response; bodies are capped so a client cannot make us buffer without bound.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Largest request body any route accepts. Scheduler extender calls carry a pod and a
/// list of node names (a full NodeList when the scheduler is not node-cache capable),
/// which stays well under this for thousands of nodes.
pub const MAX_BODY: usize = 32 << 20;

/// A route table: request in, response out.
pub trait Routes: Send + Sync + 'static {
    fn handle(&self, req: Request<Bytes>) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// Serves `routes` on `listener` until `shutdown` fires, over TLS when `tls` is given.
pub async fn serve<R: Routes>(
    name: &'static str,
    listener: TcpListener,
    max_connections: usize,
    tls: Option<TlsAcceptor>,
    routes: Arc<R>,
    shutdown: CancellationToken,
) {
    crate::server::serve(
        name,
        listener,
        max_connections,
        shutdown,
        move |stream, peer, shutdown| {
            let (routes, tls) = (routes.clone(), tls.clone());
            // Replies go out in more than one write (TLS records, headers and body);
            // without this, Nagle's algorithm holds the last one for the peer's delayed
            // ACK, about 40 ms per call.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(server = name, error = %e, "cannot set TCP_NODELAY");
            }
            async move {
                match tls {
                    None => connection(name, stream, routes, shutdown).await,
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => connection(name, stream, routes, shutdown).await,
                        Err(e) => {
                            tracing::debug!(server = name, %peer, error = %e, "TLS handshake failed")
                        }
                    },
                }
            }
        },
    )
    .await;
}

async fn connection<S, R>(
    name: &'static str,
    stream: S,
    routes: Arc<R>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    R: Routes,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let routes = routes.clone();
        async move {
            let (parts, body) = req.into_parts();
            let resp = match Limited::new(body, MAX_BODY).collect().await {
                Ok(body) => {
                    routes
                        .handle(Request::from_parts(parts, body.to_bytes()))
                        .await
                }
                Err(e) => text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("cannot read the request body: {e}\n"),
                ),
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(server = name, error = %e, "connection ended with an error");
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_type(status, body.into(), "text/plain; charset=utf-8")
}

/// A JSON response.
pub fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    with_type(status, body.into(), "application/json")
}

/// A response with a body of the given content type.
pub fn with_type(
    status: StatusCode,
    body: Bytes,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}
