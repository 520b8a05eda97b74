"""The embedded text-to-text suite: a small T5 built offline on synthetic text tasks.

The offline counterpart of ``featcal.suites.embedded`` (the vision suite) for the T5
family. The spec is ``featcal.suites.embedded_t5.spec``; everything else is generated in
code (``featcal.suites.embedded_t5.data``):

1. A word-level tokenizer over the suite's fixed vocabulary (``tokenizers.Tokenizer``
   with a ``WordLevel`` model, eos appended like T5's), wrapped in
   ``PreTrainedTokenizerFast`` and saved with every model, so each folder loads through
   the normal T5 loaders (``featcal.backbone.t5.load_t5`` / ``load_t5_tokenizer``).
2. Each task's train and test splits (prompt, label word) are drawn from its generator
   with a seeded ``random.Random``.
3. A small ``T5ForConditionalGeneration`` (gated-GELU, FLAN-T5's unscaled decoder output)
   is pre-trained as the shared **base** on a multitask mix: mostly generic objectives
   (span denoising, copying, reversing, sorting, counting, picking the words of a
   category, first/last word) and a small share (``pretrain_mix``) of the evaluation
   tasks' *train* examples, the way FLAN-T5 saw GLUE-like tasks before its GLUE experts
   were fine-tuned. The base therefore answers with label words, imperfectly.
4. One **expert** per task is fine-tuned gently from the base (the whole model, a few
   steps at a small learning rate) on its task's train split.

Scoring is the GLUE scorer (``featcal.tasks.text2text``): greedy generation, decoded
answer == label word → accuracy in %.

The build is deterministic for a spec (seeded generators; the model initialised inside a
forked RNG scope) and, on the CPU, portable: the same files on every x86-64 CPU (pinned
child processes, the experts trained by several at once; see
``featcal.suites.embedded.build`` and ``featcal.suites.build``). It is cached under ``<cache>/embedded_t5/<spec hash>/``: ``base/`` and
``experts/<task>/`` (``save_pretrained`` + the tokenizer), ``data/<task>.json`` (the
splits as text) and ``manifest.json`` (sha256 and size of every file, written last; the
folder is assembled in a temporary directory and renamed into place). A missing,
truncated or altered file, or a bad manifest, is detected on load and the folder is
rebuilt with a warning. A lock file serialises builders.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from featcal.cache import ensure_suite, read_manifest, write_manifest  # noqa: F401  (read_manifest: public here)
from featcal.suites.build import BuiltSuite
from featcal.suites import build as suite_build
from featcal.suites.embedded_t5.data import PRETRAIN, TASKS, vocabulary
from featcal.suites.embedded_t5.spec import EmbeddedT5Spec, expected_split_sizes
from featcal.utils import train_adamw

#: CPU threads used while building
BUILD_THREADS = 1
IGNORE = -100


# --------------------------------------------------------------------------------------
# cache location and validation (featcal.cache: lock, manifest, rebuild)
# --------------------------------------------------------------------------------------
def cache_path(spec: EmbeddedT5Spec, cache_dir: str | os.PathLike | None = None) -> Path:
    return spec.cache_path(cache_dir)


def validate_cache(folder: Path, spec: EmbeddedT5Spec) -> str | None:
    """``None`` if ``folder`` holds a complete build of ``spec``, else the reason it does not."""
    return spec.cache_problem(folder)


def ensure_built(spec: EmbeddedT5Spec | Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, progress: bool = True) -> Path:
    """The folder of a complete, verified build of ``spec``, built if needed (``featcal.cache.ensure_suite``)."""
    spec = EmbeddedT5Spec.from_config(spec)
    # ``build`` is looked up per call, not bound at import: tests replace it to count builds
    return ensure_suite(spec, cache_dir, lambda tmp: build(spec, tmp, device=device, progress=progress))


# --------------------------------------------------------------------------------------
# tokenizer, model, data
# --------------------------------------------------------------------------------------
def make_tokenizer():
    """The suite's word-level tokenizer (``<pad>`` = 0, ``</s>`` = 1 appended, ``<unk>`` = 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=512, padding_side="right",
    )


def t5_config(spec: EmbeddedT5Spec, vocab_size: int):
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=spec.d_model,
        d_kv=spec.d_model // spec.heads,
        d_ff=spec.d_ff,
        num_layers=spec.layers,
        num_decoder_layers=spec.layers,
        num_heads=spec.heads,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,  # 5.x: no d_model^-0.5 output scaling (T5 v1.1 / FLAN-T5); embeddings stay shared
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def _rng(spec: EmbeddedT5Spec, *names: str) -> random.Random:
    digest = hashlib.sha256(":".join([str(spec.seed), *names]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def make_task_data(spec: EmbeddedT5Spec, name: str) -> dict[str, list[dict[str, Any]]]:
    """A task's splits: rows ``{"input", "target", "label"}`` (train first, then test, from
    one seeded stream)."""
    rng = _rng(spec, name, "data")
    task = TASKS[name]
    rows = []
    for _ in range(spec.n_train + spec.n_test):
        prompt, word, label = task.example(rng)
        rows.append({"input": prompt, "target": word, "label": int(label)})
    return {"train": rows[: spec.n_train], "test": rows[spec.n_train:]}


# --------------------------------------------------------------------------------------
# training and scoring
# --------------------------------------------------------------------------------------
def _encode(tok, texts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    b = tok(list(texts), padding=True, return_tensors="pt")
    return b["input_ids"].to(device), b["attention_mask"].to(device)


def _train(
    model: nn.Module,
    tok,
    batch_fn: Callable[[], list[tuple[str, str]]],
    steps: int,
    lr: float,
    spec: EmbeddedT5Spec,
    device: torch.device,
    desc: str,
    progress: bool,
) -> float:
    def loss_of(pairs: list[tuple[str, str]]) -> torch.Tensor:
        ids, mask = _encode(tok, [a for a, _ in pairs], device)
        labels, _ = _encode(tok, [b for _, b in pairs], device)
        labels = labels.masked_fill(labels == tok.pad_token_id, IGNORE)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    return train_adamw(
        model, (batch_fn() for _ in range(steps)), loss_of, steps, lr, spec.weight_decay, spec.warmup_frac,
        ema_weight=0.05, desc=desc, progress=progress,
    )


@torch.no_grad()
def score(model: nn.Module, tok, rows: Sequence[Mapping[str, Any]], device: torch.device, batch_size: int = 250, max_new_tokens: int = 10) -> float:
    """Exact-match accuracy (%) of the greedy answers: the GLUE scorer of ``featcal.tasks.text2text``."""
    from featcal.backbone.seq2seq import greedy_generate
    from featcal.tasks.text2text import exact_match_accuracy

    model.eval()
    answers: list[str] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        ids, mask = _encode(tok, [r["input"] for r in chunk], device)
        gen = greedy_generate(model, ids, mask, max_new_tokens)
        answers += [a.strip() for a in tok.batch_decode(gen.cpu(), skip_special_tokens=True)]
    return exact_match_accuracy(answers, [r["target"] for r in rows])


# --------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------
def build(
    spec: EmbeddedT5Spec,
    out: Path,
    device: str | torch.device | None = None,
    progress: bool = True,
    threads: int | None = BUILD_THREADS,
    workers: int | None = None,
    pinned: bool = True,
) -> dict[str, Any]:
    """Build ``spec`` into the (new) folder ``out``; the manifest is written last.

    As ``featcal.suites.embedded.build.build``: on the CPU (``device=None``) pinned child
    processes build the same files on every x86-64 CPU, the experts (each also scoring the
    base on its task) in ``workers`` children at once; on a GPU or with ``pinned=False``
    the steps run in this process with ``threads`` intra-op threads, marked not portable.
    """
    return suite_build.build_suite(spec, Path(out), device, progress, threads, workers, pinned,
                                   f"{__name__}:_build_base", f"{__name__}:_build_expert")


def preload() -> None:
    """Import what the build steps use (a pinned worker does this while the base trains)."""
    from transformers import T5ForConditionalGeneration  # noqa: F401


def _build_base(spec: Mapping[str, Any], out: str, device: str, progress: bool) -> dict[str, Any]:
    """Step 1 (a pinned child, see ``build``): the task data, the tokenizer and the
    pre-trained base into ``out``."""
    from transformers import T5ForConditionalGeneration

    spec = EmbeddedT5Spec.from_config(spec)
    out, dev = Path(out), torch.device(device)
    suite_build.quiet(progress)
    started, cpu0 = time.time(), time.process_time()
    tok = make_tokenizer()

    # ---- data ------------------------------------------------------------------
    data = {t: make_task_data(spec, t) for t in spec.tasks}
    (out / "data").mkdir()
    for t, d in data.items():
        (out / "data" / f"{t}.json").write_text(json.dumps(d) + "\n")

    # ---- base: multitask pre-training -----------------------------------------------
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        base = T5ForConditionalGeneration(t5_config(spec, len(tok)))
    base.to(dev)
    generic = [PRETRAIN[k] for k in sorted(PRETRAIN)]
    prng = _rng(spec, "__pretrain__")

    def pretrain_batch() -> list[tuple[str, str]]:
        pairs = []
        for _ in range(spec.pretrain_batch):
            if prng.random() < spec.pretrain_mix:
                row = data[prng.choice(spec.tasks)]["train"][prng.randrange(spec.n_train)]
                pairs.append((row["input"], row["target"]))
            else:
                pairs.append(prng.choice(generic)(prng))
        return pairs

    pre_loss = _train(base, tok, pretrain_batch, spec.pretrain_steps, spec.pretrain_lr, spec, dev, "pretrain base", progress)
    base.save_pretrained(str(out / "base"), safe_serialization=True)
    tok.save_pretrained(str(out / "base"))
    return {
        "fields": {
            "tasks": {t: {"labels": list(TASKS[t].labels), "description": TASKS[t].description} for t in spec.tasks},
            "split_sizes": expected_split_sizes(spec),
            "pretrain_final_loss": pre_loss,
        },
        "seconds": {"pretrain": time.time() - started},
        "cpu": {"base": time.process_time() - cpu0},
    }


def _build_expert(spec: Mapping[str, Any], out: str, device: str, progress: bool, task: str) -> dict[str, Any]:
    """Step 2 (one per task, pinned children in parallel, see ``build``): fine-tune the
    task's expert gently from the saved base, save it with the tokenizer, and score it and
    the base on the task's test split. Reads only the step-1 files."""
    from transformers import T5ForConditionalGeneration

    spec = EmbeddedT5Spec.from_config(spec)
    out, dev = Path(out), torch.device(device)
    suite_build.quiet(progress)
    t0, c0 = time.time(), time.process_time()
    tok = make_tokenizer()
    data = json.loads((out / "data" / f"{task}.json").read_text())
    rows = data["train"]
    frng = _rng(spec, task, "finetune")

    def finetune_batch() -> list[tuple[str, str]]:
        return [(r["input"], r["target"]) for r in (rows[frng.randrange(len(rows))] for _ in range(spec.finetune_batch))]

    expert = T5ForConditionalGeneration.from_pretrained(str(out / "base")).to(dev)
    loss = _train(expert, tok, finetune_batch, spec.finetune_steps, spec.finetune_lr, spec, dev, f"fine-tune {task}", progress)
    expert.save_pretrained(str(out / "experts" / task), safe_serialization=True)
    tok.save_pretrained(str(out / "experts" / task))
    expert_score = score(expert, tok, data["test"], dev)
    del expert
    base = T5ForConditionalGeneration.from_pretrained(str(out / "base")).to(dev)
    base_score = score(base, tok, data["test"], dev)
    return {
        "task": task,
        "fields": [(["finetune_final_loss"], loss), (["metrics", "base"], base_score), (["metrics", "experts"], expert_score)],
        "seconds": time.time() - t0,
        "cpu": time.process_time() - c0,
    }


# --------------------------------------------------------------------------------------
# shared by the adapter (featcal.suites.embedded_t5.adapter) and the task pool
# --------------------------------------------------------------------------------------
class EmbeddedT5Build(BuiltSuite):
    """The embedded_t5 suite's spec and cache folder (``featcal.suites.build.BuiltSuite``)."""

    SPEC = EmbeddedT5Spec
    ENSURE_BUILT = staticmethod(ensure_built)
