"""``launch/train_kto.py --dry-run``: every start-up check that needs neither the weights nor the
other ranks, at the run's world size, in one process, then the memory plan.

The checks are the run's own functions (:func:`megakto.startup.check_run`, which the trainer calls
too), in the trainer's order, so a bad config fails here with the same one-line error: the config
(already loaded), output_dir, the parallel arithmetic
(:class:`~megakto.distributed.parallel.ParallelDims`), the DeepSpeed JSON
(:func:`~megakto.distributed.ds_config.build_ds_config`), the DeepSpeed version for TP/PP, the model
folders and their TP/PP divisibility, the attention and log-prob settings against the model built on
the meta device, ``train.resume``'s checkpoint and layout, then (unless ``load_data`` is off) the
tokenizer, the data with its tokenization report, the class weights of eq. (8), the sampler, and
the first steps' micro-batch plan: tokens per rank, padding share, KL rows.
"""

from __future__ import annotations

from collections.abc import Callable

from megakto.config import Config
from megakto.data.batcher import Batcher
from megakto.data.context_ids import scored_tokens
from megakto.distributed.parallel import ParallelDims
from megakto.model.load import load_tokenizer
from megakto.planning.activations import Tokens

__all__ = ["dry_run", "first_steps"]


def first_steps(cfg: Config, dims: ParallelDims, train_rows, pad_id: int, steps: int = 3,
                log: Callable[[str], None] = print) -> Tokens:
    """The micro-batch plan of the first ``steps`` optimizer steps, as every rank would derive it;
    logs tokens per rank, the padding share and the KL rows; returns the largest micro-batch."""
    from megakto.startup import make_sampler, step_planner

    sampler = make_sampler(cfg, train_rows)
    planner = step_planner(cfg, dims, train_rows)  # the trainer's own planner
    batcher = Batcher.for_run(cfg.data, pad_id)  # and the runners' batcher, on the host
    largest = Tokens(0, 0, 0, 0)
    for step in range(steps):
        plan = planner.plan(sampler.next_global_batch(), step)
        kl = plan.kl_rows
        per_rank, padded, real = [], 0, 0
        for r in range(dims.dp):
            tokens = 0
            for pairs in plan.pairs(plan.mine(r))[0]:
                batch = batcher.layout(pairs)
                n_real = sum(len(p) + len(c) for p, c in pairs)
                rows_, length = batch.input_ids.shape
                tokens += n_real
                padded += rows_ * length
                real += n_real
                scored = sum(scored_tokens(c) for _, c in pairs)
                if rows_ * length > largest.tokens:
                    largest = Tokens(rows_ * length, scored, rows_, length)
            per_rank.append(tokens)
        kl_rows = len(kl) if kl is not None else 0
        log(f"dry run: step {step + 1}: target tokens per data-parallel rank min {min(per_rank)} max {max(per_rank)}, "
            f"padding {1 - real / max(1, padded):.1%} of packed positions, {kl_rows} KL rows "
            f"({dims.num_micro_batches} micro-batches of {cfg.train.micro_batch_size} rows)")
    return largest


def dry_run(cfg: Config, deepspeed: str, world_size: int, *, load_data: bool = True, on_gpu: bool = True,
            gpu_memory: float | None = None, gpus_per_node: int = 8, overrides: tuple[str, ...] = (),
            config_path: str | None = None, log: Callable[[str], None] = print):
    """Run the checks (raising the run's MegaktoError on the first failure) and log the plan."""
    from megakto.model.meta import model_shape
    from megakto.planning.run_plan import PlanRequest, plan_report

    from megakto import checkpoint
    from megakto.startup import check_run

    bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and on_gpu)
    if cfg.model.dtype == "auto" and on_gpu:
        log("dry run: model.dtype=auto taken as bfloat16 (a GPU that supports it); set model.dtype to plan otherwise")
    import torch

    checked = check_run(cfg, deepspeed, world_size=world_size, rank=0, bf16=bf16, on_gpu=on_gpu,
                        kernels_here=not on_gpu or torch.cuda.is_available())
    dims, attn, trust = checked.dims, checked.attn, cfg.model.trust_remote_code
    log(f"dry run: parallelism: {dims.describe()}")
    for note in checked.notes:
        log(f"dry run: {note}")
    # The resume checks a run makes before it loads anything: the checkpoint's manifest and layout.
    resume_dir = checkpoint.resolve_resume(cfg.train.resume, cfg.output_dir, world_size=world_size,
                                           tp_size=dims.tp, pp_size=dims.pp, sp_size=dims.sp, ep_size=dims.ep)
    if resume_dir:
        log(f"dry run: train.resume: {resume_dir} verified")
    shape = model_shape(cfg.model.path, trust_remote_code=trust)
    log(f"dry run: model {shape.model_type} built on the meta device: {shape.total / 1e9:.3f}B parameters, "
        f"{shape.layers} layers, hidden {shape.hidden}, vocabulary {shape.vocab}; attention {attn}")
    tokens = None
    if load_data:
        from megakto.startup import desirable_weight, load_split, log_splits

        tok_path = cfg.model.tokenizer_path or cfg.model.path
        tokenizer = load_tokenizer(tok_path, key="model.tokenizer_path" if cfg.model.tokenizer_path else "model.path",
                                   trust_remote_code=trust)
        train_rows = None
        for split, files in (("train", cfg.data.train_files), ("eval", cfg.data.eval_files)):
            if files:  # each split logged as soon as it is read, the run's lines
                loaded = load_split(cfg, files, tokenizer, train=split == "train")
                log_splits({split: loaded}, lambda line: log(f"dry run: {line}"))
                train_rows = loaded[0] if split == "train" else train_rows
        desirable_weight(cfg, train_rows, lambda line: log(f"dry run: {line}"))
        tokens = first_steps(cfg, dims, train_rows, tokenizer.pad_token_id, log=log)
    else:
        log("dry run: data not loaded (--no-data): the memory plan takes the worst micro-batch the config allows")
    req = PlanRequest(config_path, deepspeed, overrides, world_size, on_gpu=on_gpu, gpu_memory=gpu_memory,
                      gpus_per_node=gpus_per_node, tokens=tokens)
    plan, text, _ = plan_report(req, shape)
    for line in text.splitlines():
        log(line)
    return plan
