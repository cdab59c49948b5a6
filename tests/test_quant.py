import pytest
import torch

from kvbench.quant import (
    SUPPORTED_BITS, QTensor, pack_codes, packed_len, quantize, quantized_nbytes, unpack_codes,
)

QBITS = (2, 3, 4, 8)
GROUPS = (16, 32, 64)
AXES = ("token", "channel")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 17, 63, 64, 65, 130])
def test_pack_roundtrip_exact(bits, n):
    codes = torch.randint(0, 1 << bits, (2, 3, n), generator=_gen(bits * 1000 + n))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (2, 3, packed_len(n, bits))
    out = unpack_codes(packed, bits, n)
    assert out.shape == codes.shape
    assert torch.equal(out.long(), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_extreme_codes(bits):
    codes = torch.tensor([[0, (1 << bits) - 1] * 9 + [(1 << bits) - 1]])  # 19 codes
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 19).long(), codes)


@pytest.mark.parametrize("bits,nbytes", [(8, 64), (4, 32), (3, 24), (2, 16), (16, 128)])
def test_packed_byte_counts(bits, nbytes):
    codes = torch.randint(0, 1 << bits, (64,), generator=_gen(bits))
    assert pack_codes(codes, bits).numel() == nbytes
    assert packed_len(64, bits) == nbytes
    # padding: 3-bit rounds up to whole 8-code chunks (3 bytes each)
    assert packed_len(9, 3) == 6 and packed_len(5, 4) == 3 and packed_len(5, 2) == 2


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_codes(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="integer"):
        pack_codes(torch.tensor([0.0, 1.0]), 2)


def _per_element_scale(q: QTensor) -> torch.Tensor:
    s = q.scale.float()
    if q.axis == "token":
        return s.repeat_interleave(q.group_size, dim=-1)
    return s.repeat_interleave(q.group_size, dim=-2)


def _adversarial(kind, shape, g):
    x = torch.randn(shape, generator=g)
    if kind == "normal":
        return x
    if kind == "outliers":
        mask = torch.rand(shape, generator=g) < 0.01
        return torch.where(mask, x * 500.0, x)
    if kind == "negative":
        return -x.abs() - 3.0
    if kind == "dynamic":  # magnitudes spanning 1e-4 .. 1e4
        return x * torch.pow(10.0, torch.empty(shape).uniform_(-4, 4, generator=g))
    if kind == "offset":  # tiny range on a large offset: fp16 zero rounding matters
        return 1000.0 + 1e-3 * x
    if kind == "constant":  # mix of fp16-representable constants
        return torch.full(shape, -1.5)
    raise AssertionError(kind)


KINDS = ("normal", "outliers", "negative", "dynamic", "offset")


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", QBITS)
def test_error_bound(bits, axis):
    shape = (1, 2, 64, 64)  # (B, H, T, D)
    for gi, G in enumerate(GROUPS):
        for ki, kind in enumerate(KINDS):
            x = _adversarial(kind, shape, _gen(100 * bits + 10 * gi + ki))
            q = quantize(x, bits, G, axis)
            assert q.packed.dtype == torch.uint8 and q.scale.dtype == torch.float16
            y = q.dequantize()
            assert y.shape == x.shape and y.dtype == torch.float32
            s = _per_element_scale(q)
            tol = s / 2 + 1e-6 * (x.abs() + s)
            err = (y - x).abs()
            assert (err <= tol).all(), (kind, G, float((err - tol).max()))


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", QBITS)
def test_constant_groups_exact(bits, axis):
    x = torch.randn(1, 2, 32, 32, generator=_gen(bits))
    x[..., :16, :16] = 0.75  # one group constant along either axis with G=16
    x[..., 16:, 16:] = -2.0
    x[0, 1] = 3.0  # whole head constant
    q = quantize(x, bits, 16, axis)
    y = q.dequantize()
    assert torch.equal(y[..., :16, :16], x[..., :16, :16])
    assert torch.equal(y[..., 16:, 16:], x[..., 16:, 16:])
    assert torch.equal(y[0, 1], x[0, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_16_bits_exact(dtype):
    x = (torch.randn(1, 2, 10, 12, generator=_gen(0)) * 1e3).to(dtype)
    q = quantize(x, 16, 64, "token")  # no grouping at 16 bits
    assert q.packed.dtype == dtype
    assert torch.equal(q.dequantize(dtype), x)
    assert torch.equal(q.dequantize(torch.float64), x.double())
    assert q.nbytes() == x.numel() * x.element_size()
    assert q.nbytes() == quantized_nbytes(x.shape, 16, 64, "token", dtype=dtype)


@pytest.mark.parametrize("shape", [(1, 2, 64, 64), (2, 3, 32, 128), (4, 16, 48), (1, 1, 16, 24)])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("axis", AXES)
def test_nbytes_matches_theory(shape, bits, axis):
    G = 8 if shape[-1] == 24 else 16
    for sd in (torch.float16, torch.float32):
        x = torch.randn(shape, generator=_gen(bits))
        q = quantize(x, bits, G, axis, scale_dtype=sd)
        assert q.nbytes() == quantized_nbytes(shape, bits, G, axis, scale_dtype=sd,
                                              dtype=torch.float32)


@pytest.mark.parametrize("axis", AXES)
def test_compression_ratio_vs_fp16(axis):
    shape, G = (1, 2, 1024, 64), 64
    fp16 = 1 * 2 * 1024 * 64 * 2
    x = torch.randn(shape, generator=_gen(7)).half()
    ratios = {b: quantize(x, b, G, axis).nbytes() / fp16 for b in QBITS}
    print(f"\naxis={axis} G={G} bytes / fp16: " + ", ".join(f"{b}b={r:.4f}" for b, r in ratios.items()))
    for b, r in ratios.items():  # bits + 2 fp16 params per group of G, over 16 bits
        assert r == pytest.approx((b + 32 / G) / 16)
    assert ratios[2] <= 0.16
    # 4 bits + 0.5 bit/elt of fp16 scale+zero at G=64 is exactly 0.28125 (0.28 is unreachable)
    assert ratios[4] <= 0.28125
    if axis == "channel":  # G=128 along T (D=64 is too small for token groups of 128)
        assert quantize(x, 4, 128, axis).nbytes() / fp16 <= 0.28


def test_value_errors():
    x = torch.randn(1, 2, 32, 48)
    for bad in (1, 5, 32):
        with pytest.raises(ValueError, match=r"\(2, 3, 4, 8, 16\)"):
            quantize(x, bad, 16, "token")
        with pytest.raises(ValueError, match=r"\(2, 3, 4, 8, 16\)"):
            pack_codes(torch.zeros(4, dtype=torch.long), bad)
    with pytest.raises(ValueError, match=r"group_size 32.*D=48"):
        quantize(x, 4, 32, "token")
    with pytest.raises(ValueError, match=r"T=32.*group_size 64"):
        quantize(x, 4, 64, "channel")
    with pytest.raises(ValueError, match="axis"):
        quantize(x, 4, 16, "head")
    with pytest.raises(ValueError, match=r"group_size 32.*D=48"):
        quantized_nbytes(x.shape, 4, 32, "token")
    with pytest.raises(ValueError, match="scale_dtype"):
        quantize(torch.full((1, 16), -1e6), 4, 16, "token")  # zero-point overflows fp16
    with pytest.raises(ValueError, match="scale_dtype"):
        quantize(torch.tensor([[0.0, 1e7] * 8]), 4, 16, "token")  # scale overflows fp16
    q = quantize(torch.tensor([[-1e6, 1e6] * 8]), 4, 16, "token", scale_dtype=torch.float32)
    assert torch.allclose(q.dequantize(), torch.tensor([[-1e6, 1e6] * 8]), rtol=1e-6)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", QBITS)
def test_grid_uses_every_code(bits, axis):
    """min/max quantization spans all 2**bits codes: a group holding the integers 0 .. 2**bits - 1 has scale 1
    and round-trips exactly, its maximum stored as the top code."""
    n = 1 << bits
    g = 64 if bits == 8 else 16
    ramp = torch.round(torch.linspace(0, n - 1, g))  # integers in [0, 2**bits - 1], both ends present
    x = ramp.expand(g, g).clone() if axis == "token" else ramp[:, None].expand(g, g).clone()
    q = quantize(x, bits, g, axis)
    assert torch.equal(q.dequantize(), x)
    assert torch.all(q.scale == 1) and int(unpack_codes(q.packed, bits, g).max()) == n - 1
