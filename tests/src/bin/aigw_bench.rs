//! `aigw-bench`: what the filters cost, against bare Envoy.
//!
//! For each variant (bare Envoy, each filter gateway.yaml chains alone, the
//! gateway as shipped, all five modules chained) and each request shape (a ~1 KiB chat request answered as JSON,
//! the same asked as a stream), it starts Envoy with one worker in front of the
//! mock LLM, keeps `--connections` keep-alive connections busy for
//! `--seconds`, and reports requests per second, latency percentiles and
//! Envoy's own CPU time per request (from /proc, so the load generator and
//! the mock, which share the machine, do not count). Run by scripts/bench.sh.

use aigw_tests::harness::{root, Envoy};
use aigw_tests::mock::MockLlm;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

struct Opts {
    seconds: u64,
    connections: usize,
    repeat: u64,
}

fn parse_opts() -> Result<Opts, String> {
    let mut opts = Opts {
        seconds: 5,
        connections: 4,
        repeat: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("{name} takes a number"))
        };
        match a.as_str() {
            "--seconds" => opts.seconds = value("--seconds")?,
            "--connections" => opts.connections = value("--connections")? as usize,
            "--repeat" => opts.repeat = value("--repeat")?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if opts.seconds == 0 || opts.connections == 0 || opts.repeat == 0 {
        return Err("--seconds, --connections and --repeat must be at least 1".into());
    }
    Ok(opts)
}

const FILTER_START: &str = "          - name: aigw.token_meter\n";
const ROUTER: &str = "          - name: envoy.filters.http.router\n";

/// gateway.yaml without its wasm filters.
fn bare(yaml: &str) -> Result<String, String> {
    let start = yaml
        .find(FILTER_START)
        .ok_or("no token-meter filter in gateway.yaml")?;
    let end = yaml.find(ROUTER).ok_or("no router in gateway.yaml")?;
    Ok(format!("{}{}", &yaml[..start], &yaml[end..]))
}

/// One wasm filter of gateway.yaml alone (its block, as shipped) in front of the router.
fn alone(yaml: &str, filter: &str) -> Result<String, String> {
    let head = format!("          - name: {filter}\n");
    let start = yaml
        .find(&head)
        .ok_or_else(|| format!("no {filter} filter in gateway.yaml"))?;
    let after = start + head.len();
    let end = after
        + yaml[after..]
            .find("          - name: ")
            .ok_or("no filter after it in gateway.yaml")?;
    let without = bare(yaml)?;
    let at = without.find(ROUTER).ok_or("no router in gateway.yaml")?;
    Ok(format!(
        "{}{}{}",
        &without[..at],
        &yaml[start..end],
        &without[at..]
    ))
}

/// gateway.yaml with the modules it does not chain yet (pass-through
/// shells) added above the meter, so that all five run.
fn all_five(yaml: &str) -> Result<String, String> {
    let start = yaml
        .find(FILTER_START)
        .ok_or("no token-meter filter in gateway.yaml")?;
    let mut extra = String::new();
    for name in [
        "content-screen",
        "rate-limit",
        "prompt-cache",
        "model-router",
    ] {
        let under = name.replace('-', "_");
        if yaml.contains(&format!("          - name: aigw.{under}\n")) {
            continue;
        }
        extra.push_str(&format!(
            "          - name: aigw.{under}
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name}
                failure_policy: FAIL_RELOAD
                vm_config:
                  vm_id: aigw-{name}
                  runtime: envoy.wasm.runtime.v8
                  code:
                    local: {{ filename: target/wasm/{name}.wasm }}  # aigw:wasm_dir
",
            under = name.replace('-', "_")
        ));
    }
    Ok(format!("{}{extra}{}", &yaml[..start], &yaml[start..]))
}

/// Pins every thread of a process to the given CPUs, so that Envoy has a
/// core of its own and the load generator and mock share the other: without
/// this the three fight over two cores and the numbers wander by half.
fn pin(pid: u32, cpus: &str) -> bool {
    std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Envoy's user+system CPU time so far.
fn cpu_time(pid: u32) -> Result<Duration, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    let after = stat.rsplit_once(')').ok_or("bad /proc stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or("bad /proc stat")
    };
    // Fields 14 and 15 of stat (utime, stime), counted after the command name.
    let total = ticks(11)? + ticks(12)?;
    let hz = 100; // USER_HZ on Linux
    Ok(Duration::from_micros(total * 1_000_000 / hz))
}

/// Sends one request on a keep-alive connection and reads the whole response.
fn exchange(reader: &mut BufReader<TcpStream>, request: &[u8]) -> Result<u16, String> {
    reader
        .get_mut()
        .write_all(request)
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let (mut length, mut chunked) = (0usize, false);
    loop {
        line.clear();
        reader.read_line(&mut line).map_err(|e| e.to_string())?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let lower = l.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().map_err(|_| "bad content-length")?;
        } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    if !chunked {
        let mut body = vec![0; length];
        reader.read_exact(&mut body).map_err(|e| e.to_string())?;
        return Ok(status);
    }
    loop {
        line.clear();
        reader.read_line(&mut line).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(line.trim_end(), 16).map_err(|_| "bad chunk size")?;
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk).map_err(|e| e.to_string())?;
        if size == 0 {
            return Ok(status);
        }
    }
}

struct Result_ {
    requests: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_request: f64,
}

fn load(addr: SocketAddr, pid: u32, request: &[u8], opts: &Opts) -> Result<Result_, String> {
    // Warm up: VMs, connections, caches.
    {
        let mut r = BufReader::new(TcpStream::connect(addr).map_err(|e| e.to_string())?);
        for _ in 0..200 {
            if exchange(&mut r, request)? != 200 {
                return Err("warm-up request failed".into());
            }
        }
    }
    let cpu_before = cpu_time(pid)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(opts.seconds);
    let workers: Vec<_> = (0..opts.connections)
        .map(|_| {
            let request = request.to_vec();
            std::thread::spawn(move || -> Result<Vec<Duration>, String> {
                let stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
                stream.set_nodelay(true).map_err(|e| e.to_string())?;
                let mut r = BufReader::new(stream);
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if exchange(&mut r, &request)? != 200 {
                        return Err("a request failed under load".into());
                    }
                    latencies.push(t.elapsed());
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.join().map_err(|_| "a load thread died")??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_time(pid)?.saturating_sub(cpu_before);
    latencies.sort_unstable();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let n = latencies.len() as u64;
    Ok(Result_ {
        requests: n,
        rps: n as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        cpu_us_per_request: cpu.as_micros() as f64 / n.max(1) as f64,
    })
}

fn request(stream: bool) -> Vec<u8> {
    // About 1 KiB of JSON, like a short chat turn with a system prompt.
    let system = "You are a helpful assistant. ".repeat(20);
    let body = serde_json::json!({
        "model": "gpt-4o",
        "stream": stream,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "Summarise the plot of a short story in three sentences."}
        ]
    })
    .to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\nx-aigw-consumer: bench\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn run() -> Result<(), String> {
    let opts = parse_opts()?;
    let gateway =
        std::fs::read_to_string(root().join("envoy/gateway.yaml")).map_err(|e| e.to_string())?;
    let variants = [
        ("bare envoy", bare(&gateway)?),
        ("token-meter", alone(&gateway, "aigw.token_meter")?),
        ("model-router", alone(&gateway, "aigw.model_router")?),
        ("gateway", gateway.clone()),
        ("5 modules", all_five(&gateway)?),
    ];
    let mock = MockLlm::start().map_err(|e| e.to_string())?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = cores >= 2 && pin(std::process::id(), "0");
    println!(
        "best of {} runs of {} s per row, {} connections, Envoy with 1 worker{}, mock LLM on loopback (5 chunks per answer)\n",
        opts.repeat,
        opts.seconds,
        opts.connections,
        if pinned { " pinned to CPU 1 (load and mock on CPU 0)" } else { " (not pinned)" }
    );
    println!(
        "{:<13} {:<7} {:>9} {:>9} {:>8} {:>8} {:>12} {:>9} {:>9}",
        "variant",
        "answer",
        "requests",
        "req/s",
        "p50 ms",
        "p99 ms",
        "CPU µs/req",
        "CPU x",
        "req/s x"
    );
    for (stream, shape) in [(false, "json"), (true, "stream")] {
        let req = request(stream);
        let mut base: Option<(f64, f64)> = None;
        for (name, yaml) in &variants {
            let envoy = Envoy::start_text(yaml, mock.addr())?;
            if pinned {
                pin(envoy.pid(), "1");
            }
            let mut best: Option<Result_> = None;
            for _ in 0..opts.repeat {
                let r = load(envoy.addr(), envoy.pid(), &req, &opts)?;
                if best
                    .as_ref()
                    .is_none_or(|b| r.cpu_us_per_request < b.cpu_us_per_request)
                {
                    best = Some(r);
                }
            }
            let r = best.ok_or("no run")?;
            let (cpu0, rps0) = *base.get_or_insert((r.cpu_us_per_request, r.rps));
            println!(
                "{:<13} {:<7} {:>9} {:>9.0} {:>8.2} {:>8.2} {:>12.1} {:>9.2} {:>9.2}",
                name,
                shape,
                r.requests,
                r.rps,
                r.p50_ms,
                r.p99_ms,
                r.cpu_us_per_request,
                r.cpu_us_per_request / cpu0,
                r.rps / rps0
            );
        }
    }
    println!("\nCPU µs/req is Envoy's own user+system time per request (from /proc).");
    println!("CPU x and req/s x are ratios against bare Envoy for the same answer shape.");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aigw-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
