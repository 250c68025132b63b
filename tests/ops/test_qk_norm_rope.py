"""qk_norm_rope on every backend (torch; Triton via the interpreter; CUDA via the SIMT emulator)
against a float64 evaluation of the reference math, on odd shapes."""

import pytest
import torch

import magi_kernels as mk
from magi_kernels import registry
from magi_kernels.ops.qk_norm_rope import make_args
from magi_kernels.reference.qk_norm_rope import qk_norm_rope_ref
from magi_kernels.utils.checks import MagiArgumentError

from ._backends import ALL_BACKENDS, assert_matches_ref, backend_param
from ..conftest import poison_like

# (name, layout kwargs). Shapes are small and odd on purpose: the interpreter and emulator are slow,
# and odd sizes catch masking bugs that round sizes hide.
CASES = {
    # MAGI-1: per-head LayerNorm "1p" (zero-centred weight), NeoX rotary on 96 of 128 dims, GQA 3:1.
    "magi1": dict(lead=(37,), hq=3, hk=1, d=128, norm="layernorm", scope="head", w=True, b=False, off=1.0,
                  rot=96, inter=False),
    # Wan/LTX: RMSNorm over the whole hidden size, full-dim rotary, batch-first with shared cos/sin.
    "wan_hidden_rms": dict(lead=(2, 9), hq=4, hk=4, d=64, norm="rmsnorm", scope="hidden", w=True, b=False,
                           off=0.0, rot=64, inter=False),
    # LayerNorm with bias, interleaved (GPT-J) pairs, partial rotary, odd head_dim.
    "ln_bias_interleaved": dict(lead=(11,), hq=5, hk=2, d=72, norm="layernorm", scope="head", w=True, b=True,
                                off=0.0, rot=40, inter=True),
    # Norm only (no rope), no affine, head_dim not a multiple of 32.
    "rms_no_rope": dict(lead=(13,), hq=2, hk=3, d=40, norm="rmsnorm", scope="head", w=False, b=False, off=0.0,
                        rot=0, inter=False),
    # Hidden-scope LayerNorm with bias and "1p" offset, hd 96.
    "ln_hidden_1p": dict(lead=(7,), hq=3, hk=1, d=96, norm="layernorm", scope="hidden", w=True, b=True, off=1.0,
                         rot=32, inter=False),
}


def make_inputs(c, dtype, per_token_cos=False, packed_qkv=False):
    lead, hq, hk, d = c["lead"], c["hq"], c["hk"], c["d"]
    if packed_qkv:
        # q and k as slices of one [T, (hq + 2hk) * d] buffer: a token stride larger than H*D.
        buf = (torch.randn(*lead, hq + 2 * hk, d) * 3 + 0.7).to(dtype)
        q, k = buf[..., :hq, :], buf[..., hq:hq + hk, :]
    else:
        q = (torch.randn(*lead, hq, d) * 3 + 0.7).to(dtype)
        k = (torch.randn(*lead, hk, d) * 2 - 0.4).to(dtype)
    n_q = d if c["scope"] == "head" else hq * d
    n_k = d if c["scope"] == "head" else hk * d
    p = {}
    if c["w"]:
        p["q_weight"], p["k_weight"] = torch.randn(n_q) * 0.3, torch.randn(n_k) * 0.3
    if c["b"]:
        p["q_bias"], p["k_bias"] = torch.randn(n_q) * 0.1, torch.randn(n_k) * 0.1
    cos = sin = None
    if c["rot"]:
        rows = lead if per_token_cos else lead[-1:]
        ang = torch.rand(*rows, c["rot"] // 2) * 6.3 - 3.1
        cos, sin = torch.cos(ang), torch.sin(ang)
    return q, k, cos, sin, p


def reference64(c, q, k, cos, sin, p):
    return qk_norm_rope_ref(q.double(), k.double(), cos, sin, p.get("q_weight"), p.get("q_bias"),
                            p.get("k_weight"), p.get("k_bias"), norm=c["norm"], norm_scope=c["scope"],
                            weight_offset=c["off"], eps=1e-6, rotary_dim=c["rot"], interleaved=c["inter"],
                            out_dtype=torch.float64, compute_dtype=torch.float64)


def run_backend_into_poison(c, backend, q, k, cos, sin, p, out_dtype):
    """Call the backend implementation directly with NaN-poisoned outputs, so unwritten cells show."""
    args = make_args(q, k, cos, sin, p.get("q_weight"), p.get("q_bias"), p.get("k_weight"), p.get("k_bias"),
                     c["norm"], c["scope"], c["off"], 1e-6, c["rot"], c["inter"])
    backend_param("qk_norm_rope", backend, args)
    q_out = poison_like(torch.empty(args.q.shape, dtype=out_dtype))
    k_out = poison_like(torch.empty(args.k.shape, dtype=out_dtype))
    registry.implementations("qk_norm_rope")[backend].fn(args, q_out, k_out)
    return q_out.view(q.shape), k_out.view(k.shape)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_matches_float64_reference(backend, case, dtype):
    c = CASES[case]
    q, k, cos, sin, p = make_inputs(c, dtype)
    q_out, k_out = run_backend_into_poison(c, backend, q, k, cos, sin, p, dtype)
    q_ref, k_ref = reference64(c, q, k, cos, sin, p)
    assert_matches_ref(q_out, q_ref)
    assert_matches_ref(k_out, k_ref)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_qkv_slices_and_per_token_cos_and_out_dtype(backend):
    """q/k as views into a packed qkv buffer (token stride > H*D), cos/sin per token, fp32 out of bf16 in."""
    c = CASES["magi1"] | {"lead": (3, 7), "d": 64, "rot": 48}
    q, k, cos, sin, p = make_inputs(c, torch.bfloat16, per_token_cos=True, packed_qkv=True)
    assert not q.is_contiguous() and q.stride(-3) > q.shape[-2] * q.shape[-1]
    q_out, k_out = run_backend_into_poison(c, backend, q, k, cos, sin, p, torch.float32)
    q_ref, k_ref = reference64(c, q, k, cos, sin, p)
    assert_matches_ref(q_out, q_ref)
    assert_matches_ref(k_out, k_ref)


def test_public_api_shapes_dtypes_and_backend_choice():
    c = CASES["wan_hidden_rms"]
    q, k, cos, sin, p = make_inputs(c, torch.float16)
    qo, ko = mk.qk_norm_rope(q, k, cos, sin, norm="rmsnorm", norm_scope="hidden", weight_offset=0.0,
                             interleaved=False, **p)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == torch.float16
    qo32, _ = mk.qk_norm_rope(q, k, cos, sin, norm="rmsnorm", norm_scope="hidden", weight_offset=0.0,
                              interleaved=False, out_dtype=torch.float32, **p)
    assert qo32.dtype == torch.float32
    torch.testing.assert_close(qo32.half(), qo, atol=0, rtol=0)


def test_magi1_rope_table_end_to_end():
    """MAGI-1's learnable 3D table feeds qk_norm_rope: rotary_dim = 96, NeoX, dims 96..127 untouched by rope."""
    bands = mk.magi_rope_bands_init(16)
    t, h, w = 3, 4, 6
    cos, sin = mk.magi_rope_table(bands, t, h, w)
    q = torch.randn(t * h * w, 2, 128)
    k = torch.randn(t * h * w, 1, 128)
    qo, ko = mk.qk_norm_rope(q, k, cos, sin, preset="magi1")
    qn, kn = mk.qk_norm_rope(q, k, preset="magi1")  # norm only
    assert torch.equal(qo[..., 96:], qn[..., 96:])
    # Rotation preserves the norm of each (i, i+48) pair.
    pair = lambda x: x[..., :48] ** 2 + x[..., 48:96] ** 2  # noqa: E731
    torch.testing.assert_close(pair(qo), pair(qn), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(qo[1:, :, :96], qn[1:, :, :96])


def test_autograd_through_the_op_matches_float64_autograd():
    c = CASES["ln_bias_interleaved"]
    q, k, cos, sin, p = make_inputs(c, torch.float32)
    leaves = [q.requires_grad_(), k.requires_grad_(), *(v.requires_grad_() for v in p.values())]
    qo, ko = mk.qk_norm_rope(q, k, cos, sin, norm="layernorm", norm_scope="head", weight_offset=0.0,
                             interleaved=True, rotary_dim=40, **p,
                             backend="torch")
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    grads = torch.autograd.grad([qo, ko], leaves, [gq, gk])
    dl = [x.detach().double().requires_grad_() for x in leaves]
    pd = dict(zip(p.keys(), dl[2:]))
    q64, k64 = qk_norm_rope_ref(dl[0], dl[1], cos.double(), sin.double(), pd.get("q_weight"), pd.get("q_bias"),
                                pd.get("k_weight"), pd.get("k_bias"), norm="layernorm", norm_scope="head",
                                weight_offset=0.0, rotary_dim=40, interleaved=True,
                                compute_dtype=torch.float64)
    ref = torch.autograd.grad([q64, k64], dl, [gq.double(), gk.double()])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.zeros(4, 2, 8, dtype=torch.int32)), "'q' must have dtype"),
    (dict(k=torch.zeros(4, 2, 16)), "'k' must have q's head_dim"),
    (dict(k=torch.zeros(5, 2, 8)), "'k' must have q's leading"),
    (dict(k=torch.zeros(4, 2, 8, dtype=torch.float16)), "'k' must have q's dtype"),
    (dict(rotary_dim=10), "'rotary_dim' must be <= head_dim"),
    (dict(rotary_dim=3, cos=torch.zeros(4, 1), sin=torch.zeros(4, 1)), "'rotary_dim' must be a positive even"),
    (dict(cos=torch.zeros(4, 3), sin=torch.zeros(4, 3), rotary_dim=4), "'cos' must have last dim"),
    (dict(cos=torch.zeros(5, 2), sin=torch.zeros(5, 2)), "'cos' must have shape"),
    (dict(sin=None), "'sin' must be given together"),
    (dict(q=torch.zeros(4, 8, 2).transpose(1, 2)), "'q' must have packed heads"),
    (dict(q_weight=torch.zeros(7)), "'q_weight' must be 1-D with 8"),
    (dict(norm="batchnorm"), "'norm' must be one of"),
    (dict(norm_scope="token"), "'norm_scope' must be one of"),
    (dict(eps=0.0), "'eps' must be > 0"),
    (dict(cos=torch.zeros(4, 2, device="meta"), sin=torch.zeros(4, 2, device="meta")), "'cos' must be on q's device"),
])
def test_bad_input_names_the_argument(bad, match):
    kw = dict(q=torch.zeros(4, 2, 8), k=torch.zeros(4, 1, 8), cos=torch.zeros(4, 2), sin=torch.zeros(4, 2),
              preset="magi1")
    kw.update(bad)
    q, k, cos, sin = kw.pop("q"), kw.pop("k"), kw.pop("cos"), kw.pop("sin")
    with pytest.raises(MagiArgumentError, match=match):
        mk.qk_norm_rope(q, k, cos, sin, **kw)
