//! Which LLM API a request speaks, from its method and path.
//!
//! The path is the one fact every filter has before any body arrives, and the
//! providers are told apart by it: OpenAI and the servers that copy it
//! (vLLM, Ollama, llama.cpp) under `/v1/...`, Azure OpenAI under
//! `/openai/deployments/{deployment}/...`, Anthropic at `/v1/messages`.
//! Matching is on the path's tail so that a prefix a platform adds
//! (`/llm/v1/chat/completions`) does not hide the API.

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
    let path = path.split(['?', '#']).next().unwrap_or("");
    let path = path.trim_end_matches('/');

    if let Some(i) = path.find("/openai/deployments/") {
        let rest = &path[i + "/openai/deployments/".len()..];
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

    let table: [(&str, Operation, Family); 5] = [
        ("/chat/completions", Operation::Chat, Family::OpenAi),
        ("/completions", Operation::Completions, Family::OpenAi),
        ("/responses", Operation::Responses, Family::OpenAi),
        ("/embeddings", Operation::Embeddings, Family::OpenAi),
        ("/messages", Operation::Messages, Family::Anthropic),
    ];
    table
        .iter()
        .find(|(tail, _, _)| path.ends_with(tail))
        .map(|&(_, operation, family)| Api {
            operation,
            family,
            deployment: None,
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
        ];
        for (method, path, want) in cases {
            let got = classify(method, path).map(|a| (a.operation, a.family, a.deployment));
            let want = want.map(|(o, f, d)| (o, f, d.map(str::to_string)));
            assert_eq!(got, want, "{method} {path}");
        }
    }
}
