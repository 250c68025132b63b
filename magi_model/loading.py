"""Load MAGI-1 DiT checkpoints in the official layout (docs/magi1.md#checkpoint-layout-and-keys), strictly and memory-mapped.

Layout: ``<load>/inference_weight[.fp8][.distill]/`` holding either ``model.safetensors.index.json``
(HF ``weight_map``) plus shards, or a single ``model.safetensors``.

How a load works (and why it needs ~1x the weights in RAM, not 2x):
1. the model is built on the meta device (no memory);
2. every file's header is read (names, shapes, dtypes; no data) and compared with the model's
   state dict: any missing / unexpected / mis-shaped / wrongly typed key fails with a readable diff
   before a byte of weight data is touched;
3. tensors are taken one at a time from safetensors' memory map and *assigned* in place of the meta
   parameters (MAGI-1's ``load_state_dict(assign=True)``): on CPU with an unchanged dtype the
   parameter stays a view of the mapped file (page cache, no copy); otherwise one tensor at a time
   is converted / copied to the target device.

Dtypes follow the official code: checkpoint dtypes are kept (``assign=True``) except MAGI-1's fp32
promotion set (embedders, rope, self-attention QK norms, post norms, final norm / linear), which is
cast to fp32. ``dtype=`` optionally casts the other floating tensors (not fp8 weights / fp32 scales).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn

from magi_model.config import MagiConfig, load_config
from magi_model.device import resolve_device
from magi_model.dit import VideoDiT, build_dit, is_fp32_param
from magi_model.fp8 import FP8

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
              "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; ``missing`` / ``unexpected`` / ``mismatched`` hold the diff."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)


# ---------------------------------------------------------------------------------------------------
# Locating files


def weight_dir(config: "MagiConfig | str | Mapping", load: str | None = None) -> str:
    """``<load>/inference_weight[.fp8][.distill]`` for a config (``load`` overrides runtime_config.load)."""
    cfg = load_config(config)
    root = load if load is not None else cfg.runtime.load
    if root is None:
        raise CheckpointError("runtime_config.load: is not set; pass the checkpoint root (the folder holding "
                              f"'{cfg.weight_subdir}/')")
    return os.path.join(root, cfg.weight_subdir)


def checkpoint_files(ckpt_dir: str) -> dict[str, str]:
    """Map every tensor name to the safetensors file holding it (index + shards, or one file)."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint directory {ckpt_dir!r} does not exist (expected "
                              f"<load>/inference_weight[.fp8][.distill] with {INDEX_FILE} + shards or {SINGLE_FILE})")
    index = os.path.join(ckpt_dir, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
        out = {}
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(ckpt_dir, shard)
            if not os.path.isfile(path):
                hint = (f"; {shard}.zst exists: decompress it first (zstd -d {path}.zst)"
                        if os.path.isfile(path + ".zst") else "")
                raise CheckpointError(f"{index}: shard {shard!r} listed in weight_map is missing{hint}")
        for k, shard in weight_map.items():
            out[k] = os.path.join(ckpt_dir, shard)
        return out
    single = os.path.join(ckpt_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return {k: single for k in _file_keys(single)}
    present = sorted(os.listdir(ckpt_dir))
    raise CheckpointError(f"checkpoint directory {ckpt_dir!r} has neither {INDEX_FILE} nor {SINGLE_FILE} "
                          f"(found: {present[:10]}{' ...' if len(present) > 10 else ''})")


def _unreadable(path: str, e: Exception) -> CheckpointError:
    # safetensors reports truncated files, garbage and oversized headers without the file name.
    return CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})")


def _safe_open(path: str):
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - dependency message
        raise ImportError("magi_model.loading needs the 'safetensors' package (pip install safetensors)") from e
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError, OSError, ...: no common base class
        raise _unreadable(path, e) from None


def _get_tensor(handle, path: str, key: str) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensor {key!r} ({type(e).__name__}: {e})") from None


def _file_keys(path: str) -> list[str]:
    with _safe_open(path) as f:
        return list(f.keys())


def assert_finite(tensors: Iterable[tuple[str, torch.Tensor]], *, source: str,
                 files: Mapping[str, str] | None = None) -> None:
    """Raise CheckpointError naming the first floating-point tensor holding NaN or inf (and its file,
    from ``files``: key -> path). Scans in slices, so the extra memory is bounded for any tensor size."""
    for key, t in tensors:
        if not t.is_floating_point() or t.is_meta:
            continue
        flat = t.detach().reshape(-1)
        step = 1 << 24
        for start in range(0, flat.numel(), step):
            part = flat[start:start + step]
            if part.element_size() == 1:  # fp8: isfinite has no kernel for it everywhere
                part = part.float()
            if not bool(torch.isfinite(part).all()):
                where = files[key] if files and key in files else source
                raise CheckpointError(f"{where}: tensor {key!r} holds NaN or inf values")


def read_header(files: Mapping[str, str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of every tensor, from the file headers only (no data read)."""
    by_file: dict[str, list[str]] = defaultdict(list)
    for k, path in files.items():
        by_file[path].append(k)
    out = {}
    for path, keys in by_file.items():
        with _safe_open(path) as f:
            present = set(f.keys())
            for k in keys:
                if k not in present:
                    raise CheckpointError(f"{path}: the index maps {k!r} to this file but it does not contain it")
                try:
                    sl = f.get_slice(k)
                    st = sl.get_dtype()
                    shape = tuple(sl.get_shape())
                except Exception as e:
                    raise _unreadable(path, e) from None
                out[k] = (shape, _ST_DTYPES.get(st, st))
    return out


# ---------------------------------------------------------------------------------------------------
# Checking


def _expected(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}


def _dt(d) -> str:
    return str(d).replace("torch.", "")


def _dtype_problem(key: str, want: torch.dtype, got) -> str | None:
    """fp8 weights and fp32 scales are a contract; other tensors may be any float dtype (assign=True)."""
    if want == FP8 or got == FP8:
        return None if got == want else f"dtype {_dt(got)}, model needs {_dt(want)}"
    if key.endswith(("weight_scale", "input_scale", "smooth_scale")):
        return None if got == torch.float32 else f"dtype {_dt(got)}, fp8 scales must be float32"
    if not (isinstance(got, torch.dtype) and got.is_floating_point):
        return f"dtype {_dt(got)} is not a floating-point type"
    return None


def diff_keys(expected: Mapping[str, tuple], found: Mapping[str, tuple]):
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = []
    for k in sorted(set(expected) & set(found)):
        (ws, wd), (gs, gd) = expected[k], found[k]
        if tuple(ws) != tuple(gs):
            mismatched.append((k, f"shape {list(gs)} in checkpoint, model needs {list(ws)}"))
            continue
        prob = _dtype_problem(k, wd, gd)
        if prob:
            mismatched.append((k, prob))
    return missing, unexpected, mismatched


_LAYER_RE = re.compile(r"^(.*?layers\.)(\d+)(\..*)$")


def _compress(keys: Iterable[str], details: Mapping[str, str] | None = None, limit: int = 30) -> list[str]:
    """Group ``...layers.{i}.suffix`` keys by suffix and print the layer ids as ranges."""
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    lines = []
    for k in keys:
        m = _LAYER_RE.match(k)
        if m:
            groups[(m.group(1), m.group(3), (details or {}).get(k, ""))].append(int(m.group(2)))
        else:
            lines.append(f"{k}" + (f": {details[k]}" if details and k in details else ""))
    for (pre, suf, det), ids in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[1][0])):
        ids = sorted(ids)
        spans, start = [], ids[0]
        for a, b in zip(ids, ids[1:] + [None]):
            if b != a + 1:
                spans.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        lines.append(f"{pre}{{{','.join(spans)}}}{suf}" + (f": {det}" if det else "")
                     + (f"   ({len(ids)} layers)" if len(ids) > 1 else ""))
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more lines"]
    return lines


def _hints(missing, unexpected) -> list[str]:
    hints = []
    if any(k.endswith(("weight_scale", "smooth_scale")) for k in unexpected):
        hints.append("the checkpoint has fp8 keys but the model does not: set engine_config.fp8_quant=true "
                     "(weights in inference_weight.fp8.distill)")
    if any(k.endswith(("weight_scale", "smooth_scale")) for k in missing):
        hints.append("the model expects fp8 keys (fp8_quant=true) but the checkpoint has none: use the "
                     "*_distill_quant weights or set fp8_quant=false")
    if any(re.match(r"^videodit_blocks\.layers\.[a-z_]", k) for k in unexpected):
        hints.append("keys like 'videodit_blocks.layers.self_attention...' (no layer index) are the MAGI-1.1 "
                     "stacked layout, which this model (MAGI-1) does not read")
    if any(k.startswith("layers.") for k in unexpected):
        hints.append("keys start with 'layers.': this looks like a pipeline-stage dump; the official "
                     "checkpoints use 'videodit_blocks.layers.{i}'")
    return hints


def check_state_dict(model: nn.Module, found: Mapping[str, tuple], *, strict: bool = True,
                     source: str = "checkpoint") -> tuple[list, list, list]:
    """Compare (shape, dtype) of ``found`` with the model; raise CheckpointError with a readable diff."""
    missing, unexpected, mismatched = diff_keys(_expected(model), found)
    if mismatched or (strict and (missing or unexpected)):
        n_exp = len(_expected(model))
        lines = [f"{source} does not match the model ({n_exp} keys expected, {len(found)} found):"]
        if missing:
            lines.append(f"  missing from the checkpoint ({len(missing)}):")
            lines += ["    " + s for s in _compress(missing)]
        if unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(unexpected)}):")
            lines += ["    " + s for s in _compress(unexpected)]
        if mismatched:
            lines.append(f"  wrong shape or dtype ({len(mismatched)}):")
            lines += ["    " + s for s in _compress([k for k, _ in mismatched], dict(mismatched))]
        for h in _hints(missing, unexpected):
            lines.append(f"  hint: {h}")
        raise CheckpointError("\n".join(lines), missing, unexpected, mismatched)
    return missing, unexpected, mismatched


# ---------------------------------------------------------------------------------------------------
# Assigning


def _target_dtype(key: str, model_dtype: torch.dtype, ckpt_dtype: torch.dtype, dtype: torch.dtype | None):
    if model_dtype == FP8 or key.endswith(("weight_scale", "input_scale", "smooth_scale")):
        return ckpt_dtype  # checked to be exactly fp8 / fp32 already
    if is_fp32_param(key):
        return torch.float32  # MAGI-1's _high_precision_promoter
    return dtype if dtype is not None else ckpt_dtype  # assign=True: checkpoint dtype wins


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    mod_name, _, name = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if name in mod._parameters:
        mod._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    elif name in mod._buffers:
        mod._buffers[name] = tensor
    else:  # pragma: no cover - check_state_dict guarantees the key exists
        raise KeyError(key)


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None, *,
                         getter: Callable[[str], torch.Tensor] | None = None,
                         header: Mapping[str, tuple] | None = None, strict: bool = True,
                         device=None, dtype: torch.dtype | None = None, progress: bool = False,
                         source: str = "state dict") -> nn.Module:
    """Strictly check, then assign tensors into ``model`` (typically built on meta).

    Either ``state_dict`` or (``getter`` + ``header``: name -> (shape, dtype)) provides the tensors;
    the getter form lets a loader fetch one tensor at a time. Meta tensors may be assigned (shape /
    dtype only): that is how key sets are verified without allocating.
    """
    if state_dict is not None:
        header = {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items()}
        getter = state_dict.__getitem__
    if header is None or getter is None:
        raise ValueError("load_state_dict_into: pass 'state_dict', or both 'getter' and 'header'")
    check_state_dict(model, header, strict=strict, source=source)
    expected = _expected(model)
    keys = [k for k in header if k in expected]
    it = keys
    if progress:
        try:
            from tqdm import tqdm

            it = tqdm(keys, desc="loading DiT", unit="tensor")
        except ImportError:
            pass
    for k in it:
        t = getter(k)
        want = _target_dtype(k, expected[k][1], t.dtype, dtype)
        dev = torch.device(device) if device is not None else t.device
        if t.dtype != want or dev != t.device:
            t = t.to(device=dev, dtype=want)
        _assign(model, k, t)
    if isinstance(model, VideoDiT) and dtype is not None:
        model.act_dtype = dtype
    return model


def meta_keys(model: nn.Module) -> list[str]:
    """Parameters still on the meta device (not loaded)."""
    return [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta]


def load_dit(config: "MagiConfig | str | Mapping", *, checkpoint_dir: str | None = None, device="cpu",
             dtype: torch.dtype | None = None, strict: bool = True, progress: bool = True,
             check_finite: bool = False) -> VideoDiT:
    """Build the DiT on meta and load the official weights into it.

    Args:
        config: MAGI-1 config (path / dict / MagiConfig). ``runtime_config.load`` + the variant's
            ``inference_weight[.fp8][.distill]`` folder give the weights unless ``checkpoint_dir``
            (that folder itself) is given.
        device: where the parameters end up ("cpu" keeps unconverted tensors memory-mapped).
        dtype: optional dtype for the non-promoted floating tensors (default: as stored).
        strict: fail on missing / unexpected keys (shape and dtype mismatches always fail).
        check_finite: scan every tensor for NaN / inf as it is read (CheckpointError names the key and
            file); costs one pass over the weights.
    """
    cfg = load_config(config)
    device = resolve_device(device, argument="device", allow_meta=True)
    ckpt = checkpoint_dir if checkpoint_dir is not None else weight_dir(cfg)
    files = checkpoint_files(ckpt)
    header = read_header(files)
    model = build_dit(cfg, device="meta")
    # Check everything against the headers before reading data.
    check_state_dict(model, header, strict=strict, source=f"checkpoint {ckpt!r}")
    handles = {}

    def getter(k):
        path = files[k]
        if path not in handles:
            handles[path] = _safe_open(path).__enter__()
        t = _get_tensor(handles[path], path, k)
        if check_finite:
            assert_finite([(k, t)], source=path)
        return t

    # Visit keys file by file so each shard's mapping is walked once.
    ordered = dict(sorted(header.items(), key=lambda kv: (files[kv[0]], kv[0])))
    try:
        load_state_dict_into(model, getter=getter, header=ordered, strict=strict, device=device, dtype=dtype,
                             progress=progress, source=f"checkpoint {ckpt!r}")
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    left = meta_keys(model)
    if left:
        raise CheckpointError(f"checkpoint {ckpt!r}: {len(left)} parameters were not loaded (non-strict load): "
                              + "; ".join(_compress(left, limit=10)), missing=left)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Saving (tests, tiny demo checkpoints, conversions)


def save_checkpoint(state: "nn.Module | Mapping[str, torch.Tensor]", ckpt_dir: str, *,
                    num_shards: int = 1) -> list[str]:
    """Write a DiT state dict in the official layout: one ``model.safetensors`` (num_shards=1) or
    ``model-0000k-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    sd = state.state_dict() if isinstance(state, nn.Module) else dict(state)
    if num_shards < 1:
        raise ValueError(f"save_checkpoint: argument 'num_shards' must be >= 1, got {num_shards}")
    os.makedirs(ckpt_dir, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    if num_shards == 1:
        path = os.path.join(ckpt_dir, SINGLE_FILE)
        save_file(tensors, path, metadata={"format": "pt"})
        return [path]
    keys = list(tensors)
    per = -(-len(keys) // num_shards)
    weight_map, paths, total = {}, [], 0
    for s in range(num_shards):
        name = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s * per:(s + 1) * per]}
        save_file(part, os.path.join(ckpt_dir, name), metadata={"format": "pt"})
        paths.append(os.path.join(ckpt_dir, name))
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    with open(os.path.join(ckpt_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return paths


__all__ = ["CheckpointError", "weight_dir", "checkpoint_files", "read_header", "check_state_dict", "diff_keys",
           "load_state_dict_into", "load_dit", "save_checkpoint", "meta_keys", "assert_finite"]
