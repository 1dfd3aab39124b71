"""`make bench-network`: the whole network by simulation (sim.py, run.py, kafka_mode.py, projection.py)."""
