"""Tasks shared through Redis by web replicas and workers (`registry`): `link` is the
connection and what callers do while Redis is away, `scripts` the Lua that changes a task in
one step, `codec` how records become Redis values, `outbox` the webhook deliveries' stream."""
