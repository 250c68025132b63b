"""GPU presets for the planner (``python -m magi_model.plan --gpus 8x4090``): datasheet numbers only.

Every number is a vendor datasheet value (dense, i.e. without 2:4 sparsity; tensor-core rates with
fp32 accumulation) or a plain property of the bus; ``docs/planner.md`` lists the sources. Measured
efficiencies are not here: they are the planner's stated assumptions, or a calibration file written
by our benchmarks on a real GPU.

A spec is ``<count>x<gpu>``: ``8x4090``, ``4xH100-SXM``, ``1xH200``, or ``1x12GB`` (a GPU with that much
memory and, as stated in its name, RTX 4090 compute). A JSON file (``--hardware FILE``) may override
any field of a preset or describe a new GPU: ``{"base": "4090", "name": "RTX 4090 (x8 lanes)",
"link_gbps": 16}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

GIB = 1 << 30


class HardwareError(ValueError):
    """A GPU spec or hardware file that cannot be used; the message names the argument."""


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int  # device memory as the driver reports it (nvidia-smi "Total")
    bf16_tflops: float  # dense tensor-core bf16, fp32 accumulate
    fp8_tflops: float | None  # dense tensor-core e4m3, fp32 accumulate; None = no fp8 tensor cores
    fp32_tflops: float  # non-tensor fp32 (what an fp32 GEMM gets with TF32 disabled, torch's default)
    tf32_tflops: float  # dense tensor-core TF32 (fp32 GEMMs with torch.backends.cuda.matmul.allow_tf32)
    hbm_gbps: float  # DRAM bandwidth, GB/s
    interconnect: str  # "nvlink" or "pcie"
    link_gbps: float  # GPU-to-GPU bandwidth per direction per GPU, GB/s
    p2p: bool  # peer-to-peer between GPUs; without it collectives are staged through host memory
    host_gbps: float  # GPU <-> host bandwidth per direction (PCIe), GB/s
    family: str = ""  # "hopper", "ada", "ampere": picks the planner's default efficiencies
    source: str = ""

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB

    def peak_tflops(self, precision: str) -> float:
        if precision == "fp8":
            if self.fp8_tflops is None:
                raise HardwareError(f"gpus: {self.name} has no fp8 tensor cores (fp8 checkpoints need sm_89+)")
            return self.fp8_tflops
        return {"bf16": self.bf16_tflops, "fp32": self.fp32_tflops, "tf32": self.tf32_tflops}[precision]


def _mib(n: int) -> int:
    return n << 20


PRESETS: dict[str, GPU] = {
    "H100-SXM": GPU("H100 SXM5 80GB", _mib(81559), 989.4, 1978.9, 66.9, 494.7, 3350, "nvlink", 450, True, 64, "hopper",
                    "NVIDIA H100 Tensor Core GPU datasheet (SXM5 column; dense = half the sparsity figures)"),
    "H100-PCIe": GPU("H100 PCIe 80GB", _mib(81559), 756.0, 1513.0, 51.2, 378.0, 2000, "pcie", 64, True, 64, "hopper",
                     "NVIDIA H100 datasheet (PCIe column), PCIe Gen5 x16"),
    "H800": GPU("H800 SXM5 80GB", _mib(81559), 989.4, 1978.9, 66.9, 494.7, 3350, "nvlink", 200, True, 64, "hopper",
                "H100 silicon with NVLink limited to 400 GB/s bidirectional"),
    "H200": GPU("H200 SXM 141GB", _mib(143771), 989.4, 1978.9, 66.9, 494.7, 4800, "nvlink", 450, True, 64, "hopper",
                "NVIDIA H200 datasheet (SXM column)"),
    "A100-80GB": GPU("A100 SXM4 80GB", _mib(81920), 312.0, None, 19.5, 156.0, 2039, "nvlink", 300, True, 32, "ampere",
                     "NVIDIA A100 datasheet (SXM4 80GB column)"),
    "4090": GPU("RTX 4090 24GB", _mib(24564), 165.2, 330.3, 82.6, 82.6, 1008, "pcie", 32, False, 32, "ada",
                "NVIDIA Ada GPU architecture whitepaper, appendix (GeForce: fp32-accumulate tensor rates); "
                "PCIe 4.0 x16; GeForce drivers expose no peer-to-peer"),
}
ALIASES = {"h100": "H100-SXM", "h100-sxm": "H100-SXM", "h100-sxm5": "H100-SXM", "h100-pcie": "H100-PCIe",
           "h800": "H800", "h200": "H200", "a100": "A100-80GB", "a100-80gb": "A100-80GB", "4090": "4090",
           "rtx4090": "4090", "rtx-4090": "4090"}


@dataclasses.dataclass(frozen=True)
class Cluster:
    gpu: GPU
    count: int

    @property
    def label(self) -> str:
        return f"{self.count}x {self.gpu.name}"


def gpu_preset(name: str) -> GPU:
    key = name.strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*gb", key)
    if m:
        gb = float(m.group(1))
        base = PRESETS["4090"]
        return dataclasses.replace(base, name=f"{m.group(1)}GB GPU (RTX 4090 compute assumed)",
                                   memory_bytes=int(gb * GIB),
                                   source="memory as given; compute, bandwidth and bus of the RTX 4090 preset")
    if key in ALIASES:
        return PRESETS[ALIASES[key]]
    for k, v in PRESETS.items():
        if k.lower() == key:
            return v
    raise HardwareError(f"gpus: unknown GPU {name!r}; known: {sorted(PRESETS)} or '<N>GB'")


def preset_for_device(device_name: str) -> GPU | None:
    """The preset of a GPU named as the driver names it (``torch.cuda.get_device_name()``), or None."""
    n = device_name.lower()
    for needle, key in (("h100 pcie", "H100-PCIe"), ("h100", "H100-SXM"), ("h800", "H800"), ("h200", "H200"),
                        ("a100", "A100-80GB"), ("4090", "4090")):
        if needle in n:
            return PRESETS[key]
    return None


def read_json_object(path: str, argument: str, error: type = None) -> dict:
    """A JSON file holding one object; errors name ``argument`` and the file."""
    error = HardwareError if error is None else error
    if not os.path.isfile(path):
        raise error(f"{argument}: {path!r} does not exist or is not a file")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{argument} {path!r}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{argument} {path!r}: must hold a JSON object")
    return d


def parse_gpus(spec: str, hardware_file: str | None = None) -> Cluster:
    """``"8x4090"`` -> Cluster(RTX 4090, 8); fields from ``hardware_file`` override the preset."""
    m = re.fullmatch(r"\s*(\d+)\s*[x*]\s*(\S+)\s*", spec or "")
    if not m:
        raise HardwareError(f"gpus: must look like '8x4090' or '4xH100-SXM' (<count>x<gpu>), got {spec!r}")
    count = int(m.group(1))
    if count < 1:
        raise HardwareError(f"gpus: count must be >= 1, got {count}")
    over = read_json_object(hardware_file, "hardware") if hardware_file else {}
    gpu = gpu_preset(over.pop("base", m.group(2)))
    fields = {f.name for f in dataclasses.fields(GPU)}
    unknown = sorted(set(over) - fields - {"memory_gib"})
    if unknown:
        raise HardwareError(f"hardware {hardware_file!r}: unknown fields {unknown}; known: {sorted(fields)}")
    if "memory_gib" in over:
        over["memory_bytes"] = int(float(over.pop("memory_gib")) * GIB)
    for k, v in over.items():
        if k in ("name", "interconnect", "source"):
            if not isinstance(v, str):
                raise HardwareError(f"hardware {hardware_file!r}: {k} must be a string, got {v!r}")
        elif k == "p2p":
            if not isinstance(v, bool):
                raise HardwareError(f"hardware {hardware_file!r}: p2p must be true or false, got {v!r}")
        elif v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise HardwareError(f"hardware {hardware_file!r}: {k} must be a positive number, got {v!r}")
    gpu = dataclasses.replace(gpu, **over)
    return Cluster(gpu, count)


__all__ = ["GPU", "Cluster", "PRESETS", "HardwareError", "gpu_preset", "parse_gpus", "preset_for_device", "read_json_object", "GIB"]
