"""Training batches: one stream per row of the global batch, with exact, global states.

`make_train_iterator` is infinite and independent of the process count. Row r of the global batch
(G = global_batch rows) is fed by its own stream r, forever: stream r owns a fixed part of the
split's documents (whole files or tfds shards r, r + G, ... when there are at least G of them, else
a contiguous 1/G of the records; sources.stream_layout), reads them each epoch in an order drawn
from (seed, r, epoch) (readers.py), and packs its own token stream into windows (packing.py); row
r of step t is window t of stream r. So each step's rows come from G different documents, and
consecutive steps continue each row's stream like truncated-BPTT streams (no window shuffle is
needed). Process p of P yields rows [p * b, (p + 1) * b), b = G // P, and reads and tokenizes only
its streams' documents (with fewer files than streams every process reads all the files once, then
tokenizes only its own streams' documents).

The state is global. `get_state()` returns this process's part: {"format", "settings" (what the
streams depend on: source, split, tokenizer, seq_len, global_batch, seed, number of files or
shards), "streams": {"r": {"epoch", "doc", "offset", "num_documents"}} for its rows}, where the
next window of stream r starts at token `offset` of the `doc`-th document of epoch `epoch`.
Document counts are per stream, not of the whole split: with at least G files a process reads only
its own streams' files and could not count the others' documents without reading them; each
process checks its own streams' counts on restore, so changed data is still caught.
`TrainIterator.merge_states` joins every process's part; `set_state()` takes that global state and
restores this process's rows, on any process count that divides G, re-reading only each stream's
current document. It refuses, with DataStateError, a state of another format, other settings, a
stream set other than 0..G-1, or a position that does not fit the data.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Mapping, Sequence

import numpy as np

from ema_jax.data.text import config as config_lib
from ema_jax.data.text import packing
from ema_jax.data.text import readers
from ema_jax.data.text import sources
from ema_jax.errors import DataStateError

# The name keeps the module's old path: checkpoints hold it, and format /1 is refused by name.
_STATE_FORMAT = "ema_jax.data.text/2"


def _is_count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rows_text(rows) -> str:
  """'0-3, 7' for [0, 1, 2, 3, 7]."""
  rows, parts, i = sorted(rows), [], 0
  while i < len(rows):
    j = i
    while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
      j += 1
    parts.append(str(rows[i]) if i == j else f"{rows[i]}-{rows[j]}")
    i = j + 1
  return ", ".join(parts) or "none"


def _checked_state(state: Any, what: str = "The data iterator state") -> Mapping[str, Any]:
  """`state` if it is a well-formed state of this format, else DataStateError saying why."""
  if not isinstance(state, Mapping) or not state:
    raise DataStateError(
        f"{what} is empty or not a dict ({str(state)[:200]!r}); expected the "
        f"{_STATE_FORMAT!r} state that TrainIterator.merge_states makes from every process's "
        "get_state(). Resume from a checkpoint that holds one, or use a new workdir."
    )
  if state.get("format") != _STATE_FORMAT:
    old = state.get("format") == "ema_jax.data.text/1"
    raise DataStateError(
        f"{what} has format {state.get('format')!r}, not {_STATE_FORMAT!r}"
        + (
            " (format /1 described one process's reader and cannot be restored by the " "per-row streams)"
            if old
            else ""
        )
        + ". Resume from a checkpoint written by this version, or use a new workdir."
    )
  settings, streams = state.get("settings"), state.get("streams")
  if not isinstance(settings, Mapping) or not isinstance(streams, Mapping):
    raise DataStateError(
        f"{what} lacks its 'settings' or 'streams' dict: {str(state)[:200]}. The checkpoint's "
        "data state was damaged or edited; resume from another checkpoint or use a new workdir."
    )
  for key, position in streams.items():
    fields = ("epoch", "doc", "offset", "num_documents")
    if not (
        isinstance(key, str)
        and key.isdigit()
        and isinstance(position, Mapping)
        and all(_is_count(position.get(k)) for k in fields)
    ):
      raise DataStateError(
          f"{what}: stream {key!r} has position {str(position)[:200]}; expected a stream "
          "number and {'epoch': e, 'doc': i, 'offset': o, 'num_documents': n}, each an "
          "integer >= 0. The checkpoint's data state was damaged or edited; resume from "
          "another checkpoint or use a new workdir."
      )
  return state


class TrainIterator:
  """Endless training batches of this process's rows, with exact, JSON-serializable states.

  `get_state()` is this process's part (its rows' stream positions plus the settings the streams
  depend on); `merge_states` joins every process's part into the global state, which
  `set_state()` restores on any process layout whose batch split divides global_batch.
  """

  def __init__(self, streams: Sequence[packing.Stream], settings: dict[str, Any], eod_id: int, window: int, pool=None):
    self._streams = list(streams)
    self._settings = settings
    self._eod_id, self._window = eod_id, window
    self._pool = pool
    for stream in self._streams:
      stream.reader.prefetch()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    # Rows are stacked here, not by grain's batch: a grain batch takes consecutive elements of one
    # dataset, and ZipIterDataset over G grain streams would save grain's nested states instead of
    # the global per-stream positions that set_state restores on another process count.
    windows_BW = np.empty((len(self._streams), self._window), np.int32)
    for row, stream in enumerate(self._streams):
      stream.next_window(windows_BW[row])
    return packing.batch_from_windows(windows_BW, self._eod_id)

  @property
  def settings(self) -> dict[str, Any]:
    return dict(self._settings)

  def get_state(self) -> dict[str, Any]:
    return {
        "format": _STATE_FORMAT,
        "settings": dict(self._settings),
        "streams": {str(s.index): s.get_state() for s in self._streams},
    }

  @staticmethod
  def merge_states(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The global state from every process's `get_state()` (any order): the union of streams."""
    if not isinstance(states, (list, tuple)) or not states:
      raise DataStateError(f"merge_states needs a non-empty list of get_state() results, got {states!r}.")
    parts = [_checked_state(s, f"Part {i} of the data iterator states") for i, s in enumerate(states)]
    settings = dict(parts[0]["settings"])
    streams: dict[str, Any] = {}
    for i, part in enumerate(parts):
      if dict(part["settings"]) != settings:
        diff = _settings_diff(settings, part["settings"])
        raise DataStateError(
            f"Data iterator states 0 and {i} have different settings (field: part 0 vs "
            f"part {i}): {diff}; every process of a run must build its iterator with the "
            "same data config, seq_len, batch_size and seed."
        )
      for key, position in part["streams"].items():
        if key in streams and dict(streams[key]) != dict(position):
          raise DataStateError(
              f"Data iterator states disagree on stream {key}: {streams[key]} vs "
              f"{dict(position)} (part {i}); each row belongs to one process."
          )
        streams[key] = dict(position)
    return {
        "format": _STATE_FORMAT,
        "settings": settings,
        "streams": {k: streams[k] for k in sorted(streams, key=int)},
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores this process's rows from a global state (merge_states of all processes)."""
    state = _checked_state(state)
    diff = _settings_diff(state["settings"], self._settings)
    if diff:
      raise DataStateError(
          f"The data iterator state was saved with other settings (field: saved -> now): "
          f"{diff}. Resume with the same data config, seq_len, batch_size and seed, or use "
          "a new workdir."
      )
    num_streams = self._settings["global_batch"]
    have = {int(k) for k in state["streams"]}
    if have != set(range(num_streams)):
      want = set(range(num_streams))
      missing, extra = sorted(want - have), sorted(have - want)
      raise DataStateError(
          f"The data iterator state holds streams {_rows_text(have)}, but global_batch="
          f"{num_streams} needs exactly streams 0-{num_streams - 1} (missing: "
          f"{_rows_text(missing)}; extra: {_rows_text(extra)}). A single process's "
          "get_state() holds only its own rows: merge every process's part with "
          "TrainIterator.merge_states before set_state."
      )
    # Check every stream before moving any, so a refused state leaves the iterator as it was.
    restored = [s.restored(state["streams"][str(s.index)]) for s in self._streams]
    for stream, (position, tokens, offset) in zip(self._streams, restored):
      stream.restore(position, tokens, offset)

  def close(self) -> None:
    for stream in self._streams:
      stream.reader.close()
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._pool = None


def _settings_diff(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str:
  keys = list(now) + [k for k in saved if k not in now]
  return ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k))


def make_train_iterator(
    data_cfg: Any,
    tokenizer,
    seq_len: int,
    global_batch: int,
    seed: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    *,
    split: str | None = None,
) -> TrainIterator:
  """Endless training batches of this process's rows (global_batch // process_count of them).

  Args:
    data_cfg: `config.data` (dict, ConfigDict or DataSpec; see `default_data_config`).
    tokenizer: a tokenizer object, a name, or None for `data_cfg.tokenizer`.
    seq_len: T, the length of `inputs` / `targets`.
    global_batch: rows summed over all processes, one stream each.
    seed: shuffling seed (None: `data_cfg.seed`).
    process_index, process_count: default jax.process_index() / jax.process_count(); process p
      yields rows [p * b, (p + 1) * b) of the global batch, b = global_batch // process_count.
    split: default `data_cfg.train_split`.

  Returns:
    A TrainIterator of batch dicts (packing.py) with get_state / merge_states / set_state.
  """
  spec = config_lib.parse_data_config(data_cfg)
  config_lib.check_seq_len(seq_len)
  process_index, process_count, local_batch = config_lib.process_and_local_batch(
      global_batch, process_index, process_count
  )
  seed = spec.seed if seed is None else seed
  if not (isinstance(seed, int) and seed >= 0):
    raise ValueError(f"seed={seed!r} must be an integer >= 0.")
  tok = config_lib.as_tokenizer(tokenizer, spec)
  split = split or spec.train_split
  rows = range(process_index * local_batch, (process_index + 1) * local_batch)
  docs, ranges, num_units = sources.stream_layout(spec, split, global_batch, rows)
  threads = spec.read_threads
  if threads < 0:
    threads = 8 if spec.source == "tfds" else 0
  pool = None
  if threads > 0 and docs.random_access:
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="ema_jax_text")
  encode = packing.EncodeDocument(tok)
  streams = []
  for r in rows:
    reader = readers.make_reader(docs, ranges[r], seed, r, encode, pool)
    streams.append(packing.Stream(r, reader, window=seq_len + 1, stride=seq_len))
  settings = dict(
      source=spec.source,
      tfds_name=spec.tfds_name,
      split=split,
      tokenizer=tok.name,
      seq_len=seq_len,
      global_batch=global_batch,
      seed=seed,
      num_units=num_units,
  )
  return TrainIterator(streams, settings, tok.eod_id, seq_len + 1, pool)
