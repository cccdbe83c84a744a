"""Where a local model runs: one pure decision, every case without a GPU."""

from __future__ import annotations

import pytest

from grounding.backends.placement import Machine, Placement, PlacementError, plan

AMPERE = Machine(cuda_devices=2, bf16=True, flash_attn=False)
TURING = Machine(cuda_devices=1, bf16=False, flash_attn=False)
CPU = Machine()


def test_cuda_with_bf16_takes_the_first_gpu_in_bf16_and_sdpa():
    p = plan(AMPERE)
    assert p == Placement("cuda:0", "bfloat16", "sdpa", {"": "cuda:0"})
    assert p.on_gpu


def test_cuda_without_bf16_falls_back_to_fp16():
    assert plan(TURING).dtype == "float16"
    with pytest.raises(PlacementError, match="no bfloat16"):
        plan(TURING, dtype="bfloat16")


def test_flash_attention_when_installed_on_a_gpu_only():
    flash = Machine(cuda_devices=1, bf16=True, flash_attn=True)
    assert plan(flash).attn_implementation == "flash_attention_2"
    assert plan(flash, "cpu").attn_implementation == "sdpa"
    assert plan(AMPERE).attn_implementation == "sdpa"
    with pytest.raises(PlacementError, match="flash-attn"):
        plan(AMPERE, attn_implementation="flash_attention_2")
    with pytest.raises(PlacementError, match="float32"):
        plan(flash, dtype="float32", attn_implementation="flash_attention_2")


def test_cpu_runs_float32_through_the_same_device_map_call():
    assert plan(CPU) == Placement("cpu", "float32", "sdpa", {"": "cpu"})
    assert plan(AMPERE, "cpu") == Placement("cpu", "float32", "sdpa", {"": "cpu"})
    assert not plan(CPU).on_gpu


def test_an_explicit_gpu():
    p = plan(AMPERE, "cuda:1")
    assert (p.device, p.device_map) == ("cuda:1", {"": "cuda:1"})
    assert plan(AMPERE, "CUDA").device == "cuda:0"
    with pytest.raises(PlacementError, match="2 GPU"):
        plan(AMPERE, "cuda:2")
    with pytest.raises(PlacementError, match="no GPU is visible"):
        plan(CPU, "cuda:1")
    with pytest.raises(PlacementError, match="expected"):
        plan(AMPERE, "gpu")
    with pytest.raises(PlacementError, match="expected"):
        plan(AMPERE, "cuda:x")


def test_auto_spreads_over_gpus_and_needs_one():
    p = plan(AMPERE, "auto")
    assert (p.device, p.device_map) == ("cuda:0", "auto")
    with pytest.raises(PlacementError, match="none is visible"):
        plan(CPU, "auto")


def test_dtype_given_as_torch_dtype_or_name():
    import torch

    assert plan(AMPERE, dtype=torch.float16).dtype == "float16"
    assert plan(CPU, dtype="bfloat16").torch_dtype() is torch.bfloat16
    with pytest.raises(PlacementError, match="int8"):
        plan(CPU, dtype="int8")


def test_probe_on_this_machine_matches_torch():
    import torch

    machine = Machine.probe()
    assert machine.cuda_devices == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
