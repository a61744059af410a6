//! A mock LLM upstream that imitates the OpenAI, Azure OpenAI and Anthropic
//! HTTP APIs with *deterministic* token usage, so that tests driving a real
//! Envoy (and the real `.wasm` plugins) can predict exact counts.
//!
//! Endpoints: `POST /v1/chat/completions`, `/v1/completions`,
//! `/v1/responses`, `/v1/embeddings`, `/v1/messages` (Anthropic),
//! `/openai/deployments/{d}/{chat/completions,completions,embeddings}?api-version=..`
//! (Azure), `POST /v1/threads/{id}/messages` (OpenAI Assistants: not an LLM
//! call, but its path ends like Anthropic's), and `GET /healthz`.
//!
//! Counting: P (prompt) is the [`words`] of the request's text, or
//! `x-mock-prompt-tokens`; the answer is C = `x-mock-chunks` (default 5)
//! pieces `"w0 "`, `"w1 "`, ..., one token each; R = `x-mock-reasoning-tokens`
//! (OpenAI counts it inside the completion); K = `x-mock-cached-tokens`;
//! W = `x-mock-cache-creation-tokens` (Anthropic `input_tokens` = P - K - W).
//! `x-mock-content: <text>` answers that text instead, one piece per word.
//!
//! Transport knobs (request headers): `x-mock-status`, `x-mock-ttft-ms`,
//! `x-mock-chunk-delay-ms`, `x-mock-split-bytes` + `x-mock-split-delay-ms`,
//! `x-mock-abort-after`, `x-mock-omit-usage`, `x-mock-newline`
//! (`lf|crlf|cr`), `x-mock-sse-extras`, `x-mock-gzip` (`force|off`; otherwise
//! gzip follows `accept-encoding`), `x-mock-response-model`,
//! `x-mock-trailers: 1` (the answer, JSON or SSE, is sent chunked and ends
//! with the HTTP/1.1 trailer `x-mock-done: 1`, announced by `trailer:`),
//! `x-mock-sse-tail: 1` (a stream ends with an unterminated event,
//! `data: {"partial":true}` and no blank line: bytes a reader must hold),
//! `x-mock-obs-text: 1` (the answer carries the header
//! [`OBS_TEXT`], whose value is not UTF-8, as HTTP's obs-text allows).
//! A request header value that is not UTF-8 is recorded as ISO-8859-1, one
//! char per byte, so a test can tell the bytes that came from a lossy copy.
//! A knob with a bad value is a 400, so a typo cannot silently test the
//! default.
//!
//! Compression knobs (each implies gzip): `x-mock-gzip-bomb-mib: N`
//! (1..=4096; a JSON answer with N MiB of spaces before its `"usage"` member,
//! gzipped to about a thousandth of that), `x-mock-gzip-members: 2` (the
//! gzip body is two members, the second starting at the usage: the
//! `"usage"` member of a JSON answer, the first event with a usage object
//! in a stream), `x-mock-gzip-corrupt: 1` (the deflate data goes bad after
//! the last byte of the answer: invalid bytes instead of the stream's end).
//!
//! Design:
//! - Plain `std::net` HTTP/1.1 with one thread per connection. Envoy pools
//!   upstream connections, so keep-alive, pipelining (the same buffered reader
//!   is kept across requests) and both body framings (`Content-Length` and
//!   `Transfer-Encoding: chunked`) are supported. `TCP_NODELAY` is set so
//!   every HTTP chunk leaves as soon as it is written: the point of the
//!   streaming knobs is that Envoy sees the pieces separately.
//! - Handling is split in two: `respond` turns a parsed request into a
//!   `Reply` (status + either a whole body or a list of SSE events), and
//!   `write_reply` puts it on the wire, applying every transport knob
//!   (timing, gzip, splitting, aborting, newline style, SSE extras). That way
//!   each knob works the same for every endpoint.
//! - JSON is written by hand (with `js` for string escaping) rather than via
//!   `serde_json::Value`: member order matters to the tests (e.g. `"usage":null`
//!   must be the last member, like OpenAI sends it) and `Value`'s order depends
//!   on whether some other crate in the workspace enables `preserve_order`.
//! - Nothing here may panic on input: bad HTTP, bad JSON or bad knob values
//!   get a 4xx with the provider's error shape. Request bodies are never
//!   printed.
//! - Pieces written under `x-mock-split-bytes` never straddle two SSE events,
//!   so `x-mock-chunk-delay-ms` keeps its meaning (an event is complete on the
//!   wire before the delay starts).
//! - Dropping [`MockLlm`] hangs up every open connection, so idle keep-alive
//!   threads end with the test instead of outliving it.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::Value;

/// Fixed so that responses are byte-for-byte reproducible.
const CREATED: u64 = 1_700_000_000;
const MAX_LINE: usize = 16 * 1024;
const MAX_HEADERS: usize = 128;
const MAX_BODY: usize = 64 << 20;
/// Keeps a typo in `x-mock-chunks` from building gigabytes of events.
const MAX_CHUNKS: usize = 100_000;
const DEFAULT_CHUNKS: usize = 5;
/// 4 GiB inflated is past any VM's memory; more only costs the mock CPU.
const MAX_BOMB_MIB: usize = 4096;
/// The trailer `x-mock-trailers` ends an answer with.
pub const TRAILER: (&str, &str) = ("x-mock-done", "1");
/// The header `x-mock-obs-text` adds to an answer: `café` in ISO-8859-1 and a
/// byte no UTF-8 text has.
pub const OBS_TEXT: (&str, &[u8]) = ("x-mock-obs-text", b"caf\xe9\xff");
const EMBEDDING_DIMS: usize = 8;

/// One request as the mock received it (body already de-chunked).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// The request target, query string included.
    pub path: String,
    /// Header names are lowercased; repeated headers appear repeatedly.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }
}

/// The token count the mock assigns to a text: whitespace-separated words.
pub fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

struct Shared {
    requests: Mutex<Vec<RecordedRequest>>,
    /// Clones of live connections, so dropping the mock can hang them up and
    /// let their threads end instead of waiting forever on idle keep-alives.
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
    shutdown: AtomicBool,
}

/// A poisoned lock only means another connection thread died mid-update; the
/// data (a list of requests, a map of sockets) is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running mock server; it stops when dropped.
pub struct MockLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl MockLlm {
    /// Listens on a free loopback port.
    pub fn start() -> io::Result<MockLlm> {
        Self::start_on("127.0.0.1:0")
    }

    /// Listens on `addr` (e.g. `127.0.0.1:8000`) and serves on background
    /// threads.
    pub fn start_on(addr: &str) -> io::Result<MockLlm> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
        });
        let for_thread = Arc::clone(&shared);
        let acceptor = thread::Builder::new()
            .name("mock-llm-accept".into())
            .spawn(move || accept_loop(listener, for_thread))?;
        Ok(MockLlm {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    pub fn last_request(&self) -> Option<RecordedRequest> {
        lock(&self.shared.requests).last().cloned()
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        // `accept` has no timeout; a connection to ourselves wakes it up so it
        // can see the flag.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        let woke = TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok();
        for (_, conn) in lock(&self.shared.conns).drain() {
            let _ = conn.shutdown(Shutdown::Both);
        }
        // Joining without a successful wake-up could block forever.
        if woke {
            if let Some(handle) = self.acceptor.take() {
                let _ = handle.join();
            }
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.shutdown.load(Ordering::SeqCst) {
            break;
        }
        match conn {
            Ok(stream) => spawn_connection(stream, &shared),
            // Typically EMFILE; back off instead of spinning.
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn spawn_connection(stream: TcpStream, shared: &Arc<Shared>) {
    let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
    if let Ok(clone) = stream.try_clone() {
        lock(&shared.conns).insert(id, clone);
    }
    let for_thread = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name("mock-llm-conn".into())
        .spawn(move || {
            serve_connection(stream, &for_thread);
            lock(&for_thread.conns).remove(&id);
        });
    if spawned.is_err() {
        lock(&shared.conns).remove(&id);
    }
}

fn serve_connection(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut out = stream;
    loop {
        if shared.shutdown.load(Ordering::SeqCst) {
            break;
        }
        let req = match read_request(&mut reader, &mut out) {
            Ok(Some(req)) => req,
            Ok(None) | Err(ReadError::Closed) => break,
            Err(ReadError::Bad(status, message)) => {
                let reply = error_reply(Provider::OpenAi, status, &message, Knobs::default());
                let _ = write_reply(&mut out, reply, false, false);
                break;
            }
        };
        let keep_alive = req.keep_alive;
        let head_only = req.method == "HEAD";
        let reply = respond(&req);
        lock(&shared.requests).push(RecordedRequest {
            method: req.method,
            path: req.target,
            headers: req.headers,
            body: req.body,
        });
        match write_reply(&mut out, reply, keep_alive, head_only) {
            Ok(true) => {}
            Ok(false) | Err(_) => break,
        }
    }
    let _ = out.shutdown(Shutdown::Both);
}

// ---------------------------------------------------------------------------
// HTTP/1.1 request parsing

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
}

enum ReadError {
    /// The peer went away (or the socket failed): nothing to answer.
    Closed,
    /// A protocol error worth an error response before hanging up.
    Bad(u16, String),
}

impl From<io::Error> for ReadError {
    fn from(_: io::Error) -> Self {
        ReadError::Closed
    }
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .flat_map(|(_, v)| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Reads one line without its terminator (`\n` or `\r\n`); `None` at EOF
/// before any byte.
fn read_line(reader: &mut impl BufRead, max: usize) -> Result<Option<Vec<u8>>, ReadError> {
    let mut buf = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let n = reader.by_ref().take(limit).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(if buf.len() > max {
            ReadError::Bad(431, "request line or header too long".into())
        } else {
            ReadError::Closed
        });
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(Some(buf))
}

fn read_request(
    reader: &mut impl BufRead,
    out: &mut TcpStream,
) -> Result<Option<Request>, ReadError> {
    // RFC 9112 §2.2: ignore empty lines before the request line.
    let mut line = Vec::new();
    for _ in 0..4 {
        match read_line(reader, MAX_LINE)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue,
            Some(l) => {
                line = l;
                break;
            }
        }
    }
    let line = String::from_utf8_lossy(&line);
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadError::Bad(400, "malformed request line".into()));
    };
    if method.is_empty() || target.is_empty() {
        return Err(ReadError::Bad(400, "malformed request line".into()));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(ReadError::Bad(505, "only HTTP/1.0 and HTTP/1.1".into())),
    };

    let mut headers = Vec::new();
    loop {
        let Some(line) = read_line(reader, MAX_LINE)? else {
            return Err(ReadError::Closed);
        };
        if line.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            return Err(ReadError::Bad(431, "too many headers".into()));
        }
        if matches!(line.first(), Some(b' ' | b'\t')) {
            return Err(ReadError::Bad(400, "obsolete header folding".into()));
        }
        let line = String::from_utf8(line)
            .unwrap_or_else(|e| e.into_bytes().into_iter().map(char::from).collect());
        let Some((name, value)) = line.split_once(':') else {
            return Err(ReadError::Bad(400, "header without colon".into()));
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(ReadError::Bad(400, "malformed header name".into()));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }

    let chunked = match header_of(&headers, "transfer-encoding") {
        None => false,
        Some(_) => {
            let last = headers
                .iter()
                .filter(|(n, _)| n == "transfer-encoding")
                .flat_map(|(_, v)| v.split(','))
                .map(str::trim)
                .rfind(|t| !t.is_empty());
            if !last.is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
                return Err(ReadError::Bad(501, "unsupported transfer-encoding".into()));
            }
            true
        }
    };
    let mut content_length: Option<usize> = None;
    for (_, value) in headers.iter().filter(|(n, _)| n == "content-length") {
        let Ok(n) = value.parse::<usize>() else {
            return Err(ReadError::Bad(400, "invalid content-length".into()));
        };
        if content_length.is_some_and(|old| old != n) {
            return Err(ReadError::Bad(400, "conflicting content-length".into()));
        }
        content_length = Some(n);
    }
    if content_length.is_some_and(|n| n > MAX_BODY) {
        return Err(ReadError::Bad(413, "request body too large".into()));
    }

    let expects_body = chunked || content_length.is_some_and(|n| n > 0);
    if expects_body && has_token(&headers, "expect", "100-continue") {
        out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        out.flush()?;
    }

    let body = if chunked {
        read_chunked(reader)?
    } else {
        let mut body = vec![0; content_length.unwrap_or(0)];
        reader.read_exact(&mut body)?;
        body
    };

    let keep_alive = if http10 {
        has_token(&headers, "connection", "keep-alive")
    } else {
        !has_token(&headers, "connection", "close")
    };
    // Both framings at once is a smuggling pattern; answer, then hang up.
    let keep_alive = keep_alive && !(chunked && content_length.is_some());
    Ok(Some(Request {
        method: method.to_string(),
        target: target.to_string(),
        headers,
        body,
        keep_alive,
    }))
}

fn read_chunked(reader: &mut impl BufRead) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    loop {
        let line = read_line(reader, MAX_LINE)?.ok_or(ReadError::Closed)?;
        let line = String::from_utf8_lossy(&line);
        let size = line.split(';').next().unwrap_or("").trim();
        if size.is_empty() || size.len() > 15 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ReadError::Bad(400, "malformed chunk size".into()));
        }
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| ReadError::Bad(400, "malformed chunk size".into()))?;
        if size == 0 {
            // Trailers are read and dropped.
            loop {
                let line = read_line(reader, MAX_LINE)?.ok_or(ReadError::Closed)?;
                if line.is_empty() {
                    return Ok(body);
                }
            }
        }
        if body.len().saturating_add(size) > MAX_BODY {
            return Err(ReadError::Bad(413, "request body too large".into()));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let end = read_line(reader, MAX_LINE)?.ok_or(ReadError::Closed)?;
        if !end.is_empty() {
            return Err(ReadError::Bad(
                400,
                "chunk data longer than its size".into(),
            ));
        }
    }
}

// ---------------------------------------------------------------------------
// Knobs

/// Per-request test knobs, all from `x-mock-*` request headers (plus
/// `accept-encoding`).
#[derive(Clone, Debug)]
struct Knobs {
    status: Option<u16>,
    ttft: Duration,
    chunk_delay: Duration,
    chunks: usize,
    split_bytes: Option<usize>,
    split_delay: Duration,
    abort_after: Option<usize>,
    omit_usage: bool,
    newline: &'static str,
    sse_extras: bool,
    gzip: bool,
    gzip_bomb_mib: Option<usize>,
    gzip_members: usize,
    gzip_corrupt: bool,
    trailers: bool,
    sse_tail: bool,
    obs_text: bool,
    prompt_tokens: Option<u64>,
    reasoning: u64,
    cached: u64,
    cache_creation: u64,
    response_model: Option<String>,
    /// `x-mock-content`: the answer text, one piece per word (with the
    /// space after it), instead of `w0 w1 ...`.
    content: Option<String>,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            status: None,
            ttft: Duration::ZERO,
            chunk_delay: Duration::ZERO,
            chunks: DEFAULT_CHUNKS,
            split_bytes: None,
            split_delay: Duration::from_millis(1),
            abort_after: None,
            omit_usage: false,
            newline: "\n",
            sse_extras: false,
            gzip: false,
            gzip_bomb_mib: None,
            gzip_members: 1,
            gzip_corrupt: false,
            trailers: false,
            sse_tail: false,
            obs_text: false,
            prompt_tokens: None,
            reasoning: 0,
            cached: 0,
            cache_creation: 0,
            response_model: None,
            content: None,
        }
    }
}

fn num_knob<T: std::str::FromStr>(
    headers: &[(String, String)],
    name: &str,
) -> Result<Option<T>, String> {
    match header_of(headers, name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{name} must be a non-negative integer")),
    }
}

fn bool_knob(headers: &[(String, String)], name: &str) -> Result<bool, String> {
    match header_of(headers, name).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(false),
        Some(v) => match v.as_str() {
            "1" | "true" | "yes" => Ok(true),
            "0" | "false" | "no" => Ok(false),
            _ => Err(format!("{name} must be 1 or 0")),
        },
    }
}

fn ms_knob(headers: &[(String, String)], name: &str) -> Result<Option<Duration>, String> {
    Ok(num_knob::<u64>(headers, name)?.map(Duration::from_millis))
}

impl Knobs {
    fn parse(h: &[(String, String)]) -> Result<Knobs, String> {
        let d = Knobs::default();
        let status = match num_knob::<u16>(h, "x-mock-status")? {
            Some(s) if !(200..=599).contains(&s) => {
                return Err("x-mock-status must be between 200 and 599".into())
            }
            s => s,
        };
        let chunks = num_knob::<usize>(h, "x-mock-chunks")?.unwrap_or(d.chunks);
        if chunks > MAX_CHUNKS {
            return Err(format!("x-mock-chunks must be at most {MAX_CHUNKS}"));
        }
        let split_bytes = num_knob::<usize>(h, "x-mock-split-bytes")?;
        if split_bytes == Some(0) {
            return Err("x-mock-split-bytes must be at least 1".into());
        }
        let newline = match header_of(h, "x-mock-newline").map(|v| v.trim().to_ascii_lowercase()) {
            None => d.newline,
            Some(v) => match v.as_str() {
                "lf" => "\n",
                "crlf" => "\r\n",
                "cr" => "\r",
                _ => return Err("x-mock-newline must be lf, crlf or cr".into()),
            },
        };
        let accepts_gzip = h
            .iter()
            .filter(|(n, _)| n == "accept-encoding")
            .any(|(_, v)| v.to_ascii_lowercase().contains("gzip"));
        let gzip = match header_of(h, "x-mock-gzip").map(|v| v.trim().to_ascii_lowercase()) {
            None => accepts_gzip,
            Some(v) => match v.as_str() {
                "force" | "1" | "true" => true,
                // Lets a test see identity bytes even when a client insists on
                // advertising gzip.
                "off" | "0" | "false" => false,
                _ => return Err("x-mock-gzip must be force or off".into()),
            },
        };
        let gzip_bomb_mib = num_knob::<usize>(h, "x-mock-gzip-bomb-mib")?;
        if gzip_bomb_mib.is_some_and(|n| !(1..=MAX_BOMB_MIB).contains(&n)) {
            return Err(format!(
                "x-mock-gzip-bomb-mib must be between 1 and {MAX_BOMB_MIB}"
            ));
        }
        let gzip_members = num_knob::<usize>(h, "x-mock-gzip-members")?.unwrap_or(1);
        if !(1..=2).contains(&gzip_members) {
            return Err("x-mock-gzip-members must be 1 or 2".into());
        }
        let gzip_corrupt = bool_knob(h, "x-mock-gzip-corrupt")?;
        let gzip = gzip || gzip_bomb_mib.is_some() || gzip_members > 1 || gzip_corrupt;
        Ok(Knobs {
            status,
            ttft: ms_knob(h, "x-mock-ttft-ms")?.unwrap_or(d.ttft),
            chunk_delay: ms_knob(h, "x-mock-chunk-delay-ms")?.unwrap_or(d.chunk_delay),
            chunks,
            split_bytes,
            split_delay: ms_knob(h, "x-mock-split-delay-ms")?.unwrap_or(d.split_delay),
            abort_after: num_knob(h, "x-mock-abort-after")?,
            omit_usage: bool_knob(h, "x-mock-omit-usage")?,
            newline,
            sse_extras: bool_knob(h, "x-mock-sse-extras")?,
            gzip,
            gzip_bomb_mib,
            gzip_members,
            gzip_corrupt,
            trailers: bool_knob(h, "x-mock-trailers")?,
            sse_tail: bool_knob(h, "x-mock-sse-tail")?,
            obs_text: bool_knob(h, "x-mock-obs-text")?,
            prompt_tokens: num_knob(h, "x-mock-prompt-tokens")?,
            reasoning: num_knob(h, "x-mock-reasoning-tokens")?.unwrap_or(0),
            cached: num_knob(h, "x-mock-cached-tokens")?.unwrap_or(0),
            cache_creation: num_knob(h, "x-mock-cache-creation-tokens")?.unwrap_or(0),
            content: header_of(h, "x-mock-content").map(str::to_string),
            response_model: header_of(h, "x-mock-response-model")
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(str::to_string),
        })
    }
}

// ---------------------------------------------------------------------------
// Replies

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Provider {
    OpenAi,
    Anthropic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
    Responses,
    Embeddings,
    Messages,
}

impl Endpoint {
    fn provider(self) -> Provider {
        match self {
            Endpoint::Messages => Provider::Anthropic,
            _ => Provider::OpenAi,
        }
    }
}

struct Route {
    endpoint: Endpoint,
    /// Azure deployment name; its presence also means "Azure".
    deployment: Option<String>,
}

fn route(method: &str, path: &str) -> Option<Route> {
    if method != "POST" {
        return None;
    }
    let plain = |endpoint| {
        Some(Route {
            endpoint,
            deployment: None,
        })
    };
    match path {
        "/v1/chat/completions" => plain(Endpoint::Chat),
        "/v1/completions" => plain(Endpoint::Completions),
        "/v1/responses" => plain(Endpoint::Responses),
        "/v1/embeddings" => plain(Endpoint::Embeddings),
        "/v1/messages" => plain(Endpoint::Messages),
        _ => {
            let (deployment, tail) = path.strip_prefix("/openai/deployments/")?.split_once('/')?;
            if deployment.is_empty() {
                return None;
            }
            let endpoint = match tail {
                "chat/completions" => Endpoint::Chat,
                "completions" => Endpoint::Completions,
                "embeddings" => Endpoint::Embeddings,
                _ => return None,
            };
            Some(Route {
                endpoint,
                deployment: Some(deployment.to_string()),
            })
        }
    }
}

/// The thread of an Assistants `POST /v1/threads/{thread}/messages`.
fn thread_messages<'a>(method: &str, path: &'a str) -> Option<&'a str> {
    let thread = path
        .strip_prefix("/v1/threads/")?
        .strip_suffix("/messages")?;
    (method == "POST" && !thread.is_empty() && !thread.contains('/')).then_some(thread)
}

/// One SSE event before framing.
#[derive(Clone, Debug)]
struct Event {
    name: Option<&'static str>,
    data: String,
    /// Carries a content piece; `x-mock-sse-extras` splits the first such
    /// event across two `data:` lines, where a parser bug would lose content.
    piece: bool,
}

impl Event {
    fn data(data: String) -> Event {
        Event {
            name: None,
            data,
            piece: false,
        }
    }
    fn named(name: &'static str, data: String) -> Event {
        Event {
            name: Some(name),
            data,
            piece: false,
        }
    }
    fn piece(mut self) -> Event {
        self.piece = true;
        self
    }
}

enum Body {
    Full(Vec<u8>),
    Stream(Vec<Event>),
}

struct Reply {
    status: u16,
    content_type: &'static str,
    body: Body,
    knobs: Knobs,
}

fn json_reply(status: u16, body: String, knobs: Knobs) -> Reply {
    Reply {
        status,
        content_type: "application/json",
        body: Body::Full(body.into_bytes()),
        knobs,
    }
}

fn stream_reply(events: Vec<Event>, knobs: Knobs) -> Reply {
    Reply {
        status: 200,
        content_type: "text/event-stream",
        body: Body::Stream(events),
        knobs,
    }
}

fn error_reply(provider: Provider, status: u16, message: &str, knobs: Knobs) -> Reply {
    let body = match provider {
        Provider::OpenAi => {
            let (kind, code) = match status {
                400 => ("invalid_request_error", Some("bad_request")),
                401 => ("invalid_request_error", Some("invalid_api_key")),
                403 => ("permission_error", Some("permission_denied")),
                404 => ("invalid_request_error", Some("not_found")),
                413 => ("invalid_request_error", Some("request_too_large")),
                429 => ("requests", Some("rate_limit_exceeded")),
                500..=599 => ("server_error", None),
                _ => ("invalid_request_error", None),
            };
            format!(
                r#"{{"error":{{"message":{},"type":{},"param":null,"code":{}}}}}"#,
                js(message),
                js(kind),
                code.map_or_else(|| "null".to_string(), js)
            )
        }
        Provider::Anthropic => {
            let kind = match status {
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                503 | 529 => "overloaded_error",
                500..=599 => "api_error",
                _ => "invalid_request_error",
            };
            format!(
                r#"{{"type":"error","error":{{"type":{},"message":{}}}}}"#,
                js(kind),
                js(message)
            )
        }
    };
    json_reply(status, body, knobs)
}

/// Turns a parsed request into what to send; never fails.
fn respond(req: &Request) -> Reply {
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    if (req.method == "GET" || req.method == "HEAD") && path == "/healthz" {
        return Reply {
            status: 200,
            content_type: "text/plain",
            body: Body::Full(b"ok".to_vec()),
            knobs: Knobs::default(),
        };
    }
    if let Some(thread) = thread_messages(&req.method, path) {
        // Assistants: adds a message to a thread; no tokens are used, and
        // its path ends like Anthropic's `/v1/messages`.
        let body = format!(
            r#"{{"id":"msg_mock","object":"thread.message","created_at":{CREATED},"thread_id":{},"role":"user","content":[{{"type":"text","text":{{"value":"ok","annotations":[]}}}}]}}"#,
            js(thread)
        );
        return json_reply(200, body, Knobs::default());
    }
    let Some(route) = route(&req.method, path) else {
        let message = format!("no route for {} {}", req.method, path);
        return error_reply(Provider::OpenAi, 404, &message, Knobs::default());
    };
    let provider = route.endpoint.provider();
    if route.deployment.is_some()
        && !query.split('&').any(|kv| {
            kv.split_once('=')
                .is_some_and(|(k, v)| k == "api-version" && !v.is_empty())
        })
    {
        return error_reply(
            provider,
            404,
            "Resource not found: the api-version query parameter is required",
            Knobs::default(),
        );
    }
    let knobs = match Knobs::parse(&req.headers) {
        Ok(k) => k,
        Err(message) => return error_reply(provider, 400, &message, Knobs::default()),
    };
    if let Some(status) = knobs.status {
        let message = format!("mock error: x-mock-status asked for {status}");
        return error_reply(provider, status, &message, knobs);
    }
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return error_reply(provider, 400, "request body must be a JSON object", knobs),
        // serde_json's messages give a position, never the input itself.
        Err(e) => return error_reply(provider, 400, &format!("malformed JSON: {e}"), knobs),
    };
    let model = knobs
        .response_model
        .clone()
        .or_else(|| route.deployment.clone())
        .or_else(|| {
            body.get("model")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "mock-model".to_string());
    let pieces: Vec<String> = match &knobs.content {
        Some(text) => text.split_inclusive(' ').map(str::to_string).collect(),
        None => (0..knobs.chunks).map(|i| format!("w{i} ")).collect(),
    };
    let counts = Counts {
        p: knobs
            .prompt_tokens
            .unwrap_or_else(|| prompt_words(route.endpoint, &body)),
        c: pieces.len() as u64,
        r: knobs.reasoning,
        k: knobs.cached,
        w: knobs.cache_creation,
    };
    let ctx = Ctx {
        model: js(&model),
        counts,
        pieces,
        omit_usage: knobs.omit_usage,
    };
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    let opts = body.get("stream_options");
    let opt = |name: &str| opts.and_then(|o| o.get(name)).and_then(Value::as_bool) == Some(true);
    let (include_usage, continuous) = (opt("include_usage"), opt("continuous_usage_stats"));
    match (route.endpoint, stream) {
        (Endpoint::Chat, false) => json_reply(200, ctx.chat_body(), knobs),
        (Endpoint::Chat, true) => stream_reply(ctx.chat_stream(include_usage, continuous), knobs),
        (Endpoint::Completions, false) => json_reply(200, ctx.completion_body(), knobs),
        (Endpoint::Completions, true) => {
            stream_reply(ctx.completion_stream(include_usage, continuous), knobs)
        }
        (Endpoint::Responses, false) => json_reply(200, ctx.responses_body(), knobs),
        (Endpoint::Responses, true) => stream_reply(ctx.responses_stream(), knobs),
        // Embeddings have no streaming form; the flag is ignored.
        (Endpoint::Embeddings, _) => json_reply(
            200,
            ctx.embeddings_body(input_count(body.get("input"))),
            knobs,
        ),
        (Endpoint::Messages, false) => json_reply(200, ctx.messages_body(), knobs),
        (Endpoint::Messages, true) => stream_reply(ctx.messages_stream(), knobs),
    }
}

// ---------------------------------------------------------------------------
// Token accounting

/// P prompt, C content, R reasoning, K cached input, W cache-creation input.
#[derive(Clone, Copy, Debug)]
struct Counts {
    p: u64,
    c: u64,
    r: u64,
    k: u64,
    w: u64,
}

/// Words of a `content` value: a string, or an array of parts with `text`.
fn content_words(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::String(s)) => words(s),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|part| match part {
                Value::String(s) => words(s),
                other => other.get("text").and_then(Value::as_str).map_or(0, words),
            })
            .sum(),
        _ => 0,
    }
}

/// Words of a completions `prompt` / embeddings `input`: a string, an array
/// of strings, or (OpenAI also allows these) token-id arrays, which count one
/// token per id.
fn input_words(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::String(s)) => words(s),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => words(s),
                Value::Number(_) => 1,
                Value::Array(ids) => ids.len() as u64,
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// How many embeddings an `input` asks for.
fn input_count(v: Option<&Value>) -> usize {
    match v {
        Some(Value::String(_)) => 1,
        // A flat array of numbers is one tokenised input, not many.
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_number) => 1,
        Some(Value::Array(items)) => items.len(),
        _ => 0,
    }
}

fn messages_words(body: &Value) -> u64 {
    body.get("messages")
        .and_then(Value::as_array)
        .map_or(0, |ms| {
            ms.iter().map(|m| content_words(m.get("content"))).sum()
        })
}

fn prompt_words(endpoint: Endpoint, body: &Value) -> u64 {
    match endpoint {
        Endpoint::Chat => messages_words(body),
        Endpoint::Completions => input_words(body.get("prompt")),
        Endpoint::Embeddings => input_words(body.get("input")),
        Endpoint::Messages => {
            content_words(body.get("system")).saturating_add(messages_words(body))
        }
        Endpoint::Responses => {
            let instructions = body
                .get("instructions")
                .and_then(Value::as_str)
                .map_or(0, words);
            let input = match body.get("input") {
                Some(Value::String(s)) => words(s),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|item| match item {
                        Value::String(s) => words(s),
                        other => content_words(other.get("content")),
                    })
                    .sum(),
                _ => 0,
            };
            instructions.saturating_add(input)
        }
    }
}

// ---------------------------------------------------------------------------
// Response bodies and events

/// Where a `usage` member goes: nowhere, `null`, or an object. Always
/// rendered as the last member of its object, like OpenAI does.
enum Usage {
    Absent,
    Null,
    Object(String),
}

impl Usage {
    fn member(&self) -> String {
        match self {
            Usage::Absent => String::new(),
            Usage::Null => r#","usage":null"#.to_string(),
            Usage::Object(u) => format!(r#","usage":{u}"#),
        }
    }
}

struct Ctx {
    /// Already a JSON string literal.
    model: String,
    counts: Counts,
    pieces: Vec<String>,
    omit_usage: bool,
}

impl Ctx {
    fn text(&self) -> String {
        self.pieces.concat()
    }

    fn usage(&self, object: String) -> Usage {
        if self.omit_usage {
            Usage::Absent
        } else {
            Usage::Object(object)
        }
    }

    fn openai_usage(&self) -> String {
        let Counts { p, c, r, k, .. } = self.counts;
        let completion = c.saturating_add(r);
        format!(
            r#"{{"prompt_tokens":{p},"completion_tokens":{completion},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":{k}}},"completion_tokens_details":{{"reasoning_tokens":{r}}}}}"#,
            p.saturating_add(completion)
        )
    }

    fn running_usage(&self, sent: u64) -> String {
        let p = self.counts.p;
        format!(
            r#"{{"prompt_tokens":{p},"completion_tokens":{sent},"total_tokens":{}}}"#,
            p.saturating_add(sent)
        )
    }

    fn responses_usage(&self) -> String {
        let Counts { p, c, r, k, .. } = self.counts;
        let output = c.saturating_add(r);
        format!(
            r#"{{"input_tokens":{p},"input_tokens_details":{{"cached_tokens":{k}}},"output_tokens":{output},"output_tokens_details":{{"reasoning_tokens":{r}}},"total_tokens":{}}}"#,
            p.saturating_add(output)
        )
    }

    fn anthropic_usage(&self, output: u64) -> String {
        let Counts { p, k, w, .. } = self.counts;
        format!(
            r#"{{"input_tokens":{},"cache_creation_input_tokens":{w},"cache_read_input_tokens":{k},"output_tokens":{output}}}"#,
            p.saturating_sub(k).saturating_sub(w)
        )
    }

    fn chat_body(&self) -> String {
        format!(
            r#"{{"id":"chatcmpl-mock","object":"chat.completion","created":{CREATED},"model":{},"choices":[{{"index":0,"message":{{"role":"assistant","content":{}}},"finish_reason":"stop"}}]{}}}"#,
            self.model,
            js(&self.text()),
            self.usage(self.openai_usage()).member()
        )
    }

    fn completion_body(&self) -> String {
        format!(
            r#"{{"id":"cmpl-mock","object":"text_completion","created":{CREATED},"model":{},"choices":[{{"index":0,"text":{},"finish_reason":"stop"}}]{}}}"#,
            self.model,
            js(&self.text()),
            self.usage(self.openai_usage()).member()
        )
    }

    /// The usage member of a non-final chunk after `sent` content pieces.
    fn chunk_usage(&self, include: bool, continuous: bool, sent: u64) -> Usage {
        if self.omit_usage {
            Usage::Absent
        } else if continuous {
            Usage::Object(self.running_usage(sent))
        } else if include {
            Usage::Null
        } else {
            Usage::Absent
        }
    }

    /// Shared by chat and completions: `first` (if any), one event per
    /// piece, the finish chunk, the usage chunk, `[DONE]`.
    fn openai_stream(
        &self,
        include: bool,
        continuous: bool,
        head: &str,
        first: Option<&str>,
        piece_choice: impl Fn(&str) -> String,
        finish_choice: &str,
    ) -> Vec<Event> {
        let chunk = |choices: &str, usage: Usage| {
            Event::data(format!("{head}{}{}}}", choices, usage.member()))
        };
        let mut events = Vec::with_capacity(self.pieces.len() + 4);
        if let Some(first) = first {
            events.push(chunk(first, self.chunk_usage(include, continuous, 0)));
        }
        for (i, piece) in self.pieces.iter().enumerate() {
            let sent = i as u64 + 1;
            events.push(
                chunk(
                    &piece_choice(piece),
                    self.chunk_usage(include, continuous, sent),
                )
                .piece(),
            );
        }
        events.push(chunk(
            finish_choice,
            self.chunk_usage(include, continuous, self.counts.c),
        ));
        if include && !self.omit_usage {
            events.push(chunk("[]", Usage::Object(self.openai_usage())));
        }
        events.push(Event::data("[DONE]".to_string()));
        events
    }

    fn chat_stream(&self, include: bool, continuous: bool) -> Vec<Event> {
        let head = format!(
            r#"{{"id":"chatcmpl-mock","object":"chat.completion.chunk","created":{CREATED},"model":{},"choices":"#,
            self.model
        );
        self.openai_stream(
            include,
            continuous,
            &head,
            Some(r#"[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]"#),
            |piece| {
                format!(
                    r#"[{{"index":0,"delta":{{"content":{}}},"finish_reason":null}}]"#,
                    js(piece)
                )
            },
            r#"[{"index":0,"delta":{},"finish_reason":"stop"}]"#,
        )
    }

    fn completion_stream(&self, include: bool, continuous: bool) -> Vec<Event> {
        let head = format!(
            r#"{{"id":"cmpl-mock","object":"text_completion","created":{CREATED},"model":{},"choices":"#,
            self.model
        );
        self.openai_stream(
            include,
            continuous,
            &head,
            None,
            |piece| {
                format!(
                    r#"[{{"index":0,"text":{},"finish_reason":null}}]"#,
                    js(piece)
                )
            },
            r#"[{"index":0,"text":"","finish_reason":"stop"}]"#,
        )
    }

    fn response_object(&self, status: &str, output: &str, usage: Usage) -> String {
        format!(
            r#"{{"id":"resp_mock","object":"response","created_at":{CREATED},"status":{},"model":{},"output":{output}{}}}"#,
            js(status),
            self.model,
            usage.member()
        )
    }

    fn responses_output(&self) -> String {
        format!(
            r#"[{{"type":"message","id":"msg_mock","status":"completed","role":"assistant","content":[{{"type":"output_text","text":{},"annotations":[]}}]}}]"#,
            js(&self.text())
        )
    }

    fn responses_body(&self) -> String {
        self.response_object(
            "completed",
            &self.responses_output(),
            self.usage(self.responses_usage()),
        )
    }

    fn responses_stream(&self) -> Vec<Event> {
        let created_usage = if self.omit_usage {
            Usage::Absent
        } else {
            Usage::Null
        };
        let mut events = vec![Event::named(
            "response.created",
            format!(
                r#"{{"type":"response.created","response":{}}}"#,
                self.response_object("in_progress", "[]", created_usage)
            ),
        )];
        for piece in &self.pieces {
            events.push(
                Event::named(
                    "response.output_text.delta",
                    format!(
                        r#"{{"type":"response.output_text.delta","item_id":"msg_mock","output_index":0,"content_index":0,"delta":{}}}"#,
                        js(piece)
                    ),
                )
                .piece(),
            );
        }
        events.push(Event::named(
            "response.output_text.done",
            format!(
                r#"{{"type":"response.output_text.done","item_id":"msg_mock","output_index":0,"content_index":0,"text":{}}}"#,
                js(&self.text())
            ),
        ));
        events.push(Event::named(
            "response.completed",
            format!(
                r#"{{"type":"response.completed","response":{}}}"#,
                self.responses_body()
            ),
        ));
        events
    }

    fn embeddings_body(&self, inputs: usize) -> String {
        let data: Vec<String> = (0..inputs)
            .map(|i| {
                let vector: Vec<String> = (0..EMBEDDING_DIMS)
                    .map(|j| format!("{:.3}", ((i + j) % EMBEDDING_DIMS + 1) as f64 / 8.0))
                    .collect();
                format!(
                    r#"{{"object":"embedding","index":{i},"embedding":[{}]}}"#,
                    vector.join(",")
                )
            })
            .collect();
        let p = self.counts.p;
        format!(
            r#"{{"object":"list","data":[{}],"model":{}{}}}"#,
            data.join(","),
            self.model,
            self.usage(format!(r#"{{"prompt_tokens":{p},"total_tokens":{p}}}"#))
                .member()
        )
    }

    fn messages_body(&self) -> String {
        format!(
            r#"{{"id":"msg_mock","type":"message","role":"assistant","model":{},"content":[{{"type":"text","text":{}}}],"stop_reason":"end_turn","stop_sequence":null{}}}"#,
            self.model,
            js(&self.text()),
            self.usage(self.anthropic_usage(self.counts.c)).member()
        )
    }

    fn messages_stream(&self) -> Vec<Event> {
        let mut events = vec![
            Event::named(
                "message_start",
                format!(
                    r#"{{"type":"message_start","message":{{"id":"msg_mock","type":"message","role":"assistant","model":{},"content":[],"stop_reason":null,"stop_sequence":null{}}}}}"#,
                    self.model,
                    // Anthropic reports 1 output token up front.
                    self.usage(self.anthropic_usage(1)).member()
                ),
            ),
            Event::named(
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#
                    .to_string(),
            ),
            Event::named("ping", r#"{"type":"ping"}"#.to_string()),
        ];
        for piece in &self.pieces {
            events.push(
                Event::named(
                    "content_block_delta",
                    format!(
                        r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{}}}}}"#,
                        js(piece)
                    ),
                )
                .piece(),
            );
        }
        events.push(Event::named(
            "content_block_stop",
            r#"{"type":"content_block_stop","index":0}"#.to_string(),
        ));
        events.push(Event::named(
            "message_delta",
            format!(
                r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn","stop_sequence":null}}{}}}"#,
                self.usage(format!(r#"{{"output_tokens":{}}}"#, self.counts.c))
                    .member()
            ),
        ));
        events.push(Event::named(
            "message_stop",
            r#"{"type":"message_stop"}"#.to_string(),
        ));
        events
    }
}

/// A JSON string literal for `s`.
fn js(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------
// Writing

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        529 => "Overloaded",
        _ => "Mock Status",
    }
}

fn sleep(d: Duration) {
    if !d.is_zero() {
        thread::sleep(d);
    }
}

/// Writes body bytes as-is or as HTTP chunks, optionally cut into pieces of
/// at most `split` bytes with a pause before every piece but the first.
struct Sink<'a> {
    out: &'a mut TcpStream,
    chunked: bool,
    split: Option<usize>,
    split_delay: Duration,
    started: bool,
    trailers: bool,
}

impl Sink<'_> {
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        // An empty HTTP chunk would end the body.
        let step = self.split.unwrap_or(usize::MAX).max(1);
        for piece in bytes.chunks(step) {
            if self.started && self.split.is_some() {
                sleep(self.split_delay);
            }
            self.started = true;
            if self.chunked {
                let mut frame = format!("{:x}\r\n", piece.len()).into_bytes();
                frame.extend_from_slice(piece);
                frame.extend_from_slice(b"\r\n");
                self.out.write_all(&frame)?;
            } else {
                self.out.write_all(piece)?;
            }
            self.out.flush()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        if self.chunked {
            if self.trailers {
                let (name, value) = TRAILER;
                write!(self.out, "0\r\n{name}: {value}\r\n\r\n")?;
            } else {
                self.out.write_all(b"0\r\n\r\n")?;
            }
            self.out.flush()?;
        }
        Ok(())
    }
}

enum Encoder {
    Identity,
    Gzip(GzEncoder<Vec<u8>>),
}

impl Encoder {
    fn new(gzip: bool) -> Encoder {
        if gzip {
            Encoder::Gzip(GzEncoder::new(Vec::new(), Compression::default()))
        } else {
            Encoder::Identity
        }
    }

    /// Compresses without a flush: the output comes when the compressor
    /// wants, which keeps a bomb's padding at deflate's best ratio.
    fn push_unflushed(&mut self, bytes: &[u8]) -> io::Result<Vec<u8>> {
        match self {
            Encoder::Identity => Ok(bytes.to_vec()),
            Encoder::Gzip(enc) => {
                enc.write_all(bytes)?;
                Ok(std::mem::take(enc.get_mut()))
            }
        }
    }

    /// The bytes to send for `bytes`; gzip is sync-flushed so the client can
    /// decode everything received so far.
    fn push(&mut self, bytes: &[u8]) -> io::Result<Vec<u8>> {
        match self {
            Encoder::Identity => Ok(bytes.to_vec()),
            Encoder::Gzip(enc) => {
                enc.write_all(bytes)?;
                enc.flush()?;
                Ok(std::mem::take(enc.get_mut()))
            }
        }
    }

    fn finish(self) -> io::Result<Vec<u8>> {
        match self {
            Encoder::Identity => Ok(Vec::new()),
            Encoder::Gzip(enc) => enc.finish(),
        }
    }

    /// Ends the current gzip member and starts another; returns the end of
    /// the old one.
    fn next_member(&mut self) -> io::Result<Vec<u8>> {
        let old = std::mem::replace(self, Encoder::new(true));
        old.finish()
    }

    /// Ends the answer with deflate data that is not valid (a block of the
    /// reserved type), in place of the stream's end and trailer.
    fn finish_corrupt(mut self) -> io::Result<Vec<u8>> {
        let mut tail = self.push(&[])?;
        tail.extend_from_slice(&[0xff; 16]);
        Ok(tail)
    }
}

/// The compressed bytes of a whole answer, as the gzip knobs shape it.
fn gzip_body(bytes: &[u8], knobs: &Knobs) -> io::Result<Vec<u8>> {
    // The usage member starts at its key; whitespace may go right before it.
    let usage_at = memchr::memmem::rfind(bytes, b"\"usage\"").unwrap_or(bytes.len());
    let (before, after) = bytes.split_at(usage_at);
    let mut enc = Encoder::new(true);
    let mut all = enc.push(before)?;
    if let Some(mib) = knobs.gzip_bomb_mib {
        let spaces = vec![b' '; 1 << 20];
        for _ in 0..mib {
            all.extend(enc.push_unflushed(&spaces)?);
        }
    }
    if knobs.gzip_members > 1 {
        all.extend(enc.next_member()?);
    }
    all.extend(enc.push(after)?);
    if knobs.gzip_corrupt {
        all.extend(enc.finish_corrupt()?);
    } else {
        all.extend(enc.finish()?);
    }
    Ok(all)
}

fn head(
    knobs: &Knobs,
    status: u16,
    content_type: &str,
    length: Option<usize>,
    keep: bool,
) -> Vec<u8> {
    let mut h = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\n",
        reason(status)
    );
    if content_type == "text/event-stream" {
        h.push_str("cache-control: no-cache\r\n");
    }
    if knobs.gzip {
        h.push_str("content-encoding: gzip\r\n");
    }
    if knobs.trailers && length.is_none() {
        h.push_str(&format!("trailer: {}\r\n", TRAILER.0));
    }
    match length {
        Some(n) => h.push_str(&format!("content-length: {n}\r\n")),
        None => h.push_str("transfer-encoding: chunked\r\n"),
    }
    if !keep {
        h.push_str("connection: close\r\n");
    }
    let mut h = h.into_bytes();
    if knobs.obs_text {
        h.extend_from_slice(format!("{}: ", OBS_TEXT.0).as_bytes());
        h.extend_from_slice(OBS_TEXT.1);
        h.extend_from_slice(b"\r\n");
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// The SSE framing of one event, with the `x-mock-newline` line ending and
/// the `x-mock-sse-extras` decorations.
fn render_event(ev: &Event, idx: usize, nl: &str, extras: bool, split_data: bool) -> Vec<u8> {
    let mut s = String::with_capacity(ev.data.len() + 64);
    if extras {
        if idx > 0 {
            s.push_str(": keep-alive");
            s.push_str(nl);
            s.push_str(nl);
        }
        s.push_str(&format!("id: {}{nl}", idx + 1));
        if idx == 0 {
            s.push_str("retry: 1000");
            s.push_str(nl);
        }
    }
    if let Some(name) = ev.name {
        s.push_str(&format!("event: {name}{nl}"));
    }
    let halves = split_data
        .then(|| split_point(&ev.data))
        .flatten()
        .and_then(|at| Some((ev.data.get(..at)?, ev.data.get(at..)?)));
    match halves {
        Some((a, b)) => s.push_str(&format!("data: {a}{nl}data: {b}{nl}")),
        None => s.push_str(&format!("data: {}{nl}", ev.data)),
    }
    s.push_str(nl);
    s.into_bytes()
}

/// A byte offset just after a comma outside JSON strings (the middle one),
/// where a line break is JSON whitespace.
fn split_point(json: &str) -> Option<usize> {
    let mut commas = Vec::new();
    let (mut in_string, mut escaped) = (false, false);
    for (i, b) in json.bytes().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if b == b',' {
            commas.push(i + 1);
        }
    }
    commas.get(commas.len() / 2).copied()
}

/// Sends `reply`; `Ok(true)` if the connection may serve another request.
/// `head_only` (a HEAD request) sends the headers a GET would get, as HTTP
/// requires; a body there would be read as the next response.
fn write_reply(
    out: &mut TcpStream,
    reply: Reply,
    keep_alive: bool,
    head_only: bool,
) -> io::Result<bool> {
    let Reply {
        status,
        content_type,
        body,
        knobs,
    } = reply;
    match body {
        Body::Full(bytes) => {
            sleep(knobs.ttft);
            let bytes = if knobs.gzip {
                gzip_body(&bytes, &knobs)?
            } else {
                bytes
            };
            let chunked = knobs.split_bytes.is_some() || knobs.trailers;
            let length = (!chunked).then_some(bytes.len());
            out.write_all(&head(&knobs, status, content_type, length, keep_alive))?;
            out.flush()?;
            if head_only {
                return Ok(keep_alive);
            }
            let mut sink = Sink {
                out,
                chunked,
                split: knobs.split_bytes,
                split_delay: knobs.split_delay,
                started: false,
                trailers: knobs.trailers,
            };
            sink.send(&bytes)?;
            sink.finish()?;
            Ok(keep_alive)
        }
        Body::Stream(events) => {
            out.write_all(&head(&knobs, status, content_type, None, keep_alive))?;
            out.flush()?;
            sleep(knobs.ttft);
            let split_at = if knobs.sse_extras {
                events
                    .iter()
                    .position(|e| e.piece)
                    .or_else(|| events.iter().position(|e| split_point(&e.data).is_some()))
            } else {
                None
            };
            let mut enc = Encoder::new(knobs.gzip);
            let mut sink = Sink {
                out,
                chunked: true,
                split: knobs.split_bytes,
                split_delay: knobs.split_delay,
                started: false,
                trailers: knobs.trailers,
            };
            if knobs.abort_after == Some(0) {
                return abort(sink.out);
            }
            let second_member = (knobs.gzip_members > 1)
                .then(|| events.iter().position(|e| e.data.contains("\"usage\":{")))
                .flatten();
            for (i, ev) in events.iter().enumerate() {
                if i > 0 {
                    sleep(knobs.chunk_delay);
                }
                if second_member == Some(i) {
                    sink.send(&enc.next_member()?)?;
                }
                let raw = render_event(ev, i, knobs.newline, knobs.sse_extras, split_at == Some(i));
                let bytes = enc.push(&raw)?;
                sink.send(&bytes)?;
                if knobs.abort_after == Some(i + 1) {
                    return abort(sink.out);
                }
            }
            if knobs.sse_tail {
                sink.send(&enc.push(br#"data: {"partial":true}"#)?)?;
            }
            let tail = if knobs.gzip_corrupt {
                enc.finish_corrupt()?
            } else {
                enc.finish()?
            };
            sink.send(&tail)?;
            sink.finish()?;
            Ok(keep_alive)
        }
    }
}

/// Hangs up mid-body: no terminating chunk, so the peer sees a truncated
/// response.
fn abort(out: &mut TcpStream) -> io::Result<bool> {
    out.flush()?;
    out.shutdown(Shutdown::Both)?;
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Instant;

    struct Resp {
        status: u16,
        headers: Vec<(String, String)>,
        /// HTTP chunks as received (one element for a Content-Length body).
        chunks: Vec<Vec<u8>>,
        body: Vec<u8>,
        /// False if the connection ended before the body did.
        complete: bool,
    }

    impl Resp {
        fn header(&self, name: &str) -> Option<&str> {
            header_of(&self.headers, name)
        }
        fn text(&self) -> String {
            String::from_utf8(self.body.clone()).unwrap()
        }
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).unwrap()
        }
    }

    fn read_response(r: &mut impl BufRead) -> Resp {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let status = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            let l = l.trim_end();
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':').unwrap();
            headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
        }
        let mut chunks = Vec::new();
        let mut complete = true;
        if header_of(&headers, "transfer-encoding") == Some("chunked") {
            loop {
                let mut size = String::new();
                if r.read_line(&mut size).unwrap_or(0) == 0 {
                    complete = false;
                    break;
                }
                let n = usize::from_str_radix(size.trim(), 16).unwrap();
                if n == 0 {
                    let mut end = String::new();
                    r.read_line(&mut end).unwrap();
                    break;
                }
                let mut data = vec![0; n + 2];
                r.read_exact(&mut data).unwrap();
                data.truncate(n);
                chunks.push(data);
            }
        } else {
            let n: usize = header_of(&headers, "content-length")
                .unwrap()
                .parse()
                .unwrap();
            let mut data = vec![0; n];
            r.read_exact(&mut data).unwrap();
            chunks.push(data);
        }
        let body = chunks.concat();
        Resp {
            status,
            headers,
            chunks,
            body,
            complete,
        }
    }

    fn request(path: &str, headers: &[(&str, &str)], body: &str) -> String {
        let mut raw = format!(
            "POST {path} HTTP/1.1\r\nhost: mock\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (n, v) in headers {
            raw.push_str(&format!("{n}: {v}\r\n"));
        }
        raw.push_str("\r\n");
        raw.push_str(body);
        raw
    }

    fn send_raw(mock: &MockLlm, raw: &[u8]) -> Resp {
        let mut s = TcpStream::connect(mock.addr()).unwrap();
        s.write_all(raw).unwrap();
        read_response(&mut BufReader::new(s))
    }

    fn post(mock: &MockLlm, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        send_raw(mock, request(path, headers, body).as_bytes())
    }

    /// (event name, joined data) per dispatched event, any line ending.
    fn sse(body: &[u8]) -> Vec<(Option<String>, String)> {
        let text = String::from_utf8(body.to_vec()).unwrap();
        let text = text.replace("\r\n", "\n").replace('\r', "\n");
        let mut out = Vec::new();
        for block in text.split("\n\n") {
            let (mut name, mut data) = (None, Vec::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push(v);
                }
            }
            if !data.is_empty() {
                out.push((name, data.join("\n")));
            }
        }
        out
    }

    const CHAT: &str =
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello there world"}]}"#;
    const CHAT_STREAM: &str = r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hello there world"}]}]}"#;

    #[test]
    fn words_counts_whitespace_separated_words() {
        assert_eq!(words(""), 0);
        assert_eq!(words("   \t\n"), 0);
        assert_eq!(words("hello"), 1);
        assert_eq!(words("hello there world"), 3);
        assert_eq!(words("  a\tb\nc  d\r\ne "), 5);
        assert_eq!(words("héllo, wörld!"), 2);
    }

    #[test]
    fn chat_non_stream_usage_is_deterministic() {
        let mock = MockLlm::start().unwrap();
        let r = post(&mock, "/v1/chat/completions", &[], CHAT);
        assert_eq!(r.status, 200);
        assert!(r.header("content-length").is_some());
        let v = r.json();
        assert_eq!(v["model"], "gpt-4o");
        assert_eq!(v["choices"][0]["message"]["content"], "w0 w1 w2 w3 w4 ");
        assert_eq!(
            v["usage"],
            serde_json::json!({"prompt_tokens":3,"completion_tokens":5,"total_tokens":8,
                "prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}})
        );
        let rec = mock.last_request().unwrap();
        assert_eq!(rec.method, "POST");
        assert_eq!(rec.path, "/v1/chat/completions");
        assert_eq!(rec.header("Host"), Some("mock"));
        assert_eq!(rec.body, CHAT.as_bytes());
    }

    #[test]
    fn usage_knobs_and_model_override() {
        let mock = MockLlm::start().unwrap();
        let h = [
            ("x-mock-chunks", "2"),
            ("x-mock-reasoning-tokens", "4"),
            ("x-mock-cached-tokens", "1"),
            ("x-mock-prompt-tokens", "10"),
            ("x-mock-response-model", "gpt-4o-2024-08-06"),
        ];
        let v = post(&mock, "/v1/chat/completions", &h, CHAT).json();
        assert_eq!(v["model"], "gpt-4o-2024-08-06");
        assert_eq!(v["usage"]["prompt_tokens"], 10);
        assert_eq!(v["usage"]["completion_tokens"], 6);
        assert_eq!(v["usage"]["total_tokens"], 16);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
        assert_eq!(
            v["usage"]["completion_tokens_details"]["reasoning_tokens"],
            4
        );

        let v = post(&mock, "/v1/responses", &h[..4], r#"{"model":"o3","instructions":"a b","input":[{"role":"user","content":[{"type":"input_text","text":"c d e"}]}]}"#).json();
        assert_eq!(v["model"], "o3");
        assert_eq!(v["output"][0]["content"][0]["text"], "w0 w1 ");
        assert_eq!(
            v["usage"],
            serde_json::json!({"input_tokens":10,"input_tokens_details":{"cached_tokens":1},
                "output_tokens":6,"output_tokens_details":{"reasoning_tokens":4},"total_tokens":16})
        );

        let h = [
            ("x-mock-cached-tokens", "2"),
            ("x-mock-cache-creation-tokens", "3"),
        ];
        let body = r#"{"model":"claude","system":[{"type":"text","text":"one two three four"}],"messages":[{"role":"user","content":"five six"}]}"#;
        let v = post(&mock, "/v1/messages", &h, body).json();
        assert_eq!(
            v["usage"],
            serde_json::json!({"input_tokens":1,"cache_creation_input_tokens":3,"cache_read_input_tokens":2,"output_tokens":5})
        );

        let v = post(
            &mock,
            "/v1/embeddings",
            &[],
            r#"{"model":"e","input":["a b","c"]}"#,
        )
        .json();
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
        assert_eq!(v["data"][1]["embedding"].as_array().unwrap().len(), 8);
        assert_eq!(
            v["usage"],
            serde_json::json!({"prompt_tokens":3,"total_tokens":3})
        );

        let v = post(&mock, "/v1/completions", &[], r#"{"prompt":["a b","c"]}"#).json();
        assert_eq!(v["model"], "mock-model");
        assert_eq!(v["choices"][0]["text"], "w0 w1 w2 w3 w4 ");
        assert_eq!(v["usage"]["prompt_tokens"], 3);
    }

    #[test]
    fn chat_stream_with_include_usage_matches_openai() {
        let mock = MockLlm::start().unwrap();
        let r = post(&mock, "/v1/chat/completions", &[], CHAT_STREAM);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        assert!(r.complete);
        let events = sse(&r.body);
        // role + 5 pieces + finish + usage + [DONE]
        assert_eq!(events.len(), 9);
        assert_eq!(r.chunks.len(), 9, "one HTTP chunk per event");
        for (_, data) in &events[..7] {
            assert!(data.ends_with(r#","usage":null}"#), "{data}");
        }
        let first: Value = serde_json::from_str(&events[0].1).unwrap();
        assert_eq!(
            first["choices"][0]["delta"],
            serde_json::json!({"role":"assistant","content":""})
        );
        let text: String = events[1..6]
            .iter()
            .map(|(_, d)| {
                let v: Value = serde_json::from_str(d).unwrap();
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(text, "w0 w1 w2 w3 w4 ");
        let last: Value = serde_json::from_str(&events[7].1).unwrap();
        assert_eq!(last["choices"], serde_json::json!([]));
        assert_eq!(last["usage"]["prompt_tokens"], 5);
        assert_eq!(last["usage"]["completion_tokens"], 5);
        assert_eq!(events[8].1, "[DONE]");

        // Without include_usage: no usage member anywhere.
        let plain = CHAT_STREAM.replace("true}", "false}");
        let events = sse(&post(&mock, "/v1/chat/completions", &[], &plain).body);
        assert_eq!(events.len(), 8);
        assert!(events.iter().all(|(_, d)| !d.contains("usage")));
    }

    #[test]
    fn continuous_usage_stats_and_omit_usage() {
        let mock = MockLlm::start().unwrap();
        let body = r#"{"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true},"messages":[{"role":"user","content":"a b"}]}"#;
        let events = sse(&post(
            &mock,
            "/v1/chat/completions",
            &[("x-mock-chunks", "2")],
            body,
        )
        .body);
        let sent: Vec<u64> = events[..4]
            .iter()
            .map(|(_, d)| {
                serde_json::from_str::<Value>(d).unwrap()["usage"]["completion_tokens"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(sent, [0, 1, 2, 2]);
        assert_eq!(events.len(), 6);

        let h = [("x-mock-omit-usage", "1")];
        for (path, body) in [
            ("/v1/chat/completions", body),
            ("/v1/messages", r#"{"stream":true,"messages":[]}"#),
            ("/v1/responses", r#"{"stream":true,"input":"x"}"#),
            ("/v1/messages", r#"{"messages":[]}"#),
        ] {
            let r = post(&mock, path, &h, body);
            assert_eq!(r.status, 200);
            assert!(!r.text().contains("usage"), "{path}");
        }
    }

    #[test]
    fn chunked_request_body_and_keep_alive() {
        let mock = MockLlm::start().unwrap();
        let (a, b) = CHAT.split_at(20);
        let chunked = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\ntrailer: x\r\n\r\n",
            a.len(),
            b.len()
        );
        let s = TcpStream::connect(mock.addr()).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        w.write_all(chunked.as_bytes()).unwrap();
        let first = read_response(&mut r);
        assert_eq!(first.status, 200);
        assert_eq!(first.json()["usage"]["prompt_tokens"], 3);
        assert_eq!(mock.last_request().unwrap().body, CHAT.as_bytes());
        // Second request on the same connection.
        w.write_all(
            request(
                "/v1/messages",
                &[],
                r#"{"messages":[{"role":"user","content":"x y"}]}"#,
            )
            .as_bytes(),
        )
        .unwrap();
        let second = read_response(&mut r);
        assert_eq!(second.status, 200);
        assert_eq!(second.json()["usage"]["input_tokens"], 2);
        assert_eq!(mock.requests().len(), 2);
    }

    #[test]
    fn status_knob_and_errors() {
        let mock = MockLlm::start().unwrap();
        let r = post(
            &mock,
            "/v1/chat/completions",
            &[("x-mock-status", "429")],
            CHAT_STREAM,
        );
        assert_eq!(r.status, 429);
        assert!(r.header("content-length").is_some());
        let v = r.json();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert!(v.get("usage").is_none());

        let r = post(&mock, "/v1/messages", &[("x-mock-status", "529")], "{}");
        assert_eq!(r.status, 529);
        assert_eq!(r.json()["error"]["type"], "overloaded_error");

        let r = post(&mock, "/v1/messages", &[], "{not json");
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["type"], "error");

        let r = post(
            &mock,
            "/v1/chat/completions",
            &[("x-mock-chunks", "lots")],
            CHAT,
        );
        assert_eq!(r.status, 400);
        assert!(r.json()["error"]["message"].is_string());

        assert_eq!(post(&mock, "/nope", &[], "{}").status, 404);
        let r = post(&mock, "/v1/threads/t1/messages", &[], r#"{"role":"user"}"#);
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["object"], "thread.message");
        assert!(r.json().get("usage").is_none());
        let azure = "/openai/deployments/my-gpt/chat/completions";
        assert_eq!(post(&mock, azure, &[], CHAT).status, 404);
        let r = post(&mock, &format!("{azure}?api-version=2024-10-21"), &[], CHAT);
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["model"], "my-gpt");

        let r = send_raw(&mock, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n");
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
        let r = send_raw(&mock, b"GARBAGE\r\n\r\n");
        assert_eq!(r.status, 400);
    }

    #[test]
    fn abort_knob_closes_mid_stream() {
        let mock = MockLlm::start().unwrap();
        let r = post(
            &mock,
            "/v1/chat/completions",
            &[("x-mock-abort-after", "2")],
            CHAT_STREAM,
        );
        assert_eq!(r.status, 200);
        assert!(!r.complete);
        let events = sse(&r.body);
        assert_eq!(events.len(), 2);
        assert!(!r.text().contains("[DONE]"));
    }

    #[test]
    fn split_bytes_preserves_the_bytes() {
        let mock = MockLlm::start().unwrap();
        let whole = post(
            &mock,
            "/v1/messages",
            &[],
            r#"{"stream":true,"messages":[]}"#,
        );
        let h = [("x-mock-split-bytes", "1"), ("x-mock-split-delay-ms", "0")];
        let split = post(
            &mock,
            "/v1/messages",
            &h,
            r#"{"stream":true,"messages":[]}"#,
        );
        assert_eq!(split.body, whole.body);
        assert!(split.chunks.iter().all(|c| c.len() == 1));
        assert_eq!(split.chunks.len(), whole.body.len());

        let whole = post(&mock, "/v1/chat/completions", &[], CHAT);
        let h = [("x-mock-split-bytes", "7"), ("x-mock-split-delay-ms", "0")];
        let split = post(&mock, "/v1/chat/completions", &h, CHAT);
        assert_eq!(split.header("transfer-encoding"), Some("chunked"));
        assert_eq!(split.body, whole.body);
        assert!(split.chunks.iter().all(|c| c.len() <= 7));
    }

    #[test]
    fn gzip_decodes_to_the_identity_body() {
        use flate2::read::GzDecoder;
        let mock = MockLlm::start().unwrap();
        let plain = post(&mock, "/v1/chat/completions", &[], CHAT);
        let gz = post(
            &mock,
            "/v1/chat/completions",
            &[("accept-encoding", "br, gzip")],
            CHAT,
        );
        assert_eq!(gz.header("content-encoding"), Some("gzip"));
        let mut decoded = Vec::new();
        GzDecoder::new(&gz.body[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert_eq!(decoded, plain.body);

        let plain = post(
            &mock,
            "/v1/responses",
            &[],
            r#"{"stream":true,"input":"hi"}"#,
        );
        let gz = post(
            &mock,
            "/v1/responses",
            &[("x-mock-gzip", "force")],
            r#"{"stream":true,"input":"hi"}"#,
        );
        assert_eq!(gz.header("content-encoding"), Some("gzip"));
        // Progressive: the first HTTP chunk alone decodes to the first event.
        let mut partial = flate2::write::GzDecoder::new(Vec::new());
        partial.write_all(&gz.chunks[0]).unwrap();
        partial.flush().unwrap();
        let first = String::from_utf8(partial.get_ref().clone()).unwrap();
        assert!(first.starts_with("event: response.created\ndata: "));
        assert!(first.ends_with("\n\n"));
        let mut decoded = Vec::new();
        GzDecoder::new(&gz.body[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert_eq!(decoded, plain.body);
    }

    #[test]
    fn gzip_knobs_shape_the_compressed_body() {
        use flate2::read::{GzDecoder, MultiGzDecoder};
        let mock = MockLlm::start().unwrap();
        let plain = post(&mock, "/v1/chat/completions", &[], CHAT).body;
        let decode_all = |body: &[u8]| {
            let mut out = Vec::new();
            let done = MultiGzDecoder::new(body).read_to_end(&mut out);
            (out, done.is_ok())
        };

        // A bomb: tiny on the wire, the same JSON with spaces before "usage".
        let bomb = post(
            &mock,
            "/v1/chat/completions",
            &[("x-mock-gzip-bomb-mib", "16")],
            CHAT,
        );
        assert_eq!(bomb.header("content-encoding"), Some("gzip"));
        assert!(bomb.body.len() < 64 << 10, "{}", bomb.body.len());
        let (inflated, ok) = decode_all(&bomb.body);
        assert!(ok);
        assert_eq!(inflated.len(), plain.len() + (16 << 20));
        let v: Value = serde_json::from_slice(&inflated).unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 5);

        // Two members, the second from the usage on: a single-member decoder
        // stops before the usage.
        let stream = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"a b"}]}"#;
        for (body, usage_at_end) in [(CHAT, "\"usage\":{"), (stream, "\"usage\":{")] {
            let two = post(
                &mock,
                "/v1/chat/completions",
                &[("x-mock-gzip-members", "2")],
                body,
            );
            let (all, ok) = decode_all(&two.body);
            assert!(ok);
            assert!(
                String::from_utf8_lossy(&all).contains(usage_at_end),
                "{body}"
            );
            let mut first = Vec::new();
            GzDecoder::new(&two.body[..])
                .read_to_end(&mut first)
                .unwrap();
            assert!(
                !String::from_utf8_lossy(&first).contains(usage_at_end),
                "{body}"
            );
        }

        // Corrupt after the whole answer: it all decodes, then an error.
        for body in [CHAT, stream] {
            let bad = post(
                &mock,
                "/v1/chat/completions",
                &[("x-mock-gzip-corrupt", "1")],
                body,
            );
            let mut dec = flate2::write::GzDecoder::new(Vec::new());
            assert!(dec.write_all(&bad.body).and_then(|()| dec.flush()).is_err());
            let (prefix, ok) = decode_all(&bad.body[..bad.body.len() - 16]);
            assert!(!ok, "no end: the stream is cut");
            assert!(
                String::from_utf8_lossy(&prefix).contains("\"usage\":{"),
                "{body}"
            );
        }

        for (knob, value) in [
            ("x-mock-gzip-bomb-mib", "0"),
            ("x-mock-gzip-bomb-mib", "5000"),
            ("x-mock-gzip-members", "3"),
            ("x-mock-gzip-corrupt", "maybe"),
            ("x-mock-trailers", "2"),
        ] {
            let r = post(&mock, "/v1/chat/completions", &[(knob, value)], CHAT);
            assert_eq!(r.status, 400, "{knob}: {value}");
        }
    }

    #[test]
    fn trailers_end_json_and_streams() {
        let mock = MockLlm::start().unwrap();
        let stream = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"a b"}]}"#;
        for body in [CHAT, stream] {
            let mut raw = request("/v1/chat/completions", &[("x-mock-trailers", "1")], body);
            raw = raw.replacen("host: mock\r\n", "host: mock\r\nconnection: close\r\n", 1);
            let mut s = TcpStream::connect(mock.addr()).unwrap();
            s.write_all(raw.as_bytes()).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            let text = String::from_utf8(got).unwrap();
            assert!(
                text.contains("\r\ntransfer-encoding: chunked\r\n"),
                "{text}"
            );
            assert!(text.contains("\r\ntrailer: x-mock-done\r\n"), "{text}");
            assert!(text.ends_with("\r\n0\r\nx-mock-done: 1\r\n\r\n"), "{text}");
        }
    }

    #[test]
    fn anthropic_stream_events_in_order() {
        let mock = MockLlm::start().unwrap();
        let body = r#"{"model":"claude-x","stream":true,"system":"s t","messages":[{"role":"user","content":[{"type":"text","text":"a b c"}]}]}"#;
        let r = post(&mock, "/v1/messages", &[("x-mock-chunks", "2")], body);
        let events = sse(&r.body);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        for (name, data) in &events {
            let v: Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["type"], name.as_deref().unwrap());
        }
        let start: Value = serde_json::from_str(&events[0].1).unwrap();
        assert_eq!(start["message"]["model"], "claude-x");
        assert_eq!(start["message"]["usage"]["input_tokens"], 5);
        assert_eq!(start["message"]["usage"]["output_tokens"], 1);
        let delta: Value = serde_json::from_str(&events[4].1).unwrap();
        assert_eq!(delta["delta"]["text"], "w1 ");
        let end: Value = serde_json::from_str(&events[6].1).unwrap();
        assert_eq!(end["usage"]["output_tokens"], 2);
    }

    #[test]
    fn newline_and_sse_extras_parse_to_the_same_events() {
        let mock = MockLlm::start().unwrap();
        let body = r#"{"stream":true,"input":"hi"}"#;
        let plain = sse(&post(&mock, "/v1/responses", &[], body).body);
        for nl in ["crlf", "cr"] {
            let h = [("x-mock-newline", nl), ("x-mock-sse-extras", "1")];
            let r = post(&mock, "/v1/responses", &h, body);
            let text = r.text();
            assert!(text.contains(": keep-alive") && text.contains("retry: 1000"));
            let events = sse(&r.body);
            assert_eq!(events.len(), plain.len());
            for ((n1, d1), (n2, d2)) in events.iter().zip(&plain) {
                assert_eq!(n1, n2);
                let v1: Value = serde_json::from_str(d1).unwrap();
                let v2: Value = serde_json::from_str(d2).unwrap();
                assert_eq!(v1, v2);
            }
            assert!(
                events.iter().any(|(_, d)| d.contains('\n')),
                "one event split over two data lines"
            );
        }
    }

    #[test]
    fn ttft_sends_headers_first() {
        let mock = MockLlm::start().unwrap();
        let start = Instant::now();
        let mut s = TcpStream::connect(mock.addr()).unwrap();
        s.write_all(
            request(
                "/v1/chat/completions",
                &[("x-mock-ttft-ms", "150"), ("connection", "close")],
                CHAT_STREAM,
            )
            .as_bytes(),
        )
        .unwrap();
        let mut r = BufReader::new(s);
        let mut status = String::new();
        r.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"));
        let headers_at = start.elapsed();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        // The wait starts only after the headers went out.
        assert!(start.elapsed() - headers_at >= Duration::from_millis(100));
        assert!(String::from_utf8(rest)
            .unwrap()
            .contains("connection: close"));
    }

    #[test]
    fn head_has_no_body_and_keeps_framing() {
        let mock = MockLlm::start().unwrap();
        let mut s = TcpStream::connect(mock.addr()).unwrap();
        s.write_all(b"HEAD /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut all = String::new();
        s.read_to_string(&mut all).unwrap();
        assert!(
            all.contains("content-length: 2\r\n\r\nHTTP/1.1 200 OK\r\n"),
            "{all}"
        );
        assert!(all.ends_with("\r\n\r\nok"));
    }

    #[test]
    fn drop_hangs_up_idle_connections_and_stops_listening() {
        let mock = MockLlm::start().unwrap();
        let addr = mock.addr();
        let mut idle = TcpStream::connect(addr).unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
        let mut r = BufReader::new(idle.try_clone().unwrap());
        assert_eq!(read_response(&mut r).status, 200);
        let start = Instant::now();
        drop(mock);
        assert!(start.elapsed() < Duration::from_secs(1));
        idle.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut rest = Vec::new();
        assert_eq!(r.read_to_end(&mut rest).unwrap(), 0);
        assert!(TcpStream::connect(addr).is_err());
    }

    #[test]
    fn split_point_skips_commas_in_strings() {
        assert_eq!(split_point(r#"{"a":"x,y"}"#), None);
        let data = r#"{"a":"x,y","b":1,"c":2}"#;
        let at = split_point(data).unwrap();
        assert_eq!(&data[..at], r#"{"a":"x,y","b":1,"#);
    }
}
