"""Typed configuration of the evaluation stage and of test-time augmentation (TTA).

Plain dataclasses with field docstrings; they become Hydra/OmegaConf structured schemas, so field types
are restricted to int/float/bool/str/Path, ``X | None``, ``list[...]`` and nested dataclasses.
``__post_init__`` checks raise ``ValueError`` naming the key (``eval.batch_size``, ``tta.scales`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCORERS = ("faster", "pycocotools")
MERGES = ("one_to_one", "nms")
SCORE_MODES = ("mean", "main")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class EvalConfig:
    """How the evaluation stage infers and scores (the ``eval`` node)."""

    batch_size: int = 1
    """Images per forward pass on each rank. The metrics do not depend on it."""
    num_workers: int = 2
    """Data-loading worker processes per rank."""
    short_side: int = 800
    """Resize the short image side to this before inference (the paper's evaluation size)."""
    max_size: int = 1333
    """Cap on the long image side after resizing."""
    scorer: str = "faster"
    """COCO scorer: ``faster`` (faster-coco-eval) or ``pycocotools``; both give the same numbers."""
    atd_k: int = 100
    """k of the ATD(k) anchor-distance metric (paper eq. 1)."""
    draw_images: int = 4
    """How many images (smallest image ids) are drawn with their detections; 0 draws none."""
    draw_score_threshold: float = 0.3
    """Detections below this score are not drawn (they are all scored)."""
    progress_every_s: float = 30.0
    """Seconds between progress lines (rate and ETA) during inference."""

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        _require(self.num_workers >= 0, f"eval.num_workers must be >= 0, got {self.num_workers}")
        _require(self.short_side >= 1, f"eval.short_side must be >= 1, got {self.short_side}")
        _require(
            self.max_size >= self.short_side,
            f"eval.max_size ({self.max_size}) must be >= eval.short_side ({self.short_side})",
        )
        _require(self.scorer in SCORERS, f"eval.scorer must be one of {SCORERS}, got {self.scorer!r}")
        _require(self.atd_k >= 1, f"eval.atd_k must be >= 1, got {self.atd_k}")
        _require(self.draw_images >= 0, f"eval.draw_images must be >= 0, got {self.draw_images}")
        _require(
            0.0 <= self.draw_score_threshold <= 1.0,
            f"eval.draw_score_threshold must be in [0, 1], got {self.draw_score_threshold}",
        )
        _require(self.progress_every_s > 0, f"eval.progress_every_s must be > 0, got {self.progress_every_s}")


@dataclass
class TTAConfig:
    """Test-time augmentation (paper appendix A): scales x horizontal flip, merged one-to-one.

    The augmentations are every ``scales`` entry, each also flipped when ``flip`` is on, named
    ``s<scale>`` and ``s<scale>_flip``. Augmentation weights are ``scale_weights[i]`` (1.0 when the list
    is empty), times ``flip_weight`` for the flipped ones.
    """

    enabled: bool = False
    """Run TTA beside the plain evaluation and report both."""
    scales: list[int] = field(default_factory=lambda: [640, 800, 960])
    """Short-side sizes, one augmentation each."""
    max_size: int = 2000
    """Cap on the long side for every TTA scale (larger than eval.max_size so large scales take effect)."""
    flip: bool = True
    """Also run every scale horizontally flipped."""
    main_scale: int = 800
    """The main augmentation's scale (one of ``scales``): its predictions are the ones kept and refined."""
    main_flip: bool = False
    """Whether the main augmentation is the flipped one (needs ``flip``)."""
    scale_weights: list[float] = field(default_factory=list)
    """Per-scale weights in the merged box average, aligned with ``scales``; empty: all 1.0."""
    flip_weight: float = 1.0
    """Extra weight factor of the flipped augmentations."""
    iou_threshold: float = 0.5
    """One-to-one merge: a prediction of another augmentation matches when its IoU is above this."""
    score_mode: str = "mean"
    """Merged score: ``mean`` (weighted mean of the matched scores over all augmentations, unmatched
    counting 0, so agreement raises a prediction) or ``main`` (the main prediction's score)."""
    merges: list[str] = field(default_factory=lambda: ["one_to_one", "nms"])
    """Merges to report: ``one_to_one`` (the paper's) and ``nms`` (baseline)."""
    nms_iou: float = 0.6
    """IoU threshold of the class-wise NMS baseline merge."""
    max_detections: int = 300
    """Detections kept per image after merging (the model's num_select)."""

    def __post_init__(self) -> None:
        _require(len(self.scales) >= 1, "tta.scales must list at least one short-side size")
        _require(all(s >= 1 for s in self.scales), f"tta.scales must be positive, got {list(self.scales)}")
        _require(len(set(self.scales)) == len(self.scales), f"tta.scales has duplicates: {list(self.scales)}")
        _require(
            self.max_size >= max(self.scales),
            f"tta.max_size ({self.max_size}) must be >= the largest of tta.scales",
        )
        _require(
            self.main_scale in self.scales,
            f"tta.main_scale ({self.main_scale}) must be one of tta.scales {list(self.scales)}",
        )
        _require(self.flip or not self.main_flip, "tta.main_flip needs tta.flip=true")
        _require(
            len(self.scale_weights) in (0, len(self.scales)),
            f"tta.scale_weights must be empty or have one weight per scale ({len(self.scales)}), "
            f"got {len(self.scale_weights)}",
        )
        _require(all(w > 0 for w in self.scale_weights), "tta.scale_weights must be > 0")
        _require(self.flip_weight > 0, f"tta.flip_weight must be > 0, got {self.flip_weight}")
        _require(
            0.0 < self.iou_threshold <= 1.0, f"tta.iou_threshold must be in (0, 1], got {self.iou_threshold}"
        )
        _require(
            self.score_mode in SCORE_MODES,
            f"tta.score_mode must be one of {SCORE_MODES}, got {self.score_mode!r}",
        )
        _require(len(self.merges) >= 1, f"tta.merges must name at least one of {MERGES}")
        _require(
            all(m in MERGES for m in self.merges),
            f"tta.merges must be among {MERGES}, got {list(self.merges)}",
        )
        _require(len(set(self.merges)) == len(self.merges), f"tta.merges has duplicates: {list(self.merges)}")
        _require(0.0 < self.nms_iou <= 1.0, f"tta.nms_iou must be in (0, 1], got {self.nms_iou}")
        _require(self.max_detections >= 1, f"tta.max_detections must be >= 1, got {self.max_detections}")
