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

    retrieval: float = 0.45
    pattern: float = 0.15
    repeat: float = 0.1  # repeated random token sequences: the classic induction-head curriculum


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
        self.backend = self.tok.backend_tokenizer  # the raw tokenizer: no max-length warnings, offsets
        chunks = []
        for enc in self.backend.encode_batch(texts, add_special_tokens=False):
            chunks.append(np.asarray([self.bos, *enc.ids, self.eos], dtype=np.int32))
        self.code = np.concatenate(chunks)
        # token cost of one table line / one answered query, for sizing retrieval documents
        self.line_tokens = 10
        self.query_tokens = 21

    def _encode_doc(self, text: str, spans=()) -> tuple[list[int], list[tuple[int, int]]]:
        """``<s> text </s>`` token ids and the copy pairs ``(t, s)`` of ``spans`` in doc coordinates:
        the token at ``t + 1`` is a copy of the token at ``s`` (an induction head at ``t`` should look at
        ``s``)."""
        enc = self.backend.encode(text, add_special_tokens=False)
        ids = [self.bos, *enc.ids, self.eos]
        pairs: list[tuple[int, int]] = []
        if spans:
            start_of = {a: i for i, (a, _) in enumerate(enc.offsets)}
            for sp in spans:
                for u, (a, b) in enumerate(enc.offsets):
                    if a < sp.dst or b > sp.dst + sp.length:
                        continue
                    v = start_of.get(sp.src + (a - sp.dst))
                    if v is not None and v < u and enc.ids[u] == enc.ids[v]:
                        pairs.append((u, v + 1))  # +1: <s> shift; position u (token u-1 + 1) predicts u+1
        return ids, pairs

    def _retrieval_doc(self, rng: random.Random, budget: int):
        n_queries = rng.randint(4, 16)
        max_pairs = max(2, (budget - 16 - n_queries * self.query_tokens) // self.line_tokens)
        n_pairs = rng.randint(max(2, max_pairs // 2), max_pairs)
        return self._encode_doc(*self.retrieval.training_doc(rng, n_pairs, n_queries))

    def _repeat_doc(self, rng: random.Random):
        seg = [rng.randrange(3, self.vocab_size) for _ in range(rng.randint(8, 64))]
        n, reps = len(seg), rng.randint(2, 4)
        pairs = [(c * n + i, (c - 1) * n + i + 1) for c in range(1, reps) for i in range(1, n)]
        return [self.bos, *(seg * reps), self.eos], pairs

    def sequence(self, rng: random.Random, length: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """One packed sequence of ``length`` tokens and its copy pairs (both ends inside it)."""
        u = rng.random()
        mix = self.mix
        if u >= mix.retrieval + mix.pattern + mix.repeat:
            start = rng.randrange(len(self.code) - length)
            return self.code[start : start + length].astype(np.int64), []
        out: list[int] = []
        pairs: list[tuple[int, int]] = []
        while len(out) < length:
            if u < mix.retrieval:
                ids, p = self._retrieval_doc(rng, length - len(out) if out else length)
            elif u < mix.retrieval + mix.pattern:
                ids, p = self._encode_doc(*self.pattern.training_doc(rng, rng.randint(4, 24)))
            else:
                ids, p = self._repeat_doc(rng)
            pairs += [(len(out) + t, len(out) + s) for t, s in p]
            out += ids
        # position t is an input position (predicting token t+1), so t + 1 must be inside the sequence
        pairs = [(t, s) for t, s in pairs if t + 1 < length]
        return np.asarray(out[:length], dtype=np.int64), pairs

    def batch(self, step: int, batch_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """``ids [batch, seq_len + 1]`` and copy pairs ``[n, 3]`` (batch row, position t, source s)."""
        rng = random.Random(f"train-batch:{tasks.TRAIN_SEED_OFFSET + self.seed}:{step}")
        rows, pairs = [], []
        for b in range(batch_size):
            ids, p = self.sequence(rng, seq_len + 1)
            rows.append(ids)
            pairs += [(b, t, s) for t, s in p]
        return np.stack(rows), np.asarray(pairs, dtype=np.int64).reshape(-1, 3)
