"""The vector index, a cache derived from the embeddings in Postgres: its build parameters
(:mod:`.params`), learned transforms and binary codes (:mod:`.transform`), building a
checksummed version (:mod:`.build`) and opening it memory-mapped (:mod:`.version`),
calibrated scores (:mod:`.calibrate`), the second stage's frames (:mod:`.frames`),
compared under mirror images (:mod:`.mirrors`), aligned (:mod:`.align`) and re-ranked
(:mod:`.rerank`), searching the active version plus the embeddings made since
(:mod:`.search`), rebuilding and refreshing it (:mod:`.rebuild`), and its database reads
and writes (:mod:`.queries`)."""
