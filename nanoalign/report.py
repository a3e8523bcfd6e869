"""See a run: PNG figures and a one-page report.md from the logs that the training scripts and evaluate write.

    python -m nanoalign.report out/demo --out out/demo/report          # every run in out/demo, and results.json
    python -m nanoalign.report out/dpo_a out/dpo_b --out report        # several runs, overlaid
    python -m nanoalign.report out/ppo --out report --watch 30         # redraw every 30 s while it trains
    python -m nanoalign.report docs/ppo_rm_overoptimization.jsonl --out docs/report

An argument is a run directory (its log.jsonl), a bare log .jsonl, or a directory of runs such as out/demo: the
runs in it, oldest first, and its results.json from `python -m nanoalign.evaluate --compare`. The algorithm is read
from the logged keys, not from the directory's name. Figures:
  sft.png, rm.png, dpo.png, ppo.png  each algorithm's metrics against step, its runs overlaid, and held-out numbers
                                     (eval_KEY) as hollow diamonds where they were logged
  overoptimization.png               PPO's proxy (RM) score and gold score against KL(π‖π_ref) (Gao et al. 2022)
  results.png                        gold score per model and win rate against the reference, ± standard error

A run has one colour in every figure (a model in results.json that of its run); a metric no run logged gets no
panel. Reading the logs is plain Python (report_logs.py); matplotlib (the extra `plots`) is imported only to draw.
"""
import math
import os
import time
from dataclasses import dataclass

from .cli import UserError, build_parser, check, one_line_errors
from .report_logs import (BIN, Run, algorithm, binned, find_inputs, finite, load_runs, overoptimization, read_json,
                          result_bars, series)

PANEL_IN, DPI = (4.5, 3.4), 100  # each panel's size in inches, and pixels per inch: PNGs of a known size
PALETTE = [f"C{i}" for i in range(10)]  # matplotlib's default colour cycle (tab10)
TITLE = {"sft": "SFT", "rm": "Reward model", "dpo": "DPO", "ppo": "PPO"}
# algorithm -> panels: (title, y label, keys). Two keys share a panel (solid, dashed); eval_KEY is KEY held out.
PANELS = {
    "sft": [("training loss", "NLL (nats / token)", ["loss"])],
    "rm": [("loss: −log σ(r_c − r_r)", "nats / pair", ["loss"]),
           ("pairwise accuracy", "fraction of pairs with r_c > r_r", ["accuracy"]),
           ("reward margin", "r_c − r_r (RM score units)", ["margin"])],
    "dpo": [("loss", "nats / pair", ["loss"]),
            ("implicit reward margin", "chosen − rejected (nats)", ["margin"]),
            ("reward accuracy", "fraction of pairs, chosen > rejected", ["accuracy"]),
            ("implicit rewards: chosen —, rejected --", "β · log π/π_ref (nats)", ["chosen_rewards",
                                                                                  "rejected_rewards"])],
    "ppo": [("proxy reward (the RM's score)", "score / response", ["score"]),
            ("gold score (task checker)", "fraction of constraints met", ["gold"]),
            ("KL(π ‖ π_ref)", "nats / response", ["kl"]),
            ("response length", "tokens", ["resp_len"]),
            ("clip fraction", "fraction of tokens clipped", ["clipfrac"]),
            ("approx. KL(π_old ‖ π) per update", "nats / token", ["approx_kl"]),
            ("value head: explained variance", "1 − Var(R − V) / Var(R)", ["explained_var"]),
            ("loss", "per minibatch (mean)", ["loss"])],
}


# --- drawing: matplotlib, imported here only ----------------------------------------------------------------------
def matplotlib_figure():
    """matplotlib's Figure and Agg canvas, or one line that says how to install it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("nanoalign.report draws with matplotlib, which is not installed: pip install matplotlib "
                        "(or pip install -e '.[plots]')")
    return Figure, FigureCanvasAgg


def new_figure(n_panels: int):
    """A figure of n panels in a grid (4 across at most) of PANEL_IN each; the slots past n are switched off."""
    Figure, FigureCanvasAgg = matplotlib_figure()
    cols = n_panels if n_panels <= 4 else math.ceil(n_panels / 2)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(PANEL_IN[0] * cols, PANEL_IN[1] * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg, and no pyplot: no display, no global list of figures to grow while --watch redraws
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for i, ax in enumerate(axes):
        ax.grid(alpha=0.3) if i < n_panels else ax.set_axis_off()
    return fig, axes[:n_panels]


def draw_runs(runs: list[Run], algo: str, colors: dict, path: str) -> bool:
    """One panel per metric that some run logged; each run a line in its colour, held-out points as diamonds."""
    has = lambda k: any(series(r.rows, k)[0] or series(r.rows, "eval_" + k)[0] for r in runs)  # noqa: E731
    panels = [p for p in PANELS[algo] if any(has(k) for k in p[2])]
    if not panels:
        return False
    fig, axes = new_figure(len(panels))
    any_eval = False
    for ax, (title, ylabel, keys) in zip(axes, panels):
        for run in runs:
            for key, style in zip(keys, ("-", "--")):
                x, y = series(run.rows, key)
                ax.plot(x, y, style, color=colors[run.name], marker="o" if len(x) <= 30 else None, ms=3, lw=1.6)
                ex, ey = series(run.rows, "eval_" + key)
                ax.plot(ex, ey, "D", color=colors[run.name], mfc="white", mew=1.6, ms=6, ls="none")
                any_eval |= bool(ex)
        ax.set(title=title, xlabel="PPO iteration" if algo == "ppo" else "optimizer step", ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    handles = [axes[0].plot([], [], color=colors[r.name], lw=2, label=r.name)[0] for r in runs]
    if any_eval:
        handles.append(axes[0].plot([], [], "D", color="0.3", mfc="white", ls="none", label="held-out eval")[0])
    axes[0].legend(handles=handles, fontsize=8)
    fig.suptitle(f"{TITLE[algo]}: {', '.join(r.name for r in runs)}")
    fig.savefig(path)
    return True


def draw_overoptimization(runs: list[Run], colors: dict, path: str) -> bool:
    """Proxy and gold against KL, one panel each, every run a line of binned means over its single iterations."""
    curves = [(r, c) for r, c in ((r, overoptimization(r.rows)) for r in runs) if c[0]]
    if not curves:
        return False
    fig, axes = new_figure(2)
    for run, (kl, proxy, gold) in curves:
        for ax, ys in zip(axes, (proxy, gold)):
            ax.plot(kl, ys, "o", color=colors[run.name], alpha=0.3, ms=4)
            ax.plot(*binned(kl, ys), "o-", color=colors[run.name], lw=2, label=run.name)
    kl_label = "KL(π ‖ π_ref), nats / response"
    axes[0].set(title="proxy reward (what PPO maximises)", ylabel="RM score / response", xlabel=kl_label)
    axes[1].set(title="gold score (what we wanted)", ylabel="fraction of constraints met", xlabel=kl_label)
    axes[0].plot([], [], "o", color="0.3", alpha=0.3, label="one iteration")
    axes[0].plot([], [], "o-", color="0.3", lw=2, label=f"mean of {BIN} iterations, by KL")
    axes[0].legend(fontsize=8)
    fig.suptitle("Reward over-optimisation (Gao et al. 2022): proxy and gold score against KL")
    fig.savefig(path)
    return True


def draw_results(results: dict, colors: dict, path: str) -> bool:
    """Bars with standard-error bars: gold score per model; win rate against the reference (0.5 = a draw)."""
    gold, wins, ref = result_bars(results)
    if not gold:
        return False
    fig, axes = new_figure(2 if wins else 1)
    panels = [(axes[0], gold, "gold score ± s.e.", "fraction of constraints met")]
    if wins:
        panels.append((axes[1], wins, f"win rate vs {ref or 'the reference'} (ties ½) ± s.e.", "fraction of prompts"))
        axes[1].axhline(0.5, color="0.4", ls="--", lw=1)
    for ax, bars, title, ylabel in panels:
        rects = ax.bar(*zip(*[b[:2] for b in bars]), yerr=[b[2] for b in bars], capsize=5,
                       color=[colors[b[0]] for b in bars])
        for r, b in zip(rects, bars):  # the value at the foot of its bar, clear of the error bar
            ax.text(r.get_x() + r.get_width() / 2, 0.02, f"{b[1]:.3f}", ha="center", color="white", weight="bold")
        ax.set(title=title, ylabel=ylabel, xlabel="model", ylim=(0, 1))
    n = [v["n"] for v in results.values() if isinstance(v, dict) and type(v.get("n")) is int]
    fig.suptitle("Held-out evaluation, gold judge" + (f" ({max(n)} responses per model)" if n else ""))
    fig.savefig(path)
    return True


def results_md(results: dict, path: str) -> list[str]:
    gold, wins, ref = result_bars(results)
    nt = lambda m: results[m]["win_rate_non_tied"] if finite(results[m].get("win_rate_non_tied")) else math.nan  # noqa
    w = {m: f"{r:.3f} ± {se:.3f} | {nt(m):.3f}" for m, r, se in wins}
    lines = ["## Held-out results", "", f"`{path}`: win rate against {ref or 'the reference'} with ties as ½, and "
             "over the non-tied prompts.", "", "| model | gold ± s.e. | win rate ± s.e. | non-tied |",
             "|---|---|---|---|"]
    lines += [f"| {m} | {g:.3f} ± {se:.3f} | {w.get(m, '— | —')} |" for m, g, se in gold]
    rm = results.get("rm")
    if isinstance(rm, dict) and finite(rm.get("rm_accuracy")):
        lines += ["", f"Reward model: held-out pair accuracy {rm['rm_accuracy']:.3f} (n={rm.get('rm_n')})."]
    return lines + ["", "![gold score and win rate per model](results.png)"]


def draw_report(paths: list[str], results_path: str | None, out: str, waiting: bool = False) -> list[str]:
    """Draw every figure and write report.md into `out`; returns the figure file names."""
    runs = load_runs(paths, waiting)
    results = read_json(results_path) if results_path else {}
    check(isinstance(results, dict), f"{results_path}: not a JSON object of models (evaluate --compare --out)")
    results = {"model": results} if "gold_mean" in results else results  # a single --model evaluation
    names = dict.fromkeys([r.name for r in runs] + [g[0] for g in result_bars(results)[0]])  # in order, once each
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}  # a run keeps its colour in every figure
    os.makedirs(out, exist_ok=True)
    by_algo = {}
    for r in runs:
        by_algo.setdefault(algorithm(r.rows), []).append(r)
    lines, figures = ["# nanoalign report", ""], []
    if runs:
        lines += ["| run | algorithm | last step | last logged values | log |", "|---|---|---|---|---|"]
    for r in runs:  # the last value of the first three metrics, and of their held-out twins
        algo = algorithm(r.rows)
        keys = [k for p in PANELS[algo][:3] for k in (p[2][0], "eval_" + p[2][0]) if series(r.rows, k)[0]]
        lines.append(f"| {r.name} | {TITLE[algo]} | {r.rows[-1]['step']} | "
                     + ", ".join(f"{k} {series(r.rows, k)[1][-1]:.4g}" for k in keys) + f" | `{r.log}` |")
    for algo in ("sft", "rm", "dpo", "ppo"):
        if algo in by_algo and draw_runs(by_algo[algo], algo, colors, os.path.join(out, f"{algo}.png")):
            figures.append(f"{algo}.png")
            lines += ["", f"## {TITLE[algo]}", "", f"![{TITLE[algo]} metrics against step]({algo}.png)"]
    if "ppo" in by_algo and draw_overoptimization(by_algo["ppo"], colors, os.path.join(out, "overoptimization.png")):
        figures.append("overoptimization.png")
        lines += ["", "## Over-optimisation", "", "The proxy reward (the RM's score, which PPO maximises) and the "
                  "gold score (the task checker, never trained on) against KL(π‖π_ref). A proxy that keeps rising "
                  "while the gold score turns down is the RM being over-optimised (Gao et al. 2022).", "",
                  "![proxy and gold score against KL](overoptimization.png)"]
    if results and draw_results(results, colors, os.path.join(out, "results.png")):
        figures.append("results.png")
        lines += [""] + results_md(results, results_path)
    check(bool(figures) or waiting, "nothing to draw: no run logged a metric this report knows")
    with open(os.path.join(out, "report.md.tmp"), "w") as f:
        f.write("\n".join(lines + ([] if figures else ["", "Nothing logged yet."])) + "\n")
    os.replace(os.path.join(out, "report.md.tmp"), os.path.join(out, "report.md"))  # never half a report
    return figures


@dataclass
class Config:
    """Figures and report.md for training runs (RUN_DIR, a log .jsonl, or a directory of runs such as out/demo)."""
    out: str = ""  # output directory for the PNGs and report.md
    watch: int = 0  # redraw every N seconds until every run has finished (metrics.json) or Ctrl-C; 0 = draw once


def main(paths: list[str], cfg: Config) -> list[str]:
    check(bool(cfg.out), "--out is required")
    check(not os.path.isfile(cfg.out), f"--out {cfg.out}: is a file, not a directory")
    check(cfg.watch >= 0, f"--watch must be >= 0 seconds, got {cfg.watch}")
    matplotlib_figure()  # no matplotlib: say so before any log is read
    t0 = time.time()
    found, results, finished = find_inputs(paths)
    figures = draw_report(found, results, cfg.out, waiting=cfg.watch > 0)
    print(f"wrote {len(figures)} figures and report.md to {cfg.out} in {time.time() - t0:.1f}s", flush=True)
    try:
        while cfg.watch and not finished:  # --watch: until the runs finish, or Ctrl-C
            time.sleep(cfg.watch)
            found, results, finished = find_inputs(paths)  # a directory of runs may have gained a run
            figures = draw_report(found, results, cfg.out, waiting=True)
            print(f"{time.strftime('%H:%M:%S')} redrew {len(figures)} figures in {cfg.out}"
                  + ("" if finished else f"; next in {cfg.watch}s, Ctrl-C stops"), flush=True)
    except KeyboardInterrupt:  # the way to stop watching a log that never says it has finished
        pass
    return figures


def cli(argv=None):
    p = build_parser(Config, prog="python -m nanoalign.report")
    p.add_argument("paths", nargs="+", metavar="RUN_DIR")
    with one_line_errors():
        args = vars(p.parse_args(argv))
        return main(args.pop("paths"), Config(**args))


if __name__ == "__main__":
    cli()
