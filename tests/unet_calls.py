"""UNet calls the way ComfyUI's sampler makes them, for host tests of the subject-attention patch."""
import torch

SIGMA = 3.0
LATENT = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # every row gets the same latent


def run_wrapped(patched, contexts, cond_or_uncond):
    """One UNet call through the installed model wrapper, with these context rows and chunk kinds."""
    context = torch.cat(contexts)
    latents = LATENT.expand(context.shape[0], -1, -1, -1)
    options = {**patched.model_options["transformer_options"], "cond_or_uncond": cond_or_uncond}
    args = {"input": latents, "timestep": torch.full((context.shape[0],), SIGMA), "cond_or_uncond": cond_or_uncond,
            "c": {"c_crossattn": context, "transformer_options": options}}
    with torch.no_grad():
        return patched.model_options["model_function_wrapper"](patched.model.apply_model, args)


def run_plain(model, contexts):
    """The same call on the unpatched UNet."""
    context = torch.cat(contexts)
    with torch.no_grad():
        return model.model.apply_model(LATENT.expand(context.shape[0], -1, -1, -1),
                                       torch.full((context.shape[0],), SIGMA), c_crossattn=context, transformer_options={})
