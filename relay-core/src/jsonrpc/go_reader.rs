//! A second reader of JSON-RPC bodies, written to read them the way the nodes behind a sentry
//! do, so tests and the fuzzer can judge the filter by what the node would run rather than by
//! the filter's own parse.
//!
//! It models Go's `encoding/json` decoding a request into geth's (and CometBFT's, goloop's)
//! message struct, as `rpc/json.go` does it:
//! - a body whose first non-blank byte is `[` is a batch, each element decoded on its own;
//! - an object member is matched to a field by its exact name first, else by Go's case
//!   folding (ASCII case, plus `ſ` for `s` and `K` (Kelvin) for `k`, the two non-ASCII
//!   letters whose simple folding reaches ASCII);
//! - every matching member is assigned in order, so the last one wins; `null` leaves a string
//!   field as it was, and a value of the wrong type leaves it too (Go records the error and
//!   decodes on; geth ignores that error);
//! - an element that is not an object yields an empty method, which no node runs.
//!
//! It is its own small parser (strings decoded with Go's rules: a bad surrogate becomes
//! U+FFFD), sharing no code with the filter, and it is only built for tests and the fuzzer.

/// The fields of geth's `jsonrpcMessage`, in declaration order (Go's field order decides
/// which of two folding matches is taken: the first).
const FIELDS: [&str; 6] = ["jsonrpc", "id", "method", "params", "error", "result"];
/// Deeper nesting is not read (the filter refuses far shallower input first).
const MAX_DEPTH: usize = 200;

/// The method of every call in `body` as a Go node reads it (`""` where none would be run),
/// or `None` when the body is not JSON a Go node would decode.
#[must_use]
pub fn methods(body: &[u8]) -> Option<Vec<String>> {
    Some(calls(body)?.into_iter().map(|(_, method)| method).collect())
}

/// The `jsonrpc` and `method` strings of every call in `body`, as a Go node reads them, or
/// `None` when the body is not JSON a Go node would decode.
#[must_use]
pub fn calls(body: &[u8]) -> Option<Vec<(String, String)>> {
    let mut p = Parser { s: body, i: 0 };
    p.blank();
    let batch = p.peek() == Some(b'[');
    let value = p.value(0)?;
    p.blank();
    if p.i != body.len() {
        return None;
    }
    let call = |v: &Value| (string_field(v, "jsonrpc"), string_field(v, "method"));
    Some(match value {
        Value::Array(elements) if batch => elements.iter().map(call).collect(),
        single => vec![call(&single)],
    })
}

/// The methods a node would run: [`methods`] without the empty ones.
#[must_use]
pub fn executed(body: &[u8]) -> Vec<String> {
    methods(body)
        .unwrap_or_default()
        .into_iter()
        .filter(|m| !m.is_empty())
        .collect()
}

/// Whether `key` names `field` to Go: exactly, or equal under its case folding.
#[must_use]
pub(crate) fn folds_to(key: &str, field: &str) -> bool {
    let mut a = key.chars().map(fold);
    let mut b = field.chars().map(fold);
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
    }
}

fn fold(c: char) -> char {
    match c {
        '\u{17f}' => 's',
        '\u{212a}' => 'k',
        c => c.to_ascii_lowercase(),
    }
}

/// A string field of geth's message as Go fills it from `value`.
fn string_field(value: &Value, name: &str) -> String {
    let Value::Object(members) = value else {
        return String::new();
    };
    let mut out = String::new();
    for (key, value) in members {
        let field = FIELDS
            .iter()
            .find(|f| key == *f)
            .or_else(|| FIELDS.iter().find(|f| folds_to(key, f)));
        if field == Some(&name)
            && let Value::String(s) = value
        {
            out.clone_from(s);
        }
    }
    out
}

enum Value {
    Null,
    Scalar,
    String(String),
    Array(Vec<Value>),
    Object(Vec<(String, Value)>),
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    /// Go's four blanks, and no others.
    fn blank(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        self.blank();
        (self.peek() == Some(b)).then(|| self.i += 1)
    }

    fn value(&mut self, depth: usize) -> Option<Value> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.blank();
        match self.peek()? {
            b'{' => self.object(depth),
            b'[' => self.array(depth),
            b'"' => self.string().map(Value::String),
            b'n' => self.literal(b"null").map(|()| Value::Null),
            b't' => self.literal(b"true").map(|()| Value::Scalar),
            b'f' => self.literal(b"false").map(|()| Value::Scalar),
            _ => self.number().map(|()| Value::Scalar),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.s[self.i..]
            .starts_with(word)
            .then(|| self.i += word.len())
    }

    fn number(&mut self) -> Option<()> {
        let digits = |p: &mut Self| {
            let start = p.i;
            while matches!(p.peek(), Some(b'0'..=b'9')) {
                p.i += 1;
            }
            (p.i > start).then_some(())
        };
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        if self.peek() == Some(b'0') {
            self.i += 1;
        } else {
            digits(self)?;
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            digits(self)?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            digits(self)?;
        }
        Some(())
    }

    fn array(&mut self, depth: usize) -> Option<Value> {
        self.i += 1;
        let mut elements = Vec::new();
        if self.eat(b']').is_some() {
            return Some(Value::Array(elements));
        }
        loop {
            elements.push(self.value(depth + 1)?);
            if self.eat(b',').is_some() {
                continue;
            }
            self.eat(b']')?;
            return Some(Value::Array(elements));
        }
    }

    fn object(&mut self, depth: usize) -> Option<Value> {
        self.i += 1;
        let mut members = Vec::new();
        if self.eat(b'}').is_some() {
            return Some(Value::Object(members));
        }
        loop {
            self.blank();
            if self.peek() != Some(b'"') {
                return None;
            }
            let key = self.string()?;
            self.eat(b':')?;
            members.push((key, self.value(depth + 1)?));
            if self.eat(b',').is_some() {
                continue;
            }
            self.eat(b'}')?;
            return Some(Value::Object(members));
        }
    }

    /// A string at the cursor, decoded as Go decodes it: invalid UTF-8 and bad surrogates
    /// become U+FFFD; control characters are refused.
    fn string(&mut self) -> Option<String> {
        self.i += 1;
        let mut out: Vec<u16> = Vec::new();
        let mut text = String::new();
        let flush = |out: &mut Vec<u16>, text: &mut String| {
            text.extend(char::decode_utf16(out.drain(..)).map(|r| r.unwrap_or('\u{fffd}')));
        };
        loop {
            let b = self.peek()?;
            match b {
                b'"' => {
                    self.i += 1;
                    flush(&mut out, &mut text);
                    return Some(text);
                }
                0..=0x1f => return None,
                b'\\' => {
                    let escaped = *self.s.get(self.i + 1)?;
                    self.i += 2;
                    let unit = match escaped {
                        b'"' => u16::from(b'"'),
                        b'\\' => u16::from(b'\\'),
                        b'/' => u16::from(b'/'),
                        b'b' => 8,
                        b'f' => 12,
                        b'n' => 10,
                        b'r' => 13,
                        b't' => 9,
                        b'u' => {
                            let hex = std::str::from_utf8(self.s.get(self.i..self.i + 4)?).ok()?;
                            if !hex.bytes().all(|h| h.is_ascii_hexdigit()) {
                                return None;
                            }
                            self.i += 4;
                            u16::from_str_radix(hex, 16).ok()?
                        }
                        _ => return None,
                    };
                    out.push(unit);
                }
                _ => {
                    flush(&mut out, &mut text);
                    let start = self.i;
                    while self
                        .peek()
                        .is_some_and(|b| b != b'"' && b != b'\\' && b >= 0x20)
                    {
                        self.i += 1;
                    }
                    text.push_str(&String::from_utf8_lossy(&self.s[start..self.i]));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_as_go_reads() {
        let one = |body: &str| methods(body.as_bytes()).unwrap();
        assert_eq!(one(r#"{"method":"a"}"#), ["a"]);
        // The last matching member wins, exact or folded.
        assert_eq!(one(r#"{"method":"a","METHOD":"b"}"#), ["b"]);
        assert_eq!(one(r#"{"method":"a","Method":"b","method":"c"}"#), ["c"]);
        assert_eq!(
            one("{\"method\":\"a\",\"\u{17f}\":1,\"me\u{17f}hod\":\"x\"}"),
            ["a"]
        );
        assert_eq!(one("{\"method\":\"a\",\"method\u{17f}\":\"x\"}"), ["a"]);
        assert_eq!(one(r#"{"method":"a","\u006dethod":"b"}"#), ["b"]);
        assert_eq!(one(r#"{"method":"a","ID":1,"Params":[]}"#), ["a"]);
        // Kelvin folds to k; no field has a k, so it only matters that it does not match.
        assert!(folds_to("\u{212a}", "k") && folds_to("K", "k"));
        assert!(folds_to("JSONRPC", "jsonrpc") && !folds_to("jsonrpc2", "jsonrpc"));
        // null and wrong types leave the method as it was.
        assert_eq!(one(r#"{"method":"a","METHOD":null}"#), ["a"]);
        assert_eq!(one(r#"{"method":"a","METHOD":5}"#), ["a"]);
        // Batches, and elements that are not objects.
        assert_eq!(one(r#" [{"method":"a"},5,{"Method":"b"}]"#), ["a", "", "b"]);
        assert_eq!(one("5"), [""]);
        // Bad surrogates become U+FFFD, as in Go.
        assert_eq!(one(r#"{"method":"\ud800"}"#), ["\u{fffd}"]);
        // Not JSON to Go.
        for bad in [
            "{",
            "{\"method\":\"a\"}x",
            "\u{a0}{}",
            "{'a':1}",
            "[1,]",
            "01",
        ] {
            assert!(methods(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    /// The model against the real thing: Go's own `encoding/json` (Debian's `golang-go`),
    /// reading bodies exactly as geth's `parseMessage` does, must find the same `jsonrpc` and
    /// `method` as this reader in every call of a generated corpus. Skipped without `go`, except under
    /// `CI=true` (CI installs it).
    #[test]
    fn agrees_with_go_encoding_json() {
        let Some(dir) = go_program() else { return };
        let corpus = corpus();
        let input: String = corpus
            .iter()
            .map(|b| b.iter().map(|x| format!("{x:02x}")).collect::<String>() + "\n")
            .collect();
        let mut child = std::process::Command::new("go")
            .args(["run", "main.go"])
            .current_dir(dir.path())
            .env("GOCACHE", dir.path().join("cache"))
            .env("GOFLAGS", "-mod=mod")
            .env("GO111MODULE", "off")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            stdin.write_all(input.as_bytes()).unwrap();
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        assert!(out.status.success(), "go run failed");
        let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
        assert_eq!(lines.len(), corpus.len());
        let mut disagreed = 0;
        for (body, line) in corpus.iter().zip(lines) {
            let go: Option<Vec<(String, String)>> = serde_json::from_str(line).unwrap();
            let ours = calls(body);
            if go != ours {
                disagreed += 1;
                eprintln!(
                    "{}: go {go:?}, ours {ours:?}",
                    String::from_utf8_lossy(body)
                );
            }
        }
        assert_eq!(
            disagreed, 0,
            "the model disagrees with Go on {disagreed} bodies"
        );
    }

    /// Fixed cases and generated calls: member names that fold (or almost), escapes, values
    /// of every type, batches, and a few broken bodies.
    fn corpus() -> Vec<Vec<u8>> {
        const NAMES: [&str; 24] = [
            "method",
            "METHOD",
            "Method",
            "mEthod",
            "method ",
            "methods",
            "\\u006dethod",
            "\\u004dethod",
            "me\\u0074hod",
            "meth\u{f3}d",
            "\u{17f}",
            "id",
            "ID",
            "jsonrpc",
            "JSONRPC",
            "j\u{17f}onrpc",
            "J\\u017fONRPC",
            "jsonrpK",
            "params",
            "PARAM\u{17f}",
            "x",
            "\u{212a}",
            "method\\u0000",
            "result",
        ];
        const VALUES: [&str; 11] = [
            "\"eth_chainId\"",
            "\"admin_addPeer\"",
            "null",
            "5",
            "[]",
            "{}",
            "\"eth_\\u0063all\"",
            "\"\\ud800\"",
            "true",
            "\"a\\\"b\"",
            "\"2.0\"",
        ];
        let mut out: Vec<Vec<u8>> = [
            "",
            "{",
            "[",
            "[]",
            "5",
            "null",
            " [{\"method\":\"a\"}]",
            "{\"method\":\"a\"} ",
            "\u{a0}{}",
            "[{\"method\":\"a\"},5,null,{\"Method\":\"b\"}]",
            "{\"method\":\"a\"}x",
            "[1,]",
            "01",
            "{\"method\":\"\\ud83d\\ude00\"}",
            "{\"method\":\"\\udc00\\ud800\"}",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            usize::try_from(state % n as u64).unwrap()
        };
        for _ in 0..3000 {
            let calls: Vec<String> = (0..1 + next(3))
                .map(|_| {
                    let members: Vec<String> = (0..next(5))
                        .map(|_| {
                            format!(
                                "\"{}\":{}",
                                NAMES[next(NAMES.len())],
                                VALUES[next(VALUES.len())]
                            )
                        })
                        .collect();
                    format!("{{{}}}", members.join(","))
                })
                .collect();
            let body = if next(2) == 0 {
                calls[0].clone()
            } else {
                format!("[{}]", calls.join(","))
            };
            out.push(body.into_bytes());
        }
        out
    }

    /// A Go program reading hex-encoded bodies, one per line, printing the `jsonrpc` and
    /// `method` geth would see in each call (`null` for a body geth's reader refuses).
    fn go_program() -> Option<tempfile::TempDir> {
        let found = std::process::Command::new("go")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "go is not installed; CI installs golang-go (.ci/run)"
            );
            eprintln!("the Go comparison is skipped: go is not installed");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("main.go"), GO_READER).unwrap();
        Some(dir)
    }

    const GO_READER: &str = r#"package main

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
)

// geth's rpc/json.go jsonrpcMessage.
type message struct {
	Version string          `json:"jsonrpc,omitempty"`
	ID      json.RawMessage `json:"id,omitempty"`
	Method  string          `json:"method,omitempty"`
	Params  json.RawMessage `json:"params,omitempty"`
	Error   json.RawMessage `json:"error,omitempty"`
	Result  json.RawMessage `json:"result,omitempty"`
}

// geth's isBatch.
func isBatch(raw []byte) bool {
	for _, c := range raw {
		if c == 0x20 || c == 0x09 || c == 0x0a || c == 0x0d {
			continue
		}
		return c == '['
	}
	return false
}

// geth's parseMessage, after its reader took the body as one json.RawMessage: the
// (jsonrpc, method) of each call.
func calls(raw []byte) [][2]string {
	if !json.Valid(raw) {
		return nil
	}
	if !isBatch(raw) {
		var m message
		json.Unmarshal(raw, &m)
		return [][2]string{{m.Version, m.Method}}
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.Token()
	out := [][2]string{}
	for dec.More() {
		var m message
		dec.Decode(&m)
		out = append(out, [2]string{m.Version, m.Method})
	}
	return out
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	for in.Scan() {
		raw, _ := hex.DecodeString(in.Text())
		out, _ := json.Marshal(calls(raw))
		fmt.Println(string(out))
	}
}
"#;
}
