/* hide_avx512.c: run a program as on an x86 CPU without AVX-512, natively and at full speed.
 *
 *     gcc -O2 -shared -fPIC -o /tmp/hide_avx512.so scripts/hide_avx512.c
 *     LD_PRELOAD=/tmp/hide_avx512.so python scripts/bench_timm.py FOLDER...
 *
 * On an AVX-512 machine (with AVX2), onnxruntime, numpy and PyTorch then choose their AVX2
 * kernels, as on an AVX2-only EPYC: this is how the AVX2 class is timed (docs/cpu-classes.md),
 * where qemu's emulation only checks results. It hides AVX-512 F/DQ/CD/BW/VL/IFMA/VBMI/VBMI2/
 * VNNI/BITALG/VPOPCNTDQ/BF16/FP16/VP2INTERSECT, AMX, and the AVX-512 register state from CPUID.
 * Zen 4 has no AVX-VNNI, so there the result has no VNNI at all (the x86-avx2 class).
 *
 * How: the kernel's CPUID faulting (arch_prctl ARCH_SET_CPUID; x86 Linux, `cpuid_fault` in
 * /proc/cpuinfo) makes every CPUID instruction of the process raise SIGSEGV; the handler runs
 * the real CPUID with faulting off for that moment, clears the bits and steps over it. The
 * setting passes to threads and children; LD_PRELOAD passes it through exec. A program that
 * later installs its own SIGSEGV handler (Python's faulthandler, pytest, node, Ray's servers,
 * gcc) dies at its next CPUID, and under qemu-user (no CPUID faulting) the library refuses to
 * start.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_SET_CPUID 0x1012
#define BIT(n) (1u << (n))

static void cpuid_faulting(int off) { syscall(SYS_arch_prctl, ARCH_SET_CPUID, off); }

static void hide(unsigned leaf, unsigned sub, unsigned *a, unsigned *b, unsigned *c, unsigned *d) {
    if (leaf == 7 && sub == 0) {
        /* F, DQ, IFMA, PF, ER, CD, BW, VL */
        *b &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
        /* VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ */
        *c &= ~(BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14));
        /* 4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, FP16, AMX-TILE, AMX-INT8 */
        *d &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25));
    } else if (leaf == 7 && sub == 1) {
        *a &= ~BIT(5); /* AVX512-BF16 */
    } else if (leaf == 0xd && sub == 0) {
        *a &= ~(BIT(5) | BIT(6) | BIT(7) | BIT(17) | BIT(18)); /* opmask, ZMM, AMX tile state */
    }
}

static void on_sigsegv(int sig, siginfo_t *info, void *context) {
    greg_t *reg = ((ucontext_t *)context)->uc_mcontext.gregs;
    const uint8_t *ip = (const uint8_t *)reg[REG_RIP];
    (void)info;
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* a real fault: let it kill the process */
        signal(sig, SIG_DFL);
        return;
    }
    unsigned leaf = (unsigned)reg[REG_RAX], sub = (unsigned)reg[REG_RCX], a, b, c, d;
    cpuid_faulting(1);
    __cpuid_count(leaf, sub, a, b, c, d);
    cpuid_faulting(0);
    hide(leaf, sub, &a, &b, &c, &d);
    reg[REG_RAX] = a;
    reg[REG_RBX] = b;
    reg[REG_RCX] = c;
    reg[REG_RDX] = d;
    reg[REG_RIP] += 2;
}

__attribute__((constructor)) static void start(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_sigsegv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    if (sigaction(SIGSEGV, &action, NULL) != 0 || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0)) {
        fprintf(stderr, "hide_avx512: no CPUID faulting here (needs x86 Linux, cpuid_fault)\n");
        exit(2);
    }
}
