"""Tasks in memory with every change journaled to SQLite (`registry`): `journal` writes the
changes in batches on a thread of its own, `loader` reads them back at start-up, `schema`
makes and upgrades the tables."""
