"""The continual trainer: it learns, keeps old parts frozen, forces the task's router, pulls the
shared expert back, aligns the classifier, and resumes exactly where it stopped."""

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import TINY
from PIL import Image
from safetensors.torch import save_file

from care_export.checkpoint.synth import randomize_task
from care_export.cli import main
from care_export.data.builtin import BuiltinSource
from care_export.data.sources import LabelledImages, TaskSequence, eval_transform, train_transform
from care_export.model.brmoe import MASKED_LOGIT, BRMoE
from care_export.model.care_vit import CareViT
from care_export.model.config import MoEConfig
from care_export.training import task as train_mod
from care_export.training.alignment import PseudoFeatures, align_classifier, class_statistics
from care_export.training.continual import ContinualRun, resume_sequence, train_sequence
from care_export.training.evaluate import Metrics
from care_export.training.task import TaskData, TrainConfig, angular_loss, learn_task, perceptor_loss
from runtime.checkpoint_files import read_checkpoint_manifest
from runtime.errors import CareError
from runtime.preprocess import Preprocessing

PRE = Preprocessing.for_input(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
SMALL_DATA = dict(num_classes=12, train_per_class=12, test_per_class=4)
FAST = TrainConfig(epochs=2)


def task_files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


# ---------------------------------------------------------------------- learning
def test_learns_tasks_and_never_touches_old_parts(tmp_path):
    """Four tasks of five built-in classes on a random ViT: well above chance on every task
    after the last one; old task parts and the backbone bit-identical throughout; the model
    frozen after each task."""
    torch.manual_seed(0)
    model = CareViT(TINY, MoEConfig())
    source = BuiltinSource(20, train_per_class=30, test_per_class=10)
    seq = TaskSequence.build(20, 5, 5)
    run = ContinualRun(tmp_path, model, seq, source, PRE, TrainConfig(epochs=4), limit=4, weights="random")
    backbone = {k: v.clone() for k, v in model.vit.state_dict().items()}
    for task in range(4):
        old = {(t, k): v.detach().clone() for t in range(task) for k, v in model.task_parameters(t).items()}
        old_files = {n: b for n, b in task_files(tmp_path).items() if n.startswith(("task-", "class-stats-"))}
        shared = [p.detach().clone() for p in model.moe[0].shared.parameters()]
        run.learn_next(progress=False)
        assert not any(p.requires_grad for p in model.parameters()), "a task left parameters trainable"
        for t in range(task):
            for k, v in model.task_parameters(t).items():
                assert torch.equal(v, old[t, k]), f"task {t} part {k} changed while learning task {task}"
        assert {n: b for n, b in task_files(tmp_path).items() if n in old_files} == old_files
        assert not all(torch.equal(a, b) for a, b in zip(shared, model.moe[0].shared.parameters()))
    assert all(torch.equal(v, backbone[k]) for k, v in model.vit.state_dict().items())

    chance = 100 / 20
    last = run.metrics.matrix[-1]
    assert run.metrics.top1[-1] > 5 * chance, run.metrics.top1
    assert min(last) > 2 * chance, last  # no task forgotten outright
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["top1"] == run.metrics.top1 and len(saved["matrix"]) == 4
    assert saved["a_last"] == run.metrics.top1[-1]


def test_trainer_forwards_with_the_task_and_pulls_the_shared_expert_back(monkeypatch):
    """Every training forward of task 1 names task 1, and the EMA pull keeps the shared expert
    close to its snapshot: its drift is a small fraction of the drift without the pull."""
    source = BuiltinSource(6, train_per_class=16, test_per_class=1)
    seq = TaskSequence.build(6, 3, 3)
    cfg = TrainConfig(epochs=4, batch_size=4, ca_epochs=0)
    task0_stats = {"mean": torch.randn(3, TINY.embed_dim), "cov": torch.eye(TINY.embed_dim).expand(3, -1, -1).clone()}
    anchor = BRMoE.anchor_shared

    def drift(pull: bool):
        if not pull:
            monkeypatch.setattr(BRMoE, "anchor_shared", lambda self, enabled=True: anchor(self, False))
        torch.manual_seed(0)
        model = CareViT(TINY, MoEConfig())
        model.add_task(3)
        model.add_task(3)
        tasks_seen = set()
        forward_train = model.forward_train
        monkeypatch.setattr(model, "forward_train", lambda x, task: tasks_seen.add(task) or forward_train(x, task))
        start = [p.detach().clone() for m in model.moe for p in m.shared.parameters()]
        data = TaskData(
            LabelledImages(source, "train", seq.order, seq.classes(1), train_transform(PRE)),
            LabelledImages(source, "train", seq.order, seq.classes(1), eval_transform(PRE)),
            cfg,
            torch.Generator().manual_seed(0),
        )
        learn_task(model, 1, data, [task0_stats], cfg, device="cpu")
        monkeypatch.setattr(BRMoE, "anchor_shared", anchor)
        assert tasks_seen == {1}
        end = [p for m in model.moe for p in m.shared.parameters()]
        return sum(float((a.detach() - b).norm()) for a, b in zip(end, start))

    pulled, free = drift(True), drift(False)
    assert 0 < pulled < free / 10, (pulled, free)


def test_pull_formula():
    """theta <- 0.999 * snapshot + 0.001 * theta before each training forward."""
    torch.manual_seed(0)
    model = CareViT(TINY, MoEConfig())
    model.add_task(3)
    model.add_task(3)
    moe = model.moe[0]
    moe.anchor_shared(True)
    snap = [p.detach().clone() for p in moe.shared.parameters()]
    with torch.no_grad():
        for p in moe.shared.parameters():
            p.add_(1.0)
    moe.train()
    moe.forward_train(torch.randn(2, TINY.num_tokens, TINY.embed_dim), 1)
    for p, s in zip(moe.shared.parameters(), snap):
        assert torch.allclose(p, s + 0.001, atol=1e-6)


# ---------------------------------------------------------------------- the task forward
def block_input(model, x):
    z = model._embed(x)
    blk = model.vit.blocks[0]
    return z + blk.attn(blk.norm1(z))


def test_task_forward_forces_the_task_router():
    """With M=1 the task-T forward mixes experts by router T alone, even for samples whose
    lowest-entropy router (the one inference would pick) is another one."""
    torch.manual_seed(0)
    model = CareViT(TINY, MoEConfig(topk_routers=1, topk_experts=2))
    gen = torch.Generator().manual_seed(1)
    for t in range(3):
        model.add_task(4, init_from_older=False)
        randomize_task(model, t, gen)
    model.eval()
    moe, task = model.moe[0], 2
    with torch.no_grad():
        xa = block_input(model, torch.randn(16, 3, 32, 32, generator=gen))
        _, routing = moe.forward_reference(xa, want_routing=True)
        assert (routing.tasks[:, 0] != task).any(), "inference picks router T everywhere: the test proves nothing"
        out, latent = moe.forward_train(xa, task)
        outs = [moe.experts[e](xa) for e in range(task + 1)]
        logits = moe.routers[task](outs[task][:, 0])
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(2, dim=1).indices, True)
        w = torch.softmax(logits.masked_fill(~keep, MASKED_LOGIT), 1)
        expected = sum(w[:, e, None, None] * outs[e] for e in range(task + 1)) + moe.shared(xa)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(latent, moe.perceptors[task](outs[task][:, 0]), atol=1e-6)


def test_task_forward_selects_router_t_plus_lowest_entropy_others(monkeypatch):
    torch.manual_seed(0)
    model = CareViT(TINY, MoEConfig(topk_routers=2, topk_experts=3))
    gen = torch.Generator().manual_seed(2)
    for t in range(5):
        model.add_task(4, init_from_older=False)
        randomize_task(model, t, gen)
    model.eval()
    moe, task = model.moe[0], 3
    seen = []
    route = moe._route
    monkeypatch.setattr(moe, "_route", lambda *a, **k: seen.append(route(*a, **k)) or seen[-1])
    with torch.no_grad():
        xa = block_input(model, torch.randn(8, 3, 32, 32, generator=gen))
        out, _ = moe.forward_train(xa, task)
        sel = seen[0][0]  # (M, B)
        assert sel.shape == (2, 8) and (sel[-1] == task).all()
        ent = torch.stack(
            [
                -(
                    F.softmax(moe.perceptors[t](moe.experts[t](xa)[:, 0]), 1)
                    * torch.log(F.softmax(moe.perceptors[t](moe.experts[t](xa)[:, 0]), 1) + 1e-10)
                ).sum(1)
                for t in range(task)
            ]
        )
        assert torch.equal(sel[0], ent.argmin(0))
        # Experts of later tasks play no part.
        for p in moe.experts[4].parameters():
            p.add_(1.0)
        assert torch.equal(moe.forward_train(xa, task)[0], out)


# ---------------------------------------------------------------------- losses and alignment
def test_angular_loss_is_cosface():
    torch.manual_seed(0)
    cos = torch.rand(6, 5) * 2 - 1
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    for s, m in [(20.0, 0.0), (16.0, 0.35)]:
        target = s * (cos[torch.arange(6), y] - m)
        others = torch.stack([torch.cat([cos[i, : y[i]], cos[i, y[i] + 1 :]]) for i in range(6)])
        expected = -(target - torch.log(torch.exp(target) + torch.exp(s * others).sum(1))).mean()
        assert torch.allclose(angular_loss(cos, y, s, m), expected, atol=1e-5)


def test_perceptor_loss_switches_temperature_after_six_blocks():
    torch.manual_seed(0)
    latents = [torch.randn(4, 3) * 3 for _ in range(8)]
    head = torch.rand(4, 3) * 2 - 1
    y = torch.tensor([0, 2, 1, 1])
    terms = []
    for i, lat in enumerate(latents):
        tau = 1.0 if i < 6 else 2.0
        p = F.softmax(head / tau, 1)
        kl = (p * (p.log() - F.log_softmax(lat / tau, 1))).sum(1).mean()
        terms.append((F.cross_entropy(20 * lat, y) + tau**2 * kl) / 2)
    assert torch.allclose(perceptor_loss(latents, head, y, 20.0, 0.0), torch.stack(terms).mean(), atol=1e-5)


def test_class_statistics_and_alignment():
    torch.manual_seed(0)
    d, n = 16, 4
    centers = torch.eye(d)[:n] * 4
    feats = torch.cat([c + 0.3 * torch.randn(50, d) for c in centers])
    labels = torch.arange(n).repeat_interleave(50)
    stats = class_statistics(feats, labels, range(n), "covariance")
    assert torch.allclose(stats["mean"][1], feats[50:100].mean(0), atol=1e-5)
    assert torch.allclose(stats["cov"][2], torch.cov(feats[100:150].T) + 1e-4 * torch.eye(d), atol=1e-5)
    var = class_statistics(feats, labels, range(n), "variance")
    assert torch.allclose(var["var"], torch.diagonal(stats["cov"], dim1=1, dim2=2))

    from care_export.model.care_vit import CosineHead

    for method_stats in (stats, var):
        head = CosineHead(d)
        head.add_task(2)
        head.add_task(2)
        sampler = PseudoFeatures(
            [{k: v[:2] for k, v in method_stats.items()}, {k: v[2:] for k, v in method_stats.items()}], "cpu"
        )
        x, y = sampler.sample(5)
        assert x.shape == (20, d) and y.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
        acc = align_classifier(head, sampler, lr=0.05, epochs=5, per_class=40, scale=20.0, weight_decay=5e-4)
        with torch.no_grad():
            assert (head(centers).argmax(1) == torch.arange(n)).all() and acc > 90


def test_cosine_ce_gradient_equals_autograd():
    """The hand-derived gradient of the alignment loss is autograd's, to float rounding, including
    a row whose norm is below the epsilon (where the normalisation is a division by it)."""
    from care_export.model.care_vit import cosine_logits
    from care_export.training.alignment import cosine_ce_grad
    from runtime.numerics import NORM_EPS

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 16, generator=gen)
    weight[7] = 1e-14  # below NORM_EPS
    x, y = torch.randn(12, 16, generator=gen), torch.randint(0, 50, (12,), generator=gen)
    w = weight.clone().requires_grad_(True)
    logits = 20.0 * cosine_logits(x, w)
    F.cross_entropy(logits, y).backward()
    ours, grad = cosine_ce_grad(weight, F.normalize(x, dim=-1, eps=NORM_EPS), y, 20.0)
    torch.testing.assert_close(ours, logits.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, w.grad, rtol=1e-5, atol=1e-6 * float(w.grad.abs().max()))
    assert float(w.grad[7].abs().max()) > 0, "the small row has no gradient: nothing compared"


def test_alignment_trains_the_head_blocks_as_one_tensor_with_the_same_result():
    """The head trained with hand-derived gradients, and the cached Cholesky factors, give what
    autograd's SGD over the head's parameter and factoring the concatenated covariances give: the
    factors bit for bit, the head to float rounding after 21 steps."""
    from care_export.model.care_vit import CosineHead
    from care_export.training.alignment import CA_SCHEDULE_PERIOD

    torch.manual_seed(0)
    d, sizes = 8, [3, 2, 2]
    feats = torch.randn(sum(sizes) * 30, d) + torch.arange(sum(sizes)).repeat_interleave(30)[:, None] * 0.3
    labels = torch.arange(sum(sizes)).repeat_interleave(30)
    bounds = [0, 3, 5, 7]
    stats = [class_statistics(feats, labels, range(a, b), "covariance") for a, b in zip(bounds, bounds[1:])]
    sampler = PseudoFeatures(stats, "cpu")
    cov = torch.cat([s["cov"] for s in stats]).double()
    assert torch.equal(sampler.trils, torch.linalg.cholesky(cov).float())
    assert PseudoFeatures(stats, "cpu").trils.data_ptr() == sampler.trils.data_ptr()  # factored once

    def head_of(seed):
        torch.manual_seed(seed)
        h = CosineHead(d)
        for n in sizes:
            h.add_task(n)
        return h

    ours, ref = head_of(1), head_of(1)
    torch.manual_seed(2)
    align_classifier(ours, sampler, lr=0.05, epochs=3, per_class=6, scale=20.0, weight_decay=5e-4)
    torch.manual_seed(2)  # the same draws, SGD over the blocks as separate parameters
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=CA_SCHEDULE_PERIOD)
    for _ in range(3):
        x, y = sampler.sample(6)
        order = torch.randperm(len(y))
        x, y = x[order], y[order]
        for i in range(sampler.num_classes):
            loss = F.cross_entropy(20.0 * ref(x[i * 6 : (i + 1) * 6]), y[i * 6 : (i + 1) * 6])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    assert not torch.equal(ours.weight, head_of(1).weight), "alignment changed nothing: nothing compared"
    for a, b in zip(ours.blocks, ref.blocks):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def random_task_stats(gen, n, d, spread=1.0, floor=1.0):
    """Statistics of a task of ``n`` classes in ``d`` dimensions: random means, covariances
    ``A A' + floor I`` with ``A`` normal times ``spread``."""
    a = torch.randn(n, d, d, generator=gen) * spread
    return {"mean": torch.randn(n, d, generator=gen), "cov": a @ a.transpose(1, 2) + floor * torch.eye(d)}


def test_cached_factors_follow_the_statistics_they_were_factored_from():
    """The factors of a sequence's covariances live in one cached stack: a list that differs from
    it after some task (a task's statistics of its second round) gets its own factors there, an
    earlier sampler still samples from its own, the stack grows past its spare rows without
    losing any, and samples equal the per-task products of the same noise."""
    gen = torch.Generator().manual_seed(0)
    d = 6

    def task_stats(n):
        return random_task_stats(gen, n, d)

    def factors(stats):
        return torch.cat([torch.linalg.cholesky(s["cov"].double()).float() for s in stats])

    learned = [task_stats(10)] + [task_stats(3) for _ in range(4)]
    first, second = task_stats(3), task_stats(3)
    round1 = PseudoFeatures(learned + [first], "cpu")
    round2 = PseudoFeatures(learned + [second], "cpu")
    assert torch.equal(round2.trils, factors(learned + [second]))
    assert torch.equal(round1.trils, factors(learned + [first]))  # rewritten back for the earlier list
    longer = learned + [first] + [task_stats(3) for _ in range(30)]  # beyond the spare rows
    grown = PseudoFeatures(longer, "cpu")
    assert torch.equal(grown.trils, factors(longer))
    torch.manual_seed(3)
    x, y = grown.sample(4)
    torch.manual_seed(3)
    noise = torch.randn(grown.num_classes, 4, d).split([len(s["mean"]) for s in longer])
    per_task = torch.cat(
        [
            s["mean"][:, None] + n @ torch.linalg.cholesky(s["cov"].double()).float().transpose(1, 2)
            for n, s in zip(noise, longer)
        ]
    )
    torch.testing.assert_close(x, per_task.reshape(-1, d), rtol=1e-6, atol=1e-6)


def test_alignment_steps_cap_the_steps_of_an_epoch(monkeypatch):
    """``steps`` (--ca-steps) at or above the class count is the reference's schedule, bit for
    bit; below it, an epoch takes that many steps, every class drawing only the features they
    use, and the head still aligns."""
    from care_export.model.care_vit import CosineHead
    from care_export.training import alignment

    torch.manual_seed(0)
    d, n = 16, 8
    centers = torch.eye(d)[:n] * 4
    feats = torch.cat([c + 0.3 * torch.randn(50, d) for c in centers])
    labels = torch.arange(n).repeat_interleave(50)
    sampler = PseudoFeatures([class_statistics(feats, labels, range(n), "covariance")], "cpu")

    def aligned(steps, epochs=3):
        torch.manual_seed(1)
        head = CosineHead(d)
        head.add_task(n)
        torch.manual_seed(2)
        acc = align_classifier(
            head, sampler, lr=0.05, epochs=epochs, per_class=20, scale=20.0, weight_decay=5e-4, steps=steps
        )
        return head, acc

    reference, _ = aligned(None)
    for steps in (n, 50):
        assert torch.equal(aligned(steps)[0].weight, reference.weight)

    calls, draws = [], []
    step, sample = alignment.cosine_ce_grad, sampler.sample
    monkeypatch.setattr(alignment, "cosine_ce_grad", lambda *a, **k: calls.append(1) or step(*a, **k))
    monkeypatch.setattr(sampler, "sample", lambda k: draws.append(k) or sample(k))
    capped, acc = aligned(3, epochs=6)
    assert len(calls) == 3 * 6 and draws == [-(-3 * 20 // n)] * 6  # 8 per class for 3 steps of 20
    assert not torch.equal(capped.weight, reference.weight)
    with torch.no_grad():
        assert (capped(centers).argmax(1) == torch.arange(n)).all() and acc > 90
    with pytest.raises(CareError, match="--ca-steps"):
        TrainConfig(ca_steps=0)


def test_divergence_is_reported(tmp_path):
    with pytest.raises(CareError, match="diverged"):
        small_run(tmp_path / "c", 1, TrainConfig(epochs=2, lr=1e6))
    with pytest.raises(CareError, match="epochs"):
        TrainConfig(epochs=1)


# ---------------------------------------------------------------------- resume
def small_run(directory, tasks, cfg=FAST):
    return train_sequence(
        directory,
        builtin=SMALL_DATA,
        init_cls=4,
        increment=4,
        tasks=tasks,
        backbone=TINY,
        weights=None,
        cfg=cfg,
        progress=False,
    )


def test_resume_learns_the_next_task_as_an_uninterrupted_run(tmp_path):
    small_run(tmp_path / "straight", 3)
    small_run(tmp_path / "resumed", 2)
    assert len(read_checkpoint_manifest(tmp_path / "resumed")["tasks"]) == 2
    resume_sequence(tmp_path / "resumed", progress=False)
    assert task_files(tmp_path / "resumed") == task_files(tmp_path / "straight")
    with pytest.raises(CareError, match="all 3 tasks"):
        resume_sequence(tmp_path / "resumed", progress=False)


def test_eval_every_evaluates_every_nth_task_and_the_last(tmp_path, monkeypatch):
    from dataclasses import replace

    from care_export.training import continual

    calls = []
    real = continual.evaluate_recorded
    monkeypatch.setattr(
        continual,
        "evaluate_recorded",
        lambda m, records, *a, **k: calls.append(len(records)) or real(m, records, *a, **k),
    )
    run = small_run(tmp_path / "c", 2, replace(FAST, eval_every=2))
    assert calls == [2]  # task 0 skipped; task 1 is the 2nd
    metrics = Metrics.from_dict(read_checkpoint_manifest(run)["metrics"])
    assert metrics.top1[0] is None and metrics.matrix[0] == [None]
    assert metrics.top1[1] is not None and None not in metrics.matrix[1]
    assert metrics.a_bar == metrics.top1[1]  # the mean of the evaluated tasks
    resume_sequence(run, progress=False)  # the stored setting is kept; task 2 is the run's last
    assert calls == [2, 3]
    with pytest.raises(CareError, match="--eval-every"):
        TrainConfig(eval_every=0)


def test_interrupted_task_leaves_the_checkpoint_untouched(tmp_path, monkeypatch):
    ckpt = small_run(tmp_path / "c", 1)
    before = task_files(ckpt)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "align_classifier", interrupt)  # after the first round of task 1
    with pytest.raises(KeyboardInterrupt):
        resume_sequence(ckpt, progress=False)
    assert task_files(ckpt) == before
    monkeypatch.undo()
    resume_sequence(ckpt, tasks=3, progress=False)
    manifest = read_checkpoint_manifest(ckpt)
    assert len(manifest["tasks"]) == 3 and len(Metrics.from_dict(manifest["metrics"]).top1) == 3
    assert manifest["sequence"]["tasks"] == 3


def test_resume_refuses_foreign_or_mismatched_checkpoints(tmp_path):
    res = CliRunner().invoke(
        main,
        [
            "synth-ckpt",
            "-o",
            str(tmp_path / "s"),
            "--backbone",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--patch-size",
            "8",
            "--depth",
            "2",
            "--tasks",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    with pytest.raises(CareError, match="not written by care-export train"):
        resume_sequence(tmp_path / "s", progress=False)
    ckpt = small_run(tmp_path / "c", 1)
    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / "images" / c / f"{i}.png")
    with pytest.raises(CareError, match="classes differ"):
        resume_sequence(ckpt, data=tmp_path / "images", progress=False)
    with pytest.raises(CareError, match="ca-method"):
        resume_sequence(ckpt, overrides={"ca_method": "variance"}, progress=False)


# ---------------------------------------------------------------------- command line
def test_cli_train_and_resume(tmp_path):
    torch.manual_seed(0)
    import timm

    vit = timm.create_model(TINY.name, pretrained=False, **TINY.timm_kwargs())
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    ckpt = tmp_path / "ckpt"
    common = [
        "--backbone",
        "vit_tiny_patch16_224",
        "--img-size",
        "32",
        "--patch-size",
        "8",
        "--depth",
        "2",
        "--backbone-weights",
        str(tmp_path / "vit.safetensors"),
    ]
    args = [
        "train",
        "-o",
        str(ckpt),
        "--builtin-classes",
        "12",
        "--builtin-train",
        "8",
        "--builtin-test",
        "3",
        "--init-cls",
        "4",
        "--increment",
        "4",
        "--tasks",
        "2",
        "--epochs",
        "2",
        "--quiet",
        *common,
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "A-bar" in res.output and "task 1 (2/3)" in res.output
    manifest = read_checkpoint_manifest(ckpt)
    assert manifest["sequence"]["init_cls"] == 4 and len(manifest["sequence"]["class_order"]) == 12
    assert manifest["training"]["epochs"] == 2 and manifest["classes"]["names"][0].endswith(
        str(manifest["sequence"]["class_order"][0])
    )
    assert manifest["brmoe"]["topk_routers"] == 2

    res = CliRunner().invoke(main, ["train", "-o", str(ckpt), *common])
    assert res.exit_code == 1 and "already holds a checkpoint" in res.output
    res = CliRunner().invoke(main, ["train", "--resume", str(ckpt), "--init-cls", "3"])
    assert res.exit_code == 2 and "fixed by the checkpoint" in res.output
    res = CliRunner().invoke(main, ["train"])
    assert res.exit_code == 2
    res = CliRunner().invoke(main, ["train", "--resume", str(ckpt), "--quiet", "--ca-epochs", "1"])
    assert res.exit_code == 0, res.output
    manifest = read_checkpoint_manifest(ckpt)
    assert len(manifest["tasks"]) == 3 and manifest["training"]["ca_epochs"] == 1
    res = CliRunner().invoke(main, ["train", "--resume", str(ckpt)])
    assert res.exit_code == 1 and "all 3 tasks" in res.output


def test_builtin_pretraining_feeds_the_backbone_its_own_image_size(tmp_path):
    """Pre-training a backbone whose input is not 32 px on the built-in dataset (``--backbone X
    --data builtin``) renders and crops its images at that size."""
    from care_export.model.config import backbone_config
    from care_export.training.pretrain import PretrainConfig, pretrained_backbone

    backbone = backbone_config("vit_tiny_patch16_224", img_size=48, patch_size=16, depth=1)
    cfg = PretrainConfig(backbone=backbone, classes=4, images_per_class=4, epochs=1, batch_size=4)
    path = pretrained_backbone(cfg, cache_dir=tmp_path, progress=False)
    vit = CareViT(backbone, MoEConfig(), path).vit  # the weights load into a 48-px model
    assert vit.forward_features(torch.zeros(2, 3, 48, 48)).shape == (2, 10, backbone.embed_dim)


def test_alignment_with_the_head_padded_for_onednn_equals_the_plain_one(monkeypatch):
    """Where the alignment's products go to oneDNN, the head is padded with zero rows to a size
    whose kernels are reused: the padding stays out of the softmax and of the head, which ends as
    the unpadded BLAS alignment leaves it, to float rounding."""
    from care_export.model import cpu_linear
    from care_export.model.care_vit import CosineHead

    gen = torch.Generator().manual_seed(0)
    d, sizes = 16, [5, 3, 3]
    stats = [random_task_stats(gen, n, d, spread=0.1, floor=0.01) for n in sizes]
    sampler = PseudoFeatures(stats, "cpu")

    def aligned(min_macs):
        monkeypatch.setattr(cpu_linear, "ONEDNN_MIN_MACS", min_macs)
        torch.manual_seed(1)
        head = CosineHead(d)
        for n in sizes:
            head.add_task(n)
        torch.manual_seed(2)
        acc = align_classifier(head, sampler, lr=0.05, epochs=3, per_class=10, scale=20.0, weight_decay=5e-4)
        return head.weight.detach(), acc

    assert cpu_linear.padded_rows(sum(sizes), 10 * d) == sum(sizes)
    plain, acc = aligned(1 << 40)
    monkeypatch.setattr(cpu_linear, "ONEDNN_MIN_MACS", 1)
    assert cpu_linear.padded_rows(sum(sizes), 10 * d) == cpu_linear.ONEDNN_ROWS
    padded, padded_acc = aligned(1)
    assert padded.shape == plain.shape and not torch.equal(plain, CosineHead(d).weight)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-6)
    assert padded_acc == acc
