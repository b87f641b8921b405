"""Small helpers of mlpfuse.runtime."""

from __future__ import annotations

import threading

import pytest

from mlpfuse.runtime import InBackground


def test_in_background_runs_in_another_thread_and_returns_its_value():
    main = threading.get_ident()
    job = InBackground(lambda: threading.get_ident())
    assert job.result() != main


def test_in_background_reraises_the_functions_error():
    def fails():
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        InBackground(fails).result()
