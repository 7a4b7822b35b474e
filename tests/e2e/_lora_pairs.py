"""The LoRA resume pairs' own checks (tests/e2e/resume_matrix_lora.py, tests/e2e/test_resume_lora.py):
beside tests/e2e/_resume_pairs.py's comparison of steps and weights, what ``train.export_hf`` wrote at
the end of run B (the merged model in ``hf/``, the adapter in ``adapter/``) against run A's, and the
export of the universal folder run B resumed through against the export of the tag it was converted
from: a complete model, its frozen base included."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from tests.e2e._resume_pairs import WEIGHT_ABS, Layout, compare, resume_on, run_source

__all__ = ["LORA", "lora_layout", "lora_source", "resume_pair", "check_only_adapters_trained", "check_exports", "check_universal_export"]

LORA = {"model.lora.r": 8, "model.lora.alpha": 16.0, "optim.lr": 3e-3, "train.export_hf": "true"}


def lora_layout(nproc: int) -> Layout:
    return Layout(f"LoRA ZeRO-3 DP{nproc} ({nproc} rank{'s' if nproc > 1 else ''})", nproc, settings=LORA)


def lora_source(assets, tmp_path_factory, nproc: int) -> dict:
    """Run A: a LoRA ZeRO-3 run on ``nproc`` ranks (tests/e2e/_resume_pairs.run_source)."""
    return run_source(assets, tmp_path_factory.mktemp(f"lora{nproc}"), lora_layout(nproc))


def resume_pair(assets, source: dict, out, target: Layout) -> None:
    """Run B of the pair ``source`` -> ``target`` into ``out``, compared with run A: steps and final
    weights (tests/e2e/_resume_pairs.py), the exports, and the export of the universal folder."""
    _, result = resume_on(assets, source, out, target)
    compare(f"LoRA {source['layout'].nproc} -> {target.nproc}", source, target, result, out)
    check_only_adapters_trained(assets, out)
    check_exports(source, out)
    check_universal_export(source, out)


def check_only_adapters_trained(assets, out) -> None:
    """Run B's final checkpoint holds model.path's weights bitwise beside its adapters (the base was
    frozen on the resumed run too), and adapters that moved."""
    from tests.e2e._resume_pairs import final_weights

    weights, base = final_weights(out), load_file(os.path.join(assets["model"], "model.safetensors"))
    adapters = [k for k in weights if ".lora_" in k]
    assert adapters and any(float(weights[k].detach().abs().max()) > 0 for k in adapters if ".lora_B." in k)
    for name, tensor in weights.items():
        hf = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert ".lora_" in name or torch.equal(tensor, base[hf]), name


_FILES = {"hf": "model.safetensors", "adapter": "adapter_model.safetensors"}


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def check_exports(source: dict, out) -> dict[str, float]:
    """Run B's ``hf/`` (merged) and ``adapter/`` exports within the weights' tolerance of run A's;
    returns the largest difference of each."""
    diffs = {}
    for folder, name in _FILES.items():
        got, want = (load_file(os.path.join(d, folder, name)) for d in (out, source["out"]))
        diffs[folder] = _max_diff(got, want)
        assert diffs[folder] <= WEIGHT_ABS, (folder, diffs[folder])
    return diffs


def check_universal_export(source: dict, out) -> None:
    """The universal folder run B converted A's step-4 tag into exports, merged and adapter alike,
    bitwise what the tag itself exports: the frozen base is in the folder (not only the adapters)."""
    from megakto.checkpoint import export_checkpoint, read_weights, universal

    folder = universal.universal_dir(source["tag"], os.path.join(out, "checkpoints"))
    whole, converted = read_weights(source["tag"]), read_weights(folder)
    assert sorted(converted) == sorted(whole), sorted(set(converted) ^ set(whole))[:5]
    assert all(torch.equal(converted[k], whole[k]) for k in whole)
    for name, tag in (("tag", source["tag"]), ("universal", folder)):
        export_checkpoint(tag, os.path.join(out, f"export-{name}", "hf"),
                          adapter_dir=os.path.join(out, f"export-{name}", "adapter"))
    for folder_name, name in _FILES.items():
        a, b = (load_file(os.path.join(out, f"export-{k}", folder_name, name)) for k in ("tag", "universal"))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), folder_name
