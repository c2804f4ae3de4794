"""Property tests of the command line's list and number parsers: whatever text a person types
for --budgets, --seeds, --methods, --lr, --epochs, --limit, --width, --batch-size, --name,
--shard or --set NAME=VALUE, the command either accepts it or exits 2 with exactly one ``error: …`` line and never
a traceback. The commands run in-process and stop where the real work would start (the
dataset being read), so each example costs microseconds."""
from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import sslab.cli as cli  # noqa: E402
import sslab.pretrain as pretrain_module  # noqa: E402


class ReachedTheWork(Exception):
    """Raised where the command would start reading data: every check before it passed."""


def stop_at_the_work(*args, **kwargs):
    raise ReachedTheWork


# Text a person can type: any printable character (no NUL, which no argv holds, and no lone
# surrogates, which no terminal sends), and the shapes the parsers care about.
TYPED = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
NUMBER_TEXT = st.one_of(
    TYPED,
    st.integers(-10 ** 40, 10 ** 40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e39", "1e308", "1e400", "-0", "0x10", "1_000", " 3", "3 ", "1,2",
                     "[1]", "", "−1", "٣"]),
)
LIST_TEXT = st.one_of(
    TYPED,
    st.lists(st.one_of(st.integers(-3, 70).map(str), TYPED), max_size=6).map(",".join),
    st.lists(st.integers(-3, 70), max_size=6).map(lambda items: "[" + ", ".join(map(str, items)) + "]"),
    st.sampled_from(["1,,2", ",", "1,1", "[]", "[1, 2", "0", "rotation,rotation", "rotation,vae", "simclr",
                     "rotation,", " rotation "]),
)


def run_command(argv: list, capsys) -> str:
    """``main(argv)`` → "accepted" when every check passed, else the one error line it printed
    (argparse's own errors leave through SystemExit, as from a terminal)."""
    try:
        code = cli.main(argv)
    except ReachedTheWork:
        capsys.readouterr()
        return "accepted"
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err)
    assert err.startswith("error: ") and err.endswith("\n"), (argv, err)
    assert err.count("\n") == 1, (argv, err)  # one line: a value with a newline is shown escaped
    assert "Traceback" not in err
    return err


@pytest.fixture
def stop_before_work(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrain_module, "unlabeled_pool", stop_at_the_work)
    monkeypatch.setattr(pretrain_module, "folder_classes", stop_at_the_work)
    monkeypatch.setattr(cli, "check_budgets_fit", stop_at_the_work)
    return tmp_path


# No example database: the tests write nothing into the repository.
PROPERTY = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(option=st.sampled_from(["--budgets", "--seeds", "--methods"]), value=LIST_TEXT)
def test_curve_list_options_accept_or_refuse_in_one_line(option, value, stop_before_work, capsys):
    result = run_command(["curve", f"{option}={value}", "--out", str(stop_before_work), "--no-progress"], capsys)
    if result != "accepted":
        assert option in result or "argument" in result


@PROPERTY
@given(option=st.sampled_from(["--lr", "--epochs", "--limit", "--width", "--batch-size", "--seed", "--image-size",
                               "--checkpoint-every", "--pool-memory"]), value=NUMBER_TEXT)
@example(option="--pool-memory", value="1e300")  # found by this test: an OverflowError traceback once
@example(option="--lr", value="1e39")
def test_pretrain_number_options_accept_or_refuse_in_one_line(option, value, stop_before_work, capsys):
    result = run_command(["pretrain", f"{option}={value}", "--device", "cpu", "--out", str(stop_before_work),
                          "--no-progress"], capsys)
    if result != "accepted":
        name = option.lstrip("-").replace("-", "_")
        assert name in result or option in result, result


@PROPERTY
@given(option=st.sampled_from(["--name", "--shard", "--val-per-class", "--pretrain-epochs", "--lr"]),
       value=st.one_of(TYPED, NUMBER_TEXT, st.sampled_from(["../x", "/abs", "a/b", "x" * 300, "0/4", "4/4", "1/0"])))
def test_curve_single_values_accept_or_refuse_in_one_line(option, value, stop_before_work, capsys):
    run_command(["curve", f"{option}={value}", "--methods", "rotation", "--out", str(stop_before_work),
                 "--no-progress"], capsys)


@PROPERTY
@given(values=st.fixed_dictionaries({"--budgets": LIST_TEXT, "--seeds": LIST_TEXT, "--methods": LIST_TEXT}))
def test_curve_lists_together_accept_or_refuse_in_one_line(values, stop_before_work, capsys):
    argv = ["curve", "--out", str(stop_before_work), "--no-progress"]
    for option, value in values.items():
        argv.append(f"{option}={value}")
    run_command(argv, capsys)


SETTING_NAMES = sorted({name for method in ("rotation", "vae", "siamese-vae", "simclr")
                        for name in __import__("sslab.pretext", fromlist=["setting_names"]).setting_names(method)})


@PROPERTY
@given(method=st.sampled_from(["rotation", "vae", "siamese-vae", "simclr", "random-init"]),
       name=st.one_of(st.sampled_from(SETTING_NAMES), TYPED), value=st.one_of(NUMBER_TEXT, LIST_TEXT,
                                                                              st.sampled_from(["true", "none", "sgd"])))
@example(method="rotation", name="a\nb", value="1")
@example(method="simclr", name="milestones", value="[0.5,")
def test_pretrain_settings_accept_or_refuse_in_one_line(method, name, value, stop_before_work, capsys):
    result = run_command(["pretrain", "--method", method, "--set", f"{name}={value}", "--device", "cpu",
                          "--out", str(stop_before_work), "--no-progress"], capsys)
    if result != "accepted":
        # (a NAME=VALUE that starts like a flag, "-=", is refused by argparse itself, naming --set too)
        assert result.startswith(("error: --set ", "error: argument --set: ")), result


@pytest.mark.parametrize("argv", [["curve", "--budgets", "1,2,,4"], ["curve", "--seeds", "0,0"],
                                  ["curve", "--methods", "rotation,jigsaw"], ["pretrain", "--lr", "nan"],
                                  ["pretrain", "--lr", "1e400"], ["pretrain", "--epochs", "1e3"],
                                  ["pretrain", "--width", "-0"], ["curve", "--name", "a\nb"],
                                  ["pretrain", "--pool-memory", "1e300"], ["pretrain", "--pool-memory", "inf"]])
def test_known_bad_values_are_refused_in_one_line(argv, stop_before_work, capsys):
    """Examples the properties above stand for, kept so a regression names its case."""
    assert run_command([*argv, "--out", str(stop_before_work)], capsys) != "accepted"
