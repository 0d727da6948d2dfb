"""Evaluation: a retrieval benchmark for copy detection and similarity, made from any folder
of videos, and the demo's corpus.

The benchmark's steps, each usable on its own:

- :mod:`.plan` decides, from the sources and a seed alone, which stretches become library
  clips and which become queries under which :mod:`.edits`; :mod:`.generate` cuts them with
  ffmpeg and writes the answers, :mod:`.ground_truth`;
- :mod:`.run` scores every system of :mod:`.systems` (trained checkpoints, the untrained
  network, tiny frames, a perceptual hash) on the same decoded clips with :mod:`.metrics`,
  and :mod:`.report` writes the results; it can also fine-tune an encoder on the library first.

:mod:`.footage` finds the real videos installed offline; :mod:`.corpus` cuts the demo's
library and queries from them.
"""
