"""Evaluation: a retrieval benchmark for copy detection and similarity, made from any folder
of videos, and the demo's corpus.

The benchmark's steps, each usable on its own:

- :mod:`.plan` splits the sources, from a seed, into a development part (every choice is
  made on it) and a test part (only scored), and decides which stretches of each become
  library clips and which become queries under which :mod:`.edits`; :mod:`.generate` cuts
  them with ffmpeg and writes the answers, :mod:`.ground_truth`;
- :mod:`.run` scores every system of :mod:`.systems` (trained checkpoints, the untrained
  network, tiny frames, a perceptual hash) on the same decoded clips, part by part, all
  through the served path (:mod:`.served`: index, calibration), with :mod:`.metrics`
  (neutral ties, bootstrap intervals, per edit family), and :mod:`.report` writes the
  results; it can also fine-tune an encoder on the development part's library first.

:mod:`.footage` finds the real videos installed offline; :mod:`.corpus` cuts the demo's
library and queries from them.
"""
