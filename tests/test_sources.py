"""What a run labels (grounding.runs.sources) and where its images are read back from
(grounding.io.storage, formats.common.locate): folders, lists of each kind, URIs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from grounding.core.errors import ImageLoadError, StorageError
from grounding.formats.common import locate
from grounding.io import storage
from grounding.io.images import Named, describe, load_image
from grounding.pipeline.detector import Detector, Query
from grounding.runs import labeling
from grounding.runs.rundir import RunDir
from grounding.runs.sources import ImageSet, NoImagesError, image_base, open_images
from grounding.testing import StaticBackend


def write_image(path: Path, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "images"
    for name in ("b.jpg", "a.PNG", "sub/c.jpeg", "notes.txt"):
        if name.endswith(".txt"):
            (root / name).write_text("not an image")
        else:
            write_image(root / name)
    return root


# ----------------------------------------------------------------------------- is_uri, join


@pytest.mark.parametrize("text, expected", [
    ("s3://bucket/a.jpg", True), ("gs://b/x", True), ("gcs://b/x", True),
    ("hdfs://host:8020/x", True), ("https://host/x.jpg", True), ("file:///tmp/x", True),
    ("C:\\images\\a.jpg", False), ("C://images/a.jpg", False), ("a/b.jpg", False),
    ("/abs/a.jpg", False), ("", False), ("s3:/bucket", False),
])
def test_is_uri(text, expected):
    assert storage.is_uri(text) is expected


def test_a_path_object_is_never_a_uri():
    assert not storage.is_uri(Path("s3://x"))  # type: ignore[arg-type]


@pytest.mark.parametrize("base, key, expected", [
    ("s3://b/p", "a/x.jpg", "s3://b/p/a/x.jpg"),
    ("s3://b/p/", "a/x.jpg", "s3://b/p/a/x.jpg"),
    ("s3://b/p", "gs://other/y.jpg", "gs://other/y.jpg"),
    ("s3://b/p", "/abs/y.jpg", "/abs/y.jpg"),
    ("/data/images", "a/x.jpg", "/data/images/a/x.jpg"),
    ("/data/images", "s3://b/y.jpg", "s3://b/y.jpg"),
    ("/data/images", "/other/y.jpg", "/other/y.jpg"),
])
def test_join(base, key, expected):
    assert storage.join(base, key) == expected


def test_read_bytes_and_list_files_locally(folder):
    assert storage.read_bytes(folder / "b.jpg")[:2] == b"\xff\xd8"
    assert storage.read_bytes((folder / "b.jpg").as_uri())[:2] == b"\xff\xd8"
    with pytest.raises(StorageError, match="no such file") as info:
        storage.read_bytes(folder / "gone.jpg")
    assert info.value.missing
    listed = list(storage.list_files(str(folder)))
    assert [Path(p).relative_to(folder).as_posix() for p in listed] == [
        "a.PNG", "b.jpg", "notes.txt", "sub/c.jpeg"]
    with pytest.raises(StorageError, match="no such folder"):
        storage.list_files(str(folder / "nope"))


def test_an_unknown_scheme_is_one_line_naming_the_uri():
    with pytest.raises(ImageLoadError) as info:
        load_image("nosuchscheme://bucket/a.jpg")
    message = str(info.value)
    assert "nosuchscheme://bucket/a.jpg" in message and "\n" not in message


# ----------------------------------------------------------------------------- Named


def test_named_inputs_carry_their_name(tmp_path):
    image = Image.new("RGB", (8, 6))
    named = Named("s3://b/x.jpg", image)
    assert describe(named) == "s3://b/x.jpg"
    assert load_image(named).size == (8, 6)
    with pytest.raises(ImageLoadError, match=r"^cannot load image s3://b/y.jpg: not an image"):
        load_image(Named("s3://b/y.jpg", b"not an image"))


# ----------------------------------------------------------------------------- folders


def test_a_folder_is_its_images_relative_as_always(folder):
    images = open_images(folder)
    assert images.root == images.base == str(folder.resolve())
    assert list(images.keys()) == ["a.PNG", "b.jpg", "sub/c.jpeg"]
    assert images.location("sub/c.jpeg") == str(folder.resolve() / "sub" / "c.jpeg")
    assert image_base(images.root) == images.root


def test_the_run_directory_inside_the_folder_is_excluded(folder):
    run = folder / "run"
    write_image(run / "stray.jpg")
    assert "run/stray.jpg" in list(open_images(folder).keys())
    assert "run/stray.jpg" not in list(open_images(folder, [run]).keys())


def test_missing_empty_and_unknown_inputs_are_one_line(tmp_path):
    with pytest.raises(NoImagesError, match="no such folder or list file"):
        open_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoImagesError, match=r"^no images in .*empty: looked for .*\.jpg"):
        open_images(tmp_path / "empty")
    (tmp_path / "list.csv").write_text("a.jpg\n")
    with pytest.raises(NoImagesError, match=r"neither a folder nor a list .*\.txt"):
        open_images(tmp_path / "list.csv")


def test_no_images_error_is_still_importable_from_labeling():
    assert labeling.NoImagesError is NoImagesError


# ----------------------------------------------------------------------------- lists


def test_a_text_list_keeps_entries_as_written(folder, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    absolute = str(folder / "b.jpg")
    (lists / "images.txt").write_text(
        "# a comment\n\n../images/a.PNG\n  " + absolute + "  \n../images/a.PNG\n"
        "s3://bucket/x.jpg\n")
    images = open_images(lists / "images.txt")
    assert images.root == str((lists / "images.txt").resolve())
    assert images.base == str(lists.resolve())
    assert list(images.keys()) == ["../images/a.PNG", absolute, "s3://bucket/x.jpg"]
    assert Path(images.location("../images/a.PNG")).resolve() == (folder / "a.PNG").resolve()
    assert images.location(absolute) == absolute
    assert images.location("s3://bucket/x.jpg") == "s3://bucket/x.jpg"
    assert image_base(images.root) == images.base


def test_a_jsonl_list(tmp_path):
    (tmp_path / "l.jsonl").write_text(
        '{"image": "a.jpg", "label": 1}\n"b.jpg"\n\n{"path": "c.jpg"}\n{"image": "a.jpg"}\n')
    assert list(open_images(tmp_path / "l.jsonl").keys()) == ["a.jpg", "b.jpg", "c.jpg"]


@pytest.mark.parametrize("line, reason", [
    ("{not json", "not JSON"),
    ('{"file": "a.jpg"}', "expected a JSON string or an object"),
    ("3", "expected a JSON string or an object"),
    ('{"image": ""}', "expected a JSON string or an object"),
])
def test_a_malformed_jsonl_line_names_the_file_and_line(tmp_path, line, reason):
    path = tmp_path / "l.jsonl"
    path.write_text('"a.jpg"\n' + line + "\n")
    with pytest.raises(NoImagesError) as info:
        open_images(path)
    message = str(info.value)
    assert message.startswith(f"{path.resolve()}:2: ") and reason in message
    assert "\n" not in message


def test_a_parquet_list(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"path": ["x/a.jpg", "b.jpg", "x/a.jpg"], "n": [1, 2, 3]}),
                   tmp_path / "l.parquet")
    images = open_images(tmp_path / "l.parquet")
    assert list(images.keys()) == ["x/a.jpg", "b.jpg"]
    assert images.location("b.jpg") == str(tmp_path.resolve() / "b.jpg")
    pq.write_table(pa.table({"image": ["a.jpg"], "path": ["ignored.jpg"]}), tmp_path / "i.parquet")
    assert list(open_images(tmp_path / "i.parquet").keys()) == ["a.jpg"]


def test_a_malformed_parquet_list_is_one_line(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"file": ["a.jpg"]}), tmp_path / "cols.parquet")
    with pytest.raises(NoImagesError, match=r'no "image" or "path" column \(columns: file\)'):
        open_images(tmp_path / "cols.parquet")
    pq.write_table(pa.table({"image": ["a.jpg", None]}), tmp_path / "null.parquet")
    with pytest.raises(NoImagesError, match="row 2: image is None, not a path"):
        open_images(tmp_path / "null.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(NoImagesError, match="not a readable parquet file") as info:
        open_images(tmp_path / "bad.parquet")
    assert "\n" not in str(info.value)


def test_an_empty_list_is_no_images(tmp_path):
    (tmp_path / "l.txt").write_text("# nothing yet\n\n")
    with pytest.raises(NoImagesError, match=r"^no images in .*l\.txt: looked for one path"):
        open_images(tmp_path / "l.txt")


def test_an_image_set_is_picklable():
    import pickle

    images = ImageSet("s3://b/p", "s3://b/p", "bucket")
    assert pickle.loads(pickle.dumps(images)) == images


# ----------------------------------------------------------------------------- image_base


@pytest.mark.parametrize("images_dir, expected", [
    ("s3://bucket/prefix", "s3://bucket/prefix"),
    ("s3://bucket/prefix/", "s3://bucket/prefix"),
    ("s3://bucket/lists/all.txt", "s3://bucket/lists"),
    ("gs://bucket/all.parquet", "gs://bucket"),
    ("/data/images", "/data/images"),
    ("/data/lists/all.jsonl", "/data/lists"),
])
def test_image_base(images_dir, expected):
    assert image_base(images_dir) == expected


def test_image_base_of_a_folder_named_like_a_list(tmp_path):
    odd = tmp_path / "photos.txt"
    odd.mkdir()
    assert image_base(str(odd)) == str(odd)


# ----------------------------------------------------------------------------- export names


@pytest.mark.parametrize("image, root, name, source", [
    ("s3://bucket/a/b.jpg", "/data/images", "bucket/a/b.jpg", "s3://bucket/a/b.jpg"),
    ("s3://bucket/a/b.jpg", "s3://bucket/a", "b.jpg", "s3://bucket/a/b.jpg"),
    ("s3://bucket/a/b.jpg", "s3://bucket/a/", "b.jpg", "s3://bucket/a/b.jpg"),
    ("s3://bucket/../b.jpg", "s3://other", "b.jpg", "s3://bucket/../b.jpg"),
    ("x/b.jpg", "s3://bucket/lists", "x/b.jpg", "s3://bucket/lists/x/b.jpg"),
])
def test_export_names_of_uris(image, root, name, source):
    assert locate(image, root) == (name, source)


def test_export_names_of_local_paths(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    r = root.resolve()
    assert locate("a/b.jpg", root) == ("a/b.jpg", r / "a" / "b.jpg")
    assert locate(str(r / "a" / "b.jpg"), root) == ("a/b.jpg", r / "a" / "b.jpg")
    outside = (tmp_path / "elsewhere" / "x.jpg").resolve()
    assert locate(str(outside), root) == (outside.relative_to("/").as_posix(), outside)
    assert locate("../elsewhere/x.jpg", root) == (outside.relative_to("/").as_posix(),
                                                  outside)
    assert locate(".", root) is None


# ----------------------------------------------------------------------------- a list run


def test_a_local_run_over_a_list_labels_and_exports_it(folder, tmp_path):
    from grounding.cli.export import export_runs

    lists = tmp_path / "lists"
    lists.mkdir()
    absolute = str((folder / "b.jpg").resolve())
    (lists / "some.txt").write_text(f"../images/sub/c.jpeg\n{absolute}\n")
    run = RunDir(tmp_path / "run")
    summary = labeling.label(Detector(StaticBackend(label="cat")), Query.make(["cat"]),
                             lists / "some.txt", run)
    assert summary["images"] == 2 and summary["errors"] == 0
    assert run.config()["images_dir"] == str((lists / "some.txt").resolve())
    assert sorted(r["image"] for r in run.records()) == sorted(
        ["../images/sub/c.jpeg", absolute])
    export_runs([run.path], "coco", tmp_path / "coco", min_score=None, copy=True,
                val_fraction=0.2, seed=0, overwrite=False)
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    names = sorted(i["file_name"] for i in coco["images"])
    assert names == sorted(Path(p).relative_to("/").as_posix()
                           for p in (absolute, str((folder / "sub/c.jpeg").resolve())))
    assert len(coco["annotations"]) == 2
    for name in names:
        assert (tmp_path / "coco" / "images" / name).is_file()


def test_without_pyarrow_or_fsspec_a_uri_says_what_to_install(monkeypatch):
    for name in ("pyarrow", "pyarrow.fs", "fsspec"):
        monkeypatch.setitem(__import__("sys").modules, name, None)
    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://bucket/a.jpg")
    assert str(info.value) == ("s3://bucket/a.jpg: reading it needs pyarrow: "
                               "pip install 'grounding[ray]'")
    with pytest.raises(NoImagesError, match=r"^s3://bucket/p: reading it needs pyarrow"):
        open_images("s3://bucket/p")


def test_a_list_is_read_once_when_opened(tmp_path):
    """Opening reads the whole list (to fail early on a bad line); the run uses those
    keys rather than reading (or, on object storage, downloading) it again."""
    (tmp_path / "a.jpg").write_bytes(b"x")
    listing = tmp_path / "l.txt"
    listing.write_text("a.jpg\nb.jpg\na.jpg\n")
    images = open_images(listing)
    listing.unlink()
    assert list(images.keys()) == ["a.jpg", "b.jpg"]
    assert list(images.keys()) == ["a.jpg", "b.jpg"]
