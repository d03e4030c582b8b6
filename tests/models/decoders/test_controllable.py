"""The controllable decoder: sub-networks are narrow networks with sliced weights, sandwich-rule
training with CI-KD, and no width left on the modules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mtvision.models import create_model
from mtvision.models.decoders.controllable import (
    CI_KD,
    ENCODER,
    ControllableDecoder,
    WidthConfig,
    ci_kd_loss,
    decoder_key,
    recalibrate_all,
    recalibrate_batch_norms,
    use_config,
)
from mtvision.models.slimmable import SlimConv2d, SlimmableError, SwitchableBatchNorm2d, slim_channels

TASKS = {"semseg": 5, "depth": None}
OPTIONS = {"neck_channels": 16, "head_channels": 8}


def _model(**options):
    torch.manual_seed(0)
    model = create_model(backbone="test_resnet", decoder="controllable", tasks=TASKS, decoder_options={**OPTIONS, **options})
    with torch.no_grad():  # non-trivial batch-norm statistics and affine parameters in every copy
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _narrow_copy(decoder: ControllableDecoder, config: WidthConfig) -> ControllableDecoder:
    """An explicitly built narrow network: every slimmable layer replaced by a plain Conv2d /
    BatchNorm2d of the configuration's channel counts, holding the sliced weights."""
    net = copy.deepcopy(decoder)
    widths = config.widths()
    for name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            path = f"{name}.{child_name}"
            if isinstance(child, SlimConv2d):
                own = widths[child.key]
                reads_encoder = child.key == ENCODER or ".lateral." in path
                c_in = 3 if child.in_channels == 3 else slim_channels(child.in_channels, widths[ENCODER] if reads_encoder else own)
                c_out = slim_channels(child.out_channels, own) if child.slim_out else child.out_channels
                conv = nn.Conv2d(c_in, c_out, child.kernel_size, child.stride, child.padding, child.dilation,
                                 bias=child.bias is not None)
                conv.weight.data = child.weight.data[:c_out, :c_in].clone()
                if child.bias is not None:
                    conv.bias.data = child.bias.data[:c_out].clone()
                setattr(module, child_name, conv)
            elif isinstance(child, SwitchableBatchNorm2d):
                with use_config(config):
                    setattr(module, child_name, copy.deepcopy(child.active()))
    return net


@pytest.mark.parametrize("config", [
    WidthConfig(0.5, {"semseg": 0.75, "depth": 0.25}),
    WidthConfig(0.25, {"semseg": 0.25, "depth": 1.0}),
    WidthConfig(1.0, {"semseg": 0.5, "depth": 0.5}),
])
def test_sub_network_equals_the_narrow_network_with_sliced_weights(config):
    model = _model().eval()
    narrow = _narrow_copy(model.decoder, config).eval()
    assert not any(isinstance(m, (SlimConv2d, SwitchableBatchNorm2d)) for m in narrow.modules())
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        slim = model.decoder.forward_config(x, ["semseg", "depth"], config)
        plain = narrow.forward(x, ["semseg", "depth"])
    expected_channels = [slim_channels(c, config.encoder) for c in model.decoder.backbone.channels]
    assert [f.shape[1] for f in plain.shared] == expected_channels
    for t in ("semseg", "depth"):
        torch.testing.assert_close(slim.predictions[t], plain.predictions[t], rtol=1e-5, atol=1e-5)
        assert slim.predictions[t].shape[1] == model.tasks[t].out_channels


def test_widest_sub_network_is_the_default_and_no_width_is_left_on_the_modules():
    model = _model().eval()
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        default = model(x).predictions
        widest = model.decoder.forward_config(x, list(TASKS), model.decoder.widest()).predictions
        with use_config(WidthConfig(0.25, {"semseg": 0.25, "depth": 0.25})):
            narrow = model(x).predictions
        after = model(x).predictions
    for t in TASKS:
        torch.testing.assert_close(default[t], after[t], rtol=0, atol=0)
        assert default[t].shape == narrow[t].shape and not torch.allclose(narrow[t], after[t])
    torch.testing.assert_close(default["semseg"], torch.nn.functional.interpolate(
        widest["semseg"], size=(32, 40), mode="bilinear", align_corners=False))


def test_task_subset_runs_only_that_decoder():
    model = _model().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 40), tasks=["depth"])
    assert list(out.predictions) == ["depth"]


def test_ci_kd_loss_form():
    teacher = [torch.arange(24.0).view(1, 4, 2, 3), torch.ones(1, 2, 1, 1)]
    # the student equal to the teacher's first channels: zero
    assert float(ci_kd_loss([teacher[0][:, :2], teacher[1][:, :1]], teacher)) == 0.0
    assert float(ci_kd_loss(teacher, teacher)) == 0.0
    # by hand: level 0 differs by 1 everywhere on its 2 channels (mean 1), level 1 by 3 (mean 9)
    student = [teacher[0][:, :2] + 1.0, torch.full((1, 1, 1, 1), 4.0)]
    assert float(ci_kd_loss(student, teacher)) == pytest.approx((1.0 + 9.0) / 2)
    # the teacher is not taught: no gradient reaches it
    t = [x.clone().requires_grad_(True) for x in teacher]
    s = [x.clone().requires_grad_(True) for x in student]
    ci_kd_loss(s, t).backward()
    assert all(x.grad is None for x in t) and all(x.grad is not None for x in s)
    with pytest.raises(ValueError, match="does not fit"):
        ci_kd_loss([torch.zeros(1, 5, 2, 3)], [teacher[0]])


def test_training_forward_is_the_sandwich_rule_with_ci_kd():
    model = _model(num_random=2, kd_weight=0.5).train()
    decoder = model.decoder
    x = torch.randn(2, 3, 32, 40)
    torch.manual_seed(7)
    configs = decoder.sample_configs(list(TASKS))
    assert configs[0] == decoder.widest() and configs[1] == decoder.narrowest() and len(configs) == 4
    torch.manual_seed(7)
    out = model(x)
    assert set(out.regularizers) == {CI_KD}
    assert all(len(out.deep_supervision[t]) == 3 for t in TASKS)
    assert out.shared == [] and out.branches == []
    # reference: each configuration run on its own (train mode: batch statistics, same outputs)
    with torch.no_grad():
        teacher = decoder.forward_config(x, list(TASKS), configs[0])
        expected_kd = 0.0
        for i, config in enumerate(configs[1:]):
            sub = decoder.forward_config(x, list(TASKS), config)
            for t in TASKS:
                torch.testing.assert_close(out.deep_supervision[t][i], sub.predictions[t], rtol=1e-5, atol=1e-5)
            if config.encoder != 1.0:
                expected_kd += float(ci_kd_loss(sub.shared, teacher.shared))
    assert float(out.regularizers[CI_KD].detach()) == pytest.approx(0.5 * expected_kd, rel=1e-5)
    assert expected_kd > 0
    for t in TASKS:  # predictions: the widest configuration, resized to the input
        assert out.predictions[t].shape[-2:] == (32, 40)
    # the task losses of every sub-network and CI-KD reach the narrowest-only batch-norm copies
    total = sum(v.float().mean() for v in out.predictions.values())
    total = total + sum(d.float().mean() for v in out.deep_supervision.values() for d in v) + out.regularizers[CI_KD]
    total.backward()
    narrowest_bn = [m.copies["w0"] for m in decoder.backbone.modules() if isinstance(m, SwitchableBatchNorm2d)]
    assert all(bn.weight.grad is not None for bn in narrowest_bn)


def test_kd_weight_zero_and_last_level():
    x = torch.randn(2, 3, 32, 40)
    torch.manual_seed(3)
    assert float(_model(kd_weight=0.0).train()(x).regularizers[CI_KD]) == 0.0
    model = _model(kd_levels="last", num_random=0).train()
    out = model(x)
    with torch.no_grad():
        teacher = model.decoder.forward_config(x, list(TASKS), model.decoder.widest()).shared
        student = model.decoder.forward_config(x, list(TASKS), model.decoder.narrowest()).shared
    assert float(out.regularizers[CI_KD].detach()) == pytest.approx(float(ci_kd_loss(student[-1:], teacher[-1:])), rel=1e-5)


def test_bad_configurations_and_options_are_clear():
    model = _model()
    x = torch.randn(1, 3, 32, 40)
    with pytest.raises(SlimmableError, match="not on the model's grid"):
        model.decoder.forward_config(x, ["semseg"], WidthConfig(0.6, {}))
    with pytest.raises(SlimmableError, match="does not have"):
        model.decoder.forward_config(x, ["semseg"], WidthConfig(0.5, {"parts": 0.5}))
    assert model.decoder.check_config(WidthConfig(0.5, {"semseg": 0.25})).decoders == {"semseg": 0.25, "depth": 1.0}
    with pytest.raises(SlimmableError, match="kd_levels"):
        _model(kd_levels="first")
    with pytest.raises(SlimmableError, match="calibrate_batches"):
        _model(calibrate_batches=-1)
    with pytest.raises(SlimmableError, match="cannot be slimmed"):
        create_model(backbone={"name": "test_vit", "kwargs": {"img_size": 64, "dynamic_img_size": True}},
                     decoder="controllable", tasks=TASKS, decoder_options=OPTIONS)


def test_width_config_describes_itself():
    c = WidthConfig(0.75, {"semseg": 1.0, "depth": 0.5})
    assert c.describe() == "encoder x0.75, semseg x1, depth x0.5"
    assert c.widths() == {ENCODER: 0.75, decoder_key("semseg"): 1.0, decoder_key("depth"): 0.5}
    assert c.to_dict() == {"encoder": 0.75, "decoders": {"semseg": 1.0, "depth": 0.5}}


def test_batch_norm_recalibration_recomputes_only_the_chosen_configuration():
    model = _model().eval()
    decoder = model.decoder
    config = WidthConfig(0.5, {"semseg": 0.25, "depth": 0.75})
    other = WidthConfig(1.0, {"semseg": 1.0, "depth": 1.0})
    with use_config(config):
        mine = [m.active() for m in decoder.modules() if isinstance(m, SwitchableBatchNorm2d)]
    with use_config(other):
        theirs = [m.active() for m in decoder.modules() if isinstance(m, SwitchableBatchNorm2d)]
    untouched = {id(bn): bn.running_mean.clone() for bn in theirs if all(bn is not m for m in mine)}
    first = mine[0]  # the stem's: its input does not depend on any other statistics
    seen = []
    hook = first.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    batches = [torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    assert recalibrate_batch_norms(model, config, batches) == 3
    hook.remove()
    x = torch.cat(seen)  # three batches of two: the plain average of the batch means is the overall mean
    torch.testing.assert_close(first.running_mean, x.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert all(bn.momentum == 0.1 for bn in mine) and not model.training  # restored
    assert all(torch.equal(bn.running_mean, untouched[id(bn)]) for bn in theirs if id(bn) in untouched)
    semseg = decoder.batch_norms(config, ["semseg"])[-1]  # a copy in the semseg decoder
    assert semseg not in decoder.batch_norms(config, ["depth"])
    kept = semseg.running_mean.clone()
    recalibrate_batch_norms(model, config, batches[:1], tasks=["depth"])  # a task subset: semseg's stay
    assert torch.equal(semseg.running_mean, kept)
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_batch_norms(model, config, [])


def _all_copies(decoder: ControllableDecoder) -> list[nn.BatchNorm2d]:
    return [bn for m in decoder.modules() if isinstance(m, SwitchableBatchNorm2d) for bn in m.copies.values()]


def test_recalibrating_all_sub_networks_equals_recalibrating_each_alone():
    batches = [torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    model = _model().eval()
    assert recalibrate_all(model, batches) == 16  # 4 encoder widths x 4 decoder widths
    everyone = _all_copies(model.decoder)
    assert all(int(bn.num_batches_tracked) == 2 for bn in everyone)  # every copy was recomputed
    # a mixed configuration, recalibrated on its own from the uncalibrated model, gives the same
    # statistics: each decoder's copies depend only on its width and the encoder's
    config = WidthConfig(0.5, {"semseg": 1.0, "depth": 0.25})
    alone = _model().eval()
    recalibrate_batch_norms(alone, config, batches)
    for a, b in zip(model.decoder.batch_norms(config, list(TASKS)), alone.decoder.batch_norms(config, list(TASKS))):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(model.decoder.forward_config(x, list(TASKS), config).predictions["depth"],
                                   alone.decoder.forward_config(x, list(TASKS), config).predictions["depth"])


def test_finish_training_recalibrates_on_the_first_batches_only_when_asked():
    batches = [torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(s)) for s in range(5)]
    model = _model(calibrate_batches=3).eval()
    note = model.decoder.finish_training(iter(batches))
    assert "16" in note and "3 training batches" in note
    reference = _model().eval()
    recalibrate_all(reference, batches[:3])
    for a, b in zip(_all_copies(model.decoder), _all_copies(reference.decoder)):
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)
    off = _model(calibrate_batches=0)
    before = [bn.running_mean.clone() for bn in _all_copies(off.decoder)]
    assert off.decoder.finish_training(iter(batches)) is None
    assert all(torch.equal(a, bn.running_mean) for a, bn in zip(before, _all_copies(off.decoder)))


def test_a_one_width_grid_trains_that_slim_network_alone():
    model = _model(widths=[0.5], num_random=0).train()
    decoder = model.decoder
    assert decoder.widest() == decoder.narrowest() == WidthConfig(0.5, {t: 0.5 for t in TASKS})
    assert decoder.sample_configs(list(TASKS)) == [decoder.widest()]  # no duplicate narrowest
    x = torch.randn(2, 3, 32, 40)
    out = decoder(x, list(TASKS))
    assert all(out.deep_supervision.get(t, []) == [] for t in TASKS)
    assert float(out.regularizers[CI_KD]) == 0.0
    with torch.no_grad():
        ref = decoder.forward_config(x, list(TASKS), decoder.widest())
    torch.testing.assert_close(out.predictions["semseg"], ref.predictions["semseg"])
    # the sub-network is the 0.5 slice of every layer; the full width was never built
    stem = next(m for m in decoder.backbone.modules() if isinstance(m, SwitchableBatchNorm2d))
    assert [bn.num_features for bn in stem.copies.values()] == [slim_channels(stem.channels, 0.5)]
    with pytest.raises(SlimmableError, match="not one the layers were built for"):
        stem(torch.randn(1, stem.channels, 4, 4))  # outside a width context: full width
