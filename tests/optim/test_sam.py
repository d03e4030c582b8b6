"""The sharpness-aware multi-task step against hand-assembled per-task SAM gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from mtvision.optim.aggregators import make_aggregator, min_norm_weights
from mtvision.optim.calibrator import CalibrationError
from mtvision.optim.factory import make_calibrator
from mtvision.optim.sam import SharpnessAwareCalibrator
from tests.optim.test_calibrator import TASKS, losses_of, tiny

RHO = 0.05


def recompute_for(model, images, targets):
    def recompute(task: str) -> torch.Tensor:
        out = model(images, tasks=[task]).predictions
        return model.tasks[task].loss(out[task], targets[task])

    return recompute


def per_task_sam(model, images, targets):
    """{task: (plain gradient, SAM gradient)} over (shared, own head), flattened, by hand."""
    shared_names = {n for n, p in model.named_parameters() if any(p is q for q in model.shared_parameters())}
    out = {}
    for t in TASKS:
        names = sorted(shared_names) + [n for n, p in model.named_parameters() if any(p is q for q in model.task_parameters(t))]
        work = copy.deepcopy(model)
        params = dict(work.named_parameters())
        loss = losses_of(work, images, targets)[t]
        g = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        g = torch.cat([(torch.zeros_like(params[n]) if x is None else x).reshape(-1) for n, x in zip(names, g)])
        offset = 0
        with torch.no_grad():
            for n in names:
                k = params[n].numel()
                params[n].add_((RHO / g.norm()) * g[offset : offset + k].view_as(params[n]))
                offset += k
        out_t = work(images, tasks=[t]).predictions
        s = torch.autograd.grad(work.tasks[t].loss(out_t[t], targets[t]), [params[n] for n in names], allow_unused=True)
        s = torch.cat([(torch.zeros_like(params[n]) if x is None else x).reshape(-1) for n, x in zip(names, s)])
        out[t] = (names, g, s)
    return out


def test_equal_weights_give_the_sum_of_the_task_sam_gradients_and_heads_their_own():
    model, images, targets = tiny()
    want = per_task_sam(model, images, targets)
    model.zero_grad(set_to_none=True)
    losses = losses_of(model, images, targets)  # this forward updates the BatchNorm statistics, legitimately
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    calibrator = make_calibrator(model, "ew", "params", sam_rho=RHO)
    assert isinstance(calibrator, SharpnessAwareCalibrator)
    stats = calibrator.backward(losses, recompute=recompute_for(model, images, targets))
    assert stats.finite and stats.weights == {t: 1.0 for t in TASKS}
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    n_shared = sum(p.numel() for p in model.shared_parameters())
    # shared: Σ_t [g_t + (g_t^SAM − g_t)] = Σ_t g_t^SAM
    names = want["semseg"][0][: len(list(model.shared_parameters()))]
    expected_shared = sum(s[:n_shared] for _, _, s in want.values())
    got_shared = torch.cat([grads[n].reshape(-1) for n in names])
    # at this tiny BatchNorm model a 1e-7 relative change of ρ moves the normals' SAM gradient by
    # up to 1e-4 of its largest entry (measured): float32 rounding of ε alone reaches that size
    atol = 1e-4 * float(expected_shared.abs().max())
    torch.testing.assert_close(got_shared, expected_shared, rtol=1e-3, atol=atol)
    for all_names, _, s in want.values():  # each head: its own SAM gradient
        head = all_names[len(names):]
        torch.testing.assert_close(torch.cat([grads[n].reshape(-1) for n in head]), s[n_shared:], rtol=1e-3, atol=1e-4 * float(s.abs().max()))
    # and the SAM gradient is not the plain one (the test has teeth)
    plain_shared = sum(g[:n_shared] for _, g, _ in want.values())
    assert not torch.allclose(expected_shared, plain_shared, rtol=1e-3, atol=1e-6)
    # the parameters and the BatchNorm statistics are exactly as before
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    for n, b in model.named_buffers():  # the perturbed forwards leave no trace in them
        assert torch.equal(b, buffers[n]), n


def test_loss_and_flatness_parts_get_their_own_mgda_weights():
    model, images, targets = tiny()
    want = per_task_sam(model, images, targets)
    n_shared = sum(p.numel() for p in model.shared_parameters())
    g = torch.stack([v[1][:n_shared] for v in want.values()]).double()
    h = torch.stack([v[2][:n_shared] - v[1][:n_shared] for v in want.values()]).double()
    w_loss = torch.as_tensor(min_norm_weights((g @ g.T).numpy()))
    w_flat = torch.as_tensor(min_norm_weights((h @ h.T).numpy()))
    assert not torch.allclose(w_loss, w_flat, atol=1e-3)
    model.zero_grad(set_to_none=True)
    stats = make_calibrator(model, "mgda", "params", sam_rho=RHO).backward(
        losses_of(model, images, targets), recompute=recompute_for(model, images, targets)
    )
    assert [stats.weights[t] for t in TASKS] == pytest.approx(w_loss.tolist(), rel=1e-4, abs=1e-6)
    names = want["semseg"][0][: len(list(model.shared_parameters()))]
    got = torch.cat([dict(model.named_parameters())[n].grad.reshape(-1) for n in names]).double()
    torch.testing.assert_close(got, w_loss @ g + w_flat @ h, rtol=1e-3, atol=1e-6)


def test_bad_input():
    model, images, targets = tiny()
    with pytest.raises(CalibrationError, match="params level"):
        make_calibrator(model, "mgda", "features", sam_rho=RHO)
    with pytest.raises(CalibrationError, match="not graddrop"):
        make_calibrator(model, "graddrop", "params", sam_rho=RHO)
    with pytest.raises(CalibrationError, match="rho must be > 0"):
        SharpnessAwareCalibrator(model, make_aggregator("ew"), rho=0.0)
    with pytest.raises(CalibrationError, match="needs recompute"):
        make_calibrator(model, "ew", "params", sam_rho=RHO).backward(losses_of(model, images, targets))
