"""Meta-device construction + per-rank materialisation (openmoe/parallel/materialize.py): fresh
init at 1 and 2 ranks (plain, ep 2, fsdp) equals the plain model's per-tensor init; init_from at
2 ranks equals loading the folder in one process."""

import json
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port

HERE = os.path.dirname(os.path.abspath(__file__))


def _reference(seed):
    from helpers import tiny_config
    from openmoe import OpenMoeForCausalLM
    from openmoe.parallel.materialize import init_per_tensor_

    return init_per_tensor_(OpenMoeForCausalLM(tiny_config()), seed)


def _worker(rank, world, ep, fsdp, folder, port, out_dir):
    sys.path.insert(0, os.path.dirname(HERE))
    import torch.distributed as dist

    from helpers import tiny_config
    from openmoe import OpenMoeForCausalLM
    from openmoe.parallel import build_state, parallelize
    from openmoe.parallel.materialize import materialize_fresh, materialize_from

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ps = build_state(ep)
    with torch.device("meta"):
        model = OpenMoeForCausalLM(tiny_config())
    model = parallelize(model, ps, fsdp=fsdp)
    if folder:
        materialize_from(model, folder, "cpu")
        ref = OpenMoeForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        materialize_fresh(model, "cpu", seed=7)
        ref = _reference(7)
    from openmoe.parallel.grads import is_expert

    refp = dict(ref.named_parameters())
    marked = sorted(n for n, p in model.named_parameters() if is_expert(p))  # sync_gradients reads it
    El = ref.config.num_experts // ep
    err = 0.0
    for n, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p  # gathered independently by DTensor
        r = refp[n]
        if ".experts." in n and ep > 1:
            e = dist.get_rank(ps.ep_group)
            r = r[e * El:(e + 1) * El]
        err = max(err, float((t - r).abs().max()))
    x = torch.randint(2, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    rope = float((model.model.rotary_emb.inv_freq - ref.model.rotary_emb.inv_freq).abs().max())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"err": err, "rope": rope, "n": len(refp), "marked": marked}, f)
    dist.destroy_process_group()


def _run(tmp_path, world, ep, fsdp, folder=""):
    mp.spawn(_worker, args=(world, ep, fsdp, folder, free_port(), str(tmp_path)), nprocs=world, join=True)
    for r in range(world):
        res = json.load(open(tmp_path / f"rank{r}.json"))
        assert res["err"] == 0.0 and res["rope"] == 0.0, (r, res)
        assert len(res["marked"]) == (2 * 3 if ep > 1 else 0), res["marked"]  # 2 MoE layers x 3 stacks


def test_per_tensor_init_at_one_process_matches_meta_path():
    from helpers import tiny_config
    from openmoe import OpenMoeForCausalLM
    from openmoe.parallel.materialize import materialize_fresh

    with torch.device("meta"):
        model = OpenMoeForCausalLM(tiny_config())
    materialize_fresh(model, "cpu", seed=7)
    ref = _reference(7)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    # the seed matters, and each tensor differs from its neighbours (no shared stream)
    other = _reference(8)
    assert not torch.equal(other.lm_head.weight, ref.lm_head.weight)
    w = ref.model.layers[1].mlp.experts.wi_up
    assert not torch.equal(w[0], w[1])


@pytest.mark.parametrize("ep,fsdp", [(1, False), (2, False), (1, True), (2, True)])
def test_fresh_init_two_ranks_equals_plain(tmp_path, ep, fsdp):
    _run(tmp_path, 2, ep, fsdp)


@pytest.mark.parametrize("sharded", [False, True])
def test_init_from_two_ranks_equals_one_process_load(tmp_path, sharded):
    from helpers import tiny_config
    from openmoe import OpenMoeForCausalLM

    torch.manual_seed(3)
    folder = tmp_path / "hf"
    OpenMoeForCausalLM(tiny_config()).save_pretrained(folder, max_shard_size="20KB" if sharded else "5GB")
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    out = tmp_path / "out"
    out.mkdir()
    _run(out, 2, 2, True, str(folder))
