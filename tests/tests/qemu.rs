use tsubame_vmm::guest::{self, RunOptions, WorkloadSpec};
use tsubame_vmm::memory::MemoryLayout;
#[test]
fn dump() {
    let layout = MemoryLayout::for_size(256 << 20).unwrap();
    let spec: WorkloadSpec = "hotcold:ws=64M,write=0.3,seed=7".parse().unwrap();
    let run = RunOptions {
        vcpus: 1,
        steps: 2_000_000,
        report_every: 500_000,
        verify_at_end: true,
    };
    let cfg = guest::config_block(&spec, &layout, &run).unwrap();
    let img = guest::image_with_config(guest::GUEST_IMAGE, &cfg).unwrap();
    std::fs::write("/tmp/qg/guest.elf", img).unwrap();
    std::fs::write("/tmp/qg/raw.elf", guest::GUEST_IMAGE).unwrap();
}
