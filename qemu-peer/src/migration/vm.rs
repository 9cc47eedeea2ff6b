//! One QEMU process of a run ([`QemuVm`]: its QMP connection, its progress probe, the digest
//! of its memory), the directory and guest image a run shares ([`Prepared`]), and the waits
//! for the guest's workload and its last serial line.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::digest::{digest_ranges, ranges_without_firmware, workload_ranges, MemoryDigests};
use super::qmp::{parse_gpa2hva, parse_xp, Qmp, QmpError, COMMAND_TIMEOUT};
use super::{ProgressProbe, QemuMigrationConfig, QemuMigrationError, Result, Side};
use crate::guest::{find_qemu, qemu_config_block, qemu_layout, QemuGuest, RunningQemu};
use tsubame_vmm::guest::{abi, image_with_config, GUEST_IMAGE};
use tsubame_vmm::memory::{Gpa, MemoryError, MemoryLayout, PAGE_SIZE};

/// Bytes of one mailbox slot, the most [`QemuVm::read_mailbox`] reads.
const SLOT_BYTES: usize = 64;
const _: () = assert!(SLOT_BYTES as u64 == abi::MAILBOX_SLOT_SIZE);

/// How long QEMU may take to create its QMP socket and greet.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the guest's progress is read while it boots (nothing to measure yet).
const BOOT_POLL: Duration = Duration::from_millis(20);

/// A unique prefix for the files of one run (several runs may share a work dir).
fn run_tag() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "qmig-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The name of the image in a run's directory. QEMU's multiboot loader writes the `-kernel`
/// argument into guest memory (as the multiboot command line, on the page after the image), so
/// every run starts QEMU in its own directory with this same relative name: a different path
/// would make the memory of otherwise identical runs differ.
const IMAGE_NAME: &str = "guest.elf";

/// What both kinds of runs share: the QEMU binary, the config block, and the run's own
/// directory under the work dir with the image in it (removed on drop, with everything the run
/// put there: QMP sockets, serial output, memory dumps).
#[derive(Debug)]
pub(super) struct Prepared {
    qemu: PathBuf,
    block: abi::ConfigBlock,
    layout: MemoryLayout,
    dir: PathBuf,
}

impl Prepared {
    pub(super) fn new(config: &QemuMigrationConfig) -> Result<Self> {
        let qemu = match &config.qemu_binary {
            Some(path) => path.clone(),
            None => find_qemu().ok_or(QemuMigrationError::NoQemu)?,
        };
        let layout = qemu_layout(config.mem_bytes)?;
        // No exit bells: QEMU must keep running when the guest is done, to be digested.
        let block = qemu_config_block(
            &config.workload,
            config.mem_bytes,
            config.steps,
            config.report_every,
            false,
        )?;
        let image = image_with_config(GUEST_IMAGE, &block)?;
        let dir = config.work_dir.join(run_tag());
        std::fs::create_dir(&dir).map_err(|source| QemuMigrationError::File {
            what: "cannot create the run directory",
            path: dir.clone(),
            source,
        })?;
        let prep = Self {
            qemu,
            block,
            layout,
            dir,
        };
        let path = prep.dir.join(IMAGE_NAME);
        std::fs::write(&path, image).map_err(|source| QemuMigrationError::File {
            what: "cannot write the guest image",
            path,
            source,
        })?;
        Ok(prep)
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How [`QemuVm`] reads the mailbox.
#[derive(Debug)]
enum Mailbox {
    /// QEMU's memory and the host address of the mailbox page in it.
    ProcMem {
        mem: File,
        hva: u64,
    },
    Hmp,
}

/// One QEMU process with its QMP connection; killed (and its socket removed) on drop.
#[derive(Debug)]
pub(super) struct QemuVm {
    side: Side,
    pub(super) qmp: Qmp,
    process: RunningQemu,
    qmp_path: PathBuf,
    serial: PathBuf,
    mailbox: Mailbox,
    pub(super) started: Instant,
    /// Progress reads: count and total time, and reads that found the mailbox unreadable.
    pub(super) probes: u64,
    pub(super) probe_time: Duration,
    pub(super) unreadable: u64,
}

impl QemuVm {
    pub(super) fn spawn(
        prep: &Prepared,
        config: &QemuMigrationConfig,
        side: Side,
        incoming: bool,
    ) -> Result<Self> {
        let name = match side {
            Side::Source => "src",
            Side::Destination => "dst",
        };
        let qmp_path = prep.dir.join(format!("{name}.qmp"));
        // sun_path holds 108 bytes including the terminating NUL.
        if qmp_path.as_os_str().len() > 107 {
            return Err(QemuMigrationError::Config(format!(
                "work dir {} is too long for a unix socket path; use a shorter one",
                config.work_dir.display()
            )));
        }
        let _ = std::fs::remove_file(&qmp_path);
        let serial = prep.dir.join(format!("{name}-serial.txt"));
        let socket = qmp_path.to_str().ok_or_else(|| {
            QemuMigrationError::Config(format!(
                "work dir {} is not UTF-8",
                config.work_dir.display()
            ))
        })?;
        // QEMU's option syntax: a comma inside a value is written twice.
        let mut extra_args = vec![
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", socket.replace(',', ",,")),
        ];
        if incoming {
            extra_args.extend(["-incoming".into(), "defer".into()]);
        }
        let guest = QemuGuest {
            qemu_binary: prep.qemu.clone(),
            mem_bytes: config.mem_bytes,
            image: IMAGE_NAME.into(),
            serial: serial.clone(),
            exit_on_done: false,
            extra_args,
        };
        let started = Instant::now();
        let mut process = RunningQemu::spawn(guest.command().current_dir(&prep.dir), &prep.qemu)?;
        let qmp = match Qmp::connect(&qmp_path, CONNECT_TIMEOUT, || !process.has_exited()) {
            Ok(qmp) => qmp,
            Err(source) => {
                let exited = process.has_exited();
                let _ = process.stop();
                let stderr = process.take_stderr();
                return Err(if exited {
                    QemuMigrationError::Exited {
                        side,
                        status: "while starting".into(),
                        stderr,
                    }
                } else {
                    QemuMigrationError::Qmp { side, source }
                });
            }
        };
        let mut vm = Self {
            side,
            qmp,
            process,
            qmp_path,
            serial,
            mailbox: Mailbox::Hmp,
            started,
            probes: 0,
            probe_time: Duration::ZERO,
            unreadable: 0,
        };
        if config.probe == ProgressProbe::ProcMem {
            match vm.open_proc_mem() {
                Ok(mailbox) => vm.mailbox = mailbox,
                Err(why) => log::warn!(
                    "QEMU ({side}): reading the mailbox through HMP xp ({why}); each sample \
                     costs ~1 ms of QEMU's main thread"
                ),
            }
        }
        Ok(vm)
    }

    fn open_proc_mem(&mut self) -> Result<Mailbox, String> {
        let out = self
            .qmp
            .hmp(&format!("gpa2hva {:#x}", abi::MAILBOX_GPA))
            .map_err(|e| e.to_string())?;
        let hva = parse_gpa2hva(&out).ok_or_else(|| format!("gpa2hva said {out:?}"))?;
        let path = format!("/proc/{}/mem", self.process.pid());
        let mem = File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
        let mut probe = [0u8; 8];
        mem.read_exact_at(&mut probe, hva)
            .map_err(|e| format!("cannot read {path}: {e}"))?;
        Ok(Mailbox::ProcMem { mem, hva })
    }

    /// Turns a QMP error into the better explanation when QEMU has exited.
    fn qmp_error(&mut self, source: QmpError) -> QemuMigrationError {
        if matches!(source, QmpError::Closed { .. } | QmpError::Send { .. })
            || self.process.has_exited()
        {
            return self.exited_error();
        }
        QemuMigrationError::Qmp {
            side: self.side,
            source,
        }
    }

    /// QEMU is gone (or is made so): its exit status and stderr.
    fn exited_error(&mut self) -> QemuMigrationError {
        // Give an exiting QEMU a moment to finish, then make sure it is gone.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.process.has_exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = if self.process.has_exited() {
            self.process
                .wait()
                .map_or_else(|e| e.to_string(), |s| s.to_string())
        } else {
            let _ = self.process.stop();
            "killed: it stopped answering".into()
        };
        QemuMigrationError::Exited {
            side: self.side,
            status,
            stderr: self.process.take_stderr(),
        }
    }

    pub(super) fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.qmp
            .execute(command, arguments)
            .map_err(|e| self.qmp_error(e))
    }

    fn execute_within(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        self.qmp
            .execute_within(command, arguments, timeout)
            .map_err(|e| self.qmp_error(e))
    }

    /// Reads `N` consecutive u64 of the mailbox page from `gpa` on.
    ///
    /// `None` when QEMU's memory cannot be read there right now: on a postcopy destination,
    /// until the mailbox page has arrived, a `/proc/PID/mem` read fails (the kernel does not
    /// wait on userfaultfd for a remote access) and leaves the page missing, which is what we
    /// need. (Reading it between QEMU's postcopy discard and its userfaultfd registration, i.e.
    /// before the destination's `RESUME`, would instead map a zero page there and make QEMU's
    /// `postcopy_place_page` fail with EEXIST: seen here. Nothing reads a destination before
    /// its `RESUME`.)
    fn read_mailbox<const N: usize>(&mut self, gpa: u64) -> Result<Option<[u64; N]>> {
        debug_assert!(
            gpa >= abi::MAILBOX_GPA
                && gpa + 8 * N as u64 <= abi::MAILBOX_GPA + PAGE_SIZE
                && 8 * N as u64 <= abi::MAILBOX_SLOT_SIZE
        );
        let start = Instant::now();
        let mut out = [0u64; N];
        match &self.mailbox {
            Mailbox::ProcMem { mem, hva } => {
                // One mailbox slot at most (checked above): no allocation per sample.
                let mut slot = [0u8; SLOT_BYTES];
                let buf = &mut slot[..8 * N];
                if mem
                    .read_exact_at(buf, hva + (gpa - abi::MAILBOX_GPA))
                    .is_err()
                {
                    if self.process.has_exited() {
                        return Err(self.exited_error());
                    }
                    self.unreadable += 1;
                    return Ok(None);
                }
                for (v, b) in out.iter_mut().zip(buf.chunks_exact(8)) {
                    *v = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                }
            }
            Mailbox::Hmp => {
                let line = format!("xp /{N}gx {gpa:#x}");
                let text = self.qmp.hmp(&line).map_err(|e| self.qmp_error(e))?;
                let values = parse_xp(&text).filter(|v| v.len() == N).ok_or_else(|| {
                    QemuMigrationError::Qmp {
                        side: self.side,
                        source: QmpError::Protocol {
                            command: line.clone(),
                            what: text.clone(),
                        },
                    }
                })?;
                out.copy_from_slice(&values);
            }
        }
        self.probes += 1;
        self.probe_time += start.elapsed();
        Ok(Some(out))
    }

    /// `(state, steps)` of CPU 0 and the midpoint of the read; `None` if the mailbox cannot be
    /// read yet ([`QemuVm::read_mailbox`]).
    pub(super) fn progress(&mut self) -> Result<Option<(u64, u64, Instant)>> {
        let before = Instant::now();
        let Some([state, steps]) =
            self.read_mailbox::<2>(abi::mailbox_slot_field(0, abi::slot::STATE))?
        else {
            return Ok(None);
        };
        let after = Instant::now();
        let mid = before + (after - before) / 2;
        if state == abi::state::ERROR {
            return Err(self.verify_error());
        }
        Ok(Some((state, steps, mid)))
    }

    fn verify_error(&mut self) -> QemuMigrationError {
        // The slot's fields in order, as abi::slot numbers them.
        const _: () = assert!(abi::slot::ERR_KIND == 4 && abi::slot::ERR_FOUND == 7);
        match self.read_mailbox::<8>(abi::mailbox_slot_field(0, abi::slot::STATE)) {
            Ok(Some([_, _, _, _, kind, gfn, expected, found])) => QemuMigrationError::GuestVerify {
                side: self.side,
                kind: abi::verify_error_name(kind),
                gfn,
                expected,
                found,
            },
            Ok(None) => QemuMigrationError::GuestVerify {
                side: self.side,
                kind: "unknown (the mailbox became unreadable)",
                gfn: 0,
                expected: 0,
                found: 0,
            },
            Err(e) => e,
        }
    }

    /// What the guest wrote to its serial port in this QEMU.
    fn serial_text(&self) -> String {
        std::fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub(super) fn check_alive(&mut self) -> Result<()> {
        if self.process.has_exited() {
            return Err(self.exited_error());
        }
        Ok(())
    }

    /// Names of the migration capabilities this QEMU knows.
    pub(super) fn capabilities(&mut self) -> Result<Vec<String>> {
        let caps = self.execute("query-migrate-capabilities", None)?;
        Ok(caps
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["capability"].as_str().map(str::to_owned))
            .collect())
    }

    /// Stops the guest and digests its memory: one `pmemsave` file per region of `layout`,
    /// removed once hashed.
    pub(super) fn digest(&mut self, prep: &Prepared) -> Result<MemoryDigests> {
        self.execute("stop", None)?;
        let mut dumps = Vec::new();
        let result: Result<MemoryDigests> = (|| {
            for (i, region) in prep.layout.regions.iter().enumerate() {
                let path = prep.dir.join(format!("{}-ram{i}.bin", self.side));
                dumps.push(path.clone());
                let filename = path.to_str().ok_or_else(|| {
                    QemuMigrationError::Config(format!("{} is not UTF-8", path.display()))
                })?;
                // ~1 s per GiB here; allow for a slow disk.
                let timeout = COMMAND_TIMEOUT + Duration::from_secs(10 * (region.size >> 30));
                self.execute_within(
                    "pmemsave",
                    Some(json!({ "val": region.gpa, "size": region.size, "filename": filename })),
                    timeout,
                )?;
            }
            let files = dumps
                .iter()
                .map(|p| {
                    File::open(p).map_err(|source| QemuMigrationError::File {
                        what: "cannot open the memory dump",
                        path: p.clone(),
                        source,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let read = |gpa: Gpa, buf: &mut [u8]| -> Result<(), MemoryError> {
                let len = buf.len() as u64;
                let (region, file) = prep
                    .layout
                    .regions
                    .iter()
                    .zip(&files)
                    .find(|(r, _)| gpa >= r.gpa && gpa + len <= r.end())
                    .ok_or(MemoryError::OutOfBounds { gpa, len })?;
                file.read_exact_at(buf, gpa - region.gpa)
                    .map_err(|_| MemoryError::OutOfBounds { gpa, len })
            };
            Ok(MemoryDigests {
                ram: digest_ranges(&prep.layout.regions, read)?,
                ram_without_firmware: digest_ranges(&ranges_without_firmware(&prep.layout), read)?,
                workload: digest_ranges(&workload_ranges(&prep.block), read)?,
            })
        })();
        for path in &dumps {
            let _ = std::fs::remove_file(path);
        }
        result
    }

    pub(super) fn probe_kind(&self) -> ProgressProbe {
        match self.mailbox {
            Mailbox::ProcMem { .. } => ProgressProbe::ProcMem,
            Mailbox::Hmp => ProgressProbe::Hmp,
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.process.stop();
        let _ = std::fs::remove_file(&self.qmp_path);
        let _ = std::fs::remove_file(&self.serial);
    }
}

/// Waits until the guest's serial output (of `vms`, in order, since a line can begin on the
/// source and end on the destination) holds its complete `cpu 0 done after N steps` line. The
/// guest marks itself done in its mailbox *before* printing that line, and stopping it in the
/// middle of the line leaves its stack (the digits `put_dec` formats) different from a run
/// stopped after it: a race seen here as a flaky whole-RAM digest.
pub(super) fn wait_for_done_line(
    vms: &[&QemuVm],
    deadline: Instant,
    timeout: Duration,
) -> Result<()> {
    loop {
        let text: String = vms.iter().map(|vm| vm.serial_text()).collect();
        let done = text
            .split_inclusive('\n')
            .any(|line| line.starts_with("cpu 0 done after ") && line.ends_with('\n'));
        if done {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(QemuMigrationError::Timeout {
                what: format!("waiting for the guest's last serial line; it wrote: {text:?}"),
                after: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The guest's progress while it runs on the source before the migration.
pub(super) struct Warmup {
    /// `(when, steps)` once it has taken its first step.
    pub(super) samples: Vec<(Instant, u64)>,
    pub(super) first_step: Option<Instant>,
}

/// Samples the source's progress until `ready(steps, first_step)` says the guest may migrate.
pub(super) fn wait_for_workload(
    vm: &mut QemuVm,
    config: &QemuMigrationConfig,
    deadline: Instant,
    mut ready: impl FnMut(u64, Option<Instant>) -> bool,
) -> Result<Warmup> {
    let mut samples = Vec::new();
    let mut first_step = None;
    loop {
        vm.check_alive()?;
        let (state, steps, at) = vm
            .progress()?
            .unwrap_or((abi::state::BOOTING, 0, Instant::now()));
        if steps > 0 {
            first_step.get_or_insert(at);
            samples.push((at, steps));
        }
        if ready(steps, first_step) {
            return Ok(Warmup {
                samples,
                first_step,
            });
        }
        if state == abi::state::DONE {
            return Err(QemuMigrationError::FinishedTooEarly {
                steps: config.steps,
            });
        }
        if Instant::now() >= deadline {
            return Err(QemuMigrationError::Timeout {
                what: format!("waiting for the guest's workload (at {steps} steps)"),
                after: config.timeout,
            });
        }
        std::thread::sleep(if steps == 0 {
            BOOT_POLL
        } else {
            config.sample_every
        });
    }
}
