"""Dev tasks for calibration and evaluation: generators, loaders and graders.

    from calibration.tasks import get_task, split, encode_prompt
    task = get_task("mrcr")            # or "pathtrans", "kv", "needle", a file, "openai/mrcr"
    examples = task.generate(tokenizer, n=12, context_tokens=2048, seed=0, n_needles=2)
    dev, test = split(examples, seed=0, test_fraction=0.25)
    score = task.grade(model_reply, dev[0])

No torch here: a tokenizer object is passed in and only its encode / chat-template methods are used.
"""

import os
from collections.abc import Callable

from . import kv, mrcr, needle, pathtrans
from .base import (
    Example,
    Task,
    count_prompt_tokens,
    encode_prompt,
    evidence_positions,
    load_examples,
    render_prompt,
    save_examples,
    split,
)
from .kv import KVTask
from .mrcr import MRCRTask, grade_mrcr, load_records, record_from_example, save_records, synthetic_record
from .needle import NeedleTask
from .pathtrans import PathTransTask, grade_exact, grade_partial

TASK_NAMES = ("mrcr", "pathtrans", "kv", "needle")


def get_task(name_or_path: str | os.PathLike) -> Task:
    """The task called `name_or_path`, or an MRCR task over a local file or a Hub dataset id.

    Accepted: 'mrcr' (synthetic MRCR), 'pathtrans', 'kv', 'needle', a path to an MRCR file
    (.parquet, .json, .jsonl) or a Hub dataset id such as 'openai/mrcr'.
    """
    named: dict[str, Callable[[], Task]] = {
        "mrcr": mrcr.MRCRTask,
        "pathtrans": pathtrans.PathTransTask,
        "kv": kv.KVTask,
        "needle": needle.NeedleTask,
    }
    key = os.fspath(name_or_path)
    if key in named:
        return named[key]()
    if os.path.exists(key):
        return mrcr.MRCRTask(source=key)
    if mrcr.looks_like_hub_id(key):
        return mrcr.MRCRTask(source=key)
    raise ValueError(
        f"unknown dev task {key!r}: accepted names are {', '.join(TASK_NAMES)}, or a path to an existing "
        f"MRCR file ({', '.join(mrcr.FILE_SUFFIXES)}), or a Hub dataset id like 'openai/mrcr'"
    )


__all__ = [
    "TASK_NAMES",
    "Example",
    "Task",
    "KVTask",
    "MRCRTask",
    "NeedleTask",
    "PathTransTask",
    "count_prompt_tokens",
    "encode_prompt",
    "evidence_positions",
    "get_task",
    "grade_exact",
    "grade_mrcr",
    "grade_partial",
    "load_examples",
    "load_records",
    "record_from_example",
    "render_prompt",
    "save_examples",
    "save_records",
    "split",
    "synthetic_record",
]
