"""Routing semantics of the single-pass inference forward (docs/MODEL.md, "Single-pass inference"), checked
against the per-sample loop in ``refmath`` on models imported from reference-layout weights."""

import pytest
import refmath
import torch

from care_export.checkpoint.official import convert_state_dict

DIM, DEPTH = 32, 2


def build(task_classes, M=2, K=3, seed=0):
    sd = refmath.make_reference_state(dim=DIM, depth=DEPTH, task_classes=task_classes, seed=seed)
    model = convert_state_dict(sd, topk_routers=M, topk_experts=K, num_heads=2)
    return sd, model


def block_inputs(n=24, seed=1):
    return torch.randn(n, 5, DIM, generator=torch.Generator().manual_seed(seed)) * 2


def routing_as_sets(r, b):
    tasks = tuple(r.tasks[b].tolist())
    kept = {t: tuple(e for e in r.experts[b, j].tolist() if e >= 0) for j, t in enumerate(tasks)}
    return tasks, kept


@pytest.mark.parametrize(
    "task_classes,M,K",
    [
        ((10,), 2, 3),  # T = 1: expert 0 plus the shared expert
        ((10, 10), 2, 3),  # T = 2 < M: every router
        ((10, 10, 10), 2, 5),  # T < K: every existing expert of a selected router
        ((10, 10, 10, 10, 10), 2, 3),  # K < T: top-K masking
        ((10, 10, 10, 10, 10, 10), 3, 2),
        ((10, 10, 10, 10), 1, 1),
        ((100, 3, 3, 3, 3), 2, 3),  # B100-Inc3 shapes: a larger first task
    ],
)
def test_block_matches_per_sample_loop(task_classes, M, K):
    sd, model = build(task_classes, M, K)
    x = block_inputs()
    for i, moe in enumerate(model.moe):
        want, want_routing = refmath.brmoe(sd, i, x, M, K)
        with torch.no_grad():
            got, r = moe.forward_reference(x, want_routing=True)
            fast, rf = moe.forward_sparse(x, want_routing=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast, want, atol=1e-5, rtol=1e-5)
        for b in range(x.shape[0]):
            assert routing_as_sets(r, b) == want_routing[b]
            assert routing_as_sets(rf, b) == want_routing[b]


def test_selection_varies_and_takes_lowest_entropy():
    """The routers chosen differ across samples, and are the M of lowest perceptor entropy."""
    sd, model = build((10, 10, 10, 10, 10, 10), M=2, K=3)
    x = block_inputs(64)
    moe = model.moe[0]
    with torch.no_grad():
        _, r = moe.forward_reference(x, want_routing=True)
        cls = [e(x)[:, 0] for e in moe.experts]
        ent = torch.stack(
            [
                -(p * torch.log(p + 1e-10)).sum(-1)
                for p in (torch.softmax(per(c), -1) for per, c in zip(moe.perceptors, cls))
            ],
            1,
        )
    assert len({tuple(t) for t in r.tasks.tolist()}) > 3
    for b in range(x.shape[0]):
        want = sorted(ent[b].argsort()[:2].tolist())
        assert r.tasks[b].tolist() == want


def test_masked_experts_get_zero_weight():
    """Experts a router cannot see (e > t) or does not keep (outside its top-K) contribute
    nothing, even when their outputs are huge."""
    import copy

    sd, model = build((10, 10, 10, 10, 10), M=1, K=2)
    x = block_inputs(8)
    for b in range(x.shape[0]):
        moe = copy.deepcopy(model.moe[0])
        xb = x[b : b + 1]
        with torch.no_grad():
            before, r = moe.forward_reference(xb, want_routing=True)
            used = {e for e in r.experts.flatten().tolist() if e >= 0}
            # Router t reads expert t's CLS output, so expert t stays as it is.
            unused = [e for e in range(5) if e not in used and e not in r.tasks.flatten().tolist()]
            assert len(used) <= 2 and unused
            for e in unused:
                moe.experts[e].scale.mul_(1e6)
            after, r2 = moe.forward_reference(xb, want_routing=True)
        assert torch.equal(r.tasks, r2.tasks)
        torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_router_sees_only_earlier_experts():
    """With T <= K nothing is masked by top-K, yet router t still weighs only experts 0..t."""
    sd, model = build((10, 10, 10), M=1, K=3)
    moe = model.moe[1]
    x = block_inputs(32)
    with torch.no_grad():
        _, r = moe.forward_reference(x, want_routing=True)
    for b in range(x.shape[0]):
        t = r.tasks[b, 0].item()
        assert [e for e in r.experts[b, 0].tolist() if e >= 0] == list(range(t + 1))


def test_whole_network_matches_reference_math():
    sd, model = build((100, 3, 3, 3), M=2, K=3)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    want, _ = refmath.forward(sd, images, M=2, K=3, heads=2)
    with torch.no_grad():
        torch.testing.assert_close(model(images), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(images, mode="sparse"), want, atol=1e-5, rtol=1e-5)


def test_training_forward_forces_current_router():
    sd, model = build((10, 10, 10, 10, 10), M=2, K=3)
    moe = model.moe[0]
    x = block_inputs(16)
    calls = []
    original = moe._route

    def spy(ent, logits, forced):
        out = original(ent, logits, forced)
        calls.append((ent.shape[0], forced, out[0]))
        return out

    moe._route = spy
    with torch.no_grad():
        out, latent = moe.forward_train(x, task=3)
    cand, forced, sel = calls[0]
    assert cand == 3 and forced == 3  # candidates are tasks 0..2, router 3 always selected
    assert (sel[-1] == 3).all() and (sel[:-1] < 3).all()
    assert latent.shape == (16, 10)
