"""Router bundles (``lorafuse export --method M OUT``) on the tiny workspace: for each method,
the bundle's router, loaded with ``load_router`` and computing its own features from the base
model, decides what the in-process method decides on the test split (spied on while lorafuse
evaluates it), and each served adapter, loaded by PEFT, has the delta lorafuse computes for
that choice (exact here: the export reports no re-compression; a forced one is reported)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from tiny_workspace import NAMES, tiny_workspace

from lorafuse.core.sparse import TopK
from lorafuse.elrea.pipeline import ElreaConfig, build_elrea, elrea_dir
from lorafuse.errors import LorafuseError
from lorafuse.fusion.base import evaluate
from lorafuse.library import module_factors, union_modules
from lorafuse.methods import build_fusion
from lorafuse.serving import VLLM_RANKS, export_bundle, load_router

ELREA = ElreaConfig(
    base_adapter=NAMES[0], train_per_task=None, n_clusters=3, dim=64, min_cluster=3,
    total_steps=12, batch_size=8, lr=1e-2,
)  # fmt: skip
PARAMS = {
    "twin": {"epochs": 60, "rank": 4},
    "arrow_top1": {},
    "learned_router": {"steps": 4, "lr": 0.1},
    "elrea": {},
    "elrea_embedding": {"clustering": "embedding"},  # exported as method elrea
}


def method_of(case: str) -> str:
    return "elrea" if case.startswith("elrea") else case


@pytest.fixture
def ws(tiny_base, tiny_experts, tmp_path):
    return tiny_workspace(tiny_base, tiny_experts, tmp_path, per_split=(6, 4, 4))


def prompt_key(batch, i: int) -> tuple[int, ...]:
    n = int(batch.positions[batch.rows == i].min()) + 1
    return tuple(batch.input_ids[i, :n].tolist())


def in_process_decisions(ws, method: str, fusion) -> dict[tuple[int, ...], torch.Tensor]:
    """Prompt ids -> the weights the in-process method used while lorafuse evaluated the
    test split (learned_router: its per-layer weights, stacked in layer order)."""
    seen: dict = {}
    keys: list = []
    route = fusion.route

    def spy(model, states, batch) -> None:
        route(model, states, batch)
        keys[:] = [prompt_key(batch, i) for i in range(len(batch.lengths))]
        rows = {
            "twin": lambda: fusion.mixer.current,
            "arrow_top1": lambda: route.last,
            "elrea": lambda: fusion.ensemble.weights,
        }.get(method)
        if rows is not None:  # learned_router: its layers' hooks fill ``seen`` next
            seen.update({k: w.detach().clone() for k, w in zip(keys, rows(), strict=True)})

    fusion.route = spy
    if method == "learned_router":
        router = fusion.mixer
        original = router._layer_weights

        def spy_layer(layer, h):
            w = original(layer, h)
            dense = w.dense() if isinstance(w, TopK) else w
            for k, row in zip(keys, dense, strict=True):
                seen.setdefault(k, {})[layer] = row.detach().clone()
            return w

        router._layer_weights = spy_layer
    evaluate(ws.base.model, fusion, ws.encoded("test"), ws.cache)
    if method == "learned_router":
        seen = {k: torch.stack([v[layer] for layer in sorted(v)]) for k, v in seen.items()}
    return seen


def peft_delta(model, path, module: str) -> torch.Tensor:
    peft = PeftModel.from_pretrained(copy.deepcopy(model), str(path))
    merged = peft.merge_and_unload().get_submodule(module).weight.detach()
    return merged - model.get_submodule(module).weight.detach()


def reference_deltas(ws, method: str, fusion) -> dict[str, dict[str, torch.Tensor]]:
    """What lorafuse computes for each served choice, per module (dense)."""
    if method == "twin":
        out = {}
        for name, excl in zip(NAMES, fusion.sources, strict=True):
            pair = [fusion.shared, excl]
            out[name] = {
                m: sum(f.delta() for f in module_factors(pair, m)) for m in union_modules(pair)
            }
        return out
    sources = ws.private if method != "elrea" else None
    if sources is None:
        names = [f"cluster{c}" for c in range(len(fusion.sources) - 1)] + [NAMES[0]]
        sources = dict(zip(names, fusion.sources, strict=True))
    return {n: {m: s.delta(m) for m in s.module_names} for n, s in sources.items()}


@pytest.mark.parametrize("case", list(PARAMS))
def test_bundle_decides_as_the_in_process_method(ws, case, tmp_path) -> None:
    method, params = method_of(case), PARAMS[case]
    if method == "elrea":
        clustering = params.get("clustering", "gradient")
        config = ELREA.model_copy(update={"clustering": clustering})
        build_elrea(ws, elrea_dir(ws.library, clustering), config)
    lines: list[str] = []
    result = export_bundle(ws, method, tmp_path / "bundle", params=params, report=lines.append)
    assert result.truncation == {} and "no re-compression" in lines[0]
    spec = json.loads((tmp_path / "bundle" / "router.json").read_text())
    assert spec["kind"] == method and spec["rank"] in VLLM_RANKS
    if method == "elrea":
        assert spec["features"] == ("embedding" if "clustering" in params else "gradient")

    # the in-process method, built again with the same settings (deterministic)
    fusion = build_fusion(ws, method, **params)
    want = in_process_decisions(ws, method, fusion)
    router = load_router(tmp_path / "bundle", base=ws.base)
    test = ws.encoded("test")
    encoded = router.encode([ex.prompt for ex in ws.examples("test")])
    assert [e.ids[: e.prompt_len] for e in encoded] == [e.ids[: e.prompt_len] for e in test]
    scores, layers = router.scores(encoded)
    routes = router.route_encoded(encoded)
    for i, e in enumerate(test):
        ref = want[e.ids[: e.prompt_len]].float()
        got = torch.stack([layers[k][i] for k in sorted(layers)]) if layers else scores[i]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        r = routes[i]
        if method in ("twin", "arrow_top1"):
            assert r.adapters == [spec["adapters"][int(ref.argmax())]] and r.weights == [1.0]
        elif method == "learned_router":
            assert r.adapters[0] == spec["adapters"][int(ref.mean(0).argmax())]
        else:
            assert r.adapters[0] == spec["adapters"][int(ref.argmax())]
            assert r.weights == sorted(ref.tolist(), reverse=True)

    # the decisions really depend on the prompt (no trivial agreement on constant weights)
    decisions = torch.stack([want[e.ids[: e.prompt_len]].float() for e in test])
    if method == "learned_router":
        assert (decisions - decisions.mean(0)).abs().max() > 1e-3
    else:
        assert len(set(decisions.argmax(-1).tolist())) >= 2

    # each served adapter is, read by PEFT, lorafuse's delta for that choice
    reference = reference_deltas(ws, method, fusion)
    assert set(spec["adapters"]) == set(reference)
    for name, modules in reference.items():
        path = tmp_path / "bundle" / "adapters" / name
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["r"] == config["lora_alpha"] == spec["rank"]
        assert not config.get("rank_pattern") and not config.get("alpha_pattern")
        for module, delta in modules.items():
            got = peft_delta(ws.base.model, path, module)
            torch.testing.assert_close(got, delta, atol=1e-5, rtol=1e-4)


def test_a_forced_re_compression_is_reported(ws, tmp_path) -> None:
    lines: list[str] = []
    result = export_bundle(
        ws, "twin", tmp_path / "b", params=PARAMS["twin"], rank=8, report=lines.append
    )
    assert result.truncation and "relative Frobenius error mean" in lines[0]
    spec = json.loads((tmp_path / "b" / "router.json").read_text())
    assert set(spec["truncation"]) == set(result.truncation)
    reference = reference_deltas(ws, "twin", build_fusion(ws, "twin", **PARAMS["twin"]))
    for name, modules in result.truncation.items():
        for module, lost in modules.items():  # the reported loss is what PEFT sees
            want = reference[name][module].double()
            got = peft_delta(ws.base.model, tmp_path / "b" / "adapters" / name, module).double()
            error = float(torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want))
            assert lost.rel_error == pytest.approx(error, rel=1e-3, abs=1e-5)
            assert spec["truncation"][name][module]["rel_error"] == lost.rel_error


@pytest.mark.parametrize(
    ("method", "params"),
    [("arrow", {}), ("hc_arrow", {}), ("learned_router", {"per_example": False})],
)
def test_per_token_routers_are_refused_in_one_line(ws, method, params, tmp_path) -> None:
    with pytest.raises(LorafuseError, match="per token") as err:
        export_bundle(ws, method, tmp_path / "b", params=params)
    assert "\n" not in str(err.value) and not (tmp_path / "b").exists()


def test_export_command_writes_a_bundle_that_routes_prompts(tmp_path, monkeypatch, capsys) -> None:
    """``lorafuse export --library L --method arrow_top1 OUT`` on a local model folder; the
    bundle loads its base model by itself and routes plain strings; per-token: exit 2."""
    from peft import LoraConfig, get_peft_model
    from tiny_cli import make_tiny_model, run_main, task_file
    from transformers import AutoModelForCausalLM

    from lorafuse.library.create import create_library

    base_dir = make_tiny_model(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    paths = []
    for k, targets in enumerate((["q_proj", "v_proj"], ["v_proj", "up_proj"])):
        torch.manual_seed(40 + k)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        peft = get_peft_model(copy.deepcopy(model), cfg)
        peft.save_pretrained(tmp_path / f"a{k}")
        paths.append(tmp_path / f"a{k}")
    create_library(tmp_path / "lib", paths, names=["e_up", "e_rev"], tasks=["up", "rev"])
    tasks = task_file(tmp_path / "tasks.jsonl")
    common = ["--library", str(tmp_path / "lib"), "--tasks", str(tasks)]
    common += ["--base-model", str(base_dir)]
    code, out, err = run_main(
        ["export", *common, "--method", "arrow_top1", str(tmp_path / "bundle")],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "router bundle" in out and "rank 8" in out
    router = load_router(tmp_path / "bundle")
    routes = router.route(["up w00a", "rev w01b", "up w02c"])
    assert len(routes) == 3
    assert all(r.adapters[0] in ("e_up", "e_rev") and r.weights == [1.0] for r in routes)

    capsys.readouterr()  # the model loading's progress bars
    code, _, err = run_main(
        ["export", *common, "--method", "arrow", str(tmp_path / "x")], monkeypatch, capsys
    )
    assert code == 2 and "per token" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["twin", "learned_router"])
def test_mixture_adapter_computes_what_lorafuse_computes(ws, method, tmp_path) -> None:
    """A request's exact mix as one adapter: PEFT's loss on it is the in-process method's."""
    export_bundle(ws, method, tmp_path / "bundle", params=PARAMS[method], report=lambda _: None)
    fusion = build_fusion(ws, method, **PARAMS[method])
    test = ws.encoded("test")[::4]
    want = evaluate(ws.base.model, fusion, test, ws.cache).loss
    router = load_router(tmp_path / "bundle", base=ws.base)
    for i, (e, r) in enumerate(zip(test, router.route_encoded(test), strict=True)):
        assert router.mixture_adapter(r, tmp_path / f"mix{i}") == {}  # exact
        peft = PeftModel.from_pretrained(copy.deepcopy(ws.base.model), str(tmp_path / f"mix{i}"))
        with torch.no_grad():
            logits = peft(input_ids=torch.tensor([e.ids])).logits[0]
        logp = torch.log_softmax(logits[e.prompt_len - 1 : -1], -1)
        targets = torch.tensor(e.ids[e.prompt_len :])[:, None]
        nll = -logp.gather(1, targets).mean()
        assert float(nll) == pytest.approx(float(want[i]), abs=1e-4)
