//! The `tsubame` command line: bad input fails with a message that says what to do.

use std::process::{Command, Output};

fn tsubame(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tsubame"))
        .args(args)
        .output()
        .expect("running tsubame")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fails_with(args: &[&str], needle: &str) {
    let o = tsubame(args);
    assert!(!o.status.success(), "tsubame {args:?} should fail");
    let e = stderr(&o);
    assert!(
        e.contains(needle),
        "tsubame {args:?}: expected '{needle}' in:\n{e}"
    );
}

#[test]
fn bad_sizes_are_explained() {
    fails_with(&["run", "--mem", "12Q"], "512M");
    fails_with(&["run", "--mem", "1M"], "between 8 MiB");
    fails_with(
        &["run", "--mem", "64M", "--workload", "uniform:ws=1G"],
        "raise --mem",
    );
}

#[test]
fn bad_workloads_are_explained() {
    fails_with(
        &["run", "--workload", "zigzag"],
        "use seq, uniform or hotcold",
    );
    fails_with(&["run", "--workload", "uniform:write=2"], "between 0 and 1");
    fails_with(&["run", "--workload", "uniform:color=red"], "options are");
    fails_with(&["run", "--vcpus", "0"], "1..=32");
}

#[test]
fn restore_needs_a_snapshot() {
    fails_with(
        &["run", "--restore", "/etc/hostname"],
        "not a Tsubame snapshot",
    );
    fails_with(
        &["run", "--restore", "/nonexistent/vm.snap"],
        "No such file",
    );
    fails_with(
        &["run", "--restore", "/etc/hostname", "--mem", "1G"],
        "cannot be used with",
    );
}

#[test]
fn ctl_without_a_vm_is_explained() {
    fails_with(
        &["ctl", "/nonexistent.sock", "query-status"],
        "is the VM running",
    );
    fails_with(
        &["ctl", "/nonexistent.sock", "save", "nokeyvalue"],
        "KEY=VALUE",
    );
}

#[test]
fn missing_kvm_is_explained() {
    // A private mount namespace whose /dev lacks kvm: what a host without KVM looks like.
    let o = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec {} run --mem 64M",
            env!("CARGO_BIN_EXE_tsubame")
        ))
        .output()
        .expect("unshare (util-linux) runs");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("/dev/kvm does not exist"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn no_permission_is_explained() {
    // As an unprivileged user, neither /dev/kvm nor /dev/userfaultfd (both root-only) opens.
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_tsubame"))
        .arg("check")
        .output()
        .expect("setpriv (util-linux) runs");
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("no permission to open /dev/kvm"), "{out}");
    assert!(
        out.contains("no permission to open /dev/userfaultfd"),
        "{out}"
    );
}

#[test]
fn check_passes_here() {
    let o = tsubame(&["check"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn run_prints_a_digest() {
    let o = tsubame(&[
        "run",
        "--mem",
        "32M",
        "--workload",
        "seq:ws=4M",
        "--steps",
        "10000",
        "--serial",
        "none",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("digest "), "{out}");
    assert!(
        stderr(&o).contains("finished: 10000 steps"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn guest_image_embeds_the_workload() {
    let dir = std::env::temp_dir().join(format!("tsubame-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("guest.elf");
    let o = tsubame(&[
        "guest-image",
        "--mem",
        "256M",
        "--workload",
        "hotcold:ws=64M,seed=9",
        "--steps",
        "1000",
        "-o",
        img.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF");
    assert_ne!(
        bytes,
        tsubame_vmm::guest::GUEST_IMAGE,
        "the config block was not patched in"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
