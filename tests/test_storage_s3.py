"""Images on object storage, against a real S3 endpoint (moto_server, tests/s3_server.py):
listing a bucket folder, list files in the bucket, reading images upright, one-line
errors, and a plain (local engine) run over the bucket exported, evaluated and masked."""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from grounding.core.errors import ImageLoadError, StorageError
from grounding.io import storage
from grounding.io.images import load_image
from grounding.pipeline.detector import Detector, Query
from grounding.runs.labeling import label
from grounding.runs.rundir import RunDir
from grounding.runs.sources import NoImagesError, open_images
from grounding.testing import StaticBackend
from grounding.testing.scenes import coco_truth, save_scene, scene

pytest.importorskip("pyarrow")

SIZE = (64, 48)
FILES = {"a.jpg": 1, "sub/b.png": 1, "rot.JPG": 6}
"""Key under the test's prefix -> EXIF orientation it is stored with."""


@contextlib.contextmanager
def s3_client(server):
    """A boto3 client for the test server, closed after (ResourceWarning is an error)."""
    import boto3

    client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id="x",
                          aws_secret_access_key="y", region_name="us-east-1")
    try:
        yield client
    finally:
        client.close()


def put(server, key: str, data: bytes) -> None:
    with s3_client(server) as client:
        client.put_object(Bucket=server.bucket, Key=key, Body=data)


@pytest.fixture
def s3(s3_server, monkeypatch, request, tmp_path):
    """The server with its AWS variables set, and this test's prefix holding FILES (and
    a text file and a sibling prefix that are not images of it)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    prefix = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")
    scenes = {}
    for i, (key, orientation) in enumerate(FILES.items()):
        s = scene(*SIZE, objects=2, seed=i)
        path = save_scene(s, tmp_path / "upload" / key.replace("/", "_"),
                          orientation=orientation)
        put(s3_server, f"{prefix}/images/{key}", path.read_bytes())
        scenes[key] = s
    put(s3_server, f"{prefix}/images/notes.txt", b"not an image")
    put(s3_server, f"{prefix}/images-other/x.jpg", (tmp_path / "upload" / "a.jpg").read_bytes())
    base = f"s3://{s3_server.bucket}/{prefix}"
    return base, scenes


def test_a_bucket_folder_lists_its_images_as_uris(s3):
    base, _ = s3
    expected = [f"{base}/images/{k}" for k in sorted(FILES)]
    for spec in (f"{base}/images", f"{base}/images/"):
        images = open_images(spec)
        assert images.root == images.base == f"{base}/images"
        assert list(images.keys()) == expected
        assert images.location(expected[0]) == expected[0]


def test_a_uri_loads_upright(s3):
    base, scenes = s3
    image = load_image(f"{base}/images/rot.JPG")
    assert image.size == SIZE
    stored = Image.open(io.BytesIO(storage.read_bytes(f"{base}/images/rot.JPG")))
    assert stored.size == SIZE[::-1]  # stored turned; shown upright
    truth = scenes["rot.JPG"].image
    diff = np.abs(np.asarray(image, float) - np.asarray(truth, float)).mean()
    assert diff < 8  # the same picture, up to JPEG loss (turned, it would differ a lot)


def test_missing_objects_and_buckets_are_one_line_naming_the_uri(s3, s3_server):
    base, _ = s3
    missing = f"{base}/images/missing.jpg"
    with pytest.raises(ImageLoadError) as info:
        load_image(missing)
    assert str(info.value) == f"cannot load image {missing}: no such object"
    with pytest.raises(StorageError) as info:
        storage.read_bytes(missing)
    assert info.value.missing
    with pytest.raises(NoImagesError) as info:
        open_images(f"{base}/nothing-here")
    assert str(info.value) == f"{base}/nothing-here: no such folder"
    with pytest.raises(NoImagesError) as info:
        open_images("s3://no-such-bucket-anywhere/images")
    message = str(info.value)
    assert message.startswith("s3://no-such-bucket-anywhere/images: no such bucket")
    assert "\n" not in message
    put(s3_server, base.split("/", 3)[3] + "/texts/readme.txt", b"no image here")
    with pytest.raises(NoImagesError) as info:
        open_images(f"{base}/texts")
    assert str(info.value).startswith(f"no images in {base}/texts: looked for .bmp")


def test_lists_in_the_bucket(s3, s3_server):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    base, _ = s3
    prefix = base.split("/", 3)[3]
    entries = ["images/a.jpg", f"{base}/images/sub/b.png", "images/a.jpg"]
    put(s3_server, f"{prefix}/all.txt", ("# two images\n" + "\n".join(entries)).encode())
    put(s3_server, f"{prefix}/all.jsonl", "\n".join(
        json.dumps({"image": e}) for e in entries).encode())
    sink = io.BytesIO()
    pq.write_table(pa.table({"path": entries}), sink)
    put(s3_server, f"{prefix}/all.parquet", sink.getvalue())
    for suffix in ("txt", "jsonl", "parquet"):
        images = open_images(f"{base}/all.{suffix}")
        assert images.root == f"{base}/all.{suffix}" and images.base == base
        keys = list(images.keys())
        assert keys == entries[:2]
        assert [load_image(images.location(k)).size for k in keys] == [SIZE, SIZE]
    put(s3_server, f"{prefix}/bad.jsonl", b'"images/a.jpg"\n{"nope": 1}\n')
    with pytest.raises(NoImagesError, match=rf"^{re.escape(base)}/bad.jsonl:2: expected"):
        open_images(f"{base}/bad.jsonl")
    with pytest.raises(NoImagesError) as info:
        open_images(f"{base}/missing.txt")
    assert str(info.value) == f"{base}/missing.txt: no such object"


def test_a_local_run_over_a_bucket_exports_evaluates_and_gets_masks(s3, tmp_path):
    from grounding.cli import app
    from grounding.cli.export import export_runs
    from grounding.runs.masks import add_masks
    from grounding.testing import StaticSegmenter

    base, scenes = s3
    folder = f"{base}/images"
    run = RunDir(tmp_path / "run")
    summary = label(Detector(StaticBackend(label="red box")), Query.make(["red box"]),
                    folder, run)
    assert summary["images"] == len(FILES) and summary["errors"] == 0
    assert run.config()["images_dir"] == folder
    records = {r["image"]: r for r in run.records()}
    assert sorted(records) == [f"{folder}/{k}" for k in sorted(FILES)]
    assert all((r["width"], r["height"]) == SIZE for r in records.values())
    again = label(Detector(StaticBackend(label="red box")), Query.make(["red box"]),
                  folder + "/", run)  # resumes: the same images_dir, nothing left
    assert again["session"]["labelled"] == 0 and again["images"] == len(FILES)

    export_runs([run.path], "coco", tmp_path / "coco", min_score=None, copy=False,
                val_fraction=0.2, seed=0, overwrite=False)
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    by_id = {i["id"]: i for i in coco["images"]}
    assert sorted(i["file_name"] for i in by_id.values()) == sorted(FILES)
    for a in coco["annotations"]:  # the middle half of the displayed image
        x, y, w, h = a["bbox"]
        assert abs(x - SIZE[0] / 4) <= 2 and abs(y - SIZE[1] / 4) <= 2
        assert abs(w - SIZE[0] / 2) <= 2 and abs(h - SIZE[1] / 2) <= 2
    assert len(coco["annotations"]) == len(FILES)
    for entry in by_id.values():
        path = tmp_path / "coco" / "images" / entry["file_name"]
        assert path.is_file() and not path.is_symlink()  # a URI is copied, never linked
        with Image.open(path) as im:
            assert im.size == (entry["width"], entry["height"]) == SIZE
            assert im.getexif().get(0x0112, 1) == 1  # rot.JPG written upright

    export_runs([run.path], "yolo", tmp_path / "yolo", min_score=None, copy=False,
                val_fraction=0.0, seed=0, overwrite=False)
    labels = sorted((tmp_path / "yolo" / "labels").rglob("*.txt"))
    assert len(labels) == len(FILES)
    for path in labels:
        cls, cx, cy, w, h = path.read_text().split()
        assert cls == "0" and all(abs(float(v) - 0.5) < 0.05 for v in (cx, cy, w, h))
        image = next((tmp_path / "yolo" / "images").rglob(path.stem + ".*"))
        with Image.open(image) as im:
            assert im.size == SIZE

    export_runs([run.path], "labelstudio", tmp_path / "ls", min_score=None, copy=False,
                val_fraction=0.2, seed=0, overwrite=False)
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert sorted(t["data"]["image"] for t in tasks) == sorted(records)

    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps(coco_truth(list(scenes.items()))))
    result = CliRunner().invoke(app, ["eval", str(run.path), "--gt", str(truth), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images_matched"] == len(FILES)

    masked = add_masks(run, tmp_path / "masked", StaticSegmenter())
    assert masked["images"] == len(FILES) and masked["errors"] == 0
