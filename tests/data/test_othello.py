"""Othello engine and dataset, checked against a brute-force reference written here (Python lists,
per-square loops over the 8 directions, nothing shared with ema_jax.data.othello)."""

import os
import random

import numpy as np
import pytest

from ema_jax.data import othello
from ema_jax.data import othello_dataset

# ----------------------------------------------------------------------------- brute-force reference

DIRECTIONS = [(dr, df) for dr in (-1, 0, 1) for df in (-1, 0, 1) if (dr, df) != (0, 0)]


def ref_start():
  board = [0] * 64
  board[27] = board[36] = -1  # White d4, e5
  board[28] = board[35] = 1  # Black e4, d5
  return board


def ref_flips(board, square, player):
  if board[square] != 0:
    return []
  rank, file = divmod(square, 8)
  flipped = []
  for dr, df in DIRECTIONS:
    line = []
    r, f = rank + dr, file + df
    while 0 <= r < 8 and 0 <= f < 8 and board[8 * r + f] == -player:
      line.append(8 * r + f)
      r, f = r + dr, f + df
    if line and 0 <= r < 8 and 0 <= f < 8 and board[8 * r + f] == player:
      flipped.extend(line)
  return flipped


def ref_legal(board, player):
  return [s for s in range(64) if ref_flips(board, s, player)]


def ref_to_move(board, player):
  """(side to move after passes, its legal moves); side 0 when neither can move."""
  legal = ref_legal(board, player)
  if legal:
    return player, legal
  legal = ref_legal(board, -player)
  return (-player, legal) if legal else (0, [])


def ref_replay(moves):
  """States after each move: list of (board, next side, next legal). Asserts every move is legal."""
  board, player = ref_start(), 1
  states = []
  for square in moves:
    player, legal = ref_to_move(board, player)
    assert square in legal, (moves, square)
    flipped = ref_flips(board, square, player)
    board = board[:]
    board[square] = player
    for s in flipped:
      board[s] = player
    player, legal = ref_to_move(board, -player)
    states.append((board, player, legal))
  return states


def ref_random_game(rng):
  board, player, moves = ref_start(), 1, []
  while True:
    player, legal = ref_to_move(board, player)
    if not player:
      return moves
    square = rng.choice(legal)
    for s in ref_flips(board, square, player) + [square]:
      board[s] = player
    moves.append(square)
    player = -player


def pad(games):
  out = np.full((len(games), 60), -1, dtype=np.int64)
  for g, moves in enumerate(games):
    out[g, : len(moves)] = moves
  return out


@pytest.fixture(scope="module")
def reference_games():
  rng = random.Random(1234)
  return [ref_random_game(rng) for _ in range(150)]


@pytest.fixture(scope="module")
def generated():
  return othello.generate_games(3000, seed=7)


def has_pass(moves):
  states = ref_replay(moves)
  sides = [1] + [side for _, side, _ in states]
  return any(sides[i + 1] == sides[i] for i in range(len(moves)))


# ----------------------------------------------------------------------------- tests


def test_square_names():
  assert [othello.square_index(n) for n in ("a1", "h1", "d3", "c4", "f5", "e6", "H8")] == [0, 7, 19, 26, 37, 44, 63]
  for s in range(64):
    assert othello.square_index(othello.square_name(s)) == s
  for bad in ("i1", "a9", "d", "d33"):
    with pytest.raises(ValueError):
      othello.square_index(bad)
  with pytest.raises(ValueError):
    othello.square_name(64)


def test_opening():
  assert othello.legal_moves([]) == [19, 26, 37, 44] == ref_legal(ref_start(), 1)
  position = othello.replay([])
  assert position.to_move == othello.BLACK
  assert position.board.tolist() == ref_start()
  assert othello.legal_moves(["d3"]) == ref_legal(ref_replay([19])[0][0], -1)


def test_engine_matches_brute_force(reference_games):
  moves = pad(reference_games)
  result = othello.replay_batch(moves, return_boards=True)
  assert result.lengths.tolist() == [len(g) for g in reference_games]
  positions = 0
  for g, game in enumerate(reference_games):
    for t, (board, side, legal) in enumerate(ref_replay(game)):
      assert result.boards[g, t].tolist() == board
      assert result.next_player[g, t] == side
      assert np.flatnonzero(othello.bitboards_to_squares(result.legal_after[g, t])).tolist() == legal
      positions += 1
    # Padding repeats the final board and has no legal moves or side to move.
    assert (result.boards[g, len(game) :] == result.boards[g, len(game) - 1]).all()
    assert (result.legal_after[g, len(game) :] == 0).all()
    assert (result.next_player[g, len(game) - 1 :] == 0).all()
  assert positions > 8000


def test_single_game_api_matches_brute_force(reference_games):
  rng = random.Random(5)
  for _ in range(60):
    game = rng.choice(reference_games)
    p = rng.randrange(1, len(game) + 1)
    board, side, legal = ref_replay(game[:p])[-1]
    position = othello.replay(game[:p])
    assert othello.legal_moves(game[:p]) == legal == position.legal
    assert position.board.tolist() == board
    assert position.to_move == side
    # Names and trailing padding are accepted.
    names = [othello.square_name(s) for s in game[:p]]
    assert othello.legal_moves(names + [-1, -1]) == legal


def test_disc_invariants(generated):
  moves, lengths = generated
  boards = othello.replay_batch(moves[:300], return_boards=True).boards.astype(np.int64)
  start = np.array(ref_start())
  for g in range(300):
    previous = start
    for t in range(lengths[g]):
      board = boards[g, t]
      mover = board[moves[g, t]]
      assert previous[moves[g, t]] == 0 and mover != 0
      assert np.count_nonzero(board) == 4 + t + 1
      changed = np.flatnonzero(board != previous)
      flipped = [s for s in changed if s != moves[g, t]]
      assert len(flipped) >= 1
      assert all(previous[s] == -mover and board[s] == mover for s in flipped)
      previous = board


def test_generated_games_legal_and_complete(generated):
  moves, lengths = generated
  assert moves.shape == (3000, 60) and moves.dtype == np.int8 and lengths.dtype == np.int32
  assert ((moves >= 0).sum(1) == lengths).all()
  assert (moves[np.arange(60) >= lengths[:, None]] == -1).all()
  for g in range(200):
    game = moves[g, : lengths[g]].tolist()
    board, side, legal = ref_replay(game)[-1]  # asserts legality move by move
    assert side == 0 and legal == [] and ref_legal(board, 1) == ref_legal(board, -1) == []
  # The batched replay agrees for every game, and every game is over at its end.
  result = othello.replay_batch(moves)
  assert (result.legal_after[np.arange(3000), lengths - 1] == 0).all()


def test_passes_and_early_endings(generated):
  moves, lengths = generated
  next_player = othello.replay_batch(moves).next_player
  # A pass shows as the same side to move after two consecutive moves.
  engine_pass = ((next_player[:, 1:] == next_player[:, :-1]) & (next_player[:, 1:] != 0)).any(1)
  candidates = np.flatnonzero(engine_pass)[:40]
  assert len(candidates) >= 10
  for g in candidates:
    game = moves[g, : lengths[g]].tolist()
    assert has_pass(game)
    # legal_moves after the move before a pass names the moves of the side that did not pass.
    repeats = (next_player[g, 1:] == next_player[g, :-1]) & (next_player[g, 1:] != 0)
    t = int(np.flatnonzero(repeats)[0]) + 1
    board, side, legal = ref_replay(game[: t + 1])[-1]
    assert othello.replay(game[: t + 1]).to_move == side == next_player[g, t]
    assert othello.legal_moves(game[: t + 1]) == legal
  non_pass = np.flatnonzero(~engine_pass)[:20]
  assert not any(has_pass(moves[g, : lengths[g]].tolist()) for g in non_pass)
  # Some games end before the board is full (neither side can move with empty squares left).
  short = np.flatnonzero(lengths < 60)
  assert len(short) >= 1
  for g in short[:5]:
    board, side, _ = ref_replay(moves[g, : lengths[g]].tolist())[-1]
    assert side == 0 and board.count(0) == 60 - lengths[g]


def test_illegal_moves_raise():
  with pytest.raises(ValueError, match=r"position 1: illegal move 19 \(d3\) for White"):
    othello.legal_moves([19, 19])
  with pytest.raises(ValueError, match=r"position 0: illegal move 27 \(d4\) for Black"):
    othello.legal_moves([27])
  with pytest.raises(ValueError, match=r"position 2: illegal move 0 \(a1\) for Black"):
    othello.replay(["d3", "c3", "a1"])
  with pytest.raises(ValueError, match="game 1, position 0"):
    othello.replay_batch(np.array([[19, -1], [20, -1]]))
  with pytest.raises(ValueError, match="follows padding"):
    othello.replay_batch(np.array([[19, -1, 18]]))
  with pytest.raises(ValueError, match="0..63"):
    othello.replay_batch(np.array([[64]]))


def test_move_after_game_over_raises(generated):
  moves, lengths = generated
  g = int(np.flatnonzero(lengths < 60)[0])
  game = moves[g, : lengths[g]].tolist()
  empty = [s for s, v in enumerate(othello.replay(game).board) if v == 0][0]
  with pytest.raises(ValueError, match="game is already over"):
    othello.legal_moves(game + [empty])


def test_tokens_round_trip(generated):
  moves, _ = generated
  tokens = othello.squares_to_tokens(moves)
  assert tokens.dtype == np.int32 and tokens.min() >= 0 and tokens.max() <= 60
  assert ((tokens == 0) == (moves == -1)).all()
  assert (othello.tokens_to_squares(tokens) == moves).all()
  playable = [s for s in range(64) if s not in (27, 28, 35, 36)]
  assert othello.squares_to_tokens(playable).tolist() == list(range(1, 61))
  assert othello.tokens_to_squares(np.arange(61)).tolist() == [-1] + playable
  with pytest.raises(ValueError, match="centre"):
    othello.squares_to_tokens([27])
  with pytest.raises(ValueError):
    othello.tokens_to_squares([61])


def test_legal_move_masks_alignment(generated):
  moves, lengths = generated
  masks = othello.legal_move_masks(moves[:40])
  tokens = othello.squares_to_tokens(moves[:40])
  assert masks.shape == (40, 60, 61) and masks.dtype == bool
  assert not masks[..., 0].any()
  for g in range(40):
    n = lengths[g]
    for t in range(0, n, 7):
      expected = othello.legal_moves(moves[g, : t + 1].tolist())
      assert othello.tokens_to_squares(np.flatnonzero(masks[g, t])).tolist() == expected
    # The actual next move is always a target; after the final move and at padding there is none.
    assert masks[g, np.arange(n - 1), tokens[g, 1:n]].all()
    assert not masks[g, n - 1 :].any()
  assert (masks.any(-1) == (np.arange(60) < lengths[:40, None] - 1)).all()
  # Token inputs: convert back to squares first.
  assert (othello.legal_move_masks(othello.tokens_to_squares(tokens)) == masks).all()


def test_generator_deterministic(generated):
  moves, lengths = generated
  again = othello.generate_games(3000, seed=7, batch_size=999)
  assert (again[0] == moves).all() and (again[1] == lengths).all()
  tail = othello.generate_games(50, seed=7, first_game=2950, batch_size=8)
  assert (tail[0] == moves[2950:]).all()
  other = othello.generate_games(100, seed=8)
  assert (other[0] != moves[:100]).any(axis=1).mean() > 0.9


def test_generator_uniform():
  moves, _ = othello.generate_games(4000, seed=11)
  counts = np.bincount(moves[:, 0], minlength=64)[[19, 26, 37, 44]]
  assert counts.sum() == 4000 and (np.abs(counts - 1000) < 120).all()  # > 4 standard deviations
  replies = moves[moves[:, 0] == 19, 1]  # White's replies to d3: c3, e3, c5
  counts = np.bincount(replies, minlength=64)[[18, 20, 34]]
  assert counts.sum() == len(replies) and (np.abs(counts / len(replies) - 1 / 3) < 0.08).all()


def test_load_or_generate_and_checksum(tmp_path):
  train, val = othello_dataset.load_or_generate(str(tmp_path), 200, 3, 0.1)
  path = tmp_path / "othello_200_3.npz"
  assert path.exists()
  assert train.num_games == 180 and val.num_games == 20
  moves, lengths = othello.generate_games(200, 3)
  assert (np.concatenate([train.moves, val.moves]) == moves).all()
  assert (np.concatenate([train.lengths, val.lengths]) == lengths).all()
  assert train.tokens().shape == (180, 60) and val.legal_move_masks().shape == (20, 60, 61)
  train2, val2 = othello_dataset.load_or_generate(str(tmp_path), 200, 3, 0.1)
  assert (train2.moves == train.moves).all() and (val2.moves == val.moves).all()

  # Tampered arrays with the stored checksum left as it was.
  with np.load(path) as data:
    arrays = {k: data[k] for k in data.files}
  arrays["moves"] = arrays["moves"].copy()
  arrays["moves"][0, -1], arrays["moves"][0, -2] = arrays["moves"][0, -2], arrays["moves"][0, -1]
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=r"othello_200_3\.npz.*checksum.*delete"):
    othello_dataset.load_or_generate(str(tmp_path), 200, 3, 0.1)

  # A file that is not an npz at all.
  path.write_bytes(b"not a numpy file")
  with pytest.raises(othello_dataset.CorruptCacheError, match=r"othello_200_3\.npz.*delete"):
    othello_dataset.load_or_generate(str(tmp_path), 200, 3, 0.1)
  os.remove(path)
  train3, _ = othello_dataset.load_or_generate(str(tmp_path), 200, 3, 0.1)
  assert (train3.moves == train.moves).all()
  assert [p.name for p in tmp_path.iterdir()] == ["othello_200_3.npz"]  # no temporary files left


def test_load_or_generate_validates_arguments(tmp_path):
  with pytest.raises(ValueError, match="val_fraction"):
    othello_dataset.load_or_generate(str(tmp_path), 10, 0, 1.0)
  with pytest.raises(ValueError, match="num_games"):
    othello_dataset.load_or_generate(str(tmp_path), 0, 0, 0.1)
  with pytest.raises(ValueError, match="seed"):
    othello.generate_games(10, -1)
