"""Where downloaded images wait for the workers: the in-process queue (`local`), used when
the web process runs its own workers, and the Redis job streams (`streams`) between web
replicas and workers anywhere. Both implement the two sides in `service.tasks.queues`."""
