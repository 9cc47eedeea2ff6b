//! `tsubame ctl`: a client of a VM's control socket.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Map, Value};
use tsubame_vmm::control::{ClientError, ControlClient};

/// Send one command to a VM's control socket and print the reply.
///
/// Arguments are KEY=VALUE pairs; values that parse as JSON (numbers, true/false) are sent as
/// such, anything else as a string.
///
/// Commands: query-status, query-progress, query-digest, query-layout, query-serial [lines=N],
/// stop, cont, save path=FILE, wait for=finished|steps [steps=N] [timeout_ms=N],
/// migrate uri=tcp:HOST:PORT [secret=S] [prepage=address|bubble|hot|none] [precopy_rounds=N]
///   [max_bandwidth=BYTES_PER_S] [profile_ms=N] [split=tcp:HOST:PORT[,tcp:HOST:PORT...]:AMOUNT]
///   [cancellable=on [checkpoint_ms=N]] [release=on] [recover_ms=N], migrate-cancel,
///   migrate-switch uri=tcp:HOST:PORT [secret=S], query-migrate,
///   consolidate [wait=true] [timeout_ms=N], quit, query-commands.
///
/// It also talks to the control socket of `tsubame linkem --control SOCKET`: query-link,
/// cut ms=N, blackhole, drop, reset, restore, set [delay=D] [rate=R|none] (see
/// `tsubame linkem --help`), and of `tsubame memserver --control SOCKET`: query-usage, quit.
///
/// split= hands AMOUNT of the VM's memory (a share from 0 to 1, or a size such as 512M), in
/// 2 MiB stripes dealt in turn, to the memservers at tcp:HOST:PORT,... (see `tsubame memserver
/// --help`): from the switchover on, the source stores those stripes at the memservers, all in
/// parallel with pushing the rest to the destination, then hands them over; the destination
/// runs with those pages at the memservers (fetched when touched) and the migration ends when
/// the larger half is sent. A memserver that fails gets nothing: its pages go to the
/// destination. Migrating such a split VM on keeps its pages where they are (the new
/// destination's owners are the same memservers). consolidate (at the VM with pages at
/// memservers) brings them all back here, from every memserver in parallel, while the VM
/// runs; wait=true returns when it is done. migrate-cancel stops a migration that has not
/// switched over yet: the VM keeps running here.
///
/// cancellable=on keeps a postcopy migration cancellable after its switchover, until the
/// destination has every page: the destination sends a reverse checkpoint (dirty pages, vCPU
/// and device state) every checkpoint_ms (default 100, grown when the guest writes a lot),
/// holds the guest's serial output until the source has committed the checkpoint that covers
/// it, and runs on a lease that each commit renews. migrate-cancel at either end then stops
/// the destination and resumes the VM at the source from the last checkpoint; if the
/// destination dies or goes silent, the source resumes it by itself once its lease has run
/// out. release=on (eviction) frees the source's copy of each page once the destination has
/// it, from the switchover on (precopy rounds free nothing: the guest still runs here), so
/// the source host gets its memory back as the migration goes; it cannot be combined with
/// cancellable=on.
///
/// recover_ms bounds an outage after the switchover (default 60000; 0: no recovery): if the
/// session breaks (a reset, a cut, a network that goes silent), the destination's vCPUs that
/// need a missing page wait, the others run on, and the destination dials the source back
/// (with backoff, authenticated), says which pages it still lacks, and the migration goes on
/// from there; after recover_ms without success the source gives the migration up and the
/// destination reports its VM stuck, with the reason. query-migrate shows the outages
/// (recovery at the source, the source's link at the destination).
///
/// migrate-switch (at the source) redirects a running migration to a new destination
/// (`tsubame run --incoming` there) without starting over. During the precopy rounds of a
/// migration started with precopy_rounds=N: the old destination forwards the pages it holds
/// that the guest has not written since, the source sends the rest, and the new destination
/// receives from both in parallel; the source's copy wins where they differ. It returns once
/// the new destination receives from both. After the switchover (the VM runs at the old
/// destination): the old destination moves the VM on to the new one, postcopy, and the pages
/// it still lacks go straight from the source to the new one; it returns once the VM runs
/// there. If the new destination cannot be reached, nothing changes and the migration goes on
/// to the old one; if the old one dies before the switchover, the source sends its pages.
/// query-migrate then shows both senders (switch: pages at the old destination, forwarded so
/// far, sent by the source since).
///
/// Examples:
///   tsubame ctl /tmp/vm.sock query-status
///   tsubame ctl /tmp/vm.sock wait for=steps steps=1000000
///   tsubame ctl /tmp/vm.sock save path=/tmp/vm.snap
///   tsubame ctl /tmp/vm.sock migrate uri=tcp:127.0.0.1:4444
///   tsubame ctl /tmp/vm.sock migrate uri=tcp:127.0.0.1:4444 precopy_rounds=2 prepage=hot
///   tsubame ctl /tmp/vm.sock migrate uri=tcp:127.0.0.1:4444 split=tcp:127.0.0.1:5555:0.5
///   tsubame ctl /tmp/vm.sock migrate uri=tcp:127.0.0.1:4444 split=tcp:10.0.0.3:5555,tcp:10.0.0.4:5555:512M
///   tsubame ctl /tmp/vm.sock migrate uri=tcp:127.0.0.1:4444 cancellable=on checkpoint_ms=50
///   tsubame ctl /tmp/dest.sock consolidate wait=true
///   tsubame ctl /tmp/vm.sock migrate-cancel
///   tsubame ctl /tmp/vm.sock migrate-switch uri=tcp:127.0.0.1:4445
///   tsubame ctl --json /tmp/vm.sock query-digest
///   tsubame ctl /tmp/link.sock cut ms=2000
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct CtlArgs {
    /// The VM's control socket (`tsubame run --control SOCKET`).
    pub socket: PathBuf,
    /// The command, e.g. query-status.
    pub command: String,
    /// Arguments as KEY=VALUE.
    pub args: Vec<String>,
    /// Print the raw JSON reply (for scripts).
    #[arg(long)]
    pub json: bool,
}

fn parse_args(args: &[String]) -> Result<Value> {
    let mut map = Map::new();
    for a in args {
        let (k, v) = a
            .split_once('=')
            .with_context(|| format!("argument '{a}' is not KEY=VALUE, e.g. path=/tmp/vm.snap"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.into()));
        map.insert(k.into(), value);
    }
    Ok(Value::Object(map))
}

/// JSON as indented `key: value` lines for people.
fn human(v: &Value, indent: usize, out: &mut String) {
    use std::fmt::Write as _;
    let pad = " ".repeat(indent);
    // Writing to a String cannot fail.
    let line = |out: &mut String, s: std::fmt::Arguments<'_>| {
        let _ = writeln!(out, "{pad}{s}");
    };
    match v {
        Value::Object(m) if m.is_empty() => line(out, format_args!("ok")),
        Value::Object(m) => {
            for (k, v) in m {
                match v {
                    Value::Object(_) | Value::Array(_) if !is_flat_array(v) => {
                        line(out, format_args!("{k}:"));
                        human(v, indent + 2, out);
                    }
                    _ => line(out, format_args!("{k}: {}", scalar(v))),
                }
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                if v.is_object() {
                    line(out, format_args!("[{i}]"));
                    human(v, indent + 2, out);
                } else {
                    line(out, format_args!("{}", scalar(v)));
                }
            }
        }
        other => line(out, format_args!("{}", scalar(other))),
    }
}

/// Prints `text` on stdout; a reader that went away (`ctl ... | head`) ends the output
/// quietly rather than with a panic.
fn print_out(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn is_flat_array(v: &Value) -> bool {
    matches!(v, Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) && a.len() <= 8)
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a.iter().map(scalar).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

pub fn ctl(a: CtlArgs) -> Result<i32> {
    let args = parse_args(&a.args)?;
    let mut client = ControlClient::connect(&a.socket)?;
    let progress = (matches!(a.command.as_str(), "migrate" | "migrate-switch")
        && !a.json
        && std::io::stderr().is_terminal())
    .then(|| MigrationProgress::start(a.socket.clone()));
    let reply = client.execute(&a.command, args);
    if let Some(p) = progress {
        p.finish();
    }
    match reply {
        Ok(v) => {
            let mut text = String::new();
            if a.json {
                text = format!("{v}\n");
            } else {
                human(&v, 0, &mut text);
            }
            print_out(&text)?;
            Ok(0)
        }
        Err(ClientError::Command { class, desc }) => {
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"error": {"class": class, "desc": desc}})
                );
            } else {
                eprintln!("tsubame: {} failed: {desc} ({class})", a.command);
            }
            Ok(1)
        }
        Err(e) => Err(e.into()),
    }
}

/// A progress bar on stderr that follows `query-migrate` (on a second connection) while
/// `migrate` (or `migrate-switch`) runs and, after its reply, until the destination has every
/// page; once the migration is switched, a second bar under it shows the other sender (the
/// old destination forwarding, or the source serving the new destination directly).
struct MigrationProgress {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl MigrationProgress {
    fn start(socket: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let bars = indicatif::MultiProgress::new();
            let style = indicatif::ProgressStyle::with_template(
                "{prefix:>11} [{bar:40}] {pos}/{len} pages  {msg}",
            )
            .expect("valid template")
            .progress_chars("=> ");
            let bar = bars.add(indicatif::ProgressBar::new(1));
            bar.set_style(style.clone());
            let mut second: Option<indicatif::ProgressBar> = None;
            let Ok(mut c) = ControlClient::connect(&socket) else {
                return;
            };
            loop {
                let returned = flag.load(Ordering::Acquire);
                let got = c.execute("query-migrate", Value::Object(Map::new()));
                if let Ok(sw) = got.as_ref().map(|m| &m["switch"]) {
                    if sw.is_object() {
                        let b = second.get_or_insert_with(|| {
                            let b = bars.add(indicatif::ProgressBar::new(1));
                            b.set_style(style.clone());
                            b
                        });
                        show_second(b, sw);
                    }
                }
                match got {
                    Ok(m) if show(&bar, &m) => break,
                    // `migrate` returned with no migration under way: it failed to start.
                    Ok(m) if returned && m["phase"] == "none" => {
                        bar.finish_and_clear();
                        return;
                    }
                    Ok(_) => {}
                    // The source exits once the destination has every page.
                    Err(_) => {
                        bar.finish_with_message(
                            "the source process exited (it does once the migration is over)",
                        );
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            bar.finish();
            if let Some(b) = second {
                b.finish();
            }
        });
        Self { stop, thread }
    }

    /// Called once `migrate` replied: the bar keeps following the postcopy phase until the
    /// migration is over (or goes away if it never started).
    fn finish(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.thread.join();
    }
}

/// Draws the second sender of a switched migration (`query-migrate`'s `switch`).
fn show_second(bar: &indicatif::ProgressBar, sw: &Value) {
    let n = |k: &str| sw[k].as_u64().unwrap_or(0);
    let from = sw["from"].as_str().unwrap_or("?");
    if sw["after_switchover"] == true {
        // The source serves the new destination what the old one lacked.
        bar.set_prefix("source→new");
        bar.set_length(n("source_pages_after").max(1));
        bar.set_position(n("source_pages_after"));
        bar.set_message(format!("{from} moved the VM on to {}", scalar(&sw["to"])));
        return;
    }
    bar.set_prefix("forwarding");
    bar.set_length(n("pages_at_old").max(1));
    bar.set_position(n("pages_forwarded").min(n("pages_at_old")));
    bar.set_message(match sw["forwarder_lost"].as_str() {
        Some(why) => format!("{from} lost ({why}): the source sends its pages"),
        None => format!(
            "from {from}; {} pages written since, switched in {:.1} ms",
            n("pages_written_since"),
            sw["switch_ms"].as_f64().unwrap_or(0.0)
        ),
    });
}

/// Draws one `query-migrate` reply; returns whether the migration is over.
fn show(bar: &indicatif::ProgressBar, m: &Value) -> bool {
    let n = |k: &str| m[k].as_u64().unwrap_or(0);
    let phase = m["phase"].as_str().unwrap_or("none");
    match phase {
        "precopy" => {
            bar.set_prefix(format!(
                "precopy {}/{}",
                n("precopy_round"),
                n("precopy_rounds")
            ));
            bar.set_length(n("total_pages"));
            bar.set_position(n("pages_precopy").min(n("total_pages")));
            bar.set_message(format!("{} MiB sent", n("bytes_sent") >> 20));
        }
        "postcopy" | "completed" => {
            // What postcopy has to move: everything, or what the precopy rounds left stale.
            let todo = if n("precopy_rounds") > 0 {
                n("pages_stale")
            } else {
                n("total_pages")
            };
            let done = n("pages_demand") + n("pages_pushed") - n("pages_duplicate");
            bar.set_prefix("postcopy");
            bar.set_length(todo.max(1));
            bar.set_position(done.min(todo));
            let c = &m["checkpoints"];
            let checkpoints = if c.is_object() {
                let k = |k: &str| c[k].as_u64().unwrap_or(0);
                format!(
                    ", {} checkpoints {} (every {} ms, pause p50 {} µs, {} MiB back)",
                    k("committed"),
                    c["state"].as_str().unwrap_or("?"),
                    k("interval_ms"),
                    k("pause_p50_us"),
                    k("bytes") >> 20
                )
            } else {
                String::new()
            };
            bar.set_message(format!(
                "{} on demand, downtime {} µs, {} MiB sent{}{checkpoints}",
                n("pages_demand"),
                n("downtime_us"),
                n("bytes_sent") >> 20,
                match n("pages_released") >> 8 {
                    0 => String::new(),
                    mib => format!(", {mib} MiB released"),
                }
            ));
        }
        _ => {}
    }
    match phase {
        "completed" => {
            bar.set_prefix("completed");
            true
        }
        "failed" => {
            bar.abandon_with_message(format!("failed: {}", m["error"]));
            true
        }
        "cancelled" => {
            bar.abandon_with_message(format!(
                "cancelled ({}): the VM runs here again from checkpoint {}",
                m["checkpoints"]["reason"].as_str().unwrap_or("?"),
                m["checkpoints"]["epoch"]
            ));
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_become_json() {
        let v = parse_args(&["path=/tmp/x".into(), "steps=10".into(), "ok=true".into()]).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"path": "/tmp/x", "steps": 10, "ok": true})
        );
        assert!(parse_args(&["nokey".into()]).is_err());
    }
}
