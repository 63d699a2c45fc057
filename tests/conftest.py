import sys
from pathlib import Path

import pytest
import torch

# Tests import small helpers (fake_model, fast_runs) from this folder; conftest itself is
# pytest's (fixtures only), never imported by a test.
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A random 1-block toy model with the digits vocabulary, saved like a pretrained base
    (training tests need a model, not a good one: no pretraining)."""
    from flowdppo.models.toy import ToyFlowModel
    from flowdppo.worlds.digits import BASE_RECIPE, vocabulary

    directory = tmp_path_factory.mktemp("tiny_base")
    model = ToyFlowModel.create(vocabulary(BASE_RECIPE["templates"]), num_layers=1, num_heads=2,
                                head_dim=16, text_dim=32, max_length=8, seed=0)
    model.save_pretrained(directory)
    return directory
