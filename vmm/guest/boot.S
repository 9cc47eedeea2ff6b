/*
 * Tsubame guest boot code: multiboot entry in 32-bit protected mode -> long mode -> CPL3.
 *
 * CPL0 code is emulated on the hosts Tsubame targets (~1 M instructions/s), so everything here is
 * short: build identity page tables (2 MiB pages), load GDT/IDT/TSS, iretq to the CPL3 worker.
 * The boot CPU (EAX = multiboot magic) builds the shared tables; other CPUs (EAX = TSB_AP_MAGIC,
 * EBX = index, started by the Tsubame VMM) wait for mailbox.boot_done and only load them.
 */
#include "abi.h"

#define KERNEL_CS   0x08
#define KERNEL_DS   0x10
#define BOOT_CS32   0x18
#define USER_DS     0x20
#define USER_CS     0x28
#define TSS_SEL0    0x30

#define CFG_FLAGS   52 /* offsetof(struct tsb_config, flags), checked in abi.h */
#define CFG_MAP_TOP 64 /* offsetof(struct tsb_config, map_top) */

    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002
    .long 0x00000003
    .long -(0x1BADB002 + 0x00000003)

    .section .text.boot32, "ax"
    .code32
    .globl _start
_start:
    cli
    cld
    cmp $MULTIBOOT_MAGIC, %eax
    je  bsp_start
    cmp $TSB_AP_MAGIC, %eax
    je  ap_start
1:  hlt
    jmp 1b

bsp_start:
    xor %ebx, %ebx                     /* the boot CPU is CPU 0 */
    /* Identity page tables: PML4[0] -> PDPT, PDPT[i] -> PD i, PD entries map 2 MiB each. */
    mov (TSB_CONFIG_GPA + CFG_MAP_TOP), %eax
    mov (TSB_CONFIG_GPA + CFG_MAP_TOP + 4), %edx
    /* number of 1 GiB PDs = ceil(map_top / 1 GiB), at least 1, at most TSB_PT_PAGES - 2 */
    add $0x3fffffff, %eax
    adc $0, %edx
    shrd $30, %edx, %eax
    test %eax, %eax
    jnz 2f
    mov $1, %eax
2:  cmp $(TSB_PT_PAGES - 2), %eax
    jbe 3f
    mov $(TSB_PT_PAGES - 2), %eax
3:  mov %eax, %esi                     /* esi = PD count */
    /* PML4: entry 0 -> PDPT, rest zero */
    mov $TSB_PT_GPA, %edi
    mov $(TSB_PT_GPA + 0x1000 + 7), %eax
    mov %eax, (%edi)
    movl $0, 4(%edi)
    mov $1, %ecx
4:  movl $0, (%edi,%ecx,8)
    movl $0, 4(%edi,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jb 4b
    /* PDPT: entries < esi -> PDs, rest zero */
    mov $(TSB_PT_GPA + 0x1000), %edi
    xor %ecx, %ecx
5:  xor %eax, %eax
    cmp %esi, %ecx
    jae 6f
    mov %ecx, %eax
    shl $12, %eax
    add $(TSB_PT_GPA + 0x2000 + 7), %eax
6:  mov %eax, (%edi,%ecx,8)
    movl $0, 4(%edi,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jb 5b
    /* PDs: 512 * esi entries, entry k maps k * 2 MiB (P|RW|US|PS) */
    mov $(TSB_PT_GPA + 0x2000), %edi
    mov %esi, %edx
    shl $9, %edx                       /* edx = number of PD entries */
    xor %ecx, %ecx
7:  mov %ecx, %eax
    shl $21, %eax
    or  $0x87, %eax
    mov %eax, (%edi,%ecx,8)
    mov %ecx, %eax
    shr $11, %eax                      /* high half of k * 2 MiB */
    mov %eax, 4(%edi,%ecx,8)
    inc %ecx
    cmp %edx, %ecx
    jb 7b
    jmp enter_long_mode

ap_start:
    /* wait until the boot CPU has built the page tables and the per-CPU tables */
1:  cmpl $0, (TSB_MAILBOX_GPA + 16)
    jne enter_long_mode
    pause
    jmp 1b

enter_long_mode:
    /* ebx = CPU index from here on */
    lgdt gdt_ptr
    mov $TSB_PT_GPA, %eax
    mov %eax, %cr3
    mov $0x620, %eax                   /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $0xC0000080, %ecx              /* EFER.LME */
    rdmsr
    or  $0x100, %eax
    wrmsr
    mov $0x80050033, %eax              /* PG | AM | WP | NE | ET | MP | PE */
    mov %eax, %cr0
    ljmp $KERNEL_CS, $long_mode

    .code64
    .section .text.boot64, "ax"
long_mode:
    mov $KERNEL_DS, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov %ebx, %edi                     /* rdi = CPU index */
    /* kernel stack of this CPU */
    mov %rdi, %rax
    inc %rax
    shl $12, %rax
    lea kernel_stacks(%rip), %rsp
    add %rax, %rsp
    test %edi, %edi
    jnz 1f
    push %rdi
    push %rdi                          /* keep rsp 16-byte aligned at the call */
    call boot_setup_tables             /* CPU 0: TSSes, GDT TSS descriptors, IDT, mailbox */
    pop %rdi
    pop %rdi
1:  lidt idt_ptr(%rip)
    mov %edi, %eax
    shl $4, %eax
    add $TSS_SEL0, %eax
    ltr %ax
    /* iretq to CPL3: worker_main(cpu) on this CPU's user stack, interrupts off, IOPL 0 */
    mov %rdi, %rax
    inc %rax
    shl $13, %rax
    lea user_stacks(%rip), %rcx
    add %rax, %rcx
    push $(USER_DS | 3)
    push %rcx
    push $0x2
    push $(USER_CS | 3)
    lea worker_entry(%rip), %rax
    push %rax
    mov $(USER_DS | 3), %eax
    mov %eax, %ds
    mov %eax, %es
    iretq

    .section .text
worker_entry:
    /* CPL3: rdi = CPU index; the stack is 16-byte aligned, a call pushes the return address */
    and $-16, %rsp
    call worker_main
1:  jmp 1b

/* CPU exceptions reach CPL0 here: report the vector through the doorbell and stop. */
    .macro exception_stub vec
    .globl exception_\vec
exception_\vec:
    mov $((\vec << 16) | (TSB_BELL_EXCEPTION << 8)), %eax
    jmp exception_common
    .endm
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    exception_stub \v
    .endr
exception_common:
    /* With exit bells (QEMU's isa-debug-exit), ring the bare code so that it becomes exit
     * status 9; the vector is lost then. */
    testl $TSB_FLAG_EXIT_BELLS, (TSB_CONFIG_GPA + CFG_FLAGS)
    jz 1f
    mov $TSB_BELL_EXCEPTION, %eax
1:  mov $TSB_DOORBELL_PORT, %edx
    out %eax, %dx
2:  hlt
    jmp 2b

    .section .rodata
    .globl exception_table
    .align 8
exception_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exception_\v
    .endr

    .section .data
    .align 16
    .globl gdt
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF           /* 0x08 kernel code, 64-bit */
    .quad 0x00CF92000000FFFF           /* 0x10 kernel data */
    .quad 0x00CF9A000000FFFF           /* 0x18 kernel code, 32-bit (boot) */
    .quad 0x00CFF2000000FFFF           /* 0x20 user data, DPL3 */
    .quad 0x00AFFA000000FFFF           /* 0x28 user code, 64-bit, DPL3 */
    .globl gdt_tss
gdt_tss:
    .fill TSB_MAX_CPUS * 2, 8, 0       /* 0x30: one 16-byte TSS descriptor per CPU */
gdt_end:
    .align 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
    .globl idt_ptr
idt_ptr:
    .word 32 * 16 - 1
    .quad idt

    .section .bss
    .align 4096
    .globl idt
idt:
    .fill 32 * 16, 1, 0
    .align 4096
    .globl kernel_stacks
kernel_stacks:
    .fill TSB_MAX_CPUS * 4096, 1, 0
    .globl user_stacks
user_stacks:
    .fill TSB_MAX_CPUS * 8192, 1, 0
    .section .note.GNU-stack, "", @progbits
