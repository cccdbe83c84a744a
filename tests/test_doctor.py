"""`grounding doctor`: the facts a GPU user checks before a long run, and the exit status."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from grounding.backends.doctor import GPU, ModelInfo, Report, render
from grounding.backends.local import DEFAULT_MODEL
from grounding.backends.placement import Machine
from grounding.cli.app import app
from grounding.core.dialects import DIALECTS
from grounding.testing import tiny_checkpoint

runner = CliRunner()
GIB = 1024**3
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path, monkeypatch):
    """Every test sees an empty Hugging Face cache of its own, offline unless it says."""
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home / "hub"


def doctor(*args: str):
    return runner.invoke(app, ["doctor", *args])


def error_lines(out) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith("error:")]


def test_ready_with_the_tiny_checkpoint():
    out = doctor("--model", str(tiny_checkpoint("qwen2.5-vl")))
    assert out.exit_code == 0, out.output
    assert "qwen2.5-vl (config.json model_type qwen2_5_vl)" in out.stdout
    assert "local directory" in out.stdout
    assert "multiples of 28" in out.stdout
    assert "ready:" in out.stdout and not error_lines(out)
    if GPUS:
        assert torch.cuda.get_device_name(0) in out.stdout
    else:
        assert "no GPU visible" in out.stdout
        assert "runs on the CPU in float32: expect it to be slow" in out.stdout


def test_impossible_device_exits_1_with_one_line():
    device = f"cuda:{max(1, GPUS)}"
    out = doctor("--model", str(tiny_checkpoint("qwen2.5-vl")), "--device", device)
    assert out.exit_code == 1
    [line] = error_lines(out)
    assert f"--device {device}:" in line
    assert "ready:" not in out.stdout


@pytest.mark.parametrize(("name", "reason"), [
    ("{tmp}/no-such-checkpoint", "no such checkpoint directory"),
    ("models/qwen/Qwen2.5-VL-3B", "no such checkpoint directory"),  # not org/name: a path, as the backend says
    ("qwen vl", "neither a directory nor a valid hub id"),
])
def test_model_that_is_not_there_exits_1(tmp_path, name, reason):
    out = doctor("--model", name.format(tmp=tmp_path), "--device", "cpu")
    assert out.exit_code == 1
    [line] = error_lines(out)
    assert reason in line


@pytest.mark.parametrize("offline", ["1", "0"])
def test_uncached_hub_id_fails_only_offline(offline, monkeypatch):
    from grounding.backends import doctor as module

    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(module, "hub_reachable", lambda *a: True)
    out = doctor("--device", "cpu")  # the default model, absent from the empty cache
    assert DEFAULT_MODEL in out.stdout and "not in the local cache" in out.stdout
    assert "qwen2.5-vl (guessed from the name)" in out.stdout
    if offline == "1":
        assert out.exit_code == 1
        [line] = error_lines(out)
        assert "HF_HUB_OFFLINE=1" in line and f"hf download {DEFAULT_MODEL}" in line
    else:
        assert out.exit_code == 0, out.output
        assert "the first run downloads it" in out.stdout


def test_uncached_hub_id_with_an_unreachable_hub_fails(monkeypatch):
    """The same probe the backend makes: an air-gapped GPU box gets no false green light."""
    from grounding.backends import doctor as module

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(module, "hub_reachable", lambda *a: False)
    out = doctor("--device", "cpu")
    assert out.exit_code == 1
    [line] = error_lines(out)
    assert "the hub does not answer" in line and f"hf download {DEFAULT_MODEL}" in line


def test_cached_hub_id_needs_its_weights_offline(empty_hub_cache):
    snapshot = empty_hub_cache / "models--acme--tiny-vl" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    out = doctor("--model", "acme/tiny-vl", "--device", "cpu")
    assert out.exit_code == 1
    assert "its weights are not in the Hugging Face cache" in error_lines(out)[0]

    (snapshot / "model.safetensors").write_bytes(b"\0" * 3 * 1024**2)
    out = doctor("--model", "acme/tiny-vl", "--device", "cpu")
    assert out.exit_code == 0, out.output
    assert "hub id, in the local cache" in out.stdout and "3.0 MiB on disk" in out.stdout
    assert "qwen3-vl (config.json model_type qwen3_vl)" in out.stdout
    assert "multiples of 32" in out.stdout


@pytest.mark.parametrize(("config", "reason"), [
    (None, "has no readable config.json"),
    ({"model_type": "deepseek_vl_v2"}, "deepseek-vl2 models need a server"),
])
def test_directory_the_backend_cannot_load(tmp_path, config, reason):
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    out = doctor("--model", str(tmp_path), "--device", "cpu")
    assert out.exit_code == 1
    assert reason in error_lines(out)[0]


def test_json_has_the_facts():
    out = doctor("--model", str(tiny_checkpoint("qwen2.5-vl")), "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert {"ok", "verdict", "problems", "warnings", "versions", "gpus", "gpu_hint",
            "placement", "placement_error", "model", "offline", "hub_cache"} <= set(data)
    assert data["ok"] is True and data["problems"] == []
    assert {"python", "torch", "torch_cuda", "transformers", "accelerate", "qwen-vl-utils",
            "flash-attn", "grounding"} <= set(data["versions"])
    assert data["versions"]["torch"] == torch.__version__
    assert len(data["gpus"]) == GPUS
    assert data["model"]["kind"] == "directory" and data["model"]["dialect"] == "qwen2.5-vl"
    budget = DIALECTS["qwen2.5-vl"].budget
    assert data["model"]["budget"] == {"min_pixels": budget[0], "max_pixels": budget[1],
                                       "factor": 28}
    if not GPUS:
        assert data["placement"] == {"device": "cpu", "dtype": "float32",
                                     "attn_implementation": "sdpa", "device_map": {"": "cpu"}}


# -- the GPU branch, from facts made up here -------------------------------------------

A100 = GPU(0, "NVIDIA A100-SXM4-80GB", 80 * GIB, 70 * GIB, (8, 0))
T4 = GPU(1, "Tesla T4", 16 * GIB, 15 * GIB, (7, 5))
QWEN7B = ModelInfo(DEFAULT_MODEL, "hub", "/cache/snapshot", True, 16 * GIB, "qwen2_5_vl",
                   "qwen2.5-vl", "config.json")


def two_gpus(device: str | None = None, *, bf16: bool = True) -> Report:
    # Machine.probe() asks torch about the current GPU only: it may say bf16 with a T4 as #1.
    return Report(QWEN7B, Machine(cuda_devices=2, bf16=bf16, flash_attn=True), (A100, T4),
                  versions={"torch": "2.8.0"}, torch_cuda="12.8", device=device)


def test_two_gpus_rendered():
    report = two_gpus()
    text = render(report)
    assert "NVIDIA A100-SXM4-80GB: 80.0 GiB total, 70.0 GiB free, compute 8.0, bf16 yes" in text
    assert "Tesla T4: 16.0 GiB total, 15.0 GiB free, compute 7.5, bf16 no" in text
    assert "no GPU visible" not in text and "torch          2.8.0 (CUDA 12.8)" in text
    assert report.ok and report.warnings == []
    assert report.verdict == f"ready: {DEFAULT_MODEL} on cuda:0 (bfloat16, flash_attention_2)"
    assert [g["bf16"] for g in report.to_dict()["gpus"]] == [True, False]


def test_gpu_without_bf16_and_too_little_memory_warns():
    report = two_gpus("cuda:1")
    [bf16, memory] = report.warnings
    assert "GPU 1 (Tesla T4, compute 7.5) has no native bfloat16" in bf16
    assert "16.0 GiB on disk" in memory and "cuda:1 (15.0 GiB)" in memory
    assert "--device auto" in memory
    assert report.ok and report.verdict.endswith("on cuda:1 (bfloat16, flash_attention_2), "
                                                 "2 warnings")
    assert "warning: GPU 1 (Tesla T4" in render(report)

    spread = two_gpus("auto")  # 85 GiB free over both: the weights fit
    assert spread.decision()[0].device_map == "auto"
    assert [w for w in spread.warnings if "bfloat16" in w] == [bf16]
    assert not [w for w in spread.warnings if "free memory" in w]

    assert two_gpus("cuda:1", bf16=False).decision()[0].dtype == "float16"
    assert not [w for w in two_gpus("cuda:1", bf16=False).warnings if "bfloat16" in w]


def test_third_gpu_is_impossible():
    report = two_gpus("cuda:2")
    assert not report.ok
    assert report.verdict == "local backend cannot run: --device cuda:2: 2 GPU(s) are visible"
    assert "impossible: --device cuda:2" in render(report)


def test_without_torch_nothing_is_decided():
    report = Report(QWEN7B, None, import_errors={"torch": "No module named 'torch'"},
                    versions={"torch": "cannot be imported"})
    assert not report.ok
    assert report.problems == ["torch cannot be imported: No module named 'torch'"]
    assert report.decision() == (None, None)
    text = render(report)
    assert "torch          cannot be imported\n" in text
    assert "unknown: torch cannot be imported" in text


@pytest.mark.parametrize(("cuda", "visible", "hint"), [
    (None, None, "torch is a CPU build"),
    ("12.8", "", "CUDA_VISIBLE_DEVICES='' may hide the GPUs"),
    ("12.8", None, "check nvidia-smi"),
])
def test_no_gpu_hint(cuda, visible, hint):
    report = Report(QWEN7B, Machine(), torch_cuda=cuda, cuda_visible_devices=visible)
    assert hint in report.gpu_hint
    assert f"no GPU visible: {report.gpu_hint}" in render(report)
    assert report.decision()[0].device == "cpu" and "on the CPU" in report.warnings[0]
