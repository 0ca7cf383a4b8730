"""Tiny-model materialisation: cached configs load from any working directory."""

from __future__ import annotations

import json
import os

from data_schemas import AnnotateConfig
from pipeline.tiny_models import CACHE_NAME, materialize_backend, materialize_tiny

SCORER = {"backend": "open_clip", "tiny": True}


def _paths_into(cfg: dict, folder: str) -> list[str]:
    return [v for v in cfg.values() if isinstance(v, str) and folder in v]


def test_relative_root_caches_absolute_paths_usable_from_another_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = materialize_tiny(AnnotateConfig(scorer=SCORER), "tiny").scorer
    paths = _paths_into(first, "scorer_default")
    assert paths and all(os.path.isabs(p) for p in paths)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert materialize_tiny(AnnotateConfig(scorer=SCORER), tmp_path / "tiny").scorer == first


def test_stale_relative_cache_is_recreated(tmp_path, monkeypatch):
    root = tmp_path / "tiny"
    made = materialize_backend("scorer", "default", SCORER, root)
    stale = {k: os.path.relpath(v, tmp_path) if v in _paths_into(made, "scorer_default") else v
             for k, v in made.items()}
    assert stale != made
    (root / "scorer_default" / CACHE_NAME).write_text(json.dumps(stale), encoding="utf-8")
    monkeypatch.chdir(root)  # the relative paths do not resolve from here
    assert materialize_backend("scorer", "default", SCORER, root) == made
