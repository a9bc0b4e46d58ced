"""config.py: a setting that does nothing for the chosen method/model warns (one line, naming it
and why); a setting that contradicts another is refused (one line, exit code 2)."""
import warnings

import pytest

import config
import train

SD15 = ["--config=sd15_pickapic", "--data_path=/data/pickapic"]


def _ignored(argv):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config.resolve(argv=argv)
    return [str(w.message) for w in caught if issubclass(w.category, config.IgnoredSettingWarning)]


@pytest.mark.parametrize("argv,key,why", [
    (["--method=sft", "--ssr=indicator"], "ssr", "only sspo, sspo_r and spin"),
    (["--method=dpo", "--replay=last"], "replay", "uses the initial model as reference"),
    (["--method=sft", "--loser_steps=4"], "loser_steps", "sft has no reference"),
    (["--method=sdpo", "--loser_steps=4"], "loser_steps", "only sspo"),
    (["--method=sft", "--beta=100"], "beta", "no preference term"),
    (["--method=sft", "--pool_storage=disk"], "pool_storage", "no checkpoint pool"),
    (["--method=dpo", "--pool_storage=memory_bf16"], "pool_storage", "keeps no pool"),
    (["--method=dpo", "--tau=0.5"], "tau", "only dpo_cm and sdpo"),
    (["--method=sspo", "--eps_clip=0.2"], "eps_clip", "only dpo_cm and sdpo"),
    (["--num_frames=8"], "num_frames", "digits makes images"),
    (SD15 + ["--motion_adapter_path=/m"], "motion_adapter_path", "only animatediff has a motion adapter"),
    (SD15 + ["--digits_base_steps=10"], "digits_base_steps", "only the digits model"),
    (SD15 + ["--data_split=pretrain"], "data_split", "only the digits model"),
    (["--resolution=256"], "resolution", "8x8 pixels"),
    (["--hflip"], "hflip", "not augmented"),
    (["--data_path=/x"], "data_path", "built locally"),
    (["--data_split=pretrain", "--digits_classes=3"], "digits_classes", "align split only"),
    (["--init=scratch", "--digits_base_steps=10"], "digits_base_steps", "random weights"),
    (["--replay=last", "--replay_every=300", "--max_steps=300"], "replay", "never holds more than checkpoint 0"),
])
def test_ignored_setting_warns_naming_it_and_why(argv, key, why):
    got = _ignored(argv)
    assert len(got) == 1, got
    assert got[0].startswith(f"setting {key}=") and why in got[0] and "\n" not in got[0]


@pytest.mark.parametrize("argv", [
    [],                                                            # the README's default command
    ["--method=dpo"], ["--method=sft"], ["--method=dpo_cm"], ["--method=spin"],
    ["--method=dpo", "--ssr=sign", "--tau=0.8"],                   # given, but at the default
    SD15 + ["--method=dpo"],                                       # the preset's pool_storage/loser_steps
    ["--config=animatediff_magictime", "--data_path=/v", "--method=sft"],
    ["--method=dpo_cm", "--tau=0.2", "--eps_clip=0.1"],            # used
    ["--method=sspo_r", "--loser_steps=3", "--save_every=5"],      # used
])
def test_used_or_unset_settings_do_not_warn(argv):
    assert _ignored(argv) == []


def test_ignored_settings_without_given_compares_to_defaults():
    cfg = config.resolve(argv=["--method=dpo"])
    cfg.loser_steps = 4  # e.g. a preset file's value
    assert [m.split("=")[0] for m in config.ignored_settings(cfg)] == ["setting loser_steps"]
    assert config.ignored_settings(cfg, given={"beta"}) == []


@pytest.mark.parametrize("argv,match", [
    (["--config=sd15_pickapic", "--data=imagefolder", "--data_path=/x", "--method=sspo_r"],
     "method 'sspo_r' trains on preference pairs.*'imagefolder' has winners only"),
    (["--config=sd15_pickapic", "--data=imagefolder", "--data_path=/x", "--method=dpo"],
     "method 'dpo' trains on preference pairs"),
    (["--config=animatediff_magictime", "--data_path=/v", "--method=sdpo"], "'videofolder' has winners only"),
    (SD15 + ["--init=scratch"], "init='scratch' is the digits model's own pretraining"),
    (["--init=scratch", "--model_path=/m"], "model_path='/m' is given"),
])
def test_contradictions_are_refused(argv, match):
    with pytest.raises(ValueError, match=match):
        config.resolve(argv=argv)


def test_main_prints_one_line_per_ignored_setting_and_exits_2_on_a_contradiction(capsys, monkeypatch):
    def stop(cfg, ctx):
        raise ValueError("stopped before training")

    monkeypatch.setattr(train, "train", stop)
    assert train.main(["--method=sft", "--init=scratch", "--loser_steps=4", "--tau=0.3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: setting loser_steps=4 has no effect: only sspo, sspo_r and spin replay "
                   "checkpoints and sample losers; sft has no reference",
                   "warning: setting tau=0.3 has no effect: only dpo_cm and sdpo weight pairs; sft does not",
                   "error: stopped before training"]
    assert train.main(["--config=sd15_pickapic", "--data=imagefolder", "--data_path=/x", "--method=dpo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: method 'dpo' trains on preference pairs")


def test_one_method_record_per_method_and_what_it_means():
    """config.METHODS: each --method is one record; SPIN-Diffusion is the sspo loss against the
    last checkpoint's samples without SSR; only the SSPO family replays losers."""
    assert set(config.METHODS) == set(config.CHOICES["method"])
    m = config.METHODS
    assert (m["spin"].loss, m["spin"].losers, m["spin"].settings) == ("sspo", "replayed", {"replay": "last", "ssr": "none"})
    assert {n for n, r in m.items() if r.losers == "replayed"} == {"sspo", "sspo_r", "spin"}
    assert {n: r.data_mode for n, r in m.items()} == {
        "sft": "winners", "dpo": "pairs", "dpo_cm": "pairs", "sdpo": "pairs", "sspo": "winners",
        "sspo_r": "random", "spin": "winners"}
    cfg = config.resolve({"method": "spin", "init": "scratch"})
    assert (cfg.replay, cfg.ssr) == ("last", "none")
    assert config.resolve({"method": "spin", "ssr": "sign", "init": "scratch"}).ssr == "sign"  # the command line wins
