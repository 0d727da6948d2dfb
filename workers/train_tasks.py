"""Training on the ``train`` queue (a GPU worker: ``vidsim worker --queues train --pool solo``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.config import get_settings
from app.db import session_scope
from app.learn import rollout
from workers.app import TIME_LIMITS, celery_app
from workers.tasks import activate_model


@celery_app.task(name="vidsim.train", bind=True, time_limit=TIME_LIMITS["train"])
def train(
    self: Any,
    preset: str = "cpu-small",
    videos: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    name: str | None = None,
    init_model_id: int | None = None,
    epochs: int | None = None,
    activate: bool = False,
) -> int:
    """Trains (or fine-tunes from ``init_model_id``), registers the version, and with
    ``activate`` starts its rollout. A redelivered message resumes from the run's last
    checkpoint (the run is named after the message unless ``name`` is given)."""
    kind = "finetune" if init_model_id else "pretrain"
    name = name or f"{kind}-{preset}-{(self.request.id or 'local')[:8]}"
    if videos:
        files = [Path(v) for v in videos]
    else:
        with session_scope() as session:
            files = rollout.training_files(session=session)
    model_id = rollout.train_model(
        preset=preset,
        videos=files,
        settings=get_settings(),
        name=name,
        overrides=overrides,
        resume=True,  # a redelivered message continues the same run
        init_model_id=init_model_id,
        epochs=epochs,
    )
    if activate:
        activate_model.delay(model_id)
    return model_id
