"""Training data: UMG shards -> augmented, tokenised region batches (a webdataset pipeline).

Per rank and DataLoader worker::

    shard tars ─ per-epoch shuffled list ─ split_by_node ─ split_by_worker      (or ResampledShards per rank)
      ─ tar samples ─ seeded shuffle buffer ─ count / skip (resume) ─ SampleTransform ─ batched(Collate)

Randomness never comes from global RNGs. Shard order is seeded by ``(seed, epoch)`` (the same on every
rank, so ranks split disjoint shards), the shuffle buffer by ``(seed, epoch, rank, worker)``, and each
sample's augmentation and caption choice by ``(seed, epoch, key)``: a sample looks the same whichever
worker, rank or resume decodes it, and a new epoch draws new crops and captions.

Data position: every batch carries its ``worker`` and ``raw_end``, the number of (shuffled, undecoded)
samples that worker had consumed when the batch was complete. A trainer that records the last
``raw_end`` per worker can resume mid-epoch with ``skip``: each worker replays its shard stream and
shuffle buffer and drops that many samples before decoding them. With ``workers = 0`` (or a checkpoint
taken after a multiple of ``workers`` batches) the resumed stream is the original one, batch for batch.

Boxes follow the image: random-resized (or centre / full) crop -> resize to S x S -> optional flip,
through ``model.regions``. A box that falls outside the crop, keeps less than ``min_box_visible`` of
its area, or ends up with a side under ``min_box_size`` px is dropped with its captions and tags.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from functools import partial
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from data_schemas import ImageRecord, Region
from data_schemas.train_config import DataSection
from model.losses import build_tag_targets
from model.regions import crop_boxes, hflip_boxes, resize_boxes
from pipeline.shards import iter_tar_samples, read_stats, shard_paths
from pipeline.storage import StoragePath, as_path, is_url, scheme

log = logging.getLogger(__name__)


class CropBox(NamedTuple):
    """A crop of the source image: rows [top, top + height), columns [left, left + width)."""

    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class TransformSpec:
    """Everything :class:`SampleTransform` needs (from ``DataSection`` + the model's preprocessing)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: str = "random_resized"
    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False
    min_box_size: float = 4.0
    min_box_visible: float = 0.5
    max_regions: int = 8
    kept_captions_only: bool = True
    seed: int = 0

    @classmethod
    def from_config(cls, data: DataSection, image_size: int, mean: Sequence[float], std: Sequence[float],
                    seed: int) -> TransformSpec:
        return cls(image_size=image_size, mean=tuple(mean), std=tuple(std), crop=data.crop,
                   crop_scale=tuple(data.crop_scale), crop_ratio=tuple(data.crop_ratio), hflip=data.hflip,
                   min_box_size=data.min_box_size, min_box_visible=data.min_box_visible,
                   max_regions=data.max_regions, kept_captions_only=data.kept_captions_only, seed=seed)


@dataclass
class Sample:
    """One decoded, augmented sample. ``boxes`` (N, 4) xyxy px of the S x S input; lists have N entries."""

    key: str
    image: torch.Tensor  # (3, S, S) float, normalised
    caption: str
    boxes: torch.Tensor
    region_captions: list[str]
    image_tags: list[str]
    region_tags: list[list[str]]
    raw_index: int = 0


@dataclass
class RegionBatch:
    """A collated batch: the inputs of ``UMGCLIP.forward`` plus tag targets and bookkeeping.

    Shapes: images (B, 3, S, S); caption_tokens (B, L); rois (M, 5) ``[batch_idx, x1, y1, x2, y2]``;
    region_caption_tokens (M, L); image_tag_tokens (T, L) with image_tag_targets (B, T) over the batch
    tag vocabulary (sorted union); region_tag_tokens (T_r, L), region_tag_targets (M, T_r).
    """

    images: torch.Tensor
    caption_tokens: torch.Tensor
    rois: torch.Tensor
    region_caption_tokens: torch.Tensor
    image_tag_tokens: torch.Tensor
    image_tag_targets: torch.Tensor
    region_tag_tokens: torch.Tensor
    region_tag_targets: torch.Tensor
    image_tags: list[list[str]]
    region_tags: list[list[str]]
    keys: list[str]
    epoch: int = 0
    worker: int = 0
    raw_end: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> RegionBatch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return RegionBatch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RegionBatch:
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> RegionBatch:
        return self._map_tensors(lambda t: t.pin_memory())


def sample_crop(rng: random.Random, height: int, width: int, spec: TransformSpec) -> CropBox:
    """The crop of an (H, W) image: torchvision ``RandomResizedCrop.get_params`` drawn from ``rng``."""
    if spec.crop == "full":
        return CropBox(0, 0, height, width)
    if spec.crop == "random_resized":
        area = height * width
        log_ratio = (math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*spec.crop_scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return CropBox(rng.randint(0, height - h), rng.randint(0, width - w), h, w)
    side = min(height, width)  # "center", and the fallback of random_resized
    return CropBox((height - side) // 2, (width - side) // 2, side, side)


def transform_boxes(boxes: torch.Tensor, crop: CropBox, out_size: int, flip: bool, min_size: float,
                    min_visible: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Follow crop -> resize to (out_size, out_size) -> optional horizontal flip.

    Args:
        boxes: (N, 4) xyxy px of the source image.

    Returns:
        (N, 4) boxes on the output image and an (N,) bool keep mask (visible fraction >= ``min_visible``
        and both sides >= ``min_size`` px after resizing).
    """
    cropped, _ = crop_boxes(boxes, crop.top, crop.left, crop.height, crop.width, min_size=0.0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept_area = (cropped[:, 2] - cropped[:, 0]) * (cropped[:, 3] - cropped[:, 1])
    visible = (kept_area > 0) & (kept_area >= min_visible * area)
    out, large = resize_boxes(cropped, (crop.height, crop.width), (out_size, out_size), min_size=min_size)
    if flip:
        out, _ = hflip_boxes(out, (out_size, out_size))
    return out, visible & large


def transform_image(image: torch.Tensor, crop: CropBox, out_size: int, flip: bool) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, out_size, out_size) uint8: crop, bicubic antialiased resize, optional flip."""
    out = TF.resized_crop(image, crop.top, crop.left, crop.height, crop.width, [out_size, out_size],
                          interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.horizontal_flip(out) if flip else out


def _region_tags(region: Region) -> list[str]:
    return [t.name for t in region.tags] or [region.label]


class SampleTransform:
    """Raw webdataset sample (``jpg``, ``json``, ``txt``) -> :class:`Sample`, or None when it has no caption."""

    def __init__(self, spec: TransformSpec, epoch: int = 0):
        self.spec = spec
        self.epoch = epoch

    def caption(self, record: ImageRecord, txt: bytes | None, rng: random.Random) -> str | None:
        kept = [c.text for c in record.captions if c.kept or not self.spec.kept_captions_only]
        if kept:
            return rng.choice(kept)
        fallback = (txt or b"").decode("utf-8").strip()
        return fallback or None

    def __call__(self, raw: dict) -> Sample | None:
        spec, key = self.spec, raw["__key__"]
        record = ImageRecord.model_validate_json(raw["json"])
        rng = random.Random(f"{spec.seed}/{self.epoch}/{key}")  # str seeds hash with sha512: stable across runs
        caption = self.caption(record, raw.get("txt"), rng)
        if caption is None:
            log.debug("sample %s has no caption: skipped", key)
            return None
        with Image.open(io.BytesIO(raw["jpg"])) as pil:  # PIL: torchvision.io decoding is deprecated (0.29)
            image = TF.pil_to_tensor(pil.convert("RGB"))  # (3, H, W) uint8
        if tuple(image.shape[-2:]) != (record.height, record.width):
            raise ValueError(f"{key}: jpg is {tuple(image.shape[-2:])}, record says {(record.height, record.width)}")
        crop = sample_crop(rng, record.height, record.width, spec)
        flip = spec.hflip and rng.random() < 0.5
        regions = [r for r in record.regions if r.captions]  # a region needs a caption to pair with
        boxes = torch.tensor([r.box_xyxy for r in regions], dtype=torch.float32).reshape(-1, 4)
        boxes, keep = transform_boxes(boxes, crop, spec.image_size, flip, spec.min_box_size, spec.min_box_visible)
        kept = keep.nonzero().flatten().tolist()
        if len(kept) > spec.max_regions:
            kept = sorted(rng.sample(kept, spec.max_regions))
        pixels = transform_image(image, crop, spec.image_size, flip).float().div_(255)
        return Sample(
            key=key,
            image=TF.normalize(pixels, list(spec.mean), list(spec.std)),
            caption=caption,
            boxes=boxes[kept],
            region_captions=[rng.choice(regions[i].captions).text for i in kept],
            image_tags=[t.name for t in record.tags],
            region_tags=[_region_tags(regions[i]) for i in kept],
            raw_index=raw.get("__raw__", 0),
        )


class TextTokens:
    """The model tokenizer, with a cache for short repeated strings (tags). ``(texts) -> (n, L) long``."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor], cache_size: int = 100_000):
        self.tokenizer = tokenizer
        self.context_length = int(tokenizer(["x"]).shape[1])
        self.cache: dict[str, torch.Tensor] = {}
        self.cache_size = cache_size

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        return self.tokenizer(list(texts)).long()

    def cached(self, texts: Sequence[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            if len(self.cache) + len(missing) > self.cache_size:
                self.cache.clear()
            self.cache.update(zip(missing, self(missing)))
        if not texts:
            return self(texts)
        return torch.stack([self.cache[t] for t in texts])

    def tag_inputs(self, tags_per_sample: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample tag lists -> ((T, L) vocabulary tokens, (N, T) 0/1 targets)."""
        vocab, targets = build_tag_targets(tags_per_sample)
        return self.cached(vocab), targets


class Collate:
    """A list of :class:`Sample` -> :class:`RegionBatch` (tokenises captions and the batch tag vocabularies)."""

    def __init__(self, tokens: TextTokens, epoch: int = 0):
        self.tokens = tokens
        self.epoch = epoch

    def __call__(self, samples: list[Sample]) -> RegionBatch:
        image_tag_tokens, image_tag_targets = self.tokens.tag_inputs([s.image_tags for s in samples])
        region_tags = [tags for s in samples for tags in s.region_tags]
        region_tag_tokens, region_tag_targets = self.tokens.tag_inputs(region_tags)
        info = torch.utils.data.get_worker_info()
        return RegionBatch(
            images=torch.stack([s.image for s in samples]),
            caption_tokens=self.tokens([s.caption for s in samples]),
            rois=_rois([s.boxes for s in samples]),
            region_caption_tokens=self.tokens([c for s in samples for c in s.region_captions]),
            image_tag_tokens=image_tag_tokens, image_tag_targets=image_tag_targets,
            region_tag_tokens=region_tag_tokens, region_tag_targets=region_tag_targets,
            image_tags=[s.image_tags for s in samples], region_tags=region_tags, keys=[s.key for s in samples],
            epoch=self.epoch, worker=info.id if info is not None else 0,
            raw_end=max(s.raw_index for s in samples) + 1,
        )


def _rois(boxes: list[torch.Tensor]) -> torch.Tensor:
    idx = [torch.full((len(b), 1), float(i)) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(idx), torch.cat(boxes)], dim=1) if boxes else torch.zeros(0, 5)


class _ErrorLog:
    """webdataset handler: log and continue, rate-limited (first 10, then every 100th)."""

    def __init__(self):
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        if self.count <= 10 or self.count % 100 == 0:
            log.warning("skipping bad sample (%d so far): %r", self.count, exn)
        return True


def _worker() -> tuple[int, int]:
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    return rank, worker


def _seeded_shuffle(bufsize: int, initial: int, seed: str):
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        rng = random.Random(f"{seed}/{_worker()}")
        yield from wds.shuffle(bufsize, initial, rng=rng)(src)

    return stage


def _resample_seed(seed: int) -> int:
    # Our seed folded into webdataset's per-rank/worker seed: ``worker_seed`` is the one seeding hook that
    # webdataset 0.2.x (open_clip_train's pin) and 1.x share (1.x alone also takes ``seed=``).
    return hash_seed(seed, wds.utils.pytorch_worker_seed())


def _count_and_skip(skip: dict[int, int]):
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        n = skip.get(_worker()[1], 0)
        for i, sample in enumerate(src):
            if i >= n:
                sample["__raw__"] = i
                yield sample

    return stage


def _take(n: int):
    return lambda src: islice(src, n)


#: URL schemes webdataset's own ``gopen`` opens (``pipe:aws s3 cp … -`` included); others go through fsspec.
_GOPEN_SCHEMES = {"pipe", "http", "https", "sftp", "ftps", "scp"}


def _open_shards(handler: Callable[[Exception], bool]):
    """webdataset's ``url_opener`` with object-store URLs (``s3://``, ``gs://`` …) opened through fsspec: the
    ``gopen`` of webdataset 0.2 (open_clip_train's pin) knows no ``s3://``. Each stream is closed once read."""

    def stage(src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            url = sample["url"]
            if not is_url(url) or scheme(url) in _GOPEN_SCHEMES or url.startswith("pipe:"):
                yield from wds.tariterators.url_opener([sample], handler=handler)
                continue
            try:
                stream = as_path(url).open("rb")
            except Exception as exn:  # noqa: BLE001 - the handler decides, as in url_opener
                if handler(exn):
                    continue
                raise
            try:
                yield {**sample, "stream": stream}
            finally:
                stream.close()

    return stage


def _tar_samples(handler: Callable[[Exception], bool]):
    """``wds.tarfile_to_samples`` over ``_open_shards``: shard URLs -> raw samples (``__key__``, ``jpg`` …)."""
    opener = _open_shards(handler)

    def stage(src: Iterator[dict]) -> Iterator[dict]:
        files = wds.tariterators.tar_file_expander(opener(src), handler=handler)
        return wds.tariterators.group_by_keys(files, handler=handler)

    return stage


def make_dataset(tars: Sequence[str | StoragePath], data: DataSection, spec: TransformSpec, tokens: TextTokens,
                 batch_size: int, *, epoch: int = 0, skip: dict[int, int] | None = None,
                 world_size: int = 1) -> wds.DataPipeline:
    """The per-rank pipeline of one epoch; yields :class:`RegionBatch` (full batches only).

    Args:
        tars: every shard tar of the training set (all ranks pass the same list): paths, ``s3://`` / ``gs://``
            URLs (fsspec) or ``pipe:`` commands (webdataset).
        data: shuffle / resampling / worker settings.
        spec: augmentation (see :class:`TransformSpec`).
        batch_size: images per batch.
        epoch: selects shard order, shuffle and augmentation draws.
        skip: ``{worker id: raw samples to drop}`` to resume mid-epoch.
        world_size: ranks (resampled mode divides ``samples_per_epoch`` among them).
    """
    urls = [str(t) for t in tars]
    if not urls:
        raise ValueError("no shard tars given")
    handler = _ErrorLog()
    if data.resampled:
        n_samples = data.samples_per_epoch or count_samples(tars)
        per_worker = math.ceil(n_samples / (world_size * max(1, data.workers) * batch_size))
        worker_seed = partial(_resample_seed, hash_seed(spec.seed, "shards", epoch))
        source = [wds.ResampledShards(urls, worker_seed=worker_seed, deterministic=True)]
    else:
        if data.shuffle:
            random.Random(f"{spec.seed}/shards/{epoch}").shuffle(urls)
        source = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
    stages = [*source, _tar_samples(handler)]
    if data.shuffle:
        stages.append(_seeded_shuffle(data.shuffle_buffer, data.shuffle_initial, f"{spec.seed}/{epoch}"))
    stages += [
        _count_and_skip(dict(skip or {})),
        wds.map(SampleTransform(spec, epoch), handler=handler),
        wds.batched(batch_size, collation_fn=Collate(tokens, epoch), partial=False),
    ]
    if data.resampled:
        stages.append(_take(per_worker))
    return wds.DataPipeline(*stages)


def make_loader(dataset: wds.DataPipeline, workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Wrap a pipeline of batches in a DataLoader (batching happens in the workers)."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                       persistent_workers=False)


def hash_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike ``hash``)."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


def count_samples(tars: Sequence[str | StoragePath]) -> int:
    """Samples in the shards: ``n_ok`` from each shard's stats file, else by reading the tar."""
    total = 0
    for tar in tars:
        if str(tar).startswith("pipe:"):  # a command's output: read it through
            total += sum(1 for _ in _tar_samples(wds.reraise_exception)([{"url": str(tar)}]))
            continue
        tar = as_path(tar)
        if shard_paths(tar.parent, tar.stem)[".stats.json"].exists():
            total += read_stats(tar.parent, tar.stem).n_ok
        else:
            total += sum(1 for _ in iter_tar_samples(tar))
    return total
