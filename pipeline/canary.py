"""A control input for the circuit breaker: tell a broken stage from a shard of inputs that fail on their own.

``check_breaker`` counts how many of a shard's inputs one stage failed on. A sticky CUDA error or a wrong config
fails every input; a shard of degenerate images (16000×1 strips, blank frames) can fail just as often, for
reasons of its own. Before a trip counts, ``failure_is_systematic`` runs the same annotation chain on one
ordinary image made here (deterministic, 160×120, a gradient with a few shapes): when the chain takes it, the
stage works and the failed inputs become error rows of their own; when it fails the control image too, the
failure is the infrastructure's and the shard trips.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from data_schemas import ImageLimits

log = logging.getLogger(__name__)

CANARY_KEY = "breaker-canary"


@lru_cache(maxsize=1)
def canary_jpeg() -> bytes:
    """An ordinary 160×120 RGB JPEG (gradient background, a red square, a blue disc), the same bytes every call."""
    y, x = np.mgrid[0:120, 0:160]
    pixels = np.stack([x * 255 // 159, y * 255 // 119, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 30, 70, 80), fill=(220, 30, 30))
    draw.ellipse((90, 20, 140, 70), fill=(30, 30, 220))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def failure_is_systematic(annotate: Callable[[list], list], limits: ImageLimits) -> tuple[bool, str]:
    """Run ``annotate`` (a shard's annotation step) on the control image; ``(True, why)`` when it fails there too.

    An exception from ``annotate`` counts as systematic (the step cannot run at all).
    """
    from pipeline.ingest import ingest_item  # ingest imports the image stack; this module stays light
    from pipeline.sources.base import SourceItem

    item = ingest_item(SourceItem(CANARY_KEY, "<breaker control image>", canary_jpeg()), "canary", limits)
    try:
        done = annotate([item])[0]
    except Exception as exc:  # noqa: BLE001 - any failure of the step on an ordinary image is systematic
        return True, f"the control image failed too: {type(exc).__name__}: {exc}"
    if done.error is not None:
        return True, f"the control image failed too: {done.error}"
    return False, "the control image passed"
