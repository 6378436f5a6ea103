//! The async runtime handed to `webrtc`: tokio, except that every UDP socket gets large kernel
//! buffers before it is used.
//!
//! `webrtc` 0.21 binds its sockets itself and offers no buffer setting. With the kernel's
//! default receive buffer (~208 KiB) a keyframe burst of a few hundred packets, arriving while
//! the connection's driver task waits for a core, overflows the socket and the packets are lost
//! (seen as `RcvbufErrors` in /proc/net/snmp during load tests), to be recovered by NACK only
//! after a round trip, or not at all. Media servers routinely ask for megabytes.
//! The runtime trait's `wrap_udp_socket` is the one place every socket passes through.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use webrtc::runtime::{
    AsyncInterval, AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, JoinHandle, Runtime,
    default_runtime,
};

pub struct BufferedRuntime {
    inner: Arc<dyn Runtime>,
    buffer_bytes: usize,
}

impl fmt::Debug for BufferedRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferedRuntime")
            .field("buffer_bytes", &self.buffer_bytes)
            .finish()
    }
}

impl BufferedRuntime {
    /// The tokio runtime with `buffer_bytes` socket buffers, as the trait object `webrtc`
    /// takes; `None` when no async runtime is available.
    pub fn shared(buffer_bytes: usize) -> Option<Arc<dyn Runtime>> {
        Some(Arc::new(Self {
            inner: default_runtime()?,
            buffer_bytes,
        }))
    }
}

impl Runtime for BufferedRuntime {
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        self.inner.spawn(future)
    }

    fn spawn_reactor(
        &self,
        size: usize,
        future: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Box<dyn JoinHandle> {
        self.inner.spawn_reactor(size, future)
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        if self.buffer_bytes > 0 {
            let s = socket2::SockRef::from(&socket);
            // The kernel caps these at net.core.rmem_max / wmem_max; a smaller result is fine.
            if let Err(e) = s.set_recv_buffer_size(self.buffer_bytes) {
                tracing::debug!("SO_RCVBUF: {e}");
            }
            if let Err(e) = s.set_send_buffer_size(self.buffer_bytes) {
                tracing::debug!("SO_SNDBUF: {e}");
            }
        }
        self.inner.wrap_udp_socket(socket)
    }

    fn wrap_tcp_listener(
        &self,
        listener: std::net::TcpListener,
    ) -> io::Result<Arc<dyn AsyncTcpListener>> {
        self.inner.wrap_tcp_listener(listener)
    }

    fn connect_tcp<'a>(
        &'a self,
        remote_addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<Arc<dyn AsyncTcpStream>>> + Send + 'a>> {
        self.inner.connect_tcp(remote_addr)
    }

    fn resolve_host<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        self.inner.resolve_host(host)
    }

    fn now(&self) -> Instant {
        self.inner.now()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.inner.sleep(duration)
    }

    fn interval(&self, period: Duration) -> Box<dyn AsyncInterval> {
        self.inner.interval(period)
    }

    fn block_on(&self, future: Pin<Box<dyn Future<Output = ()> + '_>>) {
        self.inner.block_on(future)
    }

    fn yield_now(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.inner.yield_now()
    }

    fn name(&self) -> &'static str {
        "tokio+buffers"
    }
}
