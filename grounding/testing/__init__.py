"""Test support that ships with the package: tiny random-weight checkpoints
(``grounding.testing.tiny``), a backend with no model (``grounding.testing.static``),
synthetic scenes with known boxes (``grounding.testing.scenes``), and a loopback
OpenAI-compatible server (``grounding.testing.loopback``, not imported here: it needs
aiohttp) whose ``scene_handler`` is a short-sighted model for those scenes."""

from grounding.testing.scenes import (
    Scene,
    SceneDataset,
    SceneObject,
    colour_boxes,
    save_scene,
    scene,
    scenes,
    write_dataset,
)
from grounding.testing.static import StaticBackend, StaticSegmenter
from grounding.testing.tiny import (
    FAMILIES,
    QWEN_SPECIAL_TOKENS,
    TINY_SPECS,
    Family,
    TinySpec,
    build_tiny_checkpoint,
    chat_template,
    tiny_checkpoint,
)

__all__ = [
    "FAMILIES",
    "QWEN_SPECIAL_TOKENS",
    "TINY_SPECS",
    "Family",
    "Scene",
    "SceneDataset",
    "SceneObject",
    "StaticBackend",
    "StaticSegmenter",
    "TinySpec",
    "build_tiny_checkpoint",
    "chat_template",
    "colour_boxes",
    "save_scene",
    "scene",
    "scenes",
    "tiny_checkpoint",
    "write_dataset",
]
