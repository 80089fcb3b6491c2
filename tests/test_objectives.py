"""train/objectives: targets, EMA, ablation switches, one optimisation step, for dino / simclr / clip (+ AB)."""
import dataclasses

import pytest
import torch

import abvid.train.objectives.bootstrap as bootstrap_mod
from abvid.model import ModelConfig, build_encoder, encoder_kwargs
from abvid.model.heads import BatchNormAnyShape
from abvid.pipeline.actions import AUG_DIM, actions_between, pairwise_actions
from abvid.train.objectives import ObjectiveConfig, build_objective
from abvid.train.objectives.base import encode
from abvid.train.objectives.bootstrap import run_value

MODEL = ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, embed_dim=32, depth=2, num_heads=2)
SMALL = dict(num_prototypes=32, head_hidden_dim=64, head_bottleneck_dim=16, head_norm="ln", proj_hidden_dim=64,
             proj_dim=16, decoder_dim=16, decoder_heads=2, action_bins=8, max_dt=4, num_next_actions=3)
TEXTS = {"texts": ["cat", "dog", "red car"]}


def toy_batch(B: int = 4, ng: int = 2, nl: int = 2, seed: int = 0, next_views: int = 3) -> dict:
    """A loader-shaped batch: views, their parameters, and ``next_views`` fresh view parameters per clip."""
    g = torch.Generator().manual_seed(seed)
    n = ng + nl

    def boxes(k):
        hw = 0.2 + 0.6 * torch.rand(B, k, 2, generator=g)
        return torch.cat([(1 - hw) * torch.rand(B, k, 2, generator=g), hw], -1)
    batch = {"global": torch.randint(0, 256, (B, ng, 3, 32, 32), dtype=torch.uint8, generator=g),
             "local": torch.randint(0, 256, (B, nl, 3, 16, 16), dtype=torch.uint8, generator=g),
             "boxes": boxes(n), "frame_idx": torch.randint(0, 4, (B, n), generator=g),
             "time_s": torch.zeros(B, n), "aug": torch.rand(B, n, AUG_DIM, generator=g),
             "key": [f"k{i}" for i in range(B)], "labels": [["cat"], ["dog"], [], ["cat", "red car"]][:B],
             "clip_id": torch.arange(B)}
    batch.update(next_boxes=boxes(next_views), next_frame_idx=torch.randint(0, 4, (B, next_views), generator=g),
                 next_aug=torch.rand(B, next_views, AUG_DIM, generator=g))
    return batch


def make(name: str = "dino", **kw):
    torch.manual_seed(0)
    return build_objective(ObjectiveConfig(name=name, **{**SMALL, **kw}), MODEL, TEXTS)


def capture_targets(monkeypatch) -> list:
    """Record every y that bootstrap_loss builds (B, n, L), before pairing."""
    seen = []
    real = bootstrap_mod.bootstrap_target

    def spy(p, q, gamma, exclude=None):
        y = real(p, q, gamma, exclude)
        seen.append(y)
        return y
    monkeypatch.setattr(bootstrap_mod, "bootstrap_target", spy)
    return seen


def view_probs(obj, encoder, head, batch, teacher_temp):
    """p(l | view) recomputed view group by view group, the way docs/METHOD.md defines it."""
    cls = torch.cat([encoder.embed(batch[k].flatten(0, 1)).view(4, 2, -1) for k in ("global", "local")], 1)
    z = head(cls)
    if obj.family.__class__.__name__ == "DINOFamily":                # globals and locals: a centre each
        centre = torch.cat([obj.family.centre.expand(2, -1), obj.family.centre_local.expand(2, -1)])
        return ((z @ head.prototypes().t() - centre) / teacher_temp).softmax(-1)
    psi = z.reshape(8 * 2, -1)                                       # SimCLR: the batch's views, self excluded
    logits = (z @ psi.t()) / obj.family.target_temperature
    return logits.masked_fill(torch.eye(16, dtype=torch.bool).view(4, 4, 16), float("-inf")).softmax(-1)


@pytest.mark.parametrize("name", ["dino", "simclr"])
def test_gamma_zero_target_is_ema_teacher_on_target_view(monkeypatch, name):
    obj = make(name, bootstrap=True, gamma=0.0).eval()              # eval: the centre stays put
    with torch.no_grad():                                            # make teacher and student differ
        for p in list(obj.teacher_encoder.parameters()) + list(obj.teacher_head.parameters()):
            p.add_(0.05 * torch.randn_like(p))
        if name == "dino":
            obj.family.centre.normal_(0, 0.1)
            obj.family.centre_local.normal_(0, 0.1)
    seen = capture_targets(monkeypatch)
    batch = toy_batch()
    obj.loss(batch, teacher_temp=0.05)
    with torch.no_grad():
        expected = view_probs(obj, obj.teacher_encoder, obj.teacher_head, batch, 0.05)
        student = view_probs(obj, obj.student_encoder, obj.student_head, batch, 0.05)
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(seen[0], student, atol=1e-3)


@pytest.mark.parametrize("name", ["dino", "simclr"])
def test_target_network_false_bootstraps_from_the_student(monkeypatch, name):
    """The paper's ablation: bootstrap targets from the online network. DINO keeps its momentum teacher
    for its own base loss (otherwise the ablation would measure 'DINO without a teacher')."""
    obj = make(name, bootstrap=True, target_network=False).eval()
    assert obj.teacher_value is None
    assert (obj.teacher_encoder is not None) == (name == "dino")
    if name == "dino":
        obj.family.centre_local.normal_(0, 0.1)
    seen = capture_targets(monkeypatch)
    batch = toy_batch()
    obj.loss(batch, teacher_temp=0.05)
    with torch.no_grad():
        expected = view_probs(obj, obj.student_encoder, obj.student_head, batch, 0.05)
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-5)
    obj.update_teacher(0.5)                                          # DINO: EMA of its teacher; SimCLR: no-op


@pytest.mark.parametrize("name,bootstrap,target_network,teacher", [
    ("simclr", False, True, False), ("simclr", True, False, False), ("simclr", True, True, True),
    ("clip", False, True, False), ("dino", False, True, True), ("dino", True, False, True)])
def test_a_teacher_is_built_only_where_something_reads_it(name, bootstrap, target_network, teacher):
    obj = make(name, bootstrap=bootstrap, target_network=target_network)
    assert (obj.teacher_encoder is not None) == teacher and (obj.teacher_head is not None) == teacher
    assert (obj.teacher_value is not None) == (bootstrap and target_network)
    assert (not teacher) == (not any(k.startswith("teacher_") for k in obj.state_dict()))


@pytest.mark.parametrize("name", ["dino", "simclr"])
@pytest.mark.parametrize("target_network", [True, False])
@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_no_gradient_reaches_the_target(monkeypatch, name, target_network, gamma):
    """Targets are computed without a graph: even teacher parameters that *could* take a gradient get none,
    and no target tensor carries a grad_fn (target_network=False: the student's own outputs, detached)."""
    obj = make(name, bootstrap=True, gamma=gamma, target_network=target_network)
    teacher = [p for n, p in obj.named_parameters() if n.startswith("teacher_")]
    for p in teacher:
        p.requires_grad_(True)                                       # would collect gradients if y had a graph
    seen = capture_targets(monkeypatch)
    loss, metrics = obj.loss(toy_batch())
    loss.backward()
    assert seen and all(y.grad_fn is None and not y.requires_grad for y in seen)
    assert all(p.grad is None for p in teacher)
    assert ("bootstrap_target_entropy" in metrics) == (gamma > 0)


def test_gamma_positive_mixes_teacher_value_max(monkeypatch):
    obj = make("dino", bootstrap=True, gamma=0.5, num_next_actions=2)
    seen = capture_targets(monkeypatch)
    obj.eval().loss(toy_batch())
    at_zero = make("dino", bootstrap=True, gamma=0.0)
    seen0 = capture_targets(monkeypatch)
    at_zero.eval().loss(toy_batch())
    y, p = seen[0], seen0[0]
    torch.testing.assert_close(y.sum(-1), torch.ones(4, 4))
    assert not torch.allclose(y, p, atol=1e-4)                       # the value term changes the target


def test_next_actions_go_from_the_target_view_to_fresh_views(monkeypatch):
    """A' for view j: the actions j -> fresh view m (the batch's next_* parameters), M of them, read by the
    EMA value decoder on view j; never a move to another view of the batch, so never the return move j -> i."""
    obj = make("dino", bootstrap=True, gamma=0.5, num_next_actions=2)
    calls = []
    real = bootstrap_mod.run_value
    monkeypatch.setattr(bootstrap_mod, "run_value", lambda v, e, a: calls.append((v, a)) or real(v, e, a))
    batch = toy_batch(next_views=3)
    obj.loss(batch)
    (v_t, next_actions), (v_s, pair_actions) = calls                 # targets first, then the trained pairs
    assert v_s is obj.student_value and v_t is obj.teacher_value
    assert pair_actions.shape[:3] == (4, 4, 3) and next_actions.shape[:3] == (4, 4, 2)
    expected = actions_between(batch["boxes"], batch["frame_idx"], batch["aug"], batch["next_boxes"][:, :2],
                               batch["next_frame_idx"][:, :2], batch["next_aug"][:, :2])
    torch.testing.assert_close(next_actions, expected)
    pairs = pairwise_actions(batch["boxes"], batch["frame_idx"], batch["aug"])
    for b in range(4):
        for j in range(4):
            for m in range(2):
                assert not any(torch.allclose(next_actions[b, j, m], pairs[b, j, i]) for i in range(4))
    with pytest.raises(ValueError, match="next views"):
        obj.loss({k: v for k, v in batch.items() if not k.startswith("next_")})


def test_config_keys_fail_loudly():
    from abvid.pipeline.config import ConfigError, merge
    with pytest.raises(ConfigError, match="Did you mean 'gamma'"):
        merge(ObjectiveConfig(), {"gama": 0.1})
    with pytest.raises(ConfigError, match="name"):
        merge(ObjectiveConfig(), {"name": "byol"})


def test_ema_update_follows_formula():
    obj = make("dino", bootstrap=True)
    pairs = [("student_encoder", "teacher_encoder"), ("student_head", "teacher_head"),
             ("student_value", "teacher_value")]
    with torch.no_grad():
        for s, _ in pairs:
            for p in getattr(obj, s).parameters():
                p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in obj.named_parameters()}
    obj.update_teacher(0.9)
    for s, t in pairs:
        for (ns, ps), (nt, pt) in zip(getattr(obj, s).named_parameters(), getattr(obj, t).named_parameters()):
            assert ns == nt
            expected = 0.9 * before[f"{t}.{nt}"] + 0.1 * before[f"{s}.{ns}"]
            torch.testing.assert_close(pt, expected, rtol=1e-6, atol=1e-7)
            assert torch.equal(ps, before[f"{s}.{ns}"])               # the student is untouched


@pytest.mark.parametrize("switch", ["action_tokens", "temporal"])
def test_ablation_switches_reach_the_value_head(switch):
    batch = toy_batch()
    on, off = make("dino", bootstrap=True), make("dino", bootstrap=True, **{switch: False})
    moved = dict(batch, frame_idx=batch["frame_idx"] + torch.arange(4)[None])   # other dt's
    if switch == "action_tokens":
        moved["boxes"] = toy_batch(seed=3)["boxes"]                              # and other boxes
    results = {}
    for label, obj in (("on", on), ("off", off)):
        with torch.no_grad():
            enc = encode(obj.student_encoder, batch)
            q = [run_value(obj.student_value, enc, pairwise_actions(b["boxes"], b["frame_idx"], b["aug"]))
                 for b in (batch, moved)]
        results[label] = torch.allclose(q[0], q[1], atol=1e-6)
    assert results == {"on": False, "off": True}


@pytest.mark.parametrize("name,bootstrap,gamma", [("dino", False, 0.0), ("dino", True, 0.0), ("dino", True, 0.5),
                                                  ("simclr", False, 0.0), ("simclr", True, 0.0),
                                                  ("clip", False, 0.0), ("clip", True, 0.0)])
def test_one_step_lowers_the_loss(name, bootstrap, gamma):
    obj = make(name, bootstrap=bootstrap, gamma=gamma).eval()        # eval: no centre drift between calls
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    batch = toy_batch()
    torch.manual_seed(1)
    loss0, m0 = obj.loss(batch)
    opt.zero_grad()
    loss0.backward()
    unused = [n for n, p in obj.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused                                        # DDP needs no find_unused_parameters
    opt.step()
    torch.manual_seed(1)                                             # same sampled next actions
    with torch.no_grad():
        loss1, m1 = obj.loss(batch)
    assert loss1.item() < loss0.item(), (m0, m1)
    assert ("loss_bootstrap" in m0) == bootstrap and "loss_base" in m0


def test_dino_centre_update_and_metrics():
    obj = make("dino", bootstrap=False, centre_momentum=0.9)
    batch = toy_batch()
    with torch.no_grad():
        cls = obj.teacher_encoder.embed(batch["global"].flatten(0, 1))
        mean = (obj.teacher_head(cls) @ obj.teacher_head.prototypes().t()).mean(0)
    _, m = obj.train().loss(batch, teacher_temp=0.07)
    # the centre moves only when the loop commits the step (a non-finite step never reaches it)
    assert not obj.family.centre.any()
    obj.update_teacher(1.0)
    torch.testing.assert_close(obj.family.centre[0], 0.1 * mean, rtol=1e-4, atol=1e-6)
    assert m["teacher_temp"] == 0.07 and 0 < m["target_entropy"] <= m["target_entropy_max"]


def test_clip_batch_without_texts_and_without_locals():
    obj = make("clip", bootstrap=True)
    batch = dict(toy_batch(), labels=[[], [], [], []])
    loss, m = obj.loss(batch)
    loss.backward()
    assert loss.item() == 0.0 and "loss_bootstrap" not in m
    # every trainable parameter still gets a (zero) gradient, so DDP without find_unused_parameters syncs
    assert all(p.grad is not None and not p.grad.any() for p in obj.parameters() if p.requires_grad)
    dino = make("dino", bootstrap=True)
    b = toy_batch()
    b = dict(b, local=b["local"][:, :0], boxes=b["boxes"][:, :2], frame_idx=b["frame_idx"][:, :2],
             time_s=b["time_s"][:, :2], aug=b["aug"][:, :2])
    loss, m = dino.loss(b)
    assert torch.isfinite(loss) and "loss_bootstrap" in m


@pytest.mark.parametrize("name", ["simclr", "clip"])
def test_proj_norm_reaches_the_image_projector(name):
    # CLIP's projector once ignored objective.proj_norm and kept LayerNorm, with which SimCLR's collapses at lr 1e-3
    for norm, kind in (("bn", BatchNormAnyShape), ("ln", torch.nn.LayerNorm), ("none", torch.nn.Identity)):
        head = make(name, proj_norm=norm).student_head
        mlp = (head.image if name == "clip" else head).mlp
        assert type(mlp[1]) is kind, (name, norm, mlp)


def test_clip_without_texts_warns():
    with pytest.warns(UserWarning, match="data_info"):
        build_objective(ObjectiveConfig(name="clip", **SMALL), MODEL)


def test_state_dict_prefixes_and_no_weight_decay():
    obj = make("dino", bootstrap=True)
    keys = obj.state_dict().keys()
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"family", "student_encoder", "teacher_encoder", "student_head", "teacher_head",
                        "student_value", "teacher_value"}
    # An exported EMA encoder rebuilds with build_encoder(**encoder_kwargs) and loads strictly.
    enc = build_encoder(**encoder_kwargs(MODEL))
    enc.load_state_dict({k[len("teacher_encoder."):]: v for k, v in obj.state_dict().items()
                         if k.startswith("teacher_encoder.")})
    nwd = obj.no_weight_decay()
    for name in ("student_encoder.pos_embed", "student_encoder.cls_token", "student_head.prototype_weight",
                 "student_value.logit_scale", "student_encoder.blocks.0.norm1.weight",
                 "student_encoder.blocks.0.attn.qkv.bias"):
        assert name in nwd
    assert "student_encoder.blocks.0.attn.qkv.weight" not in nwd
    assert not any(n.startswith("teacher_") for n in nwd)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="gamma"):
        make("dino", bootstrap=True, gamma=1.0)
    with pytest.raises(ValueError, match="unknown objective.name"):
        build_objective(dataclasses.replace(ObjectiveConfig(), name="byol"), MODEL)


def _simclr_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of the gathered-negatives check: its half of the batch, the same weights everywhere."""
    import os

    from abvid.train import dist
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = dist.init("cpu", timeout_s=60)
    try:
        obj = make("simclr", bootstrap=True, gamma=0.0)
        full = toy_batch()
        full["clip_id"] = torch.tensor([0, 1, 0, 2])                 # clip 0 on both ranks: a cross-rank positive
        B = 4 // world
        part = {k: v[rank * B:(rank + 1) * B] for k, v in full.items()}
        loss, _ = obj.loss(part, teacher_temp=0.05)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in obj.named_parameters() if p.grad is not None}
        torch.save({"loss": loss.detach(), "grads": grads}, f"{out}/r{rank}.pt")
    finally:
        dist.shutdown(ctx)


def test_simclr_negatives_are_gathered_across_ranks(tmp_path):
    """2 gloo ranks x 2 clips train like one process with 4 clips: mean loss and DDP-averaged gradients agree."""
    import torch.multiprocessing as mp
    from test_dist import free_port

    mp.spawn(_simclr_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (0, 1))
    obj = make("simclr", bootstrap=True, gamma=0.0)
    full = toy_batch()
    full["clip_id"] = torch.tensor([0, 1, 0, 2])
    loss, _ = obj.loss(full, teacher_temp=0.05)
    loss.backward()
    assert torch.allclose((r0["loss"] + r1["loss"]) / 2, loss.detach(), rtol=1e-5, atol=1e-6)
    ref = {k: p.grad for k, p in obj.named_parameters() if p.grad is not None}
    assert set(r0["grads"]) == set(ref) and len(ref) > 10
    for k, g in ref.items():                                         # what DDP's gradient averaging yields
        torch.testing.assert_close((r0["grads"][k] + r1["grads"][k]) / 2, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["dino", "simclr"])
def test_loss_traces_for_torch_compile_as_one_graph(name):
    """train.compile: the whole loss is one graph with no host sync: its metrics stay tensors (the loop brings
    them over with the step's one transfer). Boolean-mask indexing and an in-loss .tolist() used to split it."""
    obj = make(name, bootstrap=True, gamma=0.5)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(lambda b: obj.loss(b, teacher_temp=0.05))(toy_batch())
    torch._dynamo.reset()
    assert ex.graph_break_count == 0, ex.break_reasons


@pytest.mark.parametrize("annotation_grad", [True, False])
def test_annotation_grad_decides_whether_q_trains_the_annotations(annotation_grad):
    """annotation_grad=False: the bootstrap term changes no gradient of the student head (psi's source);
    it still reaches the encoder through the value decoder."""
    grads = {}
    for weight in (0.0, 1.0):
        obj = make("simclr", bootstrap=True, bootstrap_weight=weight, annotation_grad=annotation_grad)
        loss, _ = obj.loss(toy_batch())
        loss.backward()
        grads[weight] = {n: p.grad.clone() for n, p in obj.named_parameters() if p.grad is not None}
    head = [n for n in grads[1.0] if n.startswith("student_head.")]
    same_head = all(torch.allclose(grads[0.0][n], grads[1.0][n], atol=1e-7) for n in head)
    assert same_head == (not annotation_grad)
    enc = "student_encoder.blocks.0.attn.qkv.weight"
    assert not torch.allclose(grads[0.0][enc], grads[1.0][enc])
