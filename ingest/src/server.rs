//! The HTTP/1.1 server loop, in place of `axum::serve`, which has no knobs for slow clients:
//! at most [`ServerLimits::max_connections`] connections are open at once (past that the
//! loop stops accepting, and new connections wait in the kernel's backlog), each connection
//! must deliver a request's headers within [`ServerLimits::header_timeout`] (hyper's
//! `header_read_timeout`, which also closes a kept-alive connection idle that long), and a
//! request head may not exceed [`MAX_HEAD_BYTES`] (hyper's read buffer, so also what one
//! connection buffers). Body deadlines and memory are the body layer's (`crate::body`).
//!
//! On shutdown the loop stops accepting, asks every connection to finish its request in
//! flight and close, and returns once all have.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// Largest request head (request line and headers) and read buffer of one connection.
/// Larger heads are answered `431`.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Connection limits.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Time to receive a request's headers, or idle time before the next request.
    pub header_timeout: Duration,
    /// Open connections at once.
    pub max_connections: usize,
}

/// Serves `router` on `listener` until `shutdown` resolves, then finishes in-flight requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let max_connections = limits.max_connections.clamp(1, u32::MAX as usize);
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    let (stop, stopping) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot,
            () = &mut shutdown => break,
        };
        let Ok(slot) = slot else { break };
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                // The only change is to `true`, sent once after the last connection is spawned.
                Ok(()) = stopping.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                // Timeouts, resets and malformed requests: the client's doing, not ours.
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    // Every slot back means every connection has closed.
    let _ = slots.acquire_many(max_connections as u32).await;
    Ok(())
}
