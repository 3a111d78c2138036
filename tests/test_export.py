"""Deployment: export (adapter / merged / QLoRA), load with base checks, predict, multi-adapter, interop."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from lorafit import methods as M
from lorafit.config import MethodConfig, ModelConfig, load_config
from lorafit.errors import DataError, ModelError
from lorafit.export import MANIFEST_FILE, export_run, load
from lorafit.predict import InputColumns, Predictor, read_inputs
from lorafit.trainer import train
from tests.conftest import TINY_SEED
from tests.test_trainer import sentiment_rows, tiny_overrides
from tests.tiny import run_cli, tiny_bert

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["the movie was great", "a terrible boring film", "wonderful acting and a charming story"]
LONG = " ".join(["the worst movie with bad acting"] * 10)  # > max_length=16 tokens


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _encode(tokenizer, texts=TEXTS) -> dict:
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt"))


@torch.no_grad()
def _logits(model, batch: dict) -> torch.Tensor:
    out = model.eval()(**batch)
    return out if torch.is_tensor(out) else out.logits


def _save_random_lora(path: str, task: str, out: Path, seed: int, **method) -> Path:
    """A saved (untrained) adapter with random LoRA B: merging it changes the weights."""
    torch.manual_seed(seed)
    built = M.build_model(
        ModelConfig(name_or_path=path, max_length=16 if task == "classification" else 64),
        MethodConfig(name=method.pop("name", "lora"), r=4, init_lora_weights=False, **method),
        task,
        label_names=["neg", "pos"] if task == "classification" else None,
    )
    if task == "classification":
        torch.nn.init.normal_(built.model.head.weight, std=0.5)
    M.save_trained(built.model, out, tokenizer=built.tokenizer)
    return out


# -- shared artefacts (one trained run per module) ------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def cls_run(tiny_bert_path, work) -> Path:
    data = work / "data"
    data.mkdir()
    for split, n, seed in (("train", 40, 0), ("test", 12, 1)):
        with open(data / f"{split}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in sentiment_rows(n, seed))
    overrides = tiny_overrides(
        tiny_bert_path,
        data,
        work / "run",
        **{"train.steps": 4, "train.lr": 5e-2, "data.k_shot": 4, "output.plot": "false"},
    )
    train(load_config(None, overrides))
    return work / "run"


@pytest.fixture(scope="module")
def cls_export(cls_run, work) -> Path:
    return export_run(cls_run, work / "cls_export")


@pytest.fixture(scope="module")
def cls_merged(cls_run, work) -> Path:
    return export_run(cls_run, work / "cls_merged", merge=True)


@pytest.fixture(scope="module")
def llama_export(tiny_llama_path, work) -> Path:
    saved = _save_random_lora(tiny_llama_path, "causal_lm", work / "llama_saved", seed=1)
    return export_run(saved, work / "llama_export")


# -- export ---------------------------------------------------------------------------------------


def test_adapter_export_holds_peft_files_and_manifest(cls_run, cls_export, tiny_bert_path):
    files = {p.name for p in cls_export.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors"} <= files
    assert {"lorafit_model.json", "label_map.json", "tokenizer.json", MANIFEST_FILE} <= files
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    manifest = json.loads((cls_export / MANIFEST_FILE).read_text())
    summary = json.loads((cls_run / "summary.json").read_text())
    base = manifest["base_model"]
    assert base["name_or_path"] == tiny_bert_path
    assert base["weights_sha256"] == {
        "model.safetensors": _sha(Path(tiny_bert_path) / "model.safetensors")
    }
    assert manifest["kind"] == "adapter" and manifest["task"] == "classification"
    assert manifest["label_map"] == {"labels": ["neg", "pos"], "label2id": {"neg": 0, "pos": 1}}
    assert "tokenizer.json" in manifest["tokenizer_files"]
    assert manifest["lorafit_version"] == __import__("lorafit").__version__
    assert manifest["training"]["config_sha256"] == summary["config_sha256"]
    # K-shot LoRA refits on train + validation: the manifest says what the weights saw
    assert manifest["training"]["refit"]["num_train"] == summary["refit"]["num_train"] == 16
    assert manifest["training"]["refit"]["steps"] == summary["refit"]["steps"]
    assert "monitored_train_sample" not in manifest["training"]["refit"]
    assert manifest["test_metrics"]["accuracy"] == summary["test"]["accuracy"]
    for name, sha in manifest["files_sha256"].items():
        assert _sha(cls_export / name) == sha, name
    # the adapter is byte-identical to the run's
    assert _sha(cls_export / "adapter_model.safetensors") == _sha(
        cls_run / "adapter" / "adapter_model.safetensors"
    )


def test_export_refuses_an_existing_output(cls_run, cls_export):
    with pytest.raises(ModelError, match="already exists"):
        export_run(cls_run, cls_export)


def test_merged_classifier_equals_adapter_and_loads_as_auto_sequence_classifier(
    cls_export, cls_merged, tiny_bert_path
):
    adapter = load(cls_export)
    merged = load(cls_merged)
    assert not (cls_merged / "adapter_model.safetensors").exists()
    batch = _encode(adapter.tokenizer)
    expected = _logits(adapter.model, batch)
    torch.testing.assert_close(_logits(merged.model, batch), expected, atol=1e-5, rtol=1e-5)
    # the adapter really changed the encoder: the merged weights are not the base's
    base = AutoModel.from_pretrained(tiny_bert_path)
    merged_weight = merged.model.encoder.encoder.layer[0].attention.self.query.weight
    assert not torch.allclose(merged_weight, base.encoder.layer[0].attention.self.query.weight)
    # pooling=pooler on BERT: plain transformers gives the same logits, with the label names
    plain = AutoModelForSequenceClassification.from_pretrained(cls_merged)
    torch.testing.assert_close(_logits(plain, batch), expected, atol=1e-5, rtol=1e-5)
    assert plain.config.id2label == {0: "neg", 1: "pos"}
    manifest = json.loads((cls_merged / MANIFEST_FILE).read_text())
    assert manifest["kind"] == "merged" and manifest["merge"]["max_abs_logit_diff"] <= 1e-3


def test_merged_causal_lm_loads_with_plain_transformers(llama_export, work):
    merged_dir = export_run(work / "llama_saved", work / "llama_merged", merge=True)
    adapter = load(llama_export)
    batch = _encode(adapter.tokenizer)
    expected = _logits(adapter.model, batch)
    plain = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert "lora" not in " ".join(n for n, _ in plain.named_modules())
    torch.testing.assert_close(_logits(plain, batch), expected, atol=1e-4, rtol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(adapter.meta["model_config"]["name_or_path"])
    assert not torch.allclose(_logits(base, batch), expected, atol=1e-3)


def test_qlora_merges_onto_the_dequantised_base_or_refuses(tiny_llama_path, work):
    saved = _save_random_lora(
        tiny_llama_path, "causal_lm", work / "qlora_saved", seed=2, name="qlora"
    )
    with pytest.raises(ModelError, match=r"differ from the adapter's by [0-9.e-]+ .*tolerance 0"):
        export_run(saved, work / "qlora_strict", merge=True, tolerance=0.0)
    assert not (work / "qlora_strict").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".qlora_strict")]  # no staging left

    merged_dir = export_run(saved, work / "qlora_merged", merge=True)
    report = json.loads((merged_dir / MANIFEST_FILE).read_text())["merge"]
    assert report["dequantized_base"] and 0 < report["max_abs_logit_diff"] <= report["tolerance"]
    adapter_4bit, tokenizer, _ = M.load_trained(saved)
    batch = _encode(tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert plain.dtype == torch.float32
    torch.testing.assert_close(
        _logits(plain, batch), _logits(adapter_4bit, batch), atol=report["tolerance"], rtol=0
    )


# -- load: bases, pickles, corrupt files ----------------------------------------------------------


def test_load_checks_the_base_hash(cls_export, tiny_bert_path, work):
    other_base = tiny_bert(work / "other_bert", seed=TINY_SEED + 1)  # same shapes, other weights
    with pytest.raises(ModelError, match="wrong base model") as err:
        load(cls_export, base_model=other_base)
    message = str(err.value)
    assert other_base in message and tiny_bert_path in message and "--base-model" in message
    expected = json.loads((cls_export / MANIFEST_FILE).read_text())["base_model"]["sha256"]
    assert expected[:16] in message
    moved = shutil.copytree(tiny_bert_path, work / "moved_bert")  # same weights elsewhere: fine
    assert load(cls_export, base_model=str(moved)).label_names == ["neg", "pos"]


def test_pickle_files_are_refused(cls_export, cls_run, work):
    copy = shutil.copytree(cls_export, work / "with_pickle")
    (copy / "adapter_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelError, match=r"pickle files \(adapter_model.bin\).*safetensors only"):
        load(copy)
    with pytest.raises(ModelError, match="pickle"):
        Predictor(copy)


def test_missing_or_corrupt_files_are_reported(cls_export, cls_run, work):
    corrupt = shutil.copytree(cls_export, work / "corrupt")
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="adapter_model.safetensors is corrupt"):
        load(corrupt)
    missing = shutil.copytree(cls_export, work / "missing")
    (missing / "head.safetensors").unlink()
    with pytest.raises(ModelError, match="head.safetensors is missing"):
        load(missing)
    # without a manifest (a run's adapter folder) the loader itself reports the broken file
    run_copy = shutil.copytree(cls_run / "adapter", work / "corrupt_saved")
    (run_copy / "adapter_model.safetensors").write_bytes(data[:100])
    with pytest.raises(ModelError, match="cannot load"):
        load(run_copy)
    with pytest.raises(ModelError, match="not a lorafit export"):
        load(work / "data")


# -- predict --------------------------------------------------------------------------------------


def test_predict_files_csv_jsonl_txt(cls_export, work):
    expected = Predictor(cls_export).predict(TEXTS)
    inputs = {
        "in.txt": "".join(t + "\n" for t in TEXTS) + "\n",
        "in.jsonl": "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS)),
        "in.csv": "id,sentence\n" + "".join(f"{i},{t}\n" for i, t in enumerate(TEXTS)),
    }
    for name, content in inputs.items():
        (work / name).write_text(content)
        out = work / f"{name}.preds.jsonl"
        code = run_cli(
            ["predict", str(cls_export), "--input", str(work / name), "--output", str(out)]
        )
        assert code == 0, name
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["row"] for r in rows] == [0, 1, 2]
        for row, want in zip(rows, expected):
            assert row["label"] == want["label"] and row["probs"] == want["probs"]
            assert sum(row["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert ("id" in rows[0]) == (name != "in.txt")


def test_predict_output_tables_csv_tsv(cls_export, pair_run, work):
    # A .csv/.tsv --output is a table (not JSON lines under a table's name): one row per input,
    # texts that need quoting survive a csv round trip, and a tsv stays readable with quoting off.
    texts = ['says "fine", then\nleaves', "tab\there", TEXTS[0]]
    (work / "odd.jsonl").write_text(
        "".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    want = Predictor(cls_export).predict(texts)
    for suffix in (".csv", ".tsv"):
        out = work / f"odd.preds{suffix}"
        argv = [
            "predict",
            str(cls_export),
            "--input",
            str(work / "odd.jsonl"),
            "--output",
            str(out),
        ]
        assert run_cli(argv) == 0
        with open(out, newline="") as fh:
            quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
            table = list(
                csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",", quoting=quoting)
            )
        labels = list(want[0]["probs"])
        assert list(table[0]) == ["row", "id", "text", "label", "label_id", "confidence"] + [
            f"prob_{name}" for name in labels
        ]
        assert [r["id"] for r in table] == ["r0", "r1", "r2"]
        if suffix == ".csv":
            assert [r["text"] for r in table] == texts
        else:  # tabs and newlines become spaces; quotes stay as they are
            assert [r["text"] for r in table] == [" ".join(t.split()) for t in texts]
        for row, pred in zip(table, want):
            assert row["label"] == pred["label"]
            assert float(row["confidence"]) == pytest.approx(max(pred["probs"].values()), abs=1e-6)
            for name in labels:
                assert float(row[f"prob_{name}"]) == pytest.approx(pred["probs"][name], abs=1e-6)
    # a sentence-pair model's table holds both texts
    out = work / "pairs.preds.csv"
    assert (
        run_cli(
            [
                "predict",
                str(pair_run),
                "--input",
                str(work / "pairs" / "test.jsonl"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    with open(out, newline="") as fh:
        table = list(csv.DictReader(fh))
    source = [json.loads(line) for line in (work / "pairs" / "test.jsonl").read_text().splitlines()]
    assert [(r["text"], r["text_pair"]) for r in table] == [
        (s["premise"], s["hypothesis"]) for s in source
    ]


def _pair_rows(n: int, seed: int) -> list[dict]:
    """A sentence-pair task: do the two texts share their sentiment?"""
    first, second = sentiment_rows(n, seed), sentiment_rows(n, seed + 100)
    rows = []
    for i, a in enumerate(first):
        b = second[(i + i // 2) % n]  # same sentiment for half of the pairs
        same = "same" if a["label"] == b["label"] else "different"
        rows.append({"premise": a["text"], "hypothesis": b["text"], "label": same})
    return rows


@pytest.fixture(scope="module")
def pair_run(tiny_bert_path, work) -> Path:
    """A run trained on sentence pairs (data.text=premise data.text_pair=hypothesis)."""
    data = work / "pairs"
    data.mkdir()
    for split, n, seed in (("train", 40, 0), ("test", 12, 1)):
        with open(data / f"{split}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in _pair_rows(n, seed))
    run = work / "pair_run"
    overrides = {"train.steps": 4, "data.k_shot": 4, "output.plot": "false"}
    overrides.update({"data.text": "premise", "data.text_pair": "hypothesis"})
    train(load_config(None, tiny_overrides(tiny_bert_path, data, run, **overrides)))
    return run


def test_sentence_pair_model_predicts_pairs_from_its_training_columns(pair_run, cls_export, work):
    run, data = pair_run, work / "pairs"
    # The CLI reads premise + hypothesis (the training columns, not in the usual names) and
    # predicts what the run's own test pass predicted for the same rows.
    out = work / "pairs.preds.jsonl"
    argv = ["predict", str(run), "--input", str(data / "test.jsonl"), "--output", str(out)]
    assert run_cli(argv) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    tested = [
        json.loads(line) for line in (run / "predictions" / "test.jsonl").read_text().splitlines()
    ]
    assert len(got) == len(tested) == 12
    for row, want in zip(got, tested):
        assert list(row["probs"].values()) == pytest.approx(want["prob"], abs=1e-4)

    # The second text changes the prediction: the model does not read the first one alone.
    predictor = Predictor(run)
    rows = _pair_rows(12, 1)
    pairs = predictor.predict([[r["premise"], r["hypothesis"]] for r in rows])
    swapped = predictor.predict([[r["premise"], rows[0]["hypothesis"]] for r in rows])
    assert [p["probs"] for p in pairs] != [s["probs"] for s in swapped]

    with pytest.raises(DataError, match="input 0: this model was trained on sentence pairs"):
        predictor.predict(["a single text"])
    with pytest.raises(DataError, match="input 0: .*not trained on sentence pairs"):
        Predictor(cls_export).predict([["a", "pair"]])
    (work / "array.jsonl").write_text(json.dumps(["a text", "its pair"]) + "\n")
    assert [row["input"] for row in read_inputs(work / "array.jsonl")] == [["a text", "its pair"]]
    (work / "no_pair.jsonl").write_text(json.dumps({"premise": "only one"}) + "\n")
    with pytest.raises(DataError, match="line 1: no 'hypothesis' column .*--text-pair-column"):
        read_inputs(work / "no_pair.jsonl", InputColumns(("premise",), "hypothesis"))


def test_predict_streams_stdin_to_stdout_and_fails_cleanly(cls_export, work):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    lines = ["the movie was great", json.dumps({"text": "a terrible boring film"}), LONG]
    stream = subprocess.run(
        [sys.executable, "-m", "lorafit", "predict", str(cls_export), "--input", "-"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert stream.returncode == 0, stream.stderr
    rows = [json.loads(line) for line in stream.stdout.splitlines()]
    # The stream predicts each line on its own (no padding against its neighbours), so the
    # exact expectation is each text predicted alone; batched padding moves the 6th decimal.
    predictor = Predictor(cls_export)
    expected = [
        predictor.predict([text])[0]
        for text in ["the movie was great", "a terrible boring film", LONG]
    ]
    assert [r["probs"] for r in rows] == [e["probs"] for e in expected]
    assert "1 of 1 inputs exceed max_length=16 tokens and were truncated" in stream.stderr


def test_empty_input_and_unknown_adapter_leave_no_output(cls_export, work, capsys):
    (work / "empty.txt").write_text("\n\n")
    out = work / "empty.preds.jsonl"
    code = run_cli(
        ["predict", str(cls_export), "--input", str(work / "empty.txt"), "--output", str(out)]
    )
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lorafit: error: {work / 'empty.txt'} has no input rows; nothing to predict"]
    (work / "one.txt").write_text("fine\n")
    code = run_cli(
        ["predict", f"sst={cls_export}", "--adapter", "nope", "--input", str(work / "one.txt"),
         "--output", str(out)]
    )  # fmt: skip
    assert code == 2 and not out.exists()
    assert "unknown adapter 'nope'; loaded adapters: sst" in capsys.readouterr().err
    with pytest.raises(DataError, match="no inputs"):
        Predictor(cls_export).predict([])


def test_truncation_warning_counts_long_inputs(cls_export, caplog):
    with caplog.at_level(logging.WARNING, logger="lorafit.predict"):
        Predictor(cls_export).predict([LONG, "short", LONG + " again"])
    assert "2 of 3 inputs exceed max_length=16 tokens and were truncated" in caplog.text
    assert "raise model.max_length" not in caplog.text  # one warning, not training's too


def test_causal_lm_generation_greedy(llama_export):
    predictor = Predictor(llama_export)
    first = predictor.predict(["write a short poem"], max_new_tokens=5)
    assert first == predictor.predict(["write a short poem"], max_new_tokens=5)  # greedy
    loaded = load(llama_export)
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "write a short poem"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = loaded.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = loaded.model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    text = loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert first == [{"generation": text}]


def test_an_over_long_prompt_is_cut_as_training_cuts_it(llama_export, caplog):
    from lorafit import data as D

    loaded = load(llama_export)
    tokenizer, max_length = loaded.tokenizer, loaded.max_length
    messages = [{"role": "user", "content": "Summarise: " + " ".join(["word"] * 4 * max_length)}]
    prompt = D._render_prompt(messages, tokenizer)
    full = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tail = D._template_tail(messages, tokenizer)
    assert len(full) > max_length and tail  # the template's end: the assistant marker
    cut = D.fit_prompt(full, messages, tokenizer, max_length)
    assert len(cut) == max_length and cut[-len(tail) :] == tail
    assert cut[: max_length - len(tail)] == full[: max_length - len(tail)]  # "Summarise:" kept
    # predict generates from exactly that cut
    expected = loaded.model.generate(
        input_ids=torch.tensor([cut]), max_new_tokens=3, do_sample=False
    )
    text = tokenizer.decode(expected[0, len(cut) :], skip_special_tokens=True)
    with caplog.at_level(logging.WARNING, logger="lorafit.predict"):
        result = Predictor(llama_export).predict([messages[0]["content"]], max_new_tokens=3)
    assert result == [{"generation": text}]
    assert "the head and the assistant marker, as in training" in caplog.text


@pytest.mark.parametrize("name", ["prefix_tuning", "prompt_tuning"])
def test_prompt_learning_generation_in_batches_equals_one_at_a_time(tiny_llama_path, work, name):
    torch.manual_seed(0)
    built = M.build_model(
        ModelConfig(name_or_path=tiny_llama_path, max_length=64),
        MethodConfig(name=name, peft_kwargs={"num_virtual_tokens": 4}),
        "causal_lm",
    )
    M.save_trained(built.model, work / name, tokenizer=built.tokenizer)
    predictor = Predictor(export_run(work / name, work / f"{name}_export"))
    prompts = ["hi", "write a short poem about the sea", "a b c", "tell me more about it"]
    alone = [predictor.predict([p], max_new_tokens=4)[0] for p in prompts]
    assert predictor.predict(prompts, max_new_tokens=4, batch_size=4) == alone


# -- several adapters on one base -----------------------------------------------------------------


def test_multi_adapter_switching_matches_each_adapter_alone(cls_export, tiny_bert_path, work):
    second = _save_random_lora(tiny_bert_path, "classification", work / "second", seed=3)
    alone = {
        "sst": Predictor(cls_export).predict(TEXTS),
        "other": Predictor(second).predict(TEXTS),
    }
    assert alone["sst"] != alone["other"]
    shared = Predictor({"sst": cls_export, "other": second})
    for name in ("sst", "other", "sst", "other"):
        assert shared.predict(TEXTS, adapter=name) == alone[name], name
    with pytest.raises(ModelError, match="unknown adapter 'x'; loaded adapters: sst, other"):
        shared.predict(TEXTS, adapter="x")
    with pytest.raises(ModelError, match="several adapters"):
        shared.predict(TEXTS)
    # one base in memory: the second adapter adds only its LoRA weights
    encoders = {id(a.model.encoder) for a in shared._adapters.values()}
    assert len(encoders) == 1
    # per-row adapter choice through the CLI
    rows = [{"text": t, "adapter": n} for t in TEXTS for n in ("other", "sst")]
    (work / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = work / "mixed.preds.jsonl"
    argv = ["predict", f"sst={cls_export}", f"other={second}", "--input", str(work / "mixed.jsonl")]
    assert run_cli([*argv, "--output", str(out)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    for i, row in enumerate(got):
        assert row["adapter"] == rows[i]["adapter"]
        assert row["probs"] == alone[row["adapter"]][i // 2]["probs"]


# -- interop with plain peft ----------------------------------------------------------------------


def test_lorafit_export_loads_in_plain_peft(
    cls_export, llama_export, tiny_bert_path, tiny_llama_path
):
    from peft import PeftModel

    ours = load(cls_export)
    batch = _encode(ours.tokenizer)
    encoder = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert_path), cls_export)
    with torch.no_grad():
        out = encoder.eval()(**batch)
        torch.testing.assert_close(
            out.last_hidden_state, ours.model.encoder(**batch).last_hidden_state
        )
        # the documented recipe (docs/deployment.md): pooling from the manifest, then the head
        head = load_file(str(cls_export / "head.safetensors"))
        assert json.loads((cls_export / MANIFEST_FILE).read_text())["pooling"] == "pooler"
        logits = out.pooler_output @ head["head.weight"].T + head["head.bias"]
    torch.testing.assert_close(logits, _logits(ours.model, batch))

    ours_lm = load(llama_export)
    lm = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_path), llama_export
    )
    lm_batch = _encode(ours_lm.tokenizer)
    torch.testing.assert_close(
        _logits(lm, lm_batch), _logits(ours_lm.model, lm_batch), atol=0, rtol=0
    )


def test_plain_peft_adapters_load_in_lorafit_predict(tiny_bert_path, tiny_llama_path, work):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4)
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_bert_path, num_labels=3)
    config = LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=["query", "value"], init_lora_weights=False
    )
    peft_cls = get_peft_model(classifier, config).eval()
    peft_cls.save_pretrained(work / "plain_cls")
    predictor = Predictor(work / "plain_cls", base_model=None)
    got = predictor.predict(TEXTS)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_path)
    probs = torch.softmax(_logits(peft_cls, _encode(tokenizer)), -1)
    for row, p in zip(got, probs):
        assert list(row["probs"]) == ["LABEL_0", "LABEL_1", "LABEL_2"]
        assert list(row["probs"].values()) == pytest.approx(p.tolist(), abs=1e-5)

    lm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama_path),
        LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False),
    ).eval()
    lm.save_pretrained(work / "plain_lm")
    (work / "prompts.txt").write_text("write a short poem\n")
    out = work / "plain_lm.preds.jsonl"
    argv = ["predict", str(work / "plain_lm"), "--input", str(work / "prompts.txt")]
    assert run_cli([*argv, "--output", str(out), "--max-new-tokens", "4"]) == 0
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(row) == {"row", "generation"} and isinstance(row["generation"], str)


# -- predict: bad or unusual input ----------------------------------------------------------------


def test_predict_scores_against_a_label_column(cls_run, cls_export, work, capsys, monkeypatch):
    """--label-column: the predictions scored as the run scored its test set (same weights)."""
    summary = json.loads((cls_run / "summary.json").read_text())
    test_file, scores_file = work / "data" / "test.jsonl", work / "scores.json"
    table = work / "scored.csv"
    argv = ["predict", str(cls_export), "--input", str(test_file), "--output", str(table)]
    assert run_cli([*argv, "--label-column", "label", "--metrics", str(scores_file)]) == 0
    err = capsys.readouterr().err
    (scores,) = json.loads(scores_file.read_text()).values()
    assert scores["n"] == summary["num_test"] == 12
    for key in ("accuracy", "f1_macro"):
        assert scores[key] == pytest.approx(summary["test"][key]), key
    for key in ("nll", "ece"):  # from probabilities written to 6 decimals
        assert scores[key] == pytest.approx(summary["test"][key], abs=1e-4), key
    assert scores["ci"]["accuracy"] == pytest.approx(summary["test"]["ci"]["accuracy"])
    assert scores["ci_level"] == summary["test"]["ci_level"]
    assert f"against 'label': accuracy {scores['accuracy']:.4f} (95% CI " in err
    expected = [json.loads(line)["label"] for line in test_file.read_text().splitlines()]
    with open(table) as fh:
        assert [r["true_label"] for r in csv.DictReader(fh)] == expected
    # label ids work too; an unknown label, a missing column or plain text is a one-line error
    ids = work / "ids.jsonl"
    ids.write_text("".join(json.dumps({"text": "good", "y": i % 2}) + "\n" for i in range(4)))
    assert run_cli(["predict", str(cls_export), "--input", str(ids), "--label-column", "y"]) == 0
    assert "on 4 rows" in capsys.readouterr().err
    # ids written as floats (1.0) read as in training data; one class present: AUROC undefined,
    # written as null (strict JSON), not NaN
    one_class = work / "floats.csv"
    one_class.write_text("text,y\ngood,1.0\nbad,1.0\n")
    argv = ["predict", str(cls_export), "--input", str(one_class), "--label-column", "y"]
    assert run_cli([*argv, "--metrics", str(scores_file)]) == 0
    strict = json.loads(scores_file.read_text(), parse_constant=pytest.fail)
    (scores,) = strict.values()
    assert scores["n"] == 2 and scores["auroc"] is None
    # a bad label fails before any prediction is made
    predicted = []
    real_predict = Predictor.predict
    monkeypatch.setattr(
        Predictor,
        "predict",
        lambda self, *a, **k: predicted.append(1) or real_predict(self, *a, **k),
    )
    (work / "bad_label.jsonl").write_text(
        '{"text": "a", "label": "pos"}\n{"text": "b", "label": "meh"}\n'
    )
    (work / "plain.txt").write_text("good\n")
    for name, flags, message in (
        (
            "bad_label.jsonl",
            ["--label-column", "label"],
            "line 2: unknown label 'meh'; the model's labels are neg, pos",
        ),
        (
            "ids.jsonl",
            ["--label-column", "gold"],
            "line 1: no 'gold' column (--label-column); columns: text, y",
        ),
        ("plain.txt", ["--label-column", "y"], "needs table or JSON-object rows"),
        ("ids.jsonl", ["--metrics", "m.json"], "--metrics writes the scores of --label-column"),
    ):
        argv = ["predict", str(cls_export), "--input", str(work / name), *flags]
        assert message in _cli_error(argv, capsys), name
    assert predicted == []
    # stdin streams to stdout only: refused before any model folder is even read
    argv = ["predict", str(work / "no_such_model"), "--output", str(work / "x.jsonl")]
    assert _cli_error(argv, capsys).endswith("--input - streams to stdout; use --output - with it")


def _cli_error(argv: list[str], capsys) -> str:
    """The error line of a CLI call that fails with a user error (after any progress output)."""
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("lorafit: error: ")
    return line


def test_predict_refuses_missing_or_empty_text(cls_export, work, capsys):
    cases = {
        "missing.csv": ("id,text\n1,great movie\n2\n", "line 3 column 'text': empty text"),
        "blank.csv": ("id,text\n1,great movie\n2, \n", "line 3 column 'text': empty text"),
        # a quoted text over two lines: the line where the bad record ends
        "multiline.csv": ('id,text\n1,"great\nmovie"\n2,\n', "line 4 column 'text': empty text"),
        "null.jsonl": ('{"text": "ok"}\n{"text": null}\n', "line 2 column 'text': empty text"),
        "empty.jsonl": ('"ok"\n""\n', "line 2: empty text"),
    }
    for name, (content, message) in cases.items():
        (work / name).write_text(content)
        out = work / f"{name}.preds.jsonl"
        argv = ["predict", str(cls_export), "--input", str(work / name), "--output", str(out)]
        assert f"{work / name} {message}" in _cli_error(argv, capsys), name
        assert not out.exists()
    (work / "no_pair_text.jsonl").write_text('{"premise": "a", "hypothesis": " "}\n')
    with pytest.raises(DataError, match="line 1 column 'hypothesis': empty text"):
        read_inputs(work / "no_pair_text.jsonl", InputColumns(("premise",), "hypothesis"))


def test_malformed_chat_messages_are_one_line_errors(work):
    human = [{"role": "human", "content": "hi"}]  # ShareGPT's role name
    for messages in (
        ["hi"],
        [],
        [{"role": "assistant", "content": "x"}],
        "hi",
        [{"role": "user"}],
        human,
    ):
        path = work / "messages.jsonl"
        path.write_text(json.dumps({"messages": messages}) + "\n")
        with pytest.raises(DataError, match=r"messages.jsonl line 1 column 'messages': .*'role'"):
            read_inputs(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert read_inputs(path)[0]["input"] == [{"role": "user", "content": "hi"}]
    path.write_text(json.dumps({"messages": [{"from": "human", "value": "hi"}]}) + "\n")  # ShareGPT
    assert read_inputs(path)[0]["input"] == [{"role": "user", "content": "hi"}]


def test_alpaca_rows_get_the_prompt_training_builds(work):
    from datasets import Dataset

    from lorafit import data as D
    from lorafit.config import DataConfig

    record = {"instruction": "translate the sentence into french", "input": "the sea"}
    (work / "alpaca.jsonl").write_text(json.dumps(record) + "\n")
    [row] = read_inputs(work / "alpaca.jsonl")
    split = D._Split(Dataset.from_list([{**record, "output": "la mer"}]), "train.jsonl")
    trained = D._normalise_sft(split, DataConfig())[0]["messages"][0]["content"]
    assert row["input"] == trained == "translate the sentence into french\n\nthe sea"


def test_stdin_lines_are_plain_text_unless_json(cls_export, monkeypatch, capsys):
    import io

    texts = ['"Brilliant," says the critic', "[1] a footnote", "42", "the movie was great"]
    lines = [*texts[:3], json.dumps(texts[3])]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert run_cli(["predict", str(cls_export), "--input", "-"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    predictor = Predictor(cls_export)
    assert [r["probs"] for r in rows] == [predictor.predict([t])[0]["probs"] for t in texts]
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"text": "unclosed\n'))
    line = _cli_error(["predict", str(cls_export), "--input", "-"], capsys)
    assert "stdin line 1: not valid JSON" in line


def test_predict_reads_a_utf8_bom_csv(work):
    (work / "bom.csv").write_bytes("\ufefftext,label\nthe movie was great,1\n".encode())
    assert [row["input"] for row in read_inputs(work / "bom.csv")] == ["the movie was great"]


def test_blank_input_lines_are_skipped_and_named(work, capsys):
    (work / "gaps.txt").write_text("great\n\n  \ndull\n")
    (work / "gaps.jsonl").write_text('"great"\n\n"dull"\n')
    assert [r["input"] for r in read_inputs(work / "gaps.txt")] == ["great", "dull"]
    assert "skipped 2 blank line(s) (line 2, 3)" in capsys.readouterr().err
    assert [r["origin"] for r in read_inputs(work / "gaps.jsonl")][1].endswith("line 3")
    assert "skipped 1 blank line(s) (line 2)" in capsys.readouterr().err
    (work / "null.jsonl").write_text('"great"\nnull\n')  # a JSON null is not a blank line
    with pytest.raises(DataError, match="line 2: expected a JSON object"):
        read_inputs(work / "null.jsonl")


def test_predict_reads_the_training_formats_parquet_and_json(work):
    import pandas as pd

    frame = pd.DataFrame({"id": [7, 8], "text": ["the movie was great", "dull"], "label": [1, 0]})
    frame.to_parquet(work / "in.parquet")
    (work / "list.json").write_text(frame.to_json(orient="records"))
    (work / "lines.json").write_text(frame.to_json(orient="records", lines=True))
    for name in ("in.parquet", "list.json", "lines.json"):
        rows = read_inputs(work / name)
        assert [(r["input"], r["id"]) for r in rows] == [("the movie was great", 7), ("dull", 8)]
    assert read_inputs(work / "in.parquet")[1]["origin"] == f"{work / 'in.parquet'} row 1"
    (work / "tokens.json").write_text('[{"text": ["the", "movie"]}]')
    with pytest.raises(DataError, match="item 0 column 'text': expected a text, got list"):
        read_inputs(work / "tokens.json")


def test_predict_input_that_is_not_utf8_is_a_one_line_error(work):
    for name in ("latin1.csv", "latin1.txt", "latin1.jsonl"):
        (work / name).write_bytes('{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1"))
        with pytest.raises(DataError, match="line 2 is not UTF-8 \\(byte 0xe9\\)"):
            read_inputs(work / name)


def test_text_column_is_found_ignoring_case_unless_named(work):
    (work / "cased.csv").write_text("Text,Label\nthe movie was great,1\n")
    assert [row["input"] for row in read_inputs(work / "cased.csv")] == ["the movie was great"]
    named = InputColumns(text=("text",), exact=True)  # --text-column text: as given
    with pytest.raises(DataError, match="no text column"):
        read_inputs(work / "cased.csv", named)


def test_each_row_is_read_with_the_columns_of_its_model(cls_export, pair_run, work):
    pairs = _pair_rows(4, 1)
    rows = [{"text": t, "adapter": "single"} for t in TEXTS]
    rows += [{**p, "adapter": "pair"} for p in pairs]
    (work / "mixed_pair.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = work / "mixed_pair.preds.jsonl"
    argv = ["predict", f"single={cls_export}", f"pair={pair_run}"]
    argv += ["--input", str(work / "mixed_pair.jsonl"), "--output", str(out)]
    assert run_cli(argv) == 0
    got = [json.loads(line)["probs"] for line in out.read_text().splitlines()]
    single = Predictor(cls_export).predict(TEXTS)
    pair = Predictor(pair_run).predict([[p["premise"], p["hypothesis"]] for p in pairs])
    assert got == [r["probs"] for r in single + pair]


def test_pair_mismatch_names_the_file_and_line(cls_export, pair_run, work, monkeypatch, capsys):
    import io

    path = work / "pair_to_single.jsonl"
    path.write_text('"a text"\n["a text", "its pair"]\n')
    argv = ["predict", str(cls_export), "--input", str(path), "--output", str(work / "x.jsonl")]
    line = _cli_error(argv, capsys)
    assert f"{path} line 2: classification inputs must be texts" in line
    monkeypatch.setattr(sys, "stdin", io.StringIO("just one text\n"))
    line = _cli_error(["predict", str(pair_run), "--input", "-"], capsys)
    assert "stdin line 1: this model was trained on sentence pairs" in line


def test_exports_and_outputs_get_umask_permissions(cls_run, cls_export, work, capsys):
    from lorafit.io import write_text

    old = os.umask(0o022)
    try:
        write_text(work / "perm" / "file.txt", "x")
        assert (work / "perm" / "file.txt").stat().st_mode & 0o777 == 0o644
        out = export_run(cls_run, work / "perm_export")
        assert out.stat().st_mode & 0o777 == 0o755
        assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}
        (work / "perm.txt").write_text("fine\n")
        preds = work / "perm.preds.jsonl"
        argv = ["predict", str(cls_export), "--input", str(work / "perm.txt"), "--output"]
        assert run_cli([*argv, str(preds)]) == 0
        assert preds.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_nested_pickle_files_are_refused(cls_export, work):
    copy = shutil.copytree(cls_export, work / "nested_pickle")
    (copy / "extra").mkdir()
    (copy / "extra" / "optimizer.pt").write_bytes(b"not really a pickle")
    with pytest.raises(ModelError, match=r"pickle files \(extra/optimizer.pt\)"):
        load(copy)


def test_bad_device_is_a_one_line_error(cls_export, work, capsys):
    (work / "device.txt").write_text("fine\n")
    argv = ["predict", str(cls_export), "--input", str(work / "device.txt")]
    line = _cli_error([*argv, "--device", "foo"], capsys)
    assert "device='foo' (--device)" in line and "cpu" in line
    cuda = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    line = _cli_error([*argv, "--device", cuda], capsys)
    assert f"device='{cuda}' (--device)" in line and "CUDA" in line


@pytest.mark.parametrize(
    "option, value, named",
    [
        ("--batch-size", "0", "--batch-size"),
        ("--max-new-tokens", "0", "--max-new-tokens"),
        ("--temperature", "-1", "--temperature"),
        ("--temperature", "nan", "--temperature"),
    ],
)
def test_bad_generation_options_fail_before_any_model_loads(work, capsys, option, value, named):
    (work / "options.txt").write_text("fine\n")
    missing = work / "no_such_package"  # nothing is loaded: the option is checked first
    argv = ["predict", str(missing), "--input", str(work / "options.txt"), option, value]
    line = _cli_error(argv, capsys)
    assert named in line and value in line.replace("-1.0", "-1")


def test_the_merge_check_leaves_the_saved_tokenizer_as_trained(cls_export, cls_merged):
    def padding(folder):
        return json.loads((folder / "tokenizer.json").read_text())["padding"]

    assert padding(cls_merged) == padding(cls_export)  # the check's padding=True not saved


def test_predict_input_mistakes_are_one_line_errors(cls_export, work, capsys):
    predictor = Predictor(cls_export)
    with pytest.raises(DataError, match=r"a list of texts; for one text pass \[text\]"):
        predictor.predict("the movie was great")  # not 19 one-character inputs
    with pytest.raises(DataError, match="input 1: empty text"):
        predictor.predict(["the movie was great", "   "])  # as a file's empty cell is refused
    texts = work / "same.txt"
    texts.write_text("the movie was great\n")
    argv = ["predict", str(cls_export), "--input", str(texts), "--output", str(texts)]
    assert "is the --input file" in _cli_error(argv, capsys)
    assert texts.read_text() == "the movie was great\n"  # not overwritten
    semicolons = work / "semi.csv"
    semicolons.write_text("review;label\nthe movie was great, and long;pos\n")  # Excel's csv
    line = _cli_error(["predict", str(cls_export), "--input", str(semicolons)], capsys)
    assert "the header 'review;label' is one column; the file looks separated by ';'" in line
    assert "pass --delimiter ';'" in line
    argv = ["predict", str(cls_export), "--input", str(semicolons), "--output", "-"]
    assert run_cli([*argv, "--delimiter", ";", "--text-column", "review"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] in ("neg", "pos")
    torn = work / "torn.csv"  # an unquoted comma: the text would be cut at it
    torn.write_text("text,label\ngreat,pos\nbad, really bad,neg\nfine\n")
    line = _cli_error(["predict", str(cls_export), "--input", str(torn)], capsys)
    assert line.endswith(
        "torn.csv line 3: 3 fields, the header has 2; quote a text that holds the separator ','"
    )
    assert run_cli(["export", "x", "--out", "y", "--merge", "--tolerance", "-1"]) == 2
    assert "--tolerance: must be a positive number" in capsys.readouterr().err


def test_a_wrong_base_model_names_the_option(cls_export, cls_merged, work, caplog):
    with pytest.raises(ModelError, match=r"base_model='/nope' \(--base-model\): .*does not exist"):
        load(cls_export, base_model="/nope")
    with caplog.at_level(logging.WARNING, logger="lorafit.export"):
        load(cls_merged, base_model="/nope")  # a merged package carries its own weights
    assert "base_model='/nope' (--base-model) is not used" in caplog.text


def test_blank_stdin_lines_are_named_on_stderr(cls_export, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("the movie was great\n\nawful film\n"))
    assert run_cli(["predict", str(cls_export), "--input", "-"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2
    assert "stdin line 2 is blank: skipped, no output line" in err


def test_exporting_a_runs_adapter_folder_keeps_its_provenance(cls_run, cls_export, work):
    from_adapter = export_run(cls_run / "adapter", work / "from_adapter")
    manifest = json.loads((from_adapter / MANIFEST_FILE).read_text())
    expected = json.loads((cls_export / MANIFEST_FILE).read_text())
    assert manifest["training"] == expected["training"] is not None
    assert manifest["training"]["run_dir"] == str(cls_run.resolve())
    assert manifest["test_metrics"] == expected["test_metrics"] is not None


def test_export_of_an_unfinished_or_adapterless_run_says_why(cls_run, work, capsys):
    unfinished = work / "unfinished"
    unfinished.mkdir()
    for name in ("config.yaml", "label_map.json", "metrics.jsonl"):  # killed before the end
        shutil.copy2(cls_run / name, unfinished / name)
    line = _cli_error(["export", str(unfinished), "--out", str(work / "x")], capsys)
    assert f"{unfinished} is a run that has not finished (no adapter/ yet)" in line
    assert "train.resume=true" in line
    no_adapter = shutil.copytree(
        cls_run, work / "no_adapter", ignore=shutil.ignore_patterns("adapter")
    )
    config = (no_adapter / "config.yaml").read_text()
    (no_adapter / "config.yaml").write_text(
        config.replace("save_adapter: true", "save_adapter: false")
    )
    line = _cli_error(["export", str(no_adapter), "--out", str(work / "x")], capsys)
    assert "was run with output.save_adapter=false" in line
    assert not (work / "x").exists()
    # killed after adapter/ was saved, before summary.json
    no_summary = shutil.copytree(cls_run, work / "no_summary")
    (no_summary / "summary.json").unlink()
    line = _cli_error(["export", str(no_summary), "--out", str(work / "x")], capsys)
    assert "is a run that has not finished" in line and "train.resume=true" in line
    assert not (work / "x").exists()


def test_a_true_label_is_a_name_or_an_id_never_both_in_one_model():
    from lorafit.predict import _label_id

    row = lambda value: {"true_label": value, "origin": "f.csv line 2"}  # noqa: E731
    words = ["neg", "pos"]
    assert [_label_id(row(v), words) for v in ("pos", 0, "1", 1.0)] == [1, 0, 1, 1]
    stars = ["1", "3", "5"]  # labels that are numbers: a value is a name, never an id
    assert [_label_id(row(v), stars) for v in ("1", 3, "5.0")] == [0, 1, 2]
    for value in (0, 2):
        with pytest.raises(
            DataError, match=rf"unknown label {value}; .* 1, 3, 5; its labels are numbers"
        ):
            _label_id(row(value), stars)


def test_a_merged_adapter_with_its_own_settings_loads_as_a_full_model(
    tiny_bert_path, work, cls_run
):
    # cls_run wrote work / "data". AdaLoRA always saves peft_kwargs (total_step), and target
    # modules may be named: the merged package is a full model and must load as one
    settings = {
        "method.name": "adalora",
        "method.target_modules": "[query,value]",
        "train.steps": 4,
        "data.k_shot": 4,
        "output.plot": "false",
    }
    run = work / "adalora_run"
    train(load_config(None, tiny_overrides(tiny_bert_path, work / "data", run, **settings)))
    merged = export_run(run, work / "adalora_merged", merge=True)
    meta = json.loads((merged / "lorafit_model.json").read_text())
    assert meta["merged_from"] == "adalora" and meta["method_config"]["peft_kwargs"] == {}
    texts = ["a wonderful film", "a dull and boring film"]
    probs = [
        Predictor(p).predict(texts) for p in (merged, export_run(run, work / "adalora_export"))
    ]
    for merged_row, adapter_row in zip(*probs):
        assert merged_row["probs"] == pytest.approx(adapter_row["probs"], abs=1e-5)


def test_a_prompt_learning_merge_is_refused_by_method_name(tiny_bert_path, work, cls_run):
    settings = {"method.name": "prompt_tuning", "train.steps": 2, "output.plot": "false"}
    run = work / "prompt_run"
    train(load_config(None, tiny_overrides(tiny_bert_path, work / "data", run, **settings)))
    with pytest.raises(ModelError, match=r"^method.name=prompt_tuning adapters cannot be merged"):
        export_run(run, work / "prompt_merged", merge=True)
    assert not (work / "prompt_merged").exists()
