"""Text data for language models: document sources, packing into windows, train and eval batches.

Sources (`config.data.source`):
  builtin  The docstrings of the pure-Python standard library of the running interpreter, found by
           parsing every `.py` file under `sysconfig.get_paths()["stdlib"]` with `ast` (nothing is
           imported, so no module runs), skipping `site-packages`, `dist-packages`, test packages
           (`test`, `tests`, `idle_test`) and files that do not parse. One document per module
           (modules in sorted path order): the module docstring followed by the docstrings of its
           classes, functions and methods in source order, separated by blank lines. Modules whose
           `zlib.crc32(dotted_name) % 10 == 0` form the `validation` split, the rest `train`, so the
           two never overlap and the assignment does not move when a Python release adds modules.
           Python 3.11: 645 documents, 1.8 MB of English, about 0.45M GPT-2 tokens. No download;
           the parse (seconds) is cached in ~/.cache/ema_jax (or $XDG_CACHE_HOME/ema_jax).
  files    JSON-lines (`.jsonl`, `.json`, `.ndjson`; one object per line, the text under
           `config.data.field`, blank lines skipped) or plain text (`.txt`, `.text`, `.md`, `.rst`:
           one document per file, never split), optionally gzipped (`.gz`). `path` is a glob and may
           contain `{split}` (e.g. `data/wikipedia/{split}*.jsonl`); `eval_path` overrides the glob
           of the eval split. Files are read whole into memory when the iterator is built, so every
           malformed line is reported (file and line) before training starts.
  tfds     A prepared tensorflow-datasets dataset (default `c4/en:3.1.0`) under `data_dir` (local
           folder or gs://). Prepared as array_record it is read with `tfds.data_source` (random
           access, no TensorFlow); prepared as tfrecord (e.g. the public C4 copies) it is read with
           tf.data, which needs TensorFlow (`pip install -e .[tf]`). The choice follows the file
           format recorded in the prepared dataset's dataset_info.json.

Token stream (each training stream below, and the eval stream): every document is tokenized and
preceded by the tokenizer's end-of-document id, so that id closes the previous document and opens
the next: stream = eod d1 eod d2 eod d3 ... Windows of seq_len + 1 tokens are cut from the stream
with stride seq_len (consecutive windows share one token), so every token of the stream after the
first is a target exactly once.

Batches are dicts of NumPy arrays holding this process's rows of the global batch (b = global
batch // process count, T = seq_len):
  inputs       int32 [b, T]   window[:-1]
  targets      int32 [b, T]   window[1:]
  resets       bool  [b, T]   inputs == eod: a document starts at t, so recurrent state from before
                              t must be dropped. Every window also starts from zero state, so
                              position 0 is a start whatever resets[:, 0] says.
  segment_ids  int32 [b, T]   number of resets in inputs[1..t]: 0 at t = 0, +1 at each later
                              reset; attention may connect positions with equal ids only.
  mask         float32 [b, T] 1 where targets is a real token, 0 on padding (eval only).

Training (`make_train_iterator`) is infinite and independent of the process count. Row r of
the global batch (G = global_batch rows) is fed by its own stream r, forever: stream r owns a fixed
part of the split's documents (whole files or tfds shards r, r + G, ... when there are at least G
of them, else a contiguous 1/G of the records), reads them each epoch in an order drawn from
(seed, r, epoch), and packs its own token stream into windows as above; row r of step t is window t
of stream r. So each step's rows come from G different documents, and consecutive steps continue
each row's stream like truncated-BPTT streams (no window shuffle is needed). Sources readable only
in order (tfrecord via tf.data) visit a stream's units in a new order each epoch, records in their
stored order. Process p of P yields rows [p * b, (p + 1) * b), b = G // P, and reads and
tokenizes only its streams' documents (with fewer files than streams every process reads all the
files once, then tokenizes only its own streams' documents). `read_threads` threads read and
tokenize each stream's next documents ahead (tiktoken and tfds reads release the GIL).

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

Evaluation (`make_eval_batches`) is finite and deterministic: documents in split order, the stream
ends with a final eod, the last window and last batch are padded and masked, and the result reports
the number of target tokens and the UTF-8 bytes they stand for, so sum(NLL * mask) / sum(mask) is
the exact per-token loss and sum(NLL * mask) / (ln 2 * num_bytes) the bits per byte
(end-of-document predictions count in the numerator and for zero bytes). Every process builds the
whole eval stream and yields its own rows of each global batch.
"""

from __future__ import annotations

import ast
import collections
import concurrent.futures
import dataclasses
import glob as glob_lib
import gzip
import json
import math
import os
import sys
import sysconfig
import warnings
import zlib
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from ema_jax.data import tokenizer as tokenizer_lib
from ema_jax.errors import DataStateError

SOURCES = ("builtin", "files", "tfds")
FILE_FORMATS = ("auto", "jsonl", "text")
DEFAULT_TFDS_NAME = "c4/en:3.1.0"
BUILTIN_SPLITS = ("train", "validation")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
_STATE_FORMAT = "ema_jax.data.text/2"

_DEFAULTS: dict[str, Any] = dict(
    source="builtin",  # builtin | files | tfds
    tokenizer="gpt2",  # gpt2 | byte
    path="",  # files: glob, may contain {split}
    eval_path="",  # files: glob of the eval split (default: path)
    field="text",  # files (jsonl) and tfds: the feature holding the document text
    format="auto",  # files: auto (by suffix) | jsonl | text
    tfds_name=DEFAULT_TFDS_NAME,
    data_dir="",  # tfds: '' = tfds default (TFDS_DATA_DIR or ~/tensorflow_datasets)
    train_split="train",
    eval_split="validation",
    # Threads that read and tokenize the streams' next documents ahead (random-access sources).
    # tiktoken and tfds reads release the GIL, so they help when cores are free; results never
    # depend on them. -1 = 0 for in-memory sources (builtin, files), 8 for tfds.
    read_threads=-1,
    seed=0,  # used when make_train_iterator gets seed=None
    eval_max_documents=0,  # 0 = no limit
    eval_max_tokens=0,  # 0 = no limit
)


_REMOVED = {
    "shuffle_buffer": "every row of the batch has its own document stream, so each step's rows "
                      "already come from different documents and no window shuffle is done.",
}


def default_data_config():
    """An ml_collections ConfigDict with every accepted field at its default (see _DEFAULTS)."""
    import ml_collections  # pylint: disable=g-import-not-at-top

    return ml_collections.ConfigDict(dict(_DEFAULTS))


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """A validated `config.data`."""

    source: str
    tokenizer: str
    path: str
    eval_path: str
    field: str
    format: str
    tfds_name: str
    data_dir: str
    train_split: str
    eval_split: str
    read_threads: int
    seed: int
    eval_max_documents: int
    eval_max_tokens: int


def parse_data_config(data_cfg: Any) -> DataSpec:
    """Validates a dict / ConfigDict / DataSpec of data fields; missing fields take defaults."""
    if isinstance(data_cfg, DataSpec):
        return data_cfg
    if data_cfg is None:
        data_cfg = {}
    if hasattr(data_cfg, "to_dict"):
        data_cfg = data_cfg.to_dict()
    if not isinstance(data_cfg, Mapping):
        raise TypeError(f"config.data must be a dict or ConfigDict, got {type(data_cfg).__name__}.")
    removed = sorted(set(data_cfg) & set(_REMOVED))
    if removed:
        raise ValueError(
            f"config.data.{removed[0]} is no longer accepted: {_REMOVED[removed[0]]} Remove it "
            "from the config."
        )
    unknown = sorted(set(data_cfg) - set(_DEFAULTS))
    if unknown:
        raise ValueError(
            f"config.data has unknown field(s) {unknown}; accepted: {', '.join(_DEFAULTS)}."
        )
    values = {**_DEFAULTS, **dict(data_cfg)}

    def check(name, ok, accepted):
        if not ok:
            raise ValueError(
                f"config.data.{name}={values[name]!r} is invalid; expected {accepted}."
            )

    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    check("source", values["source"] in SOURCES, f"one of {SOURCES}")
    check(
        "tokenizer",
        values["tokenizer"] in tokenizer_lib.TOKENIZER_NAMES,
        f"one of {tokenizer_lib.TOKENIZER_NAMES}",
    )
    check("format", values["format"] in FILE_FORMATS, f"one of {FILE_FORMATS}")
    for name in ("path", "eval_path", "data_dir"):
        check(name, isinstance(values[name], str), "a string ('' for unset)")
    for name in ("field", "tfds_name", "train_split", "eval_split"):
        check(name, isinstance(values[name], str) and values[name], "a non-empty string")
    for name in ("eval_max_documents", "eval_max_tokens"):
        check(name, is_int(values[name]) and values[name] >= 0, "an integer >= 0")
    check("read_threads", is_int(values["read_threads"]) and values["read_threads"] >= -1,
          "an integer >= 0, or -1 for automatic")
    check("seed", is_int(values["seed"]) and values["seed"] >= 0, "an integer >= 0")
    if values["source"] == "files" and not values["path"]:
        raise ValueError(
            "config.data.source='files' needs config.data.path, a glob such as "
            "'data/*.jsonl' or 'data/{split}-*.jsonl' ({split} becomes the split name)."
        )
    return DataSpec(**{k: (int(v) if is_int(v) else v) for k, v in values.items()})


# ----------------------------------------------------------------------------------------------
# Documents: a split of a source, or a part of it.


class Documents:
    """Documents of one split (or a part of it), in a fixed order.

    `units` are contiguous index ranges (a file, a tfds shard, or part of one); a source that is
    not `random_access` (tf.data) is read with `iter_range` in order, one unit at a time. Others
    also support `docs[i]`.
    """

    random_access = True

    def __init__(self, description: str, units: Sequence[tuple[int, int]]):
        self.description = description
        self.units = [(int(lo), int(hi)) for lo, hi in units]

    def __len__(self) -> int:
        return sum(hi - lo for lo, hi in self.units)

    def __getitem__(self, index: int) -> str:
        raise NotImplementedError

    def iter_range(self, start: int, stop: int) -> Iterator[str]:
        for i in range(start, stop):
            yield self[i]

    def __iter__(self) -> Iterator[str]:
        return self.iter_range(0, len(self))

    def __repr__(self):
        return f"{type(self).__name__}({self.description}, {len(self)} documents)"


class ListDocuments(Documents):
    """Documents held in memory."""

    def __init__(self, texts: Sequence[str], description: str, units=None):
        super().__init__(description, units if units is not None else [(0, len(texts))])
        self._texts = list(texts)

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, index: int) -> str:
        return self._texts[index]


class _SubsetDocuments(Documents):
    """The documents of `parent` in the given index ranges, renumbered from 0."""

    def __init__(self, parent: Documents, ranges: Sequence[tuple[int, int]], description: str):
        starts = np.cumsum([0] + [hi - lo for lo, hi in ranges])
        super().__init__(description, list(zip(starts[:-1], starts[1:])))
        self.random_access = parent.random_access
        self._parent = parent
        self._ranges = list(ranges)
        self._starts = starts

    def _locate(self, index: int) -> int:
        if not 0 <= index < self._starts[-1]:
            raise IndexError(index)
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._ranges[k][0] + index - int(self._starts[k])

    def __getitem__(self, index: int) -> str:
        return self._parent[self._locate(index)]

    def iter_range(self, start: int, stop: int) -> Iterator[str]:
        # Ranges from `units` never cross a parent range, so one parent read suffices.
        for k, (lo, hi) in enumerate(zip(self._starts[:-1], self._starts[1:])):
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                base = self._ranges[k][0] - int(lo)
                yield from self._parent.iter_range(a + base, b + base)


def _assign_part(
    units: Sequence[tuple[int, int]], part: int, num_parts: int
) -> list[tuple[int, int]]:
    """Part k of n: whole units k, k+n, ... when there are >= n units, else a contiguous 1/n of the
    records. Training streams are the parts of n = global_batch."""
    if num_parts == 1:
        return list(units)
    if len(units) >= num_parts:
        return list(units[part::num_parts])
    offsets = np.cumsum([0] + [hi - lo for lo, hi in units])
    total = int(offsets[-1])
    lo_rec = total * part // num_parts
    hi_rec = total * (part + 1) // num_parts
    ranges = []
    for (lo, hi), start in zip(units, offsets[:-1]):
        a, b = max(lo, lo + lo_rec - int(start)), min(hi, lo + hi_rec - int(start))
        if a < b:
            ranges.append((a, b))
    return ranges


def load_documents(data_cfg: Any, split: str, part: int = 0, num_parts: int = 1) -> Documents:
    """The documents of `split`, or part `part` of `num_parts` disjoint parts of it (_assign_part)."""
    spec = parse_data_config(data_cfg)
    if not (isinstance(num_parts, int) and num_parts >= 1 and isinstance(part, int)
            and 0 <= part < num_parts):
        raise ValueError(f"part={part!r} of num_parts={num_parts!r}: expected 0 <= part < num_parts.")
    if spec.source == "builtin":
        docs = _builtin_documents(split)
    elif spec.source == "files":
        return _file_documents(spec, split, part, num_parts)
    else:
        docs = _tfds_documents(spec, split)
    if num_parts == 1:
        return docs
    ranges = _assign_part(docs.units, part, num_parts)
    return _SubsetDocuments(docs, ranges, f"{docs.description} (part {part} of {num_parts})")


# --- builtin: standard-library docstrings -----------------------------------------------------

_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


def _docstrings_in_source_order(node: ast.AST) -> list[str]:
    found = []
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=True)
        if doc and doc.strip():
            found.append(doc.strip())
    for child in ast.iter_child_nodes(node):
        found.extend(_docstrings_in_source_order(child))
    return found


_STDLIB_CACHE: list[tuple[str, str]] = []
_STDLIB_CACHE_FORMAT = 1


def _stdlib_cache_file() -> str:
    # Parsing 12 MB of stdlib source takes 3-10 s on a small CPU, so the result is kept on disk,
    # keyed by the interpreter build; a cache that cannot be read or written is simply rebuilt.
    key = f"{_STDLIB_CACHE_FORMAT}|{sys.version}|{sysconfig.get_paths()['stdlib']}"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = f"stdlib_docstrings_{zlib.crc32(key.encode()):08x}.json"
    return os.path.join(base, "ema_jax", name)


def _parse_stdlib_docstrings() -> list[tuple[str, str]]:
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(
            d for d in subfolders if d not in _SKIPPED_DIRS and not d.startswith("config-")
        )
        paths.extend(os.path.join(folder, f) for f in sorted(files) if f.endswith(".py"))
    documents = []
    for path in paths:
        rel = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
        if rel[-1] == "__init__":
            rel = rel[:-1]
        module = ".".join(rel)
        try:
            with open(path, "rb") as f:
                source = f.read()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escapes etc. in old modules
                tree = ast.parse(source)
        except (SyntaxError, ValueError, OSError):
            continue
        text = "\n\n".join(_docstrings_in_source_order(tree))
        if text:
            documents.append((module, text))
    return documents


def stdlib_docstring_documents() -> list[tuple[str, str]]:
    """(dotted module name, document) for every stdlib module with docstrings, sorted by path."""
    if _STDLIB_CACHE:
        return _STDLIB_CACHE
    cache_file = _stdlib_cache_file()
    documents = None
    try:
        with open(cache_file, encoding="utf-8") as f:
            documents = [(m, t) for m, t in json.load(f)]
    except (OSError, ValueError, TypeError):
        pass
    if not documents:
        documents = _parse_stdlib_docstrings()
        try:
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            tmp = f"{cache_file}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(documents, f)
            os.replace(tmp, cache_file)
        except OSError:
            pass
    _STDLIB_CACHE[:] = documents
    return documents


def _is_builtin_validation(module: str) -> bool:
    return zlib.crc32(module.encode()) % 10 == 0


def _builtin_documents(split: str) -> Documents:
    if split not in BUILTIN_SPLITS:
        raise ValueError(
            f"The builtin source has splits {BUILTIN_SPLITS}, not {split!r}; set "
            "config.data.train_split / eval_split to one of them."
        )
    want_validation = split == "validation"
    texts = [
        text for module, text in stdlib_docstring_documents()
        if _is_builtin_validation(module) == want_validation
    ]
    return ListDocuments(texts, f"builtin stdlib docstrings, split {split!r}")


# --- files: JSON lines and plain text ---------------------------------------------------------


def _split_glob(spec: DataSpec, split: str) -> str:
    if split == spec.eval_split and spec.eval_path:
        return spec.eval_path
    return spec.path.replace("{split}", split)


def _file_format(spec: DataSpec, filename: str) -> str:
    if spec.format != "auto":
        return spec.format
    name = filename[:-3] if filename.endswith(".gz") else filename
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(_TEXT_SUFFIXES):
        return "text"
    raise ValueError(
        f"{filename}: cannot tell the format from the file name; name files {_JSONL_SUFFIXES} "
        f"(JSON lines) or {_TEXT_SUFFIXES} (plain text), or set config.data.format to 'jsonl' or "
        "'text'."
    )


def _read_bytes(filename: str) -> bytes:
    with open(filename, "rb") as f:
        data = f.read()
    if filename.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"{filename}: not a valid gzip file ({e}).") from None
    return data


def _utf8_error(filename: str, data: bytes, error: UnicodeDecodeError, line_offset: int = 0):
    line = line_offset + data[: error.start].count(b"\n") + 1
    return ValueError(
        f"{filename}:{line}: bytes are not valid UTF-8 ({error.reason} at byte "
        f"{error.start} of the line); convert the file to UTF-8, e.g. "
        "`iconv -f latin1 -t utf-8 in > out`."
    )


def read_text_file(filename: str, field: str = "text", file_format: str = "jsonl") -> list[str]:
    """The documents in one file; malformed input raises ValueError naming the file and line."""
    data = _read_bytes(filename)
    if not data.strip():
        raise ValueError(
            f"{filename}: the file is empty; remove it or narrow config.data.path so the glob "
            "matches only files with documents."
        )
    if file_format == "text":
        try:
            return [data.decode("utf-8")]
        except UnicodeDecodeError as e:
            raise _utf8_error(filename, data, e) from None
    documents = []
    for line_number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text_line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _utf8_error(filename, line, e, line_number - 1) from None
        try:
            record = json.loads(text_line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{filename}:{line_number}: not valid JSON ({e.msg} at column {e.colno}); each "
                f'line must be one JSON object such as {{"{field}": "document text"}}.'
            ) from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{filename}:{line_number}: expected a JSON object, got {type(record).__name__}; "
                f'each line must look like {{"{field}": "document text"}}.'
            )
        if field not in record:
            raise ValueError(
                f"{filename}:{line_number}: the object has no field {field!r} (fields: "
                f"{sorted(record)}); set config.data.field to the field holding the text."
            )
        text = record[field]
        if not isinstance(text, str):
            raise ValueError(
                f"{filename}:{line_number}: field {field!r} holds a {type(text).__name__}, not a "
                "string; set config.data.field to the field holding the document text."
            )
        documents.append(text)
    return documents


def resolve_files(data_cfg: Any, split: str) -> list[str]:
    """The sorted files of `split` for source='files'; raises FileNotFoundError if none match."""
    spec = parse_data_config(data_cfg)
    pattern = _split_glob(spec, split)
    files = sorted(f for f in glob_lib.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(f))
    if not files:
        where = "config.data.eval_path" if pattern == spec.eval_path else "config.data.path"
        raise FileNotFoundError(
            f"{where}={pattern!r} (split {split!r}) matches no file (working directory "
            f"{os.getcwd()}); give an existing file or a glob such as 'data/*.jsonl'."
        )
    return files


def _read_files(spec: DataSpec, split: str, files: Sequence[str]) -> ListDocuments:
    """The documents of `files` in order, one unit per file."""
    texts, units = [], []
    for filename in files:
        docs = read_text_file(filename, spec.field, _file_format(spec, filename))
        units.append((len(texts), len(texts) + len(docs)))
        texts.extend(docs)
    return ListDocuments(texts, f"files {_split_glob(spec, split)!r} split {split!r}", units)


def _file_documents(spec: DataSpec, split: str, part: int, num_parts: int) -> Documents:
    files = resolve_files(spec, split)
    if num_parts == 1:
        return _read_files(spec, split, files)
    if len(files) >= num_parts:  # whole files: read only this part's
        docs = _read_files(spec, split, files[part::num_parts])
        docs.description += f" (part {part} of {num_parts})"
        return docs
    docs = _read_files(spec, split, files)
    ranges = _assign_part(docs.units, part, num_parts)
    return _SubsetDocuments(docs, ranges, f"{docs.description} (part {part} of {num_parts})")


# --- tfds: array_record (data_source) or tfrecord (tf.data) -----------------------------------


def _tfds_builder(spec: DataSpec):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    data_dir = spec.data_dir or None
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    how = (
        f"Prepare it once on a machine with internet: `tfds build {spec.tfds_name.split(':')[0]} "
        f"--data_dir=DIR --file_format=array_record` (or tfds.builder({spec.tfds_name!r}, "
        "data_dir=DIR).download_and_prepare()), then set config.data.data_dir=DIR (a local folder "
        "or gs://bucket/path)."
    )
    try:
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise FileNotFoundError(
            f"tfds dataset config.data.tfds_name={spec.tfds_name!r} is not prepared under "
            f"data_dir={where!r}. {how}"
        ) from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tfds dataset {spec.tfds_name!r} is not prepared under {builder.data_dir!r}. {how}"
        )
    return builder


def _split_units(builder, split: str) -> list[tuple[str, int, int, int]]:
    """(split name, first, end, global offset) per shard-aligned piece of a split spec."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    splits = builder.info.splits
    for name in split.split("+"):
        base = name.split("[")[0].strip()
        if base not in splits:
            raise ValueError(
                f"tfds dataset {builder.info.full_name!r} has no split {base!r}; it has "
                f"{sorted(splits)}. Set config.data.train_split / eval_split."
            )
    pieces = []
    offset = 0
    for instruction in tfds.core.ReadInstruction.from_spec(split).to_absolute(splits):
        shard_ends = np.cumsum([0] + list(splits[instruction.splitname].shard_lengths))
        first = instruction.from_ or 0  # None means the split's start / end
        end = int(shard_ends[-1]) if instruction.to is None else instruction.to
        for s_lo, s_hi in zip(shard_ends[:-1], shard_ends[1:]):
            lo, hi = max(int(s_lo), first), min(int(s_hi), end)
            if lo < hi:
                pieces.append((instruction.splitname, lo, hi, offset))
                offset += hi - lo
    return pieces


class _TfdsArrayRecordDocuments(Documents):
    def __init__(self, builder, split: str, field: str):
        pieces = _split_units(builder, split)
        super().__init__(
            f"tfds {builder.info.full_name} split {split!r} (array_record)",
            [(off, off + hi - lo) for _, lo, hi, off in pieces],
        )
        self._source = builder.as_data_source(split=split)
        self._field = field
        if len(self._source) != len(self):
            raise ValueError(
                f"{self.description}: {len(self._source)} records, expected {len(self)}."
            )

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        return _record_text(self._source[index], self._field, self.description, index)


class _TfdsTFRecordDocuments(Documents):
    """A tfrecord-prepared split read sequentially with tf.data, one shard piece at a time."""

    random_access = False

    def __init__(self, builder, split: str, field: str):
        self._pieces = _split_units(builder, split)
        super().__init__(
            f"tfds {builder.info.full_name} split {split!r} (tfrecord)",
            [(off, off + hi - lo) for _, lo, hi, off in self._pieces],
        )
        self._builder = builder
        self._field = field

    def __getitem__(self, index: int) -> str:
        return next(self.iter_range(index, index + 1))

    def iter_range(self, start: int, stop: int) -> Iterator[str]:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        # tf.data only reads files here: keep TensorFlow off the accelerators JAX uses.
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:
            pass
        parts = []
        for name, lo, hi, off in self._pieces:
            a, b = max(start, off), min(stop, off + hi - lo)
            if a < b:
                parts.append(f"{name}[{lo + a - off}:{lo + b - off}]")
        if not parts:
            return
        dataset = self._builder.as_dataset(
            split="+".join(parts),
            shuffle_files=False,
            read_config=tfds.ReadConfig(try_autocache=False, interleave_cycle_length=1),
        )
        for i, record in enumerate(tfds.as_numpy(dataset)):
            yield _record_text(record, self._field, self.description, start + i)


def _record_text(record: Mapping[str, Any], field: str, description: str, index: int) -> str:
    if field not in record:
        raise ValueError(
            f"{description} record {index}: no feature {field!r} (features: {sorted(record)}); "
            "set config.data.field."
        )
    value = record[field]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{description} record {index}: feature {field!r} is not valid UTF-8 ({e.reason} "
                f"at byte {e.start})."
            ) from None
    if isinstance(value, str):
        return value
    raise ValueError(
        f"{description} record {index}: feature {field!r} holds {type(value).__name__}, not text."
    )


def _tensorflow_importable() -> bool:
    import importlib.util  # pylint: disable=g-import-not-at-top

    return importlib.util.find_spec("tensorflow") is not None


def _tfds_documents(spec: DataSpec, split: str) -> Documents:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    builder = _tfds_builder(spec)
    features = builder.info.features
    if hasattr(features, "keys") and spec.field not in features.keys():
        raise ValueError(
            f"tfds dataset {spec.tfds_name!r} has no feature {spec.field!r} (features: "
            f"{sorted(features.keys())}); set config.data.field."
        )
    file_format = builder.info.file_format
    if file_format == tfds.core.FileFormat.ARRAY_RECORD:
        return _TfdsArrayRecordDocuments(builder, split, spec.field)
    if file_format == tfds.core.FileFormat.TFRECORD:
        if not _tensorflow_importable():
            raise ImportError(
                f"tfds dataset {spec.tfds_name!r} under {builder.data_dir!r} is prepared as "
                "tfrecord, which only tf.data reads: install TensorFlow (`pip install -e .[tf]`, "
                "tensorflow-cpu is enough), or prepare it as array_record (`tfds build ... "
                "--file_format=array_record`) to read it without TensorFlow."
            )
        return _TfdsTFRecordDocuments(builder, split, spec.field)
    raise ValueError(
        f"tfds dataset {spec.tfds_name!r} is stored as {file_format}; readable formats are "
        "array_record (tfds.data_source) and tfrecord (tf.data)."
    )


# ----------------------------------------------------------------------------------------------
# Tokenizing and packing.


def encode_array(tok, text: str) -> np.ndarray:
    """int32 token ids of `text`, using the tokenizer's array fast path when it has one."""
    if hasattr(tok, "encode_array"):
        return tok.encode_array(text)
    return np.asarray(tok.encode(text), np.int32)


class _EncodeDocument:
    """text -> int32 [eod, tokens...]."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._eod = np.array([tokenizer.eod_id], np.int32)

    def __call__(self, text: str) -> np.ndarray:
        return np.concatenate([self._eod, encode_array(self._tokenizer, text)])


def batch_from_windows(windows_BW: np.ndarray, eod_id: int, num_targets_B=None) -> dict:
    """The batch dict (see module docstring) of windows [B, T + 1]; rows past num_targets masked."""
    windows_BW = np.asarray(windows_BW, np.int32)
    inputs_BT, targets_BT = windows_BW[:, :-1], windows_BW[:, 1:]
    resets_BT = inputs_BT == eod_id
    segment_ids_BT = np.zeros(inputs_BT.shape, np.int32)
    np.cumsum(resets_BT[:, 1:], axis=1, dtype=np.int32, out=segment_ids_BT[:, 1:])
    if num_targets_B is None:
        mask_BT = np.ones(inputs_BT.shape, np.float32)
    else:
        positions = np.arange(inputs_BT.shape[1])
        mask_BT = (positions[None, :] < np.asarray(num_targets_B)[:, None]).astype(np.float32)
    return {
        "inputs": np.ascontiguousarray(inputs_BT),
        "targets": np.ascontiguousarray(targets_BT),
        "resets": resets_BT,
        "segment_ids": segment_ids_BT,
        "mask": mask_BT,
    }


# ----------------------------------------------------------------------------------------------
# Training streams: row r of every global batch comes from stream r (module docstring).


def _derived_seed(*values: int) -> int:
    # Folding instead of adding keeps the epoch-e order of seed s unrelated to seed s + e.
    # Below 2**31: grain's index_shuffle takes a 32-bit seed.
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0] >> 1)


def _stream_layout(spec: DataSpec, split: str, num_streams: int, streams: Sequence[int]):
    """(documents, {stream: index ranges into them}, num_units) for the given streams.

    The ranges of stream r depend only on the split and num_streams (never on which process asks),
    so every process layout sees the same streams. num_units counts the split's files or shards.
    """
    if spec.source == "files":
        files = resolve_files(spec, split)
        if len(files) >= num_streams:
            # Stream r owns files r, r + G, ...: read only the files of the asking process's streams.
            mine = set(streams)
            wanted = [j for j in range(len(files)) if j % num_streams in mine]
            docs = _read_files(spec, split, [files[j] for j in wanted])
            ranges = {r: [] for r in streams}
            for j, unit in zip(wanted, docs.units):
                ranges[j % num_streams].append(unit)
            return docs, ranges, len(files)
        docs = _read_files(spec, split, files)  # fewer files than streams: every process reads all
    elif spec.source == "builtin":
        docs = _builtin_documents(split)
    else:
        docs = _tfds_documents(spec, split)
    if len(docs) < num_streams:
        raise ValueError(
            f"{docs.description} has {len(docs)} documents, fewer than global_batch={num_streams}: "
            "every row of the batch reads its own documents. Use a batch size of at most "
            f"{len(docs)}, or more data."
        )
    ranges = {r: _assign_part(docs.units, r, num_streams) for r in streams}
    return docs, ranges, len(docs.units)


class _RandomAccessReader:
    """The documents of one stream of a random-access source, in a new order each epoch.

    Position (epoch, doc): the doc-th document of that epoch's order, a permutation drawn from
    (seed, stream, epoch). With a thread pool, the next `ahead` documents are read and tokenized in
    the background; which document comes next never depends on the threads.
    """

    # Up to this many documents the epoch's permutation is a NumPy array (64 KiB as int32); above
    # it, grain's index_shuffle (a keyed bijection, O(1) memory, so G streams of a C4-sized split
    # cost nothing), which costs ~5 us a call there but up to ~15 ms on domains of a few elements.
    _MAX_ARRAY_PERMUTATION = 1 << 14

    def __init__(self, docs: Documents, ranges, seed: int, stream: int, encode, pool, ahead: int):
        self._docs, self._ranges, self._encode = docs, list(ranges), encode
        self._starts = np.cumsum([0] + [hi - lo for lo, hi in self._ranges])
        self.num_documents = int(self._starts[-1])
        self._seed, self._stream = seed, stream
        self._epoch_order = (-1, 0, None)  # (epoch, seed, permutation array or None)
        self._pool, self._ahead = pool, ahead
        self._queue: collections.deque = collections.deque()  # (position, future) read ahead
        self.position = (0, 0)  # of the next document `read` returns
        self._submitted = self.position  # of the next document to read ahead

    def document_index(self, epoch: int, doc: int) -> int:
        n = self.num_documents
        if self._epoch_order[0] != epoch:
            seed = _derived_seed(self._seed, self._stream, epoch)
            order = None
            if n <= self._MAX_ARRAY_PERMUTATION:
                order = np.random.default_rng(seed).permutation(n).astype(np.int32)
            self._epoch_order = (epoch, seed, order)
        _, seed, order = self._epoch_order
        if order is not None:
            k = int(order[doc])
        else:
            k = grain.experimental.index_shuffle(doc, max_index=n - 1, seed=seed, rounds=4)
        unit = int(np.searchsorted(self._starts, k, side="right")) - 1
        return self._ranges[unit][0] + k - int(self._starts[unit])

    def advance(self, position):
        epoch, doc = position
        return (epoch, doc + 1) if doc + 1 < self.num_documents else (epoch + 1, 0)

    def load(self, epoch: int, doc: int) -> np.ndarray:
        """The tokens of document (epoch, doc), without moving the reader."""
        return self._load(self.document_index(epoch, doc))

    def _load(self, index: int) -> np.ndarray:
        return self._encode(self._docs[index])

    def seek(self, epoch: int, doc: int) -> None:
        for _, future in self._queue:
            future.cancel()
        self._queue.clear()
        self.position = self._submitted = (epoch, doc)

    def prefetch(self) -> None:
        while self._pool is not None and len(self._queue) < self._ahead:
            index = self.document_index(*self._submitted)
            self._queue.append((self._submitted, self._pool.submit(self._load, index)))
            self._submitted = self.advance(self._submitted)

    def read(self) -> tuple[tuple[int, int], np.ndarray]:
        position = self.position
        self.position = self.advance(position)
        if self._pool is None:
            return position, self._load(self.document_index(*position))
        self.prefetch()
        queued, future = self._queue.popleft()
        assert queued == position, (queued, position)
        self.prefetch()
        return position, future.result()

    def close(self) -> None:
        self.seek(*self.position)


class _SequentialReader:
    """The documents of one stream of a source read only in order (tf.data).

    Each epoch visits the stream's units (shard pieces) in a new order derived from (seed, stream,
    epoch); records inside a unit keep their stored order (tfds shuffles examples when it prepares
    a dataset). Position (epoch, doc) counts documents in that epoch's order; seeking opens the
    unit holding it at the right record.
    """

    def __init__(self, docs: Documents, ranges, seed: int, stream: int, encode):
        self._docs, self._encode = docs, encode
        self._units = [(lo, hi) for lo, hi in ranges if hi > lo]
        self.num_documents = sum(hi - lo for lo, hi in self._units)
        self._seed, self._stream = seed, stream
        self._order = (-1, None, None)  # (epoch, unit order, first doc of each unit in that order)
        self._reader = None
        self._unit_end = 0
        self.position = (0, 0)

    def _epoch_order(self, epoch: int):
        if self._order[0] != epoch:
            rng = np.random.default_rng([self._seed, self._stream, epoch])
            order = rng.permutation(len(self._units))
            starts = np.cumsum([0] + [self._units[k][1] - self._units[k][0] for k in order])
            self._order = (epoch, order, starts)
        return self._order[1], self._order[2]

    def document_index(self, epoch: int, doc: int) -> int:
        order, starts = self._epoch_order(epoch)
        k = int(np.searchsorted(starts, doc, side="right")) - 1
        return self._units[order[k]][0] + doc - int(starts[k])

    def advance(self, position):
        epoch, doc = position
        return (epoch, doc + 1) if doc + 1 < self.num_documents else (epoch + 1, 0)

    def load(self, epoch: int, doc: int) -> np.ndarray:
        """The tokens of document (epoch, doc), without moving the reader."""
        index = self.document_index(epoch, doc)
        return self._encode(next(iter(self._docs.iter_range(index, index + 1))))

    def seek(self, epoch: int, doc: int) -> None:
        self.position = (epoch, doc)
        self._reader = None

    def prefetch(self) -> None:
        pass

    def read(self) -> tuple[tuple[int, int], np.ndarray]:
        epoch, doc = position = self.position
        if self._reader is None:
            order, starts = self._epoch_order(epoch)
            k = int(np.searchsorted(starts, doc, side="right")) - 1
            self._unit_end = int(starts[k + 1])
            self._reader = self._docs.iter_range(self.document_index(epoch, doc),
                                                 self._units[order[k]][1])
        try:
            text = next(self._reader)
        except StopIteration:
            raise ValueError(
                f"{self._docs.description}: stream {self._stream} ran out of records before "
                f"document {doc} of epoch {epoch}; the prepared dataset does not match its metadata."
            ) from None
        if doc + 1 == self._unit_end:
            self._reader = None
        self.position = self.advance(position)
        return position, self._encode(text)

    def close(self) -> None:
        self._reader = None


class _Stream:
    """Packs one stream's documents into windows of `window` tokens taken every `stride` tokens.

    Position (epoch, doc, offset): the next window starts at token `offset` of document (epoch,
    doc), whose tokens are [eod, tokens...]. Restoring re-reads that one document, so no token
    array is ever stored in a state.
    """

    def __init__(self, index: int, reader, window: int, stride: int):
        self.index, self.reader = index, reader
        self._window, self._stride = window, stride
        self._docs: collections.deque = collections.deque()  # (position, tokens) still needed
        self._offset = 0  # into the first of _docs
        self._available = 0  # tokens of _docs from _offset on

    def next_window(self, out_W: np.ndarray) -> None:
        while self._available < self._window:
            position, tokens = self.reader.read()
            self._docs.append((position, tokens))
            self._available += len(tokens)
        written, start = 0, self._offset
        for _, tokens in self._docs:
            part = tokens[start : start + self._window - written]
            out_W[written : written + len(part)] = part
            written += len(part)
            start = 0
            if written == self._window:
                break
        skip = self._stride
        while skip:
            left = len(self._docs[0][1]) - self._offset
            if skip >= left:
                skip -= left
                self._docs.popleft()
                self._offset = 0
            else:
                self._offset += skip
                skip = 0
        self._available -= self._stride

    def get_state(self) -> dict[str, int]:
        epoch, doc = self._docs[0][0] if self._docs else self.reader.position
        return {"epoch": int(epoch), "doc": int(doc), "offset": int(self._offset),
                "num_documents": self.reader.num_documents}

    def restored(self, state: Mapping[str, Any]):
        """The (position, tokens, offset) `state` puts this stream at; DataStateError if it cannot."""
        epoch, doc, offset = (state[k] for k in ("epoch", "doc", "offset"))
        n = self.reader.num_documents
        where = f"stream {self.index} (row {self.index} of the global batch)"
        if state["num_documents"] != n:
            raise DataStateError(
                f"The data iterator state says {where} had {state['num_documents']} documents; "
                f"now it has {n}: the data changed since the state was saved. Resume with the same "
                "data, or use a new workdir."
            )
        if doc >= n:
            raise DataStateError(
                f"The data iterator state puts {where} at document {doc}, but the stream has "
                f"{n} documents (0..{n - 1}): the state was edited or the data changed. Resume "
                "with the same data, or use a new workdir."
            )
        tokens = self.reader.load(epoch, doc)
        if offset >= len(tokens):
            raise DataStateError(
                f"The data iterator state puts {where} at token {offset} of document {doc} "
                f"(epoch {epoch}), which now has {len(tokens)} tokens (with its leading eod): "
                "the data or the tokenizer changed since the state was saved. Resume with the same "
                "data and tokenizer, or use a new workdir."
            )
        return (epoch, doc), tokens, offset

    def restore(self, position, tokens: np.ndarray, offset: int) -> None:
        self.reader.seek(*self.reader.advance(position))
        self._docs = collections.deque([(position, tokens)])
        self._offset = offset
        self._available = len(tokens) - offset
        self.reader.prefetch()


def _check_process(process_index: int, process_count: int) -> None:
    if not (isinstance(process_count, int) and process_count >= 1):
        raise ValueError(f"process_count={process_count!r} must be an integer >= 1.")
    if not (isinstance(process_index, int) and 0 <= process_index < process_count):
        raise ValueError(
            f"process_index={process_index!r} must be an integer in [0, {process_count})."
        )


def _process_and_local_batch(global_batch, process_index, process_count, name="global_batch"):
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    _check_process(process_index, process_count)
    if not (isinstance(global_batch, int) and global_batch >= 1):
        raise ValueError(f"{name}={global_batch!r} must be an integer >= 1.")
    if global_batch % process_count:
        raise ValueError(
            f"{name}={global_batch} is not divisible by process_count={process_count}; every "
            f"process feeds an equal slice. Use a multiple of {process_count}, e.g. "
            f"{process_count * max(1, round(global_batch / process_count))}."
        )
    return process_index, process_count, global_batch // process_count


def _check_seq_len(seq_len) -> None:
    if not (isinstance(seq_len, int) and seq_len >= 1):
        raise ValueError(f"seq_len={seq_len!r} must be an integer >= 1.")


def _as_tokenizer(tokenizer, spec: DataSpec):
    if tokenizer is None:
        return tokenizer_lib.get_tokenizer(spec.tokenizer)
    if isinstance(tokenizer, str):
        return tokenizer_lib.get_tokenizer(tokenizer)
    return tokenizer


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
            + (" (format /1 described one process's reader and cannot be restored by the "
               "per-row streams)" if old else "")
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
        if not (isinstance(key, str) and key.isdigit() and isinstance(position, Mapping)
                and all(_is_count(position.get(k)) for k in fields)):
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

    def __init__(self, streams: Sequence[_Stream], settings: dict[str, Any], eod_id: int,
                 window: int, pool=None):
        self._streams = list(streams)
        self._settings = settings
        self._eod_id, self._window = eod_id, window
        self._pool = pool
        for stream in self._streams:
            stream.reader.prefetch()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        windows_BW = np.empty((len(self._streams), self._window), np.int32)
        for row, stream in enumerate(self._streams):
            stream.next_window(windows_BW[row])
        return batch_from_windows(windows_BW, self._eod_id)

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
            raise DataStateError(
                f"merge_states needs a non-empty list of get_state() results, got {states!r}."
            )
        parts = [_checked_state(s, f"Part {i} of the data iterator states")
                 for i, s in enumerate(states)]
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
            missing, extra = sorted(set(range(num_streams)) - have), sorted(have - set(range(num_streams)))
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
    return ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
                     for k in keys if saved.get(k) != now.get(k))


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
      A TrainIterator of batch dicts (module docstring) with get_state / merge_states / set_state.
    """
    spec = parse_data_config(data_cfg)
    _check_seq_len(seq_len)
    process_index, process_count, local_batch = _process_and_local_batch(
        global_batch, process_index, process_count
    )
    seed = spec.seed if seed is None else seed
    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"seed={seed!r} must be an integer >= 0.")
    tok = _as_tokenizer(tokenizer, spec)
    split = split or spec.train_split
    rows = range(process_index * local_batch, (process_index + 1) * local_batch)
    docs, ranges, num_units = _stream_layout(spec, split, global_batch, rows)
    threads = spec.read_threads
    if threads < 0:
        threads = 8 if spec.source == "tfds" else 0
    pool = None
    if threads > 0 and docs.random_access:
        pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="ema_jax_text")
    encode = _EncodeDocument(tok)
    streams = []
    for r in rows:
        if docs.random_access:
            reader = _RandomAccessReader(docs, ranges[r], seed, r, encode, pool, ahead=2)
        else:
            reader = _SequentialReader(docs, ranges[r], seed, r, encode)
        streams.append(_Stream(r, reader, window=seq_len + 1, stride=seq_len))
    settings = dict(
        source=spec.source, tfds_name=spec.tfds_name, split=split, tokenizer=tok.name,
        seq_len=seq_len, global_batch=global_batch, seed=seed, num_units=num_units,
    )
    return TrainIterator(streams, settings, tok.eod_id, seq_len + 1, pool)


# ----------------------------------------------------------------------------------------------
# Evaluation.


class EvalBatches:
    """A finite, deterministic, re-iterable sequence of eval batches covering a split once.

    Every process holds the same global stream and yields its own rows of each global batch, so
    all processes yield the same number of batches. Totals are global (all processes together).

    Attributes:
      num_documents: documents read (after max_documents).
      num_tokens: target tokens with mask 1 (each document's tokens plus its closing eod).
      num_bytes: UTF-8 bytes those targets stand for (eod counts 0): the bits-per-byte denominator.
      num_windows: windows of seq_len + 1 tokens (the last one padded).
    """

    def __init__(self, stream: np.ndarray, num_documents: int, tok, seq_len: int,
                 global_batch: int, process_index: int, process_count: int, description: str):
        self.description = description
        self.num_documents = num_documents
        self.num_tokens = len(stream) - 1
        self.num_bytes = tok.num_bytes(stream[1:])
        self.seq_len, self.global_batch = seq_len, global_batch
        self.local_batch = global_batch // process_count
        self.process_index, self.process_count = process_index, process_count
        self.eod_id = tok.eod_id
        self.num_windows = max(1, math.ceil(self.num_tokens / seq_len))
        padded = np.full(self.num_windows * seq_len + 1, tok.eod_id, np.int32)
        padded[: len(stream)] = stream
        self._stream = padded

    def __len__(self) -> int:
        return math.ceil(self.num_windows / self.global_batch)

    def __iter__(self) -> Iterator[dict]:
        T, b = self.seq_len, self.local_batch
        windows_NW = np.lib.stride_tricks.sliding_window_view(self._stream, T + 1)[::T]
        for batch_index in range(len(self)):
            first = batch_index * self.global_batch + self.process_index * b
            rows = np.arange(first, first + b)
            valid = rows < self.num_windows
            windows_BW = np.full((b, T + 1), self.eod_id, np.int32)
            windows_BW[valid] = windows_NW[rows[valid]]
            num_targets_B = np.where(valid, np.minimum(T, self.num_tokens - rows * T), 0)
            yield batch_from_windows(windows_BW, self.eod_id, num_targets_B)

    def __repr__(self):
        return (
            f"EvalBatches({self.description}: {len(self)} batches of {self.local_batch}x"
            f"{self.seq_len}, {self.num_documents} documents, {self.num_tokens} tokens, "
            f"{self.num_bytes} bytes)"
        )


def make_eval_batches(
    data_cfg: Any,
    tokenizer,
    seq_len: int,
    global_batch: int,
    *,
    split: str | None = None,
    max_documents: int | None = None,
    max_tokens: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalBatches:
    """Deterministic batches covering every token of `split` once (module docstring).

    max_documents: read only the first documents of the split (None: data_cfg.eval_max_documents,
      0 = all). max_tokens: keep only the first targets of the stream (None:
      data_cfg.eval_max_tokens, 0 = all); the count of tokens and bytes stays exact.
    """
    spec = parse_data_config(data_cfg)
    _check_seq_len(seq_len)
    process_index, process_count, _ = _process_and_local_batch(
        global_batch, process_index, process_count
    )
    max_documents = spec.eval_max_documents if max_documents is None else max_documents
    max_tokens = spec.eval_max_tokens if max_tokens is None else max_tokens
    for name, value in (("max_documents", max_documents), ("max_tokens", max_tokens)):
        if not (isinstance(value, int) and value >= 0):
            raise ValueError(f"{name}={value!r} must be an integer >= 0 (0 = no limit).")
    tok = _as_tokenizer(tokenizer, spec)
    split = split or spec.eval_split
    docs = load_documents(spec, split)  # the whole split: every process builds the same stream
    stop = min(len(docs), max_documents) if max_documents else len(docs)
    eod = np.array([tok.eod_id], np.int32)
    parts, total, num_documents = [], 1, 0
    for text in docs.iter_range(0, stop):
        if max_tokens and total > max_tokens:
            break
        tokens = encode_array(tok, text)
        parts.append(eod)
        parts.append(tokens)
        total += len(tokens) + 1
        num_documents += 1
    if num_documents == 0:
        raise ValueError(f"{docs.description} has no documents to evaluate.")
    parts.append(eod)
    stream = np.concatenate(parts)
    if max_tokens:
        stream = stream[: max_tokens + 1]
    return EvalBatches(
        stream, num_documents, tok, seq_len, global_batch, process_index, process_count,
        f"{docs.description}, {tok.name}",
    )
