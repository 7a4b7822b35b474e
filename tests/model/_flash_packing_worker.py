"""Under the deepspeed launcher with 2 ranks, real ZeRO-3 engines (every parameter partitioned):

1. packed rows through an engine whose model runs the CPU flash-attention stand-in
   (tests/model/_flash_emulation.py), for Llama and Qwen3 and both ``model.logps`` modes: the
   packed log-probs (several sequences in each of several rows) with the kernel calls they made,
   next to the same sequences one per row, right-padded, through the same engine (full logits, a
   2D padding mask: the ground truth);
2. the start-up packing check (megakto/model/packing_check.py) on those engines told the right
   attention and told "sdpa" (what megakto believed before it was passed down), on eager and
   leaky-attention (flash-named and not) Llamas in float32, an eager Llama in bfloat16, and an eager Llama under AutoTP-2
   (both ranks one tensor-parallel group): its result or its error line, and its seconds.

Rank 0 writes OUT/results.pt; the check's results are kept per rank."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from megakto.config import load_config  # noqa: E402
from megakto.data.collate import collate  # noqa: E402
from megakto.data.packing import pack  # noqa: E402
from megakto.distributed import comm, engine  # noqa: E402
from megakto.distributed.ds_config import build_ds_config  # noqa: E402
from megakto.distributed.parallel import ParallelDims  # noqa: E402
from megakto.distributed.vocab_parallel import group_reducers  # noqa: E402
from megakto.errors import ModelError  # noqa: E402
from megakto.model.forward import completion_logps, logps_function  # noqa: E402
from megakto.model.packing_check import check_packing  # noqa: E402
from tests.model import _flash_emulation as fe  # noqa: E402

PAD, VOCAB = 3, 512  # the tiny models' tokenizer
DS = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
      "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def rows():
    """Six sequences of 7..15 tokens: packed into rows of 32 they make rows of 2, 3 and 1."""
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(6):
        p = torch.randint(4, 500, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(4, 500, (int(torch.randint(5, 11, (1,), generator=g)),), generator=g).tolist()
        out.append((p, c))
    return out


def build(folder: str, attn: str, *, dtype=torch.float32, ds=DS):
    """A ZeRO-3 engine over the model in ``folder``, loaded the trainer's way; a flash name is
    switched to after loading (transformers would look for a kernel package)."""
    model = engine.load_model(folder, ds, dtype=dtype, attn_implementation="eager" if "flash" in attn else attn,
                              trust_remote_code=False)
    if "flash" in attn:
        fe.use_flash_emulation(model, attn)
    policy, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                           config=ds)
    return policy


def check(policy, attn: str, *, dtype=torch.float32, packing=True, tp_group=None):
    """The start-up check as the trainer runs it: its result, or its error line."""
    fe.CALLS.clear()
    try:
        logps = logps_function("chunked", None, attn=attn, reducers=group_reducers(tp_group))
        r = check_packing(policy, logps, attn=attn, packing=packing, pad_id=PAD, vocab_size=VOCAB, dtype=dtype,
                          device="cpu")
        return {"worst": r.worst, "max_diff": r.max_diff, "seconds": r.seconds, "calls": sorted(set(fe.CALLS))}
    except ModelError as err:
        return {"error": str(err)}


def tp2_ds():
    cfg = load_config(None, ["model.path=unused", "data.train_files=unused", "train.global_batch_size=2",
                             "train.micro_batch_size=2", "parallel.tp_size=2", "model.dtype=float32"])
    dims = ParallelDims.from_config(cfg, comm.world_size(), rank=comm.rank())
    return build_ds_config({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}, cfg, dims, bf16=False)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", required=True)
    parser.add_argument("--local_rank", type=int)
    args = parser.parse_args()
    engine.init_distributed(5)
    fe.register()
    results, checks = {}, {}
    llama = os.path.join(args.models, "llama")
    for family in ("llama", "qwen3"):
        policy = build(os.path.join(args.models, family), fe.NAME)
        packed = pack(rows(), 32, PAD)
        with torch.no_grad():
            want, _ = completion_logps(policy, collate(rows(), pad_id=PAD))
            for mode in ("chunked", "full"):
                fe.CALLS.clear()
                got, _ = logps_function(mode, attn=fe.NAME)(policy, packed)
                results[family, mode] = {"got": got, "want": want, "calls": sorted(set(fe.CALLS)),
                                         "packed_rows": packed.input_ids.shape[0],
                                         "segments_per_row": [len(set(r.tolist()) - {-1}) for r in packed.segment_ids]}
        checks[family, "flash"] = check(policy, fe.NAME)
        checks[family, "flash", "unpacked"] = check(policy, fe.NAME, packing=False)
        checks[family, "flash told sdpa"] = check(policy, "sdpa")
        del policy
    for attn in ("eager", fe.LEAKY, fe.LEAKY_FLASH):
        checks["llama", attn] = check(build(llama, attn), attn)
    bf16 = dict(DS, bf16={"enabled": True})
    checks["llama", "eager", "bf16"] = check(build(llama, "eager", dtype=torch.bfloat16, ds=bf16), "eager",
                                             dtype=torch.bfloat16)
    tp = build(llama, "eager", ds=tp2_ds())
    checks["llama", "eager", "tp2"] = check(tp, "eager", tp_group=engine.parallel_groups(2)[1])
    checks = comm.all_gather_object(checks, group=comm.world_group())
    if comm.is_main():
        torch.save({"logps": results, "checks": checks}, os.path.join(args.out, "results.pt"))


if __name__ == "__main__":
    comm.run_rank(main)  # ends the rank without the interpreter's teardown (comm.exit_process)
