import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def avdigits_val():
    from data.avdigits import AVDigits

    return AVDigits("val", max_samples=40)
