"""nanoalign.report: the series it reads from hand-made logs (NaN rows, a truncated last line, the proxy/gold/KL
curve, win-rate standard errors), the figures it writes (files, pixel sizes, one colour per run across figures,
no panel for a metric nobody logged), report.md, --watch, one-line errors, and a report on a real tiny SFT run."""
import json
import math
import os
import struct
import sys

import numpy as np
import pytest

from conftest import ONE_THREAD, assert_user_error, run_cli
from nanoalign import report, report_logs
from nanoalign.cli import UserError

PANEL_PX = (round(report.PANEL_IN[0] * report.DPI), round(report.PANEL_IN[1] * report.DPI))


def write_log(path, rows, tail=""):
    """rows as JSON lines; `tail` is appended without a newline (a row still being written)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write(tail)
    return str(path)


def make_run(d, rows, started, metrics=None):
    """A run directory as the scripts leave it: run.json (its mtime orders the runs), log.jsonl, metrics.json."""
    write_log(os.path.join(d, "log.jsonl"), rows)
    with open(os.path.join(d, "run.json"), "w") as f:
        json.dump({}, f)
    os.utime(os.path.join(d, "run.json"), (started, started))
    if metrics is not None:
        with open(os.path.join(d, "metrics.json"), "w") as f:
            json.dump(metrics, f)
    return str(d)


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])  # IHDR: width, height


def has_colour(path, colour):
    """Does any pixel of the PNG have this colour (within antialiasing's rounding)?"""
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread
    img = imread(path)[..., :3]
    return bool((np.abs(img - np.array(to_rgb(colour))).max(-1) < 0.02).any())


def sft_rows(n=4):
    return [{"step": s, "loss": 3.0 - 0.2 * s, "lr": 1e-3, "grad_norm": 1.0, "elapsed_s": s} for s in range(1, n + 1)]


def pair_rows(scale):
    rows = []
    for s in range(1, 5):
        c, r = 0.1 * s * scale, -0.05 * s * scale
        rows.append({"step": s, "loss": 0.69 - 0.05 * s, "accuracy": 0.5 + 0.1 * s, "chosen_rewards": c,
                     "rejected_rewards": r, "margin": c - r, "lr": 1e-3})
    rows[-1].update(eval_accuracy=0.7, eval_margin=0.2, eval_chosen_rewards=0.1, eval_rejected_rewards=-0.1,
                    eval_loss=0.6)
    return rows


PPO_KEYS = ["score", "gold", "kl", "resp_len", "clipfrac", "approx_kl", "explained_var", "loss"]


def ppo_rows(n=6, keys=PPO_KEYS):
    return [{"step": s, **{k: v for k, v in {"score": 0.3 * s, "gold": 0.5 - 0.02 * s, "kl": 0.5 * s * s,
             "resp_len": 30.0 + s, "clipfrac": 0.02, "approx_kl": 0.003, "explained_var": 0.1 * s,
             "loss": 0.01, "beta": 0.05}.items() if k in keys + ["beta"]}} for s in range(1, n + 1)]


def results_json():
    def model(g, se, w, t, l, kl):
        n = w + t + l
        return {"gold_mean": g, "gold_stderr": se, "n": n, "kl": kl, "win_rate": (w + 0.5 * t) / n, "wins": w,
                "ties": t, "losses": l, "win_rate_non_tied": w / (w + l) if w + l else 0.5}
    return {"base": model(0.30, 0.04, 3, 2, 5, 0.9), "sft": model(0.35, 0.04, 0, 10, 0, 0.0),
            "dpo": model(0.50, 0.05, 7, 1, 2, 0.4), "ppo": model(0.45, 0.05, 6, 0, 4, 0.3),
            "rm": {"rm_accuracy": 0.86, "rm_margin": 3.0, "rm_n": 100}}


@pytest.fixture
def demo(tmp_path):
    """out/demo as `make demo` leaves it, by hand: five runs (two DPO runs to overlay) and results.json. The
    directory names say nothing the report relies on: `b` holds a DPO log."""
    d = tmp_path / "demo"
    make_run(d / "sft", sft_rows(), 1000, {"steps": 4, "loss": 2.2, "eval_loss": 2.5})
    make_run(d / "rm", [{"step": s, "loss": 0.7 - 0.1 * s, "accuracy": 0.5 + 0.1 * s, "margin": 0.2 * s,
                         "reward_mean": 0.0, "reward_std": 1.0} for s in range(1, 5)], 2000)
    make_run(d / "dpo", pair_rows(1.0), 3000)
    make_run(d / "b", pair_rows(2.0), 4000)
    make_run(d / "ppo", ppo_rows(), 5000)
    os.makedirs(d / "data")  # not a run: left out
    with open(d / "results.json", "w") as f:
        json.dump(results_json(), f)
    return d


# --- the series, from hand-made logs ------------------------------------------------------------------------------
def test_read_log_skips_a_truncated_last_line_and_nan_values_point_by_point(tmp_path):
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan"), "skipped": 1}, {"step": 3, "loss": 1.5}]
    path = write_log(str(tmp_path / "log.jsonl"), rows, tail='{"step": 4, "lo')
    got = report_logs.read_log(path)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert report_logs.series(got, "loss") == ([1, 3], [2.0, 1.5])
    assert report_logs.series(got, "skipped") == ([2], [1.0])


def test_a_bad_line_before_the_last_is_a_file_line_error(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(UserError, match=r"log.jsonl:2: not a JSON line"):
        report_logs.read_log(str(path))
    path.write_text('{"step": 1, "loss": 2.0}\n{"loss": 1.0}\n')
    with pytest.raises(UserError, match=r"log.jsonl:2: .*integer \"step\""):
        report_logs.read_log(str(path))


def test_algorithm_is_read_from_the_logged_keys():
    assert report_logs.algorithm(sft_rows()) == "sft"
    assert report_logs.algorithm(pair_rows(1.0)) == "dpo"
    rm_row = {"step": 1, "loss": 0.7, "accuracy": 0.5, "margin": 0.1, "reward_mean": 0.0}
    assert report_logs.algorithm([rm_row]) == "rm"
    assert report_logs.algorithm(ppo_rows(2, ["score", "kl"])) == "ppo"
    assert report_logs.algorithm([{"step": 1, "lr": 0.1}]) is None


def test_overoptimization_series_from_a_hand_made_ppo_log():
    rows = [{"step": 1, "kl": 0.0, "score": -0.5, "gold": 0.40},
            {"step": 2, "kl": 1.0, "score": 0.5},  # no gold (prompts without task metadata): not a point
            {"step": 3, "kl": float("nan"), "score": 0.7, "gold": 0.35},  # a diverged step
            {"step": 4, "kl": 4.0, "score": 1.2, "gold": 0.30},
            {"step": 5, "kl": 9.0, "score": 1.5, "gold": None}]
    assert report_logs.overoptimization(rows) == ([0.0, 4.0], [-0.5, 1.2], [0.40, 0.30])
    gold_reward = [{"step": s, "kl": 0.1 * s, "score": 0.3 + 0.01 * s, "gold": 0.3 + 0.01 * s} for s in range(3)]
    assert report_logs.overoptimization(gold_reward) == ([], [], [])  # the reward IS the gold score: no proxy
    assert report_logs.overoptimization([{"step": 1, "loss": 1.0}]) == ([], [], [])


def test_binned_means_are_sorted_by_kl():
    xs, ys = report_logs.binned([3.0, 1.0, 2.0, 5.0, 4.0], [30.0, 10.0, 20.0, 50.0, 40.0], k=2)
    assert xs == [1.5, 3.5, 5.0] and ys == [15.0, 35.0, 50.0]


def test_win_stderr_and_result_bars_hand_worked():
    assert report_logs.win_stderr(2, 0, 2) == pytest.approx(math.sqrt(1 / 12))  # p = 1/2, var = 4 * 1/4 / 3
    assert report_logs.win_stderr(1, 2, 1) == pytest.approx(math.sqrt(1 / 24))  # var = (1/4 + 0 + 1/4) / 3
    assert report_logs.win_stderr(0, 5, 0) == 0.0
    gold, wins, ref = report_logs.result_bars(results_json())
    assert ref == "sft"  # evaluated on its own samples: KL 0, every prompt a tie
    assert [g[0] for g in gold] == ["base", "sft", "dpo", "ppo"] and gold[2][1:] == (0.50, 0.05)
    assert [w[0] for w in wins] == ["base", "dpo", "ppo"]
    p = 0.75  # dpo: 7 wins, 1 tie, 2 losses of 10
    se = math.sqrt((7 * (1 - p) ** 2 + (0.5 - p) ** 2 + 2 * p ** 2) / 9 / 10)
    assert wins[1][1:] == (pytest.approx(0.75), pytest.approx(se))


# --- figures and report.md ----------------------------------------------------------------------------------------
def test_demo_report_writes_each_figure_at_its_size_with_one_colour_per_run(demo, tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "report")
    figures = report.cli([str(demo), "--out", out])
    assert sorted(figures) == ["dpo.png", "overoptimization.png", "ppo.png", "results.png", "rm.png", "sft.png"]
    w, h = PANEL_PX
    assert png_size(f"{out}/sft.png") == (w, h)  # one panel: the loss
    assert png_size(f"{out}/rm.png") == (3 * w, h)
    assert png_size(f"{out}/dpo.png") == (4 * w, h)
    assert png_size(f"{out}/ppo.png") == (4 * w, 2 * h)  # eight metrics, 4 x 2
    assert png_size(f"{out}/overoptimization.png") == (2 * w, h)
    assert png_size(f"{out}/results.png") == (2 * w, h)
    md = open(f"{out}/report.md").read()
    for f in figures:
        assert md.count(f"]({f})") == 1, f
    assert md.count("![") == len(figures)
    assert "eval_loss 2.5" in md  # SFT's final held-out loss, from metrics.json
    assert "| dpo | 0.500 ± 0.050 | 0.750 ±" in md and "held-out pair accuracy 0.860" in md
    # colours in the order the runs started: sft C0, rm C1, dpo C2, b C3, ppo C4, then the base model C5
    assert has_colour(f"{out}/dpo.png", "C2") and has_colour(f"{out}/dpo.png", "C3")  # two runs overlaid
    assert not has_colour(f"{out}/sft.png", "C2") and has_colour(f"{out}/sft.png", "C0")
    for c in ("C0", "C2", "C4", "C5"):  # the bars of sft, dpo, ppo and base take their runs' colours
        assert has_colour(f"{out}/results.png", c), c
    assert has_colour(f"{out}/ppo.png", "C4") and has_colour(f"{out}/overoptimization.png", "C4")


def test_a_metric_nobody_logged_gets_no_panel(tmp_path):
    pytest.importorskip("matplotlib")
    # RLOO without task metadata: no value head (explained_var) and no gold score, so no over-optimisation curve
    run = make_run(tmp_path / "rloo", ppo_rows(3, ["score", "kl", "resp_len", "clipfrac", "approx_kl", "loss"]), 1)
    out = str(tmp_path / "report")
    assert report.cli([run, "--out", out]) == ["ppo.png"]
    assert png_size(f"{out}/ppo.png") == (3 * PANEL_PX[0], 2 * PANEL_PX[1])  # six panels, 3 x 2
    assert not os.path.exists(f"{out}/overoptimization.png")


def test_nan_rows_a_truncated_last_line_and_a_one_step_run_still_draw(tmp_path):
    pytest.importorskip("matplotlib")
    rows = ppo_rows(5)
    rows[2] = {k: (float("nan") if k != "step" else v) for k, v in rows[2].items()}  # a diverged iteration
    write_log(str(tmp_path / "ppo" / "log.jsonl"), rows, tail='{"step": 6, "score": 1.')
    write_log(str(tmp_path / "one" / "log.jsonl"), sft_rows(1))
    out = str(tmp_path / "report")
    figures = report.cli([str(tmp_path / "ppo"), str(tmp_path / "one"), "--out", out])
    assert sorted(figures) == ["overoptimization.png", "ppo.png", "sft.png"]
    assert png_size(f"{out}/sft.png") == PANEL_PX and has_colour(f"{out}/sft.png", "C1")  # its one point
    assert "| ppo | PPO | 5 |" in open(f"{out}/report.md").read()


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # without it, every one of these is the line that says to install it
    write_log(str(tmp_path / "empty" / "log.jsonl"), [])
    write_log(str(tmp_path / "nan" / "log.jsonl"), [{"step": 1, "loss": float("nan")}])
    write_log(str(tmp_path / "other" / "log.jsonl"), [{"step": 1, "lr": 0.1}])
    (tmp_path / "mid.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 3, "loss": 1}\n')
    os.makedirs(tmp_path / "nothing")
    out = str(tmp_path / "report")
    for args, needle in [([str(tmp_path / "empty")], "no logged steps yet"),
                         ([str(tmp_path / "nan")], "nothing to draw"),
                         ([str(tmp_path / "other")], "not a nanoalign training log"),
                         ([str(tmp_path / "mid.jsonl")], "mid.jsonl:2:"),
                         ([str(tmp_path / "missing")], "no such file"),
                         ([str(tmp_path / "nothing")], "neither a run"),
                         ([str(tmp_path / "nothing"), "--watch", "-1"], "--watch"),
                         ([], "RUN_DIR")]:
        with pytest.raises(SystemExit) as e:
            report.cli([*args, "--out", out])
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (args, err)
    assert_user_error(run_cli(["-m", "nanoalign.report", str(tmp_path / "missing"), "--out", out]), "no such file")


def test_without_matplotlib_one_line_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    for m in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, m, None)  # import fails as if it were not installed
    run = make_run(tmp_path / "sft", sft_rows(), 1)
    with pytest.raises(SystemExit) as e:
        report.cli([run, "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "pip install matplotlib" in err[0]


def test_the_core_never_imports_matplotlib(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(report.__file__)))
    shipped = [os.path.join(root, "nanoalign", f) for f in os.listdir(os.path.join(root, "nanoalign"))
               if f.endswith(".py") and f != "report.py"] + \
        [os.path.join(root, f) for f in os.listdir(root) if f.startswith("train_") and f.endswith(".py")]
    for path in shipped:
        assert "matplotlib" not in open(path).read(), path
    run = make_run(tmp_path / "sft", sft_rows(), 1)
    code = (f"import sys; from nanoalign import report, report_logs; "
            f"rows = report_logs.load_runs([{run!r}])[0].rows; assert len(rows) == 4; "
            "assert 'matplotlib' not in sys.modules")
    r = run_cli(["-c", code])  # reading and extracting the series needs no matplotlib
    assert r.returncode == 0, r.stderr


def test_watch_redraws_the_growing_log_until_the_run_finishes(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path / "sft", sft_rows(2), 1)
    naps = []

    def sleep(seconds):  # the run moves on while the report sleeps: one more row, then it finishes
        naps.append(seconds)
        if len(naps) == 1:
            write_log(os.path.join(run, "log.jsonl"), sft_rows(3))
        else:
            with open(os.path.join(run, "metrics.json"), "w") as f:
                json.dump({"steps": 3, "eval_loss": 2.0}, f)

    monkeypatch.setattr(report.time, "sleep", sleep)
    out = str(tmp_path / "report")
    assert report.main([run], report.Config(out=out, watch=7)) == ["sft.png"]
    assert naps == [7, 7]  # drawn three times: at 2 steps, at 3, and once finished
    assert "| sft | SFT | 3 | loss 2.4, eval_loss 2 |" in open(f"{out}/report.md").read()


def test_watch_stops_on_ctrl_c_for_a_log_that_never_finishes(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    log = write_log(str(tmp_path / "ppo.jsonl"), ppo_rows(3))

    def sleep(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(report.time, "sleep", sleep)
    figures = report.main([log], report.Config(out=str(tmp_path / "report"), watch=1))
    assert sorted(figures) == ["overoptimization.png", "ppo.png"]


def test_report_on_a_real_tiny_sft_run(tmp_path):
    pytest.importorskip("matplotlib")
    data, out = tmp_path / "data", tmp_path / "sft"
    r = run_cli(["-m", "nanoalign.tasks", "make", "--out", str(data), "--n-sft", "16", "--n-prefs", "4",
                 "--n-prompts", "4", "--n-eval", "4"])
    assert r.returncode == 0, r.stderr
    r = run_cli(["train_sft.py", "--init", "tiny", "--data", str(data / "sft.jsonl"), "--out", str(out),
                 "--eval-data", str(data / "sft.jsonl"), "--max-steps", "3", "--log-every", "1", "--lora-rank", "0",
                 "--batch-size", "2", "--device", "cpu"], env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    rep = tmp_path / "report"
    r = run_cli(["-m", "nanoalign.report", str(out), "--out", str(rep)])
    assert r.returncode == 0, r.stderr
    assert "wrote 1 figures" in r.stdout
    assert png_size(rep / "sft.png") == PANEL_PX and has_colour(rep / "sft.png", "C0")
    md = (rep / "report.md").read_text()
    assert md.count("](sft.png)") == 1 and "| sft | SFT | 3 | loss " in md
    assert "eval_loss" in md  # the held-out loss train_sft.py wrote to metrics.json after its last log line
