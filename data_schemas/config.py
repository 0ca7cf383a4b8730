"""Typed configs validated from YAML (``yaml.safe_load``); errors name the bad field and file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator


def _location(value: Any) -> Any:
    """A URL (``s3://bucket/x``) stays a string (``Path`` would fold ``//``); a path or ``file://`` URL is a Path."""
    if isinstance(value, str) and "://" in value:
        scheme, _, rest = value.partition("://")
        return Path(rest or "/") if scheme.lower() in ("file", "local") else value
    return Path(value) if isinstance(value, str) else value


#: A local path or a storage URL (``s3://``, ``gs://`` …; ``pipeline.storage.as_path`` opens either).
Location = Annotated[Path | str, BeforeValidator(_location)]

SourceKind = Literal["auto", "folder", "img2dataset", "coco", "vg"]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageLimits(_Config):
    """Decode guards. ``max_pixels`` rejects decompression bombs before the pixels are decoded."""

    max_pixels: int = Field(default=64_000_000, gt=0, description="width*height above this is an error row")
    max_side: int = Field(default=16_384, gt=0, description="either side above this is an error row")
    jpeg_quality: int = Field(default=95, ge=1, le=100, description="quality when an input must be re-encoded")
    max_model_pixels: int = Field(default=4096 * 4096, gt=0, description="images over this many pixels are stored "
                                  "(ok + note) but not given to the model stages, whose buffers scale with them")
    max_model_aspect: float = Field(default=20.0, ge=1.0, description="images whose long side is more than this "
                                    "many times the short one are stored (ok + note) but not given to the model "
                                    "stages (their resizing rounds the short side to 0 pixels)")


class SourceConfig(_Config):
    """Where inputs come from. ``path`` is a folder, a tar/parquet folder, or an annotation root."""

    kind: SourceKind = "auto"
    path: Location | None = Field(default=None, description="a local path or a URL (s3://bucket/prefix, gs://…)")
    annotations: Location | None = Field(default=None, description="COCO instances / VG region_descriptions JSON")
    captions: Location | None = Field(default=None, description="COCO captions JSON (optional)")
    image_dir: Location | None = Field(default=None, description="image folder for COCO / VG annotations")
    follow_symlinks: list[Path] = Field(
        default_factory=list,
        description="folders outside the input root that symlinked inputs may point into (default: none; "
        "a link resolving outside the root is an error row `outside_root`)")
    max_image_bytes: int = Field(default=256 * 2**20, gt=0, description="image files (and tar members) above "
                                 "this many bytes are error rows `too_large`, refused before reading")
    max_text_bytes: int = Field(default=2**20, gt=0, description="caption sidecars / tar text members above "
                                "this many bytes are skipped with a note, before reading")
    allow_hard_links: bool = Field(default=False, description="read files with more than one hard link (default: "
                                   "an error row `hard_link`, since another name of one may lie outside the root)")
    max_annotation_bytes: int = Field(default=2 * 2**30, gt=0, description="a COCO / VG annotation or caption "
                                      "JSON above this many bytes is refused (one error line) before reading")

    @field_validator("path", "annotations", "captions", "image_dir", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        """An empty path would be the current directory: refuse it instead of reading whatever is there."""
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty; name a file or folder (an empty path would read the current directory)")
        return value


BackendConfig = dict[str, Any]
"""One annotator backend: ``{"backend": name, ...backend keys}``; the backend's ``from_config`` validates it."""


class MergeConfig(_Config):
    """Paper §3: drop boxes under ``score_threshold`` (0.3), then NMS across both detectors.

    The two detectors have different vocabularies (BigDetection 600 classes, V3Det 13k): class-aware NMS on
    raw label strings keeps one object once per synonym, so the default is class-agnostic; ``label_map``
    (synonym -> shared label) makes class-aware merging compare labels in one vocabulary.
    """

    score_threshold: float = Field(default=0.3, ge=0.0, le=1.0)
    iou_threshold: float = Field(default=0.5, gt=0.0, le=1.0, description="not given in the paper")
    class_aware: bool = Field(default=False, description="NMS only among boxes of one label (after label_map)")
    label_map: dict[str, str] | Path | None = Field(
        default=None, description="synonym -> shared label, inline or a YAML/JSON mapping file; output labels mapped")
    max_regions: int = Field(default=50, gt=0, description="highest-scoring boxes kept per image")
    min_box_side: float = Field(default=2.0, ge=0.0, description="pixels; smaller boxes are dropped")


class CaptionFilterConfig(_Config):
    """CLIP-score caption filter; the paper gives no threshold."""

    threshold: float = Field(default=0.2, ge=-1.0, le=1.0, description="cosine similarity; below -> kept: false")


class StabilityConfig(_Config):
    """Box-jitter mask stability (paper App. C); shifts and threshold are not given in the paper (ours)."""

    diagonal_fractions: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(
        default_factory=lambda: [0.05, 0.1, 0.15], min_length=1,
        description="each box is shifted by +-f of its own diagonal, along that diagonal, for each f")
    threshold: float = Field(default=0.8, ge=0.0, le=1.0, description="mean IoU under jitter; below -> mask dropped")

    @model_validator(mode="before")
    @classmethod
    def _no_pixel_offsets(cls, data: Any) -> Any:
        if isinstance(data, dict) and "offsets" in data:
            raise ValueError("stability.offsets (fixed pixels) was replaced by diagonal_fractions "
                             "(fractions of each box's diagonal, e.g. [0.05, 0.1, 0.15])")
        return data


class AnnotateConfig(_Config):
    """The annotation stage chain; a stage whose backend is absent (null / empty) is skipped."""

    tagger: BackendConfig | None = None
    captioners: dict[str, BackendConfig] = Field(default_factory=dict, description="name -> backend config")
    scorer: BackendConfig | None = None
    caption_filter: CaptionFilterConfig = Field(default_factory=CaptionFilterConfig)
    detectors: dict[str, BackendConfig] = Field(default_factory=dict, description="name -> backend config")
    merge: MergeConfig = Field(default_factory=MergeConfig)
    region_captioners: dict[str, BackendConfig] = Field(default_factory=dict)
    min_region_captions: int = Field(
        default=0, ge=0, description="detected regions with fewer distinct captions (after de-duplication across "
        "region captioners) are dropped; the paper keeps >= 4 per region (0: keep all)")
    segmenter: BackendConfig | None = None
    stability: StabilityConfig | None = Field(default_factory=StabilityConfig, description="null skips jitter")
    background: BackendConfig | None = None
    keep_known: bool = Field(default=True, description="keep annotations that came with the input")
    tiny_models_dir: Path = Field(
        default=Path(".cache/umg-tiny-models"), description="where `tiny: true` backends are created (smoke runs)"
    )

    def model_stages(self) -> dict[str, tuple[str, BackendConfig]]:
        """Stage name -> (annotator kind, backend config) of every model stage, named as the stage chain names them
        (``tagger``, ``captioner_<name>``, ``scorer``, ``detector_<name>``, ``region_captioner_<name>``,
        ``segmenter`` (whose pool also serves ``stability``), ``background``)."""
        named = {"tagger": ("tagger", self.tagger), "scorer": ("scorer", self.scorer),
                 "segmenter": ("segmenter", self.segmenter), "background": ("background", self.background)}
        out = {stage: (kind, backend) for stage, (kind, backend) in named.items() if backend}
        for kind, group in (("captioner", self.captioners), ("detector", self.detectors),
                            ("region_captioner", self.region_captioners)):
            out.update({f"{kind}_{name}": (kind, backend) for name, backend in group.items()})
        return out


#: Annotator kinds whose outputs carry no pixel coordinates: they may take downscaled images (``max_side``).
IMAGE_LEVEL_KINDS = ("tagger", "captioner", "scorer")


class StageResources(_Config):
    """Ray actors for one annotator stage (``ray.resources[<stage name or kind>]``)."""

    num_cpus: float = Field(default=0.25, ge=0.0, description="CPUs reserved per actor (fractions allowed)")
    num_gpus: float = Field(default=0.0, ge=0.0, description="GPUs per actor; 0.5 packs two actors on one GPU")
    pool_size: int = Field(default=1, gt=0, description="actors (model copies) in the stage's pool")
    batch_size: int = Field(default=8, gt=0, description="images per actor call")
    max_side: int | None = Field(
        default=None, gt=0, description="send this stage its images downscaled to this longest side at the source "
        "(only stages of the kinds in IMAGE_LEVEL_KINDS, whose outputs carry no pixel coordinates)")
    runtime_env: dict[str, Any] | None = Field(
        default=None, description="Ray runtime_env of this stage's actors, merged over ray.runtime_env: e.g. "
        "{py_executable: /opt/gpt4roi-venv/bin/python} or {image_uri: ...} for a backend with conflicting pins")

    @field_validator("num_gpus")
    @classmethod
    def _whole_above_one(cls, value: float) -> float:
        if value > 1 and not float(value).is_integer():
            raise ValueError(f"num_gpus above 1 must be a whole number (Ray's rule), got {value}")
        return value


class RayConfig(_Config):
    """Where the annotator actors run and how a shard streams through them (docs/orchestration.md)."""

    mode: Literal["stages", "chain"] = Field(
        default="stages", description="stages: one actor pool per model stage; chain: each actor runs every stage "
        "(one process loads all models: fastest start on a small CPU box; resources key `chain`)")
    address: str | None = Field(default=None, description="null: start a local Ray; else ray.init(address=...)")
    num_cpus: int | None = Field(default=None, gt=0, description="local Ray CPUs (null: all cores)")
    num_gpus: int | None = Field(default=None, ge=0, description="local Ray GPUs (null: detected)")
    loopback: bool = Field(default=True, description="local Ray listens on 127.0.0.1 only")
    runtime_env: dict[str, Any] | None = Field(default=None, description="ray.init runtime_env (env_vars, ...)")
    batch_size: int = Field(default=16, gt=0, description="images per batch streamed through the chain")
    max_in_flight: int = Field(default=4, gt=0, description="batches of a shard in the chain at once")
    actor_start_timeout_s: float = Field(default=300.0, gt=0.0, description="model load deadline per actor")
    share_images: bool = Field(default=True, description="put each image into the object store once and pass "
                               "references to every pool (false: pickle the pixels into every actor call)")
    default: StageResources = Field(default_factory=StageResources)
    resources: dict[str, StageResources] = Field(
        default_factory=dict, description="per stage: key is a stage name (detector_bigdet) or a kind (detector)"
    )

    def resources_for(self, stage: str, kind: str) -> StageResources:
        """``resources[stage]``, else ``resources[kind]``, else ``default``."""
        return self.resources.get(stage) or self.resources.get(kind) or self.default


class BreakerConfig(_Config):
    """Circuit breaker of a shard: when one annotation stage fails on most of a shard's inputs, the fault is the
    infrastructure (bad CUDA context, wrong config), not the images: the shard fails and stays unfinished instead
    of being committed full of error rows that resume would skip."""

    max_stage_failure: float = Field(default=0.5, gt=0.0, le=1.0, description="fraction of a shard's decoded "
                                     "inputs one stage may fail on; above it the shard fails")
    min_inputs: int = Field(default=4, ge=1, description="shards with fewer decoded inputs never trip")


class FlowConfig(_Config):
    """Prefect settings of the ``build-umg41m`` flow."""

    concurrent_shards: int = Field(default=1, ge=1, description="shards in progress at once; above 1 each shard "
                                   "(ingest, annotate through the shared pools, write) runs as a Ray task")
    shard_num_cpus: float = Field(default=1.0, gt=0.0, description="CPUs reserved per shard task (ingest/write)")
    shard_retries: int = Field(default=2, ge=0, description="retries of a failed shard task")
    retry_delay_s: list[float] = Field(default_factory=lambda: [2.0, 10.0, 30.0], description="backoff per retry")
    overlays: int = Field(default=3, ge=0, description="overlay pictures in the QA report")
    key_partitions: int = Field(default=0, ge=0, description="Ray actors sharing the build's key ledger when "
                                "shards run as tasks (0: one per million planned inputs, at least 2)")


class BuildConfig(_Config):
    """Everything a build needs: where inputs come from, how they are sharded, and the annotators."""

    source: SourceConfig = Field(default_factory=SourceConfig)
    output: Location | None = Field(default=None, description="build directory: a local path or a URL")
    shard_size: int = Field(default=256, gt=0, description="inputs per shard; fixes the deterministic plan")
    lease_ttl_s: float = Field(default=60.0, gt=0.0, description="s3:// and gs:// outputs: seconds a build's "
                               "lease on the output lives unrenewed (renewed every third of it); a killed build's "
                               "lease is taken over after this")
    lock_output: bool = Field(default=True, description="keep other builds out of the output (flock locally, a "
                              "lease on s3:// and gs://); false only where you ensure one build per output "
                              "yourself, e.g. an object store without conditional writes")
    images: ImageLimits = Field(default_factory=ImageLimits)
    annotate: AnnotateConfig | None = Field(default=None, description="null: ground truth only (no models)")
    ray: RayConfig = Field(default_factory=RayConfig, description="annotator actor pools (flows/build.py)")
    breaker: BreakerConfig = Field(default_factory=BreakerConfig, description="fail a shard a stage mostly failed")
    flow: FlowConfig = Field(default_factory=FlowConfig, description="retries and reports of the Prefect flow")

    @model_validator(mode="after")
    def _resources_name_stages(self) -> BuildConfig:
        """Every ``ray.resources`` key names a configured stage, its kind, or ``chain`` (a typo would silently
        leave a 7B model on the CPU default)."""
        if self.annotate is None or not self.ray.resources:
            return self
        stages = self.annotate.model_stages()
        known = {*stages, *(kind for kind, _ in stages.values()), "chain"}
        unknown = sorted(set(self.ray.resources) - known)
        if unknown:
            raise ValueError(f"ray.resources: {unknown} name no configured stage; stages: {sorted(stages)} "
                             f"(or their kinds, or 'chain')")
        kinds = {stage: kind for stage, (kind, _) in stages.items()}
        geometric = sorted(key for key, res in self.ray.resources.items()
                           if res.max_side is not None and kinds.get(key, key) not in IMAGE_LEVEL_KINDS)
        if geometric:
            raise ValueError(f"ray.resources: max_side on {geometric}: their outputs are pixel boxes or masks of the "
                             f"full image; only {list(IMAGE_LEVEL_KINDS)} stages take downscaled images")
        return self


class ConfigError(ValueError):
    """A config file or override failed validation; the message names every bad field."""


C = TypeVar("C", bound=BaseModel)


def _apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form dotted.key=value")
    dotted, raw = override.split("=", 1)
    node = tree
    parts = dotted.strip().split(".")
    if not all(part.strip() for part in parts):
        raise ConfigError(f"override {override!r}: the key {dotted!r} has an empty part (form: dotted.key=value)")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: the value is not valid YAML: {' '.join(str(exc).split())}") from exc


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    model: type[C] = BuildConfig,
    section: str | None = "build",
) -> C:
    """Read ``path`` (YAML, safe loader), take its ``section`` (``build:``, ``train:`` …), apply
    ``a.b=value`` overrides to that section, and validate it into ``model``.

    A project config file holds one top-level key per section (``configs/smoke.yaml``); a file
    without that key is taken whole, so a plain ``BuildConfig`` file works too. ``section=None``
    always takes the whole file.

    Raises:
        ConfigError: naming the file and each bad field (``images.max_pixels: ...``).
    """
    origin = str(path) if path is not None else "<defaults>"
    tree: dict[str, Any] = {}
    if path is not None:
        if Path(path).exists() and not Path(path).is_file() and not Path(path).is_dir():  # a FIFO would block
            raise ConfigError(f"config file {origin} is not a regular file (a FIFO, socket or device)")
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {origin} does not exist") from exc
        except IsADirectoryError as exc:
            raise ConfigError(f"config file {origin} is a directory, not a YAML file") from exc
        except (OSError, UnicodeDecodeError) as exc:  # permission denied, a FIFO, binary bytes …
            raise ConfigError(f"config file {origin} cannot be read as UTF-8 text: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{origin}: top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded or {}
        if section is not None and section in tree:
            tree = tree[section] if tree[section] is not None else {}
            if not isinstance(tree, dict):
                raise ConfigError(f"{origin}: section {section!r} must be a mapping")
            origin = f"{origin} [{section}]"
    for override in overrides or []:
        _apply_override(tree, override)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{origin}: {problems}") from exc
