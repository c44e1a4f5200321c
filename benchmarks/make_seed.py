"""Turn a registered profile (from a `dysco registry export` archive) into a shipped seed profile.

A seed matches a model by name and shape only (its fingerprints are dropped: a user's own
conversion of the same weights, in another dtype or on another machine, must still match), carries
no head-score tensors (seeds are one JSON file), and says where its figures come from.

    python benchmarks/make_seed.py docs/results/qwen2.5-coder-0.5b-gpu-research-loop/study-dev40-seed0/profile.tar.gz \\
        registry/seeds/qwen2.5-coder-0.5b.json --results "docs/results.md, The research loop, round 2" \\
        --heldout '{"task": "kv", ...}'
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path


def make_seed(archive: Path, results: str, heldout: dict | None) -> dict:
    """The seed JSON of the archive's single profile."""
    with tarfile.open(archive) as tar:
        names = [m.name for m in tar.getmembers() if m.name.endswith("/profile.json")]
        if len(names) != 1:
            raise SystemExit(f"{archive}: expected one profile, found {len(names)}")
        profile = json.load(tar.extractfile(names[0]))
    profile["model"]["config_fingerprint"] = profile["model"]["weights_fingerprint"] = None
    keep = ("dev_task", "context_tokens", "dev_examples", "test_examples", "dev", "test", "test_paired",
            "attnts_temperature", "loss_penalty", "adoption")
    profile["metrics"] = {k: profile["metrics"][k] for k in keep if k in profile["metrics"]}
    if heldout:
        profile["metrics"]["heldout"] = heldout
    provenance = profile["provenance"]
    profile["provenance"] = {
        "source": "calibration",
        "results": results,
        "study_name": provenance.get("study_name"),
        "best_trial": provenance.get("best_trial"),
        "trials": provenance.get("trials"),
        "search_space": provenance.get("search_space"),
        "library_versions": provenance.get("library_versions"),
        "created": provenance.get("created"),
        "note": "calibrated profile shipped as a seed; no fingerprints, so it matches a model by name and shape only",
    }
    return profile


def main(argv: list[str] | None = None) -> int:
    """Write the seed JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("archive", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--results", required=True, help="where the profile's measurements are written up")
    p.add_argument("--heldout", type=json.loads, help="held-out measurements (JSON) to record in metrics")
    args = p.parse_args(argv)
    args.out.write_text(json.dumps(make_seed(args.archive, args.results, args.heldout), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
