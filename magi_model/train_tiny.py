"""Train the tiny MAGI-1 demo model (``--preset tiny``) on procedural videos, on the CPU.

    python -m magi_model.train_tiny                       # writes magi_model/assets/tiny/
    python -m magi_model.train_tiny --out /tmp/tiny --dit_minutes 5
    python -m magi_model.train_tiny --vae /tmp/tiny/vae   # DiT + text encoder on an existing VAE

Three models, all through the code paths that generate videos (docs/tiny_model.md):

1. the ViT-VAE (:class:`magi_model.vae.ViTVAE`, a 1-block config at 32 px), trained as an
   autoencoder on 12-frame clips with an object-weighted MSE, checked with the detector on held-out
   clips; its latent space is then rescaled to MAGI-1's ``scale_factor``;
2. the MAGI-1 DiT (:class:`magi_model.dit.VideoDiT`: chunked block-causal attention, per-chunk times,
   the same key windows and caption layout the sampler uses) and
3. the grammar text encoder (:class:`magi_model.text.GrammarTextEncoder`), trained together with the DiT.

The DiT learns MAGI-1's flow-matching convention: ``x_t = t x_1 + (1 - t) x_0`` with ``x_0`` noise,
``x_1`` the clean latent, ``t = 1`` clean, and the velocity target ``x_1 - x_0`` (the sampler's Euler
step is ``x += v (t_next - t)``). Each training window mirrors a sampler forward: leading clean chunks
at ``clean_t`` that see only themselves (what the KV cache holds), then noisy chunks at staggered
times (older = cleaner), with the key windows :func:`magi_model.schedule.key_window` gives. Some
samples drop the text (the null caption, for classifier-free guidance), some overwrite the first
latent frame with a still image's latent (I2V) or the first noisy chunk's leading frames with clean
ones (V2V prefix), as the sampler does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from magi_model import procedural, schedule
from magi_model import text as text_mod
from magi_model import vae as vae_mod
from magi_model.config import MagiConfig, tiny_trained_dict
from magi_model.dit import LayerNorm1p, VideoDiT, build_dit
from magi_model.loading import save_checkpoint

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny")
CLIP_CHUNKS = 4  # training clips: 4 chunks of 24 frames (a V2V run of the demo reaches 4 chunks)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# Attention for training


def _attention_groups(q_ranges: torch.Tensor, k_ranges: torch.Tensor, Tq: int, Tk: int):
    """Split the (q_range, k_range) pairs into independent groups (no query row and no key shared
    between groups: a batch element's self-attention, a chunk's cross-attention to its own caption)
    and lay each out densely, padded to the largest group: (q_index, k_index, bias), (G, Sq) and
    (G, Sk) row indices (padding points at row Tq / Tk, a zero row the caller appends) and the additive
    mask (G, Sq, Sk) (0 or -inf; padded keys are -inf, padded query rows 0 and dropped after)."""
    pairs = [(int(a), int(b), int(c), int(d)) for (a, b), (c, d) in zip(q_ranges.tolist(), k_ranges.tolist())
             if b > a and d > c]
    parent = list(range(len(pairs)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, (qa, qb, ka, kb) in enumerate(pairs):
        for j in range(i):
            qa2, qb2, ka2, kb2 = pairs[j]
            if (qa < qb2 and qa2 < qb) or (ka < kb2 and ka2 < kb):
                parent[root(i)] = root(j)
    groups: dict[int, list] = {}
    for i, pr in enumerate(pairs):
        groups.setdefault(root(i), []).append(pr)
    rows, keys, masks = [], [], []
    for members in groups.values():
        q_rows = sorted({r for qa, qb, _, _ in members for r in range(qa, qb)})
        k_rows = sorted({c for _, _, ka, kb in members for c in range(ka, kb)})
        q_pos = {r: i for i, r in enumerate(q_rows)}
        k_pos = {c: i for i, c in enumerate(k_rows)}
        m = torch.zeros(len(q_rows), len(k_rows), dtype=torch.bool)
        for qa, qb, ka, kb in members:
            m[q_pos[qa]:q_pos[qb - 1] + 1, k_pos[ka]:k_pos[kb - 1] + 1] = True
        rows.append(q_rows)
        keys.append(k_rows)
        masks.append(m)
    G = len(rows)
    Sq = max((len(r) for r in rows), default=1)
    Sk = max((len(k) for k in keys), default=1)
    q_index = torch.full((max(G, 1), Sq), Tq, dtype=torch.long)
    k_index = torch.full((max(G, 1), Sk), Tk, dtype=torch.long)
    bias = torch.zeros(max(G, 1), Sq, Sk)  # padded query rows: 0 (finite softmax, dropped after)
    for g in range(G):
        nq, nk = len(rows[g]), len(keys[g])
        q_index[g, :nq] = torch.tensor(rows[g])
        k_index[g, :nk] = torch.tensor(keys[g])
        bias[g, :nq] = float("-inf")  # padded keys included
        bias[g, :nq, :nk].masked_fill_(masks[g], 0.0)
    return q_index, k_index, bias


# One training forward calls the attention with the same ranges in every layer: the layout is built
# once per distinct (q_ranges, k_ranges, sizes) and reused (self- and cross-attention of one step).
_LAYOUTS: dict = {}


def dense_range_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges: torch.Tensor,
                          k_ranges: torch.Tensor, *, softmax_scale: float | None = None) -> torch.Tensor:
    """:func:`magi_model.attention.range_attention`'s math (union of full (q_range, k_range) blocks, GQA,
    rows without keys zero) as dense masked attention over independent groups of rows
    (:func:`_attention_groups`), softmax(q k^T + mask) v written out so its backward is plain batched
    matmuls. Training only: the groups are a few hundred tokens, where the CPU path of flex_attn walks
    the ranges in Python. tests/model/test_tiny_trained.py checks in float64 that both agree."""
    Tq, hq, d = q.shape
    Tk, hk = k.shape[:2]
    key = (q_ranges.cpu().numpy().tobytes(), k_ranges.cpu().numpy().tobytes(), Tq, Tk)
    if key not in _LAYOUTS:
        if len(_LAYOUTS) > 8:
            _LAYOUTS.clear()
        _LAYOUTS[key] = _attention_groups(q_ranges.cpu(), k_ranges.cpu(), Tq, Tk)
    q_index, k_index, bias = (t.to(q.device) for t in _LAYOUTS[key])
    G, Sq = q_index.shape
    g = hq // hk
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    zero_q, zero_k = q.new_zeros(1, hq, d), k.new_zeros(1, hk, d)
    qq = torch.cat([q, zero_q])[q_index].transpose(1, 2)  # (G, hq, Sq, d)
    kk = torch.cat([k, zero_k])[k_index].repeat_interleave(g, dim=2).transpose(1, 2)  # (G, hq, Sk, d)
    vv = torch.cat([v, zero_k])[k_index].repeat_interleave(g, dim=2).transpose(1, 2)
    scores = torch.matmul(qq, kk.transpose(-1, -2)) * scale + bias.to(q.dtype)[:, None]
    o = torch.matmul(torch.softmax(scores, dim=-1), vv).transpose(1, 2).reshape(G * Sq, hq, d)
    keep = q_index.reshape(-1) < Tq  # every row of a group has keys; rows in no group stay zero
    out = q.new_zeros(Tq, hq, d)
    return out.index_copy(0, q_index.reshape(-1)[keep], o[keep])


class _TrainingAttention:
    """Within ``with _TrainingAttention():`` the DiT and the VAE use :func:`dense_range_attention`."""

    def __enter__(self):
        from magi_model import dit as dit_mod

        self._saved = (dit_mod.range_attention, vae_mod.range_attention)
        dit_mod.range_attention = vae_mod.range_attention = dense_range_attention
        return self

    def __exit__(self, *exc):
        from magi_model import dit as dit_mod

        dit_mod.range_attention, vae_mod.range_attention = self._saved
        return False


# --------------------------------------------------------------------------------------------------
# Data


def make_clips(n: int, seed: int, size_px: int, frames_per_chunk: int) -> tuple[np.ndarray, list, list]:
    """``n`` clips: uint8 (n, T, H, W, 3), per-clip chunk captions, per-clip specs."""
    rng = np.random.default_rng(seed)
    frames, caps, specs = [], [], []
    for _ in range(n):
        c = procedural.make_clip(rng, num_chunks=CLIP_CHUNKS, frames_per_chunk=frames_per_chunk, size_px=size_px)
        frames.append(c.frames)
        caps.append(c.captions)
        specs.append(c.spec)
    return np.stack(frames), caps, specs


def to_input(frames: np.ndarray) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> VAE input (B, 3, T, H, W) in [-1, 1], fp32 (as vae.pixels_to_input)."""
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------
# VAE


def object_weights(x: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, T, H, W) for VAE input ``x`` (B, 3, T, H, W) in [-1, 1]: 1 on the
    background, ``1 + object_weight`` where a pixel is farther than 30 / 255 (RGB distance) from its
    frame's background colour. The object covers 4-12 % of a frame, so an unweighted MSE is won by
    the background and the decoder settles for a greyish blob (docs/tiny_model.md). The top-left
    pixel is background in every procedural frame (the object keeps a margin of its size + 1 px)."""
    bg = x[:, :, :, :1, :1]
    far = ((x - bg).norm(dim=1, keepdim=True) > 2 * 30 / 255).to(x.dtype)
    return 1.0 + object_weight * far


def train_vae(cfg: MagiConfig, clips: np.ndarray, steps: int, seed: int, batch: int = 8, *,
              object_weight: float = 20.0, lr: float = 2e-3, check=None, check_every: int = 500,
              ) -> vae_mod.ViTVAE:
    """The VAE as a deterministic autoencoder with an object-weighted MSE (:func:`object_weights`).
    ``check(vae, step)``, when given, runs every ``check_every`` steps (the held-out detector check)."""
    torch.manual_seed(seed)
    dd = cfg_vae_ddconfig(cfg)
    vae = vae_mod.build_vae(dd, dtype=torch.float32, seed=seed, tile_sample_min_length=cfg.runtime.fps // 2,
                            tile_sample_min_size=dd["video_size"])
    for name, p in vae.named_parameters():  # identity norms to start from
        if name.endswith(("norm.weight", "norm2.weight")):
            p.data.fill_(1.0)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    L = dd["video_length"]
    n, T = clips.shape[:2]
    rng = np.random.default_rng(seed + 1)
    t0 = time.time()
    for step in range(steps):
        cur_lr = lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        idx = rng.integers(0, n, batch)
        start = rng.integers(0, T // L, batch) * L
        x = to_input(np.stack([clips[i, s:s + L] for i, s in zip(idx, start)]))
        mu = vae.encoder(x)[:, :dd["z_chans"]]
        # Deterministic autoencoder on the posterior mean (what encode returns), with a little latent
        # noise (5 % of the latents' spread) so the decoder tolerates the DiT's small errors.
        z = mu + 0.05 * mu.detach().std() * torch.randn_like(mu)
        rec = vae.decoder(z)
        w = object_weights(x, object_weight)
        loss = ((rec - x) ** 2 * w).sum() / (w.sum() * 3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            mse = F.mse_loss(rec.detach(), x).item()
            _log(f"vae step {step}/{steps} weighted mse {loss.item():.5f} mse {mse:.5f} "
                 f"({time.time() - t0:.0f} s)")
        if check is not None and (step + 1) % check_every == 0 and step + 1 < steps:
            vae.eval()
            check(vae, step + 1)
            vae.train()
    return vae.eval()


@torch.no_grad()
def reconstruction_check(vae: vae_mod.ViTVAE, clips: list) -> tuple[int, int, list[str]]:
    """Encode and decode held-out procedural clips as the sampler does (tiled, uint8 in and out) and
    run the detector on every 24-frame chunk: (chunks with the right colour and direction, chunks,
    one line per miss)."""
    hits, total, misses = 0, 0, []
    for k, clip in enumerate(clips):
        z = vae_mod.encode_video(vae, torch.from_numpy(clip.frames), 1.0)
        rec = vae_mod.decode_latents(vae, z, 1.0).numpy()
        fpc = len(clip.frames) // len(clip.directions)
        for c, want in enumerate(clip.directions):
            det = procedural.detect(rec[c * fpc:(c + 1) * fpc], clip.spec.background)
            got = procedural.motion_direction(det.centroids)
            total += 1
            if det.colour == clip.spec.colour and got == want:
                hits += 1
            else:
                misses.append(f"clip {k} chunk {c}: want {clip.spec.colour}/{want}, got {det.colour}/{got}")
    return hits, total, misses


@torch.no_grad()
def normalize_latents(vae: vae_mod.ViTVAE, scale_factor: float, clips: np.ndarray) -> float:
    """Rescale the latent space so that ``scale_factor * latent`` has unit std on the training clips
    (the encoder's mean rows times s, the decoder's input projection divided by s: same decoded video).
    Returns s."""
    z, _ = encode_clips(vae, clips[:64])
    s = (1.0 / scale_factor) / float(z.std())
    zc = vae.z_chans
    vae.encoder.last_layer.weight[:zc] *= s
    vae.encoder.last_layer.bias[:zc] *= s
    vae.decoder.proj_in.weight /= s
    _log(f"vae latents rescaled by {s:.3f} (scaled latent std 1 for scale_factor {scale_factor})")
    return s


def cfg_vae_ddconfig(cfg: MagiConfig) -> dict:
    from magi_model.config import TINY_TRAINED_VAE

    return dict(TINY_TRAINED_VAE)


@torch.no_grad()
def encode_clips(vae: vae_mod.ViTVAE, clips: np.ndarray, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled latent means (n, z, T/4, h, w) of whole clips (12-frame tiles, as the sampler's VAE
    tiling at 32 px) and of each clip's first frame repeated 4 times (the I2V image latent)."""
    L = vae.tile_frames
    outs, stills = [], []
    for b in range(0, len(clips), batch):
        part = clips[b:b + batch]
        B, T = part.shape[:2]
        x = to_input(part)  # (B, 3, T, H, W)
        tiles = x.reshape(B, 3, T // L, L, *x.shape[3:]).permute(0, 2, 1, 3, 4, 5).reshape(-1, 3, L, *x.shape[3:])
        z = vae.encode_tile(tiles)  # (B*T/L, z, L/4, h, w)
        z = z.reshape(B, T // L, *z.shape[1:]).permute(0, 2, 1, 3, 4, 5).reshape(B, z.shape[1], -1, *z.shape[3:])
        outs.append(z)
        still = x[:, :, :1].expand(-1, -1, vae.temporal_factor, -1, -1)
        stills.append(vae.encode_tile(still)[:, :, :1])
    return torch.cat(outs), torch.cat(stills)


# --------------------------------------------------------------------------------------------------
# DiT + text encoder


def init_for_training(model: VideoDiT, seed: int) -> VideoDiT:
    """Seeded random weights, then identity norms and a zero output layer (a plain DiT start)."""
    from magi_model.dit import init_random_weights

    init_random_weights(model, seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, LayerNorm1p):
                mod.weight.fill_(0.0 if mod.one_p else 1.0)
                mod.bias.zero_()
            elif isinstance(mod, torch.nn.LayerNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
        model.final_linear.linear.weight.mul_(0.1)
    return model


def dit_forward(model: VideoDiT, x, t, caption, mask, **kw) -> torch.Tensor:
    """VideoDiT.forward with autograd (the inference entry points run under no_grad)."""
    h, ctx, geom = VideoDiT.prepare.__wrapped__(model, x, t, caption, mask, **kw)
    for layer in model.videodit_blocks.layers:
        h = layer(h, ctx)
    return VideoDiT.finish.__wrapped__(model, h, geom)


class Windows:
    """Draws training windows that look like the sampler's forwards."""

    def __init__(self, cfg: MagiConfig, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        r = cfg.runtime
        self.n_steps, self.window = r.num_steps, r.window_size

    def times(self, n_noisy: int) -> tuple[list[float], list[int]]:
        """Staggered times (oldest first) and their grid indices: the newest chunk at u in [0, 1/window),
        each older one 1/window later in u, as the sampler's window; t = shift(u^2) (the time grid)."""
        rng = self.rng
        if rng.random() < 0.25:  # sometimes independent times, sorted (older = cleaner)
            u = np.sort(rng.random(n_noisy))[::-1]
        else:
            d = rng.random() / self.window
            u = np.array([d + k / self.window for k in range(n_noisy)])[::-1]
        u = np.clip(u, 0.0, 0.999)
        s = torch.tensor(u.copy(), dtype=torch.float32) ** 2
        inv = 1.0 / schedule.SHIFT
        t = inv * s / (1 + (inv - 1) * s)
        idx = [min(int(v * self.n_steps), self.n_steps - 1) for v in u]
        return t.tolist(), idx


def train_dit(cfg: MagiConfig, latents: torch.Tensor, stills: torch.Tensor, captions: list, *, seed: int,
              minutes: float, max_steps: int, batch: int, out: str, save_every_s: float = 240.0,
              lr: float = 5e-4) -> tuple[VideoDiT, text_mod.GrammarTextEncoder]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 2)
    m, r = cfg.model, cfg.runtime
    model = init_for_training(build_dit(cfg, seed=seed), seed)
    enc = text_mod.GrammarTextEncoder(procedural.vocabulary(), m.caption_channels, m.caption_max_length)
    special = text_mod.random_special_tokens(m.caption_channels, 0)
    flags = dict(text_mod.DEFAULT_FLAGS)
    model.train()
    params = list(model.parameters()) + list(enc.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params]
    cw = r.chunk_width
    n_clips, C, T = latents.shape[:3]
    n_chunks_max = T // cw
    tokenized = [[enc.tokenize(c) for c in caps] for caps in captions]
    win = Windows(cfg, rng)
    t_start, last_save, step = time.time(), time.time(), 0
    losses: list[float] = []
    budget = minutes * 60
    while step < max_steps and time.time() - t_start < budget:
        frac = min(1.0, (time.time() - t_start) / budget)
        cur_lr = lr * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        # --- window structure (shared by the batch): K chunks, the first n_clean of them clean context.
        K = int(rng.choice([1, 2, 3, 4], p=[0.15, 0.4, 0.25, 0.2]))
        K = min(K, n_chunks_max)
        n_clean = int(rng.integers(0, K)) if K > 1 and rng.random() < 0.6 else 0
        n_noisy = K - n_clean
        clean_kw = schedule.key_window(r.num_steps, r.num_steps, r.noise2clean_kvrange, r.clean_chunk_kvrange)
        t_rows, kw = [], None
        for _ in range(batch):
            tn, idx = win.times(n_noisy)
            t_rows.append([r.clean_t] * n_clean + tn)
            if kw is None:
                kw = [clean_kw] * n_clean + [schedule.key_window(i, r.num_steps, r.noise2clean_kvrange,
                                                                 r.clean_chunk_kvrange) for i in idx]
        t = torch.tensor(t_rows, dtype=torch.float32)  # (B, K)
        idx = rng.integers(0, n_clips, batch)
        x1 = latents[idx, :, :K * cw] * r.scale_factor  # (B, C, K*cw, h, w)
        x0 = torch.randn_like(x1)
        t_frames = t.repeat_interleave(cw, dim=1)[:, None, :, None, None]
        xt = t_frames * x1 + (1 - t_frames) * x0
        target = x1 - x0
        weight = torch.ones(batch, 1, K * cw, 1, 1)
        weight[:, :, :n_clean * cw] = 0.0  # clean context chunks: no loss
        # Prefixes: I2V (first frame = the still image's latent) or V2V (leading frames of the first
        # noisy chunk clean). Overwritten frames carry no loss, as the sampler overwrites them.
        for b in range(batch):
            u = rng.random()
            if n_clean == 0 and u < 0.15:
                xt[b, :, :1] = stills[idx[b]] * r.scale_factor
                weight[b, :, :1] = 0.0
            elif n_clean >= 1 and u < 0.25:
                a = n_clean * cw
                np_ = int(rng.integers(1, cw))
                xt[b, :, a:a + np_] = x1[b, :, a:a + np_]
                weight[b, :, a:a + np_] = 0.0
        # --- captions: per chunk; clean chunks get the null caption (as the cache-writing pass);
        # dropped samples get the null caption everywhere (classifier-free guidance).
        null = model.y_embedder.null_caption_embedding.float()
        null_mask = torch.zeros(m.caption_max_length)
        null_mask[:50] = 1
        dropped = torch.from_numpy(rng.random(batch) < 0.15)
        ids = [tokenized[i][c] for i in idx for c in range(K)]
        emb, emask = enc.encode(ids)
        emb, emask = emb.view(batch, K, *emb.shape[1:]), emask.view(batch, K, -1)
        caps, masks = [], []
        for b in range(batch):
            prompts = [(emb[b, c], emask[b, c]) for c in range(n_clean, K)]
            cp = text_mod.build_captions(prompts, num_chunks=n_noisy, chunk_offset=0, null=null, null_mask=null_mask,
                                         special_tokens=special, flags=flags)
            cond, cmask = cp.cond, cp.cond_mask
            if n_clean:
                cond = torch.cat([null[None].expand(n_clean, -1, -1), cond])
                cmask = torch.cat([null_mask[None].expand(n_clean, -1), cmask])
            if dropped[b]:
                cond, cmask = null[None].expand(K, -1, -1), null_mask[None].expand(K, -1)
            caps.append(cond)
            masks.append(cmask)
        cap, cmask = torch.stack(caps), torch.stack(masks)
        v = dit_forward(model, xt, t, cap, cmask, caption_dropout=dropped, key_windows=kw)
        loss = ((v - target) ** 2 * weight).sum() / (weight.sum() * C * x1.shape[3] * x1.shape[4])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            _log(f"dit step {step} loss {np.mean(losses[-25:]):.4f} lr {cur_lr:.2e} ({time.time() - t_start:.0f} s)")
        if time.time() - last_save > save_every_s:
            save_dit_and_text(cfg, model, enc, ema, params, out)
            last_save = time.time()
            _log(f"checkpoint written to {out} (step {step})")
    _log(f"dit: {step} steps in {time.time() - t_start:.0f} s, final loss {np.mean(losses[-50:]):.4f}")
    save_dit_and_text(cfg, model, enc, ema, params, out)
    return model, enc


@torch.no_grad()
def save_dit_and_text(cfg: MagiConfig, model, enc, ema, params, out: str) -> None:
    """Write the EMA weights: the DiT in MAGI-1's layout, the text encoder with its vocabulary."""
    from safetensors.torch import save_file

    live = [p.detach().clone() for p in params]
    for p, e in zip(params, ema):
        p.copy_(e)
    try:
        save_checkpoint(model, os.path.join(out, cfg.weight_subdir))
        sd = {k: v.detach().contiguous() for k, v in enc.state_dict().items()}
        os.makedirs(os.path.join(out, "text"), exist_ok=True)
        save_file(sd, os.path.join(out, "text", text_mod.GRAMMAR_ENCODER_FILE), metadata={
            "vocab": json.dumps(enc.vocab[2:]), "dim": str(enc.dim), "max_length": str(enc.max_length),
            "max_words": str(enc.max_words)})
    finally:
        for p, v in zip(params, live):
            p.copy_(v)


def save_vae(vae: vae_mod.ViTVAE, out: str) -> None:
    from safetensors.torch import save_file

    d = os.path.join(out, "vae")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"_class_name": "ViTVAE", "ddconfig": vae.ddconfig}, f, indent=1)
    # Stored in fp16 (half the bytes; load_vae casts to the run's dtype).
    save_file({k: v.detach().half().contiguous() for k, v in vae.state_dict().items()},
              os.path.join(d, vae_mod.WEIGHTS_FILE))


def save_special_tokens(dim: int, out: str) -> None:
    """The special-token rows (random stand-ins, seed 0) in MAGI-1's special_tokens.npz layout."""
    tok = text_mod.random_special_tokens(dim, 0)
    rows = text_mod.random_special_token_rows(dim, 0)
    os.makedirs(os.path.join(out, "text"), exist_ok=True)
    path = text_mod.grammar_special_tokens_path(os.path.join(out, "text"))
    np.savez(path, caption_token=rows[0:1].numpy(), logo_token=rows[1:2].numpy(),
             other_tokens=rows[2:].numpy())
    check = text_mod.load_special_tokens(path)
    assert all(torch.equal(check[k], tok[k]) for k in tok), "special tokens file differs from the stand-ins"


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m magi_model.train_tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=ASSETS, help="output folder (default: the package's assets/tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clips", type=int, default=600, help="procedural training clips (4 chunks of 24 frames)")
    p.add_argument("--vae_steps", type=int, default=3000)
    p.add_argument("--vae_object_weight", type=float, default=20.0,
                   help="extra loss weight of object pixels in the VAE's MSE")
    p.add_argument("--vae", default=None, help="reuse a trained VAE folder instead of training one")
    p.add_argument("--dit_minutes", type=float, default=55.0, help="wall-clock budget of the DiT phase")
    p.add_argument("--dit_steps", type=int, default=100000, help="step cap of the DiT phase")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dit_lr", type=float, default=1e-3, help="peak AdamW learning rate of the DiT phase")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (on a 2-core machine shared with other jobs 1 is faster than 2)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    with _TrainingAttention():
        return _train(a)


def _train(a: argparse.Namespace) -> int:
    t0 = time.time()
    cfg = MagiConfig.from_dict(tiny_trained_dict(), strict=True, source="tiny (training)")
    r = cfg.runtime
    os.makedirs(a.out, exist_ok=True)
    _log(f"making {a.clips} procedural clips ({CLIP_CHUNKS} x 24 frames at {r.video_size_w} px)")
    clips, caps, _specs = make_clips(a.clips, a.seed, r.video_size_w, 4 * r.chunk_width)
    _log(f"clips done ({time.time() - t0:.0f} s)")
    held_out = [procedural.make_clip(np.random.default_rng(a.seed + 1000 + k), num_chunks=2, size_px=r.video_size_w)
                for k in range(12)]

    def check(vae, step):
        hits, total, misses = reconstruction_check(vae, held_out)
        _log(f"vae step {step}: held-out reconstructions, detector right in {hits}/{total} chunks"
             + "".join(f"\n    {m}" for m in misses[:6]))
        save_vae(vae, a.out)  # a usable VAE survives an interrupted run (--vae reuses it)

    if a.vae:
        vae = vae_mod.load_vae(a.vae, dtype=torch.float32, tile_sample_min_length=r.fps // 2,
                               tile_sample_min_size=r.video_size_w)
    else:
        vae = train_vae(cfg, clips, a.vae_steps, a.seed, object_weight=a.vae_object_weight, check=check)
    normalize_latents(vae, cfg.runtime.scale_factor, clips)  # s = 1 for an already normalized VAE
    check(vae, "final")
    save_vae(vae, a.out)
    save_special_tokens(cfg.model.caption_channels, a.out)
    latents, stills = encode_clips(vae, clips)
    std = float(latents.std())
    _log(f"latents {list(latents.shape)}: std {std:.3f} (1/std = {1 / std:.3f}; config scale_factor "
         f"{r.scale_factor})")
    del clips
    train_dit(cfg, latents, stills, caps, seed=a.seed, minutes=a.dit_minutes, max_steps=a.dit_steps, batch=a.batch,
              out=a.out, lr=a.dit_lr)
    _log(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
