"""Why inputs are skipped, how many, and when there are too many.

Every skipped image or annotation becomes a :class:`~pipeline.data.manifest.Reject` with one of the
reasons below, is counted, and is listed in the manifest; fixes that keep an annotation (a box clipped to
the image) are counted separately. Past ``shard.max_reject_fraction`` the stage fails with the summary.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

# Whole images.
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
UNDECODABLE_IMAGE = "undecodable_image"
SIZE_MISMATCH = "size_mismatch"
UNSAFE_FILE_NAME = "unsafe_file_name"
DUPLICATE_IMAGE_ID = "duplicate_image_id"
IMAGE_REASONS = frozenset(
    {MISSING_IMAGE, UNREADABLE_IMAGE, UNDECODABLE_IMAGE, SIZE_MISMATCH, UNSAFE_FILE_NAME, DUPLICATE_IMAGE_ID}
)

# Single annotations.
UNKNOWN_IMAGE = "unknown_image"
UNKNOWN_CATEGORY = "unknown_category"
MALFORMED_ANNOTATION = "malformed_annotation"
NON_FINITE_BOX = "non_finite_box"
BOX_OUTSIDE_IMAGE = "box_outside_image"
ZERO_AREA_BOX = "zero_area_box"
DUPLICATE_ANNOTATION = "duplicate_annotation"

# Fixes (the annotation is kept).
BOX_CLIPPED = "box_clipped"


class RejectFractionExceeded(RuntimeError):
    """More inputs were rejected than ``shard.max_reject_fraction`` allows; the message is the summary."""


@dataclass(frozen=True)
class RejectSummary:
    """Counts per reason against what was listed, and the fractions the limit applies to."""

    images_listed: int
    annotations_listed: int
    counts: dict[str, int]
    fixes: dict[str, int]

    @property
    def images_rejected(self) -> int:
        """Images skipped whole (their annotations go with them and are not counted again)."""
        return sum(n for reason, n in self.counts.items() if reason in IMAGE_REASONS)

    @property
    def annotations_rejected(self) -> int:
        """Annotations skipped one by one."""
        return sum(n for reason, n in self.counts.items() if reason not in IMAGE_REASONS)

    @property
    def image_fraction(self) -> float:
        return self.images_rejected / max(1, self.images_listed)

    @property
    def annotation_fraction(self) -> float:
        return self.annotations_rejected / max(1, self.annotations_listed)

    def lines(self) -> list[str]:
        """A human-readable summary, one line per reason."""
        out = [
            f"rejected {self.images_rejected} of {self.images_listed} images ({self.image_fraction:.2%}), "
            f"{self.annotations_rejected} of {self.annotations_listed} annotations "
            f"({self.annotation_fraction:.2%})"
        ]
        out += [f"  {reason}: {count}" for reason, count in sorted(self.counts.items())]
        out += [f"  fixed, kept: {reason}: {count}" for reason, count in sorted(self.fixes.items())]
        return out

    def check(self, max_fraction: float) -> None:
        """Raise :class:`RejectFractionExceeded` with the summary past ``max_fraction``."""
        if self.image_fraction > max_fraction or self.annotation_fraction > max_fraction:
            raise RejectFractionExceeded(
                "\n".join(
                    [
                        f"too many rejects (limit shard.max_reject_fraction={max_fraction}); fix the input "
                        "or raise the limit:",
                        *self.lines(),
                    ]
                )
            )


def count_reasons(reasons: list[str]) -> dict[str, int]:
    """Reason -> count, sorted by reason."""
    return dict(sorted(Counter(reasons).items()))
