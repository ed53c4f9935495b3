"""Train a built-in model: ``python -m tuner.builtin.train tiny``.

Steps (all local, deterministic seeds; nothing is downloaded):

1. train a byte-level BPE tokenizer (:mod:`tuner.builtin.tokenizer`) on the stdlib train split plus
   generated task text;
2. train a ``LlamaForCausalLM`` from scratch on packed sequences mixing retrieval documents, pattern lines
   and stdlib code (:mod:`tuner.builtin.data`), in phases of growing sequence length (most tokens at 512,
   then 1024, then ~2k so that 1k- and 2k-token retrieval prompts work), AdamW + cosine schedule, bf16
   autocast on CPU (AMX/AVX-512 where present) with fp32 master weights;
3. save an fp32 Hugging Face checkpoint (``config.json``, ``model.safetensors``, ``generation_config.json``,
   tokenizer files) and ``train_meta.json`` (recipe, environment, wall time, final accuracies).

STATUS: experimental and NOT the recipe of the committed ``builtin:tiny`` weights (those come from
``tuner.builtin.train_tiny``).  This recipe targets the key/value ``retrieval`` task.  With the LM loss
alone, 750 steps (6M tokens at 512) gave 0% retrieval / ~1% pattern accuracy (the induction plateau);
the copy-head supervision below (QK: one head's attention is trained toward the copy source; OV: that
head's value at the source must predict the copied token; copied tokens weigh ``copy_weight`` in the LM
loss) was added to cross the plateau but has not been run to completion, so it is unvalidated.
``--eval-only`` measures a checkpoint with plain ``model.generate(do_sample=False)``.
Training is deterministic for a given machine, thread count and Python standard library; the stdlib of
another Python version gives a (slightly) different model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tuner import tasks
from tuner.builtin.data import Mixture, TrainStream, stdlib_fingerprint, tokenizer_corpus


@dataclass(frozen=True)
class Phase:
    seq_len: int
    batch_size: int
    steps: int


@dataclass(frozen=True)
class TrainRecipe:
    name: str
    model: dict
    phases: tuple[Phase, ...]
    vocab_size: int = 2048
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    bf16_autocast: bool = True
    mixture: Mixture = field(default_factory=Mixture)
    eval_every: int = 250
    # attention supervision: one head is trained (besides the LM loss) to look where the next token is
    # copied from (the value's table line in retrieval, the earlier item in copy/cycle patterns, the
    # earlier repeat); this skips the long plateau before induction heads form on their own
    sup_layer: int = 3
    sup_head: int = 0
    sup_weight: float = 1.0
    # LM-loss weight of tokens that are copies (retrieval answers, copied pattern items, repeats)
    copy_weight: float = 10.0

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)


RECIPES: dict[str, TrainRecipe] = {
    "tiny": TrainRecipe(
        name="tiny",
        model=dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            initializer_range=0.02,
        ),
        phases=(Phase(512, 16, 1500), Phase(1024, 8, 400), Phase(2304, 4, 250)),
    ),
}


# ----------------------------------------------------------------------------------------------- eval


def _answer_ids(tok, ex) -> tuple[list[int], list[int]]:
    prompt = tok(ex.prompt)["input_ids"]
    answer = tok(ex.answer, add_special_tokens=False)["input_ids"]
    return prompt, answer


def teacher_forced_accuracy(model, tok, examples, batch_size: int = 8) -> float:
    """Fraction of examples whose answer tokens are all the argmax under teacher forcing.

    Equals greedy exact match on the answer tokens (greedy decoding reproduces them exactly).
    """
    import torch

    hits = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            rows = [_answer_ids(tok, ex) for ex in examples[i : i + batch_size]]
            width = max(len(p) + len(a) for p, a in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (p, a) in enumerate(rows):
                ids[r, : len(p) + len(a)] = torch.tensor(p + a)
                mask[r, : len(p) + len(a)] = 1
            pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
            for r, (p, a) in enumerate(rows):
                got = pred[r, len(p) - 1 : len(p) + len(a) - 1].tolist()
                hits += int(got == a)
    return hits / max(1, len(examples))


def greedy_accuracy(model, tok, task, examples) -> float:
    """Exact-match accuracy with plain ``model.generate(do_sample=False)``, one prompt at a time."""
    import torch

    total = 0.0
    model.eval()
    with torch.no_grad():
        for ex in examples:
            enc = tok(ex.prompt, return_tensors="pt")
            out = model.generate(
                **enc, max_new_tokens=task.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
            text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            total += task.score(text, ex.answer)
    return total / max(1, len(examples))


def code_loss(model, tok, n: int = 16, seed: int = 0, n_chars: int = 2000) -> float:
    """Mean next-token cross-entropy (nats) on held-out stdlib code windows."""
    import torch
    import torch.nn.functional as F

    tot, cnt = 0.0, 0
    model.eval()
    with torch.no_grad():
        for text in tasks.code_samples(n, seed, n_chars=n_chars):
            ids = tok(text, return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits[0, :-1].float()
            tot += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            cnt += ids.shape[1] - 1
    return tot / max(1, cnt)


def prefill_ms(model, n_tokens: int = 1024, repeats: int = 5) -> float:
    import torch

    x = torch.randint(3, model.config.vocab_size, (1, n_tokens))
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=x)
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=x)
            samples.append((time.perf_counter() - t0) * 1000)
    return sorted(samples)[len(samples) // 2]


def evaluate_checkpoint(path: Path, n: int = 100, seed: int = 0) -> dict:
    """Greedy accuracies (retrieval ~1k / ~2k, pattern), code loss and 1k prefill latency."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path))
    model.eval()
    out = {}
    for name in ("retrieval", "retrieval-2k", "pattern"):
        task = tasks.get_task(name)
        exs = task.examples(n, seed)
        lens = [len(tok(e.prompt)["input_ids"]) for e in exs]
        out[name] = {
            "accuracy": greedy_accuracy(model, tok, task, exs),
            "n": n,
            "seed": seed,
            "prompt_tokens_min": min(lens),
            "prompt_tokens_max": max(lens),
        }
        print(name, out[name], flush=True)
    out["code_loss_nats"] = code_loss(model, tok)
    out["uniform_loss_nats"] = math.log(model.config.vocab_size)
    out["prefill_1k_ms"] = prefill_ms(model)
    print({k: out[k] for k in ("code_loss_nats", "uniform_loss_nats", "prefill_1k_ms")}, flush=True)
    return out


# ---------------------------------------------------------------------------------------------- train


def _lr(recipe: TrainRecipe, step: int) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    frac = (step - recipe.warmup_steps) / max(1, recipe.total_steps - recipe.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cos)


def scaled(recipe: TrainRecipe, scale: float) -> TrainRecipe:
    """The recipe with every phase's steps multiplied by ``scale`` (quick experiments)."""
    from dataclasses import replace

    phases = tuple(Phase(p.seq_len, p.batch_size, max(1, round(p.steps * scale))) for p in recipe.phases)
    return replace(recipe, phases=phases, warmup_steps=max(1, round(recipe.warmup_steps * min(1, scale))))


class CopyHeadSupervision:
    """Cross-entropy of one attention head's distribution against the known copy sources.

    A forward pre-hook captures the (normalised) input of ``layers[layer].self_attn`` and its RoPE
    ``position_embeddings``; the head's causal attention logits are recomputed from the module's own
    ``q_proj``/``k_proj`` (exactly what SDPA uses), so the gradient shapes the real head.
    """

    def __init__(self, model, layer: int, head: int):
        from transformers.models.llama.modeling_llama import rotate_half

        self.rotate_half = rotate_half
        self.model = model
        self.attn = model.model.layers[layer].self_attn
        self.head = head
        self.kv_head = head // self.attn.num_key_value_groups
        self.captured = None
        self.handle = self.attn.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.captured = (h, kwargs["position_embeddings"])

    def loss(self, pairs, input_ids):
        """QK + OV losses over ``pairs`` ``[n, 3]`` = (batch row, t, s).

        QK: mean -log attention(t -> s).  OV: the head's output for the value at ``s`` alone, read
        through the final norm and the (tied) unembedding, must predict the token at ``s``.
        """
        import torch

        h, (cos, sin) = self.captured
        self.captured = None
        with torch.autocast("cpu", enabled=False):  # fp32: variable shapes would re-JIT oneDNN bf16 kernels
            return self._loss(pairs, input_ids, h.float(), cos.float(), sin.float())

    def _loss(self, pairs, input_ids, h, cos, sin):
        import torch
        import torch.nn.functional as F

        B, T, _ = h.shape
        hd = self.attn.head_dim
        q = self.attn.q_proj(h).view(B, T, -1, hd)[:, :, self.head]
        k = self.attn.k_proj(h).view(B, T, -1, hd)[:, :, self.kv_head]
        q = q * cos + self.rotate_half(q) * sin
        k = k * cos + self.rotate_half(k) * sin
        b, t, s = pairs[:, 0], pairs[:, 1], pairs[:, 2]
        scores = torch.matmul(q, k.transpose(1, 2))[b, t] * self.attn.scaling  # [n, T]
        causal = torch.arange(T)[None, :] > t[:, None]
        scores = scores.masked_fill(causal, float("-inf"))
        qk = -(scores.log_softmax(-1).gather(1, s[:, None])).mean()
        v = self.attn.v_proj(h[b, s]).view(len(pairs), -1, hd)[:, self.kv_head]  # [n, hd]
        w_o = self.attn.o_proj.weight[:, self.head * hd : (self.head + 1) * hd]
        out = self.model.lm_head(self.model.model.norm(v @ w_o.t()))
        ov = F.cross_entropy(out, input_ids[b, s])
        return qk, ov

    def remove(self):
        self.handle.remove()


def build_tokenizer(recipe: TrainRecipe, out: Path):
    from transformers import AutoTokenizer

    from tuner.builtin.tokenizer import save_tokenizer, train_tokenizer

    t0 = time.time()
    tok = train_tokenizer(tokenizer_corpus(), vocab_size=recipe.vocab_size)
    save_tokenizer(tok, out, model_max_length=recipe.model["max_position_embeddings"])
    print(f"tokenizer: vocab {tok.get_vocab_size()} in {time.time() - t0:.0f}s", flush=True)
    return AutoTokenizer.from_pretrained(str(out))


def train(recipe: TrainRecipe, out: Path, threads: int = 2, log_every: int = 25) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    tok = build_tokenizer(recipe, out)

    config = LlamaConfig(
        vocab_size=recipe.vocab_size,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **recipe.model,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=recipe.betas,
        fused=False,
    )
    stream = TrainStream(tok, recipe.mixture, seed=recipe.seed)
    sup = CopyHeadSupervision(model, recipe.sup_layer, recipe.sup_head) if recipe.sup_weight > 0 else None
    print(f"data: {len(stream.code) / 1e6:.2f}M stdlib code tokens; {time.time() - t_start:.0f}s", flush=True)

    short_retrieval = tasks.RetrievalTask(name="retrieval-short", n_pairs=(30, 40))
    evals = {
        "retrieval-short": short_retrieval.examples(48, 1),
        "retrieval": tasks.get_task("retrieval").examples(32, 1),
        "retrieval-2k": tasks.get_task("retrieval-2k").examples(16, 1),
        "pattern": tasks.get_task("pattern").examples(96, 1),
    }
    log_path = out / "train_log.jsonl"
    log = log_path.open("w")
    step, t_train, tokens = 0, time.time(), 0
    ema = ema_sup = None
    history = []
    for phase in recipe.phases:
        for _ in range(phase.steps):
            model.train()
            lr = _lr(recipe, step)
            for g in opt.param_groups:
                g["lr"] = lr
            ids, pairs = stream.batch(step, phase.batch_size, phase.seq_len)
            batch, pairs = torch.from_numpy(ids), torch.from_numpy(pairs)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16_autocast):
                logits = model(input_ids=inputs).logits
                qk_ov = sup.loss(pairs, inputs) if sup is not None and len(pairs) else None
            sup_loss = None if qk_ov is None else qk_ov[0] + qk_ov[1]
            ce = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            ).view_as(targets)
            weight = torch.ones_like(ce)
            if len(pairs):
                weight[pairs[:, 0], pairs[:, 1]] = recipe.copy_weight
            loss = (ce * weight).sum() / weight.sum()
            total = loss if sup_loss is None else loss + recipe.sup_weight * sup_loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip).item()
            opt.step()
            step += 1
            tokens += inputs.numel()
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            if sup_loss is not None:
                v = sup_loss.item()
                ema_sup = v if ema_sup is None else 0.95 * ema_sup + 0.05 * v
            if step % log_every == 0 or step == recipe.total_steps:
                el = time.time() - t_train
                rec = dict(step=step, seq_len=phase.seq_len, loss=round(ema, 4), sup=round(ema_sup or 0, 3),
                           lr=round(lr, 6), gnorm=round(gnorm, 3),
                           tok_per_s=round(tokens / el), elapsed_s=round(el))
                print(json.dumps(rec), flush=True)
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if step % recipe.eval_every == 0 or step == recipe.total_steps:
                res = {k: teacher_forced_accuracy(model, tok, v) for k, v in evals.items()}
                rec = {"step": step, "eval": res, "elapsed_s": round(time.time() - t_train)}
                history.append(rec)
                print(json.dumps(rec), flush=True)
                log.write(json.dumps(rec) + "\n")
                log.flush()
    train_s = time.time() - t_start
    log.close()
    if sup is not None:
        sup.remove()

    model.config.use_cache = True
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    ).save_pretrained(str(out))
    meta = {
        "recipe": asdict(recipe),
        "parameters": n_params,
        "train_wall_s": round(train_s),
        "train_tokens": tokens,
        "threads": threads,
        "torch": torch.__version__,
        "environment": stdlib_fingerprint(),
        "eval_history": history,
    }
    (out / "train_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tuner.builtin.train", description=__doc__.split("\n")[0])
    ap.add_argument("name", choices=sorted(RECIPES), help="built-in model recipe")
    ap.add_argument("--out", type=Path, required=True,
                    help="checkpoint directory (never the packaged one by default: builtin:tiny's committed "
                    "weights come from tuner.builtin.train_tiny)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every phase's steps (experiments)")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate the checkpoint at --out")
    ap.add_argument("--eval-n", type=int, default=100)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    out = args.out
    if args.eval_only:
        res = evaluate_checkpoint(out, n=args.eval_n)
        print(json.dumps(res, indent=1))
        return 0
    recipe = RECIPES[args.name] if args.scale == 1.0 else scaled(RECIPES[args.name], args.scale)
    print(f"training {args.name} -> {out} ({recipe.total_steps} steps, pid {os.getpid()})", flush=True)
    meta = train(recipe, out, threads=args.threads)
    meta["final_eval"] = evaluate_checkpoint(out, n=args.eval_n)
    (out / "train_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"done in {meta['train_wall_s']}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
