"""The task engine and what every part shares.

Shared: the records (`records`), the registry protocol the stores implement (`registry`),
the two sides of the image queue the brokers implement (`queues`), webhook deliveries and
idempotency keys. The engine: `engine` (every change of a task's state), `pipeline` (a task's
downloads), `classifier` (batches to the pool and outcomes to the registry), `uploads`
(uploaded files until their task takes them)."""
