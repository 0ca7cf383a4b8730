"""Cascade attention over shared prefixes (``annotators/cascade_attention.py``) on a tiny random Llama with grouped
key/value heads: logits and greedy/beam tokens equal to each row run alone, for batches spanning prefixes of
different lengths (left padding before the shorter prefixes and the shorter suffixes)."""

from __future__ import annotations

import pytest
import torch

from annotators import cascade_attention as cascade
from annotators.cascade_attention import SharedPrefixCache, attend_fused_cpu, attend_matmul, cascade_attention
from annotators.shared_prefix import PrefixJobs, generate_shared, join_rows, mask_positions, prefix_rows

PREFIX_LENGTHS = (30, 45, 12)  # one prefix per "image"
SUFFIX_LENGTHS = ((3, 7, 2), (5, 4, 8, 6), (2, 9))  # per image, its jobs' own tokens
NEW_TOKENS = 6


def _llama(attn_implementation: str = "sdpa"):
    """A tiny random Llama (4 query heads over 2 key/value heads, head dim 8), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model


@pytest.fixture(scope="module")
def model():
    return _llama()


@pytest.fixture(scope="module")
def reference():
    """The same weights, never switched to the shared-prefix attention."""
    return _llama()


@pytest.fixture(scope="module")
def jobs() -> PrefixJobs:
    """Rows of tokens 1..63 (0 pads): per image its prefix, then each job's own tokens (distinct first tokens, so the
    common prefix is exactly the image's prefix)."""
    gen = torch.Generator().manual_seed(1)
    rows, image_of = [], []
    for image, (n_prefix, suffixes) in enumerate(zip(PREFIX_LENGTHS, SUFFIX_LENGTHS, strict=True)):
        prefix = torch.randint(1, 64, (n_prefix,), generator=gen).tolist()
        for k, n in enumerate(suffixes):
            rows.append(prefix + [1 + k] + torch.randint(1, 64, (n - 1,), generator=gen).tolist())
            image_of.append(image)
    return PrefixJobs(rows=rows, image_of=image_of)


def _prefill(model):
    def prefill(new, ids, mask, positions):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        return prefix_rows(out.cache)

    return prefill


def _alone(model, row: list[int], **gen_kwargs) -> list[list[int]]:
    """The tokens ``generate`` writes after ``row`` run alone (no padding, no shared cache)."""
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **gen_kwargs)
    return out[:, len(row):].tolist()


@pytest.mark.parametrize("extra", [{}, {"num_beams": 2, "num_return_sequences": 2}], ids=["greedy", "beams"])
@pytest.mark.parametrize("batch_size", [4, 9])  # batches span 2 and 3 prefixes
def test_generate_shared_equals_each_row_alone(model, reference, jobs, extra, batch_size):
    gen_kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0, **extra}
    shared = generate_shared(jobs, prefill=_prefill(model), model=model, gen_kwargs=gen_kwargs, pad_id=0,
                             batch_size=batch_size, device=torch.device("cpu"))
    assert jobs.prefix_len == dict(enumerate(PREFIX_LENGTHS))
    assert [t.tolist() for t in shared] == [_alone(reference, row, **extra) for row in jobs.rows]


@pytest.mark.parametrize("attend", [attend_fused_cpu, attend_matmul], ids=["fused-cpu", "matmul"])
def test_logits_equal_full_attention_and_cache_holds_no_prefix_copy(model, reference, jobs, attend, monkeypatch):
    monkeypatch.setattr(cascade, "_attend", attend)  # CPU runs the fused kernel; accelerators the matmul path
    jobs.split()
    batch = [1, 2, 3, 5, 7, 8]  # images 0, 1, 2: prefixes of 30, 45, 12 tokens; own tokens 7, 2, 5, 8, 2, 9
    with torch.inference_mode():
        kept = {}
        for image, n in enumerate(PREFIX_LENGTHS):
            row = jobs.rows[next(j for j in batch if jobs.image_of[j] == image)][:n]
            kept[image] = prefix_rows(model(input_ids=torch.tensor([row]), use_cache=True).cache)[0]
        ids, mask = join_rows([jobs.prefix(j) for j in batch], [jobs.suffix(j) for j in batch], pad_id=0)
        ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
        n_prefix = max(PREFIX_LENGTHS)
        cache = SharedPrefixCache([kept[i] for i in range(3)], [jobs.image_of[j] for j in batch], n_prefix)
        with cascade_attention(model, cache):
            logits = model(input_ids=ids[:, n_prefix:], attention_mask=mask,
                           position_ids=mask_positions(mask)[:, n_prefix:], cache=cache).logits
        alone = [reference(input_ids=torch.tensor([jobs.rows[j]])).logits[0, -1] for j in batch]
    torch.testing.assert_close(logits[:, -1], torch.stack(alone), rtol=1e-5, atol=1e-5)
    width = ids.shape[1] - n_prefix
    assert cache.layers[0].keys.shape == (len(batch), 2, width, 8)  # the rows' own tokens only
    assert cache.get_seq_length() == n_prefix + width


def test_attention_parts_agree_and_a_fully_masked_query_weighs_nothing():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 2, 5, 8, generator=gen) for _ in range(3))
    mask = torch.rand(3, 1, 5, 5, generator=gen) > 0.3
    mask[0, :, 2] = False  # query 2 of row 0 sees nothing
    fused, matmul = attend_fused_cpu(q, k, v, 0.3, mask), attend_matmul(q, k, v, 0.3, mask)
    seen = mask.expand(3, 2, 5, 5).any(-1)
    torch.testing.assert_close(fused[0][seen], matmul[0][seen])
    torch.testing.assert_close(fused[1][seen], matmul[1][seen])
    for out, lse in (fused, matmul):
        assert torch.isfinite(out).all() and (lse[~seen] < -1e38).all()
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(matmul[1][seen], torch.logsumexp(scores, -1)[seen])


def test_outside_the_block_the_decoder_attends_as_sdpa(model, reference, jobs):
    row = torch.tensor([jobs.rows[0]])
    with torch.inference_mode():
        with cascade_attention(model, SharedPrefixCache([[]], [0], 0)):
            pass
        assert model.config._attn_implementation != "sdpa"  # replaced for good ...
        torch.testing.assert_close(model(input_ids=row).logits, reference(input_ids=row).logits, rtol=0, atol=0)


def test_refuses_a_decoder_not_on_sdpa():
    with pytest.raises(ValueError, match="uses 'eager'"), cascade_attention(_llama("eager"),
                                                                             SharedPrefixCache([[]], [0], 0)):
        pass
