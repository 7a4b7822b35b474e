"""A Hugging Face model loaded under the engine's DeepSpeed config: partitioned on load with
ZeRO-3, over the data-parallel group only under AutoTP, then its vocabulary matrices split into
row blocks (:mod:`megakto.model.vocab_blocks`)."""

from __future__ import annotations

import contextlib
import importlib

import deepspeed
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from megakto.distributed import comm
from megakto.distributed.ds_config import autotp_size
from megakto.errors import ModelError
from megakto.model.vocab_blocks import BlockedEmbedding, BlockedHead, resolve_block_rows

__all__ = ["load_model", "split_vocab", "block_vocab"]


def load_model(path: str, ds_config: dict, *, dtype: torch.dtype, attn_implementation: str,
               trust_remote_code: bool, vocab_block_rows: int | str = 0) -> torch.nn.Module:
    """``from_pretrained`` under the engine's DeepSpeed config (ZeRO-3: partitioned on load), then
    the vocabulary matrices split into row blocks (see :func:`block_vocab`). ``attn_implementation``
    ``auto`` is transformers' own default (sdpa where supported, else eager)."""
    # transformers refuses to load under a config naming tensor_parallel (it would convert the
    # weights for its own TP); AutoTP splits the loaded model later, in deepspeed.initialize.
    hf_view = {key: value for key, value in ds_config.items() if key != "tensor_parallel"}
    dschf = HfDeepSpeedConfig(hf_view)  # noqa: F841 -- must stay alive during from_pretrained
    attn = None if attn_implementation == "auto" else attn_implementation
    with _tp_zero_init(autotp_size(ds_config), hf_view, path, trust_remote_code) as tp_group:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code,
            use_safetensors=None,
        )
    if tp_group is not None:
        _copy_loaded_weights_over_tp(model, tp_group)
    model._megakto_dschf = dschf  # keep the zero3 flag alive for later HF calls (e.g. generation)
    split_vocab(model, vocab_block_rows, ds_config)
    return model


@contextlib.contextmanager
def _tp_zero_init(tp: int, hf_view: dict, path: str, trust_remote_code: bool):
    """Under AutoTP (``tp`` > 1) with ZeRO-3 (``hf_view``: the DeepSpeed config transformers sees):
    partition the loading model over the data-parallel group only; yields the tensor-parallel group
    (None in every other case, where nothing changes).

    transformers' own ``zero.Init`` would partition every parameter over the whole world, and the
    ones AutoTP leaves whole (embedding, norms) would then be split between the ranks of a TP group:
    each ``mp_rank`` file set of a checkpoint would hold part of them, which neither zero_to_fp32
    nor ds_to_universal can read. An enclosing ``zero.Init`` wins over the nested one (DeepSpeed
    patches module construction once, for the outermost context), so this one sets the group. The
    mesh is AutoTP's own (``_init_tp_mesh_device``, which the engine calls again and finds built).
    """
    if tp == 1 or (hf_view.get("zero_optimization") or {}).get("stage", 0) != 3:
        yield None
        return
    from deepspeed.utils import groups
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    # Import the model's code first: zero.Init patches tensor construction, and modules imported
    # under it (torch._dynamo, which transformers' modeling code pulls in) fail their own checks.
    importlib.import_module("torch._dynamo")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        _ = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the lookup imports the modeling module
    groups._init_tp_mesh_device(tensor_model_parallel_size=tp)
    with deepspeed.zero.Init(data_parallel_group=groups.get_data_parallel_group(), config_dict_or_path=hf_view):
        yield groups.get_tensor_model_parallel_group()


def _copy_loaded_weights_over_tp(model: torch.nn.Module, tp_group: comm.ProcessGroup) -> None:
    """transformers reads the weights on global rank 0 alone and lets ZeRO-3 spread them over each
    parameter's group; partitioned over data-parallel groups, only rank 0's group got them. Each
    parameter in turn is gathered whole and sent from the TP group's first rank (rank 0's group)."""
    src = comm.group_ranks(group=tp_group)[0]
    for param in model.parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            comm.broadcast_tensor(param.data, src=src, group=tp_group)


def split_vocab(model: torch.nn.Module, setting: int | str, ds_config: dict) -> None:
    """``model.vocab_block_rows``: split as set; ``auto`` leaves a model it cannot split (e.g. a
    scaled-embedding subclass) as it is, where a row count is an error for it."""
    if setting == 0 or (setting == "auto" and _unsplittable(model) is not None):
        return
    weight = model.get_input_embeddings().weight
    vocab_size, hidden_size = getattr(weight, "ds_shape", weight.shape)  # ZeRO-3: the full shape
    rows = resolve_block_rows(setting, vocab_size, hidden_size)
    if rows:
        block_vocab(model, rows, ds_config)


def _unsplittable(model: torch.nn.Module) -> str | None:
    """Why :func:`block_vocab` cannot split this model's vocabulary matrices; None if it can."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(emb) is not torch.nn.Embedding:
        return f"the input embedding is a {type(emb).__name__}, not a plain nn.Embedding"
    if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
        return "the input embedding uses max_norm, scale_grad_by_freq or sparse gradients"
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return f"the output head is a {type(head).__name__}, not a bias-free nn.Linear"
    return None


def block_vocab(model: torch.nn.Module, rows: int, ds_config: dict) -> None:
    """Replace the input embedding and the output head with their ``rows``-row blocks
    (:mod:`megakto.model.vocab_blocks`), keeping a tie. Under ZeRO-3 each matrix in turn is
    gathered once (a one-off full copy per rank) and cut into blocks, each partitioned at once."""
    why = _unsplittable(model)
    if why:
        raise ModelError(f"model.vocab_block_rows={rows}: {why}; set model.vocab_block_rows=0 (or auto)")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is emb.weight
    place = None
    if hasattr(emb.weight, "ds_id"):  # ZeRO-3: partition each block as from_pretrained did the rest
        place = lambda block: deepspeed.zero.Init(module=block, config_dict_or_path=ds_config)  # noqa: E731
    # One matrix gathered at a time, each block partitioned as soon as it is cut.
    with deepspeed.zero.GatheredParameters([emb.weight], modifier_rank=None):
        new_emb = BlockedEmbedding.from_weight(emb.weight, rows, emb.padding_idx, place=place)
    if tied:
        new_head = BlockedHead.tied_to(new_emb)
    else:
        with deepspeed.zero.GatheredParameters([head.weight], modifier_rank=None):
            new_head = BlockedHead.from_weight(head.weight, rows, place=place)
    model.set_input_embeddings(new_emb)
    model.set_output_embeddings(new_head)
