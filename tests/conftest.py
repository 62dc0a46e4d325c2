import os

# Idle OpenMP threads sleep instead of spinning: keeps tests fast when the cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from bpfree.config import RunConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _two_threads():
    # Same thread count everywhere: CPU kernels are deterministic for a fixed count.
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits():
    from bpfree.data import load_data
    return load_data("digits")


def quick_config(**overrides) -> RunConfig:
    """A run that takes about a second on digits."""
    values = dict(method="backprop", model="mlp", data="digits", epochs=2, batch_size=64, lr=2e-3,
                  model_options={"widths": (64, 64, 64, 64)})
    values.update(overrides)
    return RunConfig(**values)
