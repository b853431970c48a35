"""A task model whose worker processes die as they start (a crash at import in the children).

The supervisor imports it fine; every worker process it starts exits at once,
as a bad deploy's would.
"""

from __future__ import annotations

import os

from sqlalchemy import Integer
from sqlalchemy.orm import Mapped, mapped_column

from alchq import BaseQueue

if os.environ.get("ALCHQ_POOL_CHILD"):
    os._exit(3)


class StartDyingTask(BaseQueue):
    id: Mapped[int] = mapped_column(Integer, primary_key=True)

    def run(self) -> None:  # pragma: no cover - no worker ever gets this far
        pass
