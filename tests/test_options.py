"""One source for every default a CLI option, a backend constructor and run.json share:
grounding.backends.options. These tests fail when one side drifts from the dataclasses."""

import dataclasses
import inspect
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer.main

from grounding.backends.local import LocalBackend
from grounding.backends.options import (
    BACKENDS,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MODEL,
    LABEL_KEYS,
    BackendOptions,
    LocalOptions,
    RemoteOptions,
    own_fields,
)
from grounding.backends.remote.client import OpenAIBackend
from grounding.cli import app
from grounding.cli.options import BACKEND, DETECTION
from grounding.runs.rundir import CONFIG_DEFAULTS, CONFIG_KEYS, RUN_KEYS

CONSTRUCTORS = [(LocalOptions, LocalBackend), (RemoteOptions, OpenAIBackend)]


def _params(command: str) -> dict:
    click = typer.main.get_command(app).commands[command]
    return {p.name: p for p in click.params}


@pytest.mark.parametrize(("options", "backend"), CONSTRUCTORS, ids=["local", "openai"])
def test_constructor_defaults_are_the_dataclass_defaults(options, backend):
    signature = inspect.signature(backend.__init__).parameters
    for field in dataclasses.fields(options):
        assert field.name in signature, f"{backend.__name__} takes no {field.name}"
        default = signature[field.name].default
        if default is inspect.Parameter.empty:  # the server: required by the constructor
            assert field.name == "base_url"
            continue
        assert default == field.default, (backend.__name__, field.name)


def test_one_home_for_the_default_model_and_token_limit():
    from grounding.backends import local

    assert local.DEFAULT_MODEL is DEFAULT_MODEL == LocalOptions.model
    assert LocalOptions.max_new_tokens == RemoteOptions.max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    assert inspect.signature(LocalBackend).parameters["model"].default == DEFAULT_MODEL


@pytest.mark.parametrize("command", ["detect", "label", "ask"])
def test_every_backend_option_is_generated_from_its_field(command):
    params = _params(command)
    for cls in (BackendOptions, *BACKENDS.values()):
        for field in own_fields(cls):
            cli = field.metadata["cli"]
            name = field.metadata["flag"] or field.name
            if cli == "backend":
                param = params[name]
                assert param.default == field.default, (command, name)
                assert param.help.endswith(field.metadata["help"])
                assert param.help.startswith(f"{cls.kind}: " if cls.kind else "")
            elif cli == "command" and command != "ask":
                assert params[name].default == field.default, (command, name)
    assert params["backend"].default == "local"
    # Booleans render as --flag/--no-flag pairs, as they always did.
    assert params["logprobs"].secondary_opts == ["--no-logprobs"]
    assert params["text_first"].secondary_opts == ["--no-text-first"]


def test_detect_and_label_share_one_declaration():
    detect, label = _params("detect"), _params("label")
    for name, _, default in (*DETECTION.options, *BACKEND.options):
        assert detect[name].default == label[name].default == default
        assert detect[name].help == label[name].help
    assert detect["max_new_tokens"].default == DEFAULT_MAX_NEW_TOKENS
    assert _params("ask")["max_new_tokens"].default == 256  # a short answer about one box
    assert detect["verify"].secondary_opts == []  # --verify alone, as before


def test_config_keys_are_the_label_fields_and_the_run_keys():
    marked = {f.name for cls in (BackendOptions, *BACKENDS.values())
              for f in dataclasses.fields(cls) if f.metadata["labels"]}
    assert set(LABEL_KEYS) == marked == {"model", "dialect", "min_pixels", "max_pixels",
                                         "max_new_tokens", "stop_repeats"}
    assert len(CONFIG_KEYS) == len(set(CONFIG_KEYS))
    assert set(CONFIG_KEYS) == marked | set(RUN_KEYS)
    # The keys every run.json has held since runs existed, so old runs resume; a key
    # added later says what a run.json without it meant (stop_repeats: no stop then).
    first = {"images_dir", "backend", "model", "dialect", "prompt", "classes", "ontology",
             "task", "system", "min_pixels", "max_pixels", "max_new_tokens", "shard",
             "min_score", "verify_threshold"}
    assert first <= set(CONFIG_KEYS)
    assert set(CONFIG_KEYS) - first == set(CONFIG_DEFAULTS)
    assert CONFIG_DEFAULTS["stop_repeats"] == 0
    assert {k: CONFIG_DEFAULTS[k] for k in ("verify", "references")} == {
        "verify": False, "references": None}


EDITED = textwrap.dedent("""
    import importlib.abc, importlib.util, inspect, json, sys

    class EditedOptions(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        # grounding.backends.options from SOURCE: the dataclasses as if edited by hand.
        def find_spec(self, name, path, target=None):
            if name == "grounding.backends.options":
                return importlib.util.spec_from_loader(name, self, origin=FILE)

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            module.__file__ = FILE
            exec(compile(SOURCE, FILE, "exec"), module.__dict__)

    sys.meta_path.insert(0, EditedOptions())

    import click, typer.main
    from grounding.backends.local import LocalBackend
    from grounding.backends.remote.client import OpenAIBackend
    from grounding.cli import app
    from grounding.runs.rundir import CONFIG_DEFAULTS, CONFIG_KEYS

    group = typer.main.get_command(app)
    seen = {}
    for command in ("detect", "label", "ask"):
        click_command = group.commands[command]
        ctx = click.Context(click_command)
        for param in click_command.params:
            if param.name in ("timeout", "device", "max_new_tokens"):
                seen[f"{command} {param.name}"] = [param.default,
                                                   param.get_help_record(ctx)[1]]
    for backend in (LocalBackend, OpenAIBackend):
        for name, param in inspect.signature(backend).parameters.items():
            if name in ("timeout", "device", "max_new_tokens"):
                seen[f"{backend.__name__} {name}"] = param.default
    seen["CONFIG_KEYS"] = list(CONFIG_KEYS)
    seen["CONFIG_DEFAULTS"] = CONFIG_DEFAULTS
    print(json.dumps(seen))
""")


def _edit(source: str, pattern: str, replacement: str) -> str:
    edited, count = re.subn(pattern, replacement, source, flags=re.DOTALL)
    assert count == 1, pattern
    return edited


def test_a_default_edited_in_the_dataclass_shows_everywhere(tmp_path):
    """Edit grounding/backends/options.py (in a fresh interpreter): a new timeout, a new
    token limit, and the device marked as changing the labels. --help, the option
    defaults, both constructors and the run directory's keys all follow."""
    from grounding.backends import options

    path = options.__file__
    source = Path(path).read_text(encoding="utf-8")
    source = _edit(source, r"(timeout: float = setting\()[^,]+", r"\g<1>7.5")
    source = _edit(source, r"(\nDEFAULT_MAX_NEW_TOKENS = )\d+", r"\g<1>1000")
    source = _edit(source, r"(\n    device: str \| None = setting\(.*?)\)\n",
                   r"\1, labels=True, missing=None)\n")
    script = f"FILE = {path!r}\nSOURCE = {source!r}\n" + EDITED
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    for command in ("detect", "label", "ask"):
        assert seen[f"{command} timeout"] == [7.5, "openai: seconds per request.  "
                                                   "[default: 7.5]"]
        assert seen[f"{command} device"][0] is None
    for command in ("detect", "label"):
        default, help_text = seen[f"{command} max_new_tokens"]
        assert default == 1000 and "[default: 1000; x>=1]" in help_text
    assert seen["ask max_new_tokens"][0] == 256  # ask's own default
    assert seen["OpenAIBackend timeout"] == 7.5
    assert seen["OpenAIBackend max_new_tokens"] == seen["LocalBackend max_new_tokens"] == 1000
    assert seen["LocalBackend device"] is None
    assert "device" in seen["CONFIG_KEYS"] and set(seen["CONFIG_KEYS"]) - {"device"} == set(
        CONFIG_KEYS)
    # A run.json written before the device was recorded resumes as "device: None".
    assert seen["CONFIG_DEFAULTS"] == {**CONFIG_DEFAULTS, "device": None}


def test_run_json_keeps_its_keys_and_their_order(tmp_path):
    """run_config takes the backend's settings from LABEL_KEYS; run.json is written as it
    always was, so a run.json from before still resumes."""
    from grounding.pipeline.detector import Detector, Query
    from grounding.runs.labeling import run_config
    from grounding.runs.rundir import RunDir
    from grounding.testing import StaticBackend

    backend = StaticBackend()
    config = run_config(Detector(backend), Query.make(["object"]), tmp_path, (0, 1))
    assert list(config) == [
        "images_dir", "backend", "model", "dialect", "prompt", "classes", "ontology", "task",
        "system", "references", "min_pixels", "max_pixels", "max_new_tokens",
        *(["stop_repeats"] if "stop_repeats" in config else []), "shard",
        "min_score", "verify", "verify_threshold", "per_class", "tiles", "tile_overlap",
        "tiles_with_full", "dedup_iou", "dedup_agnostic", "keys", "masks", "grounding_version"]
    assert config["dialect"] == backend.dialect.name and config["model"] == backend.model
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.run_json.write_text(json.dumps(config))
    run.start(config)  # resumes: the same keys mean the same thing
