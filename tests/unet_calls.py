"""UNet calls the way ComfyUI's sampler makes them, for host tests of the subject-attention patch."""
import torch

SIGMA = 3.0
# Every row gets the same latent; 16x16, so that every attn2 layer of SD1.5 has at least 4 queries, where PyTorch's CPU
# attention gives a row alone the bits it gets in a batch (test_nested_attention: not so at 1 or 2 queries).
LATENT = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))


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
