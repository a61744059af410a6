//! Fills in the lines of an Envoy YAML marked `# aigw:<name>`.
//!
//! The YAML under `envoy/` is what users copy and what Docker runs as it is;
//! the run command and the tests run the very same files with a few values
//! replaced (ports chosen at run time, the upstream, the access-log path, the
//! folder of the `.wasm` files). Marking those lines in the file keeps the
//! substitution visible to the reader and exact for the code.

/// An upstream base URL (`https://api.openai.com`, `http://127.0.0.1:8000`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl Upstream {
    pub fn parse(url: &str) -> Result<Upstream, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!(
                "{url:?}: the upstream must start with http:// or https://"
            ));
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        // Clients call the gateway with /v1/...; a base URL ending in /v1 means the same.
        if !matches!(path.trim_end_matches('/'), "" | "v1") {
            return Err(format!(
                "{url:?}: the upstream is a base URL (scheme, host, port); the path {path:?} is not supported"
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("{url:?}: {p:?} is not a port"))?,
            ),
            None => (authority, if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        Ok(Upstream {
            tls,
            host: host.to_string(),
            port,
        })
    }
}

/// The values that replace the marked ones.
#[derive(Clone, Debug)]
pub struct Values {
    pub port: u16,
    pub admin_port: u16,
    pub upstream: Upstream,
    pub access_log: String,
    pub wasm_dir: String,
    /// CA bundle that verifies an https upstream; the system bundle when `None`.
    pub upstream_ca: Option<String>,
    /// Addresses of the services a YAML names with `# aigw:cluster_<name>`
    /// (a rate limit service, a cache tier); a marked line whose name is not
    /// here keeps the address the file gives.
    pub clusters: Vec<(String, std::net::SocketAddr)>,
}

/// Debian's (and most distributions') bundle of public CAs.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Replaces the `port_value` on the marked line.
fn with_port(line: &str, port: u16) -> Option<String> {
    let i = key_at(line, "port_value:")? + "port_value:".len();
    let rest = &line[i..];
    let digits_start = rest.find(|c: char| c.is_ascii_digit())?;
    let digits_end = digits_start + rest[digits_start..].find(|c: char| !c.is_ascii_digit())?;
    Some(format!("{} {}{}", &line[..i], port, &rest[digits_end..]))
}

/// Where `key` starts as a YAML key of its own (not the tail of a longer one).
fn key_at(line: &str, key: &str) -> Option<usize> {
    line.match_indices(key)
        .map(|(i, _)| i)
        .find(|&i| i == 0 || matches!(line.as_bytes()[i - 1], b' ' | b'{'))
}

fn replace_after(line: &str, key: &str, value: &str) -> Option<String> {
    let i = key_at(line, key)? + key.len();
    let rest = &line[i..];
    let end = rest.find([',', '}', '#']).unwrap_or(rest.len());
    let trailing = rest[end..].trim_start();
    let gap = match trailing.chars().next() {
        Some('#') => "  ",
        Some('}') => " ",
        _ => "",
    };
    Some(format!("{} {value}{gap}{trailing}", &line[..i]))
}

fn tls_block(indent: &str, host: &str, ca: &str) -> String {
    [
        "transport_socket:",
        "  name: envoy.transport_sockets.tls",
        "  typed_config:",
        "    \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        &format!("    sni: {host}"),
        "    common_tls_context:",
        "      validation_context:",
        &format!("        trusted_ca: {{ filename: {ca} }}"),
    ]
    .iter()
    .map(|l| format!("{indent}{l}\n"))
    .collect()
}

/// Renders a YAML with the marked lines replaced; an error names a marker
/// that is used but cannot be applied.
pub fn render(yaml: &str, v: &Values) -> Result<String, String> {
    let mut out = String::with_capacity(yaml.len() + 512);
    for line in yaml.lines() {
        // `# aigw:name` marks a line; `# aigw: prose` is a comment.
        let marker = line
            .find("# aigw:")
            .map(|i| &line[i + "# aigw:".len()..])
            .map(str::trim_end)
            .filter(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        let replaced = match marker {
            None => Some(line.to_string()),
            Some("port") => with_port(line, v.port),
            Some("admin_port") => with_port(line, v.admin_port),
            Some("upstream") => replace_after(line, "address:", &v.upstream.host)
                .and_then(|l| with_port(&l, v.upstream.port)),
            Some("access_log") => replace_after(line, "path:", &v.access_log),
            Some("wasm_dir") => line
                .find("target/wasm/")
                .map(|_| line.replace("target/wasm/", &format!("{}/", v.wasm_dir))),
            Some("upstream_tls") => {
                if v.upstream.tls {
                    let indent: String = line.chars().take_while(|c| *c == ' ').collect();
                    let ca = v.upstream_ca.as_deref().unwrap_or(SYSTEM_CA_BUNDLE);
                    out.push_str(&tls_block(&indent, &v.upstream.host, ca));
                }
                continue;
            }
            Some(m) if m.starts_with("cluster_") => {
                let name = &m["cluster_".len()..];
                match v.clusters.iter().find(|(n, _)| n == name) {
                    Some((_, addr)) => replace_after(line, "address:", &addr.ip().to_string())
                        .and_then(|l| with_port(&l, addr.port())),
                    None => Some(line.to_string()),
                }
            }
            Some(other) => return Err(format!("unknown marker `# aigw:{other}`")),
        };
        let line = replaced.ok_or_else(|| format!("cannot apply the marker on line {line:?}"))?;
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstreams() {
        let cases = [
            ("http://127.0.0.1:8000", Some((false, "127.0.0.1", 8000))),
            (
                "https://api.openai.com",
                Some((true, "api.openai.com", 443)),
            ),
            (
                "https://api.openai.com/v1/",
                Some((true, "api.openai.com", 443)),
            ),
            ("http://vllm:8000/v1", Some((false, "vllm", 8000))),
            ("https://x.openai.azure.com/openai", None),
            ("ftp://x", None),
            ("http://:80", None),
            ("http://h:port", None),
        ];
        for (url, want) in cases {
            let got = Upstream::parse(url).ok();
            let want = want.map(|(tls, host, port)| Upstream {
                tls,
                host: host.to_string(),
                port,
            });
            assert_eq!(got, want, "{url}");
        }
    }

    #[test]
    fn renders_marked_lines() {
        let yaml = "a:\n  socket_address: { address: 127.0.0.1, port_value: 10000 }  # aigw:port\n  x: { address: 127.0.0.1, port_value: 8000 }  # aigw:upstream\n  path: logs/access.jsonl  # aigw:access_log\n  local: { filename: target/wasm/token-meter.wasm }  # aigw:wasm_dir\n  # aigw:upstream_tls\n";
        let v = Values {
            port: 1,
            admin_port: 2,
            upstream: Upstream::parse("https://api.openai.com").unwrap(),
            access_log: "/tmp/a.jsonl".into(),
            wasm_dir: "/w".into(),
            upstream_ca: None,
            clusters: vec![("rls".into(), "127.0.0.1:7".parse().unwrap())],
        };
        let out = render(yaml, &v).unwrap();
        assert!(out.contains("port_value: 1 }  # aigw:port"), "{out}");
        assert!(
            out.contains("x: { address: api.openai.com, port_value: 443 }  # aigw:upstream"),
            "{out}"
        );
        assert!(
            out.contains("path: /tmp/a.jsonl  # aigw:access_log"),
            "{out}"
        );
        assert!(out.contains("filename: /w/token-meter.wasm"), "{out}");
        assert!(out.contains("  transport_socket:\n"), "{out}");
        assert!(out.contains("sni: api.openai.com"), "{out}");
        assert!(
            out.contains("trusted_ca: { filename: /etc/ssl/certs/ca-certificates.crt }"),
            "{out}"
        );
        assert!(render("x: 1  # aigw:nope\n", &v).is_err());
        let named = "  a: { address: 10.0.0.1, port_value: 81 }  # aigw:cluster_rls\n  b: { address: 10.0.0.2, port_value: 82 }  # aigw:cluster_other\n";
        let out = render(named, &v).unwrap();
        assert!(
            out.contains("a: { address: 127.0.0.1, port_value: 7 }"),
            "{out}"
        );
        assert!(
            out.contains("b: { address: 10.0.0.2, port_value: 82 }"),
            "{out}"
        );
        assert_eq!(render("# aigw: prose\n", &v).unwrap(), "# aigw: prose\n");
        assert!(render("x: 1  # aigw:port\n", &v).is_err());
        // Port 0 (the kernel picks; the harness reads the port back).
        let zero = Values {
            port: 0,
            admin_port: 0,
            ..v.clone()
        };
        let out = render(yaml, &zero).unwrap();
        assert!(out.contains("port_value: 0 }  # aigw:port"), "{out}");
    }
}
