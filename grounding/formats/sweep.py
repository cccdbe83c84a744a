"""Precision, recall and F1 at IoU 0.5 for every score threshold: which ``--min-score`` (or
``--verify`` threshold) to export with.

Matching is the one VOC and COCO use, done once: per image and class, predictions are
taken in score order (highest first; ties keep their order) and each is matched to the
not yet matched ground-truth box it overlaps most, when that overlap is at least 0.5; a
prediction left unmatched is a false positive, unless it lies on a crowd region (at least
0.5 of it inside), where it is neither (as in COCO). Because the match is greedy in score
order, the predictions kept at a threshold ``t`` (score >= t) are matched exactly as they
are in the full match, so the counts at every threshold are running sums over one sorted
list.

Unscored boxes (score None: most VLM boxes) are kept at every threshold, as
``--min-score``, ``--verify`` and the exporters keep them (``core.result.score_at_least``);
they are matched first and counted in :attr:`Sweep.unscored`. The thresholds are the
distinct scores of the scored boxes, so a sweep whose boxes are all unscored has no point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IOU = 0.5
TP, FP, IGNORED = 1, 0, -1
"""What a prediction is in the match (IGNORED: on a crowd region)."""

Truth = tuple[int, Any, bool]
"""class id, where (box x1, y1, x2, y2, or whatever ``iou`` reads), crowd region."""
Prediction = tuple[int, Any, "float | None"]
"""class id, where, score (None: unscored, kept at every threshold)."""


@dataclass
class SweepPoint:
    threshold: float
    """Boxes with a score >= threshold kept (and every unscored box)."""
    tp: int
    fp: int
    fn: int
    precision: float | None
    """None when nothing is kept."""
    recall: float | None
    """None when the ground truth has no box."""
    f1: float | None


@dataclass
class Sweep:
    score: str
    """What was swept: ``"score"`` (the box's) or ``"verify_score"`` (``--verify``'s)."""
    gt: int
    """Ground-truth boxes (crowd regions not counted)."""
    predictions: int
    unscored: int
    """Predictions without this score: kept at every threshold."""
    points: list[SweepPoint] = field(default_factory=list)
    """One per distinct score, lowest threshold first."""
    best_f1: SweepPoint | None = None
    """The highest F1 (ties: the highest threshold, the fewest boxes for it)."""
    target_precision: float | None = None
    target: SweepPoint | None = None
    """The lowest threshold whose precision is at least ``target_precision`` (the most
    recall at that precision); None when none is, or no target was asked."""


def sweep(images: Iterable[tuple[Sequence[Truth], Sequence[Prediction]]], *,
          score: str = "score", target_precision: float | None = None,
          iou: Callable[[Any, list[Any]], list[float]] | None = None,
          ioa: Callable[[Any, Any], float] | None = None) -> Sweep:
    """The precision/recall/F1 curve of ``images``: (ground truth, predictions) per image.
    ``iou(where, others)`` and ``ioa(where, region)`` default to box IoU and the
    intersection over the box's own area (boxes as x1, y1, x2, y2)."""
    if target_precision is not None and not 0 < target_precision <= 1:
        raise ValueError(f"target precision must be in (0, 1], got {target_precision}")
    iou = iou or box_iou
    ioa = ioa or box_ioa
    n_gt = n_pred = unscored = 0
    outcomes: list[tuple[float | None, int]] = []  # (score, TP / FP / IGNORED)
    for truth, predictions in images:
        n_gt += sum(1 for t in truth if not t[2])
        n_pred += len(predictions)
        unscored += sum(1 for p in predictions if p[2] is None)
        for c in sorted({p[0] for p in predictions}):
            outcomes += _match([t for t in truth if t[0] == c],
                               [p for p in predictions if p[0] == c], iou, ioa)
    out = Sweep(score, n_gt, n_pred, unscored, target_precision=target_precision)
    tp = sum(hit == TP for s, hit in outcomes if s is None)
    fp = sum(hit == FP for s, hit in outcomes if s is None)
    ranked = sorted(((s, hit) for s, hit in outcomes if s is not None), key=lambda o: -o[0])
    for i, (s, hit) in enumerate(ranked):
        tp, fp = tp + (hit == TP), fp + (hit == FP)
        if i + 1 < len(ranked) and ranked[i + 1][0] == s:
            continue  # a threshold keeps every box of its score
        out.points.append(point(s, tp, fp, n_gt - tp))
    out.points.reverse()
    if out.points:
        out.best_f1 = max(reversed(out.points), key=lambda p: -1.0 if p.f1 is None else p.f1)
    if target_precision is not None:
        out.target = next((p for p in out.points if p.precision is not None
                           and p.precision >= target_precision - 1e-12), None)
    return out


def point(threshold: float, tp: int, fp: int, fn: int) -> SweepPoint:
    """One threshold's counts with their precision, recall and F1."""
    return SweepPoint(threshold, tp, fp, fn,
                      precision=tp / (tp + fp) if tp + fp else None,
                      recall=tp / (tp + fn) if tp + fn else None,
                      f1=2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None)


def _match(truth: list[Truth], predictions: list[Prediction],
           iou: Callable[[Any, list[Any]], list[float]],
           ioa: Callable[[Any, Any], float]) -> list[tuple[float | None, int]]:
    """(score, TP / FP / IGNORED) for each prediction of one class on one image, matched
    greedily: unscored first, then by score."""
    regular = [t[1] for t in truth if not t[2]]
    crowd = [t[1] for t in truth if t[2]]
    order = sorted(predictions, key=lambda p: float("inf") if p[2] is None else p[2],
                   reverse=True)
    taken: set[int] = set()
    out = []
    for _, where, s in order:
        best, best_iou = -1, IOU
        for j, v in enumerate(iou(where, regular)):
            if j not in taken and v >= best_iou:
                best, best_iou = j, v
        if best >= 0:
            taken.add(best)
            out.append((s, TP))
        else:
            out.append((s, IGNORED if any(ioa(where, r) >= IOU for r in crowd) else FP))
    return out


def box_iou(box: tuple[float, ...], others: list[tuple[float, ...]]) -> list[float]:
    """IoU of ``box`` with each of ``others`` (x1, y1, x2, y2)."""
    out = []
    area = (box[2] - box[0]) * (box[3] - box[1])
    for o in others:
        inter = _inter(box, o)
        union = area + (o[2] - o[0]) * (o[3] - o[1]) - inter
        out.append(inter / union if union > 0 else 0.0)
    return out


def box_ioa(box: tuple[float, ...], region: tuple[float, ...]) -> float:
    """The part of ``box`` inside ``region`` (COCO's IoU with a crowd region)."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    return _inter(box, region) / area if area > 0 else 0.0


def _inter(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


# --- Showing -------------------------------------------------------------------------------

SHOWN = 10
"""A table shows about this many thresholds (evenly spread) besides best F1 and target."""


def shown_points(s: Sweep, shown: int = SHOWN) -> list[SweepPoint]:
    """Every point when there are few, else ``shown`` evenly spread ones (the lowest and
    highest threshold among them), plus the best-F1 and target points; by threshold."""
    points = s.points
    if len(points) > shown + 2:
        step = (len(points) - 1) / (shown - 1)
        points = [points[round(i * step)] for i in range(shown)]
    extra = [p for p in (s.best_f1, s.target) if p is not None and p not in points]
    return sorted([*points, *extra], key=lambda p: p.threshold)


def floor_text(threshold: float, digits: int = 4) -> str:
    """A threshold as shown, rounded *down*: ``--min-score`` at the shown value keeps
    every box the row counted (0.9963911 shows 0.9963, not 0.9964, which would drop it)."""
    import math

    scale = 10 ** digits
    return f"{math.floor(threshold * scale + 1e-9) / scale:.{digits}f}".rstrip("0").rstrip(".")


def table(s: Sweep):
    """A rich Table of :func:`shown_points`, the best-F1 and target rows marked."""
    from rich.table import Table

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    what = "verify score" if s.score == "verify_score" else "box score"
    caption = (f"{s.gt} ground-truth boxes, {s.predictions} predictions, {s.unscored} "
               f"without a {what} (kept at every threshold)")
    if s.target_precision is not None and s.target is None:
        caption += f"; no threshold reaches precision {s.target_precision:g}"
    out = Table(title=f"Precision / recall by {what} threshold (IoU 0.5)", caption=caption)
    for name in ("threshold", "TP", "FP", "FN", "precision", "recall", "F1", ""):
        out.add_column(name, justify="left" if not name else "right")
    for p in shown_points(s):
        marks = ["best F1"] if p is s.best_f1 else []
        if p is s.target:
            marks.append(f"lowest with P >= {s.target_precision:g}")
        out.add_row(floor_text(p.threshold), str(p.tp), str(p.fp), str(p.fn), f(p.precision),
                    f(p.recall), f(p.f1), ", ".join(marks),
                    style="bold" if marks else None)
    return out


def plot(sweeps: Sequence[Sweep], path: str | Path) -> Path:
    """Precision against recall, one curve per sweep with its best-F1 (and target) point
    marked, written as a PNG to ``path`` (matplotlib's Agg canvas: no window, no pyplot
    state left behind)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for s in sweeps:
        pts = [p for p in s.points if p.precision is not None and p.recall is not None]
        if not pts:
            continue
        what = "verify score" if s.score == "verify_score" else "box score"
        line, = ax.plot([p.recall for p in pts], [p.precision for p in pts], marker=".",
                        label=what)
        for q, marker, name in ((s.best_f1, "*", "best F1"), (s.target, "s", "target")):
            if q is not None and q.precision is not None and q.recall is not None:
                ax.plot([q.recall], [q.precision], marker=marker, markersize=12,
                        color=line.get_color(), linestyle="none",
                        label=f"{what}: {name} at {floor_text(q.threshold)}")
    if any(s.target_precision for s in sweeps):
        ax.axhline(next(s.target_precision for s in sweeps if s.target_precision),
                   color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
           title="Precision-recall at IoU 0.5 by score threshold")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
