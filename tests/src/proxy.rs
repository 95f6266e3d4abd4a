//! A TCP proxy between a client and a component, to make the network fail
//! on cue: [`TcpProxy::freeze`] stops every byte both ways while keeping the
//! connections open (a client that vanished without closing), and
//! [`TcpProxy::cut_after_response_headers`] drops the connection as the
//! server's first response to a call starts (a call whose answer is lost),
//! [`TcpProxy::stop`] closes every connection and refuses new ones until
//! [`TcpProxy::resume`] (a server that is down). [`TcpProxy::connections`]
//! counts the connections forwarded, to see that a client came through it.
//! [`TcpProxy::inject`] makes the network unreliable: every chunk of bytes
//! forwarded is delayed, and now and then a connection is reset or goes
//! silent ([`Faults`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What an unreliable network does to the bytes a proxy forwards; checked
/// for each chunk read from either side.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// A chunk waits up to this long (drawn uniformly) before it is
    /// forwarded; order is kept.
    pub latency: Duration,
    /// One chunk in this many resets its connection instead (both sides
    /// get a TCP RST); 0 never.
    pub reset_one_in: u32,
    /// One chunk in this many is dropped with everything after it on its
    /// connection, both ways, while the sockets stay open: a link that went
    /// dark without telling either side; 0 never.
    pub drop_one_in: u32,
}

/// The faults a proxy injected so far.
#[derive(Debug, Default)]
pub struct Injected {
    resets: AtomicU64,
    drops: AtomicU64,
    refused: AtomicU64,
}

impl Injected {
    /// Connections reset.
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }

    /// Connections gone dark.
    pub fn drops(&self) -> u64 {
        self.drops.load(Ordering::Relaxed)
    }

    /// Connections refused while stopped.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// A proxy listening on loopback, forwarding to one address.
pub struct TcpProxy {
    /// `http://` URL of the proxy.
    pub url: String,
    /// `host:port` of the proxy.
    pub address: SocketAddr,
    frozen: watch::Sender<bool>,
    down: watch::Sender<bool>,
    cut_next_response: Arc<AtomicBool>,
    connections: watch::Sender<usize>,
    faults: watch::Sender<Faults>,
    injected: Arc<Injected>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts forwarding connections to `target` (an `http://host:port` URL).
    pub async fn start(target: &str) -> TcpProxy {
        let target: SocketAddr = target
            .trim_start_matches("http://")
            .parse()
            .unwrap_or_else(|error| panic!("proxy target {target:?}: {error}"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let url = format!("http://{address}");
        let frozen = watch::channel(false).0;
        let down = watch::channel(false).0;
        let cut_next_response = Arc::new(AtomicBool::new(false));
        let connections = watch::channel(0).0;
        let faults = watch::channel(Faults::default()).0;
        let injected = Arc::new(Injected::default());
        let accept = {
            let frozen = frozen.clone();
            let down = down.clone();
            let connections = connections.clone();
            let faults = faults.clone();
            let injected = Arc::clone(&injected);
            let cut = Arc::clone(&cut_next_response);
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if *down.borrow() {
                        // Refused: closed at once.
                        injected.refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(target).await else {
                        continue;
                    };
                    connections.send_modify(|count| *count += 1);
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let link = Arc::new(Link::default());
                    let watching = || Watch {
                        frozen: frozen.subscribe(),
                        down: down.subscribe(),
                        faults: faults.subscribe(),
                        injected: Arc::clone(&injected),
                        link: Arc::clone(&link),
                    };
                    tokio::spawn(pump(client_read, server_write, watching(), None));
                    tokio::spawn(pump(
                        server_read,
                        client_write,
                        watching(),
                        Some(Arc::clone(&cut)),
                    ));
                }
            })
        };
        TcpProxy {
            url,
            address,
            frozen,
            down,
            cut_next_response,
            connections,
            faults,
            injected,
            accept,
        }
    }

    /// Injects `faults` on every connection from now on (existing ones
    /// too); `Faults::default()` makes the network reliable again.
    pub fn inject(&self, faults: Faults) {
        self.faults.send_replace(faults);
    }

    /// The faults injected (and connections refused) so far.
    pub fn injected(&self) -> Arc<Injected> {
        Arc::clone(&self.injected)
    }

    /// The number of connections forwarded so far, as it changes.
    pub fn connections(&self) -> watch::Receiver<usize> {
        self.connections.subscribe()
    }

    /// Closes every connection and refuses new ones, as a server that went
    /// down, until [`TcpProxy::resume`].
    pub fn stop(&self) {
        self.down.send_replace(true);
    }

    /// Accepts and forwards connections again after [`TcpProxy::stop`].
    pub fn resume(&self) {
        self.down.send_replace(false);
    }

    /// Stops forwarding anything, both ways, on every connection; the
    /// sockets stay open, as with a peer that vanished.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Forwards new connections again after [`TcpProxy::freeze`]; the
    /// frozen ones stay silent until [`TcpProxy::stop`] closes them.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// The next time a server starts answering a call (an HTTP/2 HEADERS
    /// frame on a stream), the connection is dropped instead: the call was
    /// served, its answer is lost.
    pub fn cut_after_response_headers(&self) {
        self.cut_next_response.store(true, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The length of an HTTP/2 frame header.
const FRAME_HEADER: usize = 9;
/// The HTTP/2 HEADERS frame type.
const HEADERS: u8 = 1;

/// What a connection's pumps watch.
struct Watch {
    frozen: watch::Receiver<bool>,
    down: watch::Receiver<bool>,
    faults: watch::Receiver<Faults>,
    injected: Arc<Injected>,
    link: Arc<Link>,
}

/// What the two pumps of one connection share.
#[derive(Default)]
struct Link {
    /// Reset: both pumps end, their sockets closed with a RST.
    reset: tokio_util::sync::CancellationToken,
    /// Gone dark: nothing more is forwarded either way.
    dark: AtomicBool,
}

/// Whether one chunk in `one_in` is hit (0: none is).
fn hits(rng: &mut fastrand::Rng, one_in: u32) -> bool {
    one_in > 0 && rng.u32(..one_in) == 0
}

/// Copies `from` to `to` until either ends or the proxy stops; holds
/// everything once frozen. With `cut`, parses the HTTP/2 frames going
/// through and drops the connection at the first HEADERS frame of a stream
/// once `cut` is set.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut watch: Watch,
    cut: Option<Arc<AtomicBool>>,
) {
    let Watch {
        frozen,
        down,
        faults,
        injected,
        link,
    } = &mut watch;
    let mut buffer = vec![0_u8; 64 * 1024];
    let mut frames = FrameCursor::default();
    let mut rng = fastrand::Rng::new();
    loop {
        if *down.borrow_and_update() {
            // Both halves are dropped: the connection closes.
            return;
        }
        if *frozen.borrow_and_update() {
            // Hold the sockets open and silent until the test ends or the
            // proxy stops.
            let _ = down.wait_for(|down| *down).await;
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = frozen.changed() => continue,
            _ = down.changed() => continue,
            () = link.reset.cancelled() => return,
        };
        let Ok(n_read) = read else { return };
        if n_read > 0 {
            let faults = *faults.borrow_and_update();
            if link.dark.load(Ordering::SeqCst) {
                // Read and thrown away, until a side closes.
                continue;
            }
            if hits(&mut rng, faults.reset_one_in) {
                injected.resets.fetch_add(1, Ordering::Relaxed);
                let _ = from.as_ref().set_zero_linger();
                let _ = to.as_ref().set_zero_linger();
                link.reset.cancel();
                return;
            }
            if hits(&mut rng, faults.drop_one_in) {
                injected.drops.fetch_add(1, Ordering::Relaxed);
                link.dark.store(true, Ordering::SeqCst);
                continue;
            }
            if !faults.latency.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(faults.latency.mul_f64(rng.f64())) => {}
                    () = link.reset.cancelled() => return,
                }
            }
        }
        if n_read == 0 || *frozen.borrow() {
            if n_read == 0 {
                let _ = to.shutdown().await;
                return;
            }
            continue;
        }
        let chunk = &buffer[..n_read];
        if let Some(cut) = &cut
            && cut.load(Ordering::SeqCst)
            && let Some(offset) = frames.find_stream_headers(chunk)
        {
            cut.store(false, Ordering::SeqCst);
            // Forward what came before the answer, then hang up.
            let _ = to.write_all(&chunk[..offset]).await;
            return;
        }
        if cut.is_some() {
            frames.advance(chunk);
        }
        if to.write_all(chunk).await.is_err() {
            return;
        }
    }
}

/// Follows HTTP/2 frame boundaries in a byte stream from a server (which,
/// unlike a client, sends no preface: its first bytes are a frame).
#[derive(Default)]
struct FrameCursor {
    /// Bytes to skip before the next frame header starts.
    skip: usize,
    /// A frame header split across reads.
    partial: Vec<u8>,
}

impl FrameCursor {
    /// The offset in `chunk` of a frame header that starts a HEADERS frame
    /// on a stream (not the connection), if one starts in `chunk`; does not
    /// advance.
    fn find_stream_headers(&self, chunk: &[u8]) -> Option<usize> {
        let mut probe = FrameCursor {
            skip: self.skip,
            partial: self.partial.clone(),
        };
        probe.walk(chunk)
    }

    /// Moves past `chunk`.
    fn advance(&mut self, chunk: &[u8]) {
        let _ = self.walk(chunk);
    }

    fn walk(&mut self, chunk: &[u8]) -> Option<usize> {
        let mut offset = 0;
        while offset < chunk.len() {
            if self.skip > 0 {
                let skipped = self.skip.min(chunk.len() - offset);
                self.skip -= skipped;
                offset += skipped;
                continue;
            }
            let wanted = FRAME_HEADER - self.partial.len();
            let taken = wanted.min(chunk.len() - offset);
            self.partial
                .extend_from_slice(&chunk[offset..offset + taken]);
            offset += taken;
            if self.partial.len() < FRAME_HEADER {
                return None;
            }
            let header = std::mem::take(&mut self.partial);
            let length =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let stream_id =
                u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
            if header[3] == HEADERS && stream_id != 0 {
                // A header split across reads started in an earlier chunk:
                // then cut at the start of this one.
                return Some(offset.saturating_sub(FRAME_HEADER));
            }
            self.skip = length;
        }
        None
    }
}
