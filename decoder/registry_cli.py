"""`dysco registry list|show|diff|tag|export|import`: browse and share stored profiles.

The command sits in `decoder`, above the `registry` library it drives (which imports nothing of ours).

Every sub-command takes `--registry DIR` (default: $DYSCO_REGISTRY, else the user data dir);
those that print data take `--json`. Errors print one line to stderr and exit with status 2 for a
malformed reference or tag name, 1 for what fails (a missing or corrupt profile, an unsafe archive).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from decoder.cli_common import EXIT_RUNTIME, EXIT_USAGE, examples

REF_HELP = (
    "profile reference: NAME (latest intact version, or the shipped seed when none is stored), "
    "NAME@latest, NAME@3, NAME@TAG, NAME@HASHPREFIX (6+ hex chars) or NAME@seed"
)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `registry` and its sub-commands to the umbrella `dysco` parser."""
    parser = subparsers.add_parser(
        "registry",
        help="list, show, compare, tag, export and import DySCO profiles",
        description="Browse and share versioned DySCO profiles (head sets, knobs, metrics).",
        **examples("dysco registry list", "dysco registry show smollm2-135m@latest",
                   "dysco registry export smollm2-135m profiles.tar.gz && dysco registry import profiles.tar.gz"),
    )
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    commands = parser.add_subparsers(dest="registry_command", metavar="ACTION")
    usage = {
        "list": ("dysco registry list", "dysco registry list smollm2-135m --json",
                 "dysco registry list --registry ./quickstart-out/registry"),
        "show": ("dysco registry show smollm2-135m@latest", "dysco registry show smollm2-135m@prod --json",
                 "dysco registry show qwen3-8b@seed"),
        "diff": ("dysco registry diff smollm2-135m@1 smollm2-135m@2", "dysco registry diff smollm2-135m@seed "
                 "smollm2-135m@latest --json"),
        "tag": ("dysco registry tag smollm2-135m@2 prod", "dysco registry tag smollm2-135m prod --remove"),
        "export": ("dysco registry export smollm2-135m profiles.tar.gz          # every version",
                   "dysco registry export smollm2-135m@prod prod.tar.gz          # one version"),
        "import": ("dysco registry import profiles.tar.gz",
                   "dysco registry import profiles.tar.gz --registry /shared/registry --json"),
    }

    def add(name: str, help_: str, json_flag: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_, **examples(*usage[name]))
        sub.add_argument("--registry", metavar="DIR", default=None,
                         help="registry directory (default: $DYSCO_REGISTRY or the user data dir)")
        if json_flag:
            sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        return sub

    sub = add("list", "list stored versions and shipped seeds; corrupt versions are marked")
    sub.add_argument("name", nargs="?", help="only this model name")
    sub.set_defaults(func=_run(_list))

    sub = add("show", "print one profile: identity, knobs, head set, scores, metrics, provenance")
    sub.add_argument("ref", help=REF_HELP)
    sub.set_defaults(func=_run(_show))

    sub = add("diff", "compare two profiles side by side")
    sub.add_argument("a", help="first " + REF_HELP)
    sub.add_argument("b", help="second profile reference")
    sub.set_defaults(func=_run(_diff))

    sub = add("tag", "point a tag (e.g. prod) at a version, or remove it with --remove")
    sub.add_argument("ref", help=REF_HELP + "; with --remove, the model NAME")
    sub.add_argument("tag", help="tag name: a letter, then letters, digits, '.', '_' or '-'")
    sub.add_argument("--remove", action="store_true", help="delete the tag instead")
    sub.set_defaults(func=_run(_tag))

    sub = add("export", "write one version (NAME@...) or every version of NAME to a tar.gz")
    sub.add_argument("ref", help="NAME for all versions, or a reference for one")
    sub.add_argument("archive", help="output file, e.g. profiles.tar.gz")
    sub.set_defaults(func=_run(_export))

    sub = add("import", "verify a tar.gz made by export and register its profiles here")
    sub.add_argument("archive", help="archive file to import")
    sub.set_defaults(func=_run(_import))


def _run(action: Any) -> Any:
    """Wrap an action so registry errors become one line on stderr and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        from registry import InvalidReference, ProfileValidationError, Registry, RegistryError

        try:
            return action(Registry(args.registry), args) or 0
        except BrokenPipeError:  # `dysco registry show … | head`: the reader left; not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush is quiet too
            return 0
        except (InvalidReference, ProfileValidationError) as err:  # the command line itself is wrong
            print(f"dysco registry {args.registry_command}: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        except (RegistryError, OSError) as err:
            print(f"dysco registry {args.registry_command}: error: {err}", file=sys.stderr)
            return EXIT_RUNTIME

    return run


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _list(reg: Any, args: argparse.Namespace) -> int:
    rows = reg.list(args.name)
    if args.json:
        _print_json({"registry": str(reg.root), "versions": [row.to_dict() for row in rows]})
        return 0
    print(f"registry: {reg.root}")
    if not rows:
        print("(empty)")
        return 0
    width = max(len(row.ref) for row in rows) + 2
    print(f"{'REF':<{width}}{'STATUS':<9}{'HASH':<14}{'HEADS':<7}{'TAGS':<16}REGISTERED")
    for row in rows:
        status = "seed" if row.version == "seed" else row.status
        if row.status == "corrupt":
            print(f"{row.ref:<{width}}{'CORRUPT':<9}{row.problem}")
            continue
        print(
            f"{row.ref:<{width}}{status:<9}{(row.content_hash or '')[:12]:<14}"
            f"{row.head_set_size if row.head_set_size is not None else '':<7}"
            f"{','.join(row.tags) or '-':<16}{row.registered_at or '-'}"
        )
    return 0


def _show(reg: Any, args: argparse.Namespace) -> int:
    name, version = reg.resolve(args.ref)
    profile = reg.load(f"{name}@{version}")
    ref = f"{name}@{version}"
    if args.json:
        data = {"ref": ref, "content_hash": profile.content_hash(), **profile.to_dict()}
        data["head_scores"] = {k: m.tolist() for k, m in sorted(profile.head_scores.items())}
        _print_json(data)
        return 0
    model, knobs = profile.model, profile.knobs
    print(f"{ref}   content hash {profile.content_hash()[:16]}   schema {profile.schema_version}")
    print(f"model        {model.name} ({model.architecture}), {model.num_layers} layers x "
          f"{model.num_heads} heads, {model.num_kv_heads} KV heads")
    print(f"fingerprints config {model.config_fingerprint or '-'}   weights "
          f"{model.weights_fingerprint or '-'}")
    knob_text = "  ".join(f"{k}={v}" for k, v in knobs.to_dict().items() if v is not None)
    print(f"knobs        {knob_text}")
    heads = " ".join(f"L{layer}H{head}" for layer, head in profile.head_set)
    print(f"head set     {len(profile.head_set)} heads (ranked): {heads}")
    for key, matrix in sorted(profile.head_scores.items()):
        in_set = [float(matrix[layer, head]) for layer, head in profile.head_set]
        print(f"head scores  {key}: [{matrix.shape[0]} x {matrix.shape[1]}] min {matrix.min():.4g} "
              f"max {matrix.max():.4g}; head-set mean {sum(in_set) / len(in_set):.4g}")
    for title, section in (("metrics", profile.metrics), ("provenance", profile.provenance)):
        if not section:
            print(f"{title:<13}-")
        for i, (key, value) in enumerate(section.items()):
            shown = value if isinstance(value, str) else json.dumps(value)
            print(f"{title if i == 0 else '':<13}{key}: {shown}")
    return 0


def _diff(reg: Any, args: argparse.Namespace) -> int:
    report = reg.diff(args.a, args.b)
    if args.json:
        _print_json(report)
        return 0
    verdict = "identical" if report["identical"] else "differ"
    print(f"a: {report['a']}   b: {report['b']}   ({verdict})")
    changes = [
        (f"{section}.{key}", pair)
        for section in ("model", "knobs", "metrics", "provenance")
        for key, pair in report[section].items()
    ]
    width = max((len(label) for label, _ in changes), default=0) + 2
    for label, pair in changes:
        print(f"{label:<{width}}{json.dumps(pair['a'])}  ->  {json.dumps(pair['b'])}")
    heads = report["head_set"]

    def fmt(pairs: list[list[int]]) -> str:
        return " ".join(f"L{layer}H{head}" for layer, head in pairs) or "-"

    order = "same order" if heads["same_order"] else "order differs"
    print(f"head set: {heads['common']} in common ({order}); only in a: {fmt(heads['only_a'])}; "
          f"only in b: {fmt(heads['only_b'])}")
    for key, item in report["head_scores"].items():
        gap = "" if item["max_abs_diff"] is None else f" (max |a-b| {item['max_abs_diff']:.4g})"
        print(f"head scores {key}: {item['status']}{gap}")
    return 0


def _tag(reg: Any, args: argparse.Namespace) -> int:
    if args.remove:
        reg.untag(args.ref, args.tag)
        result = {"name": args.ref, "tag": args.tag, "removed": True}
        message = f"removed tag {args.tag!r} from {args.ref}"
    else:
        ref = reg.tag(args.ref, args.tag)
        result = {"ref": ref, "tag": args.tag}
        message = f"{ref} tagged {args.tag!r}"
    if args.json:
        _print_json(result)
    else:
        print(message)
    return 0


def _export(reg: Any, args: argparse.Namespace) -> int:
    refs = reg.export(args.ref, args.archive)
    if args.json:
        _print_json({"archive": args.archive, "exported": refs})
    else:
        print(f"exported {', '.join(refs)} to {args.archive}")
    return 0


def _import(reg: Any, args: argparse.Namespace) -> int:
    refs = reg.import_archive(args.archive)
    if args.json:
        _print_json({"archive": args.archive, "registry": str(reg.root), "imported": refs})
    else:
        print(f"imported {', '.join(refs)} into {reg.root}")
    return 0
