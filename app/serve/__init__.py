"""Serving an event: the video-selected contract (:mod:`.events`) and the one composer,
event -> query video -> embedding -> search -> recommendation -> outbox (:mod:`.recommend`),
whose database reads and writes are in :mod:`.queries`."""
