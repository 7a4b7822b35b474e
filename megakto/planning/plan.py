"""The memory plan of a run: every component's bytes per rank, the predicted peak, host memory per
node, and whether it fits. Pure arithmetic over a loaded config, the DeepSpeed JSON and a
:class:`~megakto.model.shape.ModelShape`; nothing is allocated.

The peak is what persists through the run (model states, the online reference's weights, DeepSpeed's
gradient buckets, a runtime floor) plus the largest of the run's phases, which never overlap:

* **train**: one micro-batch's forward with grad and backward (activations, the backward's working
  layer, the chunked head's blocks, ZeRO-3's gathered parameters and their gradients);
* **no-grad**: the reference over the target and KL rows (2·T tokens) and the policy over the KL
  rows, one after the other: their activations, and the larger of the two passes' ZeRO-3 gathers
  (an online reference's prefetch buffers and first bucket's copies, or the policy's gathered
  parameters);
* **step**: the optimizer step's fp32 gradient (ZeRO-1/2: the whole partition; ZeRO-3: one
  ``sub_group_size`` group), on the host under optimizer offload;

ZeRO-1/2 make their gradients and reduce buckets in each backward and free them by the step's end
(the buckets in the backward's epilogue): the table counts them as persistent, for the train phase,
and the no-grad, precompute and step phases name them as terms they do not hold;
* **precompute** (``ref.mode=cache``): the temporary reference engine and its forwards of
  ``train.eval_batch_size`` rows with their gathers, before training (freed after it); it runs
  before the first optimizer step, so without the Adam moments the persistent states count.

A mixture-of-experts model's states are split into dense and expert rows, the experts 1/ep per
rank under expert parallelism (:mod:`megakto.planning.moe`); the MoE terms a phase includes are
named in :attr:`MemoryPlan.details`.

On a CPU-only run every byte is process memory, so ``peak_bytes_per_rank`` is device plus host
(what the trainer's CPU measurement sees: RSS beyond the RSS before the engines were built).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megakto.planning.activations import Tokens, logits_bytes, no_grad_pass, sequence_shard_tokens, train_pass
from megakto.model.shape import ModelShape
from megakto.planning.moe import all_to_all_bytes, block_gather_bytes, expert_param_split
from megakto.planning.states import StateBytes, zero3_forward_gathers, frozen_weights, model_states

__all__ = ["PlanInputs", "MemoryPlan", "plan_memory", "worst_case_tokens", "lora_params", "GIB",
           "CPU_RUNTIME_BYTES", "GPU_HEADROOM"]

GIB = 1024 ** 3
# Process memory a CPU rank adds beyond weights and states when its engines are built and run (the
# libraries' buffers, gloo, autograd's thread pool): measured 70 MiB on the 2-core AMD EPYC machine
# for the 0.2M-parameter demo model, where states are under 4 MB. One constant for every plan.
CPU_RUNTIME_BYTES = 64 * 1024 ** 2
# Share of a GPU left for the CUDA context, NCCL buffers and the caching allocator's fragmentation
# (torch's reserved memory above its allocated peak): a plan fits when its peak is under 90 %.
GPU_HEADROOM = 0.10

# DeepSpeed's defaults where the JSON leaves a key out (deepspeed/runtime/zero/config.py).
_ZERO_DEFAULTS = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000,
                  "stage3_prefetch_bucket_size": 50_000_000, "sub_group_size": 1_000_000_000,
                  "stage3_max_live_parameters": 1_000_000_000, "overlap_comm": False, "contiguous_gradients": True}


@dataclass(frozen=True)
class PlanInputs:
    """Everything the plan reads, resolved: the config's choices and the DeepSpeed JSON's."""

    shape: ModelShape
    world_size: int
    dp: int
    tp: int = 1
    pp: int = 1
    sp: int = 1  # sequence-parallel ranks: ZeRO partitions over dp × sp, activations are 1/sp
    ep: int = 1  # expert-parallel ranks (AutoEP): a rank holds 1/ep of the experts, partitioned over dp/ep
    grad_accum: int = 1
    zero: dict = field(default_factory=dict)  # the JSON's zero_optimization section
    ref_zero: dict = field(default_factory=dict)  # the reference engine's zero_optimization section
    weight_bytes: int = 2
    accum_bytes: int | None = None  # the ZeRO-3 gradient sum's element size (None: weight_bytes)
    on_gpu: bool = True
    gpus_per_node: int = 8
    ref: str = "online"  # online | cache | none (sft, or LoRA's adapters-off policy)
    ref_offload: bool = True
    checkpointing: bool = False
    attn: str = "sdpa"
    logps: str = "chunked"
    chunk_tokens: int | None = None
    block_rows: int = 0
    lora_trainable: int = 0  # LoRA adapters' parameters; 0 = full fine-tuning
    train_tokens: Tokens = Tokens(0, 0, 0, 0)
    precompute_tokens: Tokens = Tokens(0, 0, 0, 0)

    def zero_value(self, key: str):
        return self.zero.get(key, _ZERO_DEFAULTS.get(key))

    def ref_zero_value(self, key: str):
        return self.ref_zero.get(key, _ZERO_DEFAULTS.get(key))


@dataclass
class MemoryPlan:
    inputs: PlanInputs
    rows: list[tuple[str, int, int]]  # (component, device bytes per rank, host bytes per rank)
    persistent: int
    phases: dict[str, int]
    params: dict[str, int]
    gpu_memory: float | None = None
    details: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> named terms it includes (MoE)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def device_peak(self) -> int:
        return self.persistent + max(self.phases.values())

    @property
    def host_per_rank(self) -> int:
        return sum(h for _, _, h in self.rows)

    @property
    def peak_bytes_per_rank(self) -> int:
        """The predicted peak where the training state lives: GPU memory, or on a CPU-only run the
        process memory beyond the start-up baseline (device and host are the same memory)."""
        return self.device_peak if self.inputs.on_gpu else self.device_peak + self.host_per_rank

    @property
    def host_bytes_per_node(self) -> int:
        per_node = min(self.inputs.world_size, self.inputs.gpus_per_node)
        per_rank = self.host_per_rank if self.inputs.on_gpu else self.peak_bytes_per_rank
        return per_rank * per_node

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory is None:
            return None
        return self.peak_bytes_per_rank <= self.gpu_memory * GIB * (1 - GPU_HEADROOM)


def lora_params(shape: ModelShape, r: int, targets: list[str]) -> int:
    """Adapter parameters r·(in + out) per targeted projection and layer (Llama-family names).

    >>> s = ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16,
    ...                vocab=1000, embedding=64000, head=64000, layer_params=(1,))
    >>> lora_params(s, 8, ["q_proj", "down_proj"])   # 2 layers · 8 · ((64 + 64) + (128 + 64))
    5120
    """
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return shape.layers * sum(r * sum(dims[m]) for m in targets if m in dims)


def worst_case_tokens(rows: int, max_length: int, row_length: int, packing: bool) -> Tokens:
    """A micro-batch of ``rows`` rows of ``max_length`` tokens each (the worst the config allows):
    packed into rows of ``row_length`` tokens, or one row each, padded to the longest."""
    if not packing:
        return Tokens(rows * max_length, rows * max_length, rows, max_length)
    per_row = max(1, row_length // max_length)
    packed = math.ceil(rows / per_row)
    return Tokens(packed * row_length if packed > 1 else rows * max_length, rows * max_length, packed,
                  row_length if packed > 1 else rows * max_length)


def _rank_params(shape: ModelShape, tp: int, pp: int) -> int:
    """Parameters one rank's shard holds: the layers' matrices and the head split tp ways (AutoTP
    leaves the embedding and the norms whole); the largest pipeline stage under pp."""
    layers = shape.layers_total
    if tp > 1:
        return shape.embedding + shape.head // tp + layers // tp + sum(shape.other_params)
    if pp > 1:
        return max(math.ceil(shape.total / pp), shape.embedding + shape.per_layer)
    return shape.total


def plan_memory(p: PlanInputs, gpu_memory: float | None = None) -> MemoryPlan:
    s, w, zero = p.shape, p.weight_bytes, p.zero
    stage = int(zero.get("stage", 0))
    off_opt = (zero.get("offload_optimizer") or {}).get("device", "none") == "cpu"
    off_par = (zero.get("offload_param") or {}).get("device", "none") == "cpu"
    rank_params = _rank_params(s, p.tp, p.pp)
    shards = p.dp * p.sp  # ZeRO's partition group: Ulysses' sequence ranks hold partitions too
    # A MoE model's experts (tp = pp = 1): 1/ep of them per rank, partitioned over the dp/ep ranks
    # holding the same experts (megakto.planning.moe); the dense rest as a dense model's.
    split = s.moe is not None and p.tp == 1 and p.pp == 1
    dense, experts = expert_param_split(s, rank_params, p.ep) if split else (rank_params, 0)
    rank_params = dense + experts  # what this rank's engine holds
    trainable = p.lora_trainable or rank_params
    # (label, parameters, their ZeRO partition group, trainable of them): LoRA's adapters sit in the dense part.
    parts = [("", dense, shards, p.lora_trainable or dense)]
    if experts:
        parts = [(" (dense)", dense, shards, p.lora_trainable or dense),
                 (f" (experts {s.moe.experts // p.ep}/{s.moe.experts})", experts, max(1, shards // p.ep),
                  0 if p.lora_trainable else experts)]
    states = [model_states(train_n, n if p.lora_trainable else 0, stage=stage, shards=d, weight_bytes=w,
                           accum_bytes=p.accum_bytes, offload_optimizer=off_opt, offload_param=off_par)
              for _, n, d, train_n in parts]
    rows = []
    for label, attr in (("policy weights", "weights"), ("policy gradients", "gradients"),
                        ("fp32 master weights", "master"), ("Adam moments (fp32)", "optimizer")):
        rows += [(label + part[0], getattr(st, attr), getattr(st, "host_" + attr)) for part, st in zip(parts, states)]

    # The reference: a ZeRO-3 inference engine over the data-parallel group (pipelines: a stage-0
    # frozen pipeline, each stage its layers on the device); a MoE model's experts as the policy's.
    refs = [(tag, StateBytes(weights=n * w) if p.pp > 1 else
             frozen_weights(n, shards=d, weight_bytes=w, offload=p.ref_offload)) for tag, n, d, _ in parts]
    ref_states = StateBytes(weights=sum(r.weights for _, r in refs), host_weights=sum(r.host_weights for _, r in refs))
    if p.ref == "online":
        rows += [("reference weights" + tag, r.weights, r.host_weights) for tag, r in refs]
    # The reference engine's forwards: its prefetch buckets' flat buffers in flight and the first
    # bucket's per-parameter copies (states.zero3_forward_gathers), released at the forward's end; with
    # the prefetch sizes its own JSON gives (megakto.distributed.ds_config.reference_ds_config), else
    # DeepSpeed's defaults. The precompute's forwards hold the same.
    def forward_gathers(zero_value) -> tuple[int, int]:  # an engine's forward, with its JSON's prefetch sizes
        return zero3_forward_gathers(rank_params, weight_bytes=w,
                                     prefetch_bucket=int(zero_value("stage3_prefetch_bucket_size")),
                                     max_live=int(zero_value("stage3_max_live_parameters")))

    ref_copies, ref_buffers = forward_gathers(p.ref_zero_value) if p.ref != "none" and p.pp == 1 else (0, 0)

    buckets = 0
    reduce_terms = {}  # ZeRO-1/2: what a bucket's reduction adds in the backward (train phase)
    largest = min(max(s.largest_layer_param() // p.tp, (p.block_rows or s.vocab // p.tp) * s.hidden), rank_params)
    gathers = grad_unreduced = 0
    moe_gather = {}  # ZeRO-3's gather of one MoE block, by phase
    # A bucket is allocated whole; on a GPU all of it counts, on CPU only the pages gradients touch
    # (together at most the rank's parameters): the resident set counts written pages.
    def bucket(elements: int) -> int:
        return elements if p.on_gpu else min(elements, trainable)

    if stage == 3:
        buckets = bucket(int(p.zero_value("reduce_bucket_size"))) * w  # contiguous ipg buffer, made at init
        live = min(int(p.zero_value("stage3_prefetch_bucket_size")) + largest,
                   int(p.zero_value("stage3_max_live_parameters")), rank_params)
        gathers = live * w  # gathered weights
        grad_unreduced = largest * w  # the largest parameter's gradient before its reduce
        if split:
            moe_gather = {phase: block_gather_bytes(s, w=w, ep=p.ep, grad=phase == "train") for phase in ("train", "no-grad")}
    elif stage in (1, 2):
        # DeepSpeed 0.19.8 stage_1_and_2.py: with contiguous_gradients (its default) the gradient hooks
        # run at stage 1 too (line 713), and setup_buckets (line 3256) allocates reduce_bucket_size
        # elements, twice with overlap_comm, in the gradient-sum dtype (_gradient_reduction_buffer_dtype,
        # 1253): the model's, which megakto leaves ZeRO-1/2 in, or a JSON's own at stage 1.
        contiguous = p.zero_value("contiguous_gradients")
        bucket_bytes = (p.accum_bytes or w) if stage == 1 else w
        reduce_size = int(p.zero_value("reduce_bucket_size"))
        if contiguous:
            # ZeRO-1 on CPU: each gradient is copied into the bucket and its own tensor freed (1459-1464),
            # so the pages the bucket touches are the gradients' (counted above), not more.
            buckets = 0 if stage == 1 and not p.on_gpu else bucket(reduce_size * (2 if p.zero_value("overlap_comm") else 1)
                                                                   ) * bucket_bytes
        # a whole parameter's gradient before it is copied into the bucket (a fused expert tensor's: 1/ep)
        grad_unreduced = max(largest, max(s.moe.expert_params) // p.ep if split else 0) * w
        # A bucket's reduction (average_tensor -> allreduce_no_retain -> allreduce_bucket, 1713, 2367) sends
        # each rank its share (at most reduce_bucket_size elements) and, at stage 1, copies this rank's
        # partition out of the bucket (copy_grads_in_partition, 2184-2201; stage 2 keeps it as its
        # gradient partition, counted above). Measured inside reduce_ipg_grads (tools/memory_timeline.py
        # --rss, fp32, 2-rank CPU runs over gloo): +258 MiB for a 67M model at dp 2 (stage 2: the 128 MiB
        # partition made at a step's first reduction and a second 128 MiB, one rank's share while it is
        # reduced); +128 MiB for a 33.5M pipeline stage at dp 1 (the partition copy alone: a one-rank
        # group exchanges nothing). The share's copy is counted for GPUs too: unmeasured there.
        own_share = -(-trainable // max(1, shards))
        if shards > 1:
            reduce_terms["ZeRO-1/2 reduce share in flight"] = min(reduce_size, own_share) * bucket_bytes
        if stage == 1 and contiguous and not off_opt:  # offloaded, it goes to the host's fp32 copy (2145-2177)
            reduce_terms["ZeRO-1 partition copy"] = own_share * bucket_bytes
    rows.append(("ZeRO buckets", buckets, 0))
    runtime = 0 if p.on_gpu else CPU_RUNTIME_BYTES
    rows.append(("runtime (CPU libraries)", runtime, 0))
    persistent = sum(d for _, d, _ in rows)

    t = p.train_tokens
    in_flight = min(p.pp, p.grad_accum) if p.pp > 1 else 1  # 1F1B: stage 0 holds pp micro-batches
    stage_shape = s if p.pp == 1 else _stage_shape(s, p.pp)
    train = train_pass(stage_shape, t, w=w, tp=p.tp, checkpointing=p.checkpointing, attn=p.attn, sp=p.sp, ep=p.ep)
    head = {grad: logits_bytes(s, sequence_shard_tokens(t, p.sp).completion, w=w, tp=p.tp, logps=p.logps,
                               chunk_tokens=p.chunk_tokens, block_rows=p.block_rows, grad=grad) for grad in (False, True)}
    # The head block's gradient is a parameter's gradient before its reduce: the head's, when the head is
    # the largest parameter (no vocabulary blocks), is one tensor counted once; else they come at
    # different times of the backward: the larger counts.
    phases = {"train": train["activations"] * in_flight + train["backward"] + head[False]
              + max(head[True] - head[False], grad_unreduced) + gathers + moe_gather.get("train", 0)
              + sum(reduce_terms.values())}
    both = Tokens(2 * t.tokens, 2 * t.completion, 2 * t.rows, t.row_length)  # target + KL rows
    no_grad = no_grad_pass(stage_shape, both, w=w, tp=p.tp, attn=p.attn, sp=p.sp, ep=p.ep) + logits_bytes(
        s, sequence_shard_tokens(both, p.sp).completion, w=w, tp=p.tp, logps=p.logps, chunk_tokens=p.chunk_tokens, block_rows=p.block_rows,
        grad=False)
    # The reference's pass and the policy's KL pass run one after the other, each releasing its
    # gathers at its end (measured: tools/memory_timeline.py): the larger of the two counts.
    # A ZeRO-3 policy's forward, with grad or without, prefetches as the reference's does (its own JSON's
    # bucket and max_live): at a forward's start the buckets in flight and the first one's copies, the
    # most it holds (its modules release what they used); the backward re-gathers within max_live.
    # Measured (tools/memory_timeline.py --rss, a 134M fp32 model, 2 ranks, 1e7 buckets): +544-566 MiB
    # in the policy's KL pass, for 4·(134M + 1e7) predicted.
    policy_gathers = moe_gather.get("no-grad", 0)
    if stage == 3:
        policy_gathers += sum(forward_gathers(p.zero_value))
    ref_pass = ref_copies + ref_buffers if p.ref == "online" else 0
    phases["no-grad"] = no_grad + max(policy_gathers, ref_pass)
    # Each parameter group's trainable partition (the experts are a group of their own).
    groups = [-(-train_n // max(1, d)) for _, _, d, train_n in parts]
    if stage in (1, 2) and not off_opt and w != 4:  # the partitions' gradients cast to fp32 (a no-op in fp32)
        phases["step"] = 4 * sum(groups)
    elif stage == 3 and not off_opt:
        phases["step"] = 4 * min(int(p.zero_value("sub_group_size")), max(groups))
    else:
        phases["step"] = 0
    # torch's AdamW creates its moments at the first step (torch/optim/adamw.py, _init_group), after
    # the precompute, and DeepSpeed 0.19.8 leaves them so ("lazy initialization of the state at the first
    # call to step": runtime/zero/stage3.py 1310, stage_1_and_2.py 945): that phase holds the persistent
    # states less them.
    adam_unmade = sum(st.optimizer + (0 if p.on_gpu else st.host_optimizer) for st in states)
    # ZeRO-1/2 hold the device gradients and the reduce buckets from a backward to the step after it
    # (DeepSpeed 0.19.8 stage_1_and_2.py): the first gradient hook makes the buckets (setup_buckets,
    # 2287, 3256); the reduction epilogue frees them and grads_in_partition (_release_ipg_buffers, 924,
    # called at 1061) and sets every .grad to None (_clear_param_grad_only, 1067), keeping only this
    # rank's partition in averaged_gradients (1047), which the step frees (3131) before the engine's
    # zero_grad(set_to_none=True) (2613; engine.py 3526). The no-grad passes and the precompute, which
    # come before a step's backward, hold neither; the step holds the gradient partition only.
    zero12_freed = {}
    if stage in (1, 2):
        grads = sum(st.gradients for st in states)
        partition = 0 if off_opt else w * sum(groups)  # offloaded: the step reads the host copy
        zero12_freed = {"gradients (backward to step)": grads,
                        "ZeRO buckets (backward only)": buckets}
        step_freed = {"ZeRO buckets (backward only)": buckets,
                      "gradients beyond the partition": max(0, grads - partition)}
        phases["no-grad"] -= grads + buckets
        phases["step"] -= sum(step_freed.values())
    if p.ref == "cache":
        pre = p.precompute_tokens
        phases["precompute"] = (ref_states.weights + (0 if p.on_gpu else ref_states.host_weights)
                                + no_grad_pass(stage_shape, pre, w=w, tp=p.tp, attn=p.attn, sp=p.sp, ep=p.ep)
                                + logits_bytes(s, sequence_shard_tokens(pre, p.sp).completion, w=w, tp=p.tp, logps=p.logps,
                                               chunk_tokens=p.chunk_tokens, block_rows=p.block_rows, grad=False)
                                + ref_copies + ref_buffers - adam_unmade - sum(zero12_freed.values()))
        rows.append(("reference weights (precompute only)", 0, ref_states.host_weights if p.on_gpu else 0))
    params = {**s.components(), "total": s.total}
    details = {}
    if s.moe is not None:
        m = s.moe
        params.update({"experts": s.expert_total, "active per token": s.total - s.expert_total * (m.experts - m.top_k) // m.experts})
        details["train"] = {**train.get("moe", {}), "MoE block gather+grad (ZeRO-3)": moe_gather.get("train", 0)}
        details["no-grad"] = {"EP all-to-all buffers": all_to_all_bytes(s, sequence_shard_tokens(both, p.sp).tokens, w=w, ep=p.ep),
                              "MoE block gather (ZeRO-3)": moe_gather.get("no-grad", 0)}
    if ref_pass >= policy_gathers and ref_pass:  # the reference's pass holds the no-grad phase's gathers
        details.setdefault("no-grad", {}).pop("MoE block gather (ZeRO-3)", None)
        details["no-grad"].update({"reference gathered bucket copies": ref_copies, "reference prefetch buffers": ref_buffers})
    elif stage == 3:  # the policy's own prefetch (its MoE blocks' gather named apart)
        details.setdefault("no-grad", {})["policy KL-pass gathers (ZeRO-3)"] = policy_gathers - moe_gather.get("no-grad", 0)
    if p.ref == "cache":
        details["precompute"] = {"reference gathered bucket copies": ref_copies, "reference prefetch buffers": ref_buffers,
                                 "Adam moments, made at the first step": -adam_unmade,
                                 **{k: -v for k, v in zero12_freed.items()}}
    if reduce_terms:
        details.setdefault("train", {}).update(reduce_terms)
    if zero12_freed:
        details.setdefault("no-grad", {}).update({k: -v for k, v in zero12_freed.items()})
        details["step"] = {k: -v for k, v in step_freed.items()}
    params.update({f"per rank (experts 1/{p.ep})" if p.ep > 1 else "per rank (tp/pp shard)": rank_params,
                   "trainable": trainable})
    return MemoryPlan(p, rows, persistent, phases, params, gpu_memory,
                      {ph: {k: v for k, v in d.items() if v} for ph, d in details.items()})


def _stage_shape(s: ModelShape, pp: int) -> ModelShape:
    """The layers of the largest pipeline stage (for its activations)."""
    from dataclasses import replace

    return replace(s, layers=math.ceil(s.layers / pp))
