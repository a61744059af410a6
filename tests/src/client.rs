//! A small HTTP/1.1 client over a raw socket.
//!
//! The tests need what a general client hides: the exact bytes of a stream,
//! and hanging up in the middle of one. One request per connection
//! (`connection: close`), so the end of the response is the end of the socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body with chunked framing removed (content encoding left as it is).
    pub body: Vec<u8>,
    /// HTTP/1.1 trailers after a chunked body (names lower-cased).
    pub trailers: Vec<(String, String)>,
}

impl Response {
    pub fn parse(raw: &[u8]) -> Result<Response, String> {
        let end = find(raw, b"\r\n\r\n").ok_or("no end of headers")?;
        let head = std::str::from_utf8(&raw[..end]).map_err(|e| e.to_string())?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().ok_or("empty response")?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let rest = &raw[end + 4..];
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
        let (body, trailers) = if chunked {
            let (data, _, trailers) = walk_chunks(rest);
            (data, trailers)
        } else {
            (rest.to_vec(), Vec::new())
        };
        Ok(Response {
            status,
            headers,
            body,
            trailers,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Removes chunked framing; returns the data and whether the final chunk was seen.
pub fn dechunk(raw: &[u8]) -> (Vec<u8>, bool) {
    let (data, complete, _) = walk_chunks(raw);
    (data, complete)
}

/// A chunked body's data, whether its last chunk was seen, and its trailers.
fn walk_chunks(mut raw: &[u8]) -> (Vec<u8>, bool, Vec<(String, String)>) {
    let mut out = Vec::new();
    loop {
        let Some(eol) = find(raw, b"\r\n") else {
            return (out, false, Vec::new());
        };
        let size_text = std::str::from_utf8(&raw[..eol]).unwrap_or("");
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return (out, false, Vec::new());
        };
        let start = eol + 2;
        if size == 0 {
            let trailers = String::from_utf8_lossy(&raw[start..])
                .split("\r\n")
                .take_while(|l| !l.is_empty())
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            return (out, true, trailers);
        }
        if raw.len() < start + size {
            out.extend_from_slice(&raw[start..]);
            return (out, false, Vec::new());
        }
        out.extend_from_slice(&raw[start..start + size]);
        raw = raw.get(start + size + 2..).unwrap_or(&[]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: aigw.test\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Sends one request and reads the whole response.
pub fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(&request_bytes(method, path, headers, body))
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    Response::parse(&raw)
}

pub fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Response, String> {
    send(addr, "POST", path, headers, body.as_bytes())
}

/// A keep-alive connection, for tests that send many requests quickly.
pub struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Result<Conn, String> {
        let s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        Ok(Conn {
            reader: BufReader::new(s),
        })
    }

    /// Sends one POST and reads its response (Content-Length or chunked).
    pub fn post(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Response, String> {
        let mut req = request_bytes("POST", path, headers, body.as_bytes());
        // The same request, without the hang-up `request_bytes` asks for.
        let close = b"connection: close\r\n";
        if let Some(at) = find(&req, close) {
            req.drain(at..at + close.len());
        }
        let io = |e: std::io::Error| e.to_string();
        self.reader.get_mut().write_all(&req).map_err(io)?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let n = self.reader.read_until(b'\n', &mut head).map_err(io)?;
            if n == 0 {
                return Err("connection closed in the headers".into());
            }
        }
        let mut resp = Response::parse(&head)?;
        if let Some(n) = resp.header("content-length") {
            let n: usize = n.parse().map_err(|_| format!("bad content-length {n:?}"))?;
            resp.body = vec![0; n];
            self.reader.read_exact(&mut resp.body).map_err(io)?;
        } else {
            let mut raw = Vec::new();
            loop {
                let mut line = Vec::new();
                self.reader.read_until(b'\n', &mut line).map_err(io)?;
                let size = std::str::from_utf8(&line).unwrap_or("").trim();
                let size = usize::from_str_radix(size.split(';').next().unwrap_or(""), 16)
                    .map_err(|_| format!("bad chunk size {size:?}"))?;
                raw.extend_from_slice(&line);
                if size == 0 {
                    // Trailers, if any, then the empty line.
                    loop {
                        let mut t = Vec::new();
                        self.reader.read_until(b'\n', &mut t).map_err(io)?;
                        raw.extend_from_slice(&t);
                        if t == b"\r\n" || t.is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let mut data = vec![0; size + 2];
                self.reader.read_exact(&mut data).map_err(io)?;
                raw.extend_from_slice(&data);
            }
            (resp.body, _, resp.trailers) = walk_chunks(&raw);
        }
        Ok(resp)
    }
}

/// Sends a request, reads the response until its raw bytes contain `until`,
/// then hangs up. Returns what was read.
pub fn post_and_hang_up(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    until: &str,
) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(&request_bytes("POST", path, headers, body.as_bytes()))
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while find(&raw, until.as_bytes()).is_none() {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("connection closed before {until:?}"));
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked_responses() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n";
        let r = Response::parse(raw).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-a"), Some("b"));
        assert_eq!(r.body, b"abcde");
        assert!(r.trailers.is_empty());
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Done: 1\r\nx-b: c d\r\n\r\n";
        let r = Response::parse(raw).unwrap();
        assert_eq!(r.body, b"abc");
        assert_eq!(
            r.trailers,
            [("x-done".into(), "1".into()), ("x-b".into(), "c d".into())]
        );
        assert_eq!(dechunk(b"3\r\nab"), (b"ab".to_vec(), false));
    }
}
