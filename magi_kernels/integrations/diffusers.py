"""``apply_magi_kernels``: run a stock diffusers video transformer on magi_kernels, in place.

    from magi_kernels.integrations.diffusers import apply_magi_kernels
    report = apply_magi_kernels(pipe.transformer)          # prints what it applied and what it could not

What each switch does:

- ``attention=True``: every attention module whose processor calls diffusers' ``dispatch_attention_fn``
  (the processors of diffusers' current transformers, any model) runs its attention through
  :func:`magi_kernels.attention`. Boolean key-padding masks become per-sample key counts (built on the
  device); dense or additive-bias masks, dropout, ``attention_kwargs`` and context-parallel configs are left to
  diffusers' own backend (with a one-time warning naming the reason).
- ``qk_norm_rope=True``: WanTransformer3DModel self-attention (RMSNorm over all heads, then rotary on
  interleaved pairs) and HunyuanVideoTransformer3DModel attention (per-head RMSNorm, interleaved rotary on
  the video tokens only) get processors that do QK-norm + RoPE in one ``qk_norm_rope`` call. Calls the
  fused path cannot express (Wan cross-attention and image keys, a rotary table of another shape, other
  norm types) run the stock processor.
- ``fp8="channel" | "tensor" | "block"`` (or a dict of ``quantize_linear_weights`` arguments): the
  transformer blocks' linears become ``Fp8Linear`` (embedders, norm modulations and the output
  projection stay in high precision unless ``skip`` says otherwise).
- ``mask``: a typed mask (e.g. ``BlockCausal(chunk_size=tokens_per_frame_chunk, num_chunks=n)``) for
  the self-attention of models whose self-attention sees only the video tokens (the Wan family, including
  CausVid / Self-Forcing style autoregressive variants). It describes one sample; batches repeat it.

How attention is routed: diffusers' processors call the module-level ``dispatch_attention_fn(...,
backend=processor._attention_backend)``, whose registry is keyed by the closed enum
``AttentionBackendName``, so a third-party backend cannot be registered by name. Instead the name
``dispatch_attention_fn`` in each processor's module is wrapped once by a router that sends calls whose
``backend`` is a :class:`MagiBackend` to magi_kernels and passes every other call to diffusers
unchanged; ``apply_magi_kernels`` sets a ``MagiBackend`` on this model's processors only. Other models,
and this model after ``model.set_attention_backend(...)``, behave exactly as before.

Tested with diffusers 0.35.2, 0.36.0 and 0.42.1 (the tests' tiny Wan and HunyuanVideo models). In 0.35
HunyuanVideo's processor calls SDPA itself instead of the dispatcher, so there only QK-norm + RoPE is
fused and the report lists its attention as not applied; older versions have no attention dispatcher.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from magi_kernels.modules.fp8_linear import QuantizationReport, quantize_linear_weights
from magi_kernels.ops.attention import attention as _attention
from magi_kernels.ops.qk_norm_rope import qk_norm_rope as _qk_norm_rope
from magi_kernels.ranges.masks import VarlenCausal, _MaskBase
from magi_kernels.utils.checks import fail

OP = "apply_magi_kernels"
# Left in high precision by the fp8 recipe: timestep / text / patch embedders, AdaLN modulations, output head.
FP8_DEFAULT_SKIP = ("*embed*", "*norm*", "proj_out")


def _diffusers():
    try:
        import diffusers  # noqa: F401
        from diffusers.models import attention_dispatch
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("magi_kernels.integrations.diffusers needs diffusers: pip install 'magi-kernels[diffusers]'") from e
    return attention_dispatch


# --------------------------------------------------------------------------------------------------
# Attention routed through diffusers' dispatcher

_WARNED: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"magi_kernels: {reason}; this call runs on diffusers' attention backend", stacklevel=3)


def _key_padding_mask(attn_mask: torch.Tensor, batch: int, sk: int) -> Optional[torch.Tensor]:
    """A boolean mask that only hides keys ([B, Sk], [B, 1, Sk] or [B, 1, 1, Sk]) as [B, Sk]; else None."""
    if attn_mask.dtype != torch.bool or attn_mask.shape[-1] != sk or attn_mask.numel() != batch * sk:
        return None
    if attn_mask.dim() < 2 or attn_mask.shape[0] != batch:
        return None
    return attn_mask.reshape(batch, sk)


class MagiBackend:
    """What ``apply_magi_kernels`` puts in a processor's ``_attention_backend``: attention via magi_kernels.

    ``mask``: a typed mask for one sample (self-attention modules only); ``kernel_backend``: flex_attn's
    backend ("triton" | "torch" | None = auto).
    """

    value = "magi_kernels"  # diffusers formats backends by their .value in messages

    def __init__(self, mask: Optional[_MaskBase] = None, kernel_backend: Optional[str] = None):
        self.mask, self.kernel_backend = mask, kernel_backend

    def __repr__(self) -> str:
        return f"MagiBackend(mask={self.mask!r}, kernel_backend={self.kernel_backend!r})"

    def run(self, fallback: Callable, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False, attention_kwargs=None, *, parallel_config=None) -> torch.Tensor:
        """Attention on [B, S, H, D] tensors (diffusers' dispatcher layout); ``fallback`` is diffusers' dispatcher."""
        batch, sq, sk = query.shape[0], query.shape[1], key.shape[1]
        kv_lens, mask, reason = None, self.mask, None
        if dropout_p:
            reason = "attention dropout is not implemented by magi_kernels"
        elif attention_kwargs:
            reason = f"backend-specific attention_kwargs {sorted(attention_kwargs)} are not understood"
        elif parallel_config is not None:
            reason = "a diffusers context-parallel config is set (see magi_kernels.distributed instead)"
        elif attn_mask is not None:
            padding = _key_padding_mask(attn_mask, batch, sk)
            if padding is None:
                reason = f"a dense attention mask of shape {list(attn_mask.shape)} is not a key-padding mask"
            elif mask is not None:
                reason = "a key-padding mask and the model's chunk mask together are not supported"
            else:
                kv_lens = padding.sum(-1, dtype=torch.int32)
                # Key padding must be a prefix of valid keys; checked on the device (no sync, traceable).
                prefix = torch.arange(sk, device=padding.device)[None, :] < kv_lens[:, None]
                torch._assert_async((padding == prefix).all(),
                                    "magi_kernels: attention mask hides keys that are not a suffix of the sequence")
        elif is_causal:
            if mask is not None or sq != sk:
                reason = "is_causal with a chunk mask or with unequal query/key lengths is not supported"
            else:
                mask = VarlenCausal((0, sq), (0, sk))
        if reason is not None:
            _warn_once(reason)
            extra = {} if parallel_config is None else {"parallel_config": parallel_config}  # diffusers < 0.36: none
            return fallback(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa, attention_kwargs=attention_kwargs, **extra)
        return _attention(query, key, value, mask=mask, kv_lens=kv_lens, layout="bshd", scale=scale,
                          backend=self.kernel_backend)


def _router(original: Callable) -> Callable:
    """``dispatch_attention_fn`` that sends MagiBackend calls to magi_kernels and everything else to ``original``."""

    def dispatch_attention_fn(*args, backend=None, **kwargs):
        if isinstance(backend, MagiBackend):
            return backend.run(original, *args, **kwargs)
        return original(*args, backend=backend, **kwargs)

    dispatch_attention_fn.magi_kernels_original = original
    return dispatch_attention_fn


def _route_module_of(processor) -> Optional[str]:
    """Wrap ``dispatch_attention_fn`` in the processor's module; returns why it cannot be routed, or None."""
    module = sys.modules.get(type(processor).__module__)
    fn = getattr(module, "dispatch_attention_fn", None)
    if fn is None or not hasattr(processor, "_attention_backend"):
        return f"{type(processor).__name__} does not use diffusers' dispatch_attention_fn"
    if not hasattr(fn, "magi_kernels_original"):
        setattr(module, "dispatch_attention_fn", _router(fn))
    return None


# --------------------------------------------------------------------------------------------------
# Fused QK-norm + RoPE processors


class _FusedProcessor:
    """Shared parts: the stock processor runs every call the fused path does not take."""

    def __init__(self, stock):
        self.stock = stock

    # diffusers reads and sets these on processors (set_attention_backend, context parallel); keep them in one place
    @property
    def _attention_backend(self):
        return getattr(self.stock, "_attention_backend", None)  # None: diffusers' active backend

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.stock._attention_backend = value

    @property
    def _parallel_config(self):
        return getattr(self.stock, "_parallel_config", None)  # diffusers < 0.36 has no context parallelism

    @_parallel_config.setter
    def _parallel_config(self, value):
        self.stock._parallel_config = value

    def _attend(self, q, k, v, attn_mask):
        stock_dispatch = _diffusers().dispatch_attention_fn
        if isinstance(self._attention_backend, MagiBackend):
            return self._attention_backend.run(stock_dispatch, q, k, v, attn_mask,
                                               parallel_config=self._parallel_config)
        extra = {} if self._parallel_config is None else {"parallel_config": self._parallel_config}
        return stock_dispatch(q, k, v, attn_mask=attn_mask, backend=self._attention_backend, **extra)


def _rms_params(norm_q, norm_k, dtype):
    """(q_weight, k_weight, q_bias, k_bias, eps) of two RMSNorms that qk_norm_rope can fuse, else None."""
    def params(n):
        if isinstance(n, nn.RMSNorm):
            return n.weight, None, (n.eps if n.eps is not None else torch.finfo(dtype).eps)
        if type(n).__name__ == "RMSNorm" and hasattr(n, "eps"):  # diffusers.models.normalization.RMSNorm
            return n.weight, getattr(n, "bias", None), n.eps
        return None

    pq, pk = params(norm_q), params(norm_k)
    if pq is None or pk is None or pq[2] != pk[2]:
        return None
    return pq[0], pk[0], pq[1], pk[1], float(pq[2])


class WanQkNormRopeProcessor(_FusedProcessor):
    """Wan self-attention: q/k RMSNorm over all heads + rotary on interleaved pairs in one qk_norm_rope call.

    Same math as diffusers' ``WanAttnProcessor`` (``transformer_wan.py``): RMSNorm over the inner dim
    (H * D) with the module's eps, then cos/sin of pair i taken from columns 2i of the model's
    pair-duplicated [1, S, 1, D] tables. Cross-attention and I2V image keys run the stock processor.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        params = _rms_params(attn.norm_q, attn.norm_k, hidden_states.dtype)
        tables = rotary_emb is not None and len(rotary_emb) == 2 and rotary_emb[0].dim() == 4
        if (encoder_hidden_states is not None or attn.add_k_proj is not None or params is None or not tables
                or rotary_emb[0].shape[0] != 1 or rotary_emb[0].shape[2] != 1
                or rotary_emb[0].shape[1] != hidden_states.shape[1]):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        q_weight, k_weight, q_bias, k_bias, eps = params
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        cos = rotary_emb[0][0, :, 0, 0::2].float()
        sin = rotary_emb[1][0, :, 0, 1::2].float()
        q, k = _qk_norm_rope(q, k, cos, sin, preset="wan", q_weight=q_weight, q_bias=q_bias, k_weight=k_weight,
                             k_bias=k_bias, eps=eps)
        out = self._attend(q, k, v, attention_mask).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class HunyuanQkNormRopeProcessor(_FusedProcessor):
    """HunyuanVideo attention: per-head q/k RMSNorm + interleaved rotary on the video tokens in one call.

    Same math as diffusers' ``HunyuanVideoAttnProcessor2_0``: in single-stream blocks the text tokens are
    appended to the video tokens, normalised too but not rotated (their cos/sin rows are 1/0 here); in
    dual-stream blocks the text stream has its own projections and norms (fused without rotary).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        params = _rms_params(attn.norm_q, attn.norm_k, hidden_states.dtype)
        n_video = hidden_states.shape[1]
        if (params is None or image_rotary_emb is None or len(image_rotary_emb) != 2
                or image_rotary_emb[0].dim() != 2 or image_rotary_emb[0].shape[0] != n_video):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        dual = attn.add_q_proj is not None
        added = None
        if dual and encoder_hidden_states is not None:
            added = _rms_params(attn.norm_added_q, attn.norm_added_k, hidden_states.dtype)
            if added is None:
                return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        n_text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        if not dual and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        q, k, v = (proj(hidden_states).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        cos = image_rotary_emb[0][:, 0::2].float()
        sin = image_rotary_emb[1][:, 0::2].float()
        if not dual and n_text:  # text tokens ride along unrotated: cos 1, sin 0
            cos = torch.cat([cos, cos.new_ones(n_text, cos.shape[1])])
            sin = torch.cat([sin, sin.new_zeros(n_text, sin.shape[1])])
        q_weight, k_weight, q_bias, k_bias, eps = params
        q, k = _qk_norm_rope(q, k, cos, sin, preset="hunyuan", q_weight=q_weight, q_bias=q_bias, k_weight=k_weight,
                             k_bias=k_bias, eps=eps)
        if added is not None:
            eq, ek, ev = (proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            aq_weight, ak_weight, aq_bias, ak_bias, a_eps = added
            eq, ek = _qk_norm_rope(eq, ek, preset="hunyuan", q_weight=aq_weight, q_bias=aq_bias, k_weight=ak_weight,
                                   k_bias=ak_bias, eps=a_eps)
            q, k, v = torch.cat([q, eq], dim=1), torch.cat([k, ek], dim=1), torch.cat([v, ev], dim=1)
        out = self._attend(q, k, v, attention_mask).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out, encoder_hidden_states
        out, text = out[:, :-n_text], out[:, -n_text:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return out, text


def _fused_processor_classes() -> dict:
    """Stock processor class -> our fused processor, for the diffusers classes this version has."""
    table = {}
    try:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor
        table[WanAttnProcessor] = WanQkNormRopeProcessor
    except ImportError:
        pass
    try:
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
        table[HunyuanVideoAttnProcessor2_0] = HunyuanQkNormRopeProcessor
    except ImportError:
        pass
    return table


# --------------------------------------------------------------------------------------------------
# The entry point


@dataclasses.dataclass
class IntegrationReport:
    """What ``apply_magi_kernels`` changed (``applied``) and what it left alone and why (``not_applied``).

    Both map a one-line description to the qualified names of the modules it concerns.
    """

    model: str
    applied: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    not_applied: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    fp8: Optional[QuantizationReport] = None

    def __str__(self) -> str:
        def block(title, table):
            rows = [f"{title}:"]
            for what, names in table.items():
                rows.append(f"  {what}: {len(names)} module(s), e.g. {names[0] or '<model>'}")
            return rows if table else [f"{title}: nothing"]

        lines = [f"apply_magi_kernels({self.model})"] + block("applied", self.applied)
        lines += block("not applied", self.not_applied)
        if self.fp8 is not None:
            lines += [str(self.fp8)]
        return "\n".join(lines)


def apply_magi_kernels(model: nn.Module, *, attention: bool = True, qk_norm_rope: bool = True, fp8=None,
                       mask: Optional[_MaskBase] = None, backend: Optional[str] = None,
                       verbose: bool = True) -> IntegrationReport:
    """Route a diffusers transformer's attention, QK-norm + RoPE and (optionally) linears to magi_kernels.

    Args:
        model: a diffusers transformer (e.g. ``WanTransformer3DModel``, ``HunyuanVideoTransformer3DModel``),
            modified in place. Calling again replaces the previous settings.
        attention: route attention through ``magi_kernels.attention`` (any processor using diffusers'
            ``dispatch_attention_fn``).
        qk_norm_rope: fuse QK RMSNorm + RoPE for Wan and HunyuanVideo processors.
        fp8: None, a recipe name ("channel", "tensor", "block"), or a dict of ``quantize_linear_weights``
            keyword arguments (``recipe``, ``skip``, ``min_features``, ``backend``); ``skip`` defaults to
            :data:`FP8_DEFAULT_SKIP`.
        mask: a typed mask for one sample's self-attention over the video tokens (Wan family), e.g.
            ``BlockCausal(chunk_size=..., num_chunks=...)`` for chunk-autoregressive variants.
        backend: flex_attn backend for attention ("triton" | "torch" | None = auto).
        verbose: print the report.
    Returns:
        an :class:`IntegrationReport`.
    """
    _diffusers()
    if not isinstance(model, nn.Module):
        fail(OP, "model", f"must be a torch.nn.Module (a diffusers transformer), got {type(model).__name__}")
    if mask is not None and not isinstance(mask, _MaskBase):
        fail(OP, "mask", f"must be a magi_kernels mask object (BlockCausal, VarlenFull, ...) or None, got "
                         f"{type(mask).__name__}")
    if mask is not None and not attention:
        fail(OP, "mask", "needs attention=True (the mask is applied by magi_kernels' attention)")
    report = IntegrationReport(type(model).__name__)
    fused = _fused_processor_classes() if qk_norm_rope else {}
    for name, module in model.named_modules():
        proc = getattr(module, "processor", None)
        if proc is None or not hasattr(module, "set_processor"):
            continue
        stock = proc.stock if isinstance(proc, _FusedProcessor) else proc
        if mask is not None and isinstance(stock, _hunyuan_processor_class()):
            fail(OP, "mask", "is for self-attention over video tokens only (the Wan family); "
                             "HunyuanVideo's attention is joint over video and text tokens")
        if attention:
            why = _route_module_of(stock)
            if why is not None:
                report.not_applied[f"attention: {why}"].append(name)
            elif getattr(stock, "_parallel_config", None) is not None:
                report.not_applied["attention: a context-parallel config is set; left on diffusers' backend"].append(name)
            else:
                module_mask = None
                if mask is not None:
                    if getattr(module, "is_cross_attention", None) is False:
                        module_mask = mask
                        report.applied[f"mask {type(mask).__name__} on self-attention"].append(name)
                    elif getattr(module, "is_cross_attention", None) is None:
                        report.not_applied["mask: cannot tell whether this module is self-attention"].append(name)
                stock._attention_backend = MagiBackend(module_mask, backend)
                report.applied[f"attention -> magi_kernels.attention ({type(stock).__name__})"].append(name)
        elif isinstance(getattr(stock, "_attention_backend", None), MagiBackend):
            stock._attention_backend = None  # undo a previous apply_magi_kernels(attention=True)
        if type(stock) in fused and getattr(module, "is_cross_attention", False):
            if proc is not stock:
                module.set_processor(stock)
            report.not_applied["qk_norm_rope: cross-attention (q and k lengths differ; stock norms)"].append(name)
        elif type(stock) in fused:
            module.set_processor(fused[type(stock)](stock))
            report.applied[f"qk_norm_rope fused ({fused[type(stock)].__name__})"].append(name)
        else:
            if proc is not stock:
                module.set_processor(stock)
            if qk_norm_rope and getattr(module, "norm_q", None) is not None:
                report.not_applied[f"qk_norm_rope: no fused path for {type(stock).__name__}"].append(name)
    if fp8 is not None:
        kwargs = {"recipe": fp8} if isinstance(fp8, str) else dict(fp8)
        kwargs.setdefault("skip", FP8_DEFAULT_SKIP)
        report.fp8 = quantize_linear_weights(model, **kwargs)
    if verbose:
        print(report)
    return report


def _hunyuan_processor_class():
    try:
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
    except ImportError:  # pragma: no cover
        return ()
    return HunyuanVideoAttnProcessor2_0
