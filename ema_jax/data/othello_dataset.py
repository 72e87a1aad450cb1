"""Random Othello games as a dataset: generated once per (count, seed) and cached with a checksum.

The engine in ema_jax/data/othello.py plays and generates the games; this module stores and reloads them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile

import numpy as np

from ema_jax.data.othello import (
    FORMAT_VERSION,
    MAX_MOVES,
    check_count,
    generate_games,
    legal_move_masks,
    squares_to_tokens,
)


@dataclasses.dataclass(frozen=True)
class OthelloGames:
  """A set of games: moves int8 [N, 60] square indices padded with -1, lengths int32 [N]."""

  moves: np.ndarray
  lengths: np.ndarray

  @property
  def num_games(self) -> int:
    return int(self.moves.shape[0])

  def tokens(self) -> np.ndarray:
    """int32 [N, 60] tokens 1..60, 0 for padding."""
    return squares_to_tokens(self.moves)

  def legal_move_masks(self) -> np.ndarray:
    """bool [N, 60, 61], aligned with tokens() as described in legal_move_masks."""
    return legal_move_masks(self.moves)


def _checksum(moves: np.ndarray, lengths: np.ndarray) -> str:
  digest = hashlib.sha256()
  for array in (moves, lengths):
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def cache_path(workdir: str, num_games: int, seed: int) -> str:
  return os.path.join(workdir, f"othello_{num_games}_{seed}.npz")


class CorruptCacheError(ValueError):
  pass


def _read_cache(path: str, num_games: int, seed: int):
  def fail(reason):
    raise CorruptCacheError(
        f"Othello dataset cache {path} is unusable ({reason}); " f"delete the file and it will be regenerated"
    )

  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {key: data[key] for key in data.files}
  except Exception as error:  # a truncated or overwritten file fails in many ways
    fail(f"cannot read it: {type(error).__name__}: {error}")
  expected = {"moves", "lengths", "sha256", "num_games", "seed", "format_version"}
  if set(arrays) != expected:
    fail(f"holds arrays {sorted(arrays)}, expected {sorted(expected)}")
  if int(arrays["format_version"]) != FORMAT_VERSION:
    fail(f"format version {int(arrays['format_version'])}, this code writes {FORMAT_VERSION}")
  if (int(arrays["num_games"]), int(arrays["seed"])) != (num_games, seed):
    fail(
        f"holds num_games={int(arrays['num_games'])}, seed={int(arrays['seed'])}, "
        f"expected num_games={num_games}, seed={seed}"
    )
  moves, lengths = arrays["moves"], arrays["lengths"]
  if (
      moves.shape != (num_games, MAX_MOVES)
      or moves.dtype != np.int8
      or lengths.shape != (num_games,)
      or lengths.dtype != np.int32
  ):
    fail(f"moves {moves.dtype}{moves.shape}, lengths {lengths.dtype}{lengths.shape}")
  if _checksum(moves, lengths) != str(arrays["sha256"]):
    fail("sha256 checksum mismatch")
  return moves, lengths


def _write_cache(path: str, moves: np.ndarray, lengths: np.ndarray, seed: int) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  # Write to a temporary file and rename, so concurrent writers (several processes of one run)
  # and interrupted runs never leave a half-written cache under the final name.
  handle, temporary = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
  try:
    with os.fdopen(handle, "wb") as file:
      np.savez_compressed(
          file,
          moves=moves,
          lengths=lengths,
          sha256=np.array(_checksum(moves, lengths)),
          num_games=np.array(moves.shape[0], dtype=np.int64),
          seed=np.array(seed, dtype=np.uint64),
          format_version=np.array(FORMAT_VERSION, dtype=np.int64),
      )
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def load_or_generate(workdir: str, num_games: int, seed: int, val_fraction: float):
  """Loads <workdir>/othello_<num_games>_<seed>.npz, generating and caching it the first time.

  The cache stores a sha256 of the arrays, verified on every load; a corrupt or mismatched file
  raises CorruptCacheError (a ValueError) naming the file. Returns (train, val) OthelloGames: the
  last round(num_games * val_fraction) games are the validation split.
  """
  num_games = check_count("num_games", num_games, 1)
  seed = check_count("seed", seed, 0)
  if not 0.0 <= float(val_fraction) < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
  num_val = int(round(num_games * float(val_fraction)))
  if num_val >= num_games:
    raise ValueError(f"val_fraction={val_fraction} leaves no training games out of {num_games}")
  path = cache_path(workdir, num_games, seed)
  if os.path.exists(path):
    moves, lengths = _read_cache(path, num_games, seed)
  else:
    moves, lengths = generate_games(num_games, seed)
    _write_cache(path, moves, lengths, seed)
  split = num_games - num_val
  return (OthelloGames(moves[:split], lengths[:split]), OthelloGames(moves[split:], lengths[split:]))
