"""Continues text prompts with a trained language model:

  python generate.py --workdir W --prompt "Once upon a time" [--max_new_tokens 200] [--weights raw|ema|bema]
                     [--step N] [--temperature 1.0] [--top_k 0] [--top_p 1.0] [--seed 0]
  python generate.py --export model.safetensors --prompts_file prompts.txt   (one prompt per line: a batch)

Restores the checkpoint (or an export of ema_jax/export.py) onto the devices of this machine, reads each
prompt as the start of a document, and prints each prompt followed by its continuation, which stops at an
end-of-document token. Temperature 0 is greedy decoding. Without a prompt, samples from nothing.
"""

import ema_jax.host_memory  # first, no JAX: this command again, once, with huge pages for big buffers

ema_jax.host_memory.reexec()

from absl import flags  # noqa: E402

from ema_jax import cli, errors

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (or give --export).")
_EXPORT = flags.DEFINE_string("export", None, "A model.safetensors written by `python -m ema_jax.export`.")
_PROMPT = flags.DEFINE_string("prompt", None, "The text to continue.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file of prompts, one per line, continued as one batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per prompt.")
_WEIGHTS = flags.DEFINE_string("weights", "raw", "raw or one of the run's averages (ema, bema); --workdir only.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest); --workdir only.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 is greedy decoding.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens only (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set with this probability (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the sampling.")


def _own_words(message: str) -> str:
  for prefix in ("export: ", "load_exported: "):
    if message.startswith(prefix):
      message = message[len(prefix) :]
  return message.replace("export works for", "generate.py works for").replace(
      "no language model to export", "no language model to generate with"
  )


def prompts_from_flags() -> list:
  if _PROMPTS_FILE.value is not None:
    if _PROMPT.value is not None:
      raise ValueError("give --prompt or --prompts_file, not both.")
    with open(_PROMPTS_FILE.value) as f:
      prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
      raise ValueError(f"--prompts_file={_PROMPTS_FILE.value}: no prompts in it (one per line).")
    return prompts
  return [_PROMPT.value or ""]


def main(argv):
  del argv
  from ema_jax import decoding, export  # after flag parsing, so --help and flag errors are fast
  from ema_jax.data import tokenizer as tokenizer_lib

  if (_WORKDIR.value is None) == (_EXPORT.value is None):
    raise ValueError("generate.py: give exactly one of --workdir W (a training run) and --export MODEL.safetensors.")
  if _EXPORT.value is not None:
    given = [f"--{f.name}" for f in (_WEIGHTS, _STEP) if flags.FLAGS[f.name].present]
    if given:
      raise ValueError(
          f"generate.py: {' and '.join(given)} choose(s) a checkpoint of a --workdir; an export holds the one "
          f"step and weights it was written with (its model.json says which). Drop {' and '.join(given)}, "
          "or generate from the workdir."
      )
  prompts = prompts_from_flags()
  try:
    if _EXPORT.value is not None:
      model, info = export.load_exported(_EXPORT.value)
    else:
      model, info = export.restore_model(_WORKDIR.value, step=_STEP.value, weights=_WEIGHTS.value)
  except errors.USER_ERRORS as e:  # the library names itself (export:, load_exported:); say it as generate's
    raise type(e)(f"generate.py: {_own_words(str(e))}") from e
  tokenizer = tokenizer_lib.get_tokenizer(info["tokenizer"]["name"])
  texts = decoding.generate_text(
      model,
      tokenizer,
      prompts,
      max_new_tokens=_MAX_NEW.value,
      seed=_SEED.value,
      temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value,
      top_p=_TOP_P.value,
  )
  print(f"# {info['model_kind']}, step {info['step']}, weights {info['weights']}", flush=True)
  for i, (prompt, text) in enumerate(zip(prompts, texts)):
    print(f"=== {i} ===\n{prompt}{text}", flush=True)


if __name__ == "__main__":
  cli.run(main)
