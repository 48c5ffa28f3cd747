//! A batch forwarded without some calls: the sentry's answers to those merged into the node's
//! response, whole ([`merge_batch`]) or as it streams ([`BatchMerge`]).

use serde_json::value::RawValue;

/// The response to a batch that was forwarded without some calls: the node's response array
/// with the sentry's `answered` entries appended (JSON-RPC matches batch responses by id, in
/// any order). A node response that is not an array (an error for the whole request) is
/// returned as it is, followed by nothing: it already answers the batch.
#[must_use]
pub fn merge_batch(node: &str, answered: &[String]) -> String {
    if answered.is_empty() {
        return node.to_owned();
    }
    let trimmed = node.trim();
    match serde_json::from_str::<Vec<&RawValue>>(trimmed) {
        Ok(entries) => {
            let all: Vec<&str> = entries
                .iter()
                .map(|e| e.get())
                .chain(answered.iter().map(String::as_str))
                .collect();
            format!("[{}]", all.join(","))
        }
        Err(_) => node.to_owned(),
    }
}

/// [`merge_batch`] as the node's response streams through, holding back no more than the
/// trailing `]` (and the blanks around it): a batch with a denied call costs no buffering of
/// the node's answer, however large.
///
/// The node's response passes byte for byte; when it is a JSON array, the sentry's answers
/// go in before its closing bracket. One that is not (an error for the whole request) passes
/// unchanged, as [`merge_batch`] leaves it.
#[derive(Debug)]
pub struct BatchMerge {
    answered: Vec<String>,
    /// Before the first non-blank byte; then whether it opened an array.
    array: Option<bool>,
    /// The last non-blank byte seen and what followed it: the candidate closing bracket.
    held: Vec<u8>,
    /// Whether the array had an element (a non-blank byte between its brackets).
    elements: bool,
}

impl BatchMerge {
    #[must_use]
    pub fn new(answered: Vec<String>) -> Self {
        Self {
            answered,
            array: None,
            held: Vec::new(),
            elements: false,
        }
    }

    /// The next piece of the node's response in; what may be sent on now.
    #[must_use]
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let blank = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        let mut chunk = chunk;
        let mut out = Vec::new();
        if self.array.is_none() {
            let Some(first) = chunk.iter().position(|b| !blank(b)) else {
                return chunk.to_vec();
            };
            self.array = Some(chunk[first] == b'[');
            out.extend_from_slice(&chunk[..=first]);
            chunk = &chunk[first + 1..];
        }
        if self.array != Some(true) {
            out.extend_from_slice(chunk);
            return out;
        }
        let Some(last) = chunk.iter().rposition(|b| !blank(b)) else {
            self.held.extend_from_slice(chunk);
            return out;
        };
        // Everything before the last non-blank byte goes on, what was held first.
        let earlier = std::mem::take(&mut self.held);
        self.elements |= earlier.iter().chain(&chunk[..last]).any(|b| !blank(b));
        out.extend_from_slice(&earlier);
        out.extend_from_slice(&chunk[..last]);
        self.held.extend_from_slice(&chunk[last..]);
        out
    }

    /// The end of the node's response: what remains to send.
    #[must_use]
    pub fn finish(self) -> Vec<u8> {
        if self.array != Some(true) || self.held.first() != Some(&b']') || self.answered.is_empty()
        {
            // Not an array, or not a closed one, or nothing to add: as it came.
            return self.held;
        }
        let mut out = Vec::new();
        if self.elements {
            out.push(b',');
        }
        out.extend_from_slice(self.answered.join(",").as_bytes());
        out.extend_from_slice(&self.held);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::{BatchMerge, merge_batch};

    /// The streamed merge, chunked anyhow, means what the whole-body merge means: the same
    /// JSON for arrays, the node's bytes for anything else.
    #[test]
    fn the_streamed_merge_agrees_with_the_whole_one() {
        let answers = vec![
            r#"{"jsonrpc":"2.0","id":2,"error":{"code":-32601,"message":"no"}}"#.to_owned(),
            r#"{"jsonrpc":"2.0","id":3,"error":{"code":-32601,"message":"no"}}"#.to_owned(),
        ];
        let nodes = [
            r#"[{"jsonrpc":"2.0","id":1,"result":"a]"}]"#,
            " [ {\"id\":1,\"result\":[1,2]} , {\"id\":4,\"result\":\"]\"} ]\n",
            "[]",
            " [ \n ] ",
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32000,"message":"busy"}}"#,
            "",
            "   ",
            "[1,2",
            "not json",
        ];
        for (node, answered) in nodes
            .iter()
            .flat_map(|n| [(*n, answers.clone()), (*n, Vec::new())])
        {
            let whole = merge_batch(node, &answered);
            for size in 1..=node.len().max(1) {
                let mut merge = BatchMerge::new(answered.clone());
                let mut out = Vec::new();
                for chunk in node.as_bytes().chunks(size) {
                    out.extend(merge.push(chunk));
                }
                out.extend(merge.finish());
                let streamed = String::from_utf8(out).unwrap();
                let as_json = |s: &str| serde_json::from_str::<serde_json::Value>(s).ok();
                match as_json(&whole) {
                    Some(value) if node.trim_start().starts_with('[') => {
                        assert_eq!(as_json(&streamed), Some(value), "{node:?} in {size}s");
                    }
                    _ => assert_eq!(streamed, node, "{node:?} in {size}s"),
                }
            }
        }
    }
}
