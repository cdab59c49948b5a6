"""CPU kernels of the quantized store (engine/deq.c, loaded with ctypes).

The torch path of `qstore.Rows.deq32` / `qstore.ChannelKeys.deq32` unpacks a block's codes and
rescales them in 6-10 tensor ops plus one small op per run of key groups: on CPU a decode step of
a quantized store spent more time dispatching those ops than computing. deq.c does the same per
row in one pass, writing only the float32 block: the same floats (code * scale, rounded, then +
zero, rounded; built with -ffp-contract=off), asserted bit for bit against the torch path in
tests/test_quant_blocks.py. Its attention kernels (qk_tiers, pv_tiers: every tier of a head in
one call) go further and write no block at all: each row is dequantized into a buffer of D floats
(those same floats) and used at once for the logits of every query row or for the weighted sum of
values; their dot products sum in a fixed order of their own (8 interleaved partial sums), so they
equal the torch path's matmuls to float32 rounding, not bit for bit (result rows say which ran:
`attention_kernel`). deq.c holds two copies of its kernels, portable C and x86 AVX2 + FMA + F16C
intrinsics, and runs the AVX2 one where the CPU has it (`simd()`; rows say `c-avx2` or `c`): the
same dequantized floats, the sums fused (multiply-add) in the AVX2 copy.

Built on first use with the machine's C compiler (`$CC`, else `cc`) into `$KVBENCH_KERNEL_DIR`
(default `~/.cache/kvbench/kernels`), under a name that hashes the source, the flags, the
compiler's version and the machine, compiled to a private name and renamed into place (jobs that
build it at once never see half a file). `KVBENCH_CKERNEL=0` turns it off. Without a compiler the
store keeps its torch path, with the same floats, and `status()` says why; bench/decode.py prints it.
CPU tensors only (a CUDA store keeps the torch path).

    python -m kvbench.engine.ckernel     # build now and print where it is
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("deq.c")
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", "-std=c99"]
SCALE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_log = logging.getLogger(__name__)
_state: dict = {}  # "lib": CDLL or None, "status": str
_ROWS = _CHAN = _QK_TIERS = _PV_TIERS = None  # the kernels, once built (no attribute lookups per call)


def _kernel_dir() -> Path:
    d = os.environ.get("KVBENCH_KERNEL_DIR")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvbench" / "kernels"


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("KVBENCH_CKERNEL", "1") == "0":
        return None, "off (KVBENCH_CKERNEL=0): torch path"
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        return None, f"no C compiler ({cc!r} not found): torch path"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"C compiler {cc!r} failed to run ({e}): torch path"
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), version.encode(),
                                     platform.machine().encode(), platform.system().encode()])).hexdigest()[:16]
    out = _kernel_dir() / f"deq-{key}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".deq-{key}.", suffix=".so", dir=out.parent)
            os.close(fd)
            r = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                os.unlink(tmp)
                return None, f"{cc} failed on {SOURCE.name}: {r.stderr.strip()[:400]}: torch path"
            os.replace(tmp, out)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"could not build {out} ({e}): torch path"
    try:
        lib = ctypes.CDLL(str(out))
    except OSError as e:
        return None, f"could not load {out} ({e}): torch path"
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.kvb_deq_rows.argtypes = [P, I64, I64, I64, I, I64, P, P, I64, I, P]
    lib.kvb_deq_chan.argtypes = [P, I64, I64, I64, I64, I, P, I64, P, P, I64, I, P]
    lib.kvb_qk_tiers.argtypes = [P, I64, I64, P, I64, P, I64]
    lib.kvb_pv_tiers.argtypes = [P, I64, I64, I64, P, I64, P]
    lib.kvb_simd.argtypes, lib.kvb_simd.restype = [I], I
    for f in (lib.kvb_deq_rows, lib.kvb_deq_chan, lib.kvb_init, lib.kvb_qk_tiers, lib.kvb_pv_tiers):
        f.restype = None
    lib.kvb_init()  # the 2-bit lookup table; the AVX2 copy where the CPU has it
    return lib, f"C ({out})"


def lib() -> ctypes.CDLL | None:
    """The compiled kernels, built once per process (None: use the torch path; status() says why)."""
    global _ROWS, _CHAN, _QK_TIERS, _PV_TIERS
    if "lib" not in _state:
        _state["lib"], _state["status"] = _build()
        if _state["lib"] is None:
            _log.warning("kvbench quantized store: %s", _state["status"])
        else:
            k = _state["lib"]
            _ROWS, _CHAN, _QK_TIERS, _PV_TIERS = k.kvb_deq_rows, k.kvb_deq_chan, k.kvb_qk_tiers, k.kvb_pv_tiers
    return _state["lib"]


def status() -> str:
    """Which path dequantizes the quantized store's blocks, and why."""
    k = lib()
    return _state["status"] if k is None else f"{_state['status']}, {'AVX2' if k.kvb_simd(-1) else 'portable'} copy"


def simd(on: bool | None = None) -> bool:
    """Whether the kernels run their AVX2 copy (x86 with AVX2, FMA and F16C) rather than the portable
    one. on=True/False switches (True only takes where the CPU has them; tests run both copies)."""
    k = lib()
    return bool(k is not None and k.kvb_simd(-1 if on is None else int(on)))


def reader() -> str:
    """What reads a CPU quantized store (the result rows' `attention_kernel`): "c-avx2" or "c" (the
    portable copy) when the kernels are built, else "torch"."""
    if lib() is None:
        return "torch"
    return "c-avx2" if simd() else "c"


def usable(*ts: torch.Tensor) -> bool:
    """Whether the C kernels can read these tensors: on the CPU, row-major and contiguous."""
    for t in ts:  # (a loop, not all(generator): called per block)
        if not (t.is_cpu and t.is_contiguous()):
            return False
    return True


def deq_rows(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, lo: int, hi: int, d: int, bits: int,
             g: int) -> torch.Tensor:
    """Rows lo:hi of per-token codes q (n, P) uint8 with scales/zeros s, z (n, d // g) -> (hi - lo, d)
    float32."""
    out = torch.empty(hi - lo, d, dtype=torch.float32)
    if hi > lo:
        ss = s.stride(0)
        es = lo * ss * s.element_size()
        qs = q.stride(0)
        _ROWS(q.data_ptr() + lo * qs, qs, hi - lo, d, bits, g, s.data_ptr() + es, z.data_ptr() + es, ss,
              SCALE_DTYPES[s.dtype], out.data_ptr())
    return out


def deq_chan(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, size: torch.Tensor, lo: int, hi: int, d: int,
             bits: int) -> torch.Tensor:
    """Rows lo:hi of channel-quantized key codes q (n, P) uint8, in groups of `size` (n_groups,) int64
    consecutive rows with scales/zeros s, z (n_groups, d) -> (hi - lo, d) float32. A piece may start
    and end anywhere: the kernel finds row lo's group."""
    out = torch.empty(hi - lo, d, dtype=torch.float32)
    if hi > lo:
        _CHAN(q.data_ptr(), q.stride(0), lo, hi - lo, d, bits, size.data_ptr(), size.shape[0], s.data_ptr(),
              z.data_ptr(), s.stride(0), SCALE_DTYPES[s.dtype], out.data_ptr())
    return out


def _rows_view(x: torch.Tensor, m: int, w: int) -> int:
    """Row stride of a float32 (m, w) CPU matrix whose rows are contiguous (a column slice of a wider
    one may be): what the kernels read or write through a raw pointer, so checked first."""
    if x.dtype != torch.float32 or not x.is_cpu or x.shape != (m, w) or (w > 1 and x.stride(1) != 1):
        raise ValueError(f"the attention kernels need a float32 CPU ({m}, {w}) matrix with contiguous rows, "
                         f"got {x.dtype} {tuple(x.shape)} strides {x.stride()}")
    return x.stride(0)


def _dense(x: torch.Tensor, m: int, d: int) -> None:
    """A query block or an accumulator: float32 (m, d), contiguous."""
    if _rows_view(x, m, d) != d and m > 1:
        raise ValueError(f"the attention kernels need a contiguous ({m}, {d}) matrix, got strides {x.stride()}")


DESC = 16  # int64 per tier description (deq.c, kvb_qk_tiers)
FLOAT_ROWS, TOKEN_CODES, CHANNEL_CODES = 0, 1, 2


class Tiers:
    """A head's tiers described for kvb_qk_tiers / kvb_pv_tiers: `desc` (ctypes int64 array, keys
    then values per tier), `n` tiers, `width` (the slots they cover: 0 .. width - 1), and the tensors
    it points into (kept alive with it). Built by the store, which guarantees what the pointers need:
    CPU, contiguous rows, float32 float rows."""

    __slots__ = ("desc", "n", "width", "keep")

    def __init__(self, values: list[int], keep: list[torch.Tensor]):
        self.desc = (ctypes.c_int64 * len(values))(*values)
        self.n = len(values) // (2 * DESC)
        self.width = max((values[i + 2] + values[i + 3] for i in range(0, len(values), DESC)), default=0)
        self.keep = keep


def _covers(x: torch.Tensor, m: int, tiers: Tiers) -> int:
    """Row stride of x (m, >= tiers.width), float32 rows contiguous: every slot the kernel writes or reads."""
    if x.shape[1] < tiers.width:
        raise ValueError(f"the attention kernels need {tiers.width} columns, got {tuple(x.shape)}")
    return _rows_view(x, m, x.shape[1])


def qk_tiers(qv: torch.Tensor, tiers: Tiers, x: torch.Tensor) -> None:
    """x[:, :tiers.width] = qv (m, D) @ the head's keys.T, every tier (x's other columns untouched)."""
    m, d = qv.shape
    _dense(qv, m, d)
    _QK_TIERS(qv.data_ptr(), m, d, tiers.desc, tiers.n, x.data_ptr(), _covers(x, m, tiers))


def pv_tiers(p: torch.Tensor, tiers: Tiers, acc: torch.Tensor) -> None:
    """acc (m, D) += p[:, :tiers.width] @ the head's values, every tier."""
    m, d = acc.shape
    _dense(acc, m, d)
    _PV_TIERS(p.data_ptr(), _covers(p, m, tiers), m, d, tiers.desc, tiers.n, acc.data_ptr())


if __name__ == "__main__":
    print(status())
