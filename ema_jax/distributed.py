"""jax.distributed.initialize, called once, guarded.

- Cloud TPU pods (several workers) and SLURM jobs with several tasks: automatic (JAX reads the cluster).
- Anywhere else: explicit coordinator address, process count and process id, from train.py flags or the
  environment variables EMA_JAX_COORDINATOR, EMA_JAX_NUM_PROCESSES, EMA_JAX_PROCESS_ID.
On CPU the cross-process collectives use gloo, so several local processes are a real multi-host run.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

_initialized = False
DEFAULT_HEARTBEAT_TIMEOUT_S = 30


def _multi_worker_tpu() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def _slurm_multi_task() -> bool:
  return int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ


def initialize(
    coordinator: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    heartbeat_timeout_s: Optional[int] = None,
) -> bool:
  """Initializes jax.distributed at most once; returns True if this call initialized it."""
  global _initialized
  if _initialized:
    return False
  coordinator = coordinator or os.environ.get("EMA_JAX_COORDINATOR") or None
  if num_processes is None and os.environ.get("EMA_JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["EMA_JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("EMA_JAX_PROCESS_ID"):
    process_id = int(os.environ["EMA_JAX_PROCESS_ID"])
  if heartbeat_timeout_s is None:
    # JAX's default (100 s) lets a process wait that long on a dead peer; 30 s keeps "a dead peer stops
    # the run within a minute" while far exceeding any pause of the heartbeat thread.
    heartbeat_timeout_s = int(os.environ.get("EMA_JAX_HEARTBEAT_TIMEOUT") or DEFAULT_HEARTBEAT_TIMEOUT_S)
  explicit = coordinator is not None
  if explicit:
    if num_processes is None or process_id is None:
      raise ValueError(
          f"coordinator {coordinator!r} given without both the process count and the process id "
          "(--num_processes/--process_id or EMA_JAX_NUM_PROCESSES/EMA_JAX_PROCESS_ID)."
      )
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process id {process_id} is outside [0, {num_processes}).")
  elif not (_multi_worker_tpu() or _slurm_multi_task()):
    return False  # a single process: nothing to initialize
  if explicit:
    # Cross-process collectives for CPU devices (harmless where an accelerator does the work).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {"heartbeat_timeout_seconds": heartbeat_timeout_s}
  if explicit:
    jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)
  else:
    jax.distributed.initialize(**kwargs)
  _initialized = True
  return True


def initialize_from_env() -> bool:
  return initialize()
