"""
Quality against training time: collect the scores of a run's snapshots, print them as a table, plot them.

    python train.py --max-minutes 90 --snapshot-minutes 10,20,30,45,60 --out runs/r     # the snapshots
    python tools/evaluate.py score --ckpt runs/r/ckpt_10min.pt --out-json s/dpm_10.json   # one score each
    python tools/plot_curve.py collect s/*.json --out docs/training_curve.json           # + steps, minutes
    python tools/plot_curve.py plot docs/training_curve.json --out docs/training_curve.png

collect reads, for each score, the checkpoint it names (its step, wall time, batch and learning-rate
schedule), so the points carry what was reached, not what was planned; --extend keeps the points of an
earlier curve. plot prints the markdown table of docs/results.md and draws conditional accuracy and FD /
floor (both at the same number of samples) against the images seen, which, unlike minutes, do not depend on
the machine: one line per sampler setting, and a point of its own for a run that ended on a learning-rate
cooldown. matplotlib is needed by plot only (a tools-only dependency: requirements-tools.txt).
"""
import json
import os
import sys

if __package__ in (None, ""):          # run as a script: the repository's modules, one folder up, and ours
    sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(__file__)]

from tool_flags import parse_plot_curve_args, read_score
from support import UserError, run_cli

if __name__ == "__main__":
    run_cli(lambda: parse_plot_curve_args(sys.argv[1:]))   # --help answers before PyTorch loads

from support import atomic_write, load_checkpoint, refuse_overwrite


def setting(row):
    """'DPM-Solver++(2M) 5, CFG 1.2': how a row was sampled (', lower-order final' where the last step was
    first order, and ', after a cooldown' for a run that ended on one)."""
    name = {"dpm++2m": "DPM-Solver++(2M)", "ddim": "DDIM", "ddpm": "DDPM"}.get(row["sampler"], row["sampler"])
    guidance = "no guidance" if row["cfg_scale"] == 1 else f"CFG {row['cfg_scale']:g}"
    first_order_last = ", lower-order final" if row.get("lower_order_final") else ""
    cooled = ", after a cooldown" if row.get("cooldown") else ""
    return f"{name} {row['steps']}, {guidance}{first_order_last}{cooled}"


def collect(paths):
    """One row per score: the sampling setting, the scores and what the snapshot had reached."""
    rows = []
    for path in paths:
        score = read_score(path, ("ckpt", "accuracy", "fd", "floor", "n"))
        ckpt = load_checkpoint(score["ckpt"])
        args = ckpt.get("args") or ckpt.get("training", {}).get("args") or {}
        batch = args.get("batch_size") or ckpt.get("training", {}).get("batch_size")
        if not batch:
            raise UserError(f"{score['ckpt']} does not say its batch size, so its images seen are unknown")
        decay = args.get("decay_steps") or 0        # a point inside a cooldown, not one of a constant rate
        rows.append({"minutes": round(ckpt.get("wall_time_s", 0.0) / 60, 1), "step": ckpt["step"],
                     "cooldown": bool(decay) and ckpt["step"] > args["steps"] - decay,
                     "machine": score.get("machine"),
                     "images_seen": ckpt["step"] * batch,
                     "checkpoint": os.path.basename(score["ckpt"]),
                     **{k: score[k] for k in ("sampler", "steps", "cfg_scale", "n", "accuracy", "fd",
                                              "floor")},
                     "lower_order_final": bool(score.get("lower_order_final")),
                     "worst_class_accuracy": min(score.get("per_class_accuracy") or [score["accuracy"]])})
    return sorted(rows, key=lambda r: (setting(r), r["step"]))


def markdown(rows):
    lines = ["| minutes | steps | images seen | sampler | samples | accuracy | "
             "worst class | FD | floor | FD / floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["step"], setting(r))):
        images = f"{r['images_seen'] / 1e3:,.0f}k" if r["images_seen"] else "?"
        lines.append(f"| {r['minutes']:g} | {r['step']:,} | {images} | {setting(r)} | {r['n']:,} | "
                     f"{100 * r['accuracy']:.2f} % | {100 * r['worst_class_accuracy']:.1f} % | "
                     f"{r['fd']:.2f} | {r['floor']:.2f} | {r['fd'] / r['floor']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """Accuracy and FD / floor against images seen, a line per sampler setting, written atomically."""
    import matplotlib
    matplotlib.use("Agg")                     # files only: no display needed
    import matplotlib.pyplot as plt
    fig, (acc, fd) = plt.subplots(1, 2, figsize=(10, 5))
    for name in sorted({setting(r) for r in rows}):
        mine = sorted((r for r in rows if setting(r) == name), key=lambda r: r["step"])
        seen = [r["images_seen"] / 1e3 for r in mine]
        style = "*" if mine[0].get("cooldown") else "o-"
        acc.plot(seen, [100 * r["accuracy"] for r in mine], style, ms=10 if style == "*" else 5, label=name)
        fd.plot(seen, [r["fd"] / r["floor"] for r in mine], style, ms=10 if style == "*" else 5, label=name)
    acc.set(xlabel="images seen (thousands; batch 32)", ylabel="conditional accuracy (%)", title="Accuracy")
    fd.set(xlabel="images seen (thousands; batch 32)", ylabel="FD / floor (1 = real digits)",
           title="FD / floor")
    fd.axhline(1, color="grey", lw=0.8, ls="--")
    for ax in (acc, fd):
        ax.grid(alpha=0.3)
    # One legend under both panels, where it hides no point.
    fig.legend(*acc.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8)
    n = sorted({r["n"] for r in rows})
    fig.suptitle(f"DiT-T/4 on MNIST, python train.py's CPU recipe; "
                 f"{', '.join(f'{k:,}' for k in n)} samples per point",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def main(argv=None):
    args = parse_plot_curve_args(argv)
    refuse_overwrite({"--out": args.out},
                     {p: p for p in (args.scores if args.command == "collect" else [args.curve])})
    if args.command == "collect":
        rows = collect(args.scores)
        if args.extend:
            try:
                with open(args.extend) as f:
                    rows = json.load(f) + rows
            except (OSError, ValueError) as e:
                raise UserError(f"--extend {args.extend}: not a readable curve JSON ({e}); "
                                f"write it with `plot_curve.py collect`") from None
        atomic_write(args.out, lambda f: json.dump(rows, f, indent=1), binary=False)
        print(f"{args.out}: {len(rows)} points")
        return
    try:
        with open(args.curve) as f:
            rows = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{args.curve}: not a readable curve JSON ({e}); "
                        f"write it with `plot_curve.py collect`")
    print(markdown(rows), end="")
    plot(rows, args.out)
    print(f"-> {args.out}")


if __name__ == "__main__":
    run_cli(main)
