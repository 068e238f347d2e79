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


def subject_patch_of(patched):
    """The subject patch a patched MODEL carries: the object whose bound method is its model wrapper."""
    return patched.model_options["model_function_wrapper"].__self__


def subject_replacements(patched) -> dict:
    """Per (block, number, index), the attn2 replacement the subject patch puts into a UNet call of `patched`."""
    return subject_patch_of(patched).call_replacements(patched.model_options["transformer_options"])["attn2"]


def spy_on_subject_layers(monkeypatch, patched, calls: list) -> None:
    """For this test: record (q, k, v, extra_options, out) of every attn2 call the subject patch of `patched` makes."""
    patch = subject_patch_of(patched)
    replacement_for = patch.layer_replacement

    def spying(previous):
        replacement = replacement_for(previous)

        def spy(q, k, v, extra_options):
            out = replacement(q, k, v, extra_options)
            calls.append((q, k, v, extra_options, out))
            return out
        return spy
    monkeypatch.setattr(patch, "layer_replacement", spying)
