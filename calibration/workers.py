"""The extra worker processes of one command: `calibrate --workers N` or `--devices` (each runs
`python -m calibration.study --worker CONFIG` and joins the same study), and `dysco eval --devices`
(each runs `python -m calibration.evaluation.cli --worker …` on its shard of the examples).

    own, *extra = process_configs(config)     # this process's config first, one per extra worker
    workers = WorkerProcesses([worker_command(c) for c in extra])  # started at once: they load their models meanwhile
    workers.wait_ready(); ...; workers.wait()
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING

from calibration.errors import CalibrationError

if TYPE_CHECKING:  # the study imports this module; a worker process runs calibration.study itself
    from calibration.study import CalibrationConfig

log = logging.getLogger(__name__)


def parse_devices(text: str, allow_cpu: bool = False) -> tuple[str, ...]:
    """'0,1' or 'cuda:0,cuda:1' -> ('cuda:0', 'cuda:1'): syntax only (`check_devices` checks the machine).

    `allow_cpu`: 'cpu' is accepted too (and may repeat: one CPU process each).
    """
    devices = []
    for item in (part.strip() for part in text.split(",")):
        if allow_cpu and item == "cpu":
            devices.append(item)
            continue
        index = item.removeprefix("cuda:")
        if not index.isdigit():
            accepted = "cpu or CUDA device indices, e.g. 0,1, cuda:0,cuda:1 or cpu,cpu" if allow_cpu else \
                "CUDA device indices, e.g. 0,1 or cuda:0,cuda:1"
            raise CalibrationError(f"expected {accepted}; got {item!r} in {text!r}")
        devices.append(f"cuda:{int(index)}")
    return tuple(devices)


def check_devices(devices: Sequence[str], allow_cpu: bool = False) -> None:
    """Raise CalibrationError unless `devices` are distinct CUDA devices ('cuda:N') this machine has.

    `allow_cpu`: 'cpu' entries are accepted, as often as given (each is its own process).
    """
    if not devices:
        raise CalibrationError("--devices is empty")
    if allow_cpu:
        devices = [d for d in devices if d != "cpu"]
        if not devices:
            return
    bad = next((d for d in devices if not (isinstance(d, str) and d.startswith("cuda:")
                                            and d.removeprefix("cuda:").isdigit())), None)
    if bad is not None:
        raise CalibrationError(f"--devices takes CUDA devices such as cuda:0, got {bad!r}")
    if len(set(devices)) != len(devices):
        raise CalibrationError(f"--devices lists a device twice: {','.join(devices)}")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        advice = "list cpu instead (cpu,cpu: two CPU processes)" if allow_cpu else \
            "use --workers N for several CPU processes"
        raise CalibrationError(
            f"--devices {','.join(devices)} asked for, but torch sees no CUDA device on this machine; {advice}"
        )
    missing = [d for d in devices if int(d.removeprefix("cuda:")) >= count]
    if missing:
        raise CalibrationError(
            f"--devices {','.join(devices)}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1}, "
            f"after CUDA_VISIBLE_DEVICES), so {', '.join(missing)} does not exist"
        )


def die_with_parent() -> None:
    """In a worker (Linux): get SIGTERM when the command that started it dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def process_configs(config: CalibrationConfig) -> list[CalibrationConfig]:
    """The config of each process one command runs: its own first, then one per extra worker.

    With `devices`, process i runs on devices[i]; otherwise all `workers` processes share `device`.
    """
    devices = list(config.devices) if config.devices else [config.device] * config.workers
    own = replace(config, device=devices[0], devices=None)
    return [own] + [replace(config, device=device, devices=None, workers=1) for device in devices[1:]]


def worker_command(config: CalibrationConfig) -> list[str]:
    """The command line of one extra worker process (`run_worker` on `config`)."""
    return [sys.executable, "-m", "calibration.study", "--worker", json.dumps(asdict(config))]


class WorkerProcesses:
    """The extra worker processes of one command, one per command line. Their stderr is kept aside
    and shown only when one fails while the command succeeds (otherwise every error would be printed
    N times)."""

    def __init__(self, commands: Sequence[Sequence[str]]) -> None:
        self.logs = [tempfile.TemporaryFile() for _ in commands]
        self.processes = [
            subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=stream)
            for command, stream in zip(commands, self.logs)
        ]

    def wait_ready(self, timeout_s: float = 900.0) -> None:
        """Block until every worker has loaded its model and joined the study (or has died).

        Without this the command, whose model is often loaded first, could run the whole budget
        alone while its workers are still importing torch.
        """
        import select

        pending = {p.stdout.fileno(): p for p in self.processes if p.stdout is not None}
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("%d calibrate worker(s) not ready after %.0f s; going on without waiting",
                            len(pending), timeout_s)
                break
            readable, _, _ = select.select(list(pending), [], [], left)
            for fd in readable:
                process = pending.pop(fd)
                for line in iter(process.stdout.readline, b""):  # b"" when the worker died first
                    if line.strip() == b"ready":
                        break

    def wait(self) -> None:
        """Wait for every worker; warn with the tail of the stderr of any that failed."""
        for process, stream in zip(self.processes, self.logs):
            if process.stdout is not None:
                process.stdout.close()
            if process.wait() != 0:
                stream.seek(0)
                tail = stream.read().decode(errors="replace")[-2000:]
                log.warning("worker pid %d exited with code %d:\n%s", process.pid, process.returncode, tail)
            stream.close()

    def stop(self) -> None:
        """End the workers this command started (by their pids) and reap them."""
        for process in self.processes:
            if process.stdout is not None:
                process.stdout.close()
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stream in self.logs:
            stream.close()
