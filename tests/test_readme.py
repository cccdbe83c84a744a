"""The README's Python examples, run as written, in order, in one namespace.

Only what a README cannot ship is substituted: the hub model resolves to the tiny random
checkpoint (with a short token limit), and the example file names (street.jpg,
photo.jpg, ...) are sample images copied into a temporary folder."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from real_outputs import raw_text

from grounding.backends import local
from grounding.testing import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_has_python_examples():
    assert len(python_blocks()) >= 5


def test_readme_python_examples_run_as_written(tmp_path, monkeypatch):
    images = ROOT / "assets/images"
    for name, source in [("street.jpg", "astronaut.jpg"), ("photo.jpg", "cameraman.jpg"),
                         ("part.jpg", "coffee.jpg"), ("examples/scratch1.jpg", "rocket.jpg"),
                         ("aerial.jpg", "coffee.jpg")]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(images / source, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    tiny = str(tiny_checkpoint("qwen2.5-vl"))
    real = local.resolve_model
    monkeypatch.setattr(local, "resolve_model",
                        lambda m: real(tiny) if m == local.DEFAULT_MODEL else real(m))
    init = local.LocalBackend.__init__

    def short(self, model=local.DEFAULT_MODEL, **kw):
        init(self, model, **{**kw, "max_new_tokens": min(kw.get("max_new_tokens", 16), 16)})

    monkeypatch.setattr(local.LocalBackend, "__init__", short)
    answer = raw_text("qwen25vl_spatial_sunglasses.txt")
    namespace = {"paths": ["street.jpg", "photo.jpg"], "answer": answer}
    for number, block in enumerate(python_blocks(), 1):
        try:
            exec(compile(block, f"README python block {number}", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"README python block {number} failed: {type(exc).__name__}: {exc}\n"
                        f"{block}")
    assert namespace["result"].width > 0
