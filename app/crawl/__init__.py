"""The crawler: training material from the web — sources, fetching, politeness, head/tail trimming.

Modules: ``models`` (tables), ``sources`` (managing sources), ``net`` (polite, capped,
SSRF-safe HTTP), ``discover`` (pages, feeds, sitemaps, URL lists), ``platform`` (yt-dlp),
``crawler`` (the crawl stage), ``trim`` (preprocessing), ``pipeline`` (stages under locks,
the training hook, :func:`~app.crawl.trim.training_files`).

Nothing here imports Celery; workers/crawl_tasks.py adapts the stages to tasks.
"""
