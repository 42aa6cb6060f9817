"""The pipeline library: pure logic (allocation, GRPO, rewards, status) and adapters."""

import os

# OpenMP threads that wait at a barrier spin by default (libgomp: about 3 ms). When
# anything else wants the CPU (a server starting, another run), a spinning thread takes
# the core its partner needs: measured on 2 cores, an SFT step of the tiny model took
# 3.1 CPU-s and ~20 s instead of 0.45 CPU-s. Passive waiting sleeps instead, but a
# thread that sleeps at once wakes late for the next of the many small operations of
# a tiny model: a short spin first (GOMP_SPINCOUNT, ~10 us) keeps most of the idle
# speed (SFT step 0.25 s against 0.29 s fully passive) and the contended one (0.50 s
# against 0.45 s beside a busy process; bench/sft.py, docs/benchmarks.md). Both
# must be set before torch loads its OpenMP runtime, which happens after this import in
# every entry point; explicit settings in the environment win.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
