"""vLLM general plugin: a short idle spin in vLLM's processes on CPU machines.

vLLM's engine-core and worker processes pass work over a shared-memory ring buffer.
After each read its reader keeps polling the buffer with `sched_yield` for
`SpinCondition.busy_loop_s` (1 s) before it waits on a socket
(vllm/distributed/device_communicators/shm_broadcast.py). With a GPU that spin is
cheap latency insurance; on a 2-core CPU machine it takes the cores the GRPO update
needs for a second after every generate (docs/benchmarks.md: the live engine cost the update
19-41 %). vLLM runs every `vllm.general_plugins` entry point (pyproject.toml) in each
of its processes; `register` caps the spin there at `IDLE_SPIN_ENV` seconds, which
`VLLMEngine` sets on CPU machines. Unset, vLLM's own spin stays.
"""

from __future__ import annotations

import logging
import os

IDLE_SPIN_ENV = "KNAPSACK_RL_VLLM_IDLE_SPIN_S"
"""Seconds a vLLM process polls its ring buffer after a read before it sleeps."""

CPU_IDLE_SPIN_S = 0.001
"""The cap `VLLMEngine` sets on CPU: a millisecond covers the gap between the
decode steps of one generate, not the update between two."""

log = logging.getLogger(__name__)


def register() -> None:
    """Cap `SpinCondition.busy_loop_s` at IDLE_SPIN_ENV seconds in this process."""
    value = os.environ.get(IDLE_SPIN_ENV)
    if value is None:
        return
    cap = float(value)
    from vllm.distributed.device_communicators import shm_broadcast

    spin = getattr(shm_broadcast, "SpinCondition", None)
    if spin is None or getattr(spin, "_knapsack_rl_cap", None) is not None:
        if spin is None:
            log.warning("vLLM has no SpinCondition: %s has no effect", IDLE_SPIN_ENV)
        return
    original_wait = spin.wait

    def wait(self, timeout_ms: int | None = None) -> None:
        # Patched on the class, so readers made before this plugin ran are capped too.
        self.busy_loop_s = min(self.busy_loop_s, cap)
        return original_wait(self, timeout_ms)

    spin.wait = wait
    spin._knapsack_rl_cap = cap
