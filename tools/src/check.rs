//! `tsubame check`: can this host run Tsubame? Checks /dev/kvm, /dev/userfaultfd and QEMU, and
//! says how to fix what is missing.

use std::fs::OpenOptions;
use std::io::ErrorKind;

use anyhow::{bail, Result};

/// Check that this host can run Tsubame (KVM, userfaultfd, QEMU for benchmarks).
///
/// Exit status 0 when everything required is there.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Also require qemu-system-x86_64 (needed by the QEMU comparison benchmarks).
    #[arg(long)]
    pub qemu: bool,
}

/// Opens a device read-write and explains a failure.
pub fn open_device(path: &str, what: &str) -> Result<std::fs::File> {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == ErrorKind::NotFound => bail!(
            "{path} does not exist: this host has no {what}; Tsubame needs a Linux host with it \
             (load the module, or run on a machine that has it)"
        ),
        Err(e) if e.kind() == ErrorKind::PermissionDenied => bail!(
            "no permission to open {path} ({what}): run as root, or give this user access \
             (e.g. add it to the group that owns {path})"
        ),
        Err(e) => bail!("cannot open {path} ({what}): {e}"),
    }
}

/// Fails with a clear message unless /dev/kvm can be opened.
pub fn require_kvm() -> Result<()> {
    open_device("/dev/kvm", "KVM").map(drop)
}

/// Fails with a clear message unless /dev/userfaultfd can be opened.
pub fn require_userfaultfd() -> Result<()> {
    open_device("/dev/userfaultfd", "userfaultfd").map(drop)
}

pub fn check(a: &CheckArgs) -> Result<i32> {
    let mut ok = true;
    let mut report = |name: &str, r: Result<String>| match r {
        Ok(detail) => println!("ok      {name}: {detail}"),
        Err(e) => {
            ok = false;
            println!("MISSING {name}: {e:#}");
        }
    };
    report(
        "kvm",
        require_kvm().map(|()| "/dev/kvm opens read-write".into()),
    );
    report(
        "userfaultfd",
        require_userfaultfd().map(|()| "/dev/userfaultfd opens read-write".into()),
    );
    if a.qemu {
        report(
            "qemu",
            tsubame_qemu_peer::guest::find_qemu()
                .map(|p| p.display().to_string())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "qemu-system-x86_64 is not on PATH: apt-get install qemu-system-x86"
                    )
                }),
        );
    }
    Ok(if ok { 0 } else { 1 })
}
