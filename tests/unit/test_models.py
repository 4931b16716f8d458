"""Hook sites resolve to the right modules in every supported family; the packaged model works."""

from pathlib import Path

import gguf
import pytest
import torch
from nnsight import NNsight
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from saeflow.models import (
    Site,
    check_layers,
    decoder_layers,
    describe,
    family,
    gguf_metadata,
    layers_module_path,
    load_model,
    model_dims,
    packaged_gguf_path,
    parse_site,
    resolve_site,
    site_activation,
    spliced_logits,
)

N_LAYERS, D_MODEL, VOCAB = 3, 32, 64
# initializer_range 0.5: branch outputs of the same order as the residual, so a wrong module
# (e.g. Gemma-2's attention before its post-norm) gives a clearly different sum.
COMMON = {"vocab_size": VOCAB, "initializer_range": 0.5}
CONFIGS: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(
        hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, **COMMON,
    ),
    "gemma2": Gemma2Config(
        hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, **COMMON,
    ),
    "gpt_neox": GPTNeoXConfig(
        hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, use_parallel_residual=True, **COMMON,
    ),
    "gpt2": GPT2Config(
        n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4, bos_token_id=0, eos_token_id=0, **COMMON
    ),
}  # fmt: skip
LAYERS_PATH = {"llama": "model.layers", "gemma2": "model.layers", "gpt_neox": "gpt_neox.layers",
               "gpt2": "transformer.h"}  # fmt: skip


def tiny_model(arch: str) -> PreTrainedModel:
    config = CONFIGS[arch]
    config._attn_implementation = "eager"  # Gemma-2 soft-capping; same maths for the others
    return AutoModelForCausalLM.from_config(config).eval()


def run_with_sites(
    model: PreTrainedModel, sites: list[str], input_ids: torch.Tensor
) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
    """Activations captured by forward hooks on the resolved modules, and HF's hidden_states."""
    acts: dict[str, torch.Tensor] = {}
    handles = []
    for site in sites:
        module, _ = resolve_site(model, site)
        hook = lambda _m, _i, out, site=site: acts.__setitem__(site, site_activation(out))
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            hidden = model(input_ids, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    return acts, hidden


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_hook_sites_match_hidden_states_and_residual_decomposition(arch: str) -> None:
    model = tiny_model(arch)
    input_ids = torch.randint(0, VOCAB, (2, 7))
    layer = 1  # not the last: HF applies the final norm to the last hidden state in some families
    sites = [f"blocks.{layer - 1}.hook_resid_post"] + [
        f"blocks.{layer}.hook_{kind}" for kind in ("resid_post", "attn_out", "mlp_out")
    ]
    acts, hidden = run_with_sites(model, sites, input_ids)
    prev, post = acts[sites[0]], acts[sites[1]]  # (batch, seq, d_model)
    attn, mlp = acts[sites[2]], acts[sites[3]]
    assert post.shape == (2, 7, D_MODEL)
    torch.testing.assert_close(post, hidden[layer + 1], rtol=0, atol=0)
    torch.testing.assert_close(prev, hidden[layer], rtol=0, atol=0)
    assert (post - prev).abs().mean() > 0.1  # the layer does something measurable
    torch.testing.assert_close(post - prev, attn + mlp, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("kind", ["resid_post", "attn_out", "mlp_out"])
def test_spliced_logits_equal_an_nnsight_trace_that_edits_the_site(arch: str, kind: str) -> None:
    model = tiny_model(arch)
    input_ids = torch.randint(0, VOCAB, (2, 7))
    module, _ = resolve_site(model, f"blocks.1.hook_{kind}")
    name = next(n for n, m in model.named_modules() if m is module)
    traced = NNsight(model)
    envoy = traced
    for part in name.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    with torch.inference_mode():
        clean = model(input_ids).logits
        with traced.trace(input_ids):
            out = envoy.output
            hidden = out[0] if isinstance(out, tuple) else out
            hidden[:, 2:] = -0.5 * hidden[:, 2:]
            reference = traced.output.logits.save()
        got = spliced_logits(model, module, input_ids, 2, lambda h: -0.5 * h)
        assert torch.equal(got[:, :2], clean[:, :2])  # causal: positions before skip untouched
        assert (got[:, 2:] - clean[:, 2:]).abs().max() > 1e-3
        assert model(input_ids).logits.equal(clean)  # the hook is removed
    torch.testing.assert_close(got, reference, rtol=0, atol=0)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_layers_path_and_dims(arch: str) -> None:
    model = tiny_model(arch)
    path = layers_module_path(model)
    assert path == LAYERS_PATH[arch]
    assert model.get_submodule(path) is decoder_layers(model)
    assert len(decoder_layers(model)) == N_LAYERS
    assert model_dims(model) == model_dims(model.config) == (N_LAYERS, D_MODEL)
    # the base model (no LM head) resolves to the same modules
    base = model.base_model
    assert isinstance(base, PreTrainedModel)
    assert decoder_layers(base) is decoder_layers(model)


def test_describe_local_folder(tmp_path: Path) -> None:
    CONFIGS["gpt2"].save_pretrained(tmp_path)  # config only: describe must not need weights
    assert describe(str(tmp_path)) == (N_LAYERS, D_MODEL, "gpt2")


@pytest.mark.parametrize(
    "name",
    ["blocks.x.hook_resid_post", "blocks.1.hook_resid_pre", "resid_post", "blocks.-1.hook_mlp_out",
     "blocks.2.hook_attn_out.extra", ""],
)  # fmt: skip
def test_parse_site_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match=f"bad hook site '{name}'.*blocks.{{L}}.hook_resid_post"):
        parse_site(name)


def test_parse_site_accepts_good_names() -> None:
    assert parse_site("blocks.12.hook_mlp_out") == Site(12, "mlp_out")
    assert parse_site("blocks.0.hook_resid_post") == Site(0, "resid_post")


def test_resolve_site_rejects_out_of_range_layer() -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"'blocks.3.hook_attn_out'.*layer 3.*0\.\.2"):
        resolve_site(model, "blocks.3.hook_attn_out")


def test_unsupported_family_is_named() -> None:
    with pytest.raises(ValueError, match="unsupported model family 'mistral'.*gpt2"):
        family(MistralConfig())


def test_check_layers() -> None:
    check_layers([0, 5, 29], 30, "sites.layers")
    for bad in (30, -1, True, "3"):
        with pytest.raises(ValueError, match=rf"'sites.layers'.*{bad!r}.*0\.\.29"):
            check_layers([0, bad], 30, "sites.layers")  # type: ignore[list-item]


def test_missing_models_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_model(str(missing))
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model.*offline"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(FileNotFoundError, match=str(missing)):
        describe(str(missing))
    assert describe("no-such-org/no-such-model") is None  # not cached: unknown, not an error
    with pytest.raises(ValueError, match="dtype 'float8'"):
        load_model(str(missing), dtype="float8")


def test_packaged_model_generates_paris(packaged_model_dir: Path) -> None:
    model, tokenizer = load_model(str(packaged_model_dir))
    assert next(model.parameters()).dtype == torch.float32
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        # load_model's type is PreTrainedModel; the causal-LM class it loads adds generate()
        out = model.generate(  # pyright: ignore[reportCallIssue]
            **prompt, max_new_tokens=4, do_sample=False
        )
    continuation = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
    assert "Paris" in continuation
    assert layers_module_path(model) == "model.layers"


def test_describe_packaged_agrees_with_gguf_and_converted_folder(packaged_model_dir: Path) -> None:
    dims = describe("packaged")
    assert dims == (30, 576, "llama")
    assert describe(str(packaged_model_dir)) == dims
    # the fast header walk reads the same values as gguf's own (slow) reader
    keys = ["general.architecture", "llama.block_count", "llama.embedding_length",
            "llama.rope.freq_base", "tokenizer.ggml.bos_token_id", "general.quantization_version"]  # fmt: skip
    reader = gguf.GGUFReader(packaged_gguf_path())
    assert gguf_metadata(packaged_gguf_path(), keys) == {
        k: reader.fields[k].contents() for k in keys
    }
