import os
import sys

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
# The toy task used by trainer tests is importable as `toy_task`.
sys.path.insert(0, TESTS_DIR)
# Experiment drivers (experiments/, e.g. the fault drill) are importable from the repository root.
sys.path.insert(0, REPO_ROOT)

import pytest  # noqa: E402

# Parametrized cases moved to the slow set: the default run keeps at least one case of each test (the
# cheapest), the slow set (`python -m pytest -q -m slow`, run by CI) the others. Whole tests and files that
# are slow carry @pytest.mark.slow / pytestmark themselves.
SLOW_CASES = {
    "tests/tasks/test_lm_task.py::test_train_and_eval_py_agree[ema_lm-attention_history]",
    "tests/tasks/test_lm_task.py::test_train_and_eval_py_agree[gpt2-None]",
    "tests/tasks/test_probes_task.py::test_train_and_eval_py_agree[recall,gpt,tiny]",
    "tests/traces/test_scan.py::test_chunk_sizes_any_length[200-chunked]",
    "tests/traces/test_scan.py::test_chunk_sizes_any_length[200-unrolled]",
    "tests/traces/test_scan.py::test_chunk_sizes_any_length[32-unrolled]",
    "tests/traces/test_scan.py::test_check_grads[chunked]",
    "tests/traces/test_scan.py::test_check_grads[unrolled]",
    "tests/test_generate.py::test_greedy_is_the_full_forward_argmax[ema_hybrid]",
    "tests/test_generate.py::test_greedy_is_the_full_forward_argmax[ema_selective]",
    "tests/test_generate.py::test_padding_never_changes_a_continuation[ema_hybrid]",
    "tests/test_generate.py::test_padding_never_changes_a_continuation[ema_selective]",
    "tests/models/test_gpt_decode.py::test_prefill_then_decode_equals_token_by_token[ema_attention]",
    "tests/models/test_gpt_decode.py::test_prefill_then_decode_equals_token_by_token[ema_hybrid]",
    "tests/models/test_gpt_decode.py::test_prefill_then_decode_equals_token_by_token[ema_selective]",
    "tests/models/test_ema_lm.py::test_tiny_forward_backward_finite[bfloat16-linear]",
    "tests/models/test_ema_lm.py::test_tiny_forward_backward_finite[bfloat16-attention]",
    "tests/models/test_ema_lm.py::test_tiny_forward_backward_finite[bfloat16-attention_history]",
    "tests/models/test_ema_lm.py::test_tiny_forward_backward_finite[float32-attention]",
    "tests/models/test_ema_lm.py::test_tiny_forward_backward_finite[float32-attention_history]",
    "tests/models/test_ema_lm.py::test_adam_lowers_loss_on_repeated_batch[attention]",
    "tests/models/test_ema_lm.py::test_adam_lowers_loss_on_repeated_batch[attention_history]",
    "tests/models/test_transformer.py::test_tiny_forward_backward_finite[bfloat16]",
    "tests/models/test_gpt_decode.py::test_prefill_then_decode_equals_token_by_token[ema_fixed]",
    "tests/test_generate.py::test_greedy_is_the_full_forward_argmax[gpt]",
    "tests/models/test_hebbian.py::test_forward_only_features_are_causal[False]",
    "tests/traces/test_closed_form.py::test_check_grads[channel]",
    "tests/models/test_hybrid_decode.py::test_decoding_matches_full_forward[trace_kind=selective,predictor=attention,alphas=(0.5, 0.1, 0.02, 0.005)]",
    "tests/models/test_hybrid_decode.py::test_decoding_matches_full_forward[window=32,predictor=attention,tie_embeddings=False]",
    "tests/models/test_hybrid_decode.py::test_decoding_matches_full_forward[predictor=attention_history,trace_kind=selective,window=3]",
    "tests/traces/test_scan.py::test_chunk_sizes_any_length[8-unrolled]",
    "tests/traces/test_scan.py::test_chunk_sizes_any_length[3-unrolled]",
    "tests/traces/test_scan.py::test_chunk_sizes_any_length[32-chunked]",
    "tests/traces/test_scan.py::test_chunk_sizes_any_length[3-chunked]",
    "tests/models/test_ema_lm.py::test_documents_are_independent[segment_ids-attention_history]",
    "tests/models/test_ema_lm.py::test_documents_are_independent[resets-attention_history]",
    "tests/models/test_ema_lm.py::test_documents_are_independent[segment_ids-attention]",
}


def pytest_collection_modifyitems(config, items):
  root = os.path.dirname(TESTS_DIR)
  for item in items:
    nodeid = os.path.relpath(str(item.path), root) + "::" + item.name
    if nodeid in SLOW_CASES:
      item.add_marker(pytest.mark.slow)
