//! Which LLM API a request speaks, from its method and path.
//!
//! The path is the one fact every filter has before any body arrives, and the
//! providers are told apart by it: OpenAI and the servers that copy it
//! (vLLM, Ollama, llama.cpp) under `/v1/...`, Azure OpenAI under
//! `/openai/deployments/{deployment}/...` and `/openai/v1/...`, Anthropic at
//! `/v1/messages`. Matching is on the path's tail, `v1` and the operation's
//! segments exactly, so that a prefix a platform adds
//! (`/llm/v1/chat/completions`) does not hide the API, and an API whose path
//! merely ends the same way (Assistants' `/v1/threads/{id}/messages`) is not
//! metered as an LLM call.

/// The operation a request asks for; it decides how its body and usage read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Chat,
    Completions,
    Responses,
    Embeddings,
    Messages,
}

/// The wire family of the API, which names the provider when nothing else does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    OpenAi,
    Azure,
    Anthropic,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::OpenAi => "openai",
            Family::Azure => "azure",
            Family::Anthropic => "anthropic",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Api {
    pub operation: Operation,
    pub family: Family,
    /// Azure's deployment name, which stands in for the model there.
    pub deployment: Option<String>,
}

impl Api {
    /// Whether OpenAI's `stream_options.include_usage` applies to this API.
    pub fn has_stream_options(&self) -> bool {
        self.family != Family::Anthropic
            && matches!(self.operation, Operation::Chat | Operation::Completions)
    }
}

/// Classifies a request; `None` for anything that is not a known LLM call.
pub fn classify(method: &str, path: &str) -> Option<Api> {
    if !method.eq_ignore_ascii_case("POST") {
        return None;
    }
    // Byte scans, not `str` patterns: every stage classifies every request.
    let end = path
        .bytes()
        .position(|b| matches!(b, b'?' | b'#'))
        .unwrap_or(path.len());
    let path = path[..end].trim_end_matches('/');

    const AZURE: &str = "/openai/deployments/";
    let azure = path
        .bytes()
        .enumerate()
        .find(|&(i, b)| b == b'/' && path[i..].starts_with(AZURE));
    if let Some((i, _)) = azure {
        let rest = &path[i + AZURE.len()..];
        let (deployment, op) = rest.split_once('/')?;
        let operation = match op {
            "chat/completions" => Operation::Chat,
            "completions" => Operation::Completions,
            "embeddings" => Operation::Embeddings,
            _ => return None,
        };
        if deployment.is_empty() {
            return None;
        }
        return Some(Api {
            operation,
            family: Family::Azure,
            deployment: Some(deployment.to_string()),
        });
    }

    // The operation is the path's last segments, right after a `v1`
    // segment: anything else ending the same way is another API (Assistants'
    // `/v1/threads/{id}/messages`, `/v1/messages/count_tokens`, a stored
    // completion's `/v1/chat/completions/{id}`) and is not an LLM call.
    let table: [(&[&[u8]], Operation); 5] = [
        (&[b"chat", b"completions"], Operation::Chat),
        (&[b"completions"], Operation::Completions),
        (&[b"responses"], Operation::Responses),
        (&[b"embeddings"], Operation::Embeddings),
        (&[b"messages"], Operation::Messages),
    ];
    // The last four segments, last first (empty where the path has fewer).
    let mut rev = path.as_bytes().rsplit(|&b| b == b'/');
    let last: [&[u8]; 4] = std::array::from_fn(|_| rev.next().unwrap_or(b""));
    table.iter().find_map(|&(tail, operation)| {
        let n = tail.len();
        if last[n] != b"v1" || !tail.iter().rev().eq(last[..n].iter()) {
            return None;
        }
        let family = match operation {
            Operation::Messages => Family::Anthropic,
            // Azure's v1 API (`/openai/v1/...`) names the model in the body.
            _ if last[n + 1] == b"openai" => Family::Azure,
            _ => Family::OpenAi,
        };
        Some(Api {
            operation,
            family,
            deployment: None,
        })
    })
}

#[cfg(test)]
#[allow(clippy::type_complexity)] // tables of cases read best inline
mod tests {
    use super::*;

    #[test]
    fn classifies_paths() {
        use Family::*;
        use Operation::*;
        let cases: &[(&str, &str, Option<(Operation, Family, Option<&str>)>)] = &[
            ("POST", "/v1/chat/completions", Some((Chat, OpenAi, None))),
            (
                "POST",
                "/v1/chat/completions?x=1",
                Some((Chat, OpenAi, None)),
            ),
            (
                "POST",
                "/llm/v1/chat/completions/",
                Some((Chat, OpenAi, None)),
            ),
            ("POST", "/v1/completions", Some((Completions, OpenAi, None))),
            ("POST", "/v1/responses", Some((Responses, OpenAi, None))),
            ("POST", "/v1/embeddings", Some((Embeddings, OpenAi, None))),
            ("POST", "/v1/messages", Some((Messages, Anthropic, None))),
            (
                "POST",
                "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21",
                Some((Chat, Azure, Some("gpt4o-prod"))),
            ),
            (
                "POST",
                "/openai/deployments/emb/embeddings",
                Some((Embeddings, Azure, Some("emb"))),
            ),
            ("POST", "/openai/deployments//chat/completions", None),
            ("POST", "/openai/deployments/x/images", None),
            ("GET", "/v1/chat/completions", None),
            ("GET", "/v1/models", None),
            ("POST", "/v1/audio/speech", None),
            ("POST", "", None),
            // Look-alikes: other APIs whose paths end like an LLM call's.
            ("POST", "/v1/threads/t/messages", None),
            ("POST", "/v1/threads/thread_abc/messages/", None),
            ("POST", "/llm/v1/threads/t/messages", None),
            ("GET", "/v1/chat/completions/chatcmpl-1", None),
            ("POST", "/v1/chat/completions/chatcmpl-1", None),
            ("GET", "/v1/chat/completions/chatcmpl-1/messages", None),
            ("GET", "/v1/responses/resp_1", None),
            ("POST", "/v1/responses/resp_1/cancel", None),
            ("GET", "/v1/responses/resp_1/input_items", None),
            ("POST", "/v1/messages/count_tokens", None),
            ("POST", "/v1/messages/batches", None),
            ("POST", "/v1/fine_tuning/jobs/x/completions", None),
            ("POST", "/api/embeddings", None),
            ("POST", "/chat/completions/v1/messages/x", None),
            // Prefixes users put in front of the real paths.
            (
                "POST",
                "/llm/v1/messages",
                Some((Messages, Anthropic, None)),
            ),
            (
                "POST",
                "/team-a/llm/v1/embeddings",
                Some((Embeddings, OpenAi, None)),
            ),
            // Azure's v1 API: the model is in the body, as with OpenAI.
            (
                "POST",
                "/openai/v1/chat/completions",
                Some((Chat, Azure, None)),
            ),
            (
                "POST",
                "/openai/v1/responses?api-version=preview",
                Some((Responses, Azure, None)),
            ),
            (
                "POST",
                "/openai/v1/embeddings",
                Some((Embeddings, Azure, None)),
            ),
        ];
        for (method, path, want) in cases {
            let got = classify(method, path).map(|a| (a.operation, a.family, a.deployment));
            let want = want.map(|(o, f, d)| (o, f, d.map(str::to_string)));
            assert_eq!(got, want, "{method} {path}");
        }
    }
}
