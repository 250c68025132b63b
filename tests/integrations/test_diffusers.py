"""apply_magi_kernels on tiny random-initialised stock diffusers transformers (built from configs, no downloads).

Each test builds the model twice from the same seed: one stock (diffusers' native attention), one with
apply_magi_kernels. fp32 outputs and input/parameter gradients must agree to <= 1e-5 relative.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import diffusers  # the test extra installs it: a missing diffusers fails here rather than skipping

from magi_kernels import BlockCausal
from magi_kernels.integrations.diffusers import (HunyuanQkNormRopeProcessor, MagiBackend, WanQkNormRopeProcessor,
                                                 apply_magi_kernels)
from magi_kernels.utils.checks import MagiArgumentError

REL = 1e-5


def _wan():
    torch.manual_seed(1234)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=32)


def _wan_inputs(batch=2, frames=3):
    # 3 frames x (4 x 6) latent pixels / (1, 2, 2) patches = 18 video tokens per sample; 7 text tokens
    return dict(hidden_states=torch.randn(batch, 4, frames, 4, 6), timestep=torch.tensor([10, 500][:batch]),
                encoder_hidden_states=torch.randn(batch, 7, 16), return_dict=False)


def _hunyuan():
    torch.manual_seed(1234)
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))


def _hunyuan_inputs():
    # second sample's text is padded (3 of 5 tokens valid): exercises the key-padding path
    return dict(hidden_states=torch.randn(2, 4, 3, 4, 4), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 5, 16), encoder_attention_mask=torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]),
                pooled_projections=torch.randn(2, 8), guidance=torch.tensor([3000.0, 3000.0]), return_dict=False)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _fwd_bwd(model, inputs):
    x = inputs["hidden_states"].clone().requires_grad_()
    out = model(**{**inputs, "hidden_states": x})[0]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def _compare(make, inputs, **apply_kwargs):
    ref_model, our_model = make(), make()
    report = apply_magi_kernels(our_model, verbose=False, **apply_kwargs)
    ref = _fwd_bwd(ref_model, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = _fwd_bwd(our_model, inputs)
    fell_back = [str(w.message) for w in caught if "magi_kernels" in str(w.message)]
    assert not fell_back, fell_back  # every routed call ran on magi_kernels (no fallback to diffusers)
    assert _rel(ours[0], ref[0]) <= REL, ("out", _rel(ours[0], ref[0]))
    assert _rel(ours[1], ref[1]) <= REL, ("d input", _rel(ours[1], ref[1]))
    assert ours[2].keys() == ref[2].keys()
    names = sorted(ref[2])
    assert _rel(torch.cat([ours[2][n].flatten() for n in names]), torch.cat([ref[2][n].flatten() for n in names])) <= REL
    # per parameter too, with an absolute floor: some gradients are exactly 0 in exact arithmetic (a key bias
    # shifts every score of a row equally) and are rounding noise (~1e-10) in both runs
    floor = 1e-9 * max(ref[2][n].norm().item() for n in names)
    for n in names:
        err = (ours[2][n].double() - ref[2][n].double()).norm().item()
        assert err <= REL * ref[2][n].double().norm().item() + floor, (n, err)
    return report, our_model


def test_wan_matches_stock_forward_and_backward():
    report, model = _compare(_wan, _wan_inputs(), attention=True, qk_norm_rope=True)
    attn1 = model.blocks[0].attn1
    assert isinstance(attn1.processor, WanQkNormRopeProcessor)
    assert isinstance(model.blocks[0].attn2.processor._attention_backend, MagiBackend)  # cross-attention routed
    text = str(report)
    assert "qk_norm_rope fused (WanQkNormRopeProcessor): 2 module(s)" in text
    assert "attention -> magi_kernels.attention (WanAttnProcessor): 4 module(s)" in text
    assert "qk_norm_rope: cross-attention (q and k lengths differ; stock norms): 2 module(s)" in text
    assert model.blocks[0].attn2.processor.__class__.__name__ == "WanAttnProcessor"


def test_hunyuan_matches_stock_with_text_padding():
    report, model = _compare(_hunyuan, _hunyuan_inputs(), attention=True, qk_norm_rope=True)
    assert isinstance(model.transformer_blocks[0].attn.processor, HunyuanQkNormRopeProcessor)
    assert isinstance(model.single_transformer_blocks[0].attn.processor, HunyuanQkNormRopeProcessor)
    # the token refiner's AttnProcessor2_0 calls SDPA directly: reported, not silently skipped
    assert report.not_applied["attention: AttnProcessor2_0 does not use diffusers' dispatch_attention_fn"] == [
        "context_embedder.token_refiner.refiner_blocks.0.attn"]


def test_routing_is_per_model_and_reversible():
    stock, routed = _wan(), _wan()
    apply_magi_kernels(routed, verbose=False)
    inputs = _wan_inputs(batch=1)
    # a model that was not given magi_kernels keeps diffusers' path bit for bit after another model was patched
    before = _wan()(**inputs)[0]
    assert torch.equal(stock(**inputs)[0], before)
    # fused QK-norm + RoPE alone: attention stays on diffusers' backend
    report = apply_magi_kernels(routed, attention=False, qk_norm_rope=True, verbose=False)
    assert routed.blocks[0].attn1.processor._attention_backend is None and not any("attention" in k for k in report.applied)
    assert _rel(routed(**inputs)[0], before) <= REL
    apply_magi_kernels(routed, attention=False, qk_norm_rope=False, verbose=False)
    assert routed.blocks[0].attn1.processor.__class__.__name__ == "WanAttnProcessor"
    assert routed.blocks[0].attn1.processor._attention_backend is None
    assert torch.equal(routed(**inputs)[0], before)


def test_block_causal_mask_on_wan_self_attention():
    # chunk-autoregressive Wan (CausVid / Self-Forcing style): 3 latent frames x 6 tokens, one chunk per frame
    inputs = _wan_inputs(batch=2)
    mask = BlockCausal(chunk_size=6, num_chunks=3)
    model = _wan()
    report = apply_magi_kernels(model, mask=mask, verbose=False)
    assert report.applied[f"mask BlockCausal on self-attention"] == ["blocks.0.attn1", "blocks.1.attn1"]
    out = model(**inputs)[0]
    # causality: changing the last latent frame must not change the outputs of the first two frames
    changed = dict(inputs, hidden_states=inputs["hidden_states"].clone())
    changed["hidden_states"][:, :, 2] += 1.0
    out2 = model(**changed)[0]
    assert torch.equal(out[:, :, :2], out2[:, :, :2])
    assert not torch.allclose(out[:, :, 2], out2[:, :, 2])
    with pytest.raises(MagiArgumentError, match="'mask' is for self-attention over video tokens only"):
        apply_magi_kernels(_hunyuan(), mask=mask, verbose=False)
    with pytest.raises(MagiArgumentError, match="'mask' needs attention=True"):
        apply_magi_kernels(_wan(), attention=False, mask=mask, verbose=False)


@pytest.mark.parametrize("make, make_inputs", [(_wan, lambda: _wan_inputs(batch=1)), (_hunyuan, _hunyuan_inputs)],
                         ids=["wan", "hunyuan"])
def test_compile_fullgraph_no_graph_breaks(make, make_inputs):
    model = make()
    apply_magi_kernels(model, verbose=False)
    inputs = make_inputs()
    with torch.no_grad():
        # fullgraph=True raises on any graph break; "eager" keeps the test fast (Dynamo capture is what matters)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        assert _rel(compiled(**inputs)[0], model(**inputs)[0]) <= REL


def test_fp8_recipe_error_against_bf16_is_reported(record_property):
    inputs = _wan_inputs(batch=1)
    with torch.no_grad():
        ref = _wan()(**inputs)[0]
        bf16 = _wan().to(torch.bfloat16)
        out_bf16 = bf16(**{k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v)
                           for k, v in inputs.items()})[0]
        model = _wan()
        report = apply_magi_kernels(model, fp8="channel", verbose=False)
        out_fp8 = model(**inputs)[0]
    err_fp8, err_bf16 = _rel(out_fp8, ref), _rel(out_bf16, ref)
    record_property("fp8_channel_rel_err_vs_fp32", err_fp8)
    record_property("bf16_rel_err_vs_fp32", err_bf16)
    print(f"\nWan tiny: fp8 'channel' recipe rel. error vs fp32 {err_fp8:.2e}; bf16 model {err_bf16:.2e}")
    assert report.fp8 is not None and len(report.fp8.converted) > 0
    assert all("blocks." in name for name, _, _ in report.fp8.converted)  # embedders / head stay high precision
    assert err_fp8 < 0.1  # loose sanity bound: e4m3 keeps ~2 significant digits per weight
    # backward through the fp8 linears (frozen fp8 weights, gradient to the input through the dequantized weight)
    ref_x, fp8_x = (inputs["hidden_states"].clone().requires_grad_() for _ in range(2))
    g = torch.randn(ref.shape)
    (_wan()(**dict(inputs, hidden_states=ref_x))[0] * g).sum().backward()
    (model(**dict(inputs, hidden_states=fp8_x))[0] * g).sum().backward()
    err_grad = _rel(fp8_x.grad, ref_x.grad)
    record_property("fp8_channel_input_grad_rel_err_vs_fp32", err_grad)
    print(f"Wan tiny: fp8 'channel' input-gradient rel. error vs fp32 {err_grad:.2e}")
    assert err_grad < 0.1
    assert not any(p.requires_grad for p in model.parameters() if p.dtype == torch.float8_e4m3fn)


def test_unsupported_mask_falls_back_with_a_warning():
    from diffusers.models import attention_dispatch as ad

    backend = MagiBackend()
    q = torch.randn(1, 4, 2, 8)
    dense = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None, None]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = backend.run(ad.dispatch_attention_fn, q, q, q, dense)
    assert any("not a key-padding mask" in str(w.message) for w in caught)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, q, q)), attn_mask=dense)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-6)


def test_key_padding_mask_must_be_a_prefix():
    from diffusers.models import attention_dispatch as ad

    q = torch.randn(2, 3, 2, 8)
    k = torch.randn(2, 5, 2, 8)
    ok = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)[:, None, None, :]
    out = MagiBackend().run(ad.dispatch_attention_fn, q, k, k, ok)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, k)), attn_mask=ok)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-6)
    holes = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)[:, None, None, :]
    with pytest.raises(RuntimeError, match="not a suffix"):
        MagiBackend().run(ad.dispatch_attention_fn, q, k, k, holes)


def test_generic_dispatcher_model_ltx_video():
    # no LTX-specific code exists: its processor calls dispatch_attention_fn, so attention=True routes it;
    # its text mask is an additive float bias (not a boolean key-padding mask): that call stays on diffusers,
    # with a one-time warning that says so
    def make():
        torch.manual_seed(1234)
        return diffusers.LTXVideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                                                    num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                                    num_layers=1, caption_channels=16)

    inputs = dict(hidden_states=torch.randn(2, 2 * 4 * 4, 4), encoder_hidden_states=torch.randn(2, 5, 16),
                  timestep=torch.tensor([10, 500]), encoder_attention_mask=torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]),
                  num_frames=2, height=4, width=4, return_dict=False)
    ref = make()(**inputs)[0]
    model = make()
    report = apply_magi_kernels(model, verbose=False)
    assert report.applied["attention -> magi_kernels.attention (LTXVideoAttnProcessor)"] == [
        "transformer_blocks.0.attn1", "transformer_blocks.0.attn2"]
    assert "qk_norm_rope: no fused path for LTXVideoAttnProcessor" in report.not_applied
    import magi_kernels.integrations.diffusers as integration

    calls = []
    real = integration._attention
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        integration._WARNED.clear()
        mp.setattr(integration, "_attention", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
        out = model(**inputs)[0]
    assert calls == [torch.Size([2, 32, 2, 8])]  # the self-attention ran on magi_kernels
    assert any("not a key-padding mask" in str(w.message) for w in caught)
    assert _rel(out, ref) <= REL
