"""Student training tasks (kdscale.distill.tasks): masking of absent modalities and unseen soft
labels, learnable omega, predict masks, routing, overfit sanity, d_util, and DDP."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from kdscale.distill.losses import MindLossConfig, MmpkdLossConfig
from kdscale.distill.tasks import (EXTRA_MODULE_NAME, JointTask, KdUncertaintyWeighting, MedFuseTask, MindTask,
                                   MmpkdTask, SupervisedImageTask, mind_metrics)
from kdscale.metrics.utilization import utilization, utilization_gap
from kdscale.models.students import StudentConfig, build_student

C = 3
ENSEMBLES = ["image", "ehr", "report"]
# samples: 0,1 paired; 2,3 image only; 4,5 EHR only
IMG = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
EHR = torch.tensor([1, 1, 0, 0, 1, 1], dtype=torch.bool)
PAIRED, IMG_ONLY, EHR_ONLY = 0, 2, 4


def mixed_batch(seed: int = 0, t: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = len(IMG)
    lens = torch.where(EHR, torch.randint(2, t + 1, (b,), generator=g), 0)
    ehr = torch.zeros(b, t, 76)
    for i, n in enumerate(lens.tolist()):
        ehr[i, :n] = torch.randn(n, 76, generator=g)
    seen = torch.stack([IMG, EHR, torch.ones(b, dtype=torch.bool)], 1)   # teachers see their modality
    ensemble = (torch.randn(b, len(ENSEMBLES), C, generator=g) * 2).half()
    ensemble[~seen] = 0
    image = torch.randn(b, 3, 32, 32, generator=g) * IMG[:, None, None, None]
    return {"key": [f"k{i}" for i in range(b)], "image": image,
            "ehr": ehr, "ehr_len": lens, "labels": torch.randint(0, 2, (b, C), generator=g).float(),
            "valid": torch.ones(b, dtype=torch.bool),
            "present": {"image": IMG.clone(), "ehr": EHR.clone(), "report": torch.ones(b, dtype=torch.bool),
                        "tabular": torch.zeros(b, dtype=torch.bool)},
            "soft": {"ensemble": ensemble, "ensemble_seen": seen}}


def mind(seed: int = 0, **cfg):
    torch.manual_seed(seed)
    return build_student(StudentConfig("mind", **cfg), C)


def seeded_loss(task, model, batch, seed: int = 1):
    torch.manual_seed(seed)  # the same dropout masks on every call
    return task.loss(model, batch)


def test_mind_loss_is_finite_and_absent_images_do_not_matter():
    model, task = mind(), MindTask(MindLossConfig("multilabel"), ENSEMBLES)
    batch = mixed_batch()
    batch["image"].requires_grad_(True)
    loss, terms = seeded_loss(task, model, batch)
    assert torch.isfinite(loss) and set(terms) == {"sup_fusion", "sup_image", "kd_image", "sup_ehr", "kd_ehr"}
    assert all(torch.isfinite(v) and not v.requires_grad for v in terms.values())
    loss.backward()
    grad = batch["image"].grad
    assert float(grad[~IMG].abs().sum()) == 0.0 and float(grad[IMG].abs().sum()) > 0
    # changing the image of an image-absent sample (train mode, BatchNorm included) changes nothing
    other = mixed_batch()
    other["image"][~IMG] = torch.randn(2, 3, 32, 32) * 50
    assert torch.equal(seeded_loss(task, model, other)[0].detach(), seeded_loss(task, model, mixed_batch())[0].detach())


def test_fusion_loss_ignores_unpaired_samples():
    model, task = mind(), MindTask(MindLossConfig("multilabel"), ENSEMBLES)
    base = seeded_loss(task, model, mixed_batch())[1]
    for sample, changes in [(IMG_ONLY, False), (EHR_ONLY, False), (PAIRED, True)]:
        batch = mixed_batch()
        batch["labels"][sample] = 1 - batch["labels"][sample]
        terms = seeded_loss(task, model, batch)[1]
        assert (terms["sup_fusion"] != base["sup_fusion"]) == changes, sample
    # aux terms follow their modality: flipping an EHR-only label moves sup_ehr, not sup_image
    batch = mixed_batch()
    batch["labels"][EHR_ONLY] = 1 - batch["labels"][EHR_ONLY]
    terms = seeded_loss(task, model, batch)[1]
    assert terms["sup_image"] == base["sup_image"] and terms["sup_ehr"] != base["sup_ehr"]


def test_soft_targets_follow_ensemble_seen_and_presence():
    model = mind()
    task = MindTask(MindLossConfig("multilabel", temperature=2.0), ENSEMBLES)
    batch = mixed_batch()
    q, has = task.soft_targets(batch)["image"]
    assert torch.allclose(q, torch.sigmoid(batch["soft"]["ensemble"][:, 0].float() / 2.0))
    assert torch.equal(has, IMG)
    base = seeded_loss(task, model, batch)[0].detach()

    def loss_with(sample, column, seen=None):
        b = mixed_batch()
        b["soft"]["ensemble"][sample, column] = torch.tensor([9.0, -9.0, 9.0]).half()
        if seen is not None:
            b["soft"]["ensemble_seen"][sample, column] = seen
        return seeded_loss(task, model, b)[0].detach()

    assert torch.equal(seeded_loss(task, model, _unseen(PAIRED, 0))[0].detach(), loss_with(PAIRED, 0, seen=False))
    assert not torch.equal(loss_with(PAIRED, 0), base)            # seen + image present: counts
    assert torch.equal(loss_with(EHR_ONLY, 0, seen=True), base)   # seen, but no image: the image head skips it
    assert torch.equal(loss_with(IMG_ONLY, 1), base)              # EHR teacher did not see it
    assert torch.equal(loss_with(PAIRED, 2), base)                # the report ensemble is not used by MIND
    # the unseen sample's logits are irrelevant: zero or garbage, the same loss
    garbage = _unseen(PAIRED, 0)
    garbage["soft"]["ensemble"][PAIRED, 0] = float("inf")
    clean = seeded_loss(task, model, _unseen(PAIRED, 0))[0].detach()
    assert torch.equal(seeded_loss(task, model, garbage)[0].detach(), clean)


def _unseen(sample, column):
    b = mixed_batch()
    b["soft"]["ensemble_seen"][sample, column] = False
    return b


def test_mind_soft_label_requirements():
    # omega = 0: heads only, no soft labels needed
    cfg0 = MindLossConfig("multilabel", omega={"image": 0.0, "ehr": 0.0})
    task = MindTask(cfg0)
    batch = mixed_batch()
    del batch["soft"]
    loss, terms = task.loss(mind(), batch)
    assert torch.isfinite(loss) and not any(k.startswith("kd") for k in terms)
    with pytest.raises(ValueError, match="not in the soft labels' ensemble_names"):
        MindTask(MindLossConfig("multilabel"), ["report"])
    # ensembles named differently: map them
    task = MindTask(MindLossConfig("multilabel"), ["cxr", "ts"], ensemble_for={"image": "cxr", "ehr": "ts"})
    assert task.columns == {"image": 0, "ehr": 1}
    with pytest.raises(ValueError, match="MIND student"):
        MindTask(MindLossConfig("multilabel", modalities=("image", "report"),
                                omega={"image": 0.0, "report": 0.0}))


def test_learnable_omega_contract():
    cfg = MindLossConfig("multilabel", omega={"image": 0.5, "ehr": 2.0})
    task = MindTask(cfg, ENSEMBLES, "uncertainty")
    assert isinstance(task.extra_module, KdUncertaintyWeighting) and task.extra_module.names == ("kd_image", "kd_ehr")
    model = mind()
    with pytest.raises(RuntimeError, match="attach"):
        task.loss(model, mixed_batch())
    assert task.attach(model) is model and getattr(model, EXTRA_MODULE_NAME) is task.extra_module
    ids = {id(p) for p in model.parameters()}
    assert id(task.extra_module.inner.log_vars) in ids                      # the optimizer sees it
    assert f"{EXTRA_MODULE_NAME}.inner.log_vars" in model.state_dict()       # saved with the model
    # at init (s = 0) the total equals the fixed-weight objective
    fixed = MindTask(cfg, ENSEMBLES)
    loss, terms = seeded_loss(task, model, mixed_batch())
    ref = seeded_loss(fixed, model, mixed_batch())[0]
    assert torch.allclose(loss, ref) and float(terms["omega/kd_image"]) == 1.0
    loss.backward()
    log_vars = task.extra_module.inner.log_vars
    assert log_vars.grad is not None and bool((log_vars.grad != 0).all())
    # a second task object on the same model reuses the attached module
    again = MindTask(cfg, ENSEMBLES, "uncertainty")
    again.attach(model)
    assert again.extra_module is task.extra_module


def test_predict_masks():
    model = mind().eval()
    batch = mixed_batch()
    with torch.no_grad():
        preds = MindTask(MindLossConfig("multilabel"), ENSEMBLES).predict(model, batch)
        out = model(batch)
    assert sorted(preds) == ["ehr", "fusion", "image", "routed"]
    assert preds["fusion"][1].tolist() == (IMG & EHR).tolist()
    assert preds["image"][1].tolist() == IMG.tolist() and preds["ehr"][1].tolist() == EHR.tolist()
    assert preds["routed"][1].tolist() == [True] * 6
    routed = preds["routed"][0]
    assert torch.allclose(routed[PAIRED], torch.sigmoid(out["fusion"][PAIRED]))
    assert torch.allclose(routed[IMG_ONLY], torch.sigmoid(out["image"][IMG_ONLY]))
    assert torch.allclose(routed[EHR_ONLY], torch.sigmoid(out["ehr"][EHR_ONLY]))
    for probs, mask in preds.values():
        assert bool(((probs[mask] >= 0) & (probs[mask] <= 1)).all())
    joint = build_student(StudentConfig("joint", impute_missing=False), C).eval()
    with torch.no_grad():
        jp = JointTask().predict(joint, batch)
    assert sorted(jp) == ["fusion", "routed"] and jp["routed"][1].tolist() == (IMG & EHR).tolist()
    vit = build_student(StudentConfig("vit", img_size=32), C).eval()
    with torch.no_grad():
        vp = MmpkdTask(MmpkdLossConfig(lam=0.0)).predict(vit, batch)
    assert list(vp) == ["image"] and vp["image"][1].tolist() == IMG.tolist()


def test_joint_and_medfuse_tasks():
    batch = mixed_batch()
    torch.manual_seed(0)
    medfuse = build_student(StudentConfig("medfuse", image_arch="resnet10"), C)
    joint = build_student(StudentConfig("joint"), C)
    for model, task, ehr_only_counts in [(joint, JointTask(), False), (medfuse, MedFuseTask(), True),
                                         (medfuse, MedFuseTask(fusion_samples="paired"), False)]:
        base = seeded_loss(task, model, batch)[0].detach()
        flipped = mixed_batch()
        flipped["labels"][EHR_ONLY] = 1 - flipped["labels"][EHR_ONLY]
        assert (seeded_loss(task, model, flipped)[0].detach() != base) == ehr_only_counts
    # the MIND student under JointTask: unused aux heads still get a (zero) gradient
    model = mind()
    loss, terms = JointTask().loss(model, batch)
    loss.backward()
    assert list(terms) == ["sup_fusion"] and all(p.grad is not None for p in model.parameters())
    assert float(model.image_head.weight.grad.abs().sum()) == 0.0
    with pytest.raises(ValueError, match="LSTM fusion"):
        MedFuseTask().loss(joint, batch)
    with pytest.raises(ValueError, match="fusion_samples"):
        JointTask(fusion_samples="all")


def test_mmpkd_task():
    torch.manual_seed(0)
    vit = build_student(StudentConfig("vit", img_size=32), C)
    batch = mixed_batch()
    sup = SupervisedImageTask()
    no_soft = dict(batch)
    del no_soft["soft"]
    plain = MmpkdTask(MmpkdLossConfig(lam=0.0))
    assert torch.allclose(plain.loss(vit, no_soft)[0], sup.loss(vit, batch)[0])
    task = MmpkdTask(MmpkdLossConfig(lam=0.5, temperature=2.0), "report", ENSEMBLES)
    assert task.column == 2 and task.main_head == "image"
    loss, terms = task.loss(vit, batch)
    assert torch.isfinite(loss) and set(terms) == {"sup", "kd", "teacher_frac"}
    assert float(terms["teacher_frac"]) == pytest.approx(4 / 6)     # seen and image present, over all B
    # an unseen teacher row contributes 0 (its logits can be anything)
    a, b = mixed_batch(), mixed_batch()
    for x in (a, b):
        x["soft"]["ensemble_seen"][PAIRED, 2] = False
    b["soft"]["ensemble"][PAIRED, 2] = 30.0
    assert torch.equal(task.loss(vit, a)[0], task.loss(vit, b)[0])
    # an image-absent sample contributes nothing even with a teacher
    c = mixed_batch()
    c["soft"]["ensemble"][EHR_ONLY, 2] = -30.0
    c["labels"][EHR_ONLY] = 1 - c["labels"][EHR_ONLY]
    assert torch.equal(task.loss(vit, c)[0], task.loss(vit, mixed_batch())[0])
    with pytest.raises(ValueError, match="no soft labels"):
        task.loss(vit, no_soft)
    with pytest.raises(ValueError, match="needs teacher_ensemble"):
        MmpkdTask(MmpkdLossConfig(lam=0.5))
    with pytest.raises(ValueError, match="not in the soft labels"):
        MmpkdTask(MmpkdLossConfig(lam=0.5), "tabular", ENSEMBLES)


def _overfit(task, model, batch, steps: int = 3) -> tuple[float, float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = float(seeded_loss(task, model, batch)[0].detach())
    for step in range(steps):
        loss = seeded_loss(task, model, batch, seed=10 + step)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, float(seeded_loss(task, model, batch)[0].detach())


def test_overfit_sanity_mind_and_mmpkd():
    batch = mixed_batch()
    task = MindTask(MindLossConfig("multilabel"), ENSEMBLES, "uncertainty")
    model = task.attach(mind(ehr_arch="lstm_small", fusion_dim=32))
    before, after = _overfit(task, model, batch)
    assert after < before, (before, after)
    torch.manual_seed(0)
    vit = build_student(StudentConfig("vit", img_size=32), C)
    before, after = _overfit(MmpkdTask(MmpkdLossConfig(lam=0.5), "report", ENSEMBLES), vit, batch)
    assert after < before, (before, after)


def test_utilization_is_option_iii_on_paired_samples():
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 2, (n, 2)).astype(float)
    paired = np.arange(n) < 120
    fusion = np.where(paired[:, None], y * 0.6 + rng.random((n, 2)) * 0.5, np.nan)
    image = y * 0.3 + rng.random((n, 2))
    ehr = y * 0.1 + rng.random((n, 2))
    image[~paired & (np.arange(n) % 2 == 0)] = 1 - y[~paired & (np.arange(n) % 2 == 0)]  # unpaired: ignored
    preds = {"labels": y, "keys": [str(i) for i in range(n)], "fusion": (fusion, paired),
             "image": (image, paired | (np.arange(n) % 2 == 0)), "ehr": (ehr, np.ones(n, bool)),
             "routed": (np.where(paired[:, None], fusion, ehr), np.ones(n, bool))}
    from kdscale.metrics.classification import label_metrics
    m = {h: label_metrics(y[paired], preds[h][0][paired])["auroc_macro"] for h in ("fusion", "image", "ehr")}
    out = utilization(preds)
    ref = utilization_gap(m["fusion"], m["image"], m["ehr"])
    assert out["util/n_paired"] == 120 and out["util/m_ab"] == pytest.approx(m["fusion"])
    assert out["util/d_util"] == pytest.approx(ref["d_util"]) and out["util/d_util"] > 0   # image head is stronger
    assert utilization(preds, baseline=0.5)["util/d_util"] == pytest.approx(
        utilization_gap(m["fusion"], m["image"], m["ehr"], baseline=0.5)["d_util"])
    metrics = mind_metrics(preds, "routed", ["a", "b"])
    assert "util/d_util" in metrics and "fusion/auroc_macro" in metrics and "auroc_macro" in metrics
    none = {**preds, "fusion": (fusion, np.zeros(n, bool))}
    assert np.isnan(utilization(none)["util/d_util"]) and utilization(none)["util/n_paired"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        task = MindTask(MindLossConfig("multilabel"), ["image", "ehr"], "uncertainty")
        model = task.attach(mind(ehr_arch="lstm_small", fusion_dim=32))
        ddp = torch.nn.parallel.DistributedDataParallel(model)   # find_unused_parameters=False
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        b = 4
        for step in range(2):
            img = torch.ones(b, dtype=torch.bool)
            ehr = torch.ones(b, dtype=torch.bool)
            if rank == 1:   # rank 1 has no image in step 0 and no EHR in step 1
                (img if step == 0 else ehr)[:] = False
            soft = {"ensemble": torch.randn(b, 2, C).half(), "ensemble_seen": torch.ones(b, 2, dtype=torch.bool)}
            batch = {"image": torch.randn(b, 3, 32, 32), "ehr": torch.randn(b, 4, 76),
                     "ehr_len": torch.where(ehr, 3, 0),
                     "labels": torch.randint(0, 2, (b, C)).float(), "present": {"image": img, "ehr": ehr}, "soft": soft}
            loss, _ = task.loss(ddp, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            queue.put(bool(torch.equal(gathered[0], gathered[1])))
        del ddp, opt   # before destroy_process_group: a DDP reducer freed after it can hang (gloo)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_sees_every_parameter_when_a_modality_is_absent_on_one_rank():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), queue), nprocs=2, start_method="spawn")
    assert queue.get() is True


def test_mixed_precision_loss_and_predict():
    model, task = mind(ehr_arch="lstm_small", fusion_dim=32), MindTask(MindLossConfig("multilabel"), ENSEMBLES)
    batch = mixed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = task.loss(model, batch)
        preds = task.predict(model, batch)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(bool(torch.isfinite(p[m]).all()) for p, m in preds.values())
