"""Tasks in this process's memory: `registry` (the registry), `task_state` (the mutable
record behind its snapshots, and the journal protocol a durable store plugs in)."""
