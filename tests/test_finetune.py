"""RSM fine-tuning: the L1 term's gradient, resume to the same weights, the result loads and samples."""
import json
import re
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from manifoldgd_fast.cli import main
from manifoldgd_fast.errors import ConfigError
from manifoldgd_fast.finetune import finetune
from manifoldgd_fast.training import Diffusion, predicted_x0


def test_l1_term_gradient_closed_form():
    d = Diffusion()
    x_t = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    eps = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([5, 300, 900])
    x0 = predicted_x0(d, x_t, eps, t)
    l1 = x0.abs().mean(dim=(1, 2, 3)).sum()
    (g,) = torch.autograd.grad(l1, eps)
    want = -d.sqrt_recipm1_ac[t].double().view(-1, 1, 1, 1) * torch.sign(x0.detach()) / 16
    torch.testing.assert_close(g, want)


def _weights(folder):
    return load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))


def test_finetune_resumes_to_the_same_weights_and_loads(tiny_world, tmp_path):
    kw = dict(data=tiny_world["data"], model=tiny_world["model"], steps=4, batch_size=4, save_every=1,
              cache_dir=os.path.join(tiny_world["root"], "cache"), device="cpu", log=lambda *a: None)
    straight = finetune(out=str(tmp_path / "a"), **kw)
    assert finetune(out=str(tmp_path / "b"), stop_after=2, **kw) == str(tmp_path / "b")   # "killed" after 2 steps
    assert not os.path.exists(tmp_path / "b" / "transformer")
    assert not os.path.exists(tmp_path / "b" / "finetune.json")                # written when done only
    resumed = finetune(out=str(tmp_path / "b"), **kw)
    wa, wb = _weights(straight), _weights(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    base = load_file(os.path.join(tiny_world["model"], "transformer", "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(base[k], wa[k]) for k in wa)                # it trained
    # the L1 weight changes the result
    other = finetune(out=str(tmp_path / "c"), rsm_lambda=0.5, **kw)
    assert any(not torch.equal(_weights(other)[k], wa[k]) for k in wa)
    # the fine-tuned folder is a model like any other
    assert main(["distill", "--data", tiny_world["data"], "--model", straight, "--out", str(tmp_path / "o"),
                 "--ipc", "1", "--steps", "4", "--t-stop", "2", "--cache-dir", os.path.join(tiny_world["root"], "cache"),
                 "--method", "cgs"]) == 0
    # the manifest records what the model folder was fine-tuned with
    tuned = json.loads((tmp_path / "o" / "manifest.json").read_text())["model_finetune"]
    assert tuned["rsm_lambda"] == 1e-3 and tuned["step"] == 4 and tuned["steps"] == 4
    record = json.loads((tmp_path / "c" / "finetune.json").read_text())
    assert record["rsm_lambda"] == 0.5 and record["dtype"] == kw.get("dtype", "bfloat16")
    assert record["precision"] == "float32"   # on the CPU, whatever --dtype says (CUDA's autocast)


def test_ema_warm_up_lets_a_short_run_move_the_written_weights(tiny_world, tmp_path):
    """The EMA (the weights written) follows the trained net in a short run: min(decay, (1 + n) / (10 + n)).
    With the flat default 0.9999 three steps would move it 0.02 % of the net's way."""
    from manifoldgd_fast.training import ema_decay_at

    assert [ema_decay_at(0.9999, n) for n in (1, 2, 90)] == [2 / 11, 3 / 12, 0.91]
    assert ema_decay_at(0.5, 10) == 0.5
    finetune(data=tiny_world["data"], model=tiny_world["model"], out=str(tmp_path / "a"), steps=6, batch_size=4,
             save_every=1, stop_after=3, cache_dir=os.path.join(tiny_world["root"], "cache"), device="cpu",
             log=lambda *a: None)
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    base = load_file(os.path.join(tiny_world["model"], "transformer", "diffusion_pytorch_model.safetensors"))
    moved = {name: sum(float((state[name][k].float() - base[k].float()).norm() ** 2) for k in base) ** 0.5
             for name in ("model", "ema")}
    assert moved["model"] > 0 and moved["ema"] > 0.5 * moved["model"], moved


def test_a_diverged_finetune_writes_no_weights_and_keeps_the_last_good_checkpoint(tiny_world, tmp_path, monkeypatch,
                                                                                   capsys):
    """A loss gone NaN after the step-2 checkpoint: the step-4 checkpoint is not written over it, no model
    folder is written, and the CLI says so in one line naming --lr / --rsm-lambda (NaN weights used to be
    written, and distill then blamed its own guidance flags)."""
    from manifoldgd_fast import training

    real, calls = training.rsm_loss, []

    def nan_from_step_3(*a, **k):
        calls.append(1)
        loss, *rest = real(*a, **k)
        return (loss * float("nan") if len(calls) >= 3 else loss), *rest

    monkeypatch.setattr(training, "rsm_loss", nan_from_step_3)
    out = tmp_path / "a"
    rc = main(["finetune", "--data", tiny_world["data"], "--model", tiny_world["model"], "--out", str(out),
               "--steps", "4", "--batch-size", "4", "--save-every", "2", "--device", "cpu",
               "--cache-dir", os.path.join(tiny_world["root"], "cache")])
    err = capsys.readouterr().err.strip().splitlines()[-1]   # after the encoder's progress bar
    assert rc == 2 and err.startswith("manifoldgd-fast: error: finetune diverged by "
                                                                     "step 4: the loss or the weights hold NaN"), err
    assert "the last checkpoint" in err and "--lr or --rsm-lambda" in err, err
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not (out / "transformer").exists() and not (out / "finetune.json").exists()

    # a real divergence (a learning rate of 1e30, no clipping): nothing written at all
    monkeypatch.setattr(training, "rsm_loss", real)
    with pytest.raises(ConfigError, match="finetune diverged by step 2: .* nothing was written"):
        finetune(data=tiny_world["data"], model=tiny_world["model"], out=str(tmp_path / "b"), steps=2, batch_size=4,
                 save_every=2, lr=1e30, grad_clip=0.0, cache_dir=os.path.join(tiny_world["root"], "cache"),
                 device="cpu", log=lambda *a: None)
    assert not (tmp_path / "b" / "checkpoint.pt").exists()


def test_finetune_cli_bad_input(tiny_world, tmp_path, capsys):
    rc = main(["finetune", "--data", tiny_world["data"], "--model", tiny_world["model"], "--out", str(tmp_path / "x"),
               "--steps", "0"])
    assert rc == 2 and "--steps" in capsys.readouterr().err


def test_finetune_takes_distills_label_map_and_refuses_early(tiny_world, tmp_path, capsys, monkeypatch):
    """--label-map reaches the fine-tune's labels (the classes it trains are those distill will sample), and
    counts on resume; --dtype float16 (no loss scaling), a model it cannot train and a damaged checkpoint are
    one line, the model before any latent is encoded."""
    from manifoldgd_fast import latents as L
    from manifoldgd_fast import pipeline

    seen = []
    real = pipeline.prepare
    monkeypatch.setattr(pipeline, "prepare", lambda cfg, **k: seen.append(cfg.label_map) or real(cfg, **k))
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"apple": 2, "banana": 1, "cherry": 0}))
    base = ["finetune", "--data", tiny_world["data"], "--model", tiny_world["model"], "--steps", "1",
            "--batch-size", "2", "--device", "cpu", "--cache-dir", os.path.join(tiny_world["root"], "cache")]
    assert main([*base, "--out", str(tmp_path / "a"), "--label-map", str(cmap)]) == 0
    assert seen == [str(cmap)]
    assert json.loads((tmp_path / "a" / "finetune.json").read_text())["label_map"] == str(cmap)
    capsys.readouterr()
    for extra, why in [(["--dtype", "float16"], "--dtype float16: finetune trains under bfloat16 autocast or"),
                       (["--label-map", "nope"], "--label-map")]:
        assert main([*base, "--out", str(tmp_path / "b"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], err
    # a model without learned sigma: refused before the cache is filled
    from manifoldgd_fast.models import build_dit, save_pretrained_folder, tiny_dit_config

    plain = tmp_path / "plain"
    save_pretrained_folder(build_dit({**tiny_dit_config(num_classes=3, sample_size=8), "out_channels": 4}),
                           str(plain / "transformer"))
    shutil.copytree(os.path.join(tiny_world["model"], "vae"), plain / "vae")
    monkeypatch.setattr(L, "cache_latents", lambda *a, **k: pytest.fail("encoded before the refusal"))
    args = [*base, "--out", str(tmp_path / "c")]
    args[args.index("--model") + 1] = str(plain)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finetune trains DiTs with learned sigma" in err[0], err
    # a truncated checkpoint (a full disk): one line, naming it
    monkeypatch.undo()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "checkpoint.pt").write_bytes(b"PK\x03\x04 half")
    assert main([*base, "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.pt is damaged" in err[0] and "delete it" in err[0], err


def test_grad_clip_zero_means_no_clipping(tiny_world, tmp_path):
    """--grad-clip 0 trains as an unreachable clip does (a max norm of 0 would zero every gradient);
    a tight clip changes the result."""
    kw = dict(data=tiny_world["data"], model=tiny_world["model"], steps=2, batch_size=4, save_every=10,
              cache_dir=os.path.join(tiny_world["root"], "cache"), device="cpu", log=lambda *a: None)
    none, huge, tight = (_weights(finetune(out=str(tmp_path / n), grad_clip=c, **kw))
                         for n, c in (("none", 0.0), ("huge", 1e30), ("tight", 1e-6)))
    assert all(torch.equal(none[k], huge[k]) for k in none)
    assert any(not torch.equal(none[k], tight[k]) for k in none)


def _kw(world, **k):
    return dict(data=world["data"], model=world["model"], cache_dir=os.path.join(world["root"], "cache"),
                device="cpu", log=lambda *a: None, **k)


def test_every_step_draws_the_documented_batch_and_the_ema_is_written(tiny_world, tmp_path, monkeypatch):
    """Each step's latents (with replacement over every class), labels (dropped to the null class with
    probability --label-dropout), t (uniform over 0 ... 999) and noise come from one generator seeded by
    (seed, step), in that order; the folder's transformer/ holds the EMA weights, not the trained ones."""
    from manifoldgd_fast import training
    from manifoldgd_fast.config import derive_seed
    from manifoldgd_fast.latents import encode_precision, latent_cache_dir, load_class_latents

    seen, real = [], training.rsm_loss
    monkeypatch.setattr(training, "rsm_loss", lambda m, d, x0, y, t, n, lam: (seen.append((x0, y, t, n)),
                                                                             real(m, d, x0, y, t, n, lam))[1])
    out = finetune(out=str(tmp_path / "a"), **_kw(tiny_world, steps=3, batch_size=64, label_dropout=0.5, seed=5))
    assert len(seen) == 3
    cache = latent_cache_dir(os.path.join(tiny_world["root"], "cache"), tiny_world["data"], tiny_world["model"], 16,
                             encode_precision(torch.device("cpu"), torch.bfloat16))
    Z = torch.cat([load_class_latents(cache, c)[0].half() for c in ("apple", "banana", "cherry")]).float()
    Y = torch.tensor([0] * 12 + [1] * 12 + [2] * 12)
    for step, (x0, y, t, n) in enumerate(seen):
        g = torch.Generator().manual_seed(derive_seed(5, "finetune", step))
        idx = torch.randint(36, (64,), generator=g)
        assert torch.equal(x0, Z[idx])
        assert torch.equal(t, torch.randint(0, 1000, (64,), generator=g))
        assert torch.equal(n, torch.randn(x0.shape, generator=g))
        drop = torch.rand(64, generator=g) < 0.5
        assert torch.equal(y, torch.where(drop, torch.full_like(Y[idx], 3), Y[idx]))   # 3: the null class
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    w = _weights(out)
    assert all(torch.equal(w[k], ck["ema"][k]) for k in w)
    assert any(not torch.equal(ck["ema"][k], ck["model"][k]) for k in w)


def test_adamw_without_weight_decay_at_the_given_lr(tiny_world, tmp_path, monkeypatch):
    made, real = [], torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: made.append(k) or real(*a, **k))
    finetune(out=str(tmp_path / "a"), **_kw(tiny_world, steps=1, batch_size=2, lr=3e-4))
    assert made == [{"lr": 3e-4, "weight_decay": 0.0}]


def test_a_resume_names_the_settings_that_differ_and_takes_a_path_by_another_spelling(tiny_world, tmp_path,
                                                                                       monkeypatch):
    finetune(out=str(tmp_path / "a"), stop_after=1, **_kw(tiny_world, steps=3, batch_size=2))
    with pytest.raises(ConfigError, match=r"holds a fine-tune with other settings \(lr 0\.0001 then, 0\.0002 now\); use a new"):
        finetune(out=str(tmp_path / "a"), **_kw(tiny_world, steps=3, batch_size=2, lr=2e-4))
    monkeypatch.chdir(os.path.dirname(tiny_world["data"]))     # --data given relative to another directory
    kw = _kw(tiny_world, steps=3, batch_size=2)
    kw["data"] = os.path.basename(tiny_world["data"])
    assert finetune(out=str(tmp_path / "a"), **kw) == str(tmp_path / "a")
    assert torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["step"] == 3


def test_a_stop_between_checkpoints_checkpoints_its_steps(tiny_world, tmp_path):
    finetune(out=str(tmp_path / "a"), stop_after=3, **_kw(tiny_world, steps=9, batch_size=2, save_every=5))
    assert torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("where, why", [("model", "is --model"), ("data", "inside --data"), ("lr", "--lr 1e+39")])
def test_out_over_the_model_or_the_data_and_an_lr_past_float32_are_refused(tiny_world, tmp_path, where, why):
    out = {"model": tiny_world["model"], "data": os.path.join(tiny_world["data"], "x")}.get(where, str(tmp_path / "o"))
    with pytest.raises(ConfigError, match=re.escape(why)):
        finetune(out=out, **_kw(tiny_world, steps=1, batch_size=2, **({"lr": 1e39} if where == "lr" else {})))


def test_non_finite_ema_weights_with_a_finite_loss_are_caught(tiny_world, tmp_path, monkeypatch):
    from manifoldgd_fast import training

    def bad(ema, model, decay):
        with torch.no_grad():
            next(ema.parameters()).fill_(float("nan"))

    monkeypatch.setattr(training, "ema_update", bad)
    with pytest.raises(ConfigError, match="diverged by step 1"):
        finetune(out=str(tmp_path / "a"), **_kw(tiny_world, steps=1, batch_size=2))
    assert not (tmp_path / "a" / "transformer").exists()


def test_weights_written_without_their_record_are_refused_until_the_rerun_finishes(tiny_world, tmp_path, capsys,
                                                                                  monkeypatch):
    """A fine-tune into a folder that holds an earlier one's weights and record, killed after the new
    transformer/ but before the new record: --model refuses the folder (the old record described other
    weights, and its time embedding picks how they load); the rerun writes the record."""
    from manifoldgd_fast import finetune as F

    out = str(tmp_path / "ft")
    finetune(out=out, **_kw(tiny_world, steps=2, batch_size=2, lr=2e-3))
    os.unlink(os.path.join(out, "checkpoint.pt"))                   # a new fine-tune into the same folder (its
    os.unlink(os.path.join(out, "finetune.json"))                   # old record discarded: else it is refused)
    real = F.atomic_write_text
    monkeypatch.setattr(F, "atomic_write_text", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        finetune(out=out, **_kw(tiny_world, steps=2, batch_size=2, lr=5e-3))
    assert not os.path.exists(os.path.join(out, "finetune.json"))
    args = ["distill", "--data", tiny_world["data"], "--model", out, "--out", str(tmp_path / "o"), "--ipc", "1",
            "--steps", "4", "--t-stop", "2", "--cache-dir", os.path.join(tiny_world["root"], "cache"),
            "--method", "dit"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a fine-tune stopped while it wrote its weights" in err[0], err
    # while a finetune run holds the folder (its rerun), it is that, not "stopped" (rerun it: refused by its lock)
    from manifoldgd_fast.output import RunLock

    with RunLock(out, what="another finetune"):
        assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"manifoldgd-fast: error: --model {out} is being written by a finetune run: use it once that "
                   "run has finished"], err
    monkeypatch.setattr(F, "atomic_write_text", real)
    finetune(out=out, **_kw(tiny_world, steps=2, batch_size=2, lr=5e-3))
    assert json.loads(open(os.path.join(out, "finetune.json")).read())["lr"] == 5e-3
    assert main(args) == 0


def test_the_ema_takes_each_step_once_after_it_with_the_warmed_up_decay(tiny_world, tmp_path):
    """After optimizer step n (counted from 1, also across a resume) the EMA is lerp(EMA, net_n, 1 - min(decay,
    (1 + n) / (10 + n))) of the net after that step; --ema-decay 0 writes the trained weights themselves."""
    base = load_file(os.path.join(tiny_world["model"], "transformer", "diffusion_pytorch_model.safetensors"))
    kw = _kw(tiny_world, steps=2, batch_size=2, save_every=1, lr=1e-2)   # an Adam step of ~lr: well above the tolerance
    out = tmp_path / "a"
    finetune(out=str(out), stop_after=1, **kw)
    s1 = torch.load(out / "checkpoint.pt", weights_only=True)
    finetune(out=str(out), **kw)
    s2 = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (s1["step"], s2["step"]) == (1, 2)
    for k in base:
        torch.testing.assert_close(s1["ema"][k], base[k].float().lerp(s1["model"][k], 1 - 2 / 11))
        torch.testing.assert_close(s2["ema"][k], s1["ema"][k].lerp(s2["model"][k], 1 - 3 / 12))
    assert any(not torch.equal(s1["ema"][k], base[k].float()) for k in base)
    flat = finetune(out=str(tmp_path / "b"), ema_decay=0.0, **{**kw, "steps": 1})
    ck, w = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True), _weights(flat)
    assert all(torch.equal(w[k], ck["model"][k]) for k in w)


@pytest.mark.parametrize("key,value", [("steps", 4), ("batch_size", 3), ("rsm_lambda", 0.5), ("label_dropout", 0.2),
                                       ("ema_decay", 0.99), ("grad_clip", 0.5), ("seed", 1), ("dtype", "float32"),
                                       ("classes", "apple,banana")])
def test_a_resume_with_any_other_setting_that_changes_the_weights_is_refused(tiny_world, tmp_path, key, value):
    """Every setting that changes the trained weights counts on resume (a silent mix of two fine-tunes otherwise)."""
    finetune(out=str(tmp_path / "a"), stop_after=1, **_kw(tiny_world, steps=3, batch_size=2))
    kw = _kw(tiny_world, steps=3, batch_size=2)
    kw[key] = value
    said = "the training set (class folders, labels or image files)" if key == "classes" else f"{key} "
    with pytest.raises(ConfigError, match=rf"holds a fine-tune with other settings \({re.escape(said)}"):
        finetune(out=str(tmp_path / "a"), **kw)


def test_a_resume_checks_the_training_set_not_how_its_classes_were_spelt(tiny_world, tmp_path):
    """The checkpoint records the training set (each class folder, its label, its image files): an edited
    --classes or --label-map file under the same name, or an image added to --data, resumed silently on another
    set; the same classes given as a file or as a list resume (the spelling was compared: refused)."""
    import torch

    classes = tmp_path / "classes.txt"
    classes.write_text("apple\nbanana\n")
    out = str(tmp_path / "a")
    finetune(out=out, stop_after=1, **_kw(tiny_world, steps=3, batch_size=2, classes=str(classes)))
    classes.write_text("apple\ncherry\n")                                          # edited under the same name
    with pytest.raises(ConfigError, match=r"other settings \(the training set \(class folders, labels or image"):
        finetune(out=out, **_kw(tiny_world, steps=3, batch_size=2, classes=str(classes)))
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"apple": 1, "banana": 0}))
    with pytest.raises(ConfigError, match=r"other settings \(the training set"):            # other labels
        finetune(out=out, **_kw(tiny_world, steps=3, batch_size=2, classes="apple,banana", label_map=str(cmap)))
    extra = os.path.join(tiny_world["data"], "apple", "zz_added.png")
    shutil.copy(os.path.join(tiny_world["data"], "apple", sorted(os.listdir(os.path.join(tiny_world["data"],
                                                                                          "apple")))[0]), extra)
    try:
        with pytest.raises(ConfigError, match=r"other settings \(the training set"):       # an image added
            finetune(out=out, **_kw(tiny_world, steps=3, batch_size=2, classes="apple,banana"))
    finally:
        os.unlink(extra)
    assert finetune(out=out, **_kw(tiny_world, steps=3, batch_size=2, classes="apple,banana")) == out   # the list
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"] == 3
    assert json.loads(open(os.path.join(out, "finetune.json")).read())["training_set"]


def test_a_checkpoint_from_before_the_training_set_was_recorded_resumes_as_it_did(tiny_world, tmp_path):
    """Checkpoints written before the training set was recorded compare --classes as they did (a fine-tune in
    flight across an upgrade resumes with the same flags; another --classes is still refused)."""
    import torch

    out = tmp_path / "a"
    finetune(out=str(out), stop_after=1, **_kw(tiny_world, steps=3, batch_size=2))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["settings"]["training_set"]
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"other settings \(classes None then, 'apple,banana' now\)"):
        finetune(out=str(out), **_kw(tiny_world, steps=3, batch_size=2, classes="apple,banana"))
    assert finetune(out=str(out), **_kw(tiny_world, steps=3, batch_size=2)) == str(out)


def test_a_kill_while_a_checkpoint_is_written_keeps_the_last_one(tiny_world, tmp_path, monkeypatch):
    """Killed while writing the step-4 checkpoint of 5 (every 2): the step-2 checkpoint is intact, and the rerun
    resumes from it (three steps, not five: starting over would end at the same weights) to the uninterrupted
    run's weights."""
    kw = _kw(tiny_world, steps=5, batch_size=2, save_every=2)
    straight = finetune(out=str(tmp_path / "a"), **kw)
    real = torch.save

    def torn(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 4:
            if hasattr(f, "write"):     # (save_checkpoint streams into its temp file)
                f.write(b"PK\x03\x04 torn")
            else:
                with open(f, "wb") as fh:
                    fh.write(b"PK\x03\x04 torn")
            raise KeyboardInterrupt
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        finetune(out=str(tmp_path / "b"), **kw)
    monkeypatch.setattr(torch, "save", real)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 2
    from manifoldgd_fast import training

    real_loss, ran = training.rsm_loss, []
    monkeypatch.setattr(training, "rsm_loss", lambda *a: ran.append(1) or real_loss(*a))
    resumed = finetune(out=str(tmp_path / "b"), **kw)
    assert len(ran) == 3                                  # steps 3, 4 and 5: a resume, not a run over from step 0
    wa, wb = _weights(straight), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_optimiser_sees_gradients_clipped_to_grad_clip(tiny_world, tmp_path, monkeypatch):
    """The gradient AdamW steps on has norm min(its own, --grad-clip) (Adam is nearly scale-free in the gradient,
    so the weights alone hardly show a clip that is off by a factor)."""
    norms, real = [], torch.optim.AdamW

    class Seeing(real):
        def step(self, *a, **k):
            grads = [p.grad.norm() for g in self.param_groups for p in g["params"] if p.grad is not None]
            norms.append(float(torch.stack(grads).norm()))
            return super().step(*a, **k)

    monkeypatch.setattr(torch.optim, "AdamW", Seeing)
    kw = _kw(tiny_world, steps=2, batch_size=2, save_every=10)
    finetune(out=str(tmp_path / "none"), grad_clip=0.0, **kw)
    free, norms[:] = list(norms), []
    clip = 0.01 * min(free)
    finetune(out=str(tmp_path / "tight"), grad_clip=clip, **kw)
    assert norms == pytest.approx([clip, clip], rel=1e-4), (norms, free)
    norms[:] = []
    finetune(out=str(tmp_path / "loose"), grad_clip=100 * max(free), **kw)
    assert norms[0] == pytest.approx(free[0], rel=1e-6)


def test_a_second_finetune_into_the_same_out_is_refused_while_one_runs(tiny_world, tmp_path, monkeypatch):
    """Two fine-tunes of one --out resumed the same checkpoint and wrote its one temp file together (a torn
    checkpoint): the second now stops with one line naming the first, before it reads anything, and the
    first's files are untouched."""
    from manifoldgd_fast.errors import DataError
    from manifoldgd_fast.output import RunLock

    out = tmp_path / "b"
    kw = _kw(tiny_world, steps=2, batch_size=2, save_every=1)
    finetune(out=str(out), stop_after=1, **kw)
    before = (out / "checkpoint.pt").read_bytes()
    from manifoldgd_fast import pipeline

    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: pytest.fail("the second finetune started"))
    with RunLock(str(out), what="another finetune"):
        with pytest.raises(DataError, match=f"--out {out} is being written by another finetune \\(pid {os.getpid()}"):
            finetune(out=str(out), **kw)
    assert (out / "checkpoint.pt").read_bytes() == before


def test_a_resume_after_an_image_was_rewritten_in_place_is_refused(tiny_world, tmp_path):
    """An image rewritten under its own name between a kill and the resume: the latent cache re-encoded its
    class and the rest of the fine-tune trained on other latents than its first steps, silently (the training
    set recorded names only). Each image's size and mtime are recorded now, as distill's resume compares them."""
    out = str(tmp_path / "a")
    data = tmp_path / "data"
    shutil.copytree(tiny_world["data"], data)
    kw = _kw(dict(tiny_world, data=str(data)), steps=3, batch_size=2)
    finetune(out=out, stop_after=1, **kw)
    files = sorted(os.listdir(data / "apple"))
    shutil.copy(data / "apple" / files[1], data / "apple" / files[0])          # same name, other image
    with pytest.raises(ConfigError, match=r"other settings \(the images \(one changed since the checkpoint: its "
                                          r"size or modification time\)\); use a new --out$"):
        finetune(out=out, **kw)


def test_a_finished_fine_tune_without_its_checkpoint_is_not_written_over(tiny_world, tmp_path, capsys):
    """Once checkpoint.pt was deleted (as the README suggests: ~4x the model), a rerun with other settings
    trained from scratch and replaced the finished weights and record, exit 0 (finetune / profile audit): the
    record's settings are compared as a checkpoint's are; with the same settings nothing is done."""
    out = str(tmp_path / "ft")
    finetune(out=out, **_kw(tiny_world, steps=2, batch_size=2, lr=2e-3))
    os.unlink(os.path.join(out, "checkpoint.pt"))
    folder = os.path.join(out, "transformer")
    weights = {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)}
    with pytest.raises(ConfigError, match=re.escape(f"{out} holds a finished fine-tune with other settings (lr 0.002 "
                                                    "then, 0.005 now); use a new --out")):
        finetune(out=out, **_kw(tiny_world, steps=2, batch_size=2, lr=5e-3))
    assert finetune(out=out, **_kw(tiny_world, steps=2, batch_size=2, lr=2e-3)) == out   # the same: nothing to do
    assert {f: open(os.path.join(folder, f), "rb").read() for f in weights} == weights
    assert json.loads(open(os.path.join(out, "finetune.json")).read())["lr"] == 2e-3
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))


def test_a_fine_tune_killed_before_its_weights_is_named_as_such(tmp_path):
    """--model on a fine-tune's folder holding only checkpoint.pt said "no model in ... (neither a DiT ...)"."""
    from manifoldgd_fast.errors import ModelError
    from manifoldgd_fast.models import check_model_source

    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(ModelError, match=re.escape(f"--model {tmp_path}: an unfinished fine-tune (checkpoint.pt, no "
                                                   "weights written yet): rerun its finetune command")):
        check_model_source(str(tmp_path))
