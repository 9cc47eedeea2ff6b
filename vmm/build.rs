//! Builds the built-in guest (`guest/`) with the host's gcc and binutils into a multiboot ELF32
//! image that both the Tsubame VMM and `qemu-system-x86_64 -kernel` load.
//!
//! The guest is C and assembly rather than Rust: a bare-metal Rust target would need
//! `rustup target add`, which these machines cannot download, while gcc and binutils are on every
//! fresh machine.

use std::path::{Path, PathBuf};
use std::process::Command;

const CFLAGS: &[&str] = &[
    "-m64",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-nostdlib",
    "-mno-red-zone",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-builtin",
    "-Wall",
    "-Wextra",
    "-Werror",
];

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}; install gcc and binutils"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn compile(src: &Path, out: &Path, extra: &[&str]) {
    let dir = src.parent().expect("guest source has a directory");
    run(Command::new("gcc")
        .args(CFLAGS)
        .args(extra)
        .arg("-I")
        .arg(dir)
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(out));
}

fn main() {
    let guest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("guest");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for f in [
        "abi.h",
        "boot.S",
        "boot_setup.c",
        "workload.c",
        "config.c",
        "guest.ld",
    ] {
        println!("cargo:rerun-if-changed=guest/{f}");
    }
    // (source, extra flags): CPL0 code is emulated and must not use SSE; the CPL3 workload may.
    let units: [(&str, &[&str]); 4] = [
        ("boot.S", &[]),
        ("boot_setup.c", &["-O2", "-mgeneral-regs-only"]),
        ("workload.c", &["-O3"]),
        ("config.c", &["-O2"]),
    ];
    let mut objects = Vec::new();
    for (src, extra) in units {
        let obj = out.join(format!("{src}.o"));
        compile(&guest.join(src), &obj, extra);
        objects.push(obj);
    }
    let elf64 = out.join("guest64.elf");
    run(Command::new("ld")
        .args(["-nostdlib", "-static", "--no-warn-rwx-segments", "-T"])
        .arg(guest.join("guest.ld"))
        .arg("-o")
        .arg(&elf64)
        .args(&objects));
    // Multiboot loaders (QEMU) take 32-bit ELF images only; the code inside is unchanged.
    run(Command::new("objcopy")
        .args(["-O", "elf32-i386"])
        .arg(&elf64)
        .arg(out.join("guest.elf")));
}
