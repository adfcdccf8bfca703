"""A training run: setup, the loop, its hooks, metric trackers, the run-directory lock and knowledge probes."""
