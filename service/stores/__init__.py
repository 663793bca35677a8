"""The task stores, one folder per backend, each behind `service.tasks.registry.TaskRegistry`:

- `memory`: tasks in this process only (gone at a restart);
- `sqlite`: the memory store with every change journaled to SQLite in the data dir (the default);
- `redis`: tasks shared by web replicas and workers through Redis (`--redis`).

`service.backend` chooses and opens one from the settings; nothing else in `service/` chooses one.
"""
