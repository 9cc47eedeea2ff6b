//! A minimal QMP client ([`Qmp`]): commands and their replies, QEMU's asynchronous events
//! ([`QmpEvent`]) kept by a reader thread, HMP commands through `human-monitor-command`, and
//! parsers of the HMP output this crate reads (`xp`, `gpa2hva`).

use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long an ordinary QMP command may take.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of a QMP connection.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QEMU's QMP socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QEMU's QMP socket {path} did not greet: {why}")]
    Greeting { path: PathBuf, why: String },
    #[error("cannot send `{command}` to QEMU: {source}")]
    Send {
        command: String,
        source: std::io::Error,
    },
    #[error("QEMU refused `{command}`: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QEMU answered `{command}` with something unexpected: {what}")]
    Protocol { command: String, what: String },
    #[error("QEMU did not answer `{command}` within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("QEMU closed its QMP socket before answering `{command}` (did it exit?)")]
    Closed { command: String },
}

/// A QMP event, with QEMU's timestamp.
#[derive(Clone, Debug)]
pub struct QmpEvent {
    pub event: String,
    pub data: Value,
    /// QEMU's timestamp: seconds since the Unix epoch (µs resolution).
    pub timestamp: f64,
}

#[derive(Debug)]
enum ReaderMsg {
    Reply(Value),
    Bad(String),
}

/// A minimal QMP client: JSON lines over a unix socket. A reader thread ("qmp-reader") splits
/// what QEMU sends into replies and asynchronous events, so that events are kept even while no
/// command is outstanding.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    replies: mpsc::Receiver<ReaderMsg>,
    events: mpsc::Receiver<QmpEvent>,
    reader: Option<JoinHandle<()>>,
    greeting: Value,
    next_id: u64,
}

impl Qmp {
    /// Connects to the QMP socket at `path` (retrying while it does not exist yet and `alive`
    /// says QEMU still runs, up to `timeout`), reads the greeting and negotiates capabilities.
    pub fn connect(
        path: &Path,
        timeout: Duration,
        mut alive: impl FnMut() -> bool,
    ) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline
                        && alive() =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.into(),
                        source,
                    })
                }
            }
        };
        let greeting_err = |why: String| QmpError::Greeting {
            path: path.into(),
            why,
        };
        let read_half = stream
            .try_clone()
            .map_err(|e| greeting_err(e.to_string()))?;
        read_half
            .set_read_timeout(Some(timeout))
            .map_err(|e| greeting_err(e.to_string()))?;
        let mut reader = BufReader::new(read_half);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(|e| greeting_err(e.to_string()))?;
        let greeting: Value =
            serde_json::from_str(&line).map_err(|e| greeting_err(format!("{e}: {line:?}")))?;
        if greeting.get("QMP").is_none() {
            return Err(greeting_err(format!("not a QMP greeting: {line:?}")));
        }
        reader
            .get_ref()
            .set_read_timeout(None)
            .map_err(|e| greeting_err(e.to_string()))?;
        let (reply_tx, replies) = mpsc::channel();
        let (event_tx, events) = mpsc::channel();
        let reader = std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || read_qmp(reader, &reply_tx, &event_tx))
            .map_err(|e| greeting_err(format!("cannot start the reader thread: {e}")))?;
        let mut qmp = Self {
            stream,
            replies,
            events,
            reader: Some(reader),
            greeting,
            next_id: 1,
        };
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// QEMU's greeting (`{"QMP": {"version": ..., "capabilities": ...}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// QEMU's version from the greeting, e.g. `7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`.
    pub fn qemu_version(&self) -> String {
        let v = &self.greeting["QMP"]["version"];
        let n = |k: &str| v["qemu"][k].as_u64().unwrap_or(0);
        let package = v["package"].as_str().unwrap_or("").trim();
        let mut s = format!("{}.{}.{}", n("major"), n("minor"), n("micro"));
        if !package.is_empty() {
            s.push_str(&format!(" ({package})"));
        }
        s
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_within(command, arguments, COMMAND_TIMEOUT)
    }

    /// [`Qmp::execute`] with its own timeout (e.g. for `pmemsave` of a large guest).
    pub fn execute_within(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        (&self.stream)
            .write_all(line.as_bytes())
            .map_err(|source| QmpError::Send {
                command: command.into(),
                source,
            })?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = match self.replies.recv_timeout(left) {
                Ok(ReaderMsg::Reply(v)) => v,
                Ok(ReaderMsg::Bad(what)) => {
                    return Err(QmpError::Protocol {
                        command: command.into(),
                        what,
                    })
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(QmpError::Timeout {
                        command: command.into(),
                        after: timeout,
                    })
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(QmpError::Closed {
                        command: command.into(),
                    })
                }
            };
            if reply.get("id") != Some(&json!(id)) {
                continue; // the late answer to a command that timed out
            }
            if let Some(error) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.into(),
                    class: error["class"].as_str().unwrap_or("?").into(),
                    desc: error["desc"].as_str().unwrap_or("?").into(),
                });
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Runs an HMP command line through `human-monitor-command` and returns its output.
    pub fn hmp(&mut self, command_line: &str) -> Result<String, QmpError> {
        let out = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": command_line })),
        )?;
        out.as_str()
            .map(str::to_owned)
            .ok_or_else(|| QmpError::Protocol {
                command: format!("human-monitor-command {command_line}"),
                what: out.to_string(),
            })
    }

    /// Events received since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.try_iter().collect()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        // The reader thread sees end of file and ends.
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn read_qmp(
    reader: BufReader<UnixStream>,
    replies: &mpsc::Sender<ReaderMsg>,
    events: &mpsc::Sender<QmpEvent>,
) {
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let sent = match serde_json::from_str::<Value>(&line) {
            Ok(v) if v.get("event").is_some() => {
                let ts = &v["timestamp"];
                let timestamp = ts["seconds"].as_f64().unwrap_or(0.0)
                    + ts["microseconds"].as_f64().unwrap_or(0.0) / 1e6;
                events
                    .send(QmpEvent {
                        event: v["event"].as_str().unwrap_or("").into(),
                        data: v.get("data").cloned().unwrap_or(Value::Null),
                        timestamp,
                    })
                    .is_ok()
            }
            Ok(v) => replies.send(ReaderMsg::Reply(v)).is_ok(),
            Err(e) => replies
                .send(ReaderMsg::Bad(format!("{e}: {line:?}")))
                .is_ok(),
        };
        if !sent {
            break;
        }
    }
}

/// Parses the values of HMP `xp /Ngx` output (`0000000000102040: 0x0000000000000001 0x...`).
pub(super) fn parse_xp(out: &str) -> Option<Vec<u64>> {
    let mut values = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let (_, rest) = line.split_once(':')?;
        for word in rest.split_whitespace() {
            values.push(u64::from_str_radix(word.strip_prefix("0x")?, 16).ok()?);
        }
    }
    Some(values)
}

/// Parses HMP `gpa2hva` output (`Host virtual address for 0x102000 (pc.ram) is 0x7f...`).
pub(super) fn parse_gpa2hva(out: &str) -> Option<u64> {
    let (_, hva) = out.trim().rsplit_once(" is 0x")?;
    u64::from_str_radix(hva, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xp_output_parses() {
        let out = "0000000000102040: 0x0000000000000001 0x00000000002aa48e\r\n";
        assert_eq!(parse_xp(out), Some(vec![1, 0x2aa48e]));
        let two_lines = "0000000000102040: 0x0000000000000002 0x0000000000000003\r\n\
                         0000000000102050: 0x0000000000000004 0x0000000000000005\r\n";
        assert_eq!(parse_xp(two_lines), Some(vec![2, 3, 4, 5]));
        assert_eq!(parse_xp("Cannot access memory\r\n"), None);
    }
    #[test]
    fn gpa2hva_output_parses() {
        let out = "Host virtual address for 0x102048 (pc.ram) is 0x7f8a1ff02048\r\n";
        assert_eq!(parse_gpa2hva(out), Some(0x7f8a_1ff0_2048));
        assert_eq!(
            parse_gpa2hva("No memory is mapped at address 0x0\r\n"),
            None
        );
    }
}
