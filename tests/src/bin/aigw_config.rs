//! `aigw-config`: prints an Envoy YAML from `envoy/` with its `# aigw:` lines
//! filled in, for `scripts/run.sh`. The tests render through the same code.
//!
//! Usage: aigw-config <yaml> <port> <admin-port> <upstream-url> <access-log> <wasm-dir> [<upstream-ca> [<name>=<host:port>...]]
//!
//! Each `<name>=<host:port>` fills the lines marked `# aigw:cluster_<name>`.

use aigw_tests::render::{render, Upstream, Values};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (fixed, upstream_ca, named) = match args.len() {
        6 => (&args[..], None, &args[6..]),
        n if n >= 7 => (
            &args[..6],
            Some(args[6].clone()).filter(|ca| !ca.is_empty()),
            &args[7..],
        ),
        _ => {
            eprintln!(
                "usage: aigw-config <yaml> <port> <admin-port> <upstream-url> <access-log> <wasm-dir> [<upstream-ca> [<name>=<host:port>...]]"
            );
            return ExitCode::from(2);
        }
    };
    let [yaml, port, admin_port, upstream, access_log, wasm_dir] = fixed else {
        return ExitCode::from(2);
    };
    let result = (|| -> Result<String, String> {
        let port = port
            .parse()
            .map_err(|_| format!("port {port:?} is not a port number"))?;
        let admin_port = admin_port
            .parse()
            .map_err(|_| format!("admin port {admin_port:?} is not a port number"))?;
        let text = std::fs::read_to_string(yaml).map_err(|e| format!("{yaml}: {e}"))?;
        let values = Values {
            port,
            admin_port,
            upstream: Upstream::parse(upstream)?,
            access_log: access_log.clone(),
            wasm_dir: wasm_dir.clone(),
            upstream_ca,
            clusters: named
                .iter()
                .map(|c| {
                    let (name, addr) = c
                        .split_once('=')
                        .ok_or_else(|| format!("{c:?} is not <name>=<host:port>"))?;
                    let addr = addr
                        .parse()
                        .map_err(|_| format!("{addr:?} is not an address (ip:port)"))?;
                    Ok((name.to_string(), addr))
                })
                .collect::<Result<_, String>>()?,
        };
        render(&text, &values)
    })();
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("aigw-config: {e}");
            ExitCode::from(1)
        }
    }
}
