//! `aigw-bench`: what the filters cost, against bare Envoy.
//!
//! Rows: bare Envoy; each filter of `envoy/gateway.yaml` alone; `chain`, the
//! separate modules as gateway.yaml chains them; `bundle`, the same gateway
//! as one module (`envoy/gateway-bundle.yaml`); `bundle-hit`, a request the
//! prompt cache answers; and `long-stream` rows, a streamed answer of 500
//! events. Each prompt is distinct (a counter in the user message), so a
//! cache lookup misses, except in the `hit` row. For each row it starts
//! Envoy with one worker in front of the mock LLM, keeps `--connections`
//! keep-alive connections busy for `--seconds`, and reports requests per
//! second, latency percentiles and Envoy's own CPU time per request (from
//! /proc, so the load generator and the mock, which share the machine, do
//! not count). After the table: p99 latency at a fixed moderate rate (open
//! loop; bare, `floor io` and the bundle), Envoy's memory at
//! `--concurrency 2`, and the module sizes. Run by
//! scripts/bench.sh. `--floor` prices the wasm machinery step by step,
//! `--memory` breaks Envoy's memory down by module, stage and worker, and
//! `--instructions N` counts instructions instead of timing.

use aigw_tests::harness::{bare, root, Envoy};
use aigw_tests::mock::MockLlm;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Clone)]
struct Opts {
    seconds: u64,
    connections: usize,
    repeat: u64,
    /// Count Envoy's instructions per request under callgrind (this many
    /// requests per row) instead of timing it: slow, but the same count on
    /// a busy machine as on an idle one.
    instructions: u64,
    /// Rows of the floor fixture instead: what a wasm filter costs before
    /// it does anything, step by step.
    floor: bool,
    /// Envoy's memory instead, broken down by module, stage and worker.
    memory: bool,
    /// Bytes of user prompt (default: a short question).
    prompt_bytes: Option<usize>,
    /// Only these rows (and bare Envoy, the base of every ratio).
    rows: Option<Vec<String>>,
}

fn parse_opts() -> Result<Opts, String> {
    let mut opts = Opts {
        seconds: 5,
        connections: 4,
        repeat: 3,
        instructions: 0,
        floor: false,
        memory: false,
        prompt_bytes: None,
        rows: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--floor" {
            opts.floor = true;
            continue;
        }
        if a == "--memory" {
            opts.memory = true;
            continue;
        }
        if a == "--rows" {
            let list = args.next().ok_or("--rows takes a comma-separated list")?;
            opts.rows = Some(list.split(',').map(str::to_string).collect());
            continue;
        }
        let mut value = |name: &str| {
            args.next()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("{name} takes a number"))
        };
        match a.as_str() {
            "--seconds" => opts.seconds = value("--seconds")?,
            "--connections" => opts.connections = value("--connections")? as usize,
            "--repeat" => opts.repeat = value("--repeat")?,
            "--instructions" => opts.instructions = value("--instructions")?,
            "--prompt-bytes" => {
                let n = value("--prompt-bytes")? as usize;
                PROMPT_BYTES.store(n, std::sync::atomic::Ordering::Relaxed);
                opts.prompt_bytes = Some(n);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if opts.seconds == 0 || opts.connections == 0 || opts.repeat == 0 {
        return Err("--seconds, --connections and --repeat must be at least 1".into());
    }
    Ok(opts)
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

fn load(addr: SocketAddr, pid: u32, answer: Answer, opts: &Opts) -> Result<Result_, String> {
    // Warm up: VMs, connections, caches (and, for the hit row, the entry).
    {
        let mut r = BufReader::new(TcpStream::connect(addr).map_err(|e| e.to_string())?);
        for i in 0..200 {
            if exchange(&mut r, &request(answer, u64::MAX - i))? != 200 {
                return Err("warm-up request failed".into());
            }
        }
    }
    let cpu_before = cpu_time(pid)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(opts.seconds);
    let workers: Vec<_> = (0..opts.connections as u64)
        .map(|w| {
            std::thread::spawn(move || -> Result<Vec<Duration>, String> {
                let stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
                stream.set_nodelay(true).map_err(|e| e.to_string())?;
                let mut r = BufReader::new(stream);
                let mut latencies = Vec::new();
                let mut i = w << 40;
                while Instant::now() < deadline {
                    let req = request(answer, i);
                    i += 1;
                    let t = Instant::now();
                    if exchange(&mut r, &req)? != 200 {
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
    let n = latencies.len() as u64;
    Ok(Result_ {
        requests: n,
        rps: n as f64 / elapsed,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        cpu_us_per_request: cpu.as_micros() as f64 / n.max(1) as f64,
    })
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// p99 latency at a fixed rate: each of 8 connections sends on a schedule,
/// and a request's latency counts from when it was due, so a slow answer
/// that delays the next request is not hidden.
fn open_loop(addr: SocketAddr, rate: u64, seconds: u64) -> Result<f64, String> {
    let conns = 8u64;
    let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let started = Instant::now() + Duration::from_millis(50);
    let total = rate * seconds / conns;
    let workers: Vec<_> = (0..conns)
        .map(|w| {
            std::thread::spawn(move || -> Result<Vec<Duration>, String> {
                let stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
                stream.set_nodelay(true).map_err(|e| e.to_string())?;
                let mut r = BufReader::new(stream);
                let offset = interval.mul_f64(w as f64 / conns as f64);
                let mut latencies = Vec::new();
                for i in 0..total {
                    let due = started + offset + interval * i as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if exchange(&mut r, &request(Answer::Json, (w << 40) + i))? != 200 {
                        return Err("a request failed under open-loop load".into());
                    }
                    latencies.push(due.elapsed());
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.join().map_err(|_| "a load thread died")??);
    }
    latencies.sort_unstable();
    Ok(percentile(&latencies, 0.99))
}

/// Envoy's resident memory, from /proc.
fn rss_mib(pid: u32) -> Result<f64, String> {
    status_mib(pid, "VmRSS:")
}

/// Envoy's anonymous resident memory (its heaps, the VMs' memories, the
/// compiled wasm code): the part not backed by its binary's file pages.
fn anon_mib(pid: u32) -> Result<f64, String> {
    status_mib(pid, "RssAnon:")
}

fn status_mib(pid: u32, field: &str) -> Result<f64, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kib / 1024.0)
}

/// Envoy's instructions per request, counted by callgrind over `n`
/// requests on one keep-alive connection after a warm-up. Each request is
/// a new prompt, as in the timed rows (but the hit row's): one prompt sent
/// again would be answered by the prompt cache after the first time.
fn instructions(
    envoy: &Envoy,
    answer: Answer,
    n: u64,
    dir: &std::path::Path,
) -> Result<f64, String> {
    let mut r = BufReader::new(TcpStream::connect(envoy.addr()).map_err(|e| e.to_string())?);
    // Long enough for V8 to have compiled the module's hot code: its
    // compiler's instructions would otherwise count against the requests.
    for i in 0..300 {
        if exchange(&mut r, &request(answer, u64::MAX - i))? != 200 {
            return Err("warm-up request failed".into());
        }
    }
    let control = |arg: &str| {
        std::process::Command::new("callgrind_control")
            .args([arg, &envoy.pid().to_string()])
            .output()
            .map_err(|e| format!("callgrind_control: {e}"))
    };
    // Three windows of n requests, the least counted: a window also holds
    // whatever else Envoy did meanwhile (a timer's tick, a collection in
    // V8, a function compiled on its first call), and a one-off of those
    // inside 100 requests moved a row by hundreds of thousands a request.
    let mut least = f64::INFINITY;
    for window in 0..WINDOWS {
        // Built before counting starts: the client shares nothing with
        // Envoy, but a request built late would only widen the window.
        let requests: Vec<Vec<u8>> = (0..n).map(|i| request(answer, window * n + i)).collect();
        control("-z")?;
        for req in &requests {
            if exchange(&mut r, req)? != 200 {
                return Err("a request failed".into());
            }
        }
        control("-d")?;
        least = least.min(newest_total(dir)? as f64 / n as f64);
    }
    Ok(least)
}

/// Windows of requests counted per row; the least is reported.
const WINDOWS: u64 = 3;

/// The instruction total of the newest callgrind dump in `dir` (the counts
/// since the last zeroing).
fn newest_total(dir: &std::path::Path) -> Result<u64, String> {
    let newest = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|f| f.to_string_lossy().contains("cg."))
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .ok_or("no callgrind dump")?;
    let text = std::fs::read_to_string(&newest).map_err(|e| e.to_string())?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals: ")
                .or_else(|| l.strip_prefix("summary: "))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| "no totals in the callgrind dump".to_string())
}

fn count_instructions(
    rows: &[(String, String, Vec<Answer>)],
    mock: &MockLlm,
    opts: &Opts,
) -> Result<(), String> {
    println!(
        "Envoy's instructions per request (callgrind, the least of {WINDOWS} windows of {} requests per row after a warm-up, 1 keep-alive connection, 1 worker)\n",
        opts.instructions
    );
    println!(
        "{:<22} {:<7} {:>14} {:>9}",
        "variant", "answer", "instr/req", "instr x"
    );
    for answer in [Answer::Json, Answer::Stream, Answer::Hit] {
        if !rows[1..].iter().any(|(_, _, a)| a.contains(&answer)) {
            continue;
        }
        // A hit is compared with bare Envoy proxying the same request upstream.
        let mut base = None;
        for (name, yaml, answers) in rows {
            let measured = if name == "bare envoy" && answer == Answer::Hit {
                Answer::Json
            } else if answers.contains(&answer) {
                answer
            } else {
                continue;
            };
            let dir = aigw_tests::harness::Scratch::new("callgrind").map_err(|e| e.to_string())?;
            std::env::set_var(
                "AIGW_ENVOY_WRAPPER",
                format!(
                    "valgrind --tool=callgrind --smc-check=all-non-file --callgrind-out-file={}/cg.%p",
                    dir.path().display()
                ),
            );
            let envoy = Envoy::start_text(yaml, mock.addr());
            std::env::remove_var("AIGW_ENVOY_WRAPPER");
            let envoy = envoy?;
            let per = instructions(&envoy, measured, opts.instructions, dir.path())?;
            let b = *base.get_or_insert(per);
            println!(
                "{:<22} {:<7} {:>14.0} {:>9.2}",
                name,
                measured.name(),
                per,
                per / b
            );
        }
    }
    Ok(())
}

/// What a row's requests ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// A ~1 KiB chat request, answered as JSON.
    Json,
    /// The same, asked as a stream (5 events).
    Stream,
    /// The same prompt every time: the prompt cache answers it.
    Hit,
    /// A stream of 500 events.
    Long,
}

impl Answer {
    fn name(self) -> &'static str {
        match self {
            Answer::Json => "json",
            Answer::Stream => "stream",
            Answer::Hit => "hit",
            Answer::Long => "500 ev",
        }
    }
}

/// Bytes of user prompt from `--prompt-bytes` (0: the short question).
static PROMPT_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Request `n` of a row: each prompt is distinct (so a cache misses), but
/// for the `hit` row.
fn request(answer: Answer, n: u64) -> Vec<u8> {
    // About 1 KiB of JSON, like a short chat turn with a system prompt.
    let system = "You are a helpful assistant. ".repeat(20);
    let mut user = match answer {
        Answer::Hit => "Summarise the plot of a short story in three sentences.".to_string(),
        _ => format!("Summarise the plot of short story number {n} in three sentences."),
    };
    let want = PROMPT_BYTES.load(std::sync::atomic::Ordering::Relaxed);
    while user.len() < want {
        user.push_str(" The story is set in a small town by the sea.");
    }
    let stream = matches!(answer, Answer::Stream | Answer::Long);
    let body = serde_json::json!({
        "model": "gpt-4o",
        "stream": stream,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user}
        ]
    })
    .to_string();
    let extra = if answer == Answer::Long {
        "x-mock-chunks: 500\r\n"
    } else {
        ""
    };
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\nx-aigw-consumer: bench\r\n{extra}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The wasm filter blocks of a gateway YAML, by the filter's name.
fn filter_names(yaml: &str) -> Vec<String> {
    yaml.lines()
        .filter_map(|l| l.strip_prefix("                name: "))
        .map(|n| n.trim().to_string())
        .collect()
}

/// The gateway YAML with only the named wasm filter left in its chain.
fn only(yaml: &str, keep: &str) -> String {
    let mut out = String::with_capacity(yaml.len());
    let mut block = String::new();
    let mut in_chain = false;
    let flush = |block: &mut String, out: &mut String| {
        let name = filter_names(block);
        if name.is_empty() || name.iter().any(|n| n == keep) {
            out.push_str(block);
        }
        block.clear();
    };
    for line in yaml.split_inclusive('\n') {
        if line.starts_with("          - name: ") {
            flush(&mut block, &mut out);
            in_chain = true;
        } else if in_chain && !line.starts_with("            ") {
            flush(&mut block, &mut out);
            in_chain = false;
        }
        if in_chain {
            block.push_str(line);
        } else {
            out.push_str(line);
        }
    }
    flush(&mut block, &mut out);
    out
}

/// The bundle's YAML with only the stage `keep` of `stages` configured.
fn bundle_with_only(bundle: &str, stages: &[String], keep: &str) -> String {
    let others: Vec<&str> = stages
        .iter()
        .map(String::as_str)
        .filter(|s| *s != keep)
        .collect();
    aigw_tests::harness::without(bundle, &others)
}

/// Whether `--rows` names this row.
fn named_row(opts: &Opts, name: &str) -> bool {
    opts.rows
        .as_ref()
        .is_some_and(|r| r.iter().any(|r| r == name))
}

/// A gateway YAML with the demo rate limits raised past what a benchmark
/// sends, so every request pays for the whole check (reserve, settle) and
/// none is answered 429.
fn unlimited(yaml: &str) -> String {
    yaml.replace("\"requests\": 60", "\"requests\": 1000000000000")
        .replace(
            "\"total_tokens\": 100000",
            "\"total_tokens\": 1000000000000",
        )
}

fn run() -> Result<(), String> {
    let opts = parse_opts()?;
    let gateway =
        std::fs::read_to_string(root().join("envoy/gateway.yaml")).map_err(|e| e.to_string())?;
    let bundle = std::fs::read_to_string(root().join("envoy/gateway-bundle.yaml"))
        .map_err(|e| e.to_string())?;
    let (gateway, bundle) = (unlimited(&gateway), unlimited(&bundle));
    let bare_yaml = bare(&gateway)?;
    use Answer::*;
    let mut rows: Vec<(String, String, Vec<Answer>)> = vec![(
        "bare envoy".into(),
        bare_yaml.clone(),
        vec![Json, Stream, Long],
    )];
    for name in filter_names(&gateway) {
        let answers = if name == "token-meter" || name == "content-screen" {
            vec![Json, Stream]
        } else {
            vec![Json]
        };
        rows.push((name.clone(), only(&gateway, &name), answers));
    }
    if opts.floor {
        // What Envoy's wasm machinery and the aigw frame cost before any
        // stage does anything, step by step, against the real filters.
        let mut floor = vec![rows.remove(0)];
        // The io step's parts, only when named (`--rows "floor io,floor
        // io-minus-edits"`): each is a row more under callgrind.
        let parts = ["edits", "shared", "answer", "fact"]
            .map(|g| format!("io-minus-{g}"))
            .into_iter()
            .chain(["get", "set", "edit", "metric"].map(|c| format!("calls-{c}")));
        let named = |step: &str| named_row(&opts, &format!("floor {step}"));
        let steps = ["idle", "headers", "body", "log", "io"]
            .into_iter()
            .map(str::to_string)
            .chain(parts.filter(|s| named(s)));
        for step in steps {
            let yaml = aigw_tests::harness::with_floor(&gateway, &step)?;
            floor.push((format!("floor {step}"), yaml, vec![Json, Stream]));
        }
        // The floors of the chain (five body-reading filters, each in its
        // own VM) and of a cache hit (the body read, one lookup, a local
        // reply: against bare Envoy proxying the request upstream).
        floor.push((
            "floor body x5".into(),
            aigw_tests::harness::with_floors(&gateway, "body", 5)?,
            vec![Json, Stream],
        ));
        floor.push((
            "floor reply".into(),
            aigw_tests::harness::with_floor(&gateway, "reply")?,
            vec![Hit],
        ));
        floor.push((
            "token-meter".into(),
            only(&gateway, "token-meter"),
            vec![Json, Stream],
        ));
        floor.push(("bundle".into(), bundle.clone(), vec![Json, Stream, Hit]));
        // The chain, against its floor, when named (it is the slowest row).
        if named_row(&opts, "chain") {
            floor.push(("chain".into(), gateway.clone(), vec![Json, Stream]));
        }
        rows = floor;
    }
    if !opts.floor {
        rows.push(("chain".into(), gateway.clone(), vec![Json, Stream]));
        rows.push(("bundle".into(), bundle.clone(), vec![Json, Stream, Long]));
        // The bundle with one stage, when named (`--rows "bundle: token-meter"`):
        // against that filter alone, what the bundle's frame costs a stage.
        let stages = filter_names(&gateway);
        for keep in &stages {
            let name = format!("bundle: {keep}");
            if named_row(&opts, &name) {
                rows.push((
                    name,
                    bundle_with_only(&bundle, &stages, keep),
                    vec![Json, Stream],
                ));
            }
        }
    }
    if !opts.floor && filter_names(&gateway).iter().any(|n| n == "prompt-cache") {
        rows.push(("bundle-hit".into(), bundle.clone(), vec![Hit]));
    }
    if let Some(only) = &opts.rows {
        rows.retain(|(name, _, _)| name == "bare envoy" || only.contains(name));
    }
    let mock = MockLlm::start().map_err(|e| e.to_string())?;
    if opts.memory {
        return memory(&gateway, &bundle, &bare_yaml, &mock, &opts);
    }
    if opts.instructions > 0 {
        // Counted per request: the long stream's rows are timed only.
        for (_, _, answers) in rows.iter_mut() {
            answers.retain(|a| *a != Long);
        }
        return count_instructions(&rows, &mock, &opts);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = cores >= 2 && pin(std::process::id(), "0");
    println!(
        "best of {} runs of {} s per row, {} connections, Envoy with 1 worker{}, mock LLM on loopback (5 chunks per answer), {}\n",
        opts.repeat,
        opts.seconds,
        opts.connections,
        if pinned { " pinned to CPU 1 (load and mock on CPU 0)" } else { " (not pinned)" },
        opts.prompt_bytes
            .map_or("a ~1 KiB chat request".to_string(), |n| format!("a user prompt of {n} bytes"))
    );
    println!(
        "{:<18} {:<7} {:>9} {:>9} {:>8} {:>8} {:>12} {:>9} {:>9}",
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
    let mut per_event = Vec::new();
    for answer in [Json, Stream, Hit, Long] {
        if !rows[1..].iter().any(|(_, _, a)| a.contains(&answer)) {
            continue;
        }
        // A hit is compared with bare Envoy proxying the same request upstream.
        let mut base: Option<(f64, f64)> = None;
        for (name, yaml, answers) in &rows {
            let measured = if name == "bare envoy" && answer == Hit {
                Json
            } else if answers.contains(&answer) {
                answer
            } else {
                continue;
            };
            let envoy = Envoy::start_text(yaml, mock.addr())?;
            if pinned {
                pin(envoy.pid(), "1");
            }
            let mut best: Option<Result_> = None;
            for _ in 0..opts.repeat {
                let r = load(envoy.addr(), envoy.pid(), measured, &opts)?;
                if best
                    .as_ref()
                    .is_none_or(|b| r.cpu_us_per_request < b.cpu_us_per_request)
                {
                    best = Some(r);
                }
            }
            let r = best.ok_or("no run")?;
            let (cpu0, rps0) = *base.get_or_insert((r.cpu_us_per_request, r.rps));
            let label = if answer == Long {
                format!(
                    "long-stream {}",
                    if name == "bare envoy" { "bare" } else { name }
                )
            } else {
                name.clone()
            };
            if answer == Long {
                per_event.push((label.clone(), r.cpu_us_per_request / 500.0));
            }
            println!(
                "{:<18} {:<7} {:>9} {:>9.0} {:>8.2} {:>8.2} {:>12.1} {:>9.2} {:>9.2}",
                label,
                measured.name(),
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
    if opts.floor {
        println!("\nfloor idle: a wasm filter whose callbacks return at once; headers: the aigw frame copying both header maps; body: and reading the request body with its headers held; log: and reading four properties and writing a fact in the log phase; io: body, and the bundle's other host calls for this request with no logic between them (header edits, shared-data reads and writes, the answer read whole or a stream rewritten, the access-log fact); io-minus-<group>: io without that group, so io minus the row is the group's cost; calls-<kind>: body and 50 calls of one kind, so (row - body) / 50 is one call's price; body x5: five body filters, each in its own VM, the floor of the chain; reply: body, a shared-data read and a local reply, the floor of a cache hit (against bare Envoy proxying the request).");
        return Ok(());
    }
    println!("\nCPU µs/req is Envoy's own user+system time per request (from /proc).");
    println!("CPU x and req/s x are ratios against bare Envoy for the same answer (a hit against bare Envoy's json).");
    if let [(_, bare_ev), rest @ ..] = per_event.as_slice() {
        for (name, ev) in rest {
            println!(
                "Per event of a 500-event stream: {name} {ev:.2} µs, bare {bare_ev:.2} µs ({:.2}x).",
                ev / bare_ev
            );
        }
    }

    // Latency at a fixed, moderate rate.
    let rate = 1000;
    let mut p99 = Vec::new();
    // `floor io` makes the bundle's host calls with no logic: the p99 any
    // filter with the bundle's features would have.
    let floor_io = aigw_tests::harness::with_floor(&gateway, "io")?;
    for (name, yaml) in [
        ("bare envoy", &bare_yaml),
        ("floor io", &floor_io),
        ("bundle", &bundle),
    ] {
        let envoy = Envoy::start_text(yaml, mock.addr())?;
        if pinned {
            pin(envoy.pid(), "1");
        }
        // Warm first, as the timed rows are (their best run is never the
        // first): V8 tiers the module's hot code up in the first thousands
        // of requests, on the one core Envoy is pinned to, and those
        // compile pauses are not the steady state being measured.
        let warm = Opts {
            seconds: 1,
            rows: None,
            ..opts.clone()
        };
        load(envoy.addr(), envoy.pid(), Json, &warm)?;
        let mut best = f64::INFINITY;
        for _ in 0..opts.repeat {
            best = best.min(open_loop(envoy.addr(), rate, opts.seconds.max(2))?);
        }
        p99.push((name, best));
    }
    if let [(_, bare), rest @ ..] = p99.as_slice() {
        let others: Vec<String> = rest
            .iter()
            .map(|(name, ms)| format!("{name} {ms:.2} ms ({:.2}x)", ms / bare))
            .collect();
        println!(
            "p99 at {rate} req/s (open loop, 8 connections, after a warm-up, best of {}): bare {bare:.2} ms, {}.",
            opts.repeat,
            others.join(", ")
        );
    }

    // Memory with two workers, after a run of load.
    std::env::set_var("AIGW_CONCURRENCY", "2");
    let mut rss = Vec::new();
    for (name, yaml) in [
        ("bare envoy", &bare_yaml),
        ("chain", &gateway),
        ("bundle", &bundle),
    ] {
        let envoy = Envoy::start_text(yaml, mock.addr());
        let envoy = match envoy {
            Ok(e) => e,
            Err(e) => {
                std::env::remove_var("AIGW_CONCURRENCY");
                return Err(e);
            }
        };
        let short = Opts {
            seconds: opts.seconds.min(3),
            rows: None,
            ..opts.clone()
        };
        load(envoy.addr(), envoy.pid(), Json, &short)?;
        rss.push((name, rss_mib(envoy.pid())?));
    }
    std::env::remove_var("AIGW_CONCURRENCY");
    let bare_rss = rss[0].1;
    for (name, mib) in &rss {
        println!(
            "RSS with --concurrency 2 after load: {name} {mib:.1} MiB (+{:.1} MiB)",
            mib - bare_rss
        );
    }
    let mut sizes: Vec<(String, u64)> = std::fs::read_dir(aigw_tests::harness::wasm_dir())
        .map_err(|e| e.to_string())?
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "wasm"))
        .filter_map(|e| {
            Some((
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().ok()?.len(),
            ))
        })
        .collect();
    sizes.sort();
    let sizes: Vec<String> = sizes
        .iter()
        .map(|(n, b)| format!("{n} {} KiB", b / 1024))
        .collect();
    println!("Modules: {}.", sizes.join(", "));
    Ok(())
}

/// Envoy's RSS at one and two workers, idle and after load, for bare Envoy,
/// an empty wasm filter, the bundle with one stage at a time, the bundle and
/// the chain. Two workers minus one is what one more worker (its VM, its
/// connections' buffers) costs; idle against bare is what loading the
/// modules costs; after load against idle is what traffic grows.
fn memory(
    gateway: &str,
    bundle: &str,
    bare_yaml: &str,
    mock: &MockLlm,
    opts: &Opts,
) -> Result<(), String> {
    let stages = filter_names(gateway);
    let mut rows = vec![
        ("bare envoy".to_string(), bare_yaml.to_string()),
        (
            "floor idle".to_string(),
            aigw_tests::harness::with_floor(gateway, "idle")?,
        ),
    ];
    let all: Vec<&str> = stages.iter().map(String::as_str).collect();
    rows.push((
        "bundle: no stage".to_string(),
        aigw_tests::harness::without(bundle, &all),
    ));
    for keep in &stages {
        rows.push((
            format!("bundle: {keep}"),
            bundle_with_only(bundle, &stages, keep),
        ));
    }
    rows.push(("bundle".to_string(), bundle.to_string()));
    rows.push(("chain".to_string(), gateway.to_string()));
    if let Some(only) = &opts.rows {
        rows.retain(|(name, _)| name == "bare envoy" || only.contains(name));
    }
    let short = Opts {
        seconds: opts.seconds.min(3),
        rows: None,
        ..opts.clone()
    };
    println!(
        "Envoy's RSS in MiB: idle (ready, before any request) and after {} s of JSON load on {} connections; \
         +bare is against bare Envoy at the same workers.\n",
        short.seconds, short.connections
    );
    println!(
        "{:<26} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11} {:>10} {:>10}",
        "variant",
        "1w idle",
        "1w load",
        "2w idle",
        "2w load",
        "2w +bare",
        "per worker",
        "2w anon",
        "anon +bare"
    );
    let mut bare: Option<([f64; 4], f64)> = None;
    for (name, yaml) in &rows {
        let (mut m, mut anon) = ([0.0; 4], 0.0);
        for (i, workers) in ["1", "2"].into_iter().enumerate() {
            std::env::set_var("AIGW_CONCURRENCY", workers);
            let envoy = Envoy::start_text(yaml, mock.addr());
            std::env::remove_var("AIGW_CONCURRENCY");
            let envoy = envoy?;
            m[2 * i] = rss_mib(envoy.pid())?;
            load(envoy.addr(), envoy.pid(), Answer::Json, &short)?;
            m[2 * i + 1] = rss_mib(envoy.pid())?;
            anon = anon_mib(envoy.pid())?;
        }
        let (b, b_anon) = *bare.get_or_insert((m, anon));
        println!(
            "{:<26} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>+9.1} {:>+11.1} {:>10.1} {:>+10.1}",
            name,
            m[0],
            m[1],
            m[2],
            m[3],
            m[3] - b[3],
            (m[3] - m[1]) - (b[3] - b[1]),
            anon,
            anon - b_anon
        );
    }
    println!(
        "\nper worker: (2w load - 1w load) against bare's, what each worker adds with this module loaded. \
         anon: the 2w load RSS without the pages of Envoy's binary (V8's code in it is paged in once a module loads)."
    );
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
