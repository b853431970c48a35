"""The README's examples mean what the README says they mean.

Every ``Periodic(...)`` in the README's Python blocks that carries an
``# every N s`` / ``# every N min`` comment, and every cron expression in its
prose described as ``is every N s``, must tick exactly that often.
"""

from __future__ import annotations

import ast
import re
from datetime import datetime, timedelta, timezone

import pytest

from alchq import Periodic
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
UNITS = {"s": 1, "min": 60, "h": 3600}


def _documented() -> list[tuple[str, Periodic, float]]:
    found: list[tuple[str, Periodic, float]] = []
    for line in README.splitlines():
        call = re.search(r"(Periodic\(.*\)),?\s*#\s*every (\d+) (s|min|h)\b", line)
        if call:
            expr = ast.parse(call.group(1), mode="eval").body
            assert isinstance(expr, ast.Call)
            args = [ast.literal_eval(a) for a in expr.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in expr.keywords if k.arg}
            seconds = int(call.group(2)) * UNITS[call.group(3)]
            found.append((line.strip(), Periodic(*args, **kwargs), seconds))
    for cron, n, unit in re.findall(r'`"([^"`]+)"`:? (?:is )?every (\d+) (s|min|h)\b', README):
        found.append((cron, Periodic(cron), int(n) * UNITS[unit]))
    return found


DOCUMENTED = _documented()


def test_the_readme_documents_schedules() -> None:
    # The cron with seconds, a five-field cron and an interval, at least.
    assert len(DOCUMENTED) >= 3, DOCUMENTED


@pytest.mark.parametrize(
    ("where", "periodic", "seconds"), DOCUMENTED, ids=[d[0] for d in DOCUMENTED]
)
def test_documented_schedule_ticks_as_described(
    where: str, periodic: Periodic, seconds: float
) -> None:
    tick = periodic.next_tick(datetime(2026, 3, 1, 11, 58, 7, tzinfo=timezone.utc))
    gaps = set()
    for _ in range(200):
        following = periodic.next_tick(tick)
        gaps.add(following - tick)
        tick = following
    assert gaps == {timedelta(seconds=seconds)}, (where, sorted(gaps)[:3])


def test_the_wrong_reading_of_seconds_is_called_out() -> None:
    """``*/10`` in the first of six fields is minutes: every second of every tenth minute."""
    wrong = Periodic("*/10 * * * * *")
    start = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert wrong.next_tick(start) - start == timedelta(seconds=1)
    assert '`"*/10 * * * * *"` is every second of minutes' in README
