//! Child `tsubame run` processes: the "hosts" of the demo and the benchmarks.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A child `tsubame run`, with its stderr forwarded line by line.
pub struct Host {
    /// Echo the child's other stderr lines (prefixed with its name) while waiting.
    pub echo: bool,
    name: &'static str,
    child: Child,
    lines: mpsc::Receiver<String>,
    forwarder: Option<std::thread::JoinHandle<()>>,
}

impl Host {
    /// Starts `tsubame run ARGS` (this executable).
    pub fn start(name: &'static str, args: &[String]) -> Result<Self> {
        Self::command(name, "run", args)
    }

    /// A child `tsubame COMMAND ARGS` (another command than `run`: a memserver, say).
    pub fn command(name: &'static str, command: &str, args: &[String]) -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg(command)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        let (tx, lines) = mpsc::channel();
        let err = child.stderr.take().expect("piped");
        let forwarder = std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            echo: true,
            name,
            child,
            lines,
            forwarder: Some(forwarder),
        })
    }

    /// Waits for a stderr line containing `marker`, echoing the others.
    pub fn wait_line(&self, marker: &str) -> Result<String> {
        loop {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(120))
                .with_context(|| format!("the {} stopped before saying '{marker}'", self.name))?;
            if l.contains(marker) {
                return Ok(l);
            }
            if self.echo {
                println!("  [{}] {l}", self.name);
            }
        }
    }

    /// The child's last `n` stderr lines not read yet, waiting up to `within` for it to exit
    /// first (what a failure report shows of a child that may be dying).
    pub fn log_tail(&mut self, n: usize, within: Duration) -> String {
        let deadline = std::time::Instant::now() + within;
        let mut lines = std::collections::VecDeque::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if lines.len() == n {
                        lines.pop_front();
                    }
                    lines.push_back(l);
                }
                Err(_) => break, // exited (all read), or still running at the deadline
            }
        }
        let status = match self.child.try_wait() {
            Ok(Some(s)) => format!("exited with {s}"),
            _ => "still running".to_string(),
        };
        let mut out = format!("the {} ({status}) said last:", self.name);
        for l in lines {
            out.push_str("\n    ");
            out.push_str(&l);
        }
        out
    }

    /// Kills the child at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Waits for the child to exit successfully and returns its stdout.
    pub fn finish(mut self) -> Result<String> {
        let mut out = String::new();
        if let Some(mut s) = self.child.stdout.take() {
            std::io::Read::read_to_string(&mut s, &mut out)?;
        }
        let status = self.child.wait()?;
        if let Some(t) = self.forwarder.take() {
            let _ = t.join(); // the child's stderr is closed: every line is in the channel
        }
        for l in self.lines.try_iter() {
            if self.echo {
                println!("  [{}] {l}", self.name);
            }
        }
        if !status.success() {
            bail!("the {} exited with {status}", self.name);
        }
        Ok(out)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
