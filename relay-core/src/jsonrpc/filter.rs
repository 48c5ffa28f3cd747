//! The JSON-RPC filter: pure, bounded decisions over a request's method, path and body.
//!
//! Order of checks, cheapest first: the HTTP method and the path (canonical form, then the
//! allow-lists), the body size (before it is buffered: [`Policy::max_body`]), the nesting
//! depth (a linear scan before any parsing: [`MAX_DEPTH`]), then the JSON-RPC structure and
//! every call's method. A request that passes untouched is forwarded byte for byte; a batch
//! with some calls denied is forwarded without them (the allowed entries byte for byte), and
//! the denied ones are answered by the sentry and merged into the node's response.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::glob::{canonical_path, method_matches, path_matches};
use super::preset::Preset;

/// Deepest JSON nesting accepted (objects and arrays). Real calls nest a handful of levels;
/// parsers of deeply nested input are where stack exhaustion lives.
pub(crate) const MAX_DEPTH: usize = 32;
/// Longest method name repeated in an error message.
const MAX_NAME_IN_MESSAGE: usize = 64;

/// JSON-RPC error codes the sentry answers with.
pub mod code {
    pub(crate) const PARSE_ERROR: i32 = -32700;
    pub(crate) const INVALID_REQUEST: i32 = -32600;
    pub(crate) const METHOD_NOT_FOUND: i32 = -32601;
}

/// A route's filter, from its preset and config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub post_paths: Vec<String>,
    pub get_method_paths: Vec<String>,
    pub websocket_paths: Vec<String>,
    /// WebSocket paths whose messages are the node's own subscription protocol, not calls.
    pub websocket_subscription_paths: Vec<String>,
    pub allow_methods: Vec<String>,
    pub deny_methods: Vec<String>,
    pub max_body: usize,
    pub max_batch: usize,
}

/// What the HTTP request is, once its method and path passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `POST` of a JSON-RPC body: check it with [`Policy::check_body`].
    Post,
    /// A URI-form call (`GET /status?...`) of this method, already allowed.
    GetMethod(String),
    /// A WebSocket upgrade. With `calls`, each message is a body for [`Policy::check_body`];
    /// without, messages are the node's subscription protocol: see
    /// [`Policy::check_subscription`].
    WebSocket { calls: bool },
}

/// Why a request is refused before its body is read, as the HTTP status to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 403: the path (or a URI-form method) is not allowed, or not canonical.
    Forbidden,
    /// 405: an HTTP method other than `POST` (or `GET` where the path takes one).
    MethodNotAllowed,
    /// 413: the declared body is over `max_body`.
    TooLarge,
}

/// The decision on a body.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Send `body` to the node. `answered` are the sentry's own answers to denied calls of a
    /// batch, to merge into the node's response with
    /// [`merge_batch`](super::merge::merge_batch). `calls` counts every call of the request
    /// (for the per-client rate), `methods` names the forwarded ones.
    Forward {
        body: Forwarded,
        answered: Vec<String>,
        calls: usize,
        methods: Vec<String>,
    },
    /// Answer this JSON (HTTP 200) without contacting the node; `None`: nothing to answer
    /// (only notifications, which get no response), `calls` as above.
    Answer { json: Option<String>, calls: usize },
}

/// The body to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forwarded {
    /// The request's own bytes, unchanged.
    Unchanged,
    /// A batch rebuilt from the allowed entries, each byte for byte.
    Rebuilt(String),
}

/// One call's members, as the filter reads them: `method` and `id` as raw JSON.
///
/// Read member by member, in order, and refused (as an invalid request) unless every node
/// behind a sentry would read the same members: a member spelt as `jsonrpc`, `id`, `method` or
/// `params` twice, or any other name a node may take for one of them. Go's `encoding/json`
/// (geth, Erigon, CometBFT, goloop) matches names case-insensitively with Unicode folding and
/// lets the last match win, so `{"method":"eth_chainId","METHOD":"admin_addPeer"}` runs
/// `admin_addPeer` there; a reader of C strings stops a name at NUL. See [`lookalike`].
struct Call<'a> {
    method: Option<&'a RawValue>,
    /// `Some` whenever the member is present, even as `null`: only an absent id makes a
    /// notification.
    id: Option<&'a RawValue>,
}

/// The members of a call whose spelling is checked, in [`Call`]'s order of `seen` flags.
const MEMBERS: [&str; 4] = ["jsonrpc", "id", "method", "params"];

impl<'de> Deserialize<'de> for Call<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(CallVisitor)
    }
}

struct CallVisitor;

impl<'de> serde::de::Visitor<'de> for CallVisitor {
    type Value = Call<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON-RPC call object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Call<'de>, A::Error> {
        use serde::de::{Error, IgnoredAny};
        let mut call = Call {
            method: None,
            id: None,
        };
        let mut seen = [false; MEMBERS.len()];
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match MEMBERS.iter().position(|m| *m == key) {
                Some(i) if seen[i] => return Err(A::Error::custom("a member given twice")),
                Some(i) => {
                    seen[i] = true;
                    match MEMBERS[i] {
                        "method" => call.method = Some(map.next_value()?),
                        "id" => call.id = Some(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                None if lookalike(&key) => {
                    return Err(A::Error::custom("a member a node may read as another"));
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(call)
    }
}

/// A member name, borrowed from the body unless it had escapes.
struct Key<'a>(std::borrow::Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> serde::de::Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(v.into()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(v.to_owned().into()))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// Whether a member name that is not exactly one of [`MEMBERS`] may still be read as one by
/// a node: equal to it under Go's case folding (ASCII case, `ſ` as `s`, the Kelvin sign as
/// `k`: the only non-ASCII letters whose simple folding reaches ASCII), whole or cut at its
/// first NUL.
fn lookalike(key: &str) -> bool {
    let folded = |key: &str| {
        MEMBERS.iter().any(|m| {
            let mut name = m.chars();
            key.chars().all(|c| {
                let c = match c {
                    '\u{17f}' => 's',
                    '\u{212a}' => 'k',
                    c => c.to_ascii_lowercase(),
                };
                name.next() == Some(c)
            }) && name.next().is_none()
        })
    };
    folded(key) || key.split_once('\0').is_some_and(|(cut, _)| folded(cut))
}

/// One call's fate.
enum Checked {
    Allowed(String),
    /// Answered by the sentry (`None` for a notification: no answer at all).
    Answered(Option<String>),
}

impl Policy {
    /// The policy of `preset` plus the config's additions. A `deny_unless_allowed` entry of
    /// the preset is dropped when `allow_methods` names exactly its glob.
    #[must_use]
    pub fn new(
        preset: &Preset,
        allow_paths: &[String],
        allow_methods: &[String],
        deny_methods: &[String],
        max_body: usize,
        max_batch: Option<usize>,
    ) -> Self {
        let globs = |entries: &[super::preset::Entry]| -> Vec<String> {
            entries.iter().map(|e| e.glob.to_owned()).collect()
        };
        let mut post_paths = globs(preset.post_paths);
        post_paths.extend(allow_paths.iter().cloned());
        // "Upgrades on allowed paths": a path the operator allows takes WebSocket too (the
        // gateway still checks `websocket = true`).
        let mut websocket_paths = globs(preset.websocket_paths);
        websocket_paths.extend(allow_paths.iter().cloned());
        let mut allow = globs(preset.allow_methods);
        allow.extend(allow_methods.iter().cloned());
        let mut deny = globs(preset.deny_methods);
        deny.extend(
            preset
                .deny_unless_allowed
                .iter()
                .filter(|e| !allow_methods.iter().any(|a| a == e.glob))
                .map(|e| e.glob.to_owned()),
        );
        deny.extend(deny_methods.iter().cloned());
        Self {
            post_paths,
            get_method_paths: globs(preset.get_method_paths),
            websocket_paths,
            websocket_subscription_paths: if preset.websocket_calls {
                Vec::new()
            } else {
                globs(preset.websocket_paths)
            },
            allow_methods: allow,
            deny_methods: deny,
            max_body,
            max_batch: max_batch.unwrap_or(preset.max_batch),
        }
    }

    /// Whether a call of `method` may reach the node: an allow glob matches, no deny glob
    /// does, and the name has no control character.
    #[must_use]
    pub fn method_allowed(&self, method: &str) -> bool {
        // A node written in C may cut a name at NUL, and no chain names a method with a
        // control character: such a name is never allowed, whatever the globs say.
        !method.chars().any(char::is_control)
            && self.allow_methods.iter().any(|g| method_matches(g, method))
            && !self.deny_methods.iter().any(|g| method_matches(g, method))
    }

    /// Check the request line and headers: `http_method` (`"POST"`, `"GET"`, ...), the path
    /// without its query, whether it asks for a WebSocket upgrade, and its declared length.
    ///
    /// # Errors
    /// The HTTP status to refuse with; nothing reaches the node.
    pub fn check_request(
        &self,
        http_method: &str,
        path: &str,
        upgrade: bool,
        content_length: Option<u64>,
    ) -> Result<Kind, Refusal> {
        canonical_path(path).map_err(|_| Refusal::Forbidden)?;
        let listed = |globs: &[String]| globs.iter().any(|g| path_matches(g, path));
        if upgrade {
            return if http_method == "GET" && listed(&self.websocket_paths) {
                Ok(Kind::WebSocket {
                    calls: !listed(&self.websocket_subscription_paths),
                })
            } else {
                Err(Refusal::Forbidden)
            };
        }
        match http_method {
            "POST" if listed(&self.post_paths) => {
                let too_large = content_length
                    .is_some_and(|n| usize::try_from(n).map_or(true, |n| n > self.max_body));
                if too_large {
                    Err(Refusal::TooLarge)
                } else {
                    Ok(Kind::Post)
                }
            }
            "GET" if listed(&self.get_method_paths) => {
                let method = &path[1..];
                if self.method_allowed(method) {
                    Ok(Kind::GetMethod(method.to_owned()))
                } else {
                    Err(Refusal::Forbidden)
                }
            }
            _ if listed(&self.post_paths) || listed(&self.get_method_paths) => {
                Err(Refusal::MethodNotAllowed)
            }
            _ => Err(Refusal::Forbidden),
        }
    }

    /// Decide on a JSON-RPC body (a `POST` body, or a WebSocket text message) that is at most
    /// `max_body` bytes (the caller enforces the size while reading).
    #[must_use]
    pub fn check_body(&self, body: &[u8]) -> Verdict {
        if body.len() > self.max_body {
            // The caller should have stopped reading; answer rather than parse.
            return answer(
                error(None, code::INVALID_REQUEST, "request body too large"),
                1,
            );
        }
        let Ok(text) = std::str::from_utf8(body) else {
            return answer(error(None, code::PARSE_ERROR, "parse error: not UTF-8"), 1);
        };
        if !depth_within(text.as_bytes(), MAX_DEPTH) {
            let message = format!("parse error: nested deeper than {MAX_DEPTH}");
            return answer(error(None, code::PARSE_ERROR, &message), 1);
        }
        let trimmed = text.trim_start();
        if trimmed.starts_with('[') {
            return self.check_batch(text);
        }
        // A body that parses as a call is well-formed JSON: it is read once, not twice.
        let checked = match serde_json::from_str::<Call<'_>>(text) {
            Ok(call) => self.check_parsed(&call),
            Err(_) if serde_json::from_str::<&RawValue>(text).is_err() => {
                return answer(error(None, code::PARSE_ERROR, "parse error"), 1);
            }
            Err(_) => invalid_call(),
        };
        match checked {
            Checked::Allowed(method) => Verdict::Forward {
                body: Forwarded::Unchanged,
                answered: Vec::new(),
                calls: 1,
                methods: vec![method],
            },
            Checked::Answered(json) => Verdict::Answer { json, calls: 1 },
        }
    }

    /// Decide on a message of a node's own subscription protocol (goloop's block and event
    /// sockets): no method to filter, so it passes unchanged when it is bounded, well-formed
    /// JSON, and counts as one call.
    #[must_use]
    pub fn check_subscription(&self, message: &[u8]) -> Verdict {
        let bad = |message: &str| answer(error(None, code::PARSE_ERROR, message), 1);
        if message.len() > self.max_body {
            return answer(error(None, code::INVALID_REQUEST, "message too large"), 1);
        }
        let Ok(text) = std::str::from_utf8(message) else {
            return bad("parse error: not UTF-8");
        };
        if !depth_within(text.as_bytes(), MAX_DEPTH) {
            return bad("parse error: nested too deep");
        }
        if serde_json::from_str::<&RawValue>(text).is_err() {
            return bad("parse error");
        }
        Verdict::Forward {
            body: Forwarded::Unchanged,
            answered: Vec::new(),
            calls: 1,
            methods: Vec::new(),
        }
    }

    fn check_batch(&self, text: &str) -> Verdict {
        let Ok(entries) = serde_json::from_str::<Vec<&RawValue>>(text) else {
            return answer(error(None, code::PARSE_ERROR, "parse error"), 1);
        };
        let calls = entries.len().max(1);
        if entries.is_empty() {
            return answer(error(None, code::INVALID_REQUEST, "empty batch"), 1);
        }
        if entries.len() > self.max_batch {
            let message = format!(
                "batch of {} calls is over this endpoint's limit of {}",
                entries.len(),
                self.max_batch
            );
            return answer(error(None, code::INVALID_REQUEST, &message), calls);
        }
        let mut allowed = Vec::new();
        let mut methods = Vec::new();
        let mut answered = Vec::new();
        for entry in &entries {
            match self.check_call(entry.get()) {
                Checked::Allowed(method) => {
                    allowed.push(entry.get());
                    methods.push(method);
                }
                Checked::Answered(Some(json)) => answered.push(json),
                Checked::Answered(None) => {}
            }
        }
        if allowed.is_empty() {
            let json = (!answered.is_empty()).then(|| format!("[{}]", answered.join(",")));
            return Verdict::Answer { json, calls };
        }
        let body = if allowed.len() == entries.len() {
            Forwarded::Unchanged
        } else {
            Forwarded::Rebuilt(format!("[{}]", allowed.join(",")))
        };
        Verdict::Forward {
            body,
            answered,
            calls,
            methods,
        }
    }

    /// One call (an object's JSON text).
    fn check_call(&self, json: &str) -> Checked {
        match serde_json::from_str::<Call<'_>>(json) {
            Ok(call) => self.check_parsed(&call),
            Err(_) => invalid_call(),
        }
    }

    /// One call, parsed.
    fn check_parsed(&self, call: &Call<'_>) -> Checked {
        let id = call.id.map(RawValue::get);
        let method = call.method.and_then(|raw| string_value(raw.get()));
        let Some(method) = method else {
            let message = "invalid request: no method name";
            return Checked::Answered(Some(error(
                id.or(Some("null")),
                code::INVALID_REQUEST,
                message,
            )));
        };
        if self.method_allowed(&method) {
            return Checked::Allowed(method);
        }
        // A notification gets no answer, allowed or not.
        let Some(id) = id else {
            return Checked::Answered(None);
        };
        let shown: String = method.chars().take(MAX_NAME_IN_MESSAGE).collect();
        let message = format!("method not allowed: {shown}");
        Checked::Answered(Some(error(Some(id), code::METHOD_NOT_FOUND, &message)))
    }
}

/// A call that is not an object with the members a call has.
fn invalid_call() -> Checked {
    Checked::Answered(Some(error(None, code::INVALID_REQUEST, "invalid request")))
}

/// The string a JSON value (already known to be well-formed) holds, if it is a string. One
/// without escapes is taken as it stands.
fn string_value(json: &str) -> Option<String> {
    match json.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => Some(inner.to_owned()),
        _ => serde_json::from_str::<String>(json).ok(),
    }
}

fn answer(json: String, calls: usize) -> Verdict {
    Verdict::Answer {
        json: Some(json),
        calls,
    }
}

/// A JSON-RPC error response; `id` is raw JSON (`null` when absent).
#[must_use]
pub fn error(id: Option<&str>, code: i32, message: &str) -> String {
    let message = serde_json::to_string(message).unwrap_or_else(|_| "\"error\"".to_owned());
    format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":{},\"error\":{{\"code\":{code},\"message\":{message}}}}}",
        id.unwrap_or("null")
    )
}

/// Whether no object or array in `json` nests deeper than `max` (strings are skipped, with
/// their escapes). Linear, no allocation: run before any parser sees the input.
#[must_use]
pub(crate) fn depth_within(json: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::string_value;

    #[test]
    fn string_values_read_as_serde_reads_them() {
        for json in [
            r#""icx_getBalance""#,
            r#""""#,
            r#""icx_get\u0042alance""#,
            r#""a\"b""#,
            r#""a\\""#,
            r#""\\\\""#,
            "12",
            "null",
            r#"["a"]"#,
            r#"{"a":1}"#,
        ] {
            assert_eq!(
                string_value(json),
                serde_json::from_str::<String>(json).ok(),
                "{json}"
            );
        }
    }
}
