"""Dev tasks for calibration and evaluation: generators, loaders and graders.

    >>> from calibration.tasks import get_task, split, encode_prompt
    >>> task = get_task("mrcr")            # or "pathtrans", "kv", "needle", a file, "openai/mrcr"
    >>> examples = task.generate(tokenizer, n=12, context_tokens=2048, seed=0, n_needles=2)
    >>> dev, test = split(examples, seed=0, test_fraction=0.25)
    >>> score = task.grade(model_reply, dev[0])

No torch here: a tokenizer object is passed in and only its encode / chat-template methods are used.
"""

from .base import (
    TASK_NAMES,
    Example,
    Task,
    count_prompt_tokens,
    encode_prompt,
    evidence_positions,
    get_task,
    load_examples,
    render_prompt,
    save_examples,
    split,
)
from .kv import KVTask
from .mrcr import MRCRTask, grade_mrcr, load_records, record_from_example, save_records, synthetic_record
from .needle import NeedleTask
from .pathtrans import PathTransTask, grade_exact, grade_partial

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
