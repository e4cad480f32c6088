"""Whether a student still in training can reach the accuracy it needs: the rule that stops a shape
of the search as soon as it cannot.

After each epoch the validation curve so far is projected forward optimistically: the best accuracy
yet, plus, for every epoch left, the largest gain of one epoch among the last ``window`` (each next
gain ``decay`` times the one before; ``decay = 1``, the default, assumes no slowing down at all),
plus ``slack`` points for what the later stages can still move (vocabulary trimming, int8, a
recovery). A shape whose projection is below the target is out: training it further cannot get it
there unless its curve turns upward, which distillation curves do not do. The error of the rule is
the projection's shortfall against the final figure on curves whose end is known; ``projection_error``
measures it, and the figure for CLINC150 is in the docs' results.

``ReachCallback`` applies the rule to a ``transformers.Trainer`` after each evaluation and stops the
training (the Trainer then loads the best epoch as usual), saying why at once through ``log``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from edgepack.console import Log, Progress

try:  # a TrainerCallback subclass needs transformers at import; the CLI imports this module lazily
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object  # type: ignore[assignment,misc]

SLACK = 0.5  # points: what prune, int8 and a recovery moved a CLINC150 student above its distilled figure, and more
WINDOW = 2


@dataclasses.dataclass(frozen=True)
class Reach:
    """The rule's answer after ``epoch`` of ``epochs``: the best accuracy so far, the most the curve can
    still reach (``projected``, slack included) and whether that meets ``target`` (all in points)."""

    epoch: int
    epochs: int
    best: float
    projected: float
    target: float

    @property
    def reachable(self) -> bool:
        return self.projected >= self.target

    def message(self, name: str) -> str:
        verdict = "can still reach" if self.reachable else "is out: cannot reach"
        return (f"{name} {verdict} {self.target:.2f}% (after epoch {self.epoch}/{self.epochs}: best "
                f"{self.best:.2f}%, at most {self.projected:.2f}% reachable)")

    def to_dict(self) -> dict[str, float | int | bool]:
        return {**dataclasses.asdict(self), "reachable": self.reachable}


def project(curve: Sequence[float], epochs: int, *, window: int = WINDOW, decay: float = 1.0,
            slack: float = SLACK) -> float:
    """The most a validation curve (points after each epoch so far) can reach by epoch ``epochs``.

    >>> project([80.0, 85.0, 87.0], 5, slack=0.0)  # best 87, two epochs left at the largest recent gain (5)
    97.0
    >>> project([80.0, 90.0], 5)  # capped: an accuracy in points
    100.0
    >>> project([80.0, 85.0, 87.0], 5, decay=0.5, slack=0.0)  # 87 + 5 * (0.5 + 0.25)
    90.75
    """
    if not curve:
        raise ValueError("no epoch measured yet")
    if not 0 < decay <= 1:
        raise ValueError(f"decay={decay!r}: a gain shrinks by a factor in (0, 1] per epoch")
    left = max(0, epochs - len(curve))
    recent = list(curve[-(window + 1):])
    gain = max([b - a for a, b in zip(recent, recent[1:], strict=False)] + [0.0]) if len(recent) > 1 else float("inf")
    if left and gain == float("inf"):  # one point of the curve says nothing of its slope
        return 100.0
    ahead = gain * sum(decay ** k for k in range(1, left + 1)) if left else 0.0
    return min(100.0, max(curve) + ahead + slack)  # an accuracy: never "at most 104% reachable"


def reach(curve: Sequence[float], epochs: int, target: float, **kw) -> Reach:
    """``project`` against ``target``.

    >>> reach([88.0, 90.0, 90.6], 5, target=94.1).reachable   # 90.6 + 2 * 2.0 + 0.5 = 95.1
    True
    >>> r = reach([88.0, 90.0, 90.6, 90.9], 5, target=94.1)     # 90.9 + 0.6 + 0.5 = 92.0
    >>> r.reachable, r.projected
    (False, 92.0)
    """
    return Reach(len(curve), epochs, max(curve), round(project(curve, epochs, **kw), 4), target)


def projection_error(curve: Sequence[float], final: float, **kw) -> list[float]:
    """For each epoch before the last, how far the projection from the curve so far fell short of
    ``final`` (the figure at the end: positive means the rule would have stopped a shape that got
    there; with ``slack=0`` it is the rule's raw error).

    >>> projection_error([80.0, 85.0, 87.0, 88.0], 88.0, slack=0.0)
    [-12.0, -7.0, -4.0]
    """
    n = len(curve)
    return [final - project(curve[:k], n, **kw) for k in range(1, n)]


class ReachCallback(TrainerCallback):
    """Stops a Trainer once ``reach`` says its validation metric cannot get to ``target`` points by the
    last epoch; ``log`` hears each verdict (the first that says "out" at once). ``metric`` is the
    evaluation key (``eval_cal_accuracy`` with an out-of-scope class, ``eval_accuracy`` without), read as a
    fraction. After training, ``stopped`` is the verdict that stopped it, or None."""

    def __init__(self, target: float, *, name: str = "student", metric: str = "eval_cal_accuracy",
                 log: Log | None = None, **rule):
        self.target, self.name, self.metric, self.rule = target, name, metric, rule
        self.log = log or Progress("distill")
        self.curve: list[float] = []
        self.stopped: Reach | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric, (metrics or {}).get("eval_accuracy"))
        if value is None:
            return control
        self.curve.append(100.0 * float(value))
        verdict = reach(self.curve, int(round(args.num_train_epochs)), self.target, **self.rule)
        if not verdict.reachable and self.stopped is None:
            self.stopped = verdict
            self.log(verdict.message(self.name))
            control.should_training_stop = True
        return control
