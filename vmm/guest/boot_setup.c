/*
 * CPL0 setup run once by the boot CPU in long mode: per-CPU TSSes (with the I/O bitmap that lets
 * CPL3 reach the serial port and the doorbell), their GDT descriptors, the exception IDT, and the
 * mailbox header. Compiled with -mgeneral-regs-only: this code is emulated, keep it small.
 */
#include "abi.h"

struct tss {
    uint32_t reserved0;
    uint64_t rsp0;
    uint64_t rsp1;
    uint64_t rsp2;
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3;
    uint16_t iopb_offset;
    uint8_t iopb[128 + 1]; /* ports 0..0x3ff, then the 0xff terminator */
} __attribute__((packed));

_Static_assert(sizeof(struct tss) == 104 + 129, "tss layout");

extern uint64_t gdt_tss[];
extern uint8_t idt[];
extern uint64_t exception_table[];
extern uint8_t kernel_stacks[];

static struct tss tsses[TSB_MAX_CPUS] __attribute__((aligned(64)));

static void allow_port(struct tss *t, unsigned port)
{
    t->iopb[port / 8] &= (uint8_t)~(1u << (port % 8));
}

void boot_setup_tables(void)
{
    struct tsb_mailbox *mb = (struct tsb_mailbox *)TSB_MAILBOX_GPA;
    for (unsigned c = 0; c < TSB_MAX_CPUS; c++) {
        struct tss *t = &tsses[c];
        t->rsp0 = (uint64_t)(kernel_stacks + (c + 1) * 4096);
        t->iopb_offset = 104;
        for (unsigned i = 0; i < sizeof t->iopb; i++)
            t->iopb[i] = 0xff;
        allow_port(t, TSB_SERIAL_PORT);
        for (unsigned p = 0; p < 4; p++)
            allow_port(t, TSB_DOORBELL_PORT + p);
        uint64_t base = (uint64_t)t;
        uint64_t limit = sizeof(struct tss) - 1;
        gdt_tss[2 * c] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ULL << 40) |
                         (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
        gdt_tss[2 * c + 1] = base >> 32;
    }
    for (unsigned v = 0; v < 32; v++) {
        uint64_t h = exception_table[v];
        uint64_t *gate = (uint64_t *)(idt + 16 * v);
        /* 64-bit interrupt gate, DPL0, kernel code selector 0x08 */
        gate[0] = (h & 0xffff) | (0x08ULL << 16) | (0x8eULL << 40) | (((h >> 16) & 0xffff) << 48);
        gate[1] = h >> 32;
    }
    mb->magic = TSB_MAILBOX_MAGIC;
    mb->version = TSB_ABI_VERSION;
    mb->boot_done = 1;
}
