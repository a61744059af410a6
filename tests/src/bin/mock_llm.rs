//! `mock-llm`: the mock LLM upstream as a standalone process, for running
//! Envoy by hand or from scripts. All behaviour lives in
//! [`aigw_tests::mock`]; this only parses arguments and announces the port on
//! stdout so a launcher can read it (`--addr 127.0.0.1:0` picks a free one).

use std::io::Write;
use std::process::ExitCode;

use aigw_tests::mock::MockLlm;

const USAGE: &str = "usage: mock-llm [--addr HOST:PORT]   (default 127.0.0.1:0)";

fn main() -> ExitCode {
    let mut addr = String::from("127.0.0.1:0");
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let Some(arg) = arg.to_str() else {
            return usage("arguments must be UTF-8");
        };
        if arg == "--addr" {
            match args.next().as_ref().and_then(|v| v.to_str()) {
                Some(v) => addr = v.to_string(),
                None => return usage("--addr needs a value"),
            }
        } else if let Some(v) = arg.strip_prefix("--addr=") {
            addr = v.to_string();
        } else if arg == "-h" || arg == "--help" {
            let _ = writeln!(std::io::stdout(), "{USAGE}");
            return ExitCode::SUCCESS;
        } else {
            return usage(&format!("unknown argument: {arg}"));
        }
    }

    let mock = match MockLlm::start_on(&addr) {
        Ok(mock) => mock,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "mock-llm: cannot listen on {addr}: {e}");
            return ExitCode::from(1);
        }
    };
    // Launchers block on this line to learn the port, so it must not sit in a
    // buffer.
    let mut out = std::io::stdout().lock();
    if writeln!(out, "mock-llm listening on http://{}", mock.addr())
        .and_then(|()| out.flush())
        .is_err()
    {
        return ExitCode::from(1);
    }
    drop(out);
    // The server runs on its own threads until the process is killed; `park`
    // may wake spuriously, hence the loop.
    loop {
        std::thread::park();
    }
}

/// `println!`/`eprintln!` panic when the stream is closed; these writes must
/// not.
fn usage(problem: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "mock-llm: {problem}\n{USAGE}");
    ExitCode::from(2)
}
