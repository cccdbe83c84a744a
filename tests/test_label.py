"""`grounding label`: streaming, resumable, shardable runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grounding.io.records import read_jsonl, repair_jsonl
from grounding.pipeline.detector import Detector, Query
from grounding.runs.labeling import label
from grounding.runs.rundir import RunConfigError, RunDir, find_images, in_shard, parse_shard
from grounding.testing import StaticBackend


def make_images(root: Path, n: int, bad: int = 0) -> list[str]:
    """n small images in nested folders (mixed extensions and case) + `bad` broken files."""
    names = []
    for i in range(n):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        ext = [".jpg", ".PNG", ".jpeg", ".webp"][i % 4]
        path = sub / f"img{i:04d}{ext}"
        Image.fromarray(np.full((24 + i % 5, 32, 3), i % 255, np.uint8)).save(
            path, format={".jpg": "JPEG", ".png": "PNG", ".jpeg": "JPEG", ".webp": "WEBP"}[ext.lower()])
        names.append(path.relative_to(root).as_posix())
    for j in range(bad):
        path = root / f"broken{j}.jpg"
        path.write_bytes(b"\xff\xd8 not really a jpeg")
        names.append(path.relative_to(root).as_posix())
    (root / "notes.txt").write_text("not an image")
    return names


def run_label(images, out, **kw):
    det = Detector(StaticBackend(label="cat"), batch_size=4)
    return label(det, Query.make(["cat", "dog"]), images, RunDir(out), **kw)


def test_find_images_recursive_stable_case_insensitive(tmp_path):
    names = make_images(tmp_path, 8)
    found = list(find_images(tmp_path))
    assert found == sorted(found)  # sorted walk: part0/... before part1/...
    assert found == list(find_images(tmp_path))
    assert set(found) == set(names)
    assert "notes.txt" not in found


def test_label_writes_records_errors_config_and_summary(tmp_path):
    images = tmp_path / "images"
    names = make_images(images, 10, bad=2)
    summary = run_label(images, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    records = list(run.records())
    assert sorted(r["image"] for r in records) == sorted(n for n in names if "broken" not in n)
    assert all(r["width"] == 32 and r["detections"][0]["class_id"] == 0 for r in records)
    errors = list(read_jsonl(run.errors))
    assert sorted(e["image"] for e in errors) == ["broken0.jpg", "broken1.jpg"]
    assert all("not an image" in e["error"] for e in errors)
    config = json.loads(run.run_json.read_text())
    assert config["classes"] == ["cat", "dog"] and config["dialect"] == "qwen2.5-vl"
    assert config["prompt"] and config["grounding_version"]
    assert summary["images"] == 10 and summary["objects"] == 10 and summary["errors"] == 2
    assert summary["objects_per_class"] == {"cat": 10, "dog": 0}
    assert json.loads(run.summary_json.read_text())["images"] == 10


def test_rerun_labels_nothing_twice_and_retry_errors(tmp_path):
    images = tmp_path / "images"
    make_images(images, 6, bad=1)
    run_label(images, tmp_path / "run")
    second = run_label(images, tmp_path / "run")
    assert second["session"]["labelled"] == 0
    (images / "broken0.jpg").unlink()
    Image.new("RGB", (40, 30)).save(images / "broken0.jpg")
    third = run_label(images, tmp_path / "run", retry_errors=True)
    assert third["session"]["labelled"] == 1 and third["errors"] == 0
    records = [r["image"] for r in RunDir(tmp_path / "run").records()]
    assert len(records) == len(set(records)) == 7


def test_changed_config_is_refused_unless_force(tmp_path):
    images = tmp_path / "images"
    make_images(images, 3)
    run_label(images, tmp_path / "run")
    det = Detector(StaticBackend(label="cat"))
    with pytest.raises(RunConfigError, match="classes"):
        label(det, Query.make(["cat", "bird"]), images, RunDir(tmp_path / "run"))
    summary = label(det, Query.make(["cat", "bird"]), images, RunDir(tmp_path / "run"), force=True)
    assert summary["session"]["labelled"] == 3
    kept = list((tmp_path / "run").glob("predictions.*.jsonl"))
    assert len(kept) == 1 and len(list(read_jsonl(kept[0]))) == 3  # old labels kept, not lost


def test_reference_images_are_part_of_the_configuration(tmp_path):
    images = tmp_path / "images"
    make_images(images, 3)
    Image.fromarray(np.full((20, 30, 3), 10, np.uint8)).save(tmp_path / "a.png")
    det = Detector(StaticBackend(label="cat"))
    with_a = Query.make(["cat"], references=[tmp_path / "a.png"])
    label(det, with_a, images, RunDir(tmp_path / "run"))
    config = json.loads((tmp_path / "run" / "run.json").read_text())
    (entry,) = config["references"]
    assert entry.startswith(str(tmp_path / "a.png")) and "sha1:" in entry
    assert config["prompt"].startswith("The first image is an example")
    # The same file with other pixels is another configuration; so is no reference at all.
    Image.fromarray(np.full((20, 30, 3), 99, np.uint8)).save(tmp_path / "a.png")
    for query in (Query.make(["cat"], references=[tmp_path / "a.png"]), Query.make(["cat"])):
        with pytest.raises(RunConfigError, match="references"):
            label(det, query, images, RunDir(tmp_path / "run"))


def test_shards_partition_the_images(tmp_path):
    images = tmp_path / "images"
    names = make_images(images, 30)
    seen = []
    for i in range(3):
        run_label(images, tmp_path / f"run{i}", shard=(i, 3))
        seen += [r["image"] for r in RunDir(tmp_path / f"run{i}").records()]
    assert sorted(seen) == sorted(names)
    assert all(in_shard(n, 0, 1) for n in names)
    assert parse_shard("2/4") == (2, 4)
    with pytest.raises(ValueError):
        parse_shard("4/4")


def test_repair_cuts_a_half_written_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"image": "a"}\n{"image": "b"}\n{"image": "c", "det')
    assert repair_jsonl(path) > 0
    assert [r["image"] for r in read_jsonl(path)] == ["a", "b"]
    assert repair_jsonl(path) == 0


SCRIPT = textwrap.dedent("""
    import sys
    from grounding.pipeline.detector import Detector, Query
    from grounding.runs.labeling import label
    from grounding.runs.rundir import RunDir
    from grounding.testing import StaticBackend
    det = Detector(StaticBackend(label="cat", delay=float(sys.argv[3])), batch_size=2)
    label(det, Query.make(["cat"]), sys.argv[1], RunDir(sys.argv[2]))
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_without_loss_or_duplicates(tmp_path, sig):
    images = tmp_path / "images"
    names = make_images(images, 40)
    out = tmp_path / "run"
    script = tmp_path / "run_label.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIGINT as a terminal sends it: a shell's background job inherits it ignored, and
    # Python then installs no KeyboardInterrupt handler; give the child the default back.
    proc = subprocess.Popen([sys.executable, str(script), str(images), str(out), "0.15"], env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    predictions = out / "predictions.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if predictions.exists() and predictions.read_text().count("\n") >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    partial = [r["image"] for r in read_jsonl(predictions)]
    assert 6 <= len(partial) < 40, "the run must have been stopped midway"
    if sig == signal.SIGKILL:
        # Simulate the worst moment for a kill: half a line at the end.
        with predictions.open("a") as f:
            f.write('{"image": "part0/img9999.jpg", "detec')
    done = subprocess.run([sys.executable, str(script), str(images), str(out), "0"], env=env,
                          timeout=120)
    assert done.returncode == 0
    final = [r["image"] for r in read_jsonl(predictions)]
    assert len(final) == len(set(final)) == 40
    assert sorted(final) == sorted(names)
    assert final[: len(partial)] == partial  # what was labelled before the kill is kept


# -- what grounding wrote is never an input ----------------------------------------------


def _grounding_outputs(root: Path) -> None:
    """A run directory, a COCO and a YOLO export as grounding writes them, inside root."""
    run = root / "old_run"
    (run / "export" / "coco" / "images").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"grounding_version": "0.1.0"}))
    Image.new("RGB", (8, 8)).save(run / "export" / "coco" / "images" / "copy.jpg")
    coco = root / "datasets" / "coco"
    (coco / "images").mkdir(parents=True)
    (coco / "annotations.json").write_text('{"info": {"description": "exported by grounding"}}')
    Image.new("RGB", (8, 8)).save(coco / "images" / "copy.jpg")
    yolo = root / "datasets" / "yolo"
    (yolo / "images" / "train").mkdir(parents=True)
    (yolo / "data.yaml").write_text("# written by grounding\npath: x\n")
    Image.new("RGB", (8, 8)).save(yolo / "images" / "train" / "copy.png")


def test_find_images_skips_runs_exports_and_the_excluded_directory(tmp_path):
    names = make_images(tmp_path, 6)
    _grounding_outputs(tmp_path)
    current = tmp_path / "part1" / "current_run"
    current.mkdir()
    Image.new("RGB", (8, 8)).save(current / "not_an_input.jpg")
    # Folders that only look like grounding's are the user's: their images are inputs.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "run.json").write_text('{"something": "else"}')
    (mine / "data.yaml").write_text("path: x\n")
    Image.new("RGB", (8, 8)).save(mine / "keep.jpg")
    found = list(find_images(tmp_path, [current]))
    assert sorted(found) == sorted([*names, "mine/keep.jpg"])
    assert "part1/current_run/not_an_input.jpg" in find_images(tmp_path)  # not excluded
    # The images folder itself is what the user asked for, even when it is a run.
    assert list(find_images(tmp_path / "old_run" / "export" / "coco")) == ["images/copy.jpg"]


def test_a_run_inside_the_images_folder_never_labels_its_own_exports(tmp_path):
    from grounding.formats import export_coco, export_yolo

    images = tmp_path / "photos"
    make_images(images, 6)
    run = RunDir(images / "run")
    for _ in range(2):
        summary = run_label(images, run.path)
        config = run.config()
        for fmt, export in (("coco", export_coco), ("yolo", export_yolo)):
            export(run.records(), Path(config["images_dir"]), config["classes"],
                   run.path / "export" / fmt, min_score=None, copy=False, overwrite=True)
    assert summary["images"] == 6 and summary["session"]["labelled"] == 0
    assert sorted(r["image"] for r in run.records()) == sorted(find_images(images, [run.path]))


def test_an_empty_mistyped_or_missing_folder_is_an_error_and_creates_nothing(tmp_path):
    from grounding.runs.labeling import NoImagesError

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no image")
    with pytest.raises(NoImagesError, match=r"no images in .*empty: looked for .*\.jpg"):
        run_label(tmp_path / "empty", tmp_path / "run")
    with pytest.raises(NoImagesError, match="no such folder"):
        run_label(tmp_path / "nope", tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- errors.jsonl: the images failing now -------------------------------------------------


def test_errors_jsonl_lists_each_image_failing_now_once(tmp_path):
    images = tmp_path / "images"
    make_images(images, 4, bad=2)
    out = tmp_path / "run"
    run = RunDir(out)
    run_label(images, out)
    run_label(images, out, retry_errors=True)  # both fail again
    Image.new("RGB", (40, 30)).save(images / "broken0.jpg")  # fixed
    summary = run_label(images, out, retry_errors=True)
    errors = list(read_jsonl(run.errors))
    assert [e["image"] for e in errors] == ["broken1.jpg"]
    assert errors[0]["attempts"] == 3 and "not an image" in errors[0]["error"]
    assert summary["errors"] == len(errors) == 1
    assert json.loads(run.summary_json.read_text())["errors"] == 1
    history = [e["image"] for e in read_jsonl(run.errors_history)]
    assert sorted(history) == ["broken0.jpg"] * 2 + ["broken1.jpg"] * 3
    # Without --retry-errors the failing image is left alone, and still listed.
    again = run_label(images, out)
    assert again["session"]["labelled"] == 0 and again["errors"] == 1
    assert [e["image"] for e in read_jsonl(run.errors)] == ["broken1.jpg"]


def test_a_run_from_before_errors_history_keeps_its_errors(tmp_path):
    images = tmp_path / "images"
    make_images(images, 3, bad=1)
    out = tmp_path / "run"
    run_label(images, out)
    run = RunDir(out)
    # The old layout: errors.jsonl appended to on every failure, no history file.
    old = [{"image": "broken0.jpg", "error": "cannot load image: not an image", "time": t}
           for t in ("2024-01-01T00:00:00", "2024-01-02T00:00:00")]
    run.errors.write_text("".join(json.dumps(e) + "\n" for e in old))
    run.errors_history.unlink()
    summary = run_label(images, out)
    assert summary["errors"] == 1
    (entry,) = read_jsonl(run.errors)
    assert entry["image"] == "broken0.jpg" and entry["attempts"] == 2
    assert list(read_jsonl(run.errors_history)) == old


# -- a server that cannot be reached ---------------------------------------------------------


def _cannot_connect(flag: bool | None = True) -> Exception:
    """What the remote backend returns when nothing listens (flag: RemoteError.connection;
    None: an error without that attribute, read from its message)."""
    from grounding.backends.remote import RemoteError

    error = RemoteError("POST /chat/completions: cannot connect to http://127.0.0.1:9: "
                        "connection refused (gave up after 3 attempts)")
    if flag is None:
        if hasattr(error, "connection"):
            del error.connection
    else:
        error.connection = flag
    return error


class DownBackend(StaticBackend):
    """A server backend whose requests fail to connect: all of them, or those after the
    first ``answer_first``; counts the requests it was given."""

    base_url = "http://127.0.0.1:9/v1"

    def __init__(self, *, answer_first: int = 0, error=_cannot_connect, **kw) -> None:
        super().__init__(label="cat", **kw)
        self.answer_first = answer_first
        self.error = error
        self.requests = 0

    def generate(self, requests: list) -> list:
        out = []
        for answer in super().generate(requests):
            self.requests += 1
            out.append(answer if self.requests <= self.answer_first else self.error())
        return out


@pytest.mark.parametrize("flag", [True, None], ids=["connection-flag", "message"])
def test_a_server_that_cannot_be_reached_stops_the_run_early(tmp_path, flag):
    from grounding.runs.reach import FIRST_REQUESTS, ServerUnreachable

    images = tmp_path / "images"
    make_images(images, 30, bad=1)
    backend = DownBackend(error=lambda: _cannot_connect(flag))
    det = Detector(backend, batch_size=1)
    seen = []
    stop = (r"^cannot reach http://127\.0\.0\.1:9/v1: connection refused \(the first \d+ "
            r"requests could not connect; nothing was recorded\)$")
    with pytest.raises(ServerUnreachable, match=stop):
        label(det, Query.make(["cat"]), images, RunDir(tmp_path / "run"),
              on_progress=seen.append)
    assert backend.requests < 30 and backend.requests <= FIRST_REQUESTS + 8  # window ahead
    run = RunDir(tmp_path / "run")
    assert list(read_jsonl(run.errors)) == [] and list(run.records()) == []
    assert all(p.done == 0 for p in seen)  # nothing was recorded, not even the broken file
    # When the server is up, the same command labels everything.
    up = Detector(DownBackend(answer_first=10**6), batch_size=1)
    summary = label(up, Query.make(["cat"]), images, RunDir(tmp_path / "run"))
    assert summary["images"] == 30 and summary["errors"] == 1


def test_a_small_run_whose_every_request_cannot_connect_is_stopped_too(tmp_path):
    from grounding.runs.reach import ServerUnreachable

    images = tmp_path / "images"
    make_images(images, 2)
    with pytest.raises(ServerUnreachable, match="the first 2 requests could not connect"):
        label(Detector(DownBackend()), Query.make(["cat"]), images, RunDir(tmp_path / "run"))


def test_connection_failures_after_the_server_answered_are_recorded(tmp_path):
    images = tmp_path / "images"
    make_images(images, 12)
    backend = DownBackend(answer_first=2)
    summary = label(Detector(backend, batch_size=1), Query.make(["cat"]), images,
                    RunDir(tmp_path / "run"))
    assert summary["images"] == 2 and summary["errors"] == 10
    errors = list(read_jsonl(RunDir(tmp_path / "run").errors))
    assert len(errors) == 10 and all("connection refused" in e["error"] for e in errors)


def test_failures_from_a_server_that_answered_are_recorded_not_a_stop(tmp_path):
    from grounding.backends.remote import RemoteError

    images = tmp_path / "images"
    make_images(images, 6)
    backend = DownBackend(error=lambda: RemoteError("POST failed with HTTP 404: not found",
                                                    404))
    summary = label(Detector(backend, batch_size=1), Query.make(["cat"]), images,
                    RunDir(tmp_path / "run"))
    assert summary["errors"] == 6 and backend.requests == 6


def test_what_counts_as_a_failure_to_connect():
    from grounding.backends.remote import RemoteError
    from grounding.runs.reach import connection_failure, reason

    assert connection_failure(_cannot_connect(True))
    assert connection_failure(_cannot_connect(None))  # read from the message
    assert not connection_failure(_cannot_connect(False))  # the flag is believed
    answered = RemoteError("cannot connect to http://x: connection refused", 502)
    assert not connection_failure(answered)  # the server answered with a status
    timeout = RemoteError("POST /chat/completions: no answer from http://x:80 after 120 s "
                          "(timed out)")
    if hasattr(timeout, "connection"):
        del timeout.connection
    assert not connection_failure(timeout)
    assert not connection_failure(RuntimeError("cannot connect"))
    assert reason(_cannot_connect()) == "connection refused"
    assert reason(RemoteError("cannot connect to http://h:1: host not found (x)")) == (
        "host not found (x)")


def test_images_whose_storage_cannot_be_reached_stop_the_run(tmp_path):
    """The first images all failing to reach their storage (a dead endpoint) stop the run
    with one line and record nothing, as an unreachable server does; once an image was
    read, such failures are errors like any other."""
    from grounding.runs.reach import StorageUnreachable, StorageWatch

    down = "s3://b/{}.jpg: AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7"
    watch = StorageWatch()
    assert watch.see({"image": "a", "error": down.format("a")}) == []
    assert watch.see({"image": "b", "error": down.format("b")}) == []
    with pytest.raises(StorageUnreachable, match=r"cannot read the images: s3://b/a\.jpg.*"
                                                 r"the first 3 images"):
        watch.see({"image": "c", "error": down.format("c")})
    watch = StorageWatch()
    assert watch.see({"image": "a", "error": down.format("a")}) == []
    ok = {"image": "b", "error": None}
    assert [r["image"] for r in watch.see(ok)] == ["a", "b"]  # storage answered: released
    assert watch.see({"image": "c", "error": down.format("c")})[0]["image"] == "c"
    watch = StorageWatch()
    watch.see({"image": "a", "error": "cannot load image a.jpg: not an image file"})
    watch.finish()  # another failure: the storage answered
    lonely = StorageWatch()
    lonely.see({"image": "a", "error": down.format("a")})
    with pytest.raises(StorageUnreachable, match="the only image"):
        lonely.finish()


def test_a_run_refused_before_its_first_image_binds_nothing(tmp_path):
    from grounding.runs.rundir import RunConfigError, RunDir

    run = RunDir(tmp_path / "run")
    run.start({"classes": ["a"]})
    run.start({"classes": ["b"]})  # nothing recorded yet: not refused
    assert run.config()["classes"] == ["b"]
    run.predictions.write_text('{"image": "x.jpg"}\n')
    with pytest.raises(RunConfigError, match="classes"):
        run.start({"classes": ["c"]})
