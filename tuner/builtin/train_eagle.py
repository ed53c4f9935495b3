"""Train an EAGLE draft head (`policies.draft_heads`) for a local Llama-family target, on this CPU.

    python -m tuner.builtin.train_eagle --target builtin:smollm2-135m        # the committed smollm2-135m-eagle
    python -m tuner.builtin.train_eagle --target PATH --out DIR               # a head for your own model

Data, all local and deterministic, and none of it what the benchmarks measure on:
1. chat requests (explain / summarise / continue) over the *training* split of Python's reference prose and of
   the standard-library source (`tuner.tasks`: chat prompts draw from the held-out splits), answered greedily by
   the target itself, in batches: the text a draft head must guess is the target's own answers;
2. windows of the same training text, teacher-forced.
The target runs teacher-forced over every sequence once: its features (the last hidden state after the final norm)
and its top-8 next-token distribution at every position, kept in the work directory.

Loss (EAGLE-1): SmoothL1 between the predicted and the true next feature, plus 0.1 x the cross-entropy against
the target's next-token distribution (its top 8, renormalised) through the target's LM head; uniform noise on
the input features (EAGLE's U(-0.1, 0.1)). AdamW, warm-up then cosine decay.

The run is resumable: each stage writes its result to `--work` (data, features, then a checkpoint every
`--save-every` steps with the optimiser and RNG states), and the same command picks up where it stopped. Within
`--minutes` of training it checkpoints and stops, to be resumed. Everything is seeded: the first steps are
the same on every run (tested). The head's vocabulary ranking (FR-Spec) is the token frequency of the data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from policies.draft_heads import EagleHead, save_head
from profilers.model_parts import decoder_parts

TOP_K = 8
BUILTIN_TARGET = "builtin:smollm2-135m"
BUILTIN_HEAD = "smollm2-135m-eagle"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the weights (recorded in the head's metadata)."""

    requests: int = 160  # chat requests answered by the target
    answer_tokens: int = 80  # greedy tokens per answer
    windows: int = 120  # teacher-forced text windows
    window_chars: int = 700  # passage size (chat requests and windows); prefill, not decode, is the data's cost
    batch: int = 16  # answers generated per batch
    steps: int = 1300  # ~25 min here at ~1.1 s a step (two sequences, ~550 positions)
    seq_per_step: int = 2
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.0
    p_weight: float = 0.1  # EAGLE's weight of the token loss
    noise: float = 0.1  # uniform input-feature noise amplitude
    seed: int = 0


# -- data ----------------------------------------------------------------------------------------------------
def training_prompts(recipe: Recipe) -> tuple[list[str], list[str]]:
    """(chat requests, text windows) over the training splits, a pure function of the recipe."""
    from tuner.tasks import CHAT_KINDS, CHAT_SOURCES, CHAT_TEMPLATES, _code_window, prose_passage

    rng = random.Random(f"train_eagle:{recipe.seed}")
    requests = []
    for i in range(recipe.requests):
        kind, source = CHAT_KINDS[i % len(CHAT_KINDS)], CHAT_SOURCES[(i // len(CHAT_KINDS)) % len(CHAT_SOURCES)]
        passage = (prose_passage(rng, recipe.window_chars, split="train") if source == "prose"
                   else _code_window(rng, recipe.window_chars, split="train")[0])
        requests.append(CHAT_TEMPLATES[source][kind].format(passage=passage))
    windows = [prose_passage(rng, recipe.window_chars, split="train") if i % 2 == 0
               else _code_window(rng, recipe.window_chars, split="train")[0] for i in range(recipe.windows)]
    return requests, windows


def _chat_ids(tokenizer: Any, text: str) -> list[int]:
    """A request as the target reads it: a user turn of its chat template (plain text without one)."""
    from tuner.tasks import prompt_ids

    return prompt_ids(tokenizer, text)[0].tolist()


def generate_answers(model: Any, tokenizer: Any, prompts: list[list[int]], recipe: Recipe,
                     progress: Any) -> list[list[int]]:
    """The target's greedy answers, generated `recipe.batch` prompts at a time with left padding."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    answers: list[list[int]] = []
    for start in range(0, len(prompts), recipe.batch):
        chunk = prompts[start:start + recipe.batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=recipe.answer_tokens, do_sample=False,
                                 pad_token_id=pad)
        eos = set(_eos_ids(model, tokenizer))
        for row in out[:, width:].tolist():
            cut = next((k for k, t in enumerate(row) if t in eos), None)
            answers.append(row if cut is None else row[:cut + 1])
        progress(len(chunk))
    return answers


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def build_sequences(model: Any, tokenizer: Any, recipe: Recipe, work: Path) -> list[list[int]]:
    """Token-id sequences to train on (cached in `work/sequences.json`)."""
    path = work / "sequences.json"
    if path.is_file():
        return json.loads(path.read_text())["sequences"]
    from tqdm import tqdm

    requests, windows = training_prompts(recipe)
    prompts = [_chat_ids(tokenizer, r) for r in requests]
    with tqdm(total=len(prompts), desc="target answers", unit="answer", file=sys.stderr) as bar:
        answers = generate_answers(model, tokenizer, prompts, recipe, bar.update)
    sequences = [p + a for p, a in zip(prompts, answers, strict=True)]
    sequences += [tokenizer(w)["input_ids"] for w in windows]
    _write_json(path, {"sequences": sequences})
    return sequences


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@dataclass
class Features:
    """Per sequence: the target's features (n, H) in bf16, and its top-8 next-token ids and probabilities."""

    offsets: list[int]
    features: torch.Tensor
    top_ids: torch.Tensor
    top_probs: torch.Tensor

    def sequence(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.features[a:b].float(), self.top_ids[a:b].long(), self.top_probs[a:b].float()


def extract_features(model: Any, sequences: list[list[int]], work: Path) -> Features:
    """Teacher-forced features of every sequence (cached in `work/features.safetensors`)."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    path = work / "features.safetensors"
    if path.is_file():
        data = load_file(str(path))
        return Features(data["offsets"].tolist(), data["features"], data["top_ids"], data["top_probs"])
    parts = decoder_parts(model)
    feats, ids, probs = [], [], []
    for seq in tqdm(sequences, desc="target features", unit="seq", file=sys.stderr):
        with torch.inference_mode():
            hidden = parts.base(torch.tensor([seq])).last_hidden_state[0]
            logits = parts.lm_head(hidden).float()
        top = torch.softmax(logits, -1).topk(TOP_K, dim=-1)
        feats.append(hidden.to(torch.bfloat16))
        ids.append(top.indices.to(torch.int32))
        probs.append(top.values.to(torch.float16))
    offsets = [0]
    for f in feats:
        offsets.append(offsets[-1] + len(f))
    data = {"offsets": torch.tensor(offsets), "features": torch.cat(feats), "top_ids": torch.cat(ids),
            "top_probs": torch.cat(probs)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(data, str(tmp))
    os.replace(tmp, path)
    return Features(offsets, data["features"], data["top_ids"], data["top_probs"])


def vocab_rank(sequences: list[list[int]], vocab: int) -> torch.Tensor:
    """Token ids by frequency in the data, most frequent first (ties: lower id first); unseen ids last."""
    counts = torch.bincount(torch.tensor([t for s in sequences for t in s]), minlength=vocab)[:vocab]
    return torch.tensor(sorted(range(vocab), key=lambda t: (-int(counts[t]), t)))


# -- training ------------------------------------------------------------------------------------------------
def head_loss(head: EagleHead, embed: Any, lm_head: Any, seq: list[int], data: tuple[torch.Tensor, ...],
              recipe: Recipe, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """EAGLE-1's loss on one sequence: pair (f_t, x_{t+1}) predicts f_{t+1} and the target's next token there."""
    feats, top_ids, top_probs = data
    n = len(seq) - 1
    inputs = feats[:-1]
    if recipe.noise:
        inputs = inputs + (torch.rand(inputs.shape, generator=generator) * 2 - 1) * recipe.noise
    with torch.no_grad():
        embeds = embed(torch.tensor([seq[1:]]))
    pred = head(inputs[None], embeds)[0]
    target = feats[1:]
    v_loss = torch.nn.functional.smooth_l1_loss(pred, target)
    logp = torch.log_softmax(lm_head(pred).float(), -1)
    q = top_probs[1:] / top_probs[1:].sum(-1, keepdim=True)
    p_loss = -(q * logp.gather(-1, top_ids[1:])).sum(-1).mean()
    top1 = (logp.argmax(-1) == top_ids[1:, 0]).float().mean()
    return v_loss + recipe.p_weight * p_loss, {"v": v_loss.detach().item(), "p": p_loss.detach().item(),
                                                "top1": top1.item(),
                                                "positions": n}


def _lr(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train(model: Any, sequences: list[list[int]], data: Features, recipe: Recipe, work: Path, minutes: float | None,
          save_every: int, log: Any, stop_after: int | None = None) -> tuple[EagleHead, bool]:
    """Train (or resume) the head, for at most `minutes` and `stop_after` steps in this run (then a checkpoint);
    returns it and whether every step of the recipe has run."""
    from tqdm import tqdm

    torch.manual_seed(recipe.seed)
    head = EagleHead(model.config, bias=True)
    parts = decoder_parts(model)
    for p in (*parts.embed.parameters(), *parts.lm_head.parameters()):
        p.requires_grad_(False)
    opt = torch.optim.AdamW(head.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay)
    step = 0
    ckpt = work / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        if state["recipe"] != asdict(recipe):
            raise SystemExit(f"{ckpt} was trained with another recipe; remove it or use another --work")
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        log({"resumed_at_step": step})
    head.train()
    deadline = None if minutes is None else time.monotonic() + 60 * minutes
    order_rng = random.Random(recipe.seed)
    order = [i for _ in range(recipe.steps * recipe.seq_per_step // max(1, len(sequences)) + 1)
             for i in order_rng.sample(range(len(sequences)), len(sequences))]
    bar = tqdm(total=recipe.steps, initial=step, desc="train head", unit="step", file=sys.stderr)
    done = True
    first = step
    while step < recipe.steps:
        if (deadline is not None and time.monotonic() > deadline) or (
                stop_after is not None and step - first >= stop_after):
            done = False
            break
        generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe)
        opt.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        for k in range(recipe.seq_per_step):
            i = order[step * recipe.seq_per_step + k]
            loss, s = head_loss(head, parts.embed, parts.lm_head, sequences[i], data.sequence(i), recipe, generator)
            (loss / recipe.seq_per_step).backward()
            stats = {key: stats.get(key, 0.0) + value / recipe.seq_per_step for key, value in s.items()}
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(v=f"{stats['v']:.3f}", p=f"{stats['p']:.3f}", top1=f"{stats['top1']:.3f}")
        if step % save_every == 0 or step == recipe.steps:
            _save_checkpoint(ckpt, head, opt, step, recipe)
            log({"step": step, **{k: round(v, 4) for k, v in stats.items()}})
    bar.close()
    if not done:
        _save_checkpoint(ckpt, head, opt, step, recipe)
    head.eval()
    return head, done


def _save_checkpoint(path: Path, head: EagleHead, opt: Any, step: int, recipe: Recipe) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step, "recipe": asdict(recipe)}, tmp)
    os.replace(tmp, path)


# -- evaluation ----------------------------------------------------------------------------------------------
def acceptance_by_depth(model: Any, tokenizer: Any, head: EagleHead, n_prompts: int = 8, depth: int = 5,
                        new_tokens: int = 64) -> dict[str, Any]:
    """Top-1 acceptance per draft depth of a `depth`-token chain, on held-out chat requests (`chat` task, seed 0):
    alpha_d = P(the depth-d token is accepted | depths < d were). Greedy speculative decoding, checked
    against dense greedy output."""
    from policies.drafters import EagleDrafter
    from policies.speculative import SpeculativeStats, speculative_generate
    from search_spaces.speculative_eagle import acceptance_by_depth as alphas
    from tuner.tasks import get_task

    accepted: list[int] = []
    for example in get_task("chat").examples(n_prompts, seed=0):
        ids = torch.tensor([_chat_ids(tokenizer, example.prompt)])
        drafter = EagleDrafter(model, head, list(range(-1, depth - 1)))
        stats = SpeculativeStats()
        try:
            with torch.inference_mode():
                out = speculative_generate(model, ids, new_tokens, drafter, stats=stats,
                                           min_new_tokens=new_tokens, eos_token_id=_eos_ids(model, tokenizer))
                dense = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        finally:
            drafter.close()
        if not torch.equal(out, dense):
            raise RuntimeError("eagle drafter changed the greedy output: a bug, not a weak head")
        accepted += stats.accepted_per_step
    return {"prompts": n_prompts, "new_tokens": new_tokens, "steps": len(accepted), "chain_depth": depth,
            "acceptance_by_depth": [round(a, 4) for a in alphas(accepted, depth)],
            "mean_accepted_per_step": round(sum(accepted) / max(1, len(accepted)), 4)}


# -- command line --------------------------------------------------------------------------------------------
def default_work_dir(target: str) -> Path:
    from policies.store import model_slug
    from tuner.builtin import cache_root

    return cache_root() / "eagle-train" / model_slug(target)


def main(argv: list[str] | None = None) -> int:
    from tuner.models import ModelSpecError, load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=BUILTIN_TARGET, help="builtin:NAME or a local Llama-family checkpoint")
    ap.add_argument("--out", type=Path, default=None, help=f"head directory (default for {BUILTIN_TARGET}: the "
                    f"committed builtin:{BUILTIN_HEAD})")
    ap.add_argument("--work", type=Path, default=None, help="stage results and checkpoints (resumable)")
    ap.add_argument("--minutes", type=float, default=None, help="stop training after this long (resumable)")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (resumable)")
    ap.add_argument("--threads", type=int, default=2)
    for field, value in asdict(Recipe()).items():
        ap.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    ap.add_argument("--eval-prompts", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe(**{f: getattr(args, f) for f in asdict(Recipe())})
    out = args.out
    if out is None:
        if args.target != BUILTIN_TARGET:
            ap.error("--out is required for a target other than " + BUILTIN_TARGET)
        from tuner.builtin import CHECKPOINT_ROOT

        out = CHECKPOINT_ROOT / BUILTIN_HEAD
    work = args.work or default_work_dir(args.target)
    work.mkdir(parents=True, exist_ok=True)
    try:
        loaded = load_model(args.target)
    except ModelSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, tokenizer = loaded.model, loaded.tokenizer
    for p in model.parameters():
        p.requires_grad_(False)

    def log(record: dict[str, Any]) -> None:
        print(json.dumps(record), file=sys.stderr, flush=True)

    started = time.monotonic()
    sequences = build_sequences(model, tokenizer, recipe, work)
    data = extract_features(model, sequences, work)
    log({"sequences": len(sequences), "positions": data.offsets[-1], "prepared_s": round(time.monotonic() - started)})
    head, done = train(model, sequences, data, recipe, work, args.minutes, args.save_every, log, args.stop_after)
    if not done:
        log({"stopped": "time limit", "resume": "run the same command again"})
        return 0
    head.vocab_rank = vocab_rank(sequences, int(model.config.vocab_size))
    evaluation = acceptance_by_depth(model, tokenizer, head, n_prompts=args.eval_prompts)
    meta = {"target": args.target, "recipe": asdict(recipe), "positions": data.offsets[-1],
            "sequences": len(sequences), "command": "python -m tuner.builtin.train_eagle " + " ".join(
                argv if argv is not None else sys.argv[1:]),
            "heldout_eval": evaluation, "torch": torch.__version__,
            "wall_s_this_run": round(time.monotonic() - started)}
    save_head(head, out, model.config, metadata={"autotune": json.dumps(meta)})
    _write_json(out / "train_meta.json", meta)
    log({"wrote": str(out), **evaluation})
    return 0


if __name__ == "__main__":
    sys.exit(main())
