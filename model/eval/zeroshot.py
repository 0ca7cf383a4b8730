"""Zero-shot image classification (paper Tab. 2 protocol, as in CLIP and clip_benchmark).

Protocol (clip_benchmark's ``zeroshot_classification``; ``tests/model/eval/test_clip_benchmark.py`` runs
clip_benchmark's own code on the same exported model and data and gets the same figures): every class
name is put into each prompt template verbatim (no article rewriting); the prompt embeddings are
normalised, averaged per class and normalised again (prompt ensembling, ``model.eval.prompts``). Each image
goes through the towers' own open_clip transform (``preprocess="model"``, ``model.preprocess``: shorter side
to S, centre crop, as clip_benchmark; ``"squash"`` resizes the whole image to S x S instead), is embedded
with the full token grid (no token clustering), and scored against the class embeddings by cosine
similarity. Reported: top-1 and top-5 accuracy (``acc1``, ``acc5``; ``acc5`` is null with fewer than 5
classes, where clip_benchmark reports NaN) and mean per-class recall (``mean_per_class_recall``, the mean
of per-class top-1 recall, sklearn's ``balanced_accuracy_score`` there; clip_benchmark reports it for the
datasets where it is the official metric, e.g. FGVC-Aircraft, Pets, Caltech-101, Flowers). Ties count
against the model (``model.eval.metrics``; clip_benchmark's ``topk`` / ``argmax`` break them by index —
with real-valued embeddings exact ties do not occur). Precision: fp32 (clip_benchmark's ``--amp``
default autocasts).

Data: an ImageFolder (``model.eval.datasets.read_image_folder``), e.g. ImageNet's ``val/`` arranged in
WNID folders with ``classnames.txt`` holding the 1,000 names and ``templates.txt`` the 80 CLIP
templates (both as in clip_benchmark's ``zeroshot_classification`` metadata).
"""

from __future__ import annotations

from pathlib import Path

from model.eval.datasets import read_image_folder
from model.eval.features import Progress, encode_images
from model.eval.metrics import classification_metrics
from model.eval.prompts import DEFAULT_TEMPLATES, class_text_embeddings
from model.eval.report import make_result
from model.loading import create_model_and_transforms
from model.preprocess import image_preprocess
from pipeline.storage import as_path

TASK = "zeroshot_classification"


def evaluate_zeroshot(model, preprocess, tokenizer, data: str | Path, *, classnames_file: Path | None = None,
                      templates_file: Path | None = None, batch_size: int = 64, device: str = "cpu",
                      workers: int = 0, progress: Progress | None = None) -> tuple[dict[str, float], dict]:
    """Evaluate a loaded model (``model.loading.create_model_and_transforms``) on an ImageFolder.

    Returns:
        ``(metrics, info)``: ``acc1``, ``acc5``, ``mean_per_class_recall``; info holds the image and
        class counts and the templates used.
    """
    data_set = read_image_folder(data, preprocess, classnames_file, templates_file)
    umg = getattr(model, "umg", model)
    classifier = class_text_embeddings(umg, tokenizer, data_set.classnames, data_set.templates).cpu()
    images, targets = encode_images(umg, data_set.images, batch_size=batch_size, device=device, workers=workers,
                                    progress=progress)
    metrics = classification_metrics(images @ classifier.T, targets)
    info = {"n_images": len(targets), "n_classes": len(data_set.classnames),
            "templates": data_set.templates or list(DEFAULT_TEMPLATES)}
    return metrics, info


def run_zeroshot(checkpoint: str, data: str | Path, *, device: str = "cpu", cluster_in_eval: bool = False,
                 preprocess: str = "model", **kwargs) -> dict:
    """Load ``checkpoint`` (any form ``create_model_and_transforms`` takes) and evaluate it; the result dict.
    ``preprocess``: ``model`` (the towers' open_clip transform, clip_benchmark's) or ``squash``."""
    model, _, tokenizer = create_model_and_transforms(checkpoint, device=device, cluster_in_eval=cluster_in_eval)
    metrics, info = evaluate_zeroshot(model, image_preprocess(model, preprocess), tokenizer, data, device=device,
                                      **kwargs)
    return make_result(TASK, as_path(data).name, str(checkpoint), metrics, preprocess=preprocess, **info)
