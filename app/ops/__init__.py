"""What an operator sees: ``vidsim status`` (:mod:`.status`), the static results page
(:mod:`.report`), the read-only web UI (:mod:`.webui`), and their queries (:mod:`.queries`)."""
