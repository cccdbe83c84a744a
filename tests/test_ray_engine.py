"""--engine ray: the same run as a plain `label`, spread over a real local Ray cluster.

Drivers run as subprocesses (as a user runs them), joined to the session's cluster
(tests/ray_cluster.py); workers are real Ray actors in their own processes. The proof:
the records equal a plain run's (static backend, loopback server, tiny checkpoint); a
worker killed mid-run and a driver killed mid-run lose and duplicate nothing; images are
read from an S3 server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from grounding.io.records import read_jsonl
from grounding.testing.loopback import LoopbackServer, grounding_handler
from tests.test_cli_label import red_box_images

pytest.importorskip("ray.data")

EXE = [sys.executable, "-m", "grounding"]
MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"


def run_cli(args: list[str], env: dict[str, str], timeout: float = 300):
    return subprocess.run([*EXE, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def records(run: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in read_jsonl(run / "predictions.jsonl"):
        assert r["image"] not in out, f"{r['image']} written twice"
        out[r["image"]] = r
    return out


def served(server: LoopbackServer, images: Path, run: Path, *extra: str) -> list[str]:
    return ["label", str(images), "--classes", "red box", "--out", str(run), "--backend",
            "openai", "--base-url", server.base_url, "--model", MODEL, *extra]


def on_ray(cluster, *extra: str) -> list[str]:
    return ["--engine", "ray", "--ray-address", cluster.address, *extra]


def test_ray_run_equals_plain_run_on_a_server(tmp_path, ray_cluster):
    images = tmp_path / "images"
    truth = red_box_images(images, 16)
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl", label="red box")) as server:
        plain = run_cli(served(server, images, tmp_path / "plain"), ray_cluster.env)
        assert plain.returncode == 0, plain.stderr
        ray = run_cli(served(server, images, tmp_path / "ray", "--concurrency", "4",
                             *on_ray(ray_cluster, "--workers", "2")), ray_cluster.env)
        assert ray.returncode == 0, ray.stderr
    a, b = records(tmp_path / "plain"), records(tmp_path / "ray")
    assert set(a) == set(b) == set(truth)
    assert a == b  # same boxes, same raw text, same everything
    for key, box in truth.items():
        assert b[key]["detections"][0]["bbox"] == pytest.approx(box, abs=1.0)
    summary = json.loads(ray.stdout)
    assert summary["images"] == 16 and summary["session"]["labelled"] == 16
    # The engine is not configuration: the Ray run resumes (nothing left) without Ray.
    config = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert "engine" not in config and "workers" not in config


def test_ray_run_equals_plain_run_with_tiles_verify_min_score_and_masks(tmp_path,
                                                                        ray_cluster):
    """Every option of the plain label travels to the workers (the query, the detector's
    settings, the mask model each worker loads): tiles, verification, a score floor and
    SAM 2 masks (the tiny checkpoint) give the same records."""
    from grounding.testing.tiny import tiny_sam2

    images = tmp_path / "images"
    red_box_images(images, 6)
    extra = ["--tiles", "2x2", "--verify", "--min-score", "0.1", "--masks", "--mask-model",
             str(tiny_sam2())]
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl", label="red box")) as server:
        plain = run_cli(served(server, images, tmp_path / "plain", *extra), ray_cluster.env)
        ray = run_cli(served(server, images, tmp_path / "ray", *extra,
                             *on_ray(ray_cluster, "--workers", "2")), ray_cluster.env)
    assert plain.returncode == 0 and ray.returncode == 0, (plain.stderr, ray.stderr)
    a, b = records(tmp_path / "plain"), records(tmp_path / "ray")
    assert len(b) == 6 and a == b
    assert all(len(r["requests"]) == 4 for r in b.values())  # four tiles asked
    assert all("verify_score" in d["attributes"] and d["mask"]
               for r in b.values() for d in r["detections"])


STATIC_DRIVER = textwrap.dedent("""
    import functools, json, sys
    from grounding.pipeline.detector import Detector, Query
    from grounding.runs.labeling import label
    from grounding.runs.ray_engine import RayEngine
    from grounding.runs.rundir import RunDir
    from grounding.testing.static import StaticBackend

    images, out, address = sys.argv[1:4]
    build = functools.partial(Detector, StaticBackend("qwen2.5-vl", label="thing"),
                              batch_size=3)
    engine = None if address == "-" else RayEngine(build, address=address, workers=2)
    summary = label(build(), Query.make(["thing"]), images, RunDir(out), engine=engine)
    print(json.dumps(summary))
""")


def test_ray_run_equals_plain_run_with_the_static_backend(tmp_path, ray_cluster):
    images = tmp_path / "images"
    red_box_images(images, 10)
    (images / "set0" / "broken.png").write_bytes(b"not a png")
    env = ray_cluster.env
    for name, address in (("plain", "-"), ("ray", ray_cluster.address)):
        done = subprocess.run([sys.executable, "-c", STATIC_DRIVER, str(images),
                               str(tmp_path / name), address], capture_output=True,
                              text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
    assert records(tmp_path / "plain") == records(tmp_path / "ray")
    assert len(records(tmp_path / "ray")) == 10
    errors = [list(read_jsonl(tmp_path / n / "errors.jsonl")) for n in ("plain", "ray")]
    assert [e["image"] for e in errors[1]] == ["set0/broken.png"]
    assert [e["error"] for e in errors[0]] == [e["error"] for e in errors[1]]
    assert str(images / "set0" / "broken.png") in errors[1][0]["error"]


def test_ray_run_equals_plain_run_on_the_tiny_checkpoint(tmp_path, ray_cluster):
    from grounding.testing import tiny_checkpoint

    model = str(tiny_checkpoint("qwen2.5-vl"))
    images = tmp_path / "images"
    red_box_images(images, 6, size=(224, 168))
    args = ["--classes", "red box", "--model", model, "--max-new-tokens", "8",
            "--batch-size", "2"]
    plain = run_cli(["label", str(images), "--out", str(tmp_path / "plain"), *args],
                    ray_cluster.env)
    assert plain.returncode == 0, plain.stderr
    ray = run_cli(["label", str(images), "--out", str(tmp_path / "ray"), *args,
                   *on_ray(ray_cluster, "--workers", "2", "--gpus-per-worker", "0")],
                  ray_cluster.env)
    assert ray.returncode == 0, ray.stderr
    a, b = records(tmp_path / "plain"), records(tmp_path / "ray")
    assert len(b) == 6 and a == b
    assert all(r["raw"] and r["input_size"] for r in b.values())


def _actors() -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if "MapWorker" in cmdline and "Labeller" in cmdline:
            found.append(proc)
    return found


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the driver ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {n} lines")


def test_a_killed_worker_loses_and_duplicates_nothing(tmp_path, ray_cluster):
    images = tmp_path / "images"
    truth = red_box_images(images, 30)
    run = tmp_path / "run"
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl", label="red box"),
                        latency=0.15) as server:
        proc = subprocess.Popen(
            [*EXE, *served(server, images, run, "--concurrency", "2",
                           *on_ray(ray_cluster, "--workers", "2"))],
            env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for_lines(run / "predictions.jsonl", 3, proc)
            actors = _actors()
            assert len(actors) == 2, actors
            actors[0].send_signal(signal.SIGKILL)  # a real signal, mid-batch
            out, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    lines = [r["image"] for r in read_jsonl(run / "predictions.jsonl")]
    assert Counter(lines) == Counter(list(truth))  # every image once
    assert json.loads(out)["errors"] == 0


def test_a_killed_driver_resumes_with_every_image_once(tmp_path, ray_cluster):
    images = tmp_path / "images"
    truth = red_box_images(images, 24)
    run = tmp_path / "run"
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl", label="red box"),
                        latency=0.1) as server:
        args = served(server, images, run, "--concurrency", "2",
                      *on_ray(ray_cluster, "--workers", "2"))
        proc = subprocess.Popen([*EXE, *args], env=ray_cluster.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for_lines(run / "predictions.jsonl", 4, proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
        partial = [r["image"] for r in read_jsonl(run / "predictions.jsonl")]
        assert 4 <= len(partial) < 24
        again = run_cli(args, ray_cluster.env)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["session"]["labelled"] == 24 - len(partial)
    assert Counter(r["image"] for r in read_jsonl(run / "predictions.jsonl")) == Counter(list(truth))


def test_a_plain_run_finishes_on_ray_and_the_other_way_round(tmp_path, ray_cluster):
    images = tmp_path / "images"
    truth = red_box_images(images, 8)
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl", label="red box")) as server:
        plain = run_cli(served(server, images, tmp_path / "run", "--shard", "0/2"),
                        ray_cluster.env)
        assert plain.returncode == 0, plain.stderr
        # Another shard setting is another configuration: refused, like a plain resume.
        other = run_cli(served(server, images, tmp_path / "run", *on_ray(ray_cluster)),
                        ray_cluster.env)
        assert other.returncode == 2 and "shard" in other.stderr
        first = set(records(tmp_path / "run"))
        # A Ray run, killed before it ends is simulated by a plain run of half of it.
        half = run_cli(served(server, images, tmp_path / "both", "--shard", "0/1"),
                       ray_cluster.env)
        assert half.returncode == 0
        (tmp_path / "both" / "predictions.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in list(records(tmp_path / "both").values())[:3]))
        more = run_cli(served(server, images, tmp_path / "both", "--shard", "0/1",
                              *on_ray(ray_cluster)), ray_cluster.env)
        assert more.returncode == 0, more.stderr
        assert json.loads(more.stdout)["session"]["labelled"] == 5
    assert 0 < len(first) < 8
    assert set(records(tmp_path / "both")) == set(truth)


def test_images_on_s3_end_to_end(tmp_path, ray_cluster, s3_server):
    import boto3

    images = tmp_path / "images"
    truth = red_box_images(images, 6)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id="x",
                          aws_secret_access_key="y", region_name="us-east-1")
    try:
        for rel in truth:
            client.upload_file(str(images / rel), s3_server.bucket, f"ray-e2e/{rel}")
    finally:
        client.close()
    uri = f"s3://{s3_server.bucket}/ray-e2e"
    run = tmp_path / "run"
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl", label="red box")) as server:
        args = ["label", uri, "--classes", "red box", "--out", str(run), "--backend",
                "openai", "--base-url", server.base_url, "--model", MODEL,
                *on_ray(ray_cluster, "--workers", "2")]
        done = run_cli(args, ray_cluster.env)
        assert done.returncode == 0, done.stderr
    got = records(run)
    assert set(got) == {f"{uri}/{rel}" for rel in truth}
    for rel, box in truth.items():
        assert got[f"{uri}/{rel}"]["detections"][0]["bbox"] == pytest.approx(box, abs=1.0)
    assert json.loads((run / "run.json").read_text())["images_dir"] == uri


def test_engine_misuse_is_one_line(tmp_path, ray_cluster):
    images = tmp_path / "images"
    red_box_images(images, 2)
    env = ray_cluster.env
    base = ["label", str(images), "--classes", "x", "--out", str(tmp_path / "run"),
            "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", MODEL]
    for extra, words in (
        (["--workers", "2"], "--workers needs --engine ray"),
        (["--ray-address", "auto"], "--ray-address needs --engine ray"),
        (["--engine", "spark"], "expected local or ray"),
        (on_ray(ray_cluster, "--workers", "40"), "the Ray cluster has 4"),
        (["--engine", "ray", "--ray-address", "127.0.0.1:9"], "cannot reach the Ray cluster"),
        (["--engine", "ray", "--ray-address", "nowhere"], "expected HOST:PORT"),
    ):
        done = run_cli(base + extra, env)
        assert done.returncode == 2, (extra, done.stderr)
        assert words in done.stderr, (extra, done.stderr)
        assert "Traceback" not in done.stderr
    assert not list(read_jsonl(tmp_path / "run" / "predictions.jsonl"))  # nothing recorded


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch):
    from grounding.runs import ray_engine

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ray_engine.RayUnavailable, match=r"pip install 'grounding\[ray\]'"):
        ray_engine.require_ray()


def test_an_unreachable_server_stops_a_ray_run_recording_nothing(tmp_path, ray_cluster):
    images = tmp_path / "images"
    red_box_images(images, 6)
    run = tmp_path / "run"
    done = run_cli(["label", str(images), "--classes", "x", "--out", str(run), "--backend",
                    "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", MODEL,
                    "--max-retries", "0", *on_ray(ray_cluster, "--workers", "1")],
                   ray_cluster.env)
    assert done.returncode == 2, done.stderr
    assert "cannot reach" in done.stderr and "Traceback" not in done.stderr
    assert not list(read_jsonl(run / "predictions.jsonl"))
    assert not list(read_jsonl(run / "errors.jsonl"))
    assert os.path.exists(run / "run.json")


def test_a_refused_run_binds_no_configuration(tmp_path, ray_cluster):
    """A run stopped before its first image (too many workers) is not a run yet: the
    next command may ask for other classes without --force."""
    images = tmp_path / "images"
    red_box_images(images, 2)
    base = ["label", str(images), "--out", str(tmp_path / "run"), "--backend", "openai",
            "--base-url", "http://127.0.0.1:9/v1", "--model", MODEL]
    refused = run_cli([*base, "--classes", "x", *on_ray(ray_cluster, "--workers", "40")],
                      ray_cluster.env)
    assert refused.returncode == 2
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl", label="red box")) as server:
        base[base.index("http://127.0.0.1:9/v1")] = server.base_url
        done = run_cli([*base, "--classes", "red box"], ray_cluster.env)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text())["classes"] == ["red box"]
