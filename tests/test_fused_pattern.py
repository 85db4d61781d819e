"""Fusion by pattern: ``to_triton`` finds ``relu(bn(y) + s)`` in models perfkit has never seen.

The ResNets here are written the way torchvision writes them (``out = self.bn2(out); out += identity;
out = self.relu(out)``), without depending on torchvision; narrow (width 8) so the interpreter is quick.
"""

from __future__ import annotations

import copy
import os
import zlib

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1 (make test sets it)", allow_module_level=True)

from perfkit.fused import to_triton  # noqa: E402
from perfkit.fused.pattern import find_patterns, fuse_patterns  # noqa: E402
from perfkit.fused.wrc import FusedResidualEpilogue  # noqa: E402
from perfkit.testing import GRAD_REL_TOLERANCE, assert_close, relative_error  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request: pytest.FixtureRequest) -> None:
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, block: type[nn.Module], layers: list[int], width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):  # not the identity: random affine and statistics
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18() -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2])


def small_bottleneck_resnet() -> ResNet:
    return ResNet(Bottleneck, [1, 1, 1, 1], width=4)


class PreActBlock(nn.Module):
    """Pre-activation: BN-ReLU before each convolution, no ReLU after the sum; nothing to fuse."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(channels), conv3x3(channels, channels)
        self.bn2, self.conv2 = nn.BatchNorm2d(channels), conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + x


class ReLU6Block(nn.Module):
    """``relu6(bn(y) + s)``: clamps at 6, which the fused epilogue does not."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv, self.bn, self.act = conv3x3(channels, channels), nn.BatchNorm2d(channels), nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)) + x)


class SharedBNBlock(nn.Module):
    """One BN output feeding two epilogues: fusing either would drop a value the other reads."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv, self.bn = conv3x3(channels, channels), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return torch.relu(y + x) + torch.relu(y + 2 * x)


class ScaledBlock(nn.Module):
    """Residual scaling ``relu(0.2 · bn(y) + s)`` with a functional ReLU: alpha = 0.2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv, self.bn = conv3x3(channels, channels), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.relu(x + 0.2 * self.bn(self.conv(x)))


def test_resnet18_has_eight_epilogues_and_all_are_fused() -> None:
    model = resnet18()
    expected = [f"layer{stage}.{index}.bn2" for stage in range(1, 5) for index in range(2)]
    assert find_patterns(model) == expected
    fused, count = fuse_patterns(model)
    assert count == 8
    assert sum(isinstance(m, FusedResidualEpilogue) for m in fused.modules()) == 8
    # The stem's relu(bn1(conv1(x))) has no sum: not an epilogue.
    assert not isinstance(fused.bn1, FusedResidualEpilogue) and type(fused) is ResNet


@pytest.mark.parametrize("make", [PreActBlock, ReLU6Block, SharedBNBlock])
def test_what_is_not_the_pattern_is_not_fused(make) -> None:
    model = make(4)
    assert find_patterns(model) == []
    with pytest.raises(ValueError, match="no module with a fused Triton kernel"):
        to_triton(model)


def test_scaled_and_functional_epilogue_is_fused_with_its_alpha() -> None:
    model = ScaledBlock(4)
    fused = to_triton(copy.deepcopy(model))
    (epilogue,) = [m for m in fused.modules() if isinstance(m, FusedResidualEpilogue)]
    assert epilogue.alpha.item() == pytest.approx(0.2) and epilogue.bn is not model.bn
    x = torch.randn(2, 4, 5, 5)
    assert_close(fused.eval()(x), model.eval().double()(x.double()), torch.float32)


def _parameters_and_grads(model: nn.Module, x: torch.Tensor, params: list[nn.Parameter]):
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return out, torch.autograd.grad((out * weights).sum(), [*params])


@pytest.mark.parametrize("mode", ["training", "inference"])
@pytest.mark.parametrize("make", [resnet18, small_bottleneck_resnet])
def test_fused_model_matches_the_float64_reference_gradients_included(make, mode: str) -> None:
    model = make().train(mode == "training")
    reference = copy.deepcopy(model).double()
    params, reference_params = list(model.parameters()), list(reference.parameters())
    fused = to_triton(model)
    assert set(map(id, fused.parameters())) == set(map(id, params)), "parameters must stay shared"
    # 64×64: layer4 still has 2×2 pixels, so its BatchNorms average 16 values; at 1×1 and batch 2 eager
    # float32 itself is 1e-3 off float64 in some gradients (a 2-value batch statistic is ill-conditioned).
    x = torch.randn(4, 3, 64, 64)
    out, grads = _parameters_and_grads(fused, x, params)
    expected, expected_grads = _parameters_and_grads(reference, x.double(), reference_params)
    assert_close(out, expected, torch.float32)
    for index, (grad, expected_grad) in enumerate(zip(grads, expected_grads, strict=True)):
        assert_close(grad, expected_grad, torch.float32, name=f"grad of parameter {index}",
                     tolerance=GRAD_REL_TOLERANCE["float32"])
    buffers = [b for name, b in fused.state_dict().items() if "running" in name]
    assert buffers and all(torch.isfinite(b).all() for b in buffers)


@pytest.mark.slow
def test_fused_resnet18_trains_three_sgd_steps_like_the_reference() -> None:
    """After 3 SGD steps the fused float32 model is as close to the float64 reference as eager float32 is.

    Training amplifies rounding (each step's error feeds the next), so the bound is calibrated: eager
    float32 from the same start sets the scale, with the float32 tolerance as a floor.
    """
    model = resnet18().train()
    reference, eager = copy.deepcopy(model).double(), copy.deepcopy(model)
    fused = to_triton(model)
    nets = [(fused, torch.float32), (eager, torch.float32), (reference, torch.float64)]
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.01) for net, _ in nets]
    for _ in range(3):
        x, target = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
        for (net, dtype), optimizer in zip(nets, optimizers, strict=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x.to(dtype)), target).backward()
            optimizer.step()
    trained, eager_trained, expected = fused.state_dict(), eager.state_dict(), reference.state_dict()
    for name, value in expected.items():
        if value.is_floating_point():
            scale = relative_error(eager_trained[name], value)
            assert_close(trained[name], value, torch.float32, name=name,
                         tolerance=max(GRAD_REL_TOLERANCE["float32"], 4 * scale))


class TorchvisionDenseLayer(nn.Module):
    """torchvision's ``_DenseLayer``: ``conv2(relu2(norm2(conv1(relu1(norm1(cat(inputs, 1)))))))``."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        concated = torch.cat(inputs, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concated)))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class TorchvisionDenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, growth_rate: int, bn_size: int = 2) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            TorchvisionDenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size))

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


def test_densenet_concat_bn_relu_is_fused_and_matches_the_reference() -> None:
    """A torchvision-style dense block: each layer's ``relu1(norm1(cat))`` fused (norm2 reads no concat)."""
    from perfkit.fused.dense import FusedBatchNormReLU

    model = TorchvisionDenseBlock(3, 5, 3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    assert find_patterns(model) == [f"denselayer{i}.norm1" for i in (1, 2, 3)]
    for mode in ("training", "inference"):
        reference = copy.deepcopy(model).train(mode == "training")
        expected_model = copy.deepcopy(reference).double()
        params, expected_params = list(reference.parameters()), list(expected_model.parameters())
        fused = to_triton(reference)
        assert sum(isinstance(m, FusedBatchNormReLU) for m in fused.modules()) == 3
        x = torch.randn(2, 5, 6, 6)
        out, grads = _parameters_and_grads(fused, x, params)
        expected, expected_grads = _parameters_and_grads(expected_model, x.double(), expected_params)
        assert_close(out, expected, torch.float32, name=f"{mode} output")
        for index, (grad, expected_grad) in enumerate(zip(grads, expected_grads, strict=True)):
            assert_close(grad, expected_grad, torch.float32, name=f"{mode} grad of parameter {index}",
                         tolerance=GRAD_REL_TOLERANCE["float32"])
        for name, value in expected_model.state_dict().items():
            if "running" in name:
                assert_close(fused.state_dict()[name], value, torch.float32, name=name)
