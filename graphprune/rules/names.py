"""Spellings of one torch operation as ``torch.overrides.resolve_name`` reports them."""

from __future__ import annotations


def spellings(*bases: str, functional: bool = False) -> list[str]:
    """Every name under which ``torch.X`` / ``Tensor.X`` / ``Tensor.X_`` / operators may arrive.

    Example:
        >>> "torch.Tensor.__radd__" in spellings("add")
        True
    """
    names: list[str] = []
    for base in bases:
        names += [f"torch.{base}", f"torch.Tensor.{base}", f"torch.Tensor.{base}_",
                  f"torch.Tensor.__{base}__", f"torch.Tensor.__r{base}__", f"torch.Tensor.__i{base}__",
                  f"torch.special.{base}", f"torch._C._nn.{base}", f"torch._C._nn.{base}_"]
        if functional:
            names += [f"torch.nn.functional.{base}", f"torch.nn.functional.{base}_"]
    return list(dict.fromkeys(names))
