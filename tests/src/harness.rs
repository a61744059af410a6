//! A real Envoy, started from the project's YAML with the real `.wasm` files.
//!
//! Each test gets its own Envoy on ports chosen at run time, its own access
//! log, and stops it on drop. When the test fails (the thread is panicking),
//! Envoy's log is printed, since that is where a wasm filter's complaints go.

use crate::render::{self, Upstream, Values};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

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

/// A port free right now on loopback.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
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
        Envoy::start_with_workers(yaml, upstream, upstream_ca, clusters, 1)
    }

    /// As [`Envoy::start_with_clusters`], with `workers` worker threads
    /// (`--concurrency`), for tests of what workers share.
    pub fn start_with_workers(
        yaml: &str,
        upstream: &str,
        upstream_ca: Option<&Path>,
        clusters: &[(&str, SocketAddr)],
        workers: u32,
    ) -> Result<Envoy, String> {
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
        let scratch = Scratch::new("envoy").map_err(|e| e.to_string())?;
        let access_log = scratch.path().join("access.jsonl");
        let log = scratch.path().join("envoy.log");
        let config = scratch.path().join("envoy.yaml");
        let port = free_port().map_err(|e| e.to_string())?;
        let admin_port = free_port().map_err(|e| e.to_string())?;
        let values = Values {
            port,
            admin_port,
            upstream: Upstream::parse(upstream)?,
            access_log: access_log.display().to_string(),
            wasm_dir: wasm.display().to_string(),
            upstream_ca: upstream_ca.map(|p| p.display().to_string()),
            clusters: clusters.iter().map(|(n, a)| (n.to_string(), *a)).collect(),
        };
        let rendered = render::render(yaml, &values)?;
        std::fs::write(&config, rendered).map_err(|e| e.to_string())?;
        let child = Command::new(&envoy)
            .arg("-c")
            .arg(&config)
            .args([
                "--concurrency",
                &workers.to_string(),
                "--disable-hot-restart",
            ])
            .args(["--file-flush-interval-msec", "100"])
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
            port,
            admin_port,
            access_log,
            log,
            _scratch: scratch,
        };
        envoy.wait_ready()?;
        Ok(envoy)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "envoy exited ({status}) while starting:\n{}",
                    self.log_text()
                ));
            }
            if let Ok((200, body)) = admin_get(self.admin_port, "/ready") {
                if body.trim() == "LIVE" {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("envoy not ready after 30 s:\n{}", self.log_text()))
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

    /// The value of a Prometheus sample: metric name and `label="value"` pairs that must all match.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        parse_sample(&self.admin("/stats/prometheus"), name, labels)
    }
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
