"""`model_to`: channels-last conv weights change the memory layout, not the model's values."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, tiny_overrides

from sadpipe.data.dataset import labeled_source
from sadpipe.engine.device import model_to
from sadpipe.models import load_detector
from sadpipe.settings import load_settings
from sadpipe.tasks.supervised import build_model_for, train_detector


def _student(toy_root):
    cfg = load_settings(REPO / "pipelines" / "toy.toml", tiny_overrides(toy_root))
    torch.manual_seed(0)
    return cfg, build_model_for(cfg, "student", labeled_source(cfg.data, "train").categories)


def test_channels_last_weights_and_same_outputs_and_gradients(toy_root):
    _, model = _student(toy_root)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    reference = [t.detach().clone() for t in model(x)]
    model.zero_grad()
    sum(t.sum() for t in model(x)).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = model_to(model, torch.device("cpu"), channels_last=True)
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs
                         if p.shape[2:] != (1, 1) and p.shape[1] > 1)
    outputs = model(x)
    # the second implementation is the contiguous model itself: float32, summation order only
    for got, want in zip(outputs, reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    model.zero_grad()
    sum(t.sum() for t in outputs).backward()
    # gradients summed over every output entry are large; compare each as a whole (relative norm).
    # Measured 2e-4 on the stem (float32 sums over 2 x 128 x 128 positions in another order)
    for n, p in model.named_parameters():
        if n in ref_grads:
            err = float((p.grad - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-12))
            assert err < 1e-3, (n, err)

    back = model_to(model, torch.device("cpu"), channels_last=False)
    assert all(p.is_contiguous() for p in back.parameters())


@pytest.mark.parametrize("channels_last", [True, False])
def test_training_in_either_layout_saves_a_checkpoint_the_other_loads(toy_root, tmp_path, channels_last):
    cfg = load_settings(REPO / "pipelines" / "toy.toml",
                        tiny_overrides(toy_root) + ["teacher.train.max_steps=2",
                                                    f"teacher.train.channels_last={str(channels_last).lower()}"])
    train_detector(cfg, tmp_path / "run", device="cpu", evaluate=False)
    model = load_detector(tmp_path / "run" / "final.pt")
    state = torch.load(tmp_path / "run" / "final.pt", map_location="cpu", weights_only=True)["model"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)
    x = torch.zeros(1, 3, 128, 128)
    a = model(x)[0]
    b = model_to(model, torch.device("cpu"), channels_last=not channels_last)(x)[0]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
