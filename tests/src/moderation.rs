//! A mock moderation service (OpenAI `/v1/moderations` shape) for the
//! content-screen tests: it flags any input that contains `FLAGME`
//! (category `violence`), answers after a configurable delay, records what
//! it was asked, and stops when dropped.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct MockModeration {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl MockModeration {
    /// Listens on a free loopback port; answers after `delay`.
    pub fn start(delay: Duration) -> std::io::Result<MockModeration> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (Arc::clone(&asked), Arc::clone(&stop));
        let acceptor = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let a = Arc::clone(&a);
                std::thread::spawn(move || serve(conn, &a, delay));
            }
        });
        Ok(MockModeration {
            addr,
            asked,
            stop,
            acceptor: Some(acceptor),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The request bodies it received, in order.
    pub fn asked(&self) -> Vec<Value> {
        self.asked.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

impl Drop for MockModeration {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

/// Serves the requests of one connection (keep-alive) until it closes.
fn serve(conn: TcpStream, asked: &Mutex<Vec<Value>>, delay: Duration) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut r = BufReader::new(conn);
    loop {
        let mut len = 0usize;
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let flagged = v["input"].as_str().is_some_and(|t| t.contains("FLAGME"));
        if let Ok(mut a) = asked.lock() {
            a.push(v);
        }
        std::thread::sleep(delay);
        let answer = json!({"id": "modr-1", "model": "omni-moderation-latest",
            "results": [{"flagged": flagged, "categories": {"violence": flagged, "hate": false}}]})
        .to_string();
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}
