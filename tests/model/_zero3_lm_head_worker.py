"""Under the deepspeed launcher: three ZeRO-3 engines over the same tiny Llama, one trained through
full logits on padded rows (megakto.model.forward.completion_logps, the ground truth), one through
the chunked output head on packed rows (packed_completion_logps), and one loaded the way the trainer
loads (from_pretrained under zero.Init) with its embedding and head split into vocabulary blocks.
Each rank feeds its own batches and dumps every path's log-probs, per step, and the final gathered
weights.
``stage3_param_persistence_threshold: 0`` keeps every parameter, lm_head included, partitioned."""

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from megakto.data.collate import collate  # noqa: E402
from megakto.data.packing import pack  # noqa: E402
from megakto.distributed import comm, engine  # noqa: E402
from megakto.model.forward import completion_logps, packed_completion_logps  # noqa: E402

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                          "stage3_prefetch_bucket_size": 0, "reduce_bucket_size": 1000},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9,
}


def tiny_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def make_engine(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=DS_CONFIG)
    return eng


def batches(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        rows = []
        for _ in range(2):
            p = torch.randint(1, 300, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
            c = torch.randint(1, 300, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
            rows.append((p, c))
        yield rows


def blocked_engine(base, folder: str, rows: int):
    """The trainer's loading path: from_pretrained under ZeRO-3's zero.Init, then block_vocab."""
    if comm.rank() == 0:
        base.save_pretrained(folder)
    comm.barrier(group=comm.world_group())
    model = engine.load_model(folder, DS_CONFIG, dtype=torch.float32, attn_implementation="sdpa",
                              trust_remote_code=False, vocab_block_rows=rows)
    return make_engine(model)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int)
    args = parser.parse_args()
    engine.configure_cpu_threads()
    engine.init_distributed(5)
    dump = {}
    for tie in (False, True):
        base = tiny_llama(tie)
        ref, chk = make_engine(copy.deepcopy(base)), make_engine(copy.deepcopy(base))
        blk = blocked_engine(base, os.path.join(args.out, f"model-tie{tie}"), rows=128)
        blocks = [p for n, p in blk.module.named_parameters() if ".vocab_blocks." in n]
        blocked = (len(blocks), all(p.numel() == 0 and p.ds_tensor.numel() < p.ds_numel for p in blocks))
        head = chk.module.get_output_embeddings().weight
        # Partitioned: outside a forward this rank holds only its slice of lm_head.
        partitioned = (head.numel() == 0, head.ds_tensor.numel() < head.ds_numel)
        steps = []
        for rows in batches(comm.rank()):
            packed = pack(rows, 32, 0)  # both sequences (at most 12 tokens each) in one row
            a, na = completion_logps(ref, collate(rows, pad_id=0))
            b, nb = packed_completion_logps(chk, packed, attn="sdpa", chunk_tokens=3)
            c, _ = packed_completion_logps(blk, packed, attn="sdpa", chunk_tokens=3)
            # A KTO-like objective with signed per-sequence weights, so grads are not trivial.
            w = torch.tensor([1.0, -0.5])
            ref.backward(-(a * w).sum())
            chk.backward(-(b * w).sum())
            blk.backward(-(c * w).sum())
            ref.step()
            chk.step()
            blk.step()
            steps.append({"full": a.detach(), "chunked": b.detach(), "blocked": c.detach(),
                          "n_full": na, "n_chunked": nb,
                          "packed_rows": packed.input_ids.shape[0]})
        dump[f"tie={tie}"] = {
            "partitioned": partitioned,
            "steps": steps,
            "init": {k: v.detach().clone() for k, v in base.named_parameters()},
            "full": engine.gathered_state_dict(ref.module, tp_group=None),
            "chunked": engine.gathered_state_dict(chk.module, tp_group=None),
            "blocked": engine.gathered_state_dict(blk.module, tp_group=None),
            "vocab_blocks": blocked,
            "forward_restored": "forward" not in chk.module.get_output_embeddings().__dict__,
        }
    torch.save(dump, os.path.join(args.out, f"rank{comm.rank()}.pt"))


if __name__ == "__main__":
    comm.run_rank(main)  # ends the rank without the interpreter's teardown (comm.exit_process)
