//! docs/openapi.json against the real control API. A VM runs the balloon guest; every
//! endpoint and method is asked, with good and bad bodies, and so are paths and methods the
//! API does not have, an oversized body, late headers and body, and one connection over the
//! limit (the table in `CASES`). For each answer: its status is the one the case expects and
//! is documented for that path and method (404 and 405 under `x-unrouted-responses`, with
//! the documented `Allow` header), its required headers are there, an answer documented
//! without content has no body, and a body is `application/json` that validates against the
//! documented schema (JSON Schema 2020-12, with `boon`) and has no field the document leaves
//! out. A second VM runs a `--balloon-steps` schedule that never finishes, for the 409, and
//! offers free page hinting, for the hinting endpoints' answers when it is on.
//!
//! Without a VM: every schema's example validates against its schema, and reads back
//! unchanged through the Rust type that answers with it (so the names, the required fields
//! and the nulls are those of the real serialization, also for the fields a running test
//! guest never sends: the statistics of Linux 6.12+, steps, probes).

mod common;

use common::{scratch, vmm_guest, Need};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The document under test.
const SPEC: &str = include_str!("../docs/openapi.json");
/// Where the document is loaded in the validator (its `$ref`s are local to it).
const SPEC_URL: &str = "file:///docs/openapi.json";

/// What a case sends after its request line.
#[derive(Clone, Copy, Debug)]
enum Payload {
    /// No body.
    Nothing,
    /// A body, as `application/json`.
    Body(&'static str),
    /// A JSON body of 5000 bytes (the limit is 4096).
    Oversized,
    /// Headers announcing a 20-byte body, 5 bytes of it, then nothing (the body's limit is 5 s).
    LateBody,
    /// Part of the headers, then nothing (the headers' limit is 10 s).
    LateHeaders,
    /// Nothing, on a connection opened while 256 others are open.
    OverConnectionLimit,
}
use Payload::*;

/// One request and the status it must get.
struct Case {
    method: &'static str,
    path: &'static str,
    send: Payload,
    status: u16,
}

const fn case(method: &'static str, path: &'static str, status: u16, send: Payload) -> Case {
    Case {
        method,
        path,
        send,
        status,
    }
}

/// Asked in this order of a VM of 512 MiB whose balloon is at 64 MiB and whose driver has
/// sent statistics. Statistics are switched off and on again in between.
#[rustfmt::skip]
const CASES: &[Case] = &[
    case("GET",    "/",                        200, Nothing),
    case("PUT",    "/",                        405, Nothing),
    case("GET",    "/",                        413, Oversized),
    case("GET",    "/balloon",                 200, Nothing),
    case("PUT",    "/balloon",                 400, Body(r#"{"amount_mib": 0, "deflate_on_oom": true}"#)),
    case("PUT",    "/balloon",                 400, Nothing),
    case("PATCH",  "/balloon",                 204, Body(r#"{"amount_mib": 32}"#)),
    case("PATCH",  "/balloon",                 400, Body("not json")),
    case("PATCH",  "/balloon",                 400, Body("[32]")),
    case("PATCH",  "/balloon",                 400, Body("{}")),
    case("PATCH",  "/balloon",                 400, Body(r#"{"amount_mib": -5}"#)),
    case("PATCH",  "/balloon",                 400, Body(r#"{"amount_mib": 1, "x": 1}"#)),
    case("PATCH",  "/balloon",                 400, Body(r#"{"amount_mib": 1048576}"#)),
    case("PATCH",  "/balloon",                 413, Oversized),
    case("PATCH",  "/balloon",                 408, LateBody),
    case("DELETE", "/balloon",                 405, Nothing),
    case("POST",   "/balloon",                 405, Body(r#"{"amount_mib": 1}"#)),
    case("GET",    "/balloon/statistics",      200, Nothing),
    case("PATCH",  "/balloon/statistics",      400, Body(r#"{"stats_polling_interval_s": 100000}"#)),
    case("PATCH",  "/balloon/statistics",      400, Body(r#"{"stats_polling_interval_s": 1, "y": 2}"#)),
    case("PATCH",  "/balloon/statistics",      204, Body(r#"{"stats_polling_interval_s": 0}"#)),
    case("GET",    "/balloon/statistics",      400, Nothing),
    case("PATCH",  "/balloon/statistics",      204, Body(r#"{"stats_polling_interval_s": 1}"#)),
    case("PUT",    "/balloon/statistics",      405, Nothing),
    // Free page hinting is not enabled in this VM.
    case("PATCH",  "/balloon/hinting/start",   400, Nothing),
    case("PATCH",  "/balloon/hinting/start",   400, Body(r#"{"acknowledge_on_stop": false}"#)),
    case("PATCH",  "/balloon/hinting/start",   400, Body(r#"{"bogus": 1}"#)),
    case("GET",    "/balloon/hinting/start",   405, Nothing),
    case("GET",    "/balloon/hinting/status",  400, Nothing),
    case("PATCH",  "/balloon/hinting/status",  405, Nothing),
    case("PATCH",  "/balloon/hinting/stop",    400, Nothing),
    case("GET",    "/balloon/hinting/stop",    405, Nothing),
    case("GET",    "/vm/reclaim",              200, Nothing),
    case("PATCH",  "/vm/reclaim",              405, Body("{}")),
    case("GET",    "/vm/reclaim/config",       200, Nothing),
    case("PATCH",  "/vm/reclaim/config",       204, Body(r#"{"zap_span_gap": 32}"#)),
    case("PATCH",  "/vm/reclaim/config",       204, Body("{}")),
    case("PATCH",  "/vm/reclaim/config",       400, Body(r#"{"strategy": "fast"}"#)),
    case("PATCH",  "/vm/reclaim/config",       400, Body(r#"{"batch_pages": 0}"#)),
    case("PATCH",  "/vm/reclaim/config",       400, Body(r#"{"partial_blocks": "split"}"#)),
    case("PATCH",  "/vm/reclaim/config",       400, Body(r#"{"nope": 1}"#)),
    case("PATCH",  "/vm/reclaim/config",       400, Body("[]")),
    case("DELETE", "/vm/reclaim/config",       405, Nothing),
    case("GET",    "/vm/reclaim/config",       200, Nothing),
    case("GET",    "/nowhere",                 404, Nothing),
    case("PATCH",  "/vm",                      404, Body("{}")),
    case("GET",    "/",                        408, LateHeaders),
    case("GET",    "/",                        503, OverConnectionLimit),
];

/// Asked of the second VM, whose `--balloon-steps` schedule is running and which offers free
/// page hinting: the 409, and the hinting endpoints' answers when hinting is on.
#[rustfmt::skip]
const SECOND_VM: &[Case] = &[
    case("PATCH",  "/balloon",                 409, Body(r#"{"amount_mib": 16}"#)),
    case("GET",    "/balloon",                 200, Nothing),
    case("GET",    "/balloon/hinting/status",  200, Nothing),
    case("PATCH",  "/balloon/hinting/start",   204, Nothing),
    case("PATCH",  "/balloon/hinting/start",   204, Body(r#"{"acknowledge_on_stop": false}"#)),
    case("GET",    "/balloon/hinting/status",  200, Nothing),
    case("PATCH",  "/balloon/hinting/stop",    204, Nothing),
    case("PATCH",  "/balloon/hinting/start",   400, Body("[true]")),
];

/// An HTTP answer, read off the socket.
struct Answer {
    status: u16,
    /// Header names in lower case.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `c` on a new connection (`Connection: close`) and reads the whole answer.
fn ask(sock: &Path, c: &Case) -> Result<Answer, String> {
    let head = |len: usize, json: bool| {
        format!(
            "{} {} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{}Content-Length: {len}\r\n\r\n",
            c.method,
            c.path,
            if json { "Content-Type: application/json\r\n" } else { "" }
        )
    };
    let mut extra = Vec::new();
    let request = match c.send {
        Nothing => head(0, false).into_bytes(),
        Body(b) => [head(b.len(), true).as_bytes(), b.as_bytes()].concat(),
        Oversized => {
            let b = format!(r#"{{"amount_mib": 1, "pad": "{}"}}"#, "x".repeat(4975));
            [head(b.len(), true).as_bytes(), b.as_bytes()].concat()
        }
        LateBody => [head(20, true).as_bytes(), b"{\"amo"].concat(),
        LateHeaders => {
            format!("{} {} HTTP/1.1\r\nHost: localhost\r\n", c.method, c.path).into_bytes()
        }
        OverConnectionLimit => {
            // Connections the server has accepted count until they close; a connect may
            // find the accept queue full meanwhile (EAGAIN), as in tests/api.rs.
            extra = (0..vmm::api::MAX_CONNECTIONS)
                .filter_map(|_| UnixStream::connect(sock).ok())
                .collect::<Vec<_>>();
            Vec::new()
        }
    };
    let mut conn = connect(sock)?;
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    conn.write_all(&request)
        .map_err(|e| format!("cannot send: {e}"))?;
    let mut raw = Vec::new();
    let read = conn.read_to_end(&mut raw);
    drop(extra);
    if raw.is_empty() {
        return Err(format!("no answer ({read:?}): the connection was closed"));
    }
    parse(&raw)
}

/// A connection, retrying while the server's accept queue is full.
fn connect(sock: &Path) -> Result<UnixStream, String> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(sock) {
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && start.elapsed() < Duration::from_secs(5) =>
            {
                std::thread::sleep(Duration::from_millis(1))
            }
            r => return r.map_err(|e| format!("cannot connect: {e}")),
        }
    }
}

fn parse(raw: &[u8]) -> Result<Answer, String> {
    let text = String::from_utf8_lossy(raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {text:?}"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP/1.1 status line: {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let a = Answer {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    };
    if let Some(len) = a.header("content-length") {
        if len.parse::<usize>() != Ok(a.body.len()) {
            return Err(format!("Content-Length {len} but {} bytes", a.body.len()));
        }
    }
    Ok(a)
}

/// The document, and the validator with it loaded.
struct Spec {
    doc: Value,
    compiler: boon::Compiler,
    schemas: boon::Schemas,
}

impl Spec {
    fn load() -> Self {
        let doc: Value = serde_json::from_str(SPEC).expect("docs/openapi.json is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(
            doc["jsonSchemaDialect"], "https://json-schema.org/draft/2020-12/schema",
            "the schemas are plain JSON Schema 2020-12"
        );
        let mut compiler = boon::Compiler::new();
        compiler.set_default_draft(boon::Draft::V2020_12);
        compiler
            .add_resource(SPEC_URL, doc.clone())
            .expect("the document loads");
        Spec {
            doc,
            compiler,
            schemas: boon::Schemas::new(),
        }
    }

    /// The value at a JSON pointer of the document.
    fn at(&self, pointer: &str) -> &Value {
        self.doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("docs/openapi.json has nothing at {pointer}"))
    }

    /// Follows a local `$ref` (or none): the pointer and the value it reaches.
    fn resolve(&self, pointer: String) -> (String, &Value) {
        match self.at(&pointer)["$ref"].as_str() {
            Some(r) => {
                let p = r
                    .strip_prefix('#')
                    .expect("local references only")
                    .to_string();
                self.resolve(p)
            }
            None => {
                let v = self.at(&pointer);
                (pointer, v)
            }
        }
    }

    /// Validates `v` against the schema at `pointer` and requires every field of `v` to be
    /// documented: a list of what is wrong.
    fn check(&mut self, pointer: &str, v: &Value) -> Vec<String> {
        let loc = format!("{SPEC_URL}#{pointer}");
        let idx = match self.compiler.compile(&loc, &mut self.schemas) {
            Ok(i) => i,
            Err(e) => return vec![format!("the schema at {pointer} does not compile: {e:#}")],
        };
        let mut wrong = Vec::new();
        if let Err(e) = self.schemas.validate(v, idx) {
            wrong.push(format!("does not match {pointer}: {e:#}"));
        }
        self.undocumented(self.at(pointer), v, "", &mut wrong);
        wrong
    }

    /// The properties a schema documents, through `$ref` and `allOf`.
    fn properties(&self, schema: &Value, out: &mut serde_json::Map<String, Value>) {
        if let Some(r) = schema["$ref"].as_str() {
            self.properties(self.at(r.strip_prefix('#').unwrap()), out);
        }
        if let Some(p) = schema["properties"].as_object() {
            out.extend(p.clone());
        }
        for s in schema["allOf"].as_array().into_iter().flatten() {
            self.properties(s, out);
        }
    }

    /// Fields of `v` that its schema does not name (the document leaves response objects
    /// open to new fields; the test holds it to naming every field the VMM sends).
    fn undocumented(&self, schema: &Value, v: &Value, at: &str, wrong: &mut Vec<String>) {
        let schema = match schema["$ref"].as_str() {
            Some(r) => self.at(r.strip_prefix('#').unwrap()),
            None => schema,
        };
        match v {
            Value::Object(o) => {
                let mut props = serde_json::Map::new();
                self.properties(schema, &mut props);
                if props.is_empty() {
                    return;
                }
                for (k, fv) in o {
                    match props.get(k) {
                        Some(s) => self.undocumented(s, fv, &format!("{at}/{k}"), wrong),
                        None => wrong.push(format!("field {at}/{k} is not documented")),
                    }
                }
            }
            Value::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    self.undocumented(&schema["items"], item, &format!("{at}/{i}"), wrong);
                }
            }
            _ => {}
        }
    }

    /// Everything wrong with `a` as the answer to `c`, judged by the document.
    fn judge(&mut self, c: &Case, a: &Answer) -> Vec<String> {
        let mut wrong = Vec::new();
        if a.status != c.status {
            wrong.push(format!(
                "status {}, the case expects {}",
                a.status, c.status
            ));
        }
        let path = format!("/paths/{}", c.path.replace('~', "~0").replace('/', "~1"));
        let method = c.method.to_ascii_lowercase();
        let responses = match self.doc.pointer(&path) {
            None => "/x-unrouted-responses".to_string(),
            Some(item) if item.get(&method).is_none() => {
                // A known path with a method it does not take: 405, and `Allow` names the
                // methods the document gives it.
                let documented: BTreeSet<String> = item
                    .as_object()
                    .unwrap()
                    .keys()
                    .map(|m| m.to_ascii_uppercase())
                    .collect();
                let allowed: BTreeSet<String> = a
                    .header("allow")
                    .unwrap_or_default()
                    .split(',')
                    .map(|m| m.trim().to_string())
                    .filter(|m| !m.is_empty())
                    .collect();
                if a.status == 405 && allowed != documented {
                    wrong.push(format!(
                        "Allow is {:?}, the document gives the path {documented:?}",
                        a.header("allow")
                    ));
                }
                "/x-unrouted-responses".to_string()
            }
            Some(_) => format!("{path}/{method}/responses"),
        };
        let unrouted = responses == "/x-unrouted-responses";
        let status = a.status.to_string();
        let documented = self.at(&responses).get(&status).is_some()
            && (!unrouted || (self.doc.pointer(&path).is_none()) == (a.status == 404));
        if !documented {
            wrong.push(format!(
                "status {status} is not documented for {}",
                c.method
            ));
            return wrong;
        }
        let (rpointer, response) = self.resolve(format!("{responses}/{status}"));
        let response = response.clone();
        for (name, h) in response["headers"].as_object().into_iter().flatten() {
            if h["required"] == true && a.header(name).is_none() {
                wrong.push(format!("no {name} header, which the document requires"));
            }
        }
        match response["content"]["application/json"]["schema"] {
            Value::Null => {
                if !a.body.is_empty() {
                    wrong.push(format!(
                        "a body, where the document has none: {:?}",
                        String::from_utf8_lossy(&a.body)
                    ));
                }
            }
            _ => {
                let ct = a.header("content-type").unwrap_or_default();
                if !ct.starts_with("application/json") {
                    wrong.push(format!("Content-Type {ct:?}, not application/json"));
                }
                match serde_json::from_slice::<Value>(&a.body) {
                    Ok(v) => {
                        let schema = format!("{rpointer}/content/application~1json/schema");
                        wrong.extend(self.check(&schema, &v));
                    }
                    Err(e) => wrong.push(format!(
                        "the body is not JSON ({e}): {:?}",
                        String::from_utf8_lossy(&a.body)
                    )),
                }
            }
        }
        wrong
    }
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.send {
            Body(b) => write!(f, "{} {} {b}", self.method, self.path),
            Nothing => write!(f, "{} {}", self.method, self.path),
            other => write!(f, "{} {} ({other:?})", self.method, self.path),
        }
    }
}

/// Asks every case and checks the answer; a line per case that went wrong.
fn run_cases<'a>(
    spec: &mut Spec,
    sock: &Path,
    cases: impl IntoIterator<Item = &'a Case>,
) -> Vec<String> {
    let mut failures = Vec::new();
    for c in cases {
        let wrong = match ask(sock, c) {
            Ok(a) => {
                let wrong = spec.judge(c, &a);
                let body = String::from_utf8_lossy(&a.body);
                eprintln!(
                    "{} {c} -> {} {}",
                    if wrong.is_empty() { "ok  " } else { "FAIL" },
                    a.status,
                    body.chars().take(200).collect::<String>()
                );
                wrong
            }
            Err(e) => {
                eprintln!("FAIL {c} -> {e}");
                vec![e]
            }
        };
        if !wrong.is_empty() {
            failures.push(format!("{c}:\n    {}", wrong.join("\n    ")));
        }
    }
    failures
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn real_answers_match_the_openapi_document() {
    require!("real_answers_match_the_openapi_document", Need::Kvm);
    let mut spec = Spec::load();
    let mut failures = Vec::new();

    // The guest would end after `changes` targets; the test ends it first.
    let sock = scratch("api-schema.sock");
    let mut vm = vmm_guest("balloon")
        .vcpus(2)
        .memory("512M")
        .api_sock(&sock)
        .cmdline("changes=100 touch=8M")
        .spawn();
    let api = vm.api();
    // A balloon with batches behind it and statistics from the driver, so the answers have
    // their nested objects and optional fields filled.
    api.set_balloon_mib(64).unwrap();
    wait_for("the balloon at 64 MiB", Duration::from_secs(60), || {
        let s = api.get("/balloon/statistics").unwrap();
        s["actual_mib"] == 64 && s.get("total_memory").is_some()
    });
    wait_for("the gather's batches", Duration::from_secs(10), || {
        api.reclaim().unwrap().gather.pages_reclaimed >= 16384
    });
    failures.extend(run_cases(&mut spec, &sock, CASES));
    drop(vm);

    // A schedule that cannot finish: the whole RAM, which the guest cannot give.
    let sock = scratch("api-schema-steps.sock");
    let mut vm = vmm_guest("balloon")
        .memory("128M")
        .api_sock(&sock)
        .balloon_steps(&["128M"])
        .step_timeout_s(600)
        .free_page_hinting()
        .cmdline("changes=100 touch=1M")
        .spawn();
    vm.api();
    wait_for("the first step", Duration::from_secs(60), || {
        vm.stderr().contains("balloon step 1: target")
    });
    failures.extend(run_cases(&mut spec, &sock, SECOND_VM));
    drop(vm);

    assert!(
        failures.is_empty(),
        "{} of {} answers do not match docs/openapi.json:\n{}",
        failures.len(),
        CASES.len() + SECOND_VM.len(),
        failures.join("\n")
    );
}

/// Reads `example` as `T` and writes it back.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(
    example: &Value,
) -> Result<Value, String> {
    let t: T = serde_json::from_value(example.clone()).map_err(|e| format!("not read: {e}"))?;
    serde_json::to_value(t).map_err(|e| e.to_string())
}

/// Where `back` differs from `example`: fields dropped, added or changed, by JSON pointer.
fn differences(example: &Value, back: &Value, at: &str) -> Vec<String> {
    match (example, back) {
        (Value::Object(e), Value::Object(b)) => {
            let mut d = Vec::new();
            for (k, v) in e {
                match b.get(k) {
                    Some(w) => d.extend(differences(v, w, &format!("{at}/{k}"))),
                    None => d.push(format!("{at}/{k} dropped")),
                }
            }
            d.extend(
                b.keys()
                    .filter(|k| !e.contains_key(*k))
                    .map(|k| format!("{at}/{k} added")),
            );
            d
        }
        (e, b) if e == b => Vec::new(),
        (e, b) => vec![format!("{at} {e} became {b}")],
    }
}

#[test]
fn every_example_validates_and_reads_back_unchanged_through_its_rust_type() {
    use vmm::api::routes::{BalloonConfig, VmInfo};
    type RoundTrip = fn(&Value) -> Result<Value, String>;
    // The schemas with a Rust type in this package that answers with them.
    let types: &[(&str, RoundTrip)] = &[
        ("VmInfo", round_trip::<VmInfo>),
        ("Balloon", round_trip::<BalloonConfig>),
        (
            "BalloonStats",
            round_trip::<vmm::devices::balloon::BalloonStatistics>,
        ),
        ("BalloonReport", round_trip::<vmm::report::BalloonReport>),
        ("ReclaimConfig", round_trip::<guest_mm::ReclaimConfig>),
    ];
    let mut spec = Spec::load();
    let mut failures = Vec::new();
    let names: Vec<String> = spec
        .at("/components/schemas")
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    for name in names {
        let pointer = format!("/components/schemas/{name}");
        for example in spec.at(&pointer)["examples"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            for w in spec.check(&pointer, &example) {
                failures.push(format!("{name}'s example {w}"));
            }
            if let Some((_, rt)) = types.iter().find(|(n, _)| *n == name) {
                match rt(&example) {
                    Ok(back) if back == example => {}
                    Ok(back) => failures.push(format!(
                        "{name}'s example does not read back unchanged: {}",
                        differences(&example, &back, "").join(", ")
                    )),
                    Err(e) => failures.push(format!("{name}'s example: {e}")),
                }
            }
        }
    }
    for (name, _) in types {
        if spec.at(&format!("/components/schemas/{name}"))["examples"].is_null() {
            failures.push(format!("{name} has no example"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
