import os

# Idle OpenMP threads sleep instead of spinning, so a busy neighbour process does not stall every parallel region
# (see medda/runtime.py and benchmarks/contention.py). OpenMP reads this once, when torch loads, so it is set
# here, before any medda module imports torch; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = '0.1.0'
