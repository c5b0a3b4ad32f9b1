"""ROOT/report.md for launch/reproduce_paper.sh: each run's accuracy beside the paper's main table, and links to its
evaluation files and circuit analyses (analysis/<kind>/summary.md and figures).

A run not yet evaluated or analysed is listed as such, so the report can be written at any time.

    python3 launch/paper_report.py --root=workdirs/paper [--encoders=rte,t5] [--sizes=b,nano]
"""

import argparse
import json

from etils import epath

from relcirc_jax.analysis import KINDS
from relcirc_jax.config import ENCODERS, SIZES
from relcirc_jax.evaluation.scoring import PAPER_COLUMNS

# The paper's main results table ("Circuit Mechanisms for Spatial Relation Generation in Diffusion Transformers"), in %,
# by (encoder, size), columns as PAPER_COLUMNS names them: DiT-B with T5, RTE and RTE without positions, and only the
# relation of DiT-nano with RTE; it reports neither MiniLM nor the other sizes.
PAPER_SOURCE = "Wang et al., CVPR 2026, arXiv 2601.06338, main results table"
PAPER = {
    ("t5", "b"): {"Color": 99, "Shape": 97, "Unique Binding": 93, "Spatial Relation": 89},
    ("rte", "b"): {"Color": 99, "Shape": 96, "Unique Binding": 90, "Spatial Relation": 86},
    ("rte_nopos", "b"): {"Color": 99, "Shape": 96, "Unique Binding": 41, "Spatial Relation": 15},
    ("rte", "nano"): {"Spatial Relation": 5},
}
# The paper's circuit findings (same source), to read beside each run's analysis summaries.
PAPER_CIRCUITS = (
    "RTE DiT-B: relation heads (e.g. L2H8) read the relation word and write positions into the object tokens; "
    "ablating L2H8 drops the relation from 67 to 33 %. Object heads (e.g. L4H3) draw the shapes; ablating L4H3 "
    "drops the shape from 90 to 76 %.",
    "T5 DiT-B: the relation is fused into the noun tokens; ablating the relation word barely matters, ablating the "
    "second shape word costs ~50 % of the relation accuracy; filler words ('the') hurt T5 models, RTE ones are stable.",
)
EXTRA_COLUMNS = {"relation strict": "spatial_relationship", "overall": "overall"}


def _cell(accuracy: float | None, paper: int | None = None) -> str:
    """An accuracy in % ("-" when missing), the paper's value after it in brackets when it has one."""
    ours = "-" if accuracy is None else f"{100 * accuracy:.1f}"
    return ours if paper is None else f"{ours} ({paper})"


def _accuracy_rows(root: epath.Path, encoder: str, size: str) -> list[str]:
    """Markdown rows of one run: one per detector of its eval.json, or one saying it is not evaluated yet."""
    name = f"{encoder}_dit_{size}"
    paper = PAPER.get((encoder, size), {})
    path = root / name / "eval.json"
    tables = json.loads(path.read_text())["tables"] if path.exists() else {"not evaluated yet": None}
    rows = []
    for detector, table in tables.items():
        ours = table["overall"] if table else {}
        cells = [_cell(ours.get(metric), paper.get(column)) for column, metric in PAPER_COLUMNS.items()]
        cells += [_cell(ours.get(metric)) for metric in EXTRA_COLUMNS.values()]
        run = [f"{table['step']:,}", f"{table['num_images']:,}"] if table else ["-", "-"]
        rows.append("| " + " | ".join([name, detector, *run, *cells]) + " |")
    return rows


def _links(root: epath.Path, name: str) -> list[str]:
    """Markdown list items linking one run's evaluation files and each analysis' summary and figures."""
    run = root / name
    files = [p for p in sorted(run.glob("eval*")) if p.suffix in (".json", ".md", ".png")]
    evaluation = [f"[{p.name}]({name}/{p.name})" for p in files]
    items = [f"- evaluation: {', '.join(evaluation) or 'not run yet'}"]
    for kind in KINDS:
        directory = run / "analysis" / kind
        if not (directory / "summary.md").exists():
            items.append(f"- {kind}: not run yet")
            continue
        figures = ", ".join(f"[{p.name}]({name}/analysis/{kind}/{p.name})" for p in sorted(directory.glob("*.png")))
        items.append(f"- {kind}: [summary.md]({name}/analysis/{kind}/summary.md); figures: {figures or 'none'}")
    return items


def write_report(root, encoders=ENCODERS, sizes=SIZES) -> epath.Path:
    """Writes and returns root/report.md for the runs root/{encoder}_dit_{size}."""
    root = epath.Path(root)
    header = ["run", "detector", "step", "images", *PAPER_COLUMNS, *EXTRA_COLUMNS]
    lines = [
        "# Reproduction of Wang et al. 2026: results",
        "",
        f"Accuracy in % on the paper's protocol (each run's eval.json), the paper's value in brackets ({PAPER_SOURCE}; "
        "'Spatial Relation' is the loose relation, the paper's most likely column). Relation columns count only "
        "images whose binding is unique; 'overall' needs colour, shape, unique binding and the strict relation.",
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
    ]
    grid = [(encoder, size) for encoder in encoders for size in sizes]
    lines += [row for encoder, size in grid for row in _accuracy_rows(root, encoder, size)]
    lines += ["", "The paper's circuit findings, to compare with the analyses below:", ""]
    lines += [f"- {finding}" for finding in PAPER_CIRCUITS]
    for encoder, size in grid:
        lines += ["", f"## {encoder}_dit_{size}", "", *_links(root, f"{encoder}_dit_{size}")]
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="the runs' parent directory (launch/reproduce_paper.sh --root)")
    parser.add_argument("--encoders", default=",".join(ENCODERS))
    parser.add_argument("--sizes", default=",".join(SIZES))
    args = parser.parse_args()
    print(write_report(args.root, args.encoders.split(","), args.sizes.split(",")))


if __name__ == "__main__":
    main()
