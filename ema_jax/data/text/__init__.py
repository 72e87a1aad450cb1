"""Text data for language models: document sources, packing into windows, train and eval batches.

    from ema_jax.data import text as text_lib
    batches = text_lib.make_train_iterator(config.data, tokenizer, seq_len, global_batch)
    eval_batches = text_lib.make_eval_batches(config.data, tokenizer, seq_len, global_batch)

A split's documents come from one of three sources (`config.data.source`): `builtin`, the
docstrings of the interpreter's standard library (no download); `files`, JSON lines or plain
text, optionally gzipped; `tfds`, a prepared tensorflow-datasets dataset such as C4. Every document
is tokenized and preceded by the end-of-document id, and windows of seq_len + 1 tokens are cut
from that stream every seq_len tokens, so every token after the first is a target exactly once.
Batches are dicts of NumPy arrays (inputs, targets, resets, segment_ids, mask) holding this
process's rows of the global batch.

Training is endless and independent of the process count: row r of the global batch comes from
its own stream r, forever, and the iterator's state is global (stream positions), so a run resumes
exactly on any process count that divides the batch. Evaluation covers every token of a split once
and counts the target tokens and UTF-8 bytes, for exact perplexity and bits per byte.

Modules, each documenting its part:
  config.py          config.data fields, defaults and validation
  documents.py       the Documents interface and the division of a split into parts
  builtin.py         source `builtin`: standard-library docstrings
  files.py           source `files`: JSON lines or plain text, gzipped or not
  tfds_source.py     source `tfds`: array_record (tfds.data_source) or tfrecord (tf.data)
  sources.py         load_documents, and the documents each training stream owns
  packing.py         the token stream, windows, and the batch format
  readers.py         one training stream's documents in a new order each epoch
  train_iterator.py  make_train_iterator, TrainIterator and its states
  eval_batches.py    make_eval_batches, EvalBatches
"""

from ema_jax.data.text.builtin import BUILTIN_SPLITS, stdlib_docstring_documents
from ema_jax.data.text.config import (
    DEFAULT_TFDS_NAME,
    FILE_FORMATS,
    SOURCES,
    DataSpec,
    default_data_config,
    parse_data_config,
)
from ema_jax.data.text.documents import Documents, ListDocuments
from ema_jax.data.text.eval_batches import EvalBatches, make_eval_batches
from ema_jax.data.text.files import read_text_file, resolve_files
from ema_jax.data.text.packing import batch_from_windows, encode_array
from ema_jax.data.text.sources import load_documents
from ema_jax.data.text.train_iterator import TrainIterator, make_train_iterator

__all__ = [
    "BUILTIN_SPLITS",
    "DEFAULT_TFDS_NAME",
    "FILE_FORMATS",
    "SOURCES",
    "DataSpec",
    "Documents",
    "EvalBatches",
    "ListDocuments",
    "TrainIterator",
    "batch_from_windows",
    "default_data_config",
    "encode_array",
    "load_documents",
    "make_eval_batches",
    "make_train_iterator",
    "parse_data_config",
    "read_text_file",
    "resolve_files",
    "stdlib_docstring_documents",
]
