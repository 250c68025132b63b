"""Schedules vs worked examples of MAGI-1's schedule (docs/magi1.md#sampling-schedule)."""

import numpy as np
import pytest
import torch

from magi_model import schedule as S
from magi_model.config import preset


def test_time_grid_16_steps():
    want = [0, .00131, .00526, .012, .02174, .03482, .05172, .07313, .1, .13366, .17606, .23004, .3, .39302,
            .52128, .70755, 1]
    g = S.time_grid(16)
    assert g.dtype == torch.float32 and len(g) == 17
    torch.testing.assert_close(g, torch.tensor(want), atol=6e-6, rtol=0)


def _magi1_init_t(num_steps, shortcut_mode="8,16,16", shift=3.0):
    """MAGI-1's init_t (inference/pipeline/video_generate.py) restated in numpy float32: linspace (or the
    12-step shortcut points), squared, then (inv * s) / (1 + (inv - 1) * s), inv = 1/shift in fp32."""
    if num_steps == 12:
        base = [0.0, 0.125, 0.1875] if shortcut_mode == "8,16,16" else [0.0, 0.0625, 0.125]
        u = np.array([b + a for a in (0.0, 0.25, 0.5, 0.75, 1.0) for b in base][:13], dtype=np.float32)
    else:
        u = torch.linspace(0, 1, num_steps + 1, dtype=torch.float32).numpy()  # torch's own linspace
    s = u * u
    inv, inv_m1 = np.float32(1.0 / shift), np.float32(1.0 / shift - 1)
    return (inv * s) / (np.float32(1) + inv_m1 * s)


@pytest.mark.parametrize("steps, mode", [(1, None), (4, None), (8, None), (12, "8,16,16"), (12, "16,16,8"),
                                         (16, None), (24, None), (32, None), (64, None), (100, None)])
def test_time_grid_bit_identical_to_magi1(steps, mode):
    g = S.time_grid(steps, shortcut_mode=mode or "8,16,16")
    want = torch.from_numpy(_magi1_init_t(steps, mode or "8,16,16"))
    assert g.dtype == torch.float32 and torch.equal(g.view(torch.int32), want.view(torch.int32))


def test_time_grid_form_matters():
    """The algebraically equal s / (3 - 2 s) is not bit-identical: the grid must follow MAGI-1's order."""
    u = torch.linspace(0, 1, 65, dtype=torch.float32) ** 2
    assert not torch.equal(S.time_grid(64), u / (3 - 2 * u))
    with pytest.raises(ValueError, match="argument 'shift' must be a finite number >= 1"):
        S.time_grid(16, shift=0.5)
    with pytest.raises(ValueError, match="argument 'num_steps' must be an integer >= 1"):
        S.time_grid(16.0)


@pytest.mark.parametrize("steps", [16, 32, 64])
def test_quarter_boundaries(steps):
    g = S.time_grid(steps)
    q = steps // 4
    torch.testing.assert_close(g[[q, 2 * q, 3 * q]], torch.tensor([0.02174, 0.1, 0.3]), atol=1e-5, rtol=0)


def test_shortcut_grid_and_step_sizes():
    g = S.time_grid(12)  # quarter points u = q/4 + [0, 1/8, 3/16]
    u = torch.tensor([0, .125, .1875, .25, .375, .4375, .5, .625, .6875, .75, .875, .9375, 1.0]) ** 2
    torch.testing.assert_close(g, u / (3 - 2 * u))
    assert [S.distill_step_size(12, d) for d in range(3)] == [4.0, 8.0, 8.0]
    assert [S.distill_step_size(12, d, "16,16,8") for d in range(3)] == [8.0, 8.0, 4.0]
    assert S.distill_step_size(16) == 8 and S.distill_step_size(64) == 32


def test_window_stages_worked_example():
    st = S.window_stages(4, 4)
    assert [s.clip_start for s in st] == [0, 0, 0, 0, 1, 2, 3]
    assert [s.clip_end for s in st] == [1, 2, 3, 4, 4, 4, 4]
    assert [s.t_start for s in st] == [0, 0, 0, 0, 1, 2, 3]
    assert [s.t_end for s in st] == [1, 2, 3, 4, 4, 4, 4]
    # 24B base: 32 steps -> 8 per stage x 7 stages = 56 DiT steps.
    assert S.total_steps(4, 32, 4) == 56 == len(list(S.steps(4, 32, 4)))


def test_staggered_indices_and_clean_reforward():
    steps = list(S.steps(4, 32, 4))
    assert steps[0].t_index == (0,) and steps[0].chunks == (0,)
    assert steps[8 * 3 + 5].t_index == (29, 21, 13, 5) and steps[8 * 3 + 5].chunks == (0, 1, 2, 3)
    assert steps[8 * 4].t_index == (24, 16, 8) and steps[8 * 4].chunks == (1, 2, 3)
    assert [s.step for s in steps if s.fwd_extra_clean_chunk] == [32, 40, 48]
    # Every chunk visits every grid index 0..31 exactly once.
    seen = {c: [] for c in range(4)}
    for s in steps:
        for c, i in zip(s.chunks, s.t_index):
            seen[c].append(i)
    assert all(v == list(range(32)) for v in seen.values())
    g = S.time_grid(32)
    t, t_next = S.staggered_t(g, steps[8 * 3 + 5].t_index)
    torch.testing.assert_close(t, g[[29, 21, 13, 5]])
    torch.testing.assert_close(t_next, g[[30, 22, 14, 6]])


def test_v2v_offset_skips_prefix_chunk():
    st = S.window_stages(6, 4, chunk_offset=1)
    assert st[0].clip_start == 1 and st[0].clip_end == 2 and len(st) == 8
    first = list(S.steps(6, 16, 4, chunk_offset=1))
    assert not first[0].fwd_extra_clean_chunk and first[4].stage.clip_start == 1


def test_key_windows():
    r = preset("24B_base").runtime
    args = (32, r.noise2clean_kvrange, r.clean_chunk_kvrange)
    assert [S.key_window(i, *args) for i in (0, 7, 8, 15, 16, 24, 31)] == [5, 5, 4, 4, 3, 2, 2]
    assert S.key_window(32, *args) == 1  # clean chunk sees only itself
    assert S.key_window(3, 32, [], -1) == 0  # empty noise2clean_kvrange: full causal


def test_cfg_scales_per_stage():
    r = preset("4.5B_base").runtime
    g = S.time_grid(16)
    sc = [S.cfg_scales(g[i], r.cfg_t_range, r.prev_chunk_scales, r.text_scales) for i in range(16)]
    assert sc[:12] == [(1.5, 7.5)] * 12 and sc[12:] == [(1.0, 0.0)] * 4  # t >= 0.3 (incl. 0.3): no text
    u, c, ct = torch.randn(3, 5)
    torch.testing.assert_close(S.combine_cfg(u, c, ct, 1.5, 7.5), u + 1.5 * (c - u) + 7.5 * (ct - c))
    torch.testing.assert_close(S.combine_cfg(u, c, ct, 1.0, 0.0), c)


def test_frame_counts():
    p = S.chunk_layout(96)
    assert (p.infer_chunk_num, p.chunk_offset, p.output_frames) == (4, 0, 96)
    p = S.chunk_layout(96, mode="i2v")
    assert (p.infer_chunk_num, p.latent_frames, p.output_frames) == (5, 30, 120)
    assert S.prefix_latent_frames(32) == 8  # 12 + 12 + 8 frames -> 3 + 3 + 2 latents
    p = S.chunk_layout(96, mode="v2v", prefix_latent_frames=8)
    assert (p.infer_chunk_num, p.chunk_offset, p.output_latent_frames, p.output_frames) == (6, 1, 28, 112)
    with pytest.raises(ValueError, match="argument 'mode'"):
        S.chunk_layout(96, mode="x2v")


def test_schedule_agrees_with_magi_kernels_window_mask():
    import magi_kernels.ranges as ranges
    for chunk_num, num_steps, offset in ((4, 32, 0), (6, 16, 1), (3, 8, 0)):
        for st in S.steps(chunk_num, num_steps, 4, offset):
            want = ranges.Magi1WindowMask.schedule(chunk_num, num_steps, st.step, 4, offset)
            idx = ([num_steps] if st.fwd_extra_clean_chunk else []) + list(st.t_index)
            sp = st.stage.clip_start - (1 if st.fwd_extra_clean_chunk else 0)
            assert (want["slice_point"], want["steps"]) == (sp, idx)
