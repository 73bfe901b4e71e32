"""A model overfits a handful of (image, prompt, answer) triples, then
generates the answers exactly (nanoVLM-style sanity check)."""
import pytest
import torch

import vlmkit
from vlmkit import text, toy
from test_generative import tiny

TRIPLES = [(0, "What is it?", "a red square"), (5, "What is it?", "a green circle"),
           (10, "Colour?", "blue"), (15, "Shape?", "cross")]


@pytest.mark.parametrize("arch,fusion", [("encoder_decoder", "concat"), ("encoder_decoder", "cross_attention"),
                                         ("encoder_text_decoder", "concat")])
def test_overfits_and_generates_answers_exactly(arch, fusion):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = torch.stack([toy.render(label, 32, g) for label, _, _ in TRIPLES])
    prompts = ["<image>" + p for _, p, _ in TRIPLES]
    answers = [a for _, _, a in TRIPLES]
    model = vlmkit.build_model(tiny(arch, "mlp", fusion))
    ids, labels, mask = text.training_batch(prompts, answers)
    contexts = ["picture"] * len(TRIPLES)
    cids, cmask = text.encode_batch(contexts, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # 450 steps: at 300 the concat model at seed 0 sat on a plateau under oneDNN's
    # float32 rounding (loss 0.047, the red square and the green circle, asked the
    # same question, not yet told apart; ATen's GEMMs: 0.008). Seeds 1-4 pass at
    # 300 under both. At 450 seed 0 reaches 0.004 under either.
    for step in range(450):
        if arch == "encoder_decoder":
            loss = model(images, ids, mask, labels).loss
        else:
            loss = model(images, cids, ids, cmask, mask, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, loss.item()
    model.eval()
    if arch == "encoder_decoder":
        generated = model.generate(images, prompts, max_new_tokens=20)
    else:
        generated = model.generate(images, contexts, prompts, max_new_tokens=20)
    assert generated == answers
