"""Zero-shot image-text retrieval (paper Tab. 3 protocol, as in CLIP and clip_benchmark).

Protocol: every image (preprocessed whole, ``model.preprocess.eval_transform``; full token grid) and
every caption (as written, no template) is embedded; similarities are cosines. Image-to-text (I2T,
``text_retrieval_recall@k``): an image is a hit when ANY of its captions is among the k best captions.
Text-to-image (T2I, ``image_retrieval_recall@k``): a caption is a hit when its image is among the k best
images. k = 1, 5, 10. Ties count against the model (``model.eval.metrics``).

Data: a folder of images and a COCO captions JSON (``model.eval.datasets.read_coco_captions``): COCO
5k (Karpathy test split, 5 captions per image) and Flickr30k 1k test (5 per image) in the paper.
"""

from __future__ import annotations

from pathlib import Path

from model.eval.datasets import read_coco_captions
from model.eval.features import Progress, encode_images, encode_texts
from model.eval.metrics import retrieval_metrics
from model.eval.report import make_result
from model.loading import create_model_and_transforms

TASK = "zeroshot_retrieval"
KS = (1, 5, 10)


def evaluate_retrieval(model, preprocess, tokenizer, images: str | Path, captions: str | Path, *,
                       batch_size: int = 64, device: str = "cpu", workers: int = 0,
                       progress: Progress | None = None) -> tuple[dict[str, float], dict]:
    """Evaluate a loaded model on images + COCO captions.

    Returns:
        ``(metrics, info)``: ``text_retrieval_recall@k`` (I2T) and ``image_retrieval_recall@k`` (T2I)
        for k in 1, 5, 10; info holds the image and caption counts.
    """
    data_set = read_coco_captions(Path(images), Path(captions), preprocess)
    umg = getattr(model, "umg", model)
    image_emb, rows = encode_images(umg, data_set.images, batch_size=batch_size, device=device, workers=workers,
                                    progress=progress)
    text_emb = encode_texts(umg, tokenizer, data_set.captions)
    caption_image = rows.new_tensor(data_set.caption_image)
    metrics = retrieval_metrics(image_emb @ text_emb.T, caption_image, KS)
    return metrics, {"n_images": len(rows), "n_captions": len(data_set.captions)}


def run_retrieval(checkpoint: str, images: str | Path, captions: str | Path, *, device: str = "cpu",
                  cluster_in_eval: bool = False, **kwargs) -> dict:
    """Load ``checkpoint`` and evaluate it; the result dict (dataset = the captions file's stem)."""
    model, preprocess, tokenizer = create_model_and_transforms(checkpoint, device=device,
                                                               cluster_in_eval=cluster_in_eval)
    metrics, info = evaluate_retrieval(model, preprocess, tokenizer, images, captions, device=device, **kwargs)
    return make_result(TASK, Path(captions).stem, str(checkpoint), metrics, **info)
