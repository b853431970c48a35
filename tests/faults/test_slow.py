"""The bigger fault scenarios: ``make test-slow`` (``pytest -m slow``), not ``make test``."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.faults.conftest import Queue, Workers, check_invariants, random_sigkills

pytestmark = pytest.mark.slow

MB = 1024 * 1024


@pytest.mark.timeout(1800)
def test_random_sigkills_20k(queue: Queue, workers: Workers) -> None:
    """20,000 tasks over 4 workers, with a random worker SIGKILLed every 1-2 s (40 times)."""
    random_sigkills(queue, workers, tasks=20_000, n_workers=4, max_kills=40, timeout=1500, poll=0.5)


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a live process, in bytes (empty once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024  # kB
    return fields


@pytest.mark.timeout(3600)
def test_memory_stays_flat_over_100k_tasks(
    queue: Queue, workers: Workers, capsys: pytest.CaptureFixture[str]
) -> None:
    """One worker, 100,000 no-op tasks (``--burst``): peak memory reported, no growth."""
    total = int(os.environ.get("FAULT_MEMORY_TASKS", 100_000))  # smaller to try it out
    ids: list[int] = []
    for start in range(0, total, 10_000):
        ids += queue.add(min(10_000, total - start), action="noop")
    # Tasks are claimed in id order: progress is read off two rows, not counted.
    marks = {"20%": ids[total // 5 - 1], "99%": ids[total * 99 // 100 - 1]}
    started = time.monotonic()
    w = workers.start("--burst", log_level="WARNING")
    at_20: int | None = None
    last: dict[str, int] = {}
    while w.alive():
        sample = _memory(w.pid)
        if not sample:
            break
        if at_20 is None and queue.row(marks["20%"]).status == "PROCESSED":
            at_20 = sample["VmRSS"]
        elif at_20 is not None and queue.row(marks["99%"]).status == "PROCESSED":
            last = sample
        time.sleep(0.2)
    assert w.wait(60) == 0, w.output()
    took = time.monotonic() - started
    counts = check_invariants(queue)
    assert counts == {"PROCESSED": total}
    rows = queue.rows()
    assert {r.alchq_attempts for r in rows.values()} == {1}
    assert at_20 is not None and last, "the worker ended before it could be sampled"
    with capsys.disabled():
        print(
            f"\n[{queue.dialect}] {total} no-op tasks in {took:.0f}s ({total / took:.0f}/s): "
            f"peak RSS (VmHWM) {last['VmHWM'] / MB:.1f} MB; RSS at 20% {at_20 / MB:.1f} MB, "
            f"at 99-100% {last['VmRSS'] / MB:.1f} MB"
        )
    assert last["VmHWM"] < 300 * MB
    assert abs(last["VmRSS"] - at_20) < 30 * MB
