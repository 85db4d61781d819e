"""Test-suite set-up shared by every test file."""

from __future__ import annotations

import os


def _patch_triton_interpreter_index() -> None:
    """Let triton <= 3.6's interpreter run under numpy >= 2.4 (triton-lang/triton#9171).

    Its tensors convert to a loop bound with ``int(array)``, which numpy 2.4 refuses for a one-element
    array that is not 0-d; every kernel with a run-time loop bound then fails before computing anything.
    Triton 3.9 squeezes the array first; the GPU image (triton 3.6, numpy 2.5) needs the same, so the
    suite runs there under ``TRITON_INTERPRET=1`` as it does here.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_perfkit_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._perfkit_patched = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_triton_interpreter_index()
