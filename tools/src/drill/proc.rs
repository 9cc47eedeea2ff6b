//! The drills' child processes: `tsubame` commands spawned from this executable, their stderr
//! and stdout collected by threads (a child never blocks on a full pipe, and no wait here
//! blocks without a deadline), killed (SIGKILL) and reaped when dropped, whatever the drill's
//! outcome.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tsubame_vmm::control::ControlClient;

/// What a child wrote so far.
#[derive(Default)]
struct Output {
    stderr: String,
    stdout: String,
    /// Both pipes closed.
    stderr_eof: bool,
    stdout_eof: bool,
}

/// A child `tsubame` process, killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    out: Arc<(Mutex<Output>, Condvar)>,
    /// Its control socket, if it has one.
    pub socket: Option<PathBuf>,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts `tsubame ARGS` (this executable) with `TSUBAME_SECRET=secret`.
    pub fn spawn(name: &str, args: &[String], secret: &str) -> Result<Self> {
        Self::spawn_at(None, name, args, secret)
    }

    /// [`Self::spawn`] on `host` (in its network namespace), or here.
    pub fn spawn_at(
        host: Option<&tsubame_netns::Host>,
        name: &str,
        args: &[String],
        secret: &str,
    ) -> Result<Self> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut command = match host {
            Some(h) => h.command(exe),
            None => Command::new(exe),
        };
        let mut child = command
            .args(args)
            .env("TSUBAME_SECRET", secret)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the {name}: tsubame {}", args.join(" ")))?;
        let out = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        let mut stderr = child.stderr.take().expect("piped stderr");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let sink = out.clone();
        std::thread::spawn(move || drain(&mut stderr, &sink, true));
        let sink = out.clone();
        std::thread::spawn(move || drain(&mut stdout, &sink, false));
        let socket = args
            .iter()
            .position(|a| a == "--control")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from);
        Ok(Self {
            name: name.into(),
            child,
            out,
            socket,
            exited: None,
        })
    }

    /// Waits (at most `timeout`) for a stderr line containing `marker`; returns that line.
    pub fn wait_line(&self, marker: &str, timeout: Duration) -> Result<String> {
        let (lock, cv) = &*self.out;
        let deadline = Instant::now() + timeout;
        let mut o = lock.lock().expect("output lock");
        loop {
            // Whole lines only: a line still being written may be cut short.
            let whole = o.stderr.rfind('\n').map_or("", |i| &o.stderr[..i]);
            if let Some(l) = whole.lines().find(|l| l.contains(marker)) {
                return Ok(l.to_string());
            }
            if o.stderr_eof {
                bail!(
                    "the {} exited before saying '{marker}': {}",
                    self.name,
                    tail(&o.stderr)
                );
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "the {} did not say '{marker}' within {timeout:?}: {}",
                    self.name,
                    tail(&o.stderr)
                );
            }
            o = cv.wait_timeout(o, deadline - now).expect("output lock").0;
        }
    }

    /// The last lines of its stderr.
    pub fn stderr_tail(&self) -> String {
        tail(&self.out.0.lock().expect("output lock").stderr)
    }

    /// One command on its control socket (a fresh connection each time).
    pub fn ctl(&self, command: &str, args: Value) -> Result<Value> {
        let socket = self
            .socket
            .as_deref()
            .with_context(|| format!("the {} has no control socket", self.name))?;
        ctl_at(socket, command, args).with_context(|| {
            format!(
                "{command} at the {} (its last words:{})",
                self.name,
                self.stderr_tail()
            )
        })
    }

    /// Kills it with SIGKILL (no goodbye: its sockets reset) and reaps it.
    pub fn kill9(&mut self) -> Result<()> {
        if self.exited.is_none() {
            self.child
                .kill()
                .with_context(|| format!("killing the {}", self.name))?;
            self.exited = Some(self.child.wait()?);
        }
        Ok(())
    }

    /// Whether it has exited (without waiting).
    pub fn has_exited(&mut self) -> bool {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited.is_some()
    }

    /// Waits (at most `timeout`; then it is killed) for it to exit; returns its status and
    /// everything it wrote on stdout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(ExitStatus, String)> {
        let deadline = Instant::now() + timeout;
        while !self.has_exited() {
            if Instant::now() >= deadline {
                let _ = self.kill9();
                bail!(
                    "the {} did not exit within {timeout:?} (killed): {}",
                    self.name,
                    self.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = self.exited.expect("exited");
        // The pipes close when it exits (its children, if any, hold none of them).
        let (lock, cv) = &*self.out;
        let mut o = lock.lock().expect("output lock");
        let until = Instant::now() + Duration::from_secs(5);
        while !(o.stdout_eof && o.stderr_eof) && Instant::now() < until {
            o = cv
                .wait_timeout(o, Duration::from_millis(50))
                .expect("output lock")
                .0;
        }
        Ok((status, o.stdout.clone()))
    }

    /// Waits for it to exit successfully and parses its stdout as JSON (`--json` summaries).
    pub fn json_summary(&mut self, timeout: Duration) -> Result<Value> {
        let (status, out) = self.wait_exit(timeout)?;
        if !status.success() {
            bail!(
                "the {} exited with {status}: {}{}",
                self.name,
                out.trim(),
                self.stderr_tail()
            );
        }
        serde_json::from_str(&out)
            .with_context(|| format!("parsing the {}'s summary: {out}", self.name))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

fn drain(pipe: &mut impl Read, sink: &(Mutex<Output>, Condvar), is_stderr: bool) {
    let mut buf = [0u8; 8192];
    loop {
        let n = pipe.read(&mut buf).unwrap_or(0);
        let mut o = sink.0.lock().expect("output lock");
        if n == 0 {
            if is_stderr {
                o.stderr_eof = true;
            } else {
                o.stdout_eof = true;
            }
            sink.1.notify_all();
            return;
        }
        let text = String::from_utf8_lossy(&buf[..n]);
        if is_stderr {
            o.stderr.push_str(&text);
        } else {
            o.stdout.push_str(&text);
        }
        sink.1.notify_all();
    }
}

/// The last few lines of `s`, on one line each, for error messages.
fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let from = lines.len().saturating_sub(12);
    if lines.is_empty() {
        return "(nothing on stderr)".into();
    }
    format!("\n    {}", lines[from..].join("\n    "))
}

/// One command on the control socket at `path`.
pub fn ctl_at(path: &Path, command: &str, args: Value) -> Result<Value> {
    let mut c = ControlClient::connect(path).map_err(|e| anyhow!("{e}"))?;
    c.execute(command, args).map_err(|e| anyhow!("{e}"))
}

/// A scratch directory for sockets, removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let p = std::env::temp_dir().join(format!(
            "tsubame-drill-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Self(p))
    }

    pub fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
