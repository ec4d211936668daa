"""Our CPU kernels, compiled once per machine with the system C++ compiler (cached by torch).

If no compiler is available the engine falls back to the pure-PyTorch path, with a warning.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("paged_attention.cpp", "elementwise.cpp", "lora_decode.cpp")]
_HEADERS = [Path(__file__).parent / "csrc" / "vec16.h"]  # in the cache key: a header change rebuilds


def _arch_flags() -> list[str]:
    """Vector ISA flags this CPU supports (named in the build, so a cached .so matches its CPU)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    chosen = []
    for isa, flag in (("avx2", "-mavx2"), ("fma", "-mfma"), ("f16c", "-mf16c"), ("avx512f", "-mavx512f"),
                      ("avx512bw", "-mavx512bw"), ("avx512vl", "-mavx512vl")):
        if isa in flags:
            chosen.append(flag)
    return chosen


@functools.lru_cache(maxsize=1)
def load():
    """The compiled module, or None when it cannot be built here."""
    try:
        import torch.utils.cpp_extension as ext

        flags = ["-O3", "-ffast-math", "-fno-finite-math-only", "-fopenmp", *_arch_flags()]
        text = "".join(p.read_text() for p in (*_SOURCES, *_HEADERS)) + " ".join(flags)
        digest = hashlib.sha1(text.encode()).hexdigest()[:12]
        return ext.load(name=f"mxext_cpu_{digest}", sources=[str(p) for p in _SOURCES], extra_cflags=flags,
                        extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no headers: stay correct, just slower
        log.warning("CPU attention kernel unavailable (%s); using the PyTorch fallback", exc)
        return None
