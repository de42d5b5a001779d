//! The agent's own export connections. The kernel programs skip the agent's process, but not the
//! other end: a collector on the same host would be traced receiving every export, one span and a
//! captured request body per batch sent, each batch then carrying the span of the one before.
//! The connector records the local address of every connection it opens, and the connection table
//! ignores a connection whose remote end is one of them (`is_own`), like a filtered-out one.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use hyper::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

/// Export connections remembered: the client pools and keeps few open, so the newest ones are
/// the live ones.
const REMEMBERED: usize = 64;

static OWN: Mutex<VecDeque<SocketAddr>> = Mutex::new(VecDeque::new());
/// Whether `OWN` ever held an address: until then `is_own` takes no lock.
static ANY: AtomicBool = AtomicBool::new(false);

/// The same address whichever family the socket that reports it has (a dual-stack socket reports
/// IPv4 peers as IPv4-mapped IPv6).
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Remembers `local`, the local address of an export connection the agent opened.
pub(crate) fn note(local: SocketAddr) {
    let mut own = OWN.lock().unwrap_or_else(|e| e.into_inner());
    if own.len() == REMEMBERED {
        own.pop_front();
    }
    own.push_back(canonical(local));
    ANY.store(true, Ordering::Release);
}

/// Whether `remote` is the local end of one of the agent's export connections.
pub fn is_own(remote: SocketAddr) -> bool {
    if !ANY.load(Ordering::Acquire) {
        return false;
    }
    let remote = canonical(remote);
    let own = OWN.lock().unwrap_or_else(|e| e.into_inner());
    own.contains(&remote)
}

/// The TCP connector of both exporters (OTLP/HTTP and OTLP/gRPC), which notes each connection's
/// local address before the client sends a byte on it.
#[derive(Clone)]
pub(crate) struct Recording(pub(crate) HttpConnector);

type Connected = TokioIo<TcpStream>;
type ConnectError = <HttpConnector as Service<Uri>>::Error;

impl Service<Uri> for Recording {
    type Response = Connected;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Connected, ConnectError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let io = connecting.await?;
            if let Ok(local) = io.inner().local_addr() {
                note(local);
            }
            Ok(io)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests share the process-wide list: one at a time, so none evicts another's address.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn remote_ends_match_the_newest_noted_local_ends_in_either_family() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let a: SocketAddr = "127.0.0.1:40001".parse().expect("addr");
        note(a);
        assert!(is_own(a));
        // The receiving socket is dual-stack: the same peer, IPv4-mapped.
        assert!(is_own("[::ffff:127.0.0.1]:40001".parse().expect("addr")));
        assert!(!is_own("127.0.0.1:40002".parse().expect("addr")));
        assert!(!is_own("127.0.0.2:40001".parse().expect("addr")));
        // Only the newest are remembered.
        let port = |i: usize| SocketAddr::new([10, 9, 8, 7].into(), 20_000 + i as u16);
        for i in 0..REMEMBERED {
            note(port(i));
        }
        assert!(!is_own(a));
        assert!(is_own(port(0)) && is_own(port(REMEMBERED - 1)));
    }

    #[test]
    fn the_connector_notes_the_local_end_of_what_it_opens() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let uri: Uri = format!("http://{}", listener.local_addr().expect("addr"))
                .parse()
                .expect("uri");
            let io = Recording(HttpConnector::new())
                .call(uri)
                .await
                .expect("connect");
            let (_, peer) = listener.accept().await.expect("accept");
            assert_eq!(peer, io.inner().local_addr().expect("local"));
            assert!(is_own(peer));
        });
    }
}
