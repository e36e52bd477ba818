"""Why a datamodel does or does not rank the held-out models: diagnostics of a finished
``attribution/method=datamodels`` run, read from its ``values.json`` (issue 13; Lin, Lu & Lee).

- ``self_prediction``: how far gamma is a linear function of the subset among models of one kind,
  as the pooled k-fold Spearman correlation of a ridge datamodel's predictions (``fit_datamodel``,
  paper eq. 1) with the gammas it did not see. Near zero, no datamodel fitted on these models can
  have skill; for the unlearned models it says whether the cheap proxies carry a signal at all.
- ``group_count_correlation``: Spearman correlation of gamma with the number of kept units of each
  class (units named ``c<class>-g<k>``, ``units.kind=class_groups``). When retrained and unlearned
  models respond to a class's share with opposite signs, the unlearned datamodel ranks the held-out
  models the wrong way on that direction, whatever its fit.

``python -m cdm.attribution.diagnostics <attribution folder or values.json> [...]`` prints them.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from cdm.attribution.datamodels import fit_datamodel
from cdm.attribution.removal import unlearned_subsets

_CLASS_GROUP = re.compile(r"(c\d+)-g\d+")


def self_prediction(
    masks: np.ndarray, gammas: Sequence[float] | np.ndarray, folds: int = 8, seed: int = 0
) -> float:
    """Pooled k-fold Spearman of ridge predictions of gamma from 1_S, each model predicted by a
    datamodel fitted on the other folds (``fit_datamodel``: penalty by cross-validation)."""
    x = np.asarray(masks, dtype=bool)
    y = np.asarray(gammas, dtype=np.float64)
    if len(y) < 2 * folds:
        raise ValueError(f"self_prediction: {len(y)} models are too few for {folds} folds")
    order = np.random.default_rng(seed).permutation(len(y))
    predicted = np.empty_like(y)
    for fold in np.array_split(order, folds):
        rest = np.setdiff1d(order, fold)
        model = fit_datamodel(x[rest], y[rest])
        predicted[fold] = x[fold] @ model.tau + model.intercept
    return float(spearmanr(predicted, y).statistic)


def class_of_units(names: Sequence[str]) -> dict[str, np.ndarray] | None:
    """``{class: unit mask}`` for units named ``c<class>-g<k>``; None for other units."""
    matches = [_CLASS_GROUP.fullmatch(str(n)) for n in names]
    if not all(matches):
        return None
    labels = np.array([m.group(1) for m in matches])
    return {c: labels == c for c in sorted(set(labels), key=lambda c: int(c[1:]))}


def group_count_correlation(
    masks: np.ndarray, gammas: Sequence[float] | np.ndarray, groups: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """``{group: Spearman(number of the group's units kept, gamma)}`` over the models."""
    x = np.asarray(masks, dtype=bool)
    return {g: float(spearmanr(x[:, m].sum(1), gammas).statistic) for g, m in groups.items()}


def diagnose(values: Mapping[str, Any], folds: int = 8) -> dict[str, Any]:
    """The diagnostics of one run's ``values.json``: self-prediction of the unlearned and of the
    from-scratch models (held-out and retraining subsets together), and each class's count against
    the held-out and the unlearned gammas."""
    n = int(values["n_units"])
    heldout = np.asarray(values["subsets"]["heldout"], dtype=bool)
    retrain = np.asarray(values["subsets"]["retrain"], dtype=bool)
    gamma_unlearn = np.asarray(values["gamma_unlearn"], dtype=np.float64)
    unlearn = unlearned_subsets(n, len(gamma_unlearn), float(values["alpha"]), int(values["seed"]))
    scratch = np.vstack([heldout, retrain])
    gamma_scratch = np.concatenate([values["gamma_heldout"], values["gamma_retrain"]])
    out: dict[str, Any] = {
        "target": values.get("target"),
        "property": values.get("property"),
        "unlearned_self_spearman": self_prediction(unlearn, gamma_unlearn, folds),
        "from_scratch_self_spearman": self_prediction(scratch, gamma_scratch, min(folds, len(gamma_scratch) // 2)),
    }  # fmt: skip
    groups = class_of_units(list(values["units"]))
    if groups is not None:
        out["heldout_vs_class_count"] = group_count_correlation(
            heldout, values["gamma_heldout"], groups
        )
        out["unlearned_vs_class_count"] = group_count_correlation(unlearn, gamma_unlearn, groups)
    return out


def values_path(path: str | Path) -> Path:
    """``values.json`` of an attribution folder (or the file itself)."""
    p = Path(path)
    p = p / "values.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no values.json of a cdm-attribute datamodels run there")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Print the diagnostics of each run named on the command line."""
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print(
            "usage: python -m cdm.attribution.diagnostics <attribution folder or values.json> ..."
        )
        return 2
    for path in paths:
        try:
            values = json.loads(values_path(path).read_text())
            result = diagnose(values)
        except KeyError as err:
            print(f"{path}: not the values.json of a datamodels run (no {err}); run "
                  "cdm-attribute attribution/method=datamodels first", file=sys.stderr)  # fmt: skip
            return 2
        except (FileNotFoundError, ValueError) as err:
            print(f"{path}: {err}", file=sys.stderr)
            return 2
        print(f"{path} ({result['target']}, {result['property']}):")
        print(
            f"  unlearned models, k-fold self-prediction (Spearman): {result['unlearned_self_spearman']:.3f}"
        )
        print(
            f"  from-scratch models, k-fold self-prediction:         {result['from_scratch_self_spearman']:.3f}"
        )
        for kind in ("heldout", "unlearned"):
            counts = result.get(f"{kind}_vs_class_count")
            if counts:
                shown = ", ".join(f"{c} {r:+.2f}" for c, r in counts.items())
                print(f"  {kind} gamma vs kept units of each class (Spearman): {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
