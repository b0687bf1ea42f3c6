/* The same KVM ioctls kvmscope's benchmarks make, in C: the floor kvmscope is measured against.
 *
 * Usage: kvm_bench serve      (what benchmarks/run.py starts: one command per line on stdin, one answer per line)
 *        kvm_bench MODE N [INDEX ...]   (one chunk from the command line, for a look by hand)
 *
 * Commands (MODE N [INDEX ...]):
 *   pio N            N KVM_RUNs of a guest looping on `out 0x10, al`, each exit's reason and port checked
 *   set N INDEX...   N KVM_SET_MSRS of the batch of these MSRs, written back with the values KVM_GET_MSRS read
 *                    (on a vCPU given KVM_GET_SUPPORTED_CPUID, as a VMM sets CPUID before it restores MSRs)
 *   get N INDEX...   N KVM_GET_MSRS of that batch
 *   vmstart N        N times: create a VM, 64 KiB of memory, a vCPU, set registers, run to HLT, close
 * Answer: "WALL_NS CPU_NS USER_US SYS_US" for the timed loop only: wall time, this thread's CPU time
 * (CLOCK_THREAD_CPUTIME_ID) and its user/system split (getrusage(RUSAGE_THREAD)). The VMs are made once and reused
 * by every chunk, as the Python side reuses its own. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define MAX_MSRS 255

static long long ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double tv_us(struct timeval t) { return t.tv_sec * 1e6 + t.tv_usec; }

static void die(const char *what) { perror(what); exit(1); }

struct vm { int vm, vcpu; struct kvm_run *run; void *mem; size_t run_size; };

static void vm_create(int kvm, struct vm *v, const unsigned char *code, size_t len) {
    v->vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (v->vm < 0) die("KVM_CREATE_VM");
    v->mem = mmap(NULL, 0x10000, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    struct kvm_userspace_memory_region r = {.slot = 0, .guest_phys_addr = 0, .memory_size = 0x10000,
                                            .userspace_addr = (uint64_t)v->mem};
    if (ioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &r) < 0) die("KVM_SET_USER_MEMORY_REGION");
    v->vcpu = ioctl(v->vm, KVM_CREATE_VCPU, 0);
    if (v->vcpu < 0) die("KVM_CREATE_VCPU");
    v->run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    v->run = mmap(NULL, v->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
    memcpy((char *)v->mem + 0x1000, code, len);
    struct kvm_sregs s;
    if (ioctl(v->vcpu, KVM_GET_SREGS, &s) < 0) die("KVM_GET_SREGS");
    s.cs.base = 0; s.cs.selector = 0;
    if (ioctl(v->vcpu, KVM_SET_SREGS, &s) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs;
    if (ioctl(v->vcpu, KVM_GET_REGS, &regs) < 0) die("KVM_GET_REGS");
    regs.rip = 0x1000; regs.rflags = 2;
    if (ioctl(v->vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
}

/* What a VMM does before it restores MSRs: give the vCPU the CPUID KVM supports. */
static void set_supported_cpuid(int kvm, int vcpu) {
    static struct { struct kvm_cpuid2 h; struct kvm_cpuid_entry2 e[256]; } c;
    memset(&c, 0, sizeof(c));
    c.h.nent = 256;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &c) < 0) die("KVM_GET_SUPPORTED_CPUID");
    if (ioctl(vcpu, KVM_SET_CPUID2, &c) < 0) die("KVM_SET_CPUID2");
}

static void vm_destroy(struct vm *v) {
    munmap(v->run, v->run_size);
    close(v->vcpu);
    close(v->vm);
    munmap(v->mem, 0x10000);
}

static const unsigned char PIO[] = {0xe6, 0x10, 0xeb, 0xfc}; /* out 0x10, al; jmp $-2 */
static const unsigned char HLT[] = {0xf4};
static int kvm;
static struct vm pio_vm, msr_vm;
static int have_pio, have_msr;
static struct { struct kvm_msrs h; struct kvm_msr_entry e[MAX_MSRS]; } batch;

/* One chunk: parse "MODE N [INDEX ...]", time it, print the answer. Returns 0 on "quit". */
static int chunk(char *line) {
    char *save, *mode = strtok_r(line, " \t\n", &save), *count = strtok_r(NULL, " \t\n", &save);
    if (!mode || !strcmp(mode, "quit")) return 0;
    if (!count) { fprintf(stderr, "kvm_bench: %s: expected an iteration count\n", mode); exit(2); }
    long n = atol(count);
    int set = !strcmp(mode, "set"), get = !strcmp(mode, "get");
    if (set || get) {
        if (!have_msr) { vm_create(kvm, &msr_vm, PIO, sizeof(PIO)); set_supported_cpuid(kvm, msr_vm.vcpu); have_msr = 1; }
        int k = 0;
        for (char *t; (t = strtok_r(NULL, " \t\n", &save)) && k < MAX_MSRS;) batch.e[k++].index = strtoul(t, NULL, 0);
        batch.h.nmsrs = k;
        if (ioctl(msr_vm.vcpu, KVM_GET_MSRS, &batch) != k) die("KVM_GET_MSRS short (the batch's values)");
    } else if (!strcmp(mode, "pio")) {
        if (!have_pio) { vm_create(kvm, &pio_vm, PIO, sizeof(PIO)); have_pio = 1; }
    } else if (strcmp(mode, "vmstart")) {
        fprintf(stderr, "kvm_bench: unknown mode %s\n", mode);
        exit(2);
    }
    struct rusage r0, r1;
    getrusage(RUSAGE_THREAD, &r0);
    long long w0 = ns(CLOCK_MONOTONIC), c0 = ns(CLOCK_THREAD_CPUTIME_ID);
    if (set || get) {
        unsigned long req = set ? KVM_SET_MSRS : KVM_GET_MSRS;
        int k = batch.h.nmsrs;
        for (long i = 0; i < n; i++)
            if (ioctl(msr_vm.vcpu, req, &batch) != k) die("KVM_{GET,SET}_MSRS short");
    } else if (!strcmp(mode, "pio")) {
        for (long i = 0; i < n; i++) {
            if (ioctl(pio_vm.vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
            if (pio_vm.run->exit_reason != KVM_EXIT_IO || pio_vm.run->io.port != 0x10) die("exit");
        }
    } else {
        struct vm v;
        for (long i = 0; i < n; i++) {
            vm_create(kvm, &v, HLT, sizeof(HLT));
            if (ioctl(v.vcpu, KVM_RUN, 0) < 0 || v.run->exit_reason != KVM_EXIT_HLT) die("KVM_RUN");
            vm_destroy(&v);
        }
    }
    long long c1 = ns(CLOCK_THREAD_CPUTIME_ID), w1 = ns(CLOCK_MONOTONIC);
    getrusage(RUSAGE_THREAD, &r1);
    printf("%lld %lld %.1f %.1f\n", w1 - w0, c1 - c0, tv_us(r1.ru_utime) - tv_us(r0.ru_utime),
           tv_us(r1.ru_stime) - tv_us(r0.ru_stime));
    fflush(stdout);
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s serve | MODE N [INDEX ...]\n", argv[0]); return 2; }
    kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    static char line[8192];
    if (!strcmp(argv[1], "serve")) {
        while (fgets(line, sizeof(line), stdin) && chunk(line)) {}
        return 0;
    }
    size_t used = 0;
    for (int i = 1; i < argc && used + strlen(argv[i]) + 2 < sizeof(line); i++)
        used += (size_t)snprintf(line + used, sizeof(line) - used, "%s ", argv[i]);
    chunk(line);
    return 0;
}
