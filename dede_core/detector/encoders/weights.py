"""Reading weight files without executing pickled code, and loading them into a model with loud mismatches."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping

import torch
from torch import nn

_REFUSED = ("weights file {path} holds pickled code (not just tensors) and was refused: it could run "
            "arbitrary code. Re-save it as a plain state_dict (torch.save(model.state_dict(), ...)) or as "
            ".safetensors. Loader said: {err}")


def existing_file(path: str, what: str = "weights file") -> str:
    """The expanded path, or ValueError if no such file (so hub tags and typos never trigger a download)."""
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise ValueError(f"{what} not found: {path!r} (give a local file path)")
    return full


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a `.safetensors` file or a torch.save'd state_dict, on CPU.

    torch files are read with weights_only=True. A checkpoint dict that wraps the weights under 'state_dict'
    or 'model' is unwrapped, and a leading 'module.' (DataParallel) is stripped from every name.
    """
    full = existing_file(path)
    if full.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            obj: object = load_file(full, device="cpu")
        except Exception as err:
            raise ValueError(f"cannot read safetensors file {path!r}: {err}") from err
    else:
        try:
            obj = torch.load(full, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "weights only" in str(err).lower():
                raise ValueError(_REFUSED.format(path=path, err=str(err).splitlines()[0])) from None
            raise ValueError(f"cannot read weights file {path!r}: {err}") from None
        except Exception as err:
            raise ValueError(f"cannot read weights file {path!r} as a torch state_dict: {err!r}") from None
    if isinstance(obj, Mapping) and not _all_tensors(obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping) and _all_tensors(obj[key].values()):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not _all_tensors(obj.values()):
        raise ValueError(f"weights file {path!r} is not a state_dict (a non-empty mapping of names to tensors)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _all_tensors(values: Iterable[object]) -> bool:
    return all(isinstance(v, torch.Tensor) for v in values)


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
                drop_prefixes: tuple[str, ...] = ()) -> None:
    """Load `state` into `model`, ignoring names under `drop_prefixes` (a removed head); any other missing,
    unexpected or wrongly shaped tensor is a ValueError naming a few of them."""
    state = {k: v for k, v in state.items() if not k.startswith(drop_prefixes)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"{label} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
                if items]
    if problems:
        raise ValueError(f"weights {source!r} do not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_by_order(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load tensors that use another naming scheme, pairing them with the model's entries in order.

    Every pair must agree in shape and in the last name component (weight, bias, running_mean, ...), so a
    different architecture fails loudly instead of loading shuffled weights.
    """
    own = model.state_dict()
    if len(own) != len(state):
        raise ValueError(f"weights {source!r} have {len(state)} entries, the model has {len(own)}")
    mapped = {}
    for (name, param), (src_name, tensor) in zip(own.items(), state.items()):
        if param.shape != tensor.shape or name.rsplit(".", 1)[-1] != src_name.rsplit(".", 1)[-1]:
            raise ValueError(f"weights {source!r} do not fit the model: {src_name} {tuple(tensor.shape)} "
                             f"lines up with {name} {tuple(param.shape)}")
        mapped[name] = tensor
    model.load_state_dict(mapped, strict=True)
