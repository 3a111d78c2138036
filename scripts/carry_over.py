"""Carry-over check: lorafit's defaults on tasks they were not chosen on.

    python scripts/carry_over.py                      # build the task, run what is missing, report
    python scripts/carry_over.py --seeds 13 21 --report-only
    python scripts/carry_over.py --task topic_pairs   # the sentence-pair task (runs/carry_topic_pairs)
    python scripts/carry_over.py --task answer_pairs --split dev --settings lora lora-ce head
    python scripts/carry_over.py --task request_kinds --split dev --settings lora lora-random lora-ce head
    python scripts/carry_over.py --task masked_words --seeds 13 21 42 --settings lora head baseline-lora baseline-head

"mixed6" mixes two datasets into six classes with unicode and punctuation in the label names,
in parquet: the four AG News topics and the two MR polarities. Train pool: the first 400 rows
per class of the AG News train slice and of MR's first 8,000 rows (MR shuffled with seed 0);
test: the first 150 rows per class of the AG News test file and of MR's other 2,662 rows (900
rows).

"topic_pairs" is a sentence-pair task in JSON Lines: two AG News texts (columns `first` and
`second`, set as data.text / data.text_pair), labelled `same topic` or `different topic`.
Train pool: 800 pairs per label drawn (seed 0) from the AG News train slice; test: 450 per label
from the AG News test file (900 rows). Same-topic pairs pick the topic uniformly; different-topic
pairs pick two distinct topics uniformly.

"answer_pairs" is a second sentence-pair task, one that a small encoder can learn: does the
response answer the instruction? Built from the Alpaca demo set (instruction + input as `prompt`,
output as `response`), labelled `answers` or `does not answer`. Rows are shuffled (seed 0) into a
train pool of 400, a dev set of 200 and a test set of 399 instructions; each instruction gives one
pair with its own response and one with the response of the other instruction of its part that
shares the most words with it (a hard negative: "Describe a cat" meets the answer to "Describe a
dog", not one about tax law).

"request_kinds" has many classes: which kind of request an Alpaca demo instruction is, read from
the instruction without its first word (plus its input), the first word being the label
("generate", "describe", "what", "given", ...; the 14 words that start 20 or more
instructions). Shuffled (seed 0): 12 rows per kind in the train pool, then a third of the rest
as a dev set and two thirds as the test set (142 and 282 rows, as unbalanced as the data).
K=4 per class (4 to train, 4 to validate), so a random batch of 8 holds 1.5 same-label pairs.

"masked_words" has more classes and K=16: which of 27 topic words ("film", "oil", "iraq",
"football", "microsoft", ...) was masked out of an AG News or MR text. Texts holding exactly one
of the words (as a token) are kept, the word (and its plural) replaced by "___"; shuffled (seed
0), the first 30 per word are the test set (810 rows, balanced) and the next 200 at most the
train pool (4,302 rows, 45-200 per word). No dev set: nothing is chosen on it.

The pair tasks and request_kinds also write `dev.jsonl` (for the pair tasks, pairs from
train-pool rows that no train pair uses): `--split dev` evaluates on it instead of the test file
(`data.test_split=dev`), which is how a default is chosen on these tasks without looking at
their test sets.

Each run is one `lorafit train` with only the data, K (16; request_kinds 4), the seed (data.seed
= train.seed) and the method set, plus `train.objective=ce` for the `*-ce` rows and
`train.batch_sampling=random` for the `*-random` rows; the `baseline-*` rows are the issue's
plain Trainer script (scripts/baseline_trainer.py) on the same K-shot splits.
The defaults were not selected on these tasks, except `train.batch_sampling`, chosen on the
request_kinds dev set (docs/recipes.md, "Many classes").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path

from lorafit.io import write_with

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
SETTINGS = {
    "lora": ["method.name=lora"],
    "lora-ce": ["method.name=lora", "train.objective=ce"],
    "lora-random": ["method.name=lora", "train.batch_sampling=random"],
    "full": ["method.name=full"],
    "full-ce": ["method.name=full", "train.objective=ce"],
    "full-random": ["method.name=full", "train.batch_sampling=random"],
    "head": ["method.name=head"],
    "qlora": ["method.name=qlora"],
}
AG_NAMES = {
    "World": "World news 🌍",
    "Sports": "Sports & Games",
    "Business": "Business, finance",
    "Sci/Tech": "Sci/Tech",
}
MR_NAMES = {"pos": "positive review ✓", "neg": "négative critique"}
# the plain transformers Trainer + peft settings (scripts/baseline_trainer.py)
BASELINES = {"baseline-lora": "lora", "baseline-head": "head", "baseline-full": "full"}


def _read_ag(name: str):
    import pandas as pd

    return pd.read_csv(DATA / "ag_news" / name, sep="\t", quoting=3, keep_default_na=False)


JSONL_SPLITS = ("train", "dev", "test")


def _splits_built(folder: Path, splits: tuple[str, ...] = JSONL_SPLITS) -> bool:
    return all((folder / f"{name}.jsonl").exists() for name in splits)


def _write_jsonl(folder: Path, frames: dict) -> None:
    """Each frame to <folder>/<split>.jsonl, atomically (JSON Lines, unicode kept)."""
    for name, frame in frames.items():
        to_jsonl = partial(frame.to_json, orient="records", lines=True, force_ascii=False)
        write_with(folder / f"{name}.jsonl", to_jsonl)


def build_mixed6(folder: Path) -> list[str]:
    """Write <folder>/train.parquet and test.parquet (once); returns the data overrides."""
    import pandas as pd

    overrides = [f"data.path={folder}"]
    if (folder / "train.parquet").exists() and (folder / "test.parquet").exists():
        return overrides
    ag_train, ag_test = _read_ag("train.tsv"), _read_ag("test.tsv")
    mr = pd.read_json(DATA / "mr" / "mr.jsonl", lines=True)
    mr = mr.sample(frac=1, random_state=0).reset_index(drop=True)
    mr_train, mr_test = mr.iloc[:8000], mr.iloc[8000:]

    def mix(ag, reviews, n_ag: int, n_mr: int):
        topics = ag.groupby("label").head(n_ag).copy()
        topics["label"] = topics.label.map(AG_NAMES)
        polar = reviews.groupby("label").head(n_mr).copy()
        polar["label"] = polar.label.map(MR_NAMES)
        mixed = pd.concat([topics, polar]).sample(frac=1, random_state=1)
        return mixed.reset_index(drop=True)[["text", "label"]]

    write_with(folder / "train.parquet", mix(ag_train, mr_train, 400, 400).to_parquet)
    write_with(folder / "test.parquet", mix(ag_test, mr_test, 150, 150).to_parquet)
    return overrides


def build_topic_pairs(folder: Path) -> list[str]:
    """Write <folder>/train.jsonl and test.jsonl (once); returns the data overrides."""
    import numpy as np
    import pandas as pd

    overrides = [f"data.path={folder}", "data.text=first", "data.text_pair=second"]
    if _splits_built(folder):
        return overrides

    def pairs(ag, per_label: int, seed: int):
        rng = np.random.default_rng(seed)
        by_topic = {t: rows.text.tolist() for t, rows in ag.groupby("label")}
        topics = sorted(by_topic)
        rows = []
        for label in ("same topic", "different topic"):
            for _ in range(per_label):
                if label == "same topic":
                    a = b = topics[rng.integers(len(topics))]
                else:
                    a, b = (topics[i] for i in rng.choice(len(topics), 2, replace=False))
                first = by_topic[a][rng.integers(len(by_topic[a]))]
                second = by_topic[b][rng.integers(len(by_topic[b]))]
                if first != second:
                    rows.append({"first": first, "second": second, "label": label})
        frame = pd.DataFrame(rows).drop_duplicates(["first", "second"])
        return frame.sample(frac=1, random_state=seed).reset_index(drop=True)

    ag_train = _read_ag("train.tsv")
    train, test = pairs(ag_train, 800, 0), pairs(_read_ag("test.tsv"), 450, 1)
    unused = ag_train[~ag_train.text.isin(set(train["first"]) | set(train["second"]))]
    dev = pairs(unused, 150, 2)  # train-slice texts that no train pair uses
    _write_jsonl(folder, {"train": train, "dev": dev, "test": test})
    return overrides


def build_answer_pairs(folder: Path) -> list[str]:
    """Write <folder>/train.jsonl, dev.jsonl and test.jsonl (once); returns the data overrides."""
    import re

    import numpy as np
    import pandas as pd

    overrides = [f"data.path={folder}", "data.text=prompt", "data.text_pair=response"]
    if _splits_built(folder):
        return overrides
    rows = json.loads((DATA / "alpaca_en_demo" / "alpaca_en_demo.json").read_text())
    prompts = [" ".join(filter(None, (r["instruction"], r["input"]))) for r in rows]
    order = np.random.default_rng(0).permutation(len(rows))

    def pairs(part: np.ndarray) -> pd.DataFrame:
        words = [set(re.findall(r"[a-z]{4,}", prompts[i].lower())) for i in part]
        out = []
        for a, i in enumerate(part):
            # the hard negative: the other instruction of this part sharing the most words
            overlap = [len(words[a] & w) / (len(words[a] | w) or 1) for w in words]
            overlap[a] = -1.0
            j = part[int(np.argmax(overlap))]
            out.append({"prompt": prompts[i], "response": rows[i]["output"], "label": "answers"})
            out.append(
                {"prompt": prompts[i], "response": rows[j]["output"], "label": "does not answer"}
            )
        return pd.DataFrame(out).sample(frac=1, random_state=0).reset_index(drop=True)

    parts = {"train": order[:400], "dev": order[400:600], "test": order[600:]}
    _write_jsonl(folder, {name: pairs(part) for name, part in parts.items()})
    return overrides


KINDS_MIN_ROWS, KINDS_POOL = 20, 12  # request_kinds: words with 20+ rows; 12 per kind in the pool


def build_request_kinds(folder: Path) -> list[str]:
    """Write <folder>/train.jsonl, dev.jsonl and test.jsonl (once); returns the data overrides."""
    import numpy as np
    import pandas as pd

    overrides = [f"data.path={folder}"]
    if _splits_built(folder):
        return overrides
    rows = json.loads((DATA / "alpaca_en_demo" / "alpaca_en_demo.json").read_text())
    frame = pd.DataFrame(
        {
            "label": [r["instruction"].split()[0].strip(":,.").lower() for r in rows],
            # the instruction without its first word, then its input
            "text": [
                " ".join(filter(None, (r["instruction"].split(maxsplit=1)[1:2] + [r["input"]])))
                for r in rows
            ],
        }
    )
    counts = frame.label.value_counts()
    frame = frame[frame.label.isin(counts[counts >= KINDS_MIN_ROWS].index)]
    frame = frame.sample(frac=1, random_state=0).reset_index(drop=True)
    position = frame.groupby("label").cumcount()  # 0, 1, ... within each kind, shuffled
    rest = frame[position >= KINDS_POOL]
    dev_mask = np.arange(len(rest)) % 3 == 0  # a third of what the pools leave, the rest test
    parts = {"train": frame[position < KINDS_POOL], "dev": rest[dev_mask], "test": rest[~dev_mask]}
    _write_jsonl(folder, {name: part[["text", "label"]] for name, part in parts.items()})
    return overrides


MASKED_WORDS = (
    "film company president game oil iraq team comedy internet microsoft software bank space court "
    "police china love olympic music election football war nuclear phone price baseball google"
).split()
MASKED_TEST, MASKED_POOL = 30, 200  # masked_words: test rows per word, then at most 200 in the pool


def build_masked_words(folder: Path) -> list[str]:
    """Write <folder>/train.jsonl and test.jsonl (once); returns the data overrides."""
    import re

    import pandas as pd

    overrides = [f"data.path={folder}"]
    if _splits_built(folder, ("train", "test")):  # no dev set
        return overrides
    texts = [*_read_ag("train.tsv").text, *_read_ag("test.tsv").text]
    texts += list(pd.read_json(DATA / "mr" / "mr.jsonl", lines=True).text)
    rows = []
    for text in texts:
        tokens = set(re.findall(r"[a-z]+", text.lower()))
        found = [w for w in MASKED_WORDS if w in tokens]
        if len(found) == 1:  # exactly one of the words: it is the label, and it is masked out
            masked = re.sub(rf"\b{found[0]}s?\b", "___", text, flags=re.IGNORECASE)
            rows.append({"text": masked, "label": found[0]})
    frame = pd.DataFrame(rows).sample(frac=1, random_state=0).reset_index(drop=True)
    position = frame.groupby("label").cumcount()
    parts = {
        "test": frame[position < MASKED_TEST],
        "train": frame[(position >= MASKED_TEST) & (position < MASKED_TEST + MASKED_POOL)],
    }
    _write_jsonl(folder, parts)
    return overrides


DEFAULT_K = {"request_kinds": 4}  # K per class where it is not 16 (12 rows per kind in the pool)
TASKS = {
    "mixed6": build_mixed6,
    "topic_pairs": build_topic_pairs,
    "answer_pairs": build_answer_pairs,
    "request_kinds": build_request_kinds,
    "masked_words": build_masked_words,
}


def run(task: str, data_overrides: list[str], out: Path, setting: str, seed: int, k: int) -> None:
    if (out / "summary.json").exists():
        return
    data_overrides = ["model.name_or_path=minilm", *data_overrides]
    if setting in BASELINES:  # the same K-shot split: data.seed = seed, K + K per class
        command = [str(ROOT / "scripts" / "baseline_trainer.py"), "--method", BASELINES[setting]]
        command += ["--dataset", task, "--k", str(k), "--seed", str(seed), "--out", str(out)]
        command += ["--data-overrides", *data_overrides]
    else:
        command = ["-m", "lorafit", "train", *data_overrides, f"data.k_shot={k}"]
        command += [f"data.seed={seed}", f"train.seed={seed}", *SETTINGS[setting]]
        command += [f"output.dir={out}", "output.overwrite=true"]
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{setting} seed {seed}", flush=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(
            [sys.executable, *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
            check=True,
        )


def report(runs: Path, seeds: list[int]) -> str:
    lines = [
        "| setting | seeds | accuracy | macro-F1 | ECE ×100 (calibrated runs: raw → calibrated) "
        "| per seed (accuracy) |",
        "|---|---|---|---|---|---|",
    ]

    def mean_std(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.1f} ± {spread:.1f}"

    for setting in [*SETTINGS, *BASELINES]:
        summaries = {}
        for seed in seeds:
            path = runs / f"{setting}-seed{seed}" / "summary.json"
            if path.exists():
                summaries[seed] = json.loads(path.read_text())
        if not summaries:
            continue
        tests = [s["test"] for s in summaries.values()]
        cells = [mean_std([100 * t[metric] for t in tests]) for metric in ("accuracy", "f1_macro")]
        ece = mean_std([100 * t["ece"] for t in tests])
        # train.calibration: the same run's raw head is in calibration.test_before
        raw = [(s.get("calibration") or {}).get("test_before") for s in summaries.values()]
        if all(raw):
            ece = f"{mean_std([100 * r['ece'] for r in raw])} → {ece}"
        each = " / ".join(f"{100 * t['accuracy']:.1f}" for t in tests)
        lines.append(
            f"| {setting} | {','.join(map(str, summaries))} | {cells[0]} | {cells[1]} | {ece} "
            f"| {each} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", default="mixed6", choices=sorted(TASKS))
    p.add_argument("--out", default=None, help="default runs/carry (mixed6), runs/carry_<task>")
    p.add_argument("--seeds", nargs="+", type=int, default=[13, 21, 42, 87])
    choices = [*SETTINGS, *BASELINES]
    default = ["lora", "lora-ce", "head", *BASELINES]
    p.add_argument("--settings", nargs="+", default=default, choices=choices)
    p.add_argument(
        "--split",
        default="test",
        choices=("test", "dev"),
        help="dev: evaluate on the task's dev.jsonl (not mixed6), runs in runs_dev/",
    )
    p.add_argument(
        "--k",
        type=int,
        default=None,
        help="K per class (default 16, request_kinds 4; others: runs_k<K>/)",
    )
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    default_k = DEFAULT_K.get(args.task, 16)
    k = args.k or default_k
    if args.split == "dev" and args.task == "mixed6":
        p.error("--split dev: mixed6 has no dev set; use another task")
    folder = "carry" if args.task == "mixed6" else f"carry_{args.task}"
    out = Path(args.out or ROOT / "runs" / folder)
    data_overrides = TASKS[args.task](out / "data" / args.task)
    runs = out / "runs"
    if args.split == "dev":
        data_overrides, runs = [*data_overrides, "data.test_split=dev"], out / "runs_dev"
    if k != default_k:  # never mix another K's runs into the default table
        runs = runs.with_name(f"{runs.name}_k{k}")
    if not args.report_only:
        for seed in args.seeds:
            for setting in args.settings:
                run(args.task, data_overrides, runs / f"{setting}-seed{seed}", setting, seed, k)
    print(report(runs, args.seeds))


if __name__ == "__main__":
    main()
