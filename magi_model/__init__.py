"""magi_model: Sand AI's MAGI-1 video DiT (4.5B / 24B; base, distill, distill+fp8) on magi_kernels.

Entry points:
    build_dit(config, device=...)       the DiT from a MAGI-1 config.json / dict / preset ("meta": no memory)
    load_dit(config, ...)               build on meta + memory-mapped strict load of the official weights
    VideoDiT.forward(...)               one denoising forward -> velocity
    magi_model.schedule                 time grid, window schedule, key windows, CFG scales, frame counts
    generate_latents(model, cfg, caps)  the autoregressive chunk pipeline (magi_model.pipeline)
    magi_model.vae                      MAGI-1's transformer VAE, tiled encode / decode, pixel conversions
    magi_model.text                     T5 (local folder) / precomputed / random text features, special tokens
    python -m magi_model.generate       the CLI (MAGI-1 config.json unchanged, or --preset tiny)
"""

from magi_model.config import ConfigError, MagiConfig, load_config, preset, preset_dict
from magi_model.device import DeviceError
from magi_model.dit import KVCache, VideoDiT, build_dit, init_random_weights, is_fp32_param
from magi_model.loading import CheckpointError, load_dit, load_state_dict_into, save_checkpoint
from magi_model.pipeline import Captions, SamplerModel, generate_latents

__all__ = ["ConfigError", "MagiConfig", "load_config", "preset", "preset_dict", "KVCache", "VideoDiT", "build_dit",
           "init_random_weights", "is_fp32_param", "CheckpointError", "load_dit", "load_state_dict_into",
           "save_checkpoint", "Captions", "generate_latents", "SamplerModel", "DeviceError"]
