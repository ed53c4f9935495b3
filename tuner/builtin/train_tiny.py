"""The recipe that produced the committed `builtin:tiny` weights: `python -m tuner.builtin.train_tiny OUT_DIR`.

Why this recipe: a from-scratch model on 2 CPU cores has a budget of tens of minutes, and in-context
retrieval only appears once attention learns to copy (the "induction" plateau). A fixed-marker needle
lookup with an answer-weighted loss crosses that plateau in ~150 steps at 256 tokens, whereas the
key/value table (multi-token keys) did not in 800+ steps; so the long-context task of `builtin:tiny` is
`needle` (see `tuner.tasks.NeedleTask`), trained together with the pattern task and stdlib code.

Phases (each a separate run that reseeds everything, exactly as the committed weights were made;
fractions are of the batch rows: needle rows first, the rest pattern lines or code):
  1-2. from scratch at 256 tokens: 500 steps (half needle, lr 2e-3), then 300 (75% needle, lr 1.5e-3): the
       copy circuit forms around step 125 of the second;
  3-4. length extension: 150 steps of 4 x 1280 tokens, 80 steps of 2 x 2304 (>= 2k-token prompts);
  5-6. 2 x 300 steps at 256 tokens with 85% of the other rows pattern lines whose answers weigh 5x
       (copying, cycles and progressions: 0.03 -> 0.75 accuracy after the first 300);
  7.   100 steps of 4 x 1280 tokens to restore the long-context needle.
Needle sequences: a window of train-split stdlib code with `# the secret word is <word>.` inserted at a
line boundary, then the question and the answer; answer tokens weigh 20x in the loss. Other sequences:
pattern-task lines (40%) or plain stdlib code. bf16 autocast, AdamW (0.9, 0.95), weight decay 0.1,
50 warm-up steps then cosine to 10%, grad clip 1.0. The tokenizer is the committed one (trained by
`tuner.builtin.tokenizer` on the stdlib train split and task text).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tuner import tasks

ANSWER_WEIGHT = 20.0
CODE_TOKENS = 3_000_000
QUESTION = "\n# Question: what is the secret word?\n# Answer: the secret word is"
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True)


@dataclass(frozen=True)
class Phase:
    steps: int
    seq_len: int
    batch_size: int
    lr: float
    needle_fraction: float
    pattern_fraction: float = 0.4  # of the non-needle rows
    pattern_answer_weight: float = 1.0


PHASES = (
    Phase(500, 256, 16, 2e-3, 0.5),
    Phase(300, 256, 16, 1.5e-3, 0.75),
    Phase(150, 1280, 4, 1e-3, 0.5),
    Phase(80, 2304, 2, 6e-4, 0.5),
    Phase(300, 256, 16, 1e-3, 0.25, 0.85, 5.0),
    Phase(300, 256, 16, 1e-3, 0.25, 0.85, 5.0),
    Phase(100, 1280, 4, 6e-4, 0.5, 0.5, 5.0),
)


class Batches:
    """Deterministic training sequences (token ids + per-token loss weights) for one phase."""

    def __init__(self, tokenizer, code_ids: list[int], seed: int = 0):
        self.tok, self.code = tokenizer, code_ids
        self.rng = random.Random(seed)
        self.words = [w for w in tasks.NOUNS + tasks.ADJECTIVES + tasks.COLORS
                      if len(tokenizer(" " + w, add_special_tokens=False).input_ids) == 1]
        self.question = tokenizer(QUESTION, add_special_tokens=False).input_ids
        self.newline_ids = {i for t, i in tokenizer.get_vocab().items() if t.endswith("Ċ")}
        self.pattern = tasks.PatternTask()

    def needle(self, n: int) -> tuple[list[int], list[float]]:
        word = self.rng.choice(self.words)
        needle = self.tok(f"# the secret word is {word}.\n", add_special_tokens=False).input_ids
        answer = self.tok(f" {word}.\n", add_special_tokens=False).input_ids
        n_hay = n - len(needle) - len(self.question) - len(answer)
        start = self.rng.randrange(0, len(self.code) - n_hay)
        hay = self.code[start:start + n_hay]
        cuts = [i for i, t in enumerate(hay) if t in self.newline_ids] or [0]
        cut = self.rng.choice(cuts) + 1
        seq = [self.tok.bos_token_id] + hay[:cut] + needle + hay[cut:] + self.question + answer
        weights = [1.0] * (len(seq) - 1)
        for j in range(len(answer)):
            weights[len(seq) - 1 - len(answer) + j] = ANSWER_WEIGHT
        return seq[:n + 1], weights[:n]

    def plain(self, n: int, phase: Phase) -> tuple[list[int], list[float]]:
        if self.rng.random() < phase.pattern_fraction:
            ids = [self.tok.bos_token_id] + self.tok(self.pattern.training_text(self.rng, 60),
                                                     add_special_tokens=False).input_ids
            while len(ids) < n + 1:
                ids += self.tok(self.pattern.training_text(self.rng, 30), add_special_tokens=False).input_ids
            ids = ids[:n + 1]
            weights, answering = [], False
            for token in self.tok.convert_ids_to_tokens(ids[1:]):  # answers: after "|" up to the newline
                weights.append(phase.pattern_answer_weight if answering else 1.0)
                answering = (answering or "|" in token) and "Ċ" not in token
            return ids, weights
        start = self.rng.randrange(0, len(self.code) - n - 1)
        return [self.tok.bos_token_id] + self.code[start:start + n], [1.0] * n

    def batch(self, phase: Phase) -> tuple[torch.Tensor, torch.Tensor]:
        n_needle = int(phase.batch_size * phase.needle_fraction)
        rows = [self.needle(phase.seq_len) if i < n_needle else self.plain(phase.seq_len, phase)
                for i in range(phase.batch_size)]
        return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


def code_token_ids(tokenizer) -> list[int]:
    from tuner.builtin.data import stdlib_train_texts

    ids: list[int] = []
    for text in stdlib_train_texts():
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
        if len(ids) > CODE_TOKENS:
            break
    return ids


def lr_scale(step: int, steps: int) -> float:
    """50 warm-up steps, then cosine decay to 10% at the end of the phase."""
    return step / 50 if step < 50 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))


def new_model(tokenizer, shape: dict):
    """A freshly initialised Llama of `shape` (a MODEL-like dict) for `tokenizer`, seeded like the recipes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                        **shape))


def optimise(model, steps: int, lr: float, step_loss, log, label: dict) -> None:
    """The loop every built-in recipe runs: AdamW (0.9, 0.95), weight decay 0.1, `lr_scale`'s schedule, grad
    clip 1.0. `step_loss()` draws the step's batch and returns (loss, report); every 25 steps `report()` gives
    the fields logged after `label` (a callable, because computing them costs host syncs)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    start = time.time()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * lr_scale(step, steps)
        loss, report = step_loss()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            log({**label, "step": step, **report(), "s": round(time.time() - start)})
    model.eval()


def run_phase(model, tokenizer, code_ids: list[int], phase: Phase, log) -> None:
    """One phase, reseeded (torch and data) so that each phase reproduces on its own."""
    torch.manual_seed(0)
    batches = Batches(tokenizer, code_ids, seed=0)

    def step_loss():
        x, w = batches.batch(phase)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x[:, :-1]).logits
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                             reduction="none").view_as(w)
        loss = (ce * w).sum() / w.sum()

        def report() -> dict:
            acc = (logits.argmax(-1) == x[:, 1:])[w > 1].float().mean().item()
            return {"loss": round(loss.item(), 3), "answer_acc": round(acc, 3)}

        return loss, report

    optimise(model, phase.steps, phase.lr, step_loss, log, {"phase": phase.seq_len})


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from tuner.builtin import builtin_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", type=Path, default=None, help="default: the committed builtin:tiny tokenizer")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or builtin_checkpoint("tiny"))
    code_ids = code_token_ids(tokenizer)
    model = new_model(tokenizer, MODEL)
    for phase in PHASES:
        run_phase(model, tokenizer, code_ids, phase, lambda rec: print(json.dumps(rec), file=sys.stderr, flush=True))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)


if __name__ == "__main__":
    main()
