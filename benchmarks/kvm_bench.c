/* The same KVM ioctls kvmscope's benchmarks make, in C: the floor kvmscope is measured against.
 * Usage: kvm_bench MODE ITERATIONS   (MODE: pio, setmsr1, setmsr32, getmsr1, getmsr32, vmstart)
 * Prints operations per second (vmstart: microseconds per start), then the user and system CPU time per operation in
 * microseconds (getrusage around the timed loop): the kernel's share and the program's own. */
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

static const uint32_t BATCH_MSRS[8] = {0x8b, 0xce, 0x174, 0x175, 0x176, 0xc0000081, 0xc0000084, 0x34};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct rusage ru0, ru1;

static double tv_us(struct timeval t) { return t.tv_sec * 1e6 + t.tv_usec; }

static void cpu_per_op(long n) {
    printf(" %.4f %.4f\n", (tv_us(ru1.ru_utime) - tv_us(ru0.ru_utime)) / n, (tv_us(ru1.ru_stime) - tv_us(ru0.ru_stime)) / n);
}

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

static void vm_destroy(struct vm *v) {
    munmap(v->run, v->run_size);
    close(v->vcpu);
    close(v->vm);
    munmap(v->mem, 0x10000);
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s MODE N\n", argv[0]); return 2; }
    const char *mode = argv[1];
    long n = atol(argv[2]);
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    static const unsigned char pio[] = {0xe6, 0x10, 0xeb, 0xfc}; /* out 0x10, al; jmp $-2 */
    static const unsigned char hlt[] = {0xf4};
    struct vm v;
    double t0, t1;
    if (!strcmp(mode, "vmstart")) {
        getrusage(RUSAGE_SELF, &ru0);
        t0 = now();
        for (long i = 0; i < n; i++) {
            vm_create(kvm, &v, hlt, 1);
            if (ioctl(v.vcpu, KVM_RUN, 0) < 0 || v.run->exit_reason != KVM_EXIT_HLT) die("KVM_RUN");
            vm_destroy(&v);
        }
        t1 = now();
        getrusage(RUSAGE_SELF, &ru1);
        printf("%.3f", (t1 - t0) / n * 1e6);
        cpu_per_op(n);
        return 0;
    }
    vm_create(kvm, &v, pio, sizeof(pio));
    if (!strcmp(mode, "pio")) {
        getrusage(RUSAGE_SELF, &ru0);
        t0 = now();
        for (long i = 0; i < n; i++) {
            if (ioctl(v.vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
            if (v.run->exit_reason != KVM_EXIT_IO || v.run->io.port != 0x10) die("exit");
        }
        t1 = now();
        getrusage(RUSAGE_SELF, &ru1);
    } else {
        int count = strstr(mode, "32") ? 32 : 1;
        int set = !strncmp(mode, "set", 3);
        struct { struct kvm_msrs h; struct kvm_msr_entry e[32]; } m;
        memset(&m, 0, sizeof(m));
        m.h.nmsrs = count;
        for (int i = 0; i < count; i++) m.e[i].index = BATCH_MSRS[i % 8];
        unsigned long req = set ? KVM_SET_MSRS : KVM_GET_MSRS;
        getrusage(RUSAGE_SELF, &ru0);
        t0 = now();
        for (long i = 0; i < n; i++)
            if (ioctl(v.vcpu, req, &m) != count) die("KVM_{GET,SET}_MSRS short");
        t1 = now();
        getrusage(RUSAGE_SELF, &ru1);
    }
    printf("%.1f", n / (t1 - t0));
    cpu_per_op(n);
    vm_destroy(&v);
    return 0;
}
