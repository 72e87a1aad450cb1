import os
import sys

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
# The toy task used by trainer tests is importable as `toy_task`.
sys.path.insert(0, TESTS_DIR)
# Experiment drivers (experiments/, e.g. the fault drill) are importable from the repository root.
sys.path.insert(0, REPO_ROOT)
