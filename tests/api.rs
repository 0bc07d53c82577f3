//! The control API against a running VM, over HTTP/1.1 on its Unix socket: every endpoint
//! through curl and through `vmm balloon`; malformed requests, unknown paths and methods,
//! oversized bodies and out-of-range values each get their status and a fault message while
//! the VM keeps serving; and idle clients delay nothing: with 200 connections held open a
//! balloon change is answered and followed, and the gather keeps closing its batches.

mod common;

use common::{scratch, vmm_guest, Need, RUN_LIMIT};
use guest_mm::reclaim::{ReclaimConfig, Strategy};
use serde::de::DeserializeOwned;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vmm::api::routes::{BalloonConfig, VmInfo};
use vmm::devices::balloon::BalloonStatistics;
use vmm::report::BalloonReport;
use vmm_harness::{Finished, RunningVm};

/// A VM running the balloon guest with a control socket (removed when the VM ends).
fn start(name: &str, changes: u32) -> (RunningVm, PathBuf) {
    let sock = scratch(&format!("{name}.sock"));
    let mut vm = vmm_guest("balloon")
        .vcpus(2)
        .memory("512M")
        .api_sock(&sock)
        .cmdline(format!("changes={changes} touch=8M"))
        .spawn();
    // Returns once the socket exists.
    vm.api();
    (vm, sock)
}

/// The guest ends by itself after its last change; it must pass and take its socket along.
fn finish(vm: RunningVm, sock: &Path) -> Finished {
    let r = vm.finish(Duration::from_secs(90));
    assert_eq!(r.status, Some(0), "{}", r.all());
    assert!(!sock.exists(), "the socket is removed when the VM ends");
    r
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// curl over the socket: (status, body). curl comes with ./setup.sh.
fn curl(sock: &Path, method: &str, resource: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--unix-socket"])
        .arg(sock)
        .args(["-X", method])
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
    let code = code
        .trim()
        .parse()
        .ok()
        .filter(|&c| c != 0)
        .unwrap_or_else(|| {
            panic!(
                "curl {method} {resource} got no answer: {}{text:?}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (code, body.to_string())
}

/// A body read as the type the VMM answers with.
fn typed<T: DeserializeOwned>(body: &str) -> T {
    serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("not a {} ({e}): {body:?}", std::any::type_name::<T>()))
}

/// `GET resource` through curl, which must answer 200 with a `T`.
fn curl_get<T: DeserializeOwned>(sock: &Path, resource: &str) -> T {
    let (code, body) = curl(sock, "GET", resource, None);
    assert_eq!(code, 200, "GET {resource}: {body}");
    typed(&body)
}

/// `vmm balloon --api-sock SOCK ARGS...`: a client of the control socket, not a `vmm run`.
fn cli(sock: &Path, args: &[&str]) -> Finished {
    let mut cmd = Command::new(common::VMM);
    cmd.arg("balloon").arg("--api-sock").arg(sock).args(args);
    RunningVm::spawn_command(cmd).finish(RUN_LIMIT)
}

/// `vmm balloon` that must succeed, its output read as `T`.
fn cli_ok<T: DeserializeOwned>(sock: &Path, args: &[&str]) -> T {
    let r = cli(sock, args);
    assert_eq!(r.status, Some(0), "vmm balloon {args:?}\n{}", r.all());
    typed(&r.stdout())
}

/// Raw bytes to the socket, the answer back: everything the server sends until it closes
/// the connection (or 5 s pass).
fn raw(sock: &Path, bytes: &[u8]) -> String {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = c.write_all(bytes);
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).to_string()
}

#[test]
fn every_endpoint_answers_through_curl_and_vmm_balloon() {
    require!(
        "every_endpoint_answers_through_curl_and_vmm_balloon",
        Need::Kvm
    );
    let (vm, s) = start("api-endpoints", 2);
    let s = s.as_path();
    let mode = std::fs::metadata(s).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket must be owner-only");

    assert_eq!(curl_get::<VmInfo>(s, "/").state, "Running");
    assert_eq!(
        curl_get::<BalloonConfig>(s, "/balloon"),
        BalloonConfig {
            amount_mib: 0,
            deflate_on_oom: true,
            stats_polling_interval_s: 1,
            free_page_reporting: true,
            free_page_hinting: false,
        }
    );

    // Firecracker's PATCH /balloon, then the statistics follow the driver.
    let (code, body) = curl(s, "PATCH", "/balloon", Some(r#"{"amount_mib": 128}"#));
    assert_eq!(code, 204, "{body}");
    wait_for("actual to reach 128 MiB", Duration::from_secs(60), || {
        curl_get::<BalloonStatistics>(s, "/balloon/statistics").actual_mib == 128
    });
    let st: BalloonStatistics = curl_get(s, "/balloon/statistics");
    assert_eq!((st.target_pages, st.target_mib), (32768, 128), "{st:#?}");
    assert!(
        st.values.total_memory.is_some_and(|m| m > 0),
        "the guest's statistics: {st:#?}"
    );
    assert!(st.values.free_memory.is_some(), "{st:#?}");

    let (code, _) = curl(
        s,
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 2}"#),
    );
    assert_eq!(code, 204);
    assert_eq!(
        curl_get::<BalloonConfig>(s, "/balloon").stats_polling_interval_s,
        2
    );

    // Our own resources: the reclaim counters and the gather's settings. The driver's
    // `actual` follows the acknowledgements, and a batch's frames reach the host on the
    // `reclaim` worker after that, within the batch window (40 ms).
    let start = Instant::now();
    let r = loop {
        let r: BalloonReport = curl_get(s, "/vm/reclaim");
        if r.gather.pages_reclaimed >= 32768 || start.elapsed() > Duration::from_secs(10) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        r.gather.pages_reclaimed >= 32768,
        "the gather did not reclaim the 128 MiB within 10 s: {r:#?}"
    );
    assert!(r.host_bytes_held < 450 << 20, "{r:#?}");
    assert!(r.kvm_remote_tlb_flush_requests.is_some(), "{r:#?}");
    let (code, _) = curl(
        s,
        "PATCH",
        "/vm/reclaim/config",
        Some(r#"{"zap_span_gap": 32, "batch_window_ms": 20}"#),
    );
    assert_eq!(code, 204);
    assert_eq!(
        curl_get::<ReclaimConfig>(s, "/vm/reclaim/config"),
        ReclaimConfig {
            zap_span_gap: 32,
            batch_window_ms: 20,
            ..ReclaimConfig::with_strategy(Strategy::Gather)
        }
    );

    // The same through `vmm balloon`.
    assert_eq!(cli_ok::<BalloonConfig>(s, &["config"]).amount_mib, 128);
    assert_eq!(cli_ok::<BalloonStatistics>(s, &["stats"]).actual_mib, 128);
    assert_eq!(
        cli_ok::<BalloonReport>(s, &["reclaim"]).actual_bytes,
        128u64 << 20
    );
    assert_eq!(
        cli_ok::<ReclaimConfig>(s, &["reclaim-config", "--set", "zap_span_gap=64"]).zap_span_gap,
        64
    );
    assert_eq!(
        cli_ok::<BalloonConfig>(s, &["polling", "1"]).stats_polling_interval_s,
        1
    );
    let r = cli(s, &["set", "0"]);
    assert_eq!(r.status, Some(0), "{}", r.all());
    let out = finish(vm, s);
    out.assert_stdout_has(&["balloon: 2 targets reached", "reuse errors 0"]);
}

#[test]
fn bad_requests_get_their_status_and_a_fault_message_and_the_vm_keeps_serving() {
    require!(
        "bad_requests_get_their_status_and_a_fault_message_and_the_vm_keeps_serving",
        Need::Kvm
    );
    let (vm, s) = start("api-bad", 1);
    let s = s.as_path();
    // Tests of raw HTTP: the fault body is read as JSON, the one thing it promises.
    let fault = |(code, body): (u16, String)| -> (u16, String) {
        let v: serde_json::Value = typed(&body);
        let f = v["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message in {body:?}"))
            .to_string();
        (code, f)
    };
    // Method or resource refused: method, resource, status, fault message.
    let refused: &[(&str, &str, u16, &str)] = &[
        ("GET", "/nowhere", 404, "no resource /nowhere"),
        ("DELETE", "/balloon", 405, "use GET, PUT, PATCH"),
        ("PUT", "/vm/reclaim", 405, "use GET"),
        ("PUT", "/balloon", 400, "configured on the command line"),
        // Hinting endpoints on a VM started without --balloon-free-page-hinting.
        (
            "PATCH",
            "/balloon/hinting/start",
            400,
            "--balloon-free-page-hinting",
        ),
        ("GET", "/balloon/hinting/status", 400, "not enabled"),
        ("PATCH", "/balloon/hinting/stop", 400, "not enabled"),
    ];
    // PATCH bodies refused as 400 Bad Request: resource, body, fault message.
    let bad_bodies: &[(&str, &str, &str)] = &[
        ("/balloon", "not json", "bad request body"),
        // JSON that is not an object is never read as the object's fields in order.
        ("/balloon", "[512]", "expected a JSON object, got an array"),
        (
            "/balloon/statistics",
            "5",
            "expected a JSON object, got a number",
        ),
        (
            "/vm/reclaim/config",
            "[1]",
            "expected a JSON object, got an array",
        ),
        (
            "/vm/reclaim/config",
            "null",
            "expected a JSON object, got null",
        ),
        ("/balloon", r#"{"amount_mib": -5}"#, "bad request body"),
        ("/balloon", r#"{"amount_mib": 1, "x": 1}"#, "unknown field"),
        (
            "/balloon",
            r#"{"amount_mib": 1048576}"#,
            "exceeds the guest's RAM (512 MiB)",
        ),
        (
            "/balloon",
            r#"{"amount_mib": 18446744073709551615}"#,
            "exceeds the guest's RAM",
        ),
        (
            "/balloon/statistics",
            r#"{"stats_polling_interval_s": 100000}"#,
            "is above 65535",
        ),
        (
            "/vm/reclaim/config",
            r#"{"strategy": "fast"}"#,
            "unknown variant `fast`, expected one of `per-page`, `per-buffer`, `gather`",
        ),
        (
            "/vm/reclaim/config",
            r#"{"batch_pages": 0}"#,
            "is not within 1..=",
        ),
        (
            "/vm/reclaim/config",
            r#"{"batch_window_ms": 999999}"#,
            "is above 60000",
        ),
    ];
    let cases = refused
        .iter()
        .map(|&(method, resource, status, needle)| (method, resource, None, status, needle))
        .chain(
            bad_bodies
                .iter()
                .map(|&(resource, body, needle)| ("PATCH", resource, Some(body), 400, needle)),
        );
    for (method, resource, body, status, needle) in cases {
        let (code, f) = fault(curl(s, method, resource, body));
        assert_eq!(code, status, "{method} {resource} {body:?}: {f}");
        assert!(f.contains(needle), "{method} {resource} {body:?}: {f}");
    }
    // None of the refused arrays changed anything.
    assert_eq!(curl_get::<BalloonConfig>(s, "/balloon").amount_mib, 0);
    // A 405 names the allowed methods in `Allow` (RFC 9110 §15.5.6).
    let answer = raw(
        s,
        b"DELETE /balloon HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer:?}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nallow: get, put, patch\r\n"),
        "{answer:?}"
    );
    // A body over the limit.
    let big = format!(r#"{{"amount_mib": 1, "pad": "{}"}}"#, "x".repeat(10_000));
    let (code, f) = fault(curl(s, "PATCH", "/balloon", Some(&big)));
    assert_eq!(code, 413, "{f}");
    assert!(f.contains("larger than 4096 bytes"), "{f}");
    // Not HTTP at all: the HTTP library answers 400 Bad Request and closes the connection;
    // nothing else happens, and the VM goes on serving.
    let answer = raw(s, b"this is not http\r\n\r\n");
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer:?}"
    );
    assert_eq!(curl_get::<VmInfo>(s, "/").state, "Running");
    // Statistics switched off are refused, as Firecracker does.
    let (code, _) = curl(
        s,
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 0}"#),
    );
    assert_eq!(code, 204);
    let (code, f) = fault(curl(s, "GET", "/balloon/statistics", None));
    assert_eq!(code, 400, "{f}");
    assert!(f.contains("statistics are disabled"), "{f}");
    // `vmm balloon` says what the VM refused.
    let r = cli(s, &["set", "100000"]);
    assert_eq!(r.status, Some(2), "{}", r.all());
    r.assert_stderr_has(&["whole MiB"]);
    let r = cli(s, &["set", "2G"]);
    assert_eq!(r.status, Some(2), "{}", r.all());
    r.assert_stderr_has(&["PATCH /balloon answered 400: amount_mib 2048 exceeds"]);
    // Still serving: a real change works.
    assert_eq!(curl(s, "GET", "/", None).0, 200);
    assert_eq!(
        curl(s, "PATCH", "/balloon", Some(r#"{"amount_mib": 64}"#)).0,
        204
    );
    finish(vm, s);
}

/// 200 connections opened and left idle delay nothing: a balloon change is answered and
/// followed, and the gather keeps closing its batches on its window (its batch count grows)
/// while they stay open. Connections over the bound are refused at once.
#[test]
fn idle_clients_delay_neither_the_api_nor_the_gather() {
    require!(
        "idle_clients_delay_neither_the_api_nor_the_gather",
        Need::Kvm
    );
    let (mut vm, s) = start("api-idle", 2);
    let api = vm.api();
    let idle: Vec<UnixStream> = (0..200).map(|_| UnixStream::connect(&s).unwrap()).collect();
    let batches = |api: &vmm::api::ApiClient| api.reclaim().unwrap().gather.batches;
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
        api.reclaim().unwrap().actual_bytes == 256u64 << 20
    });
    let after = batches(&api);
    assert!(
        after > before,
        "the gather closed no batch while 200 clients sat idle ({before} -> {after})"
    );
    // Past the bound: answered 503 (a client that sends nothing gets it after 1 s).
    let extra: Vec<UnixStream> = (0..vmm::api::MAX_CONNECTIONS)
        .filter_map(|_| UnixStream::connect(&s).ok())
        .collect();
    let mut refused = UnixStream::connect(&s).unwrap();
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
    finish(vm, &s);
}

#[test]
fn balloon_cli_without_a_vm_says_what_to_do() {
    let r = cli(Path::new("/nonexistent/vmm.sock"), &["stats"]);
    assert_eq!(r.status, Some(2), "{}", r.all());
    r.assert_stderr_has(&["is `vmm run --api-sock` running?"]);
}

#[test]
fn a_file_at_the_socket_path_is_never_replaced() {
    require!("a_file_at_the_socket_path_is_never_replaced", Need::Kvm);
    let path = scratch("api-not-a-socket");
    std::fs::write(&path, b"precious").unwrap();
    let r = vmm_guest("memtouch")
        .memory("64M")
        .api_sock(&path)
        .run(RUN_LIMIT);
    assert_eq!(r.status, Some(2), "{}", r.all());
    r.assert_stderr_has(&["exists and is not a socket; refusing to replace it"]);
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

/// A second VMM given a live socket's path refuses to start and leaves it alone; a VMM whose
/// socket was replaced at its path does not remove the replacement when it exits.
#[test]
fn a_live_socket_is_never_taken_and_an_exiting_vmm_removes_only_its_own() {
    require!(
        "a_live_socket_is_never_taken_and_an_exiting_vmm_removes_only_its_own",
        Need::Kvm
    );
    let (vm, s) = start("api-owner", 1);
    let r = vmm_guest("memtouch")
        .memory("64M")
        .api_sock(&s)
        .run(RUN_LIMIT);
    assert_eq!(r.status, Some(2), "{}", r.all());
    r.assert_stderr_has(&["is the live control socket of another process"]);
    assert_eq!(curl_get::<VmInfo>(&s, "/").state, "Running", "still served");

    // Another process's socket now sits at the path; the VM is reached where it was moved.
    let moved = scratch("api-owner-moved.sock");
    std::fs::rename(&s, &moved).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&s).unwrap();
    let (code, body) = curl(&moved, "PATCH", "/balloon", Some(r#"{"amount_mib": 16}"#));
    assert_eq!(code, 204, "{body}");
    let r = vm.finish(Duration::from_secs(90));
    assert_eq!(r.status, Some(0), "{}", r.all());
    assert!(
        s.exists(),
        "the exiting VMM removed a socket that was not its own"
    );
    r.assert_stderr_has(&["is no longer this VMM's socket; left in place"]);
    drop(other);
    let _ = std::fs::remove_file(&s);
    let _ = std::fs::remove_file(&moved);
}

/// A client that pipelines requests and never reads the answers loses its connection (and
/// so its slot) within the idle limit; the API keeps serving others meanwhile.
#[test]
fn a_client_that_never_reads_loses_its_connection_within_the_idle_limit() {
    require!(
        "a_client_that_never_reads_loses_its_connection_within_the_idle_limit",
        Need::Kvm
    );
    let (vm, s) = start("api-pipeline", 1);
    let mut c = UnixStream::connect(&s).unwrap();
    c.set_nonblocking(true).unwrap();
    // About 10 MB of answers asked for: far more than the socket buffers hold.
    let requests = b"GET /vm/reclaim HTTP/1.1\r\nhost: x\r\n\r\n".repeat(4000);
    let started = Instant::now();
    let mut sent = 0;
    while sent < requests.len() && started.elapsed() < Duration::from_secs(2) {
        match c.write(&requests[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(_) => break,
        }
    }
    let limit = vmm::api::REQUEST_TIMEOUT + Duration::from_secs(5);
    let closed = loop {
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&c),
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd; events 0 still reports hang-up and error.
        unsafe { libc::poll(&mut p, 1, 100) };
        if p.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "the server still holds a connection whose client has read nothing for {:?}",
            started.elapsed()
        );
        if started.elapsed() > Duration::from_secs(3) {
            assert_eq!(curl(&s, "GET", "/", None).0, 200, "others are served");
        }
    };
    assert!(
        closed >= vmm::api::REQUEST_TIMEOUT / 2,
        "closed after {closed:?}"
    );
    assert_eq!(
        curl(&s, "PATCH", "/balloon", Some(r#"{"amount_mib": 16}"#)).0,
        204
    );
    finish(vm, &s);
}

/// Over the connection bound, every client reads its 503 and the reason (the refused
/// connection's request is read before the answer, so the client never sees a reset).
#[test]
fn over_the_connection_bound_every_client_reads_its_503() {
    require!(
        "over_the_connection_bound_every_client_reads_its_503",
        Need::Kvm
    );
    let (vm, s) = start("api-503", 1);
    let held: Vec<UnixStream> = (0..vmm::api::MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&s).unwrap())
        .collect();
    // Each of these either gets its 503 or fails the test (curl's "Couldn't connect").
    for _ in 0..10 {
        let (code, body) = curl(&s, "GET", "/", None);
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("too many connections"), "{body}");
    }
    for _ in 0..3 {
        let r = cli(&s, &["config"]);
        assert_eq!(r.status, Some(2), "{}", r.all());
        r.assert_stderr_has(&["answered 503: too many connections"]);
    }
    drop(held);
    let api = vmm::api::ApiClient::new(&s).unwrap();
    wait_for("the API to serve again", Duration::from_secs(10), || {
        api.get("/").is_ok()
    });
    api.set_balloon_mib(16).unwrap();
    finish(vm, &s);
}

/// A request head that does not arrive within the deadline gets 408, then the connection
/// closes.
#[test]
fn a_late_request_head_gets_408() {
    require!("a_late_request_head_gets_408", Need::Kvm);
    let (vm, s) = start("api-408", 1);
    let mut c = UnixStream::connect(&s).unwrap();
    c.set_read_timeout(Some(vmm::api::REQUEST_TIMEOUT * 2))
        .unwrap();
    let started = Instant::now();
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").unwrap(); // no blank line: unfinished
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    assert!(answer.contains("did not arrive in time"), "{answer:?}");
    assert!(started.elapsed() >= vmm::api::REQUEST_TIMEOUT - Duration::from_secs(1));
    assert_eq!(
        curl(&s, "PATCH", "/balloon", Some(r#"{"amount_mib": 16}"#)).0,
        204
    );
    finish(vm, &s);
}

/// While `--balloon-steps` has steps left, `PATCH /balloon` is refused with 409 (it would
/// override the step, which would then wait out its timeout); afterwards it is taken.
#[test]
fn a_balloon_patch_during_balloon_steps_is_refused_until_the_last_step() {
    require!(
        "a_balloon_patch_during_balloon_steps_is_refused_until_the_last_step",
        Need::Kvm
    );
    let s = scratch("api-steps.sock");
    let mut vm = vmm_guest("balloon")
        .vcpus(2)
        .memory("512M")
        .api_sock(&s)
        .balloon_steps(&["64M", "0"])
        .cmdline("changes=3 touch=8M")
        .spawn();
    vm.api();
    let patch = || curl(&s, "PATCH", "/balloon", Some(r#"{"amount_mib": 32}"#));
    let (code, body) = patch();
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("--balloon-steps"), "{body}");
    let started = Instant::now();
    loop {
        let (code, body) = patch();
        if code == 204 {
            break;
        }
        assert_eq!(code, 409, "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "still refused after 90 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = finish(vm, &s);
    r.assert_stderr_has(&["balloon step 1 reached", "balloon step 2 reached"]);
    r.assert_stdout_has(&["balloon: 3 targets reached"]);
}
