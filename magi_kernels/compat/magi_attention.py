"""``flex_flash_attn_func`` with MagiAttention's call forms, running on magi_kernels.flex_attn_func.

Accepted forms (both return ``(out, lse)``):

- HEAD / v1.1: ``flex_flash_attn_func(q, k, v, q_ranges, k_ranges, attn_type_map=None, *, softmax_scale=None,
  softcap=0.0, deterministic=False, ...)``
- v1.0 as MAGI-1 calls it: ``flex_flash_attn_func(q, k, v, q_ranges, k_ranges, max_seqlen_q, max_seqlen_k,
  attn_type_map=None, softmax_scale=None, softcap=0.0, deterministic=False, sm_margin=0, ...)``; the form is
  recognised by the sixth positional argument being an int (max_seqlen_q) rather than a tensor.

Scheduling / performance hints are accepted and ignored because they cannot change the result:
``max_seqlen_q``, ``max_seqlen_k``, ``sm_margin``, ``disable_fwd_atomic_reduction``,
``disable_bwd_dkv_atomic_reduction``, ``auto_range_merge``, ``ref_block_size``, ``swap_ab``, ``pack_gqa``,
``cat_gqa``, ``sparse_load``, ``swap_bwd_qk_loop``, ``profile_mode``, ``return_dtype=None``.
Features we do not implement (``sink``, ``return_max_logits=True``, index/block-sparse attention,
accumulating into ``out``/``lse``) raise instead of being silently dropped.

One deliberate difference: a (q, k) cell covered by two slices counts once here (union mask); MagiAttention's
kernel would add such a key twice. Its own tests and MAGI-1 only use non-overlapping slices, where the two agree.
"""

from __future__ import annotations

from typing import Optional

import torch

from magi_kernels.ops.flex_attn import flex_attn_func

OP = "flex_flash_attn_func"

_IGNORED = {"max_seqlen_q", "max_seqlen_k", "sm_margin", "disable_fwd_atomic_reduction",
            "disable_bwd_dkv_atomic_reduction", "auto_range_merge", "ref_block_size", "swap_ab", "pack_gqa",
            "cat_gqa", "sparse_load", "swap_bwd_qk_loop", "profile_mode", "max_outer_range_width", "range_merge",
            "bwd_inner_loop_k", "disable_bwd_dq_atomic_reduction"}
# Accepted only at their "off" value.
_OFF = {"sink": None, "return_max_logits": False, "index_attn_indices": None, "index_sparse_indices": None,
        "index_attn": False, "index_sparse": False, "block_sparse": False, "out": None, "lse": None,
        "return_dtype": None, "q_block_size": 1, "k_block_size": 1, "sparse_k_block_size": 1,
        "sink_layout": "sh", "inner_indices_cnt": None}
# v1.0 positional order after k_ranges.
_V10_POSITIONAL = ("max_seqlen_q", "max_seqlen_k", "attn_type_map", "softmax_scale", "softcap", "deterministic",
                   "sm_margin")


def flex_flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges: Optional[torch.Tensor] = None,
                         k_ranges: Optional[torch.Tensor] = None, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """MagiAttention's ``flex_flash_attn_func`` (either call form); returns ``(out, lse)``."""
    named: dict = {}
    if args:
        if isinstance(args[0], torch.Tensor) or (args[0] is None and len(args) == 1):
            if len(args) > 1:
                raise TypeError(f"{OP}: after attn_type_map every argument is keyword-only (HEAD form); "
                                f"got {len(args)} positional arguments after k_ranges")
            named["attn_type_map"] = args[0]
        else:
            if len(args) > len(_V10_POSITIONAL):
                raise TypeError(f"{OP}: the v1.0 form takes at most {len(_V10_POSITIONAL)} positional arguments after "
                                f"k_ranges ({', '.join(_V10_POSITIONAL)}); got {len(args)}")
            named.update(zip(_V10_POSITIONAL, args))
    for key, val in kwargs.items():
        if key in named:
            raise TypeError(f"{OP}: got multiple values for argument '{key}'")
        named[key] = val
    if q_ranges is None or k_ranges is None:
        raise TypeError(f"{OP}: q_ranges and k_ranges are required")
    attn_type_map = named.pop("attn_type_map", None)
    softmax_scale = named.pop("softmax_scale", None)
    softcap = named.pop("softcap", 0.0)
    deterministic = named.pop("deterministic", False)
    backend = named.pop("backend", None)
    for key in list(named):
        if key in _IGNORED:
            named.pop(key)
        elif key in _OFF:
            val = named.pop(key)
            if not (val is _OFF[key] or (val == _OFF[key] and not isinstance(val, torch.Tensor))):
                raise NotImplementedError(f"{OP}: argument '{key}'={val!r} is not supported by magi_kernels "
                                          f"(only {_OFF[key]!r})")
    if named:
        raise TypeError(f"{OP}: unexpected keyword arguments {sorted(named)}")
    return flex_attn_func(q, k, v, q_ranges, k_ranges, attn_type_map, softmax_scale=softmax_scale, softcap=softcap,
                          deterministic=deterministic, backend=backend)


__all__ = ["flex_flash_attn_func"]
