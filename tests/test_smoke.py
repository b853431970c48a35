from sqlalchemy import func, select
from sqlalchemy.orm import Session

from alchq import Status, metadata, worker
from tests.tasks import CountTask, run_log


def test_process_all_runs_every_task_once(engine):
    metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([CountTask() for _ in range(5)])
        s.commit()
    assert worker.process_all(CountTask, engine=engine) == 5
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(run_log)) == 5
        statuses = s.scalars(select(CountTask.status)).all()
        assert statuses == [Status.PROCESSED] * 5
