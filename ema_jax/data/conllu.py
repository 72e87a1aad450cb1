"""CoNLL-U reader for Universal Dependencies (UD English EWT) with grammatical roles and embedding depth.

Parsing keeps FORM, UPOS, HEAD and DEPREL of the syntactic words: comment lines (#...), multiword-token
ranges ("1-2") and empty nodes ("1.1") are skipped. A malformed line raises ValueError naming the file,
the 1-based line number and what was expected.

Roles (ROLE_NAMES, ids in this order), from DEPREL first and UPOS second:
    AGENT     nsubj (and nsubj:outer), obl:agent   the subject of an active clause, and the by-phrase of a
                                                  passive ("was chased by the dog": dog)
    PATIENT   obj, nsubj:pass                      the object, and the surface subject of a passive; this
                                                  is the same convention as ema_jax/data/grammar.py
    RECIPIENT iobj
    OBL       obl and its other subtypes (obl:tmod, obl:npmod, obl:unmarked, ...)
    VERB      any other word with UPOS VERB (auxiliaries and copulas are AUX, hence OTHER)
    OTHER     everything else
Clausal subjects (csubj) are OTHER: they are clauses, not participants.

Depth: the number of clausal relations (base relation in CLAUSAL_RELATIONS, e.g. acl:relcl) on the
path from the word up to the root, counting the word's own relation. The verb of a relative clause and
every word it dominates (its subject, object, "that"/"to" marker) are at depth 1, like the embedded
clauses of the synthetic grammar.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Iterable, Sequence

import numpy as np

ROLE_NAMES = ("OTHER", "VERB", "AGENT", "PATIENT", "RECIPIENT", "OBL")
OTHER, VERB, AGENT, PATIENT, RECIPIENT, OBL = range(len(ROLE_NAMES))
CLAUSAL_RELATIONS = frozenset({"acl", "ccomp", "xcomp", "advcl", "csubj"})
PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1


@dataclasses.dataclass(frozen=True)
class Token:
  id: int
  form: str
  upos: str
  head: int
  deprel: str


def _fail(source, lineno, line, expected):
  raise ValueError(f"{source}:{lineno}: {expected}; got line {line!r}")


def parse_conllu(text: str, source: str = "<string>") -> list:
  """Sentences (lists of Token) of a CoNLL-U document; `source` names it in error messages."""
  sentences, current = [], []  # current: (Token, line number, line) of the open sentence

  def finish():
    for tok, tok_lineno, tok_line in current:
      if tok.head > len(current):
        _fail(
            source,
            tok_lineno,
            tok_line,
            f"expected HEAD between 0 and {len(current)} (the " f"sentence's word count), found {tok.head}",
        )
    sentence = [tok for tok, _, _ in current]
    try:
      token_depths(sentence)
    except ValueError as e:
      _fail(source, current[0][1], current[0][2], f"expected a tree in the sentence starting here: {e}")
    sentences.append(sentence)

  for lineno, raw in enumerate(text.splitlines(), start=1):
    line = raw.rstrip("\r\n")
    if not line.strip():
      if current:
        finish()
        current = []
      continue
    if line.startswith("#"):
      continue
    cols = line.split("\t")
    if len(cols) != 10:
      _fail(source, lineno, line, f"expected 10 tab-separated columns, found {len(cols)}")
    tok_id = cols[0]
    if "-" in tok_id or "." in tok_id:
      sep = "-" if "-" in tok_id else "."
      parts = tok_id.split(sep)
      if len(parts) != 2 or not all(p.isdigit() for p in parts):
        _fail(source, lineno, line, f"expected an ID like 3, 3-4 or 3.1, found {tok_id!r}")
      continue  # multiword-token range or empty node: not a syntactic word
    if not tok_id.isdigit():
      _fail(source, lineno, line, f"expected an integer ID, found {tok_id!r}")
    if int(tok_id) != len(current) + 1:
      _fail(source, lineno, line, f"expected word ID {len(current) + 1} (IDs count up from 1), " f"found {tok_id}")
    head = cols[6]
    if not head.isdigit():
      _fail(source, lineno, line, f"expected an integer HEAD (0 for the root), found {head!r}")
    if int(head) == int(tok_id):
      _fail(source, lineno, line, f"HEAD {head} of word {tok_id} points to itself")
    if not cols[7] or cols[7] == "_":
      _fail(source, lineno, line, "expected a DEPREL, found none")
    current.append((Token(int(tok_id), cols[1], cols[3], int(head), cols[7]), lineno, line))
  if current:
    finish()
  return sentences


def read_conllu(path: str) -> list:
  with open(path, encoding="utf-8") as f:
    return parse_conllu(f.read(), source=str(path))


def token_roles(sentence: Sequence[Token]) -> list:
  roles = []
  for tok in sentence:
    rel, base = tok.deprel, tok.deprel.split(":")[0]
    if rel == "nsubj:pass":
      roles.append(PATIENT)
    elif base == "nsubj" or rel == "obl:agent":
      roles.append(AGENT)
    elif base == "obj":
      roles.append(PATIENT)
    elif base == "iobj":
      roles.append(RECIPIENT)
    elif base == "obl":
      roles.append(OBL)
    elif tok.upos == "VERB":
      roles.append(VERB)
    else:
      roles.append(OTHER)
  return roles


def token_depths(sentence: Sequence[Token]) -> list:
  """Clausal relations on each word's path to the root (see module docstring); raises on a cycle."""
  n = len(sentence)
  depths = [None] * n
  for i in range(n):
    path, j = [], i
    while j >= 0 and depths[j] is None:
      if len(path) > n:
        raise ValueError(f"HEAD cycle through word {sentence[i].id} ({sentence[i].form!r})")
      path.append(j)
      j = sentence[j].head - 1
    depth = 0 if j < 0 else depths[j]
    for k in reversed(path):
      depth += sentence[k].deprel.split(":")[0] in CLAUSAL_RELATIONS
      depths[k] = depth
  return depths


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Word ids: 0 PAD, 1 UNK, then words seen >= min_count times, most frequent first (ties by word)."""

  words: tuple
  lowercase: bool

  @classmethod
  def build(cls, sentences: Iterable, min_count: int = 2, lowercase: bool = True) -> "Vocab":
    if min_count < 1:
      raise ValueError(f"min_count={min_count}: must be >= 1")
    counts = collections.Counter((tok.form.lower() if lowercase else tok.form) for sent in sentences for tok in sent)
    kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return cls((PAD, UNK) + tuple(kept), lowercase)

  def __post_init__(self):
    object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.words)})

  def __len__(self):
    return len(self.words)

  def id(self, form: str) -> int:
    return self._index.get(form.lower() if self.lowercase else form, UNK_ID)


@dataclasses.dataclass(frozen=True)
class DepData:
  """Padded UD sentences: tokens [N, T] int32 (PAD_ID at padding); roles, depth [N, T] int32 (-1 at
  padding); mask [N, T] bool; vocab: id -> word; role_names: role id -> name; n_truncated: sentences
  longer than T that were cut to their first T words."""

  tokens: np.ndarray
  roles: np.ndarray
  depth: np.ndarray
  mask: np.ndarray
  vocab: tuple
  role_names: tuple
  n_truncated: int

  def __len__(self):
    return self.tokens.shape[0]


def to_arrays(sentences: Sequence, vocab: Vocab, max_len: int) -> DepData:
  n = len(sentences)
  tokens = np.full((n, max_len), PAD_ID, np.int32)
  roles = np.full((n, max_len), -1, np.int32)
  depth = np.full((n, max_len), -1, np.int32)
  n_truncated = 0
  for i, sent in enumerate(sentences):
    n_truncated += len(sent) > max_len
    r, d = token_roles(sent), token_depths(sent)
    for t, tok in enumerate(sent[:max_len]):
      tokens[i, t], roles[i, t], depth[i, t] = vocab.id(tok.form), r[t], d[t]
  return DepData(tokens, roles, depth, roles >= 0, vocab.words, ROLE_NAMES, n_truncated)


def load_ud(data_dir: str, max_len: int = 64, min_count: int = 2, lowercase: bool = True) -> dict:
  """{'train', 'dev', 'test'} DepData from `data_dir`/en_ewt-ud-{split}.conllu; vocab from train."""
  splits = {s: read_conllu(os.path.join(data_dir, f"en_ewt-ud-{s}.conllu")) for s in ("train", "dev", "test")}
  vocab = Vocab.build(splits["train"], min_count=min_count, lowercase=lowercase)
  return {s: to_arrays(sents, vocab, max_len) for s, sents in splits.items()}
