"""Byte-level BPE tokenizer for the built-in models, built with the ``tokenizers`` library.

Digits are split individually (numbers are digit sequences), the byte-level alphabet makes every text
encodable, and decoding is the exact inverse of encoding (no normalisation, no clean-up of spaces).
``tokenizer(text)`` prepends ``<s>``; ``</s>`` ends training documents; ``<pad>`` pads batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Train the BPE on ``texts``; returns a ``tokenizers.Tokenizer`` (deterministic for equal input)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def save_tokenizer(tok, out_dir: str | Path, model_max_length: int = 4096) -> None:
    """Save as a Hugging Face fast tokenizer (tokenizer.json + tokenizer_config.json + special tokens)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side="left",
    )
    hf.save_pretrained(str(out_dir))
