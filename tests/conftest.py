"""Shared test settings.

REPULSOR_TEST_THREADS limits torch's intra-op threads, so that several test runs on a
two-core machine do not slow each other down (two competing torch processes can be 12x
slower). CI leaves it unset and uses every core.
"""

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("REPULSOR_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["REPULSOR_TEST_THREADS"]))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The offline data sets beside the checkout; tests that need them skip without them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data at {SHARED_DATA}")
    return SHARED_DATA
