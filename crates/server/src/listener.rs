//! Accepting connections: at most `--max-connections` at once (beyond it a new connection is
//! closed at once), TCP_NODELAY and keepalive, the TLS handshake (off the accept loop, with a
//! timeout), and an idle timeout: a connection on which no HTTP/2 frame but PINGs has passed in
//! either direction for `--idle-timeout` is closed.
//!
//! Each connection carries a [`ConnectionInfo`] (the peer's address and the client certificate
//! this server's own handshake verified), which calls find in their request extensions.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::tls::Tls;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a call knows of the connection it came on.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// The client certificate chain this server's TLS handshake verified (mTLS), leaf first.
    pub peer_certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// How connections are accepted.
#[derive(Clone)]
pub struct ListenOptions {
    /// TLS, if on.
    pub tls: Option<Arc<Tls>>,
    /// Connections open at once; more are closed at once.
    pub max_connections: usize,
    /// A connection without frames (but PINGs) for this long is closed.
    pub idle_timeout: Duration,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection: its stream, its slot among `--max-connections`, its idle clock.
pub struct Connection {
    io: Io,
    info: ConnectionInfo,
    _slot: OwnedSemaphorePermit,
    idle: Idle,
}

/// Accepts on `listener` until `stop`, yielding connections for the gRPC server.
pub fn incoming(
    listener: TcpListener,
    options: ListenOptions,
    stop: CancellationToken,
) -> (ReceiverStream<std::io::Result<Connection>>, tokio::task::JoinHandle<()>) {
    let (sender, receiver) = mpsc::channel(128);
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let task = tokio::spawn(async move {
        let refused = AtomicU64::new(0);
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: pause rather than spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                // Closed at once: the client sees the connection end and may try another server.
                let count = refused.fetch_add(1, Ordering::Relaxed) + 1;
                if count.is_power_of_two() {
                    tracing::warn!(
                        max_connections = options.max_connections,
                        refused = count,
                        "connection limit reached; closing new connections"
                    );
                }
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
            let sender = sender.clone();
            let idle_timeout = options.idle_timeout;
            match &options.tls {
                None => {
                    let info = ConnectionInfo { remote: Some(remote), peer_certificates: None };
                    let connection =
                        Connection { io: Io::Plain(stream), info, _slot: slot, idle: Idle::new(idle_timeout) };
                    if sender.send(Ok(connection)).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    let acceptor = tls.acceptor().clone();
                    // The handshake runs beside the accept loop; the task ends with it.
                    tokio::spawn(async move {
                        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(error)) => {
                                tracing::debug!(%error, %remote, "TLS handshake refused");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%remote, "TLS handshake timed out");
                                return;
                            }
                        };
                        let peer_certificates =
                            stream.get_ref().1.peer_certificates().map(|chain| Arc::new(chain.to_vec()));
                        let info = ConnectionInfo { remote: Some(remote), peer_certificates };
                        let io = Io::Tls(Box::new(stream));
                        let _ =
                            sender.send(Ok(Connection { io, info, _slot: slot, idle: Idle::new(idle_timeout) })).await;
                    });
                }
            }
        }
    });
    (ReceiverStream::new(receiver), task)
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.idle.expired(cx) {
            // Ends the connection as if the client had closed it.
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = match &mut this.io {
            Io::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        };
        if let Poll::Ready(Ok(())) = polled
            && this.idle.read.feed(&buf.filled()[before..])
        {
            this.idle.touch();
        }
        polled
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = match &mut this.io {
            Io::Plain(stream) => Pin::new(stream).poll_write(cx, bytes),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, bytes),
        };
        if let Poll::Ready(Ok(written)) = polled
            && this.idle.written.feed(&bytes[..written])
        {
            this.idle.touch();
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// When a connection last carried a frame other than a PING, and the timer that ends it.
struct Idle {
    timeout: Duration,
    last_activity: Instant,
    timer: Pin<Box<Sleep>>,
    read: FrameWatcher,
    written: FrameWatcher,
}

impl Idle {
    fn new(timeout: Duration) -> Idle {
        let now = Instant::now();
        Idle {
            timeout,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until(now + timeout)),
            read: FrameWatcher::client_side(),
            written: FrameWatcher::server_side(),
        }
    }

    fn touch(&mut self) {
        self.last_activity = Instant::now();
    }

    /// True once the connection has been idle for the timeout; otherwise arms the timer so that
    /// the task is woken when it would be.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = self.last_activity + self.timeout;
        if Instant::now() >= deadline {
            return true;
        }
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        // Registers the waker; a ready timer here means the deadline passed just now.
        self.timer.as_mut().poll(cx).is_ready()
    }
}

use std::future::Future;

/// Follows the HTTP/2 frames in one direction of a connection, to tell PINGs from real traffic.
struct FrameWatcher {
    /// Bytes of the client's connection preface still to skip.
    preface: usize,
    header: [u8; 9],
    header_filled: usize,
    payload_left: usize,
}

impl FrameWatcher {
    const PREFACE: usize = 24;
    const PING: u8 = 0x6;

    fn client_side() -> FrameWatcher {
        FrameWatcher { preface: Self::PREFACE, header: [0; 9], header_filled: 0, payload_left: 0 }
    }

    fn server_side() -> FrameWatcher {
        FrameWatcher { preface: 0, header: [0; 9], header_filled: 0, payload_left: 0 }
    }

    /// Takes the next bytes of the stream; true if they started a frame that is not a PING.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        let mut active = false;
        while !bytes.is_empty() {
            if self.preface > 0 {
                let skip = self.preface.min(bytes.len());
                self.preface -= skip;
                bytes = &bytes[skip..];
                active = true;
            } else if self.payload_left > 0 {
                let skip = self.payload_left.min(bytes.len());
                self.payload_left -= skip;
                bytes = &bytes[skip..];
            } else {
                let take = (9 - self.header_filled).min(bytes.len());
                self.header[self.header_filled..self.header_filled + take].copy_from_slice(&bytes[..take]);
                self.header_filled += take;
                bytes = &bytes[take..];
                if self.header_filled == 9 {
                    self.header_filled = 0;
                    self.payload_left = usize::from(self.header[0]) << 16
                        | usize::from(self.header[1]) << 8
                        | usize::from(self.header[2]);
                    active |= self.header[3] != Self::PING;
                }
            }
        }
        active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: usize) -> Vec<u8> {
        let mut bytes = vec![(payload >> 16) as u8, (payload >> 8) as u8, payload as u8, kind, 0, 0, 0, 0, 1];
        bytes.extend(std::iter::repeat_n(0u8, payload));
        bytes
    }

    #[test]
    fn frames_are_followed_across_reads_and_pings_do_not_count() {
        let mut client = FrameWatcher::client_side();
        assert!(client.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), "the preface is traffic");
        assert!(!client.feed(&frame(FrameWatcher::PING, 8)));
        let headers = frame(0x1, 300);
        // A frame split over reads at every point is still seen once, at its header.
        let (start, rest) = headers.split_at(5);
        assert!(!client.feed(start));
        assert!(client.feed(&rest[..4]));
        assert!(!client.feed(&rest[4..]));
        let mut both = frame(FrameWatcher::PING, 8);
        both.extend(frame(FrameWatcher::PING, 8));
        assert!(!client.feed(&both));
        both.extend(frame(0x0, 10));
        assert!(FrameWatcher::server_side().feed(&both));
    }
}
