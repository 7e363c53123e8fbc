"""EMR on a heterogeneous library (experts adapting different modules): the union of modules,
each expert's missing module a zero task vector, as every merge treats it; checked against
EMR applied by hand to PEFT's dense deltas with zeros filled in."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model

from lorafuse.fusion.seed_routing import emr_sources
from lorafuse.library import LoraAdapter, union_modules
from lorafuse.merging.emr import emr_module, rescalers, task_delta

TARGETS = (["q_proj", "v_proj"], ["up_proj", "v_proj"], ["q_proj", "down_proj"])


def peft_deltas(model, path) -> dict[str, torch.Tensor]:
    """Each adapted module's dense delta as PEFT computes it (merged minus base weight)."""
    from peft import PeftModel

    peft = PeftModel.from_pretrained(copy.deepcopy(model), str(path))
    base = dict(model.named_modules())
    merged = peft.merge_and_unload()
    out = {}
    for name, module in merged.named_modules():
        if name in base and isinstance(module, torch.nn.Linear):
            delta = module.weight.detach() - base[name].weight.detach()
            if delta.abs().max() > 0:
                out[name] = delta
    return out


def test_emr_uses_the_union_with_zeros_for_missing_modules(tiny_llama, tmp_path) -> None:
    paths = []
    for k, targets in enumerate(TARGETS):
        torch.manual_seed(30 + k)
        cfg = LoraConfig(r=2 + k, lora_alpha=4, target_modules=targets, init_lora_weights=False)
        model = get_peft_model(copy.deepcopy(tiny_llama), cfg)
        model.save_pretrained(tmp_path / f"e{k}")
        paths.append(tmp_path / f"e{k}")
    experts = [LoraAdapter.open(p) for p in paths]
    modules = union_modules(experts)
    assert len(modules) > len(experts[0].module_names)  # really heterogeneous
    dense = [peft_deltas(tiny_llama, p) for p in paths]
    shapes = {m: tiny_llama.get_submodule(m).weight.shape for m in modules}
    mods = {
        m: emr_module(torch.stack([d.get(m, torch.zeros(shapes[m])) for d in dense]))
        for m in modules
    }
    lam = rescalers(
        sum(x.abs_task for x in mods.values()), sum(x.abs_masked for x in mods.values())
    )

    sources, got_lam = emr_sources(experts, rank=64)  # >= min(d_out, d_in): exact
    torch.testing.assert_close(torch.tensor(got_lam), lam, rtol=1e-5, atol=1e-6)
    for t, source in enumerate(sources):
        assert sorted(source.module_names) == sorted(modules)
        for m in modules:
            want = task_delta(mods[m], t, float(lam[t]))
            torch.testing.assert_close(source.factors(m).delta(), want, rtol=1e-4, atol=1e-6)
