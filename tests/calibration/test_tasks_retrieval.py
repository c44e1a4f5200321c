"""Path traversal, key–value retrieval and needle tasks: what the prompts hold and how answers grade."""

from __future__ import annotations

import json
import re

import pytest

from calibration.tasks import Example, count_prompt_tokens, get_task, grade_exact, grade_partial
from calibration.tasks.pathtrans import format_route, parse_route
from decoder.tiny import tiny_tokenizer

_LINE = re.compile(r"^(\w+) is a lively city\. You can travel from (\w+) to (\w+) by (bus|train|plane|ferry)\.$")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ------------------------------------------------------------------ path traversal


def _graph(example: Example) -> dict[str, tuple[str, str]]:
    """city -> (mode, next city), read back from the prompt's lines."""
    edges = {}
    for line in example.messages[0]["content"].splitlines():
        match = _LINE.match(line)
        if match:
            city, same, nxt, mode = match.groups()
            assert city == same
            assert city not in edges, f"{city} has two outgoing connections"
            edges[city] = (mode, nxt)
    return edges


@pytest.mark.parametrize("path_length", [3, 6])
def test_path_prompt_is_a_functional_graph_whose_walk_is_the_answer(tok, path_length):
    for example in get_task("pathtrans").generate(tok, 2, 3000, seed=path_length, path_length=path_length):
        edges = _graph(example)
        # Every city named has exactly one outgoing line, and nothing points outside the list.
        assert all(nxt in edges for _, nxt in edges.values())
        source, target = example.meta["source"], example.meta["target"]
        assert f"Find the route from {source} to {target}." in example.messages[0]["content"]
        walk, city = [], source
        while city != target:
            mode, nxt = edges[city]
            walk.append((city, mode, nxt))
            city = nxt
            assert len(walk) <= path_length
        assert len(walk) == path_length
        assert parse_route(example.answer) == walk
        assert example.answer == format_route(walk)
        # Distractor chains merge into the route somewhere after the start.
        on_path = {b for _, _, b in walk}
        assert any(city not in on_path | {source} and nxt in on_path for city, (_, nxt) in edges.items())
        assert example.meta["n_cities"] == len(edges)


def test_lines_are_shuffled_not_in_route_order(tok):
    [example] = get_task("pathtrans").generate(tok, 1, 3000, seed=0, path_length=6)
    lines = [line for line in example.messages[0]["content"].splitlines() if _LINE.match(line)]
    route_rows = [next(i for i, line in enumerate(lines) if line.startswith(a + " ")) for a, _, _ in parse_route(example.answer)]
    assert route_rows != sorted(route_rows)


def _route_example(steps):
    return Example(id="p", messages=[{"role": "user", "content": "?"}], answer=format_route(steps))


GOLD = [("Avon", "bus", "Brill"), ("Brill", "train", "Cosk"), ("Cosk", "ferry", "Dunel"), ("Dunel", "plane", "Esk"), ("Esk", "bus", "Fane")]


def test_path_graders_exact_and_partial():
    example = _route_example(GOLD)
    task = get_task("pathtrans")
    assert task.grade(example.answer, example) == 1.0 and grade_exact(example.answer, example) == 1.0
    # Two correct steps, then a wrong mode: the prefix earns 2/5.
    wrong = format_route(GOLD[:2] + [("Cosk", "bus", "Dunel")] + GOLD[3:])
    assert grade_partial(wrong, example) == pytest.approx(0.4) and grade_exact(wrong, example) == 0.0
    # The whole route and a step too many: full partial credit, not exact.
    extra = format_route(GOLD + [("Fane", "bus", "Avon")])
    assert task.grade(extra, example) == 1.0 and grade_exact(extra, example) == 0.0
    # Stopping early: 3/5.
    assert task.grade(format_route(GOLD[:3]), example) == pytest.approx(0.6)
    # A wrong first step earns nothing even if later ones are right.
    assert task.grade(format_route([("Avon", "bus", "Cosk")] + GOLD[1:]), example) == 0.0
    assert task.grade("I do not know.", example) == 0.0


def test_route_parsing_is_tolerant_of_layout_but_reads_only_the_route_block():
    example = _route_example(GOLD[:2])
    no_tags = "From Avon, take a bus to Brill.\nFrom Brill, take a train to Cosk."
    assert grade_exact(no_tags, example) == 1.0
    unclosed = "Sure.\n<Route>\nFrom Avon , take a Bus to Brill. From Brill, take a train to Cosk."
    assert grade_exact(unclosed, example) == 1.0
    # Steps outside the <Route> block (e.g. reasoning before it) are ignored.
    noisy = "From Avon, take a plane to Esk.\n<Route>\n" + no_tags + "\n</Route>\nFrom Cosk, take a bus to Fane."
    assert grade_exact(noisy, example) == 1.0


# ------------------------------------------------------------------ key–value retrieval


def test_kv_prompt_is_a_json_object_holding_the_asked_pair(tok):
    for example in get_task("kv").generate(tok, 3, 2500, seed=1):
        content = example.messages[0]["content"]
        blob = content[content.index("{") : content.rindex("}") + 1]
        pairs = json.loads(blob)
        key = example.meta["key"]
        assert pairs[key] == example.answer
        assert list(pairs).index(key) == example.meta["key_index"]
        assert len(pairs) == example.meta["n_pairs"] > 10
        ids = list(pairs) + list(pairs.values())
        assert len(set(ids)) == len(ids)
        assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", i) for i in ids)
        assert f'What is the value of the key "{key}"?' in content


def test_kv_depth_places_the_key(tok):
    first = get_task("kv").generate(tok, 1, 2500, seed=0, depth=0.0)[0]
    last = get_task("kv").generate(tok, 1, 2500, seed=0, depth=1.0)[0]
    assert first.meta["key_index"] == 0
    assert last.meta["key_index"] == last.meta["n_pairs"] - 1


def test_kv_grading_is_exact_up_to_whitespace_quotes_and_case():
    value = "3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
    example = Example(id="k", messages=[{"role": "user", "content": "?"}], answer=value)
    task = get_task("kv")
    for response in (value, f" {value}\n", f'"{value}"', f"`{value}`.", value.upper(), f"'{value}'"):
        assert task.grade(response, example) == 1.0, response
    for response in ("", value[:-1], value + "0", f"The value is {value}", "0a1b2c3d-5a6b-4c7d-8e9f-0a1b2c3d4e5f"):
        assert task.grade(response, example) == 0.0, response


# ------------------------------------------------------------------ needle


def test_needle_number_is_the_only_number_in_the_prompt(tok):
    for example in get_task("needle").generate(tok, 3, 2000, seed=2):
        content = example.messages[0]["content"]
        assert re.findall(r"\d+", content) == [example.answer]
        assert len(example.answer) == 7
        assert example.meta["needle"] in content


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_depth_places_the_needle(tok, depth):
    [example] = get_task("needle").generate(tok, 1, 3000, seed=0, depth=depth)
    content = example.messages[0]["content"]
    text = content[content.index("<text>") : content.index("</text>")]
    where = text.index(example.meta["needle"]) / len(text)
    assert abs(where - depth) < 0.05


def test_needle_grading_reads_the_first_number():
    example = Example(id="n", messages=[{"role": "user", "content": "?"}], answer="4830215")
    task = get_task("needle")
    assert task.grade("4830215", example) == 1.0
    assert task.grade("The secret number is 4,830,215.", example) == 1.0
    assert task.grade("4830216", example) == 0.0
    assert task.grade("It is 12, no, 4830215.", example) == 0.0  # the first number counts
    assert task.grade("48302150", example) == 0.0
    assert task.grade("I could not find it.", example) == 0.0


def test_needle_digits_option(tok):
    [example] = get_task("needle").generate(tok, 1, 1000, seed=0, digits=4)
    assert len(example.answer) == 4 and count_prompt_tokens(tok, example.messages) <= 1000


# ------------------------------------------------------------------ a real tokenizer


@pytest.mark.embedded
@pytest.mark.parametrize("name", ["mrcr", "pathtrans", "kv", "needle"])
def test_sizing_with_the_embedded_smollm2_tokenizer(name):
    from transformers import AutoTokenizer

    from decoder.catalogue import checkpoint_dir

    folder = checkpoint_dir("smollm2-135m")
    if not (folder / "tokenizer.json").is_file():
        pytest.fail("the embedded model smollm2-135m is not installed; run `.venv/bin/dysco models pull smollm2-135m`")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for example in get_task(name).generate(tokenizer, 2, 4096, seed=0):
        ids = tokenizer.apply_chat_template(example.messages, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert 0.9 * 4096 <= len(ids) <= 4096
        assert get_task(name).grade(example.answer, example) == 1.0


@pytest.mark.parametrize("name", ["needle", "kv", "pathtrans", "mrcr"])
def test_evidence_positions_cover_exactly_the_evidence_text(tok, name):
    """The selection-recall diagnostic needs the answer's token positions: they decode to the evidence."""
    from calibration.tasks import encode_prompt, evidence_positions

    task = get_task(name)
    for example in task.generate(tok, 3, 600, seed=4):
        evidence = task.evidence(example)
        assert evidence, f"{name} gives no evidence"
        ids = encode_prompt(tok, example.messages)
        positions = evidence_positions(tok, example, evidence, ids)
        assert positions, f"{name}: evidence not found in the prompt"
        covered = tok.decode([ids[p] for p in positions])
        for piece in evidence:
            assert piece in covered
        # Contiguous runs only around the evidence: no token far outside it is counted.
        assert len(positions) <= sum(len(tok(piece, add_special_tokens=False)["input_ids"]) + 2 for piece in evidence)
    # Ids that are not the example's prompt give no positions rather than wrong ones.
    assert evidence_positions(tok, example, evidence, ids[1:]) is None
    assert evidence_positions(tok, example, ["not in the prompt at all"], ids) is None
