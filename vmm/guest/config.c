/* The default config block: one CPU, 1 MiB working set, uniform, 30% writes, forever.
 * Loaders overwrite it (the Tsubame VMM in guest memory, `tsubame guest-image` in the file). */
#include "abi.h"

__attribute__((section(".tsubame_config"), used))
const struct tsb_config tsb_default_config = {
    .magic = TSB_CONFIG_MAGIC,
    .version = TSB_ABI_VERSION,
    .size = sizeof(struct tsb_config),
    .vcpus = 1,
    .pattern = TSB_PATTERN_UNIFORM,
    .seed = 1,
    .steps = 0,
    .write_ppm = 300000,
    .hot_pages_ppm = 100000,
    .hot_access_ppm = 900000,
    .flags = TSB_FLAG_VERIFY_AT_END,
    .report_every = 1 << 20,
    .map_top = 0x40000000,
    .vtable_gpa = TSB_DATA_GPA,
    .nranges = 1,
    .ranges = { { TSB_DATA_GPA + 0x1000, 256 } },
};
