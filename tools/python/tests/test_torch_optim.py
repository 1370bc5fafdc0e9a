"""peerlayer.optim: parameter groups for models with PEER modules, and AdamW,
checked against torch's own AdamW (dense groups) and SparseAdam (expert rows)."""

import copy
import os

import pytest

if os.environ.get("PEER_REQUIRE_TORCH"):  # tools/test: the torch tests must run
    import torch
else:
    torch = pytest.importorskip(
        "torch", reason="torch is not importable: the PyTorch module tests did not run")
from torch import nn  # noqa: E402

from peerlayer.nn import PEER  # noqa: E402
from peerlayer.optim import AdamW, param_groups  # noqa: E402

CFG = "d_model=16,n_heads=2,d_key=8,n_subkeys=8,top_k=3,query_bias=1"


def model(seed=0, config=CFG):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(13, 16), nn.LayerNorm(16), PEER(config),
                         nn.Linear(16, 13))


def test_param_groups_split_dense_decay_no_decay_and_expert_tables():
    m = model()
    groups = {g["name"]: g for g in param_groups(m, weight_decay=0.1, expert_lr_scale=10)}
    ids = {k: [id(p) for p in g["params"]] for k, g in groups.items()}
    peer = m[2]
    assert ids["experts"] == [id(peer.experts.down), id(peer.experts.up)]
    assert groups["experts"]["weight_decay"] == 0 and groups["experts"]["lr_scale"] == 10
    assert sorted(ids["decay"]) == sorted([id(m[0].weight), id(m[3].weight)])
    assert groups["decay"]["weight_decay"] == 0.1
    # PEER's query and keys are not decayed (the 2-D rule would have decayed them).
    for p in (peer.query.weight, peer.query.bias, peer.keys, m[1].weight, m[3].bias):
        assert id(p) in ids["no_decay"]
    assert sum(len(v) for v in ids.values()) == len(list(m.parameters()))
    with_peer = {g["name"]: g for g in param_groups(m, weight_decay=0.1, peer_weight_decay=True)}
    assert id(peer.keys) in [id(p) for p in with_peer["decay"]["params"]]


def batch(step):
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 13, (4, 6), generator=g)
    return tokens, (tokens * 3 + 1) % 13


def loss_of(m, step):
    tokens, target = batch(step)
    return nn.functional.cross_entropy(m(tokens).reshape(-1, 13), target.reshape(-1))


def test_adamw_is_torch_adamw_on_dense_groups_and_sparse_adam_on_expert_rows():
    a, b = model(), model()
    b.load_state_dict(a.state_dict())
    ours = AdamW(a, lr=3e-3, weight_decay=0.1, expert_lr_scale=4.0)
    # The same thing built from torch's optimizers.
    gb = {g["name"]: g for g in param_groups(b, weight_decay=0.1)}
    dense = torch.optim.AdamW([{"params": gb["decay"]["params"], "weight_decay": 0.1},
                               {"params": gb["no_decay"]["params"], "weight_decay": 0.0}],
                              lr=3e-3, foreach=False)
    sparse = torch.optim.SparseAdam(gb["experts"]["params"], lr=4 * 3e-3)
    fresh = copy.deepcopy(a)
    used = set()
    for step in range(5):
        for m, opts in ((a, [ours]), (b, [dense, sparse])):
            for o in opts:
                o.zero_grad()
            loss_of(m, step).backward()
            for o in opts:
                o.step()
        used.update(a[2].experts.up.grad.coalesce().indices()[0].tolist())
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    # Lazy: expert rows no batch used are untouched.
    untouched = [r for r in range(64) if r not in used]
    assert untouched
    torch.testing.assert_close(a[2].experts.up[untouched], fresh[2].experts.up[untouched],
                               rtol=0, atol=0)


def test_lr_scale_is_multiplied_by_the_schedule_and_state_dict_resumes():
    a = model()
    opt = AdamW(a, lr=1e-2, expert_lr_scale=5.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for step in range(3):
        opt.zero_grad()
        loss_of(a, step).backward()
        opt.step()
        sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["experts"] == pytest.approx(1e-2 / 4)  # the schedule sets lr, the scale stays
    assert {g["name"]: g["lr_scale"] for g in opt.param_groups}["experts"] == 5.0

    # Resume: a copy of the model and a new optimizer loaded from state_dict
    # continue exactly as the original does.
    b = copy.deepcopy(a)
    opt_b = AdamW(b, lr=1.0, expert_lr_scale=5.0)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))  # as torch.save + torch.load
    for m, o in ((a, opt), (b, opt_b)):
        for step in range(3, 5):
            o.zero_grad()
            loss_of(m, step).backward()
            o.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_adamw_trains_bf16_tables_and_dense_expert_gradients():
    for config in (CFG + ",weight_dtype=bf16", CFG):
        m = model(1, config)
        if "bf16" not in config:
            m[2].sparse_grads = False  # dense [N, d] expert gradients: plain Adam on them
        assert m[2].experts.down.dtype == (torch.bfloat16 if "bf16" in config else torch.float32)
        opt = AdamW(m, lr=1e-2)
        losses = []
        for step in range(30):
            opt.zero_grad()
            loss = loss_of(m, step % 4)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0], (config, losses)
