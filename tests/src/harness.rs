//! A real Envoy, started from the project's YAML with the real `.wasm` files.
//!
//! Each test gets its own Envoy, its own access log, and stops it on drop.
//! When the test fails (the thread is panicking), Envoy's log is printed,
//! since that is where a wasm filter's complaints go.
//!
//! Ports are chosen by the kernel when Envoy binds them (`port_value: 0`), and
//! read back: the admin address from `--admin-address-path`, the listener's
//! from the admin API. A port picked free by the test and handed to Envoy
//! later could be taken in between by another test running in parallel;
//! this way no two can collide.
//!
//! A test must never run a stale module: [`Envoy::start_with`] refuses a
//! `.wasm` older than the sources it is built from.

use crate::render::{self, Upstream, Values};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// The repository root.
pub fn root() -> PathBuf {
    match std::env::var_os("AIGW_ROOT") {
        Some(r) => PathBuf::from(r),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
    }
}

/// The Envoy binary installed by `scripts/setup.sh`.
pub fn envoy_bin() -> PathBuf {
    match std::env::var_os("AIGW_ENVOY") {
        Some(p) => PathBuf::from(p),
        None => root().join(".tools/envoy-1.40.0/envoy/_bin/envoy"),
    }
}

/// The folder `scripts/build.sh` puts the `.wasm` files in.
pub fn wasm_dir() -> PathBuf {
    match std::env::var_os("AIGW_WASM_DIR") {
        Some(p) => PathBuf::from(p),
        None => root().join("target/wasm"),
    }
}

/// The gateway YAML the integration tests run: the separate filters
/// (`envoy/gateway.yaml`, the default) or, with `AIGW_SHAPE=bundle`, the
/// same gateway as one module (`envoy/gateway-bundle.yaml`). The test
/// command runs the suite in both shapes, so a behaviour cannot work in one
/// and not the other.
pub fn gateway_yaml_path() -> &'static str {
    match std::env::var("AIGW_SHAPE").as_deref() {
        Ok("bundle") => "envoy/gateway-bundle.yaml",
        _ => "envoy/gateway.yaml",
    }
}

/// The text of [`gateway_yaml_path`].
pub fn gateway_yaml() -> String {
    std::fs::read_to_string(root().join(gateway_yaml_path())).unwrap_or_default()
}

/// A command Envoy runs under, from `AIGW_ENVOY_WRAPPER` (words split on
/// spaces): the benchmark counts Envoy's instructions under valgrind.
fn wrapper() -> Option<Vec<String>> {
    let w = std::env::var("AIGW_ENVOY_WRAPPER").ok()?;
    let words: Vec<String> = w.split_whitespace().map(str::to_string).collect();
    (!words.is_empty()).then_some(words)
}

/// Envoy's worker threads: 1, or `AIGW_CONCURRENCY` (the benchmark's memory
/// row runs 2).
fn concurrency() -> String {
    std::env::var("AIGW_CONCURRENCY")
        .ok()
        .filter(|c| c.parse::<u32>().is_ok_and(|n| (1..=64).contains(&n)))
        .unwrap_or_else(|| "1".to_string())
}

fn envoy_command(envoy: &Path) -> Command {
    match wrapper() {
        Some(words) => {
            let mut c = Command::new(&words[0]);
            c.args(&words[1..]).arg(envoy);
            c
        }
        None => Command::new(envoy),
    }
}

/// A port free right now on loopback, for a service that cannot bind port 0
/// and report it (redis-server, webdis). Envoy never gets one of these: it
/// binds port 0 and the harness reads the port it got.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The files a `.wasm` is built from; a module older than the newest is stale.
fn wasm_sources(root: &Path) -> Vec<PathBuf> {
    let mut sources = vec![
        root.join("shared/src"),
        root.join("shared/Cargo.toml"),
        root.join("Cargo.toml"),
        root.join("Cargo.lock"),
        root.join("rust-toolchain.toml"),
    ];
    if let Ok(plugins) = std::fs::read_dir(root.join("plugins")) {
        for p in plugins.flatten() {
            sources.push(p.path().join("src"));
            sources.push(p.path().join("Cargo.toml"));
        }
    }
    sources
}

/// The newest modification time of the files at or under `path`.
fn newest(path: &Path) -> Option<(SystemTime, PathBuf)> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return Some((meta.modified().ok()?, path.to_path_buf()));
    }
    std::fs::read_dir(path)
        .ok()?
        .flatten()
        .filter_map(|e| newest(&e.path()))
        .max()
}

/// Refuses `.wasm` files in `wasm_dir` older than their sources under `root`.
pub fn check_fresh(wasm_dir: &Path, root: &Path) -> Result<(), String> {
    let Some((source_time, source)) = wasm_sources(root).iter().filter_map(|p| newest(p)).max()
    else {
        return Ok(());
    };
    let entries =
        std::fs::read_dir(wasm_dir).map_err(|e| format!("{}: {e}", wasm_dir.display()))?;
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "wasm") {
            continue;
        }
        let built = e
            .metadata()
            .and_then(|m| m.modified())
            .map_err(|e| e.to_string())?;
        if built < source_time {
            let shown = path.strip_prefix(root).unwrap_or(&path);
            let newer = source.strip_prefix(root).unwrap_or(&source);
            return Err(format!(
                "{} is older than its sources ({} changed since): run ./scripts/build.sh",
                shown.display(),
                newer.display()
            ));
        }
    }
    Ok(())
}

/// A scratch folder removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(prefix: &str) -> std::io::Result<Scratch> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "aigw-{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running Envoy.
pub struct Envoy {
    child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub access_log: PathBuf,
    log: PathBuf,
    admin_address_file: PathBuf,
    _scratch: Scratch,
}

impl Envoy {
    /// Starts Envoy with a YAML from the repository (`envoy/gateway.yaml`)
    /// in front of `upstream`, and waits until it is ready.
    pub fn start(yaml: &str, upstream: SocketAddr) -> Result<Envoy, String> {
        let yaml = if yaml == "envoy/gateway.yaml" {
            gateway_yaml_path()
        } else {
            yaml
        };
        let text =
            std::fs::read_to_string(root().join(yaml)).map_err(|e| format!("{yaml}: {e}"))?;
        Envoy::start_text(&text, upstream)
    }

    /// Starts Envoy with YAML text (marked lines are filled in).
    pub fn start_text(yaml: &str, upstream: SocketAddr) -> Result<Envoy, String> {
        Envoy::start_with(yaml, &format!("http://{upstream}"), None)
    }

    /// Starts Envoy with YAML text in front of an upstream base URL, with the
    /// CA bundle that verifies it when it is https.
    pub fn start_with(
        yaml: &str,
        upstream: &str,
        upstream_ca: Option<&Path>,
    ) -> Result<Envoy, String> {
        Envoy::start_with_clusters(yaml, upstream, upstream_ca, &[])
    }

    /// As [`Envoy::start_with`], with the addresses of the services the YAML
    /// marks `# aigw:cluster_<name>` (a rate limit service, a cache tier).
    pub fn start_with_clusters(
        yaml: &str,
        upstream: &str,
        upstream_ca: Option<&Path>,
        clusters: &[(&str, SocketAddr)],
    ) -> Result<Envoy, String> {
        Envoy::start_with_workers(yaml, upstream, upstream_ca, clusters, 0)
    }

    /// As [`Envoy::start_with_clusters`], with `workers` worker threads
    /// (`--concurrency`), for tests of what workers share; 0 is the default
    /// (1, or `AIGW_CONCURRENCY`).
    pub fn start_with_workers(
        yaml: &str,
        upstream: &str,
        upstream_ca: Option<&Path>,
        clusters: &[(&str, SocketAddr)],
        workers: u32,
    ) -> Result<Envoy, String> {
        let workers = match workers {
            0 => concurrency(),
            n => n.to_string(),
        };
        let envoy = envoy_bin();
        if !envoy.exists() {
            return Err(format!(
                "{} not found: run ./scripts/setup.sh",
                envoy.display()
            ));
        }
        let wasm = wasm_dir();
        if !wasm.join("token-meter.wasm").exists() {
            return Err(format!(
                "no .wasm files in {}: run ./scripts/build.sh",
                wasm.display()
            ));
        }
        check_fresh(&wasm, &root())?;
        let scratch = Scratch::new("envoy").map_err(|e| e.to_string())?;
        let access_log = scratch.path().join("access.jsonl");
        let log = scratch.path().join("envoy.log");
        let config = scratch.path().join("envoy.yaml");
        let admin_address_file = scratch.path().join("admin-address");
        // Port 0: the kernel picks when Envoy binds; read back once it is up.
        let values = Values {
            port: 0,
            admin_port: 0,
            upstream: Upstream::parse(upstream)?,
            access_log: access_log.display().to_string(),
            wasm_dir: wasm.display().to_string(),
            upstream_ca: upstream_ca.map(|p| p.display().to_string()),
            clusters: clusters.iter().map(|(n, a)| (n.to_string(), *a)).collect(),
        };
        let rendered = render::render(yaml, &values)?;
        std::fs::write(&config, rendered).map_err(|e| e.to_string())?;
        let child = envoy_command(&envoy)
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", &workers, "--disable-hot-restart"])
            .args(["--file-flush-interval-msec", "100"])
            .arg("--admin-address-path")
            .arg(&admin_address_file)
            .args(["-l", "info", "--log-path"])
            .arg(&log)
            .current_dir(root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", envoy.display()))?;
        let mut envoy = Envoy {
            child,
            port: 0,
            admin_port: 0,
            access_log,
            log,
            admin_address_file,
            _scratch: scratch,
        };
        envoy.wait_ready()?;
        Ok(envoy)
    }

    /// Waits until Envoy is live, learning its admin and listener ports.
    fn wait_ready(&mut self) -> Result<(), String> {
        // Under a wrapper (valgrind, for the benchmark's instruction counts)
        // Envoy takes far longer to start.
        let wait = if wrapper().is_some() { 300 } else { 30 };
        let deadline = Instant::now() + Duration::from_secs(wait);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "envoy exited ({status}) while starting:\n{}",
                    self.log_text()
                ));
            }
            if self.admin_port == 0 {
                // Envoy writes the file once the admin listener is bound.
                let text = std::fs::read_to_string(&self.admin_address_file).unwrap_or_default();
                if let Some(port) = text
                    .trim()
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse().ok())
                {
                    self.admin_port = port;
                }
            }
            let live = self.admin_port != 0
                && admin_get(self.admin_port, "/ready")
                    .is_ok_and(|(status, body)| status == 200 && body.trim() == "LIVE");
            if live {
                self.port = self.listener_port()?;
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "envoy not ready after {wait} s:\n{}",
            self.log_text()
        ))
    }

    /// The port the first listener is bound to, from `/listeners`.
    fn listener_port(&self) -> Result<u16, String> {
        let (_, body) =
            admin_get(self.admin_port, "/listeners?format=json").map_err(|e| e.to_string())?;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        v["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("no bound listener in /listeners: {body}"))
    }

    /// Envoy's process id (for CPU accounting in the benchmark).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the admin port.
    pub fn admin(&self, path: &str) -> String {
        admin_get(self.admin_port, path)
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// The access-log lines written so far, parsed.
    pub fn access_log_lines(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.access_log).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(
                    |e| serde_json::json!({ "unparsable_line": l, "error": e.to_string() }),
                )
            })
            .collect()
    }

    /// Waits (up to 5 s) for the access-log line whose `consumer` is `consumer`.
    pub fn log_line(&self, consumer: &str) -> Option<serde_json::Value> {
        self.log_lines(consumer, 1).into_iter().next()
    }

    /// Waits (up to 5 s) until `n` access-log lines have this `consumer`; returns those there are.
    pub fn log_lines(&self, consumer: &str, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found: Vec<_> = self
                .access_log_lines()
                .into_iter()
                .filter(|l| l["consumer"] == consumer)
                .collect();
            if found.len() >= n || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (up to 5 s) until a sample reads `want` and returns what it
    /// last read: the meter hands its counters to Envoy on a 1 s timer, so
    /// a counter catches up with the requests within a second. Once one
    /// counter of a worker has caught up, that worker's others have too.
    pub fn metric_eventually(&self, name: &str, labels: &[(&str, &str)], want: f64) -> Option<f64> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = self.metric(name, labels);
            if got == Some(want) || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The value of a Prometheus sample: metric name and `label="value"` pairs that must all match.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        parse_sample(&self.admin("/stats/prometheus"), name, labels)
    }
}

const METER_FILTER: &str = "          - name: aigw.token_meter\n";
const ROUTER_FILTER: &str = "          - name: envoy.filters.http.router\n";

/// The modules other than the meter, in the order DESIGN.md chains them.
pub const OTHER_MODULES: [&str; 4] = [
    "content-screen",
    "rate-limit",
    "prompt-cache",
    "model-router",
];

/// `envoy/gateway.yaml` without its wasm filters: bare Envoy.
pub fn bare(gateway_yaml: &str) -> Result<String, String> {
    let start = gateway_yaml
        .find(METER_FILTER)
        .ok_or("no token-meter filter in gateway.yaml")?;
    let end = gateway_yaml
        .find(ROUTER_FILTER)
        .ok_or("no router in gateway.yaml")?;
    Ok(format!(
        "{}{}",
        &gateway_yaml[..start],
        &gateway_yaml[end..]
    ))
}

/// A gateway YAML without the named wasm filters (`content-screen`, ...): for
/// tests of one filter that other filters' answers would get in the way of
/// (a screen that refuses a body that is not JSON, a rate limit of 60 a
/// minute).
pub fn without(gateway_yaml: &str, names: &[&str]) -> String {
    if gateway_yaml.contains("- name: aigw.gateway\n") {
        return without_stages(gateway_yaml, names);
    }
    let mut out = String::with_capacity(gateway_yaml.len());
    let mut skipping = false;
    for line in gateway_yaml.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix("          - name: ") {
            let under = rest.trim();
            skipping = names
                .iter()
                .any(|n| under == format!("aigw.{}", n.replace('-', "_")));
        } else if skipping && !line.starts_with("            ") {
            skipping = false;
        }
        if !skipping {
            out.push_str(line);
        }
    }
    out
}

/// The bundle's YAML without the named stages in its configuration.
fn without_stages(bundle_yaml: &str, names: &[&str]) -> String {
    const VALUE: &str = "                  value: |\n";
    const INDENT: &str = "                    ";
    let Some(start) = bundle_yaml.find(VALUE).map(|i| i + VALUE.len()) else {
        return bundle_yaml.to_string();
    };
    let len: usize = bundle_yaml[start..]
        .split_inclusive('\n')
        .take_while(|l| l.starts_with(INDENT))
        .map(str::len)
        .sum();
    let Ok(mut config) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(
        &bundle_yaml[start..start + len],
    ) else {
        return bundle_yaml.to_string();
    };
    for n in names {
        config.remove(&n.replace('-', "_"));
    }
    let json = serde_json::to_string_pretty(&config).unwrap_or_default();
    let block: String = json.lines().map(|l| format!("{INDENT}{l}\n")).collect();
    format!(
        "{}{block}{}",
        &bundle_yaml[..start],
        &bundle_yaml[start + len..]
    )
}

/// Bare Envoy (from `envoy/gateway.yaml`) with the benchmark fixture
/// `floor.wasm` as its one filter, in the given step (`idle`, `headers`,
/// `body`, `log`, `reply`, `io`, ...).
pub fn with_floor(gateway_yaml: &str, step: &str) -> Result<String, String> {
    with_floors(gateway_yaml, step, 1)
}

/// As [`with_floor`], with `n` floor filters chained, each in its own VM as
/// the separate modules are: what `n` filters cost before any of them does
/// anything.
pub fn with_floors(gateway_yaml: &str, step: &str, n: usize) -> Result<String, String> {
    let bare = bare(gateway_yaml)?;
    let router = bare
        .find(ROUTER_FILTER)
        .ok_or("no router in gateway.yaml")?;
    let block = |i: usize| {
        format!(
            "          - name: aigw.floor{i}
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: floor
                allow_on_headers_stop_iteration: true
                failure_policy: FAIL_RELOAD
                vm_config:
                  vm_id: aigw-floor{i}
                  runtime: envoy.wasm.runtime.v8
                  code:
                    local: {{ filename: target/wasm/floor.wasm }}  # aigw:wasm_dir
                configuration:
                  \"@type\": type.googleapis.com/google.protobuf.StringValue
                  value: '\"{step}\"'
"
        )
    };
    let blocks: String = (0..n).map(block).collect();
    Ok(format!("{}{blocks}{}", &bare[..router], &bare[router..]))
}

/// `envoy/gateway.yaml` with the four other modules chained below the meter
/// (the meter stays outermost), each with an empty configuration; a module
/// gateway.yaml already chains keeps its own block and configuration, and
/// the others go in their DESIGN.md place around it.
pub fn all_five(gateway_yaml: &str) -> Result<String, String> {
    if !gateway_yaml.contains(METER_FILTER) {
        return Err("no token-meter filter in gateway.yaml".into());
    }
    let head = |name: &str| format!("          - name: aigw.{}\n", name.replace('-', "_"));
    let mut out = gateway_yaml.to_string();
    for (i, name) in OTHER_MODULES.iter().enumerate() {
        if out.contains(&head(name)) {
            continue;
        }
        // Before the first module after it that is already there, else the router.
        let at = OTHER_MODULES[i + 1..]
            .iter()
            .filter_map(|later| out.find(&head(later)))
            .min()
            .or_else(|| out.find(ROUTER_FILTER))
            .ok_or("no router in gateway.yaml")?;
        let block = format!(
            "          - name: aigw.{under}
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name}
                # Filters that read the body hold the request headers meanwhile.
                allow_on_headers_stop_iteration: true
                failure_policy: FAIL_RELOAD
                vm_config:
                  vm_id: aigw-{name}
                  runtime: envoy.wasm.runtime.v8
                  code:
                    local: {{ filename: target/wasm/{name}.wasm }}  # aigw:wasm_dir
",
            under = name.replace('-', "_")
        );
        out.insert_str(at, &block);
    }
    Ok(out)
}

/// Finds a sample in Prometheus text; all given labels must match.
pub fn parse_sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (metric, rest) = match series.split_once('{') {
            Some((m, r)) => (m, r.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        if all {
            value.parse().ok()
        } else {
            None
        }
    })
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- envoy log ({}) -----\n{}",
                self.log.display(),
                self.log_text()
            );
            let lines = std::fs::read_to_string(&self.access_log).unwrap_or_default();
            eprintln!("----- access log -----\n{lines}");
        }
    }
}

fn admin_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let resp = crate::client::Response::parse(&raw)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok((
        resp.status,
        String::from_utf8_lossy(&resp.body).into_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stale_modules_are_refused() {
        let root = Scratch::new("fresh").unwrap();
        let at = |rel: &str, secs: u64| {
            let path = root.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let f = std::fs::File::create(&path).unwrap();
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
                .unwrap();
        };
        let wasm = root.path().join("target/wasm");
        at("shared/src/wire/sse.rs", 100);
        at("plugins/rate-limit/src/lib.rs", 100);
        at("Cargo.lock", 100);
        at("target/wasm/token-meter.wasm", 200);
        at("target/wasm/rate-limit.wasm", 200);
        at("target/wasm/notes.txt", 1);
        assert_eq!(check_fresh(&wasm, root.path()), Ok(()));
        // (file changed after the build, what the error names)
        let cases = [
            ("shared/src/wire/sse.rs", "shared/src/wire/sse.rs"),
            (
                "plugins/rate-limit/src/lib.rs",
                "plugins/rate-limit/src/lib.rs",
            ),
            ("Cargo.lock", "Cargo.lock"),
        ];
        for (changed, named) in cases {
            at(changed, 300);
            let err = check_fresh(&wasm, root.path()).unwrap_err();
            let want = format!("is older than its sources ({named} changed since)");
            assert!(err.contains(&want), "{err}");
            assert!(err.starts_with("target/wasm/"), "{err}");
            assert!(err.ends_with("run ./scripts/build.sh"), "{err}");
            at(changed, 100);
        }
        // Tests and scripts are not what a module is built from.
        at("tests/src/mock.rs", 300);
        assert_eq!(check_fresh(&wasm, root.path()), Ok(()));
    }
}
