"""Under DDP (2 gloo processes x batch 2) every method at every level gives the gradients of one process
with batch 4: features through one T x T all-reduce, params through averaged per-task gradients.
Stateful methods take two steps (two batches), so that their state (reused weights, tracked
gradients, sampled tasks) is compared too."""

from __future__ import annotations

import pytest
import torch

from mtvision.models.registry import create_model
from mtvision.optim.factory import make_calibrator
from mtvision.optim.gradients import average_gradients
from tests.gloo import run_on_ranks

TASKS = {"semseg": 3, "depth": None, "normals": None}
GRAMIAN = ("ew", "mgda", "pcgrad", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad", "gradvac", "graddrop",
           "fairgrad", "sdmgrad", "ntkmtl")
# (label, method, level, options, steps)
CASES = [(m, m, level, {}, 1) for level in ("features", "params") for m in GRAMIAN]
CASES += [(m, m, "fuller", {}, 1) for m in ("mgda", "ew")]
CASES += [("nash_every_2", "nash_mtl", level, {"update_weights_every": 2}, 2) for level in ("features", "params")]
# SDMGrad's inner solver at the release's lr = 10 carries w across steps and amplifies the float32
# rounding of the all-reduced Gramian (~1e-8) into ~1e-3 of w by the second step (measured), for any
# implementation; the sampled variant's DDP exactness (same draws, same state) is checked at lr = 1
CASES += [("sdmgrad_os", "sdmgrad", level, {"sample_tasks": 2, "lr": 1.0}, 2) for level in ("features", "params")]
CASES += [(m, m, "params", {}, 2) for m in ("db_mtl", "moco", "excess_mtl")]


def _model():
    torch.manual_seed(0)
    # group norm and a LayerNorm backbone: no batch statistics, so the batch split cannot matter
    return create_model(
        backbone="test_convnext", decoder="hps", tasks=TASKS,
        decoder_options={"neck_channels": 16, "head_channels": 8, "norm": "gn"},
    )


def _batch(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 32, 32, generator=g)
    targets = {  # every pixel valid: pixel-averaged losses then average equally over samples
        "semseg": torch.randint(0, 3, (4, 32, 32), generator=g),
        "depth": torch.rand(4, 1, 32, 32, generator=g) + 1,
        "normals": torch.nn.functional.normalize(torch.randn(4, 3, 32, 32, generator=g), dim=1),
    }
    return images, targets


def _gradients(rows: slice) -> dict[str, torch.Tensor]:
    """{f'{method}/{level}/{param}': grad} for every case, on the samples `rows` of the batch."""
    model = _model()
    batches = [_batch(5), _batch(6)]
    out: dict[str, torch.Tensor] = {}
    for label, method, level, options, steps in CASES:
        calibrator = make_calibrator(model, method, level, **options)
        for images, targets in batches[:steps]:
            model.zero_grad(set_to_none=True)
            pred = model(images[rows])
            losses = {t: model.tasks[t].loss(pred.predictions[t], targets[t][rows]) for t in TASKS}
            calibrator.backward(losses, pred.shared, pred.branches)
            done = {id(p) for p in calibrator.synced_parameters}
            average_gradients([p for p in model.parameters() if id(p) not in done])
        for name, p in model.named_parameters():
            if p.grad is not None:
                out[f"{label}/{level}/{name}"] = p.grad.detach().contiguous().clone()
    return out


def test_two_processes_of_batch_2_equal_one_process_of_batch_4(tmp_path):
    want = _gradients(slice(0, 4))
    got, other = run_on_ranks(lambda rank: _gradients(slice(2 * rank, 2 * rank + 2)), 2, tmp_path)
    assert other.keys() == got.keys() and all(torch.equal(other[k], got[k]) for k in got)  # ranks agree
    assert got.keys() == want.keys()
    for label, _, level, _, _ in CASES:
        keys = [k for k in want if k.startswith(f"{label}/{level}/")]
        assert keys, (label, level)
        for key in keys:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    # the test has teeth: the methods really differ from equal weighting
    first = next(k for k in want if k.startswith("ew/features/decoder.backbone."))
    for method in ("mgda", "graddrop", "fairgrad", "sdmgrad", "ntkmtl"):
        assert not torch.allclose(want[first.replace("ew/", f"{method}/", 1)], want[first])
    params = first.replace("ew/features/", "ew/params/", 1)
    for label in ("nash_every_2", "sdmgrad_os", "db_mtl", "moco", "excess_mtl"):  # second-step gradients differ from EW's first
        assert not torch.allclose(want[params.replace("ew/", f"{label}/", 1)], want[params])


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
