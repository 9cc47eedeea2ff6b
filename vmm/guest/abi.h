/*
 * The contract between the Tsubame guest and whoever loads it (the Tsubame VMM or QEMU).
 * Mirrored in vmm/src/guest/abi.rs: change both together and bump the version.
 *
 * Guest-physical map (identity-mapped by the guest itself):
 *   0x0010_0000  multiboot header + boot code
 *   0x0010_1000  config block   (written by the loader before the first instruction)
 *   0x0010_2000  mailbox        (written by the guest, read by the VMM without exits)
 *   0x0010_3000  text, data, bss (stacks, TSSes, GDT, IDT)
 *   0x0020_0000  page tables built by the boot code (1 MiB: PML4, PDPT, up to 254 PDs)
 *   0x0040_0000  version table, then the working-set pages (config.ranges)
 */
#ifndef TSUBAME_GUEST_ABI_H
#define TSUBAME_GUEST_ABI_H

#define TSB_CONFIG_GPA      0x101000
#define TSB_MAILBOX_GPA     0x102000
#define TSB_PT_GPA          0x200000
#define TSB_PT_PAGES        256
#define TSB_DATA_GPA        0x400000

#define TSB_MAX_CPUS        32
#define TSB_MAX_RANGES      8

#define TSB_CONFIG_MAGIC    0x314746434d425354ULL /* "TSBMCFG1" */
#define TSB_MAILBOX_MAGIC   0x31584f424d425354ULL /* "TSBMBOX1" */
#define TSB_PAGE_MAGIC      0x454741504d425354ULL /* "TSBMPAGE" */
#define TSB_ABI_VERSION     1

/* EAX at entry: multiboot loaders pass MULTIBOOT_MAGIC to the boot CPU; the Tsubame VMM
 * starts every other vCPU at the same entry with TSB_AP_MAGIC and its index in EBX. */
#define MULTIBOOT_MAGIC     0x2BADB002
#define TSB_AP_MAGIC        0x50414d54 /* "TMAP" */

/* Ports. CPL3 may use exactly these (the TSS I/O bitmap allows them). */
#define TSB_SERIAL_PORT     0x3f8
#define TSB_DOORBELL_PORT   0xf4
/* Doorbell value: (code << 8) | cpu, or for exceptions (vector << 16) | (code << 8). */
#define TSB_BELL_RUNNING    1 /* this CPU entered CPL3 and starts its workload */
#define TSB_BELL_DONE       2 /* this CPU finished its steps (and the final verification) */
#define TSB_BELL_VERIFY     3 /* this CPU found a bad page: details in its mailbox slot */
#define TSB_BELL_EXCEPTION  4 /* a CPU exception reached CPL0: the guest is broken */

#define TSB_PATTERN_SEQUENTIAL 1
#define TSB_PATTERN_UNIFORM    2
#define TSB_PATTERN_HOTCOLD    3

#define TSB_FLAG_VERIFY_AT_END 1
/* Exit bells, for QEMU's isa-debug-exit on the doorbell port: when set, a bell carries only its
 * code (no CPU, no vector), so that isa-debug-exit, which exits on the first write with status
 * (value << 1) | 1, turns done, verify error and exception into distinct exit statuses (5, 7, 9);
 * and the RUNNING bell is not rung, so the first bell is the outcome. The Tsubame VMM never sets
 * it. */
#define TSB_FLAG_EXIT_BELLS    2

#define TSB_STATE_BOOTING   0
#define TSB_STATE_RUNNING   1
#define TSB_STATE_DONE      2
#define TSB_STATE_ERROR     3

#define TSB_ERR_CORRUPT     1 /* checksum or header mismatch */
#define TSB_ERR_ZEROED      2 /* a page the guest wrote reads back as all zeroes */
#define TSB_ERR_STALE       3 /* an older version of the page */
#define TSB_ERR_WRONG_PAGE  4 /* another page's content (header names another gfn) */
#define TSB_ERR_UNEXPECTED  5 /* a page never written holds data */

#ifndef __ASSEMBLER__
#include <stdint.h>

struct tsb_range {
    uint64_t base;  /* guest-physical address, page-aligned */
    uint64_t pages; /* number of 4 KiB pages */
};

struct tsb_config {
    uint64_t magic;
    uint32_t version;
    uint32_t size;           /* sizeof(struct tsb_config) */
    uint32_t vcpus;          /* CPUs that run the workload; the working set is split among them */
    uint32_t pattern;
    uint64_t seed;
    uint64_t steps;          /* per CPU; 0 = run forever */
    uint32_t write_ppm;      /* share of steps that also write the page, in parts per million */
    uint32_t hot_pages_ppm;  /* hot/cold: share of pages that are hot */
    uint32_t hot_access_ppm; /* hot/cold: share of accesses that go to hot pages */
    uint32_t flags;
    uint64_t report_every;   /* steps between serial progress lines; 0 = never */
    uint64_t map_top;        /* identity-map guest-physical [0, map_top) with 2 MiB pages */
    uint64_t vtable_gpa;     /* u32 version per working-set page */
    uint32_t nranges;
    uint32_t reserved;
    struct tsb_range ranges[TSB_MAX_RANGES]; /* the working set, in page-index order */
};

struct tsb_cpu_slot {
    volatile uint64_t state;
    volatile uint64_t steps;
    volatile uint64_t writes;
    volatile uint64_t verified;   /* page accesses that checked a page's content (every step) */
    volatile uint64_t err_kind;
    volatile uint64_t err_gfn;
    volatile uint64_t err_expected_version;
    volatile uint64_t err_found_version;
};

struct tsb_mailbox {
    volatile uint64_t magic;
    volatile uint64_t version;
    volatile uint64_t boot_done;   /* set by the boot CPU when shared tables are ready */
    uint64_t reserved[5];
    struct tsb_cpu_slot cpu[TSB_MAX_CPUS];
};

_Static_assert(sizeof(struct tsb_config) == 88 + 16 * TSB_MAX_RANGES, "config layout");
_Static_assert(__builtin_offsetof(struct tsb_config, flags) == 52, "CFG_FLAGS in boot.S");
_Static_assert(sizeof(struct tsb_cpu_slot) == 64, "slot layout");
_Static_assert(sizeof(struct tsb_mailbox) == 64 + 64 * TSB_MAX_CPUS, "mailbox layout");
_Static_assert(sizeof(struct tsb_mailbox) <= 4096, "mailbox fits its page");
#endif
#endif
