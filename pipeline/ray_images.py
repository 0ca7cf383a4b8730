"""Images enter Ray once: each decoded image is put into the object store once, and every pool gets its reference.

Without this, each actor call pickles its images into the call's arguments: a 12 MP image (36 MB of RGB) is
serialized again for the tagger, each captioner, the scorer, each detector, each region captioner, the
segmenter and the background pool. ``SharedImages.refs(images, max_side)`` returns one ``ObjectRef`` per image,
putting an image only the first time this process sees it (per ``max_side``); ``resolve(batch)`` in the actor
turns references back into images (one ``ray.get`` per call; on the same node the object store hands them over
without another pickle in the caller).

``max_side``: a stage whose output has no pixel coordinates (tags, captions, caption scores) can take the image
downscaled at the source to what its model reads (``ray.resources.<stage>.max_side``; its processor resizes to
224-384 px anyway), so fewer bytes travel and its actor resizes less.

Entries live while the image object does (a weak reference), and at most ``capacity_bytes`` of them: the oldest
go first, and an evicted image is simply put again if a later stage asks for it. ``TransferStats`` counts the
pixel bytes this process sent (put once, or pickled into call arguments) for the orchestration benchmark.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image


def pixel_bytes(image: Image.Image) -> int:
    """Bytes of ``image``'s pixel data (what pickling it serializes, give or take a header)."""
    return image.width * image.height * len(image.getbands())


def downscaled(image: Image.Image, max_side: int | None) -> Image.Image:
    """``image`` with its longest side at most ``max_side`` (aspect kept, bicubic), or ``image`` itself."""
    if max_side is None or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


@dataclass
class TransferStats:
    """Pixel bytes this process sent to actors: ``put`` (once per image and size) and ``inline`` (pickled into
    call arguments); ``calls`` actor calls made."""

    put: int = 0
    inline: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.put = self.inline = self.calls = 0


STATS = TransferStats()


class SharedImages:
    """Object-store references of images, one ``ray.put`` per (image, ``max_side``) in this process."""

    def __init__(self, capacity_bytes: int = 4 * 2**30) -> None:
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._refs: OrderedDict[tuple[int, int | None], tuple[Any, int]] = OrderedDict()  # -> (ref, bytes)
        self._watched: set[int] = set()
        self._bytes = 0

    def refs(self, images: Sequence[Image.Image], max_side: int | None = None) -> list[Any]:
        """One ``ObjectRef`` per image (put now unless this process already put it at this ``max_side``)."""
        return [self._ref(image, max_side) for image in images]

    def _ref(self, image: Image.Image, max_side: int | None) -> Any:
        import ray

        key = (id(image), max_side)
        with self._lock:
            if key in self._refs:
                self._refs.move_to_end(key)
                return self._refs[key][0]
        small = downscaled(image, max_side)
        ref, size = ray.put(small), pixel_bytes(small)
        with self._lock:
            STATS.put += size
            if id(image) not in self._watched:  # drop the entries when the image object goes away
                self._watched.add(id(image))
                weakref.finalize(image, self._forget, id(image))
            self._refs[key] = (ref, size)
            self._bytes += size
            while self._bytes > self.capacity_bytes and len(self._refs) > 1:
                _, (_, dropped) = self._refs.popitem(last=False)
                self._bytes -= dropped
        return ref

    def _forget(self, image_id: int) -> None:
        with self._lock:
            self._watched.discard(image_id)
            for key in [k for k in self._refs if k[0] == image_id]:
                self._bytes -= self._refs.pop(key)[1]

    def __len__(self) -> int:
        return len(self._refs)


SHARED = SharedImages()  # one per process: every pool client of a driver or shard task shares it


def share_batch(batch: Sequence[Sequence[Any]], max_side: int | None, share: bool) -> list[list[Any]]:
    """The per-image argument lists of one actor call with every image replaced by its reference (``share``), or
    as they are (counted as inline bytes). Non-image arguments (boxes, captions) pass unchanged."""
    out = []
    for arg in batch:
        arg = list(arg)
        if arg and all(isinstance(value, Image.Image) for value in arg):
            if share:
                arg = SHARED.refs(arg, max_side)
            else:
                arg = [downscaled(image, max_side) for image in arg]
                STATS.inline += sum(pixel_bytes(image) for image in arg)
        out.append(arg)
    STATS.calls += 1
    return out


def resolve(batch: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """In the actor: the argument lists with every ``ObjectRef`` replaced by its object (one ``ray.get``)."""
    import ray

    where = [(i, j) for i, arg in enumerate(batch) for j, value in enumerate(arg) if isinstance(value, ray.ObjectRef)]
    out = [list(arg) for arg in batch]
    if where:
        for (i, j), value in zip(where, ray.get([out[i][j] for i, j in where]), strict=True):
            out[i][j] = value
    return out
