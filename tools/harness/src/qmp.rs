//! A minimal QMP client (QEMU's JSON control protocol) for tests and benchmarks that drive
//! QEMU as a peer VMM. Starting QEMU and reporting its failures is `crate::qemu`'s job.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Reads QEMU's greeting on a connected QMP socket and enters command mode. Connect
    /// through [`crate::qemu::QemuProcess::connect_qmp`], which reports why QEMU died.
    pub fn handshake(stream: UnixStream) -> std::io::Result<Qmp> {
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
        if self.reader.read_line(&mut l)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "QEMU closed the QMP connection",
            ));
        }
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

    /// KVM statistic `name` in a `query-stats` reply, if QEMU reports it.
    pub fn stat(reply: &Value, name: &str) -> Option<u64> {
        reply
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| p["stats"].as_array().into_iter().flatten())
            .find_map(|s| (s["name"] == name).then(|| s["value"].as_u64()).flatten())
    }
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}
