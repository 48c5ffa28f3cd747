//! The JSON-RPC filter on arbitrary input: a request line (method, path, upgrade, length)
//! and a body, under every preset. Beyond "never panics", it checks what the filter promises:
//! - a path that passes is canonical and matched by an allow-list glob;
//! - a forwarded body names only allowed methods, and a rebuilt batch is a JSON array of
//!   exactly those calls;
//! - judged by a second reader that reads bodies as a Go node does (`go_reader`: member
//!   names folded, the last match winning), the methods a node would run from what is
//!   forwarded are exactly the ones the filter allowed;
//! - the sentry's own answers are JSON (syntactically: an id is echoed as the client wrote
//!   it, even a number no f64 holds);
//! - merging answers into any node response never panics, and into an array response keeps
//!   every entry; merged as it streams, in pieces, it means the same JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_core::jsonrpc::glob::{canonical_path, path_matches};
use relay_core::jsonrpc::{go_reader, preset};
use relay_core::jsonrpc::{BatchMerge, Forwarded, Kind, Policy, Verdict, merge_batch};
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    // Layout: [selector byte][path bytes up to '\n'][body bytes].
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let split = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let (path, body) = (&rest[..split], rest.get(split + 1..).unwrap_or_default());
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    let chosen = &preset::ALL[usize::from(selector & 3)];
    let policy = Policy::new(
        chosen,
        &[],
        &[],
        &["eth_call".to_owned()],
        4096,
        Some(usize::from(selector >> 4) + 1),
    );
    let http_method = ["POST", "GET", "PUT", "OPTIONS"][usize::from((selector >> 2) & 3)];
    let upgrade = selector & 0x40 != 0;
    let length = u64::try_from(body.len()).ok();

    if let Ok(kind) = policy.check_request(http_method, path, upgrade, length) {
        assert!(
            canonical_path(path).is_ok(),
            "{path:?} passed but is not canonical"
        );
        let listed = |globs: &[String]| globs.iter().any(|g| path_matches(g, path));
        match &kind {
            Kind::Post => assert!(listed(&policy.post_paths), "{path:?}"),
            Kind::GetMethod(method) => {
                assert!(listed(&policy.get_method_paths), "{path:?}");
                assert!(policy.method_allowed(method), "{method:?}");
            }
            Kind::WebSocket { .. } => assert!(listed(&policy.websocket_paths), "{path:?}"),
        }
    }

    for verdict in [policy.check_body(body), policy.check_subscription(body)] {
        match verdict {
            Verdict::Forward {
                body: forwarded,
                answered,
                methods,
                ..
            } => {
                for method in &methods {
                    assert!(policy.method_allowed(method), "{method:?} forwarded");
                }
                if !methods.is_empty() {
                    let sent = match &forwarded {
                        Forwarded::Unchanged => body,
                        Forwarded::Rebuilt(rebuilt) => rebuilt.as_bytes(),
                    };
                    let runs = go_reader::executed(sent);
                    let named: Vec<&String> = methods.iter().filter(|m| !m.is_empty()).collect();
                    assert_eq!(
                        runs.iter().collect::<Vec<_>>(),
                        named,
                        "a Go node runs other methods than allowed"
                    );
                }
                if let Forwarded::Rebuilt(rebuilt) = &forwarded {
                    let entries: Vec<&RawValue> =
                        serde_json::from_str(rebuilt).expect("a rebuilt batch is a JSON array");
                    assert_eq!(entries.len(), methods.len());
                }
                for answer in &answered {
                    serde_json::from_str::<&RawValue>(answer).expect("answers are JSON");
                }
                let node = String::from_utf8_lossy(body);
                let merged = merge_batch(&node, &answered);
                // Streamed in pieces, the merge means what the whole one means.
                let mut streaming = BatchMerge::new(answered.clone());
                let mut streamed = Vec::new();
                for piece in node.as_bytes().chunks(usize::from(selector & 7) + 1) {
                    streamed.extend(streaming.push(piece));
                }
                streamed.extend(streaming.finish());
                let as_json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).ok();
                if node.trim_start().starts_with('[') && as_json(merged.as_bytes()).is_some() {
                    assert_eq!(as_json(&streamed), as_json(merged.as_bytes()), "streamed merge");
                } else if !node.trim_start().starts_with('[') {
                    assert_eq!(streamed, node.as_bytes(), "a non-array passes unchanged");
                }
                if let Ok(entries) = serde_json::from_str::<Vec<&RawValue>>(node.trim()) {
                    let out: Vec<&RawValue> =
                        serde_json::from_str(&merged).expect("a merged array is JSON");
                    assert_eq!(out.len(), entries.len() + answered.len());
                }
            }
            Verdict::Answer { json, .. } => {
                if let Some(json) = json {
                    serde_json::from_str::<&RawValue>(&json).expect("answers are JSON");
                }
            }
        }
    }
});
