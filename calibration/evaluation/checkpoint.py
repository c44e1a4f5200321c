"""Resuming an interrupted evaluation: every finished batch is appended to a JSONL file, and a rerun
with the same settings reads it back instead of decoding it again (`dysco eval --out DIR` keeps it in
`DIR/progress.jsonl`)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from calibration.evaluation.batches import BatchTiming, MethodRun
from calibration.tasks import Example
from decoder.loading import config_fingerprint, weights_fingerprint

CHECKPOINT_NAME = "progress.jsonl"  # in --out: every finished batch, so that a rerun resumes


class Checkpoint:
    """Finished batches of one evaluation, one JSON line each, so that an interrupted run resumes.

    A line holds the batch's results, the fingerprint of everything that decides them (model config
    and weights, dtype, seed, n, batch size, budgets, knobs, decoding path) and a hash of the batch's
    examples themselves (`examples_key`: prompts, answers, meta); a line is read back only when both
    match, so a changed command or a changed task option (a needle depth, a distractor count) decodes
    again in the same file. A line cut short by a kill is dropped and overwritten.

    `session`: an id of the command writing now (`dysco eval --devices`: the parent and its workers
    share one); lines written under it are its own work, not counted in `resumed` when read back.
    """

    def __init__(self, path: str | Path, fingerprint: str, fresh: bool = False, session: str | None = None) -> None:
        self.path, self.fingerprint, self.session = Path(path), fingerprint, session
        self.done: dict[tuple[str, int, str, int, str | None], dict[str, Any]] = {}
        if fresh:
            self.path.unlink(missing_ok=True)
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):  # the last write was cut: drop the partial line
                text = text[: text.rfind("\n") + 1]
                self.path.write_text(text, encoding="utf-8")
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("fingerprint") == fingerprint:
                    key = (record["task"], record["length"], record["method"], record["start"], record.get("examples"))
                    self.done[key] = record
        self.resumed = 0

    def get(self, task: str, length: int, method: str, start: int, batch: Sequence[Example]) -> MethodRun | None:
        """The stored run of this batch, if it was finished on the very same examples."""
        # Ids alone are not enough: the same seed and id can hold another needle depth or distractor count.
        record = self.done.get((task, length, method, start, examples_key(batch)))
        if record is None:
            return None
        if self.session is None or record.get("session") != self.session:
            self.resumed += 1
        run = record["run"]
        # Progress files written before the selection diagnostic have no "selection": missing, not zero.
        selection = run.get("selection")
        if not isinstance(selection, list) or len(selection) != len(run["scores"]):
            selection = [None] * len(run["scores"])
        return MethodRun(run["scores"], run["responses"], run["new_tokens"], [BatchTiming(**t) for t in run["timings"]],
                         selection)

    def add(self, task: str, length: int, method: str, start: int, batch: Sequence[Example], run: MethodRun) -> None:
        """Append one finished batch (flushed and synced: a kill loses at most the batch under way)."""
        record = {
            "fingerprint": self.fingerprint, "task": task, "length": length, "method": method, "start": start,
            "ids": [example.id for example in batch], "examples": examples_key(batch), "session": self.session,
            "run": {"scores": run.scores, "responses": run.responses, "new_tokens": run.new_tokens,
                    "timings": [asdict(t) for t in run.timings], "selection": run.selection_per_example()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def shard_checkpoint(path: str | Path, shard: int, shards: int) -> Path:
    """The progress file of one shard of a sharded run: progress.jsonl -> progress.shard1of2.jsonl."""
    path = Path(path)
    return path.with_name(f"{path.stem}.shard{shard}of{shards}{path.suffix}")


def examples_key(batch: Sequence[Example]) -> str:
    """sha256 of a batch's examples as the model sees and grades them (ids, messages, answers, meta)."""
    content = [example.to_dict() for example in batch]
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def run_fingerprint(model: Any, settings: Mapping[str, Any]) -> str:
    """sha256 of what decides an evaluation's answers: the model's config, weights and dtype, and `settings`."""
    identity = {"config": config_fingerprint(model.config), "weights": weights_fingerprint(model),
                "dtype": str(getattr(model, "dtype", "")), **settings}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

