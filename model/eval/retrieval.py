"""Zero-shot image-text retrieval (paper Tab. 3 protocol, as in CLIP and clip_benchmark).

Protocol (clip_benchmark's ``zeroshot_retrieval``; ``tests/model/eval/test_clip_benchmark.py`` checks the
figures against its own code): every image (the towers' open_clip transform, ``preprocess="model"``:
shorter side to S, centre crop, as clip_benchmark; ``"squash"``: whole image to S x S; full token grid) and
every caption (as written, no template) is embedded; similarities are cosines. Image-to-text (I2T,
``text_retrieval_recall@k``): an image is a hit when ANY of its captions is among the k best captions.
Text-to-image (T2I, ``image_retrieval_recall@k``): a caption is a hit when its image is among the k best
images. k = 1, 5, 10; a k above the number of candidates (texts for I2T, images for T2I) gives null
(clip_benchmark's ``topk`` refuses it). Ties count against the model (``model.eval.metrics``). Images listed
without captions are left out (clip_benchmark's ``CocoCaptions`` keeps them as I2T misses).

Grouped protocol (``group_identical_texts=True``; ``umg eval retrieval --group-identical-texts``): for
data whose captions repeat across images (templated captions such as the digit scenes), where identical
strings embed identically and the standard protocol counts every copy of the right string under another
image as a miss. Each distinct caption string (after the reader's whitespace strip) becomes ONE text
whose positives are all images having it. I2T: an image is a hit when any of its distinct texts is among
the k best distinct texts; T2I: a distinct text is a hit when any image having it is among the k best
images (``model.eval.metrics.multi_positive_retrieval_metrics``). The standard protocol stays the
default: it is what COCO / Flickr numbers in papers mean.

Data: a folder of images and a COCO captions JSON (``model.eval.datasets.read_coco_captions``): COCO
5k (Karpathy test split, 5 captions per image) and Flickr30k 1k test (5 per image) in the paper.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.eval.datasets import read_coco_captions
from model.eval.features import Progress, encode_images, encode_texts
from model.eval.metrics import multi_positive_retrieval_metrics, retrieval_metrics
from model.eval.report import make_result
from model.loading import create_model_and_transforms
from model.preprocess import image_preprocess
from pipeline.storage import as_path

TASK = "zeroshot_retrieval"
KS = (1, 5, 10)


def evaluate_retrieval(model, preprocess, tokenizer, images: str | Path, captions: str | Path, *,
                       batch_size: int = 64, device: str = "cpu", workers: int = 0,
                       progress: Progress | None = None, group_identical_texts: bool = False
                       ) -> tuple[dict[str, float], dict]:
    """Evaluate a loaded model on images + COCO captions.

    Args:
        group_identical_texts: the grouped protocol (module docstring) instead of the standard one.

    Returns:
        ``(metrics, info)``: ``text_retrieval_recall@k`` (I2T) and ``image_retrieval_recall@k`` (T2I)
        for k in 1, 5, 10; info holds the image and caption counts (grouped: also ``n_distinct_texts``
        and ``protocol``).
    """
    data_set = read_coco_captions(images, captions, preprocess)
    umg = getattr(model, "umg", model)
    image_emb, rows = encode_images(umg, data_set.images, batch_size=batch_size, device=device, workers=workers,
                                    progress=progress)
    info = {"n_images": len(rows), "n_captions": len(data_set.captions)}
    if not group_identical_texts:
        text_emb = encode_texts(umg, tokenizer, data_set.captions)
        caption_image = rows.new_tensor(data_set.caption_image)
        return retrieval_metrics(image_emb @ text_emb.T, caption_image, KS), info
    texts, positives = group_texts(data_set.captions, data_set.caption_image, len(rows))
    text_emb = encode_texts(umg, tokenizer, texts)
    metrics = multi_positive_retrieval_metrics(image_emb @ text_emb.T, positives, KS)
    return metrics, {**info, "n_distinct_texts": len(texts), "protocol": "grouped_identical_texts"}


def group_texts(captions: list[str], caption_image: list[int], n_images: int) -> tuple[list[str], torch.Tensor]:
    """Distinct caption strings (first-appearance order) and their (I, U) bool positives matrix."""
    index: dict[str, int] = {}
    for caption in captions:
        index.setdefault(caption, len(index))
    positives = torch.zeros(n_images, len(index), dtype=torch.bool)
    for caption, image in zip(captions, caption_image):
        positives[image, index[caption]] = True
    return list(index), positives


def run_retrieval(checkpoint: str, images: str | Path, captions: str | Path, *, device: str = "cpu",
                  cluster_in_eval: bool = False, preprocess: str = "model", **kwargs) -> dict:
    """Load ``checkpoint`` and evaluate it; the result dict (dataset = the captions file's stem).
    ``preprocess``: ``model`` (the towers' open_clip transform, clip_benchmark's) or ``squash``."""
    model, _, tokenizer = create_model_and_transforms(checkpoint, device=device, cluster_in_eval=cluster_in_eval)
    metrics, info = evaluate_retrieval(model, image_preprocess(model, preprocess), tokenizer, images, captions,
                                       device=device, **kwargs)
    return make_result(TASK, as_path(captions).stem, str(checkpoint), metrics, preprocess=preprocess, **info)
