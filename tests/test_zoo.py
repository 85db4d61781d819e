"""``tv:NAME`` and ``timm:NAME``: torchvision's and timm's models by name, wherever an entry name is taken.

Parameter counts are checked against what the libraries publish (torchvision's weights metadata), and timm's
against torchvision's where both build the same architecture; the input size against the libraries' own
configuration; the import of torchvision on a CPU torch in a fresh process; one benchmark-matrix run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perfkit import registry, zoo
from perfkit.cli import main
from perfkit.matrix.config import resolve_matrix
from perfkit.matrix.options import OptionError, option_values
from perfkit.registry import create, get_entry, list_blocks, register

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torchvision", "timm")),
    reason=f"torchvision and timm are not installed ({zoo.INSTALL_HINT}; make test installs them)")

# Ten torchvision models across the families (residual, mobile, NAS, ConvNeXt, ViT, Swin, DenseNet,
# RegNet, MaxViT); regnet_y_400mf is one that cannot be built on the meta device directly.
TORCHVISION_MODELS = ["resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "vit_b_16",
                      "swin_t", "densenet121", "regnet_y_400mf", "maxvit_t"]
# Ten timm models, nine of which are torchvision's architectures under timm's name: both libraries must
# count the same parameters. vit_small has no torchvision twin.
TIMM_MODELS = {"resnet18": "resnet18", "resnet50": "resnet50", "convnext_tiny": "convnext_tiny",
               "efficientnet_b0": "efficientnet_b0", "mobilenetv3_large_100": "mobilenet_v3_large",
               "swin_tiny_patch4_window7_224": "swin_t", "densenet121": "densenet121",
               "resnext50_32x4d": "resnext50_32x4d", "wide_resnet50_2": "wide_resnet50_2",
               "vit_small_patch16_224": None}


def _meta_params(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in create(name).parameters())


def _published_params(torchvision_model: str) -> int:
    """The parameter count torchvision publishes for the model's default weights."""
    torchvision = zoo.import_torchvision()
    return torchvision.models.get_model_weights(torchvision_model).DEFAULT.meta["num_params"]


@pytest.mark.parametrize("model", TORCHVISION_MODELS)
def test_torchvision_parameter_counts_are_the_published_ones(model: str) -> None:
    entry = get_entry(f"tv:{model}")
    assert entry.kind == "network" and entry.kwargs == {}
    assert _meta_params(f"tv:{model}") == _published_params(model)


@pytest.mark.parametrize("model, twin", TIMM_MODELS.items())
def test_timm_parameter_counts_are_the_librarys_own(model: str, twin: str | None) -> None:
    import timm

    with torch.device("meta"):
        own = sum(p.numel() for p in timm.create_model(model, pretrained=False).parameters())
    assert _meta_params(f"timm:{model}") == own
    if twin is not None:
        assert own == _published_params(twin), f"timm:{model} against torchvision's {twin}"


def test_input_size_is_the_librarys_own_and_the_test_shape_runs() -> None:
    import timm

    torchvision = zoo.import_torchvision()
    inception = get_entry("tv:inception_v3")
    crop = torchvision.models.get_model_weights("inception_v3").DEFAULT.transforms().crop_size
    assert inception.bench_shape == (3, *crop, *crop) == (3, 299, 299)
    # The auxiliary classifier is off (a training step's loss takes one output), and said so.
    assert inception.kwargs["aux_logits"] is False and "aux_logits=False" in inception.description
    with torch.device("meta"):
        plain = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    assert _meta_params("tv:inception_v3") == sum(p.numel() for p in plain.parameters())
    # A ViT takes only its own size; a convnet gets the smallest multiple of 32 it accepts.
    assert get_entry("tv:vit_b_16").test_shape == get_entry("tv:vit_b_16").bench_shape == (3, 224, 224)
    tagged = get_entry("timm:resnet50.a1h_in1k")
    assert tagged.bench_shape == tuple(timm.models.get_pretrained_cfg("resnet50.a1h_in1k").input_size) == (3, 176, 176)
    assert inception.test_shape == (3, 96, 96), "inception_v3's stem needs 75 pixels: 96 is the first multiple of 32"
    for name in ("tv:resnet18", "timm:resnet18"):
        entry = get_entry(name)
        assert entry.test_shape == (3, 32, 32), name
        model = create(name).train()
        out = model(entry.example_input(2))
        out.sum().backward()
        assert out.shape == (2, 1000), name


def test_create_takes_the_librarys_keyword_overrides() -> None:
    model = create("tv:resnet18", num_classes=10).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert create("timm:resnet18", num_classes=7).num_classes == 7


def test_list_globs_over_the_librarys_names(capsys: pytest.CaptureFixture[str]) -> None:
    import timm

    assert list_blocks("timm:resnet18*") == sorted(f"timm:{m}" for m in timm.list_models("resnet18*"))
    assert list_blocks("tv:resnet*", kind="block") == []
    assert "tv:resnet18" not in list_blocks(), "the libraries' models are named, never listed with the registry's"
    assert main(["list", "timm:resnet18*"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.strip().splitlines()[1:]}
    assert sorted(rows) == ["timm:resnet18", "timm:resnet18d"]
    assert rows["timm:resnet18"][1:3] == ["network", "11,689,512"]
    assert rows["timm:resnet18"][4] == "3x224x224"


def test_an_unknown_name_names_its_close_matches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(KeyError, match="close matches: tv:resnet50"):
        get_entry("tv:resnet5")
    assert main(["list", "timm:convnxt_tiny"]) == 2
    assert "close matches: timm:convnext_tiny" in capsys.readouterr().err
    with pytest.raises(OptionError, match=r"--perfkit-blocks: unknown torchvision model 'resnt18' \(close matches: "
                                          r"tv:resnet18"):
        resolve_matrix(option_values(lambda dest: {"perfkit_blocks": "tv:resnt18", "perfkit_device": "cpu"}.get(dest)))
    with pytest.raises(ValueError, match="name the model libraries' own models"):
        register("tv:mine", kind="network", bench_shape=(3, 8, 8), test_shape=(3, 8, 8))


@pytest.fixture
def fresh_zoo(monkeypatch: pytest.MonkeyPatch):
    """No library list or entry resolved yet, so a simulated missing library is seen."""
    monkeypatch.setattr(registry, "_ZOO_ENTRIES", {})
    zoo._library_models.cache_clear()
    yield
    zoo._library_models.cache_clear()


@pytest.mark.parametrize("missing, name", [("torchvision", "tv:resnet50"), ("timm", "timm:resnet18")])
def test_a_missing_library_says_how_to_install_it(fresh_zoo, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str], missing: str, name: str) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # what `import` finds for a package that is not installed
    with pytest.raises(zoo.ZooUnavailable, match=r"pip install 'perfkit\[models\]'"):
        get_entry(name)
    assert main(["memory", name]) == 2
    assert "pip install 'perfkit[models]'" in capsys.readouterr().err
    with pytest.raises(OptionError, match=r"--perfkit-blocks: .*pip install 'perfkit\[models\]'"):
        resolve_matrix(option_values(lambda dest: {"perfkit_blocks": name, "perfkit_device": "cpu"}.get(dest)))


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_torchvision_imports_on_this_torch_and_the_fix_is_used_only_where_needed() -> None:
    """A fresh process: where a plain ``import torchvision`` fails (its C++ ops built for another torch),
    perfkit defines the op schemas and the models run; where it works, perfkit defines nothing."""
    plain = _python("import torchvision")
    result = _python(
        "import json, torch\n"
        "from perfkit import zoo\n"
        "tv = zoo.import_torchvision()\n"
        "out = tv.models.resnet18().eval()(torch.randn(1, 3, 32, 32))\n"
        "try:\n"
        "    tv.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)\n"
        "    nms = 'ran'\n"
        "except RuntimeError as error:\n"
        "    nms = str(error)\n"
        "print(json.dumps({'defined': zoo._torchvision_op_schemas is not None, 'has_ops': tv.extension._has_ops(),\n"
        "                  'shape': list(out.shape), 'nms': nms}))\n")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["shape"] == [1, 1000]
    assert report["defined"] == (plain.returncode != 0), plain.stderr[-500:]
    if report["defined"]:
        assert "operator torchvision::" in plain.stderr and not report["has_ops"]
        assert "Couldn't load custom C++ ops" in report["nms"], "a detection op must still fail as torchvision says"
    else:
        assert report["nms"] == "ran"


@pytest.mark.slow
def test_the_matrix_runs_torchvision_and_timm_models(tmp_path: Path) -> None:
    """The issue's run, narrowed to inference and one batch: eager and channels_last timed, triton
    gate-checked in the interpreter (never timed there)."""
    jsonl = tmp_path / "results.jsonl"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PERFKIT_")}
    environ.update(TRITON_INTERPRET="1", PERFKIT_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_matrix.py", "-q", "-p", "no:cacheprovider",
         "--perfkit-blocks=tv:resnet18,timm:resnet18", "--perfkit-variants=eager,channels_last,triton",
         "--perfkit-modes=inference", "--perfkit-batches=1", "--perfkit-kernels=none", "--perfkit-device=cpu",
         f"--perfkit-jsonl={jsonl}", f"--benchmark-json={tmp_path / 'bench.json'}"],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = {(r["block"], r["variant"]): r for r in map(json.loads, jsonl.read_text().splitlines())}
    assert sorted(records) == sorted((b, v) for b in ("tv:resnet18", "timm:resnet18")
                                     for v in ("eager", "channels_last", "triton"))
    for (block, variant), record in records.items():
        assert record["kind"] == "network" and record["params"] == 11_689_512
        assert record["input_shape"] == [1, *get_entry(block).test_shape]
        if variant == "triton":
            assert record["status"] == "skipped" and record["reason"].startswith("correctness checked"), record
            assert record["rel_error"] <= record["tolerance"]
        else:
            assert record["status"] == "ok" and record["rounds"] >= 1, record
