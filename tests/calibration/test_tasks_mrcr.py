"""MRCR: the official grader, the published record format, file/Hub loading, the synthetic generator."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from calibration.tasks import MRCRTask, get_task, grade_mrcr, load_records, record_from_example, save_records
from calibration.tasks.base import count_tokens
from calibration.tasks.mrcr import RECORD_FIELDS, ordinal
from decoder.tiny import tiny_tokenizer

_FINAL = re.compile(
    r"^Prepend (\w{10}) to the (\d+)(?:st|nd|rd|th) \(1 indexed\) (.+) about (.+)\. "
    r"Do not include any other text in your response\.$"
)
_ASK = re.compile(r"\b(?:a|an) (.+) about (.+)[.?]$")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def published_record(answer_text: str = "Tapirs wander.", *, hash_: str = "aB3dE5gH7j") -> dict:
    """A hand-written record in the schema of openai/mrcr (prompt is a JSON string)."""
    messages = [
        {"role": "user", "content": "Write a poem about tapirs."},
        {"role": "assistant", "content": answer_text},
        {"role": "user", "content": "Write a poem about owls."},
        {"role": "assistant", "content": "Owls watch."},
        {"role": "user", "content": f"Prepend {hash_} to the 1st (1 indexed) poem about tapirs. Do not include any other text in your response."},
    ]
    return {
        "prompt": json.dumps(messages),
        "answer": hash_ + answer_text,
        "random_string_to_prepend": hash_,
        "n_needles": 2,
        "desired_msg_index": 1,
        "total_messages": 5,
        "n_chars": sum(len(m["content"]) for m in messages),
        "date_added": "04-12-2025",
    }


# ------------------------------------------------------------------ the grader


def test_grader_hand_checked_values():
    # No hash prefix at all, or not at the very start: 0.
    assert grade_mrcr("Hello world", "abcHello world", "abc") == 0.0
    assert grade_mrcr(" abcHello world", "abcHello world", "abc") == 0.0
    # Exact reply: 1.
    assert grade_mrcr("abcHello world", "abcHello world", "abc") == 1.0
    # "Hello" vs "Hello world": 5 matching chars, 2*5/(5+11) = 0.625.
    assert grade_mrcr("abcHello", "abcHello world", "abc") == pytest.approx(0.625)
    # "Hallo" vs "Hello": H + llo match, 2*4/(5+5) = 0.8.
    assert grade_mrcr("abcHallo", "abcHello", "abc") == pytest.approx(0.8)
    # Only the hash: 0 matching chars against a non-empty answer.
    assert grade_mrcr("abc", "abcHello", "abc") == 0.0


def test_task_grade_reads_the_hash_from_the_example(tok):
    [example] = get_task("mrcr").generate(tok, 1, 1500, seed=0)
    secret = example.meta["random_string_to_prepend"]
    task = get_task("mrcr")
    assert task.grade(example.answer, example) == 1.0
    assert task.grade(example.answer[len(secret):], example) == 0.0
    half = example.answer[: len(secret) + (len(example.answer) - len(secret)) // 2]
    assert 0.5 < task.grade(half, example) < 1.0


# ------------------------------------------------------------------ the synthetic generator


@pytest.mark.parametrize("n_needles", [2, 4, 8])
def test_synthetic_records_follow_the_published_format(tok, n_needles):
    for example in get_task("mrcr").generate(tok, 2, 3000, seed=n_needles, n_needles=n_needles):
        record = record_from_example(example)
        assert set(record) == set(RECORD_FIELDS)
        assert isinstance(record["prompt"], str)
        messages = json.loads(record["prompt"])
        assert messages == example.messages
        assert record["total_messages"] == len(messages)
        assert record["n_chars"] == sum(len(m["content"]) for m in messages)
        assert record["n_needles"] == n_needles
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) + ["user"]

        secret, k, fmt, topic = _FINAL.match(messages[-1]["content"]).groups()
        assert secret == record["random_string_to_prepend"]
        # Exactly n_needles asks share the final ask's format and topic; the k-th one's reply is the answer.
        matching = [i for i, m in enumerate(messages[:-1]) if m["role"] == "user" and _ASK.search(m["content"]).groups() == (fmt, topic)]
        assert len(matching) == n_needles
        assert 1 <= int(k) <= n_needles
        desired = record["desired_msg_index"]
        assert desired == matching[int(k) - 1] + 1
        assert messages[desired]["role"] == "assistant"
        assert record["answer"] == secret + messages[desired]["content"]
        # The needle replies differ, so only the k-th one earns full marks.
        replies = {messages[i + 1]["content"] for i in matching}
        assert len(replies) == n_needles


def test_synthetic_chats_hold_near_miss_asks(tok):
    [example] = get_task("mrcr").generate(tok, 1, 4000, seed=1, n_needles=2)
    _, _, fmt, topic = _FINAL.match(example.messages[-1]["content"]).groups()
    asks = [_ASK.search(m["content"]).groups() for m in example.messages[:-1] if m["role"] == "user"]
    assert any(f == fmt and t != topic for f, t in asks)  # same format, other topic
    assert any(f != fmt and t == topic for f, t in asks)  # same topic, other format


def test_reply_length_option_bounds_needle_replies(tok):
    [example] = get_task("mrcr").generate(tok, 1, 2000, seed=0, n_needles=4, reply_tokens=(8, 12))
    secret = example.meta["random_string_to_prepend"]
    assert count_tokens(tok, example.answer[len(secret):]) <= 12
    full_replies = [m["content"] for m in example.messages[:-1] if m["role"] == "assistant"][:-1]
    assert max(count_tokens(tok, reply) for reply in full_replies) <= 12
    with pytest.raises(ValueError, match=r"reply_tokens must be a token count or a \(min, max\) pair"):
        get_task("mrcr").generate(tok, 1, 2000, reply_tokens=(30, 10))


def test_ordinals():
    assert [ordinal(k) for k in (1, 2, 3, 4, 8, 11, 12, 13, 21, 22, 103)] == [
        "1st", "2nd", "3rd", "4th", "8th", "11th", "12th", "13th", "21st", "22nd", "103rd"]


# ------------------------------------------------------------------ the loader


@pytest.mark.parametrize("suffix", [".parquet", ".json", ".jsonl"])
def test_published_records_round_trip_through_each_file_type(tmp_path, tok, suffix):
    synthetic = [record_from_example(e) for e in get_task("mrcr").generate(tok, 2, 1200, seed=5)]
    records = [published_record()] + synthetic
    path = save_records(tmp_path / f"mrcr{suffix}", records)
    loaded = load_records(path)
    assert len(loaded) == 3
    first = loaded[0]
    assert first.messages == json.loads(records[0]["prompt"])
    assert first.answer == "aB3dE5gH7jTapirs wander."
    assert first.meta["n_needles"] == 2 and first.meta["desired_msg_index"] == 1
    assert first.meta["date_added"] == "04-12-2025"  # extra published fields are kept
    assert [record_from_example(e) for e in loaded[1:]] == synthetic
    assert len({e.id for e in loaded}) == 3
    assert get_task(str(path)).grade("aB3dE5gH7jTapirs wander.", first) == 1.0


@pytest.mark.parametrize("suffix", [".parquet", ".json", ".jsonl"])
def test_a_record_missing_a_field_is_named_with_its_index(tmp_path, suffix):
    broken = published_record()
    del broken["desired_msg_index"]
    path = save_records(tmp_path / f"bad{suffix}", [published_record(), broken])
    with pytest.raises(ValueError, match=r"record 1: missing field 'desired_msg_index'"):
        get_task(str(path))
    # Every record lacking it: the column is absent from the file altogether.
    path = save_records(tmp_path / f"none{suffix}", [broken])
    with pytest.raises(ValueError, match=r"record 0: missing field 'desired_msg_index'; an MRCR record needs prompt, answer"):
        load_records(path)


def test_wrongly_typed_fields_are_named(tmp_path):
    cases = [
        ({"n_needles": "two"}, r"record 0: field 'n_needles' must be int, got str"),
        ({"prompt": "not json ["}, r"record 0: field 'prompt' must be a JSON string of chat messages"),
        ({"prompt": json.dumps([{"role": "user"}])}, r"record 0: field 'prompt': message 0 must be an object with 'role' and 'content'"),
        ({"answer": 5}, r"record 0: field 'answer' must be str, got int"),
        ({"n_needles": True}, r"field 'n_needles' must be int, got bool"),
    ]
    for change, message in cases:
        record = published_record()
        record.update(change)
        path = tmp_path / "one.jsonl"
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(ValueError, match=message):
            load_records(path)


def test_unreadable_files_are_clear_errors(tmp_path):
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"this is not parquet")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        load_records(bad_parquet)
    as_object = tmp_path / "obj.json"
    as_object.write_text(json.dumps(published_record()))
    with pytest.raises(ValueError, match="expected a JSON list of MRCR records, got a dict"):
        load_records(as_object)
    broken_line = tmp_path / "lines.jsonl"
    broken_line.write_text(json.dumps(published_record()) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"lines.jsonl:2: not valid JSON"):
        load_records(broken_line)
    text = tmp_path / "data.csv"
    text.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported MRCR file type '.csv'; accepted: .parquet, .json, .jsonl"):
        load_records(text)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no MRCR records"):
        load_records(empty)


def test_a_file_task_picks_records_that_fit_the_context(tmp_path, tok):
    short = [record_from_example(e) for e in get_task("mrcr").generate(tok, 3, 600, seed=0)]
    long = [record_from_example(e) for e in get_task("mrcr").generate(tok, 2, 3000, seed=0)]
    path = save_records(tmp_path / "mixed.parquet", long + short)
    task = get_task(str(path))
    assert isinstance(task, MRCRTask) and task.source == str(path)
    picked = task.generate(tok, 3, 1000, seed=0)
    assert sorted(e.answer for e in picked) == sorted(r["answer"] for r in short)
    assert all(e.meta["prompt_tokens"] <= 1000 for e in picked)
    assert task.generate(tok, 3, 1000, seed=0) == picked
    assert len(task.generate(tok, 5, 3000, seed=1)) == 5
    with pytest.raises(ValueError, match=r"only 3 of the 5 records in .* fit in context_tokens=1000; 4 were asked for"):
        task.generate(tok, 4, 1000, seed=0)
    with pytest.raises(ValueError, match=r"only 0 of the 0 records with n_needles=8"):
        task.generate(tok, 1, 1000, seed=0, n_needles=8)
    with pytest.raises(ValueError, match="reply_tokens applies to synthetic MRCR only"):
        task.generate(tok, 1, 1000, seed=0, reply_tokens=(5, 9))


def test_hub_id_without_network_is_a_clear_error():
    # huggingface_hub reads HF_HUB_OFFLINE at import, so this runs in a fresh interpreter.
    code = "from calibration.tasks import get_task; get_task('openai/mrcr')"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ConnectionError: could not load MRCR dataset 'openai/mrcr'"), last
    assert "HF_HUB_OFFLINE is set" in last and "pass a local path" in last
