"""What ``import kvmscope`` maps into a process. KVM_CREATE_VM locks every mapping of the calling process
(``mmu_notifier_register`` -> ``mm_take_all_locks``, mm/mmu_notifier.c and mm/vma.c in 6.12), so each C extension or
library a plain ``import kvmscope`` pulls in makes every VM start of a user's program slower (benchmarks/run.py,
"VM start"). Modules only some commands need are imported where they are used."""

from __future__ import annotations

import subprocess
import sys

# C extensions (each maps 5 regions; _hashlib also maps libcrypto) that the binding's VM start never needs.
NOT_AT_IMPORT = ("_hashlib", "_blake2", "_json", "_heapq", "_bz2", "_lzma", "zlib", "_ssl", "_socket", "select",
                 "_posixsubprocess", "math")


def test_import_kvmscope_loads_no_unneeded_c_extension() -> None:
    code = "import sys; import kvmscope; from kvmscope import guest; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    extra = sorted(loaded.intersection(NOT_AT_IMPORT))
    assert not extra, f"expected `import kvmscope` to load none of {NOT_AT_IMPORT}; it loaded {extra}"
