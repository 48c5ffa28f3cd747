//! Table-driven tests of the filter per preset, and property tests: no request reaches a
//! path outside the allow-list, and nothing panics.

use super::filter::{Forwarded, Kind, Policy, Refusal, Verdict, code, depth_within};
use super::go_reader;
use super::merge::merge_batch;
use super::preset::{self, Preset};

const MIB: usize = 1 << 20;

fn policy(preset: &Preset) -> Policy {
    Policy::new(preset, &[], &[], &[], MIB, None)
}

fn post(policy: &Policy, path: &str) -> Result<Kind, Refusal> {
    policy.check_request("POST", path, false, Some(100))
}

/// Parse a verdict's answer into JSON for assertions.
fn answer_of(verdict: &Verdict) -> serde_json::Value {
    match verdict {
        Verdict::Answer { json: Some(j), .. } => serde_json::from_str(j).unwrap(),
        other => panic!("expected an answer, got {other:?}"),
    }
}

fn error_code(value: &serde_json::Value) -> i64 {
    value["error"]["code"].as_i64().unwrap()
}

#[test]
fn icon_paths() {
    let p = policy(&preset::ICON);
    for ok in ["/api/v3", "/api/v3/icon_dex", "/api/v3/0x1"] {
        assert_eq!(post(&p, ok), Ok(Kind::Post), "{ok}");
    }
    for refused in [
        "/admin/chain",
        "/admin/system",
        "/api/v3d",
        "/api/v3d/icon_dex",
        "/api/rosetta",
        "/api/rosetta/network/list",
        "/metrics",
        "/",
        "/api",
        "/api/v3/icon_dex/extra",
        // Path tricks: every other spelling of a denied path is refused, never decoded.
        "/api/v3/../admin",
        "/api/v3/..",
        "/api/v3/%2e%2e/admin",
        "/api/v3%2F..%2Fadmin",
        "/%61dmin/chain",
        "//admin/chain",
        "/api//v3",
        "/api/v3/",
        "/api/v3.",
        "/api/v3/.",
        "/admin./chain",
        "/api\\v3",
        "api/v3",
    ] {
        assert_eq!(post(&p, refused), Err(Refusal::Forbidden), "{refused}");
    }
    // Other HTTP methods on the API path.
    assert_eq!(
        p.check_request("GET", "/api/v3", false, None),
        Err(Refusal::MethodNotAllowed)
    );
    assert_eq!(
        p.check_request("PUT", "/admin/chain", false, None),
        Err(Refusal::Forbidden)
    );
    // WebSocket only on the notification paths.
    assert_eq!(
        p.check_request("GET", "/api/v3/icon_dex/block", true, None),
        Ok(Kind::WebSocket { calls: false })
    );
    assert_eq!(
        p.check_request("GET", "/api/v3/icon_dex/event", true, None),
        Ok(Kind::WebSocket { calls: false })
    );
    assert_eq!(
        p.check_request("GET", "/api/v3", true, None),
        Err(Refusal::Forbidden)
    );
    assert_eq!(
        p.check_request("GET", "/admin/chain", true, None),
        Err(Refusal::Forbidden)
    );
    // Size is checked before the body is read.
    assert_eq!(
        p.check_request("POST", "/api/v3", false, Some(MIB as u64 + 1)),
        Err(Refusal::TooLarge)
    );
    assert_eq!(
        p.check_request("POST", "/api/v3", false, Some(u64::MAX)),
        Err(Refusal::TooLarge)
    );
}

#[test]
fn icon_methods() {
    let p = policy(&preset::ICON);
    for ok in [
        "icx_getLastBlock",
        "icx_getBalance",
        "icx_call",
        "icx_sendTransaction",
        "btp_getNetworkInfo",
    ] {
        assert!(p.method_allowed(ok), "{ok}");
    }
    for denied in [
        "debug_getTrace",
        "debug_estimateStep",
        "admin_getChain",
        "ICX_getBalance",
        "icx",
        "",
        "eth_blockNumber",
    ] {
        assert!(!p.method_allowed(denied), "{denied}");
    }
}

#[test]
fn ethereum_methods() {
    let p = policy(&preset::ETHEREUM);
    for ok in [
        "eth_blockNumber",
        "eth_call",
        "eth_sendRawTransaction",
        "eth_subscribe",
        "eth_unsubscribe",
        "net_version",
        "web3_clientVersion",
    ] {
        assert!(p.method_allowed(ok), "{ok}");
    }
    for denied in [
        "admin_addPeer",
        "admin_nodeInfo",
        "debug_traceTransaction",
        "personal_unlockAccount",
        "miner_setEtherbase",
        "engine_newPayloadV3",
        "engine_forkchoiceUpdatedV3",
        "txpool_content",
        "eth_sign",
        "eth_signTransaction",
        "eth_signTypedData_v4",
        "eth_sendTransaction",
    ] {
        assert!(!p.method_allowed(denied), "{denied}");
    }
    // txpool_* can be allowed by name; the engine API never, even by an allow-all.
    let open = Policy::new(
        &preset::ETHEREUM,
        &[],
        &["txpool_*".into(), "*".into()],
        &[],
        MIB,
        None,
    );
    assert!(open.method_allowed("txpool_content"));
    assert!(!open.method_allowed("engine_newPayloadV3"));
    assert!(!open.method_allowed("admin_addPeer"));
    // Config denies add to the preset's.
    let stricter = Policy::new(&preset::ETHEREUM, &[], &[], &["eth_call".into()], MIB, None);
    assert!(!stricter.method_allowed("eth_call"));
    assert!(stricter.method_allowed("eth_blockNumber"));
}

#[test]
fn cosmos_get_and_post() {
    let p = policy(&preset::COSMOS);
    assert_eq!(post(&p, "/"), Ok(Kind::Post));
    assert_eq!(
        p.check_request("GET", "/status", false, None),
        Ok(Kind::GetMethod("status".into()))
    );
    assert_eq!(
        p.check_request("GET", "/abci_query", false, None),
        Ok(Kind::GetMethod("abci_query".into()))
    );
    for denied in [
        "/dial_seeds",
        "/dial_peers",
        "/unsafe_flush_mempool",
        "/status/x",
        "/./status",
    ] {
        assert_eq!(
            p.check_request("GET", denied, false, None),
            Err(Refusal::Forbidden),
            "{denied}"
        );
    }
    assert_eq!(
        p.check_request("GET", "/websocket", true, None),
        Ok(Kind::WebSocket { calls: true })
    );
    let v =
        answer_of(&p.check_body(
            br#"{"jsonrpc":"2.0","id":1,"method":"dial_seeds","params":{"seeds":["x"]}}"#,
        ));
    assert_eq!(error_code(&v), i64::from(code::METHOD_NOT_FOUND));
}

#[test]
fn none_admits_only_what_the_config_lists() {
    let p = policy(&preset::NONE);
    assert_eq!(post(&p, "/"), Err(Refusal::Forbidden));
    assert!(!p.method_allowed("anything"));
    let listed = Policy::new(
        &preset::NONE,
        &["/rpc".into()],
        &["get_*".into()],
        &[],
        MIB,
        Some(5),
    );
    assert_eq!(post(&listed, "/rpc"), Ok(Kind::Post));
    assert!(listed.method_allowed("get_block"));
    assert!(!listed.method_allowed("set_block"));
}

#[test]
fn single_calls() {
    let p = policy(&preset::ICON);
    let body = br#"{"jsonrpc":"2.0","id":7,"method":"icx_getLastBlock"}"#;
    assert_eq!(
        p.check_body(body),
        Verdict::Forward {
            body: Forwarded::Unchanged,
            answered: vec![],
            calls: 1,
            methods: vec!["icx_getLastBlock".into()]
        }
    );
    // Denied: -32601 with the request's id, whatever its type.
    for (id, raw) in [("7", "7"), ("\"seven\"", "\"seven\""), ("null", "null")] {
        let body = format!(r#"{{"jsonrpc":"2.0","id":{raw},"method":"debug_getTrace"}}"#);
        let v = answer_of(&p.check_body(body.as_bytes()));
        assert_eq!(error_code(&v), i64::from(code::METHOD_NOT_FOUND));
        assert_eq!(v["id"].to_string(), id);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not allowed")
        );
    }
    // A denied notification gets no answer at all.
    assert_eq!(
        p.check_body(br#"{"jsonrpc":"2.0","method":"debug_getTrace"}"#),
        Verdict::Answer {
            json: None,
            calls: 1
        }
    );
    // Malformed: -32700 with a null id.
    for bad in [&b"{"[..], b"not json", b"", b"{\"id\":1,", b"\xff\xfe"] {
        let v = answer_of(&p.check_body(bad));
        assert_eq!(error_code(&v), i64::from(code::PARSE_ERROR), "{bad:?}");
        assert!(v["id"].is_null());
    }
    // Valid JSON, not a call: -32600.
    for bad in [
        &br#""text""#[..],
        b"5",
        br#"{"id":1}"#,
        br#"{"id":1,"method":5}"#,
    ] {
        let v = answer_of(&p.check_body(bad));
        assert_eq!(error_code(&v), i64::from(code::INVALID_REQUEST), "{bad:?}");
    }
}

#[test]
fn batches() {
    let p = policy(&preset::ICON);
    let all_allowed = br#"[{"jsonrpc":"2.0","id":1,"method":"icx_getLastBlock"},
        {"jsonrpc":"2.0","id":2,"method":"icx_getBalance","params":{"address":"hx0"}}]"#;
    assert!(matches!(
        p.check_body(all_allowed),
        Verdict::Forward {
            body: Forwarded::Unchanged,
            calls: 2,
            ..
        }
    ));
    // Mixed: the allowed entries go on byte for byte, the denied one is answered.
    let mixed = br#"[{"jsonrpc":"2.0","id":1,"method":"icx_getLastBlock"},{"jsonrpc":"2.0","id":2,"method":"debug_getTrace"},{"jsonrpc":"2.0","method":"debug_x"},{"jsonrpc":"2.0","id":3,"method":"icx_call","params":{"to":"cx0"}}]"#;
    let Verdict::Forward {
        body: Forwarded::Rebuilt(body),
        answered,
        calls,
        methods,
    } = p.check_body(mixed)
    else {
        panic!("mixed batch not forwarded");
    };
    assert_eq!(
        body,
        r#"[{"jsonrpc":"2.0","id":1,"method":"icx_getLastBlock"},{"jsonrpc":"2.0","id":3,"method":"icx_call","params":{"to":"cx0"}}]"#
    );
    assert_eq!(calls, 4);
    assert_eq!(methods, ["icx_getLastBlock", "icx_call"]);
    assert_eq!(answered.len(), 1, "the denied notification gets no answer");
    let denied: serde_json::Value = serde_json::from_str(&answered[0]).unwrap();
    assert_eq!(denied["id"], 2);
    // The node's answer and ours, merged.
    let node = r#"[{"jsonrpc":"2.0","id":1,"result":"a"},{"jsonrpc":"2.0","id":3,"result":"b"}]"#;
    let merged: serde_json::Value = serde_json::from_str(&merge_batch(node, &answered)).unwrap();
    let ids: Vec<i64> = merged
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [1, 3, 2]);
    // All denied: answered without the node.
    let v = answered_all(&p, br#"[{"jsonrpc":"2.0","id":1,"method":"debug_a"},{"jsonrpc":"2.0","id":2,"method":"admin_b"}]"#);
    assert_eq!(v.as_array().unwrap().len(), 2);
    // Over max_batch (10 for ICON, goloop's own limit): one error, nothing forwarded; every
    // call counts against the rate.
    let eleven = format!(
        "[{}]",
        [r#"{"jsonrpc":"2.0","id":1,"method":"icx_getLastBlock"}"#; 11].join(",")
    );
    let verdict = p.check_body(eleven.as_bytes());
    assert!(matches!(verdict, Verdict::Answer { calls: 11, .. }));
    assert_eq!(
        error_code(&answer_of(&verdict)),
        i64::from(code::INVALID_REQUEST)
    );
    // Empty batch: invalid request.
    assert_eq!(
        error_code(&answer_of(&p.check_body(b"[]"))),
        i64::from(code::INVALID_REQUEST)
    );
    // A non-object entry is answered as an invalid request, the rest forwarded.
    let Verdict::Forward { answered, .. } =
        p.check_body(br#"[5,{"jsonrpc":"2.0","id":1,"method":"icx_getLastBlock"}]"#)
    else {
        panic!("not forwarded");
    };
    assert_eq!(answered.len(), 1);
}

/// The methods a Go node (geth, CometBFT, goloop) would run from what the filter forwards.
fn node_runs(body: &[u8], verdict: &Verdict) -> Vec<String> {
    match verdict {
        Verdict::Forward {
            body: Forwarded::Unchanged,
            ..
        } => go_reader::executed(body),
        Verdict::Forward {
            body: Forwarded::Rebuilt(rebuilt),
            ..
        } => go_reader::executed(rebuilt.as_bytes()),
        Verdict::Answer { .. } => Vec::new(),
    }
}

/// Go's decoder matches member names case-insensitively (with Unicode folding: `ſ` is `s`)
/// and lets the last match win, so a call with a second spelling of `method` runs another
/// method than the one the filter checked. Every call whose member names a node could read
/// otherwise than the filter is refused, alone, in a batch, and however the name is escaped.
#[test]
fn lookalike_and_duplicate_members_are_refused() {
    let p = policy(&preset::ETHEREUM);
    let admin = "admin_addPeer";
    for call in [
        format!(r#"{{"jsonrpc":"2.0","id":1,"method":"eth_chainId","METHOD":"{admin}"}}"#),
        format!(r#"{{"jsonrpc":"2.0","id":1,"method":"eth_chainId","Method":"{admin}"}}"#),
        format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"eth_chainId\",\"method\":\"{admin}\"}}"
        ),
        format!("{{\"id\":1,\"method\":\"eth_chainId\",\"\\u004dethod\":\"{admin}\"}}"),
        format!("{{\"id\":1,\"method\":\"eth_chainId\",\"\\u006dethod\":\"{admin}\"}}"),
        // U+017F LATIN SMALL LETTER LONG S folds to s in Go.
        "{\"id\":1,\"method\":\"eth_chainId\",\"jsonrpc\":\"2.0\",\"params\":[],\"PARAM\u{17f}\":[]}"
            .to_owned(),
        format!(
            "{{\"id\":1,\"method\":\"eth_chainId\",\"\\u017fomething\":1,\"METHOD\":\"{admin}\"}}"
        ),
        // A reader of C strings stops at NUL.
        format!("{{\"id\":1,\"method\":\"eth_chainId\",\"method\\u0000x\":\"{admin}\"}}"),
        // The other members, spelt twice or otherwise.
        r#"{"jsonrpc":"2.0","Id":1,"method":"eth_chainId"}"#.to_owned(),
        r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"eth_chainId"}"#.to_owned(),
        r#"{"jsonrpc":"2.0","JsonRpc":"2.0","id":1,"method":"eth_chainId"}"#.to_owned(),
        r#"{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[],"params":[1]}"#.to_owned(),
        r#"{"jsonrpc":"2.0","jsonrpc":"1.0","id":1,"method":"eth_chainId"}"#.to_owned(),
    ] {
        let verdict = p.check_body(call.as_bytes());
        let v = answer_of(&verdict);
        assert_eq!(error_code(&v), i64::from(code::INVALID_REQUEST), "{call}");
        // In a batch beside an honest call, only the honest call goes on.
        let batch = format!(r#"[{call},{{"jsonrpc":"2.0","id":9,"method":"eth_blockNumber"}}]"#);
        let verdict = p.check_body(batch.as_bytes());
        assert_eq!(
            node_runs(batch.as_bytes(), &verdict),
            ["eth_blockNumber"],
            "{batch}"
        );
        let Verdict::Forward { answered, .. } = &verdict else {
            panic!("{batch}: the honest call was not forwarded");
        };
        assert_eq!(answered.len(), 1, "{batch}");
    }
    // Member names that fold to nothing of a call's stay harmless and pass.
    for call in [
        r#"{"jsonrpc":"2.0","id":1,"method":"eth_chainId","methods":"x","meth":"y"}"#,
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"eth_chainId\",\"\u{212a}\":1}",
    ] {
        let verdict = p.check_body(call.as_bytes());
        assert_eq!(
            node_runs(call.as_bytes(), &verdict),
            ["eth_chainId"],
            "{call}"
        );
    }
    // A method name with a control character is never allowed (a node may cut it there).
    assert!(!p.method_allowed("eth_chainId\u{0}admin"));
    assert!(!p.method_allowed("eth_chainId\n"));
}

fn answered_all(p: &Policy, body: &[u8]) -> serde_json::Value {
    answer_of(&p.check_body(body))
}

#[test]
fn deep_and_huge_input_is_refused_before_parsing() {
    let p = policy(&preset::ETHEREUM);
    let deep = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"eth_call","params":{}1{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let v = answer_of(&p.check_body(deep.as_bytes()));
    assert_eq!(error_code(&v), i64::from(code::PARSE_ERROR));
    // Brackets inside strings do not count.
    assert!(depth_within(
        br#"{"a":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\"]]"}"#,
        2
    ));
    assert!(!depth_within(b"[[[", 2));
    // Over max_body: answered, never parsed.
    let small = Policy::new(&preset::ETHEREUM, &[], &[], &[], 16, None);
    let v = answer_of(&small.check_body(br#"{"jsonrpc":"2.0","id":1,"method":"eth_call"}"#));
    assert_eq!(error_code(&v), i64::from(code::INVALID_REQUEST));
}

#[test]
fn merge_leaves_a_non_array_node_answer_alone() {
    let node = r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32000,"message":"busy"}}"#;
    assert_eq!(merge_batch(node, &["x".into()]), node);
    assert_eq!(merge_batch("[1]", &[]), "[1]");
}

proptest::proptest! {
    /// Whatever the path, only a path the allow-list names literally (or by one `*` segment)
    /// passes, and nothing under /admin, /api/v3d, /api/rosetta or /metrics ever does.
    #[test]
    fn no_spelling_reaches_a_refused_icon_path(path in "/[a-zA-Z0-9/._%~-]{0,40}") {
        let p = policy(&preset::ICON);
        if post(&p, &path).is_ok() {
            let segments: Vec<&str> = path.split('/').collect();
            proptest::prop_assert!(segments.len() == 3 || segments.len() == 4, "{}", path);
            proptest::prop_assert_eq!(segments[1], "api");
            proptest::prop_assert_eq!(segments[2], "v3");
            proptest::prop_assert!(!path.contains('%') && !path.contains(".."), "{}", path);
            proptest::prop_assert!(!path.ends_with('.') && !path.contains("//"), "{}", path);
        }
    }

    /// Any bytes: a verdict, never a panic; a forwarded body only names allowed methods, as the
    /// filter reads it and as a Go node does.
    #[test]
    fn any_body_gets_a_verdict(body in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
        let p = policy(&preset::ETHEREUM);
        let verdict = p.check_body(&body);
        for m in node_runs(&body, &verdict) {
            proptest::prop_assert!(p.method_allowed(&m), "a Go node runs {}", m);
        }
        if let Verdict::Forward { methods, .. } = verdict {
            for m in methods {
                proptest::prop_assert!(p.method_allowed(&m));
            }
        }
    }


    /// The differential property: for call objects built from member names a node may fold
    /// together, what a Go node would run from the forwarded body is exactly what the filter
    /// allowed and counted, and only allowed methods.
    #[test]
    fn a_go_node_runs_only_what_the_filter_allowed(calls in proptest::collection::vec(
        proptest::collection::vec((
            proptest::sample::select(&[
                "method", "METHOD", "Method", "mEthod", "method ", "methods", "\\u006dethod",
                "\\u004dethod", "meth\u{f3}d", "\u{17f}", "id", "ID", "jsonrpc", "JSONRPC",
                "params", "PARAM\u{17f}", "param\\u0073", "x", "\u{212a}", "method\\u0000",
            ][..]),
            proptest::sample::select(&[
                "\"eth_chainId\"", "\"admin_addPeer\"", "\"debug_x\"", "null", "5", "[]", "{}",
                "\"eth_\\u0063all\"",
            ][..]),
        ), 0..5),
        1..4,
    )) {
        let p = policy(&preset::ETHEREUM);
        let objects: Vec<String> = calls
            .iter()
            .map(|members| {
                let fields: Vec<String> =
                    members.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", fields.join(","))
            })
            .collect();
        for body in [objects[0].clone(), format!("[{}]", objects.join(","))] {
            let verdict = p.check_body(body.as_bytes());
            let runs = node_runs(body.as_bytes(), &verdict);
            for method in &runs {
                proptest::prop_assert!(p.method_allowed(method), "{} runs {}", body, method);
            }
            if let Verdict::Forward { methods, .. } = &verdict {
                proptest::prop_assert_eq!(&runs, methods, "{}", body);
            }
        }
    }

    /// Batches of random method names: what is forwarded is exactly the allowed calls, each
    /// denied call with an id is answered once, and notifications are never answered.
    #[test]
    fn batches_split_exactly(calls in proptest::collection::vec(
        ("(eth_|debug_|admin_|net_|engine_)[a-zA-Z]{0,8}", proptest::option::of(0u32..1000)),
        1..12,
    )) {
        let p = Policy::new(&preset::ETHEREUM, &[], &[], &[], MIB, Some(100));
        let entries: Vec<String> = calls.iter().map(|(m, id)| match id {
            Some(id) => format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"{m}"}}"#),
            None => format!(r#"{{"jsonrpc":"2.0","method":"{m}"}}"#),
        }).collect();
        let body = format!("[{}]", entries.join(","));
        let allowed: Vec<&String> = calls.iter().filter(|(m, _)| p.method_allowed(m)).map(|(m, _)| m).collect();
        let denied_with_id = calls.iter().filter(|(m, id)| !p.method_allowed(m) && id.is_some()).count();
        match p.check_body(body.as_bytes()) {
            Verdict::Forward { methods, answered, calls: n, .. } => {
                proptest::prop_assert_eq!(methods.iter().collect::<Vec<_>>(), allowed);
                proptest::prop_assert_eq!(answered.len(), denied_with_id);
                proptest::prop_assert_eq!(n, calls.len());
            }
            Verdict::Answer { json, calls: n } => {
                proptest::prop_assert!(allowed.is_empty());
                proptest::prop_assert_eq!(n, calls.len());
                let count = json.map_or(0, |j| serde_json::from_str::<Vec<serde_json::Value>>(&j).unwrap().len());
                proptest::prop_assert_eq!(count, denied_with_id);
            }
        }
    }
}
