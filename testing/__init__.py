"""What the tests (`tests/`) and the benchmarks (`bench/`) share to run the service for real:
free loopback ports (`ports`), a `redis-server` of their own (`redis_server`), the service
started as a user starts it and waited for (`services`), and an image server in a process of
its own (`image_server`). Not part of the distribution."""
