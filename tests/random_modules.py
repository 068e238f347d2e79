"""Seeded random weights for modules that ComfyUI builds with uninitialised memory (its ops skip weight init)."""
import torch


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter seeded, well-scaled values, drawn in place in the parameter's own dtype (no float32 copy):
    norm gains 1, vectors N(0, 0.02), weights N(0, 1/fan_in)."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in module.named_parameters():
        if parameter.ndim <= 1 and ("norm" in name or name.endswith("ln_1.weight")):
            parameter.fill_(1.0)
        elif parameter.ndim <= 1:
            parameter.normal_(0.0, 0.02, generator=generator)
        else:
            parameter.normal_(0.0, parameter[0].numel() ** -0.5, generator=generator)
