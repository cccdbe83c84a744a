"""``grounding doctor``: what a GPU user needs to know before a long run.

:func:`gather` probes the machine (it imports torch, reads the local Hugging Face cache and
never the network, and never loads the model). The :class:`Report` it returns holds only
facts; the placement decision, the warnings and the verdict are derived from them with no
I/O, so every branch (two GPUs, one without bf16, offline, no torch) is tested without a
GPU by building a Report by hand.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from grounding._version import __version__
from grounding.backends.local import hub_reachable, looks_like_path
from grounding.backends.options import DEFAULT_MODEL
from grounding.backends.placement import Machine, Placement, PlacementError, plan
from grounding.core.dialects import Dialect, get_dialect, guess_dialect

REQUIRED = ("torch", "transformers", "accelerate")
"""What the local backend imports; without any of them it cannot run."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    total_bytes: int
    free_bytes: int | None
    """None when the GPU could not be asked (e.g. another process holds it exclusively)."""
    capability: tuple[int, int]

    @property
    def bf16(self) -> bool:
        """Native bfloat16 (Ampere, 8.0, or newer); older GPUs only emulate it, slowly."""
        return self.capability >= (8, 0)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: Literal["directory", "file", "missing", "invalid", "hub"]
    """``missing``: a path that does not exist; ``invalid``: neither a path nor a hub id."""
    path: str | None = None
    """The checkpoint directory, or the cached snapshot of a hub id."""
    config: bool = False
    """config.json is readable locally (in the directory or the cache)."""
    weight_bytes: int = 0
    """Bytes of weight files found locally (0: none)."""
    model_type: str | None = None
    dialect: str | None = None
    dialect_from: Literal["config.json", "name"] | None = None


@dataclass(frozen=True)
class Report:
    """The facts doctor found; the decision and verdict follow from them."""

    model: ModelInfo
    machine: Machine | None
    """None when torch cannot be imported."""
    gpus: tuple[GPU, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)
    import_errors: dict[str, str] = field(default_factory=dict)
    torch_cuda: str | None = None
    """torch.version.cuda; None for a CPU build."""
    device: str | None = None
    """The --device asked for (None: the backend's default)."""
    offline: bool = False
    hub_unreachable: bool = False
    """The hub did not answer the backend's probe (only asked for a hub id not cached)."""
    hub_cache: str = ""
    cuda_visible_devices: str | None = None

    def decision(self) -> tuple[Placement | None, str | None]:
        """(placement, None) or (None, why the device is impossible)."""
        if self.machine is None:
            return None, None
        try:
            return plan(self.machine, self.device), None
        except PlacementError as exc:
            return None, str(exc)

    @property
    def dialect(self) -> Dialect | None:
        return get_dialect(self.model.dialect) if self.model.dialect else None

    @property
    def problems(self) -> list[str]:
        """Why the local backend cannot run (empty: it can)."""
        out = [f"{name} cannot be imported: {self.import_errors[name]}"
               for name in REQUIRED if name in self.import_errors]
        error = self.decision()[1]
        if error:
            out.append(error)
        m = self.model
        if m.kind == "missing":
            out.append(f"--model {m.name}: no such checkpoint directory")
        elif m.kind == "invalid":
            out.append(f"model {m.name!r} is neither a directory nor a valid hub id")
        elif m.kind == "file":
            out.append(f"model {m.name} is a file; expected a checkpoint directory or hub id")
        elif m.kind == "directory" and not m.config:
            out.append(f"{m.name} has no readable config.json: not a transformers checkpoint")
        elif m.kind == "hub" and (self.offline or self.hub_unreachable) and not m.weight_bytes:
            what = "its weights are" if m.config else "it is"
            why = ("HF_HUB_OFFLINE=1 is set" if self.offline
                   else "the hub does not answer from this machine")
            out.append(f"{m.name}: {what} not in the Hugging Face cache ({self.hub_cache}) and "
                       f"{why}; run `hf download {m.name}` where the hub is reachable"
                       + (", or unset HF_HUB_OFFLINE" if self.offline else ""))
        d = self.dialect
        if d is not None and d.factor is None:
            out.append(f"the local backend runs Qwen2/2.5/3-VL; {d.name} models need a "
                       "server (--backend openai)")
        return out

    @property
    def warnings(self) -> list[str]:
        """What will not stop the run but costs time or memory."""
        out = []
        placement = self.decision()[0]
        m = self.model
        if placement is not None and not placement.on_gpu and (self.device or "") != "cpu":
            out.append(f"the model runs on the CPU in {placement.dtype}: expect it to be slow")
        if placement is not None and placement.on_gpu:
            targets = self._targets(placement)
            if placement.dtype == "bfloat16":
                out += [f"GPU {g.index} ({g.name}, compute {g.capability[0]}.{g.capability[1]})"
                        " has no native bfloat16: it is emulated, slowly; float16 suits it"
                        for g in targets if not g.bf16]
            free = [g.free_bytes for g in targets]
            if m.weight_bytes and None not in free and m.weight_bytes > sum(free):
                spread = placement.device_map == "auto"
                where = "all GPUs" if spread else placement.device
                hint = "" if spread else "; --device auto spreads it over all GPUs"
                out.append(f"the weights ({_gib(m.weight_bytes)} on disk) exceed the free "
                           f"memory of {where} ({_gib(sum(free))}){hint}")
        if m.kind == "hub" and not (self.offline or self.hub_unreachable) and not m.weight_bytes:
            what = "its weights are" if m.config else "it is"
            out.append(f"{m.name}: {what} not in the Hugging Face cache ({self.hub_cache}); "
                       "the first run downloads it from the hub (size unknown here)")
        if m.dialect is None and (m.kind == "hub" or m.config):
            seen = f"model_type {m.model_type!r}" if m.model_type else "its name"
            out.append(f"no grounding dialect matches {seen}: pass --dialect to detect and "
                       "label")
        return out

    def _targets(self, placement: Placement) -> list[GPU]:
        if placement.device_map == "auto":
            return list(self.gpus)
        return [g for g in self.gpus if f"cuda:{g.index}" == placement.device]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        problems = self.problems
        if problems:
            return "local backend cannot run: " + "; ".join(problems)
        placement = self.decision()[0]
        assert placement is not None  # no problems implies torch imported and a placement
        warned = len(self.warnings)
        tail = f", {warned} warning{'s' if warned > 1 else ''}" if warned else ""
        return (f"ready: {self.model.name} on {placement.device} ({placement.dtype}, "
                f"{placement.attn_implementation}){tail}")

    @property
    def gpu_hint(self) -> str | None:
        """Why no GPU is visible, as far as can be told."""
        if self.gpus:
            return None
        if self.machine is None:
            return "torch cannot be imported"
        if self.torch_cuda is None:
            return "torch is a CPU build: install a CUDA build of torch (pytorch.org)"
        if self.cuda_visible_devices is not None:
            return f"CUDA_VISIBLE_DEVICES={self.cuda_visible_devices!r} may hide the GPUs"
        return "torch sees no GPU: check nvidia-smi, the driver and CUDA_VISIBLE_DEVICES"

    def to_dict(self) -> dict[str, Any]:
        placement, error = self.decision()
        d = self.dialect
        return {
            "ok": self.ok,
            "verdict": self.verdict,
            "problems": self.problems,
            "warnings": self.warnings,
            "versions": {**self.versions, "torch_cuda": self.torch_cuda or (
                "cpu build" if self.machine is not None else None)},
            "gpus": [{"index": g.index, "name": g.name, "total_bytes": g.total_bytes,
                      "free_bytes": g.free_bytes,
                      "capability": f"{g.capability[0]}.{g.capability[1]}", "bf16": g.bf16}
                     for g in self.gpus],
            "gpu_hint": self.gpu_hint,
            "device": self.device,
            "placement": None if placement is None else {
                "device": placement.device, "dtype": placement.dtype,
                "attn_implementation": placement.attn_implementation,
                "device_map": placement.device_map},
            "placement_error": error,
            "model": {
                "name": self.model.name, "kind": self.model.kind, "path": self.model.path,
                "config": self.model.config, "weight_bytes": self.model.weight_bytes,
                "model_type": self.model.model_type, "dialect": self.model.dialect,
                "dialect_from": self.model.dialect_from,
                "budget": None if d is None or d.budget is None else {
                    "min_pixels": d.budget[0], "max_pixels": d.budget[1], "factor": d.factor},
                "fixed_size": None if d is None or d.fixed_size is None else list(d.fixed_size),
            },
            "offline": self.offline,
            "hub_cache": self.hub_cache,
        }


def _gib(n: int) -> str:
    return f"{n / _GIB:.1f} GiB" if n >= _GIB / 10 else f"{n / 1024**2:.1f} MiB"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _dist_version(name: str, module: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        found = importlib.util.find_spec(module) is not None
        return "installed (version unknown)" if found else "not installed"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache() -> Path:
    """The hub cache folder as the environment says now (huggingface_hub's constants are
    fixed at its import, so a later HF_HOME would be missed)."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"),
                                              "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _weight_bytes(folder: Path) -> int:
    total = 0
    for f in folder.iterdir():
        if f.name.endswith(_WEIGHT_SUFFIXES):
            with contextlib.suppress(OSError):  # a dangling link: the blob is gone
                total += f.stat().st_size  # follows the cache's symlinks to the blobs
    return total


def _read_model_type(config: Path) -> tuple[bool, str | None]:
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False, None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    return True, model_type if isinstance(model_type, str) else None


def model_info(name: str, cache: Path) -> ModelInfo:
    """Where ``name`` is and which dialect it speaks, from local files only."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    path = Path(name).expanduser()
    folder: Path | None = None
    if path.is_dir():
        kind: Literal["directory", "hub"] = "directory"
        folder = path
    elif path.exists():
        return ModelInfo(name, "file")
    elif looks_like_path(name):  # as the backend decides: "/x", "./x", "a/b/c"
        return ModelInfo(name, "missing")
    else:
        try:
            hit = try_to_load_from_cache(name, "config.json", cache_dir=cache)
        except HFValidationError:
            return ModelInfo(name, "invalid")
        kind = "hub"
        folder = Path(hit).parent if isinstance(hit, str) else None
    config, model_type = _read_model_type(folder / "config.json") if folder else (False, None)
    weights = _weight_bytes(folder) if folder else 0
    dialect: Dialect | None = None
    source: Literal["config.json", "name"] | None = None
    if model_type is not None:
        # The backend takes the dialect from config.json, never from the name.
        with contextlib.suppress(ValueError):
            dialect, source = get_dialect(model_type), "config.json"
    elif not config:
        dialect = guess_dialect(name)
        source = "name" if dialect else None
    return ModelInfo(name, kind, str(folder) if folder else None, config, weights,
                     model_type, dialect.name if dialect else None, source)


def gather(model: str | None = None, device: str | None = None) -> Report:
    """Probe this machine for the local backend running ``model`` on ``device``."""
    versions = {"python": platform.python_version()}
    errors: dict[str, str] = {}
    modules: dict[str, Any] = {}
    for name in REQUIRED:
        try:
            modules[name] = importlib.import_module(name)
        except Exception as exc:  # a broken install raises more than ImportError
            errors[name] = _first_line(exc)
            versions[name] = "cannot be imported"
        else:
            versions[name] = str(getattr(modules[name], "__version__", "unknown"))
    versions["qwen-vl-utils"] = _dist_version("qwen-vl-utils", "qwen_vl_utils")
    versions["flash-attn"] = _dist_version("flash-attn", "flash_attn")
    versions["grounding"] = __version__

    torch = modules.get("torch")
    gpus: list[GPU] = []
    machine = None
    if torch is not None:
        machine = Machine.probe()
        for i in range(machine.cuda_devices):
            props = torch.cuda.get_device_properties(i)
            try:
                free: int | None = int(torch.cuda.mem_get_info(i)[0])
            except RuntimeError:
                free = None
            gpus.append(GPU(i, props.name, int(props.total_memory), free,
                            (props.major, props.minor)))
    cache = hub_cache()
    info = model_info(model or DEFAULT_MODEL, cache)
    offline = (_truthy(os.environ.get("HF_HUB_OFFLINE"))
               or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")))
    # The same few-second probe the backend makes before it would download.
    unreachable = (info.kind == "hub" and not info.weight_bytes and not offline
                   and not hub_reachable())
    return Report(
        model=info, machine=machine, gpus=tuple(gpus), hub_unreachable=unreachable,
        versions=versions, import_errors=errors,
        torch_cuda=torch.version.cuda if torch is not None else None, device=device,
        offline=offline, hub_cache=str(cache),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )


def render(report: Report) -> str:
    """The report as aligned lines for a terminal (the verdict not included)."""
    v = report.versions
    lines = ["versions"]
    for name in ("python", *REQUIRED, "qwen-vl-utils", "flash-attn", "grounding"):
        text = v.get(name, "unknown")
        if name == "torch" and name not in report.import_errors:
            text += f" (CUDA {report.torch_cuda})" if report.torch_cuda else " (cpu build)"
        lines.append(f"  {name:<14} {text}")

    lines.append("GPUs")
    for g in report.gpus:
        free = "free unknown" if g.free_bytes is None else f"{_gib(g.free_bytes)} free"
        lines.append(f"  {g.index:<3} {g.name}: {_gib(g.total_bytes)} total, {free}, compute "
                     f"{g.capability[0]}.{g.capability[1]}, bf16 {'yes' if g.bf16 else 'no'}")
    if not report.gpus:
        lines.append(f"  no GPU visible: {report.gpu_hint}")

    placement, error = report.decision()
    asked = f"--device {report.device}" if report.device else "default device"
    lines.append(f"placement ({asked})")
    if error:
        lines.append(f"  impossible: {error}")
    elif placement is None:
        lines.append("  unknown: torch cannot be imported")
    else:
        device_map = (json.dumps(placement.device_map) if isinstance(placement.device_map, dict)
                      else placement.device_map)
        lines += [f"  {'device':<14} {placement.device}",
                  f"  {'dtype':<14} {placement.dtype}",
                  f"  {'attention':<14} {placement.attn_implementation}",
                  f"  {'device_map':<14} {device_map}"]

    m = report.model
    lines += ["model", f"  {'name':<14} {m.name}"]
    if m.kind == "hub":
        where = ("in the local cache" if m.weight_bytes else
                 "config only in the local cache" if m.config else "not in the local cache")
        mode = ", offline" if report.offline else ""
        source = f"hub id, {where} ({report.hub_cache}{mode})"
    else:
        source = {"directory": "local directory", "file": "a file, not a directory",
                  "missing": "path does not exist",
                  "invalid": "neither a directory nor a valid hub id"}[m.kind]
    lines.append(f"  {'source':<14} {source}")
    if m.weight_bytes:
        lines.append(f"  {'weights':<14} {_gib(m.weight_bytes)} on disk")
    d = report.dialect
    if d is None:
        dialect = "unknown"
    elif m.dialect_from == "config.json":
        dialect = f"{d.name} (config.json model_type {m.model_type})"
    else:
        dialect = f"{d.name} (guessed from the name)"
    lines.append(f"  {'dialect':<14} {dialect}")
    if d is not None:
        lines.append(f"  {'pixel budget':<14} {_budget(d)}")
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines)


def _budget(d: Dialect) -> str:
    if d.fixed_size is not None:
        return f"every image resized to {d.fixed_size[0]}x{d.fixed_size[1]}"
    if d.budget is None or d.factor is None:
        return "none: the model tiles images itself"
    low, high = d.budget
    tile = d.factor * d.factor
    return (f"min_pixels {low:,} .. max_pixels {high:,} ({low // tile}..{high // tile} tokens "
            f"of {d.factor}x{d.factor}); frame sides multiples of {d.factor}")
