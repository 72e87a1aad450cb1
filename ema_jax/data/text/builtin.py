"""The builtin source: docstrings of the running interpreter's pure-Python standard library.

Every `.py` file under `sysconfig.get_paths()["stdlib"]` is parsed with `ast` (nothing is imported,
so no module runs), skipping `site-packages`, `dist-packages`, test packages (`test`, `tests`,
`idle_test`) and files that do not parse. One document per module (modules in sorted path order):
the module docstring followed by the docstrings of its classes, functions and methods in source
order, separated by blank lines. Modules whose `zlib.crc32(dotted_name) % 10 == 0` form the
`validation` split, the rest `train`, so the two never overlap and the assignment does not move
when a Python release adds modules. Python 3.11: 645 documents, 1.8 MB of English, about 0.45M
GPT-2 tokens. No download; the parse (seconds) is cached in ~/.cache/ema_jax (or
$XDG_CACHE_HOME/ema_jax).
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
import warnings
import zlib

from ema_jax.data.text import documents as documents_lib

BUILTIN_SPLITS = ("train", "validation")

_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


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
    subfolders[:] = sorted(d for d in subfolders if d not in _SKIPPED_DIRS and not d.startswith("config-"))
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


def load(split: str) -> documents_lib.Documents:
  """The documents of the builtin `split` ('train' or 'validation')."""
  if split not in BUILTIN_SPLITS:
    raise ValueError(
        f"The builtin source has splits {BUILTIN_SPLITS}, not {split!r}; set "
        "config.data.train_split / eval_split to one of them."
    )
  want_validation = split == "validation"
  texts = [text for module, text in stdlib_docstring_documents() if _is_builtin_validation(module) == want_validation]
  return documents_lib.ListDocuments(texts, f"builtin stdlib docstrings, split {split!r}")
