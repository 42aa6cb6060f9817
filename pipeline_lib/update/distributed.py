"""GRPO updates in a group of worker processes through accelerate: FSDP on GPUs.

`train.update_processes: N` (N > 1) starts N worker processes, one per GPU. Each
holds a shard of the policy and of the AdamW state (FSDP2 through accelerate's
`FullyShardedDataParallelPlugin`, one FSDP unit per decoder layer) and runs the
forward and backward passes of its share of the rows. On a machine without
GPUs, accelerate makes the same group data-parallel over gloo (DDP: every rank
holds the whole model); that is how the tests run it here.

The training loop keeps its own full copy of the policy, which the rollout
engine and the checkpoints read: after each update rank 0 gathers the full
weights and sends them back, and the loop loads them into its copy.

    loop process ──("update", batch)──▶ ranks 0..N-1: forward/backward on rows r::N,
                 ◀──(stats, full weights)── rank 0    clip, AdamW step, gather
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import socket
import time
import traceback
from collections.abc import Mapping
from typing import Any

import torch
import torch.multiprocessing as mp
import transformers

from pipeline_lib.adapters.processes import exit_on_sigterm
from pipeline_lib.update.core import (
    BatchNorms,
    UpdateBatch,
    UpdateSettings,
    apply_optimizer_step,
    backward_rows,
    run_ppo_steps,
    signal_rows,
    with_old_and_ref_logprobs,
)

_POLL_SECONDS = 1.0
"""How often the loop checks that the workers are still alive while it waits."""


class UpdateWorkerError(RuntimeError):
    """A worker of the update group failed or died; its traceback is in the message."""


class AccelerateUpdateGroup:
    """N worker processes that update one policy together (FSDP on GPUs, DDP on CPU).

    Same interface as `local.LocalUpdater`: `update`, `optimizer_state_dict`,
    `load_optimizer_state_dict`, `close`. Wrap it in `contextlib.closing`:
    `close` stops the workers (and a failed worker stops the others).
    """

    def __init__(
        self,
        model: transformers.PreTrainedModel,
        *,
        num_processes: int,
        learning_rate: float,
        settings: UpdateSettings,
        reference: torch.nn.Module | None = None,
        startup_timeout_s: float = 600.0,
    ) -> None:
        """Start the workers from `model`'s current weights (the loop's copy, updated in place).

        `reference` is the frozen policy of the KL term (needed when `settings.kl_coef`
        > 0): every rank holds a whole, unsharded copy of it. Raises ValueError when
        there are fewer GPUs than processes on a GPU machine.
        """
        if settings.kl_coef > 0 and reference is None:
            raise ValueError("kl_coef > 0 needs a reference policy")
        if num_processes < 1:
            raise ValueError(f"num_processes must be at least 1, got {num_processes}")
        gpus = torch.cuda.device_count()
        if gpus and num_processes > gpus:
            raise ValueError(
                f"train.update_processes={num_processes} but only {gpus} GPU(s) are visible: "
                "FSDP runs one process per GPU"
            )
        self._model = model
        self._num_processes = num_processes
        # A SIGTERM must end this process through `close()`, or the workers outlive it.
        exit_on_sigterm()
        context = mp.get_context("spawn")
        self._commands = [context.Queue() for _ in range(num_processes)]
        self._results: Any = context.Queue()
        state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
        reference_state = (
            None
            if reference is None
            else {name: tensor.detach().cpu() for name, tensor in reference.state_dict().items()}
        )
        port = _free_port()
        threads = max(1, torch.get_num_threads() // num_processes)
        self._workers = [
            context.Process(
                target=_worker_main,
                args=(
                    rank,
                    num_processes,
                    port,
                    model.config,
                    model.dtype,
                    state,
                    reference_state,
                    learning_rate,
                    settings,
                    threads,
                    self._commands[rank],
                    self._results,
                ),
                name=f"grpo-update-rank{rank}",
            )
            for rank in range(num_processes)
        ]
        for worker in self._workers:
            worker.start()
        try:
            kinds = self._collect(timeout_s=startup_timeout_s)
        except BaseException:
            self.close()
            raise
        self.parallelism: str = kinds[0]
        """How accelerate runs the group: "FSDP" on GPUs, "MULTI_CPU" (DDP) on CPU."""

    def update(self, batch: UpdateBatch) -> dict[str, float]:
        """One GRPO update over `batch`; the loop's model then holds the new weights."""
        started = time.perf_counter()
        replies = self._broadcast("update", batch)
        stats, state = replies[0]
        if state is not None:
            self._model.load_state_dict(state)
        return stats | {"train/update_seconds": time.perf_counter() - started}

    def optimizer_state_dict(self) -> dict[str, Any]:
        """The full AdamW state, keyed by parameter name (gathered from the shards)."""
        return self._broadcast("optimizer_state", None)[0]

    def load_optimizer_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a state from `optimizer_state_dict` (every rank takes its shard)."""
        self._broadcast("load_optimizer_state", dict(state))

    def _dead_workers(self) -> str:
        """'update worker rank R died (exit code C); ' for each worker that crashed."""
        return "".join(
            f"update worker rank {rank} died (exit code {worker.exitcode}); "
            for rank, worker in enumerate(self._workers)
            if worker.exitcode not in (None, 0)
        )

    def close(self, *, grace_s: float = 30.0) -> None:
        """Stop the workers: ask, wait up to `grace_s`, then SIGTERM, then SIGKILL; idempotent.

        Every worker is joined (or killed) before this returns, so none outlives the group.
        """
        workers, self._workers = self._workers, []
        for worker, commands in zip(workers, self._commands, strict=True):
            if worker.is_alive():
                with contextlib.suppress(OSError, ValueError):
                    commands.put(("stop", None))
        deadline = time.monotonic() + grace_s
        for worker in workers:
            worker.join(timeout=max(deadline - time.monotonic(), 0.1))
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
        # Queues with unsent items would make this process wait for them at exit.
        for channel in (*self._commands, self._results):
            channel.cancel_join_thread()

    def _broadcast(self, command: str, payload: Any) -> list[Any]:
        if not self._workers:
            raise RuntimeError("the update group is closed")
        for commands in self._commands:
            commands.put((command, payload))
        return self._collect(timeout_s=None)

    def _collect(self, timeout_s: float | None) -> list[Any]:
        """One reply from every rank, in rank order; raises if a worker fails or dies."""
        replies: dict[int, Any] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(replies) < self._num_processes:
            try:
                rank, ok, value = self._results.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                for rank, worker in enumerate(self._workers):
                    if rank not in replies and not worker.is_alive():
                        self.close(grace_s=0)
                        raise UpdateWorkerError(
                            f"update worker rank {rank} died (exit code {worker.exitcode})"
                        ) from None
                if deadline is not None and time.monotonic() > deadline:
                    self.close(grace_s=0)
                    raise UpdateWorkerError(
                        f"update workers did not start within {timeout_s:.0f} s"
                    ) from None
                continue
            if not ok:
                # A rank that died first is the cause; name it before the rank that noticed.
                dead = self._dead_workers()
                # The other ranks may wait in a collective for this one: do not wait for them.
                self.close(grace_s=0)
                raise UpdateWorkerError(f"{dead}update worker rank {rank} failed:\n{value}")
            replies[rank] = value
        return [replies[rank] for rank in range(self._num_processes)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker_main(
    rank: int,
    world: int,
    port: int,
    config: transformers.PretrainedConfig,
    dtype: torch.dtype,
    state: dict[str, torch.Tensor],
    reference_state: dict[str, torch.Tensor] | None,
    learning_rate: float,
    settings: UpdateSettings,
    threads: int,
    commands: Any,
    results: Any,
) -> None:
    """One rank: build the sharded model and optimiser, then serve commands until "stop"."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    # accelerate sets 1 thread (with a warning) on CPU when this is unset.
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        torch.set_num_threads(threads)
        accelerator = _accelerator()
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(state)
        del state
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
        model, optimizer = accelerator.prepare(model, optimizer)
        model.eval()
        reference = None
        if reference_state is not None:
            reference = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
            reference.load_state_dict(reference_state)
            reference.to(accelerator.device).eval().requires_grad_(False)
        results.put((rank, True, accelerator.distributed_type.value))
        while True:
            command, payload = commands.get()
            if command == "stop":
                break
            if command == "update":
                reply: Any = _update(accelerator, model, optimizer, payload, settings, reference)
            elif command == "optimizer_state":
                reply = _optimizer_state(model, optimizer, rank)
            elif command == "load_optimizer_state":
                _load_optimizer_state(model, optimizer, payload)
                reply = None
            else:
                raise ValueError(f"unknown command {command!r}")
            results.put((rank, True, reply))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _accelerator() -> Any:
    """FSDP2 on GPUs; on CPU accelerate's multi-CPU data parallelism (its FSDP needs GPUs)."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    if not torch.cuda.is_available():
        return Accelerator(cpu=True)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        # One FSDP unit per decoder layer (the model's `_no_split_modules`).
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
    )
    return Accelerator(fsdp_plugin=plugin)


def _update(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    batch: UpdateBatch,
    settings: UpdateSettings,
    reference: torch.nn.Module | None,
) -> tuple[dict[str, float], dict[str, torch.Tensor] | None]:
    """This rank's part of one update: (stats, full weights) on rank 0, (stats, None) elsewhere."""
    rank, world = accelerator.process_index, accelerator.num_processes
    stats = {"train/rows_with_signal": float(signal_rows(batch, settings).numel())}
    if stats["train/rows_with_signal"] == 0:  # every rank sees the same batch: all return
        return stats | {"train/loss": 0.0, "train/grad_norm": 0.0}, None
    # Every rank scores every row with signal (the same forward passes on each, so a
    # sharded model's collectives line up); old logprobs only for several steps.
    batch = with_old_and_ref_logprobs(model, reference, batch, settings)

    def step(members: torch.Tensor, rows: torch.Tensor) -> tuple[dict[str, float], float]:
        # Rows r, r + N, ...: ranks get near-equal shares; every rank runs as many
        # micro-batches as the largest share needs, so their collectives line up.
        micro_batches = math.ceil(math.ceil(rows.numel() / world) / settings.micro_batch_rows)
        totals, grad_norm = apply_optimizer_step(
            model,
            optimizer,
            lambda: backward_rows(
                model,
                batch,
                rows[rank::world],
                settings,
                BatchNorms.of(batch, rows, settings, members),
                loss_scale=float(world),  # DDP and FSDP average gradients; we want the sum
                min_micro_batches=micro_batches,
            ),
            lambda: accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm),
        )
        return _sum_over_ranks(totals, world), grad_norm

    stats |= run_ppo_steps(batch, settings, step)
    full_state = accelerator.get_state_dict(model)  # a collective: every rank calls it
    return stats, (_detached_copy(full_state) if rank == 0 else None)


def _sum_over_ranks(totals: dict[str, float], world: int) -> dict[str, float]:
    """Every rank's diagnostic sums added up (a collective: every rank calls it)."""
    parts: list[dict[str, float] | None] = [None] * world
    torch.distributed.all_gather_object(parts, totals)
    summed: dict[str, float] = {}
    for part in parts:
        for key, value in (part or {}).items():
            summed[key] = summed.get(key, 0.0) + value
    return summed


def _optimizer_state(model: torch.nn.Module, optimizer: Any, rank: int) -> dict[str, Any] | None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(model, _inner(optimizer), options=options)
    return _detached_copy(state) if rank == 0 else None


def _load_optimizer_state(model: torch.nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    # A copy: the received tensors live in memory shared with the loop and the
    # other ranks, and AdamW updates its state (even the step count) in place.
    state = _detached_copy(state)
    set_optimizer_state_dict(model, _inner(optimizer), optim_state_dict=state, options=options)


def _detached_copy(tree: Any) -> Any:
    """CPU copies of every tensor in `tree`.

    The queue hands CPU tensors over in shared memory, so whatever crosses it and
    is changed later on either side must be a copy.
    """
    return torch.utils._pytree.tree_map_only(
        torch.Tensor, lambda tensor: tensor.detach().to("cpu", copy=True), tree
    )


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimiser inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
