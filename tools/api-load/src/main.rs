//! api-load: the control API under concurrent clients, with and without a guest inflating.
//!
//! For each client count it boots the balloon guest with a control socket and measures, in one
//! run: an inflate with no API load (its reclaim time: PATCH /balloon until `actual` reaches
//! the target); then N client threads each sending R requests (`GET /balloon/statistics`, one
//! connection per request, as `curl` does) — throughput, p50 and p99 latency; then the same load
//! while the same inflate runs, and that inflate's reclaim time. Prints a Markdown table.

use anyhow::{anyhow, bail, Result};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmm::api::ApiClient;
use vmm::config::parse_size;
use vmm_harness::VmmRun;

/// Load the control API with concurrent clients and measure its latency and the inflate's.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The vmm binary.
    #[arg(long, default_value = "target/release/vmm")]
    vmm: PathBuf,
    /// Concurrent client counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "8,64")]
    clients: Vec<usize>,
    /// Requests per client.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Guest RAM.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    memory: u64,
    /// vCPUs (vCPU 0 drives the balloon, the others verify memory).
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// The inflate measured with and without load (whole MiB).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    inflate: u64,
}

struct Load {
    requests: usize,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

/// `clients` threads, each sending `requests` GET /balloon/statistics.
fn load(sock: &Path, clients: usize, requests: usize) -> Load {
    let t0 = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let sock = sock.to_path_buf();
            std::thread::spawn(move || {
                let api = ApiClient::new(&sock).expect("client");
                let mut lat = Vec::with_capacity(requests);
                let mut errors = 0;
                for _ in 0..requests {
                    let t = Instant::now();
                    match api.statistics() {
                        Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in threads {
        let (l, e) = t.join().expect("client thread");
        all.extend(l);
        errors += e;
    }
    let seconds = t0.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    Load {
        requests: all.len(),
        seconds,
        p50_ms: percentile(&all, 50.0),
        p99_ms: percentile(&all, 99.0),
        errors,
    }
}

/// Sets the balloon and returns how long until `actual` reached it.
fn inflate_to(api: &ApiClient, bytes: u64) -> Result<f64> {
    let t = Instant::now();
    api.set_balloon_mib(bytes >> 20)?;
    while api.reclaim()?.actual_bytes != bytes {
        if t.elapsed() > Duration::from_secs(300) {
            bail!("the balloon never reached {bytes} bytes");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let a = Args::parse();
    if !a.inflate.is_multiple_of(1 << 20) {
        bail!("--inflate must be whole MiB");
    }
    if !a.vmm.is_file() {
        bail!("cannot start {}: no such file", a.vmm.display());
    }
    println!(
        "command: api-load --clients {} --requests {} --memory {}M --vcpus {} --inflate {}M (GET /balloon/statistics, one connection per request)\n",
        a.clients.iter().map(usize::to_string).collect::<Vec<_>>().join(","),
        a.requests,
        a.memory >> 20,
        a.vcpus,
        a.inflate >> 20
    );
    println!(
        "| clients | guest | requests | throughput req/s | p50 ms | p99 ms | errors | inflate s |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for &clients in &a.clients {
        let (dir, sock) = vmm_harness::run::temp_api_sock("api-load")?;
        let mut vm = VmmRun::guest(&a.vmm, "balloon")
            .vcpus(a.vcpus)
            .memory(a.memory.to_string())
            .api_sock(&sock)
            .cmdline("changes=4")
            .spawn();
        // Only the first line: why (the VM ended, or timed out), not all its output.
        let first_line = |e: String| anyhow!("{}", e.lines().next().unwrap_or_default());
        vm.wait_until(Duration::from_secs(30), "the control socket", |_| {
            sock.exists()
        })
        .map_err(first_line)?;
        let api = ApiClient::new(&sock)?;
        let mut ready = Ok(false);
        vm.wait_until(
            Duration::from_secs(120),
            "the balloon driver's first statistics",
            |_| {
                ready = api.reclaim().map(|r| r.guest.updates > 0);
                !matches!(ready, Ok(false))
            },
        )
        .map_err(first_line)?;
        ready?;
        let alone = inflate_to(&api, a.inflate)?;
        inflate_to(&api, 0)?;
        let idle = load(&sock, clients, a.requests);
        let busy = {
            let sock2 = sock.clone();
            let (clients, requests) = (clients, a.requests);
            let loader = std::thread::spawn(move || load(&sock2, clients, requests));
            std::thread::sleep(Duration::from_millis(200));
            let under_load = inflate_to(&api, a.inflate)?;
            (loader.join().expect("load"), under_load)
        };
        inflate_to(&api, 0)?;
        // The guest finishes by itself after its fourth change.
        let end = vm.finish(Duration::from_secs(120));
        if end.timed_out {
            bail!(
                "the guest did not finish after its last change:\n{}",
                end.all()
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
        for (guest, l, inflate) in [
            ("idle (inflate alone)", &idle, alone),
            ("inflating", &busy.0, busy.1),
        ] {
            println!(
                "| {clients} | {guest} | {} | {:.0} | {:.2} | {:.2} | {} | {:.3} |",
                l.requests,
                l.requests as f64 / l.seconds,
                l.p50_ms,
                l.p99_ms,
                l.errors,
                inflate
            );
        }
    }
    Ok(())
}
