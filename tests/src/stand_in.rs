//! Blocking stand-ins for the validator's services and for a slow link, run on plain threads
//! over sockets made inside a namespace (see [`crate::netns::Topology::enter`]). Each stops
//! when dropped.
#![allow(clippy::disallowed_methods)] // plain deadlines in test helpers; the clock rule is for relay-core

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};

use crate::payload_blocks;

/// Threads serving until dropped.
pub struct StandIn {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// How often a stopped stand-in notices.
const POLL: Duration = Duration::from_millis(50);

/// Accept on `listener` and run `handle` on a thread per connection until dropped.
pub fn serve_each(
    listener: TcpListener,
    handle: impl Fn(TcpStream) + Send + Sync + 'static,
) -> StandIn {
    let handle = Arc::new(handle);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    listener.set_nonblocking(true).unwrap();
    let thread = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((tcp, _)) => {
                    tcp.set_nonblocking(false).unwrap();
                    let handle = handle.clone();
                    std::thread::spawn(move || handle(tcp));
                }
                // Wait for the next connection, waking at once when it comes (a sleep here
                // would add its length to every connection's latency in the benchmarks'
                // and tests' reports), and every POLL to notice a stop.
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let mut fds = [PollFd::new(&listener, PollFlags::IN)];
                    let timeout = Timespec::try_from(POLL).expect("invariant: POLL fits");
                    let _ = poll(&mut fds, Some(&timeout));
                }
                Err(_) => std::thread::sleep(POLL),
            }
        }
    });
    StandIn {
        stop,
        threads: vec![thread],
    }
}

/// Echoes every byte; half-closes when the client does.
#[must_use]
pub fn echo(listener: TcpListener) -> StandIn {
    serve_each(listener, echo_to_end)
}

/// Echo every byte until the client's end of stream, then half-close.
pub fn echo_to_end(mut tcp: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tcp.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = tcp.shutdown(Shutdown::Write);
}

/// A public peer that says whom it sees: it writes the connection's source address and a
/// newline, then echoes every byte (half-closing when the client does).
#[must_use]
pub fn teller(listener: TcpListener) -> StandIn {
    serve_each(listener, |mut tcp| {
        let Ok(peer) = tcp.peer_addr() else { return };
        if writeln!(tcp, "{}", peer.ip()).is_ok() {
            echo_to_end(tcp);
        }
    })
}

/// The same for an HTTP client (such as curl): any request is answered `200` with the
/// connection's source address as the body.
#[must_use]
pub fn http_teller(listener: TcpListener) -> StandIn {
    serve_each(listener, |mut tcp| {
        let Ok(peer) = tcp.peer_addr() else { return };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            match tcp.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let body = peer.ip().to_string();
        let _ = write!(
            tcp,
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    })
}

/// Read the line a [`teller`] writes first: the address it saw.
pub fn told(tcp: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        tcp.read_exact(&mut byte)?;
        if byte[0] == b'\n' {
            return String::from_utf8(line).map_err(|e| std::io::Error::other(e.to_string()));
        }
        line.push(byte[0]);
        if line.len() > 64 {
            return Err(std::io::Error::other("no address line"));
        }
    }
}

/// Writes `tag` first, then echoes: tells which of two validators answered.
#[must_use]
pub fn tagged_echo(listener: TcpListener, tag: &'static [u8]) -> StandIn {
    serve_each(listener, move |mut tcp| {
        if tcp.write_all(tag).is_ok() {
            let _ = std::io::copy(&mut tcp.try_clone().unwrap(), &mut tcp);
        }
    })
}

/// An HTTP JSON-RPC stand-in for a node's RPC port: answers each `POST` with
/// `{"jsonrpc":"2.0","id":<the request's id>,"result":"0x1"}`, HTTP/1.1 keep-alive. Test
/// fixture only: it trusts its input.
#[must_use]
pub fn jsonrpc(listener: TcpListener) -> StandIn {
    serve_each(listener, |mut tcp| {
        let mut pending = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                match tcp.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
                continue;
            };
            let length = content_length(&pending[..end]);
            while pending.len() < end + 4 + length {
                match tcp.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
            }
            let body = String::from_utf8_lossy(&pending[end + 4..end + 4 + length]).into_owned();
            pending.drain(..end + 4 + length);
            let id = json_id(&body).unwrap_or_else(|| "null".into());
            let answer = format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":\"0x1\"}}");
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                answer.len()
            );
            if tcp.write_all(response.as_bytes()).is_err() {
                return;
            }
        }
    })
}

/// The `Content-Length` of an HTTP head (0 when absent).
fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .to_lowercase()
        .lines()
        .find_map(|l| l.strip_prefix("content-length:").map(str::to_owned))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The raw value of a top-level numeric `"id"` in a small JSON object.
#[must_use]
pub fn json_id(body: &str) -> Option<String> {
    let at = body.find("\"id\"")? + 4;
    let rest = body[at..].trim_start().strip_prefix(':')?.trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!digits.is_empty()).then_some(digits)
}

/// One JSON-RPC call over `tcp` (keep-alive); the response body.
pub fn jsonrpc_call(tcp: &mut TcpStream, id: u64) -> std::io::Result<String> {
    let body = format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"icx_getLastBlock\"}}");
    let request = format!(
        "POST /api/v3 HTTP/1.1\r\nhost: sentry\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes())?;
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let length = content_length(&pending[..end]);
            if pending.len() >= end + 4 + length {
                return Ok(String::from_utf8_lossy(&pending[end + 4..end + 4 + length]).into());
            }
        }
        let n = tcp.read(&mut buf)?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

/// Send `len` payload bytes from `seed` through an echo service behind `tcp` while reading
/// the echo back; whether everything came back intact (length and SHA-256).
pub fn echo_roundtrip(tcp: TcpStream, seed: u64, len: usize) -> std::io::Result<bool> {
    let mut writer = tcp.try_clone()?;
    let sender = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
        for block in payload_blocks(seed, len) {
            sha.update(&block);
            writer.write_all(&block)?;
        }
        writer.shutdown(Shutdown::Write)?;
        Ok(sha.finish().as_ref().to_vec())
    });
    let mut reader = tcp;
    let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    let read = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                sha.update(&buf[..n]);
                total += n;
            }
            Err(e) => break Err(e),
        }
    };
    let sent = sender.join().expect("sender thread")?;
    read?;
    Ok(total == len && sha.finish().as_ref() == sent.as_slice())
}

/// A slow link for the tunnel's UDP flow, inside the router: every datagram is held for
/// `delay` in each direction. The router sends the validator's flow to `listen` (a DNAT
/// rule), and the link forwards it from a socket of its own, `upstream`, connected to the
/// sentry. Each direction's queue is bounded (a full queue drops, as a router's does).
///
/// This exists because the kernel here has no `netem` qdisc; loss is added by the kernel
/// (iptables `statistic`), delay by this link.
pub struct SlowLink {
    _stand_in: StandIn,
}

/// Datagrams one direction may hold (about 150 ms at 1 Gbit/s of full-size packets).
const LINK_QUEUE: usize = 16 * 1024;

type Queue = Arc<(Mutex<VecDeque<(Instant, Vec<u8>)>>, Condvar)>;

impl SlowLink {
    /// Start relaying between `lan` (bound to the DNAT target in the router) and `upstream`
    /// (bound in the router and connected to the sentry's QUIC address).
    #[must_use]
    pub fn start(lan: UdpSocket, upstream: UdpSocket, delay: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let agent: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let to_sentry: Queue = Arc::default();
        let to_agent: Queue = Arc::default();
        for socket in [&lan, &upstream] {
            socket.set_read_timeout(Some(POLL)).unwrap();
        }
        let mut threads = Vec::new();
        // Receivers: stamp and queue.
        {
            let (lan, stop, agent, queue) = (
                lan.try_clone().unwrap(),
                stop.clone(),
                agent.clone(),
                to_sentry.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = lan.recv_from(&mut buf) {
                        *agent.lock().unwrap() = Some(from);
                        enqueue(&queue, delay, &buf[..n]);
                    }
                }
            }));
        }
        {
            let (upstream, stop, queue) = (
                upstream.try_clone().unwrap(),
                stop.clone(),
                to_agent.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = upstream.recv(&mut buf) {
                        enqueue(&queue, delay, &buf[..n]);
                    }
                }
            }));
        }
        // Senders: wait until each datagram is due, in order.
        {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                drain(&to_sentry, &stop, |packet| {
                    let _ = upstream.send(packet);
                });
            }));
        }
        {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                drain(&to_agent, &stop, |packet| {
                    if let Some(to) = *agent.lock().unwrap() {
                        let _ = lan.send_to(packet, to);
                    }
                });
            }));
        }
        Self {
            _stand_in: StandIn { stop, threads },
        }
    }
}

fn enqueue(queue: &Queue, delay: Duration, packet: &[u8]) {
    let (lock, ready) = &**queue;
    let mut q = lock.lock().unwrap();
    if q.len() < LINK_QUEUE {
        q.push_back((Instant::now() + delay, packet.to_vec()));
        ready.notify_one();
    }
}

fn drain(queue: &Queue, stop: &AtomicBool, mut send: impl FnMut(&[u8])) {
    let (lock, ready) = &**queue;
    while !stop.load(Ordering::Relaxed) {
        let mut q = lock.lock().unwrap();
        let now = Instant::now();
        match q.front() {
            Some((due, _)) if *due <= now => {
                let (_, packet) = q.pop_front().unwrap();
                drop(q);
                send(&packet);
            }
            Some((due, _)) => {
                let wait = (*due - now).min(POLL);
                let _ = ready.wait_timeout(q, wait).unwrap();
            }
            None => {
                let _ = ready.wait_timeout(q, POLL).unwrap();
            }
        }
    }
}
