"""``umg eval …``: evaluation commands (thin wrappers over ``model.eval``).

Each command prints its result as ONE JSON line last, and with ``--out FILE.json`` also writes
``FILE.json`` and the markdown table ``FILE.md`` next to it (``model.eval.report``). Data options take local paths
or URLs (``s3://bucket/eval/…``, ``pipeline.storage``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from flows.progress import progress_bar

eval_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Evaluate a checkpoint (zero-shot classification, retrieval, regions, segmentation).")

Checkpoint = Annotated[str, typer.Option(
    "--checkpoint", help="run dir, checkpoint dir, .safetensors, adapted dir, or open_clip NAME[:TAG]")]
Out = Annotated[Optional[Path], typer.Option("--out", help="result JSON; FILE.md gets the markdown table")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="images per forward pass")]
Device = Annotated[str, typer.Option("--device", help="torch device, e.g. cpu or cuda")]
Workers = Annotated[int, typer.Option("--workers", min=0, help="DataLoader worker processes")]
ClusterInEval = Annotated[bool, typer.Option("--cluster-in-eval", help="keep token clustering at inference")]


@contextmanager
def _image_progress() -> Iterator[Callable[[int, int], None]]:
    """Yield ``progress(done, total)``; draws an image bar on stderr when it is a terminal."""
    from flows.cli import console

    if not console.is_terminal:
        yield lambda done, total: None
        return
    with progress_bar(console) as bar:
        task = bar.add_task("images", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _run(evaluate: Callable[..., dict], out: Path | None, **kwargs) -> None:
    """Run one evaluation with a progress bar; data errors become one ``error:`` line (exit 2)."""
    from flows.cli import _fail
    from model.eval.datasets import EvalDataError
    from model.eval.report import result_line, write_result

    try:
        with _image_progress() as progress:
            result = evaluate(progress=progress, **kwargs)
    except (EvalDataError, FileNotFoundError, RuntimeError) as exc:
        _fail(str(exc))
    if out is not None:
        write_result(result, out)
    typer.echo(result_line(result))


Preprocess = Annotated[str, typer.Option(
    "--preprocess", help="model: the towers' open_clip transform (shorter side, centre crop; clip_benchmark's); "
    "squash: the whole image resized to S x S")]


@eval_app.command()
def zeroshot(
    checkpoint: Checkpoint,
    data: Annotated[str, typer.Option("--data", help="ImageFolder: one sub-folder per class")],
    classnames: Annotated[Optional[str], typer.Option(
        "--classnames", help="one class name per line, sorted folder order (default DATA/classnames.txt)")] = None,
    templates: Annotated[Optional[str], typer.Option(
        "--templates", help="one prompt per line with {} (default DATA/templates.txt, else built-in)")] = None,
    batch_size: BatchSize = 64,
    out: Out = None,
    device: Device = "cpu",
    workers: Workers = 0,
    cluster_in_eval: ClusterInEval = False,
    preprocess: Preprocess = "model",
) -> None:
    """Zero-shot classification: prompt-ensembled classifier; acc1, acc5, mean per-class recall."""
    from model.eval.zeroshot import run_zeroshot

    _run(run_zeroshot, out, checkpoint=checkpoint, data=data, classnames_file=classnames, templates_file=templates,
         batch_size=batch_size, device=device, workers=workers, cluster_in_eval=cluster_in_eval,
         preprocess=preprocess)


@eval_app.command()
def retrieval(
    checkpoint: Checkpoint,
    images: Annotated[str, typer.Option("--images", help="folder the captions' file_name values are under")],
    captions: Annotated[str, typer.Option("--captions", help="COCO captions JSON (any number per image)")],
    batch_size: BatchSize = 64,
    out: Out = None,
    device: Device = "cpu",
    workers: Workers = 0,
    cluster_in_eval: ClusterInEval = False,
    group_identical_texts: Annotated[bool, typer.Option(
        "--group-identical-texts",
        help="one text per distinct caption string, positives = all images having it (for repeated captions)")
    ] = False,
    preprocess: Preprocess = "model",
) -> None:
    """Image-text retrieval: I2T and T2I recall@1/5/10."""
    from model.eval.retrieval import run_retrieval

    _run(run_retrieval, out, checkpoint=checkpoint, images=images, captions=captions, batch_size=batch_size,
         device=device, workers=workers, cluster_in_eval=cluster_in_eval, group_identical_texts=group_identical_texts,
         preprocess=preprocess)


Templates = Annotated[Optional[str], typer.Option(
    "--templates", help="one prompt per line with {} (default: templates.txt beside the annotations/classes)")]
Limit = Annotated[Optional[int], typer.Option("--limit", min=1, help="evaluate only the first N images")]


@eval_app.command()
def regions(
    checkpoint: Checkpoint,
    images: Annotated[str, typer.Option("--images", help="folder the annotations' file_name values are under")],
    annotations: Annotated[str, typer.Option("--annotations", help="COCO instances JSON (GT boxes, categories)")],
    templates: Templates = None,
    topk: Annotated[Optional[int], typer.Option(
        "--topk", min=1, help="categories submitted per box for box AP (default: all)")] = None,
    attribute: Annotated[Optional[str], typer.Option(
        "--attribute", help="classify this annotation field instead of the category, e.g. umg.color")] = None,
    batch_size: BatchSize = 16,
    limit: Limit = None,
    out: Out = None,
    device: Device = "cpu",
    cluster_in_eval: ClusterInEval = False,
) -> None:
    """Region zero-shot classification of GT boxes: acc1, acc5, mean per-class recall, COCOeval box AP."""
    from model.eval.region_eval import run_regions

    _run(run_regions, out, checkpoint=checkpoint, images=images, annotations=annotations, templates_file=templates,
         topk=topk, attribute=attribute, batch_size=batch_size, limit=limit, device=device,
         cluster_in_eval=cluster_in_eval)


@eval_app.command()
def seg(
    checkpoint: Checkpoint,
    images: Annotated[str, typer.Option("--images", help="folder of the images")],
    masks: Annotated[str, typer.Option("--masks", help="PNG label maps, same stems as the images")],
    classes: Annotated[str, typer.Option("--classes", help="class names, line i = label value i")],
    panoptic: Annotated[Optional[str], typer.Option(
        "--panoptic", help="COCO panoptic JSON: also PQ / SQ / RQ")] = None,
    panoptic_masks: Annotated[Optional[str], typer.Option(
        "--panoptic-masks", help="folder of the panoptic PNGs (default: the JSON's path without .json)")] = None,
    templates: Templates = None,
    ignore_index: Annotated[int, typer.Option("--ignore-index", min=0, help="label value of ignored pixels")] = 255,
    reduce_zero_label: Annotated[bool, typer.Option(
        "--reduce-zero-label", help="label 0 is ignored and v -> v - 1 (raw ADE20K = A-150, VOC = PAS-20)")] = False,
    miou_convention: Annotated[str, typer.Option(
        "--miou-convention", help="detectron2: classes absent from the GT are left out of mIoU (the paper's, "
                                  "FC-CLIP's); mmseg: a class only predicted counts IoU 0")] = "detectron2",
    dense_features: Annotated[str, typer.Option(
        "--dense-features", help="training-free mode: tokens (final-layer tokens) or maskclip (MaskCLIP's "
                                 "value-embedding path in the last block)")] = "tokens",
    short_side: Annotated[Optional[int], typer.Option(
        "--short-side", min=1, help="detectron2's test geometry instead of the squash: shorter side N (FC-CLIP: "
                                    "800), aspect kept, padded; one image per forward")] = None,
    max_side: Annotated[int, typer.Option("--max-side", min=1, help="with --short-side: longer side cap")] = 1333,
    batch_size: BatchSize = 8,
    limit: Limit = None,
    out: Out = None,
    device: Device = "cpu",
    cluster_in_eval: ClusterInEval = False,
) -> None:
    """Semantic segmentation mIoU / pixel accuracy (training-free or adapted model), PQ with --panoptic."""
    from flows.cli import _fail
    from model.eval.seg_eval import run_seg
    from model.eval.seg_metrics import MIOU_CONVENTIONS
    from model.eval.segmenter import DENSE_FEATURES

    if miou_convention not in MIOU_CONVENTIONS:
        _fail(f"--miou-convention must be one of {', '.join(MIOU_CONVENTIONS)}, got {miou_convention!r}")
    if dense_features not in DENSE_FEATURES:
        _fail(f"--dense-features must be one of {', '.join(DENSE_FEATURES)}, got {dense_features!r}")
    _run(run_seg, out, checkpoint=checkpoint, images=images, masks=masks, classes=classes, templates_file=templates,
         panoptic=panoptic, panoptic_masks=panoptic_masks, ignore_index=ignore_index,
         reduce_zero_label=reduce_zero_label, miou_convention=miou_convention, dense_features=dense_features,
         short_side=short_side, max_side=max_side, batch_size=batch_size,
         limit=limit, device=device, cluster_in_eval=cluster_in_eval)
