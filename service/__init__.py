"""The HTTP service: API handlers, task registry, downloads and dispatch to the inference pool."""
