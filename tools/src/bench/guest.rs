//! `tsubame bench guest`: does the guest workload run at native speed? It runs the built-in
//! workload in a VM and the same algorithm (uniform pattern: verify a random page against the
//! version table, rewrite it with the write ratio) natively in this process on a buffer of one
//! vCPU's share of the working set, in the same run, and reports both rates and their ratio.
//! It also measures the memory digest.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tsubame_vmm::devices::CpuStatus;
use tsubame_vmm::guest::WorkloadSpec;
use tsubame_vmm::{SerialOutput, Vm, VmConfig};

use super::machine_info;

/// Measure the built-in guest workload against the same work done natively on the host.
///
/// Example: tsubame bench guest --mem 1G --workload uniform:ws=512M,write=0.3 --steps 5000000
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct GuestBenchArgs {
    /// Guest RAM.
    #[arg(long, default_value = "1G", value_parser = crate::run::parse_mem)]
    pub mem: u64,
    /// vCPUs (each runs --steps steps on its share of the working set).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub vcpus: u32,
    /// Workload (see `tsubame run --help`); uniform keeps the native reference comparable.
    #[arg(long, default_value = "uniform:ws=512M,write=0.3,seed=1")]
    pub workload: WorkloadSpec,
    /// Steps per vCPU.
    #[arg(long, default_value_t = 5_000_000)]
    pub steps: u64,
    /// Also write the results here as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// The guest's algorithm (vmm/guest/workload.c, uniform pattern), natively in this process:
/// per step pick a random page, verify it against the version table (an all-zero check for a
/// page never written, else header and checksum), and with probability `write_ratio` write the
/// next version (body, then checksum). Returns steps per second.
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
fn native_reference(ws_bytes: u64, seed: u64, write_ratio: f64, steps: u64) -> f64 {
    const WORDS: usize = 512;
    const MAGIC: u64 = u64::from_le_bytes(*b"TSBMPAGE");
    fn mix64(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn checksum(w: &[u64]) -> u64 {
        (4..WORDS).fold(0u64, |a, i| {
            a.wrapping_add(w[i] ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
        })
    }
    let pages = (ws_bytes / 4096).max(1) as usize;
    let mut mem = vec![0u64; pages * WORDS];
    let mut versions = vec![0u32; pages];
    let mut rng = mix64(seed);
    let mut next = || {
        rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(rng)
    };
    let write_ppm = (write_ratio * 1e6).round() as u64;
    let below = |r: u64, n: u64| ((u128::from(r) * u128::from(n)) >> 64) as u64;
    let t = Instant::now();
    for _ in 0..steps {
        let p = below(next(), pages as u64) as usize;
        let w = &mut mem[p * WORDS..(p + 1) * WORDS];
        let expected = versions[p];
        let ok = if expected == 0 {
            w.iter().fold(0, |a, x| a | x) == 0
        } else {
            w[0] == MAGIC && w[2] == u64::from(expected) && w[3] == checksum(w)
        };
        assert!(ok, "native reference: page {p} does not verify");
        if below(next(), 1_000_000) < write_ppm {
            let v = expected + 1;
            let gfn = p as u64;
            let base = mix64(seed ^ (gfn << 20) ^ u64::from(v).wrapping_mul(0x2545_f491_4f6c_dd1d));
            for (i, x) in w.iter_mut().enumerate().skip(4) {
                *x = base.wrapping_add((i as u64).wrapping_mul(0xd6e8_feb8_6659_fd93));
            }
            w[0] = MAGIC;
            w[1] = gfn;
            w[2] = u64::from(v);
            w[3] = checksum(w);
            versions[p] = v;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box(&mem);
    steps as f64 / secs
}

#[allow(clippy::cast_precision_loss)]
pub fn bench_guest(a: &GuestBenchArgs) -> Result<i32> {
    crate::check::require_kvm()?;
    let vm = Vm::new(&VmConfig {
        mem_bytes: a.mem,
        vcpus: a.vcpus as usize,
        workload: a.workload.clone(),
        steps: a.steps,
        report_every: 0,
        verify_at_end: false, // measure the steps alone
        serial: SerialOutput::Discard,
    })
    .context("creating the VM")?;
    let t0 = Instant::now();
    vm.resume()?;
    let timeout = Duration::from_secs(3600);
    let (booted, _) = vm.devices().doorbell.wait_for(timeout, |s| {
        s.iter().all(|c| *c != CpuStatus::Booting) || s.iter().any(CpuStatus::is_failure)
    });
    let boot = t0.elapsed();
    if !booted {
        bail!("the guest did not boot within {timeout:?}");
    }
    let t1 = Instant::now();
    if vm.wait_finished(timeout) != tsubame_vmm::WaitOutcome::Reached {
        bail!("the guest did not finish: {:?}", vm.status());
    }
    let run = t1.elapsed().as_secs_f64();
    let p = vm.progress();
    let td = Instant::now();
    let (digest, _) = vm.digest()?;
    let digest_s = td.elapsed().as_secs_f64();
    let mem = vm.memory().layout().total_bytes();
    drop(vm);

    let ws = p.working_set_pages * 4096;
    let per_vcpu_ws = ws / u64::from(a.vcpus);
    let native = native_reference(
        per_vcpu_ws,
        a.workload.seed,
        a.workload.write_ratio,
        a.steps,
    );
    let guest_rate = p.steps as f64 / run;
    let per_vcpu_rate = guest_rate / f64::from(a.vcpus);
    let result = json!({
        "benchmark": "guest",
        "machine": machine_info(),
        "config": {
            "mem_bytes": a.mem, "vcpus": a.vcpus, "workload": a.workload.to_string(),
            "steps_per_vcpu": a.steps, "working_set_bytes": ws,
        },
        "boot_ms": boot.as_secs_f64() * 1e3,
        "run_s": run,
        "guest_steps_per_s": guest_rate,
        "guest_pages_touched_per_s": guest_rate,
        "guest_page_writes_per_s": p.writes as f64 / run,
        "guest_touched_gb_per_s": guest_rate * 4096.0 / 1e9,
        "native_steps_per_s_one_thread": native,
        "guest_vs_native_per_vcpu": per_vcpu_rate / native,
        "digest": digest.to_string(),
        "digest_gb_per_s": mem as f64 / digest_s / 1e9,
    });
    println!(
        "guest workload benchmark ({}, {} vCPU, {} steps/vCPU)",
        a.workload, a.vcpus, a.steps
    );
    println!(
        "  boot (to CPL3 on all vCPUs)   {:>10.1} ms",
        boot.as_secs_f64() * 1e3
    );
    println!(
        "  guest steps/s (= pages/s)     {:>10.3} M",
        guest_rate / 1e6
    );
    println!(
        "  guest page writes/s           {:>10.3} M",
        p.writes as f64 / run / 1e6
    );
    println!(
        "  guest pages touched           {:>10.2} GB/s",
        guest_rate * 4096.0 / 1e9
    );
    println!(
        "  native reference, 1 thread    {:>10.3} M steps/s",
        native / 1e6
    );
    println!(
        "  guest per vCPU / native       {:>10.2}",
        per_vcpu_rate / native
    );
    println!(
        "  memory digest                 {:>10.2} GB/s",
        mem as f64 / digest_s / 1e9
    );
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("  results written to {}", path.display());
    }
    Ok(0)
}
