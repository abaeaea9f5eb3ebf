"""benchmarks/gpu.py builds full-size random models from the configs in benchmarks/gpu_configs/.

They must keep loading into the installed diffusers/transformers classes and keep giving the
published parameter counts (a renamed config key would silently build another model); the
check builds on the `meta` device, so no memory is allocated and no weights are initialised.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from gpu_models import CONFIG_FILES, load_spec, meta_parameter_counts  # noqa: E402


@pytest.mark.parametrize("name", list(CONFIG_FILES))
def test_full_size_configs_give_the_published_parameter_counts(name):
    spec = load_spec(name)
    assert meta_parameter_counts(spec) == spec.known_parameters


@pytest.mark.parametrize("name", list(CONFIG_FILES))
def test_smoke_configs_shrink_every_network_below_ten_million_parameters(name):
    counts = meta_parameter_counts(load_spec(name, smoke=True))
    assert set(counts) == set(load_spec(name).known_parameters)
    assert all(count < 10_000_000 for count in counts.values()), counts
