"""Training data for the built-in models: generated tasks + the local Python standard library.

Everything here is generated or read locally (no downloads).  The task generators are the evaluation
ones from :mod:`tuner.tasks`, drawn with seeds at or above ``tasks.TRAIN_SEED_OFFSET`` so that training
and evaluation examples come from disjoint seeds.  Code comes from the *train* split of the stdlib
files (:func:`tuner.tasks.is_heldout` keeps ~10% of the files out for the ``code`` task).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from tuner import tasks


def stdlib_train_texts() -> Iterator[str]:
    """Source text of every train-split stdlib file, in sorted path order."""
    for _, path in tasks.stdlib_files("train"):
        text = tasks.read_source(path)
        if text is not None:
            yield text


def stdlib_fingerprint() -> dict:
    """Python version + a digest of the train-split file list, recorded next to the checkpoint."""
    import platform

    files = tasks.stdlib_files("train")
    digest = hashlib.sha256()
    for rel, path in files:
        digest.update(rel.encode())
        digest.update(str(path.stat().st_size).encode())
    return {
        "python": platform.python_version(),
        "stdlib_train_files": len(files),
        "stdlib_heldout_files": len(tasks.stdlib_files("heldout")),
        "stdlib_digest": digest.hexdigest()[:16],
    }


def tokenizer_corpus(seed: int = tasks.TRAIN_SEED_OFFSET) -> Iterator[str]:
    """Text the BPE is trained on: stdlib train split + generated retrieval/pattern text."""
    yield from stdlib_train_texts()
    rng = random.Random(f"tokenizer:{seed}")
    retrieval = tasks.RetrievalTask()
    pattern = tasks.PatternTask()
    # enough task text that every key word is one token at the start of a line
    for i in range(1500):
        yield retrieval.training_text(rng, n_pairs=rng.randint(20, 120), n_queries=16)
        if i < 1000:
            yield pattern.training_text(rng, n_examples=30)


@dataclass
class Mixture:
    """Fractions of training sequences by kind (the rest is stdlib code)."""

    retrieval: float = 0.5
    pattern: float = 0.15
    repeat: float = 0.0  # repeated random token sequences: the classic induction-head curriculum


class TrainStream:
    """Deterministic batches of packed token sequences (``[batch, seq_len + 1]`` int64 arrays).

    A sequence is one of: retrieval documents (the first sized to fill most of the sequence, so that
    long tables are common), pattern lines, or a window of the stdlib code token stream.  Documents are
    ``<s> text </s>`` and packed back to back; the last one is cut at the sequence end.
    """

    def __init__(self, tokenizer, mixture: Mixture | None = None, seed: int = 0):
        self.tok = tokenizer
        self.mix = mixture or Mixture()
        self.seed = seed
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)
        self.retrieval = tasks.RetrievalTask()
        self.pattern = tasks.PatternTask()
        texts = list(stdlib_train_texts())
        backend = self.tok.backend_tokenizer  # the raw tokenizer: no max-length warnings for long files
        chunks = []
        for enc in backend.encode_batch(texts, add_special_tokens=False):
            chunks.append(np.asarray([self.bos, *enc.ids, self.eos], dtype=np.int32))
        self.code = np.concatenate(chunks)
        # token cost of one table line / one answered query, for sizing retrieval documents
        self.line_tokens = 10
        self.query_tokens = 21

    def _encode_doc(self, text: str) -> list[int]:
        return [self.bos, *self.tok(text, add_special_tokens=False)["input_ids"], self.eos]

    def _retrieval_doc(self, rng: random.Random, budget: int) -> list[int]:
        n_queries = rng.randint(4, 16)
        max_pairs = max(2, (budget - 16 - n_queries * self.query_tokens) // self.line_tokens)
        n_pairs = rng.randint(max(2, max_pairs // 2), max_pairs)
        return self._encode_doc(self.retrieval.training_text(rng, n_pairs, n_queries))

    def sequence(self, rng: random.Random, length: int) -> np.ndarray:
        u = rng.random()
        out: list[int] = []
        if u < self.mix.retrieval:
            while len(out) < length:
                out += self._retrieval_doc(rng, length - len(out) if out else length)
        elif u < self.mix.retrieval + self.mix.pattern:
            while len(out) < length:
                out += self._encode_doc(self.pattern.training_text(rng, rng.randint(4, 24)))
        elif u < self.mix.retrieval + self.mix.pattern + self.mix.repeat:
            while len(out) < length:
                seg = [rng.randrange(3, self.vocab_size) for _ in range(rng.randint(8, 64))]
                out += [self.bos, *(seg * rng.randint(2, 4)), self.eos]
        else:
            start = rng.randrange(len(self.code) - length)
            return self.code[start : start + length].astype(np.int64)
        return np.asarray(out[:length], dtype=np.int64)

    def batch(self, step: int, batch_size: int, seq_len: int) -> np.ndarray:
        rng = random.Random(f"train-batch:{tasks.TRAIN_SEED_OFFSET + self.seed}:{step}")
        return np.stack([self.sequence(rng, seq_len + 1) for _ in range(batch_size)])
