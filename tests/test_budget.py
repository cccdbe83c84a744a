from grounding.core.dialects import get_dialect
from grounding.core.geometry import resolve_budget


def test_defaults_are_the_dialect_budget():
    assert resolve_budget("qwen2.5-vl") == (256 * 28 * 28, 1280 * 28 * 28)
    assert resolve_budget("qwen3-vl") == (64 * 32 * 32, 9800 * 32 * 32)
    d = get_dialect("deepseek-vl2")
    assert resolve_budget(d) == (None, None)


def test_one_bound_moves_the_other_out_of_the_way():
    assert resolve_budget("qwen2.5-vl", max_pixels=100 * 28 * 28) == (100 * 28 * 28, 100 * 28 * 28)
    assert resolve_budget("qwen2.5-vl", min_pixels=2000 * 28 * 28) == (2000 * 28 * 28, 2000 * 28 * 28)
    assert resolve_budget("qwen2.5-vl", 10, 20) == (10, 20)
