"""Ensembles: fuse the records of several runs over the same images into a new run.

Runs over one images folder made with other prompts, pixel budgets, models or tilings
find different boxes; ``merge_runs`` joins them, image by image, into a run directory
that ``grounding export`` and ``grounding eval`` read like any label run (run.json,
predictions.jsonl, errors.jsonl, summary.json). Three methods, all per class (the
``class_id`` when a box matched a class, else its label: a box of another class in the
same place is another object):

``wbf``
    Weighted box fusion (ensemble-boxes' ``weighted_boxes_fusion``, the optional extra
    ``grounding[ensemble]``): boxes of the runs that overlap are averaged, weighted by
    score, into one. Its score is ensemble-boxes' ``avg`` confidence, which divides by
    the number of runs: the members' mean score times the share of the runs that found
    the box (a box every run found with score 0.9 keeps 0.9; found by one run of three,
    0.3). ensemble-boxes does not say which boxes formed a fused box, so its ``votes``
    and ``sources`` are read back: each input box counts for the fused box of its class
    it overlaps most.
``nms``
    Non-maximum suppression (supervision's ``box_non_max_suppression``): of boxes that
    overlap, the best-ranked one is kept as it is; ``votes``/``sources`` count the
    boxes it suppressed.
``vote``
    Boxes that overlap are grouped (supervision's ``box_non_max_merge``, around the
    best-ranked box); a group that boxes of at least ``min_votes`` different runs fall
    in is kept as their score-weighted mean box (what weighted box fusion makes of a
    group), its score their mean score; a run that wrote two boxes in one group votes
    once. Default ``min_votes``: a majority of the runs (2 of 2 or 3, 3 of 4 or 5).

Overlap means IoU above ``iou`` (default :data:`DEFAULT_MERGE_IOU`). Scores: most VLM
boxes carry none. A box without a score weighs as 1.0 in a fusion (the convention
``export --min-score`` and ``eval`` share); a fused box whose members were all unscored
stays unscored (None), its agreement is in ``votes``. Ranking (which box nms keeps, which
box's attributes a fused box carries): the best score first, unscored boxes after scored
ones (as grounding's duplicate removal ranks them), and among equals the earlier run's
box, then the one its answer wrote first.

Each output box keeps the attributes of its best-ranked member plus ``votes`` (how many
runs found it) and ``sources`` (which runs, as indices into run.json ``runs``). Points
are not fused: every run's points are kept, identical ones (same class, same
coordinates) collapsed into one with its ``votes``/``sources``. Each record says what
the merge left out in ``dropped``: ``suppressed`` (nms), ``fused`` (boxes merged into
another), ``few_votes`` (vote: in a group fewer than ``min_votes`` runs found),
``duplicate`` (identical points), ``no_area`` (empty boxes, which no method can
compare). A merged record is ``truncated`` when any run's answer for the image was (the
objects that answer lost are missing from the merge too); its ``model`` is
``merge(METHOD)``, ``raw`` is empty and the runs' ``requests`` and ``answers`` are not
carried over.

Only images done in every input run are merged: an image missing from a run (not
labelled there, or failing: its error is quoted) or whose size differs between runs
goes to the merged run's errors.jsonl naming the runs, so nothing disappears silently.
The runs must label the same images folder (run.json ``images_dir``, the same path) with
the same class list (same names, same order: ``class_id`` indexes it).

A merge is a pure function of its inputs and rewrites its output whole (each file via a
temporary file and a rename): running the same merge again, e.g. after the input runs
labelled more images, redoes it without duplicating anything. Another method, IoU, vote
count or set of runs into an existing merge run is refused unless ``force``, which
keeps the old files beside the new ones under a timestamped name, as ``label --force``
does. A directory that holds any other run is never written.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from grounding._version import __version__
from grounding.core.dedup import group_key, ranking
from grounding.core.errors import GroundingError
from grounding.core.result import Box, InvalidResult, Point, Result
from grounding.runs.labeling import summarize
from grounding.runs.rundir import RunDir

METHODS = ("wbf", "nms", "vote")
DEFAULT_MERGE_IOU = 0.55
"""Boxes of one class from two runs overlapping by more than this are one object. 0.55 is
ensemble-boxes' default and the threshold of the weighted-box-fusion paper (Solovyev et
al., 2021); it sits below duplicate removal's 0.7 because boxes that different prompts,
budgets or models draw around one object differ more than one answer's duplicates do,
and above the usual 0.5 so that two neighbours are less often taken for one."""

INSTALL_ENSEMBLE = ('pip install "grounding[ensemble]" (from a source checkout: '
                    "pip install -e '.[ensemble]')")
MERGE_KEYS = ("images_dir", "classes", "method", "iou", "min_votes")
"""What a merge run's run.json must agree on (with the input paths) to be redone."""
_FILES = ("predictions", "errors", "run_json", "summary_json")


class MergeError(GroundingError):
    """A merge that cannot be made; the message names the run and the cause."""


def merge_runs(runs: Sequence[RunDir | str | Path], out: RunDir | str | Path, *,
               method: str = "wbf", iou: float = DEFAULT_MERGE_IOU,
               min_votes: int | None = None, force: bool = False) -> dict[str, Any]:
    """Fuse the records of ``runs`` (two or more runs over the same images) into the run
    directory ``out`` with ``method`` (``wbf``, ``nms`` or ``vote``; see the module);
    return the summary, also written to ``out``/summary.json.

    ``iou``: boxes overlapping by more than this are one object. ``min_votes`` (vote
    only): how many runs must have found a box; default a majority. ``force``: replace
    a merge of ``out`` made with other settings or runs (its files are kept, renamed).
    Raises :class:`MergeError` (a GroundingError) with one line naming the run and the
    cause when the merge cannot be made; nothing is written then."""
    inputs = [r if isinstance(r, RunDir) else RunDir(r) for r in runs]
    out = out if isinstance(out, RunDir) else RunDir(out)
    if len(inputs) < 2:
        raise MergeError(f"merge needs at least 2 runs, got {len(inputs)}")
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    if isinstance(iou, bool) or not isinstance(iou, int | float) or not 0 < iou <= 1:
        raise MergeError(f"iou must be a number in (0, 1], got {iou!r}")
    n = len(inputs)
    if method == "vote":
        min_votes = n // 2 + 1 if min_votes is None else min_votes
        if isinstance(min_votes, bool) or not isinstance(min_votes, int) \
                or not 1 <= min_votes <= n:
            raise MergeError(f"min_votes must be a whole number from 1 to {n} (the number "
                             f"of runs), got {min_votes!r}")
    elif min_votes is not None:
        raise MergeError(f"min_votes is for method vote, not {method}")
    fuse = _wbf_function() if method == "wbf" else None
    configs = _check_inputs(inputs)
    config = {
        "images_dir": configs[0]["images_dir"],
        "backend": "merge",
        "model": f"merge({method})",
        "method": method,
        "iou": float(iou),
        "min_votes": min_votes,
        "classes": configs[0].get("classes") or None,
        "runs": [{"path": str(_resolved(r.path)), "config": c}
                 for r, c in zip(inputs, configs, strict=True)],
        "grounding_version": __version__,
    }
    _check_out(out, inputs, config, force)

    merger = _Merger(method, float(iou), min_votes, n, config["classes"], fuse)
    out.path.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    indexes = [_index(r.predictions) for r in inputs]
    merged = 0
    tmp_predictions = out.predictions.with_suffix(".jsonl.tmp")
    tmp_errors = out.errors.with_suffix(".jsonl.tmp")
    files = [r.predictions.open("rb") for r in inputs]
    try:
        with tmp_predictions.open("w", encoding="utf-8") as predictions, \
                tmp_errors.open("w", encoding="utf-8") as errors:
            failures: list[dict[str, dict[str, Any]] | None] = [
                r.failures(set(index)) for r, index in zip(inputs, indexes, strict=True)]
            # An image every run failed on is in no predictions file: it is not merged
            # either, and must be said so, not dropped.
            images = dict.fromkeys(_all_images(indexes))
            images.update(dict.fromkeys(i for f in failures for i in f or {}))
            for image in images:
                missing = [j for j in range(n) if image not in indexes[j]]
                if missing:
                    errors.write(json.dumps(_missing_entry(image, missing, inputs, failures,
                                                           stamp), ensure_ascii=False) + "\n")
                    continue
                records = [_read(files[j], indexes[j][image]) for j in range(n)]
                sizes = [(r.get("width"), r.get("height")) for r in records]
                if len(set(sizes)) != 1 or None in sizes[0]:
                    errors.write(json.dumps(_size_entry(image, sizes, inputs, stamp),
                                            ensure_ascii=False) + "\n")
                    continue
                try:
                    results = [Result.from_record(r) for r in records]
                except InvalidResult as exc:
                    j = next(j for j, r in enumerate(records) if _invalid(r))
                    raise MergeError(f"{inputs[j].predictions}: {exc}") from None
                predictions.write(json.dumps(merger.merge(results).to_record(),
                                             ensure_ascii=False, allow_nan=False) + "\n")
                merged += 1
    except BaseException:
        for tmp in (tmp_predictions, tmp_errors):
            tmp.unlink(missing_ok=True)
        raise
    finally:
        for f in files:
            f.close()
    _write_json(out.run_json, config)
    os.replace(tmp_predictions, out.predictions)
    os.replace(tmp_errors, out.errors)
    summary = summarize(out)
    summary["merge"] = {"method": method, "iou": float(iou), "min_votes": min_votes,
                        "runs": n, "images_merged": merged,
                        "images_not_merged": summary["errors"],
                        "boxes_in": merger.boxes_in, "boxes_out": merger.boxes_out}
    _write_json(out.summary_json, summary)
    return summary


def _wbf_function():
    try:
        from ensemble_boxes import weighted_boxes_fusion
    except ImportError:
        raise MergeError("method wbf needs ensemble-boxes: " + INSTALL_ENSEMBLE
                         + " (nms and vote work without it)") from None
    return weighted_boxes_fusion


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _check_inputs(inputs: list[RunDir]) -> list[dict[str, Any]]:
    configs = []
    seen: dict[Path, Path] = {}
    for run in inputs:
        where = _resolved(run.path)
        if where in seen:
            raise MergeError(f"{run.path} is given twice (as {seen[where]} too); each run "
                             "votes once")
        seen[where] = run.path
        if not run.run_json.is_file():
            raise MergeError(f"{run.path} is not a grounding run (no run.json)")
        config = run.config()
        if not isinstance(config, dict) or "grounding_version" not in config:
            raise MergeError(f"{run.path} is not a grounding run (its run.json was not "
                             "written by grounding)")
        if not config.get("images_dir"):
            raise MergeError(f"{run.run_json} has no images_dir")
        configs.append(config)
    first, base = inputs[0], configs[0]
    folder = _resolved(Path(base["images_dir"]))
    for run, config in zip(inputs[1:], configs[1:], strict=True):
        if _resolved(Path(config["images_dir"])) != folder:
            raise MergeError(f"{run.path} labels another images folder ({config['images_dir']}"
                             f", {first.path} labels {base['images_dir']}); merge runs "
                             "over the same images")
        if (config.get("classes") or None) != (base.get("classes") or None):
            raise MergeError(f"{run.path} uses other classes ({config.get('classes')}, "
                             f"{first.path} uses {base.get('classes')}); merge runs with the "
                             "same class list")
    return configs


def _check_out(out: RunDir, inputs: list[RunDir], config: dict[str, Any],
               force: bool) -> None:
    where = _resolved(out.path)
    for run in inputs:
        if _resolved(run.path) == where:
            raise MergeError(f"--out {out.path} is one of the input runs; merge into a new "
                             "directory")
    if out.path.exists() and not out.path.is_dir():
        raise MergeError(f"--out {out.path} is a file, not a directory")
    if not out.run_json.exists():
        if out.predictions.exists():
            raise MergeError(f"--out {out.path} holds a predictions.jsonl but no run.json; "
                             "merge into a new directory")
        return
    try:
        old = out.config()
    except GroundingError:
        old = None
    if not isinstance(old, dict) or old.get("backend") != "merge" or "runs" not in old:
        raise MergeError(f"--out {out.path} holds another run, not a merge; merge into a "
                         "new directory")
    before = {k: old.get(k) for k in MERGE_KEYS}
    before["runs"] = [r.get("path") for r in old.get("runs") or [] if isinstance(r, dict)]
    after = {k: config[k] for k in MERGE_KEYS}
    after["runs"] = [r["path"] for r in config["runs"]]
    changed = [k for k in after if before[k] != after[k]]
    if not changed:
        return  # the same merge: redone whole, nothing duplicated
    if not force:
        details = "; ".join(f"{k}: {before[k]!r} -> {after[k]!r}" for k in changed)
        raise MergeError(f"--out {out.path} holds another merge ({details}); use a new "
                         "--out, or --force to replace it (its files are kept, renamed)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in _FILES:
        f = getattr(out, name)
        if f.exists():
            f.rename(f.with_name(f"{f.stem}.{stamp}{f.suffix}"))


def _index(path: Path) -> dict[str, int]:
    """Where each done image's record starts in ``path`` (a byte offset), in file order;
    the last record of an image wins. A record with an error is not done. Only offsets
    are held, so a merge of million-image runs stays small."""
    index: dict[str, int] = {}
    if not path.exists():
        return index
    with path.open("rb") as f:
        offset = 0
        for line in f:
            start, offset = offset, offset + len(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("image"), str) \
                    and not record.get("error"):
                index[record["image"]] = start
    return index


def _read(f, offset: int) -> dict[str, Any]:
    f.seek(offset)
    return json.loads(f.readline())


def _all_images(indexes: list[dict[str, int]]) -> list[str]:
    """Every image any run did: the first run's in its order, then the others'."""
    return list(dict.fromkeys(image for index in indexes for image in index))


def _missing_entry(image: str, missing: list[int], inputs: list[RunDir],
                   failures: list[dict[str, dict[str, Any]] | None], stamp: str
                   ) -> dict[str, Any]:
    reasons = []
    for j in missing:
        failure = (failures[j] or {}).get(image)
        why = f"failed: {failure.get('error')}" if failure else "not labelled"
        reasons.append(f"run {j} {inputs[j].path} ({why})")
    return {"image": image, "error": "not done in every run: " + "; ".join(reasons),
            "missing_in": missing, "time": stamp}


def _size_entry(image: str, sizes: list[tuple[Any, Any]], inputs: list[RunDir],
                stamp: str) -> dict[str, Any]:
    seen = ", ".join(f"run {j} {w}x{h}" for j, (w, h) in enumerate(sizes))
    return {"image": image, "error": f"the runs disagree on the image size or lack it "
                                     f"({seen}): was the image replaced?",
            "missing_in": [], "time": stamp}


def _invalid(record: dict[str, Any]) -> bool:
    try:
        Result.from_record(record)
    except InvalidResult:
        return True
    return False


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import supervision as sv

    return sv.box_iou_batch(a.reshape(-1, 4), b.reshape(-1, 4))


class _Merger:
    """Merges one image's results from every run into one."""

    def __init__(self, method: str, iou: float, min_votes: int | None, n_runs: int,
                 classes: list[str] | None, fuse) -> None:
        self.method = method
        self.iou = iou
        self.min_votes = min_votes
        self.n_runs = n_runs
        self.classes = None if classes is None else list(classes)
        self.fuse = fuse
        self.boxes_in = 0
        self.boxes_out = 0

    def merge(self, results: list[Result]) -> Result:
        first = results[0]
        dropped: dict[str, int] = {}
        boxes: list[Box] = []
        runs: list[int] = []
        for j, result in enumerate(results):
            for box in result.boxes:
                x1, y1, x2, y2 = box.bbox
                if x2 <= x1 or y2 <= y1:
                    dropped["no_area"] = dropped.get("no_area", 0) + 1
                    continue
                boxes.append(box)
                runs.append(j)
        self.boxes_in += len(boxes) + dropped.get("no_area", 0)
        out_boxes = self._boxes(boxes, runs, first.width, first.height, dropped) \
            if boxes else []
        self.boxes_out += len(out_boxes)
        points = self._points(results, dropped)
        return Result(boxes=out_boxes, points=points, image=first.image, width=first.width,
                      height=first.height, model=f"merge({self.method})",
                      truncated=any(r.truncated for r in results),
                      dropped={k: v for k, v in dropped.items() if v}, classes=self.classes)

    def _boxes(self, boxes: list[Box], runs: list[int], width: int, height: int,
               dropped: dict[str, int]) -> list[Box]:
        keys = [group_key(b) for b in boxes]
        ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        xyxy = np.array([b.bbox for b in boxes], dtype=np.float64)
        scores = [b.score for b in boxes]
        rank = ranking(scores)
        predictions = np.column_stack([xyxy, rank, [ids[k] for k in keys]])
        if self.method == "nms":
            groups = self._nms(predictions, dropped)
            made = [(g, None) for g in groups]
        elif self.method == "vote":
            made = [(g, None) for g in self._vote(predictions, runs, dropped)]
        else:
            made = self._wbf(xyxy, scores, keys, ids, runs, width, height, dropped)
        out: list[tuple[int, Box]] = []
        for members, fused in made:
            if not members:
                continue
            best = min(members, key=lambda i: -rank[i])
            sources = sorted({runs[i] for i in members})
            if self.method == "nms":
                bbox, score = boxes[best].bbox, boxes[best].score
            elif self.method == "vote":
                bbox, score = self._mean(xyxy, scores, members)
            else:
                bbox, score = fused
                if all(scores[i] is None for i in members):
                    score = None
            rep = boxes[best]
            out.append((min(members), Box(
                bbox, rep.label, rep.class_id, score,
                {**rep.attributes, "votes": len(sources), "sources": sources},
                None, rep.model_label)))
        return [box for _, box in sorted(out, key=lambda pair: pair[0])]

    def _nms(self, predictions: np.ndarray, dropped: dict[str, int]) -> list[list[int]]:
        """Groups led by each box supervision's NMS keeps; a suppressed box joins the
        best-ranked kept box of its class that overlaps it by more than ``iou`` (the one
        that suppressed it, greedy NMS being what it is)."""
        import supervision as sv

        n = len(predictions)
        keep = sv.box_non_max_suppression(predictions, iou_threshold=self.iou) if n > 1 \
            else np.ones(n, dtype=bool)
        kept = [int(i) for i in np.flatnonzero(keep)]
        groups = {i: [i] for i in kept}
        ious = _iou(predictions[:, :4], predictions[kept, :4])
        for i in np.flatnonzero(~keep):
            same = [(predictions[k, 4], k) for c, k in enumerate(kept)
                    if predictions[k, 5] == predictions[i, 5] and ious[i, c] > self.iou]
            if same:
                groups[max(same)[1]].append(int(i))
        dropped["suppressed"] = dropped.get("suppressed", 0) + n - len(kept)
        return list(groups.values())

    def _vote(self, predictions: np.ndarray, runs: list[int],
              dropped: dict[str, int]) -> list[list[int]]:
        import supervision as sv

        groups = sv.box_non_max_merge(predictions, iou_threshold=self.iou) \
            if len(predictions) > 1 else [[0]]
        kept = []
        for group in groups:
            if len({runs[i] for i in group}) >= self.min_votes:
                kept.append(group)
                dropped["fused"] = dropped.get("fused", 0) + len(group) - 1
            else:
                dropped["few_votes"] = dropped.get("few_votes", 0) + len(group)
        return kept

    @staticmethod
    def _mean(xyxy: np.ndarray, scores: list[float | None], members: list[int]
              ) -> tuple[tuple[float, ...], float | None]:
        """The score-weighted mean box (unscored weighs 1.0) and the mean score (None
        when every member is unscored)."""
        weights = np.array([1.0 if scores[i] is None else max(scores[i], 1e-9)
                            for i in members])
        bbox = np.average(xyxy[members], axis=0, weights=weights)
        known = [scores[i] for i in members if scores[i] is not None]
        score = None if not known else float(np.mean([1.0 if scores[i] is None
                                                      else scores[i] for i in members]))
        return tuple(float(v) for v in bbox), score

    def _wbf(self, xyxy: np.ndarray, scores: list[float | None], keys: list[Hashable],
             ids: dict[Hashable, int], runs: list[int], width: int, height: int,
             dropped: dict[str, int]) -> list[tuple[list[int], tuple]]:
        """ensemble-boxes' weighted box fusion over the runs (coordinates as fractions
        of the image, every run weight 1, unscored boxes scored 1.0); each input box is
        then counted for the fused box of its class it overlaps most."""
        import warnings

        scale = np.array([width, height, width, height], dtype=np.float64)
        normal = np.clip(xyxy / scale, 0.0, 1.0)
        weight = np.array([1.0 if s is None else max(s, 1e-9) for s in scores])
        label = np.array([ids[k] for k in keys], dtype=np.float64)
        rows = [[i for i in range(len(runs)) if runs[i] == j] for j in range(self.n_runs)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its clipping notes: nothing left to clip
            fused, fused_scores, fused_labels = self.fuse(
                [normal[r].reshape(-1, 4) for r in rows], [weight[r] for r in rows],
                [label[r] for r in rows], weights=[1] * self.n_runs, iou_thr=self.iou,
                skip_box_thr=0.0, conf_type="avg")
        fused = np.asarray(fused, dtype=np.float64).reshape(-1, 4) * scale
        fused = np.round(np.clip(fused, 0, scale), 2)  # float32 inside ensemble-boxes
        fused_labels = np.asarray(fused_labels).astype(int)
        members: list[list[int]] = [[] for _ in range(len(fused))]
        ious = _iou(xyxy, fused)
        for i in range(len(xyxy)):
            candidates = np.flatnonzero(fused_labels == label[i])
            if len(candidates):
                members[int(candidates[np.argmax(ious[i, candidates])])].append(i)
        for c, m in enumerate(members):
            if not m:  # its members all overlap another fused box more: name the nearest
                same = np.flatnonzero(label == fused_labels[c])
                m.append(int(same[np.argmax(ious[same, c])]))
        dropped["fused"] = dropped.get("fused", 0) + len(xyxy) - len(fused)
        return [(m, (tuple(float(v) for v in fused[c]), float(fused_scores[c])))
                for c, m in enumerate(members)]

    @staticmethod
    def _points(results: list[Result], dropped: dict[str, int]) -> list[Point]:
        found: dict[Hashable, tuple[Point, list[int]]] = {}
        for j, result in enumerate(results):
            for point in result.points:
                key = (group_key(point), *point.point)
                if key in found:
                    found[key][1].append(j)
                    dropped["duplicate"] = dropped.get("duplicate", 0) + 1
                else:
                    found[key] = (point, [j])
        out = []
        for point, runs in found.values():
            sources = sorted(set(runs))
            out.append(Point(point.point, point.label, point.class_id, point.score,
                             {**point.attributes, "votes": len(sources),
                              "sources": sources}, None, point.model_label))
        return out
