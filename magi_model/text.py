"""Text conditioning for MAGI-1 (docs/magi1.md#text-conditioning): T5 from a local folder, precomputed embeddings,
a seeded random stand-in for the tiny preset, special tokens and the per-chunk caption tensors.

Sources of prompt embeddings (each gives ``(L=800, 4096)`` fp32 features + a ``(L,)`` mask per prompt):
- :class:`T5TextEncoder`: ``transformers``' ``T5EncoderModel`` + tokenizer loaded from a LOCAL folder
  (``local_files_only``; nothing is downloaded), run in fp32, max 800 tokens padded to 800;
- :func:`load_text_embeddings`: precomputed embeddings from a file (for users without T5);
- :class:`RandomTextEncoder`: NOT a language model -- hashes words to seeded random vectors, so the
  tiny preset runs without T5 weights. Its "embeddings" carry no meaning.

:func:`build_captions` then prepends the special tokens per chunk (``[DURATION_k, HQ, ...]``),
handles chunk-wise prompts and prefix chunks, and pairs everything with the null caption.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import urllib.parse
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from magi_model.pipeline import Captions

T5_SUBDIR = "t5-v1_1-xxl"
MAX_LENGTH = 800
DEFAULT_SPECIAL_TOKEN_PATH = "example/assets/special_tokens.npz"
# Prepend order of the optional tokens (docs/magi1.md#text-conditioning); each goes to position 0, so the last one ends first.
TOKEN_FLAGS = (("PAD_STATIC", "STATIC_FIRST_FRAMES"), ("PAD_DYNAMIC", "DYNAMIC_FIRST_FRAMES"),
               ("PAD_BORDERNESS", "BORDERNESS"), ("PAD_HQ", "HQ"), ("PAD_THREE_D_MODEL", "THREE_D_MODEL"),
               ("PAD_TWO_D_ANIME", "TWO_D_ANIME"))
# MAGI-1's run.sh exports PAD_HQ=1 and PAD_DURATION=1; we use that as the default when unset.
DEFAULT_FLAGS = {"PAD_HQ": True, "PAD_DURATION": True}


class TextError(ValueError):
    """Unusable text input (missing T5 folder, bad embeddings file, too many prompts ...)."""


# --------------------------------------------------------------------------------------------------
# Special tokens


def _named_tokens(caption: torch.Tensor, logo: torch.Tensor, other: torch.Tensor) -> dict[str, torch.Tensor]:
    if other.shape[0] < 17:
        raise TextError(f"special tokens: 'other_tokens' must have >= 17 rows, got {other.shape[0]}")
    d = {"CAPTION": caption[0], "LOGO": logo[0], "TRANS": other[0], "HQ": other[1], "STATIC_FIRST_FRAMES": other[2],
         "DYNAMIC_FIRST_FRAMES": other[3], "BORDERNESS": other[4], "THREE_D_MODEL": other[15],
         "TWO_D_ANIME": other[16]}
    for k in range(8):
        d[f"DURATION_{k + 1}"] = other[7 + k]
    return d


def load_special_tokens(path: str) -> dict[str, torch.Tensor]:
    """MAGI-1's ``special_tokens.npz`` -> named fp32 rows, rounded through fp16 as MAGI-1 does."""
    if not os.path.isfile(path):
        raise TextError(f"special tokens: {path!r} does not exist (set SPECIAL_TOKEN_PATH to MAGI-1's "
                        f"example/assets/special_tokens.npz)")
    with np.load(path) as z:
        missing = [k for k in ("caption_token", "logo_token", "other_tokens") if k not in z]
        if missing:
            raise TextError(f"special tokens: {path} lacks arrays {missing}")
        arrs = [torch.from_numpy(np.asarray(z[k])).to(torch.float16).to(torch.float32)
                for k in ("caption_token", "logo_token", "other_tokens")]
    return _named_tokens(*arrs)


def random_special_token_rows(dim: int, seed: int = 0) -> torch.Tensor:
    """The 102 fp16 rows (caption, logo, 100 others; norm 8) behind :func:`random_special_tokens`, in
    the npz's order (what ``magi_model.train_tiny`` saves as the tiny model's special_tokens.npz)."""
    g = torch.Generator().manual_seed(seed + 7919)
    rows = torch.randn(102, dim, generator=g, dtype=torch.float64)
    return (rows / rows.norm(dim=1, keepdim=True) * 8).to(torch.float16)


def random_special_tokens(dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """RANDOM stand-ins with the npz's statistics (rows of norm ~8) for the tiny preset."""
    rows = random_special_token_rows(dim, seed).to(torch.float32)
    return _named_tokens(rows[0:1], rows[1:2], rows[2:])


def special_token_flags(env: Optional[Mapping[str, str]] = None) -> dict[str, bool]:
    """Which special tokens are prepended, from MAGI-1's env vars (PAD_*; "0"/"false"/"" = off)."""
    env = os.environ if env is None else env
    out = {}
    for name in [f for f, _ in TOKEN_FLAGS] + ["PAD_DURATION"]:
        v = env.get(name)
        out[name] = DEFAULT_FLAGS.get(name, False) if v is None else v.strip().lower() not in ("", "0", "false", "no")
    out["NEG_PROMPT"] = bool(env.get("NEG_PROMPT"))
    return out


def _prepend(emb: torch.Tensor, mask: torch.Tensor, token: torch.Tensor):
    # Prepend at position 0 with mask 1, keep the length (the last row falls off).
    return torch.cat([token[None].to(emb.dtype), emb[:-1]]), torch.cat([mask.new_ones(1), mask[:-1]])


# --------------------------------------------------------------------------------------------------
# Caption cleaning (T5 input)


_URL = re.compile(r"\b((?:https?:(?:/{1,3}|[a-z0-9%])|[a-z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b/?)"
                  r"(?!@)(?:[^\s()<>]+|\([^\s()<>]+\))*)")
_HTML = re.compile(r"<[^>]+>")
_HANDLE = re.compile(r"@[\w\d]+\b")
_CJK = re.compile(r"[\u31c0-\u31ef\u31f0-\u31ff\u3200-\u32ff\u3300-\u33ff\u3400-\u4dbf\u4dc0-\u4dff\u4e00-\u9fff]+")
_DASH = re.compile(r"[\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030"
                   r"\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d]+")
_QUOTES = (re.compile(r"[`\u00b4\u00ab\u00bb\u201c\u201d\u00a8]"), re.compile(r"[\u2018\u2019]"))


def clean_caption(caption: str) -> str:
    """The main steps of the DeepFloyd/PixArt cleaner MAGI-1 applies (twice) before T5: unquote,
    lowercase, drop URLs / HTML tags / @handles / CJK ranges / IP addresses / file names / long
    numbers, normalize dashes, quotes, repeated dots and whitespace. The full cleaner's long tail
    (ftfy repairs, shop boilerplate, size patterns, punctuation spacing) is not reproduced; plain
    prompts come out the same."""
    c = urllib.parse.unquote_plus(str(caption)).strip().lower()
    c = c.replace("<person>", "person")
    c = html.unescape(c)
    c = _URL.sub("", c)
    c = _HTML.sub("", c)
    c = _HANDLE.sub("", c)
    c = _CJK.sub("", c)
    c = _DASH.sub("-", c)
    c = _QUOTES[0].sub('"', c)
    c = _QUOTES[1].sub("'", c)
    c = re.sub(r"&quot;?|&amp", "", c)
    c = re.sub(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " ", c)  # IP addresses
    c = re.sub(r"\\n", " ", c)
    c = re.sub(r"#\d{1,3}\b|#\d{5,}\b|\b\d{6,}\b", "", c)  # hashtag numbers, long ids
    c = re.sub(r"\S+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", "", c)  # file names
    c = re.sub(r"[\"']{2,}", '"', c)
    c = re.sub(r"\.{2,}", " ", c)
    c = re.sub(r"\s+", " ", c)
    return c.strip()


# --------------------------------------------------------------------------------------------------
# Encoders


def t5_folder(t5_pretrained: str) -> str:
    """The folder holding T5's ``config.json``: ``t5_pretrained/t5-v1_1-xxl`` or ``t5_pretrained`` itself."""
    path = t5_pretrained
    if os.path.isdir(os.path.join(path, T5_SUBDIR)):
        path = os.path.join(path, T5_SUBDIR)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise TextError(f"t5_pretrained: {t5_pretrained!r} must be a local folder with {T5_SUBDIR}/config.json "
                        f"(MAGI-1's ckpt/t5); nothing is downloaded. Or pass precomputed --text_embeddings.")
    return path


class T5TextEncoder:
    """T5 v1.1 XXL encoder from ``t5_pretrained`` (the folder holding ``t5-v1_1-xxl/``, or that folder
    itself), fp32, never downloading."""

    def __init__(self, t5_pretrained: str, device="cpu", max_length: int = MAX_LENGTH):
        path = t5_folder(t5_pretrained)
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError:
            raise TextError("t5_pretrained: the 'transformers' (and 'sentencepiece') packages are needed to run T5; "
                            "install magi-kernels[t5] or pass precomputed --text_embeddings") from None
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32,
                                                    low_cpu_mem_usage=True).to(device).eval()
        self.device, self.max_length = device, max_length

    @torch.no_grad()
    def __call__(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        text = clean_caption(clean_caption(prompt))
        tok = self.tokenizer([text], max_length=self.max_length, padding="max_length", truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask)["last_hidden_state"]
        return out[0].float().cpu(), mask[0].float().cpu()


class RandomTextEncoder:
    """RANDOM text features for the tiny preset: each word (and an end token) maps to a fixed random
    vector seeded by its hash. Deterministic, no downloads, no meaning."""

    def __init__(self, dim: int, max_length: int = MAX_LENGTH, seed: int = 0, std: float = 0.15):
        self.dim, self.max_length, self.seed, self.std = dim, max_length, seed, std

    def _vector(self, word: str) -> torch.Tensor:
        h = int.from_bytes(hashlib.sha256(f"{self.seed}:{word}".encode()).digest()[:8], "little")
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(h)) * self.std

    def __call__(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        words = clean_caption(prompt).split()[: self.max_length - 1] + ["</s>"]
        emb = torch.zeros(self.max_length, self.dim)
        mask = torch.zeros(self.max_length)
        for i, w in enumerate(words):
            emb[i] = self._vector(w)
        mask[: len(words)] = 1
        return emb, mask


class GrammarTextEncoder(torch.nn.Module):
    """The trained tiny model's text encoder: a closed vocabulary (the procedural captions' words, see
    ``magi_model.procedural``), word + position embeddings and one transformer encoder layer, trained
    together with the tiny DiT. Same interface as :class:`T5TextEncoder`: ``enc(prompt)`` gives
    ``(emb (L, dim), mask (L,))``, the words then an end token, zero-padded to ``max_length``.

    A word outside the vocabulary is an error naming it (the model has never seen it)."""

    END, PAD = "</s>", "<pad>"

    def __init__(self, vocab: Sequence[str], dim: int, max_length: int, max_words: int = 24, heads: int = 4):
        super().__init__()
        self.vocab = [self.PAD, self.END] + [w for w in vocab if w not in (self.PAD, self.END)]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.dim, self.max_length, self.max_words = dim, max_length, max_words
        self.word = torch.nn.Embedding(len(self.vocab), dim)
        self.position = torch.nn.Parameter(torch.zeros(max_words + 1, dim))
        self.layer = torch.nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True,
                                                      norm_first=True)

    def tokenize(self, prompt: str) -> list[int]:
        words = clean_caption(prompt).replace(",", " ").replace(".", " ").split()
        unknown = sorted({w for w in words if w not in self.index})
        if unknown:
            raise TextError(f"prompt: the tiny model's text encoder knows only its training grammar's words; "
                            f"unknown {unknown} in {prompt!r}. Known: {' '.join(self.vocab[2:])}")
        if len(words) > self.max_words:
            raise TextError(f"prompt: at most {self.max_words} words for the tiny model, got {len(words)}")
        return [self.index[w] for w in words] + [self.index[self.END]]

    def encode(self, token_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched, differentiable: ``(B, max_length, dim)`` features and ``(B, max_length)`` 0/1 mask."""
        B, n = len(token_ids), max(len(t) for t in token_ids)
        dev = self.position.device
        ids = torch.zeros(B, n, dtype=torch.long, device=dev)
        valid = torch.zeros(B, n, dtype=torch.bool, device=dev)
        for b, t in enumerate(token_ids):
            ids[b, :len(t)] = torch.tensor(t, dtype=torch.long)
            valid[b, :len(t)] = True
        h = self.layer(self.word(ids) + self.position[:n], src_key_padding_mask=~valid)
        h = h * valid[..., None]
        emb = torch.zeros(B, self.max_length, self.dim, device=dev, dtype=h.dtype)
        emb = torch.cat([h, emb[:, n:]], dim=1)
        mask = torch.cat([valid.float(), torch.zeros(B, self.max_length - n, device=dev)], dim=1)
        return emb, mask

    @torch.no_grad()
    def __call__(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        emb, mask = self.encode([self.tokenize(prompt)])
        return emb[0].float().cpu(), mask[0].float().cpu()


GRAMMAR_ENCODER_FILE = "grammar_encoder.safetensors"
GRAMMAR_TOKENS_FILE = "special_tokens.npz"


def grammar_special_tokens_path(folder: str) -> str:
    """The special tokens the grammar encoder was trained with (``special_tokens.npz`` next to it)."""
    return os.path.join(folder, GRAMMAR_TOKENS_FILE)


def load_grammar_encoder(folder: str) -> GrammarTextEncoder:
    """The trained :class:`GrammarTextEncoder` of ``folder/grammar_encoder.safetensors`` (its vocabulary
    and sizes are in the file's metadata)."""
    path = os.path.join(folder, GRAMMAR_ENCODER_FILE)
    if not os.path.isfile(path):
        raise TextError(f"t5_pretrained: {folder!r} has no {GRAMMAR_ENCODER_FILE} (the tiny model's text encoder)")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        enc = GrammarTextEncoder(json.loads(meta["vocab"]), int(meta["dim"]), int(meta["max_length"]),
                                 int(meta["max_words"]))
        enc.load_state_dict(state, strict=True)
    except Exception as e:  # safetensors / json / key errors: name the file
        raise TextError(f"t5_pretrained: cannot load the grammar text encoder {path} ({type(e).__name__}: {e})") \
            from None
    return enc.eval()


def _read_tensor_file(path: str) -> Mapping:
    """The tensors of a ``.safetensors`` / ``.npz`` / torch file, never unpickling arbitrary objects:
    safetensors and npz (``allow_pickle=False``) hold only arrays, torch files are read with
    ``weights_only=True``. Any failure is a TextError naming the file."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(np.asarray(z[k])) for k in z.files}
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, zip, pickle and numpy errors have no common base class
        raise TextError(f"text_embeddings: cannot read {path!r} as a tensor file (.safetensors, .npz or a "
                        f"torch.save of tensors): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        ) from None
    return {"embeddings": d} if isinstance(d, torch.Tensor) else d


def load_text_embeddings(path: str, *, dim: int,
                         max_length: int = MAX_LENGTH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Precomputed prompt features: a ``.safetensors`` / ``.pt`` / ``.npz`` holding ``embeddings``
    ``(P, L, dim)`` or ``(L, dim)`` and optionally ``mask`` ``(P, L)`` (default: all ones). One entry per
    prompt (P > 1 = chunk-wise prompts). L is padded with zeros / truncated to ``max_length``.
    Embeddings must be finite floating-point numbers; mask values 0 or 1."""
    if not os.path.isfile(path):
        raise TextError(f"text_embeddings: {path!r} does not exist")
    d = _read_tensor_file(path)
    if not isinstance(d, Mapping) or not isinstance(d.get("embeddings"), torch.Tensor):
        raise TextError(f"text_embeddings: {path} must hold a tensor named 'embeddings' (P, L, {dim})")
    emb = d["embeddings"]
    if not emb.is_floating_point():
        raise TextError(f"text_embeddings: 'embeddings' in {path} must be floating point, got {emb.dtype}")
    emb = emb.float()
    if emb.dim() == 2:
        emb = emb[None]
    if emb.dim() != 3 or emb.shape[-1] != dim or emb.shape[0] < 1 or emb.shape[1] < 1:
        raise TextError(f"text_embeddings: 'embeddings' must be (P, L, {dim}) with P, L >= 1, got {list(emb.shape)}")
    if not bool(torch.isfinite(emb).all()):
        raise TextError(f"text_embeddings: 'embeddings' in {path} holds NaN or inf values")
    mask = d.get("mask")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TextError(f"text_embeddings: 'mask' in {path} must be a tensor, got {type(mask).__name__}")
    if mask is None:
        mask = torch.ones(emb.shape[:2])
    elif mask.numel() != emb.shape[0] * emb.shape[1]:
        raise TextError(f"text_embeddings: 'mask' must be (P, L) = {list(emb.shape[:2])}, got {list(mask.shape)}")
    else:
        mask = mask.float().reshape(emb.shape[0], -1)
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise TextError(f"text_embeddings: 'mask' in {path} must hold only 0 and 1")
    L = emb.shape[1]
    if L < max_length:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], max_length - L, dim)], 1)
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], max_length - L)], 1)
    return [(emb[i, :max_length], mask[i, :max_length]) for i in range(emb.shape[0])]


# --------------------------------------------------------------------------------------------------
# Per-chunk captions


def build_captions(prompts: Sequence[tuple[torch.Tensor, torch.Tensor]], *, num_chunks: int, chunk_offset: int,
                   null: torch.Tensor, null_mask: torch.Tensor, special_tokens: Optional[Mapping] = None,
                   flags: Optional[Mapping[str, bool]] = None) -> Captions:
    """Per-chunk text tensors (docs/magi1.md#text-conditioning) for ``num_chunks`` latent chunks.

    ``prompts``: one ``(emb (L, Cc), mask (L,))`` per prompt. One prompt conditions every noisy chunk
    (MAGI-1); several are chunk-wise prompts: prompt i conditions noisy chunk i and the last prompt
    continues for the remaining chunks. Clean prefix chunks (``< chunk_offset``) get the null
    embedding with an all-zero mask. ``null`` / ``null_mask``: the model's null caption (L, Cc) / (L,).
    Special tokens (when given) are prepended per noisy chunk as MAGI-1's env flags select
    (:func:`special_token_flags`): ``[DURATION_k, HQ, ...]`` with k = min(chunks left - 1, 7).
    """
    n_noisy = num_chunks - chunk_offset
    if not prompts:
        raise TextError("prompt: at least one prompt is needed")
    if len(prompts) > n_noisy:
        raise TextError(f"prompt: got {len(prompts)} chunk-wise prompts but the video has only {n_noisy} generated "
                        f"chunk(s) (num_frames / 24, rounded up); pass at most {n_noisy}")
    flags = special_token_flags() if flags is None else flags
    L, Cc = null.shape
    for i, (e, m) in enumerate(prompts):
        if tuple(e.shape) != (L, Cc) or tuple(m.shape) != (L,):
            raise TextError(f"prompt {i}: embeddings must be ({L}, {Cc}) with mask ({L},), got "
                            f"{list(e.shape)} / {list(m.shape)}")
    cond, cmask = [], []
    for c in range(num_chunks):
        if c < chunk_offset:
            cond.append(null.float())
            cmask.append(torch.zeros(L))
            continue
        i = c - chunk_offset
        e, m = prompts[min(i, len(prompts) - 1)]
        e, m = e.float(), m.float()
        if special_tokens is not None:
            for flag, name in TOKEN_FLAGS:
                if flags.get(flag):
                    e, m = _prepend(e, m, special_tokens[name])
            if flags.get("PAD_DURATION"):
                e, m = _prepend(e, m, special_tokens[f"DURATION_{min(n_noisy - i - 1, 7) + 1}"])
        cond.append(e)
        cmask.append(m)
    nl, nm = null.float(), null_mask.float()
    if special_tokens is not None and flags.get("NEG_PROMPT"):
        # Negative tokens onto the null branch; its mask stays the first 50 positions (as MAGI-1).
        for name in ("CAPTION", "LOGO", "TRANS", "BORDERNESS"):
            nl = torch.cat([special_tokens[name][None], nl[:-1]])
    return Captions(torch.stack(cond), torch.stack(cmask), nl[None].expand(num_chunks, -1, -1).clone(),
                    nm[None].expand(num_chunks, -1).clone())


__all__ = ["T5TextEncoder", "t5_folder", "RandomTextEncoder", "GrammarTextEncoder",
           "load_grammar_encoder", "grammar_special_tokens_path", "load_text_embeddings", "load_special_tokens",
           "random_special_tokens", "special_token_flags", "build_captions", "clean_caption", "TextError"]
