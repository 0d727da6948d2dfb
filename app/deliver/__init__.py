"""Delivering an answer: Standard Webhooks signing and verifying (:mod:`.signing`), one
delivery attempt and the retry schedule (:mod:`.attempt`), and the outbox in Postgres that
every recommendation's callback is attempted and retried from (:mod:`.outbox`)."""
