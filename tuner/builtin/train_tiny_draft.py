"""The recipe that produced the committed `builtin:tiny-draft` weights:
`python -m tuner.builtin.train_tiny_draft OUT_DIR`.

`builtin:tiny-draft` is the draft model for speculative decoding of `builtin:tiny`: same tokenizer, same
data, same seven phases as `tuner.builtin.train_tiny` (so it learns the same tasks the same way), at a
quarter of the cost per token (2 layers, hidden 128). Two distillation phases then pull its next-token
distribution towards `builtin:tiny`'s (KL(tiny || draft) on the same batch mixture, answer tokens weighted
as in the CE phases): what a draft model is for is agreeing with its target, and the acceptance rate of
speculative decoding is exactly that agreement (DistillSpec, Zhou et al. 2023, makes the same point).

Why 2 layers and not 1: copying from the context (needles, repeated patterns, the target's own repetitive
continuations) needs a previous-token head feeding an induction head, i.e. two attention layers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tuner.builtin.train_tiny import PHASES, Batches, Phase, code_token_ids, new_model, optimise, run_phase

MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True)
DISTILL_PHASES = (
    Phase(400, 256, 16, 1e-3, 0.25, 0.6, 5.0),
    Phase(100, 1280, 4, 5e-4, 0.5, 0.5, 5.0),
)


def distill_phase(student, teacher, tokenizer, code_ids: list[int], phase: Phase, log) -> None:
    """KL(teacher || student) per position, weighted like the CE phases; reseeded like `run_phase`."""
    torch.manual_seed(1)
    batches = Batches(tokenizer, code_ids, seed=1)

    def step_loss():
        x, w = batches.batch(phase)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            target_lp = torch.log_softmax(teacher(input_ids=x[:, :-1]).logits.float(), -1)
        target_lp = target_lp.clone()  # out of inference mode, usable in autograd
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = student(input_ids=x[:, :-1]).logits
        lp = torch.log_softmax(logits.float(), -1)
        kl = (target_lp.exp() * (target_lp - lp)).sum(-1)
        loss = (kl * w).sum() / w.sum()

        def report() -> dict:
            agree = (logits.argmax(-1) == target_lp.argmax(-1)).float().mean().item()
            return {"kl": round(loss.item(), 4), "top1_agree": round(agree, 3)}

        return loss, report

    optimise(student, phase.steps, phase.lr, step_loss, log, {"distill": phase.seq_len})


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuner.builtin import builtin_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--teacher", type=Path, default=None, help="default: the committed builtin:tiny")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    teacher_dir = args.teacher or builtin_checkpoint("tiny")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    code_ids = code_token_ids(tokenizer)
    model = new_model(tokenizer, {**MODEL, "rms_norm_eps": teacher.config.rms_norm_eps})

    def log(rec: dict) -> None:
        print(json.dumps(rec), file=sys.stderr, flush=True)

    for phase in PHASES:
        run_phase(model, tokenizer, code_ids, phase, log)
    for phase in DISTILL_PHASES:
        distill_phase(model, teacher, tokenizer, code_ids, phase, log)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)


if __name__ == "__main__":
    main()
