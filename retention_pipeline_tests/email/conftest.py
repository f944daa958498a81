from __future__ import annotations

from collections.abc import Iterator

import pytest

from retention_pipeline_tests.email.fake_resend import FakeClock, FakeResend, serve_fake_resend


@pytest.fixture
def fake_resend() -> Iterator[FakeResend]:
    """A running fake Resend API with the SDK pointed at it for the duration of the test."""
    with serve_fake_resend() as fake:
        yield fake


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()
