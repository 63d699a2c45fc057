import sys
from pathlib import Path

import pytest
import torch

# Tests import small helpers (fake_model) from this folder.
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


def tiny_overrides(base: Path, iterations: int = 2) -> list[str]:
    """Overrides that make any toy recipe a seconds-long run on ``base``."""
    return [f"model.pretrained={base}", f"train.num_iterations={iterations}",
            "sampling.num_steps=4", "sampling.sde_steps.count=2", "sampling.sde_steps.range=[0.0, 0.75]",
            "sampling.group_size=3", "sampling.num_groups=2", "sampling.eval_num_steps=3",
            "eval.max_prompts=2", "eval.samples_per_prompt=2", "eval.every=1",
            "checkpoint.every=1", "logging.progress_bar=false", "optim.lr=0.05", "device=cpu"]
