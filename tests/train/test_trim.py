"""The last block at the read positions only: same states there, same gradients, fewer rows through the MLP."""

import torch

from tinymodels import build_adapted_tiny_llama
from tunesmith.peft import adapter_parameters
from tunesmith.train.decoder import decoder_layers
from tunesmith.train.trim import READ, install_last_block_trim


def test_read_positions_match_the_full_block_and_no_module_is_swapped():
    model = build_adapted_tiny_llama()
    ids = torch.randint(5, 200, (1, 14), generator=torch.Generator().manual_seed(3))
    read = torch.tensor([2, 7, 8, 13])
    params = adapter_parameters(model)
    last = decoder_layers(model)[-1]
    originals = (last.self_attn.q_proj, last.self_attn.o_proj, last.mlp)
    keys = list(model.state_dict())
    assert install_last_block_trim(last)
    mlp_rows = []
    hook = last.mlp.register_forward_hook(lambda module, args, out: mlp_rows.append(args[0].shape[1]))
    results = []
    for trimmed in (False, True, False):  # without READ in the call the installed block runs whole
        model.zero_grad(set_to_none=True)
        extra = {READ: read} if trimmed else {}
        hidden = model.get_decoder()(input_ids=ids, **extra).last_hidden_state[0, read]
        (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
        results.append((hidden.detach(), {k: p.grad.clone() for k, p in params.items()}))
    hook.remove()
    (full, full_grads), (trim, trim_grads), (again, _) = results
    assert mlp_rows == [14, 4, 14]  # the last MLP ran on the 4 read positions only when asked
    torch.testing.assert_close(again, full, atol=0, rtol=0)
    torch.testing.assert_close(trim, full, atol=1e-5, rtol=1e-5)
    for key in full_grads:
        torch.testing.assert_close(trim_grads[key], full_grads[key], atol=1e-6, rtol=1e-4)
    assert (last.self_attn.q_proj, last.self_attn.o_proj, last.mlp) == originals
    assert list(model.state_dict()) == keys  # hooks only: adapter names and saving are untouched
