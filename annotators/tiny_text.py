"""A tiny byte-level BPE tokenizer trained in-process, for the tiny random models of tests and ``smoke.yaml``.

No hub download: the ``tokenizers`` library trains it on a small built-in corpus (the caption templates'
words plus the default tag vocabulary) in well under a second, and it is wrapped as a transformers
``PreTrainedTokenizerFast`` so ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` work as with a real one.
Byte-level means any string (including a random model's gibberish) round-trips.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
DEFAULT_VOCAB_FILE = Path(__file__).parent / "vocab" / "default_vocab.txt"
_SENTENCES = (
    "a photo of a {}",
    "a red {} on a coffee background",
    "describe the image briefly. what is in the region? answer briefly.",
    "USER: ASSISTANT: there are two {} in the picture",
)


def tiny_corpus() -> list[str]:
    """Short English sentences over the default tag vocabulary (~1k lines)."""
    words = [w for w in DEFAULT_VOCAB_FILE.read_text(encoding="utf-8").splitlines() if w.strip()]
    return [template.format(word) for word in words for template in _SENTENCES]


def build_tiny_tokenizer(
    *, vocab_size: int = 512, corpus: Iterable[str] | None = None, extra_special_tokens: Iterable[str] = ()
) -> Any:
    """Train a byte-level BPE of ``vocab_size`` tokens and wrap it as ``PreTrainedTokenizerFast``.

    Special tokens: ``<pad>`` (0), ``<s>`` (1, prepended to every encoded text), ``</s>`` (2), ``<unk>`` (3),
    then ``extra_special_tokens`` (e.g. ``"<image>"``) appended after the BPE vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus) if corpus is not None else tiny_corpus(), trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    extra = list(extra_special_tokens)
    if extra:
        fast.add_tokens(extra, special_tokens=True)
    logger.debug("tiny tokenizer: %d tokens", len(fast))
    return fast
