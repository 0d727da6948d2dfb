"""Training the video encoder without labels (Barlow Twins), one module per job:

- :mod:`~app.learn.train.config`: :class:`TrainConfig` and the named presets;
- :mod:`~app.learn.train.data`: windows cut from videos, the dataset, sampler and loader;
- :mod:`~app.learn.train.model`: the encoder set up for training (frozen parts, DDP);
- :mod:`~app.learn.train.optim`: LARS / AdamW and the learning-rate schedule;
- :mod:`~app.learn.train.distributed`: joining and leaving ``torchrun``'s process group;
- :mod:`~app.learn.train.checkpoints`: where a run starts, resumable state, final weights;
- :mod:`~app.learn.train.curves`: ``metrics.jsonl`` and the loss plot;
- :mod:`~app.learn.train.progress`: the terminal progress bar;
- :mod:`~app.learn.train.loop`: ``train`` and ``finetune``, the loop tying them together.

Registering a trained run as a model version is the registry's job
(:func:`app.learn.registry.register_trained`).
"""
