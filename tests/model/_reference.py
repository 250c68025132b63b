"""A straightforward float64 re-statement of MAGI-1's DiT forward (docs/magi1.md#dit-architecture), chunk by chunk.

Written independently of magi_model / magi_kernels: plain torch ops, explicit loops over chunks,
layers, TP8 groups and caption segments; own rope table; dense softmax attention. It only reads
the model's parameters (by their official names) and config.
"""

from __future__ import annotations

import math

import torch

D = torch.float64


def ln(x, w, b, eps, one_p):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    g = w + 1 if one_p else w
    return (x - mu) / torch.sqrt(var + eps) * g + b


def rope_angles(bands, t_total, h, w):
    """docs/magi1.md#3d-rotary-embedding: integer T positions, centred and rescaled spatial positions, [T|H|W] x bands."""
    rescale = math.sqrt(h * w / 256)
    ref = [t_total, h / rescale, w / rescale]
    axes = []
    for n, r, centred in ((t_total, ref[0], False), (h, ref[1], True), (w, ref[2], True)):
        pos = torch.arange(n, dtype=D) - ((n - 1) / 2 if centred else 0)
        if n > 1:
            pos = pos / (n - 1) * (r - 1)
        axes.append(pos)
    ang = []
    for ti in range(t_total):
        for hi in range(h):
            for wi in range(w):
                row = [axes[0][ti] * bands, axes[1][hi] * bands, axes[2][wi] * bands]
                ang.append(torch.cat(row))
    return torch.stack(ang)  # (S_total, 3*nb)


def rotate(x, ang):
    """NeoX half-split on the first 2*ang.shape[-1] dims of x (tokens, heads, d); ang (tokens, r/2)."""
    r2 = ang.shape[-1]
    c, s = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
    x1, x2, rest = x[..., :r2], x[..., r2:2 * r2], x[..., 2 * r2:]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c, rest], -1)


def attend(q, k, v):
    """Dense softmax attention, GQA by head mapping. q (n, hq, d), k/v (m, hk, d)."""
    hq, hk, d = q.shape[1], k.shape[1], q.shape[2]
    out = torch.zeros_like(q)
    if k.shape[0] == 0:
        return out
    for h in range(hq):
        kh = h // (hq // hk)
        s = q[:, h] @ k[:, kh].T / math.sqrt(d)
        out[:, h] = torch.softmax(s, -1) @ v[:, kh]
    return out


def reference_forward(model, x, t, caption, mask, *, dropped, distill_dt=None, slice_point=0, key_windows=None,
                      cache=None, round_sinusoid=False):
    """Velocity (N, C, T, H, W) in float64, and the per-layer K/V of every chunk: kv[b][layer][abs_chunk].

    cache: kv structure of a previous call for chunks < slice_point (same batch element)."""
    cfg = model.config.model
    P = {k: v.detach().to(D) for k, v in model.state_dict().items()}
    H, nh, ng, d, L = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels, cfg.num_layers
    eps, one_p = cfg.layernorm_epsilon, cfg.apply_layernorm_1p
    p, pt, C = cfg.patch_size, cfg.t_patch_size, cfg.out_channels
    N, _, T, Hl, Wl = x.shape
    R = t.shape[1]
    tp, hp, wp = T // pt, Hl // p, Wl // p
    n = tp * hp * wp // R
    windows = key_windows or [0] * R

    def lin(name, v):
        out = v @ P[name + ".weight"].T
        return out + P[name + ".bias"] if name + ".bias" in P else out

    xs = x.to(D) * cfg.x_rescale_factor
    if cfg.half_channel_vae:
        xs = torch.cat([xs, xs], 1)
    # Patch embedding as a matmul over (C, pt, p, p) patches.
    patches = xs.reshape(N, xs.shape[1], tp, pt, hp, p, wp, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    tokens = patches.reshape(N, tp * hp * wp, -1) @ P["x_embedder.weight"].reshape(H, -1).T

    t_total = tp + (tp // R) * slice_point
    ang = rope_angles(P["rope.bands"], t_total, hp, wp)[-tp * hp * wp:]

    def t_embed(tv):
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = tv.float()[:, None] * freqs[None] * 1000
        emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
        if round_sinusoid:
            emb = emb.to(torch.bfloat16)
        h1 = lin("t_embedder.mlp.0", emb.to(D))
        return lin("t_embedder.mlp.2", h1 * torch.sigmoid(h1))

    vel = torch.zeros(N, cfg.latent_channels, T, Hl, Wl, dtype=D)
    kv_out = []
    for b in range(N):
        temb = t_embed(t[b])
        if distill_dt is not None:
            temb = temb + t_embed(torch.full((R,), float(distill_dt)))
        row = P["y_embedder.null_caption_embedding"][-1 if dropped[b] else -2]
        cond = temb + lin("y_embedder.y_proj_adaln.0", row)  # (R, Hc)
        hs = [tokens[b, j * n:(j + 1) * n] for j in range(R)]  # per-chunk hidden states
        kv_b = [dict() for _ in range(L)]
        for li in range(L):
            pre = f"videodit_blocks.layers.{li}."
            sa = pre + "self_attention."
            # Per-chunk projections, norms, rope.
            qs, ks, vs, axs = [], [], [], []
            for j in range(R):
                a = ln(hs[j], P[sa + "linear_qkv.layer_norm.weight"], P[sa + "linear_qkv.layer_norm.bias"], eps, False)
                axs.append(a)
                q = lin(sa + "linear_qkv.q", a).view(n, nh, d)
                k = lin(sa + "linear_qkv.k", a).view(n, ng, d)
                v = lin(sa + "linear_qkv.v", a).view(n, ng, d)
                q = ln(q, P[sa + "q_layernorm.weight"], P[sa + "q_layernorm.bias"], eps, one_p)
                k = ln(k, P[sa + "k_layernorm.weight"], P[sa + "k_layernorm.bias"], eps, one_p)
                aj = ang[j * n:(j + 1) * n]
                qs.append(rotate(q, aj))
                ks.append(rotate(k, aj))
                vs.append(v)
                kv_b[li][slice_point + j] = (ks[-1], v)
            new_hs = []
            for j in range(R):
                a_abs = slice_point + j
                lo = max(0, a_abs + 1 - windows[j]) if windows[j] > 0 else 0
                kk, vv = [], []
                for c in range(lo, a_abs + 1):
                    src = cache[b][li][c] if c < slice_point else (ks[c - slice_point], vs[c - slice_point])
                    kk.append(src[0])
                    vv.append(src[1])
                core = attend(qs[j], torch.cat(kk), torch.cat(vv)).reshape(n, nh * d)
                # Cross-attention to this chunk's own valid caption tokens.
                qx = lin(sa + "linear_qkv.qx", axs[j]).view(n, nh, d)
                qx = ln(qx, P[sa + "q_layernorm_xattn.weight"], P[sa + "q_layernorm_xattn.bias"], eps, one_p)
                ytok = caption[b, j][mask[b, j].bool()].to(D)
                y = lin("y_embedder.y_proj_xattn.0", ytok)
                y = y * torch.sigmoid(y)
                kvx = (y @ P[sa + "linear_kv_xattn.weight"].T).view(-1, ng, 2 * d)
                kx = ln(kvx[..., :d], P[sa + "k_layernorm_xattn.weight"], P[sa + "k_layernorm_xattn.bias"], eps, one_p)
                cross = attend(qx, kx, kvx[..., d:]).reshape(n, nh * d)
                hd = nh * d // 8
                o = torch.cat([torch.cat([core[:, g * hd:(g + 1) * hd], cross[:, g * hd:(g + 1) * hd]], -1)
                               for g in range(8)], -1)
                o = o @ P[sa + "linear_proj.weight"].T
                c = cond[j]
                gate = torch.tanh(lin(pre + "ada_modulate_layer.proj.0", c * torch.sigmoid(c)))
                g_msa, g_mlp = gate[:H], gate[H:]
                h1 = hs[j] + ln(o * g_msa, P[pre + "self_attn_post_norm.weight"], P[pre + "self_attn_post_norm.bias"],
                                eps, one_p)
                m = ln(h1, P[pre + "mlp.layer_norm.weight"], P[pre + "mlp.layer_norm.bias"], eps, False)
                m = m @ P[pre + "mlp.linear_fc1.weight"].T
                if cfg.gated_linear_unit:
                    g1, g2 = m[:, :cfg.ffn_hidden_size], m[:, cfg.ffn_hidden_size:]
                    m = g1 * torch.sigmoid(g1) * g2
                else:
                    m = 0.5 * m * (1 + torch.erf(m / math.sqrt(2)))
                m = m @ P[pre + "mlp.linear_fc2.weight"].T
                h2 = h1 + ln(m * g_mlp, P[pre + "mlp_post_norm.weight"], P[pre + "mlp_post_norm.bias"], eps, one_p)
                new_hs.append(h2)
            hs = new_hs
        kv_out.append(kv_b)
        hfin = torch.cat(hs)
        hfin = ln(hfin, P["videodit_blocks.final_layernorm.weight"], P["videodit_blocks.final_layernorm.bias"], eps,
                  one_p)
        out = hfin @ P["final_linear.linear.weight"].T  # (S, pt*p*p*C), C fastest
        out = out.view(tp, hp, wp, pt, p, p, C)
        full = torch.zeros(C, T, Hl, Wl, dtype=D)
        for ti in range(tp):
            for hi in range(hp):
                for wi in range(wp):
                    for a in range(pt):
                        for bb in range(p):
                            for cc in range(p):
                                full[:, ti * pt + a, hi * p + bb, wi * p + cc] = out[ti, hi, wi, a, bb, cc]
        vel[b] = full[:cfg.latent_channels] / cfg.x_rescale_factor
    return vel, kv_out
