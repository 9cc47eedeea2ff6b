/*
 * The CPL3 workload: each CPU owns a slice of the working set and runs `steps` steps on it.
 * A step picks a page (sequential, uniform random, or hot/cold), reads it back and verifies it,
 * and with probability `write_ppm` then writes a new version of it. A written page carries a
 * header (magic, gfn, version, checksum) and a body derived from (seed, gfn, version); the expected version of every page lives
 * in a version table in guest memory. So a wrong, stale, zeroed or corrupted page is caught here,
 * inside the guest, whatever moved the memory underneath.
 *
 * Everything is a function of the config and the step count: the same config run for the same
 * number of steps leaves the same memory, whether or not the VM was paused, saved and restored, or
 * migrated. No clocks, no interrupts, no shared state between CPUs (each CPU has its own pages,
 * its own slice of the version table and its own mailbox slot).
 */
#include "abi.h"

#define PAGE_WORDS 512
#define PPM 1000000u

static const volatile struct tsb_config *const cfg = (const struct tsb_config *)TSB_CONFIG_GPA;
static struct tsb_mailbox *const mb = (struct tsb_mailbox *)TSB_MAILBOX_GPA;

struct cpu_state {
    uint64_t rng;
    uint64_t first;    /* first working-set page index of this CPU */
    uint64_t pages;    /* pages owned by this CPU */
    uint64_t hot;      /* hot pages among them (hot/cold) */
} __attribute__((aligned(64)));

static struct cpu_state cpus[TSB_MAX_CPUS];

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(uint16_t port, uint32_t v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static void bell(uint32_t code, uint32_t cpu)
{
    if (cfg->flags & TSB_FLAG_EXIT_BELLS) {
        /* Under QEMU's isa-debug-exit the first bell ends the VM: ring only the outcome. */
        if (code != TSB_BELL_RUNNING)
            outl(TSB_DOORBELL_PORT, code);
        return;
    }
    outl(TSB_DOORBELL_PORT, (code << 8) | cpu);
}

static void puts_serial(const char *s)
{
    while (*s)
        outb(TSB_SERIAL_PORT, (uint8_t)*s++);
}

static void put_dec(uint64_t v)
{
    char buf[24];
    int i = 23;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts_serial(&buf[i]);
}

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t next_rand(struct cpu_state *c)
{
    c->rng += 0x9e3779b97f4a7c15ULL; /* splitmix64 */
    return mix64(c->rng);
}

/* uniform in [0, n) without division */
static inline uint64_t below(uint64_t r, uint64_t n)
{
    return (uint64_t)(((unsigned __int128)r * n) >> 64);
}

static inline uint64_t page_gpa(uint64_t index)
{
    for (uint32_t i = 0; i < cfg->nranges; i++) {
        uint64_t n = cfg->ranges[i].pages;
        if (index < n)
            return cfg->ranges[i].base + index * 4096;
        index -= n;
    }
    return 0; /* unreachable for a valid index */
}

static inline uint64_t body_word(uint64_t base, uint64_t i)
{
    return base + i * 0xd6e8feb86659fd93ULL;
}

static inline uint64_t checksum(const uint64_t *w)
{
    uint64_t sum = 0;
    for (uint64_t i = 4; i < PAGE_WORDS; i++)
        sum += w[i] ^ (i * 0x9e3779b97f4a7c15ULL);
    return sum;
}

static void write_page(uint64_t gpa, uint64_t version)
{
    uint64_t *w = (uint64_t *)gpa;
    uint64_t gfn = gpa >> 12;
    uint64_t base = mix64(cfg->seed ^ (gfn << 20) ^ (version * 0x2545f4914f6cdd1dULL));
    for (uint64_t i = 4; i < PAGE_WORDS; i++)
        w[i] = body_word(base, i);
    w[0] = TSB_PAGE_MAGIC;
    w[1] = gfn;
    w[2] = version;
    w[3] = checksum(w);
}

static int all_zero(const uint64_t *w)
{
    uint64_t acc = 0;
    for (uint64_t i = 0; i < PAGE_WORDS; i++)
        acc |= w[i];
    return acc == 0;
}

/* Returns 0 if the page is what the version table says, else a TSB_ERR_* kind. */
static uint64_t check_page(uint64_t gpa, uint64_t expected, uint64_t *found)
{
    const uint64_t *w = (const uint64_t *)gpa;
    *found = 0;
    if (expected == 0)
        return all_zero(w) ? 0 : TSB_ERR_UNEXPECTED;
    if (w[0] != TSB_PAGE_MAGIC)
        return all_zero(w) ? TSB_ERR_ZEROED : TSB_ERR_CORRUPT;
    *found = w[2];
    if (w[1] != gpa >> 12)
        return TSB_ERR_WRONG_PAGE;
    if (w[3] != checksum(w))
        return TSB_ERR_CORRUPT;
    if (w[2] != expected)
        return w[2] < expected ? TSB_ERR_STALE : TSB_ERR_CORRUPT;
    return 0;
}

static void __attribute__((noreturn)) fail(uint32_t cpu, uint64_t kind, uint64_t gpa,
                                           uint64_t expected, uint64_t found)
{
    struct tsb_cpu_slot *s = &mb->cpu[cpu];
    s->err_kind = kind;
    s->err_gfn = gpa >> 12;
    s->err_expected_version = expected;
    s->err_found_version = found;
    s->state = TSB_STATE_ERROR;
    puts_serial("cpu ");
    put_dec(cpu);
    puts_serial(": VERIFY ERROR kind ");
    put_dec(kind);
    puts_serial(" gfn ");
    put_dec(gpa >> 12);
    puts_serial(" expected version ");
    put_dec(expected);
    puts_serial(" found ");
    put_dec(found);
    puts_serial("\n");
    for (;;)
        bell(TSB_BELL_VERIFY, cpu);
}

static inline uint64_t pick_page(struct cpu_state *c, uint64_t step)
{
    switch (cfg->pattern) {
    case TSB_PATTERN_SEQUENTIAL:
        return step % c->pages;
    case TSB_PATTERN_HOTCOLD: {
        uint64_t r = next_rand(c);
        uint64_t cold = c->pages - c->hot;
        if (cold == 0 || below(r, PPM) < cfg->hot_access_ppm)
            return below(next_rand(c), c->hot);
        return c->hot + below(next_rand(c), cold);
    }
    default:
        return below(next_rand(c), c->pages);
    }
}

static void step_once(uint32_t cpu, struct cpu_state *c, uint64_t step)
{
    uint64_t index = c->first + pick_page(c, step);
    uint64_t gpa = page_gpa(index);
    volatile uint32_t *vt = (volatile uint32_t *)cfg->vtable_gpa;
    struct tsb_cpu_slot *s = &mb->cpu[cpu];
    /* Every access first verifies the page, so a lost or stale page is caught at its first
     * touch even when that touch is a write. */
    uint64_t found, expected = vt[index];
    uint64_t kind = check_page(gpa, expected, &found);
    if (kind)
        fail(cpu, kind, gpa, expected, found);
    s->verified++;
    if (below(next_rand(c), PPM) < cfg->write_ppm) {
        uint32_t v = (uint32_t)expected + 1;
        write_page(gpa, v);
        vt[index] = v;
        s->writes++;
    }
}

void worker_main(uint64_t cpu64)
{
    uint32_t cpu = (uint32_t)cpu64;
    struct cpu_state *c = &cpus[cpu];
    struct tsb_cpu_slot *s = &mb->cpu[cpu];
    uint64_t total = 0;
    for (uint32_t i = 0; i < cfg->nranges; i++)
        total += cfg->ranges[i].pages;
    uint32_t n = cfg->vcpus ? cfg->vcpus : 1;
    if (cpu >= n) { /* more vCPUs than the workload uses: stay idle, finished */
        s->state = TSB_STATE_DONE;
        for (;;)
            bell(TSB_BELL_DONE, cpu);
    }
    c->first = total * cpu / n;
    c->pages = total * (cpu + 1) / n - c->first;
    c->hot = c->pages * cfg->hot_pages_ppm / PPM;
    if (c->hot == 0)
        c->hot = 1;
    c->rng = mix64(cfg->seed ^ (0x632be59bd9b4e019ULL * (cpu + 1)));
    s->state = TSB_STATE_RUNNING;
    bell(TSB_BELL_RUNNING, cpu);
    if (c->pages == 0)
        goto done;

    for (uint64_t step = s->steps; cfg->steps == 0 || step < cfg->steps; step++) {
        step_once(cpu, c, step);
        s->steps = step + 1;
        if (cfg->report_every && (step + 1) % cfg->report_every == 0) {
            puts_serial("cpu ");
            put_dec(cpu);
            puts_serial(" step ");
            put_dec(step + 1);
            puts_serial("\n");
        }
    }
    if (cfg->flags & TSB_FLAG_VERIFY_AT_END) {
        volatile uint32_t *vt = (volatile uint32_t *)cfg->vtable_gpa;
        for (uint64_t i = c->first; i < c->first + c->pages; i++) {
            uint64_t found, gpa = page_gpa(i);
            uint64_t kind = check_page(gpa, vt[i], &found);
            if (kind)
                fail(cpu, kind, gpa, vt[i], found);
        }
    }
done:
    s->state = TSB_STATE_DONE;
    puts_serial("cpu ");
    put_dec(cpu);
    puts_serial(" done after ");
    put_dec(s->steps);
    puts_serial(" steps\n");
    for (;;)
        bell(TSB_BELL_DONE, cpu);
}
