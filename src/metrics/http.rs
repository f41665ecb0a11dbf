//! A minimal HTTP/1.1 responder for the metrics endpoints, on one thread.
//!
//! Hand-written over `std::net` rather than taken from a crate: the exporter lives inside an
//! inference process, so it must stay one thread whatever clients do, and a slow or hostile
//! client must neither hang it nor hold up the next scrape. `tiny_http`, the small candidate,
//! reads request headers without a size limit and without a deadline, and hands every
//! connection to a thread pool that grows with the number of stalled clients. Serving three
//! fixed GET paths needs only a request line, so the whole server is this file.
//!
//! Limits ([`Limits`]): a request head larger than `max_request_bytes` gets 431; a request not
//! complete within `request_timeout` gets 408; a connection beyond `max_connections` takes the
//! slot of the one stalled longest: one that has not sent a whole request within
//! [`STALL_GRACE`] of connecting (a client that slow is stalling, whether it sends nothing or
//! trickles its head), or whose client has read none of its response for [`STALL_GRACE`] (a
//! response larger than the kernel buffers, to a client that asked and stopped reading); that
//! one is closed unanswered or cut short. With none such, the newcomer gets 503 at once
//! (beyond twice the limit it is closed unanswered). So clients that open connections and send
//! nothing, or ask and never read, cannot keep a liveness probe of `/healthz` out for longer
//! than a second; to hold every slot they must open new ones faster than `max_connections` a
//! second. Connections are multiplexed without blocking, so a
//! stalled client costs one slot until its deadline, not the server's attention; one pass
//! accepts at most `max_connections` new ones, so a flood of connections cannot hold off the
//! deadlines of those already open. Each connection carries one request (`Connection: close`).
//! The thread sleeps in `poll(2)` until the listener or a connection is ready or the nearest
//! deadline passes, and wakes at least every half second to see whether it must stop. A route
//! that panics is answered 500 and the server goes on.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::fork_closed::ForkClosed;

/// Bounds on what one client may cost.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest request head (request line and headers) read, in bytes.
    pub max_request_bytes: usize,
    /// Time a client has to send its whole request head.
    pub request_timeout: Duration,
    /// Time a client has to read the response.
    pub write_timeout: Duration,
    /// Connections served at once; more take the slot of one stalled for [`STALL_GRACE`], or
    /// are answered 503 and closed.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 8192,
            request_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            max_connections: 32,
        }
    }
}

/// A response to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            content_type,
            body: body.into(),
        }
    }

    /// A plain-text response (`text/plain; charset=utf-8`).
    pub fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response::new(status, "text/plain; charset=utf-8", body)
    }
}

/// What the server serves: a fixed set of paths, each answering GET (and HEAD).
pub trait Routes: Send + Sync + 'static {
    /// The paths served; any other gets 404.
    fn paths(&self) -> &[&'static str];
    /// The response to a GET of `path` (one of [`Routes::paths`]).
    fn get(&self, path: &str) -> Response;
}

/// Why [`Server::start`] failed. Said apart because they send an operator to different
/// places: the address (taken, not this host's, not permitted), or the process, which could
/// get no thread (a pids limit, `ulimit -u`) although the address was free.
#[derive(Debug)]
pub enum StartError {
    Listen(std::io::Error),
    Thread(std::io::Error),
}

impl StartError {
    /// What failed, for an operator: `cannot listen on ADDR: ...` or why no thread ran.
    pub fn describe(&self, addr: SocketAddr) -> String {
        match self {
            StartError::Listen(e) => format!("cannot listen on {addr}: {e}"),
            StartError::Thread(e) => format!(
                "cannot start the thread that serves {addr}: {e} (a limit on this process's \
                 threads, as a container's pids limit or ulimit -u, is reached)"
            ),
        }
    }
}

/// A running server. Dropping it stops the thread.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    rejected: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` and starts the server thread (named `name`).
    pub fn start(
        addr: SocketAddr,
        routes: Arc<dyn Routes>,
        limits: Limits,
        name: &str,
    ) -> Result<Server, StartError> {
        let listener = ForkClosed::open(|| TcpListener::bind(addr)).map_err(StartError::Listen)?;
        let addr = listener.local_addr().map_err(StartError::Listen)?;
        // Never blocking: the thread waits in `poll`, and `accept` must not hang it.
        listener.set_nonblocking(true).map_err(StartError::Listen)?;
        let stop = Arc::new(AtomicBool::new(false));
        let rejected = Arc::new(AtomicU64::new(0));
        let mut state = Loop {
            listener,
            routes,
            limits,
            stop: stop.clone(),
            rejected: rejected.clone(),
            conns: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || state.run())
            .map_err(StartError::Thread)?;
        Ok(Server {
            addr,
            stop,
            rejected,
            thread: Some(thread),
        })
    }

    /// The bound address (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests refused: too slow (408, or closed when a new connection took the slot of one
    /// without a whole request [`STALL_GRACE`] after connecting, or of one whose client read
    /// none of its response for as long, which is cut short), too large (431),
    /// malformed (400), or over the connection limit (503, or closed unanswered beyond twice
    /// the limit).
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// A shared handle on [`Server::rejected`].
    pub fn rejected_counter(&self) -> Arc<AtomicU64> {
        self.rejected.clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the thread's `poll` at once with a connection; if none can be made (an IPv6
        // wildcard on a host without IPv6 loopback), it sees `stop` within `STOP_CHECK`.
        let port = self.addr.port();
        let wake: &[SocketAddr] = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                &[SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)]
            }
            IpAddr::V6(ip) if ip.is_unspecified() => &[
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
            ],
            _ => std::slice::from_ref(&self.addr),
        };
        for a in wake {
            if TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok() {
                break;
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum State {
    Reading,
    Writing {
        out: Vec<u8>,
        pos: usize,
    },
    /// Response sent and our side shut down: read and discard until the client closes, so
    /// that unread request bytes do not turn our close into a reset that loses the response.
    Draining {
        drained: usize,
    },
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    state: State,
    deadline: Instant,
    /// Since when the connection has waited on its client: its opening while it reads the
    /// request, the response's start or its last write that moved bytes while it writes.
    waiting_since: Instant,
}

/// How long after connecting a connection may hold its slot without a whole request before a
/// new connection, finding every slot taken, may take it. Counted from the connection, not
/// from its last bytes: a scraper or a probe sends its request head in one packet as it
/// connects, and one still sending after a second is stalling, however it trickles. A
/// response none of which the client read for as long is stalled too: a scraper reads as the
/// bytes arrive.
pub const STALL_GRACE: Duration = Duration::from_secs(1);

/// Bytes a draining connection may still discard.
const DRAIN_BYTES: usize = 1 << 20;
/// Time a draining connection is kept.
const DRAIN_TIME: Duration = Duration::from_secs(1);
/// Longest sleep in `poll`: how soon a stop is seen without a wake-up connection.
const STOP_CHECK: Duration = Duration::from_millis(500);

struct Loop {
    /// Closed in a forked child (`fork_closed`), which would otherwise keep the address.
    listener: ForkClosed<TcpListener>,
    routes: Arc<dyn Routes>,
    limits: Limits,
    stop: Arc<AtomicBool>,
    rejected: Arc<AtomicU64>,
    conns: Vec<Conn>,
}

impl Loop {
    fn run(&mut self) {
        while !self.stop.load(Ordering::SeqCst) {
            self.wait();
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            self.accept_pending();
            let now = Instant::now();
            let mut i = 0;
            while i < self.conns.len() {
                let (_, done) = self.step(i, now);
                if done {
                    self.conns.swap_remove(i);
                } else {
                    i += 1;
                }
            }
        }
    }

    /// Sleeps until the listener or a connection is ready, the nearest deadline passes, or
    /// `STOP_CHECK` has gone by.
    fn wait(&self) {
        let now = Instant::now();
        let mut timeout = STOP_CHECK;
        let mut fds = Vec::with_capacity(self.conns.len() + 1);
        fds.push(libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for c in &self.conns {
            timeout = timeout.min(c.deadline.saturating_duration_since(now));
            let events = match c.state {
                State::Writing { .. } => libc::POLLOUT,
                State::Reading | State::Draining { .. } => libc::POLLIN,
            };
            fds.push(libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        // Rounded up, so that a deadline has passed when `poll` times out.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is an array of `fds.len()` initialised `pollfd`s that lives across the
        // call, and each descriptor in it is owned by `self` and open.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 && std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
            // Not expected (the descriptors are valid): do not spin.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Accepts what is pending, at most `max_connections` a pass, so that the deadlines of
    /// open connections are checked between bursts.
    fn accept_pending(&mut self) {
        let mut budget = self.limits.max_connections.max(1);
        while budget > 0 {
            match self.listener.accept() {
                Ok((s, _)) => {
                    budget -= 1;
                    self.admit(s);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if would_block(&e) => return,
                Err(_) => {
                    // EMFILE and the like: the listener stays readable; do not spin on it.
                    std::thread::sleep(Duration::from_millis(10));
                    return;
                }
            }
        }
    }

    fn admit(&mut self, stream: TcpStream) {
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let _ = stream.set_nodelay(true);
        let now = Instant::now();
        let mut conn = Conn {
            stream,
            buf: Vec::new(),
            state: State::Reading,
            deadline: deadline_after(now, self.limits.request_timeout),
            waiting_since: now,
        };
        let max = self.limits.max_connections;
        if self.conns.len() >= max {
            // What the connections sent while this thread was busy (a slow route) is read
            // first: a request that arrived in time is answered, and a client that left frees
            // its slot, rather than either being taken for a stalled one. So are the responses
            // their clients read meanwhile.
            self.read_requests(now);
            self.write_responses(now);
        }
        if self.conns.len() >= max {
            if let Some(i) = self.oldest_stalled(now) {
                // Its slot goes to the newcomer: closed at once, unanswered.
                self.rejected.fetch_add(1, Ordering::Relaxed);
                let stalled = self.conns.swap_remove(i);
                let _ = stalled.stream.shutdown(Shutdown::Both);
                self.conns.push(conn);
                return;
            }
            self.rejected.fetch_add(1, Ordering::Relaxed);
            if self.conns.len() >= max.saturating_mul(2) {
                // Refusals are piling up too: close at once, unanswered.
                let _ = conn.stream.shutdown(Shutdown::Both);
                return;
            }
            // Answered 503 like any response (written, then drained), so the client reads
            // the refusal rather than a reset; refusals take at most as many slots again.
            let r = Response::text(503, "kvh: too many connections; try again\n");
            respond(&mut conn, &r, false, self.limits);
        }
        self.conns.push(conn);
    }

    /// Reads what has arrived on the connections still reading their request (all of it: a
    /// head may take more than one read), dropping those that finished (their client left).
    fn read_requests(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.conns.len() {
            let mut done = false;
            while matches!(self.conns[i].state, State::Reading) {
                let (progress, finished) = self.step(i, now);
                done = finished;
                if finished || !progress {
                    break;
                }
            }
            if done {
                self.conns.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// The connection stalled longest: one that has not sent a whole request within
    /// [`STALL_GRACE`] of connecting, or whose client has read none of its response for as
    /// long. (A draining one has sent its whole response and leaves within [`DRAIN_TIME`].)
    fn oldest_stalled(&self, now: Instant) -> Option<usize> {
        self.conns
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                matches!(c.state, State::Reading | State::Writing { .. })
                    && now.saturating_duration_since(c.waiting_since) >= STALL_GRACE
            })
            .min_by_key(|(_, c)| c.waiting_since)
            .map(|(i, _)| i)
    }

    /// Writes what the clients of the connections still writing take now, dropping those that
    /// finished or failed: a client that read since the last pass is not taken for a stalled
    /// one.
    fn write_responses(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.conns.len() {
            let done = matches!(self.conns[i].state, State::Writing { .. }) && self.step(i, now).1;
            if done {
                self.conns.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Advances connection `i`; returns (made progress, finished).
    fn step(&mut self, i: usize, now: Instant) -> (bool, bool) {
        let limits = self.limits;
        let conn = &mut self.conns[i];
        match &mut conn.state {
            State::Reading => {
                let max = limits.max_request_bytes;
                // Past its deadline, what already arrived is read whole (the server may have
                // been busy with another route when the deadline passed): a whole request in
                // it is answered, anything less refused. Before, one read a step.
                let late = now >= conn.deadline;
                let from = conn.buf.len().saturating_sub(3);
                let (mut progress, mut ended) = (false, false);
                loop {
                    let mut chunk = [0u8; 4096];
                    match conn.stream.read(&mut chunk) {
                        Ok(0) => {
                            ended = true;
                            break;
                        }
                        Ok(n) => {
                            conn.buf.extend_from_slice(&chunk[..n]);
                            progress = true;
                        }
                        Err(e) if would_block(&e) => break,
                        Err(_) => {
                            ended = true;
                            break;
                        }
                    }
                    if !late || conn.buf.len() > max {
                        break;
                    }
                }
                let head_end = head_end(&conn.buf, from);
                if let Some(end) = head_end.filter(|&end| end <= max) {
                    let (r, head_only) = answer(&conn.buf[..end], self.routes.as_ref());
                    if r.status == 400 {
                        self.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                    respond(conn, &r, head_only, limits);
                    return (true, false);
                }
                if head_end.is_some() || conn.buf.len() > max {
                    self.rejected.fetch_add(1, Ordering::Relaxed);
                    let r = Response::text(431, "kvh: request head too large\n");
                    respond(conn, &r, false, limits);
                    return (true, false);
                }
                if late {
                    self.rejected.fetch_add(1, Ordering::Relaxed);
                    let r = Response::text(408, "kvh: request not received in time\n");
                    respond(conn, &r, false, limits);
                    return (true, false);
                }
                (progress || ended, ended)
            }
            State::Writing { out, pos } => {
                if now >= conn.deadline {
                    return (true, true);
                }
                match conn.stream.write(&out[*pos..]) {
                    Ok(0) => (true, true),
                    Ok(n) => {
                        *pos += n;
                        // The time of the write, not of the pass: a slow route earlier in the
                        // pass must not make a client that reads look stalled.
                        conn.waiting_since = Instant::now();
                        if *pos == out.len() {
                            let _ = conn.stream.shutdown(Shutdown::Write);
                            conn.state = State::Draining { drained: 0 };
                            // From the end of the write, for the reason above.
                            conn.deadline = conn.waiting_since + DRAIN_TIME;
                        }
                        (true, false)
                    }
                    Err(e) if would_block(&e) => (false, false),
                    Err(_) => (true, true),
                }
            }
            State::Draining { drained } => {
                if now >= conn.deadline {
                    return (true, true);
                }
                let mut chunk = [0u8; 4096];
                match conn.stream.read(&mut chunk) {
                    Ok(0) => (true, true),
                    Ok(n) => {
                        *drained += n;
                        (true, *drained > DRAIN_BYTES)
                    }
                    Err(e) if would_block(&e) => (false, false),
                    Err(_) => (true, true),
                }
            }
        }
    }
}

/// `now + timeout`, where a timeout too long for the clock (`Duration::MAX`, a caller's "no
/// deadline") is a year: an `Instant` addition that overflows panics, and would end the server.
fn deadline_after(now: Instant, timeout: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(365 * 24 * 3600);
    now.checked_add(timeout)
        .or_else(|| now.checked_add(FAR))
        .unwrap_or(now)
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

fn respond(conn: &mut Conn, r: &Response, head_only: bool, limits: Limits) {
    conn.buf = Vec::new();
    conn.state = State::Writing {
        out: render(r, head_only),
        pos: 0,
    };
    let now = Instant::now();
    conn.deadline = deadline_after(now, limits.write_timeout);
    conn.waiting_since = now;
}

/// Where the head of the request in `buf` ends (an empty line, its line ends CRLF or a bare
/// LF in any mix), counted from the start, looking from `from` on.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    [&b"\r\n\r\n"[..], b"\n\r\n", b"\n\n"]
        .iter()
        .filter_map(|t| find(&buf[from..], t).map(|i| from + i + t.len()))
        .min()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The response to a complete request head; `true` when it answers a HEAD (no body).
fn answer(head: &[u8], routes: &dyn Routes) -> (Response, bool) {
    // An empty line before the request line is ignored (RFC 9112, 2.2).
    let head = match head.iter().position(|&b| b != b'\r' && b != b'\n') {
        Some(start) if head[..start].ends_with(b"\n") => &head[start..],
        _ => head,
    };
    let line_end = find(head, b"\n").unwrap_or(head.len());
    let line = match std::str::from_utf8(&head[..line_end]) {
        Ok(l) => l.trim_end_matches('\r'),
        Err(_) => return (Response::text(400, "kvh: malformed request\n"), false),
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (Response::text(400, "kvh: malformed request line\n"), false);
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() {
        return (Response::text(400, "kvh: malformed request line\n"), false);
    }
    // Origin form (`/metrics?x`) or absolute form (`http://host/metrics`). The query goes
    // first: it may hold a URL of its own (`/metrics?target=http://host/v1`).
    let target = target.split(['?', '#']).next().unwrap_or(target);
    let path = match target.find("://") {
        Some(i) if !target.starts_with('/') => target[i + 3..]
            .find('/')
            .map_or("/", |j| &target[i + 3 + j..]),
        _ => target,
    };
    let Some(&known) = routes.paths().iter().find(|p| **p == path) else {
        return (Response::text(404, "kvh: not found\n"), method == "HEAD");
    };
    let get = || {
        std::panic::catch_unwind(AssertUnwindSafe(|| routes.get(known)))
            .unwrap_or_else(|_| Response::text(500, "kvh: internal error\n"))
    };
    match method {
        "GET" => (get(), false),
        "HEAD" => (get(), true),
        _ => (
            Response::text(405, "kvh: method not allowed (GET or HEAD)\n"),
            false,
        ),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn render(r: &Response, head_only: bool) -> Vec<u8> {
    let allow = if r.status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(&r.body);
    }
    out
}
