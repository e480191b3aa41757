"""The examples in the core modules' docstrings run, so they cannot rot."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["keepbest.manifest", "keepbest.policy", "keepbest.store", "keepbest.store.local", "keepbest.codec",
           "keepbest.manager", "keepbest.writer", "keepbest.evaluation", "keepbest.follower", "keepbest.series",
           "keepbest.history", "keepbest.payload", "keepbest.checkpoint", "keepbest.discovery", "keepbest.matching",
           "keepbest.rng", "keepbest.publishing", "keepbest.inspection", "keepbest.comparison", "keepbest.exporting"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
