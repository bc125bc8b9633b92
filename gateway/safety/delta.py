"""A fine-tuned encoder shipped as a small delta over the bundled one.

``safegate safety train`` fine-tunes all-MiniLM-L6-v2 in one of two ways, and what ships
is only what changed (a few MB of float16 safetensors):

- LoRA on every linear layer of every block: for each adapted ``torch.nn.Linear`` the
  file holds ``<name>.lora_A`` [r, in] and ``<name>.lora_B`` [out, r], and the metadata
  the ``scaling``; loading adds ``scaling * B @ A`` to the weight.
- the top blocks trained in full: for each of their parameters the file holds
  ``<parameter>.diff``, the tuned value minus the bundled one; loading adds it. A matrix's
  difference is stored as int8 with one float32 scale per row (``<parameter>.diff_scale``):
  the rounding error is at most half a step of the difference's own range, far below the
  weight it is added to, and the file is half the size of float16.

Either way the merge happens once at load, so inference costs exactly what the plain
encoder costs and the ONNX export sees an ordinary BERT.

The file's sha256 is checked against the model card before anything is merged: a
weights file that differs from the one the card describes (a zeroed matrix inside a valid
file, say) is refused, and the member that needs it does not load (fail closed).

Exceptions::

    DeltaError            the file is missing, inconsistent, or not the one the card names
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

if TYPE_CHECKING:  # torch loads only where a delta is written or merged, not to verify one
    import torch

FORMAT = "safegate-encoder-delta/1"  # LoRA factors only
FORMAT_DIFFERENCES_FP16 = "safegate-encoder-delta/2"  # float16 parameter differences
FORMAT_DIFFERENCES = "safegate-encoder-delta/3"  # int8 matrix differences with row scales
_SCALE = ".diff_scale"


class DeltaError(Exception):
    """The delta file is missing, of another format, or not the one its card names."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, expected_sha256: str) -> None:
    """Raise ``DeltaError`` unless ``path`` exists and hashes to ``expected_sha256``."""
    if not path.is_file():
        raise DeltaError(f"weights file {path.name} is missing")
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise DeltaError(
            f"weights file {path.name} has sha256 {actual[:16]}..., the model card says "
            f"{expected_sha256[:16]}...; refusing to load weights the card does not describe"
        )


def save(factors: dict[str, torch.Tensor], path: Path, *, scaling: float) -> None:
    """Write LoRA factors (``<linear>.lora_A`` / ``<linear>.lora_B``) as float16."""
    import torch
    from safetensors.torch import save_file

    tensors = {
        name: tensor.detach().to(torch.float16).contiguous() for name, tensor in factors.items()
    }
    save_file(tensors, str(path), metadata={"format": FORMAT, "scaling": repr(scaling)})


def save_differences(differences: dict[str, torch.Tensor], path: Path) -> None:
    """Write parameter differences (tuned minus bundled, by parameter name): matrices as
    int8 with a float32 scale per row, vectors as float16."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in differences.items():
        change = tensor.detach().float()
        if change.dim() == 2:
            scale = change.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            tensors[f"{name}.diff"] = (change / scale[:, None]).round().to(torch.int8).contiguous()
            tensors[f"{name}{_SCALE}"] = scale.contiguous()
        else:
            tensors[f"{name}.diff"] = change.to(torch.float16).contiguous()
    save_file(tensors, str(path), metadata={"format": FORMAT_DIFFERENCES, "scaling": "1.0"})


def merge_into(model: torch.nn.Module, path: Path) -> int:
    """Merge the delta in ``path`` into ``model``; return how many tensors it changed."""
    import torch

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        formats = (FORMAT, FORMAT_DIFFERENCES_FP16, FORMAT_DIFFERENCES)
        if metadata.get("format") not in formats:
            raise DeltaError(f"{path.name} is not a {' or '.join(formats)} file")
        try:
            scaling = float(metadata["scaling"])
        except (KeyError, ValueError) as error:
            raise DeltaError(f"{path.name} has no valid scaling in its metadata") from error
        stored = list(handle.keys())  # safetensors' handle, not a dict
        differences = sorted(key for key in stored if key.endswith(".diff"))
        if differences and metadata["format"] == FORMAT:
            raise DeltaError(f"{path.name}: a {FORMAT} file holds no parameter differences")
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for key in differences:
                name = key.removesuffix(".diff")
                parameter = parameters.get(name)
                if parameter is None:
                    raise DeltaError(f"{path.name} changes {name!r}, which the model lacks")
                change = handle.get_tensor(key).float()
                if f"{name}{_SCALE}" in stored:
                    scale = handle.get_tensor(f"{name}{_SCALE}").float()
                    if scale.shape != change.shape[:1]:
                        raise DeltaError(f"{path.name}: the scales of {name!r} do not fit it")
                    change = change * scale[:, None]
                if change.shape != parameter.shape:
                    raise DeltaError(f"{path.name}: the change of {name!r} does not fit its shape")
                parameter.add_(change)
        names = sorted(
            {key.rsplit(".", 1)[0] for key in stored if not key.endswith((".diff", _SCALE))}
        )
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name in names:
                linear = modules.get(name)
                if not isinstance(linear, torch.nn.Linear):
                    raise DeltaError(f"{path.name} adapts {name!r}, which is not a linear layer")
                a = handle.get_tensor(f"{name}.lora_A").float()
                b = handle.get_tensor(f"{name}.lora_B").float()
                if b.shape[0] != linear.out_features or a.shape[1] != linear.in_features:
                    raise DeltaError(f"{path.name}: factors of {name!r} do not fit its shape")
                linear.weight += scaling * (b @ a)
    return len(names) + len(differences)
