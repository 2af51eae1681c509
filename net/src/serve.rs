//! Client listeners, one per net core. Every net core binds its own socket to the same address
//! with SO_REUSEPORT, so the kernel spreads connections across cores and each connection lives
//! on one core for its whole life (no cross-core hand-off on the request path).

use std::net::SocketAddr;
use std::sync::Arc;

use keel_proto::pb;
use tokio_stream::StreamExt;

use crate::authority::AuthorityFix;
use crate::backend::Backend;
use crate::concurrency::{ElectionService, LockService};
use crate::lease::LeaseService;
use crate::service::{decode_limit_bytes, ClusterService, KvService, MaintenanceService};
use crate::unserved;
use crate::watch::WatchServer;

/// A TCP socket for `addr`'s family, with SO_REUSEADDR.
fn tcp_socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    Ok(sock)
}

/// Fails if another socket already listens on `addr`. The net cores' listeners share their
/// port through SO_REUSEPORT, which would also let a second process join it silently; a plain
/// bind first gives etcd's answer instead.
pub fn ensure_free(addr: SocketAddr) -> std::io::Result<()> {
    bound(addr).map(drop)
}

/// A socket bound to `addr` alone (no SO_REUSEPORT); a taken address fails with etcd's text.
fn bound(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let sock = tcp_socket(addr)?;
    sock.bind(&addr.into()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            std::io::Error::new(e.kind(), "bind: address already in use")
        } else {
            e
        }
    })?;
    Ok(sock)
}

/// A listener on `addr` that no other socket may share (the peer port), refused as
/// `ensure_free` refuses a taken address.
pub fn listen_exclusive(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let sock = bound(addr)?;
    sock.listen(128)?;
    Ok(sock.into())
}

/// Binds a listening socket with SO_REUSEADDR and SO_REUSEPORT.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let sock = tcp_socket(addr)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    Ok(sock.into())
}

/// Serves the etcd gRPC API on `listener` until `shutdown` resolves. Call from inside the
/// net core's tokio runtime.
pub async fn serve<B: Backend>(
    listener: std::net::TcpListener,
    backend: Arc<B>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let listener = tokio::net::TcpListener::from_std(listener).expect("listener into tokio");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        s.map(|s| {
            let _ = s.set_nodelay(true);
            AuthorityFix::new(crate::coalesce::Coalesce::new(s))
        })
    });
    let limit = decode_limit_bytes(backend.limits());
    let gate = {
        let (b, l) = (backend.clone(), backend.clone());
        unserved::Gate {
            learner: Arc::new(move || b.is_learner()),
            has_leader: Arc::new(move || l.has_leader()),
            election_timeout: backend.election_timeout(),
        }
    };
    // gRPC health checking, as etcd registers it: "" (all of etcd's services) is SERVING.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let backend_for_range = backend.clone();
    let mut routes = tonic::service::Routes::builder();
    routes
        .add_service(health_service)
        .add_service(
            pb::kv_server::KvServer::new(KvService::new(backend.clone()))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            pb::maintenance_server::MaintenanceServer::new(MaintenanceService::new(
                backend.clone(),
            ))
            .max_decoding_message_size(limit),
        )
        .add_service(
            keel_proto::v3lockpb::lock_server::LockServer::new(LockService::new(backend.clone()))
                .max_decoding_message_size(limit),
        )
        .add_service(
            keel_proto::v3electionpb::election_server::ElectionServer::new(ElectionService::new(
                backend.clone(),
            ))
            .max_decoding_message_size(limit),
        )
        .add_service(
            pb::lease_server::LeaseServer::new(LeaseService::new(backend.clone()))
                .max_decoding_message_size(limit),
        )
        .add_service(WatchServer::new(backend.clone(), limit))
        .add_service(
            pb::cluster_server::ClusterServer::new(ClusterService::new(backend))
                .max_decoding_message_size(limit),
        );
    let mut routes = routes.routes();
    // KV.Range on its own route (a static path wins over the KV service's wildcard).
    let router = std::mem::take(routes.axum_router_mut());
    *routes.axum_router_mut() = router.route_service(
        crate::range::PATH,
        crate::range::RangeServer::new(backend_for_range, limit),
    );
    unserved::route(routes.axum_router_mut(), gate);
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
