"""`headfinder`: score every attention head of a model on synthetic probes, choose a head set, check it.

    headfinder detect --model smollm2-135m                 # scores, head set, heatmaps, summary
    headfinder show headfinder-out/smollm2-135m-seed0       # or a registry profile: smollm2-135m@latest
    headfinder validate --model smollm2-135m --from headfinder-out/smollm2-135m-seed0
    headfinder compare RUN_A RUN_B                          # stability of two detections

Every command checks its arguments before loading anything and writes nothing when it fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from decoder import loading  # `loading.load_model`, looked up at call time: tests replace it
from decoder.catalogue import CatalogueError
from decoder.cli_common import EXIT_RUNTIME, EXIT_USAGE, UsageError, check_model_options, examples, one_line_warnings
from decoder.loading import checkpoint_on_disk, context_limit, model_identity, model_name, model_shape
from decoder.threads import quiet_idle_threads
from headfinder.plots import heatmap
from headfinder.probes import make_kv_probes, make_needle_probes, make_qr_probes
from registry import Profile, ProfileValidationError, Registry, RegistryError, collect_provenance, parse_head_set

quiet_idle_threads()  # before anything imports torch

DEFAULT_MODEL = "smollm2-135m"
PROBE_CHOICES = ("qr", "kv", "needle", "both")
DEFAULTS = {"probes": "both", "n_probes": 16, "context": 1024, "top": 16, "seed": 0}
SCORE_NAMES = ("qr", "qr_ndcg", "retrieval")
SCORES_FILE, HEADS_FILE, SUMMARY_FILE = "scores.safetensors", "head_set.json", "summary.json"


class HeadfinderError(Exception):
    """A runtime error (what the arguments name fails or does not fit the model): one line, exit status 1.

    Usage errors (the command line itself is wrong) are `decoder.cli_common.UsageError`: exit status 2.
    """


# --------------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    """The `headfinder` argument parser."""
    parser = argparse.ArgumentParser(
        prog="headfinder",
        description="Find a model's query-focused retrieval heads (QR score), its copy-paste retrieval heads "
        "(retrieval score), and check causally that they matter.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    detect = sub.add_parser(
        "detect", help="score every head on synthetic probes and write scores, head set, heatmaps and a summary",
        description="Score every (layer, head) on seeded synthetic probes sized in the model's own tokens. "
        "QR probes: documents about invented people, a question answered by one (or two, multi-hop) of them; "
        "the QR score is the question's attention to the gold documents minus the null query's. KV probes: the QR "
        "score on a JSON object of random ids, each key-value pair a document, the question naming one key (for "
        "models whose QR heads on prose miss the pair a kv task asks for). Needle probes: "
        "a needle sentence in filler text; the retrieval score counts argmax-attention hits on the token being "
        "copied. Writes scores.safetensors, head_set.json, one heatmap PNG per score and summary.json.",
        **examples("headfinder detect --model smollm2-135m --register",
                   "headfinder detect --model smollm2-135m --seed 1 --out headfinder-out/seed1",
                   "headfinder detect --model ./my-checkpoint --probes needle --top 8 --json",
                   "headfinder detect --model qwen2.5-coder-0.5b --probes kv --context 3072 --register"),
    )
    _model_options(detect)
    detect.add_argument("--probes", choices=PROBE_CHOICES, default=DEFAULTS["probes"],
                        help="which probes to run: qr (prose documents), kv (key-value pairs; scored like qr), "
                        "needle, or both (qr and needle) (default: %(default)s)")
    detect.add_argument("--n-probes", type=int, default=DEFAULTS["n_probes"], metavar="N",
                        help="probes of each kind (default: %(default)s)")
    detect.add_argument("--context", type=int, default=DEFAULTS["context"], metavar="TOKENS",
                        help="probe length in the model's tokens (default: %(default)s)")
    detect.add_argument("--top", type=int, default=DEFAULTS["top"], metavar="K",
                        help="size of the head set (default: %(default)s)")
    detect.add_argument("--score", choices=SCORE_NAMES, default=None,
                        help="score that picks the head set (default: qr, or retrieval with --probes needle)")
    detect.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="probe seed (default: %(default)s)")
    detect.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder (default: headfinder-out/MODEL-seedS)")
    detect.add_argument("--register", action="store_true",
                        help="also register the scores and head set as a new registry profile version")
    detect.add_argument("--registry", type=Path, default=None, metavar="DIR",
                        help="registry root for --register (default: the registry's own default)")
    _output_options(detect)
    detect.set_defaults(func=_cmd_detect)

    show = sub.add_parser("show", help="print (and plot) a detection folder or a registry profile",
                          description="Print the head set and top scores of a `headfinder detect` output folder or "
                          "of a registry profile reference (name, name@N, name@latest).",
                          **examples("headfinder show headfinder-out/smollm2-135m-seed0",
                                     "headfinder show smollm2-135m@latest --top 24 --plot plots/"))
    show.add_argument("target", metavar="DIR|PROFILE")
    show.add_argument("--top", type=int, default=None, metavar="K", help="heads to list (default: the head set's size)")
    show.add_argument("--plot", type=Path, default=None, metavar="DIR",
                      help="write a heatmap PNG per score into DIR")
    show.add_argument("--registry", type=Path, default=None, metavar="DIR", help="registry root for PROFILE")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.set_defaults(func=_cmd_show)

    validate = sub.add_parser(
        "validate", help="causal check: needle accuracy with the head set zeroed vs as many random heads",
        description="Measure greedy needle-retrieval accuracy with no ablation, with the head set's attention outputs "
        "zeroed, and with --draws random sets of as many heads (outside the set) zeroed; report each and the drops.",
        **examples("headfinder validate --model smollm2-135m --from headfinder-out/smollm2-135m-seed0",
                   "headfinder validate --model smollm2-135m --profile smollm2-135m@latest --draws 10 --json",
                   "headfinder validate --model smollm2-135m --heads 8:2,15:4,20:1 --out validate.json"),
    )
    _model_options(validate)
    source = validate.add_mutually_exclusive_group(required=True)
    source.add_argument("--heads", help="head set as LAYER:HEAD,LAYER:HEAD,…")
    source.add_argument("--from", dest="from_dir", type=Path, metavar="DIR", help="a `headfinder detect` folder")
    source.add_argument("--profile", help="a registry profile reference (name, name@N, name@latest)")
    validate.add_argument("--registry", type=Path, default=None, metavar="DIR", help="registry root for --profile")
    validate.add_argument("--n-probes", type=int, default=16, metavar="N", help="needle probes (default: %(default)s)")
    validate.add_argument("--context", type=int, default=DEFAULTS["context"], metavar="TOKENS",
                          help="needle probe length in tokens (default: %(default)s)")
    validate.add_argument("--draws", type=int, default=5, help="random head sets (default: %(default)s, at least 5 "
                          "for the published comparison)")
    validate.add_argument("--seed", type=int, default=1, help="seed of the needle probes and random draws; differs "
                          "from detect's default so the check uses unseen probes (default: %(default)s)")
    validate.add_argument("--out", type=Path, default=None, metavar="FILE", help="also write the report as JSON")
    _output_options(validate)
    validate.set_defaults(func=_cmd_validate)

    compare = sub.add_parser("compare", help="stability of two detections: Spearman of the ranking, top-k overlap",
                             description="Compare two `headfinder detect` folders (e.g. two seeds): Spearman "
                             "correlation of the full head ranking and how many of the top-k heads they share.",
                             **examples("headfinder compare headfinder-out/smollm2-135m-seed0 "
                                        "headfinder-out/smollm2-135m-seed1",
                                        "headfinder compare RUN_A RUN_B --score retrieval --top 8 --json"))
    compare.add_argument("run_a", type=Path, metavar="DIR_A")
    compare.add_argument("run_b", type=Path, metavar="DIR_B")
    compare.add_argument("--score", choices=SCORE_NAMES, default="qr", help="score to compare (default: %(default)s)")
    compare.add_argument("--top", type=int, default=16, metavar="K", help="top-k to compare (default: %(default)s)")
    compare.add_argument("--json", action="store_true", help="print JSON instead of text")
    compare.set_defaults(func=_cmd_compare)
    return parser


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="catalogue name, local checkpoint folder, .gguf file or Hub id (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: %(default)s)")
    p.add_argument("--dtype", default=None, help="model dtype, e.g. float32, bfloat16 (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of text")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


# --------------------------------------------------------------------------------------------------
# Shared helpers


def _check_positive(value: int, flag: str) -> None:
    if value < 1:
        raise UsageError(f"{flag} must be at least 1, got {value}")


def _check_model_args(args) -> None:
    """--threads, --device and --dtype checked before the model loads (a UsageError)."""
    if args.threads is not None:
        _check_positive(args.threads, "--threads")
    check_model_options(args.device, args.dtype)


def _load(args) -> tuple:
    """Load the model named by `--model`, turning every loading failure into a HeadfinderError."""
    import torch


    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return loading.load_model(args.model, dtype=args.dtype, device=args.device, progress=not args.no_progress)
    except (CatalogueError, ValueError, OSError) as err:
        raise HeadfinderError(f"cannot load model {args.model!r}: {err}") from err


def _check_context(args, name: str, limit: int | None) -> None:
    if limit is not None and args.context > limit:
        raise HeadfinderError(f"--context {args.context} is longer than {name}'s context of {limit} tokens")


def _probes_before_loading(args, name: str, makers: dict) -> dict | None:
    """{kind: probes} made from the checkpoint's own config and tokenizer before the model loads.

    Only where they are on disk already (a local checkpoint folder, an installed catalogue model):
    a --context beyond the model's, or too short for the probes, then fails in seconds instead of
    after the model load. None elsewhere (a .gguf, a Hub id, a model still to pull): checked after loading.
    """
    folder = checkpoint_on_disk(args.model)
    if folder is None:
        return None
    try:
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception:  # remote code, a damaged file …: the model load reports it (or rebuilds the cache)
        return None
    _check_context(args, name, context_limit(config))
    try:
        return {kind: make(tokenizer, args.n_probes, args.context, args.seed) for kind, make in makers.items()}
    except ValueError as err:
        raise HeadfinderError(str(err)) from None


def _model_limits(model) -> tuple[int, int, int | None]:

    n_layers, n_heads = model_shape(model)
    return n_layers, n_heads, context_limit(model.config)


def _slug(name: str) -> str:
    return name.replace("/", "--") if "--" not in name else name.replace("/", "_")


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, default=lambda v: str(v)))


def _format_heads(heads) -> str:
    return ", ".join(f"{l}:{h}" for l, h in heads)


def parse_heads(text: str) -> list[tuple[int, int]]:
    """Parse 'L:H,L:H,…' into (layer, head) pairs (`registry.parse_head_set`, as a UsageError)."""
    try:
        return parse_head_set(text, "--heads")
    except ProfileValidationError as err:
        raise UsageError(str(err)) from None


def _read_run(folder: Path) -> tuple[dict, dict]:
    """(summary, score matrices as tensors) of a `headfinder detect` output folder."""
    from safetensors.torch import load_file

    summary_path, scores_path = folder / SUMMARY_FILE, folder / SCORES_FILE
    if not folder.exists():
        raise HeadfinderError(f"{folder} does not exist; give a `headfinder detect` output folder")
    if not folder.is_dir():
        raise HeadfinderError(f"{folder} is not a folder; give a `headfinder detect` output folder")
    if not summary_path.is_file() or not scores_path.is_file():
        raise HeadfinderError(f"{folder} is not a `headfinder detect` output (it lacks {SUMMARY_FILE} or {SCORES_FILE})")
    try:
        summary = json.loads(summary_path.read_text())
        scores = load_file(str(scores_path))
    except Exception as err:  # a damaged file: say which
        raise HeadfinderError(f"cannot read {folder}: {err}") from err
    return summary, scores


# --------------------------------------------------------------------------------------------------
# detect


def _cmd_detect(args) -> int:
    _check_positive(args.n_probes, "--n-probes")
    _check_positive(args.top, "--top")
    _check_positive(args.context, "--context")
    _check_model_args(args)
    score_name = args.score or ("retrieval" if args.probes == "needle" else "qr")
    # kv probes are QR probes of another shape: they give the qr and qr_ndcg scores
    runs_qr, runs_needle = args.probes in ("qr", "kv", "both"), args.probes in ("needle", "both")
    if score_name.startswith("qr") and not runs_qr or score_name == "retrieval" and not runs_needle:
        raise UsageError(f"--score {score_name} needs the probes that compute it; --probes {args.probes} does not")
    name = model_name(args.model)
    out = args.out or Path("headfinder-out") / f"{_slug(name)}-seed{args.seed}"
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / SUMMARY_FILE).is_file())):
        raise UsageError(f"--out {out} exists and is not a previous headfinder output; choose another folder")
    if args.register:
        try:  # fail now, not after the scoring
            Registry(args.registry)
        except RegistryError as err:
            raise HeadfinderError(f"--registry: {err}") from None

    import torch

    from headfinder.head_sets import stability_report, top_k_heads
    from headfinder.scores import qr_scores, retrieval_scores

    started = time.time()
    makers = {"qr": make_kv_probes if args.probes == "kv" else make_qr_probes} if runs_qr else {}
    makers.update({"needle": make_needle_probes} if runs_needle else {})
    probes = _probes_before_loading(args, name, makers)
    model, tokenizer = _load(args)
    n_layers, n_heads, max_context = _model_limits(model)
    _check_context(args, name, max_context)
    if args.top > n_layers * n_heads:
        raise HeadfinderError(f"--top {args.top} is larger than {name}'s {n_layers * n_heads} heads "
                              f"({n_layers} layers × {n_heads} heads)")
    progress = not args.no_progress and not args.json
    if probes is None:
        try:
            probes = {kind: make(tokenizer, args.n_probes, args.context, args.seed) for kind, make in makers.items()}
        except ValueError as err:
            raise HeadfinderError(str(err)) from err
    qr_probes, needle_probes = probes.get("qr", []), probes.get("needle", [])

    scores: dict[str, torch.Tensor] = {}
    per_probe: dict[str, torch.Tensor] = {}
    summary: dict = {"model": name, "spec": args.model, "layers": n_layers, "heads": n_heads,
                     "probes": args.probes, "n_probes": args.n_probes, "context": args.context, "seed": args.seed,
                     "score": score_name, "top": args.top}
    timings = {"load_s": round(time.time() - started, 2)}
    if runs_qr:
        t = time.time()
        qr = qr_scores(model, qr_probes, progress=progress)
        timings["qr_s"] = round(time.time() - t, 2)
        scores.update(qr=qr.qr, qr_ndcg=qr.ndcg)
        per_probe.update(qr=qr.per_probe_qr, qr_ndcg=qr.per_probe_ndcg)
        summary["qr_probes"] = {"documents_mean": sum(p.num_docs for p in qr_probes) / len(qr_probes),
                                "two_hop": sum(p.hops == 2 for p in qr_probes),
                                "tokens_max": max(len(p.query_ids) for p in qr_probes)}
    if runs_needle:
        t = time.time()
        ret = retrieval_scores(model, tokenizer, needle_probes, progress=progress)
        timings["needle_s"] = round(time.time() - t, 2)
        scores["retrieval"] = ret.retrieval
        per_probe["retrieval"] = ret.per_probe
        summary["needle_probes"] = {"accuracy": ret.accuracy, "succeeded": sum(ret.succeeded),
                                    "tokens_max": max(len(p.prompt_ids) for p in needle_probes),
                                    "heads_above_0.1": int((ret.retrieval > 0.1).sum())}
    heads = top_k_heads(scores[score_name], args.top)
    summary["head_set"] = [list(h) for h in heads]
    # Split-half stability: even- vs odd-indexed probes hold disjoint invented worlds.
    halves = per_probe[score_name]
    if score_name == "retrieval":
        ok = torch.tensor(ret.succeeded)
        idx = torch.arange(len(ok))
        a, b = ok & (idx % 2 == 0), ok & (idx % 2 == 1)
        halves_ok = bool(a.any() and b.any())
        mean_a = halves[a].sum(0) / max(1, int(a.sum()))
        mean_b = halves[b].sum(0) / max(1, int(b.sum()))
    else:
        halves_ok = halves.shape[0] >= 2
        mean_a, mean_b = halves[0::2].mean(0), halves[1::2].mean(0) if halves_ok else halves[0]
    summary["split_half_stability"] = stability_report(mean_a, mean_b, args.top) if halves_ok else None
    timings["total_s"] = round(time.time() - started, 2)
    summary["timings"] = timings
    summary["device"] = args.device
    summary["threads"] = torch.get_num_threads()

    identity = model_identity(model, name)
    summary["identity"] = identity
    files = _write_run(out, name, scores, per_probe, heads, score_name, summary)
    if args.register:
        summary["registered"] = _register(args, identity, scores, heads, summary)
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if args.json:
        _print_json({"heads": [list(h) for h in heads],
                     "scores": {k: v.tolist() for k, v in scores.items()},
                     "files": files, "summary": summary})
    else:
        _print_detect(summary, scores, heads, files)
    return 0


def _write_run(out: Path, name: str, scores, per_probe, heads, score_name: str, summary: dict) -> dict:
    """Write every output into a staging folder, then move it into place: no half-written run."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {k: v.contiguous().float() for k, v in scores.items()}
        tensors.update({f"per_probe.{k}": v.contiguous().float() for k, v in per_probe.items()})
        save_file(tensors, str(staging / SCORES_FILE), metadata={"model": name, "layout": "[layers, heads]"})
        (staging / HEADS_FILE).write_text(json.dumps({
            "model": name, "score": score_name, "k": len(heads), "heads": [list(h) for h in heads],
            "scores": [float(scores[score_name][l, h]) for l, h in heads]}, indent=2))
        pictures = {}
        for key, matrix in scores.items():
            path = staging / f"{key}.png"
            heatmap(matrix.numpy(), f"{name}: {key} score", path, heads=heads if key == score_name else (),
                    label=key)
            pictures[key] = path.name
        names = {"scores": SCORES_FILE, "head_set": HEADS_FILE, "summary": SUMMARY_FILE, "heatmaps": pictures}
        summary["files"] = names
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        out.mkdir(exist_ok=True)
        # A previous run's heatmap of a score this run did not compute would now mislead: drop it.
        for stale in out.glob("*.png"):
            if stale.name not in pictures.values():
                stale.unlink()
        for entry in staging.iterdir():
            os.replace(entry, out / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"folder": str(out), "scores": str(out / SCORES_FILE), "head_set": str(out / HEADS_FILE),
            "summary": str(out / SUMMARY_FILE), "heatmaps": {k: str(out / v) for k, v in pictures.items()}}


def _register(args, identity: dict, scores, heads, summary: dict) -> str:
    metrics = {}
    if "needle_probes" in summary:
        metrics["needle_accuracy"] = summary["needle_probes"]["accuracy"]
    if summary.get("split_half_stability"):
        metrics["split_half_top_k_shared"] = summary["split_half_stability"]["top_k_shared"]
        metrics["split_half_spearman"] = summary["split_half_stability"]["spearman"]
    profile = Profile(
        model=identity, head_set=heads, head_scores={k: v.numpy() for k, v in scores.items()}, metrics=metrics,
        provenance=collect_provenance(probe_kind=args.probes, probe_count=args.n_probes, probe_length=args.context,
                                      seed=args.seed, head_score=summary["score"], source="headfinder detect"),
    )
    return Registry(args.registry).register(profile)


def _print_detect(summary: dict, scores, heads, files: dict) -> None:
    print(f"{summary['model']}: {summary['layers']} layers × {summary['heads']} heads; "
          f"{summary['n_probes']} {summary['probes']} probes of ≤ {summary['context']} tokens, seed {summary['seed']}")
    key = summary["score"]
    print(f"\ntop {len(heads)} heads by {key} score:")
    print("  rank  layer  head  " + "  ".join(f"{k:>9}" for k in scores))
    for rank, (l, h) in enumerate(heads, 1):
        print(f"  {rank:>4}  {l:>5}  {h:>4}  " + "  ".join(f"{float(v[l, h]):9.4f}" for v in scores.values()))
    if "needle_probes" in summary:
        n = summary["needle_probes"]
        print(f"\nneedle probes: {n['succeeded']}/{summary['n_probes']} retrieved; "
              f"{n['heads_above_0.1']} heads with retrieval score > 0.1")
    stab = summary.get("split_half_stability")
    if stab:
        print(f"split-half stability: {stab['top_k_shared']}/{stab['k']} top heads shared, "
              f"Spearman {stab['spearman']:.3f}")
    t = summary["timings"]
    print(f"time: {t['total_s']:.0f} s (" + ", ".join(f"{k} {v:.0f}" for k, v in t.items() if k != "total_s") + ")")
    if summary.get("registered"):
        print(f"registered: {summary['registered']}")
    print(f"written: {files['folder']}/ ({', '.join(sorted(Path(p).name for p in _flat(files)))})")


def _flat(files: dict):
    for k, v in files.items():
        if k == "folder":
            continue
        yield from (v.values() if isinstance(v, dict) else [v])


# --------------------------------------------------------------------------------------------------
# show / compare


def _looks_like_path(target: str) -> bool:
    """True for what can only be a path: it exists, or starts with '/', '.', '~' or ends with a separator."""
    return Path(target).exists() or target.startswith(("/", ".", "~")) or target.endswith(("/", os.sep))


def _load_target(target: str, registry_root: Path | None, folder_only: bool = False) -> dict:
    """Heads, scores and a description of a detect folder or (unless `folder_only`) a registry profile."""
    import torch

    path = Path(target)
    if folder_only or _looks_like_path(target):
        summary, tensors = _read_run(path)
        scores = {k: v for k, v in tensors.items() if not k.startswith("per_probe.")}
        heads = [tuple(h) for h in summary["head_set"]]
        return {"source": str(path), "model": summary["model"], "heads": heads, "scores": scores,
                "score": summary.get("score"), "summary": summary}

    try:
        profile = Registry(registry_root).load(target)
    except RegistryError as err:
        raise HeadfinderError(f"{target!r} is neither a headfinder output folder nor a loadable profile: {err}") from err
    return {"source": target, "model": profile.model.name, "heads": list(profile.head_set),
            "scores": {k: torch.from_numpy(v.copy()) for k, v in profile.head_scores.items()},
            "score": profile.provenance.get("head_score"), "summary": {"provenance": profile.provenance,
                                                                       "metrics": profile.metrics}}


def _cmd_show(args) -> int:
    data = _load_target(args.target, args.registry)
    heads, scores = data["heads"], data["scores"]
    k = args.top or len(heads)
    if args.top is not None:
        _check_positive(args.top, "--top")
    listed = heads[:k]
    if args.top and args.top > len(heads) and data["score"] in scores:
        from headfinder.head_sets import top_k_heads

        try:
            listed = top_k_heads(scores[data["score"]], args.top)
        except ValueError as err:
            raise HeadfinderError(str(err)) from err
    plots = {}
    if args.plot is not None:
        args.plot.mkdir(parents=True, exist_ok=True)
        for key, matrix in scores.items():
            path = args.plot / f"{_slug(data['model'])}-{key}.png"
            heatmap(matrix.numpy(), f"{data['model']}: {key} score", path,
                    heads=heads if key == data["score"] else (), label=key)
            plots[key] = str(path)
    if args.json:
        _print_json({"model": data["model"], "source": data["source"], "heads": [list(h) for h in listed],
                     "scores": {k2: v.tolist() for k2, v in scores.items()}, "plots": plots,
                     "summary": data["summary"]})
        return 0
    print(f"{data['model']} ({data['source']}): head set of {len(heads)}"
          + (f" by {data['score']} score" if data["score"] else ""))
    print("  rank  layer  head  " + "  ".join(f"{key:>9}" for key in scores))
    for rank, (l, h) in enumerate(listed, 1):
        print(f"  {rank:>4}  {l:>5}  {h:>4}  " + "  ".join(f"{float(v[l, h]):9.4f}" for v in scores.values()))
    stab = data["summary"].get("split_half_stability")
    if stab:
        print(f"split-half stability: {stab['top_k_shared']}/{stab['k']} shared, Spearman {stab['spearman']:.3f}")
    for key, path in plots.items():
        print(f"plot: {path}")
    return 0


def _cmd_compare(args) -> int:
    from headfinder.head_sets import stability_report

    _check_positive(args.top, "--top")
    (sa, ta), (sb, tb) = _read_run(args.run_a), _read_run(args.run_b)
    for summary, tensors, folder in ((sa, ta, args.run_a), (sb, tb, args.run_b)):
        if args.score not in tensors:
            raise HeadfinderError(f"{folder} has no {args.score} score (its probes: {summary.get('probes')})")
    if sa["model"] != sb["model"]:
        raise HeadfinderError(f"the runs are of different models: {sa['model']} vs {sb['model']}")
    try:
        report = stability_report(ta[args.score], tb[args.score], args.top)
    except ValueError as err:
        raise HeadfinderError(str(err)) from err
    report.update(score=args.score, run_a=str(args.run_a), run_b=str(args.run_b),
                  seed_a=sa.get("seed"), seed_b=sb.get("seed"))
    if args.json:
        _print_json(report)
    else:
        print(f"{sa['model']}, {args.score} score, seeds {sa.get('seed')} vs {sb.get('seed')}: "
              f"{report['top_k_shared']}/{args.top} of the top {args.top} shared, Spearman {report['spearman']:.3f}")
        print(f"  shared: {_format_heads(report['shared_heads'])}")
    return 0


# --------------------------------------------------------------------------------------------------
# validate


def _cmd_validate(args) -> int:
    _check_positive(args.n_probes, "--n-probes")
    _check_positive(args.context, "--context")
    _check_model_args(args)
    if args.draws < 1:
        raise UsageError(f"--draws must be at least 1, got {args.draws}")
    if args.heads:
        heads = parse_heads(args.heads)
        source = "--heads"
    else:
        data = _load_target(str(args.from_dir) if args.from_dir else args.profile, args.registry,
                            folder_only=args.from_dir is not None)
        heads, source = data["heads"], data["source"]
    if args.out is not None and args.out.is_dir():
        raise UsageError(f"--out {args.out} is a folder; give a file name for the JSON report")

    from headfinder.head_sets import validate_head_set
    from headfinder.validate import validate_heads

    started = time.time()
    early = _probes_before_loading(args, model_name(args.model), {"needle": make_needle_probes})
    model, tokenizer = _load(args)
    n_layers, n_heads, max_context = _model_limits(model)
    _check_context(args, model_name(args.model), max_context)
    try:
        heads = validate_head_set(heads, n_layers, n_heads)
        probes = early["needle"] if early else make_needle_probes(tokenizer, args.n_probes, args.context, args.seed)
        report = validate_heads(model, tokenizer, heads, probes, draws=args.draws, seed=args.seed,
                                progress=not args.no_progress and not args.json)
    except ValueError as err:
        raise HeadfinderError(str(err)) from err
    result = report.to_dict()
    result.update(model=model_name(args.model), source=source, seed=args.seed,
                  time_s=round(time.time() - started, 2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.out)
    if args.json:
        _print_json(result)
        return 0
    mean_random = sum(report.random_accuracies) / len(report.random_accuracies)
    print(f"{result['model']}: needle accuracy over {report.n_probes} probes of ≤ {report.context_tokens} tokens")
    print(f"  no ablation:                 {report.baseline_accuracy:.3f}")
    print(f"  {len(heads)} chosen heads zeroed:     {report.ablated_accuracy:.3f}   (drop {report.drop:+.3f})")
    print(f"  {len(heads)} random heads zeroed:     {mean_random:.3f}   (drop {report.random_drop:+.3f}; "
          f"mean of {len(report.random_accuracies)} draws: {', '.join(f'{a:.2f}' for a in report.random_accuracies)})")
    ratio = report.ratio
    print(f"  drop ratio (chosen / random): {'inf' if math.isinf(ratio) else 'n/a' if math.isnan(ratio) else f'{ratio:.1f}×'}")
    print(f"  time: {result['time_s']:.0f} s")
    return 0


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `headfinder` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    with one_line_warnings("headfinder"):
        try:
            return int(args.func(args) or 0)
        except UsageError as err:
            print(f"headfinder: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        except HeadfinderError as err:
            print(f"headfinder: error: {err}", file=sys.stderr)
            return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
