"""attention: the batch-friendly entry point over ``flex_attn_func`` for any DiT.

    out = magi_kernels.attention(q, k, v, mask=BlockCausal(chunk_size=256, num_chunks=4))

It only reshapes: q/k/v in ``"bshd"`` [B, S, H, D], ``"bhsd"`` [B, H, S, D] or packed ``"thd"`` [T, H, D]
become flex_attn's packed [T, H, D]; the typed mask becomes ``(q_ranges, k_ranges, attn_type_map)`` with
per-sample offsets computed here; the result is reshaped back. The math, the backends, autograd and
``torch.compile`` support are flex_attn's (one opaque custom op, no second copy of the math).

Masks and batches (B samples of Sq queries / Sk keys):

- ``mask=None``: full attention inside each sample (``"thd"``: over all T tokens, one sequence);
- a mask describing ONE sample (``total_q == Sq``, ``total_k == Sk``) is applied to every sample
  (``mask.repeat(B)``);
- a mask describing the whole batch (``total_q == B*Sq``, ``total_k == B*Sk``, e.g. a ``PackedMask``
  of per-sample masks) is used as is;
- ``kv_lens`` (a tensor [B], instead of a mask): key padding, sample b attends to its first
  ``kv_lens[b]`` keys (text padded at the end). Built on the device, so no host sync and no graph break.

Anything else raises and says which sizes disagree: a wrong offset never turns into silent zeros.
"""

from __future__ import annotations

from typing import Optional

import torch

from magi_kernels.ops.flex_attn import flex_attn_func
from magi_kernels.ranges.masks import VarlenFull, _MaskBase
from magi_kernels.utils.checks import check_choice, check_tensor, fail

OP = "attention"
LAYOUTS = ("bshd", "bhsd", "thd")


def _batch_mask(mask: Optional[_MaskBase], batch: int, sq: int, sk: int) -> _MaskBase:
    """Resolve ``mask`` against a batch of ``batch`` samples of sq queries / sk keys (see module doc)."""
    if mask is None:
        return VarlenFull(tuple(i * sq for i in range(batch + 1)), tuple(i * sk for i in range(batch + 1)))
    if not isinstance(mask, _MaskBase):
        fail(OP, "mask", f"must be a mask object (VarlenFull, BlockCausal, SlidingWindow, Magi1WindowMask, "
                         f"PackedMask, ...) or None, got {type(mask).__name__}")
    if mask.total_q == sq and mask.total_k == sk:
        return mask if batch == 1 else mask.repeat(batch)
    if mask.total_q == batch * sq and mask.total_k == batch * sk:
        return mask
    fail(OP, "mask", f"covers total_q={mask.total_q} queries and total_k={mask.total_k} keys, but the inputs have "
                     f"{batch} sample(s) of {sq} queries and {sk} keys: a mask must describe one sample "
                     f"({sq} x {sk}, repeated over the batch) or the whole batch ({batch * sq} x {batch * sk}, "
                     f"e.g. PackedMask([...]) or mask.repeat({batch}))")


def _kv_lens_ranges(kv_lens, batch: int, sq: int, sk: int, device: torch.device):
    """Ranges for key padding: sample b's queries see keys [b*sk, b*sk + kv_lens[b])."""
    check_tensor(OP, "kv_lens", kv_lens, ndim=1)
    if kv_lens.is_floating_point() or kv_lens.shape[0] != batch:
        fail(OP, "kv_lens", f"must be an integer tensor [{batch}] (one key count per sample), got {kv_lens.dtype} "
                            f"shape {list(kv_lens.shape)}")
    lens = kv_lens.to(device=device, dtype=torch.int32)
    # A count above sk would reach into the next sample's keys: checked on the device (no sync, traceable).
    torch._assert_async(((lens >= 0) & (lens <= sk)).all(), f"attention: argument 'kv_lens' must lie in [0, {sk}]")
    b = torch.arange(batch, dtype=torch.int32, device=device)
    q_ranges = torch.stack([b * sq, (b + 1) * sq], dim=-1)
    k_ranges = torch.stack([b * sk, b * sk + lens], dim=-1)
    return q_ranges, k_ranges, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Optional[_MaskBase] = None,
              layout: str = "bshd", scale: Optional[float] = None, softcap: float = 0.0, return_lse: bool = False,
              kv_lens: Optional[torch.Tensor] = None, backend: Optional[str] = None):
    """Masked attention over a batch (or a packed varlen batch) through ``flex_attn_func``.

    Args:
        q: [B, Sq, Hq, D] ("bshd"), [B, Hq, Sq, D] ("bhsd") or [Tq, Hq, D] ("thd").
        k, v: the same layout with Sk (Tk) tokens and Hk heads; Hq % Hk == 0 (GQA / MQA).
        mask: a typed mask (``VarlenFull``, ``VarlenCausal``, ``BlockCausal``, ``SlidingWindow``,
            ``Magi1WindowMask``, ``PackedMask``) for one sample or for the whole batch; None = full.
        layout: "bshd" | "bhsd" | "thd".
        scale: softmax scale (default 1/sqrt(D)). softcap: tanh soft-capping of the scores (0 = off).
        return_lse: also return the fp32 natural-log logsumexp per (query, head).
        kv_lens: int tensor [B] of valid keys per sample (key padding at the end), instead of ``mask``.
        backend: flex_attn backend ("triton" | "torch" | None = auto).
    Returns:
        out in q's layout, shape and dtype; with ``return_lse``, ``(out, lse)`` where lse is [B, Hq, Sq] for
        "bshd"/"bhsd" (FlashAttention's convention) and [Tq, Hq] for "thd". Rows the mask leaves empty: out 0,
        lse -inf.
    """
    check_choice(OP, "layout", layout, LAYOUTS)
    want = 3 if layout == "thd" else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t, ndim=want)
    if layout == "bhsd":  # to bshd (views; flex_attn needs only a contiguous last dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if layout == "thd":
        batch, sq, sk = 1, q.shape[0], k.shape[0]
        q3, k3, v3 = q, k, v
    else:
        batch, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        for name, t in (("k", k), ("v", v)):
            if t.shape[0] != batch:
                fail(OP, name, f"must have q's batch size {batch}, got shape {list(t.shape)} (layout {layout!r})")
        q3, k3, v3 = (t.reshape(t.shape[0] * t.shape[1], t.shape[2], t.shape[3]) for t in (q, k, v))
    # flex_attn_func checks dtypes, heads, head_dim and devices and names the offending argument.
    if kv_lens is None:
        # range_tensors reads no tensor values (traceable); flex_attn validates the values inside its op
        q_ranges, k_ranges, types = _batch_mask(mask, batch, sq, sk).range_tensors(q.device)
    elif mask is not None or layout == "thd":
        fail(OP, "kv_lens", "must not be combined with a mask, and needs layout 'bshd' or 'bhsd'")
    else:
        q_ranges, k_ranges, types = _kv_lens_ranges(kv_lens, batch, sq, sk, q.device)
    out, lse = flex_attn_func(q3, k3, v3, q_ranges, k_ranges, types, softmax_scale=scale, softcap=softcap,
                              backend=backend)
    if layout != "thd":
        out = out.view(batch, sq, *out.shape[1:])
        lse = lse.view(batch, sq, -1).transpose(1, 2).contiguous()  # [B, H, Sq]
        if layout == "bhsd":
            out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
