"""Variants: composable transforms of a reference module, named so they combine with ``+``.

``channels_last+bf16+compile`` is one variant. A name is parsed into a frozen :class:`Variant` whose
canonical name lists its atoms in one fixed order, so ``bf16+channels_last`` and ``channels_last+bf16``
are the same cell. Applying a variant to a reference module gives a :class:`Prepared` cell: the module
(converted, swapped, compiled) and the callables the measurement runs — one forward, one forward and
backward (for the correctness gate), and one full step (for timing).

Mixed precision is autocast, as timm's ``benchmark.py --amp`` does: the weights stay float32 and the
matmuls and convolutions run in bf16/fp16; fp16 training scales the loss with ``torch.amp.GradScaler``.

A user adds atoms with :func:`perfkit.register_variant` (``perfkit/user_variants.py``), or an installed
package through the ``perfkit.variants`` entry points. Applying a variant runs, in this order: the ``triton``
swap, the user atoms in the order the name writes them, ``channels_last`` (so modules a user atom built are
converted too), then ``torch.compile``; autocast wraps each call. The canonical name lists the atoms in the
same order (the user atoms between ``triton`` and the compile mode), so it reads as what was done.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from perfkit.user_variants import (
    ENTRY_POINT_GROUP,
    NAME_PATTERN,
    UserVariant,
    add_user_variant,
    get_user_variant,
    load_user_variants,
    user_variant_names,
    variant_plugin_errors,
)

VARIANTS = ("eager", "channels_last", "bf16", "fp16", "compile", "max-autotune", "cudagraphs", "triton")
"""The built-in atoms a variant name is made of, joined with ``+`` (user atoms: :func:`list_variants`)."""

DESCRIPTIONS = {
    "eager": "the reference module as written, float32",
    "channels_last": "weights and input in NHWC memory format (torch.channels_last)",
    "bf16": "autocast to bfloat16; the weights stay float32",
    "fp16": "autocast to float16, the loss scaled by a GradScaler in training (CUDA only)",
    "compile": "torch.compile, mode 'default' (inductor)",
    "max-autotune": "torch.compile, mode 'max-autotune' (inductor autotunes its kernels)",
    "cudagraphs": "torch.compile, mode 'reduce-overhead' (CUDA graphs; CUDA only)",
    "triton": "perfkit's fused Triton kernels, swapped in by class and by pattern (perfkit.fused.fuse)",
}
"""One line on each built-in atom, for ``perfkit list --variants``."""

MODES = ("inference", "training")

_COMPILE_MODES = {"compile": "default", "max-autotune": "max-autotune", "cudagraphs": "reduce-overhead"}
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

LEARNING_RATE = 1e-4
"""SGD's step size in the timed training step: small, so hundreds of timed steps leave the weights where
they started (drifting weights change nothing on a GPU but can reach denormals on a CPU)."""
MOMENTUM = 0.9
_MAX_SCALE_HALVINGS = 24


@dataclass(frozen=True)
class Variant:
    """One combination of atoms; build it with :func:`parse_variant`."""

    channels_last: bool = False
    amp_dtype: torch.dtype | None = None
    """torch.bfloat16 or torch.float16 for autocast; None runs float32."""
    compile_mode: str | None = None
    """None, or torch.compile's mode: "default", "max-autotune" or "reduce-overhead" (CUDA graphs)."""
    triton: bool = False
    user: tuple[str, ...] = ()
    """Registered user atoms, in the order they apply (:func:`perfkit.register_variant`)."""

    @property
    def name(self) -> str:
        """Canonical name: atoms in the order channels_last, bf16|fp16, triton, user atoms, compile mode."""
        atoms = []
        if self.channels_last:
            atoms.append("channels_last")
        if self.amp_dtype is not None:
            atoms.append({v: k for k, v in _AMP_DTYPES.items()}[self.amp_dtype])
        if self.triton:
            atoms.append("triton")
        atoms += self.user
        if self.compile_mode is not None:
            atoms.append({v: k for k, v in _COMPILE_MODES.items()}[self.compile_mode])
        return "+".join(atoms) or "eager"

    def __str__(self) -> str:
        return self.name

    @property
    def compute_dtype(self) -> str:
        """The dtype the arithmetic runs in: autocast's, else a user atom's, else "float32"."""
        if self.amp_dtype is not None:
            return str(self.amp_dtype).removeprefix("torch.")
        return next((d for d in (get_user_variant(a).dtype for a in self.user) if d != "float32"), "float32")

    @property
    def compiled(self) -> bool:
        """The first call compiles: a torch.compile mode, or a user atom registered with ``compiles=True``."""
        return self.compile_mode is not None or any(get_user_variant(a).compiles for a in self.user)

    def uncompiled(self) -> Variant:
        """The same transforms without the compiling atoms: the module a compiled variant hands to its compiler."""
        return replace(self, compile_mode=None, user=tuple(a for a in self.user if not get_user_variant(a).compiles))

    def skip_reason(self, device: torch.device | str, model: nn.Module | None = None,
                    mode: str | None = None) -> str | None:
        """Why this variant cannot run on ``device`` (for ``model`` and ``mode``, when given), or None if it can."""
        device = torch.device(device)
        for atom in self.user:
            reason = get_user_variant(atom).skip(device, mode)
            if reason:
                return reason
        cuda = device.type == "cuda"
        if self.amp_dtype is torch.float16 and not cuda:
            return "fp16 needs a CUDA GPU (CPU float16 autocast is not a target anyone deploys)"
        if self.compile_mode == "reduce-overhead" and not cuda:
            return "cudagraphs needs a CUDA GPU"
        if self.compile_mode is not None:
            reason = _compile_unavailable(device)
            if reason:
                return reason
        if self.triton:
            reason = _triton_unavailable(device, model)
            if reason:
                return reason
        return None

    def autocast(self, device: torch.device | str) -> AbstractContextManager:
        """The autocast context of this variant on ``device`` (a no-op for float32)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.amp_dtype)

    def apply(self, model: nn.Module, example: torch.Tensor, mode: str, *, input_requires_grad: bool = False,
              seed: int = 0) -> Prepared:
        """Transform ``model`` (in place) and ``example`` for ``mode``; the returned cell runs them.

        ``input_requires_grad`` makes the training step compute the input's gradient too, as a block inside
        a network does. ``seed`` fixes the loss's random projection or targets.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
        # Captured before the triton swap: the fused modules hold these very Parameters, and the gate
        # compares gradients in this order against a deep copy of the unswapped model.
        parameters = list(model.parameters())
        record_fields: dict[str, object] = {}
        if self.triton:
            from perfkit.fused import fuse

            fusion = fuse(model)
            model = fusion.model
            record_fields.update(fused_modules=fusion.count, fused_kinds=fusion.kinds)
        # After the swap: a freshly built fused module starts in training mode whatever the one it replaced.
        model.train(mode == "training")
        for atom in self.user:
            model = get_user_variant(atom).apply(model, mode, example.device, parameters)
        x = example
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.detach().requires_grad_(mode == "training" and input_requires_grad)
        runner: Callable[[torch.Tensor], torch.Tensor] = model
        if self.compile_mode is not None:
            runner = torch.compile(model, mode=self.compile_mode)
        return Prepared(self, model, runner, x, mode, parameters, seed=seed, record_fields=record_fields)


@dataclass
class Prepared:
    """A variant applied to a module and its input: the callables the measurement runs."""

    variant: Variant
    module: nn.Module
    """The transformed module (its parameters are the ones trained and compared)."""
    runner: Callable[[torch.Tensor], torch.Tensor]
    """What is called on the input: the module, or its compiled wrapper."""
    inputs: torch.Tensor
    mode: str
    parameters: list[nn.Parameter]
    """The reference module's parameters, in its order (shared with the transformed module)."""
    seed: int = 0
    record_fields: dict[str, object] = field(default_factory=dict)
    """What applying the variant learned, for the cell's record (``fused_modules`` and ``fused_kinds``)."""
    optimizer: torch.optim.Optimizer | None = field(default=None, init=False)
    scaler: torch.amp.GradScaler | None = field(default=None, init=False)
    _loss_target: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode == "training":
            self.optimizer = torch.optim.SGD(self.parameters, lr=LEARNING_RATE, momentum=MOMENTUM)
            if self.variant.amp_dtype is torch.float16:
                self.scaler = torch.amp.GradScaler(self.inputs.device.type)

    def forward(self) -> torch.Tensor:
        """One forward pass as the mode runs it (inference mode for inference, autograd on for training)."""
        grad_context = torch.inference_mode() if self.mode == "inference" else nullcontext()
        with grad_context, self.variant.autocast(self.inputs.device):
            return self.runner(self.inputs)

    def loss(self, out: torch.Tensor) -> torch.Tensor:
        """The training loss of ``out``, computed in float32 (see :func:`training_loss`)."""
        if self._loss_target is None:
            self._loss_target = loss_target(out, self.seed)
        return training_loss(out.float(), self._loss_target)

    def forward_backward(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward, loss and backward; returns the output and the unscaled gradients (parameters, then input).

        Used by the correctness gate: the optimizer does not step, so the gradients are those of the
        weights the reference has too.
        """
        if self.mode != "training":
            raise ValueError("forward_backward is for mode 'training'")
        for _ in range(_MAX_SCALE_HALVINGS):
            self.zero_grad()
            out = self.forward()
            loss = self.loss(out)
            scale = 1.0 if self.scaler is None else float(self.scaler.get_scale())
            (loss * scale).backward()
            grads = [g / scale for g in gradients(self.parameters, self.inputs)]
            if self.scaler is None or all(torch.isfinite(g).all() for g in grads):
                break
            # What GradScaler does on overflow: halve the scale and try again; the timed steps skip instead.
            self.scaler.update(scale / 2)
        return out, grads

    def step(self) -> None:
        """One timed step: a forward pass (inference), or forward, loss, backward, SGD step, zero_grad."""
        if self.mode == "inference":
            self.forward()
            return
        loss = self.loss(self.forward())
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        """Drop every gradient (set to None, as the timed step does)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.inputs.grad = None


def loss_target(out: torch.Tensor, seed: int) -> torch.Tensor:
    """Fixed random targets for ``out``: class indices for logits, a projection tensor for feature maps.

    A plain ``out.sum()`` would be a poor loss for a block: the sum of a BatchNorm output over the batch
    does not depend on its input, so the gradient that reaches the convolutions would be (mathematically)
    zero and the gradient check vacuous. A random projection gives every element a gradient.
    """
    generator = torch.Generator().manual_seed(seed)
    if out.dim() == 2:
        return torch.randint(out.shape[1], (out.shape[0],), generator=generator).to(out.device)
    return torch.randn(out.shape, generator=generator).to(out.device)


def training_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class indices, or the random projection ``<out, target> / batch``."""
    if target.dtype == torch.int64:
        return F.cross_entropy(out, target)
    return (out * target.to(out.dtype)).sum() / out.shape[0]


def gradients(parameters: list[nn.Parameter], inputs: torch.Tensor) -> list[torch.Tensor]:
    """The gradient of each parameter (zeros where it has none, so two models' lists align), then the input's."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    if inputs.requires_grad:
        grads.append(inputs.grad if inputs.grad is not None else torch.zeros_like(inputs))
    return grads


def parse_variant(name: str | Variant) -> Variant:
    """Parse ``"channels_last+bf16+compile"``; an unknown atom or a contradiction raises ValueError."""
    if isinstance(name, Variant):
        return name
    atoms = [a.strip() for a in str(name).split("+")]
    unknown = [a for a in atoms if a not in VARIANTS and a not in user_variant_names()]
    if unknown:
        load_user_variants()
        unknown = [a for a in unknown if a not in user_variant_names()]
    if unknown:
        raise ValueError(f"unknown variant atom(s) {unknown} in {name!r}; valid atoms: {', '.join(list_variants())} "
                         "(combine with '+', e.g. channels_last+bf16+compile)" + _load_errors())
    if len(set(atoms)) != len(atoms):
        raise ValueError(f"variant {name!r} repeats an atom")
    if "eager" in atoms and len(atoms) > 1:
        raise ValueError(f"variant {name!r}: 'eager' is the untransformed reference and combines with nothing")
    amp = [a for a in atoms if a in _AMP_DTYPES]
    if len(amp) > 1:
        raise ValueError(f"variant {name!r}: bf16 and fp16 are two autocast dtypes; choose one")
    compile_atoms = [a for a in atoms if a in _COMPILE_MODES]
    if len(compile_atoms) > 1:
        raise ValueError(f"variant {name!r}: {' and '.join(compile_atoms)} are different torch.compile modes; "
                         f"choose one of {', '.join(_COMPILE_MODES)}")
    user = tuple(a for a in atoms if a not in VARIANTS)
    _check_user_atoms(str(name), user, amp, compile_atoms)
    return Variant(
        channels_last="channels_last" in atoms,
        amp_dtype=_AMP_DTYPES[amp[0]] if amp else None,
        compile_mode=_COMPILE_MODES[compile_atoms[0]] if compile_atoms else None,
        triton="triton" in atoms,
        user=user,
    )


def _check_user_atoms(name: str, user: tuple[str, ...], amp: list[str], compile_atoms: list[str]) -> None:
    """Refuse what a user atom cannot combine with: a second compile, a second dtype."""
    specs = [get_user_variant(a) for a in user]
    compiling = [s.name for s in specs if s.compiles] + compile_atoms
    if len(compiling) > 1:
        raise ValueError(f"variant {name!r}: {' and '.join(compiling)} each compile the model; a model is compiled "
                         "once, so choose one")
    dtypes = {s.name: s.dtype for s in specs if s.dtype != "float32"}
    if dtypes and amp:
        raise ValueError(f"variant {name!r}: {', '.join(dtypes)} computes in {', '.join(set(dtypes.values()))} "
                         f"itself; {amp[0]} autocast would be a second dtype, so choose one")
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"variant {name!r}: {' and '.join(f'{a} ({d})' for a, d in dtypes.items())} compute in "
                         "different dtypes; choose one")


def _load_errors() -> str:
    errors = variant_plugin_errors()
    return "".join(f"; {ENTRY_POINT_GROUP} entry point {key} failed to load: {error}" for key, error in errors.items())


def list_variants(pattern: str = "*") -> list[str]:
    """The atoms matching the glob ``pattern``: the built-ins in :data:`VARIANTS`' order, then the user's, sorted."""
    load_user_variants()
    return [a for a in (*VARIANTS, *user_variant_names()) if fnmatch.fnmatchcase(a, pattern)]


def describe_variant(atom: str) -> str:
    """One line on ``atom`` (a built-in's from :data:`DESCRIPTIONS`, a user atom's as registered)."""
    return DESCRIPTIONS[atom] if atom in DESCRIPTIONS else get_user_variant(atom).description


def register_variant(name: str, transform: Callable[..., nn.Module], *, description: str = "",
                     dtype: str = "float32", compiles: bool = False, modes: tuple[str, ...] = MODES,
                     skip_reason: Callable[[torch.device], str | None] | None = None) -> UserVariant:
    """Add the variant atom ``name``: ``transform(model, *, mode, device) -> nn.Module`` applied to each cell.

    It composes with ``+`` like a built-in atom (the module's docstring gives the order atoms apply in) and
    goes through the same correctness gate and timing. ``description`` is its line in ``perfkit list
    --variants`` (default: the transform's docstring's first line); ``dtype`` the dtype it computes in (its
    gate tolerance and the record's ``dtype``: ``float32``, ``bfloat16`` or ``float16``); ``compiles`` says
    its first call compiles (timed as ``compile_time_s``, a fresh dynamo per cell, never joined with another
    compile); ``modes`` the modes it supports (a cell in another is skipped); ``skip_reason(device)`` why it
    cannot run on a device, or None. A name registered twice, or a built-in's, raises ValueError.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"variant name {name!r}: use lowercase letters, digits, '_' and '-', starting with a letter "
                         "(names are joined with '+' and listed with ','), e.g. 'int8_weights'")
    if name in VARIANTS:
        raise ValueError(f"variant name {name!r} is a built-in atom; built-ins: {', '.join(VARIANTS)}")
    bad_modes = [m for m in modes if m not in MODES] if not isinstance(modes, str) else [modes]
    if bad_modes or not modes:
        raise ValueError(f"variant {name!r}: modes {modes!r} must be a non-empty tuple of {', '.join(MODES)}")
    spec = UserVariant(name, transform, description or _first_line(transform.__doc__), dtype, compiles,
                       tuple(modes), skip_reason)
    add_user_variant(spec)
    return spec


def _first_line(doc: str | None) -> str:
    return next(iter((doc or "").strip().splitlines()), "")


def canonical_name(name: str) -> str:
    """The canonical spelling of a variant name (``bf16+channels_last`` -> ``channels_last+bf16``)."""
    return parse_variant(name).name


def _compile_unavailable(device: torch.device) -> str | None:
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python/platform (torch._dynamo.is_dynamo_supported())"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "torch.compile on the CPU needs a C++ compiler (inductor's CPU backend); none found on PATH"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs triton (inductor's GPU backend), which is not installed"
    return None


def triton_interpreted(device: torch.device | str) -> bool:
    """True when Triton kernels would run on ``device`` in the interpreter (correct, but not timeable)."""
    return torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") == "1"


def _triton_unavailable(device: torch.device, model: nn.Module | None) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type != "cuda" and not triton_interpreted(device):
        return "triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 for a correctness-only run on the CPU)"
    if model is None:
        return None
    from perfkit.fused import FUSED_FOR, SUPPORTED, fusable_modules
    from perfkit.fused.pattern import find_patterns

    names = fusable_modules(model)
    if not names and not find_patterns(model):
        return f"triton: no fusable pattern in {type(model).__name__} ({SUPPORTED})"
    for qualified in names:
        module_name, _ = FUSED_FOR[type(model.get_submodule(qualified))]
        if importlib.util.find_spec(module_name) is None:
            return f"the fused module {module_name} is not available yet"
    return None
