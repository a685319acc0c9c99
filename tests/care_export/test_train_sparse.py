"""The sparse training forward (``forward_train_sparse``) against the dense reference
(``forward_train``): the same loss, the same gradient of every trainable tensor, the same
shared-expert pull, for several tasks and M/K settings."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from care_export.checkpoint.synth import randomize_task
from care_export.model.care_vit import CareViT
from care_export.model.config import MoEConfig, backbone_config
from care_export.training.task import TrainConfig, set_trainable, task_loss

TINY = backbone_config("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
CLASSES = 3
REL_TOL = 1e-5


def learner(tasks, M, K, dropout=0.0, seed=0):
    """A model whose last task is being learned, every task part non-degenerate."""
    torch.manual_seed(seed)
    model = CareViT(TINY, MoEConfig(topk_routers=M, topk_experts=K, dropout=dropout))
    gen = torch.Generator().manual_seed(seed + 1)
    for t in range(tasks):
        model.add_task(CLASSES + (t == 0), init_from_older=False)  # a larger first task, as B100-Inc3
        randomize_task(model, t, gen)
    for m in model.moe:
        with torch.no_grad():
            m.shared.scale.normal_(0, 0.5, generator=gen)
    return model


def loss_and_grads(model, task, x, y, mode):
    params = set_trainable(model, task)
    for m in model.moe:
        m.anchor_shared(task > 0)
    model.train()
    loss, _ = task_loss(model.forward_train(x, task, mode=mode), y, sum(model.task_classes[:task]), TrainConfig())
    grads = torch.autograd.grad(loss, params)
    shared = [p.detach().clone() for m in model.moe for p in m.shared.parameters()]
    return loss.detach(), grads, shared


def relative_gaps(task, M, K, batch=6):
    dense = learner(task + 1, M, K)
    sparse = copy.deepcopy(dense)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    first = sum(dense.task_classes[:task])
    y = first + torch.randint(0, dense.task_classes[task], (batch,), generator=gen)
    ld, gd, sd = loss_and_grads(dense, task, x, y, "reference")
    ls, gs, ss = loss_and_grads(sparse, task, x, y, "sparse")
    assert all(torch.equal(a, b) for a, b in zip(sd, ss)), "the shared-expert pull differs"
    assert all(float(g.abs().max()) > 0 for g in gd[-4:]), "a trainable tensor has no gradient: nothing compared"
    dloss = float((ld - ls).abs() / ld.abs())
    dgrad = max(float((a - b).abs().max() / a.abs().max().clamp(min=1e-12)) for a, b in zip(gd, gs))
    return dloss, dgrad


@pytest.mark.parametrize(
    "task,M,K",
    [
        (1, 2, 3),  # one earlier router: every router selected
        (2, 2, 3),  # K >= experts (3): every existing expert of a selected router
        (2, 3, 8),  # M and K beyond what exists
        (5, 2, 3),  # top-K masking
        (5, 3, 2),
        (5, 1, 1),  # router T alone, one expert
        (40, 2, 3),
        (40, 2, 50),  # K >= experts at 41 tasks: as dense as it gets
    ],
)
def test_sparse_training_forward_equals_dense(task, M, K):
    dloss, dgrad = relative_gaps(task, M, K)
    print(f"T={task} M={M} K={K}: rel |dloss| {dloss:.2e}, max rel |dgrad| {dgrad:.2e}")
    assert dloss <= REL_TOL and dgrad <= REL_TOL, (dloss, dgrad)


def test_task_zero_and_eval_mode_features_match():
    """Task 0 (no routing), and the eval-mode features the class statistics use (dropout on in
    the config, off in eval), are the same in both forms."""
    model = learner(6, 2, 3, dropout=0.1)
    model.eval()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for task in (0, 5):
            dense = model.forward_train(x, task, mode="reference")
            sparse = model.forward_train(x, task, mode="sparse")
            torch.testing.assert_close(sparse["features"], dense["features"], rtol=1e-5, atol=1e-6)
            for a, b in zip(sparse["latents"], dense["latents"]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sparse_training_forward_draws_dropout_in_train_mode():
    """With dropout on, train mode draws masks (the output differs from eval mode's) and stays
    finite; the equality with the dense form is checked above with dropout off."""
    model = learner(4, 2, 3, dropout=0.5)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    model.train()
    with torch.no_grad():
        drawn = model.forward_train(x, 3)["features"]
        model.eval()
        plain = model.forward_train(x, 3)["features"]
    assert torch.isfinite(drawn).all() and not torch.allclose(drawn, plain)


def test_forward_train_refuses_unknown_mode():
    model = learner(1, 2, 3)
    with pytest.raises(ValueError, match="mode"):
        model.forward_train(torch.zeros(1, 3, 32, 32), 0, mode="dense")


def test_sparse_backward_is_deterministic():
    """Two identical steps give bit-identical gradients (a resumed run must repeat an
    uninterrupted one bit for bit), with every thread of the machine at work."""
    model = learner(6, 2, 3)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(16, 3, 32, 32, generator=gen)
    y = sum(model.task_classes[:5]) + torch.randint(0, model.task_classes[5], (16,), generator=gen)
    grads = [loss_and_grads(copy.deepcopy(model), 5, x, y, "sparse")[1] for _ in range(3)]
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


def test_cached_frozen_parts_follow_their_weights():
    """The sparse forward stacks frozen task parts once; changing one in place (an optimizer
    step, a load) is seen by the next forward."""
    model = learner(4, 2, 8)
    set_trainable(model, 3)
    model.eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.forward_train(x, 3, mode="sparse")  # fills the cache
        for m in model.moe:
            m.experts[0].up.weight.mul_(3.0)
            m.perceptors[1].fc.weight.mul_(-2.0)
    _forwards_agree(model, x)


def _forwards_agree(model, x, task=3):
    """The sparse forward's features are as exact as the dense form's: against the dense form
    computed in float64, no further off than the dense form in the model's own precision (times
    1.5, plus a few units of rounding of the largest feature). Two forms that round differently
    can each be that far off in opposite directions, so a fixed tolerance between them fails
    on larger outputs without either being wrong."""
    with torch.no_grad():
        sparse = model.forward_train(x, task, mode="sparse")["features"]
        dense = model.forward_train(x, task, mode="reference")["features"]
        exact = copy.deepcopy(model).double().forward_train(x.double(), task, mode="reference")["features"]
    own = float((dense.double() - exact).abs().max())
    ulps = 4 * torch.finfo(sparse.dtype).eps * float(exact.abs().max())
    assert float((sparse.double() - exact).abs().max()) <= 1.5 * own + ulps
    return sparse


def test_frozen_parts_are_stacked_without_a_second_copy():
    """The cached stack of the frozen parts holds their parameters: the parameters are views of
    it, so the cache adds no copy of the weights, only the spare rows it keeps for the tasks to
    come (at most max(8, frozen // 8) a stack)."""
    model = learner(4, 2, 8)
    set_trainable(model, 3)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    params = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    before = sum(params.values())
    _forwards_agree(model.eval(), x)
    entries = [e for m in model.moe for e in m._stack_cache.values() if "stack" in e]
    stacks = [t for e in entries for t in e["stack"].values()]
    assert len(stacks) >= 2 * len(model.moe) * 7 / 2, "no frozen part was stacked: nothing compared"
    spare = 0
    for e in entries:
        for t in e["buffer"].values():
            assert 0 <= len(t) - e["frozen"] <= max(8, e["frozen"] // 8)
            spare += (len(t) - e["frozen"]) * t[0].nbytes
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in stacks}
    held.update({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()})
    assert sum(held.values()) <= before + spare, "the stacks copy the frozen parameters"


def test_a_new_task_joins_the_stack_without_moving_the_others():
    """Learning task 4 after task 3: task 3's parts join the frozen stack in its spare rows; the
    parameters of tasks 0-2 stay where they were (views of the same storage), and the sparse
    forward is still as exact as the dense one, before and after an edit of a newly stacked part."""
    model = learner(4, 2, 8)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    set_trainable(model, 3)
    model.train()
    model.forward_train(x, 3)  # tasks 0-2 stacked, in training (where the split is read)
    first = model.moe[0].experts[0].down.weight
    model.add_task(CLASSES)
    randomize_task(model, 4, torch.Generator().manual_seed(9))
    set_trainable(model, 4)
    model.forward_train(x, 4)
    moe = model.moe[0]
    assert moe.experts[0].down.weight is first, "a stacked part was moved"
    stack = moe._stack_cache["experts"]["stack"]["down.weight"]
    assert (
        len(stack) == 4
        and moe.experts[3].down.weight.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()
    )
    model.eval()
    before = _forwards_agree(model, x, task=4)
    with torch.no_grad():
        for m in model.moe:
            m.experts[3].up.weight.mul_(-3.0)
    assert not torch.allclose(_forwards_agree(model, x, task=4), before), "the edit changed nothing: nothing compared"


def test_sparse_forward_follows_a_move_a_load_and_a_copy():
    """After the frozen parts are cached: a dtype move, a load that replaces the parameters and a
    copy changed in place each give what the dense form gives, and the copy leaves the original
    alone."""
    model = learner(4, 2, 8).eval()
    set_trainable(model, 3)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    first = _forwards_agree(model, x)
    model.double()
    _forwards_agree(model, x.double())
    model.float()
    torch.testing.assert_close(_forwards_agree(model, x), first)
    state = {k: v * 1.5 if ".experts.0." in k or ".perceptors.1." in k else v for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    loaded = _forwards_agree(model, x)
    assert not torch.allclose(loaded, first), "the load changed nothing: nothing compared"
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for m in twin.moe:
            m.experts[1].down.weight.mul_(-1.0)
    assert not torch.allclose(_forwards_agree(twin, x), loaded), "the edit changed nothing: nothing compared"
    torch.testing.assert_close(_forwards_agree(model, x), loaded, rtol=0, atol=0)


def test_a_first_forward_in_inference_mode_leaves_a_trainable_model():
    """Stacking the frozen parts during a forward under torch.inference_mode must not turn their
    parameters into inference tensors: training and an in-place load still work afterwards."""
    model = learner(4, 2, 8)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    model.requires_grad_(False).eval()
    with torch.inference_mode():
        served = model(x, mode="sparse")
    assert served.shape == (3, model.num_classes)
    assert not any(p.is_inference() for p in model.parameters())
    model.load_state_dict(model.state_dict())
    y = sum(model.task_classes[:3]) + torch.arange(3) % model.task_classes[3]
    _, grads, _ = loss_and_grads(model, 3, x, y, "sparse")
    assert all(torch.isfinite(g).all() for g in grads)


def test_entropies_from_hidden_units_equal_the_perceptors_on_expert_outputs():
    """The routing pass takes each perceptor's entropy from its expert's r hidden units alone
    (LayerNorm's statistics folded through the up projection); it equals the perceptor on the
    expert's output, also where that output is constant over its width (variance 0, as a fresh
    zero scale gives)."""
    from care_export.model.experts import entropy

    model = learner(6, 2, 3)
    moe = model.moe[0].eval()
    with torch.no_grad():
        moe.experts[2].scale.zero_()
        moe.experts[3].up.weight.zero_()
        moe.experts[3].up.bias.fill_(0.7)
        x = torch.randn(5, TINY.embed_dim, generator=torch.Generator().manual_seed(6))
        hidden, drop = moe._routing_hidden(moe._stacks(moe.experts, "experts"), x, 6)
        folded = moe._perceptor_entropies(moe._stacks(moe.experts, "experts"), hidden)
        direct = torch.stack([entropy(p(e(x))) for e, p in zip(moe.experts, moe.perceptors)])
    assert drop is None and hidden.shape == (6, 5, moe.cfg.expert_dim)
    torch.testing.assert_close(folded, direct, rtol=1e-5, atol=1e-6)
    assert folded[0].std() > 1e-3, "entropies that do not depend on the input: nothing compared"


def test_mode_and_freezing_reach_every_module_as_torch_does():
    """CareViT's flat train() and requires_grad_() set what nn.Module's set, on every module and
    parameter; a submodule with its own train() gets the call."""

    class OwnRule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Dropout(0.5)
            self.seen = None

        def train(self, mode=True):
            self.seen = mode
            return super().train(mode)

    model = learner(3, 2, 3, dropout=0.1)
    model.moe[1].extra = OwnRule()
    for mode in (False, True, False):
        assert model.train(mode) is model
        assert all(m.training is mode for m in model.modules()) and model.moe[1].extra.seen is mode
    for flag in (True, False, True):
        model.requires_grad_(flag)
        assert all(p.requires_grad is flag for p in model.parameters())
    with pytest.raises(ValueError):
        model.train("yes")


def test_mode_and_freezing_follow_modules_added_or_replaced_after_a_walk():
    """The flat walk is cached; a task added, a submodule or a parameter replaced, or a copy of the
    model, is still reached by the next train() or requires_grad_() (never the original's modules
    by the copy's calls)."""
    model = learner(3, 2, 3, dropout=0.1)
    model.train(True).requires_grad_(True)
    model.add_task(2)
    model.moe[0].experts[1].down = torch.nn.Linear(model.moe[0].dim, 4)
    model.moe[1].routers[0].weight = torch.nn.Parameter(torch.zeros_like(model.moe[1].routers[0].weight))
    model.eval().requires_grad_(False)
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    twin = copy.deepcopy(model)
    twin.train(True).requires_grad_(True)
    assert all(m.training for m in twin.modules()) and all(p.requires_grad for p in twin.parameters())
    assert not any(m.training for m in model.modules()) and not any(p.requires_grad for p in model.parameters())


def test_a_cached_walk_keeps_no_replaced_parameter_or_module_alive():
    """A parameter or submodule replaced after train() and requires_grad_() walked the model is
    freed: the cached walks hold no reference to it (a frozen stack replaces every frozen
    expert's parameters, and a kept list held a second copy of them)."""
    model = learner(3, 2, 3, dropout=0.1)
    model.train(True).requires_grad_(False)
    router, expert = model.moe[1].routers[0], model.moe[0].experts[1]
    gone = [weakref.ref(router.weight), weakref.ref(expert.down), weakref.ref(expert.down.weight)]
    router.weight = torch.nn.Parameter(torch.zeros_like(router.weight))
    expert.down = torch.nn.Linear(model.moe[0].dim, 4)
    gc.collect()
    assert [ref() for ref in gone] == [None, None, None]
    model.eval().requires_grad_(True)  # the walks see the new ones
    assert not expert.down.training and expert.down.weight.requires_grad and router.weight.requires_grad


def test_a_new_expert_starts_as_the_mean_of_the_older_ones_from_the_stack_or_not():
    """A new task's expert is the mean of every earlier expert but the latest, whether those are
    read from the frozen stack a training forward left (rows of it) or stacked anew."""
    for stacked_first in (True, False):
        model = learner(5, 2, 3)
        if stacked_first:
            set_trainable(model, 4)
            with torch.no_grad():
                model.train().forward_train(torch.zeros(1, 3, TINY.img_size, TINY.img_size), 4)
            model.requires_grad_(False)
            assert model.moe[0]._stack_cache["experts"]["frozen"] == 4
        model.add_task(CLASSES)
        for m in model.moe:
            for name, p in m.experts[5].named_parameters():
                older = torch.stack([dict(e.named_parameters())[name] for e in list(m.experts)[:4]])
                assert torch.equal(p, older.mean(0)), name


def test_the_head_is_one_tensor_with_a_state_entry_per_task():
    """The cosine head's blocks are rows of one parameter; its state dict has one entry per task,
    loads them back, and names missing, unexpected and mis-shaped entries."""
    from care_export.model.care_vit import CosineHead

    head = CosineHead(8)
    for n in (3, 2, 4):
        head.add_task(n)
    assert [len(b) for b in head.blocks] == [3, 2, 4] and head.weight.shape == (9, 8)
    assert all(b.untyped_storage().data_ptr() == head.weight.untyped_storage().data_ptr() for b in head.blocks)
    state = head.state_dict()
    assert list(state) == ["blocks.0", "blocks.1", "blocks.2"]
    assert torch.equal(torch.cat(list(state.values())), head.weight)
    other = CosineHead(8)
    for n in (3, 2, 4):
        other.add_task(n)
    other.load_state_dict(state)
    assert torch.equal(other.weight, head.weight)
    result = other.load_state_dict({"blocks.0": state["blocks.0"], "blocks.9": state["blocks.1"]}, strict=False)
    assert result.missing_keys == ["blocks.1", "blocks.2"] and result.unexpected_keys == ["blocks.9"]
    with pytest.raises(RuntimeError, match="blocks.1"):
        other.load_state_dict({**state, "blocks.1": torch.zeros(5, 8)})


def test_cpu_linear_equals_torch_and_keeps_autograd():
    """oneDNN's product, where taken, equals torch's to float rounding, with and without bias, on
    strided inputs; under autograd and for small products it is torch's own."""
    from care_export.model import cpu_linear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2 * 192, generator=gen)[:, ::2]  # strided rows, as a CLS token is
    w, b = torch.randn(4800, 192, generator=gen), torch.randn(4800, generator=gen)
    assert 16 * 4800 * 192 >= cpu_linear.ONEDNN_MIN_MACS
    torch.testing.assert_close(cpu_linear.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu_linear.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    wg = w.clone().requires_grad_(True)
    cpu_linear.linear(x, wg, b).sum().backward()
    torch.testing.assert_close(wg.grad, x.sum(0).expand_as(w))
    small = torch.randn(2, 3, generator=gen)
    assert torch.equal(cpu_linear.linear(small, small), F.linear(small, small))


def _grad_fns(y: torch.Tensor) -> set[str]:
    """The names of ``y``'s grad_fn and of the nodes it calls."""
    fns = [y.grad_fn, *(f for f, _ in y.grad_fn.next_functions if f is not None)]
    return {type(f).__name__ for f in fns}


def test_cpu_linear_frozen_weight_gives_the_input_its_gradient_through_onednn():
    """A frozen weight under autograd (the backbone in training): oneDNN's forward and input
    gradient, equal to torch's to float rounding, on a 3-D strided input; under autocast and with
    a trained weight or bias, torch's product."""
    from care_export.model import cpu_linear

    if not cpu_linear.ONEDNN_AVAILABLE:
        pytest.skip("this PyTorch has no oneDNN linear operator")
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(384, 192, generator=gen), torch.randn(384, generator=gen)
    base = torch.randn(4, 40, 2 * 192, generator=gen)[..., ::2]
    g = torch.randn(4, 40, 384, generator=gen)
    x1, x2 = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    y = cpu_linear.linear(x1, w, b)
    assert "_FrozenWeightBackward" in _grad_fns(y)
    y.backward(g)
    ref = F.linear(x2, w, b)
    ref.backward(g)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # train --amp: autocast's bfloat16 product
        assert cpu_linear.linear(x1, w, b).dtype == F.linear(x2, w, b).dtype == torch.bfloat16
    for trained in ("weight", "bias"):
        wt, bt = w.clone().requires_grad_(trained == "weight"), b.clone().requires_grad_(trained == "bias")
        y = cpu_linear.linear(base, wt, bt)
        assert "_FrozenWeightBackward" not in _grad_fns(y)
        y.backward(g)
        assert (wt if trained == "weight" else bt).grad is not None


def test_backbone_linears_go_through_cpu_linear_with_the_same_state(monkeypatch):
    """The backbone's linear layers multiply through cpu_linear (oneDNN at the built-in ViT's
    training batch) where autograd records, with timm's state dict and timm's outputs and input
    gradient to float rounding; without autograd they are timm's product, bit for bit."""
    import timm

    from care_export.model import cpu_linear
    from care_export.model.care_vit import build_backbone
    from care_export.training.pretrain import BUILTIN_BACKBONE

    cfg = BUILTIN_BACKBONE
    vit = build_backbone(cfg)
    linears = [m for m in vit.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is cpu_linear.Linear for m in linears)
    assert list(vit.state_dict()) == list(timm.create_model(cfg.name, **cfg.timm_kwargs()).state_dict())
    calls = []
    monkeypatch.setattr(cpu_linear, "_onednn", lambda *a: calls.append(1) or F.linear(*a))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, cfg.img_size, cfg.img_size, generator=gen)
    # A random upstream gradient: that of a sum over the final LayerNorm's output is zero but for rounding.
    upstream = torch.randn(16, cfg.num_tokens, cfg.embed_dim, generator=gen)
    vit.forward_features(x)  # autograd on, no input gradient (the first block in training): oneDNN
    assert len(calls) == (len(linears) if cpu_linear.ONEDNN_AVAILABLE else 0)
    calls.clear()
    runs = []
    for swap in (False, True):
        if swap:
            for m in linears:
                m.__class__ = torch.nn.Linear
        with torch.no_grad():
            plain = vit.forward_features(x)
        tokens = vit._pos_embed(vit.patch_embed(x)).requires_grad_(True)
        out = vit.norm(vit.blocks(tokens))
        out.backward(upstream)
        runs.append((plain, out.detach(), tokens.grad))
    # The training forward and its backward only, each layer once.
    assert len(calls) == (2 * len(linears) if cpu_linear.ONEDNN_AVAILABLE else 0)
    (ours_plain, ours, ours_grad), (timm_plain, theirs, theirs_grad) = runs
    assert torch.equal(ours_plain, timm_plain)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-5, atol=1e-4)
