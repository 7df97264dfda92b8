"""A per-row LoRA product for the CPU, in C: each row multiplied by its own adapter only.

On the CPU, PyTorch offers no product that gives each row its own small matrices at the speed of one matrix
product: the whole stack under a 0/1 mask multiplies every row by every adapter present and keeps one (8× the
useful arithmetic with 8 adapters), and a product per adapter or per padded group pays a call per adapter
per layer (``benchmarks/cpu_lora_products.py``). This kernel does, for each row i of slot s > 0,

    hᵢ = A_s xᵢ        (r dot products of length d_in; A_s is the slot's r×d_in block of the A stack)
    yᵢ += B_sᵀ-rows hᵢ (r scaled additions of length d_out; the stack keeps B transposed, one row per rank)

reading each adapter's block from cache while the rows of that adapter follow each other. With OpenMP (built
with ``-fopenmp`` when the compiler has it), the threads share the slots, each adapter read by one thread; the
library loads the ``libgomp.so.1`` torch has already loaded, so it runs on torch's own thread pool (same
thread count). It is compiled on first use with the system's C compiler (``$CC``, else ``cc``) into the cache
(``$TUNESMITH_CACHE/kernels``),
keyed by the source, the compiler and the machine; a machine without a compiler, or
``TUNESMITH_ROW_KERNEL=0``, runs the masked stack instead (``available`` says why). Each row's result depends
only on that row: the sums run in a fixed order whatever the batch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v8 __attribute__((vector_size(32)));  /* 8 lanes: AVX on x86, two NEON registers on ARM */

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

static float dot(const float *a, const float *x, int64_t n) {
    v8 acc0 = {0}, acc1 = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 += load8(a + i) * load8(x + i);
        acc1 += load8(a + i + 8) * load8(x + i + 8);
    }
    for (; i + 8 <= n; i += 8) acc0 += load8(a + i) * load8(x + i);
    acc0 += acc1;
    float total = ((acc0[0] + acc0[4]) + (acc0[1] + acc0[5])) + ((acc0[2] + acc0[6]) + (acc0[3] + acc0[7]));
    for (; i < n; i++) total += a[i] * x[i];
    return total;
}

/* y[i] += sum_k h_k * bt[(s-1)*rank + k], h_k = a[(s-1)*rank + k] . x[i], k < ranks[s], for each row i of slot
   s = slots[i] > 0. a: (S*rank) x din, bt: (S*rank) x dout, both row-major; x, y rows contiguous. With OpenMP,
   thread t of T takes the slots s with s % T == t: each adapter's block is read by one thread only. */
void lora_rows(int64_t n, int64_t din, int64_t dout, int64_t rank, const float *x, float *y,
               const int64_t *slots, const int64_t *ranks, const float *a, const float *bt) {
#ifdef _OPENMP
#pragma omp parallel
#endif
    {
        int64_t part = 0, parts = 1;
#ifdef _OPENMP
        part = omp_get_thread_num();
        parts = omp_get_num_threads();
#endif
        float h[1024];
        for (int64_t i = 0; i < n; i++) {
            int64_t s = slots[i];
            if (s <= 0 || s % parts != part) continue;
            int64_t r = ranks[s];
            const float *xi = x + i * din;
            float *yi = y + i * dout;
            const float *as = a + (s - 1) * rank * din;
            const float *bs = bt + (s - 1) * rank * dout;
            for (int64_t k = 0; k < r; k++) h[k] = dot(as + k * din, xi, din);
            int64_t o = 0;
            for (; o + 8 <= dout; o += 8) {
                v8 acc = load8(yi + o);
                for (int64_t k = 0; k < r; k++) acc += h[k] * load8(bs + k * dout + o);
                store8(yi + o, acc);
            }
            for (; o < dout; o++) {
                float acc = yi[o];
                for (int64_t k = 0; k < r; k++) acc += h[k] * bs[k * dout + o];
                yi[o] = acc;
            }
        }
    }
}
"""
MAX_RANK = 1024  # the kernel's stack buffer for one row's hidden values
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fPIC", "-shared")


@lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("TUNESMITH_ROW_KERNEL", "1") == "0":
        return None, "turned off (TUNESMITH_ROW_KERNEL=0)"
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        return None, "no C compiler found ($CC or cc): mixed adapters run the masked stack"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join((SOURCE, version, platform.machine(), platform.node(), *FLAGS))
                             .encode()).hexdigest()[:16]
        from tunesmith.models.defaults import cache_dir

        target = cache_dir() / "kernels" / f"lora_rows-{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                source = Path(tmp) / "lora_rows.c"
                source.write_text(SOURCE)
                built = Path(tmp) / target.name
                for extra in (("-fopenmp",), ()):  # OpenMP when the compiler has it, else one thread
                    result = subprocess.run([compiler, *FLAGS, *extra, str(source), "-o", str(built)],
                                            capture_output=True, text=True, timeout=120)
                    if result.returncode == 0:
                        break
                if result.returncode != 0:
                    return None, f"{compiler} could not build the row kernel: {result.stderr.strip()[:300]}"
                os.replace(built, target)  # whole or not at all: another process may be building it too
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"the row kernel could not be built or loaded: {error}"
    function = library.lora_rows
    function.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 6
    function.restype = None
    return function, "compiled"


def available() -> tuple[bool, str]:
    """Whether the kernel runs on this machine, and why not when it does not."""
    function, reason = _library()
    return function is not None, reason


def lora_rows(x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor, a: torch.Tensor,
              bt: torch.Tensor, rank: int) -> None:
    """``y`` (n × d_out, float32, contiguous, updated in place) += each row's adapter update; ``x`` (n × d_in),
    ``slots`` (n, int64; 0: no adapter), ``ranks`` (per slot, int64), ``a`` ((S·rank) × d_in), ``bt``
    ((S·rank) × d_out), all contiguous float32 / int64 CPU tensors."""
    function, reason = _library()
    if function is None:
        raise RuntimeError(reason)
    n, din = x.shape
    function(n, din, y.shape[1], rank, x.data_ptr(), y.data_ptr(), slots.data_ptr(), ranks.data_ptr(),
             a.data_ptr(), bt.data_ptr())
