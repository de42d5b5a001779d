//! The agent's own export connections. The kernel programs skip the agent's process, but not the
//! other end: a collector on the same host would be traced receiving every export, one span and a
//! captured request body per batch sent, each batch then carrying the span of the one before.
//! The connector records the local address of every connection it opens and, when the connection
//! is dropped, the time it closed; the connection table ignores a connection whose remote end is
//! one of those addresses, like a filtered-out one, unless the kernel first saw it after that
//! export connection closed: the kernel hands a closed connection's port to later connections of
//! other processes, which are not the agent's (a proxy's upstream connection that reused one was
//! ignored, with the spans of its requests). While an export connection is open its port is its
//! own: the connector binds it before connecting (see [`Recording::new`]).

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected as ConnectedInfo, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::agent::monotonic_ns;

/// Export connections remembered: the client pools and keeps few open, so the newest ones are
/// the live ones.
const REMEMBERED: usize = 64;

/// One export connection: its local address, and when it closed (`CLOCK_MONOTONIC` ns, the
/// kernel's clock for connection ids), 0 while open.
struct Own {
    local: SocketAddr,
    closed_ns: Arc<AtomicU64>,
}

static OWN: Mutex<VecDeque<Own>> = Mutex::new(VecDeque::new());
/// Whether `OWN` ever held an address: until then `is_own` takes no lock.
static ANY: AtomicBool = AtomicBool::new(false);

/// The same address whichever family the socket that reports it has (a dual-stack socket reports
/// IPv4 peers as IPv4-mapped IPv6).
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Remembers `local`, the local address of an export connection the agent opened; the returned
/// cell takes the time it closes ([`Tracked`]).
pub(crate) fn note(local: SocketAddr) -> Arc<AtomicU64> {
    let closed_ns = Arc::new(AtomicU64::new(0));
    let mut own = OWN.lock().unwrap_or_else(|e| e.into_inner());
    if own.len() == REMEMBERED {
        own.pop_front();
    }
    own.push_back(Own {
        local: canonical(local),
        closed_ns: Arc::clone(&closed_ns),
    });
    ANY.store(true, Ordering::Release);
    closed_ns
}

/// Whether `remote` is the local end of one of the agent's export connections, for a connection
/// the kernel first saw at `first_seen_ns` (its connection id): one that began after that export
/// connection closed only reuses its port.
pub fn is_own(remote: SocketAddr, first_seen_ns: u64) -> bool {
    if !ANY.load(Ordering::Acquire) {
        return false;
    }
    let remote = canonical(remote);
    let own = OWN.lock().unwrap_or_else(|e| e.into_inner());
    own.iter().any(|o| {
        let closed = o.closed_ns.load(Ordering::Acquire);
        o.local == remote && (closed == 0 || first_seen_ns <= closed)
    })
}

/// An export connection's stream: notes the time it closes when the client drops it.
pub(crate) struct Tracked {
    io: TokioIo<TcpStream>,
    closed_ns: Arc<AtomicU64>,
}

impl Tracked {
    #[cfg(test)]
    fn stream(&self) -> &TcpStream {
        self.io.inner()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // Before the socket closes (the stream is dropped after this): a connection the kernel
        // first sees later cannot be this one.
        self.closed_ns.store(monotonic_ns(), Ordering::Release);
    }
}

impl Read for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl Connection for Tracked {
    fn connected(&self) -> ConnectedInfo {
        self.io.connected()
    }
}

/// The TCP connector of both exporters (OTLP/HTTP and OTLP/gRPC), which notes each connection's
/// local address before the client sends a byte on it.
#[derive(Clone)]
pub(crate) struct Recording(HttpConnector);

impl Recording {
    /// `connector`, binding each socket to a port of its own before it connects. A port that
    /// connect(2) chooses the kernel also gives to other sockets connecting elsewhere while this
    /// one is open, and the receiving end of such a connection has the export connection's
    /// address as its remote end: a proxy's upstream connection was ignored as the agent's, with
    /// its requests' spans. A port bound first is never shared that way.
    pub(crate) fn new(mut connector: HttpConnector) -> Self {
        connector.set_local_addresses(Ipv4Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED);
        Recording(connector)
    }
}

type ConnectError = <HttpConnector as Service<Uri>>::Error;

impl Service<Uri> for Recording {
    type Response = Tracked;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Tracked, ConnectError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let io = connecting.await?;
            // An address that cannot be read is never matched: the cell stays unlisted.
            let closed_ns = match io.inner().local_addr() {
                Ok(local) => note(local),
                Err(_) => Arc::new(AtomicU64::new(0)),
            };
            Ok(Tracked { io, closed_ns })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests share the process-wide list: one at a time, so none evicts another's address.
    static SERIAL: Mutex<()> = Mutex::new(());

    /// Runs `f` to completion on a runtime of the calling thread.
    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn remote_ends_match_the_newest_noted_local_ends_in_either_family() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let a: SocketAddr = "127.0.0.1:40001".parse().expect("addr");
        let _open = note(a);
        assert!(is_own(a, 5));
        // The receiving socket is dual-stack: the same peer, IPv4-mapped.
        assert!(is_own("[::ffff:127.0.0.1]:40001".parse().expect("addr"), 5));
        assert!(!is_own("127.0.0.1:40002".parse().expect("addr"), 5));
        assert!(!is_own("127.0.0.2:40001".parse().expect("addr"), 5));
        // Only the newest are remembered.
        let port = |i: usize| SocketAddr::new([10, 9, 8, 7].into(), 20_000 + i as u16);
        let cells: Vec<_> = (0..REMEMBERED).map(|i| note(port(i))).collect();
        assert!(!is_own(a, 5));
        assert!(is_own(port(0), 5) && is_own(port(REMEMBERED - 1), 5));
        drop(cells);
    }

    #[test]
    fn a_closed_export_connections_port_is_not_the_agents_for_later_connections() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let a: SocketAddr = "127.0.0.1:40101".parse().expect("addr");
        let closed = note(a);
        closed.store(1_000, Ordering::Release);
        // The collector's end of the export connection, seen while it was open.
        assert!(is_own(a, 999));
        assert!(is_own(a, 1_000));
        // Another process's connection that got the port after it closed.
        assert!(!is_own(a, 1_001));
        // A newer export connection on the same port is the agent's again.
        let _reopened = note(a);
        assert!(is_own(a, 5_000));
    }

    /// In a network namespace of its own with one local port: while the export connection holds
    /// it, another connection to another destination cannot have it.
    #[test]
    fn an_export_connections_port_is_not_shared_while_it_is_open() {
        // The connector notes the address it opens from.
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: plain syscall.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "needs root (a network namespace)"
        );
        std::thread::spawn(|| {
            // SAFETY: moves this thread alone into a new network namespace; the sockets and the
            // processes it makes from here on are in it.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .expect("run ip");
            assert!(up.success(), "ip link set lo up: {up}");
            std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "40000 40000")
                .expect("set the local port range");
            block_on(async {
                let collector = tokio::net::TcpListener::bind("127.0.0.1:41000")
                    .await
                    .expect("bind");
                let other = std::net::TcpListener::bind("127.0.0.1:41001").expect("bind");
                let io = Recording::new(HttpConnector::new())
                    .call("http://127.0.0.1:41000".parse().expect("uri"))
                    .await
                    .expect("connect");
                let local = io.stream().local_addr().expect("local");
                assert_eq!(local.port(), 40000);
                match std::net::TcpStream::connect(other.local_addr().expect("addr")) {
                    Err(e) => assert_eq!(e.kind(), io::ErrorKind::AddrNotAvailable, "{e}"),
                    Ok(s) => panic!(
                        "another connection got the export connection's port: {:?}",
                        s.local_addr()
                    ),
                }
                drop(collector);
            });
        })
        .join()
        .expect("the namespace's thread");
    }

    #[test]
    fn the_connector_notes_the_local_end_of_what_it_opens_and_when_it_closes() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let uri: Uri = format!("http://{}", listener.local_addr().expect("addr"))
                .parse()
                .expect("uri");
            let io = Recording::new(HttpConnector::new())
                .call(uri)
                .await
                .expect("connect");
            let (_, peer) = listener.accept().await.expect("accept");
            assert_eq!(peer, io.stream().local_addr().expect("local"));
            let seen = monotonic_ns();
            assert!(is_own(peer, seen));
            drop(io);
            assert!(is_own(peer, seen), "first seen while it was open");
            assert!(!is_own(peer, monotonic_ns()), "first seen after it closed");
        });
    }
}
