"""A tiny offline FLAN-T5/GLUE world for the T5 tests (no network).

* a BPE tokenizer trained here on the rendered GLUE prompts (``PreTrainedTokenizerFast``
  with T5's special ids: pad 0, eos 1, unk 2; Metaspace so "3.4" decodes back to "3.4");
* tiny GLUE-schema ``DatasetDict``s (the ``nyu-mll/glue`` columns and split names) saved
  with ``save_to_disk``, one folder per task under ``data/``;
* a tiny gated-GELU ``T5ForConditionalGeneration`` (d_model 32, 2 + 2 blocks), trained
  briefly on all tasks (the base) and fine-tuned per task (the experts), saved the way
  transformers 4.x saved FLAN-T5 (``tie_word_embeddings: false``, own ``lm_head``).

``world()`` builds it once per test process (a few seconds) and returns its paths.
"""
from __future__ import annotations

import atexit
import json
import random
import shutil
import tempfile
from pathlib import Path

import torch

from featcal.tasks.glue import glue_templates

TASKS = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]
EXPERT_TASKS = ["cola", "mnli", "rte", "stsb"]
WORDS = "the cat dog sat ran on mat big small red blue fast slow tree house a bird sings sun moon".split()

COLUMNS = {
    "cola": ["sentence"],
    "mnli": ["premise", "hypothesis"],
    "mrpc": ["sentence1", "sentence2"],
    "qnli": ["question", "sentence"],
    "qqp": ["question1", "question2"],
    "rte": ["sentence1", "sentence2"],
    "sst2": ["sentence"],
    "stsb": ["sentence1", "sentence2"],
}
NUM_LABELS = {"cola": 2, "mnli": 3, "mrpc": 2, "qnli": 2, "qqp": 2, "rte": 2, "sst2": 2}


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))


def glue_rows(task: str, n: int, seed: int) -> list[dict]:
    """Rows with the nyu-mll/glue schema: text columns, label (int, STS-B float), idx.
    The label is a function of the first sentence's length, so a model can learn it."""
    rng = random.Random(f"{task}-{seed}")
    rows = []
    for i in range(n):
        row = {c: _sentence(rng) for c in COLUMNS[task]}
        words = len(row[COLUMNS[task][0]].split())
        if task == "stsb":
            row["label"] = float(round(rng.uniform(0.0, 5.0), 2))
        else:
            row["label"] = words % NUM_LABELS[task]
        row["idx"] = i
        rows.append(row)
    return rows


def save_glue_datasets(root: Path, n_train: int = 32, n_test: int = 12) -> Path:
    """One save_to_disk DatasetDict per task: train + its GLUE test split name. The test
    split repeats the first train rows (so a memorising expert scores high there)."""
    import datasets

    templates = glue_templates()
    for task in TASKS:
        train = glue_rows(task, n_train, seed=0)
        test = [dict(r, idx=i) for i, r in enumerate(train[:n_test])]
        features = {c: datasets.Value("string") for c in COLUMNS[task]}
        features["label"] = datasets.Value("float32") if task == "stsb" else datasets.ClassLabel(num_classes=NUM_LABELS[task])
        features["idx"] = datasets.Value("int32")
        feats = datasets.Features(features)
        dd = datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_list(train, features=feats),
                templates[task]["test_split"]: datasets.Dataset.from_list(test, features=feats),
            }
        )
        dd.save_to_disk(str(root / task))
    return root


def build_tokenizer(folder: Path, corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return fast


def tiny_t5_config(vocab_size: int, **overrides):
    from transformers import T5Config

    kw = dict(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=32,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    kw.update(overrides)
    return T5Config(**kw)


def save_like_transformers4(model, folder: Path) -> Path:
    """Write ``model`` as transformers 4.x wrote FLAN-T5: config ``tie_word_embeddings:
    false`` without 5.x keys, the encoder/decoder embedding copies and a separate
    ``lm_head`` in the weights file."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if torch.equal(sd["lm_head.weight"], sd["shared.weight"]):  # a 5.x-built (tied) model: untie it
        sd["lm_head.weight"] = sd["lm_head.weight"] + 0.01 * torch.randn_like(sd["lm_head.weight"])
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    for key in ("scale_decoder_outputs", "dtype", "torch_dtype", "transformers_version"):
        cfg.pop(key, None)
    cfg.update(tie_word_embeddings=False, transformers_version="4.41.2", architectures=["T5ForConditionalGeneration"])
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def _pairs(pool, task: str) -> tuple[list[list[int]], list[list[int]]]:
    data = pool.split(task, "train")
    return data.input_ids, data.target_ids


def train_steps(model, batches: list[tuple[list[list[int]], list[list[int]]]], steps: int, lr: float, seed: int) -> None:
    from featcal.tasks.text2text import pad_batch, pad_labels

    g = random.Random(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        ids_all, tgt_all = g.choice(batches)
        rows = [g.randrange(len(ids_all)) for _ in range(16)]
        ids, mask = pad_batch([ids_all[r] for r in rows], 0)
        labels = pad_labels([tgt_all[r] for r in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


_WORLD: dict[str, dict] = {}


def world() -> dict:
    """Build (once per process) and return {root, base, experts, lora, data, tokenizer}."""
    if "w" in _WORLD:
        return _WORLD["w"]
    from transformers import T5ForConditionalGeneration

    from featcal.backbone.t5 import load_t5
    from featcal.tasks.glue import GLUETaskPool
    from featcal.utils import torch_threads

    root = Path(tempfile.mkdtemp(prefix="featcal-t5-world-"))
    atexit.register(shutil.rmtree, root, True)  # removed when the test process ends
    with torch_threads(1):
        data = save_glue_datasets(root / "data")
        templates = glue_templates()
        corpus = []
        for task in TASKS:
            for row in glue_rows(task, 32, seed=0):
                info = templates[task]
                corpus.append(info["template"].format(**{f: row[f] for f in info["fields"]}))
            corpus += info.get("label_words", []) * 5
        corpus += [f"{x / 10:.1f}" for x in range(0, 51)] * 3
        tok = build_tokenizer(root / "tokenizer", corpus)
        pool = GLUETaskPool(TASKS, tok, datasets=str(data), cache_dir=str(root / "cache"), progress=False)

        torch.manual_seed(0)
        base = T5ForConditionalGeneration(tiny_t5_config(len(tok)))
        train_steps(base, [_pairs(pool, t) for t in TASKS], steps=60, lr=5e-3, seed=0)
        base_dir = save_like_transformers4(base, root / "base")
        tok.save_pretrained(str(base_dir))
        experts = {}
        for i, task in enumerate(EXPERT_TASKS):
            model = load_t5(str(base_dir))
            train_steps(model, [_pairs(pool, task)], steps=40, lr=5e-3, seed=i + 1)
            experts[task] = str(save_like_transformers4(model, root / "experts" / task))
    out = {"root": root, "base": str(base_dir), "experts": experts, "data": str(data), "tokenizer": str(base_dir), "pool": pool}
    _WORLD["w"] = out
    return out


def lora_adapter(base_dir: str, folder: Path, seed: int, r: int = 4) -> Path:
    """A tiny peft LoRA adapter on q/v with non-zero B (peft initialises B at zero)."""
    from peft import LoraConfig, TaskType, get_peft_model

    from featcal.backbone.t5 import load_t5

    model = load_t5(base_dir)
    cfg = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=r, lora_alpha=2 * r, target_modules=["q", "v"], lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(folder))
    return folder
