"""The throughput / memory planner (magi_model.plan) against the real code paths and MAGI-1's public facts.

- FLOPs: the planner's per-forward count equals FlopCounterMode over the real DiT forward (our ops'
  formulas registered): linears exactly, attention within 1% (it is exact: both use the mask's area).
- Memory: weight and KV-cache bytes equal the real tensors' bytes; the activation peak is within 15%
  of the peak the PyTorch profiler's allocation records give on CPU (magi_model.plan.measure).
- MAGI-1's recommended hardware comes out as "fits", and 24B distill+fp8 on 8x RTX 4090 with cp 8 as
  out of memory.
"""

from __future__ import annotations

import json

import pytest
import torch

from magi_model import build_dit
from magi_model.config import MagiConfig, preset_dict
from magi_model.dit import KVCache
from magi_model.hardware import GIB, HardwareError, parse_gpus
from magi_model.pipeline import Captions, ChunkSampler
from magi_model.plan import plan
from magi_model.plan import __main__ as cli
from magi_model.plan.layout import load_calibration
from magi_model.plan.measure import count_flops, peak_memory
from magi_model.plan.memory import activation_peak, kv_cache_bytes, weight_bytes
from magi_model.plan.workload import forward_flops, record_forwards, vae_decode_flops, vae_decode_tiles


def small_config(name: str = "tiny_distill", size: int = 64, steps: int = 8, **model) -> MagiConfig:
    """The tiny preset at a small frame size (the planner's math does not care, the CPU does)."""
    d = preset_dict(name)
    d["runtime_config"].update(video_size_h=size, video_size_w=size, num_steps=steps)
    d["model_config"].update(model)
    return MagiConfig.from_dict(d, strict=True, source=f"test:{name}")


GLU = dict(gated_linear_unit=True, half_channel_vae=True, in_channels=32, out_channels=32)


def _inputs(cfg: MagiConfig, fwd, seed: int = 0):
    """Random inputs with the recorded forward's shapes and caption lengths."""
    g = torch.Generator().manual_seed(seed)
    r, m = cfg.runtime, cfg.model
    N, R = fwd.batch, fwd.chunks
    x = torch.randn(N, m.latent_channels, R * r.chunk_width, r.video_size_h // 8, r.video_size_w // 8, generator=g)
    t = torch.rand(N, R, generator=g)
    cap = torch.randn(N, R, m.caption_max_length, m.caption_channels, generator=g) * 0.1
    mask = torch.zeros(N, R, m.caption_max_length)
    for i, valid in enumerate(fwd.caption_tokens):
        mask.view(N * R, -1)[i, :valid] = 1
    return x, t, cap, mask


def _filled_cache(model, cfg, fwd) -> KVCache | None:
    if not fwd.cache_read_tokens:
        return None
    m = cfg.model
    cache = KVCache.for_model(model, fwd.cache_read_tokens + fwd.chunks * fwd.chunk_tokens, batch=fwd.batch)
    for i in range(m.num_layers):
        cache.buffers[i] = torch.randn(fwd.batch, cache.capacity, m.num_query_groups, 2 * m.kv_channels).to(
            model.act_dtype)
    cache.filled = fwd.cache_read_tokens
    return cache


def _call(model, cfg, fwd, cache):
    x, t, cap, mask = _inputs(cfg, fwd)
    kw = dict(distill_dt=cfg.distill_dt) if cfg.engine.distill else {}
    return lambda: model(x, t, cap, mask, kv_cache=cache, slice_point=fwd.slice_point, key_windows=list(
        0 if w is None else w for w in fwd.key_windows), **kw)


@pytest.mark.parametrize("name", ["tiny_random", "tiny_distill_quant"])
def test_forward_flops_equal_flop_counter(name):
    cfg = small_config(name, size=32)
    model = build_dit(cfg)
    fwds = record_forwards(cfg, text_tokens=23)
    # The largest forward (cache read, several chunks) and, for CFG, the batched unconditional pass.
    picks = {max(fwds, key=lambda f: (f.tokens, f.cache_read_tokens))}
    picks |= {f for f in fwds if f.batch > 1}
    for fwd in sorted(picks, key=lambda f: (f.batch, f.tokens))[:2]:
        _, got = count_flops(_call(model, cfg, fwd, _filled_cache(model, cfg, fwd)))
        want = forward_flops(cfg, fwd)
        assert got["linear"] == want.total_linear, (fwd, got["by_op"])
        assert want.total_attention > 0
        assert abs(got["attention"] - want.total_attention) <= 0.01 * want.total_attention, (fwd, got)
        if cfg.engine.fp8_quant:
            fp8 = sum(v for k, v in got["by_op"].items() if k in ("magi_kernels.fp8_gemm", "magi_kernels.fp8_linear"))
            assert fp8 == want.linear["fp8"] > 0


def test_recorded_forwards_are_the_real_runs_calls():
    """record_forwards (stand-in model) sees the same calls as a real run; the real cache's bytes equal the planner's."""
    cfg = small_config("tiny_distill", size=32, steps=4)
    model = build_dit(cfg)
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, x, t, caption, caption_mask, **kw):
            calls.append((tuple(t.shape), kw.get("slice_point", 0), tuple(kw.get("key_windows") or ()),
                          int(caption_mask.bool().sum())))
            return model(x, t, caption, caption_mask, **kw)

    null, nmask = model.null_caption(2)
    cmask = torch.zeros(2, 800)
    cmask[:, :17] = 1
    sampler = ChunkSampler(Spy(), cfg, Captions(torch.randn(2, 800, 4096) * 0.1, cmask, null[0], nmask[0]))
    sampler.run(torch.randn(1, 16, 12, 4, 4), progress=False)
    rec = record_forwards(cfg, text_tokens=17)
    assert [((f.batch, f.chunks), f.slice_point, tuple(0 if w is None else w for w in f.key_windows),
             sum(f.caption_tokens)) for f in rec] == calls
    real = sum(b.nbytes for b in sampler.kv_cache.buffers if b is not None)
    assert real == kv_cache_bytes(cfg, sampler.chunk_layout.infer_chunk_num * rec[0].chunk_tokens) > 0


@pytest.mark.parametrize("name", ["tiny_distill", "tiny_distill_quant", "24B_distill_quant", "4.5B_base"])
def test_weight_bytes_equal_the_modules(name):
    d = preset_dict(name)
    cfg = MagiConfig.from_dict(d, strict=True)
    model = build_dit(cfg, device="meta")
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes(cfg, 1) == total
    L = cfg.model.num_layers
    pp = 2
    # A stage holds its layers and everything outside the layer stack (magi_model.parallel's stage DiT).
    stage0 = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                 if not (n.startswith("videodit_blocks.layers.") and int(n.split(".")[2]) >= L // pp))
    assert weight_bytes(cfg, pp, 0) == stage0
    assert weight_bytes(cfg, pp) == max(weight_bytes(cfg, pp, 0), weight_bytes(cfg, pp, 1)) < total


@pytest.mark.parametrize("name,model", [("tiny_distill", {}), ("tiny_random", GLU)])
def test_activation_peak_within_15_percent_of_measured(name, model):
    cfg = small_config(name, size=64, **model)
    dit = build_dit(cfg)
    fwds = record_forwards(cfg, text_tokens=40)
    fwd = max(fwds, key=lambda f: (f.tokens + f.cache_read_tokens, f.batch))
    cache = _filled_cache(dit, cfg, fwd)
    call = _call(dit, cfg, fwd, cache)
    call()  # warm-up: lazy imports and one-time tables are not part of a forward's activations
    _, measured = peak_memory(call)
    # On CPU the ops run their torch reference (fp32 temporaries the GPU kernels do not have).
    predicted = activation_peak(cfg, fwd, implementation="magi_model", reference_ops=True).bytes
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)


def test_vae_decode_tiles_match_the_decoder():
    # 720x1280: 90x160 latents -> 4 x 7 spatial tiles of at most 32x32, stride 24; one 6-frame chunk -> 2 in time.
    tiles = vae_decode_tiles(6, 90, 160)
    assert len(tiles) == 2 * 4 * 7 and (3, 32, 32) in tiles and (3, 18, 16) in tiles
    assert vae_decode_flops(6, 90, 160) > 0


def test_vae_decode_flops_equal_flop_counter():
    from magi_model.plan.workload import vae_decode_tile_flops
    from magi_model.vae import TINY_DDCONFIG, tiny_vae

    vae = tiny_vae(0, dtype=torch.float32)
    z = torch.randn(1, 16, 3, 8, 8)
    _, got = count_flops(lambda: vae.decode_tile(z))
    assert got["linear"] + got["attention"] == vae_decode_tile_flops(3, 8, 8, dd=TINY_DDCONFIG)


# ---------------------------------------------------------------------------------------------------
# MAGI-1's public facts (its README's recommended hardware and the RTX 4090 layout notes)


def _fits(model, gpus, **kw) -> bool:
    return bool(plan(model, gpus, **kw).fitting)


@pytest.mark.parametrize("model", ["24B_base", "24B_distill"])
def test_24B_base_and_distill_fit_8xH100(model):
    assert _fits(model, "8xH100-SXM", cp=8, pp=1, window=4)


def test_24B_distill_fp8_fits_4xH100_and_8x4090_pp2_cp4_but_not_cp8():
    assert _fits("24B_distill_quant", "4xH100-SXM", cp=4, pp=1, window=4)
    assert _fits("24B_distill_quant", "8x4090", cp=4, pp=2, window=4)
    p = plan("24B_distill_quant", "8x4090", cp=8, pp=1, window=4)
    assert not p.fitting and all("GiB" in r.why_not for r in p.results)


@pytest.mark.parametrize("model", ["4.5B_base", "4.5B_distill", "4.5B_distill_quant"])
def test_every_4_5B_variant_fits_one_4090(model):
    assert _fits(model, "1x4090", cp=1, pp=1, window=4)


def test_4_5B_distill_fp8_window_1_fits_12GB():
    assert _fits("4.5B_distill_quant", "1x12GB", window=1)


@pytest.mark.parametrize("gpus", ["4xH100-SXM", "8x4090"])
def test_24B_distill_fp8_720p_prediction_and_floor(gpus, capsys):
    p = plan("24B_distill_quant", gpus, height=720, width=1280, frames=96, steps=16)
    best = p.best
    assert best is not None
    assert 0 < best.floor_s < best.predicted_s
    assert best.predicted_s == pytest.approx(sum(best.time_s.values()))
    out = p.to_json()
    assert out["kind"].startswith("prediction")
    lay = out["layouts"][0]
    assert {"fits", "predicted_s", "floor_s", "memory_bytes"} <= set(lay)
    assert lay["peak_bytes"] <= lay["capacity_bytes"]


def test_cli_prints_floor_and_writes_json(tmp_path, capsys):
    path = tmp_path / "plan.json"
    rc = cli.main(["--model", "24B_distill_quant", "--gpus", "8x4090", "--cp_size", "4", "--pp_size", "2",
                   "--window", "4", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "PREDICTION" in out and "physical floor" in out and "x the floor" in out
    d = json.loads(path.read_text())
    assert d["layouts"] and all(isinstance(x["fits"], bool) for x in d["layouts"])
    assert all(v >= 0 for x in d["layouts"] for v in x["memory_bytes"].values())


def test_cli_and_api_reject_bad_inputs(tmp_path, capsys):
    with pytest.raises(HardwareError, match="gpus"):
        parse_gpus("eight 4090s")
    with pytest.raises(HardwareError, match="unknown GPU"):
        parse_gpus("8xV100")
    with pytest.raises(ValueError, match="window"):
        plan("24B_distill_quant", "8x4090", window=3)
    assert cli.main(["--model", "24B", "--gpus", "2xfoo"]) == 2
    assert "gpus" in capsys.readouterr().err
    res = plan("24B_distill_quant", "8x4090", cp=5, pp=1).results
    assert not any(r.fits for r in res) and "attention heads" in res[0].why_not
    bad = tmp_path / "hw.json"
    bad.write_text(json.dumps({"link_gbps": -3}))
    with pytest.raises(HardwareError, match="link_gbps"):
        parse_gpus("8x4090", str(bad))
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"meta": {"device": "cpu"}, "rows": []}))
    with pytest.raises(ValueError, match="calibration"):
        load_calibration([str(cpu)], "RTX 4090")


def test_calibration_file_replaces_default_efficiencies(tmp_path):
    f = tmp_path / "cal.json"
    f.write_text(json.dumps({"calibration": {"gpu": "NVIDIA GeForce RTX 4090", "gemm_fp8": 0.5, "attention": 0.4}}))
    base = plan("24B_distill_quant", "8x4090", cp=4, pp=2, window=4)
    cal = plan("24B_distill_quant", "8x4090", cp=4, pp=2, window=4, calibration=[str(f)])
    assert cal.efficiency.gemm_fp8 == 0.5 and "RTX 4090" in cal.efficiency.source
    assert cal.best.predicted_s > base.best.predicted_s
    assert cal.best.floor_s == base.best.floor_s


def test_hardware_file_overrides_a_preset(tmp_path):
    f = tmp_path / "hw.json"
    f.write_text(json.dumps({"memory_gib": 48, "name": "RTX 4090 48GB"}))
    c = parse_gpus("8x4090", str(f))
    assert c.gpu.memory_bytes == 48 * GIB and c.gpu.bf16_tflops == 165.2
    assert _fits("24B_distill_quant", c, cp=8, pp=1, window=4)


def test_tf32_speeds_up_the_fp32_linear_proj_of_unquantized_models():
    # Base/distill models run linear_proj (and the embedders, T5) in fp32: without TF32 that is non-tensor fp32.
    off = plan("24B_distill", "8xH100-SXM", cp=8, pp=1, window=4, kv_offload=False).best
    on = plan("24B_distill", "8xH100-SXM", cp=8, pp=1, window=4, kv_offload=False, tf32=True).best
    assert on.time_s["linear"] < 0.7 * off.time_s["linear"] and on.floor_s < off.floor_s
    assert on.time_s["attention"] == off.time_s["attention"]


@pytest.mark.parametrize("pp", [2, 3])
def test_stage_weight_bytes_equal_the_parallel_stage_dit(pp):
    from magi_model.parallel.layout import ParallelLayout
    from magi_model.parallel.model import build_stage_dit

    cfg = small_config("tiny_distill_quant")
    for stage in range(pp):
        dit = build_stage_dit(cfg, ParallelLayout(1, pp, "cp_ulysses", stage, torch.device("cpu")), seed=None)
        real = sum(p.numel() * p.element_size() for p in dit.parameters() if p.device.type != "meta")
        assert weight_bytes(cfg, pp, stage) == real
