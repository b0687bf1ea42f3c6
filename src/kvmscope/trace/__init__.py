"""``kvmscope trace``: record a real VMM's KVM ioctls under ptrace, stopping only on KVMIO ioctls (a seccomp filter),
as a scenario file that ``kvmscope check`` replays (docs/trace.md)."""
