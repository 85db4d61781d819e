"""One side's persistent worker process and its protocol: JSON lines over a pipe, one request, one reply.

This file has two halves. Run as a script (``python worker.py ROOT``) it is the worker: it imports the
perfkit of the checkout ``ROOT`` (not the running one), builds and gates one cell at a time, and times
rounds of its step when asked. Imported, :class:`Worker` is the driver's end of the pipe. The running
perfkit ships the script, so a side whose perfkit predates ``ab`` can still be measured; the script
imports only the standard library at the top, and of the side's perfkit only its small stable face:
``perfkit.get_entry`` (``Entry.create``, ``Entry.example_input``), ``perfkit.list_blocks`` and
``perfkit.variants.parse_variant`` (``Variant.skip_reason``, ``Variant.apply``, ``Prepared.step``,
``Prepared.forward``, ``Prepared.forward_backward``). A side without them is refused by name.

Requests (``op``): ``build`` (build, first call, gate: the outputs are finite; the outputs are saved to
``outputs_path`` for the HEAD-against-BASE check), ``rounds`` (time ``n`` synchronized steps), ``quit``.
While the other side runs, this process is blocked in ``readline``: it takes no CPU.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STABLE_API = ("perfkit.get_entry", "perfkit.list_blocks", "perfkit.variants.parse_variant")
"""The side's perfkit names this worker calls; a side without one of them cannot be measured."""


class WorkerError(RuntimeError):
    """A worker that could not start, refused its side, or died; the message says which and why."""


class Worker:
    """The driver's end of one side's worker process."""

    def __init__(self, label: str, root: Path, threads: int, device: str) -> None:
        self.label = label
        self.root = root
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"perfkit-ab-{os.getpid()}-{label}.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
                   PYTHONDONTWRITEBYTECODE="1",
                   # glibc reads these at start: the thresholds perfkit.env.machine.pin_malloc sets in a
                   # matrix run (whatever ran before, each step sees a settled allocator), in any side's code.
                   MALLOC_MMAP_THRESHOLD_=str(32 * 2**20), MALLOC_TRIM_THRESHOLD_=str(2**30))
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-u", "-P", __file__, str(root), str(threads), device],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                            env=env, cwd=root)

    @functools.cached_property
    def hello(self) -> dict[str, Any]:
        """The worker's first reply (its perfkit's file, torch version and blocks), waited for on first use:
        two workers started one after the other import torch at the same time."""
        return self._reply()

    @property
    def pid(self) -> int:
        """The worker's process id (its load is this process's for the contention judgement)."""
        return self.process.pid

    def _reply(self) -> dict[str, Any]:
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line:
            self.process.wait(timeout=30)
            log = self.log_path.read_text()[-2000:] if self.log_path.exists() else ""
            raise WorkerError(f"the {self.label} worker ({self.root}) exited {self.process.returncode}:\n{log}")
        reply = json.loads(line)
        if "refused" in reply:
            raise WorkerError(f"the {self.label} side ({self.root}): {reply['refused']}")
        return reply

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and wait (blocked on the pipe) for its reply."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def rounds(self, n: int) -> list[float]:
        """Time ``n`` synchronized steps of the built cell; their times in seconds."""
        return self.request("rounds", n=n)["times_s"]

    def close(self) -> None:
        """Ask the worker to quit, and make sure it has."""
        if self.process.poll() is None:
            try:
                self.request("quit")
            except (OSError, WorkerError, ValueError):
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ the worker

def _import_side(root: Path) -> Any:
    """The side's perfkit, imported from ``root``; refused when it resolved elsewhere or lacks the stable API."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [str(root)] + [p for p in sys.path if Path(p or ".").resolve() != here]
    import importlib

    perfkit = importlib.import_module("perfkit")
    found = Path(perfkit.__file__).resolve()
    if not found.is_relative_to(root.resolve()):
        raise ImportError(f"perfkit resolved to {found}, not to the side's checkout {root}")
    kernels = root / "kernels" / "__init__.py"
    if kernels.exists() and not (root / "perfkit" / "kernels").exists():
        # An installed perfkit maps perfkit.kernels onto its own kernels/ folder: this side's must win.
        import importlib.util

        spec = importlib.util.spec_from_file_location("perfkit.kernels", kernels,
                                                      submodule_search_locations=[str(kernels.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["perfkit.kernels"] = module
        spec.loader.exec_module(module)
    for name in STABLE_API:
        module_name, _, attr = name.rpartition(".")
        if not hasattr(importlib.import_module(module_name), attr):
            raise ImportError(f"its perfkit has no {name}, which perfkit ab needs of each side")
    return perfkit


class _Side:
    """The worker's state: the side's perfkit and the cell built last."""

    def __init__(self, root: Path, threads: int, device: str) -> None:
        import torch

        self.perfkit = _import_side(root)
        self.torch = torch
        self.device = torch.device(device)
        torch.set_num_threads(threads)
        self.prepared: Any = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def build(self, block: str, variant: str, mode: str, batch: int, bench_shape: bool, seed: int,
              outputs_path: str) -> dict[str, Any]:
        from perfkit.variants import parse_variant

        torch = self.torch
        self.prepared = None
        if block not in self.perfkit.list_blocks():
            return {"missing": f"{block!r} is not registered on this side"}
        entry = self.perfkit.get_entry(block)
        parsed = parse_variant(variant)
        # The same seed on both sides: unchanged code builds the same weights and inputs, so outputs compare.
        torch.manual_seed(seed)
        model = entry.create().to(self.device)
        reason = parsed.skip_reason(self.device, model)
        if reason:
            return {"skipped": reason}
        x = entry.example_input(batch, bench=bench_shape, device=self.device,
                                generator=torch.Generator().manual_seed(seed))
        prepared = parsed.apply(model, x, mode, seed=seed)
        start = time.perf_counter()
        if mode == "training":
            out, grads = prepared.forward_backward()
            prepared.zero_grad()
        else:
            out, grads = prepared.forward(), []
        self.sync()
        first_call_s = time.perf_counter() - start
        outputs = [t.detach().to("cpu", torch.float64) for t in [out, *grads]]
        bad = [i for i, t in enumerate(outputs) if not torch.isfinite(t).all()]
        if bad:
            return {"failed": f"non-finite {'output' if bad[0] == 0 else 'gradient'} on the first call"}
        torch.save(outputs, outputs_path)
        self.prepared = prepared
        return {"first_call_s": first_call_s}

    def rounds(self, n: int) -> dict[str, Any]:
        if self.prepared is None:
            return {"failed": "rounds asked for before a cell was built"}
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.prepared.step()
            self.sync()
            times.append(time.perf_counter() - start)
        return {"times_s": times}


def _serve(root: Path, threads: int, device: str) -> None:
    # Replies go to the pipe alone: whatever the side's code prints lands in the log with stderr.
    out, sys.stdout = sys.stdout, sys.stderr
    try:
        side = _Side(root, threads, device)
    except Exception as error:  # the driver names the side and this error; nothing else can be done here
        out.write(json.dumps({"refused": f"{type(error).__name__}: {error}"}) + "\n")
        out.flush()
        return
    import torch

    out.write(json.dumps({"perfkit_file": side.perfkit.__file__, "torch": torch.__version__,
                          "blocks": side.perfkit.list_blocks()}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "quit":
            out.write("{}\n")
            out.flush()
            return
        try:
            reply = side.build(**request) if op == "build" else side.rounds(**request)
        except Exception as error:  # a cell that fails on this side is reported, the worker lives on
            side.prepared = None
            reply = {"failed": f"{type(error).__name__}: {error}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
