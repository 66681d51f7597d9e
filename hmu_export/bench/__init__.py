"""Floor 3: latency and throughput of every backend, forward and generation, against peers."""
