"""Built-in tasks: determinism, shapes, scoring, held-out code split."""

from __future__ import annotations

import random
import re

import pytest

from tuner import tasks
from tuner.tasks import Example, RetrievalTask, get_task


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tuner.builtin import builtin_checkpoint

    return AutoTokenizer.from_pretrained(str(builtin_checkpoint("tiny")))


def test_registry_names_and_unknown():
    assert {"retrieval", "retrieval-2k", "pattern", "code"} <= set(tasks.TASKS)
    for name in tasks.list_tasks():
        task = get_task(name)
        assert task.name == name
        assert task.description and task.max_new_tokens > 0
    with pytest.raises(ValueError) as err:
        get_task("nope")
    msg = str(err.value)
    assert "\n" not in msg and "retrieval" in msg and "pattern" in msg


@pytest.mark.parametrize("name", ["needle", "needle-2k", "retrieval", "retrieval-2k", "pattern", "code", "passkey",
                                  "passkey-multi"])
def test_examples_deterministic_by_seed(name):
    task = get_task(name)
    a, b, c = task.examples(5, seed=0), task.examples(5, seed=0), task.examples(5, seed=1)
    assert a == b
    assert a != c
    assert len(a) == 5 and all(isinstance(e, Example) and e.task == name for e in a)
    assert all(e.prompt and e.answer.strip() for e in a)
    assert task.examples(3, seed=0) == a[:3]  # a prefix of the same stream
    assert task.examples(0, seed=0) == []


def test_needle_answer_in_exactly_one_line():
    for name in ("needle", "needle-2k"):
        for ex in get_task(name).examples(10, seed=3):
            word = ex.answer.strip().removesuffix(".")
            assert ex.answer == f" {word}." and word in tasks.NEEDLE_WORDS
            hits = [ln for ln in ex.prompt.split("\n") if ln.startswith("# the secret word is ")]
            assert hits == [f"# the secret word is {word}."]
            assert ex.prompt.endswith("# Answer: the secret word is")


def test_needle_words_are_single_tokens(tokenizer):
    for word in tasks.NEEDLE_WORDS:
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word


def test_retrieval_answer_in_exactly_one_line():
    for ex in get_task("retrieval").examples(20, seed=3):
        table, query = ex.prompt.rsplit("\n# ", 1)
        key = query.rsplit("\n", 1)[1].removesuffix(" =")
        assert ex.prompt.endswith(f"\n{key} =")
        assert re.fullmatch(r" \d{4}", ex.answer)
        lines = table.split("\n")
        hits = [ln for ln in lines if ln.startswith(f"{key} = ")]
        assert hits == [f"{key} ={ex.answer}"]
        assert sum(ln.endswith(ex.answer) for ln in lines) >= 1
        keys = [ln.split(" = ")[0] for ln in lines[1:] if ln]
        assert len(keys) == len(set(keys)) >= 105


def test_retrieval_length_knob():
    short = RetrievalTask(n_pairs=10).examples(2, seed=0)
    assert all(ex.prompt.count(" = ") == 10 for ex in short)
    long = RetrievalTask(n_pairs=(300, 320)).examples(2, seed=0)
    assert all(300 <= ex.prompt.count(" = ") <= 320 for ex in long)
    with pytest.raises(ValueError):
        RetrievalTask(n_pairs=0)
    with pytest.raises(ValueError):
        RetrievalTask(n_pairs=(50, 10))


def test_retrieval_prompt_token_lengths(tokenizer):
    lens = [len(tokenizer(e.prompt)["input_ids"]) for e in get_task("retrieval").examples(50, seed=0)]
    assert min(lens) >= 1000 and max(lens) <= 1600
    lens2 = [len(tokenizer(e.prompt)["input_ids"]) for e in get_task("retrieval-2k").examples(20, seed=0)]
    assert min(lens2) >= 2000 and max(lens2) <= 2600


def test_pattern_answers_follow_the_pattern():
    for ex in get_task("pattern").examples(60, seed=5):
        kind, rest = ex.prompt.split(": ", 1)
        shown = rest.removesuffix(" |").split()
        ans = ex.answer.split()
        assert ex.prompt.endswith(" |") and ex.answer.startswith(" ")
        if kind == "copy":
            assert ans == shown
        elif kind == "next":
            step = int(shown[1]) - int(shown[0])
            seq = [int(x) for x in shown + ans]
            assert all(b - a == step for a, b in zip(seq[:-1], seq[1:], strict=True))
        else:
            assert kind == "cycle"
            seq = shown + ans
            period = len(set(shown))
            assert all(seq[i] == seq[i % period] for i in range(len(seq)))


def test_score_exact_match_up_to_newline():
    task = get_task("retrieval")
    assert task.score(" 1234", " 1234") == 1.0
    assert task.score(" 1234\nfoo = 99", " 1234") == 1.0
    assert task.score("1234  ", " 1234") == 1.0
    assert task.score(" 1235", " 1234") == 0.0
    assert task.score(" 12345", " 1234") == 0.0
    assert task.score("", " 1234") == 0.0


def test_code_split_and_samples():
    held = tasks.stdlib_files("heldout")
    train = tasks.stdlib_files("train")
    assert held and train
    assert not {r for r, _ in held} & {r for r, _ in train}
    assert 0.03 < len(held) / (len(held) + len(train)) < 0.2
    assert all(tasks.is_heldout(r) for r, _ in held)
    assert not any(r.startswith("site-packages/") for r, _ in held + train)

    a = tasks.code_samples(4, seed=0, n_chars=800)
    assert a == tasks.code_samples(4, seed=0, n_chars=800)
    assert a != tasks.code_samples(4, seed=1, n_chars=800)
    assert all(200 < len(s) <= 800 and s.endswith("\n") for s in a)
    held_text = [tasks.read_source(p) or "" for _, p in held]
    assert all(any(s in t for t in held_text) for s in a)

    ex = get_task("code").examples(3, seed=0)
    for e in ex:
        assert e.answer.strip() and "\n" not in e.answer
        assert e.prompt.endswith("\n")


def test_training_text_uses_the_same_generators():
    rng = random.Random("x")
    text = RetrievalTask().training_text(rng, n_pairs=20, n_queries=5)
    assert text.count("# What is the value of this key?") == 5
    pairs = dict(re.findall(r"^(\w+) = (\d+)$", text, flags=re.M))
    for key, value in re.findall(r"\?\n(\w+) = (\d+)\n", text):
        assert pairs[key] == value
    assert tasks.TRAIN_SEED_OFFSET >= 1000


@pytest.mark.parametrize("name, n_keys", [("passkey", 1), ("passkey-2k", 1), ("passkey-multi", 5)])
def test_passkey_states_the_asked_key_once_among_its_distractors(name, n_keys):
    task = get_task(name)
    assert task.chat
    for example in task.examples(20, seed=3):
        keys = re.findall(r"pass key is (\d{5})\.", example.prompt)
        assert len(set(keys)) == n_keys and example.answer in keys
        question = example.prompt.rsplit("\n\n", 1)[1]
        if n_keys > 1:  # the question names the label of the key it asks for, and only that one
            label = re.search(r"What is the (\w+) pass key", question).group(1)
            assert f"The {label} pass key is {example.answer}." in example.prompt
        assert re.search(r"\d{5}", question) is None
    depths = [e.prompt.index("pass key is") / len(e.prompt) for e in task.examples(20, seed=3)]
    assert min(depths) < 0.3 and max(depths) > 0.7  # the key sits at varied depths


def test_passkey_length_follows_n_tokens_and_scoring_reads_the_first_number():
    short, long = (sum(len(e.prompt) for e in get_task(n).examples(5, seed=0)) / 5 for n in ("passkey", "passkey-4k"))
    assert 3_500 < short < 6_000 and 15_000 < long < 20_000  # ~4 characters per token of prose
    task = get_task("passkey")
    assert task.score("The pass key is 12345.", "12345") == 1.0
    assert task.score("12345", "12345") == 1.0
    assert task.score("It is 54321, not 12345.", "12345") == 0.0
    assert task.score("I do not know.", "12345") == 0.0


def test_prompt_ids_use_the_chat_template_only_where_there_is_one(tokenizer):
    plain = tasks.prompt_ids(tokenizer, "hello world")
    assert plain.tolist() == [tokenizer("hello world").input_ids]  # builtin:tiny's tokenizer has no template

    class Chat:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, **kwargs):
            assert messages == [{"role": "user", "content": "hi"}] and kwargs["add_generation_prompt"]
            return {"input_ids": [[7, 8]]}

    assert tasks.prompt_ids(Chat(), "hi") == [[7, 8]]


@pytest.mark.parametrize("name, sources", [("chat", {"prose", "code"}), ("chat-prose", {"prose"}),
                                           ("chat-code", {"code"})])
def test_chat_requests_are_deterministic_and_cover_every_kind(name, sources):
    task = get_task(name)
    a, b, c = task.requests(6, seed=0), task.requests(6, seed=0), task.requests(6, seed=1)
    assert a == b and a != c
    assert task.requests(4, seed=0) == a[:4]  # a prefix of the same stream
    if len(sources) == 2:  # any 6 consecutive requests of the mixed task hold every (kind, source) pair once
        for start in (0, 1, 4):
            window = task.requests(start + 6, seed=0)[start:]
            assert {(r.kind, r.source) for r in window} == {(k, s) for k in tasks.CHAT_KINDS for s in sources}
        assert {r.source for r in a[:2]} == sources and {r.kind for r in a[:3]} == set(tasks.CHAT_KINDS)
    assert {r.kind for r in a} == {"explain", "summarise", "continue"} and {r.source for r in a} == sources
    for r in a:
        head, passage = r.prompt.split("\n\n", 1)
        assert head == tasks.CHAT_TEMPLATES[r.source][r.kind].split("\n\n", 1)[0]
        assert len(passage) > 400
        assert passage.startswith("```python\n") == (r.source == "code")
    assert [e.prompt for e in task.examples(6, seed=0)] == [r.prompt for r in a]
    assert all(e.answer == "" and e.task == name for e in task.examples(6, seed=0))


def test_chat_code_passages_come_from_held_out_files():
    heldout = {p.read_text(encoding="utf-8", errors="replace") for _, p in tasks.stdlib_files("heldout")}
    for r in get_task("chat-code").requests(3, seed=5):
        code = r.prompt.split("```python\n", 1)[1].removesuffix("```")
        assert any(code in text for text in heldout)


def test_prose_splits_partition_the_paragraphs():
    train, heldout = tasks.prose_paragraphs("train"), tasks.prose_paragraphs("heldout")
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(tasks.prose_paragraphs())
    assert 0.05 < len(heldout) / len(tasks.prose_paragraphs()) < 0.2
    with pytest.raises(ValueError, match="split"):
        tasks.prose_paragraphs("test")


def test_chat_prose_passages_are_consecutive_held_out_paragraphs():
    paragraphs = set(tasks.prose_paragraphs("heldout"))
    for r in get_task("chat-prose").requests(6, seed=2):
        parts = r.prompt.split("\n\n")[1:]
        assert 800 < len("\n\n".join(parts)) < 2000  # about n_chars = 1200
        assert all(p in paragraphs for p in parts[:-1])  # only the last one may be cut at a sentence end


def test_chat_tasks_are_workload_only_and_refuse_to_score():
    for name in tasks.list_tasks():
        assert get_task(name).workload_only == name.startswith("chat")
    with pytest.raises(tasks.WorkloadOnlyTaskError) as err:
        get_task("chat").score("Some reply.", "")
    assert isinstance(err.value, ValueError)  # the CLI's input-error class: one line, exit 2
    assert "'chat'" in str(err.value) and "no gold answer" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="sources must be among"):
        tasks.ChatTask(sources=("poetry",))


def test_chat_prompts_go_through_the_chat_template(tokenizer):
    task = get_task("chat")
    assert task.chat
    prompt = task.examples(1, seed=0)[0].prompt
    seen = []

    class Chat:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, **kwargs):
            seen.append(messages)
            return {"input_ids": [[1, 2, 3]]}

    assert tasks.prompt_ids(Chat(), prompt, chat=task.chat) == [[1, 2, 3]]
    assert seen == [[{"role": "user", "content": prompt}]]
    # without a template (builtin:tiny's tokenizer) the request is the plain text
    assert tasks.prompt_ids(tokenizer, prompt, chat=task.chat).tolist() == [tokenizer(prompt).input_ids]


def test_a_quality_harness_on_a_chat_task_fails_at_its_dense_reference(monkeypatch):
    from tuner.models import load_model
    from tuner.quality import QualityConfig, QualityHarness

    # a short request and one new token: the harness's one dense generation before it scores stays cheap
    monkeypatch.setitem(tasks.TASKS, "chat-short", tasks.ChatTask(name="chat-short", n_chars=200, max_new_tokens=1))
    tiny = load_model("builtin:tiny")
    config = QualityConfig(tasks=("chat-short",), examples_per_task=1, free_text_samples=0)
    with pytest.raises(tasks.WorkloadOnlyTaskError, match="cannot score quality"):
        QualityHarness(tiny.model, tiny.tokenizer, config)
