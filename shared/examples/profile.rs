//! Runs requests through the bundle's stages natively, over the in-memory
//! host, to profile the stage logic alone (no Envoy, no wasm):
//!
//! ```text
//! cargo build --release -p aigw-shared --example profile
//! valgrind --tool=callgrind target/release/examples/profile <config.json> 2000
//! ```
//!
//! `config.json` is a bundle configuration (the `value` of
//! `envoy/gateway-bundle.yaml`'s wasm filter). Each request is the bench's:
//! a distinct ~1 KiB chat prompt, answered with a short JSON completion
//! (`stream`: a short stream; `hit`: one prompt, so every request after the
//! first is a cache hit).

use aigw_shared::bundle::Bundle;
use aigw_shared::exchange::{no_service, Exchange, Host};
use aigw_shared::stage::Filter;
use std::rc::Rc;

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: profile <config.json> [requests] [stream|hit]")?;
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let mode = args.next().unwrap_or_default();
    let stream = mode == "stream";
    let hit = mode == "hit";
    let config = std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?;
    let bundle = Rc::new(Bundle::from_config(&config).map_err(|e| e.to_string())?);
    let system = "You are a helpful assistant. ".repeat(20);
    let mut host = Host::default();
    let mut ok = 0;
    for i in 0..n {
        let story = if hit { 0 } else { i };
        let user = format!("Summarise the plot of short story number {story} in three sentences.");
        let body = serde_json::json!({
            "model": "gpt-4o",
            "stream": stream,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]
        })
        .to_string();
        let answer = if stream {
            let mut chunks: Vec<Vec<u8>> = (0..5)
                .map(|k| format!("data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"word{k} \"}}}}],\"usage\":null}}\n\n").into_bytes())
                .collect();
            chunks.push(b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":200,\"completion_tokens\":5,\"total_tokens\":205}}\n\ndata: [DONE]\n\n".to_vec());
            Exchange::post("/v1/chat/completions", &body).answer(200, "text/event-stream", chunks)
        } else {
            let json = r#"{"id":"c","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"A short story about the sea, told in three sentences."},"finish_reason":"stop"}],"usage":{"prompt_tokens":200,"completion_tokens":12,"total_tokens":212}}"#;
            Exchange::post("/v1/chat/completions", &body).answer(200, "application/json", vec![json.as_bytes().to_vec()])
        }
        .header("x-aigw-consumer", "bench")
        .header("x-request-id", &format!("req-{i}"));
        let mut stage = Bundle::stage(&bundle);
        let out = host.run(&mut stage, &answer, &mut no_service);
        ok += u64::from(out.client_status == 200);
    }
    println!("{ok} of {n} answered 200");
    Ok(())
}
