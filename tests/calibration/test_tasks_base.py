"""calibration.tasks: prompt rendering, sizing in model tokens, determinism, split, task registry."""

from __future__ import annotations

import copy
import json

import pytest

from calibration.tasks import (
    TASK_NAMES,
    Example,
    KVTask,
    MRCRTask,
    NeedleTask,
    PathTransTask,
    count_prompt_tokens,
    encode_prompt,
    get_task,
    load_examples,
    render_prompt,
    save_examples,
    split,
)
from decoder.tiny import tiny_tokenizer

MESSAGES = [{"role": "user", "content": "Write a poem about tapirs."}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def base_tok():
    """The tiny tokenizer without a chat template, as Gemma 3 270M base ships."""
    plain = copy.deepcopy(tiny_tokenizer())
    plain.chat_template = None
    return plain


# ------------------------------------------------------------------ rendering


def test_render_prompt_uses_the_chat_template_with_generation_prompt(tok):
    text = render_prompt(tok, MESSAGES)
    assert text == "<|im_start|>user\nWrite a poem about tapirs.<|im_end|>\n<|im_start|>assistant\n"


def test_render_prompt_without_template_concatenates_contents(base_tok):
    messages = MESSAGES + [{"role": "assistant", "content": "Tapirs."}, {"role": "user", "content": "Again."}]
    assert render_prompt(base_tok, messages) == "Write a poem about tapirs.\n\nTapirs.\n\nAgain.\n"


def test_encode_prompt_is_the_rendered_text_tokenised_once(tok):
    ids = encode_prompt(tok, MESSAGES)
    assert ids == tok.encode(render_prompt(tok, MESSAGES), add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2  # user header + generation prompt
    assert count_prompt_tokens(tok, MESSAGES) == len(ids)


# ------------------------------------------------------------------ sizing

TASK_OPTS = [("needle", {}), ("kv", {}), ("pathtrans", {"path_length": 4}), ("mrcr", {"n_needles": 2}), ("mrcr", {"n_needles": 4})]


@pytest.mark.parametrize("name,opts", TASK_OPTS)
@pytest.mark.parametrize("context", [1500, 4000])
def test_generated_prompts_fill_90_to_100_percent_of_the_budget(tok, name, opts, context):
    examples = get_task(name).generate(tok, 2, context, seed=3, **opts)
    assert len(examples) == 2
    for example in examples:
        tokens = count_prompt_tokens(tok, example.messages)
        assert 0.9 * context <= tokens <= context, (name, tokens)
        assert example.meta["prompt_tokens"] == tokens
        assert example.meta["answer_tokens"] == len(tok.encode(example.answer, add_special_tokens=False))


@pytest.mark.parametrize("name", TASK_NAMES)
def test_sizing_without_chat_template_counts_the_plain_prompt(base_tok, name):
    [example] = get_task(name).generate(base_tok, 1, 2000, seed=0)
    tokens = len(base_tok.encode(render_prompt(base_tok, example.messages)))
    assert 1800 <= tokens <= 2000


@pytest.mark.parametrize("name,opts", TASK_OPTS)
def test_same_seed_same_examples_other_seed_other_examples(tok, name, opts):
    task = get_task(name)
    first = task.generate(tok, 3, 1200, seed=7, **opts)
    again = task.generate(tok, 3, 1200, seed=7, **opts)
    other = task.generate(tok, 3, 1200, seed=8, **opts)
    assert [e.to_dict() for e in first] == [e.to_dict() for e in again]
    assert [e.messages for e in first] != [e.messages for e in other]
    assert len({e.id for e in first + other}) == 6
    # Example i does not depend on how many were asked for.
    assert task.generate(tok, 1, 1200, seed=7, **opts)[0].to_dict() == first[0].to_dict()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_too_small_context_is_a_clear_error(tok, name):
    with pytest.raises(ValueError, match="context_tokens=40 is too small"):
        get_task(name).generate(tok, 1, 40, seed=0)


def test_bad_generate_arguments_are_refused_with_accepted_values(tok):
    task = get_task("mrcr")
    with pytest.raises(ValueError, match="n must be a positive integer"):
        task.generate(tok, 0, 1000)
    with pytest.raises(ValueError, match="context_tokens must be a positive integer"):
        task.generate(tok, 1, -5)
    with pytest.raises(ValueError, match=r"no option needles; its options \(defaults\): n_needles=None, reply_tokens"):
        task.generate(tok, 1, 1000, needles=2)
    with pytest.raises(ValueError, match="n_needles must be an integer"):
        task.generate(tok, 1, 1000, n_needles=0)
    with pytest.raises(ValueError, match="path_length must be a positive integer"):
        get_task("pathtrans").generate(tok, 1, 1000, path_length=0)
    with pytest.raises(ValueError, match=r"depth must be a fraction in \[0, 1\]"):
        get_task("needle").generate(tok, 1, 1000, depth=1.5)


# ------------------------------------------------------------------ registry


def test_get_task_returns_each_named_task():
    kinds = {"mrcr": MRCRTask, "pathtrans": PathTransTask, "kv": KVTask, "needle": NeedleTask}
    for name, kind in kinds.items():
        task = get_task(name)
        assert isinstance(task, kind) and task.name == name


def test_get_task_unknown_name_lists_the_accepted_ones():
    with pytest.raises(ValueError) as err:
        get_task("mrrc")
    message = str(err.value)
    assert "unknown dev task 'mrrc'" in message
    for name in TASK_NAMES:
        assert name in message
    assert ".parquet" in message


def test_get_task_missing_file_path_is_unknown_not_a_hub_lookup(tmp_path):
    with pytest.raises(ValueError, match="unknown dev task"):
        get_task(str(tmp_path / "nothing.jsonl"))


# ------------------------------------------------------------------ split


def _examples(n):
    return [Example(id=f"ex-{i}", messages=MESSAGES, answer=str(i)) for i in range(n)]


def test_split_is_deterministic_disjoint_and_sized():
    examples = _examples(20)
    dev, test = split(examples, seed=1, test_fraction=0.25)
    assert len(test) == 5 and len(dev) == 15
    assert {e.id for e in dev}.isdisjoint(e.id for e in test)
    assert {e.id for e in dev + test} == {e.id for e in examples}
    assert split(examples, seed=1, test_fraction=0.25) == (dev, test)
    assert split(examples, seed=2, test_fraction=0.25)[1] != test
    # Each part keeps the input order.
    assert [e.id for e in dev] == [e.id for e in examples if e in dev]


def test_split_depends_on_ids_not_on_list_order():
    examples = _examples(12)
    _, test = split(examples, seed=4, test_fraction=0.5)
    _, test_reversed = split(examples[::-1], seed=4, test_fraction=0.5)
    assert {e.id for e in test} == {e.id for e in test_reversed}


def test_split_keeps_one_of_each_when_it_can_and_refuses_bad_input():
    dev, test = split(_examples(3), seed=0, test_fraction=0.01)
    assert len(test) == 1 and len(dev) == 2
    assert split(_examples(3), seed=0, test_fraction=0)[1] == []
    with pytest.raises(ValueError, match=r"test_fraction must be a number in \[0, 1\)"):
        split(_examples(3), seed=0, test_fraction=1.0)
    with pytest.raises(ValueError, match="repeated: ex-0"):
        split(_examples(2) + _examples(1), seed=0, test_fraction=0.5)


# ------------------------------------------------------------------ saved examples


def test_saved_examples_load_back_through_the_task(tmp_path, tok):
    examples = get_task("kv").generate(tok, 3, 1200, seed=0)
    path = save_examples(tmp_path / "kv.jsonl", examples)
    loaded = get_task("kv").load(path)
    assert [e.to_dict() for e in loaded] == [e.to_dict() for e in examples]
    assert get_task("kv").grade(loaded[0].answer, loaded[0]) == 1.0


def test_loading_a_broken_examples_file_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(Example(id="a", messages=MESSAGES, answer="x").to_dict())
    path.write_text(good + "\n" + json.dumps({"id": "b", "messages": MESSAGES}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'answer'"):
        load_examples(path)
    path.write_text(good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_examples(path)
    bad_role = {"id": "c", "messages": [{"role": "robot", "content": "hi"}], "answer": "x"}
    path.write_text(json.dumps(bad_role) + "\n")
    with pytest.raises(ValueError, match="role 'robot'; accepted roles: system, user, assistant"):
        load_examples(path)


def test_examples_do_not_depend_on_the_interpreter_hash_seed(tok):
    # Set iteration order changes with PYTHONHASHSEED; generated examples must not.
    import hashlib
    import os
    import subprocess
    import sys

    code = (
        "import hashlib, json\n"
        "from decoder.tiny import tiny_tokenizer\n"
        "from calibration.tasks import get_task\n"
        "h = hashlib.sha256()\n"
        "for name in ('mrcr', 'pathtrans', 'kv', 'needle'):\n"
        "    for e in get_task(name).generate(tiny_tokenizer(), 1, 1200, seed=0):\n"
        "        h.update(json.dumps(e.to_dict(), sort_keys=True).encode())\n"
        "print(h.hexdigest())\n"
    )
    here = hashlib.sha256()
    for name in ("mrcr", "pathtrans", "kv", "needle"):
        for e in get_task(name).generate(tok, 1, 1200, seed=0):
            here.update(json.dumps(e.to_dict(), sort_keys=True).encode())
    env = dict(os.environ, PYTHONHASHSEED="12345")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == here.hexdigest()
