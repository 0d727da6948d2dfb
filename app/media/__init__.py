"""A video in, without trusting it: registering files and URLs (:mod:`.register`), probing
and sampling frames in a sandboxed child process (:mod:`.video` is the API, :mod:`.sandbox`
the parent's side, :mod:`.child` and :mod:`.decode` what runs inside), ffmpeg helpers
(:mod:`.ffmpeg`), and the one outbound HTTP client every download, callback and crawl uses
(:mod:`.http`, with :mod:`.addresses` deciding which addresses may be reached)."""
