"""Where and how a local model runs: device, dtype, attention kernel, weight placement.

One pure function decides from facts about the machine (:class:`Machine`), so every
case (CUDA with and without bf16, flash-attn present or not, CPU, ``cuda:1``, ``auto``)
is unit-tested without a GPU, and ``grounding doctor`` prints the same decision the
backend will make.

Placement: the whole model goes on one device (``device_map={"": device}``), loaded
straight onto it. ``--device auto`` spreads a model too large for one GPU over all
visible GPUs (``device_map="auto"``). Both go through accelerate, a dependency, and CPU
runs make the same call (``{"": "cpu"}``), so the CPU test suite exercises the loading
path a GPU user gets.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from grounding.core.errors import GroundingError

DTYPES = ("bfloat16", "float16", "float32")
ATTENTION = ("flash_attention_2", "sdpa", "eager")


class PlacementError(GroundingError):
    """A device or dtype that this machine cannot give."""


@dataclass(frozen=True)
class Machine:
    """What the machine offers, as far as placement cares."""

    cuda_devices: int = 0
    bf16: bool = False
    """Every visible GPU supports bfloat16 (Ampere or newer)."""
    flash_attn: bool = False
    """The flash_attn package is importable."""

    @classmethod
    def probe(cls) -> Machine:
        """This machine (imports torch)."""
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        # Native bf16 (compute capability 8.0+) on every GPU: is_bf16_supported() alone
        # checks the current device and counts slow emulation on a T4 or V100.
        bf16 = bool(count) and all(torch.cuda.get_device_capability(i) >= (8, 0)
                                   for i in range(count))
        return cls(cuda_devices=count, bf16=bf16,
                   flash_attn=importlib.util.find_spec("flash_attn") is not None)


@dataclass(frozen=True)
class Placement:
    device: str
    """Where inputs go: ``cpu`` or ``cuda:N`` (with ``auto``, the first GPU)."""
    dtype: str
    attn_implementation: str
    device_map: str | dict[str, str]
    """What ``from_pretrained(device_map=...)`` receives."""

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def check_device(device: str | None) -> None:
    """Reject a malformed ``--device`` before anything heavy is imported."""
    wanted = (device or "").strip().lower()
    index = wanted.partition(":")[2]
    if wanted in ("", "cpu", "auto", "cuda") or (
            wanted.startswith("cuda:") and index.isdigit()):
        return
    raise PlacementError(f"--device {device!r}: expected cuda, cuda:N, cpu or auto")


def plan(machine: Machine, device: str | None = None, dtype: str | None = None,
         attn_implementation: str | None = None) -> Placement:
    """The placement for ``device`` (None: the first GPU, else the CPU).

    dtype defaults to bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU
    (fp16 matmuls on CPU are slow or missing). Attention defaults to flash-attention 2 on
    a GPU when flash_attn is installed, else PyTorch's sdpa.
    """
    check_device(device)
    wanted = (device or "").strip().lower()
    if wanted in ("", "cuda") and machine.cuda_devices:
        wanted = "cuda:0"
    elif wanted == "":
        wanted = "cpu"
    if wanted == "auto":
        if not machine.cuda_devices:
            raise PlacementError("--device auto spreads a model over GPUs, and none is visible")
        device_map: str | dict[str, str] = "auto"
        target = "cuda:0"
    elif wanted == "cpu":
        device_map, target = {"": "cpu"}, "cpu"
    elif wanted.startswith("cuda"):
        index = wanted.partition(":")[2] or "0"
        if not index.isdigit():
            raise PlacementError(f"--device {device!r}: expected cuda, cuda:N, cpu or auto")
        if int(index) >= machine.cuda_devices:
            seen = (f"{machine.cuda_devices} GPU(s) are visible" if machine.cuda_devices
                    else "no GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
            raise PlacementError(f"--device {device}: {seen}")
        target = f"cuda:{int(index)}"
        device_map = {"": target}
    else:
        raise PlacementError(f"--device {device!r}: expected cuda, cuda:N, cpu or auto")

    gpu = target != "cpu"
    if dtype is None:
        dtype = ("bfloat16" if machine.bf16 else "float16") if gpu else "float32"
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise PlacementError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype == "bfloat16" and gpu and not machine.bf16:
        raise PlacementError("this GPU has no bfloat16 support: use float16")
    if attn_implementation is None:
        attn_implementation = "flash_attention_2" if gpu and machine.flash_attn else "sdpa"
    if attn_implementation not in ATTENTION:
        raise PlacementError(f"attention {attn_implementation!r}: expected one of "
                             f"{', '.join(ATTENTION)}")
    if attn_implementation == "flash_attention_2" and not (gpu and machine.flash_attn):
        raise PlacementError("flash_attention_2 needs a GPU and the flash-attn package")
    if attn_implementation == "flash_attention_2" and dtype == "float32":
        raise PlacementError("flash_attention_2 runs in bfloat16 or float16, not float32")
    return Placement(target, dtype, attn_implementation, device_map)
