"""The mutation runner (tests/mutation/run_mutations.py, not run in CI for its ~15 minutes) still fits the code: each
mutant's snippet occurs exactly once in its file and the tests it names exist, so a refactor cannot leave a mutant
that stops the runner midway or tests nothing."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "mutation"))

import run_mutations  # noqa: E402


def test_every_mutant_fits_the_current_code():
    assert run_mutations.stale_mutants() == []


def test_a_snippet_that_moved_and_a_renamed_test_are_both_named():
    gone = run_mutations.MUTANTS[0]._replace(old="no such line")
    renamed = run_mutations.MUTANTS[0]._replace(tests=("tests/test_train_loop.py::test_renamed[1]",))
    assert run_mutations.stale_mutants(mutants=(gone, renamed)) == [
        f"Mutant 'resume': the snippet occurs 0 times in {gone.path}, not once.",
        "Mutant 'resume': tests/test_train_loop.py defines no test test_renamed.",
    ]
