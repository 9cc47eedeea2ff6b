//! `tsubame`: the command line of Tsubame. It parses arguments and calls the libraries; see
//! `tsubame --help` and the README for a tour.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod check;
mod ctl;
mod demo;
mod drill;
mod host;
mod linkem;
mod memserver;
mod run;

/// Tsubame: a postcopy-first VMM and page-server system for Linux/KVM.
///
/// Runs VMs with built-in deterministic guest workloads, drives them through their control
/// sockets, and measures them.
#[derive(Debug, Parser)]
#[command(name = "tsubame", version, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Run(run::RunArgs),
    Ctl(ctl::CtlArgs),
    Check(check::CheckArgs),
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    GuestImage(GuestImageArgs),
    Demo(demo::DemoArgs),
    Drill(drill::DrillArgs),
    Linkem(linkem::LinkemArgs),
    Memserver(memserver::MemserverArgs),
}

/// Write the built-in guest image, configured with a workload, for `qemu-system-x86_64 -kernel`.
///
/// Example: tsubame guest-image --mem 256M --workload hotcold:ws=64M --steps 1000000 -o guest.elf
///          qemu-system-x86_64 -accel kvm -m 256M -kernel guest.elf -display none -serial stdio
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
struct GuestImageArgs {
    /// Guest RAM QEMU will be given (-m), e.g. 256M or 1G: decides where the working set lives.
    #[arg(long, default_value = "256M", value_parser = run::parse_mem)]
    mem: u64,
    /// Workload: PATTERN[:ws=SIZE,write=RATIO,seed=N,...]; see `tsubame run --help`.
    #[arg(long, default_value = "uniform:ws=64M,write=0.3,seed=1")]
    workload: tsubame_vmm::guest::WorkloadSpec,
    /// Steps to run (the guest has one CPU under QEMU); 0 runs forever.
    #[arg(long, default_value_t = 0)]
    steps: u64,
    /// Steps between serial progress lines; 0 = never.
    #[arg(long, default_value_t = 1 << 20)]
    report_every: u64,
    /// Make the guest's final doorbell end QEMU (with `-device isa-debug-exit,iobase=0xf4`):
    /// exit status 5 = finished, 7 = verify error, 9 = CPU exception.
    #[arg(long)]
    exit_on_done: bool,
    /// Where to write the image.
    #[arg(short, long)]
    output: PathBuf,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result: Result<i32> = match cli.command {
        Command::Run(a) => run::run(a),
        Command::Ctl(a) => ctl::ctl(a),
        Command::Check(a) => check::check(&a),
        Command::Bench(b) => bench::bench(b),
        Command::GuestImage(a) => guest_image(&a).map(|()| 0),
        Command::Demo(a) => demo::demo(&a),
        Command::Drill(a) => drill::drill(&a),
        Command::Linkem(a) => linkem::linkem(&a),
        Command::Memserver(a) => memserver::memserver(&a),
    };
    // Memservers told to forget a VM's stale copies hear it before this process goes.
    if !tsubame_vmm::migration::source::finish_chores(std::time::Duration::from_secs(2)) {
        log::warn!("exiting before every memserver was told to forget this VM's pages");
    }
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("tsubame: error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn guest_image(a: &GuestImageArgs) -> Result<()> {
    use anyhow::Context;
    use tsubame_vmm::guest;
    let block = tsubame_qemu_peer::guest::qemu_config_block(
        &a.workload,
        a.mem,
        a.steps,
        a.report_every,
        a.exit_on_done,
    )?;
    let image = guest::image_with_config(guest::GUEST_IMAGE, &block)?;
    std::fs::write(&a.output, image)
        .with_context(|| format!("writing the guest image to {}", a.output.display()))?;
    let exit_device = if a.exit_on_done {
        " -device isa-debug-exit,iobase=0xf4,iosize=0x4"
    } else {
        ""
    };
    eprintln!(
        "wrote {} ({} working-set pages, {} steps): run it with\n  \
         qemu-system-x86_64 -accel kvm -machine pc -m {}M -kernel {} -display none -serial stdio{exit_device}",
        a.output.display(),
        block.working_set_pages(),
        a.steps,
        a.mem >> 20,
        a.output.display(),
    );
    if a.exit_on_done {
        eprintln!(
            "QEMU exits with status {} when the guest finished",
            tsubame_qemu_peer::guest::done_exit_code()
        );
    }
    Ok(())
}
