"""The public API's input checks: StepGuidance's arguments and calls, and distill()'s config.

Each bad input is one line naming the parameter and the rule (ConfigError; DataError for bad data), where it
was accepted and truncated or ignored, or failed later with an error naming something internal.
"""
import numpy as np
import pytest
import torch

from manifoldgd_fast import distill
from manifoldgd_fast.errors import ConfigError, DataError
from manifoldgd_fast.guidance import StepGuidance
from manifoldgd_fast.schedule import linear_betas, rescale_zero_terminal_snr

TS = list(range(980, -1, -20))     # 50 steps


def _modes():
    return torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def _xe():
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)


# two separate fp32 paper-formulation guidance computations: a CPU's BLAS / LAPACK calls (MKL may pick its thread
# count per call) are not bit-reproducible across calls, and the tangent eigensolver amplifies their last-bit
# differences to ~1e-4 (a CI run saw 4e-5 where torch.equal was asked); a wrong class differs by > 0.1
FP32_TOL = dict(rtol=1e-3, atol=1e-3)


def _same(a, b):
    return torch.allclose(a, b, **FP32_TOL)


def _refused(err, match, fn, *args, **kw):
    """fn(*args, **kw) raises ``err`` matching ``match``, in one line."""
    with pytest.raises(err, match=match) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("which", ["x_t", "eps"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_an_integer_or_bool_x_t_or_eps_is_refused_not_truncated(which, dtype):
    """An int64 eps gave an int64 (truncated) guided eps, a bool x_t a result computed from 0 / 1 latents."""
    guide = StepGuidance(_modes(), timesteps=TS, n_classes=10)
    x, e = _xe()
    args = {"x_t": x, "eps": e}
    args[which] = args[which].to(dtype)
    _refused(ConfigError, f"^{which} must be floating point, got {dtype}$", guide, args["x_t"], args["eps"], 0)


@pytest.mark.parametrize("which", ["x_t", "eps"])
def test_a_list_x_t_or_eps_is_refused_naming_it(which):
    """x.tolist() was an AttributeError ('list' object has no attribute 'shape')."""
    guide = StepGuidance(_modes(), timesteps=TS, n_classes=10)
    x, e = _xe()
    args = {"x_t": x, "eps": e}
    args[which] = args[which].tolist()
    _refused(ConfigError, rf"^{which} must be a torch.Tensor \(3, 4, 8, 8\), got list$", guide,
             args["x_t"], args["eps"], 0)


@pytest.mark.parametrize("classes", [[0.9, 1.8, 0.0], torch.tensor([0.0, 1.0, 0.0]), [True, False, True],
                                     torch.tensor([True, False, True]), np.array([0.5, 1.0, 0.0]), ["0", "1", "0"]])
def test_float_or_bool_class_indices_are_refused_not_truncated(classes):
    """int(c) truncated classes=[0.9, 1.8, 0.0] to [0, 1, 0] (and took True as class 1): each mode got the
    neighbourhood of a class nobody asked for."""
    modes = _modes()
    lat = torch.randn(20, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    _refused(ConfigError, "^classes= must hold integer class indices", StepGuidance, modes, timesteps=TS,
             formulation="paper", class_latents=[lat, lat + 1], classes=classes, n_classes=10)


def test_integer_class_indices_in_any_spelling_give_the_same_guidance():
    """A list, a long tensor and a numpy int array of class indices are one batch (checks only, same maths);
    one out of range is still refused."""
    modes = _modes()
    lat = torch.randn(20, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(timesteps=TS, formulation="paper", class_latents=[lat, lat + 1], n_classes=10)
    x, e = _xe()
    want = StepGuidance(modes, classes=[0, 1, 0], **kw)
    out = want(x, e, 0)
    assert not _same(out, e) and not _same(StepGuidance(modes, classes=[1, 0, 1], **kw)(x, e, 0), out)
    for cls in (torch.tensor([0, 1, 0]), np.array([0, 1, 0]), (np.int64(0), 1, torch.tensor(0))):
        got = StepGuidance(modes, classes=cls, **kw)
        # each mode's neighbourhood (its class's rows of the stacked latents) exactly; the guidance to fp32
        assert torch.equal(got.guidance.order, want.guidance.order)
        assert torch.equal(got.guidance.n_latents, want.guidance.n_latents)
        assert _same(got(x, e, 0), out)
    _refused(ConfigError, r"classes= must give each of the 3 modes its class index in \[0, 2\)", StepGuidance,
             modes, classes=[0, -1, 0], **kw)


@pytest.mark.parametrize("n_classes", [True, False, 0, -5, 2.5, "10", None, 10.0])
def test_n_classes_must_be_an_integer_of_at_least_one(n_classes):
    """True, 0 and -5 quietly took the small-data-set defaults; 2.5 was refused naming --class-batch; '10' and
    None were TypeErrors from a comparison."""
    _refused(ConfigError, rf"^n_classes must be an integer >= 1 .*, got {n_classes!r}$", StepGuidance, _modes(),
             timesteps=TS, n_classes=n_classes)


def test_a_numpy_integer_n_classes_is_that_many_classes():
    assert StepGuidance(_modes(), timesteps=TS, n_classes=np.int64(100)).cfg == \
        StepGuidance(_modes(), timesteps=TS, n_classes=100).cfg


@pytest.mark.parametrize("formulation,method", [("official", "manifoldgd"), ("official", "mgd3"), ("paper", "mgd3")])
def test_class_latents_or_classes_where_nothing_uses_them_are_not_ignored_silently(formulation, method):
    """Under the official formulation (the default) and for MGD3, class_latents and classes were dropped without
    a word: a per-class batch and classes= are refused; one latent tensor, which callers pass to either
    formulation alike, warns."""
    modes = _modes()
    lat = torch.randn(20, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(timesteps=TS, formulation=formulation, method=method, n_classes=10)
    rule = "are for formulation='paper' with method='manifoldgd'"
    _refused(ConfigError, rule, StepGuidance, modes, class_latents=[lat, lat + 1], classes=[0, 1, 0], **kw)
    _refused(ConfigError, rule, StepGuidance, modes, classes=[0, 1, 0], **kw)
    _refused(ConfigError, rule, StepGuidance, modes, class_latents=[lat], **kw)
    with pytest.warns(UserWarning, match="ignores class_latents: they are for formulation='paper'"):
        StepGuidance(modes, class_latents=lat, **kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("formulation,method", [("official", "manifoldgd"), ("official", "mgd3"),
                                                ("paper", "manifoldgd"), ("paper", "mgd3")])
def test_nan_or_inf_modes_are_refused_at_construction_in_every_formulation(formulation, method, bad):
    """Only the paper formulation refused NaN modes; the official one raised torch's _LinAlgError from eigh at
    the first call and MGD3 returned a NaN eps without a word."""
    modes = _modes()
    modes[1, 2, 3, 4] = bad
    lat = torch.randn(20, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(class_latents=lat) if (formulation, method) == ("paper", "manifoldgd") else {}
    _refused(DataError, "^modes: latents contain NaN or inf$", StepGuidance, modes, timesteps=TS,
             formulation=formulation, method=method, n_classes=10, **kw)


@pytest.mark.parametrize("T", [0, -1, 2.5, True, "1000"])
def test_num_train_timesteps_must_be_an_integer_of_at_least_one(T):
    """num_train_timesteps=0 was a ZeroDivisionError, -1 numpy's 'Number of samples, -1, must be non-negative'."""
    _refused(ConfigError, rf"^num_train_timesteps must be an integer >= 1 .*, got {T!r}$", StepGuidance, _modes(),
             timesteps=[0], n_classes=10, t_stop=0, num_train_timesteps=T)


@pytest.mark.parametrize("betas,why", [
    (np.full(1000, np.nan), r"betas must be finite and each in \(0, 1\] .*, got nan at index 0$"),
    (np.r_[np.full(999, 0.01), np.inf], r"got inf at index 999$"),
    (np.full(1000, -0.1), r"got -0.1 at index 0$"),
    (np.r_[np.full(500, 0.01), 1.5, np.full(499, 0.01)], r"got 1.5 at index 500$"),
    (np.r_[0.0, np.full(999, 0.01)], r"got 0.0 at index 0$"),
    (np.full((1000, 2), 0.01), r"^betas must be 1-D, one beta per training step, got shape \(1000, 2\)$"),
    (np.float64(0.01), r"^betas must be 1-D, .* got shape \(\)$"),
    (np.array([]), r"^betas must be 1-D, .* got shape \(0,\)$"),
    (["a"] * 1000, r"^betas must be a 1-D sequence of numbers, got list$"),
])
def test_betas_must_be_one_dimensional_finite_and_in_zero_one(betas, why):
    """NaN, negative or > 1 betas built a StepGuidance that failed at its first call naming an internal
    alpha_bar; (1000, 2) betas were flattened silently into 2,000 training steps."""
    _refused(ConfigError, why, StepGuidance, _modes(), timesteps=TS, n_classes=10, betas=betas)


def test_betas_set_the_number_of_training_steps_the_paper_tau_divides_by():
    """With 2,000 betas and no num_train_timesteps, T stayed the default 1000: the paper's tau = t / T reached
    2 at t = 1999 and its annealed radius left [r_min, r_max]. T is now the betas' length; a different
    num_train_timesteps beside betas or a scheduler is refused (a scheduler's silently replaced it)."""
    from diffusers import DDIMScheduler

    from manifoldgd_fast import modes as modes_mod

    lat = torch.randn(30, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    betas = np.linspace(1e-4, 0.02, 2000)
    g = StepGuidance(_modes(), timesteps=list(range(1999, -1, -40)), formulation="paper", class_latents=lat,
                     n_classes=10, betas=betas)
    assert g.schedule.num_train_timesteps == 2000
    gd = g.guidance
    r_min, r_max = gd.radii
    first = g.schedule.steps - 1      # (the respaced index of the first step, t = 1999)
    r0 = gd.paper_radius(first)     # (a single class: floats; the old code: 'tau must lie in [0, 1], got 1.9995')
    assert r0 == modes_mod.anneal_radius(1999 / 2000, r_min, r_max, gd.cfg.radius_schedule, gd.cfg.radius_a)
    assert min(r_min, r_max) <= r0 <= max(r_min, r_max)
    same = StepGuidance(_modes(), timesteps=list(range(1999, -1, -40)), formulation="paper", class_latents=lat,
                        n_classes=10, betas=betas, num_train_timesteps=2000)
    assert same.guidance.paper_radius(first) == r0
    _refused(ConfigError, r"^num_train_timesteps=1000 but the betas give 2000 training steps: leave "
             r"num_train_timesteps out$", StepGuidance, _modes(), timesteps=TS, n_classes=10, betas=betas,
             num_train_timesteps=1000)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    sched.set_timesteps(50)
    _refused(ConfigError, r"^num_train_timesteps=2000 but the scheduler gives 1000 training", StepGuidance, _modes(),
             n_classes=10, scheduler=sched, num_train_timesteps=2000)
    assert StepGuidance(_modes(), n_classes=10, scheduler=sched).schedule.num_train_timesteps == 1000


def test_schedule_from_timesteps_refuses_betas_of_another_length_than_num_train_timesteps():
    from manifoldgd_fast.schedule import schedule_from_timesteps

    _refused(ConfigError, r"^num_train_timesteps=1000 but betas has 2000 steps$", schedule_from_timesteps,
             [0, 10, 1500], "ddim", betas=np.linspace(1e-4, 0.02, 2000))
    assert schedule_from_timesteps([0, 10, 1500], "ddim", num_train_timesteps=2000,
                                   betas=np.linspace(1e-4, 0.02, 2000)).num_train_timesteps == 2000


def test_zero_terminal_snr_betas_ending_at_one_are_taken():
    """A zero-terminal-SNR schedule's last beta is exactly 1 (diffusers' rescale_betas_zero_snr): in range."""
    betas = rescale_zero_terminal_snr(linear_betas())
    assert betas[-1] == 1.0
    guide = StepGuidance(_modes(), timesteps=list(range(999, -1, -111)), n_classes=10, betas=betas,
                         method="mgd3", prediction_type="v_prediction")
    assert guide.schedule.zero_snr(guide.schedule.steps - 1)
    x, v = _xe()
    out = guide(x, v, 0)
    assert torch.isfinite(out).all() and not torch.equal(out, v)


def test_torch_or_numpy_betas_give_the_same_guidance():
    betas = linear_betas() * 0.9
    x, e = _xe()
    a = StepGuidance(_modes(), timesteps=TS, n_classes=10, betas=betas)(x, e, 0)
    b = StepGuidance(_modes(), timesteps=TS, n_classes=10, betas=torch.tensor(betas))(x, e, 0)
    c = StepGuidance(_modes(), timesteps=TS, n_classes=10)(x, e, 0)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kw,why", [
    (dict(steps=10), r"^steps= is set by StepGuidance itself \(len\(timesteps\)\); do not pass it$"),
    (dict(ipc=5), r"^ipc= is set by StepGuidance itself \(modes.shape\[0\], one mode per sample\); do not pass it$"),
    (dict(lambda_mm=2.0), r"^StepGuidance got an unknown parameter 'lambda_mm' "),
])
def test_steps_ipc_or_an_unknown_parameter_is_named_not_a_typeerror(kw, why):
    """steps= or ipc= gave 'TypeError: DistillConfig() got multiple values for keyword argument' (StepGuidance
    sets both itself), a misspelt parameter a TypeError from DistillConfig.__init__."""
    _refused(ConfigError, why, StepGuidance, _modes(), timesteps=TS, n_classes=10, **kw)


@pytest.mark.parametrize("name, value", [("cgs", True), ("dtype", "float16"), ("sampler", "ddpm"), ("cfg_scale", 9.0),
                                         ("device", "cpu"), ("data", "x"), ("compile", "max-autotune")])
def test_a_distill_setting_the_guidance_does_not_use_is_refused(name, value):
    """StepGuidance(**params) took any DistillConfig field: cgs=True, dtype=, sampler= gave the default guidance
    bit for bit, without a word (a Python API audit); only the guidance's own parameters are taken."""
    _refused(ConfigError, f"^StepGuidance does not use {name!r}, a setting of distill's own loop",
             StepGuidance, _modes(), timesteps=TS, n_classes=10, **{name: value})


def test_every_guidance_parameter_is_taken_and_read():
    """Each of GUIDANCE_PARAMS is a DistillConfig field, taken at its default; and each field the guidance reads
    from its config is one of them (else a parameter that changes the guidance would be refused)."""
    import dataclasses

    from manifoldgd_fast.config import DistillConfig
    from manifoldgd_fast.guidance import GUIDANCE_PARAMS

    defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    x, e = _xe()
    for formulation in ("official", "paper"):
        read = set()

        class Recording(DistillConfig):
            def __getattribute__(self, name):
                if not name.startswith("_"):
                    read.add(name)
                return super().__getattribute__(name)

        from manifoldgd_fast import guidance as G

        real_init = G.Guidance.__init__

        def recorded_init(self, cfg, *a, **k):  # (from the guidance's construction on: resolve() reads them all)
            cfg.__class__ = Recording
            real_init(self, cfg, *a, **k)

        real_nb = G._step_neighbourhoods

        def recorded_nb(cfg, *a, **k):
            cfg.__class__ = Recording
            return real_nb(cfg, *a, **k)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(G.Guidance, "__init__", recorded_init)
            mp.setattr(G, "_step_neighbourhoods", recorded_nb)
            g = StepGuidance(_modes(), timesteps=TS, n_classes=10, formulation=formulation,
                             class_latents=torch.randn(40, *_modes().shape[1:]) if formulation == "paper" else None)
        assert read, "nothing recorded"
        g(x, e, 0)
        fields = set(defaults) - {"method", "formulation", "t_stop", "steps", "ipc", "seed"}
        assert read & fields <= set(GUIDANCE_PARAMS), sorted(read & fields - set(GUIDANCE_PARAMS))
    assert set(GUIDANCE_PARAMS) <= set(defaults)


@pytest.mark.parametrize("timesteps,why", [
    ([float("nan"), 5], "^timesteps must be finite integers .*, got nan$"),
    ([900, float("inf")], "^timesteps must be finite integers .*, got inf$"),
    ([True, False], "^timesteps must be finite integers .*, got True$"),
    ([900, None], "^timesteps must be finite integers .*, got None$"),
    (torch.tensor([[900, 800], [700, 600]]), r"^timesteps must be a 1-D sequence of integers, got torch.int64 of "
                                             r"shape \(2, 2\)$"),
    (torch.tensor([True, False]), r"^timesteps must be a 1-D sequence of integers, got torch.bool"),
    (torch.tensor(5), r"^timesteps must be a 1-D sequence of integers, got torch.int64 of shape \(\)$"),
    (5, "^timesteps must be a sequence of integers, got 5$"),
    ([], "^timesteps is empty"),
])
def test_nan_bool_empty_or_two_dimensional_timesteps_are_one_line_config_errors(timesteps, why):
    """[nan, 5] was int()'s 'cannot convert float NaN to integer', a 2-D tensor 'only one element tensors can be
    converted to Python scalars', [True, False] the timesteps [1, 0] and [] a complaint about --steps."""
    _refused(ConfigError, why, StepGuidance, _modes(), timesteps=timesteps, n_classes=10, t_stop=0)


def test_timesteps_in_any_spelling_give_the_same_guidance():
    x, e = _xe()
    want = StepGuidance(_modes(), timesteps=TS, n_classes=10)(x, e, 0)
    for ts in (torch.tensor(TS), np.array(TS), [float(t) for t in TS], iter(TS)):
        assert torch.equal(StepGuidance(_modes(), timesteps=ts, n_classes=10)(x, e, 0), want)


@pytest.mark.parametrize("config", [5, "ipc=1", [("ipc", 1)], None])
def test_distill_refuses_what_is_not_a_config_or_a_dict(config):
    """distill(5), distill('ipc=1') and distill([...]) were AttributeErrors ("'int' object has no attribute
    'shard'")."""
    _refused(ConfigError, f"^distill takes a DistillConfig or a dict of its fields, got {type(config).__name__}$",
             distill, config)


def test_distill_config_from_python_takes_paths_numpy_ints_and_class_lists(tmp_path):
    """From the Python API (a Python API audit): DistillConfig(out=Path(...)).save() raised TypeError (only
    model / vae were made strings), ipc=np.int64(2) was refused, classes=["0", "1"] was refused (a dict's was
    taken), and a dict with a non-string key was a TypeError from sorted()."""
    import pathlib

    import numpy as np

    from manifoldgd_fast.config import DistillConfig

    cfg = DistillConfig(out=pathlib.Path(tmp_path / "o"), cache_dir=pathlib.Path(tmp_path / "c"), ipc=np.int64(2),
                        classes=["0", "1"])
    assert cfg.out == str(tmp_path / "o") and cfg.cache_dir == str(tmp_path / "c")
    assert type(cfg.ipc) is int and cfg.ipc == 2 and cfg.classes == "0,1"
    cfg.validate()
    cfg.save(str(tmp_path / "c.json"))
    assert DistillConfig.load(str(tmp_path / "c.json")) == cfg
    assert DistillConfig(classes=[0, "n01440764"]).classes == "0,n01440764"
    # a numpy integer in a float field is the flag's float, as a Python int is: one fingerprint either way
    assert DistillConfig(lambda_m=np.int64(1)).to_dict() == DistillConfig(lambda_m=1).to_dict() == \
        DistillConfig(lambda_m=1.0).to_dict()
    with pytest.raises(ConfigError, match="^config: parameter names are strings, got 1$"):
        DistillConfig.from_dict({1: 2})


@pytest.mark.parametrize("latents, why", [
    (lambda m: np.random.randn(40, *m.shape[1:]).astype(np.float32),
     "^class_latents must be a torch.Tensor \\(n, C, h, w\\) or a list of them \\(one per class\\), got ndarray$"),
    (lambda m: [torch.randn(40, *m.shape[1:]), "x"], r"^class_latents\[1\] must be a torch.Tensor \(n, C, h, w\), "
                                                      "got str$"),
    (lambda m: 5, "^class_latents must be a torch.Tensor .*, got int$"),
])
def test_class_latents_that_are_no_tensors_are_named(latents, why):
    """A numpy array was taken as 40 per-class tensors ("with 40 class latent tensors, classes= ..."), a list
    holding a string was an AttributeError, an int a TypeError (a Python API audit)."""
    m = _modes()
    _refused(ConfigError, why, StepGuidance, m, timesteps=TS, n_classes=10, formulation="paper",
             class_latents=latents(m), classes=[0] * m.shape[0])
