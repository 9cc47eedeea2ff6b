//! The control socket: a QMP-style JSON protocol on a Unix socket, one JSON object per line.
//!
//! ```text
//! server: {"tsubame":{"version":"0.1.0","commands":["query-status",...]}}     (greeting)
//! client: {"execute":"query-status","id":1}
//! server: {"return":{"status":"running",...},"id":1}
//! client: {"execute":"save","arguments":{"path":"/tmp/vm.snap"}}
//! server: {"error":{"class":"GenericError","desc":"..."}}
//! ```
//!
//! Commands are served by a [`CommandHandler`]; [`VmCommands`] serves a [`Vm`]'s commands
//! (listed in [`VM_COMMANDS`]). The accept loop is a mio loop with a waker so that
//! [`ControlServer::stop`] ends it promptly; each client gets its own thread, because some
//! commands (`wait`) block until the guest reaches a point.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::net::UnixListener;
use mio::{Events, Interest, Poll, Token, Waker};
use serde_json::{json, Value};

use crate::vm::{Vm, WaitOutcome};

/// Errors of the control server.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path} is in use by a running process; pick another --control path or stop that VM")]
    InUse { path: PathBuf },
    #[error("cannot serve a control socket at {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control server setup failed: {0}")]
    Poll(std::io::Error),
}

/// A failed command, as the protocol reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    /// QMP error class: `CommandNotFound`, `InvalidArgument` or `GenericError`.
    pub class: &'static str,
    pub desc: String,
}

impl CommandError {
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: "GenericError",
            desc: desc.into(),
        }
    }
    pub fn invalid(desc: impl Into<String>) -> Self {
        Self {
            class: "InvalidArgument",
            desc: desc.into(),
        }
    }
}

/// Serves commands. Implementations must be cheap to call from several client threads.
pub trait CommandHandler: Send + Sync {
    /// Names of the commands served, for the greeting and `query-commands`.
    fn commands(&self) -> Vec<&'static str>;
    /// Runs `command` with `args` (a JSON object, empty if none were given).
    fn execute(&self, command: &str, args: &Value) -> Result<Value, CommandError>;
    /// Called once the reply to a successful `command` has been written: what must not
    /// happen before the client has its answer (`quit` ending the process) goes here.
    fn after_reply(&self, command: &str) {
        let _ = command;
    }
}

/// A running control server; stops and removes its socket on drop.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);

impl ControlServer {
    /// Serves `handler` on a Unix socket at `path`. A stale socket file (no process listening)
    /// is replaced; a live one is an error.
    pub fn start(path: &Path, handler: Arc<dyn CommandHandler>) -> Result<Self, ControlError> {
        if path.exists() {
            if StdUnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse { path: path.into() });
            }
            let _ = std::fs::remove_file(path);
        }
        let mut listener = UnixListener::bind(path).map_err(|source| ControlError::Bind {
            path: path.into(),
            source,
        })?;
        let mut poll = Poll::new().map_err(ControlError::Poll)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(ControlError::Poll)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(ControlError::Poll)?);
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(&mut poll, &listener, &handler))
            .map_err(ControlError::Poll)?;
        Ok(Self {
            path: path.into(),
            waker,
            thread: Some(thread),
        })
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting clients and removes the socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.waker.wake();
            let _ = t.join();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(poll: &mut Poll, listener: &UnixListener, handler: &Arc<dyn CommandHandler>) {
    let mut events = Events::with_capacity(16);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("control socket poll failed: {e}; the control socket stops");
            return;
        }
        for event in &events {
            match event.token() {
                WAKER => return,
                LISTENER => loop {
                    match listener.accept() {
                        Ok((stream, _)) => spawn_client(stream, handler.clone()),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            log::warn!("control socket accept failed: {e}");
                            break;
                        }
                    }
                },
                _ => {}
            }
        }
    }
}

fn spawn_client(stream: mio::net::UnixStream, handler: Arc<dyn CommandHandler>) {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: into_raw_fd hands over sole ownership of a valid, open socket fd.
    let stream = unsafe { StdUnixStream::from_raw_fd(stream.into_raw_fd()) };
    if stream.set_nonblocking(false).is_err() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("control-client".into())
        .spawn(move || {
            if let Err(e) = serve_client(&stream, handler.as_ref()) {
                log::debug!("control client ended: {e}");
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start a control client thread: {e}");
    }
}

/// Longest request line accepted; a client that sends more is cut off.
const MAX_REQUEST: usize = 1 << 20;

fn serve_client(stream: &StdUnixStream, handler: &dyn CommandHandler) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let greeting =
        json!({"tsubame": {"version": env!("CARGO_PKG_VERSION"), "commands": handler.commands()}});
    send_line(&mut out, &greeting)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_REQUEST as u64)
            .read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n >= MAX_REQUEST {
            let e =
                json!({"error": {"class": "GenericError", "desc": "request longer than 1 MiB"}});
            send_line(&mut out, &e)?;
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let reply = handle_line(line.trim(), handler);
        send_line(&mut out, &reply)?;
        if reply.get("return").is_some() {
            let req: Value = serde_json::from_str(line.trim()).unwrap_or_default();
            if let Some(cmd) = req.get("execute").and_then(Value::as_str) {
                handler.after_reply(cmd);
            }
        }
    }
}

/// Writes `v` and a newline with one `write` call. (`writeln!(out, "{v}")` on an unbuffered
/// socket makes one system call per JSON token, about 150 for a progress reply, and each one
/// wakes the reader: a monitoring client polling every few milliseconds then disturbs the VM's
/// demand paging on a small host.)
fn send_line(out: &mut impl Write, v: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)
}

/// Parses one request line and runs it.
pub fn handle_line(line: &str, handler: &dyn CommandHandler) -> Value {
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return json!({"error": {"class": "GenericError",
                "desc": format!("request is not JSON ({e}); send e.g. {{\"execute\":\"query-status\"}}")}})
        }
    };
    let id = req.get("id").cloned();
    let result = match req.get("execute").and_then(Value::as_str) {
        None => Err(CommandError::generic(
            "request has no \"execute\" member; send e.g. {\"execute\":\"query-status\"}",
        )),
        Some(cmd) => {
            let args = req.get("arguments").cloned().unwrap_or_else(|| json!({}));
            if !args.is_object() {
                Err(CommandError::invalid("\"arguments\" must be a JSON object"))
            } else if cmd == "qmp_capabilities" {
                Ok(json!({}))
            } else if cmd == "query-commands" {
                Ok(json!(handler.commands()))
            } else {
                handler.execute(cmd, &args)
            }
        }
    };
    let mut reply = match result {
        Ok(v) => json!({ "return": v }),
        Err(e) => json!({"error": {"class": e.class, "desc": e.desc}}),
    };
    if let Some(id) = id {
        reply["id"] = id;
    }
    reply
}

/// Commands [`VmCommands`] serves.
pub const VM_COMMANDS: &[&str] = &[
    "query-status",
    "query-progress",
    "query-digest",
    "query-layout",
    "query-serial",
    "query-memory",
    "stop",
    "cont",
    "save",
    "wait",
    "migrate",
    "migrate-cancel",
    "migrate-switch",
    "query-migrate",
    "consolidate",
    "quit",
];

/// Serves a [`Vm`]. `quit` calls the given function (the binary decides what quitting means).
pub struct VmCommands {
    vm: Arc<Vm>,
    quit: Box<dyn Fn() + Send + Sync>,
    /// Shared migration secret used when `migrate` gives none.
    secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for VmCommands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmCommands").finish_non_exhaustive()
    }
}

impl VmCommands {
    pub fn new(vm: Arc<Vm>, quit: impl Fn() + Send + Sync + 'static) -> Self {
        Self {
            vm,
            quit: Box::new(quit),
            secret: None,
        }
    }

    /// Sets the migration secret `migrate` uses when its arguments carry none.
    #[must_use]
    pub fn with_secret(mut self, secret: Option<Vec<u8>>) -> Self {
        self.secret = secret;
        self
    }
}

impl VmCommands {
    /// A migration command's destination: `uri` (a `tcp:HOST:PORT`; `missing` says how to
    /// give it) and the secret (`secret`, or the one the VM was started with).
    fn destination<'a>(
        &self,
        args: &'a Value,
        missing: &str,
    ) -> Result<(&'a str, Vec<u8>), CommandError> {
        let uri = args
            .get("uri")
            .and_then(Value::as_str)
            .ok_or_else(|| CommandError::invalid(missing))?;
        tsubame_pageserver::session::parse_uri(uri)
            .map_err(|e| CommandError::invalid(e.to_string()))?;
        let secret = match args.get("secret").and_then(Value::as_str) {
            Some(s) => s.as_bytes().to_vec(),
            None => self.secret.clone().ok_or_else(|| {
                CommandError::invalid(crate::migration::MigrationError::NoSecret.to_string())
            })?,
        };
        Ok((uri, secret))
    }
}

fn arg_u64(args: &Value, key: &str) -> Result<Option<u64>, CommandError> {
    match args.get(key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            CommandError::invalid(format!("'{key}' must be a non-negative integer"))
        }),
    }
}

/// An on/off argument: `on`/`off`, `true`/`false`, absent is off.
fn arg_switch(args: &Value, key: &str) -> Result<bool, CommandError> {
    match args.get(key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "on" => Ok(true),
        Some(Value::String(s)) if s == "off" => Ok(false),
        Some(_) => Err(CommandError::invalid(format!("'{key}' is on or off"))),
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, CommandError> {
    serde_json::to_value(v).map_err(|e| CommandError::generic(e.to_string()))
}

impl CommandHandler for VmCommands {
    fn commands(&self) -> Vec<&'static str> {
        VM_COMMANDS.to_vec()
    }

    fn after_reply(&self, command: &str) {
        if command == "quit" {
            (self.quit)();
        }
    }

    fn execute(&self, command: &str, args: &Value) -> Result<Value, CommandError> {
        let vm = &self.vm;
        let failed = |e: crate::Error| CommandError::generic(e.to_string());
        match command {
            "query-status" => to_value(&vm.status()),
            "query-progress" => to_value(&vm.progress()),
            "query-layout" => to_value(vm.memory().layout()),
            "query-memory" => match vm.remote_paging_stats() {
                Some(r) => to_value(&r),
                None => Ok(json!({
                    "limit_bytes": null,
                    "resident_bytes": vm.memory().layout().total_bytes(),
                    "memservers": [],
                })),
            },
            "query-digest" => {
                let (digest, paused) = vm.digest().map_err(failed)?;
                Ok(json!({"digest": digest.to_string(), "paused_for_digest": paused}))
            }
            "query-serial" => {
                let lines = vm.devices().serial.recent_lines();
                let n = arg_u64(args, "lines")?
                    .map_or(lines.len(), |n| usize::try_from(n).unwrap_or(usize::MAX));
                Ok(json!(lines[lines.len().saturating_sub(n)..]))
            }
            "stop" => {
                let took = vm.pause().map_err(failed)?;
                Ok(json!({"pause_us": u64::try_from(took.as_micros()).unwrap_or(u64::MAX)}))
            }
            "cont" => {
                vm.resume().map_err(failed)?;
                Ok(json!({}))
            }
            "save" => {
                let path = args.get("path").and_then(Value::as_str).ok_or_else(|| {
                    CommandError::invalid(
                        "save needs a 'path' argument (where to write the snapshot)",
                    )
                })?;
                let bytes = vm.save(Path::new(path)).map_err(failed)?;
                Ok(json!({"path": path, "ram_bytes_written": bytes}))
            }
            "wait" => {
                let timeout =
                    Duration::from_millis(arg_u64(args, "timeout_ms")?.unwrap_or(600_000));
                let outcome = match args.get("for").and_then(Value::as_str) {
                    Some("finished") => vm.wait_finished(timeout),
                    Some("steps") => {
                        let steps = arg_u64(args, "steps")?.ok_or_else(|| {
                            CommandError::invalid(
                                "wait for=steps needs 'steps' (total guest steps to wait for)",
                            )
                        })?;
                        vm.wait_steps(steps, timeout)
                    }
                    _ => {
                        return Err(CommandError::invalid(
                            "wait needs 'for': \"finished\" or \"steps\" (with 'steps': N)",
                        ))
                    }
                };
                Ok(json!({"outcome": match outcome {
                    WaitOutcome::Reached => "reached",
                    WaitOutcome::TimedOut => "timed-out",
                    WaitOutcome::GuestError => "guest-error",
                }, "status": vm.run_state()}))
            }
            "migrate" => {
                let (uri, secret) =
                    self.destination(args, "migrate needs 'uri', e.g. uri=tcp:127.0.0.1:4444")?;
                let prepage = match args.get("prepage").and_then(Value::as_str) {
                    Some(p) => p.parse().map_err(CommandError::invalid)?,
                    None => crate::migration::Prepage::default(),
                };
                let options = crate::migration::MigrateOptions {
                    max_bandwidth: arg_u64(args, "max_bandwidth")?,
                    prepage,
                    profile: arg_u64(args, "profile_ms")?.map(Duration::from_millis),
                    precopy_rounds: arg_u64(args, "precopy_rounds")?
                        .map(|n| {
                            u32::try_from(n).map_err(|_| {
                                CommandError::invalid("precopy_rounds must be a small number")
                            })
                        })
                        .transpose()?
                        .unwrap_or(0),
                    checkpoint_ms: match (
                        arg_switch(args, "cancellable")?,
                        arg_u64(args, "checkpoint_ms")?,
                    ) {
                        (true, ms) => Some(
                            ms.map_or(Ok(crate::migration::checkpoint::DEFAULT_INTERVAL_MS), |ms| {
                                u32::try_from(ms)
                                    .map_err(|_| CommandError::invalid("checkpoint_ms is too large"))
                            })?,
                        ),
                        (false, None) => None,
                        (false, Some(_)) => {
                            return Err(CommandError::invalid(
                                "checkpoint_ms only applies to a cancellable migration: add cancellable=on",
                            ))
                        }
                    },
                    release: arg_switch(args, "release")?,
                    recover_ms: arg_u64(args, "recover_ms")?
                        .map(|ms| {
                            u32::try_from(ms)
                                .map_err(|_| CommandError::invalid("recover_ms is too large"))
                        })
                        .transpose()?,
                    split: args
                        .get("split")
                        .and_then(Value::as_str)
                        .map(|s| {
                            s.parse().map_err(|e: crate::migration::MigrationError| {
                                CommandError::invalid(e.to_string())
                            })
                        })
                        .transpose()?,
                };
                to_value(&vm.migrate(uri, &secret, &options).map_err(failed)?)
            }
            "migrate-cancel" => {
                vm.cancel_migration().map_err(failed)?;
                Ok(json!({}))
            }
            "migrate-switch" => {
                let (uri, secret) = self.destination(
                    args,
                    "migrate-switch needs 'uri', the new destination, e.g. uri=tcp:127.0.0.1:4445",
                )?;
                to_value(&vm.switch_migration(uri, &secret).map_err(failed)?)
            }
            "query-migrate" => Ok(vm
                .migration_status()
                .unwrap_or_else(|| json!({"phase": "none"}))),
            "consolidate" => {
                let started = vm.consolidate().map_err(failed)?;
                if args.get("wait").and_then(Value::as_bool) != Some(true) {
                    return to_value(&started);
                }
                // wait=true: until every page is here (or fetching failed).
                let deadline = std::time::Instant::now()
                    + Duration::from_millis(arg_u64(args, "timeout_ms")?.unwrap_or(600_000));
                loop {
                    let paging = vm.paging_stats().expect("consolidating: demand paging");
                    if let Some(e) = paging.fetch_error {
                        return Err(CommandError::generic(format!("consolidation stopped: {e}")));
                    }
                    if let Some(c) = paging.consolidation.filter(|c| c.ms.is_some()) {
                        return to_value(&c);
                    }
                    if std::time::Instant::now() > deadline {
                        return Err(CommandError::generic(format!(
                            "consolidation still running after the timeout: {} pages missing",
                            paging.total_pages - paging.present_pages
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            // Quits once the reply is out (`after_reply`).
            "quit" => Ok(json!({})),
            other => Err(CommandError {
                class: "CommandNotFound",
                desc: format!(
                    "unknown command '{other}'; known commands: {}",
                    VM_COMMANDS.join(", ")
                ),
            }),
        }
    }
}

/// A blocking client for the control socket (used by `tsubame ctl` and tests).
#[derive(Debug)]
pub struct ControlClient {
    reader: BufReader<StdUnixStream>,
    writer: StdUnixStream,
    /// The server's greeting.
    pub greeting: Value,
}

/// Errors of the control client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to control socket {path}: {source}; is the VM running with --control {path}?")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the VM closed the control connection")]
    Closed,
    #[error("the VM sent something that is not JSON: {0}")]
    BadReply(String),
    #[error("{class}: {desc}")]
    Command { class: String, desc: String },
}

impl ControlClient {
    /// Connects and reads the greeting.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let s = StdUnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.into(),
            source,
        })?;
        let mut c = Self {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            greeting: Value::Null,
        };
        c.greeting = c.read()?;
        Ok(c)
    }

    /// Bounds how long a reply may take (`None`: wait for ever, the default). A reply that
    /// does not come in time fails the command with an I/O error (`WouldBlock`/`TimedOut`).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.writer.set_read_timeout(timeout)?;
        Ok(())
    }

    fn read(&mut self) -> Result<Value, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Closed);
        }
        serde_json::from_str(&line).map_err(|_| ClientError::BadReply(line.trim().into()))
    }

    /// Runs `command` and returns its `return` value, or the error it reported.
    pub fn execute(&mut self, command: &str, args: Value) -> Result<Value, ClientError> {
        let req = json!({"execute": command, "arguments": args});
        send_line(&mut self.writer, &req)?;
        let reply = self.read()?;
        if let Some(e) = reply.get("error") {
            return Err(ClientError::Command {
                class: e["class"].as_str().unwrap_or("GenericError").into(),
                desc: e["desc"].as_str().unwrap_or("").into(),
            });
        }
        reply
            .get("return")
            .cloned()
            .ok_or_else(|| ClientError::BadReply(reply.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the `write` calls made on it.
    #[derive(Default)]
    struct Writes {
        calls: usize,
        bytes: Vec<u8>,
    }
    impl Write for Writes {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.calls += 1;
            self.bytes.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_reply_leaves_in_one_write() {
        let v = json!({"return": {"steps": 12, "vcpus": [{"steps": 5}, {"steps": 7}]}});
        let mut w = Writes::default();
        send_line(&mut w, &v).unwrap();
        assert_eq!(w.calls, 1);
        assert_eq!(w.bytes, format!("{v}\n").into_bytes());
    }

    struct Echo;
    impl CommandHandler for Echo {
        fn commands(&self) -> Vec<&'static str> {
            vec!["echo"]
        }
        fn execute(&self, command: &str, args: &Value) -> Result<Value, CommandError> {
            match command {
                "echo" => Ok(args.clone()),
                _ => Err(CommandError {
                    class: "CommandNotFound",
                    desc: command.into(),
                }),
            }
        }
    }

    #[test]
    fn protocol_errors_are_explained() {
        let r = handle_line("not json", &Echo);
        assert!(r["error"]["desc"].as_str().unwrap().contains("not JSON"));
        let r = handle_line(r#"{"id":3}"#, &Echo);
        assert!(r["error"]["desc"].as_str().unwrap().contains("execute"));
        assert_eq!(r["id"], 3);
        let r = handle_line(r#"{"execute":"echo","arguments":[1]}"#, &Echo);
        assert_eq!(r["error"]["class"], "InvalidArgument");
        let r = handle_line(r#"{"execute":"nope"}"#, &Echo);
        assert_eq!(r["error"]["class"], "CommandNotFound");
        let r = handle_line(r#"{"execute":"echo","arguments":{"a":1},"id":"x"}"#, &Echo);
        assert_eq!(r, json!({"return": {"a": 1}, "id": "x"}));
    }

    #[test]
    fn server_round_trip_and_stale_socket() {
        let dir = std::env::temp_dir().join(format!("tsubame-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        // a stale socket file from a dead process is replaced
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let server = ControlServer::start(&path, Arc::new(Echo)).unwrap();
        assert!(matches!(
            ControlServer::start(&path, Arc::new(Echo)),
            Err(ControlError::InUse { .. })
        ));
        let mut c = ControlClient::connect(&path).unwrap();
        assert_eq!(c.greeting["tsubame"]["commands"], json!(["echo"]));
        assert_eq!(
            c.execute("echo", json!({"k": "v"})).unwrap(),
            json!({"k": "v"})
        );
        assert!(matches!(
            c.execute("bad", json!({})),
            Err(ClientError::Command { .. })
        ));
        server.stop();
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
