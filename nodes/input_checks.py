"""Each node checks the values it is given, when it runs, against its own INPUT_TYPES.

The graph editor keeps a widget within its min and max, but an API-format prompt, a value linked from another node
or a script calling the node can pass anything. A bad value must fail on the node that holds it, before anything is
built or sampled, with a message naming the input, the value, what is allowed and the fix. `checked_inputs` wraps a
node's FUNCTION and checks every input it is given:
- INT and FLOAT: a number (an INT a whole one) within the declared min and max; NaN is never within;
- a list of choices: one of them;
- IMAGE: a batch (B, H, W, C) of at least one image; MASK: (H, W) or (B, H, W), at least one pixel;
- the ordered pairs it names (start_percent before end_percent, left before right): the first below the second.
What a node cannot know, the latent's size and the sampler's conditioning, is checked when sampling starts
(`subject_patch.SubjectAttentionPatch`).
"""
import functools
import inspect
import math
from numbers import Integral, Real
from typing import Callable

import torch


def checked_inputs(*ordered: tuple[str, str]) -> Callable:
    """Decorator for a node's FUNCTION method; `ordered`: pairs of inputs where the first must be below the second."""
    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def run(node, *args, **kwargs):
            values = given_values(signature, node, args, kwargs)
            declared = type(node).INPUT_TYPES()
            specs = {**declared.get("required", {}), **declared.get("optional", {})}
            for name, value in values.items():
                if name in specs and value is not None:
                    check_input(name, value, specs[name])
            for first, second in ordered:
                check_order(first, values[first], second, values[second])
            return function(node, *args, **kwargs)
        return run
    return decorate


def given_values(signature: inspect.Signature, node, args: tuple, kwargs: dict) -> dict:
    """Input name -> value, for the inputs this call gives (a **kwargs parameter contributes its entries)."""
    values = {}
    for name, value in list(signature.bind(node, *args, **kwargs).arguments.items())[1:]:
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            values.update(value)
        else:
            values[name] = value
    return values


TENSOR_INPUTS = {  # type -> (accepted ndims, its name, its layout, what an empty one lacks)
    "IMAGE": ((4,), "an IMAGE", "(B, H, W, C)", "at least one image"),
    "MASK": ((2, 3), "a MASK", "(H, W) or (B, H, W)", "a mask with at least one pixel"),
}


def check_input(name: str, value, spec: tuple) -> None:
    kind, options = spec[0], spec[1] if len(spec) > 1 else {}
    if isinstance(kind, (list, tuple)):
        if value not in kind:
            raise ValueError(f"{name} {value!r} is not one of its choices {list(kind)}: pick one of them")
    elif kind in ("INT", "FLOAT"):
        check_number(name, value, kind, options.get("min", -math.inf), options.get("max", math.inf))
    elif kind in TENSOR_INPUTS:
        check_tensor(name, value, *TENSOR_INPUTS[kind])


def check_number(name: str, value, kind: str, low: float, high: float) -> None:
    number_type = Integral if kind == "INT" else Real
    if isinstance(value, bool) or not isinstance(value, number_type):
        raise ValueError(f"{name} {value!r} is not {'a whole number' if kind == 'INT' else 'a number'}: "
                         f"give a {'whole ' if kind == 'INT' else ''}number from {low} to {high}")
    if not low <= value <= high:  # also refuses NaN
        raise ValueError(f"{name} {value} is outside its range {low} to {high}: set {name} within that range")


def check_tensor(name: str, value, dims: tuple[int, ...], kind: str, layout: str, needs: str) -> None:
    if not isinstance(value, torch.Tensor) or value.ndim not in dims:
        got = f"has shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"is a {type(value).__name__}"
        raise ValueError(f"{name} {got}, not {kind} {layout}: connect {kind} there")
    if value.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(value.shape)}): connect {needs}")


def check_order(first: str, first_value: float, second: str, second_value: float) -> None:
    if not first_value < second_value:
        relation = "after" if first_value > second_value else "equal to"
        raise ValueError(f"{first} {first_value} is {relation} {second} {second_value}, which leaves nothing between "
                         f"them: set {first} below {second}")
