"""Shared fixtures: tiny random models of every architecture, the embedded SmolLM2, GPU skipping."""

from __future__ import annotations

import pytest

from decoder.threads import quiet_idle_threads

quiet_idle_threads()  # before torch loads libgomp: the suite ran 50 min under load without it

import torch  # noqa: E402

from decoder.tiny import ARCHITECTURES, tiny_model

# The machines this runs on have 2 cores; more threads only adds contention.
torch.set_num_threads(2)

INSTALL_HINT = "run `bash install.sh` (or `.venv/bin/dysco models pull smollm2-135m`) first"


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu`, with the reason, when torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=ARCHITECTURES)
def tiny(request):
    """(model, tokenizer) of a tiny random model, once per architecture in decoder.tiny.ARCHITECTURES."""
    model, tokenizer = tiny_model(request.param)
    model.arch = request.param  # lets a failing test say which architecture it was
    return model, tokenizer


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct; fails (never skips) if not installed."""
    from decoder.catalogue import check_checkpoint, source_path
    from decoder.loading import load_model

    # A damaged entry is rebuilt by load_model from the kept GGUF; only a missing one is an error.
    if check_checkpoint("smollm2-135m") == "not installed" and not source_path("smollm2-135m").is_file():
        pytest.fail(f"the embedded model smollm2-135m is not installed; {INSTALL_HINT}", pytrace=False)
    return load_model("smollm2-135m", progress=False)
