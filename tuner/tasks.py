"""Built-in tasks: deterministic, generated examples the built-in models are trained on and scored with.

Three tasks, each a :class:`Task` whose :meth:`Task.examples` is a pure function of ``(n, seed)``:

``retrieval``
    Long-context key/value lookup.  The prompt is a table of ``adjective_noun = 1234`` lines (about
    1.1-1.4k tokens with the ``builtin:tiny`` tokenizer) followed by a question and the start of the
    answer line; the answer is the four-digit value, found in exactly one line of the context, so a
    technique that drops the wrong tokens loses the answer.  ``retrieval-2k`` is the same task with
    about 2.1-2.5k-token prompts; ``RetrievalTask(n_pairs=(lo, hi))`` gives any other length.
``pattern``
    Short predictable continuations on one line: copying a list, continuing an arithmetic
    progression, continuing a repeating cycle.
``code``
    Free-text continuation of Python code taken from held-out files of the local Python installation's
    standard library (a deterministic split by file path, see :func:`is_heldout`).  Meant for top-1
    agreement / KL metrics against the dense model; its exact-match score (the next line) is only a
    rough signal.
``passkey`` (and ``-2k``, ``-4k``, ``-multi``)
    Passkey retrieval in English prose, for chat models (prompts through the chat template).
``chat`` (and ``chat-prose``, ``chat-code``)
    Decode-speed workloads for chat models: "explain", "summarise" and "continue" requests over a passage of
    Python's reference prose or held-out stdlib code. There is no gold answer (the model's own greedy reply
    is the free text speculative decoding speeds up), so these tasks are ``workload_only``: their
    :meth:`ChatTask.score` raises :class:`WorkloadOnlyTaskError` instead of scoring quality.

Scoring is exact match of the first line of the prediction, stripped (``Task.score``), i.e. generation
is read up to the first newline, which is where every answer ends.

The training data of the built-in models (``tuner/builtin/data.py``) uses these same generators with
seeds from a disjoint range (:data:`TRAIN_SEED_OFFSET` and above); evaluation uses small seeds.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "Example",
    "Task",
    "RetrievalTask",
    "PasskeyTask",
    "ChatTask",
    "ChatRequest",
    "WorkloadOnlyTaskError",
    "PatternTask",
    "CodeTask",
    "TASKS",
    "get_task",
    "list_tasks",
    "prompt_ids",
    "code_samples",
    "stdlib_root",
    "stdlib_files",
    "is_heldout",
    "TRAIN_SEED_OFFSET",
]

#: Training data draws seeds at or above this value; evaluation seeds should stay below it.
TRAIN_SEED_OFFSET = 1_000_000

ADJECTIVES = (
    "amber azure bold brave brisk calm clever crisp dark eager early fancy fast fierce gentle golden "
    "grand green happy jolly keen kind lazy lively lucky mellow mighty misty noble odd pale plain "
    "proud quick quiet rapid red rosy royal rusty sandy sharp shiny silent silver sleepy slow smart "
    "snowy solid stormy sunny swift tall tiny vivid warm wild windy wise young zesty bright humble"
).split()
NOUNS = (
    "apple badger bear birch canyon cedar cliff cloud comet crane creek daisy dolphin dragon eagle "
    "falcon fern finch forest fox garden glacier harbor hawk heron island jaguar lake lantern lemon "
    "lion maple meadow moon mountain oak ocean otter owl panda pebble pine planet pond rabbit raven "
    "river robin rocket sparrow star stone summit thunder tiger tulip valley violet walrus whale "
    "willow wolf zebra"
).split()
COLORS = "red green blue black white pink gray gold cyan brown".split()
#: Needle answers: words that the built-in tokenizer encodes as one token after a space.
NEEDLE_WORDS = (
    "apple badger bear birch canyon cedar cliff cloud comet crane creek daisy dolphin dragon eagle falcon "
    "fern finch forest fox garden glacier harbor hawk heron island jaguar lake lantern lemon lion maple "
    "meadow moon mountain oak ocean otter owl panda pebble pine planet pond rabbit raven river robin "
    "rocket sparrow star stone summit thunder tiger tulip valley violet walrus whale willow wolf zebra "
    "green red red green blue black white pink gray gold cyan brown"
).split()


@dataclass(frozen=True)
class Example:
    """One prompt and its expected answer (the text greedy decoding should produce, up to a newline)."""

    prompt: str
    answer: str
    task: str


@dataclass(frozen=True)
class CopySpan:
    """``text[dst : dst + length]`` repeats ``text[src : src + length]`` (training: where to look)."""

    dst: int
    src: int
    length: int


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


class Task:
    """Base class: a named, seeded example generator with an exact-match scorer."""

    name: str = ""
    description: str = ""
    max_new_tokens: int = 16
    #: Prompts are a user turn of the model's chat template (when its tokenizer has one), not raw text.
    chat: bool = False
    #: A workload without gold answers (prompts to time decoding on): ``score`` raises, it measures no quality.
    workload_only: bool = False

    def examples(self, n: int, seed: int) -> list[Example]:
        """``n`` examples, a pure function of ``(task parameters, n, seed)``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"{self.name}:{seed}")
        return [self.example(rng) for _ in range(n)]

    def example(self, rng: random.Random) -> Example:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, prediction: str, answer: str) -> float:
        """1.0 when the first line of ``prediction`` equals ``answer`` (both stripped), else 0.0."""
        return 1.0 if _first_line(prediction) == _first_line(answer) else 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# --------------------------------------------------------------------------------------------- retrieval


@dataclass(frozen=True)
class RetrievalDoc:
    """The parts of one retrieval example; ``format`` turns it into text."""

    pairs: tuple[tuple[str, str], ...]  # (key, value), in table order
    queries: tuple[int, ...]  # indices into pairs


@dataclass(repr=False)
class RetrievalTask(Task):
    """Key/value lookup over a long table; ``n_pairs`` (an int or an inclusive range) sets the length.

    With the ``builtin:tiny`` tokenizer one table line is 10 tokens, so ``n_pairs=(105, 135)`` gives
    prompts of about 1.1-1.4k tokens and ``n_pairs=(205, 240)`` about 2.1-2.5k.
    """

    name: str = "retrieval"
    n_pairs: int | tuple[int, int] = (105, 135)
    value_digits: int = 4
    description: str = "long-context key/value lookup: find the 4-digit value of one key in a long table"
    max_new_tokens: int = 8

    HEADER = "# Look up the value of a key in the table below.\n"

    def __post_init__(self) -> None:
        lo, hi = self._range()
        if not 1 <= lo <= hi <= len(ADJECTIVES) * len(NOUNS):
            raise ValueError(f"n_pairs must be within 1..{len(ADJECTIVES) * len(NOUNS)}, got {self.n_pairs}")

    def _range(self) -> tuple[int, int]:
        if isinstance(self.n_pairs, int):
            return self.n_pairs, self.n_pairs
        lo, hi = self.n_pairs
        return int(lo), int(hi)

    def doc(self, rng: random.Random, n_pairs: int | None = None, n_queries: int = 1) -> RetrievalDoc:
        if n_pairs is None:
            n_pairs = rng.randint(*self._range())
        n_keys = len(ADJECTIVES) * len(NOUNS)
        codes = rng.sample(range(n_keys), n_pairs)
        lo = 10 ** (self.value_digits - 1)
        pairs = tuple(
            (f"{ADJECTIVES[c // len(NOUNS)]}_{NOUNS[c % len(NOUNS)]}", str(rng.randrange(lo, 10 * lo)))
            for c in codes
        )
        queries = tuple(rng.sample(range(n_pairs), min(n_queries, n_pairs)))
        return RetrievalDoc(pairs, queries)

    @classmethod
    def table_text(cls, doc: RetrievalDoc) -> str:
        return cls.HEADER + "".join(f"{k} = {v}\n" for k, v in doc.pairs)

    @staticmethod
    def query_text(key: str) -> str:
        return f"\n# What is the value of this key?\n{key} ="

    def example(self, rng: random.Random) -> Example:
        doc = self.doc(rng)
        key, value = doc.pairs[doc.queries[0]]
        return Example(self.table_text(doc) + self.query_text(key), " " + value, self.name)

    def training_doc(self, rng: random.Random, n_pairs: int, n_queries: int) -> tuple[str, list[CopySpan]]:
        """One training document (the table, then ``n_queries`` answered questions on distinct keys) and
        its copy spans: each answer ``" 1234"`` is a copy of the value in its table line."""
        doc = self.doc(rng, n_pairs=n_pairs, n_queries=n_queries)
        text = self.HEADER
        value_at = {}
        for k, v in doc.pairs:
            value_at[k] = len(text) + len(k) + 2  # the space before the value
            text += f"{k} = {v}\n"
        spans = []
        for q in doc.queries:
            key, value = doc.pairs[q]
            text += self.query_text(key)
            spans.append(CopySpan(len(text), value_at[key], len(value) + 1))
            text += f" {value}\n"
        return text, spans

    def training_text(self, rng: random.Random, n_pairs: int, n_queries: int) -> str:
        return self.training_doc(rng, n_pairs, n_queries)[0]


# --------------------------------------------------------------------------------------------- pattern


@dataclass(repr=False)
class PatternTask(Task):
    """One-line predictable continuations: ``copy``, ``next`` (arithmetic progression), ``cycle``."""

    name: str = "pattern"
    description: str = "short predictable continuations: copy a list, continue a progression or a cycle"
    max_new_tokens: int = 24
    kinds: tuple[str, ...] = ("copy", "next", "cycle")

    def _draw(self, rng: random.Random) -> tuple[str, list[str], list[str], list[int | None]]:
        """(kind, shown items, answer items, source item index of each answer item or None)."""
        kind = self.kinds[rng.randrange(len(self.kinds))]
        shown, answer, sources = getattr(self, f"_{kind}")(rng)
        return kind, shown, answer, sources

    def example(self, rng: random.Random) -> Example:
        kind, shown, answer, _ = self._draw(rng)
        return Example(f"{kind}: {' '.join(shown)} |", " " + " ".join(answer), self.name)

    @staticmethod
    def _copy(rng: random.Random):
        n = rng.randint(3, 8)
        if rng.random() < 0.5:
            items = [str(rng.randrange(10)) for _ in range(n)]
        else:
            items = [rng.choice(NOUNS) for _ in range(n)]
        return items, list(items), list(range(n))

    @staticmethod
    def _next(rng: random.Random):
        start, step = rng.randint(0, 99), rng.randint(1, 9)
        n_shown = rng.randint(3, 5)
        seq = [str(start + i * step) for i in range(n_shown + 3)]
        return seq[:n_shown], seq[n_shown:], [None] * 3

    @staticmethod
    def _cycle(rng: random.Random):
        period = rng.randint(2, 4)
        vocab = COLORS if rng.random() < 0.5 else NOUNS
        unit = rng.sample(vocab, period)
        n_shown = rng.randint(2 * period, 3 * period)
        seq = [unit[i % period] for i in range(n_shown + 4)]
        return seq[:n_shown], seq[n_shown:], [n_shown + i - period for i in range(4)]

    def training_doc(self, rng: random.Random, n_examples: int) -> tuple[str, list[CopySpan]]:
        """Several answered examples, one per line, and the copy spans of copied answer items."""
        text, spans = "", []
        for _ in range(n_examples):
            kind, shown, answer, sources = self._draw(rng)
            starts = []  # char index of the space before each item (prompt items, then answer items)
            text += f"{kind}:"
            for item in shown:
                starts.append(len(text))
                text += f" {item}"
            text += " |"
            for item, src in zip(answer, sources, strict=True):
                starts.append(len(text))
                if src is not None:
                    spans.append(CopySpan(len(text), starts[src], len(item) + 1))
                text += f" {item}"
            text += "\n"
        return text, spans

    def training_text(self, rng: random.Random, n_examples: int) -> str:
        return self.training_doc(rng, n_examples)[0]


# --------------------------------------------------------------------------------------------- code


def stdlib_root() -> Path:
    """The directory holding this Python's standard-library source files."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str) -> bool:
    """Deterministic ~10% held-out split of stdlib files, by a hash of their POSIX relative path."""
    return hashlib.sha256(relpath.encode()).digest()[0] % 10 == 0


@functools.lru_cache(maxsize=4)
def stdlib_files(split: str = "heldout", max_bytes: int = 200_000) -> tuple[tuple[str, Path], ...]:
    """``(relpath, path)`` of stdlib ``.py`` files in ``split`` ("heldout", "train" or "all"), sorted.

    Excludes ``site-packages`` and files larger than ``max_bytes`` (generated tables).
    """
    if split not in ("heldout", "train", "all"):
        raise ValueError(f"split must be 'heldout', 'train' or 'all', got {split!r}")
    root = stdlib_root()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or "/site-packages/" in rel:
            continue
        try:
            if not path.is_file() or path.stat().st_size > max_bytes or path.stat().st_size < 200:
                continue
        except OSError:
            continue
        held = is_heldout(rel)
        if split == "all" or (split == "heldout") == held:
            out.append((rel, path))
    if not out:
        raise FileNotFoundError(f"no Python standard-library source files found under {root}")
    return tuple(out)


def read_source(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text.replace("\r\n", "\n")


_TOKEN_PIECES = re.compile(r"\d|[A-Za-z_]+|[ \t]+|[^\w\s]")


def estimate_tokens(text: str) -> int:
    """A tokenizer-free token estimate (digits, words, whitespace runs, punctuation count one each), used to
    size haystacks by tokens rather than characters (indentation-heavy code has far fewer tokens/char)."""
    return len(_TOKEN_PIECES.findall(text))


def _code_window(rng: random.Random, n_chars: int, split: str = "heldout") -> tuple[str, str]:
    """A window of code (held-out files unless `split` says otherwise) starting at a line start: (text of
    about n_chars chars, following text)."""
    files = stdlib_files(split)
    for _ in range(100):
        _, path = files[rng.randrange(len(files))]
        text = read_source(path)
        if text is None or len(text) < n_chars // 2:
            continue
        last = max(0, len(text) - n_chars)
        starts = [0] + [m.end() for m in re.finditer("\n", text) if m.end() <= last]
        start = starts[rng.randrange(len(starts))]
        window = text[start : start + n_chars]
        cut = window.rfind("\n")
        if cut > 0:
            window = window[: cut + 1]
        return window, text[start + len(window) :]
    raise RuntimeError("could not draw a code sample from the held-out standard-library files")


def code_samples(n: int, seed: int, n_chars: int = 2000) -> list[str]:
    """``n`` windows of about ``n_chars`` characters of held-out stdlib code, each starting at a line start.

    Deterministic for a given Python installation (the held-out split is by file path).
    """
    rng = random.Random(f"code_samples:{seed}:{n_chars}")
    return [_code_window(rng, n_chars)[0] for _ in range(n)]


@dataclass(repr=False)
class CodeTask(Task):
    """Continue held-out stdlib Python code; the answer is the next non-empty line."""

    name: str = "code"
    description: str = "free-text continuation of held-out Python standard-library code"
    max_new_tokens: int = 48
    n_chars: int = 1500

    def example(self, rng: random.Random) -> Example:
        while True:
            window, rest = _code_window(rng, self.n_chars)
            lines = [ln for ln in rest.split("\n") if ln.strip()]
            if not lines:
                continue
            # keep the blank lines before the answer in the prompt so the answer is one line of code
            skip = rest.index(lines[0])
            prompt = window + rest[:skip]
            return Example(prompt, lines[0], self.name)


@dataclass(repr=False)
class NeedleTask(Task):
    """Needle lookup (passkey retrieval): one line ``# the secret word is <word>.`` hidden at a random depth
    of a long haystack of held-out stdlib code, then a question whose answer is that word.

    The answer is in exactly one line of a >= 1k-token prompt, so a technique that drops that line loses
    it; it is the long-context task the built-in models learn reliably (a fixed marker phrase, one copied
    word), where the key/value table needs a longer training run than fits this project's budget.
    ``n_tokens`` sets the haystack length in estimated tokens (:func:`estimate_tokens`; code density varies
    too much for a character budget): 1400 gives ~1.1-1.9k-token prompts with the built-in tokenizer, 2550
    ~2.0-3.0k.
    """

    name: str = "needle"
    n_tokens: int = 1400
    description: str = "long-context needle lookup: find the secret word hidden in ~1.2k tokens of code"
    max_new_tokens: int = 6
    split: str = "heldout"

    QUESTION = "\n# Question: what is the secret word?\n# Answer: the secret word is"

    def haystack(self, rng: random.Random) -> str:
        lines: list[str] = []
        total = 0
        while total < self.n_tokens:
            window, _ = _code_window(rng, 6 * self.n_tokens, split=self.split)
            for line in window.split("\n"):
                lines.append(line)
                total += estimate_tokens(line) + 1
                if total >= self.n_tokens:
                    break
        return "\n".join(lines) + "\n"

    def example(self, rng: random.Random) -> Example:
        word = rng.choice(NEEDLE_WORDS)
        lines = self.haystack(rng).split("\n")
        at = rng.randint(int(0.05 * len(lines)), int(0.9 * len(lines)))
        lines.insert(at, f"# the secret word is {word}.")
        return Example("\n".join(lines).rstrip("\n") + self.QUESTION, f" {word}.", self.name)


# ----------------------------------------------------------------------------------------------- passkey

#: English prose runs at about 4 characters per BPE token (SmolLM2's tokenizer: 4.1 on this prose), so filler is
#: sized in characters; `estimate_tokens` counts whitespace runs too and suits code, not prose.
CHARS_PER_PROSE_TOKEN = 4

#: Labels of the harder passkey variant's numbers (one is asked for, the others are distractors).
PASSKEY_LABELS = ("red", "green", "blue", "orange", "purple", "silver", "golden", "black")


@functools.lru_cache(maxsize=3)
def prose_paragraphs(split: str = "all") -> tuple[str, ...]:
    """Python's English reference prose (``pydoc_data.topics``, on every machine), as paragraphs: the filler of
    the passkey tasks (ordinary sentences, unlike code, so a chat model reads it as text).

    ``split`` "heldout" (~10%, by a hash of the paragraph, like :func:`is_heldout` for code) or "train" (the rest):
    chat requests draw their passages from the held-out paragraphs, so what is trained on local text (a draft
    head) never saw the text it is measured on."""
    from pydoc_data.topics import topics

    if split not in ("heldout", "train", "all"):
        raise ValueError(f"split must be 'heldout', 'train' or 'all', got {split!r}")
    out = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(block.split())
            if len(text) > 80 and not set(text) <= set("*=-~ "):
                if split == "all" or (split == "heldout") == is_heldout(text):
                    out.append(text)
    return tuple(out)


@dataclass(repr=False)
class PasskeyTask(Task):
    """Passkey retrieval, the standard long-context test for chat models: a five-digit pass key stated once at
    a random depth of about ``n_tokens`` tokens of English prose, then the question. With ``distractors`` the
    filler also holds that many other labelled keys and the question names one label, so dropping or merging
    the wrong rows costs accuracy even when some number survives. Prompts go through the chat template
    (``chat``); the score is whether the first number of the answer is the key."""

    name: str = "passkey"
    n_tokens: int = 1000
    distractors: int = 0
    description: str = "passkey retrieval: a 5-digit key hidden at a random depth of ~1k tokens of prose"
    max_new_tokens: int = 16
    chat: bool = True

    def filler(self, rng: random.Random) -> list[str]:
        paragraphs = prose_paragraphs()
        start = rng.randrange(len(paragraphs))
        out: list[str] = []
        total = 0
        while total < CHARS_PER_PROSE_TOKEN * self.n_tokens:
            text = paragraphs[(start + len(out)) % len(paragraphs)]
            out.append(text)
            total += len(text) + 2
        return out

    def example(self, rng: random.Random) -> Example:
        paragraphs = self.filler(rng)
        keys = rng.sample(range(10_000, 100_000), self.distractors + 1)
        if self.distractors:
            labels = rng.sample(PASSKEY_LABELS, self.distractors + 1)
            needles = [f"The {label} pass key is {key}. Remember it." for label, key in zip(labels, keys, strict=True)]
            question = f"What is the {labels[0]} pass key? Answer with the number only."
        else:
            needles = [f"The pass key is {keys[0]}. Remember it. {keys[0]} is the pass key."]
            question = "What is the pass key? Answer with the number only."
        for needle in needles:
            paragraphs.insert(rng.randint(1, len(paragraphs) - 1) if len(paragraphs) > 1 else 0, needle)
        prompt = ("There is an important piece of information hidden in the text below. Find it and memorize it.\n\n"
                  + "\n\n".join(paragraphs) + "\n\n" + question)
        return Example(prompt, str(keys[0]), self.name)

    def score(self, prediction: str, answer: str) -> float:
        """1.0 when the first number in ``prediction`` is the key (chat models answer in a sentence)."""
        found = re.search(r"\d+", prediction)
        return 1.0 if found is not None and found.group() == answer else 0.0


# -------------------------------------------------------------------------------------------------- chat

#: What a chat request asks for, by passage source ("prose" or "code"); ``{passage}`` is the passage.
CHAT_TEMPLATES: dict[str, dict[str, str]] = {
    "prose": {
        "explain": "Explain what the following text says in plain words:\n\n{passage}",
        "summarise": "Summarise the following text in a few sentences:\n\n{passage}",
        "continue": "Continue the following text:\n\n{passage}",
    },
    "code": {
        "explain": "Explain what the following Python code does in plain words:\n\n```python\n{passage}```",
        "summarise": "Summarise what the following Python code does in a few sentences:\n\n```python\n{passage}```",
        "continue": "Continue the following Python code:\n\n```python\n{passage}```",
    },
}
CHAT_KINDS = ("explain", "summarise", "continue")
CHAT_SOURCES = ("prose", "code")


class WorkloadOnlyTaskError(ValueError):
    """A workload-only task (no gold answer) was asked to score quality."""


@dataclass(frozen=True)
class ChatRequest:
    """One chat request of a :class:`ChatTask`: what it asks (``kind``), over what (``source``), the prompt."""

    kind: str
    source: str
    prompt: str


def _cut_at_sentence(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, at the last sentence end (else word end) before it."""
    if len(text) <= limit:
        return text
    end = text.rfind(". ", 0, limit)
    if end >= limit // 4:
        return text[: end + 1]
    space = text.rfind(" ", 0, limit)
    return text[: space if space > 0 else limit]


def prose_passage(rng: random.Random, n_chars: int, split: str = "heldout") -> str:
    """Consecutive paragraphs of :func:`prose_paragraphs` (``split``) from a random one, about ``n_chars``
    characters in all (a paragraph that would overshoot by more than half of ``n_chars`` is cut at a sentence
    end)."""
    paragraphs = prose_paragraphs(split)
    index = rng.randrange(len(paragraphs))
    out: list[str] = []
    total = 0
    while total < n_chars:
        room = n_chars - total
        if out and room < 80:
            break
        text = paragraphs[index % len(paragraphs)]
        if len(text) > room + n_chars // 2:
            text = _cut_at_sentence(text, room)
        out.append(text)
        total += len(text) + 2
        index += 1
    return "\n\n".join(out)


@dataclass(repr=False)
class ChatTask(Task):
    """Chat requests to time decoding on: "explain", "summarise" or "continue" over about ``n_chars``
    characters of Python's held-out reference prose (:func:`prose_paragraphs`) or of held-out stdlib code
    (:func:`_code_window`), as a user turn of the chat template (``chat``).

    Example ``i`` asks ``kinds[i % K]`` over ``sources[(i % K + i // K) % S]`` (K kinds, S sources): both change
    from one example to the next, so a few examples already mix kinds and sources (the first K hold every kind
    and, as K >= S here, every source) and any K * S consecutive ones hold every (kind, source) pair once. The
    passages are drawn from the seed.

    There is no gold answer: what a model replies, greedily, is the free text a lossless technique (speculative
    decoding) must reproduce token for token and speed up, and that is checked against the dense model's own
    output, not a fixed string. So the task is ``workload_only``: ``answer`` is "" and :meth:`score` raises
    :class:`WorkloadOnlyTaskError` (a quality harness asked to score it fails at its dense reference, before any
    trial, rather than report a meaningless accuracy)."""

    name: str = "chat"
    description: str = ("decode workload (no gold answer): explain / summarise / continue requests over reference "
                        "prose and stdlib code")
    max_new_tokens: int = 64
    chat: bool = True
    sources: tuple[str, ...] = CHAT_SOURCES
    kinds: tuple[str, ...] = CHAT_KINDS
    n_chars: int = 1200
    workload_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        bad = [s for s in self.sources if s not in CHAT_TEMPLATES] + [k for k in self.kinds if k not in CHAT_KINDS]
        if bad or not self.sources or not self.kinds:
            raise ValueError(f"chat task {self.name!r}: sources must be among {CHAT_SOURCES} and kinds among "
                             f"{CHAT_KINDS} (non-empty), got {list(self.sources)} and {list(self.kinds)}")

    def requests(self, n: int, seed: int) -> list[ChatRequest]:
        """``n`` requests, a pure function of ``(task parameters, n, seed)``; ``examples`` wraps them."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"{self.name}:{seed}")
        out = []
        k, n_sources = len(self.kinds), len(self.sources)
        for i in range(n):
            kind = self.kinds[i % k]
            source = self.sources[(i % k + i // k) % n_sources]
            out.append(ChatRequest(kind, source, self.prompt(rng, kind, source)))
        return out

    def prompt(self, rng: random.Random, kind: str, source: str) -> str:
        """A ``kind`` request over a passage of ``source`` drawn from ``rng``."""
        if source == "prose":
            passage = prose_passage(rng, self.n_chars)
        else:
            passage = _code_window(rng, self.n_chars)[0]
        return CHAT_TEMPLATES[source][kind].format(passage=passage)

    def examples(self, n: int, seed: int) -> list[Example]:
        """The requests as examples with an empty ``answer`` (there is none; see the class docstring)."""
        return [Example(r.prompt, "", self.name) for r in self.requests(n, seed)]

    def example(self, rng: random.Random) -> Example:
        return Example(self.prompt(rng, self.kinds[0], self.sources[0]), "", self.name)

    def score(self, prediction: str, answer: str) -> float:
        """Refused: a chat request has no gold answer to score against (:class:`WorkloadOnlyTaskError`)."""
        raise WorkloadOnlyTaskError(
            f"task {self.name!r} is a decode-speed workload with no gold answer, so it cannot score quality; "
            "use it to time decoding (lossless techniques are checked token for token against dense output) and "
            "score quality on other tasks (needle, pattern, passkey)")


def prompt_ids(tokenizer: Any, prompt: str, chat: bool = True) -> Any:
    """The prompt's ids, shape (1, n): as a user turn of the tokenizer's chat template when ``chat`` and it has
    one (chat models answer only that way), else the plain text."""
    if chat and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
        return encoded["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


# --------------------------------------------------------------------------------------------- registry

TASKS: dict[str, Task] = {
    "retrieval": RetrievalTask(),
    "retrieval-2k": RetrievalTask(
        name="retrieval-2k",
        n_pairs=(205, 240),
        description="long-context key/value lookup with ~2k-token prompts",
    ),
    "needle": NeedleTask(),
    "needle-2k": NeedleTask(name="needle-2k", n_tokens=2550,
                            description="long-context needle lookup with ~2.1k-token prompts"),
    "passkey": PasskeyTask(),
    "passkey-2k": PasskeyTask(name="passkey-2k", n_tokens=2000,
                              description="passkey retrieval in ~2k tokens of prose"),
    "passkey-4k": PasskeyTask(name="passkey-4k", n_tokens=4000,
                              description="passkey retrieval in ~4k tokens of prose"),
    "passkey-multi": PasskeyTask(name="passkey-multi", n_tokens=2000, distractors=4,
                                 description="five labelled keys in ~2k tokens of prose, one asked for"),
    "pattern": PatternTask(),
    "code": CodeTask(),
    "chat": ChatTask(),
    "chat-prose": ChatTask(name="chat-prose", sources=("prose",),
                           description="decode workload (no gold answer): explain / summarise / continue requests "
                                       "over reference prose"),
    "chat-code": ChatTask(name="chat-code", sources=("code",),
                          description="decode workload (no gold answer): explain / summarise / continue requests "
                                      "over held-out stdlib code"),
}


def list_tasks() -> list[str]:
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """The built-in task ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}") from None

