//! The control API against a running VM, over HTTP/1.1 on its Unix socket: every endpoint
//! through curl and through `vmm balloon`; malformed requests, unknown paths and methods,
//! oversized bodies and out-of-range values each get their status and a fault message while
//! the VM keeps serving; and idle clients delay nothing: with 200 connections held open a
//! balloon change is answered and followed, and the gather keeps closing its batches.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A VM running the balloon guest with a control socket.
struct Vm {
    child: Child,
    sock: PathBuf,
}

impl Vm {
    fn start(name: &str, changes: u32) -> Self {
        let sock = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.sock"));
        let child = Command::new(common::VMM)
            .args([
                "run", "--guest", "balloon", "--vcpus", "2", "--memory", "512M",
            ])
            .args(["--api-sock", sock.to_str().unwrap()])
            .args(["--cmdline", &format!("changes={changes} touch=8M")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for("the control socket", Duration::from_secs(30), || {
            sock.exists()
        });
        Vm { child, sock }
    }

    fn sock(&self) -> &str {
        self.sock.to_str().unwrap()
    }

    /// The guest ends by itself after its last change; its console.
    fn finish(mut self) -> String {
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "the guest did not finish"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert!(status.success(), "{out}");
        assert!(
            !self.sock.exists(),
            "the socket is removed when the VM ends"
        );
        out
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// curl over the socket: (status, body). curl comes with ./setup.sh.
fn curl(sock: &str, method: &str, resource: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--unix-socket", sock, "-X", method])
        .args(["-w", "\n%{http_code}"])
        .arg(format!("http://localhost{resource}"));
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl ({e}): ./setup.sh installs it"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim()
            .parse()
            .unwrap_or_else(|_| panic!("curl gave no status: {text:?} {out:?}")),
        body.to_string(),
    )
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

fn cli(sock: &str, args: &[&str]) -> common::Run {
    let mut all = vec!["balloon", "--api-sock", sock];
    all.extend_from_slice(args);
    common::vmm(&all)
}

/// Raw bytes to the socket, the answer back (the server closes or answers and we read what
/// arrives within a second).
fn raw(sock: &str, bytes: &[u8]) -> String {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = c.write_all(bytes);
    let mut buf = [0u8; 4096];
    let n = c.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).to_string()
}

#[test]
fn every_endpoint_answers_through_curl_and_vmm_balloon() {
    require_kvm!("every_endpoint_answers_through_curl_and_vmm_balloon");
    let vm = Vm::start("api-endpoints", 2);
    let s = vm.sock();
    let mode = std::fs::metadata(&vm.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket must be owner-only");

    let (code, body) = curl(s, "GET", "/", None);
    assert_eq!(
        (code, json(&body)["state"].clone()),
        (200, "Running".into())
    );
    let (code, body) = curl(s, "GET", "/balloon", None);
    assert_eq!(code, 200, "{body}");
    let b = json(&body);
    assert_eq!(
        (
            b["amount_mib"].clone(),
            b["deflate_on_oom"].clone(),
            b["stats_polling_interval_s"].clone()
        ),
        (0.into(), true.into(), 1.into())
    );

    // Firecracker's PATCH /balloon, then the statistics follow the driver.
    let (code, body) = curl(s, "PATCH", "/balloon", Some(r#"{"amount_mib": 128}"#));
    assert_eq!(code, 204, "{body}");
    wait_for("actual to reach 128 MiB", Duration::from_secs(60), || {
        let (_, body) = curl(s, "GET", "/balloon/statistics", None);
        json(&body)["actual_mib"] == 128
    });
    let (code, body) = curl(s, "GET", "/balloon/statistics", None);
    assert_eq!(code, 200);
    let st = json(&body);
    assert_eq!(
        (st["target_pages"].clone(), st["target_mib"].clone()),
        (32768.into(), 128.into())
    );
    assert!(
        st["total_memory"].as_u64() > Some(0),
        "the guest's statistics: {st}"
    );
    assert!(st["free_memory"].is_u64(), "{st}");

    let (code, _) = curl(
        s,
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 2}"#),
    );
    assert_eq!(code, 204);
    assert_eq!(
        json(&curl(s, "GET", "/balloon", None).1)["stats_polling_interval_s"],
        2
    );

    // Our own resources: the reclaim counters and the gather's settings.
    let (code, body) = curl(s, "GET", "/vm/reclaim", None);
    assert_eq!(code, 200);
    let r = json(&body);
    assert!(
        r["gather"]["pages_reclaimed"].as_u64() >= Some(32768),
        "{r}"
    );
    assert!(r["host_bytes_held"].as_u64() < Some(450 << 20), "{r}");
    assert!(r["kvm_remote_tlb_flush_requests"].is_u64(), "{r}");
    let (code, _) = curl(
        s,
        "PATCH",
        "/vm/reclaim/config",
        Some(r#"{"zap_span_gap": 32, "batch_window_ms": 20}"#),
    );
    assert_eq!(code, 204);
    let c = json(&curl(s, "GET", "/vm/reclaim/config", None).1);
    assert_eq!(
        (
            c["zap_span_gap"].clone(),
            c["batch_window_ms"].clone(),
            c["strategy"].clone()
        ),
        (32.into(), 20.into(), "gather".into())
    );

    // The same through `vmm balloon`.
    let r = cli(s, &["config"]);
    assert_eq!(r.status, Some(0), "{}", r.all());
    assert_eq!(json(&r.stdout)["amount_mib"], 128);
    let r = cli(s, &["stats"]);
    assert_eq!(json(&r.stdout)["actual_mib"], 128, "{}", r.all());
    let r = cli(s, &["reclaim"]);
    assert_eq!(json(&r.stdout)["actual_bytes"], 128u64 << 20, "{}", r.all());
    let r = cli(s, &["reclaim-config", "--zap-span-gap", "64"]);
    assert_eq!(json(&r.stdout)["zap_span_gap"], 64, "{}", r.all());
    let r = cli(s, &["polling", "1"]);
    assert_eq!(
        json(&r.stdout)["stats_polling_interval_s"],
        1,
        "{}",
        r.all()
    );
    let r = cli(s, &["set", "0"]);
    assert_eq!(r.status, Some(0), "{}", r.all());
    let out = vm.finish();
    assert!(
        out.contains("balloon: 2 targets reached") && out.contains("reuse errors 0"),
        "{out}"
    );
}

#[test]
fn bad_requests_get_their_status_and_a_fault_message_and_the_vm_keeps_serving() {
    require_kvm!("bad_requests_get_their_status_and_a_fault_message_and_the_vm_keeps_serving");
    let vm = Vm::start("api-bad", 1);
    let s = vm.sock();
    let fault = |(code, body): (u16, String)| -> (u16, String) {
        let f = json(&body)["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message in {body:?}"))
            .to_string();
        (code, f)
    };
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        ("GET", "/nowhere", None, 404, "no resource /nowhere"),
        ("DELETE", "/balloon", None, 405, "use GET, PATCH"),
        ("PUT", "/vm/reclaim", None, 405, "use GET"),
        (
            "PATCH",
            "/balloon",
            Some("not json"),
            400,
            "bad request body",
        ),
        (
            "PATCH",
            "/balloon",
            Some(r#"{"amount_mib": -5}"#),
            400,
            "bad request body",
        ),
        (
            "PATCH",
            "/balloon",
            Some(r#"{"amount_mib": 1, "x": 1}"#),
            400,
            "unknown field",
        ),
        (
            "PATCH",
            "/balloon",
            Some(r#"{"amount_mib": 1048576}"#),
            400,
            "exceeds the guest's RAM (512 MiB)",
        ),
        (
            "PATCH",
            "/balloon",
            Some(r#"{"amount_mib": 18446744073709551615}"#),
            400,
            "exceeds the guest's RAM",
        ),
        (
            "PATCH",
            "/balloon/statistics",
            Some(r#"{"stats_polling_interval_s": 100000}"#),
            400,
            "is above 65535",
        ),
        (
            "PATCH",
            "/vm/reclaim/config",
            Some(r#"{"strategy": "fast"}"#),
            400,
            "unknown strategy 'fast'",
        ),
        (
            "PATCH",
            "/vm/reclaim/config",
            Some(r#"{"batch_pages": 0}"#),
            400,
            "is not within 1..=",
        ),
        (
            "PATCH",
            "/vm/reclaim/config",
            Some(r#"{"batch_window_ms": 999999}"#),
            400,
            "is above 60000",
        ),
    ];
    for &(method, resource, body, status, needle) in cases {
        let (code, f) = fault(curl(s, method, resource, body));
        assert_eq!(code, status, "{method} {resource} {body:?}: {f}");
        assert!(f.contains(needle), "{method} {resource} {body:?}: {f}");
    }
    // A body over the limit.
    let big = format!(r#"{{"amount_mib": 1, "pad": "{}"}}"#, "x".repeat(10_000));
    let (code, f) = fault(curl(s, "PATCH", "/balloon", Some(&big)));
    assert_eq!(code, 413, "{f}");
    assert!(f.contains("larger than 4096 bytes"), "{f}");
    // Not HTTP at all: the HTTP library answers 400 (or closes), and nothing else happens.
    let answer = raw(s, b"this is not http\r\n\r\n");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer:?}"
    );
    // Statistics switched off are refused, as Firecracker does.
    curl(
        s,
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 0}"#),
    );
    let (code, f) = fault(curl(s, "GET", "/balloon/statistics", None));
    assert_eq!(code, 400, "{f}");
    assert!(f.contains("statistics are disabled"), "{f}");
    // `vmm balloon` says what the VM refused.
    let r = cli(s, &["set", "100000"]);
    assert_eq!(r.status, Some(2), "{}", r.all());
    assert!(r.stderr.contains("whole MiB"), "{}", r.all());
    let r = cli(s, &["set", "2G"]);
    assert_eq!(r.status, Some(2), "{}", r.all());
    assert!(
        r.stderr
            .contains("PATCH /balloon answered 400: amount_mib 2048 exceeds"),
        "{}",
        r.all()
    );
    // Still serving: a real change works.
    assert_eq!(curl(s, "GET", "/", None).0, 200);
    assert_eq!(
        curl(s, "PATCH", "/balloon", Some(r#"{"amount_mib": 64}"#)).0,
        204
    );
    vm.finish();
}

/// 200 connections opened and left idle delay nothing: a balloon change is answered and
/// followed, and the gather keeps closing its batches on its window (its batch count grows)
/// while they stay open. Connections over the bound are refused at once.
#[test]
fn idle_clients_delay_neither_the_api_nor_the_gather() {
    require_kvm!("idle_clients_delay_neither_the_api_nor_the_gather");
    let vm = Vm::start("api-idle", 2);
    let s = vm.sock();
    let api = vmm::api::ApiClient::new(&vm.sock).unwrap();
    let idle: Vec<UnixStream> = (0..200).map(|_| UnixStream::connect(s).unwrap()).collect();
    let batches = |api: &vmm::api::ApiClient| {
        api.reclaim().unwrap()["gather"]["batches"]
            .as_u64()
            .unwrap()
    };
    let before = batches(&api);
    // Generous bounds: these fail only if something waits on the idle clients (the old
    // server gave each 500 ms on the event loop: 100 s for 200).
    let t = Instant::now();
    api.set_balloon_mib(256).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "PATCH took {:?}",
        t.elapsed()
    );
    wait_for("actual to reach 256 MiB", Duration::from_secs(60), || {
        api.reclaim().unwrap()["actual_bytes"] == 256u64 << 20
    });
    let after = batches(&api);
    assert!(
        after > before,
        "the gather closed no batch while 200 clients sat idle ({before} -> {after})"
    );
    // Past the bound: answered 503 at once, without a request being read.
    let extra: Vec<UnixStream> = (0..vmm::api::MAX_CONNECTIONS)
        .filter_map(|_| UnixStream::connect(s).ok())
        .collect();
    let mut refused = UnixStream::connect(s).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = refused.read(&mut buf).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 503"), "{text:?}");
    assert!(text.contains("too many connections"), "{text:?}");
    drop(extra);
    drop(idle);
    wait_for("the API to serve again", Duration::from_secs(10), || {
        api.get("/").is_ok()
    });
    api.set_balloon_mib(0).unwrap();
    vm.finish();
}

#[test]
fn balloon_cli_without_a_vm_says_what_to_do() {
    let r = common::vmm(&["balloon", "--api-sock", "/nonexistent/vmm.sock", "stats"]);
    assert_eq!(r.status, Some(2), "{}", r.all());
    assert!(
        r.stderr.contains("is `vmm run --api-sock` running?"),
        "{}",
        r.all()
    );
}

#[test]
fn a_file_at_the_socket_path_is_never_replaced() {
    require_kvm!("a_file_at_the_socket_path_is_never_replaced");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("api-not-a-socket");
    std::fs::write(&path, b"precious").unwrap();
    let r = common::vmm(&[
        "run",
        "--guest",
        "memtouch",
        "--memory",
        "64M",
        "--api-sock",
        path.to_str().unwrap(),
    ]);
    assert_eq!(r.status, Some(2), "{}", r.all());
    assert!(
        r.stderr
            .contains("exists and is not a socket; refusing to replace it"),
        "{}",
        r.all()
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}
