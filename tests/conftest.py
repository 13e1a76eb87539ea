"""Shared test fixtures: the `gpu` marker, fresh seeds, and the device parametrisation."""
import os
import random

# Tests never reach the Hugging Face hub (transformers is used offline, for parity only).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

import nemokernels  # noqa: F401  (registers the ops)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    dev = torch.cuda.get_device_name() if HAS_CUDA else "none"
    return f"nemokernels {nemokernels.__version__}, torch {torch.__version__}, CUDA device: {dev}"


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A new seed per test (NK_TEST_SEED pins it); printed so a failure can be replayed."""
    seed = int(os.environ.get("NK_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    random.seed(seed)
    print(f"[seed] NK_TEST_SEED={seed} ({request.node.nodeid})")
    return seed


# Parametrise a test over devices: `@pytest.mark.parametrize("device", DEVICES)`.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def sanitizer():
    """True under compute-sanitizer (scripts/gpu_check.sh): tests shrink their sizes."""
    return os.environ.get("NEMOKERNELS_SANITIZER") == "1"
