"""SAM segmenter with a tiny random ``Sam`` saved as a checkpoint and loaded through the real path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import annotators
from annotators import AnnotatorError, SegmentOutput
from annotators.segmenter import SAM_BUILDERS, SamSegmenter


def make_boxes(images, counts=(3, 5, 2), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    boxes = []
    for image, n in zip(images, counts, strict=True):
        xy = rng.uniform(0, 0.5, size=(n, 2)) * (image.width, image.height)
        wh = rng.uniform(0.2, 0.5, size=(n, 2)) * (image.width, image.height)
        boxes.append(np.concatenate([xy, xy + wh], axis=1).astype(np.float32))
    return boxes


class PredictorSpy:
    """Records the image batches of the image encoder (``set_image_calls``: images encoded) and the box batches of
    the mask decoder of a loaded segmenter, and the dtype each computes in."""

    def __init__(self, segmenter, monkeypatch):
        self.image_batches, self.box_batches, self.dtypes = [], [], set()
        model = segmenter.predictor.model
        encode, decode = model.image_encoder.forward, model.mask_decoder.forward

        def spy_encode(pixels, *args, **kwargs):
            self.image_batches.append(pixels.shape[0])
            return encode(pixels, *args, **kwargs)

        def spy_decode(*args, **kwargs):
            self.box_batches.append(kwargs["sparse_prompt_embeddings"].shape[0])
            return decode(*args, **kwargs)

        monkeypatch.setattr(model.image_encoder, "forward", spy_encode)
        monkeypatch.setattr(model.mask_decoder, "forward", spy_decode)
        for name in ("image_encoder", "mask_decoder"):  # the dtype the first linear layer of each computes in
            first = next(m for m in getattr(model, name).modules() if isinstance(m, torch.nn.Linear))
            handle = first.register_forward_hook(lambda m, i, out, name=name: self.dtypes.add((name, out.dtype)))
            monkeypatch.setattr(self, f"_{name}_hook", handle, raising=False)

    @property
    def set_image_calls(self) -> int:
        return sum(self.image_batches)


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> dict:
    return SamSegmenter.create_tiny(tmp_path_factory.mktemp("tiny_sam"))


@pytest.fixture(scope="module")
def segmenter(tiny_cfg, load):
    return load("segmenter", tiny_cfg)


@pytest.fixture
def fresh(tiny_cfg, load):
    """A loaded segmenter with an empty embedding cache (for counting encoder calls)."""
    return load("segmenter", tiny_cfg)


def check_outputs(outputs, images, boxes) -> None:
    assert len(outputs) == len(images)
    for output, image, image_boxes in zip(outputs, images, boxes, strict=True):
        assert isinstance(output, SegmentOutput)
        n = len(image_boxes)
        assert output.masks.shape == (n, image.height, image.width) and output.masks.dtype == np.bool_
        assert output.scores.shape == (n,) and output.scores.dtype == np.float32


def test_build_and_version(segmenter, tiny_cfg):
    assert isinstance(segmenter, SamSegmenter)
    assert (segmenter.kind, segmenter.name) == ("segmenter", "sam")
    assert segmenter.version == "vit_tiny:sam_vit_tiny.pth"
    assert {"vit_h", "vit_l", "vit_b"} <= set(SAM_BUILDERS)


def test_masks_at_each_image_size(segmenter, images):
    boxes = make_boxes(images)
    check_outputs(segmenter(images, boxes), images, boxes)


def test_one_encoding_and_one_decoder_call_per_image(fresh, monkeypatch, images):
    boxes = make_boxes(images, counts=(4, 0, 7))
    spy = PredictorSpy(fresh, monkeypatch)
    outputs = fresh(images, boxes)
    check_outputs(outputs, images, boxes)
    assert spy.set_image_calls == 2  # the image without boxes is never encoded
    assert spy.box_batches == [4, 7]
    assert all(output.stability is None for output in outputs)


def test_empty_boxes_do_not_call_the_model(fresh, monkeypatch, images):
    empty = [np.zeros((0, 4), dtype=np.float32)] * 3
    spy = PredictorSpy(fresh, monkeypatch)
    outputs = fresh(images, empty)
    check_outputs(outputs, images, empty)
    assert spy.set_image_calls == 0 and spy.box_batches == []
    assert fresh.segment_boxes(images[0], np.zeros((0, 4))).shape == (0, 48, 64)


def test_batching_equals_one_by_one(segmenter, make_images):
    images = make_images(seed=1)
    boxes = make_boxes(images, seed=1)
    batched = segmenter(images, boxes)
    for image, image_boxes, output in zip(images, boxes, batched, strict=True):
        (single,) = segmenter([image], [image_boxes])
        np.testing.assert_array_equal(single.masks, output.masks)
        np.testing.assert_array_equal(single.scores, output.scores)
        # one box per call: the decoder treats prompts independently (float noise may flip a border pixel)
        per_box = [segmenter([image], [box[None]])[0] for box in image_boxes]
        np.testing.assert_allclose(np.concatenate([o.scores for o in per_box]), output.scores, atol=1e-5)
        assert np.mean(np.concatenate([o.masks for o in per_box]) != output.masks) < 1e-3


def test_segment_boxes_reuses_the_embedding(fresh, monkeypatch, images, make_images):
    image = images[1]
    boxes = make_boxes([image], counts=(6,))[0]
    spy = PredictorSpy(fresh, monkeypatch)
    first = fresh.segment_boxes(image, boxes)
    second = fresh.segment_boxes(image.copy(), boxes[::-1].copy())  # same pixels, another object (a Ray copy)
    assert spy.set_image_calls == 1 and len(spy.box_batches) == 2
    assert first.shape == (6, 100, 100) and first.dtype == np.bool_
    np.testing.assert_array_equal(first[::-1], second)
    fresh.segment_boxes(make_images(seed=5)[1], boxes)  # other pixels are encoded
    assert spy.set_image_calls == 2


def test_embedding_cache_serves_a_repeated_batch(tiny_cfg, monkeypatch, images, load):
    boxes = make_boxes(images)
    # LRU of 2 < 3 images: the second call finds the last two and encodes the first again
    for capacity, expected_calls in [(3, 3), (2, 4), (0, 6)]:
        seg = load("segmenter", tiny_cfg, embedding_cache=capacity)
        spy = PredictorSpy(seg, monkeypatch)
        first = seg(images, boxes)
        again = seg([image.copy() for image in images], boxes)
        assert spy.set_image_calls == expected_calls, capacity
        for a, b in zip(first, again, strict=True):  # an image encoded in another batch may round differently
            assert (a.masks != b.masks).mean() < 1e-3
            np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_multimask_keeps_the_best_of_three(tiny_cfg, images, load):
    seg = load("segmenter", tiny_cfg, multimask=True)
    boxes = make_boxes(images)
    outputs = seg(images, boxes)
    check_outputs(outputs, images, boxes)
    predictor = seg.predictor
    predictor.set_image(np.asarray(images[0]))
    transformed = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes[0]), (48, 64))
    _, ious, _ = predictor.predict_torch(None, None, boxes=transformed, multimask_output=True)
    np.testing.assert_allclose(outputs[0].scores, ious.max(dim=1).values.numpy(), atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_dtype_reaches_the_encoder_and_decoder_on_cpu(tiny_cfg, images, load, monkeypatch, dtype):
    seg = load("segmenter", tiny_cfg, dtype=dtype)
    spy = PredictorSpy(seg, monkeypatch)
    boxes = make_boxes(images)
    check_outputs(seg(images, boxes), images, boxes)
    assert spy.dtypes == {("image_encoder", getattr(torch, dtype)), ("mask_decoder", getattr(torch, dtype))}


def test_the_encoder_batches_images_and_matches_one_at_a_time(tiny_cfg, images, load, monkeypatch):
    boxes = make_boxes(images)
    jittered = [np.stack([b, b + 1.0], axis=1) for b in boxes]
    single = load("segmenter", tiny_cfg, encoder_batch=1, embedding_cache=0)
    batched = load("segmenter", tiny_cfg, encoder_batch=2, embedding_cache=0)
    spy = PredictorSpy(batched, monkeypatch)
    expected, got = single(images, boxes, jittered), batched(images, boxes, jittered)
    assert spy.image_batches == [2, 1]  # 3 images, 2 per encoder pass
    for want, have in zip(expected, got, strict=True):
        assert (want.masks != have.masks).mean() < 1e-3  # batched matmuls may round differently at the threshold
        np.testing.assert_allclose(want.scores, have.scores, atol=1e-4)
        np.testing.assert_allclose(want.stability, have.stability, atol=1e-3)
    with pytest.raises(AnnotatorError, match="encoder_batch must be >= 1"):
        annotators.build("segmenter", tiny_cfg | {"encoder_batch": 0})


def test_wrong_lengths_and_box_shapes(segmenter, images):
    with pytest.raises(ValueError, match="3 images but 2 entries"):
        segmenter(images, make_boxes(images)[:2])
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        segmenter(images[:1], [np.zeros((2, 3), dtype=np.float32)])


def test_config_errors(tiny_cfg):
    with pytest.raises(AnnotatorError, match=r"unknown config keys \['multimask_output'\]"):
        annotators.build("segmenter", tiny_cfg | {"multimask_output": True})
    with pytest.raises(AnnotatorError, match=r"missing required config keys \['checkpoint'\]"):
        annotators.build("segmenter", {"backend": "sam", "model_type": "vit_h"})
    with pytest.raises(AnnotatorError, match="unknown SAM model_type 'vit_x'"):
        annotators.build("segmenter", tiny_cfg | {"model_type": "vit_x"})


def test_missing_checkpoint_names_the_path(tiny_cfg, tmp_path):
    missing = tmp_path / "sam_vit_h_4b8939.pth"
    seg = annotators.build("segmenter", tiny_cfg | {"checkpoint": str(missing)})
    with pytest.raises(AnnotatorError, match=str(missing)):
        seg.load()


def test_mismatched_checkpoint(tiny_cfg, tmp_path):
    state = torch.load(tiny_cfg["checkpoint"], weights_only=True)
    state.pop(next(iter(state)))
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    with pytest.raises(AnnotatorError, match="does not match model_type 'vit_tiny'"):
        annotators.build("segmenter", tiny_cfg | {"checkpoint": str(partial)}).load()


class NotATensor:
    pass


def test_checkpoint_is_loaded_weights_only(tiny_cfg, tmp_path):
    pickled = tmp_path / "pickled.pth"
    torch.save({"payload": NotATensor()}, pickled)
    with pytest.raises(AnnotatorError, match="cannot read SAM checkpoint"):
        annotators.build("segmenter", tiny_cfg | {"checkpoint": str(pickled)}).load()


def test_safetensors_checkpoint(tiny_cfg, tmp_path, images, load):
    from safetensors.torch import save_file

    state = torch.load(tiny_cfg["checkpoint"], weights_only=True)
    path = tmp_path / "sam_vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    seg = load("segmenter", tiny_cfg, checkpoint=str(path))
    boxes = make_boxes(images)
    check_outputs(seg(images, boxes), images, boxes)


def test_call_before_load_is_an_error(tiny_cfg, images):
    with pytest.raises(AnnotatorError, match="load"):
        annotators.build("segmenter", tiny_cfg)(images, make_boxes(images))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda(tiny_cfg, dtype, images, load):
    seg = load("segmenter", tiny_cfg, device="cuda", dtype=dtype)
    boxes = make_boxes(images)
    check_outputs(seg(images, boxes), images, boxes)


# ---------------------------------------------------------------- jitter stability inside the call (defect 7)
FRACTIONS = (0.05, 0.1, 0.15)


def jitter(images, boxes, fractions=FRACTIONS):
    from pipeline.filters import jitter_boxes

    return [jitter_boxes(b, fractions, im.width, im.height) for b, im in zip(boxes, images, strict=True)]


def test_masks_and_stability_encode_each_image_once(fresh, monkeypatch, images):
    boxes = make_boxes(images, counts=(4, 0, 7))
    spy = PredictorSpy(fresh, monkeypatch)
    outputs = fresh(images, boxes, jitter(images, boxes))
    check_outputs(outputs, images, boxes)
    assert spy.set_image_calls == 2  # one encoding per image with boxes, shared by masks and jitter
    assert spy.box_batches == [4, 16, 8, 7, 16, 16, 10]  # 4 x 6, 7 x 6 jittered boxes in chunks of box_chunk=16
    for output, image_boxes in zip(outputs, boxes, strict=True):
        assert output.stability.shape == (len(image_boxes),) and output.stability.dtype == np.float64
        assert ((output.stability >= 0) & (output.stability <= 1)).all()


def test_unmoved_jitter_is_perfectly_stable(segmenter, images):
    boxes = make_boxes(images)
    outputs = segmenter(images, boxes, [np.repeat(b[:, None], 2, axis=1) for b in boxes])
    for output in outputs:
        nonempty = output.masks.any(axis=(1, 2))
        np.testing.assert_array_equal(output.stability[nonempty], 1.0)


def test_stability_equals_the_full_resolution_reference_at_input_size(segmenter, make_images):
    from pipeline.filters import mask_stability

    # 64 x 48 is the tiny model's own input size: the input-resolution masks are the full-resolution masks.
    images = make_images(sizes=[(64, 48), (64, 48)], seed=4)
    boxes = make_boxes(images, counts=(5, 3), seed=4)
    for image, image_boxes, output in zip(images, boxes, segmenter(images, boxes, jitter(images, boxes)), strict=True):
        reference = mask_stability(image, image_boxes, output.masks, segmenter.segment_boxes, FRACTIONS)
        np.testing.assert_allclose(output.stability, reference, atol=1e-12)


@pytest.mark.parametrize("box_chunk", [1, 3])
def test_box_chunks_give_identical_masks_and_stability(tiny_cfg, load, segmenter, make_images, box_chunk):
    images = make_images(sizes=[(640, 480), (100, 100), (37, 81)], seed=3)
    boxes = make_boxes(images, counts=(6, 5, 4), seed=3)
    whole = segmenter(images, boxes, jitter(images, boxes))
    chunked = load("segmenter", tiny_cfg, box_chunk=box_chunk)(images, boxes, jitter(images, boxes))
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_array_equal(a.stability, b.stability)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)


def test_overlap_counts_exact():
    from annotators.segmenter import overlap_counts

    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    b = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2, :2], b[0, 1:3, 1:3] = True, True  # 4 and 4 pixels, 1 shared
    inter, union = overlap_counts(a, b)
    assert inter.tolist() == [1.0, 0.0] and union.tolist() == [7.0, 0.0]


def test_jittered_boxes_must_match_the_boxes(segmenter, images):
    boxes = make_boxes(images)
    bad = [np.zeros((len(b) + 1, 6, 4), np.float32) for b in boxes]
    with pytest.raises(ValueError, match=r"jittered boxes must be \(N=3, K>0, 4\)"):
        segmenter(images, boxes, bad)
    with pytest.raises(AnnotatorError, match="box_chunk must be >= 1"):
        annotators.build("segmenter", {"backend": "sam", "model_type": "vit_tiny", "checkpoint": "x", "box_chunk": 0})
