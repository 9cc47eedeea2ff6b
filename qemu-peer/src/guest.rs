//! Running the built-in guest under QEMU, the peer Tsubame is measured against.
//!
//! QEMU's `pc` machine boots the guest as a multiboot kernel: `-kernel guest.elf` makes SeaBIOS
//! run QEMU's multiboot option ROM, which loads the ELF32 segments at their physical addresses
//! (the image must be ELF32: QEMU refuses ELF64 multiboot kernels) and enters `_start` in 32-bit
//! protected mode with EAX = 0x2BADB002 on the boot CPU only. QEMU does not start the other CPUs,
//! so a config block for QEMU uses one vCPU ([`qemu_config_block`] builds it). The config block
//! travels inside the image ([`tsubame_vmm::guest::image_with_config`]): QEMU has no other way
//! to put it at [`abi::CONFIG_GPA`].
//!
//! What QEMU 7.2 puts where (measured with `info mtree` and a memory dump):
//! - RAM: everything at guest-physical 0 when it is below 3.5 GiB; from 3.5 GiB on, 3 GiB at 0
//!   and the rest at 4 GiB: the Tsubame VMM's [`MemoryLayout::for_size`] ([`qemu_layout`]).
//!   QEMU rounds `-m` up to 8 KiB. SeaBIOS reserves the last 128 KiB of low RAM (ACPI tables,
//!   its own data) in the e820 map; the guest ignores the map, and overwriting that area after
//!   boot is harmless to a guest that never reads ACPI.
//! - Multiboot information: the structure at 0x9500, the e820 map at 0x9000, the command line and
//!   boot loader name on the page after the image's end (0x168000 today). None of it touches the
//!   guest's page tables (0x20_0000..0x30_0000) or its data (from [`abi::DATA_GPA`]), and the
//!   guest reads none of it.
//! - Booting takes about 4 s here: SeaBIOS and the option ROM run at CPL0, which this KVM
//!   emulates. The workload itself runs natively at CPL3.
//!
//! How a run ends: the guest prints `cpu 0 done after N steps` (or a `VERIFY ERROR` line) on
//! COM1 and then rings its doorbell (port 0xf4) forever. QEMU ignores writes to that port unless
//! `isa-debug-exit` sits there ([`QemuGuest::exit_on_done`]), in which case the *first* write ends
//! QEMU with status [`bell_exit_status`]. A config block built with `exit_on_done` sets
//! [`abi::FLAG_EXIT_BELLS`], which makes the guest skip its running bell and ring bare codes, so
//! that QEMU exits with [`done_exit_code`] (5) when the guest is done, 7 on a verify error and 9
//! on an exception. Without `isa-debug-exit`, [`QemuGuest::run`] watches the serial output and
//! stops QEMU itself when the guest has finished; either way it also notices QEMU exiting.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tsubame_vmm::guest::{abi, config_block, RunOptions, WorkloadError, WorkloadSpec};
use tsubame_vmm::memory::{LayoutError, MemoryError, MemoryLayout};

/// The QEMU binary [`find_qemu`] looks for.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// QEMU rounds the RAM size (`-m`) up to a multiple of this.
pub const QEMU_RAM_ALIGN: u64 = 8 << 10;

/// How often [`QemuGuest::run`] looks at the serial output while it waits.
const SERIAL_POLL: Duration = Duration::from_millis(20);

/// Errors of preparing the guest for QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuConfigError {
    #[error(
        "guest memory size {size} is not a multiple of 8 KiB: QEMU would round -m up and give \
         the guest memory its config block does not describe; use e.g. 256M or 1G"
    )]
    Unaligned { size: u64 },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
}

/// The memory map QEMU's `pc` machine gives a guest started with `-m mem_bytes`: the Tsubame
/// VMM's [`MemoryLayout::for_size`], which follows the same rule (all RAM at 0 below 3.5 GiB;
/// from 3.5 GiB on, 3 GiB at 0 and the rest at 4 GiB), so that the guest sees the same map under
/// both.
///
/// Accepts the sizes [`MemoryLayout::for_size`] accepts that are also multiples of
/// [`QEMU_RAM_ALIGN`] (QEMU rounds other sizes up). The legacy holes below 1 MiB are not carved
/// out: the guest uses nothing between 640 KiB and 1 MiB.
pub fn qemu_layout(mem_bytes: u64) -> Result<MemoryLayout, QemuConfigError> {
    if mem_bytes % QEMU_RAM_ALIGN != 0 {
        return Err(QemuConfigError::Unaligned { size: mem_bytes });
    }
    Ok(MemoryLayout::for_size(mem_bytes)?)
}

/// The config block of the built-in guest under QEMU with `-m mem_bytes`: one vCPU (QEMU starts
/// only the boot CPU of a multiboot guest), `steps` steps with a progress line every
/// `report_every` steps, and a final verification of every page of the working set.
///
/// `exit_on_done` must match [`QemuGuest::exit_on_done`]: it sets [`abi::FLAG_EXIT_BELLS`], so
/// that the guest's first doorbell write is its outcome and `isa-debug-exit` ends QEMU with
/// [`done_exit_code`] when the guest is done. Pass the block to
/// [`tsubame_vmm::guest::image_with_config`].
pub fn qemu_config_block(
    spec: &WorkloadSpec,
    mem_bytes: u64,
    steps: u64,
    report_every: u64,
    exit_on_done: bool,
) -> Result<abi::ConfigBlock, QemuConfigError> {
    let layout = qemu_layout(mem_bytes)?;
    let run = RunOptions {
        vcpus: 1,
        steps,
        report_every,
        verify_at_end: true,
    };
    let mut block = config_block(spec, &layout, &run)?;
    if exit_on_done {
        block.flags |= abi::FLAG_EXIT_BELLS;
    }
    Ok(block)
}

/// Looks for [`QEMU_BINARY`] in the directories of `PATH`.
pub fn find_qemu() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(QEMU_BINARY))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The exit status of QEMU when the guest writes `value` to the doorbell and `isa-debug-exit`
/// sits on it: QEMU calls `exit((value << 1) | 1)` and the OS keeps the low 8 bits.
pub const fn bell_exit_status(value: u32) -> i32 {
    // Masked to 8 bits, so the cast cannot wrap.
    #[allow(clippy::cast_possible_wrap)]
    let status = (value.wrapping_shl(1) | 1) as i32 & 0xff;
    status
}

/// The exit status that means "the guest finished" with [`QemuGuest::exit_on_done`]: 5, the
/// status of a doorbell write of the bare done code ([`abi::BELL_DONE`]), which a guest with
/// [`abi::FLAG_EXIT_BELLS`] (see [`qemu_config_block`]) rings first.
pub const fn done_exit_code() -> i32 {
    bell_exit_status(abi::BELL_DONE)
}

/// Exit status of QEMU when a guest with [`abi::FLAG_EXIT_BELLS`] found a bad page: 7.
pub const fn verify_failed_exit_code() -> i32 {
    bell_exit_status(abi::BELL_VERIFY)
}

/// Exit status of QEMU when a CPU exception reached the CPL0 handler of a guest with
/// [`abi::FLAG_EXIT_BELLS`]: 9.
pub const fn exception_exit_code() -> i32 {
    bell_exit_status(abi::BELL_EXCEPTION)
}

/// Errors of running QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error(
        "cannot start {binary}: {source}; install QEMU (apt-get install -y qemu-system-x86) \
         or point qemu_binary at it"
    )]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot use the guest's serial output file {path}: {source}")]
    Serial {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot wait for QEMU (pid {pid}): {source}")]
    Wait { pid: u32, source: std::io::Error },
}

/// How a [`QemuGuest::run`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuOutcome {
    /// The guest printed its `done after` line, or, with `exit_on_done`, QEMU exited with
    /// [`done_exit_code`].
    Finished,
    /// The guest printed a `VERIFY ERROR` line (it read a page that was not what it wrote), or,
    /// with `exit_on_done`, QEMU exited with [`verify_failed_exit_code`].
    VerifyFailed,
    /// With `exit_on_done`, QEMU exited with [`exception_exit_code`]: a CPU exception reached
    /// the guest's CPL0 handler (the guest is broken).
    Exception,
    /// QEMU exited otherwise before the guest printed either line (a QEMU error, a triple fault
    /// with `-no-reboot`); see [`QemuRun::stderr`].
    Exited,
    /// Neither happened within the timeout; QEMU was killed.
    TimedOut,
}

/// The result of [`QemuGuest::run`].
#[derive(Debug)]
pub struct QemuRun {
    pub outcome: QemuOutcome,
    /// QEMU's exit status if it exited by itself; `None` if `run` stopped it.
    pub status: Option<ExitStatus>,
    /// From starting QEMU to the end of the run (the guest's last line, or QEMU's exit).
    pub elapsed: Duration,
    /// Everything the guest wrote to its serial port.
    pub serial: String,
    /// What QEMU wrote to stderr.
    pub stderr: String,
}

/// A QEMU process running the built-in guest (a patched image from
/// [`tsubame_vmm::guest::image_with_config`] with a [`qemu_config_block`] for `mem_bytes`).
#[derive(Clone, Debug)]
pub struct QemuGuest {
    pub qemu_binary: PathBuf,
    /// Guest RAM, as for [`qemu_config_block`].
    pub mem_bytes: u64,
    /// The multiboot ELF32 image (`-kernel`).
    pub image: PathBuf,
    /// Where COM1 output goes (`-serial file:`); QEMU truncates it.
    pub serial: PathBuf,
    /// Put `isa-debug-exit` on the doorbell port so that the guest's first doorbell write ends
    /// QEMU. The image's config block must then come from [`qemu_config_block`] with
    /// `exit_on_done` too, or the guest's running bell ends QEMU before the workload runs.
    pub exit_on_done: bool,
    /// Appended to the command line (e.g. `-incoming defer`, `-qmp unix:...`).
    pub extra_args: Vec<String>,
}

impl QemuGuest {
    /// The QEMU command line: KVM, the `pc` machine, no default devices or display (so that COM1
    /// carries only the guest's output: `-nographic` would add SeaBIOS's banner), no reboot on a
    /// triple fault.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.qemu_binary);
        cmd.args(["-nodefaults", "-accel", "kvm", "-machine", "pc", "-m"])
            .arg(qemu_memory_arg(self.mem_bytes))
            .args(["-display", "none", "-no-reboot", "-kernel"])
            .arg(&self.image)
            .arg("-serial")
            .arg(serial_arg(&self.serial));
        if self.exit_on_done {
            cmd.args(["-device"]).arg(format!(
                "isa-debug-exit,iobase={:#x},iosize=0x4",
                abi::DOORBELL_PORT
            ));
        }
        cmd.args(&self.extra_args);
        cmd
    }

    /// Runs QEMU until the guest finishes or fails, QEMU exits, or `timeout` passes, then stops
    /// QEMU if it still runs. Waits on QEMU's exit; while the guest runs, it also reads the
    /// serial file every few milliseconds (a file gives nothing to wait on).
    pub fn run(&self, timeout: Duration) -> Result<QemuRun, QemuError> {
        let serial_err = |source| QemuError::Serial {
            path: self.serial.clone(),
            source,
        };
        // QEMU truncates the file when it opens it; truncate it first so that nothing from an
        // earlier run is read before that.
        File::create(&self.serial).map_err(serial_err)?;
        let start = Instant::now();
        let mut qemu = RunningQemu::spawn(&mut self.command(), &self.qemu_binary)?;
        let mut serial = SerialWatch::new(&self.serial);
        let deadline = start + timeout;
        let (outcome, status, elapsed) = loop {
            let now = Instant::now();
            let wait = if self.exit_on_done {
                deadline.saturating_duration_since(now)
            } else {
                SERIAL_POLL.min(deadline.saturating_duration_since(now))
            };
            match qemu.exited.recv_timeout(wait) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let elapsed = start.elapsed();
                    let status = qemu.wait()?;
                    serial.poll().map_err(serial_err)?;
                    let outcome = match (self.exit_on_done, status.code()) {
                        (true, Some(code)) => outcome_of_exit_code(code, serial.outcome()),
                        _ => serial.outcome(),
                    };
                    break (outcome, Some(status), elapsed);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            serial.poll().map_err(serial_err)?;
            let outcome = serial.outcome();
            if outcome != QemuOutcome::Exited && !self.exit_on_done {
                let elapsed = start.elapsed();
                qemu.stop()?;
                break (outcome, None, elapsed);
            }
            if Instant::now() >= deadline {
                qemu.stop()?;
                serial.poll().map_err(serial_err)?;
                break (QemuOutcome::TimedOut, None, start.elapsed());
            }
        };
        let stderr = qemu.take_stderr();
        Ok(QemuRun {
            outcome,
            status,
            elapsed,
            serial: String::from_utf8_lossy(&serial.text).into_owned(),
            stderr,
        })
    }
}

/// What QEMU's exit status `code` says with `isa-debug-exit` on the doorbell; `serial` (what
/// the serial output says) for any other status, e.g. QEMU's own errors.
fn outcome_of_exit_code(code: i32, serial: QemuOutcome) -> QemuOutcome {
    match code {
        c if c == done_exit_code() => QemuOutcome::Finished,
        c if c == verify_failed_exit_code() => QemuOutcome::VerifyFailed,
        c if c == exception_exit_code() => QemuOutcome::Exception,
        _ => serial,
    }
}

/// `-m` in MiB when it is a whole number of MiB, else in KiB (QEMU rounds up to 8 KiB).
fn qemu_memory_arg(mem_bytes: u64) -> String {
    if mem_bytes % (1 << 20) == 0 {
        format!("{}M", mem_bytes >> 20)
    } else {
        format!("{}K", mem_bytes.div_ceil(1 << 10))
    }
}

/// `file:PATH`, keeping non-UTF-8 paths intact (QEMU takes the rest of the argument verbatim).
fn serial_arg(path: &Path) -> OsString {
    let mut arg = OsString::from("file:");
    arg.push(path);
    arg
}

/// A spawned QEMU: a thread reports its exit without reaping it, so that killing it by pid can
/// never hit a reused pid; another thread drains stderr. Killed and reaped on drop.
/// (Crate-visible for [`crate::migration`], which runs two of them.)
#[derive(Debug)]
pub(crate) struct RunningQemu {
    child: Child,
    exited: mpsc::Receiver<()>,
    stderr: Option<std::thread::JoinHandle<String>>,
    reaped: bool,
}

impl RunningQemu {
    /// Starts `cmd` (a QEMU command line for `binary`) with no stdin or stdout and its stderr
    /// collected.
    pub(crate) fn spawn(cmd: &mut Command, binary: &Path) -> Result<Self, QemuError> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| QemuError::Spawn {
                binary: binary.to_path_buf(),
                source,
            })?;
        Self::new(child)
    }

    fn new(mut child: Child) -> Result<Self, QemuError> {
        let pid = child.id();
        let wait_err = |source| QemuError::Wait { pid, source };
        let raw =
            i32::try_from(pid).map_err(|_| wait_err(std::io::Error::other("pid out of range")))?;
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::Builder::new()
                .name("qemu-stderr".into())
                .spawn(move || {
                    let mut text = Vec::new();
                    let _ = pipe.read_to_end(&mut text);
                    String::from_utf8_lossy(&text).into_owned()
                })
        });
        let stderr = match stderr.transpose() {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(wait_err(e));
            }
        };
        let (tx, exited) = mpsc::channel();
        let waiter = std::thread::Builder::new()
            .name("qemu-wait".into())
            .spawn(move || {
                use nix::sys::wait::{waitid, Id, WaitPidFlag};
                let pid = nix::unistd::Pid::from_raw(raw);
                // WNOWAIT leaves the zombie for `Child::wait`, so the pid stays ours until then.
                while let Err(nix::errno::Errno::EINTR) =
                    waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
                {
                }
                let _ = tx.send(());
            });
        let mut qemu = Self {
            child,
            exited,
            stderr,
            reaped: false,
        };
        if let Err(e) = waiter {
            qemu.stop()?;
            return Err(wait_err(e));
        }
        Ok(qemu)
    }

    pub(crate) fn wait(&mut self) -> Result<ExitStatus, QemuError> {
        let pid = self.child.id();
        let status = self
            .child
            .wait()
            .map_err(|source| QemuError::Wait { pid, source })?;
        self.reaped = true;
        Ok(status)
    }

    /// Kills QEMU (it has nothing to save) and reaps it.
    pub(crate) fn stop(&mut self) -> Result<(), QemuError> {
        // Fails only if QEMU has already exited, which is what we want anyway.
        let _ = self.child.kill();
        self.wait().map(|_| ())
    }

    /// What QEMU wrote to stderr; waits for QEMU to close it, so stop QEMU first.
    pub(crate) fn take_stderr(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    /// Whether QEMU has exited (without reaping it).
    pub(crate) fn has_exited(&self) -> bool {
        self.reaped || !matches!(self.exited.try_recv(), Err(mpsc::TryRecvError::Empty))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RunningQemu {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads the serial file as it grows and classifies complete lines.
struct SerialWatch<'a> {
    path: &'a Path,
    file: Option<File>,
    text: Vec<u8>,
    /// Start of the first line not yet classified.
    scanned: usize,
    finished: bool,
    verify_failed: bool,
}

impl<'a> SerialWatch<'a> {
    fn new(path: &'a Path) -> Self {
        Self {
            path,
            file: None,
            text: Vec::new(),
            scanned: 0,
            finished: false,
            verify_failed: false,
        }
    }

    /// Reads what was appended since the last call and classifies the new complete lines.
    fn poll(&mut self) -> std::io::Result<()> {
        if self.file.is_none() {
            self.file = Some(File::open(self.path)?);
        }
        if let Some(file) = self.file.as_mut() {
            file.seek(SeekFrom::Start(self.text.len() as u64))?;
            file.read_to_end(&mut self.text)?;
        }
        while let Some(eol) = self.text[self.scanned..].iter().position(|&b| b == b'\n') {
            let line = &self.text[self.scanned..self.scanned + eol];
            if contains(line, b"VERIFY ERROR") {
                self.verify_failed = true;
            } else if line.starts_with(b"cpu ") && contains(line, b" done after ") {
                self.finished = true;
            }
            self.scanned += eol + 1;
        }
        Ok(())
    }

    fn outcome(&self) -> QemuOutcome {
        if self.verify_failed {
            QemuOutcome::VerifyFailed
        } else if self.finished {
            QemuOutcome::Finished
        } else {
            QemuOutcome::Exited
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsubame_vmm::memory::{Gpa, RegionLayout, PAGE_SIZE};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn region(gpa: u64, size: u64) -> RegionLayout {
        RegionLayout {
            gpa: Gpa(gpa),
            size,
        }
    }

    #[test]
    fn qemu_layout_below_three_and_a_half_gib_is_all_low() {
        for size in [
            8 * MIB,
            256 * MIB,
            3 * GIB,
            3 * GIB + 256 * MIB,
            3 * GIB + 511 * MIB,
        ] {
            let layout = qemu_layout(size).unwrap();
            assert_eq!(layout.regions, vec![region(0, size)], "{size:#x}");
        }
    }

    #[test]
    fn qemu_layout_from_three_and_a_half_gib_splits_at_three() {
        for size in [3 * GIB + 512 * MIB, 4 * GIB, 8 * GIB, 250 * GIB] {
            let layout = qemu_layout(size).unwrap();
            assert_eq!(
                layout.regions,
                vec![region(0, 3 * GIB), region(4 * GIB, size - 3 * GIB)],
                "{size:#x}"
            );
        }
    }

    #[test]
    fn qemu_layout_is_the_vmm_layout() {
        for size in [
            256 * MIB,
            3 * GIB,
            3 * GIB + 256 * MIB,
            3 * GIB + 512 * MIB,
            8 * GIB,
        ] {
            assert_eq!(
                qemu_layout(size).unwrap(),
                MemoryLayout::for_size(size).unwrap(),
                "{size:#x}"
            );
        }
    }

    #[test]
    fn qemu_layout_rejects_sizes_qemu_would_round() {
        assert!(matches!(
            qemu_layout(256 * MIB + 4096),
            Err(QemuConfigError::Unaligned { .. })
        ));
        assert!(qemu_layout(256 * MIB + 8192).is_ok());
    }

    #[test]
    fn qemu_layout_rejects_what_the_vmm_rejects() {
        assert!(matches!(
            qemu_layout(4 * MIB),
            Err(QemuConfigError::Layout(LayoutError::OutOfRange { .. }))
        ));
        assert!(matches!(
            qemu_layout(251 * GIB),
            Err(QemuConfigError::Layout(LayoutError::OutOfRange { .. }))
        ));
    }

    #[test]
    fn qemu_config_block_fits_qemu_memory() {
        let spec: WorkloadSpec = "hotcold:ws=64M,write=0.3,seed=7".parse().unwrap();
        for size in [256 * MIB, 4 * GIB] {
            let layout = qemu_layout(size).unwrap();
            let cfg = qemu_config_block(&spec, size, 1000, 100, false).unwrap();
            assert_eq!(cfg.vcpus, 1);
            assert_eq!((cfg.steps, cfg.report_every), (1000, 100));
            assert_eq!(cfg.map_top, layout.top().0);
            for r in &cfg.ranges {
                assert!(r.base >= abi::DATA_GPA);
                assert!(layout.contains(Gpa(r.base), r.pages * PAGE_SIZE));
            }
        }
        let too_big: WorkloadSpec = "uniform:ws=1G".parse().unwrap();
        assert!(matches!(
            qemu_config_block(&too_big, 256 * MIB, 1, 0, false),
            Err(QemuConfigError::Workload(_))
        ));
    }

    #[test]
    fn qemu_config_block_sets_exit_bells_with_exit_on_done() {
        let spec: WorkloadSpec = "uniform:ws=8M,seed=3".parse().unwrap();
        let plain = qemu_config_block(&spec, 64 * MIB, 10, 0, false).unwrap();
        assert_eq!(plain.flags, abi::FLAG_VERIFY_AT_END);
        let exiting = qemu_config_block(&spec, 64 * MIB, 10, 0, true).unwrap();
        assert_eq!(
            exiting.flags,
            abi::FLAG_VERIFY_AT_END | abi::FLAG_EXIT_BELLS
        );
        // The same block the VMM would get otherwise.
        let run = RunOptions {
            vcpus: 1,
            steps: 10,
            report_every: 0,
            verify_at_end: true,
        };
        let vmm = config_block(&spec, &MemoryLayout::for_size(64 * MIB).unwrap(), &run).unwrap();
        assert_eq!(plain, vmm);
    }

    #[test]
    fn exit_status_of_the_doorbell() {
        // Without exit bells, every bell of CPU 0 gives status 1, QEMU's own error status.
        assert_eq!(bell_exit_status(abi::BELL_DONE << 8), 1);
        assert_eq!(bell_exit_status(abi::BELL_RUNNING << 8), 1);
        // With them, the outcomes are told apart.
        assert_eq!(done_exit_code(), 5);
        assert_eq!(verify_failed_exit_code(), 7);
        assert_eq!(exception_exit_code(), 9);
    }

    #[test]
    fn exit_status_decides_the_outcome() {
        let serial = QemuOutcome::Exited;
        assert_eq!(outcome_of_exit_code(5, serial), QemuOutcome::Finished);
        assert_eq!(outcome_of_exit_code(7, serial), QemuOutcome::VerifyFailed);
        assert_eq!(outcome_of_exit_code(9, serial), QemuOutcome::Exception);
        assert_eq!(outcome_of_exit_code(1, serial), QemuOutcome::Exited);
        assert_eq!(
            outcome_of_exit_code(0, QemuOutcome::Finished),
            QemuOutcome::Finished
        );
    }

    #[test]
    fn command_line() {
        let guest = QemuGuest {
            qemu_binary: "/usr/bin/qemu-system-x86_64".into(),
            mem_bytes: 256 * MIB,
            image: "/tmp/g/guest.elf".into(),
            serial: "/tmp/g/serial.txt".into(),
            exit_on_done: true,
            extra_args: vec!["-S".into()],
        };
        let cmd = guest.command();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        let joined = args.join(" ");
        assert_eq!(cmd.get_program(), "/usr/bin/qemu-system-x86_64");
        for part in [
            "-nodefaults",
            "-accel kvm",
            "-machine pc",
            "-m 256M",
            "-display none",
            "-no-reboot",
            "-kernel /tmp/g/guest.elf",
            "-serial file:/tmp/g/serial.txt",
            "-device isa-debug-exit,iobase=0xf4,iosize=0x4",
        ] {
            assert!(joined.contains(part), "{part:?} missing from {joined}");
        }
        assert_eq!(args.last().map(|a| a.as_ref()), Some("-S"));
        assert!(!joined.contains("-nographic"));

        let plain = QemuGuest {
            exit_on_done: false,
            mem_bytes: 64 * MIB + 8192,
            ..guest
        };
        let joined: Vec<_> = plain
            .command()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(!joined.iter().any(|a| a.contains("isa-debug-exit")));
        assert!(joined.windows(2).any(|w| w[0] == "-m" && w[1] == "65544K"));
    }

    #[test]
    fn serial_lines_are_classified_when_complete() {
        let dir = std::env::temp_dir().join(format!("tsubame-qemu-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serial.txt");
        std::fs::write(&path, "cpu 0 step 500000\ncpu 0 done after 10").unwrap();
        let mut watch = SerialWatch::new(&path);
        watch.poll().unwrap();
        assert_eq!(
            watch.outcome(),
            QemuOutcome::Exited,
            "line not complete yet"
        );
        std::fs::write(&path, "cpu 0 step 500000\ncpu 0 done after 1000 steps\n").unwrap();
        watch.poll().unwrap();
        assert_eq!(watch.outcome(), QemuOutcome::Finished);
        std::fs::write(
            &path,
            "cpu 0 step 500000\ncpu 0 done after 1000 steps\ncpu 0: VERIFY ERROR kind 2\n",
        )
        .unwrap();
        watch.poll().unwrap();
        assert_eq!(watch.outcome(), QemuOutcome::VerifyFailed);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn find_qemu_returns_an_executable() {
        if let Some(path) = find_qemu() {
            assert!(path.is_file());
            assert!(path.ends_with(QEMU_BINARY));
        }
    }
}
