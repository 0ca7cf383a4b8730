"""Materialise ``tiny: true`` backend configs into real tiny random-initialised models on disk.

``configs/smoke.yaml`` marks each backend ``tiny: true`` instead of naming a checkpoint. Before a
build, ``materialize_tiny`` calls the backend class's ``create_tiny(dir)`` (which writes a small
model with the library's own config classes and returns the config that loads it through the
real loading path), merges the user's other keys (``batch_size``, ``threshold`` …) over it, and
caches the result in ``<root>/<kind>_<name>/tiny_config.json`` so later builds reuse it.
Such models produce structurally valid but meaningless annotations: they exist for smoke runs
and tests, never for real data.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from annotators.registry import resolve
from data_schemas import AnnotateConfig

log = logging.getLogger(__name__)

CACHE_NAME = "tiny_config.json"
NAMED_KINDS = {"captioners": "captioner", "detectors": "detector", "region_captioners": "region_captioner"}
SINGLE_KINDS = ("tagger", "scorer", "segmenter", "background")


def materialize_backend(kind: str, name: str, cfg: dict[str, Any], root: Path) -> dict[str, Any]:
    """The config that loads a tiny model for ``cfg`` (unchanged when ``cfg`` has no ``tiny: true``)."""
    nested = cfg.get("captioner")
    if isinstance(nested, dict):  # the crop region captioner wraps a captioner config
        cfg = {**cfg, "captioner": materialize_backend("captioner", f"{name}_inner", nested, root)}
    if not cfg.get("tiny"):
        return cfg
    target = root / f"{kind}_{name}"
    cache = target / CACHE_NAME
    created = json.loads(cache.read_text("utf-8")) if cache.exists() else None
    if created is not None and not _paths_exist(created, target):
        log.info("tiny %s backend cache %s names missing paths (relative cache?): recreating", kind, cache)
        created = None
    if created is None:
        log.info("creating tiny %s backend %r in %s", kind, cfg["backend"], target)
        target.mkdir(parents=True, exist_ok=True)
        created = resolve(kind, cfg["backend"]).create_tiny(target)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(created, sort_keys=True, default=str), encoding="utf-8")
        tmp.replace(cache)
    user = {k: v for k, v in cfg.items() if k != "tiny"}
    return {**created, **user}


def _paths_exist(created: dict[str, Any], target: Path) -> bool:
    """Whether every string of a cached config that names a file under ``target`` is absolute and exists
    (caches written from a relative ``tiny_models_dir`` by older versions are not)."""
    paths = [v for v in created.values() if isinstance(v, str) and target.name in v]
    return all(Path(v).is_absolute() and Path(v).exists() for v in paths)


def materialize_tiny(cfg: AnnotateConfig, root: str | Path) -> AnnotateConfig:
    """A copy of ``cfg`` with every ``tiny: true`` backend replaced by a config loading its tiny model."""
    root = Path(root).resolve()  # cached configs hold absolute paths: builds from any cwd load them
    update: dict[str, Any] = {}
    for field in SINGLE_KINDS:
        backend = getattr(cfg, field)
        if backend:
            update[field] = materialize_backend(field, "default", backend, root)
    for field, kind in NAMED_KINDS.items():
        update[field] = {n: materialize_backend(kind, n, c, root) for n, c in getattr(cfg, field).items()}
    return cfg.model_copy(update=update)


def prepare_chain(cfg: AnnotateConfig | None):
    """The loaded ``Chain`` for ``cfg`` (tiny backends materialised first), or None without annotators."""
    from pipeline.stages import Chain

    if cfg is None:
        return None
    chain = Chain.from_config(materialize_tiny(cfg, cfg.tiny_models_dir))
    chain.load()
    return chain
