"""Bit-packed asymmetric KV-cache quantization primitives (pure tensor code).

Implements the group-wise min/max (asymmetric, scale + zero-point) scheme of
KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for
KV Cache"): keys are quantized per *channel* (groups of consecutive tokens
along T for each channel), values per *token* (groups of consecutive channels
along D for each token). Codes are really packed into uint8 so that byte
counts reported by `QTensor.nbytes()` are actual allocated storage.

Layouts (KV layout is (B, H, T, D); any leading dims are allowed):
  x                      (..., T, D)             input
  packed                 (..., T, packed_len(D)) uint8, codes packed along D
  scale / zero, "token"  (..., T, D // G)        one pair per token per group
  scale / zero, "channel"(..., T // G, D)        one pair per channel per group
where G = group_size. bits=16 stores the original tensor unquantized.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8, 16)
AXES = ("channel", "token")


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _chunk(bits: int) -> tuple[int, int]:
    """(codes per chunk, bytes per chunk): smallest whole-byte run of codes."""
    span = math.lcm(bits, 8)
    return span // bits, span // 8


def packed_len(n: int, bits: int) -> int:
    """Bytes needed to pack `n` codes of `bits` bits (last dim padded up to a whole chunk)."""
    _check_bits(bits)
    cpc, bpc = _chunk(bits)
    return -(-n // cpc) * bpc


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dim into uint8.

    (..., n) -> (..., packed_len(n, bits)). 8 codes of 3 bits -> 3 bytes; 16-bit -> 2 bytes/code
    (little-endian). Code i of a chunk occupies bits [bits*i, bits*(i+1)) of the chunk word, but at
    4 bits, which are packed in two planes: with P = packed_len(n, 4) bytes, code i < P is the low
    nibble of byte i and code P + i its high nibble (unpacking is then two byte-wide ops and a
    concatenation, 2.5x faster on CPU than shifting nibbles out of words).
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dim")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for bits={bits}")
    cpc, bpc = _chunk(bits)
    n = codes.shape[-1]
    pad = -n % cpc
    if bits == 4:  # two planes: codes [0, P) in the low nibbles, [P, 2P) in the high ones
        c = torch.nn.functional.pad(codes.to(torch.uint8), (0, pad))
        p = c.shape[-1] // 2
        return c[..., :p] | (c[..., p:] << 4)
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad))
    c = c.reshape(*codes.shape[:-1], -1, cpc)                       # (..., chunks, cpc)
    shifts = torch.arange(cpc, device=c.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1, keepdim=True)                      # (..., chunks, 1), < 2**24
    byte_shifts = torch.arange(bpc, device=c.device, dtype=torch.int64) * 8
    out = (word >> byte_shifts) & 0xFF                              # (..., chunks, bpc)
    return out.to(torch.uint8).reshape(*codes.shape[:-1], -1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_codes`: (..., packed_len(n)) uint8 -> (..., n) codes.

    Returns uint8 for bits <= 8, int32 for bits == 16.
    """
    _check_bits(bits)
    cpc, bpc = _chunk(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_len(n, bits):
        raise ValueError(f"packed last dim {packed.shape[-1]} != {packed_len(n, bits)} "
                         f"expected for n={n}, bits={bits}")
    if bpc == 1:  # 2, 4, 8 bits: whole codes per byte, unpacked in uint8 (same codes, fewer ops)
        if bits == 8:
            return packed[..., :n].clone()
        if bits == 4:
            return torch.cat([packed & 15, packed >> 4], dim=-1)[..., :n]
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)  # (..., bytes, cpc)
        return codes.reshape(*packed.shape[:-1], -1)[..., :n]
    b = packed.to(torch.int64).reshape(*packed.shape[:-1], -1, bpc)  # (..., chunks, bpc)
    byte_shifts = torch.arange(bpc, device=b.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(-1, keepdim=True)                  # (..., chunks, 1)
    shifts = torch.arange(cpc, device=b.device, dtype=torch.int64) * bits
    codes = ((word >> shifts) & ((1 << bits) - 1)).reshape(*packed.shape[:-1], -1)[..., :n]
    return codes.to(torch.uint8 if bits <= 8 else torch.int32)


_LITTLE = sys.byteorder == "little"
_SHIFTS: dict = {}  # (bits, device) -> int32 shifts of the codes in a word (unpack_float)


def unpack_float(packed: torch.Tensor, bits: int, n: int) -> tuple[torch.Tensor, int]:
    """`unpack_codes` straight to float32, for attention: (T, packed_len(n)) uint8 -> codes (T, n)
    float32 (a new tensor), and the peak bytes the call had allocated at once (the output
    included). 4 bits: the two nibble planes side by side (pack_codes); 2 bits shifted out of the
    bytes read four at a time as int32 words (little-endian: code i of a word sits at bits
    [bits*i, bits*(i+1)), as pack_codes lays them out), 3 bits out of each 3-byte chunk widened to
    an int32 word; 8 bits convert directly."""
    t, p = packed.shape
    out = t * n * 4
    if bits == 8:
        return packed[:, :n].float(), out
    if bits == 4:  # two planes (pack_codes): the nibbles of each byte, side by side
        c = torch.cat([packed & 15, packed >> 4], dim=1)
        return c[:, :n].float(), max(4 * t * p, 2 * t * p + out)  # planes and codes; codes and floats
    shifts = _SHIFTS.get((bits, packed.device))
    if shifts is None:
        shifts = _SHIFTS[bits, packed.device] = torch.arange(0, 24 if bits == 3 else 32, bits, dtype=torch.int32,
                                                             device=packed.device)
    if bits == 2 and _LITTLE and p % 4 == 0 and packed.is_contiguous() and packed.storage_offset() % 4 == 0:
        w = packed.view(torch.int32)[:, :, None]  # (T, P/4, 1), a view
        extra = 0
    elif bits == 3:
        b = packed.view(t, -1, 3).to(torch.int32)  # (T, chunks, 3)
        w = b[:, :, :1] | (b[:, :, 1:2] << 8) | (b[:, :, 2:] << 16)  # (T, chunks, 1)
        extra = max(b.numel() * 4 + 2 * w.numel() * 4, w.numel() * 4)  # the bytes and the OR chain's temporaries
        del b
    else:
        return unpack_codes(packed, bits, n).float(), out + t * p + t * n  # uint8 bytes and codes
    c = torch.bitwise_right_shift(w, shifts)  # (T, words, codes per word) int32
    c &= (1 << bits) - 1  # the top code's sign bits are masked off too
    return c.view(t, -1)[:, :n].float(), max(extra, w.numel() * 4 * (bits == 3) + c.numel() * 4 + out)


def _check_layout(shape, bits: int, group_size: int, axis: str) -> None:
    _check_bits(bits)
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    if len(shape) < 2:
        raise ValueError(f"expected shape (..., T, D), got {tuple(shape)}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if bits == 16:
        return  # stored unquantized: no groups
    T, D = shape[-2], shape[-1]
    if axis == "token" and D % group_size:
        raise ValueError(f"group_size {group_size} does not divide D={D} (axis='token')")
    if axis == "channel" and T % group_size:
        raise ValueError(f"T={T} is not a multiple of group_size {group_size} (axis='channel'); "
                         "quantize only full token groups")


def _round_dir(v: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """Round `v` to `dtype`, directed towards +inf (up) or -inf (down)."""
    r = v.to(dtype)
    back = r.to(v.dtype)
    wrong = back < v if up else back > v
    target = torch.full_like(r, math.inf if up else -math.inf)
    return torch.where(wrong, torch.nextafter(r, target), r)


@dataclass
class QTensor:
    packed: torch.Tensor   # uint8 (..., T, packed_len(D)); original tensor if bits == 16
    scale: torch.Tensor    # scale_dtype, see module docstring for shape (empty if bits == 16)
    zero: torch.Tensor     # scale_dtype, same shape as scale
    bits: int
    group_size: int
    axis: str
    shape: tuple

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.bits == 16:
            return self.packed.to(dtype, copy=True)
        *lead, T, D = self.shape
        G = self.group_size
        work = torch.float64 if dtype == torch.float64 else torch.float32
        codes = unpack_codes(self.packed, self.bits, D).to(work)      # (..., T, D)
        s, z = self.scale.to(work), self.zero.to(work)
        if self.axis == "token":
            g = codes.reshape(*lead, T, D // G, G) * s[..., None] + z[..., None]
        else:
            g = codes.reshape(*lead, T // G, G, D) * s[..., None, :] + z[..., None, :]
        return g.reshape(self.shape).to(dtype)


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: str,
             scale_dtype: torch.dtype = torch.float16) -> QTensor:
    """Group-wise asymmetric min/max quantization of x (..., T, D), KIVI-style.

    zero is the group min rounded *down* to scale_dtype and scale = (max - zero) / (2**bits - 1)
    rounded *up*, so the stored grid covers the group and |dequant - x| <= scale / 2 holds
    for the stored (rounded) scale. Constant groups get scale 1 and code 0.
    """
    _check_layout(x.shape, bits, group_size, axis)
    shape = tuple(x.shape)
    if bits == 16:
        empty = torch.empty(0, dtype=scale_dtype, device=x.device)
        return QTensor(x.detach().clone(), empty, empty.clone(), bits, group_size, axis, shape)
    *lead, T, D = shape
    G, qmax = group_size, (1 << bits) - 1
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xw = x.detach().to(work)
    if axis == "token":
        g, red = xw.reshape(*lead, T, D // G, G), -1                   # groups along D
    else:
        g, red = xw.reshape(*lead, T // G, G, D), -2                   # groups along T
    lo, hi = g.amin(red, keepdim=True), g.amax(red, keepdim=True)
    zero = _round_dir(lo, scale_dtype, up=False)
    span = hi - zero.to(work)
    scale = _round_dir(span / qmax, scale_dtype, up=True)
    scale = torch.where(span == 0, torch.ones_like(scale), scale)
    if not (torch.isfinite(zero).all() and torch.isfinite(scale).all()):
        raise ValueError(f"values out of range for scale_dtype={scale_dtype} "
                         "(non-finite input or overflow); use a wider scale_dtype")
    codes = torch.round((g - zero.to(work)) / scale.to(work)).clamp_(0, qmax)
    packed = pack_codes(codes.to(torch.int64).reshape(shape), bits)  # (..., T, packed_len(D))
    return QTensor(packed, scale.squeeze(red), zero.squeeze(red), bits, group_size, axis, shape)


def quantized_nbytes(shape, bits: int, group_size: int, axis: str,
                     scale_dtype: torch.dtype = torch.float16,
                     dtype: torch.dtype = torch.float16) -> int:
    """Bytes `quantize(x, ...)` allocates for x of `shape` (packed + scale + zero).

    `dtype` is the input dtype; it only matters for bits == 16 (stored as-is).
    """
    _check_layout(shape, bits, group_size, axis)
    *lead, T, D = shape
    rows = math.prod(lead) * T
    if bits == 16:
        return rows * D * torch.empty(0, dtype=dtype).element_size()
    n_groups = rows * D // group_size
    return rows * packed_len(D, bits) + 2 * n_groups * torch.empty(0, dtype=scale_dtype).element_size()
