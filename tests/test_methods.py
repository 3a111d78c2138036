"""Fine-tuning methods on tiny random models: what trains, PEFT invariants, save/load, QLoRA on CPU."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from lorafit import methods as M
from lorafit._optional import linear4bit_class
from lorafit.config import MethodConfig, ModelConfig, TrainConfig
from lorafit.errors import ConfigError, ModelError
from lorafit.evaluate import _slices_by_mask, causal_lm_logits
from lorafit.models import TextClassifier
from tests.test_trainer import run_tiny, sentiment_dir  # noqa: F401  (fixture)

IDS = torch.tensor([[2, 40, 50, 60, 70, 3], [2, 41, 42, 3, 0, 0]])  # [B=2, T=6]
MASK = (IDS != 0).long()


def _build(path: str, task: str = "classification", **method: object) -> M.Built:
    torch.manual_seed(0)
    # 64 leaves room for prompt-learning's 20 virtual tokens within the tiny BERT's 128 positions
    model_cfg = ModelConfig(name_or_path=path, max_length=64)
    return M.build_model(model_cfg, MethodConfig(**method), task, num_labels=3)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=MASK)
    return out if torch.is_tensor(out) else out.logits


def _train_step(
    model: torch.nn.Module, lr: float = 0.05, before_zero_grad: Callable[[], None] = lambda: None
) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(input_ids=IDS, attention_mask=MASK)
    logits = out if torch.is_tensor(out) else out.logits
    loss = logits.float().pow(2).mean() - logits.float()[..., 0].mean()
    loss.backward()
    torch.optim.SGD(params, lr=lr).step()
    before_zero_grad()
    model.zero_grad()
    model.eval()


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- what trains ----------------------------------------------------------------------------------

CLASSIFICATION_METHODS = ["full", "head", "lora", "qlora", "ia3", "prompt_tuning", "loha", "lokr"]
CAUSAL_METHODS = ["full", "lora", "qlora", "ia3", "prompt_tuning"]


@pytest.mark.parametrize(
    "task,name",
    [("classification", m) for m in CLASSIFICATION_METHODS]
    + [("causal_lm", m) for m in CAUSAL_METHODS],
)
def test_a_step_changes_trainable_parameters_only(tiny_bert_path, tiny_llama_path, task, name):
    path = tiny_bert_path if task == "classification" else tiny_llama_path
    built = _build(path, task, name=name)
    model = built.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = _snapshot(model)
    _train_step(model)
    after = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "nothing trained"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:3]}"
    assert built.info["method"] == name
    assert built.info["quantized"] == (name == "qlora")
    assert 0 < built.info["trainable_params"] <= built.info["total_params"]
    if task == "classification":
        assert {n for n in trainable if n.startswith("head.")} == {"head.weight", "head.bias"}


def test_trainable_counts(tiny_bert_path):
    hidden, inter, layers, classes, r = 64, 128, 2, 3, 8
    head = hidden * classes + classes
    pooler = hidden * hidden + hidden
    full = _build(tiny_bert_path, name="full").info
    assert full["trainable_params"] == full["total_params"]
    assert _build(tiny_bert_path, name="head").info["trainable_params"] == head
    lora = _build(tiny_bert_path, name="lora", r=r).info
    # query, key, value, attention.output.dense: H->H; intermediate: H->I; output: I->H
    per_layer = 4 * r * (hidden + hidden) + 2 * r * (hidden + inter)
    assert lora["target_modules"] == ["query", "key", "value", "dense"]
    assert lora["pooling"] == "pooler"
    # the pooler trains whole (modules_to_save), the head alongside
    assert lora["trainable_params"] == layers * per_layer + pooler + head
    assert lora["total_params"] == full["total_params"] + layers * per_layer + pooler
    qlora = _build(tiny_bert_path, name="qlora", r=r).info
    assert qlora["trainable_params"] == lora["trainable_params"]
    assert qlora["total_params"] == lora["total_params"]  # 4-bit weights counted unpacked


def test_target_module_choices(tiny_bert_path, tiny_llama_path):
    llama = _build(tiny_llama_path, "causal_lm", name="lora").info["target_modules"]
    assert llama == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    attention = _build(tiny_llama_path, "causal_lm", name="lora", target_modules="attention")
    assert attention.info["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert not any("mlp" in n and "lora_" in n for n, _ in attention.model.named_parameters())
    all_linear = _build(tiny_llama_path, "causal_lm", name="lora", target_modules="all-linear")
    assert set(all_linear.info["target_modules"]) == set(llama)  # lm_head excluded
    listed = _build(tiny_bert_path, name="lora", target_modules=["query", "value"])
    names = [n for n, _ in listed.model.named_parameters() if "lora_A" in n]
    assert len(names) == 4 and all(".query." in n or ".value." in n for n in names)
    with pytest.raises(ConfigError, match="match no layer"):
        _build(tiny_bert_path, name="lora", target_modules=["q_proj"])


def test_lora_on_a_bert_never_adapts_the_pooler(tiny_bert_path):
    model = _build(tiny_bert_path, name="lora").model
    assert not any("pooler" in n and "lora_" in n for n, _ in model.named_parameters())


def test_rslora_dora_and_init_options_reach_peft(tiny_bert_path):
    model = _build(
        tiny_bert_path, name="lora", use_rslora=True, use_dora=True, init_lora_weights="gaussian"
    ).model
    config = model.encoder.peft_config["default"]
    assert config.use_rslora and config.use_dora and config.init_lora_weights == "gaussian"
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


def test_peft_kwargs_pass_through_and_are_checked(tiny_bert_path):
    model = _build(
        tiny_bert_path, name="prompt_tuning", peft_kwargs={"num_virtual_tokens": 4}
    ).model
    assert model.encoder.peft_config["default"].num_virtual_tokens == 4
    with pytest.raises(ConfigError, match="not options of"):
        _build(tiny_bert_path, name="lora", peft_kwargs={"rank": 4})


def test_oft_trains_with_defaults_and_refuses_two_block_settings(tiny_bert_path):
    # oft's r is a block count, exclusive with its oft_block_size: the defaults must not set both
    built = _build(tiny_bert_path, name="oft")
    assert built.model.encoder.peft_config["default"].r == 0
    before = _snapshot(built.model)
    _train_step(built.model)
    _train_step(built.model)
    assert any(not torch.equal(before[n], p) for n, p in built.model.named_parameters())
    blocks = _build(tiny_bert_path, name="oft", r=4).model.encoder.peft_config["default"]
    assert (blocks.r, blocks.oft_block_size) == (4, 0)
    with pytest.raises(ConfigError, match=r"method.r.*method.peft_kwargs.oft_block_size") as err:
        _build(tiny_bert_path, name="oft", r=4, peft_kwargs={"oft_block_size": 16})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_every_listed_peft_method_trains_a_step_or_is_refused_in_one_line(
    tiny_bert_path, tiny_llama_path, task
):
    # a method lorafit lists must not die with a raw traceback on a model it cannot adapt
    path = tiny_bert_path if task == "classification" else tiny_llama_path
    trained, refused = [], []
    for name in M.peft_method_names():
        try:
            built = _build(path, task, name=name)
        except ConfigError as e:
            assert "\n" not in str(e), name
            refused.append(name)
            continue
        trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
        before = _snapshot(built.model)
        _train_step(built.model)
        changed = {n for n, p in built.model.named_parameters() if not torch.equal(before[n], p)}
        assert changed and changed <= trainable, name
        trained.append(name)
    assert {"lora", "ia3", "ln_tuning", "prompt_tuning", "vera"} <= set(trained)
    assert len(trained) > 2 * len(refused), refused  # the refusals stay the exception


def test_methods_that_cannot_train_here_are_refused_at_config_load():
    for name, reason in M.UNSUPPORTED_PEFT_METHODS.items():
        assert name not in M.peft_method_names()
        with pytest.raises(ConfigError, match=f"method.name={name} is not supported: it") as err:
            MethodConfig(name=name)
        assert reason in str(err.value)


def test_ln_tuning_trains_the_norm_layers(tiny_bert_path, tiny_llama_path):
    built = _build(tiny_bert_path, name="ln_tuning")
    assert built.info["target_modules"] == ["LayerNorm"]
    encoder = {n for n, p in built.model.named_parameters() if p.requires_grad}
    encoder = {n for n in encoder if not n.startswith("head.") and ".pooler." not in n}
    assert encoder and all("LayerNorm" in n for n in encoder)
    # 1 embedding + 2 per layer, each a weight and a bias of the hidden size
    assert sum(p.numel() for n, p in built.model.named_parameters() if n in encoder) == 5 * 2 * 64
    listed = _build(tiny_bert_path, name="ln_tuning", target_modules=["LayerNorm"])
    assert listed.info["trainable_params"] == built.info["trainable_params"]
    llama = _build(tiny_llama_path, "causal_lm", name="ln_tuning").model
    names = [n for n, p in llama.named_parameters() if p.requires_grad]
    assert names and all("norm" in n for n in names)


def test_methods_with_required_settings(tiny_llama_path):
    with pytest.raises(ConfigError, match="method.peft_kwargs.token_indices"):
        _build(tiny_llama_path, "causal_lm", name="trainable_tokens")
    tokens = _build(
        tiny_llama_path, "causal_lm", name="trainable_tokens", peft_kwargs={"token_indices": [5, 6]}
    )
    assert 0 < tokens.info["trainable_params"] < tokens.info["total_params"]
    prompt = _build(tiny_llama_path, "causal_lm", name="adaption_prompt").model
    assert prompt.peft_config["default"].adapter_layers == 2  # every layer of the tiny Llama


def test_unknown_method_lists_valid_names(tiny_bert_path):
    with pytest.raises(ConfigError, match=r"did you mean 'lora'\? Known methods: .*ia3") as err:
        _build(tiny_bert_path, name="lorra")
    assert "prompt_tuning" in str(err.value) and "qlora" in str(err.value)


def test_head_method_needs_classification(tiny_llama_path):
    with pytest.raises(ConfigError, match="classification head"):
        _build(tiny_llama_path, "causal_lm", name="head")


@pytest.mark.parametrize("task,limit", [("classification", 128), ("causal_lm", 256)])
def test_max_length_beyond_the_position_limit_is_refused(
    tiny_bert_path, tiny_llama_path, task, limit
):
    path = tiny_bert_path if task == "classification" else tiny_llama_path
    model_cfg = ModelConfig(name_or_path=path, max_length=limit + 1)
    with pytest.raises(ConfigError) as err:
        M.build_model(model_cfg, MethodConfig(name="lora"), task, num_labels=2)
    message = str(err.value)
    assert f"model.max_length={limit + 1}" in message and f"{limit} positions" in message
    assert "\n" not in message
    model_cfg.max_length = limit  # the limit itself is fine
    M.build_model(model_cfg, MethodConfig(name="lora"), task, num_labels=2)


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning"])
def test_max_length_counts_the_virtual_tokens(tiny_bert_path, name):
    # 128 positions; 4 virtual tokens in front of a 128-token input would crash the forward
    method_cfg = MethodConfig(name=name, peft_kwargs={"num_virtual_tokens": 4})
    model_cfg = ModelConfig(name_or_path=tiny_bert_path, max_length=128)
    with pytest.raises(ConfigError) as err:
        M.build_model(model_cfg, method_cfg, "classification", num_labels=2)
    message = str(err.value)
    assert "4 virtual tokens" in message and "model.max_length=124 or less" in message
    model_cfg.max_length = 124
    model = M.build_model(model_cfg, method_cfg, "classification", num_labels=2).model
    ids = torch.randint(5, 100, (2, 124))
    assert model(input_ids=ids, attention_mask=torch.ones_like(ids)).shape == (2, 2)


def test_reinit_top_layers(tiny_bert_path):
    pretrained = AutoModel.from_pretrained(tiny_bert_path).state_dict()
    model = _build(tiny_bert_path, name="full", reinit_layers=1).model
    state = model.encoder.state_dict()
    top, low = (
        "encoder.layer.1.attention.self.query.weight",
        "encoder.layer.0.attention.self.query.weight",
    )
    assert not torch.equal(state[top], pretrained[top])
    assert torch.equal(state[low], pretrained[low])
    with pytest.raises(ConfigError, match="full only"):
        _build(tiny_bert_path, name="lora", reinit_layers=1)


# -- causal-LM logits at the scored positions only -------------------------------------------------


@pytest.mark.parametrize("name", ["lora", "full", "prompt_tuning", "prefix_tuning"])
def test_causal_lm_logits_are_the_full_logits_at_the_scored_positions(tiny_llama_path, name):
    model = _build(tiny_llama_path, "causal_lm", name=name).model.eval()
    ids = torch.tensor([[2, 40, 50, 60, 70, 3], [2, 41, 42, 43, 3, 0]])  # [B=2, T=6]
    labels = torch.tensor([[-100, -100, 50, 60, 70, 3], [-100, -100, -100, 43, 3, -100]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}
    batch["row"] = torch.tensor([0, 1])
    head_inputs = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_inputs.append(tuple(args[0].shape))
    )
    with torch.no_grad():
        logits, targets, mask = causal_lm_logits(model, batch)  # [N, V], [N], [B, T]
        hook.remove()
        full = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, -6:]
    vocab = full.shape[-1]
    # row t predicts token t+1: the 4 + 2 positions before a scored token
    assert mask.tolist() == [[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]]
    assert targets.tolist() == [50, 60, 70, 3, 43, 3]
    torch.testing.assert_close(logits, full[mask])
    reference = F.cross_entropy(
        full[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(F.cross_entropy(logits, targets), reference)
    # the lm_head ran on the 6 scored positions only, unless virtual tokens come first
    prompt_learning = name in ("prompt_tuning", "prefix_tuning")
    assert (head_inputs[0][:-1] != (6,)) == prompt_learning


def test_only_models_that_slice_by_mask_get_the_mask():
    from transformers import LlamaForCausalLM

    class OwnSlicing(torch.nn.Module):  # its module has no slice_logits_to_keep
        def forward(self, input_ids, logits_to_keep=0):
            return input_ids

    assert _slices_by_mask(LlamaForCausalLM)
    assert not _slices_by_mask(OwnSlicing)


# -- PEFT invariants ------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_merged_lora_equals_unmerged(tiny_bert_path, tiny_llama_path, task):
    path = tiny_bert_path if task == "classification" else tiny_llama_path
    model = _build(
        path, task, name="lora", init_lora_weights=False
    ).model.eval()  # random B: a real delta
    unmerged = _logits(model)
    if task == "classification":
        model.encoder = model.encoder.merge_and_unload()
        merged = _logits(model)
    else:
        merged = _logits(model.merge_and_unload())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["loha", "ia3", "lokr", "lora"])
def test_merge_adapter_folds_the_trained_pooler_copy_in(tiny_bert_path, name):
    # default pooling on a BERT is the pooler, which the adapter trains whole (modules_to_save)
    model = _build(tiny_bert_path, name=name).model
    assert model.lorafit_meta["pooling"] == "pooler"
    _train_step(model)
    unmerged = _logits(model)
    merged = M.merge_adapter(model)
    assert not any(
        "modules_to_save" in n or "original_module" in n for n, _ in merged.named_modules()
    )
    torch.testing.assert_close(_logits(merged), unmerged, atol=1e-5, rtol=1e-4)


ADALORA_SCHEDULE = {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 2}


def _singular_values(model: torch.nn.Module) -> list[torch.Tensor]:
    # one lora_E [r, 1] per adapted layer; AdaLoRA prunes a rank by zeroing its entry
    return [p for n, p in model.named_parameters() if "lora_E" in n]


def _kept_ranks(model: torch.nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in _singular_values(model))


def test_adalora_prunes_ranks_and_saves_the_weights_it_evaluated(tiny_bert_path, tmp_path):
    steps = 8
    method = M.for_training(
        MethodConfig(name="adalora", peft_kwargs=ADALORA_SCHEDULE), TrainConfig(steps=steps)
    )
    assert method.peft_kwargs["total_step"] == steps  # train.steps, left unset by the user
    torch.manual_seed(0)
    model_cfg = ModelConfig(name_or_path=tiny_bert_path)
    built = M.build_model(model_cfg, method, "classification", num_labels=3)
    model, update_ranks = built.model, M.rank_update_hook(built.model)
    adapted = len(_singular_values(model))
    kept = []
    for step in range(1, steps + 1):
        _train_step(model, before_zero_grad=partial(update_ranks, step))
        kept.append(_kept_ranks(model))
        if step == 3:
            best = M.trainable_state_dict(model)
    assert kept[0] == adapted * ADALORA_SCHEDULE["init_r"]
    assert kept[-1] == adapted * ADALORA_SCHEDULE["target_r"]  # the final budget
    # the best step's weights use ranks pruned later; the saved adapter keeps them
    M.load_trainable_state_dict(model, best)
    expected = _logits(model)
    M.save_trained(model, tmp_path / "saved", tokenizer=built.tokenizer)
    reloaded, _, _ = M.load_trained(tmp_path / "saved")
    assert all(len(p) == ADALORA_SCHEDULE["init_r"] for p in _singular_values(reloaded))
    torch.testing.assert_close(_logits(reloaded), expected, atol=0, rtol=0)
    torch.testing.assert_close(_logits(M.merge_adapter(reloaded)), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="train.resume"):
        M.for_training(MethodConfig(name="adalora"), TrainConfig(resume=True))


def test_trainer_gives_adalora_its_steps_and_prunes(tiny_bert_path, sentiment_dir, tmp_path):  # noqa: F811
    summary = run_tiny(
        tiny_bert_path,
        sentiment_dir,
        tmp_path / "run",
        **{
            "method.name": "adalora",
            "method.peft_kwargs": "{init_r: 6, target_r: 2}",
            "train.steps": 4,
        },
    )
    assert summary["status"] == "completed"
    model, _, meta = M.load_trained(tmp_path / "run" / "adapter")
    assert meta["method_config"]["peft_kwargs"]["total_step"] == 4
    adapted = len(_singular_values(model))
    assert _kept_ranks(model) == adapted * 2  # pruned to target_r by the end of train.steps


def test_disabled_adapter_gives_the_base_model(tiny_bert_path):
    model = _build(tiny_bert_path, name="lora", init_lora_weights=False).model.eval()
    base = AutoModel.from_pretrained(tiny_bert_path).eval()
    with torch.no_grad():
        expected = base(input_ids=IDS, attention_mask=MASK)
        adapted = model.encoder(input_ids=IDS, attention_mask=MASK)
        with model.encoder.disable_adapter():
            disabled = model.encoder(input_ids=IDS, attention_mask=MASK)
    assert not torch.allclose(adapted.last_hidden_state, expected.last_hidden_state, atol=1e-4)
    torch.testing.assert_close(disabled.last_hidden_state, expected.last_hidden_state)
    torch.testing.assert_close(disabled.pooler_output, expected.pooler_output)


# -- save / load ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task,name",
    [("classification", m) for m in ("full", "head", "lora", "ia3", "prompt_tuning")]
    + [("causal_lm", m) for m in ("full", "lora")],
)
def test_save_load_round_trip_gives_identical_logits(
    tiny_bert_path, tiny_llama_path, tmp_path, task, name
):
    path = tiny_bert_path if task == "classification" else tiny_llama_path
    built = _build(path, task, name=name)
    _train_step(built.model)
    expected = _logits(built.model)
    M.save_trained(built.model, tmp_path / "saved", tokenizer=built.tokenizer)
    files = {p.name for p in (tmp_path / "saved").iterdir()}
    assert "lorafit_model.json" in files and "tokenizer_config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    if name not in ("full", "head"):
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    if task == "classification":
        assert "head.safetensors" in files
    model, tokenizer, meta = M.load_trained(tmp_path / "saved")
    assert meta["method"] == name and meta["task"] == task
    assert tokenizer.pad_token is not None
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(_logits(model), expected, atol=1e-6, rtol=1e-6)


def test_pool_layers_default_to_the_method_recipe(tiny_bert_path):
    depth = AutoModel.from_pretrained(tiny_bert_path).config.num_hidden_layers
    for name, pooling, expected in (
        ("head", "mean", min(3, depth)),  # 3, capped at the model's depth
        ("head", "cls", min(3, depth)),
        ("head", "pooler", 1),  # the pooler reads the last layer only
        ("lora", "mean", 1),
        ("full", "mean", 1),
    ):
        cfg = ModelConfig(name_or_path=tiny_bert_path, pooling=pooling)
        built = M.build_model(cfg, MethodConfig(name=name), "classification", num_labels=3)
        assert built.model.pool_layers == expected, (name, pooling)
        assert built.info["pool_layers"] == expected
    explicit = ModelConfig(name_or_path=tiny_bert_path, pooling="mean", pool_layers=1)
    built = M.build_model(explicit, MethodConfig(name="head"), "classification", num_labels=3)
    assert built.model.pool_layers == 1


def test_pool_layers_survive_save_and_load(tiny_bert_path, tmp_path):
    torch.manual_seed(0)
    model_cfg = ModelConfig(name_or_path=tiny_bert_path, pooling="mean", pool_layers=2)
    built = M.build_model(model_cfg, MethodConfig(name="lora"), "classification", num_labels=3)
    assert built.model.pool_layers == 2
    _train_step(built.model)
    expected = _logits(built.model)
    M.save_trained(built.model, tmp_path / "saved", tokenizer=built.tokenizer)
    model, _, meta = M.load_trained(tmp_path / "saved")
    assert model.pool_layers == 2 and meta["model_config"]["pool_layers"] == 2
    torch.testing.assert_close(_logits(model), expected, atol=1e-6, rtol=1e-6)


def test_load_trained_refuses_pickles_and_foreign_folders(tiny_bert_path, tmp_path):
    with pytest.raises(ModelError, match="lorafit_model.json"):
        M.load_trained(tmp_path)
    built = _build(tiny_bert_path, name="lora")
    M.save_trained(built.model, tmp_path / "saved")
    (tmp_path / "saved" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelError, match="safetensors only"):
        M.load_trained(tmp_path / "saved")


def test_trainable_state_dict_round_trip(tiny_bert_path):
    model = _build(tiny_bert_path, name="lora").model
    snapshot = M.trainable_state_dict(model)
    assert set(snapshot) == {n for n, p in model.named_parameters() if p.requires_grad}
    expected = _logits(model)
    _train_step(model, lr=1.0)
    assert not torch.allclose(_logits(model), expected)
    M.load_trainable_state_dict(model, snapshot)
    torch.testing.assert_close(_logits(model), expected, atol=0, rtol=0)
    with pytest.raises(ModelError, match="do not match"):
        M.load_trainable_state_dict(model, {"head.weight": snapshot["head.weight"]})


# -- optimiser groups -----------------------------------------------------------------------------


def _group_of(groups: list[dict], model: torch.nn.Module, name: str) -> dict:
    param = dict(model.named_parameters())[name]
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_param_groups_decay_head_lr_and_layer_decay(tiny_bert_path):
    model = _build(tiny_bert_path, name="full").model
    train = TrainConfig(lr=1e-3, head_lr=1e-2, weight_decay=0.1, layer_lr_decay=0.5)
    groups = M.param_groups(model, train, MethodConfig(name="full"))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    get = lambda n: _group_of(groups, model, n)  # noqa: E731
    assert get("head.weight")["lr"] == 1e-2 and get("head.weight")["weight_decay"] == 0.1
    assert get("head.bias")["weight_decay"] == 0.0
    assert get("encoder.encoder.layer.1.attention.output.LayerNorm.weight")["weight_decay"] == 0.0
    top = get("encoder.encoder.layer.1.attention.self.query.weight")["lr"]
    low = get("encoder.encoder.layer.0.attention.self.query.weight")["lr"]
    embeddings = get("encoder.embeddings.word_embeddings.weight")["lr"]
    assert (top, low, embeddings) == pytest.approx((1e-3, 5e-4, 2.5e-4))


def test_param_groups_skip_frozen_parameters(tiny_bert_path):
    model = _build(tiny_bert_path, name="head").model
    groups = M.param_groups(model, TrainConfig(), MethodConfig(name="head"))
    assert sum(p.numel() for g in groups for p in g["params"]) == 3 * 64 + 3


# -- QLoRA on CPU: the repacking pitfall ----------------------------------------------------------


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """Pretend this CPU has avx512_bf16, so bitsandbytes enables its CPU repacking fast path."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def _linear4bit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    # bitsandbytes' layer (peft's LoRA wrapper around it has the same class name)
    return [m for m in model.modules() if isinstance(m, linear4bit_class())]


def _dequantized(model: torch.nn.Module) -> list[torch.Tensor]:
    import bitsandbytes.functional as F

    return [
        F.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in _linear4bit_layers(model)
    ]


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_qlora_eval_forward_keeps_weights_merge_and_save_sound(
    avx512bf16_cpu, tiny_bert_path, tiny_llama_path, tmp_path, task
):
    path = tiny_bert_path if task == "classification" else tiny_llama_path
    built = _build(path, task, name="qlora")
    model = built.model
    layers = _linear4bit_layers(model)
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    if task == "classification":  # the pooler is skipped from quantisation: it trains
        assert not _linear4bit_layers(model.encoder.base_model.model.pooler)
    _train_step(model)
    weights_before = _dequantized(model)
    expected = _logits(model)  # the no-grad eval forward that used to repack the weights
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    for before, after in zip(weights_before, _dequantized(model)):
        torch.testing.assert_close(after, before, atol=0, rtol=0)
    torch.testing.assert_close(_logits(model), expected, atol=0, rtol=0)

    M.save_trained(model, tmp_path / "saved", tokenizer=built.tokenizer)
    loaded, _, meta = M.load_trained(tmp_path / "saved")
    assert meta["quantized"]
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-6, rtol=1e-6)

    # Merging re-quantises W + BA, so it is lossy; but after an eval forward it must give exactly
    # what a merge of the same weights gives without one (a repacked weight merges into garbage).
    twin = _build(path, task, name="qlora").model
    _train_step(twin)
    assert _merged_logits(model).equal(_merged_logits(twin))


def _merged_logits(model: torch.nn.Module) -> torch.Tensor:
    if isinstance(model, TextClassifier):
        model.encoder = model.encoder.merge_and_unload()
        return _logits(model)
    return _logits(model.merge_and_unload())


def test_the_pitfall_is_real_without_the_fix(avx512bf16_cpu, tiny_bert_path):
    """Control: with the fast path left on, an eval forward repacks the weights (what the fix stops)."""
    model = _build(tiny_bert_path, name="qlora").model
    layers = _linear4bit_layers(model)
    for m in layers:
        m.support_avx512bf16_for_cpu = True
    _logits(model.eval())
    assert all(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


def test_classifier_is_a_text_classifier_with_peft_encoder(tiny_bert_path):
    model = _build(tiny_bert_path, name="lora").model
    assert isinstance(model, TextClassifier)
    assert _logits(model).shape == (2, 3)
    assert Path(model.lorafit_meta["base_model"]) == Path(tiny_bert_path)


def test_importing_lorafit_drops_only_the_two_known_library_notices(tiny_bert_path):
    """bitsandbytes' "install kernels" notice (a CPU path lorafit switches off) and peft's
    FutureWarning about transformers' is_gradient_checkpointing are dropped; their neighbours
    on the same logger and of the same category still print. The LoRA model is built for real,
    so the warning peft raises while wrapping is covered too."""
    import subprocess
    import sys

    code = f"""
import logging, warnings
import lorafit
from lorafit import methods as M
from lorafit.config import MethodConfig, ModelConfig
M.build_model(ModelConfig(name_or_path={tiny_bert_path!r}), MethodConfig(name="lora", r=4),
              "classification", num_labels=2)
bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: no module")
bnb.warning("another bitsandbytes notice")
warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning)
warnings.warn("another future warning", FutureWarning)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "kernels-community" not in proc.stderr
    assert "is_gradient_checkpointing" not in proc.stderr
    assert "another bitsandbytes notice" in proc.stderr
    assert "another future warning" in proc.stderr


def test_an_unknown_method_name_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"'lorra' is not a known method; did you mean 'lora'\?"):
        M.check_method_name("lorra")
    for typed in ("lroa", "LoRA"):  # swapped letters, another case: lorafit's own names first
        with pytest.raises(
            ConfigError, match=rf"'{typed}' is not a known method; did you mean 'lora'\?"
        ):
            M.check_method_name(typed)
    with pytest.raises(ConfigError, match=r"'qlroa' is not a known method; did you mean 'qlora'\?"):
        M.check_method_name("qlroa")
    with pytest.raises(
        ConfigError,
        match=r"'zzz' is not a known method; use one of full, head, lora, qlora, or a PEFT method: ",
    ):
        M.check_method_name("zzz")
    M.check_method_name("ia3")  # any PEFT method is known


def test_saved_weights_and_checkpoints_get_umask_permissions(tiny_bert_path, tmp_path):
    # safetensors writes owner-only files: another user could not `lorafit predict` a run
    import os

    from lorafit.checkpoint import save_checkpoint

    built = _build(tiny_bert_path, name="lora")
    model = built.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    old = os.umask(0o022)
    try:
        M.save_trained(model, tmp_path / "saved", tokenizer=built.tokenizer)
        weights = M.trainable_state_dict(model)
        ckpt = save_checkpoint(
            tmp_path / "ckpt", 5, weights, optimizer, scheduler, {}, None, None, 2
        )
    finally:
        os.umask(old)
    files = [*(tmp_path / "saved").rglob("*"), *ckpt.rglob("*")]
    assert any(f.suffix == ".safetensors" for f in files)
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o644 for f in files}
    assert ckpt.stat().st_mode & 0o777 == 0o755
