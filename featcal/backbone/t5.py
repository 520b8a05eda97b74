"""T5 encoder–decoders (transformers ``T5ForConditionalGeneration``, e.g. FLAN-T5).

Loading: full checkpoints (hub id or local folder, saved by transformers 4.x or 5.x) or
LoRA adapters (a peft adapter folder or hub id on top of the base) merged into dense
weights with ``merge_and_unload`` before any merging, as FusionBench does.

Blocks, in forward order: the encoder blocks, then the decoder blocks. The last
encoder block is wrapped in :class:`T5EncoderExit`, whose forward also applies the
encoder's final RMS norm and switches the block state to the decoder: its calibratable
modules are those of the wrapped block only, so the final norm (like the shared
embeddings and ``lm_head``) keeps its merged value.

Block state (``BlockState.extras``): ``stage`` ("encoder" / "decoder"), the attention
masks as ``T5Stack`` builds them, the relative position bias of each stack (computed
once, by that model's first block of the stack, and carried), and the decoder inputs.
In the decoder stage ``enc_out`` holds *that model's own* encoder output: the merged
(student) chain carries the calibrated merged encoder's output, each expert chain its
expert encoder's output, so every cross-attention reads its own model's encoder.

Decoder inputs are teacher-forced targets (``decoder_input_ids``,
``decoder_attention_mask`` in the input batch). For calibration they are label-free:
``prepare_calibration`` attaches, per task, each expert's own greedy answer to every
calibration example (``calibration_target="expert"``, default) or the gold target
(``"gold"``, an ablation; the task pool then ships ``labels``).

Final representation (``readout``/``represent``): the decoder's final hidden state as
``lm_head`` reads it (final norm, and the output scaling of original-T5 checkpoints),
**one row per target token**: [M, D] with M the number of real decoder positions of the
batch (``decoder_attention_mask``). ``representation_site`` is ``lm_head``'s input, so a
Surgery module hooked there corrects every decoding step of ``generate``.

The encoder exit's state also carries its own output (``extras["block_output"]``), so
the drift report of that block measures the encoder output, not the decoder inputs.
Merging goes over the distinct tensors (tied embedding copies count once).

Token masks: encoder stage: ``token_mask`` = the input attention mask; decoder stage:
``token_mask`` = ``readout_mask`` = the target tokens (every target token counts in the
last block). The cross-attention key/value projections read the encoder output, whose
rows are weighted by the encoder attention mask (``module_masks``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from featcal.backbone.base import Backbone, BlockState, Inputs
from featcal.backbone.seq2seq import IGNORE, decoder_inputs_from_labels, greedy_generate, labels_from_generated
from featcal.io.hub import offline_hint, resolve_model_dir
from featcal.errors import SourceUnavailable
from featcal.utils import as_torch_dtype

_T5_FILES = ["*.json", "*.safetensors", "*.model", "*.txt"]  # hub repos also carry .bin/TF/Flax copies
_T5_BIN_FILES = ["*.json", "pytorch_model*.bin", "*.model", "*.txt"]


def _wrap_error(source: str, err: Exception) -> SourceUnavailable:
    return SourceUnavailable(offline_hint("model", str(source)) + f" (cause: {type(err).__name__}: {err})")


def is_peft_adapter(folder: Path) -> bool:
    return (Path(folder) / "adapter_config.json").exists()


def load_t5(source: str, dtype: str | torch.dtype = "float32") -> nn.Module:
    """A ``T5ForConditionalGeneration`` from a hub id or a local folder (eval mode, CPU).

    Checkpoints saved by transformers 4.x (``tie_word_embeddings: false`` with a separate
    ``lm_head``, as FLAN-T5) load under 5.x with their own ``lm_head``. Any failure to
    find or read the checkpoint raises ``SourceUnavailable`` naming it.
    """
    from transformers import T5ForConditionalGeneration

    folder = resolve_model_dir(source, allow_patterns=_T5_FILES)
    if not is_peft_adapter(folder) and not any(folder.glob("*.safetensors")):
        folder = resolve_model_dir(source, allow_patterns=_T5_BIN_FILES)  # an older repo: PyTorch .bin weights only
    if is_peft_adapter(folder):
        raise SourceUnavailable(
            f"'{source}' is a peft (LoRA) adapter, not a full model: load it with load_t5_lora "
            "(backbone option lora: true) on top of its base model"
        )
    try:
        model = T5ForConditionalGeneration.from_pretrained(str(folder), dtype=as_torch_dtype(dtype))
    except TypeError:  # transformers 4.x spells it torch_dtype
        try:
            model = T5ForConditionalGeneration.from_pretrained(str(folder), torch_dtype=as_torch_dtype(dtype))
        except Exception as err:
            raise _wrap_error(source, err) from err
    except Exception as err:  # OSError, bad config, safetensors errors, ...
        raise _wrap_error(source, err) from err
    return model.eval()


def load_t5_lora(base: str | nn.Module, adapter: str, dtype: str | torch.dtype = "float32") -> nn.Module:
    """Base T5 + a peft LoRA adapter (hub id or folder), merged into dense weights
    (``merge_and_unload``): the result is a plain ``T5ForConditionalGeneration``."""
    try:
        from peft import PeftModel
    except ImportError as err:  # pragma: no cover - peft is a dependency
        raise SourceUnavailable("LoRA experts need the 'peft' package: pip install peft") from err
    model = copy.deepcopy(base) if isinstance(base, nn.Module) else load_t5(base, dtype)
    folder = resolve_model_dir(adapter, allow_patterns=["adapter_config.json", "adapter_model.*", "*.json"])
    if not is_peft_adapter(folder):
        raise SourceUnavailable(f"'{adapter}' has no adapter_config.json: not a peft adapter")
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
        merged = peft_model.merge_and_unload()
    except Exception as err:
        raise SourceUnavailable(
            f"could not apply the peft adapter '{adapter}' to its base model (cause: {type(err).__name__}: {err})"
        ) from err
    return merged.to(as_torch_dtype(dtype)).eval()


def load_t5_tokenizer(source: str):
    """The tokenizer of a T5 checkpoint (hub id or folder)."""
    from transformers import AutoTokenizer

    folder = resolve_model_dir(source, allow_patterns=_T5_FILES)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:
        raise SourceUnavailable(
            offline_hint("model", str(source)) + f" (tokenizer; cause: {type(err).__name__}: {err})"
        ) from err


# ---------------------------------------------------------------------- the adapter


class T5EncoderExit(nn.Module):
    """The last encoder block together with the encoder's final norm (a view on the
    model's own modules, not a copy): running it ends the encoder stage."""

    def __init__(self, block: nn.Module, final_layer_norm: nn.Module):
        super().__init__()
        self.block = block
        self.final_layer_norm = final_layer_norm


def _mask_functions():
    """transformers 5's mask builders. Under 4.x a T5 block ignores the attention mask once
    it is handed a position bias (the stack folded the mask into the bias), so the block
    forward here needs 5.x; checkpoints saved by 4.x load fine."""
    try:
        from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
    except ImportError as err:
        import transformers

        raise RuntimeError(
            f"the T5 adapter's block forward needs transformers >= 5 (installed: {transformers.__version__}); "
            "`pip install -U transformers`"
        ) from err

    return create_bidirectional_mask, create_causal_mask


class T5Backbone(Backbone):
    """Adapter for transformers ``T5ForConditionalGeneration`` (FLAN-T5 and look-alikes).

    Args:
        tasks: task names, one expert per task.
        base: hub id or local folder of θ₀ (also the tokenizer's source).
        experts: hub ids / folders of the experts (mapping task → source, or a list aligned
            with tasks): full fine-tunes, or peft LoRA adapters when ``lora`` is true.
        lora: the experts are peft adapters on ``base``, merged into dense weights on load
            ("auto": whatever each expert folder holds).
        dtype: model dtype on load (FeatCal statistics stay float32).
        calibration_target: decoder targets of the calibration examples: "expert" (each
            expert's own greedy answer; label-free) or "gold" (the gold target; ablation).
        max_new_tokens: answer length limit of the greedy expert answers (the evaluation's).
        generation_batch_size: examples per ``generate`` call when answering.
    """

    key_value_patterns = ("k", "v")

    #: config keys naming model sources (checked for availability before anything loads)
    model_source_keys = ("base", "experts")

    def __init__(
        self,
        tasks: list[str],
        base: str,
        experts: Mapping[str, str] | list[str],
        lora: bool | str = False,
        dtype: str = "float32",
        calibration_target: str = "expert",
        max_new_tokens: int = 10,
        generation_batch_size: int = 64,
    ):
        super().__init__(tasks)
        if calibration_target not in ("expert", "gold"):
            raise ValueError(f"calibration_target must be 'expert' or 'gold', got {calibration_target!r}")
        self.base_source = str(base)
        if isinstance(experts, Mapping):
            missing = [t for t in self.tasks if t not in experts]
            if missing:
                raise ValueError(f"no expert given for tasks {missing}")
            self.expert_sources = {t: str(experts[t]) for t in self.tasks}
        else:
            experts = list(experts)
            if len(experts) != len(self.tasks):
                raise ValueError(f"{len(experts)} experts for {len(self.tasks)} tasks")
            self.expert_sources = {t: str(e) for t, e in zip(self.tasks, experts)}
        self.lora = lora
        self.dtype = dtype
        self.calibration_target = calibration_target
        self.max_new_tokens = int(max_new_tokens)
        self.generation_batch_size = int(generation_batch_size)
        self._base_cache: nn.Module | None = None

    @classmethod
    def validate_config(cls, node: dict[str, Any]) -> list[str]:
        from featcal.config import check_keys, positive_int

        problems = check_keys(node, {
            "calibration_target": (lambda x: x in ("expert", "gold"), "allowed: expert (each expert's greedy answer), gold"),
            "lora": (lambda x: x in (True, False, "auto"), "allowed: true, false, auto"),
            "max_new_tokens": (positive_int, "must be a positive integer"),
            "generation_batch_size": (positive_int, "must be a positive integer"),
        })
        experts, tasks = node.get("experts"), list(node.get("tasks") or [])
        if isinstance(experts, dict):
            missing = [t for t in tasks if t not in experts]
            if missing:
                problems.append(f"experts: no expert source for tasks {missing}")
        return problems

    # ---- loading -------------------------------------------------------
    def load_base(self) -> nn.Module:
        model = load_t5(self.base_source, self.dtype)
        self._base_cache = model
        return model

    def load_expert(self, task: str) -> nn.Module:
        source = self.expert_sources[task]
        lora = self.lora
        if lora == "auto":
            try:
                lora = is_peft_adapter(resolve_model_dir(source, allow_patterns=_T5_FILES))
            except SourceUnavailable:
                raise
        if lora:
            base = self._base_cache if self._base_cache is not None else load_t5(self.base_source, self.dtype)
            self._base_cache = base
            return load_t5_lora(base, source, self.dtype)
        return load_t5(source, self.dtype)

    def load_tokenizer(self):
        return load_t5_tokenizer(self.base_source)

    # ---- merging ---------------------------------------------------------
    @staticmethod
    def _aliases(model: nn.Module) -> dict[str, str]:
        """State-dict keys that alias another key's tensor (tied embeddings) → that key."""
        first: dict[int, str] = {}
        out: dict[str, str] = {}
        for key, value in model.state_dict(keep_vars=True).items():
            ident = id(value)
            if ident in first:
                out[key] = first[ident]
            else:
                first[ident] = key
        return out

    def merge(self, merge_fn: Callable[..., Any], base: nn.Module, experts: list[nn.Module], **data: Any) -> nn.Module:
        """State-dict arithmetic over the *distinct* tensors: tied copies of the shared
        embedding (``encoder/decoder.embed_tokens``, and ``lm_head`` when tied) are merged
        once and written back through their tie, so no tensor counts twice (TIES' global
        threshold, DARE's masks). Calibration data handed to the merge function (merges
        with ``needs_calibration_data``) carries decoder targets (``prepare_calibration``)."""
        aliases = self._aliases(base)
        if data.get("calib") is not None:  # merges that read calibration data (RegMean, ...)
            # run T5 blocks, which need decoder targets; the experts' answers do not depend on the merge
            data = dict(data, calib=self.prepare_calibration(base, base, experts, data["calib"], data.get("device") or "cpu"))

        def distinct(model: nn.Module) -> dict[str, torch.Tensor]:
            return {k: v for k, v in model.state_dict().items() if k not in aliases}

        merged_sd = merge_fn(distinct(base), [distinct(e) for e in experts], exclude=self.merge_excluded, **data)
        merged_sd = dict(merged_sd)
        for key, target in aliases.items():
            merged_sd[key] = merged_sd[target]
        return self.with_state_dict(base, merged_sd)

    # ---- structure -----------------------------------------------------
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        enc = list(model.encoder.block)
        exit_block = T5EncoderExit(enc[-1], model.encoder.final_layer_norm)
        return enc[:-1] + [exit_block] + list(model.decoder.block)

    def calibratable_modules(self, block: nn.Module) -> dict[str, nn.Module]:
        if isinstance(block, T5EncoderExit):  # the final norm stays as merged
            return super().calibratable_modules(block.block)
        return super().calibratable_modules(block)

    def is_key_value(self, module_name: str) -> bool:
        return module_name.rsplit(".", 1)[-1] in self.key_value_patterns

    def module_masks(self, name: str, state: BlockState) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention k/v read the encoder output: weight its rows by the encoder mask."""
        if state.extras.get("stage") == "decoder" and ".EncDecAttention." in f".{name}" and self.is_key_value(name):
            mask = state.extras["enc_token_mask"]
            return mask, mask.bool()
        return state.token_mask, state.readout_mask

    # ---- forward -------------------------------------------------------
    def embed(self, model: nn.Module, inputs: Inputs) -> BlockState:
        if not isinstance(inputs, Mapping) or "decoder_input_ids" not in inputs:
            raise ValueError(
                "T5 blocks need teacher-forced decoder inputs: batches with input_ids, attention_mask, "
                "decoder_input_ids and decoder_attention_mask (T5Backbone.prepare_calibration attaches them "
                "to calibration batches)"
            )
        create_bidirectional_mask, create_causal_mask = _mask_functions()
        device = self.device_of(model)
        input_ids = inputs["input_ids"].to(device)
        attention_mask = inputs.get("attention_mask")
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        dec_ids = inputs["decoder_input_ids"].to(device)
        dec_mask = inputs.get("decoder_attention_mask")
        dec_mask = torch.ones_like(dec_ids) if dec_mask is None else dec_mask.to(device)

        enc, dec = model.encoder, model.decoder
        enc_h = enc.dropout(enc.embed_tokens(input_ids))
        dec_h = dec.dropout(dec.embed_tokens(dec_ids))
        n, m = input_ids.shape[1], dec_ids.shape[1]
        enc_mask4 = create_bidirectional_mask(config=enc.config, inputs_embeds=enc_h, attention_mask=attention_mask)
        dec_mask4 = create_causal_mask(config=dec.config, inputs_embeds=dec_h, attention_mask=dec_mask, cache=None)
        cross_mask4 = create_bidirectional_mask(
            config=dec.config, inputs_embeds=dec_h, attention_mask=attention_mask, encoder_hidden_states=enc_h
        )
        enc_bias = enc.block[0].layer[0].SelfAttention.compute_bias(n, n, device=device).to(enc_h.dtype)
        dec_bias = dec.block[0].layer[0].SelfAttention.compute_bias(m, m, device=device).to(dec_h.dtype)
        token_mask = attention_mask.float()
        dec_token_mask = dec_mask.float()
        extras = {
            "stage": "encoder",
            "enc_mask4": enc_mask4,
            "enc_bias": enc_bias,
            "enc_token_mask": token_mask,
            "dec_hidden": dec_h,
            "dec_token_mask": dec_token_mask,
            "dec_mask4": dec_mask4,
            "cross_mask4": cross_mask4,
            "dec_bias": dec_bias,
        }
        return BlockState(enc_h, token_mask, attention_mask.bool(), extras)

    @staticmethod
    def _first(out):
        return out[0] if isinstance(out, tuple) else out

    def run_block(self, block: nn.Module, state: BlockState) -> BlockState:
        x = state.extras
        if isinstance(block, T5EncoderExit):
            if x.get("stage") != "encoder":
                raise ValueError("the encoder exit block runs on encoder-stage states only")
            h = self._first(block.block(state.hidden, attention_mask=x["enc_mask4"], position_bias=x["enc_bias"]))
            enc_out = block.final_layer_norm(h)
            dec_mask = x["dec_token_mask"]
            extras = {
                "stage": "decoder",
                "enc_out": enc_out,
                "enc_token_mask": x["enc_token_mask"],
                "dec_mask4": x["dec_mask4"],
                "cross_mask4": x["cross_mask4"],
                "dec_bias": x["dec_bias"],
                # this block's own output (the drift report reads it; the next state's
                # hidden states are the decoder inputs)
                "block_output": h,
                "block_output_mask": x["enc_token_mask"],
            }
            return BlockState(x["dec_hidden"], dec_mask, dec_mask.bool(), extras)
        if x.get("stage") == "encoder":
            h = self._first(block(state.hidden, attention_mask=x["enc_mask4"], position_bias=x["enc_bias"]))
            return state.with_hidden(h)
        h = self._first(
            block(
                state.hidden,
                attention_mask=x["dec_mask4"],
                position_bias=x["dec_bias"],
                encoder_hidden_states=x["enc_out"],
                encoder_attention_mask=x["cross_mask4"],
            )
        )
        if "block_output" in x:  # only the encoder exit's own state carries it
            x = {k: v for k, v in x.items() if k not in ("block_output", "block_output_mask")}
        return BlockState(h, state.token_mask, state.readout_mask, x)

    def final_hidden(self, model: nn.Module, state: BlockState) -> torch.Tensor:
        """[B, M, D]: what ``lm_head`` reads at every decoder position."""
        if state.extras.get("stage") != "decoder":
            raise ValueError("readout needs a decoder-stage state (run every block first)")
        dec = model.decoder
        h = dec.dropout(dec.final_layer_norm(state.hidden))
        if _scales_decoder_output(model):
            h = h * (model.config.d_model**-0.5)
        return h

    def readout(self, model: nn.Module, state: BlockState) -> torch.Tensor:
        """[M, D]: the lm_head input at every target token of the batch (row-major), as
        ``lm_head`` receives it: forward pre-hooks on ``lm_head`` (a Surgery module routed
        there) apply here too, as CLIP's projection hooks apply to its representation."""
        return _through_pre_hooks(model.lm_head, self.final_hidden(model, state))[state.readout_mask]

    def representation_site(self, model: nn.Module) -> tuple[nn.Module, str]:
        return model.lm_head, "input"

    # ---- calibration targets --------------------------------------------------
    @torch.no_grad()
    def prepare_calibration(
        self,
        merged: nn.Module,
        base: nn.Module,
        experts: list[nn.Module],
        calib: list[list[Inputs]],
        device: torch.device | str,
    ) -> list[list[Inputs]]:
        """Attach teacher-forced decoder targets to every calibration batch: task t's
        expert's own greedy answer (default), or the gold ``labels`` the pool shipped."""
        if len(calib) != len(experts):
            raise ValueError(f"{len(experts)} experts but {len(calib)} calibration sets")
        device = torch.device(device)
        cfg = (experts[0] if experts else merged).config
        start, pad, eos = cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id
        out: list[list[Inputs]] = []
        for t, batches in enumerate(calib):
            expert = experts[t]
            home = self.device_of(expert)
            if self.calibration_target == "expert":
                expert.to(device)
            task_batches = []
            try:
                for batch in batches:
                    batch = dict(batch)
                    labels = batch.pop("labels", None)
                    if self.calibration_target == "gold":
                        if labels is None:
                            raise ValueError(
                                "calibration_target=gold needs gold targets in the calibration batches "
                                "(the task pool ships them when its calibration_target is gold)"
                            )
                    else:
                        labels = self._answer(expert, batch, device, eos)
                    batch.update(decoder_inputs_from_labels(labels.cpu(), start, pad))
                    task_batches.append(batch)
            finally:
                expert.to(home)
            out.append(task_batches)
        return out

    def _answer(self, model: nn.Module, batch: Mapping[str, torch.Tensor], device: torch.device, eos: int) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        rows = []
        width = 1
        for i in range(0, ids.shape[0], self.generation_batch_size):
            sl = slice(i, i + self.generation_batch_size)
            gen = greedy_generate(model, ids[sl].to(device), mask[sl].to(device), self.max_new_tokens)
            lab = labels_from_generated(gen, eos).cpu()
            rows.append(lab)
            width = max(width, lab.shape[1])
        rows = [torch.nn.functional.pad(r, (0, width - r.shape[1]), value=IGNORE) for r in rows]
        return torch.cat(rows, 0)


def _through_pre_hooks(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` after the forward pre-hooks of ``module`` (what its forward would receive)."""
    with_kwargs = getattr(module, "_forward_pre_hooks_with_kwargs", {})
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook_id in with_kwargs:
            res = hook(module, (x,), {})
            if res is not None:
                x = res[0][0]
        else:
            res = hook(module, (x,))
            if res is not None:
                x = res[0] if isinstance(res, tuple) else res
    return x


def _scales_decoder_output(model: nn.Module) -> bool:
    """Original T5 scales the decoder output by d_model^-0.5 before lm_head; T5 v1.1 and
    FLAN-T5 do not (5.x: ``scale_decoder_outputs``; 4.x: ``tie_word_embeddings``)."""
    cfg = model.config
    if hasattr(cfg, "scale_decoder_outputs"):
        return bool(cfg.scale_decoder_outputs)
    return bool(getattr(cfg, "tie_word_embeddings", True))
