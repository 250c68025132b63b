"""Local stand-ins for MAGI-1's folders (DiT weights under runtime_config.load, a ViTVAE folder, a
special_tokens.npz) so the CLI's non-preset path runs without downloads."""

import json

import numpy as np

from magi_model import save_checkpoint
from magi_model import vae as V
from magi_model.config import MagiConfig


def write_special_tokens(path) -> str:
    rng = np.random.default_rng(0)
    np.savez(path, caption_token=rng.normal(size=(1, 4096)), logo_token=rng.normal(size=(1, 4096)),
             other_tokens=rng.normal(size=(100, 4096)))
    return str(path)


def write_magi1_layout(tmp_path, config: dict, dit_state) -> str:
    """Point ``config`` at DiT weights (``dit_state``: a module or state dict, saved as one
    model.safetensors) and a tiny random ViTVAE under ``tmp_path``; write it as cfg.json; return its path."""
    config["runtime_config"].update(load=str(tmp_path / "dit"), vae_pretrained=str(tmp_path / "vae"))
    cfg = MagiConfig.from_dict(config, strict=True)
    save_checkpoint(dit_state, str(tmp_path / "dit" / cfg.weight_subdir))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "ViTVAE", "ddconfig": V.TINY_DDCONFIG}))
    from safetensors.torch import save_file
    save_file(V.tiny_vae(5).state_dict(), str(tmp_path / "vae" / V.WEIGHTS_FILE))
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    return str(path)
