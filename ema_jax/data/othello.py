"""Othello engine, random-game generator and dataset for OthelloGPT.

Conventions
-----------
Squares: index = 8 * (rank - 1) + file, file a = 0, so a1 = 0, h1 = 7, d3 = 19, h8 = 63.
Standard start: White on d4 (27) and e5 (36), Black on d5 (35) and e4 (28); Black moves first.
A player with no legal move passes (passes are implicit: they never appear in a move sequence);
the game ends when neither player can move, so a game has at most 60 moves.

Move arrays hold square indices padded at the end with PAD_MOVE = -1.
Boards are int8 [..., 64] with BLACK = 1, WHITE = -1, EMPTY = 0.

Tokens: the 60 playable squares (all but d4, e4, d5, e5) in increasing square order are tokens
1..60; PAD_TOKEN = 0. VOCAB_SIZE = 61.

Legal-move masks (legal_move_masks) are aligned with token positions: for a sequence of tokens
m_1..m_T, mask[g, t] is the set of moves legal after m_1..m_{t+1}, i.e. the targets for the model's
prediction of m_{t+2} at position t. After a game's final move the set is empty (the game is over),
and padding positions are all False, so `mask.any(-1)` marks the positions that have a next move.

Internally each side is a uint64 bitboard (bit i = square i) and the 8 directions are evaluated
together as [4, G] arrays (4 left shifts and 4 right shifts), so every step is a handful of NumPy
calls over the whole batch of games.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

BLACK = 1
WHITE = -1
EMPTY = 0
PAD_MOVE = -1
PAD_TOKEN = 0
MAX_MOVES = 60
VOCAB_SIZE = 61
FORMAT_VERSION = 1

CENTER_SQUARES = (27, 28, 35, 36)
# token -> square; token 0 (padding) maps to PAD_MOVE.
TOKEN_TO_SQUARE = np.array([PAD_MOVE] + [s for s in range(64) if s not in CENTER_SQUARES], dtype=np.int8)
# square -> token; the centre squares map to -1 (they are never played).
SQUARE_TO_TOKEN = np.full(64, -1, dtype=np.int32)
SQUARE_TO_TOKEN[TOKEN_TO_SQUARE[1:]] = np.arange(1, VOCAB_SIZE)

_U64 = np.uint64
_ALL = _U64(0xFFFFFFFFFFFFFFFF)
_NOT_FILE_A = _U64(0xFEFEFEFEFEFEFEFE)
_NOT_FILE_H = _U64(0x7F7F7F7F7F7F7F7F)
# Direction groups. "Up" shifts (<<) move by +1 (east), +8 (north), +9 (north-east), +7 (north-west);
# "down" shifts (>>) by the same amounts move west, south, south-west, south-east. The masks clear the
# squares that a shift wrapped around the board edge into.
_SHIFTS = np.array([1, 8, 9, 7], dtype=np.uint64)[:, None]
_MASK_UP = np.array([_NOT_FILE_A, _ALL, _NOT_FILE_A, _NOT_FILE_H], dtype=np.uint64)[:, None]
_MASK_DOWN = np.array([_NOT_FILE_H, _ALL, _NOT_FILE_H, _NOT_FILE_A], dtype=np.uint64)[:, None]
_BITS = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))

_START_BLACK = _U64((1 << 28) | (1 << 35))
_START_WHITE = _U64((1 << 27) | (1 << 36))

_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)


# ----------------------------------------------------------------------------- names and tokens


def square_name(index: int) -> str:
  """Algebraic name of a square index, e.g. 19 -> 'd3'."""
  if not 0 <= int(index) < 64:
    raise ValueError(f"square index must be in 0..63, got {index}")
  return "abcdefgh"[int(index) % 8] + str(int(index) // 8 + 1)


def square_index(name: str) -> int:
  """Square index of an algebraic name, e.g. 'd3' -> 19 (case-insensitive)."""
  text = str(name).strip().lower()
  if len(text) != 2 or text[0] not in "abcdefgh" or text[1] not in "12345678":
    raise ValueError(f"square name must be a file a-h and a rank 1-8 like 'd3', got {name!r}")
  return 8 * (int(text[1]) - 1) + "abcdefgh".index(text[0])


def squares_to_tokens(moves) -> np.ndarray:
  """Square indices (PAD_MOVE = -1 for padding) -> tokens 1..60 (0 for padding), int32."""
  moves = np.asarray(moves)
  bad = (moves < -1) | (moves > 63)
  if bad.any():
    raise ValueError(f"square indices must be in -1..63, got {moves[bad].ravel()[0]}")
  tokens = np.where(moves < 0, PAD_TOKEN, SQUARE_TO_TOKEN[np.clip(moves, 0, 63)]).astype(np.int32)
  if (tokens < 0).any():
    centre = moves[tokens < 0].ravel()[0]
    raise ValueError(f"centre square {centre} ({square_name(centre)}) is never played and has no token")
  return tokens


def tokens_to_squares(tokens) -> np.ndarray:
  """Tokens 0..60 -> square indices with PAD_MOVE = -1 for token 0, int8."""
  tokens = np.asarray(tokens)
  bad = (tokens < 0) | (tokens >= VOCAB_SIZE)
  if bad.any():
    raise ValueError(f"tokens must be in 0..{VOCAB_SIZE - 1}, got {tokens[bad].ravel()[0]}")
  return TOKEN_TO_SQUARE[tokens]


# ----------------------------------------------------------------------------- bitboard core


def _popcount(x: np.ndarray) -> np.ndarray:
  return np.bitwise_count(x).astype(np.int64)


def _runs(seed_G, pro_up, pro_down):
  """Runs of `pro` squares starting next to `seed` in each direction: ([4, G] up, [4, G] down)."""
  up = np.left_shift(seed_G[None], _SHIFTS) & pro_up
  down = np.right_shift(seed_G[None], _SHIFTS) & pro_down
  for _ in range(5):  # a run between two discs is at most 6 squares long
    up |= np.left_shift(up, _SHIFTS) & pro_up
    down |= np.right_shift(down, _SHIFTS) & pro_down
  return up, down


def _legal(own_G: np.ndarray, opp_G: np.ndarray) -> np.ndarray:
  """Bitboard of legal moves for the side owning `own`."""
  empty = ~(own_G | opp_G)
  up, down = _runs(own_G, opp_G & _MASK_UP, opp_G & _MASK_DOWN)
  ends = (np.left_shift(up, _SHIFTS) & (_MASK_UP & empty)) | (np.right_shift(down, _SHIFTS) & (_MASK_DOWN & empty))
  return np.bitwise_or.reduce(ends, axis=0)


def _flips(move_G: np.ndarray, own_G: np.ndarray, opp_G: np.ndarray) -> np.ndarray:
  """Bitboard of the discs flipped when `own` plays the single-bit `move` (0 for no move)."""
  up, down = _runs(move_G, opp_G & _MASK_UP, opp_G & _MASK_DOWN)
  # A run flips only if the square right after it holds one of the mover's discs.
  closed_up = (np.left_shift(up, _SHIFTS) & (_MASK_UP & own_G)) != 0
  closed_down = (np.right_shift(down, _SHIFTS) & (_MASK_DOWN & own_G)) != 0
  flips = np.where(closed_up, up, _U64(0)) | np.where(closed_down, down, _U64(0))
  return np.bitwise_or.reduce(flips, axis=0)


def _select_bit(bits_G: np.ndarray, rank_G: np.ndarray) -> np.ndarray:
  """Square index of the rank-th (0-based, from the low end) set bit of each bitboard."""
  position = np.zeros(bits_G.shape, dtype=np.uint64)
  rank = rank_G.astype(np.int64)
  for width in (32, 16, 8, 4, 2, 1):
    low = np.right_shift(bits_G, position) & _U64((1 << width) - 1)
    count = _popcount(low)
    go_high = rank >= count
    rank = rank - np.where(go_high, count, 0)
    position = position + np.where(go_high, _U64(width), _U64(0))
  return position.astype(np.int64)


def _mix64(z: np.ndarray) -> np.ndarray:
  """SplitMix64 output function (a bijective 64-bit hash); wraps modulo 2**64 by design."""
  z = (z ^ np.right_shift(z, _U64(30))) * _MIX1
  z = (z ^ np.right_shift(z, _U64(27))) * _MIX2
  return z ^ np.right_shift(z, _U64(31))


def _to_board(black_G: np.ndarray, white_G: np.ndarray) -> np.ndarray:
  black = (black_G[:, None] & _BITS) != 0
  white = (white_G[:, None] & _BITS) != 0
  return black.astype(np.int8) - white.astype(np.int8)


def bitboards_to_squares(bits) -> np.ndarray:
  """uint64 bitboards [...] -> bool [..., 64] with True on the set squares."""
  bits = np.asarray(bits, dtype=np.uint64)
  return (bits[..., None] & _BITS) != 0


# ----------------------------------------------------------------------------- replay


class ReplayResult(NamedTuple):
  """Per-move state of a batch of move sequences; T = moves.shape[1].

  legal_after: uint64 [G, T]: bitboard of the moves legal after moves[:, :t+1] for whoever moves
    next (after any pass); 0 once the game is over and at padding.
  next_player: int8 [G, T]: BLACK / WHITE to move after moves[:, :t+1], EMPTY (0) when the game is
    over and at padding.
  boards: int8 [G, T, 64] board after moves[:, :t+1] (padding repeats the last board), or None.
  lengths: int32 [G] number of moves in each sequence.
  """

  legal_after: np.ndarray
  next_player: np.ndarray
  boards: np.ndarray | None
  lengths: np.ndarray


def _describe_side(side: int) -> str:
  return "Black" if side == BLACK else "White"


def replay_batch(moves, *, return_boards: bool = False, game_offset: int = 0) -> ReplayResult:
  """Replays move sequences int [G, T] (square indices, padded at the end with -1), checking legality.

  Raises ValueError naming the game (row + game_offset), the position in the sequence, the square
  and the side for the first illegal move found.
  """
  moves_GT = np.asarray(moves)
  if moves_GT.ndim != 2:
    raise ValueError(f"moves must be [games, positions], got shape {moves_GT.shape}")
  if not np.issubdtype(moves_GT.dtype, np.integer):
    raise ValueError(f"moves must be integer square indices, got dtype {moves_GT.dtype}")
  num_games, num_positions = moves_GT.shape
  moves_GT = moves_GT.astype(np.int64)
  out_of_range = (moves_GT < -1) | (moves_GT > 63)
  if out_of_range.any():
    g, t = np.argwhere(out_of_range)[0]
    raise ValueError(
        f"game {g + game_offset}, position {t}: square index must be in 0..63 "
        f"(or -1 for padding), got {moves_GT[g, t]}"
    )
  is_move = moves_GT >= 0
  lengths = is_move.sum(axis=1).astype(np.int32)
  gap = is_move & (np.arange(num_positions) >= lengths[:, None])
  if gap.any():
    g, t = np.argwhere(gap)[0]
    raise ValueError(
        f"game {g + game_offset}, position {t}: move {moves_GT[g, t]} follows "
        f"padding; padding (-1) may only appear at the end"
    )

  black = np.full(num_games, _START_BLACK, dtype=np.uint64)
  white = np.full(num_games, _START_WHITE, dtype=np.uint64)
  black_to_move = np.ones(num_games, dtype=bool)
  legal_after = np.zeros((num_games, num_positions), dtype=np.uint64)
  next_player = np.zeros((num_games, num_positions), dtype=np.int8)
  boards = np.zeros((num_games, num_positions, 64), dtype=np.int8) if return_boards else None

  def resolve_passes(black, white, black_to_move):
    own = np.where(black_to_move, black, white)
    opp = np.where(black_to_move, white, black)
    legal = _legal(own, opp)
    stuck = np.flatnonzero(legal == 0)
    if stuck.size:
      other = _legal(opp[stuck], own[stuck])
      passes = stuck[other != 0]
      black_to_move[passes] = ~black_to_move[passes]
      legal[stuck] = other
    return legal

  legal = resolve_passes(black, white, black_to_move)
  for t in range(num_positions):
    active = is_move[:, t]
    if not active.any():
      if return_boards:  # padding repeats the final board
        boards[:, t:] = _to_board(black, white)[:, None]
      break
    square = np.where(active, moves_GT[:, t], 0).astype(np.uint64)
    move_bit = np.where(active, np.left_shift(_U64(1), square), _U64(0))
    illegal = active & ((legal & move_bit) == 0)
    if illegal.any():
      g = int(np.flatnonzero(illegal)[0])
      side = BLACK if black_to_move[g] else WHITE
      options = [square_name(s) for s in np.flatnonzero(bitboards_to_squares(legal[g]))]
      status = f"legal moves for {_describe_side(side)} are {options}" if options else "the game is already over"
      sq = int(moves_GT[g, t])
      raise ValueError(
          f"game {g + game_offset}, position {t}: illegal move {sq} "
          f"({square_name(sq)}) for {_describe_side(side)}; {status}"
      )
    own = np.where(black_to_move, black, white)
    opp = np.where(black_to_move, white, black)
    flipped = _flips(move_bit, own, opp)
    own = own | move_bit | flipped
    opp = opp & ~flipped
    black = np.where(black_to_move, own, opp)
    white = np.where(black_to_move, opp, own)
    black_to_move = np.where(active, ~black_to_move, black_to_move)
    legal = resolve_passes(black, white, black_to_move)
    legal_after[:, t] = np.where(active, legal, _U64(0))
    next_player[:, t] = np.where(active & (legal != 0), np.where(black_to_move, BLACK, WHITE), EMPTY)
    if return_boards:  # inactive games are unchanged, so padding repeats the final board
      boards[:, t] = _to_board(black, white)
  return ReplayResult(legal_after, next_player, boards, lengths)


def _start_board() -> np.ndarray:
  return _to_board(np.array([_START_BLACK]), np.array([_START_WHITE]))[0]


def legal_move_masks(moves) -> np.ndarray:
  """Token-space legal-move targets bool [G, T, 61] for moves int [G, T] (square indices, -1 pad).

  mask[g, t, v] is True when token v is legal after moves[g, :t+1] (for whoever moves next, passes
  accounted for): the targets for predicting the move at position t + 1. Rows after a game's final
  move and at padding are all False; column 0 (padding token) is always False. For token inputs use
  legal_move_masks(tokens_to_squares(tokens)).
  """
  legal_after = replay_batch(moves).legal_after
  return _squares_to_token_mask(bitboards_to_squares(legal_after))


def _squares_to_token_mask(squares_mask: np.ndarray) -> np.ndarray:
  mask = np.zeros(squares_mask.shape[:-1] + (VOCAB_SIZE,), dtype=bool)
  mask[..., 1:] = squares_mask[..., TOKEN_TO_SQUARE[1:]]
  return mask


class Position(NamedTuple):
  """A position after a move sequence.

  board: int8 [64] (BLACK = 1, WHITE = -1, EMPTY = 0); to_move: BLACK or WHITE (after any pass), or
  EMPTY (0) when neither side can move; legal: sorted legal squares for `to_move`.
  """

  board: np.ndarray
  to_move: int
  legal: list


def _as_sequence(moves) -> np.ndarray:
  if isinstance(moves, str):
    moves = moves.replace(",", " ").split()
    if len(moves) == 1 and len(moves[0]) > 2:  # "d3c5f6" form
      moves = [moves[0][i : i + 2] for i in range(0, len(moves[0]), 2)]
  items = [square_index(m) if isinstance(m, str) else int(m) for m in moves]
  while items and items[-1] == PAD_MOVE:
    items.pop()
  return np.array(items, dtype=np.int64).reshape(1, -1)


def replay(moves: Sequence[int | str] | str) -> Position:
  """Plays a sequence of squares (indices or names like 'd3'; trailing -1 padding ignored).

  Raises ValueError naming the position in the sequence, the square and the side of an illegal move.
  """
  sequence = _as_sequence(moves)
  if sequence.shape[1] == 0:
    return Position(_start_board(), BLACK, [19, 26, 37, 44])
  try:
    result = replay_batch(sequence, return_boards=True)
  except ValueError as error:
    raise ValueError(str(error).removeprefix("game 0, ")) from None
  legal = np.flatnonzero(bitboards_to_squares(result.legal_after[0, -1])).tolist()
  return Position(result.boards[0, -1], int(result.next_player[0, -1]), legal)


def legal_moves(moves: Sequence[int | str] | str) -> list:
  """Sorted legal square indices for whoever moves after `moves` (passes implicit); [] if game over."""
  return replay(moves).legal


# ----------------------------------------------------------------------------- random games


def check_count(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def _game_keys(seed: int, first_game: int, num_games: int) -> np.ndarray:
  base = np.random.SeedSequence(seed).generate_state(1, dtype=np.uint64)
  index = np.arange(first_game, first_game + num_games, dtype=np.uint64)
  return _mix64(base + index * _GOLDEN)


def _generate_chunk(keys_G: np.ndarray):
  num_games = keys_G.shape[0]
  moves = np.full((num_games, MAX_MOVES), PAD_MOVE, dtype=np.int8)
  lengths = np.zeros(num_games, dtype=np.int32)
  own = np.full(num_games, _START_BLACK, dtype=np.uint64)  # side to move
  opp = np.full(num_games, _START_WHITE, dtype=np.uint64)
  legal = _legal(own, opp)
  for ply in range(MAX_MOVES):
    stuck = np.flatnonzero(legal == 0)
    if stuck.size:  # pass: the other side moves if it can, otherwise the game is over
      own[stuck], opp[stuck] = opp[stuck], own[stuck].copy()
      legal[stuck] = _legal(own[stuck], opp[stuck])
    active = legal != 0
    if not active.any():
      break
    # One SplitMix64 draw per (game, ply): a game's moves depend only on (seed, game index).
    draw = _mix64(keys_G + _U64((ply + 1) * int(_GOLDEN) % 2**64))
    count = _popcount(legal).astype(np.uint64)
    choice = np.right_shift(np.right_shift(draw, _U64(32)) * count, _U64(32))
    square = _select_bit(legal, choice)
    move_bit = np.where(active, np.left_shift(_U64(1), square.astype(np.uint64)), _U64(0))
    flipped = _flips(move_bit, own, opp)
    moves[:, ply] = np.where(active, square, PAD_MOVE)
    lengths += active
    own, opp = opp & ~flipped, own | move_bit | flipped
    legal = _legal(own, opp)
  return moves, lengths


def generate_games(num_games: int, seed: int, *, first_game: int = 0, batch_size: int = 4096):
  """Random Othello games: each move uniform over the legal moves, until neither side can move.

  Returns (moves int8 [num_games, 60] square indices padded with -1, lengths int32 [num_games]).
  Game i is a function of (seed, first_game + i) only, so results do not depend on batch_size and
  generate_games(n, s, first_game=k) equals rows k..k+n of a larger call with the same seed.
  The choice among c legal moves is floor(u * c / 2**32) for a 32-bit hash u, a bias below 2**-26.
  """
  num_games = check_count("num_games", num_games, 0)
  seed = check_count("seed", seed, 0)
  first_game = check_count("first_game", first_game, 0)
  batch_size = check_count("batch_size", batch_size, 1)
  keys = _game_keys(seed, first_game, num_games)
  moves = np.full((num_games, MAX_MOVES), PAD_MOVE, dtype=np.int8)
  lengths = np.zeros(num_games, dtype=np.int32)
  for start in range(0, num_games, batch_size):
    stop = min(start + batch_size, num_games)
    moves[start:stop], lengths[start:stop] = _generate_chunk(keys[start:stop])
  return moves, lengths
