"""Prometheus metrics. Defined here (no Celery); workers record them from task signals
and serve them, aggregated across worker processes, on ``VIDSIM_METRICS_PORT``."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

EVENT_TO_CALLBACK = Histogram(
    "vidsim_event_to_callback_seconds",
    "From an event's arrival to its callback's first successful delivery (once per event).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
TASK_DURATION = Histogram(
    "vidsim_task_duration_seconds",
    "Task run time by task name.",
    ["task"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
TASK_FAILURES = Counter("vidsim_task_failures_total", "Tasks that raised, by task name.", ["task"])
DELIVERIES = Counter(
    "vidsim_deliveries_total", "Callback delivery attempts by outcome.", ["outcome"]
)  # delivered | retry | dead | disabled
EVENTS = Counter("vidsim_events_total", "Events answered, by outcome.", ["outcome"])  # served | failed
