"""Under the deepspeed launcher with 2 ranks: for each architecture (Llama, Mistral with a sliding
window shorter than the sequences, Qwen2, Qwen3, and Qwen2 with tied embeddings) a tiny random
model is saved and loaded the trainer's way as a 2-stage pipeline (megakto.runners.pipeline), each
rank reading only its stage's tensors. One packed row holding three sequences goes through
``eval_batch`` (log-probs), one ``train_batch`` with SGD on their sum, and ``eval_batch`` again;
the log-probs and the weights after the step (each rank's layers under Hugging Face names) are
dumped next to those of the same model run whole in this process (padded rows, full logits).
Rank 0 writes OUT/<arch>.pt."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402  (SGD instead of the trainer's AdamW: the update is the gradient)
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, MistralConfig  # noqa: E402

from megakto.config import load_config  # noqa: E402
from megakto.data.batcher import Batcher  # noqa: E402
from megakto.distributed import comm, engine  # noqa: E402
from megakto.distributed.ds_config import build_ds_config  # noqa: E402
from megakto.distributed.parallel import ParallelDims  # noqa: E402
from megakto.model.pipeline_stages import hf_names  # noqa: E402
from megakto.runners.base import MicroLoss  # noqa: E402
from megakto.runners.pipeline import PipelineRunner, pipeline_model  # noqa: E402
from tests.model._arch_cases import ARCHS, LR, SHAPE, rows, whole  # noqa: E402

# The shared cases, with Mistral's sliding window shorter than the packed sequences.
CASES = {**{k: v for k, v in ARCHS.items() if k != "mistral"},
         "mistral_sliding": lambda: MistralConfig(**SHAPE, tie_word_embeddings=False, sliding_window=4)}


def stage_weights(module, num_layers):
    """This rank's pipeline layers under Hugging Face names."""
    out = {}
    for offset, layer in enumerate(module.forward_funcs):
        if hasattr(layer, "state_dict"):
            out.update(hf_names(module._local_start + offset, num_layers, layer.state_dict()))
    return {k: v.detach().clone() for k, v in out.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int)
    args = parser.parse_args()
    engine.init_distributed(5)
    cfg = load_config(None, ["model.path=unused", "data.train_files=unused", "train.global_batch_size=2",
                             "train.micro_batch_size=2", "parallel.pp_size=2", "model.dtype=float32",
                             "optim.grad_clip=1e9", "model.attn_implementation=eager"])
    dims = ParallelDims.from_config(cfg, comm.world_size(), rank=comm.rank())
    ds = build_ds_config({"zero_optimization": {"stage": 0}, "steps_per_print": 10**9}, cfg, dims, bf16=False)
    for name, make in CASES.items():
        folder = os.path.join(args.out, name)
        if comm.is_main():
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(make()).save_pretrained(folder)
        comm.barrier(group=comm.world_group())
        module = pipeline_model(folder, 2, dtype=torch.float32, model=cfg.model, partition="parameters")
        opt = torch.optim.SGD(module.parameters(), lr=LR)
        policy, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds)
        dp_group, pp_group = engine.pipeline_groups(policy)
        runner = PipelineRunner(policy, module.loss_fn, batcher=Batcher(pad_id=0, packing=True, max_tokens_per_row=64),
                                dp_group=dp_group, pp_group=pp_group, last=1, attn=cfg.model.attn_implementation)
        logps = runner.score([rows()])[0]
        zeros = torch.zeros(3)
        runner.train([rows()], lambda i, lp: MicroLoss(lp.sum(), zeros, zeros, zeros.bool()), scale=1.0, skipped=None)
        after = runner.score([rows()])[0]
        weights = {}
        for part in comm.all_gather_object(stage_weights(module, SHAPE["num_hidden_layers"]), group=comm.world_group()):
            weights.update(part)
        want_logps, want_after, want_weights = whole(folder)
        if comm.is_main():
            torch.save({"logps": logps, "want_logps": want_logps, "after": after, "want_after": want_after,
                        "weights": weights, "want_weights": want_weights, "parts": [int(p) for p in module.parts]},
                       os.path.join(args.out, f"{name}.pt"))
        comm.barrier(group=comm.world_group())
        del policy, module, opt, runner


if __name__ == "__main__":
    comm.run_rank(main)  # ends the rank without the interpreter's teardown (comm.exit_process)
