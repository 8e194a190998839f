"""`raymoe` command line: serve, make-tiny, inspect, bench, status, k8s.

Each subcommand imports what it needs lazily, so `raymoe --help` and `raymoe inspect` stay fast
and never start Ray.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_make_tiny(ns: argparse.Namespace) -> int:
    from raymoe.model.tiny import make_tiny

    out = make_tiny(ns.out, preset=ns.preset, seed=ns.seed, quant=ns.quant)
    print(f"wrote {ns.preset} checkpoint{' (INT4 experts)' if ns.quant == 'int4' else ''} to {out}")
    return 0


def _cmd_inspect(ns: argparse.Namespace) -> int:
    from raymoe.model.args import ModelArgs, get_preset
    from raymoe.model.inspect import format_stats

    if (ns.path is None) == (ns.preset is None):
        raise ValueError("give exactly one of PATH or --preset NAME")
    args = get_preset(ns.preset) if ns.preset else ModelArgs.from_pretrained(ns.path)
    print(format_stats(ns.preset or ns.path, args))
    return 0


def _cmd_serve(ns: argparse.Namespace) -> int:
    from raymoe.serve.run import serve_main

    return serve_main(ns)


def _cmd_bench(ns: argparse.Namespace) -> int:
    from raymoe.bench import run_bench

    return run_bench(ns)


def _cmd_status(ns: argparse.Namespace) -> int:
    from raymoe.serve.status import status_main

    return status_main(ns)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raymoe", description="Ray-native serving of Kimi K2 / DeepSeek-V3 MoE models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve a model with an OpenAI-compatible API (default: the tiny model)")
    s.add_argument("config", nargs="?", help="YAML config file (the RayMoEConfig tree)")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--model", help="Hugging Face checkpoint folder")
    src.add_argument("--preset", help="built-in tiny preset to create and serve (default: tiny)")
    s.add_argument("--host", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument("--num-expert-shards", type=int, help="expert-shard actors (0 = in-process experts)")
    s.add_argument("--transport", choices=["local", "ray", "collective"], help="dispatch transport")
    s.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    s.set_defaults(func=_cmd_serve)

    m = sub.add_parser("make-tiny", help="write a random tiny checkpoint in the Hugging Face layout")
    m.add_argument("out", help="output folder")
    m.add_argument("--preset", default="tiny", choices=["tiny", "tiny-384e"])
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--quant", choices=["none", "int4"], default="none", help="INT4 routed experts (compressed-tensors)")
    m.set_defaults(func=_cmd_make_tiny)

    i = sub.add_parser("inspect", help="parameters, bytes and KV-cache size of a checkpoint or preset")
    i.add_argument("path", nargs="?", help="checkpoint folder")
    i.add_argument("--preset", help="kimi-k2-thinking | deepseek-v3 | tiny | tiny-384e")
    i.set_defaults(func=_cmd_inspect)

    b = sub.add_parser("bench", help="benchmarks printing side-by-side ratios")
    b.add_argument("what", choices=["engine", "dispatch", "int4"])
    b.add_argument("--model", help="checkpoint folder (default: cached tiny)")
    b.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    b.add_argument("--repeats", type=int, default=3, help="engine: alternating runs per measurement, best kept")
    b.set_defaults(func=_cmd_bench)

    sub.add_parser("loadtest", help="locust load test against raymoe serve (see `raymoe loadtest --help`)",
                   add_help=False)

    st = sub.add_parser("status", help="Serve applications, replicas and expert shards of a running cluster")
    st.add_argument("--address", default="auto")
    st.set_defaults(func=_cmd_status)

    try:
        from raymoe.k8s.cli import add_k8s_parser
    except ImportError:
        pass
    else:
        add_k8s_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "loadtest":  # its own flag set; runs locust in a subprocess
        from raymoe.loadtest import loadtest_main

        return loadtest_main(args[1:])
    parser = build_parser()
    ns = parser.parse_args(args)
    try:
        return int(ns.func(ns) or 0)
    except ValueError as e:
        print(f"raymoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
