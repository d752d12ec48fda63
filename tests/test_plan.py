"""`dsv4 plan`: placement rules, KV arithmetic, registry plans without downloads, and bad input."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from dsv4cli.engine.kvcache import ModelDims, kv_cache
from dsv4cli.errors import PlanError
from dsv4cli.models.registry import get_model
from dsv4cli.plan import GIB, ModelSource, PlanInputs, load_plan, make_plan
from quant.mapping import TensorSpec

I8 = int(gguf.GGMLQuantizationType.I8)


def _spec(name: str, gib: float) -> TensorSpec:
    nbytes = int(gib * GIB)
    return TensorSpec(name, (256, nbytes // 256), I8, nbytes)


def _synthetic(*, engram_gib: float = 0.0) -> ModelSource:
    """4 layers of 1 GiB dense + 3 GiB experts, 0.5 GiB embedding and 0.5 GiB head, tiny's architecture."""
    tensors = [_spec("token_embd.weight", 0.5), _spec("output.weight", 0.5)]
    for i in range(4):
        tensors += [_spec(f"blk.{i}.attn_q_a.weight", 1.0), _spec(f"blk.{i}.ffn_gate_exps.weight", 3.0)]
    if engram_gib:
        tensors.append(_spec("blk.1.engram_embd.weight", engram_gib))
    dims = ModelDims.from_facts(get_model("tiny").facts, arch="deepseek4")
    return ModelSource("estimate", "synthetic", dims, tuple(tensors))


# (vram per GPU, RAM, n_gpu_layers, layers whose experts stay on the host, tiers of layer 0 experts, disk GiB)
PLACEMENT_ROWS = [
    # 6 GiB: dense (4) + head (0.5) fit, 1.5 GiB left is less than one expert layer (3) -> all experts in RAM
    ((6.0,), 32.0, 5, [0, 1, 2, 3], "ram", 0.0),
    # 11 GiB: 4.5 dense, then whole expert layers from the top: 3 and 2 (10.5) -> --n-cpu-moe 2
    ((11.0,), 32.0, 5, [0, 1], "ram", 0.0),
    # 3 GiB: the head (0.5) and layers 2..3 fit (2.5; layer 1 would need 3.5) -> -ngl 3, layers 0-1 on host
    ((3.0,), 32.0, 3, [2, 3], "ram", 0.0),
    # no GPU: CPU-only plan, everything in RAM, no overrides
    ((), 32.0, 0, [], "ram", 0.0),
    # 10 GiB RAM, no GPU: 5 GiB must stay resident, one expert tensor fits beside it, three go to disk (9 GiB)
    ((), 10.0, 0, [], "ram", 9.0),
    # two 3 GiB GPUs: layers 0-1 on gpu0, layers 2-3 + head on gpu1; no room for any expert layer
    ((3.0, 3.0), 32.0, 5, [0, 1, 2, 3], "ram", 0.0),
]


@pytest.mark.parametrize(("vram", "ram", "ngl", "cpu_experts", "layer0_experts", "disk_gib"), PLACEMENT_ROWS)
def test_placement_table(vram, ram, ngl, cpu_experts, layer0_experts, disk_gib) -> None:
    inputs = PlanInputs(vram_gib=vram, ram_gib=ram, ctx=1024, margin_gib=0.0, threads=1, reserve_gib=0.0)
    plan = make_plan(_synthetic(), inputs)
    data = plan.to_dict()
    assert plan.n_gpu_layers == ngl
    assert plan.cpu_expert_layers == cpu_experts
    assert data["tensors"]["token_embd.weight"] == "ram"
    assert data["tensors"]["blk.0.ffn_gate_exps.weight"] == layer0_experts
    assert plan.tier("disk").weights == int(disk_gib * GIB)
    for tier in data["tiers"]:
        assert tier["budget_bytes"] is None or tier["used_bytes"] <= tier["budget_bytes"], tier
    if ngl and cpu_experts:
        pattern = data["llama"]["override_tensor"][0]["pattern"]
        assert pattern.startswith(r"^blk\.(") and str(cpu_experts[-1]) in pattern
    if disk_gib:
        assert data["verdict"].startswith("streams from disk:") and data["hints"]
        assert data["llama"]["use_mmap"] is True
    else:
        assert data["verdict"].startswith("fits:") and not data["hints"]


def test_two_gpus_split_layers() -> None:
    plan = make_plan(_synthetic(), PlanInputs(vram_gib=(3.0, 3.0), ram_gib=32, ctx=1024, margin_gib=0, threads=1))
    tensors = plan.to_dict()["tensors"]
    assert [tensors[f"blk.{i}.attn_q_a.weight"] for i in range(4)] == ["gpu0", "gpu0", "gpu1", "gpu1"]
    assert tensors["output.weight"] == "gpu1"
    assert plan.load_params().tensor_split == (2.0, 3.0)  # layers per GPU; llama.cpp normalizes


def test_engram_never_on_gpu() -> None:
    source = _synthetic(engram_gib=2.0)
    roomy = make_plan(
        source, PlanInputs(vram_gib=(100.0,), ram_gib=32, ctx=1024, margin_gib=0, threads=1, reserve_gib=0)
    )
    assert roomy.placement["blk.1.engram_embd.weight"] == "ram"
    assert roomy.cpu_expert_layers == []  # 100 GiB takes every expert layer, still not the Engram table
    assert r"\.engram_embd\." in roomy.load_params().host_tensors
    # RAM for the resident 5 GiB and 12 GiB of experts but not the table: the table is what goes to disk
    short = make_plan(source, PlanInputs(vram_gib=(), ram_gib=17.5, ctx=1024, margin_gib=0, threads=1, reserve_gib=0))
    assert short.placement["blk.1.engram_embd.weight"] == "disk"
    assert all(short.placement[f"blk.{i}.ffn_gate_exps.weight"] == "ram" for i in range(4))


def test_ram_too_small_says_by_how_much() -> None:
    with pytest.raises(PlanError, match=r"short by 1\.\d GiB"):
        make_plan(_synthetic(), PlanInputs(vram_gib=(), ram_gib=4, ctx=1024, threads=1, reserve_gib=0))
    with pytest.raises(PlanError, match=r"short by 9\.0 GiB") as info:
        make_plan(_synthetic(), PlanInputs(vram_gib=(), ram_gib=10, ctx=1024, no_disk=True, threads=1, reserve_gib=0))
    assert "--no-disk" in (info.value.hint or "")


def test_kv_bytes_per_token_match_published_figures() -> None:
    """6,880 B/token for V4-Flash and 9,848 for V4-Pro at f16 (docs/formats.md §KV cache)."""
    for name, per_token in (("deepseek-v4-flash", 6880), ("deepseek-v4-pro", 9848)):
        dims = ModelDims.from_facts(get_model(name).facts, arch="deepseek4")
        small, large = (kv_cache(dims, n_ctx=n, n_ubatch=512) for n in (2**18, 2**19))
        assert (large.total - small.total) / 2**18 == pytest.approx(per_token, rel=0.01)
        assert small.raw_bytes == dims.n_layer * 768 * 1024  # (128 + 512) -> 768 cells of 512 f16


def test_kv_tiny_matches_llama_log() -> None:
    """Cells and MiB as llama.cpp 0.3.36 logged them for tiny at n_ctx 4096, n_ubatch 512, swa_full off."""
    dims = ModelDims.from_facts(get_model("tiny").facts, arch="deepseek4")
    kv = kv_cache(dims, n_ctx=4096, n_ubatch=512)
    assert (kv.raw_cells, kv.csa_cells, kv.hca_cells) == (768, 1024, 256)
    mib = 2**20
    assert (kv.raw_bytes / mib, kv.csa_bytes / mib, kv.hca_bytes / mib, kv.indexer_bytes / mib) == (
        0.375,
        0.125,
        0.03125,
        0.125,
    )
    assert kv.state_bytes == 8192 + 65536 + 8192  # csa, hca, lid state buffers
    assert kv_cache(dims, n_ctx=4096, n_ubatch=512, kv_type="q8_0").raw_bytes == 768 * 4 * 68


def test_flash_24_192_dense_on_gpu_experts_in_ram(dsv4) -> None:
    res = dsv4("plan", "deepseek-v4-flash", "--vram", "24", "--ram", "192", "--json")
    assert res.code == 0, res.stderr
    plan = json.loads(res.stdout)
    gpu = next(t for t in plan["tiers"] if t["name"] == "gpu0")
    assert gpu["used_bytes"] <= 24 * GIB and gpu["kv_bytes"] > 0 and gpu["compute_bytes"] > 0
    for name, tier in plan["tensors"].items():
        if "_exps." in name:
            assert tier in ("ram", "gpu0"), name
        elif name != "token_embd.weight":
            assert tier == "gpu0", name
    experts_in_ram = [r for r in plan["classes"] if r["class"] == "routed_experts" and r["tier"] == "ram"]
    assert experts_in_ram and experts_in_ram[0]["bytes"] > 100 * GIB
    assert next(t for t in plan["tiers"] if t["name"] == "disk")["used_bytes"] == 0
    assert plan["source"]["kind"] == "estimate" and plan["llama"]["n_gpu_layers"] == 44
    assert plan["estimates"]["decode_tok_s"] > 0 and plan["estimates"]["decode_bottleneck"]


def test_v41_engram_in_host_memory(dsv4) -> None:
    res = dsv4("plan", "deepseek-v4.1-flash", "--vram", "24", "--ram", "256", "--json")
    assert res.code == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["source"]["arch"] == "deepseek41"
    engram = {n: t for n, t in plan["tensors"].items() if "engram_embd" in n}
    assert len(engram) == 2 and set(engram.values()) <= {"ram", "disk"}
    assert any(o["pattern"] == r"\.engram_embd\." for o in plan["llama"]["override_tensor"])


def test_pro_24_128_uses_disk(dsv4) -> None:
    res = dsv4("plan", "deepseek-v4-pro", "--vram", "24", "--ram", "128", "--json")
    assert res.code == 0, res.stderr
    plan = json.loads(res.stdout)
    disk = next(t for t in plan["tiers"] if t["name"] == "disk")
    assert disk["weights_bytes"] > 500 * GIB
    assert plan["estimates"]["decode_bottleneck"] == "disk"
    assert plan["verdict"].startswith("streams from disk:") and plan["llama"]["use_mmap"] is True
    res = dsv4("plan", "deepseek-v4-pro", "--vram", "24", "--ram", "128", "--no-disk")
    assert res.code == 1 and "short by" in res.stderr and "Traceback" not in res.stderr


def test_gguf_exact_equals_estimate(tiny_gguf: Path) -> None:
    """The planner reads the quantized file's headers; the registry estimate must name the same bytes."""
    exact = make_plan(str(tiny_gguf), PlanInputs(vram_gib=(), ram_gib=8, threads=1))
    estimate = make_plan("tiny", PlanInputs(vram_gib=(), ram_gib=8, threads=1))
    assert exact.source.kind == "gguf" and estimate.source.kind == "estimate"
    assert {s.name: s.nbytes for s in exact.source.tensors} == {s.name: s.nbytes for s in estimate.source.tensors}
    assert sum(s.nbytes for s in exact.source.tensors) == sum(t.n_bytes for t in gguf.GGUFReader(tiny_gguf).tensors)


def test_output_file_and_llama_args(dsv4, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    res = dsv4("plan", "tiny", "--vram", "2", "--ram", "4", "--ctx", "2048", "-o", str(out))
    assert res.code == 0, res.stderr
    assert "fits:" in res.stdout and "routed_experts" in res.stdout
    data = load_plan(out)
    assert data["llama"]["n_ctx"] == 2048 and data["llama"]["swa_full"] is False
    assert data["llama"]["n_gpu_layers"] == 5
    res = dsv4("plan", "tiny", "--vram", "2", "--ram", "4", "--llama-args")
    assert res.stdout.startswith("llama-server -m ") and "-ngl 5" in res.stdout and "-c 4096" in res.stdout
    assert "tiny-mxfp4-q8_0.gguf" in res.stdout  # where `dsv4 quantize tiny` writes
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PlanError, match="not a dsv4 plan"):
        load_plan(tmp_path / "bad.json")


@pytest.mark.slow
def test_measure_fills_bandwidths(dsv4) -> None:
    """--measure puts this machine's figures in the plan (RAM within 4x of a read timed here); a flag still wins."""
    res = dsv4("plan", "tiny", "--vram", "1", "--ram", "4", "--measure", "--disk-bw", "7.5", "--json")
    assert res.code == 0, res.stderr
    tiers = {t["name"]: t for t in json.loads(res.stdout)["tiers"]}
    data = np.ones(2**25)  # 256 MiB
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    here = data.nbytes / best / 1e9
    assert here / 4 < tiers["ram"]["bandwidth_gbs"] < here * 4
    assert tiers["disk"]["bandwidth_gbs"] == 7.5


def _other_arch_gguf(path: Path) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("tiny", "--vram", "0"), "--vram"),
        (("tiny", "--vram=-2"), "--vram"),
        (("tiny", "--ram", "0"), "--ram"),
        (("tiny", "--ram-bw", "-1"), "--ram-bw"),
        (("tiny", "--ctx", "0"), "--ctx"),
        (("tiny", "--ctx", "100000"), "context length 4096"),
        (("tiny", "--kv-type", "q4"), "--kv-type"),
        (("tiny", "--experts", "fp2"), "--experts"),
        (("no-such-model",), "unknown model"),
        (("{tmp}/notes.gguf",), "not a GGUF"),
        (("{tmp}/llama.gguf",), "'llama' is not DeepSeek V4"),
        (("{tmp}/m-00001-of-00002.gguf",), "missing m-00002-of-00002.gguf"),
        (("{tmp}/absent.gguf",), "no such file"),
    ],
)
def test_bad_input_one_line(dsv4, tmp_path: Path, argv, message) -> None:
    (tmp_path / "notes.gguf").write_text("not a gguf\n")
    _other_arch_gguf(tmp_path / "llama.gguf")
    _other_arch_gguf(tmp_path / "m-00001-of-00002.gguf")
    res = dsv4("plan", *(a.format(tmp=tmp_path) for a in argv))
    assert res.code != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.stderr


def test_split_gguf_reads_every_shard(tiny_checkpoint: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    from quant.convert import QuantOptions, quantize_checkpoint

    quantize_checkpoint(tiny_checkpoint, tmp_path / "tiny.gguf", QuantOptions(split_max_size=3 * 2**20))
    shards = sorted(tmp_path.glob("tiny-*-of-*.gguf"))
    assert len(shards) >= 2
    split = make_plan(str(shards[0]), PlanInputs(vram_gib=(), ram_gib=8, threads=1))
    whole = make_plan(str(tiny_gguf), PlanInputs(vram_gib=(), ram_gib=8, threads=1))
    assert len(split.source.files) == len(shards)
    assert sorted((s.name, s.nbytes) for s in split.source.tensors) == sorted(
        (s.name, s.nbytes) for s in whole.source.tensors
    )
    with pytest.raises(PlanError, match="not the first shard"):
        make_plan(str(shards[1]), PlanInputs(vram_gib=(), ram_gib=8, threads=1))


def test_checkpoint_folder_plans_like_its_gguf(tiny_checkpoint: Path, tiny_gguf: Path) -> None:
    folder = make_plan(str(tiny_checkpoint), PlanInputs(vram_gib=(), ram_gib=8, threads=1))
    exact = make_plan(str(tiny_gguf), PlanInputs(vram_gib=(), ram_gib=8, threads=1))
    assert folder.source.kind == "estimate" and folder.source.recipe == {"experts": "mxfp4", "dense": "q8_0"}
    assert folder.to_dict()["tiers"] == exact.to_dict()["tiers"]


def test_detects_gpus_with_nvidia_smi(dsv4, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No --vram: the budget is the free memory nvidia-smi reports (a stand-in script on PATH here)."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'NVIDIA GeForce RTX 4090, 24564, 1024'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:/usr/bin:/bin")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # a machine without NVML, even where the test runs on a GPU
    res = dsv4("plan", "deepseek-v4-flash", "--ram", "192", "--json")
    assert res.code == 0, res.stderr
    plan = json.loads(res.stdout)
    gpu = plan["tiers"][0]
    assert plan["inputs"]["vram_source"] == "nvidia-smi"
    assert gpu["device"] == "NVIDIA GeForce RTX 4090" and gpu["budget_bytes"] == (24564 - 1024) * 2**20
    assert gpu["bandwidth_gbs"] == 850.0
    res = dsv4("plan", "deepseek-v4-flash", "--ram", "192")
    assert "VRAM detected via" in res.stderr


def test_attention_flops_bounded_only_with_flash_attention() -> None:
    """Without flash attention llama.cpp attends over every compressed cell; with it CSA layers read top-k only."""
    from dsv4cli.engine.kvcache import attention_flops

    dims = ModelDims.from_facts(get_model("deepseek-v4-flash").facts, arch="deepseek4")
    short, long = (kv_cache(dims, n_ctx=n, n_ubatch=512) for n in (2**14, 2**16))
    csa = dims.compress_ratios.index(4)
    assert attention_flops(dims, long, flash_attn=False)[csa] > 3 * attention_flops(dims, short, flash_attn=False)[csa]
    fa_short, fa_long = (attention_flops(dims, c, flash_attn=True)[csa] for c in (short, long))
    attend = 4.0 * dims.n_head * dims.head_dim * (dims.sliding_window + dims.index_topk)
    assert fa_short - attend == pytest.approx(2.0 * 64 * 128 * short.csa_cells)  # only the indexer grows
    assert fa_long - attend == pytest.approx(2.0 * 64 * 128 * long.csa_cells)


def test_two_roomy_gpus_share_layers_and_experts() -> None:
    """Dense layers that fit on one GPU are still split, so the second GPU holds its layers' experts too."""
    plan = make_plan(_synthetic(), PlanInputs(vram_gib=(12.0, 12.0), ram_gib=32, ctx=1024, margin_gib=0, threads=1))
    tensors = plan.to_dict()["tensors"]
    assert [tensors[f"blk.{i}.attn_q_a.weight"] for i in range(4)] == ["gpu0", "gpu0", "gpu1", "gpu1"]
    assert [tensors[f"blk.{i}.ffn_gate_exps.weight"] for i in range(4)] == ["gpu0", "gpu0", "gpu1", "gpu1"]
    assert plan.cpu_expert_layers == [] and plan.load_params().host_tensors == ()
    assert plan.tier("gpu0").weights == 8 * GIB and plan.tier("gpu1").weights == int(8.5 * GIB)
    assert plan.llama_args()[plan.llama_args().index("-ts") + 1] == "2,3"


def test_two_detected_gpus_both_carry_layers(dsv4, fake_tool) -> None:
    fake_tool("nvidia-smi", "NVIDIA GeForce RTX 4090, 24564, 1024\nNVIDIA GeForce RTX 4090, 24564, 1024")
    res = dsv4("plan", "deepseek-v4-flash", "--ram", "192", "--json")
    assert res.code == 0, res.stderr
    plan = json.loads(res.stdout)
    gpu0, gpu1 = plan["tiers"][:2]
    assert gpu0["weights_bytes"] > 10 * GIB and gpu1["weights_bytes"] > 10 * GIB
    split = plan["llama"]["tensor_split"]
    assert len(split) == 2 and sum(split) == plan["llama"]["n_gpu_layers"] and min(split) > 0
    assert f"-ts {split[0]:g},{split[1]:g}" in " ".join(plan["llama_args"])
    table = dsv4("plan", "deepseek-v4-flash", "--ram", "192").stdout
    assert "gpu1" in table and "routed_experts" in table


def test_mtp_gguf_places_the_main_model_and_skips_the_block(tiny_gguf: Path, mtp_gguf: Path) -> None:
    """`dsv4 quantize --mtp` adds the MTP block as layer n_layer (block_count counts it); planning used to index
    past the main layers. The plan must be the plain model's plus that whole layer skipped."""
    from dsv4cli.gguf_io.check import check_gguf

    plain_info, mtp_info = check_gguf(tiny_gguf), check_gguf(mtp_gguf)
    n_layer = plain_info.block_count
    assert (mtp_info.block_count, mtp_info.mtp_layers, plain_info.mtp_layers) == (n_layer + 1, 1, 0)
    inputs = PlanInputs(vram_gib=(), ram_gib=8, ctx=2048, threads=2)
    plain, mtp = make_plan(str(tiny_gguf), inputs), make_plan(str(mtp_gguf), inputs)
    block = {t.name for t in gguf.GGUFReader(mtp_gguf).tensors if t.name.startswith(f"blk.{n_layer}.")}
    assert any(".nextn." in name for name in block) and any("_exps." in name for name in block)
    assert {name for name, tier in mtp.placement.items() if tier == "skipped"} == block
    assert {name: tier for name, tier in mtp.placement.items() if name not in block} == plain.placement
    assert mtp.load_params() == plain.load_params()
    assert [r for r in mtp.class_rows() if r["class"] == "mtp"] == [
        {
            "tier": "skipped",
            "class": "mtp",
            "count": len(block),
            "bytes": sum(t.nbytes for t in mtp.source.tensors if t.name in block),
        }
    ]
