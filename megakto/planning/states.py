"""Model states per rank (weights, gradients, fp32 master, Adam moments) as DeepSpeed holds them.

Read from DeepSpeed 0.19.8's ZeRO optimizers (``runtime/zero/stage_1_and_2.py``, ``stage3.py``),
megakto's torch AdamW (two fp32 moments) and the gradient-accumulation dtype megakto fills in
(:func:`megakto.distributed.ds_config.build_ds_config`: fp32 beside bf16 weights under ZeRO-3, the
model dtype otherwise; ``a`` bytes). ``P`` trainable parameters, ``D`` ranks sharding them (the data-parallel size; each
tensor-parallel shard is its own P/tp), ``w`` bytes per weight (2 bf16, 4 fp32):

==========  =====================  ===================  ==================  =====================
stage       weights                gradients            fp32 master         Adam m, v
==========  =====================  ===================  ==================  =====================
0           w·P                    w·P                  4·P (a fp32 copy     8·P
                                                        only under bf16)
1           w·P (flat groups)      w·P (whole .grad)    4·P/D               8·P/D
2           w·P                    w·P/D (partition)    4·P/D               8·P/D
3           w·P/D                  a·P/D (flat buffer)  4·P/D               8·P/D
==========  =====================  ===================  ==================  =====================

So ZeRO-3 in bf16 holds (2 + 4 + 4 + 8)·P/D = 18·P/D bytes per rank with the fp32 sum (16·P/D
with a bf16 one), and in fp32 20·P/D (the
master is a copy even when the weights are fp32: ``.clone().float()``). DeepSpeed's own estimator
(``estimate_zero3_model_states_mem_needs``) says 18·P/D too, but for another reason: it counts
the gradient in bf16 and an fp32 gradient of the whole partition, which ZeRO-3 makes one sub-group
at a time at the step (``sub_group_size``
elements, counted as a temporary in :mod:`megakto.planning.temporaries`); ZeRO-1/2 convert the whole
partition's gradient to fp32 at the step (4·P/D, also a temporary there).

``offload_optimizer`` moves the master, the moments and an fp32 gradient partition to host
memory; the device keeps the weights (and ZeRO-1/2 their gradients). ``offload_param`` (ZeRO-3)
moves the weight partition to the host too. Under optimizer offload DeepSpeed also keeps on the
host, per rank (line numbers of 0.19.8):

* ZeRO-3: the gradient partition twice. Backward reduces into ``grad_partitions_flat_buffer``, a
  flat buffer of the whole partition in the gradient-accumulation dtype (a·P/D),
  made on ``self.device``, which is ``cpu`` under offload (``stage3.py`` 333, 791-795); at the
  accumulation boundary it is copied into each sub-group's own fp32 ``.grad`` (4·P/D, zero-filled
  at init: 1337-1342, 1437-1456). So (4 + a)·P/D of gradients on the host, none on the device.
* ZeRO-1/2: a bit16 copy of the weight partition (w·P/D, ``param_buffer_of_bit16_for_cpu_offload_groups``,
  ``stage_1_and_2.py`` 563-575) that the step writes before copying to the device.

The fp32 master is a clone in every case: ZeRO-3 shares fp32 weights as their own master only when
``tensor.device == self.device``, and a ``torch.device`` never equals the accelerator's device
*string* (``stage3.py`` 1161-1167), so that branch is not taken on CPU or GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["zero3_forward_gathers", "StateBytes", "model_states", "frozen_weights"]


@dataclass(frozen=True)
class StateBytes:
    """Bytes per rank: on the training device and in host memory."""

    weights: int = 0
    gradients: int = 0
    master: int = 0
    optimizer: int = 0
    host_weights: int = 0
    host_gradients: int = 0
    host_master: int = 0
    host_optimizer: int = 0

    @property
    def device(self) -> int:
        return self.weights + self.gradients + self.master + self.optimizer

    @property
    def host(self) -> int:
        return self.host_weights + self.host_gradients + self.host_master + self.host_optimizer


def model_states(trainable: int, frozen: int, *, stage: int, shards: int, weight_bytes: int,
                 accum_bytes: int | None = None, offload_optimizer: bool = False,
                 offload_param: bool = False) -> StateBytes:
    """Model states of ``trainable`` + ``frozen`` parameters (per tensor-parallel shard) over
    ``shards`` ZeRO ranks. ``accum_bytes``: the ZeRO-3 gradient buffer's element size (None: the
    weights'; ZeRO-1/2 are planned with the model dtype, which is what megakto leaves them).

    >>> s = model_states(1000, 0, stage=3, shards=4, weight_bytes=2)   # 16·P/D = 16·1000/4
    >>> s.device
    4000
    >>> model_states(1000, 0, stage=3, shards=4, weight_bytes=2, accum_bytes=4).device  # 18·P/D
    4500
    >>> model_states(1000, 0, stage=3, shards=4, weight_bytes=4).device  # fp32: 20·P/D
    5000
    >>> model_states(1000, 0, stage=1, shards=4, weight_bytes=2).device  # 2P + 2P + 12P/4
    7000
    >>> z3 = model_states(1000, 0, stage=3, shards=4, weight_bytes=2, offload_optimizer=True)
    >>> z3.device, z3.host   # device 2·P/D weights; host (4 + 8 + 4 + 2)·P/D
    (500, 4500)
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    p, d, w = trainable, max(1, shards), weight_bytes
    part = -(-p // d) if stage >= 1 else p  # DeepSpeed pads partitions to equal sizes
    master = 4 * part if (w != 4 or stage >= 1) else 0  # stage 0 fp32 trains the weights themselves
    optimizer = 8 * part
    weights = (p + frozen) * w if stage < 3 else (part + -(-frozen // d)) * w
    a = weight_bytes if accum_bytes is None else accum_bytes
    grads = p * w if stage <= 1 else part * (a if stage == 3 else w)
    host = dict(host_weights=0, host_gradients=0, host_master=0, host_optimizer=0)
    if offload_optimizer and stage >= 1:
        host.update(host_master=master, host_optimizer=optimizer, host_gradients=4 * part)
        master = optimizer = 0
        if stage == 3:  # the accumulation partition (grad_partitions_flat_buffer) is on the host too
            host["host_gradients"], grads = 4 * part + grads, 0
        else:  # the bit16 staging copy of the weight partition
            host["host_weights"] = w * part
            if stage == 2:  # the reduced gradient partition goes straight to the host's fp32 copy
                grads = 0
    if offload_param and stage == 3:
        host["host_weights"], weights = weights, 0
    return StateBytes(weights=weights, gradients=grads, master=master, optimizer=optimizer, **host)


def frozen_weights(params: int, *, shards: int, weight_bytes: int, offload: bool) -> StateBytes:
    """A frozen ZeRO-3 inference engine (the reference): its weight partition only, on the host
    under ``offload_param``.

    >>> frozen_weights(1000, shards=4, weight_bytes=2, offload=True).host   # 2·P/D on the host
    500
    """
    part = -(-params // max(1, shards)) * weight_bytes
    return StateBytes(host_weights=part) if offload else StateBytes(weights=part)


def zero3_forward_gathers(params: int, *, weight_bytes: int, prefetch_bucket: int, max_live: int) -> tuple[int, int]:
    """The most a ZeRO-3 engine (the reference, and the policy's own forwards alike) holds at once
    during one forward, once DeepSpeed's parameter trace is complete (every forward after its first): (the per-parameter
    copies of the first prefetch bucket waited on, the flat all-gather buffers of the buckets in
    flight), in bytes. Line numbers of DeepSpeed 0.19.8's ``runtime/zero/``:

    * Every module's fetch, leaf or not, prefetches one more bucket of up to ``prefetch_bucket``
      (``stage3_prefetch_bucket_size``) elements, whatever is already in flight, while the elements
      gathered or in flight stay under ``max_live`` (``stage3_max_live_parameters``;
      ``partitioned_param_coordinator.py`` 452-483). A Llama's root and decoder modules come
      before its first weight, so before anything is waited on, buckets of min(P, ``max_live`` +
      one bucket) elements are in flight: the whole model at the defaults (5e7, 1e9).
    * Each bucket is one flat buffer (``partition_parameters.py`` 1343-1346). Waiting on its first
      parameter gives *every* parameter of the bucket its own ``torch.cat`` copy (795), while the
      buffer lives on until the last of them is taken from the in-flight registry
      (``partitioned_param_coordinator.py`` 406): the first bucket is held twice.
    * A module's parameters are released after its forward (``release_sub_module``): the copies never
      build up to the model.

    So the pass holds w·min(P, ``max_live`` + bucket) of buffers and w·min(P, bucket) of copies.
    Measured on the 2-core CPU (2 ranks, fp32, the element counts of live buffers and gathered
    parameters at every module hook; tools/probe_reference_gathers.py): a 64M-parameter Llama
    (hidden 1024, 4 layers, vocabulary 8192) held 63.97M in buffers plus 52.69M of copies (the
    first bucket, which ends on a parameter boundary past 5e7), 116.7M, which glibc's mmapped bytes
    confirm; at vocabulary 32000 (113M) 112.7M + 50.6M. At a 1e7 bucket with
    ``max_live`` 1e7: 22.3M, under the formula's 20M + 10M.

    >>> zero3_forward_gathers(1000, weight_bytes=2, prefetch_bucket=300, max_live=10**9)  # 2·300, 2·1000
    (600, 2000)
    >>> zero3_forward_gathers(1000, weight_bytes=2, prefetch_bucket=200, max_live=400)    # 2·200, 2·(400 + 200)
    (400, 1200)
    """
    copies = min(params, prefetch_bucket) * weight_bytes
    return copies, min(params, max_live + prefetch_bucket) * weight_bytes
