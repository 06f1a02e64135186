#!/usr/bin/env python
"""Paired patient-level bootstrap comparisons of the students of an evaluated ICU run
(configs/icu_distill.yaml): multimodal vs each unimodal student, distilled vs plain compact
time-series student, on the test samples both students cover (docs/evidence-modalities.md).

    python bench/compare_modalities.py runs/icu-distill [runs/icu-distill-seed1 ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAIRS = (("multi_ehr_tab", "ehr_plain"), ("multi_ehr_tab", "tab_plain"), ("ehr_distilled", "ehr_plain"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run.out_dir of evaluated runs")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    from kdscale.eval.analysis import compare
    from kdscale.eval.predictions import read_predictions

    for run in args.runs:
        for a, b in PAIRS:
            pa = read_predictions(Path(run) / "eval" / a / args.split / "predictions.csv")
            pb = read_predictions(Path(run) / "eval" / b / args.split / "predictions.csv")
            c = compare(pa, pb, "routed", "routed", n_boot=args.bootstrap, seed=0, name_a=a, name_b=b)
            r = c["auroc_macro"]
            print(f"{run}: {a} - {b}: n={c['n']} AUROC {r['a']:.3f} vs {r['b']:.3f}, diff {r['diff']:+.3f} "
                  f"[{r['low']:+.3f}, {r['high']:+.3f}] p={r['p_value']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
