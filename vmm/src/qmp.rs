//! QEMU as a peer VMM for tests and benchmarks: the microvm command line our guests boot
//! under, and a minimal QMP client (QEMU's JSON control protocol).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// QEMU arguments for booting the project's guests: microvm with KVM, one vCPU (the PVH
/// entry starts only the boot vCPU), serial on stdio, the exit port as isa-debug-exit, and
/// modern virtio-mmio. Add devices, then `-kernel` and `-append`.
pub fn microvm_args(memory: &str) -> Vec<String> {
    [
        "-M",
        "microvm,x-option-roms=off,rtc=off",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        memory,
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=1",
        "-global",
        "virtio-mmio.force-legacy=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying while QEMU starts), reads the greeting, enters command mode.
    pub fn connect(path: &Path, timeout: Duration) -> std::io::Result<Qmp> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(e),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = q.line()?;
        if greeting.get("QMP").is_none() {
            return Err(invalid(format!("not a QMP greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> std::io::Result<Value> {
        let mut l = String::new();
        self.reader.read_line(&mut l)?;
        serde_json::from_str(&l).map_err(|e| invalid(format!("bad QMP line {l:?}: {e}")))
    }

    /// Runs a command and returns its `return` value, skipping asynchronous events.
    pub fn execute(&mut self, command: &str, arguments: Value) -> std::io::Result<Value> {
        let mut s = json!({ "execute": command, "arguments": arguments }).to_string();
        s.push('\n');
        self.writer.write_all(s.as_bytes())?;
        loop {
            let v = self.line()?;
            if v.get("event").is_some() {
                continue;
            }
            return match v.get("return") {
                Some(r) => Ok(r.clone()),
                None => Err(invalid(format!("QMP {command} failed: {v}"))),
            };
        }
    }

    /// KVM's VM-wide statistic `name` through `query-stats`, if QEMU reports it.
    pub fn kvm_vm_stat(&mut self, name: &str) -> std::io::Result<Option<u64>> {
        let r = self.execute("query-stats", json!({ "target": "vm" }))?;
        Ok(r.as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| p["stats"].as_array().into_iter().flatten())
            .find_map(|s| (s["name"] == name).then(|| s["value"].as_u64()).flatten()))
    }
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}
