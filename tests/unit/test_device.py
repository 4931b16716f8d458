"""--device: auto picks what is visible; bad values fail at start-up with the value named."""

import pytest
import torch

from saeflow.device import resolve_device


def test_auto_is_cuda_exactly_when_a_gpu_is_visible() -> None:
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_explicit_devices_pass_through() -> None:
    assert resolve_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="'cuda:0'.*no CUDA device"):
        resolve_device("cuda:0")


def test_a_typo_names_the_value() -> None:
    with pytest.raises(ValueError, match="'cdua'"):
        resolve_device("cdua")
