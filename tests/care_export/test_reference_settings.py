"""The reference's own settings: alignment mean decay, loss switches, mixed precision, its
configuration files and presets, its checkpoint wrappers, its class order, CIFAR-100 files and
the iterative prediction."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import refmath
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import ROOT

from care_export.checkpoint.format import load_checkpoint
from care_export.checkpoint.synth import synth_model
from care_export.cli import main
from care_export.data import INPUT_SETS
from care_export.data.builtin import BuiltinSource
from care_export.data.cifar import Cifar100Source
from care_export.data.sources import LabelledImages, TaskSequence, open_source, train_transform
from care_export.model.care_vit import CareViT
from care_export.model.config import MoEConfig, backbone_config
from care_export.model.iterative import iterative_scores, prediction_scores
from care_export.training import task as train_mod
from care_export.training.alignment import PseudoFeatures, reference_mean_decay
from care_export.training.continual import REFERENCE_BACKBONE, ContinualRun, default_backbone
from care_export.training.reference_config import PRESET_DIR, load_config, load_preset, parse, preset_names
from care_export.training.task import TaskData, TrainConfig, learn_task, perceptor_loss
from runtime.checkpoint_files import read_checkpoint_manifest
from runtime.errors import CareError
from runtime.preprocess import Preprocessing

TINY = backbone_config("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
PRE = Preprocessing.for_input(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
SHARED_CONFIGS = ROOT.parent / "shared" / "reference-configs"


# ---------------------------------------------------------------------- 3. alignment mean decay
def test_reference_mean_decay_matches_hand_computed_multipliers():
    # B100-Inc3 after task 1: task_size = 100 - 103 = -3; t_id = c // -3 (floor).
    m = reference_mean_decay(100, 103, 1)
    assert m.dtype == torch.float64 and m.shape == (103,)
    # c=0: t_id 0 -> 0.9 + 1/2*0.1; c=1..3: t_id -1 -> 0.9; c=4: -2 -> 0.85; c=102: -34 -> 0.9 - 33/2*0.1
    for c, want in [(0, 0.95), (1, 0.9), (3, 0.9), (4, 0.85), (6, 0.85), (7, 0.8), (102, -0.75)]:
        assert m[c].item() == pytest.approx(want, abs=1e-12), c
    # Ten classes a task after task 2: t_id of c=0 is 0, of 1..10 is -1, of 11..20 is -2, of 21..29 is -3.
    m = reference_mean_decay(20, 30, 2)
    want = [0.9 + 1 / 30] + [0.9] * 10 + [0.9 - 1 / 30] * 10 + [0.9 - 2 / 30] * 9
    assert m.tolist() == pytest.approx(want, abs=1e-12)


def test_pseudo_features_sample_around_the_scaled_means():
    mean = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    stats = [{"mean": mean, "var": torch.full((3, 2), 1e-8)}]
    scale = torch.tensor([0.95, 0.9, -0.75], dtype=torch.float64)
    x, y = PseudoFeatures(stats, "cpu", mean_scale=scale).sample(4)
    for c in range(3):
        torch.testing.assert_close(x[y == c].mean(0), mean[c] * float(scale[c]), atol=1e-3, rtol=0)


def test_align_decay_reference_feeds_the_multipliers_to_alignment(monkeypatch):
    seen = []

    class Recording(PseudoFeatures):
        def __init__(self, stats, device, mean_scale=None):
            seen.append(mean_scale)
            super().__init__(stats, device, mean_scale)

    monkeypatch.setattr(train_mod, "PseudoFeatures", Recording)
    torch.manual_seed(0)
    model = CareViT(TINY, MoEConfig())
    source = BuiltinSource(6, train_per_class=4, test_per_class=1, image_size=32)
    seq = TaskSequence.build(6, 4, 2)
    d = TINY.embed_dim
    stats0 = {"mean": torch.randn(4, d), "var": torch.ones(4, d)}
    model.add_task(4)
    model.add_task(2)
    for decay, want in (("off", None), ("reference", reference_mean_decay(4, 6, 1))):
        seen.clear()
        cfg = TrainConfig(epochs=2, batch_size=4, ca_epochs=1, ca_method="variance", align_decay=decay)
        images = LabelledImages(source, "train", seq.order, seq.classes(1), train_transform(PRE))
        learn_task(
            model, 1, TaskData(images, images, cfg, torch.Generator().manual_seed(0)), [stats0], cfg, device="cpu"
        )
        assert len(seen) == 2  # one alignment after each round
        for s in seen:
            assert (s is None) if want is None else torch.equal(s, want)


# ---------------------------------------------------------------------- 2. loss switches
def test_perceptor_loss_switches():
    torch.manual_seed(0)
    latents = [torch.randn(5, 4) for _ in range(8)]
    head, target = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    plain = perceptor_loss(latents, head, target, 20.0, 0.3, cos_loss=False, self_dist=False)
    torch.testing.assert_close(plain, torch.stack([F.cross_entropy(lat, target) for lat in latents]).mean())
    cos_only = perceptor_loss(latents, head, target, 20.0, 0.3, self_dist=False)
    want = torch.stack([train_mod.angular_loss(lat, target, 20.0, 0.3) for lat in latents]).mean()
    torch.testing.assert_close(cos_only, want)
    assert not torch.allclose(perceptor_loss(latents, head, target, 20.0, 0.3), cos_only)


# ---------------------------------------------------------------------- 4. mixed precision
def test_amp_runs_the_training_forward_in_bfloat16_on_cpu_and_statistics_in_float32(monkeypatch):
    torch.manual_seed(0)
    model = CareViT(TINY, MoEConfig())
    model.add_task(3)
    calls = []
    forward_train = model.forward_train

    def recording(x, task):
        out = forward_train(x, task)
        calls.append((model.training, torch.is_autocast_enabled("cpu"), out["logits"].dtype))
        return out

    monkeypatch.setattr(model, "forward_train", recording)
    source = BuiltinSource(3, train_per_class=4, test_per_class=1, image_size=32)
    seq = TaskSequence.build(3, 3, 3)
    images = LabelledImages(source, "train", seq.order, seq.classes(0), train_transform(PRE))
    cfg = TrainConfig(epochs=2, batch_size=4, amp=True)
    before = model.head.weight.detach().clone()
    stats = learn_task(model, 0, TaskData(images, images, cfg, torch.Generator().manual_seed(0)), [], cfg, device="cpu")
    train_calls = [c for c in calls if c[0]]
    stat_calls = [c for c in calls if not c[0]]
    assert train_calls and all(c[1] and c[2] == torch.bfloat16 for c in train_calls)
    assert stat_calls and all(not c[1] and c[2] == torch.float32 for c in stat_calls)
    assert stats["mean"].dtype == torch.float32 and model.head.weight.dtype == torch.float32
    assert not torch.equal(before, model.head.weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_amp_on_cuda_uses_float16_and_a_gradient_scaler(monkeypatch):
    scales = []
    real_step = torch.amp.GradScaler.step
    monkeypatch.setattr(
        torch.amp.GradScaler, "step", lambda self, opt: scales.append(self.is_enabled()) or real_step(self, opt)
    )
    torch.manual_seed(0)
    model = CareViT(TINY, MoEConfig()).cuda()
    model.add_task(3)
    source = BuiltinSource(3, train_per_class=4, test_per_class=1, image_size=32)
    seq = TaskSequence.build(3, 3, 3)
    images = LabelledImages(source, "train", seq.order, seq.classes(0), train_transform(PRE))
    cfg = TrainConfig(epochs=2, batch_size=4, amp=True)
    with torch.autocast("cuda", dtype=torch.float16):
        assert model.forward_train(images[0][0][None].cuda(), 0)["logits"].dtype == torch.float16
    stats = learn_task(
        model, 0, TaskData(images, images, cfg, torch.Generator().manual_seed(0)), [], cfg, device=torch.device("cuda")
    )
    assert scales and all(scales) and stats["mean"].dtype == torch.float32


# ---------------------------------------------------------------------- 2. configuration files and presets
def test_every_reference_configuration_is_a_preset_with_its_values():
    names = preset_names()
    assert len(names) == 16 and "ob1k_b100inc3" in names
    for name in names:
        raw = json.loads((PRESET_DIR / f"{name}.json").read_text())
        o = load_preset(name).options
        assert (o["init_cls"], o["increment"], o["seed"]) == (raw["init_cls"], raw["increment"], raw["seed"][0])
        assert (o["epochs"], o["lr"], o["batch_size"], o["weight_decay"], o["min_lr"]) == (
            raw["tuned_epoch"],
            raw["init_lr"],
            raw["batch_size"],
            raw["weight_decay"],
            raw["min_lr"],
        )
        assert (o["ca_epochs"], o["ca_lr"], o["ca_method"]) == (
            raw["crct_epochs"],
            raw["ca_lr"],
            raw["ca_storage_efficient_method"],
        )
        assert o["align_decay"] == ("reference" if raw["decay"] else "off")
        assert (o["scale"], o["margin"], o["amp"]) == (raw["scale"], raw["m"], raw["amp"])
        assert (o["expert_dim"], o["shared_dim"], o["topk_experts"], o["topk_routers"]) == (
            raw["expert_dim"],
            raw["adapter_dim"],
            raw["topk_experts"],
            raw["topk_routers"],
        )
        assert o["eval_mode"] == ("iterative" if raw.get("iter_pred", True) else "single")
        assert (o["aux_cos_loss"], o["self_dist_loss"]) == (
            raw.get("aux_cos_loss", True),
            raw.get("self_dist_loss", True),
        )
        assert o["backbone"] == REFERENCE_BACKBONE
        half = raw["dataset"] in ("cifar224", "imageneta", "vtab")
        assert o["mean"] == ((0.5,) * 3 if half else (0.0,) * 3) and o["std"] == ((0.5,) * 3 if half else (1.0,) * 3)
    ob1k = load_preset("ob1k_b100inc3").options
    assert (ob1k["init_cls"], ob1k["increment"], ob1k["amp"], ob1k["eval_mode"]) == (100, 3, True, "single")
    ina = load_preset("ina_inc20").options
    assert (ina["margin"], ina["aux_cos_loss"], ina["self_dist_loss"], ina["input_set"]) == (
        0.3,
        False,
        False,
        "imageneta",
    )


@pytest.mark.skipif(not SHARED_CONFIGS.is_dir(), reason="the reference's configuration files are not beside the clone")
def test_presets_equal_the_reference_files():
    files = sorted(SHARED_CONFIGS.glob("*/*.json"))
    assert len(files) == len(preset_names())
    for f in files:
        name = f.stem.removeprefix("care_")
        assert json.loads(f.read_text()) == json.loads((PRESET_DIR / f"{name}.json").read_text()), f
        assert load_config(f).options == load_preset(name).options


def test_unknown_and_unsupported_keys_are_named_in_one_line(tmp_path):
    raw = json.loads((PRESET_DIR / "cifar_inc10.json").read_text())
    raw.update(foo=1, bar=2, optimizer="adam")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    res = CliRunner().invoke(main, ["train", "-o", str(tmp_path / "ckpt"), "--config", str(path)])
    assert res.exit_code == 1
    line = res.output.strip()
    assert "\n" not in line and "unknown keys bar, foo" in line and "optimizer='adam'" in line, line
    with pytest.raises(CareError, match="missing keys init_cls"):
        parse({"dataset": "cifar224", "increment": 10}, "x")
    res = CliRunner().invoke(main, ["train", "-o", str(tmp_path / "ckpt"), "--preset", "nope"])
    assert res.exit_code == 1 and "unknown preset 'nope'" in res.output


def test_config_gives_defaults_and_options_override(tmp_path, monkeypatch):
    from care_export.training import continual

    got = {}
    monkeypatch.setattr(continual, "train_sequence", lambda out, **kw: got.update(kw) or out)
    monkeypatch.setattr(
        "runtime.checkpoint_files.read_checkpoint_manifest", lambda d: {"metrics": {"top1": [1.0], "matrix": [[1.0]]}}
    )
    res = CliRunner().invoke(
        main,
        [
            "train",
            "-o",
            str(tmp_path / "c"),
            "--data",
            "builtin",
            "--preset",
            "ina_inc20",
            "--epochs",
            "4",
            "-M",
            "1",
            "--backbone",
            "vit_tiny_patch16_224",
        ],
    )
    assert res.exit_code == 0, res.output
    cfg = got["cfg"]
    assert cfg.epochs == 4 and cfg.lr == 0.01 and cfg.batch_size == 16 and cfg.ca_epochs == 10
    assert (cfg.margin, cfg.aux_cos_loss, cfg.self_dist_loss, cfg.align_decay) == (0.3, False, False, "reference")
    assert (cfg.eval_mode, cfg.input_set, cfg.ca_method) == ("iterative", "imageneta", "variance")
    assert got["moe"].topk_routers == 1 and got["moe"].topk_experts == 3
    assert (got["init_cls"], got["increment"], got["seed"]) == (20, 20, 1993)
    assert got["preprocessing"].mean == (0.5,) * 3
    res = CliRunner().invoke(
        main,
        ["train", "-o", str(tmp_path / "c"), "--preset", "ina_inc20", "--config", str(PRESET_DIR / "ina_inc20.json")],
    )
    assert res.exit_code == 2 and "not both" in res.output


@pytest.mark.parametrize("input_set", INPUT_SETS)
def test_input_sets_give_normalised_tensors_of_the_input_size(input_set):
    from PIL import Image

    img = Image.fromarray(np.full((40, 50, 3), 128, np.uint8))
    x = train_transform(PRE, input_set=input_set)(img)
    assert x.shape == (3, 32, 32)
    # mid-grey normalised with mean = std = 0.5 is about 0; brightness jitter (0.75..1.25) keeps it within 0.26
    assert x.abs().max().item() < 0.27


# ---------------------------------------------------------------------- 5. checkpoints and sources
@pytest.mark.parametrize("form", ["save_checkpoint", "data_parallel", "data_parallel_backbone"])
def test_reference_checkpoint_wrappers_import_like_the_bare_state(tmp_path, form):
    sd = refmath.make_reference_state(dim=32, depth=2, task_classes=(20, 3, 3), seed=5)
    if form == "save_checkpoint":
        obj = {"tasks": 2, "model_state_dict": sd}
    elif form == "data_parallel":
        obj = {f"module.{k}": v for k, v in sd.items()}
    else:  # DataParallel around the backbone only
        obj = {k.replace("backbone.", "backbone.module.", 1): v for k, v in sd.items()}
    torch.save(obj, tmp_path / "care.pkl")
    torch.save(sd, tmp_path / "bare.pth")
    for name, src in (("a", "care.pkl"), ("b", "bare.pth")):
        res = CliRunner().invoke(
            main, ["import-official", str(tmp_path / src), "-o", str(tmp_path / name), "--num-heads", "2"]
        )
        assert res.exit_code == 0, res.output
    a, _ = load_checkpoint(tmp_path / "a")
    b, _ = load_checkpoint(tmp_path / "b")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_import_official_preset_sets_m_k_input_and_the_reference_class_order(tmp_path):
    sd = refmath.make_reference_state(dim=32, depth=2, task_classes=(4, 2), seed=5)
    torch.save(sd, tmp_path / "care.pth")
    names = [f"class{i:02d}" for i in range(10)]
    (tmp_path / "names.txt").write_text("\n".join(names))
    res = CliRunner().invoke(
        main,
        [
            "import-official",
            str(tmp_path / "care.pth"),
            "-o",
            str(tmp_path / "ckpt"),
            "--num-heads",
            "2",
            "--preset",
            "ina_inc20",
            "-K",
            "2",
            "--class-names",
            str(tmp_path / "names.txt"),
        ],
    )
    assert res.exit_code == 0, res.output
    m = read_checkpoint_manifest(tmp_path / "ckpt")
    assert (m["brmoe"]["topk_routers"], m["brmoe"]["topk_experts"]) == (2, 2)
    assert m["preprocessing"]["mean"] == [0.5] * 3 and m["preprocessing"]["std"] == [0.5] * 3
    order = np.random.RandomState(1993).permutation(10).tolist()  # the reference's np.random.seed + permutation
    assert m["classes"]["names"] == [names[c] for c in order[:6]]
    assert m["reference_class_order"] == {"seed": 1993, "order": order}


def test_hub_weights_default_to_the_reference_backbone():
    assert default_backbone("hub").name == "vit_base_patch16_224.augreg_in21k"
    assert default_backbone("file.safetensors").name == "vit_base_patch16_224"


def _write_cifar(folder: Path, classes=5, per_class=(4, 2)):
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(classes)], b"coarse_label_names": [b"x"]}
    pickle.dump(meta, open(folder / "meta", "wb"))
    for split, n in zip(("train", "test"), per_class):
        labels = [c for c in range(classes) for _ in range(n)]
        data = rng.randint(0, 256, (len(labels), 3072)).astype(np.uint8)
        pickle.dump(
            {b"data": data, b"fine_labels": labels, b"filenames": [b"f"] * len(labels)}, open(folder / split, "wb")
        )
    return data


def test_cifar100_python_files_are_a_source(tmp_path):
    test_data = _write_cifar(tmp_path / "cifar-100-python")
    source = open_source(tmp_path)
    assert isinstance(source, Cifar100Source)
    assert source.class_names == [f"c{i}" for i in range(5)] and source.describe()["kind"] == "cifar100"
    assert len(source.samples("train", [1, 3])) == 8
    item, label = source.samples("test", [4])[1]
    img = np.asarray(source.load("test", item))
    assert label == 4 and img.shape == (32, 32, 3)
    assert np.array_equal(img, test_data[item].reshape(3, 32, 32).transpose(1, 2, 0))  # channel-major rows
    seq = TaskSequence.build(5, 3, 2)
    images = LabelledImages(source, "train", seq.order, seq.classes(0), train_transform(PRE, input_set="cifar224"))
    assert len(images) == 12 and images[0][0].shape == (3, 32, 32)
    (tmp_path / "bad").mkdir()
    for f in ("train", "test", "meta"):
        (tmp_path / "bad" / f).write_bytes(b"nope")
    with pytest.raises(CareError, match="not a CIFAR-100 python-pickle file"):
        open_source(tmp_path / "bad")


# ---------------------------------------------------------------------- 1. iterative prediction
def _per_sample_iterative(model, x, scale):
    """The reference's _eval_cnn written sample by sample."""
    out = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        best, best_h = None, None
        for i in range(model.num_tasks):
            logits = model.forward_train(xb, i)["logits"][0] * scale
            p = torch.softmax(logits, 0)
            h = -(p * torch.log(p + 1e-10)).sum()
            if best_h is None or h < best_h:
                best, best_h = p, h
        out.append(torch.softmax(model(xb)[0] * scale, 0) + best)
    return torch.stack(out)


def test_iterative_scores_follow_the_reference_evaluation(monkeypatch):
    model = synth_model(TINY, MoEConfig(2, 2), [4, 3, 3, 2], seed=3).eval()
    reference = model(torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = iterative_scores(model, x, 20.0)
        torch.testing.assert_close(got, _per_sample_iterative(model, x, 20.0), atol=1e-5, rtol=1e-5)
        assert got.shape == (6, 12) and torch.allclose(got.sum(1), torch.full((6,), 2.0))
        from care_export.model.brmoe import BRMoE

        def dense(*a, **k):
            raise AssertionError("evaluation ran the reference form, every expert over every token")

        monkeypatch.setattr(BRMoE, "forward_reference", dense)  # the sparse single pass
        single = prediction_scores(model, x, "single")
        torch.testing.assert_close(single, reference)
        monkeypatch.undo()
        one = synth_model(TINY, MoEConfig(2, 2), [4], seed=3).eval()
        torch.testing.assert_close(prediction_scores(one, x, "iterative"), one(x))  # task 0: single pass


def test_training_evaluates_with_the_configured_mode(tmp_path, monkeypatch):
    import care_export.model.iterative as it

    calls = []
    real = it.iterative_scores
    monkeypatch.setattr(it, "iterative_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    source = BuiltinSource(6, train_per_class=4, test_per_class=2, image_size=32)
    run = ContinualRun(
        tmp_path,
        CareViT(TINY, MoEConfig()),
        TaskSequence.build(6, 3, 3),
        source,
        PRE,
        TrainConfig(epochs=2, batch_size=4, ca_epochs=1, eval_mode="iterative"),
        limit=2,
        weights="random",
    )
    run.learn_next(progress=False)
    assert not calls  # task 0: single pass
    run.learn_next(progress=False)
    assert calls
    assert read_checkpoint_manifest(tmp_path)["training"]["eval_mode"] == "iterative"
