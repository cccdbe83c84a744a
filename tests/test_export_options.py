"""Export options as a user meets them: the YOLO split of a few images, --overwrite, and
where Label Studio tasks point (--url-prefix)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from grounding.cli.app import app
from grounding.core.result import Box, Result
from grounding.formats import ExportExists, export_coco, export_labelstudio, export_yolo
from grounding.formats.yolo import split_value

CLASSES = ["cat", "dog"]


def _names(n: int, keep, seed: int = 0) -> list[str]:
    """The first ``n`` names img<i>.png whose split value passes ``keep``: image sets the
    hash alone would split badly, found deterministically."""
    names = [f"img{i}.png" for i in range(1000) if keep(split_value(f"img{i}.png", seed))]
    return names[:n]


def _images(root: Path, names: list[str]) -> list[dict]:
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for name in names:
        Image.new("RGB", (32, 24), (90, 120, 150)).save(root / name)
        records.append(Result(boxes=[Box((2, 3, 20, 15), "cat", 0)], image=name, width=32,
                              height=24, classes=CLASSES).to_record())
    return records


def _split(out: Path) -> dict[str, list[str]]:
    return {s: sorted(p.name for p in (out / "images" / s).iterdir()) for s in ("train", "val")}


def _labels(out: Path) -> dict[str, list[str]]:
    return {s: sorted(p.stem for p in (out / "labels" / s).iterdir()) for s in ("train", "val")}


def test_yolo_val_gets_an_image_when_the_hash_gives_it_none(tmp_path):
    names = _names(6, lambda v: v >= 0.2)  # 6 images, none below 0.2: val would be empty
    records = _images(tmp_path / "src", names)
    out = tmp_path / "yolo"
    stats = export_yolo(records, tmp_path / "src", CLASSES, out, val_fraction=0.2)
    split = _split(out)
    nearest = min(names, key=lambda n: split_value(n, 0))  # the most nearly val
    assert split["val"] == [nearest] and len(split["train"]) == 5 and stats.images == 6
    assert _labels(out) == {s: [Path(n).stem for n in split[s]] for s in split}
    assert (out / "labels" / "val" / (Path(nearest).stem + ".txt")).read_text().startswith("0 ")
    again = tmp_path / "again"
    export_yolo(list(reversed(records)), tmp_path / "src", CLASSES, again, val_fraction=0.2)
    assert _split(again) == split  # deterministic, whatever the order of the records


def test_yolo_train_keeps_an_image_when_the_hash_puts_all_in_val(tmp_path):
    names = _names(3, lambda v: v < 0.9)
    records = _images(tmp_path / "src", names)
    out = tmp_path / "yolo"
    export_yolo(records, tmp_path / "src", CLASSES, out, val_fraction=0.9)
    split = _split(out)
    assert split["train"] == [max(names, key=lambda n: split_value(n, 0))]
    assert len(split["val"]) == 2


@pytest.mark.parametrize(("n", "fraction", "expected"), [
    (1, 0.2, {"train": 1, "val": 0}),  # one image: it trains
    (4, 0.0, {"train": 4, "val": 0}),  # 0: all train, as asked
    (4, 1.0, {"train": 0, "val": 4}),  # 1: all val, as asked
])
def test_yolo_split_extremes_are_left_as_asked(tmp_path, n, fraction, expected):
    names = _names(n, lambda v: v >= 0.2)
    out = tmp_path / "yolo"
    export_yolo(_images(tmp_path / "src", names), tmp_path / "src", CLASSES, out,
                val_fraction=fraction)
    assert {s: len(v) for s, v in _split(out).items()} == expected


def test_yolo_split_of_many_images_is_the_hash_alone(tmp_path):
    names = [f"img{i}.png" for i in range(40)]
    out = tmp_path / "yolo"
    export_yolo(_images(tmp_path / "src", names), tmp_path / "src", CLASSES, out,
                val_fraction=0.2)
    assert _split(out)["val"] == sorted(n for n in names if split_value(n, 0) < 0.2)


# ---------------------------------------------------------------------------- CLI


def _run(tmp_path: Path, names: list[str]) -> Path:
    root = tmp_path / "photos"
    records = _images(root, names)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"images_dir": str(root), "classes": CLASSES}))
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def _cli(*args: str):
    return CliRunner().invoke(app, ["export", *args])


@pytest.mark.parametrize("fmt", ["coco", "yolo", "labelstudio"])
def test_cli_export_into_a_used_folder_names_the_overwrite_flag(tmp_path, fmt):
    run = _run(tmp_path, ["a.png", "b.png"])
    mine = tmp_path / "mine"
    assert _cli(str(run), "--format", fmt, "--out", str(mine)).exit_code == 0
    refused = _cli(str(run), "--format", fmt, "--out", str(mine))
    assert refused.exit_code == 2
    assert refused.stderr.count("\n") == 1
    assert "pass --overwrite to replace it" in refused.stderr
    assert "overwrite=True" not in refused.stderr
    replaced = _cli(str(run), "--format", fmt, "--out", str(mine), "--overwrite")
    assert replaced.exit_code == 0, replaced.stderr
    assert (tmp_path / "photos" / "a.png").exists()  # never the source images


def test_python_export_into_a_used_folder_names_the_python_option(tmp_path):
    records = _images(tmp_path / "src", ["a.png"])
    for export in (export_coco, export_yolo, export_labelstudio):
        out = tmp_path / export.__name__
        export(records, tmp_path / "src", CLASSES, out)
        with pytest.raises(ExportExists, match="pass overwrite=True"):
            export(records, tmp_path / "src", CLASSES, out)
        export(records, tmp_path / "src", CLASSES, out, overwrite=True)


def _urls(out: Path) -> list[str]:
    return [t["data"]["image"] for t in json.loads((out / "tasks.json").read_text())]


def test_labelstudio_task_urls_follow_the_url_prefix(tmp_path):
    root = tmp_path / "photos"
    (root / "sub dir").mkdir(parents=True)
    records = _images(root, ["a.png"])
    Image.new("RGB", (32, 24)).save(root / "sub dir" / "b#1.png")
    records.append(Result(image="sub dir/b#1.png", width=32, height=24).to_record())
    cases = {
        None: ["/data/local-files/?d=a.png", "/data/local-files/?d=sub%20dir/b%231.png"],
        "/data/local-files/?d=photos/": ["/data/local-files/?d=photos/a.png",
                                         "/data/local-files/?d=photos/sub%20dir/b%231.png"],
        "/data/local-files/?d=photos": ["/data/local-files/?d=photos/a.png",
                                        "/data/local-files/?d=photos/sub%20dir/b%231.png"],
        "http://files:8081": ["http://files:8081/a.png", "http://files:8081/sub%20dir/b%231.png"],
    }
    for i, (prefix, expected) in enumerate(cases.items()):
        options = {} if prefix is None else {"url_prefix": prefix}
        export_labelstudio(records, root, CLASSES, tmp_path / f"ls{i}", **options)
        assert _urls(tmp_path / f"ls{i}") == expected


def test_cli_export_url_prefix(tmp_path):
    run = _run(tmp_path, ["a.png"])
    out = tmp_path / "ls"
    done = _cli(str(run), "--format", "labelstudio", "--out", str(out),
                "--url-prefix", "/data/local-files/?d=photos/")
    assert done.exit_code == 0, done.stderr
    assert _urls(out) == ["/data/local-files/?d=photos/a.png"]
    default = _cli(str(run), "--format", "labelstudio")
    assert default.exit_code == 0
    assert _urls(run / "export" / "labelstudio") == ["/data/local-files/?d=a.png"]
    wrong = _cli(str(run), "--format", "coco", "--url-prefix", "/x/")
    assert wrong.exit_code == 2 and "--url-prefix" in wrong.output


def test_record_overlay_and_exports_agree_on_the_ontology_class(tmp_path):
    """The prompt asked for "pedestrian"; the class is "person": the record's label, the
    COCO category and the Label Studio label all say "person"."""
    from grounding import result_from_text

    root = tmp_path / "src"
    root.mkdir()
    Image.new("RGB", (100, 80)).save(root / "a.png")
    result = result_from_text('[{"bbox_2d": [10, 10, 50, 50], "label": "pedestrian"}]',
                              "qwen2.5-vl", image_size=(100, 80), input_size=(100, 80),
                              classes={"pedestrian": "person", "automobile": "car"},
                              image="a.png")
    record = json.loads(result.to_json())
    assert (record["detections"][0]["label"], record["detections"][0]["model_label"]) == (
        "person", "pedestrian")
    names = ["person", "car"]
    export_coco([record], root, names, tmp_path / "coco")
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    category = {c["id"]: c["name"] for c in coco["categories"]}
    assert [category[a["category_id"]] for a in coco["annotations"]] == ["person"]
    export_labelstudio([record], root, names, tmp_path / "ls")
    [task] = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    [rect] = task["predictions"][0]["result"]
    assert rect["value"]["rectanglelabels"] == ["person"]
    assert result.to_detections().data["class_name"].tolist() == ["person"]  # the overlay's


def test_exports_are_strict_json_when_a_record_holds_nan_scores(tmp_path):
    """A record read back with NaN / Infinity scores (Python's json reads them) exports as
    unscored boxes and points, never as the non-standard NaN / Infinity."""
    root = tmp_path / "src"
    root.mkdir()
    Image.new("RGB", (100, 80)).save(root / "a.png")
    text = ('{"image": "a.png", "width": 100, "height": 80, "detections": [{"label": "cat", '
            '"class_id": 0, "bbox": [1, 2, 30, 40], "score": NaN, "attributes": {"d": '
            'Infinity}}], "points": [{"label": "dog", "class_id": 1, "point": [5, 6], '
            '"score": Infinity}]}')
    record = json.loads(text)

    def strict(path: Path):
        def refuse(constant):
            raise AssertionError(f"{path} holds {constant}")
        return json.loads(path.read_text(), parse_constant=refuse)

    export_coco([record], root, CLASSES, tmp_path / "coco")
    coco = strict(tmp_path / "coco" / "annotations.json")
    assert "score" not in coco["annotations"][0]
    assert coco["images"][0]["points"][0]["score"] is None
    export_labelstudio([record], root, CLASSES, tmp_path / "ls")
    [task] = strict(tmp_path / "ls" / "tasks.json")
    assert task["predictions"][0]["score"] is None
    assert all("score" not in r for r in task["predictions"][0]["result"])
