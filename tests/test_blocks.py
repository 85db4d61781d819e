"""Every registered block and network: shapes, gradients, parameter counts, train/eval, determinism, registry.

The per-entry tests are parametrized from the registry through one module-scoped fixture, so a new entry is
tested the day it is registered and pytest builds each model once for all the tests that use it.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from perfkit import create, get_entry, list_blocks, register
from perfkit.blocks.inception import GoogLeNetOutputs
from perfkit.testing import assert_close

NAMES = list_blocks()
# Over ~40M parameters: a few seconds each to initialize on a shared 2-core runner.
HEAVY = ("alexnet", "vgg1*", "resnet101", "resnet152")


def _marks(name: str) -> list[pytest.MarkDecorator]:
    return [pytest.mark.slow] if any(fnmatch.fnmatchcase(name, p) for p in HEAVY) else []


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_params(name: str, **overrides) -> int:
    with torch.device("meta"):
        return _num_params(create(name, **overrides))


def _num_classes(name: str) -> int:
    entry = get_entry(name)
    return entry.kwargs.get("num_classes", inspect.signature(entry.factory).parameters["num_classes"].default)


# Output (C, H, W) of each block at its test_shape: the channel and stride arithmetic of its paper.
BLOCK_OUTPUT = {
    "basic": (64, 8, 8), "bottleneck": (256, 8, 8), "wrc": (64, 8, 8), "scaled": (64, 8, 8),
    "resnorm": (64, 8, 8), "fusion": (256, 8, 8), "csp": (128, 8, 8),
    "dense": (256 + 24 * 32, 4, 4), "dense_plain": (256 + 24 * 32, 4, 4), "transition": (128, 4, 4),
    "inception": (64 + 128 + 32 + 32, 8, 8), "nin": (256, 8, 8), "vgg": (256, 4, 4),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # On a loaded 2-core runner an OpenMP barrier waits for whichever thread was descheduled: tiny ops took
    # ~60 ms each with two threads (DenseNet-121's first forward: 16 s) and under 1 ms with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[pytest.param(n, marks=_marks(n)) for n in NAMES])
def built(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    torch.manual_seed(0)
    return request.param, create(request.param)


def _outputs(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, tuple) else (out,)


# --- every entry ---------------------------------------------------------------------------------------------

def test_forward_shape_and_backward(built: tuple[str, nn.Module]) -> None:
    name, model = built
    entry = get_entry(name)
    model.train()
    generator = torch.Generator().manual_seed(1)
    outs = _outputs(model(entry.example_input(2, generator=generator)))
    expected = (2, _num_classes(name)) if entry.kind == "network" else (2, *BLOCK_OUTPUT.get(name, ()))
    if entry.kind == "network" or name in BLOCK_OUTPUT:
        assert tuple(outs[0].shape) == expected, f"{name}: output {tuple(outs[0].shape)}, expected {expected}"
    else:
        assert outs[0].shape[0] == 2, f"{name}: batch of 2 gave output {tuple(outs[0].shape)}"
    # A random projection, not .sum(): the sum of a BatchNorm output is constant, so its gradient is zero.
    loss = sum((o * torch.randn(o.shape, generator=generator)).sum() for o in outs)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {pname}'s gradient is all zero"


def test_eval_is_per_sample_and_repeatable(built: tuple[str, nn.Module]) -> None:
    # Eval mode: BatchNorm uses its running statistics (so a sample's output does not depend on the rest of
    # the batch, and the statistics do not move) and dropout is off (so two calls agree).
    name, model = built
    model.eval()
    x = get_entry(name).example_input(3, generator=torch.Generator().manual_seed(2))
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    with torch.no_grad():
        full = _outputs(model(x))[0]
        alone = _outputs(model(x[:1]))[0]
        again = _outputs(model(x))[0]
    assert_close(alone, full[:1], torch.float32, f"{name}: sample 0 alone vs in a batch of 3")
    assert torch.equal(full, again), f"{name}: two eval calls on one input differ"
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), f"{name}: buffer {k} changed in eval mode"


def test_train_mode_uses_batch_statistics_and_dropout(built: tuple[str, nn.Module]) -> None:
    name, model = built
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    has_dropout = any(isinstance(m, nn.Dropout) for m in model.modules())
    if not bns and not has_dropout:
        pytest.skip(f"{name} has neither BatchNorm nor dropout")
    model.train()
    x = get_entry(name).example_input(4, generator=torch.Generator().manual_seed(3))
    tracked = [int(bn.num_batches_tracked) for bn in bns]
    with torch.no_grad():
        torch.manual_seed(0)
        first = _outputs(model(x))[0]
        torch.manual_seed(1)
        second = _outputs(model(x))[0]
        pair = _outputs(model(x[:2]))[0]
    for bn, before in zip(bns, tracked, strict=True):
        assert int(bn.num_batches_tracked) == before + 3, f"{name}: a BatchNorm did not update its running stats"
    if has_dropout:
        assert not torch.allclose(first, second), f"{name}: dropout is inactive in train mode"
    else:
        assert torch.equal(first, second), f"{name}: train mode is not deterministic without dropout"
        assert not torch.allclose(pair[:1], first[:1]), f"{name}: BatchNorm ignores the batch in train mode"


def test_construction_is_deterministic(built: tuple[str, nn.Module]) -> None:
    name, model = built
    if _num_params(model) > 100_000_000:
        # The VGGs draw their weights through the same init_weights as every network checked here; a second
        # 140M-parameter build costs ~5 s each on the shared runner, 40 s for the family.
        pytest.skip(f"{name}: over 100M parameters, rebuilt twice would dominate the suite")
    torch.manual_seed(0)
    rebuilt = dict(create(name).named_parameters())
    for pname, p in model.named_parameters():
        assert torch.equal(p, rebuilt[pname]), f"{name}: {pname} differs between two builds under one seed"


# --- parameter counts ----------------------------------------------------------------------------------------

TORCHVISION_PARAMS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnet152": 60_192_808, "vgg11": 132_863_336, "vgg11_bn": 132_868_840, "vgg13": 133_047_848,
    "vgg13_bn": 133_053_736, "vgg16": 138_357_544, "vgg16_bn": 138_365_992, "vgg19": 143_667_240,
    "vgg19_bn": 143_678_248, "densenet121": 7_978_856, "googlenet": 6_624_904,
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_count_equals_torchvision(name: str) -> None:
    assert _meta_params(name) == TORCHVISION_PARAMS[name]


def test_googlenet_with_aux_classifiers_equals_torchvision() -> None:
    assert _meta_params("googlenet", aux_logits=True) == 13_004_888


def _conv(cin: int, cout: int, k: int, bias: bool = False) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def _bn(c: int) -> int:
    return 2 * c


def _linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def test_alexnet_paper_layout_parameter_count() -> None:
    # Single tower, 96-256-384-384-256, FC 4096-4096-1000, biases everywhere: 62,378,344.
    expected = (_conv(3, 96, 11, True) + _conv(96, 256, 5, True) + _conv(256, 384, 3, True)
                + _conv(384, 384, 3, True) + _conv(384, 256, 3, True)
                + _linear(256 * 6 * 6, 4096) + _linear(4096, 4096) + _linear(4096, 1000))
    assert expected == 62_378_344
    assert _meta_params("alexnet") == expected


def test_nin_parameter_count() -> None:
    expected = 0
    for cin, widths, k in ((3, (96, 96, 96), 11), (96, (256,) * 3, 5), (256, (384,) * 3, 3),
                           (384, (1024, 1024, 1000), 3)):
        expected += _conv(cin, widths[0], k, True) + _conv(widths[0], widths[1], 1, True)
        expected += _conv(widths[1], widths[2], 1, True)
    assert _meta_params("nin_net") == expected


def _densenet_params(block_config: tuple[int, ...], bottleneck: bool, in_channels: int = 3,
                     num_classes: int = 1000, growth: int = 32, init: int = 64, bn_size: int = 4) -> int:
    total, c = _conv(in_channels, init, 7) + _bn(init), init
    for i, n in enumerate(block_config):
        for layer in range(n):
            cin = c + layer * growth
            if bottleneck:
                total += _bn(cin) + _conv(cin, bn_size * growth, 1) + _bn(bn_size * growth)
                total += _conv(bn_size * growth, growth, 3)
            else:
                total += _bn(cin) + _conv(cin, growth, 3)
        c += n * growth
        if i != len(block_config) - 1:
            total, c = total + _bn(c) + _conv(c, c // 2, 1), c // 2
    return total + _bn(c) + _linear(c, num_classes)


def test_densenet_parameter_counts() -> None:
    # The closed form reproduces torchvision's DenseNet-121 first, then counts the plain and d2l variants.
    assert _densenet_params((6, 12, 24, 16), bottleneck=True) == TORCHVISION_PARAMS["densenet121"]
    assert _meta_params("densenet_plain") == _densenet_params((6, 12, 24, 16), bottleneck=False)
    assert _meta_params("d2l_densenet") == _densenet_params((4, 4, 4, 4), False, in_channels=1, num_classes=10)


def test_resnet_variant_parameter_counts() -> None:
    resnet18 = TORCHVISION_PARAMS["resnet18"]
    assert _meta_params("wrc_resnet18") == resnet18 + 2 * 8  # a learnable alpha and beta in each of 8 blocks
    # d2l: a 1-channel stem (64·7·7 fewer weights per dropped channel) and a 10-way classifier.
    assert _meta_params("d2l_resnet18") == resnet18 - 2 * 64 * 7 * 7 - (1000 - 10) * (512 + 1)


def test_csp_resnet50_parameter_count_follows_timm_layout() -> None:
    # timm's cspresnet50: 7×7 stem; per stage [3×3/2 down conv], 1×1 expansion to 2·out, depth bottlenecks
    # out → out/2 → out, 1×1 partial transition, 1×1 transition of the concat; FC. Every conv has a BN.
    expected, cin = _conv(3, 64, 7) + _bn(64), 64
    for depth, out, stride in zip((3, 3, 5, 2), (128, 256, 512, 1024), (1, 2, 2, 2), strict=True):
        if stride != 1:
            expected += _conv(cin, cin, 3) + _bn(cin)
        mid = out // 2
        expected += _conv(cin, 2 * out, 1) + _bn(2 * out)
        expected += depth * (_conv(out, mid, 1) + _bn(mid) + _conv(mid, mid, 3) + _bn(mid) + _conv(mid, out, 1)
                             + _bn(out))
        expected += _conv(out, out, 1) + _bn(out) + _conv(2 * out, out, 1) + _bn(out)
        cin = out
    expected += _linear(1024, 1000)
    assert expected == 21_616_168  # timm reports cspresnet50 at 21.6M parameters
    assert _meta_params("csp_resnet50") == expected


# --- the d2l seed's shape tables -----------------------------------------------------------------------------

D2L_RESNET18_TABLE = [
    ("0", (1, 64, 112, 112)), ("1", (1, 64, 112, 112)), ("2", (1, 64, 112, 112)), ("3", (1, 64, 56, 56)),
    ("resnet_block1", (1, 64, 56, 56)), ("resnet_block2", (1, 128, 28, 28)), ("resnet_block3", (1, 256, 14, 14)),
    ("resnet_block4", (1, 512, 7, 7)), ("global_avg_pool", (1, 512, 1, 1)), ("fc", (1, 10)),
]
# The seed prints its dense blocks as "DenseBlosk_i", a typo; the shapes are the seed's.
D2L_DENSENET_TABLE = [
    ("0", (1, 64, 48, 48)), ("1", (1, 64, 48, 48)), ("2", (1, 64, 48, 48)), ("3", (1, 64, 24, 24)),
    ("dense_block_0", (1, 192, 24, 24)), ("transition_block_0", (1, 96, 12, 12)),
    ("dense_block_1", (1, 224, 12, 12)), ("transition_block_1", (1, 112, 6, 6)),
    ("dense_block_2", (1, 240, 6, 6)), ("transition_block_2", (1, 120, 3, 3)),
    ("dense_block_3", (1, 248, 3, 3)), ("BN", (1, 248, 3, 3)), ("relu", (1, 248, 3, 3)),
    ("global_avg_pool", (1, 248, 1, 1)), ("fc", (1, 10)),
]


@pytest.mark.parametrize(("name", "size", "table"), [("d2l_resnet18", 224, D2L_RESNET18_TABLE),
                                                     ("d2l_densenet", 96, D2L_DENSENET_TABLE)])
def test_d2l_shape_table_layer_by_layer(name: str, size: int, table: list) -> None:
    net = create(name).eval()
    x = torch.rand((1, 1, size, size))
    seen = []
    with torch.no_grad():
        for child_name, layer in net.named_children():
            x = layer(x)
            seen.append((child_name, tuple(x.shape)))
    assert seen == table


# --- what particular blocks compute --------------------------------------------------------------------------

def _bn_eval(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


@pytest.mark.parametrize(("name", "alpha", "beta"), [("basic", 1.0, 1.0), ("wrc", 0.7, 1.3), ("scaled", 0.2, 1.0)])
def test_residual_epilogue_formula(name: str, alpha: float, beta: float) -> None:
    torch.manual_seed(0)
    block = create(name).double().eval()
    for bn in (block.bn1, block.epilogue.bn):  # non-trivial running statistics and affine parameters
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    if name == "wrc":
        block.epilogue.alpha.data.fill_(alpha)
        block.epilogue.beta.data.fill_(beta)
    alpha = block.epilogue.alpha.item()  # the float32 constant, widened: 0.2 is not exact in binary
    x = get_entry(name).example_input(2, dtype=torch.float64)
    y = F.conv2d(torch.relu(_bn_eval(F.conv2d(x, block.conv1.weight, padding=1), block.bn1)), block.conv2.weight,
                 padding=1)
    expected = torch.relu(alpha * _bn_eval(y, block.epilogue.bn) + beta * x)
    with torch.no_grad():
        assert_close(block(x), expected, torch.float64, name)


def test_wrc_weights_learnable_and_scaled_weight_fixed() -> None:
    wrc = create("wrc").epilogue
    assert isinstance(wrc.alpha, nn.Parameter) and isinstance(wrc.beta, nn.Parameter)
    assert wrc.alpha.item() == 1.0 and wrc.beta.item() == 1.0
    scaled = create("scaled", scale=0.1).epilogue
    assert not isinstance(scaled.alpha, nn.Parameter) and scaled.alpha.item() == pytest.approx(0.1)
    assert scaled.beta.item() == 1.0


def test_resnorm_normalizes_the_sum() -> None:
    torch.manual_seed(0)
    block = create("resnorm").double().train()
    x = get_entry("resnorm").example_input(4, dtype=torch.float64)
    with torch.no_grad():
        y = block.conv2(torch.relu(block.bn1(block.conv1(x))))
        s = y + x
        mean, var = s.mean(dim=(0, 2, 3), keepdim=True), s.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        expected = torch.relu((s - mean) / torch.sqrt(var + block.bn.eps))  # BN weight 1, bias 0 at init
        assert_close(block(x), expected, torch.float64, "resnorm")


def test_bottleneck_strides_on_the_3x3() -> None:
    with torch.device("meta"):
        first = create("resnet50").layer2[0]
    assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2) and first.shortcut[0].stride == (2, 2)


def test_fusion_branches_have_1_3_5_receptive_fields() -> None:
    torch.manual_seed(0)
    block = create("fusion").eval()
    x = torch.randn((1, 256, 11, 11), requires_grad=True)
    for branch, field in ((block.branch1x1, 1), (block.branch3x3, 3), (block.branch5x5, 5)):
        (grad,) = torch.autograd.grad(branch(x)[0, :, 5, 5].sum(), x)
        rows = grad.abs().sum(dim=(0, 1, 3)).nonzero().flatten()
        assert rows.numel() == field, f"receptive field of {field}×{field} expected, got {rows.numel()} rows"


def test_googlenet_aux_classifiers_in_training_only() -> None:
    torch.manual_seed(0)
    net = create("googlenet", aux_logits=True, num_classes=10).train()
    x = get_entry("googlenet").example_input(2)
    out = net(x)
    assert isinstance(out, GoogLeNetOutputs) and all(tuple(o.shape) == (2, 10) for o in out)
    (out.logits + out.aux1 + out.aux2).sum().backward()
    assert net.aux1.fc2.weight.grad is not None and net.aux2.fc2.weight.grad is not None
    with torch.no_grad():
        assert tuple(net.eval()(x).shape) == (2, 10)


# --- the registry ---------------------------------------------------------------------------------------------

REQUIRED = {
    "block": {"basic", "bottleneck", "wrc", "scaled", "resnorm", "fusion", "csp", "dense", "dense_plain",
              "transition", "inception", "nin", "vgg"},
    "network": {"alexnet", "nin_net", "googlenet", "densenet121", "densenet_plain", "d2l_resnet18", "d2l_densenet",
                "wrc_resnet18", "csp_resnet50", *(f"resnet{d}" for d in (18, 34, 50, 101, 152)),
                *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn"))},
}


@pytest.mark.parametrize("kind", sorted(REQUIRED))
def test_every_seed_entry_is_registered(kind: str) -> None:
    assert REQUIRED[kind] <= set(list_blocks(kind=kind)), REQUIRED[kind] - set(list_blocks(kind=kind))


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(KeyError) as info:
        create("nope")
    message = str(info.value)
    assert "'nope'" in message and all(name in message for name in NAMES)


def test_registering_a_name_twice_raises() -> None:
    factory = get_entry("basic").factory
    with pytest.raises(ValueError, match="'basic' is already registered"):
        register("basic", kind="block", bench_shape=(1, 1, 1), test_shape=(1, 1, 1))(nn.Identity)
    assert get_entry("basic").factory is factory


def test_list_blocks_glob_and_kind() -> None:
    assert list_blocks("resnet*") == ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]
    assert list_blocks("*resnet18") == ["d2l_resnet18", "resnet18", "wrc_resnet18"]
    assert list_blocks("dense*", kind="block") == ["dense", "dense_plain"]
    with pytest.raises(ValueError, match="kind 'layer'"):
        list_blocks(kind="layer")


def test_overrides_reach_the_factory() -> None:
    assert create("resnet18", num_classes=10).fc.out_features == 10
    assert create("dense", num_layers=2).out_channels == 256 + 2 * 32
