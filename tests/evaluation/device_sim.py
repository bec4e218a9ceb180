"""A simulated accelerator for device-correctness tests on a CPU-only machine.

`SimulatedCuda` is a TorchFunctionMode: every tensor carries a logical device (CPU or a
simulated "cuda:0") while all arithmetic really runs on the CPU. Inside the mode:

- `t.device` reports the logical device; `.to("cuda")`, `.cuda()`, `device=` arguments of
  factories and `Module.to("cuda")` move tensors to the simulated device, `.cpu()` back;
- an op whose tensor operands sit on different logical devices raises, as real CUDA does
  (0-dim CPU tensors may join CUDA ones, as in torch; indexing and copies may cross);
- `.numpy()` of a simulated-CUDA tensor raises, as it does on a GPU;
- a factory asked for the simulated device with a CPU `generator=` raises, as torch does.

What it proves: the code under test moves every tensor it combines with the model's
tensors to the model's device, through the torch API. What it does not: CUDA kernels,
memory, streams, or device logic inside C++ extensions that bypass `__torch_function__`.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

SIM = torch.device("cuda", 0)
CPU = torch.device("cpu")
_T = torch._C.TensorBase
# ops that may take operands on different devices (indexing, copies) or that only inspect them
_CROSSING = {_T.__getitem__, _T.__setitem__, _T.copy_, torch.Tensor.__getitem__, torch.Tensor.__setitem__}
_INSPECT = {torch._has_compatible_shallow_copy_type}
_MOVES = {_T.to, _T.cpu, _T.cuda}


def on_sim(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, "_sim_device", False)


def _mark(t, flag: bool):
    if isinstance(t, torch.Tensor):
        t._sim_device = flag
    return t


def _mark_all(out, flag: bool):
    if isinstance(out, torch.Tensor):
        _mark(out, flag)
    elif isinstance(out, (tuple, list)):  # includes torch.return_types structseqs
        for t in out:
            _mark_all(t, flag)
    return out


def _is_sim(dev) -> bool:
    return dev is not None and torch.device(dev).type == "cuda"


class SimulatedCuda(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.ops = 0  # ops that touched a simulated-CUDA tensor (the test checks it is not 0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func == _T.device.__get__:
            return SIM if on_sim(args[0]) else CPU
        if func == _T.is_cuda.__get__:
            return on_sim(args[0])
        if func == _T.data.__set__:
            func(*args)
            return _mark(args[0], on_sim(args[1]))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(on_sim(t) for t in tensors):
            self.ops += 1
        target, args, kwargs = self._target(func, args, kwargs)
        if func in _INSPECT:
            return func(*args, **kwargs)
        if func not in _CROSSING and func not in _MOVES:
            devs = {on_sim(t) for t in tensors if t.dim() > 0 or on_sim(t)}
            if len(devs) > 1:
                raise RuntimeError(f"simulated device check: {getattr(func, '__name__', func)} got tensors on "
                                   "cuda:0 and cpu (Expected all tensors to be on the same device)")
        if func in (_T.numpy, torch.Tensor.__array__) and on_sim(args[0]):
            raise TypeError("can't convert cuda:0 device type tensor to numpy (simulated device check)")
        out = func(*args, **kwargs)
        if target is None:
            if func in _CROSSING and func is not _T.__getitem__ and func is not torch.Tensor.__getitem__:
                return out  # in-place write: the destination keeps its device
            target = on_sim(args[0]) if func in _MOVES else any(on_sim(t) for t in tensors)
        if isinstance(out, torch.Tensor) and on_sim(out) != target and any(out is t for t in tensors):
            out = out.view_as(out)  # .to() / .cpu() that returned its input: the moved copy is a new alias
        return _mark_all(out, target)

    @staticmethod
    def _target(func, args, kwargs):
        """(True/False for an explicit move to the simulated device / to CPU, or None; args and
        kwargs with the simulated device replaced by the CPU)."""
        if func in (_T.cuda,):
            return True, args, {k: v for k, v in kwargs.items() if k != "device"}
        if func is _T.cpu:
            return False, args, kwargs
        if func is _T.to:
            rest = list(args[1:])
            if rest and isinstance(rest[0], torch.Tensor):  # .to(other): other's device and dtype
                other = rest[0]
                return on_sim(other), (args[0], other.dtype, *rest[1:]), kwargs
            dev = kwargs.pop("device", None)
            if rest and isinstance(rest[0], (str, torch.device)):
                dev = rest.pop(0)
            if dev is None:
                return None, (args[0], *rest), kwargs
            return _is_sim(dev), (args[0], CPU, *rest), kwargs
        if "device" in kwargs:
            sim = _is_sim(kwargs["device"])
            gen = kwargs.get("generator")
            if sim and gen is not None and gen.device.type == "cpu":
                raise RuntimeError("Expected a 'cuda' device type for generator but found 'cpu' (simulated)")
            return sim, args, {**kwargs, "device": CPU if sim else kwargs["device"]}
        return None, args, kwargs


def to_sim(module: torch.nn.Module) -> torch.nn.Module:
    """Mark a module's parameters and buffers as living on the simulated device."""
    for t in list(module.parameters()) + list(module.buffers()):
        _mark(t, True)
    return module
