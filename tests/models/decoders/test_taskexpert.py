"""TaskExpert decoder: hand-computed memorial gating, memory, task subsets, gradients, padding, learning,
and the optional balancing loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtvision.errors import MTVisionError
from mtvision.models import create_model
from mtvision.models.decoders.base import MOE_BALANCE
from mtvision.models.decoders.invpt import DecoderStrideError
from mtvision.models.decoders.taskexpert import TaskExpertDecoder, to_grid
from mtvision.models.moe import MoEError
from tests.models.learning import adam_steps

TASKS3 = ("semseg", "depth", "normals")
BACKBONES = {
    "resnet": "test_resnet",
    "vit": {"name": "test_vit", "kwargs": {"img_size": 64, "dynamic_img_size": True}},
}
E = 3


def _model(tasks=TASKS3, backbone="resnet", seed=0, **options):
    torch.manual_seed(seed)
    options = {"num_experts": E, "channels": 8, "head_channels": 8, **options}
    spec = {t: (5 if t == "semseg" else None) for t in tasks}
    return create_model(backbone=BACKBONES[backbone], decoder="taskexpert", tasks=spec, decoder_options=options)


def _grid(dec, x):
    """The grid the memorial layers work on for images `x` (padded to the size divisor)."""
    d = dec.size_divisor
    return (-(-x.shape[-2] // d) * d // dec.feature_stride, -(-x.shape[-1] // d) * d // dec.feature_stride)


def _grid_features(dec, feats):
    h, w = feats[0].shape[-2:]
    grid = (h * dec.backbone.strides[0] // dec.feature_stride, w * dec.backbone.strides[0] // dec.feature_stride)
    return [to_grid(f, grid) for f in feats]


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_assembled_feature_is_the_gated_sum_of_experts_and_memory(backbone):
    model = _model(backbone=backbone).eval()
    dec = model.decoder
    seen = {}
    for t, head in dec.heads.items():
        head.register_forward_pre_hook(lambda _, args, t=t: seen.__setitem__(t, args[0]))
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        out = model(x)
        run = dec.memorial_pass(out.shared, _grid(dec, x), TASKS3)
        memory = {}
        for layer, xl in enumerate(_grid_features(dec, out.shared)):
            experts = dec.experts[layer](xl)  # N x E x C x H x W
            assert experts.shape[1:3] == (E, 8) and torch.all(experts >= 0)  # ReLU experts
            for t in TASKS3:
                conv = dec.gates[layer][t]
                inputs = xl if layer == 0 else torch.cat([xl, memory[t]], 1)
                logits = torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], inputs) + conv.bias.view(1, -1, 1, 1)
                g = torch.softmax(logits, dim=1)
                assert g.shape[1] == (E if layer == 0 else E + 1)
                torch.testing.assert_close(g.sum(1), torch.ones_like(g[:, 0]))  # a distribution per pixel
                assert torch.all(g > 0)
                expected = sum(g[:, e : e + 1] * experts[:, e] for e in range(E))
                if layer:
                    expected = expected + g[:, E : E + 1] * memory[t]  # the memory is one more expert
                torch.testing.assert_close(run.features[layer][t], expected, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(dec.gate_weights(layer, t, xl, memory.get(t)), g, atol=1e-6, rtol=1e-5)
                write = dec.writes[layer][t](expected)
                memory[t] = write if layer == 0 else memory[t] + write
    for t in TASKS3:  # the head reads the last memory
        torch.testing.assert_close(seen[t], memory[t], atol=1e-5, rtol=1e-5)


def test_the_memory_of_layer_one_changes_what_layer_two_assembles():
    model = _model().eval()
    dec = model.decoder
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        output = model(x)
        base, feats = output.predictions, output.shared
        before = dec.memorial_pass(feats, _grid(dec, x), TASKS3).features
        hook = dec.writes[0]["depth"].register_forward_hook(lambda *args: args[2] + 0.5)
        perturbed = model(x).predictions
        after = dec.memorial_pass(feats, _grid(dec, x), TASKS3).features
        hook.remove()
    torch.testing.assert_close(after[0]["depth"], before[0]["depth"])  # layer 1 itself is untouched
    assert (after[1]["depth"] - before[1]["depth"]).abs().max() > 1e-3  # layer 2 reads the memory
    assert (perturbed["depth"] - base["depth"]).abs().max() > 1e-4
    for t in ("semseg", "normals"):  # memories are per task
        for layer in range(dec.num_layers):
            torch.testing.assert_close(after[layer][t], before[layer][t])
        torch.testing.assert_close(perturbed[t], base[t])
    # the memory is also an input of the memorial gate
    xl = _grid_features(dec, feats)[1]
    m = torch.randn(2, 8, *xl.shape[-2:])
    with torch.no_grad():
        assert not torch.allclose(dec.gate_weights(1, "depth", xl, m), dec.gate_weights(1, "depth", xl, m + 1.0))


def test_task_order_does_not_matter():
    model = _model().eval()
    other = _model(tasks=("normals", "semseg", "depth"), seed=1).eval()
    other.load_state_dict(model.state_dict())  # parameters are keyed by task name
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        a = model(x).predictions
        b = other(x).predictions
        c = model(x, tasks=["normals", "depth", "semseg"]).predictions
    for t in TASKS3:
        torch.testing.assert_close(a[t], b[t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a[t], c[t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_single_task_model_trains_a_step(backbone):
    model = _model(tasks=("depth",), backbone=backbone).train()
    output = model(torch.randn(2, 3, 32, 48))
    out = output.predictions
    assert list(out) == ["depth"] and out["depth"].shape == (2, 1, 32, 48)
    out["depth"].square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert {k.split("/")[2] for k in output.stats} == {"depth"}


def test_subset_forward_matches_and_runs_only_the_subset():
    model = _model().eval()
    dec = model.decoder
    calls = {t: 0 for t in TASKS3}
    for t, gate in dec.gates[0].items():
        gate.register_forward_hook(lambda *_, t=t: calls.__setitem__(t, calls[t] + 1))
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        full = model(x).predictions
        sub = model(x, tasks=["normals", "semseg"]).predictions
    assert list(sub) == ["normals", "semseg"]
    assert calls == {"semseg": 2, "depth": 1, "normals": 2}
    for t in sub:
        torch.testing.assert_close(sub[t], full[t], atol=1e-5, rtol=1e-5)


def test_every_task_loss_reaches_every_shared_tensor_and_only_its_own_parameters():
    model = _model().train()
    output = model(torch.randn(2, 3, 32, 48))
    out, rep = output.predictions, output.shared
    assert len(rep) == 4 and all(r.requires_grad for r in rep)
    for t in TASKS3:
        grads = torch.autograd.grad(out[t].square().mean(), rep, retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads)
    dec = model.decoder
    own = {
        id(p)
        for layer in range(dec.num_layers)
        for m in (dec.gates[layer]["depth"], dec.writes[layer]["depth"])
        for p in m.parameters()
    } | {id(p) for p in dec.heads["depth"].parameters()}
    assert {id(p) for p in model.task_parameters("depth")} == own
    shared = {id(p) for p in model.shared_parameters()}
    assert {id(p) for p in dec.experts.parameters()} <= shared and {id(p) for p in dec.backbone.parameters()} <= shared
    assert not own & shared

    model.zero_grad()
    (out["semseg"].square().mean() + out["normals"].square().mean()).backward(retain_graph=True)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.task_parameters("depth"))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.task_parameters("semseg"))
    model.zero_grad()
    out["depth"].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.task_parameters("depth"))


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_odd_sizes_are_padded_and_cropped(backbone):
    model = _model(backbone=backbone).eval()
    d = model.decoder.size_divisor
    assert d == {"resnet": 32, "vit": 16}[backbone]
    x = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        out = model(x).predictions
        padded = model(F.pad(x, (0, -47 % d, 0, -33 % d))).predictions  # what the decoder sees
    for t in TASKS3:
        assert out[t].shape[-2:] == (33, 47)
        torch.testing.assert_close(out[t], padded[t][..., :33, :47], atol=1e-5, rtol=1e-5)


def test_head_stride_upsamples_the_memory_before_the_heads():
    model = _model(head_stride=4).eval()
    dec = model.decoder
    seen = {}
    dec.heads["depth"].register_forward_pre_hook(lambda _, args: seen.__setitem__("x", args[0]))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 48))
    assert dec.feature_stride == 8 and seen["x"].shape[-2:] == (8, 16)  # 32 x 64 after padding to 32


def test_strides_that_do_not_fit_are_clear_errors():
    for options, match in (
        ({"feature_stride": 64}, "outside the backbone's strides"),
        ({"feature_stride": 2}, "outside the backbone's strides"),
        ({"feature_stride": 12}, "power-of-two"),
        ({"feature_stride": 8, "head_stride": 16}, "coarser"),
    ):
        with pytest.raises(DecoderStrideError, match=match) as info:
            _model(**options)
        assert isinstance(info.value, MTVisionError)
    with pytest.raises(DecoderStrideError):
        _model(backbone="vit", feature_stride=8)  # a plain ViT has only stride 16


def test_expert_usage_is_each_tasks_gate_mass_per_layer():
    model = _model().eval()
    dec = model.decoder
    x = torch.randn(3, 3, 32, 48)
    with torch.no_grad():
        output = model(x)
        usage = output.stats
        assert set(usage) == {f"experts/layer{layer}/{t}" for layer in range(4) for t in TASKS3}
        for key, v in usage.items():
            assert v.shape == ((E,) if key.startswith("experts/layer0/") else (E + 1,))
            assert v.sum().item() == pytest.approx(3.0)  # one unit of gate mass per image
        g = dec.gate_weights(0, "depth", _grid_features(dec, output.shared)[0], None)
        torch.testing.assert_close(usage["experts/layer0/depth"], g.mean(dim=(2, 3)).sum(0), atol=1e-6, rtol=1e-6)
        only = model(x, tasks=["depth"]).stats
    torch.testing.assert_close(only["experts/layer2/depth"], usage["experts/layer2/depth"], atol=1e-6, rtol=1e-6)
    assert "experts/layer2/semseg" not in only


def test_taskexpert_learns(synthetic_batch):
    torch.manual_seed(0)
    spec = {"semseg": synthetic_batch["num_classes"], "depth": None, "normals": None}
    options = {"num_experts": E, "channels": 16, "head_channels": 8}
    model = create_model(backbone="test_resnet", decoder="taskexpert", tasks=spec, decoder_options=options)
    assert isinstance(model.decoder, TaskExpertDecoder)
    model.train()
    images = synthetic_batch["image"][:4]
    batch = {t: synthetic_batch[t][:4] for t in TASKS3}

    def total():
        out = model(images)
        assert out.regularizers == {} and out.deep_supervision == {}
        return sum(model.tasks[t].loss(out.predictions[t], batch[t]) for t in TASKS3)

    first, last = adam_steps(model, total, steps=5)
    assert last < first * 0.95


def _gate_inputs(dec):
    """Records the input of each gate's first call per forward, keyed (layer, task)."""
    seen = {}
    for layer, gates in enumerate(dec.gates):
        for t, gate in gates.items():
            gate.register_forward_pre_hook(lambda _, args, k=(layer, t): seen.setdefault(k, args[0].detach()))
    return seen


def test_balance_loss_is_the_weighted_sum_of_cv2_of_the_experts_importance():
    model = _model(balance_weight=0.5).train()
    dec = model.decoder
    seen = _gate_inputs(dec)
    out = model(torch.randn(2, 3, 32, 48))
    expected, with_memory = 0.0, 0.0
    with torch.no_grad():
        for (layer, t), inputs in seen.items():
            conv = dec.gates[layer][t]
            logits = torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], inputs) + conv.bias.view(1, -1, 1, 1)
            mass = torch.softmax(logits, dim=1).mean(dim=(0, 2, 3))
            imp = mass[:E]  # the memory slot (layers >= 1) is not balanced
            expected = expected + 0.5 * imp.var(unbiased=False) / imp.mean() ** 2
            with_memory = with_memory + 0.5 * mass.var(unbiased=False) / mass.mean() ** 2
    assert len(seen) == 4 * len(TASKS3)  # summed over every layer and task
    torch.testing.assert_close(out.regularizers[MOE_BALANCE].detach(), expected, atol=1e-6, rtol=1e-4)
    assert expected > 1e-4 and abs(float(with_memory - expected)) > 1e-3 * float(expected)  # the test can tell


def test_balance_loss_is_absent_by_default_in_eval_and_with_one_expert():
    x = torch.randn(2, 3, 32, 48)
    assert _model().train()(x).regularizers == {}  # the paper: task losses only
    assert _model(balance_weight=0.1).eval()(x).regularizers == {}
    assert _model(balance_weight=0.1, num_experts=1).train()(x).regularizers == {}
    sub = _model(balance_weight=0.1).train()(x, tasks=["depth"])
    assert set(sub.predictions) == {"depth"} and set(sub.regularizers) == {MOE_BALANCE}
    assert sub.regularizers[MOE_BALANCE] > 0


def test_balance_loss_leaves_the_predictions_unchanged():
    plain, balanced = _model().train(), _model(balance_weight=1.0).train()
    balanced.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 48)
    a, b = plain(x).predictions, balanced(x).predictions
    for t in TASKS3:
        torch.testing.assert_close(a[t], b[t])


def test_balance_loss_gradient_reaches_the_gates_only():
    model = _model(balance_weight=0.5).train()
    dec = model.decoder
    out = model(torch.randn(2, 3, 32, 48), tasks=["depth", "normals"])
    out.regularizers[MOE_BALANCE].backward()
    gates = {id(p) for layer in dec.gates for t in ("depth", "normals") for p in layer[t].parameters()}
    for name, p in model.named_parameters():
        if id(p) in gates:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:  # heads, memory writes, experts, backbone, and the semseg gates
            assert p.grad is None or p.grad.abs().sum() == 0, name


def test_balance_loss_alone_evens_the_gates():
    model = _model(balance_weight=1.0).train()
    x = torch.randn(2, 3, 32, 48)
    first, last = adam_steps(model, lambda: model(x).regularizers[MOE_BALANCE], steps=5)
    assert last < first * 0.5


def test_negative_balance_weight_is_a_clear_error():
    with pytest.raises(MoEError, match="balance_weight must be >= 0") as info:
        _model(balance_weight=-0.1)
    assert isinstance(info.value, MTVisionError)


def test_unknown_option_names_the_closest():
    with pytest.raises(Exception, match="did you mean 'decoder_options.num_experts'"):
        _model(num_expert=4)
