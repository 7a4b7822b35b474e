"""Start-up steps shared by the trainer and the dry run (``launch/train_kto.py --dry-run``), so both
load data, draw KL rows and check the sampler with the same code and the same one-line errors.
No process group here: the trainer decides which ranks call what."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from megakto.checkpoint.resolve import layouts_note
from megakto.config import Config
from megakto.data import KTOBatchSampler, count_labels, load_rows, require_both_classes, tokenize_rows
from megakto.data.kl_pairs import dataset_kl_partners
from megakto.data.split import TokenizedSplit
from megakto.data.step_plan import StepPlanner
from megakto.data.tokenize import auto_num_proc
from megakto.distributed.ds_config import auto_zero_sizes, build_ds_config, check_versions, host_offload, load_ds_json
from megakto.distributed.parallel import ParallelDims
from megakto.errors import ConfigError, DataError, ModelError
from megakto.kto import auto_desirable_weight, check_weights

__all__ = ["RunChecks", "check_output_dir", "check_run", "desirable_weight", "load_split", "load_splits",
           "log_splits", "make_sampler", "step_planner", "offloads_to_host"]


@dataclass
class RunChecks:
    """What :func:`check_run` established: the mesh, the filled-in DeepSpeed config, the attention
    implementation, log-prob mode and router balancing coefficient resolved for the model family,
    and the lines to log about them."""

    dims: ParallelDims
    ds_config: dict
    attn: str
    logps: str
    notes: list[str]
    router_aux_coef: float = 0.0


def offloads_to_host(cfg: Config, deepspeed: str) -> bool:
    """Whether the run keeps the optimizer or parameters in host memory: the DeepSpeed JSON's
    offload, or an online reference offloaded to CPU (``ref.offload=cpu``, not under a pipeline).
    A JSON that cannot be read counts as none (:func:`check_run` reports it)."""
    try:
        if host_offload(load_ds_json(deepspeed)):
            return True
    except ConfigError:
        return False
    return (cfg.kto.loss_type != "sft" and cfg.ref.mode == "online" and cfg.ref.offload == "cpu"
            and cfg.parallel.pp_size == 1)


def check_output_dir(path: str) -> None:
    """``output_dir`` must be a folder this process can write to (made here if missing), before the
    run logger or a checkpoint writes there."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"output_dir={path} is a file, not a folder; choose another output_dir")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".megakto-write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"output_dir={path}: cannot write there ({err.strerror or err})") from None


def check_run(cfg: Config, deepspeed: str, *, world_size: int, rank: int, bf16: bool,
              on_gpu: bool = False, kernels_here: bool = True) -> RunChecks:
    """The start-up checks that need neither the weights nor the other ranks, in the trainer's order:
    output_dir, the parallel arithmetic at ``world_size``, the torch, transformers and DeepSpeed versions, the
    DeepSpeed JSON (its ``"auto"`` ZeRO sizes for the device: on GPU from model.path's hidden size,
    whose folder is then checked first), the model folders and their TP/PP divisibility, the
    attention and log-prob settings and the model family against the parallel mode and packing,
    with the model built on the meta device. Raises the run's one-line errors. ``kernels_here``:
    this machine has the run's attention kernels (False: a dry run planning for GPUs elsewhere, where
    sequence parallelism's flash-attention kernel is taken as given and the model checked with sdpa)."""
    from megakto.model.load import check_model_path, model_settings
    from megakto.model.packed import uses_flash
    from megakto.model.sp_checks import check_sp_reference, sp_attention

    check_output_dir(cfg.output_dir)
    dims = ParallelDims.from_config(cfg, world_size, rank=rank)
    check_versions(dims.tp, dims.pp)
    trust = cfg.model.trust_remote_code
    ds_json, hidden = load_ds_json(deepspeed), None
    if on_gpu and auto_zero_sizes(ds_json):
        config = check_model_path(cfg.model.path, key="model.path", trust_remote_code=trust, tp=dims.tp)
        hidden = getattr(config.get_text_config(), "hidden_size", None)
    preset = None
    if dims.ep > 1:  # the family's AutoEP preset, and the expert count against ep_size
        from megakto.runners import expert

        for key, path in (("model.path", cfg.model.path), ("ref.path", cfg.ref.path)):
            if path:
                config = check_model_path(path, key=key, trust_remote_code=trust)
                preset = preset or expert.check_model(config, dims, key=key, path=path)
    ds_config = build_ds_config(ds_json, cfg, dims, bf16=bf16, on_gpu=on_gpu, hidden_size=hidden,
                                expert_preset=preset, source=deepspeed)
    configs = {}
    for key, path in (("model.path", cfg.model.path), ("ref.path", cfg.ref.path)):
        if path:
            try:
                configs[key] = check_model_path(path, key=key, trust_remote_code=trust, tp=dims.tp, sp=dims.sp)
            except ModelError as err:  # e.g. a tp size the model does not divide: name the checkpoint's layout too
                note = layouts_note(cfg.train.resume, cfg.output_dir, world_size=world_size, tp_size=dims.tp,
                                    pp_size=dims.pp, sp_size=dims.sp, ep_size=dims.ep
                                    ) if f"parallel.tp_size={dims.tp} " in str(err) else None
                if note is None:
                    raise
                raise ModelError(f"{err}; {note}") from None
            if dims.pp > 1:
                from megakto.runners import pipeline

                pipeline.check_model(path, dims.pp, key=key, trust_remote_code=trust)
    if "ref.path" in configs and cfg.kto.loss_type != "sft":
        check_sp_reference(configs["model.path"], configs["ref.path"], dims.sp, key=f"ref.path={cfg.ref.path}")
    attn = sp_attention(cfg.model.attn_implementation, dims.sp, on_gpu=on_gpu)  # as set, without sequence parallelism
    elsewhere = dims.sp > 1 and not kernels_here and uses_flash(attn)
    settings = model_settings(cfg.model.path, attn_implementation="sdpa" if elsewhere else attn, logps=cfg.model.logps,
                              trust_remote_code=trust, ref_path=cfg.ref.path, tp=dims.tp, pp=dims.pp,
                              packing=cfg.data.packing, router_aux=cfg.kto.router_aux_coef, sp=dims.sp)
    if dims.sp > 1 and settings.router_aux_coef:
        raise ConfigError(f"kto.router_aux_coef={settings.router_aux_coef:g}: the router balancing loss is not computed "
                          f"under sequence parallelism (parallel.sp_size={dims.sp}: each rank routes only its shard's "
                          "tokens); set kto.router_aux_coef=0")
    notes = settings.notes
    if elsewhere:
        notes = notes + [f"attention: {attn} not checked on this machine (no GPU here); the run checks it at start-up"]
    return RunChecks(dims, ds_config, attn if elsewhere else settings.attn, settings.logps, notes,
                     settings.router_aux_coef)


def desirable_weight(cfg: Config, train_rows: TokenizedSplit, log: Callable[[str], None]) -> float:
    """eq. (8): λD·nD / (λU·nU) should lie in [1, 4/3]; ``kto.desirable_weight=auto`` makes it 1.

    With per-row weights (a ``weight`` column) nD and nU are the classes' summed weights W_D and W_U:
    each class's total pull on the loss is λ times its summed weights, which is what eq. (8) balances."""
    kto = cfg.kto
    n_d, n_u = train_rows.class_weights()
    what = "rows"
    if train_rows.weight is None:
        n_d, n_u = int(n_d), int(n_u)
    else:
        rows_d = int(train_rows.label.sum())
        what = "summed row weights"
        log(f"eq. (8) on weighted counts: W_D={n_d:.6g} ({rows_d} desirable rows), W_U={n_u:.6g} "
            f"({len(train_rows) - rows_d} undesirable rows)")
        n_d, n_u = round(n_d, 6), round(n_u, 6)
    weight = kto.desirable_weight
    if weight == "auto":
        if not n_d or not n_u:
            raise ConfigError(f"kto.desirable_weight=auto needs both classes, but {', '.join(cfg.data.train_files)} "
                              f"has {n_d} desirable and {n_u} undesirable {what}: give a number")
        weight = auto_desirable_weight(n_d, n_u, kto.undesirable_weight)
        log(f"kto.desirable_weight=auto -> {weight:.4f} ({n_d} desirable, {n_u} undesirable {what})")
    warning = check_weights(n_d, n_u, weight, kto.undesirable_weight)
    if warning:
        log(f"warning: {warning}")
    return float(weight)


def load_split(cfg: Config, files: list[str], tokenizer, *, train: bool):
    """Load, validate and tokenize one split; the train split must hold both classes (unless the
    loss or ``kto.allow_single_class`` says otherwise). Returns (TokenizedSplit, tokenization
    report, a line with the read and tokenize times). ``data.num_proc: null`` picks the tokenizing
    processes from the row count (:func:`~megakto.data.tokenize.auto_num_proc`)."""
    start = time.perf_counter()
    rows = load_rows(list(files))
    read = time.perf_counter()
    num_proc = cfg.data.num_proc or auto_num_proc(len(rows))
    tok, report = tokenize_rows(rows, tokenizer, max_length=cfg.data.max_length,
                                max_prompt_length=cfg.data.max_prompt_length, num_proc=num_proc,
                                overlong=cfg.data.overlong)
    done = time.perf_counter()
    timing = (f"{len(rows):,} rows read in {read - start:.1f} s, tokenized and checked in {done - read:.1f} s "
              f"({len(rows) / max(done - read, 1e-9):,.0f} rows/s, data.num_proc={num_proc}; datasets reuses "
              "both on the next run)")
    if train:
        n_d, n_u = count_labels(tok)
        require_both_classes(n_d, n_u, loss_type=cfg.kto.loss_type, allow_single_class=cfg.kto.allow_single_class,
                             source=", ".join(files))
    return TokenizedSplit(tok), report, timing


def load_splits(cfg: Config, tokenizer) -> dict[str, tuple]:
    """``train`` and, when ``data.eval_files`` is set, ``eval``: (rows, report, timing) each."""
    return {split: load_split(cfg, files, tokenizer, train=split == "train")
            for split, files in (("train", cfg.data.train_files), ("eval", cfg.data.eval_files)) if files}


def log_splits(loaded: dict[str, tuple], log: Callable[[str], None]) -> None:
    """Each split's read and tokenization time, its report and its warnings."""
    for split, (_, report, timing) in loaded.items():
        log(f"{split} data: {timing}")
        log(f"{split} data: {report.summary()}")
        log(f"{split} data: {report.formats_line()}")
        if report.cut_line():
            log(f"{split} data: {report.cut_line()}")
        for line in report.overlong_lines():  # every row data.overlong=drop left out
            log(f"{split} data: {line}")
        for warning in report.warnings():
            log(f"warning: {split} data: {warning}")


def make_sampler(cfg: Config, train_rows: TokenizedSplit) -> KTOBatchSampler:
    n, gbs = len(train_rows), cfg.train.global_batch_size
    if n < gbs:
        raise DataError(f"{', '.join(cfg.data.train_files)}: {n} rows after filtering, fewer than "
                        f"train.global_batch_size={gbs}")
    return KTOBatchSampler(train_rows.label, global_batch_size=gbs, seed=cfg.seed, balanced=cfg.data.balanced_sampling)


def step_planner(cfg: Config, dims: ParallelDims, train_rows: TokenizedSplit) -> StepPlanner:
    """The plan of every step, for the trainer and the dry run alike. ``ref.mode=cache`` needs a
    fixed KL row per dataset row (see megakto/reference/build.py): computed here, once."""
    use_kl = cfg.kto.loss_type == "kto"
    cached = cfg.ref.mode == "cache" and cfg.kto.loss_type != "sft"
    return StepPlanner(train_rows, dims.num_micro_batches, dims.grad_accum, use_kl=use_kl,
                       kl_partner=dataset_kl_partners(train_rows.prompt_key) if use_kl and cached else None,
                       seed=cfg.seed, max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
