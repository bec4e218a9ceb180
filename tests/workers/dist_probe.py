"""A recording probe for collectives, so device mistakes show without a GPU.

On a CUDA machine a tensor made without `device=` (a Python list, `torch.tensor(...)`,
numpy data) lives on the host, and handing it to an nccl collective fails. On CPU every
tensor is a CPU tensor, so that mistake is invisible. The probe makes it visible:

* FakeAccelerator, a TorchFunctionMode, declares `cpu:0` the accelerator ("cuda") and
  plain `cpu` the host. The trainer's device resolves to cpu:0 (the probe maps the
  config's `cpu` to it), so `.to(device)`, `device=x.device` and everything computed from
  such tensors count as on the accelerator, while factory calls without a device,
  `torch.from_numpy`, `.cpu()` and `.to("cpu")` make host tensors. `tensor.device` reports
  cpu:0 or cpu accordingly (so vaeflow's own device check applies), `.to()`/`.cpu()`
  copy when they would on CUDA, and computation is untouched (everything runs on CPU).
  An op mixing an accelerator tensor with a non-scalar host tensor, which CUDA rejects,
  is an error too.
* Every torch.distributed collective (whoever calls it) is recorded, and one given a host
  tensor raises: the training device's backend (nccl in the real run) serves only it.
  At exit each rank writes its sequence of collectives to <out>/rank<R>.json; ranks must
  have issued the same sequence.
"""

from __future__ import annotations

import atexit
import json
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

ACCEL = torch.device("cpu", 0)
HOST = torch.device("cpu")
_DEVICE_ATTR = torch._C.TensorBase.__dict__["device"]
_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
              torch.arange, torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye,
              torch.scalar_tensor, torch.get_rng_state}
_MOVES = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda}


class DeviceMistake(AssertionError):
    pass


def _tensors(obj, out: list) -> list:
    """The tensors in obj (nested tuples, lists, dicts): a lean tree_flatten, the probe's hot path."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


def _is_accel_device(device) -> bool:
    return device is not None and torch.device(device).index == 0


class FakeAccelerator(TorchFunctionMode):
    """Tensors not marked host count as on the accelerator (parameters, gradients, autograd
    results); torch.from_numpy, which torch function modes do not see, is wrapped."""

    def __init__(self):
        super().__init__()
        self.host = WeakIdKeyDictionary()  # host tensor -> what made it
        from_numpy = torch.from_numpy

        def host_from_numpy(a):
            t = from_numpy(a)
            self.host[t] = "torch.from_numpy"
            return t

        torch.from_numpy = host_from_numpy

    def is_host(self, t: torch.Tensor) -> bool:
        return t in self.host

    def _mark(self, out, host: bool, inputs: list, what: str):
        ids = {id(t) for t in inputs}
        for t in _tensors(out, []):
            if id(t) not in ids:
                if host:
                    self.host[t] = what
                else:
                    self.host.pop(t, None)
        return out

    def _move(self, func, args, kwargs):
        src = args[0]
        if func is torch.Tensor.cpu:
            target = HOST
        elif func is torch.Tensor.cuda:
            target = ACCEL
        elif args[1:] and isinstance(args[1], torch.Tensor):  # .to(other): other's device and dtype
            target = HOST if self.is_host(args[1]) else ACCEL
            args, kwargs = (src, args[1].dtype, *args[2:]), kwargs
        else:
            target = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
            if target is None:  # a dtype change only: stays where it is
                return self._mark(func(*args, **kwargs), self.is_host(src), [], "to(dtype)")
        to_host = not _is_accel_device(target)
        rest = [a for a in args[1:] if not isinstance(a, (str, torch.device))]
        out = src.to(HOST, *rest, **{k: v for k, v in kwargs.items() if k != "device"})
        if out is src and to_host != self.is_host(src):
            out = src.clone()  # a real device change copies
        return self._mark(out, to_host, [], f"{func.__name__}")

    def _backward(self, func, args, kwargs):
        """Run the autograd engine with the probe on: gradient hooks (the overlapped
        all-reduce) and Python autograd functions run in there."""
        from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
        from torch.autograd.graph import _engine_run_backward

        kwargs = dict(kwargs)
        grads = kwargs.pop("gradient", kwargs.pop("grad_tensors", args[1] if len(args) > 1 else None))
        tensors = args[0] if isinstance(args[0], (tuple, list)) else (args[0],)
        grads = _make_grads(tuple(tensors), _tensor_or_tensors_to_tuple(grads, len(tensors)), is_grads_batched=False)
        create = bool(kwargs.get("create_graph"))
        retain = kwargs.get("retain_graph")
        inputs = tuple(kwargs.get("inputs") or ())
        with self:
            _engine_run_backward(tuple(tensors), grads, create if retain is None else retain, create, inputs,
                                 allow_unreachable=True, accumulate_grad=True)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = getattr(func, "__self__", None)
        if owner is _DEVICE_ATTR:
            return HOST if self.is_host(args[0]) else ACCEL
        if type(owner).__name__ == "getset_descriptor" or func is torch.Tensor.__reduce_ex__:
            out = func(*args, **kwargs)  # other attributes (.data, .grad, .shape), pickling
            if isinstance(out, torch.Tensor) and self.is_host(args[0]):
                self.host[out] = "an attribute of a host tensor"
            return out
        if func in _MOVES:
            return self._move(func, args, kwargs)
        if func in (torch.Tensor.backward, torch.autograd.backward):
            return self._backward(func, args, kwargs)
        tensors = _tensors((args, kwargs), [])
        if "device" in kwargs and kwargs["device"] is not None:
            host = not _is_accel_device(kwargs["device"])
            kwargs = {**kwargs, "device": HOST}
        elif func in _FACTORIES:
            host = True
        elif tensors:
            accel = [t for t in tensors if not self.is_host(t)]
            host_big = [t for t in tensors if self.is_host(t) and t.dim() > 0]
            if accel and host_big and func is not torch.Tensor.copy_:
                raise DeviceMistake(f"{getattr(func, '__name__', func)} mixes an accelerator tensor with a host tensor "
                                    f"of shape {tuple(host_big[0].shape)} (made by {self.host[host_big[0]]})")
            host = not accel
        else:
            host = True
        return self._mark(func(*args, **kwargs), host, tensors, getattr(func, "__name__", str(func)))


_OPS = ["all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
        "all_gather_object", "broadcast_object_list", "barrier", "reduce", "all_to_all"]


def install(out_dir: str | Path) -> FakeAccelerator:
    """Turn the probe on in this process; records land in out_dir/rank<R>.json at exit."""
    mode = FakeAccelerator()
    mode.__enter__()
    records: list = []

    def wrap(name, fn):
        def recorded(*args, **kwargs):
            # Object collectives pickle their objects (tensors too) through the CPU backend.
            objects = name.endswith("_object") or name.endswith("_object_list")
            tensors = [] if objects else _tensors((args, kwargs), [])
            records.append([name, [[list(t.shape), str(t.dtype)] for t in tensors]])
            for t in tensors:
                if mode.is_host(t):
                    raise DeviceMistake(f"{name} of a host {t.dtype} tensor {tuple(t.shape)} (made by {mode.host[t]}): "
                                        "the backend serving the training device (nccl) rejects it")
            return fn(*args, **kwargs)

        return recorded

    for name in _OPS:
        setattr(dist, name, wrap(name, getattr(dist, name)))
    import vaeflow.trainer.build as build

    resolve = build.resolve_device
    build.resolve_device = lambda name, fallback=None: ACCEL if name == "cpu" else resolve(name, fallback)

    def dump():
        path = Path(out_dir) / f"rank{os.environ.get('RANK', '0')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"collectives": records}))

    atexit.register(dump)
    return mode


def run_cli(argv: list[str]) -> int:
    from vaeflow.cli import main

    try:
        return main(argv)
    except Exception:
        traceback.print_exc()
        return 1
