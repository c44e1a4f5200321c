"""The thread policy every entry point of this project starts with.

With libgomp's default wait policy, idle OpenMP threads spin for a while after each parallel region;
on a small, shared CPU machine they steal the cores other work (or the next region) needs, and
torch's CPU kernels then run 2-2.5x slower under load (issue 15; `docs/quickstart.md`, "Threads").
Sleeping idle threads cost nothing measurable when the machine is idle. libgomp reads the policy
once, when torch first loads it, so this must run before the first `import torch`; a policy the user
set explicitly is kept.
"""

from __future__ import annotations

import os

__all__ = ["quiet_idle_threads"]


def quiet_idle_threads() -> None:
    """Let idle OpenMP threads sleep (`OMP_WAIT_POLICY=PASSIVE`) unless the environment already chose."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
