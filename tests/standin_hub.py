"""A stand-in Hugging Face hub cache, laid out exactly as ``hf download`` leaves it.

``put_repo(hub_cache, repo_id, folder, repo_type)`` copies the files of ``folder`` into
``<hub_cache>/<type>s--<org>--<name>/``: every file content once under ``blobs/<sha256>``,
``snapshots/<commit>/<relative path>`` as relative symlinks to the blobs, and
``refs/main`` holding the commit hash (huggingface_hub's cache layout).

``put_dataset_snapshot(hub_cache, repo_id, configs)`` writes a dataset repository in the
form the hub serves it (what ``hf download --repo-type dataset`` fetches): one parquet file
per (config, split) at ``<config>/<split>-00000-of-00001.parquet`` (``data/`` for a
single-config repo) and a README whose YAML front matter lists ``configs:`` with their
``data_files`` per split. The parquet files carry datasets' feature metadata (ClassLabel
names, Image features), as files written by ``push_to_hub`` do.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping


def _commit_of(folder: Path) -> str:
    h = hashlib.sha1()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(hashlib.sha1(f.read_bytes()).digest())
    return h.hexdigest()


def put_repo(hub_cache: Path, repo_id: str, folder: Path, repo_type: str = "model") -> Path:
    """Place ``folder``'s files in the hub cache as repo ``repo_id``; return the snapshot folder."""
    hub_cache, folder = Path(hub_cache), Path(folder)
    repo = hub_cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = _commit_of(folder)
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snap / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def dataset_card(configs: Mapping[str, Mapping[str, str]]) -> str:
    """README.md with the ``configs:`` front matter: {config: {split: path pattern}}."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines.append(f"- config_name: {name}")
        lines.append("  data_files:")
        for split, path in splits.items():
            lines += [f"  - split: {split}", f"    path: {path}"]
    lines += ["---", "", "Stand-in dataset card (tiny random rows in the real schema).", ""]
    return "\n".join(lines)


def write_dataset_repo(folder: Path, configs: Mapping[str, Mapping[str, object]]) -> Path:
    """{config: {split: datasets.Dataset}} -> parquet files + README configs in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card: dict[str, dict[str, str]] = {}
    single = list(configs) == ["default"]
    for name, splits in configs.items():
        sub = "data" if single else name
        card[name] = {}
        for split, ds in splits.items():
            rel = f"{sub}/{split}-00000-of-00001.parquet"
            (folder / sub).mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(folder / rel))
            card[name][split] = f"{sub}/{split}-*"
    (folder / "README.md").write_text(dataset_card(card))
    return folder


def put_dataset_snapshot(hub_cache: Path, repo_id: str, configs: Mapping[str, Mapping[str, object]]) -> Path:
    """A dataset repo in snapshot-only form in the hub cache; returns the snapshot folder."""
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset_repo(Path(tmp), configs)
        return put_repo(hub_cache, repo_id, Path(tmp), "dataset")


def put_model_snapshot(hub_cache: Path, repo_id: str, folder: Path, drop: tuple[str, ...] = ()) -> Path:
    """A saved model folder placed in the hub cache under ``repo_id`` (``drop``: file names left out)."""
    if not drop:
        return put_repo(hub_cache, repo_id, folder, "model")
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "m"
        shutil.copytree(folder, dst, ignore=shutil.ignore_patterns(*drop))
        return put_repo(hub_cache, repo_id, dst, "model")


# ---------------------------------------------------------------------------
# the benchmarks' models and datasets under their real ids (tiny, random)

#: GLUE's label names per config (the nyu-mll/glue card's ClassLabel features); stsb: float32
GLUE_LABELS = {
    "cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"], "qqp": ["not_duplicate", "duplicate"],
    "mnli": ["entailment", "neutral", "contradiction"], "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
}
#: GLUE's split names per config (mnli: matched / mismatched validation and test)
GLUE_SPLITS = {t: ["train", "validation", "test"] for t in GLUE_LABELS}
GLUE_SPLITS["stsb"] = ["train", "validation", "test"]
GLUE_SPLITS["mnli"] = ["train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"]
#: the hub ids of the CLIP table's datasets (clip_tasks.json) and their config layout on the hub
CLIP_DATASET_CONFIGS = {"ylecun/mnist": "mnist", "ufldl-stanford/svhn": "cropped_digits"}
MERGEBENCH_TASKS = ["instruction", "math", "coding", "safety", "multilingual"]


def _llm_config_as_4x(folder: Path, version: str = "4.45.0") -> None:
    """Rewrite a 5.x-saved config.json as 4.x wrote it (``torch_dtype``, 4.x version)."""
    import json

    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["transformers_version"] = version
    path.write_text(json.dumps(cfg, indent=2))


def _clip_datasets(hub: Path, n_train: int, n_test: int) -> dict[str, int]:
    import datasets
    import numpy as np
    from PIL import Image

    from featcal.tasks.clip_vision import task_table

    sizes = {}
    for i, (task, spec) in enumerate(task_table().items()):
        names = list(spec["classnames"])
        rng = np.random.default_rng(i)
        mode = "L" if task == "mnist" else "RGB"
        feats = datasets.Features({spec["image_column"]: datasets.Image(), spec["label_column"]: datasets.ClassLabel(names=names)})

        def split(n):
            labels = [int(j % len(names)) for j in range(n)]
            imgs = [Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8), "RGB").convert(mode) for _ in labels]
            return datasets.Dataset.from_dict({spec["image_column"]: imgs, spec["label_column"]: labels}, features=feats)

        splits = {spec["train_split"]: split(n_train), spec["test_split"]: split(n_test)}
        if spec["dataset"] == "ufldl-stanford/svhn":
            splits["extra"] = split(2)
        config = CLIP_DATASET_CONFIGS.get(spec["dataset"], "default")
        configs = {config: splits}
        if spec["dataset"] == "ufldl-stanford/svhn":  # the repo's other config (house-number boxes)
            configs["full_numbers"] = {"train": datasets.Dataset.from_dict({"image": [], "digits": []})}
        put_dataset_snapshot(hub, spec["dataset"], configs)
        sizes[task] = n_train
    return sizes


def _clip_models(hub: Path, work: Path) -> None:
    from featcal.tasks.clip_vision import task_table
    from tests.clip_fixtures import make_tiny_clip, make_tiny_expert

    base = work / "clip_base"
    make_tiny_clip(base, layout="v4")
    put_model_snapshot(hub, "openai/clip-vit-base-patch32", base)
    for i, task in enumerate(task_table()):
        make_tiny_expert(base, work / f"clip_{task}", seed=100 + i)
        put_model_snapshot(hub, f"tanganke/clip-vit-base-patch32_{task}", work / f"clip_{task}")


def _glue(hub: Path, work: Path, n_train: int, n_test: int, expert_tasks=None, lora: bool = True) -> None:
    import json

    import datasets

    from featcal.tasks.glue import glue_templates
    from tests.t5_fixtures import COLUMNS, build_tokenizer, glue_rows, lora_adapter, save_like_transformers4, tiny_t5_config

    configs = {}
    for task, splits in GLUE_SPLITS.items():
        feats = {c: datasets.Value("string") for c in COLUMNS[task]}
        feats["label"] = datasets.Value("float32") if task == "stsb" else datasets.ClassLabel(names=GLUE_LABELS[task])
        feats["idx"] = datasets.Value("int32")
        feats = datasets.Features(feats)
        configs[task] = {}
        for s in splits:
            rows = glue_rows(task, n_train if s == "train" else n_test, seed=hash(s) % 7)
            if s.startswith("test"):  # GLUE's test labels are hidden: -1 (stsb: -1.0)
                rows = [dict(r, label=-1.0 if task == "stsb" else -1) for r in rows]
            configs[task][s] = datasets.Dataset.from_list(rows, features=feats)
    put_dataset_snapshot(hub, "nyu-mll/glue", configs)

    templates = glue_templates()
    corpus = []
    for task in GLUE_SPLITS:
        for r in glue_rows(task, 16, 0):
            corpus.append(templates[task]["template"].format(**r) if "template" in templates[task] else " ".join(str(v) for v in r.values()))
    corpus += ["yes no maybe true false entailment neutral contradiction positive negative acceptable unacceptable 0.0 1.5 3.4 5.0"] * 4
    base_dir = work / "t5_base"
    tok = build_tokenizer(base_dir, corpus)
    from transformers import T5ForConditionalGeneration

    import torch

    torch.manual_seed(0)
    base = T5ForConditionalGeneration(tiny_t5_config(len(tok))).eval()
    save_like_transformers4(base, base_dir)
    put_model_snapshot(hub, "google/flan-t5-base", base_dir)
    g = torch.Generator().manual_seed(1)
    for i, task in enumerate(expert_tasks or GLUE_SPLITS):
        e = T5ForConditionalGeneration(tiny_t5_config(len(tok))).eval()
        e.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        folder = work / f"t5_{task}"
        save_like_transformers4(e, folder)
        build_tokenizer(folder, corpus)
        put_model_snapshot(hub, f"tanganke/flan-t5-base_glue-{task}", folder)
        if not lora:
            continue
        lora_dir = lora_adapter(str(base_dir), work / f"t5_{task}_lora", seed=200 + i)
        cfg = json.loads((lora_dir / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = "google/flan-t5-base"  # as the hub adapters name their base
        (lora_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        put_model_snapshot(hub, f"tanganke/flan-t5-base_glue-{task}_lora-16", lora_dir)


def _llm_family(hub: Path, work: Path, family: str, base_id: str, expert_prefix: str) -> None:
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from tests.llm_fixtures import config, word_tokenizer

    cfg = config(family, layers=2)
    cfg.tie_word_embeddings = True  # Llama-3.2-3B and Gemma-2 tie lm_head to the embedding
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    folder = work / f"{family}_base"
    base.save_pretrained(folder, max_shard_size="40KB")
    word_tokenizer(folder)
    _llm_config_as_4x(folder)
    put_model_snapshot(hub, base_id, folder)
    g = torch.Generator().manual_seed(1)
    for task in MERGEBENCH_TASKS:
        e = copy.deepcopy(base)
        with torch.no_grad():
            for n, p in e.named_parameters():
                if ".layers." in n:
                    p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
        out = work / f"{family}_{task}"
        e.save_pretrained(out, max_shard_size="40KB")
        word_tokenizer(out)
        _llm_config_as_4x(out)
        put_model_snapshot(hub, f"{expert_prefix}_{task}", out)


def _mergebench_data(hub: Path, n: int) -> None:
    import datasets

    from featcal.tasks.mergebench import DEFAULT_COLUMNS

    for t, task in enumerate(MERGEBENCH_TASKS):
        cols = DEFAULT_COLUMNS[task]
        data = {cols["instruction"]: [f"w{16 * t + i % 8} w{16 * t + 1}" for i in range(n)],
                cols["response"]: [" ".join(f"w{(16 * t + j) % 60}" for j in range(i % 5 + 1)) for i in range(n)]}
        if task == "instruction":
            data["input"] = ["" if i % 2 else f"w{i}" for i in range(n)]
        put_dataset_snapshot(hub, f"MergeBench/{task}_val", {"default": {"train": datasets.Dataset.from_dict(data)}})


#: the lm-eval 0.4.x tasks of MergeBench's default list and the hub datasets their YAMLs read
#: (task YAML: dataset_path / dataset_name / split keys, from lm_eval/tasks/...)
LM_EVAL_DATASETS = {
    "ifeval": ("google/IFEval", None),                      # ifeval/ifeval.yaml: test_split train
    "gsm8k_cot": ("openai/gsm8k", "main"),                  # gsm8k/gsm8k-cot.yaml: test, fewshot from the yaml
    "humaneval_plus": ("evalplus/humanevalplus", None),     # humaneval/humaneval_plus.yaml: test
    "mbpp_plus": ("evalplus/mbppplus", None),               # mbpp/mbpp_plus.yaml: test, fewshot from utils.py
    "toxigen": ("skg/toxigen-data", "annotated"),           # toxigen/toxigen.yaml: train / test
    **{f"m_mmlu_{lang}": ("alexandrainst/m_mmlu", lang) for lang in ("fr", "es", "de", "ru")},        # okapi: test, fewshot train
    **{f"arc_{lang}": ("alexandrainst/m_arc", lang) for lang in ("fr", "es", "de", "ru")},             # okapi: train / validation / test
    **{f"hellaswag_{lang}": ("alexandrainst/m_hellaswag", lang) for lang in ("fr", "es", "de", "ru")},  # okapi: val
}

#: IFEval's ``kwargs`` struct: one field per argument of any instruction (google/IFEval card;
#: the arguments of lm-eval's ifeval instructions' build_description), null where unused
IFEVAL_KWARGS = {
    "num_highlights": "int64", "relation": "string", "num_words": "int64", "num_placeholders": "int64",
    "prompt_to_repeat": "string", "num_paragraphs": "int64", "nth_paragraph": "int64", "first_word": "string",
    "num_bullets": "int64", "section_spliter": "string", "num_sections": "int64", "capital_relation": "string",
    "capital_frequency": "int64", "keywords": ["string"], "num_sentences": "int64", "postscript_marker": "string",
    "language": "string", "forbidden_words": ["string"], "keyword": "string", "frequency": "int64",
    "end_phrase": "string", "letter": "string", "let_frequency": "int64", "let_relation": "string",
}

#: HumanEval+ stand-in problems (prompt, canonical_solution, test, entry_point). Even rows end
#: their prompt inside a comment on a finished function: whatever one-line text the model
#: appends, the program passes. Odd rows need a body: a tiny word-level model's output
#: (w-words, no newline) cannot pass. pass@1 over the first 2k problems is therefore 50 %.
HUMANEVAL_PROBLEMS = [
    ('def double(x):\n    """Return twice x."""\n    return 2 * x  # note:', " doubles its argument\n",
     "def check(candidate):\n    assert candidate(3) == 6\n    assert candidate(-1) == -2\n", "double"),
    ('def add_one(x):\n    """Return x plus one.\n    >>> add_one(1)\n    2\n    """\n', "    return x + 1\n",
     "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-3) == -2\n", "add_one"),
    ('def square(x):\n    """Return x squared."""\n    return x * x  # note:', " squares\n",
     "def check(candidate):\n    assert candidate(4) == 16\n", "square"),
    ('def last(xs):\n    """Return the last element of a non-empty list."""\n', "    return xs[-1]\n",
     "def check(candidate):\n    assert candidate([1, 2, 3]) == 3\n    assert candidate([7]) == 7\n", "last"),
]

#: MBPP+ stand-in problems (prompt, code, test_list): the model's text alone is the program
#: (mbpp's pass_at_1 joins it with the three asserts), so a tiny model's w-words fail them all
MBPP_PROBLEMS = [
    ("Write a function to add two numbers.", "def add(a, b):\n    return a + b",
     ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"]),
    ("Write a function to reverse a string.", "def rev(s):\n    return s[::-1]",
     ["assert rev('ab') == 'ba'", "assert rev('') == ''", "assert rev('abc') == 'cba'"]),
    ("Write a function that returns the maximum of a list.", "def biggest(xs):\n    return max(xs)",
     ["assert biggest([1, 5, 2]) == 5", "assert biggest([-3]) == -3", "assert biggest([2, 2]) == 2"]),
]


def put_lm_eval_datasets(hub: Path, n: int = 4) -> None:
    """The hub datasets read by MergeBench's default lm-eval tasks (``LM_EVAL_DATASETS``), in
    their real schemas (dataset cards; the columns the task YAMLs' doc_to_text / doc_to_target /
    process_docs read), tiny, snapshot-only:

    - openai/gsm8k: configs main / socratic, train / test; question, answer ending "#### <n>";
    - google/IFEval: train; key int64, prompt, instruction_id_list list[string], kwargs list[struct];
    - evalplus/humanevalplus: test; task_id, prompt, canonical_solution, entry_point, test;
    - evalplus/mbppplus: test; task_id int64, code, prompt, source_file, test_imports list[string],
      test_list list[string], test;
    - skg/toxigen-data: config annotated (train / test: text, target_group, ..., intent,
      toxicity_ai, toxicity_human float64, ...) and config train (the unannotated generations);
    - alexandrainst/m_mmlu (train / val / test) and m_arc (train / validation / test), one config
      per language: id, instruction, option_a..d (m_arc: ..e), answer "A".."E";
    - alexandrainst/m_hellaswag, one config per language, val: HellaSwag's columns (ind,
      activity_label, ctx_a, ctx_b, ctx, endings list[string], source_id, split, split_type,
      label as a string).
    """
    import datasets
    from datasets import Features, List, Value

    def words(i, k=3, off=0):
        return " ".join(f"w{(off + i + 7 * j) % 60}" for j in range(k))

    def gsm8k(k):
        return datasets.Dataset.from_dict({
            "question": [f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?" for i in range(k)],
            "answer": [f"He has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}" for i in range(k)],
        })

    put_dataset_snapshot(hub, "openai/gsm8k", {"main": {"train": gsm8k(n), "test": gsm8k(n)}, "socratic": {"train": gsm8k(2), "test": gsm8k(2)}})

    # google/IFEval: instructions whose checks run offline (no_comma; number_sentences, which
    # sentence-splits with nltk's punkt_tab; english_capital)
    kw_feat = {k: (List(Value(v[0])) if isinstance(v, list) else Value(v)) for k, v in IFEVAL_KWARGS.items()}
    def kw(**given):
        return {k: given.get(k) for k in IFEVAL_KWARGS}
    ifeval_rows = [
        ("Write a short note without any commas. " + words(i), ["punctuation:no_comma", "length_constraints:number_sentences"],
         [kw(), kw(relation="less than", num_sentences=3)]) if i % 2 == 0 else
        ("WRITE YOUR WHOLE ANSWER IN CAPITAL LETTERS. " + words(i), ["change_case:english_capital"], [kw()])
        for i in range(n)
    ]
    ifeval = datasets.Dataset.from_dict(
        {"key": [1000 + i for i in range(n)], "prompt": [r[0] for r in ifeval_rows],
         "instruction_id_list": [r[1] for r in ifeval_rows], "kwargs": [r[2] for r in ifeval_rows]},
        features=Features({"key": Value("int64"), "prompt": Value("string"), "instruction_id_list": List(Value("string")),
                           "kwargs": List(kw_feat)}))
    put_dataset_snapshot(hub, "google/IFEval", {"default": {"train": ifeval}})

    he = [HUMANEVAL_PROBLEMS[i % len(HUMANEVAL_PROBLEMS)] for i in range(n)]
    put_dataset_snapshot(hub, "evalplus/humanevalplus", {"default": {"test": datasets.Dataset.from_dict({
        "task_id": [f"HumanEval/{i}" for i in range(n)], "prompt": [p[0] for p in he],
        "canonical_solution": [p[1] for p in he], "entry_point": [p[3] for p in he], "test": [p[2] for p in he]})}})

    mb = [MBPP_PROBLEMS[i % len(MBPP_PROBLEMS)] for i in range(n)]
    put_dataset_snapshot(hub, "evalplus/mbppplus", {"default": {"test": datasets.Dataset.from_dict(
        {"task_id": [11 + i for i in range(n)], "code": [p[1] for p in mb], "prompt": [p[0] for p in mb],
         "source_file": ["Benchmark Questions Verification V2.ipynb"] * n, "test_imports": [[] for _ in range(n)],
         "test_list": [p[2] for p in mb], "test": ["\n".join(p[2]) + "\n" for p in mb]},
        features=Features({"task_id": Value("int64"), "code": Value("string"), "prompt": Value("string"),
                           "source_file": Value("string"), "test_imports": List(Value("string")),
                           "test_list": List(Value("string")), "test": Value("string")}))}})

    tox_cols = ["text", "target_group", "factual?", "ingroup_effect", "lewd", "framing", "predicted_group",
                "stereotyping", "intent", "toxicity_ai", "toxicity_human", "predicted_author", "actual_method"]
    tox_feat = Features({c: Value("float64" if c in ("intent", "toxicity_ai", "toxicity_human") else "string") for c in tox_cols})

    def toxigen(k):
        rows = {c: [f"{c} {i}" for i in range(k)] for c in tox_cols}
        rows["text"] = [words(i, 4) for i in range(k)]
        rows["target_group"] = [["black", "women", "asian", "lgbtq"][i % 4] for i in range(k)]
        for c, vals in (("intent", [1.0, 4.3]), ("toxicity_ai", [1.0, 4.7]), ("toxicity_human", [1.3, 4.0])):
            rows[c] = [vals[i % 2] for i in range(k)]  # (ai + human) > 5.5 -> hateful on odd rows
        return datasets.Dataset.from_dict(rows, features=tox_feat)

    unannotated = datasets.Dataset.from_dict({"prompt": ["- " + words(i) for i in range(2)], "generation": [words(i, 2) for i in range(2)],
                                             "generation_method": ["ALICE", "TopK"], "group": ["black", "women"],
                                             "prompt_label": [0, 1], "roberta_prediction": [0.01, 0.9]})
    put_dataset_snapshot(hub, "skg/toxigen-data", {"annotated": {"train": toxigen(n), "test": toxigen(n)}, "train": {"train": unannotated}})

    letters = "ABCDE"

    def okapi_mc(k, options):
        rows = {"id": [f"q{i}" for i in range(k)], "instruction": [words(i, 4) + " ?" for i in range(k)],
                **{f"option_{c}": [words(i, 2, 3 * j + 1) for i in range(k)] for j, c in enumerate("abcde"[:options])},
                "answer": [letters[i % options] for i in range(k)]}
        return datasets.Dataset.from_dict(rows, features=Features({c: Value("string") for c in rows}))

    def hellaswag(k):
        return datasets.Dataset.from_dict({
            "ind": [i for i in range(k)], "activity_label": [words(i, 1) for i in range(k)],
            "ctx_a": [words(i, 3) for i in range(k)], "ctx_b": [words(i, 2, 5) for i in range(k)],
            "ctx": [words(i, 3) + " " + words(i, 2, 5) for i in range(k)],
            "endings": [[words(i, 2, 11 * j) for j in range(4)] for i in range(k)],
            "source_id": [f"activitynet~v_{i}" for i in range(k)], "split": ["val"] * k, "split_type": ["indomain"] * k,
            "label": [str(i % 4) for i in range(k)]},
            features=Features({"ind": Value("int32"), "activity_label": Value("string"), "ctx_a": Value("string"),
                               "ctx_b": Value("string"), "ctx": Value("string"), "endings": List(Value("string")),
                               "source_id": Value("string"), "split": Value("string"), "split_type": Value("string"),
                               "label": Value("string")}))

    langs = sorted({cfg for repo, cfg in LM_EVAL_DATASETS.values() if repo.startswith("alexandrainst/")})
    put_dataset_snapshot(hub, "alexandrainst/m_mmlu", {l: {"train": okapi_mc(2, 4), "val": okapi_mc(2, 4), "test": okapi_mc(n, 4)} for l in langs})
    put_dataset_snapshot(hub, "alexandrainst/m_arc", {l: {"train": okapi_mc(2, 5), "validation": okapi_mc(2, 5), "test": okapi_mc(n, 5)} for l in langs})
    put_dataset_snapshot(hub, "alexandrainst/m_hellaswag", {l: {"val": hellaswag(n)} for l in langs})


def build_standin_hub(root: Path, families=("clip", "glue", "llama", "gemma2"), n_train: int = 8, n_test: int = 6,
                      glue_experts=None) -> Path:
    """Write the stand-in hub cache under ``root/hf/hub`` (HF_HOME = ``root/hf``); return HF_HOME.
    ``glue_experts``: only these GLUE tasks' experts, no LoRA adapters (the dataset keeps every config)."""
    root = Path(root)
    hub, work = root / "hf" / "hub", root / "work"
    work.mkdir(parents=True, exist_ok=True)
    if "clip" in families:
        _clip_models(hub, work)
        _clip_datasets(hub, n_train, n_test)
    if "glue" in families:
        _glue(hub, work, n_train, n_test, glue_experts, lora=glue_experts is None)
    if "llama" in families:
        _llm_family(hub, work, "llama", "meta-llama/Llama-3.2-3B", "MergeBench/Llama-3.2-3B")
    if "gemma2" in families:
        _llm_family(hub, work, "gemma2", "google/gemma-2-2b", "MergeBench/gemma-2-2b")
    if "llama" in families or "gemma2" in families:
        _mergebench_data(hub, max(n_train, 8))
        put_lm_eval_datasets(hub)
    shutil.rmtree(work)  # only the hub cache remains: snapshot-only
    return root / "hf"
