from __future__ import annotations

import pytest

from retention_pipeline_tests.email.fake_resend import FakeClock


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()
