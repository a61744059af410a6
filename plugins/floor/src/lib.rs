//! floor: a benchmark fixture, not a filter. `./scripts/bench.sh
//! --floor` loads it in Envoy to measure what a wasm filter costs before it
//! does anything, one step at a time, so the cost of each real filter can be
//! read against the floor no filter can go below. Its configuration is one
//! of the steps, as a JSON string:
//!
//! - `"idle"`: an HTTP context whose callbacks all return at once (the
//!   SDK's defaults): Envoy's cost of a wasm filter, a VM context per request
//!   and a call into the VM per callback.
//! - `"headers"`: the aigw frame (`StageHttp`) with a stage that does
//!   nothing: it copies the request and response header maps into the VM.
//! - `"body"`: as `headers`, and it holds the request headers while it
//!   reads the whole request body (as every body-reading filter does).
//! - `"log"`: as `body`, and it reads the request's id, status, duration
//!   and route in the log phase and writes an access-log-sized fact.
//! - `"io"`: as `body`, and every other host call the bundle makes for the
//!   bench's request, with no logic between them: two request header edits,
//!   four shared-data reads and three writes (a cache miss: the lookup and
//!   the store's read and write; the rate limiter's reserve and settle),
//!   nine response header edits
//!   with the JSON answer held and read whole (a stream's every chunk
//!   rewritten instead, as the meter's usage strip does), and one
//!   access-log-sized fact. Counted on the in-memory host for the bench's
//!   configuration; against `bundle`, what remains is the stages' logic.
//! - `"io-minus-edits"`, `"io-minus-shared"`, `"io-minus-answer"`,
//!   `"io-minus-fact"`: `io` without one of its groups of calls (the header
//!   edits both ways; the shared-data reads and writes; holding and reading
//!   the JSON answer or rewriting the stream; the fact), so that `io` minus
//!   the row is what that group costs.
//! - `"reply"`: as `body`, then one shared-data read that returns a value
//!   and a local reply with a chat completion: the least a cache hit does
//!   (read the prompt, look it up, answer without the upstream).
//! - `"calls-get"`, `"calls-set"`, `"calls-metric"`: as `body`, and 50
//!   calls of one kind through the frame (a shared-data read, a shared-data
//!   write, a counter increment, `aigw_floor_calls_total`), so that the row
//!   minus `body`, over 50, is the price of one call. `"calls-edit"` makes
//!   50 response header edits, which the frame hands to Envoy as one
//!   replaced map: the row minus `body` is the price of that map.

use aigw_shared::boundary::MetricKind;
use aigw_shared::config::ConfigError;
use aigw_shared::host::{self, Idle, StageHttp};
use aigw_shared::stage::{Chunk, Env, Filter, Headers, LogInput, Reply, RequestBody, Stage, Step};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use std::rc::Rc;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Idle,
    Headers,
    Body,
    Log,
    Reply,
    Io(Io),
    Calls(Call),
}

/// The one kind of call a `calls-<kind>` step makes, 50 times.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Get,
    Set,
    Edit,
    Metric,
}

const CALLS: usize = 50;
const CALLS_METRIC: &str = "aigw_floor_calls_total";

/// The io step's keys and header names, written out: composing them per
/// call would put the fixture's own formatting into the price of the calls.
const KEYS: [&str; 4] = [
    "aigw.floor/0",
    "aigw.floor/1",
    "aigw.floor/2",
    "aigw.floor/3",
];
const NAMES: [&str; 9] = [
    "x-aigw-floor-0",
    "x-aigw-floor-1",
    "x-aigw-floor-2",
    "x-aigw-floor-3",
    "x-aigw-floor-4",
    "x-aigw-floor-5",
    "x-aigw-floor-6",
    "x-aigw-floor-7",
    "x-aigw-floor-8",
];

/// The `reply` step's entry and answer: the mock's chat completion, about
/// the size of the bench's cached answer.
const HIT_KEY: &str = "aigw.floor/hit";
const HIT: &[u8] = br#"{"id":"chatcmpl-floor","object":"chat.completion","created":1700000000,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"A short story about the sea, told in three sentences."},"finish_reason":"stop"}],"usage":{"prompt_tokens":200,"completion_tokens":12,"total_tokens":212}}"#;

/// The groups of host calls the `io` step makes; `io-minus-<group>` leaves one out.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Io {
    edits: bool,
    shared: bool,
    answer: bool,
    fact: bool,
}

impl Io {
    const ALL: Io = Io {
        edits: true,
        shared: true,
        answer: true,
        fact: true,
    };

    fn minus(group: &str) -> Option<Io> {
        let mut io = Io::ALL;
        match group {
            "edits" => io.edits = false,
            "shared" => io.shared = false,
            "answer" => io.answer = false,
            "fact" => io.fact = false,
            _ => return None,
        }
        Some(io)
    }
}

struct Floor(Mode);

impl Filter for Floor {
    type Stage = FloorStage;
    const NAME: &'static str = "floor";

    fn from_config(bytes: &[u8]) -> Result<Self, ConfigError> {
        let mode: String = aigw_shared::config::parse(bytes)?;
        Ok(Floor(match mode.as_str() {
            "idle" | "" => Mode::Idle,
            "headers" => Mode::Headers,
            "body" => Mode::Body,
            "log" => Mode::Log,
            "reply" => Mode::Reply,
            "io" => Mode::Io(Io::ALL),
            "calls-get" => Mode::Calls(Call::Get),
            "calls-set" => Mode::Calls(Call::Set),
            "calls-edit" => Mode::Calls(Call::Edit),
            "calls-metric" => Mode::Calls(Call::Metric),
            other => match other.strip_prefix("io-minus-").and_then(Io::minus) {
                Some(io) => Mode::Io(io),
                None => {
                    return Err(ConfigError::new(
                        ".",
                        format!(
                            "{other:?} is not idle, headers, body, log, reply, io, \
                             io-minus-(edits|shared|answer|fact) or calls-(get|set|edit|metric)"
                        ),
                    ))
                }
            },
        }))
    }

    fn stage(f: &Rc<Self>) -> FloorStage {
        FloorStage(f.0, false)
    }
}

/// The step, and whether the answer is a stream.
struct FloorStage(Mode, bool);

impl Stage for FloorStage {
    fn request_headers(&mut self, _: &mut Env<'_>, headers: &mut Headers, _: bool) -> Step {
        match self.0 {
            Mode::Headers => Step::Continue,
            Mode::Io(io) => {
                if io.edits {
                    headers.set("x-aigw-floor-a", "1");
                    headers.set("x-aigw-floor-b", "2");
                }
                Step::ReadBody { hold_headers: true }
            }
            _ => Step::ReadBody { hold_headers: true },
        }
    }

    fn request_body(&mut self, env: &mut Env<'_>, _: &mut RequestBody, _: &mut Headers) -> Step {
        match self.0 {
            Mode::Calls(Call::Get) => (0..CALLS).for_each(|_| {
                let _ = env.shared.get("aigw.floor/calls");
            }),
            Mode::Calls(Call::Set) => (0..CALLS).for_each(|_| {
                let _ = env.shared.set("aigw.floor/calls", &[1; 24], None);
            }),
            Mode::Calls(Call::Metric) => {
                // Envoy hands back the same id for a name it knows.
                if let Some(id) = env.metrics.define(MetricKind::Counter, CALLS_METRIC) {
                    (0..CALLS).for_each(|_| env.metrics.add(id, 1));
                }
            }
            Mode::Reply => {
                // The entry is there from the first request on, as a hit's is.
                if env.shared.get(HIT_KEY).is_none() {
                    let _ = env.shared.set(HIT_KEY, HIT, None);
                }
                return Step::Reply(Reply {
                    status: 200,
                    headers: vec![("content-type".into(), "application/json".into())],
                    body: HIT.to_vec(),
                    details: "aigw_floor_reply".into(),
                });
            }
            _ => {}
        }
        if matches!(self.0, Mode::Io(io) if io.shared) {
            for (i, key) in KEYS.iter().enumerate() {
                let cas = env.shared.get(key).map(|(_, cas)| cas);
                // The cache's lookup reads a shard that is there without
                // writing it: its key is written once, by the first request.
                if i > 0 || cas.is_none() {
                    let _ = env.shared.set(key, &[1; 64], cas);
                }
            }
        }
        Step::Continue
    }

    fn response_headers(&mut self, _: &mut Env<'_>, headers: &mut Headers, _: bool) -> Step {
        if self.0 == Mode::Calls(Call::Edit) {
            // Each set changes the value, so each is an edit the frame applies.
            for i in 0..CALLS {
                headers.set("x-aigw-floor-calls", ["0", "1"][i % 2]);
            }
        }
        let Mode::Io(io) = self.0 else {
            return Step::Continue;
        };
        if io.edits {
            for name in NAMES {
                headers.set(name, "0123456789");
            }
        }
        self.1 = headers
            .get("content-type")
            .is_some_and(|t| t.starts_with("text/event-stream"));
        if self.1 || !io.answer {
            Step::Continue
        } else {
            Step::ReadBody { hold_headers: true }
        }
    }

    fn response_body(&mut self, _: &mut Env<'_>, chunk: &mut Chunk, _: bool) -> Step {
        if self.wants_response_body() && self.1 && !chunk.bytes().is_empty() {
            // A blank line more between events: the stream says the same.
            let mut bytes = chunk.bytes().to_vec();
            bytes.push(b'\n');
            chunk.set(bytes);
        }
        Step::Continue
    }

    fn wants_response_body(&self) -> bool {
        matches!(self.0, Mode::Io(io) if io.answer)
    }

    fn log(&mut self, env: &mut Env<'_>, input: &dyn LogInput) {
        match self.0 {
            Mode::Log => {
                // All four properties, as a line that names them all would read them.
                let read = (
                    input.request_id(),
                    input.status(),
                    input.duration_ms(),
                    input.route_name(),
                );
                let line = format!("{:?}", (read, [0u8; 64]));
                env.state.set("aigw.floor", line.repeat(4).as_bytes());
            }
            Mode::Io(io) if io.fact => env.state.set("aigw.access_log", &[b'x'; 700]),
            _ => {}
        }
    }
}

// The plugins' allocator: the floor prices the frame as they run it.
aigw_shared::allocator!();

proxy_wasm::main! {{
    host::init();
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root(None)) });
}}

/// The root: the `idle` step gets the SDK's do-nothing context, the others
/// the aigw frame.
struct Root(Option<Rc<Floor>>);

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        match Floor::from_config(&config) {
            Ok(f) => {
                self.0 = Some(Rc::new(f));
                true
            }
            Err(e) => {
                host::log(
                    LogLevel::Error,
                    &format!("floor: invalid configuration: {e}"),
                );
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(match &self.0 {
            Some(f) if f.0 != Mode::Idle => Box::new(StageHttp::new(Floor::stage(f), context_id)),
            _ => Box::new(Idle),
        })
    }
}
