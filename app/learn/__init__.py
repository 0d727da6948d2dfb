"""Learning the encoder and putting it to work: the model (:mod:`~app.learn.encoder`), its
objective (:mod:`~app.learn.loss`) and augmentations (:mod:`~app.learn.augment`), training
(:mod:`app.learn.train`), where it runs (:mod:`~app.learn.device`), the model versions
(:mod:`~app.learn.registry`) and rolling a new one out (:mod:`~app.learn.rollout`)."""
