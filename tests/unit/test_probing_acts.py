"""Last-token probing activations: right padding never changes the last real token's activation."""

import numpy as np
import pytest
import torch
from nnsight import NNsight

from saeflow.models import load_model
from saeflow.probing import acts

pytestmark = pytest.mark.usefixtures("one_thread")
SITES = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]


@pytest.fixture(scope="module")
def model_and_tokenizer(packaged_model_dir):
    return load_model(str(packaged_model_dir))


def test_left_truncation_keeps_the_end(model_and_tokenizer):
    _, tok = model_and_tokenizer
    full = tok(["one two three four five six seven"])["input_ids"][0]
    assert acts.tokenize(tok, ["one two three four five six seven"], 3) == [full[-3:]]
    with pytest.raises(ValueError, match="max_length"):
        acts.tokenize(tok, ["a"], 0)


def test_batched_padded_equals_one_prompt_at_a_time(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = ["The cat sat.", "A much longer prompt about the history of Rome and its emperors.",
               "def f(x): return x", "Hello"]
    seqs = acts.tokenize(tok, prompts, 64)
    traced = NNsight(model)
    with torch.inference_mode():
        batched = acts.last_token_acts(traced, model, seqs, SITES, batch_tokens=4096, pad_id=0)
        for i, seq in enumerate(seqs):
            ids = torch.tensor([seq])
            out = model(ids, output_hidden_states=True).hidden_states
            for site in SITES:
                layer = int(site.split(".")[1])
                # hidden_states[L + 1] is the output of block L.
                np.testing.assert_allclose(batched[site][i], out[layer + 1][0, -1].numpy(),
                                           rtol=1e-4, atol=1e-4)
