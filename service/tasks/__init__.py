"""The task engine: task and item records, the registry that stores them, and the task
service that runs tasks (downloads, batching, classification) and changes their state."""
