"""Side-by-side serving benchmark: the same locust scenario against `raymoe serve` and `transformers serve`.

    tiny checkpoint -> raymoe serve (own Ray) -> locust -> stop -> transformers serve (this file,
        `serve-peer`) -> locust -> stop -> table + ratios (output tok/s, p50 TTFT)

Both servers load the same checkpoint and run one after the other with the same users, duration and
lengths, greedy. transformers does not know `model_type: kimi_k2`, so the peer runs through
`serve-peer`: it registers the alias in-process (raymoe.model.hf_compat) and then runs transformers'
own `serve` command in the same process. transformers serve rejects unknown request fields, so its
output length is forced through `generation_config.min_new_tokens` instead of `ignore_eos`.
Its `--continuous-batching` mode fails on MLA models in transformers 5.24 (every request: "CB worker
died ... index_copy_(): Source/destination tensor must have same slice shapes"), so the peer runs its
default per-request `generate` path unless `--continuous-batching` is given.

    python loadtest/peer.py -u 32 -t 30s                  # compare at 32 users
    python loadtest/peer.py serve-peer CKPT --port 8001   # just the peer server
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def serve_peer(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="peer.py serve-peer")
    p.add_argument("checkpoint")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction, default=False)
    a = p.parse_args(argv)
    from raymoe.model.hf_compat import register_kimi_k2

    register_kimi_k2()
    _cpu_without_accelerate()
    from transformers.cli.transformers import app

    args = ["serve", a.checkpoint, "--host", "127.0.0.1", "--port", str(a.port), "--log-level", "warning"]
    args.append("--continuous-batching" if a.continuous_batching else "--no-continuous-batching")
    app(args, prog_name="transformers")  # typer: runs uvicorn until SIGINT/SIGTERM
    return 0


def _cpu_without_accelerate() -> None:
    """transformers serve always passes `device_map`, which needs `accelerate`; on CPU it adds nothing, so
    without it load the model the plain way (device_map=None puts it on CPU)."""
    import torch
    from transformers.utils import is_accelerate_available

    if is_accelerate_available() or torch.cuda.is_available():
        return
    import transformers.modeling_utils as modeling_utils

    check = modeling_utils.check_and_set_device_map

    def on_cpu(device_map: Any) -> Any:
        return None if device_map in ("auto", "cpu") else check(device_map)

    modeling_utils.check_and_set_device_map = on_cpu


def compare(argv: list[str]) -> int:
    from raymoe import loadtest as lt

    p = argparse.ArgumentParser(prog="peer.py", description="raymoe serve vs transformers serve, same scenario")
    p.add_argument("-u", "--users", type=int, default=32)
    p.add_argument("-t", "--duration", default="30s")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--dist", default="fixed")
    p.add_argument("--user-class", default="ChatStreamUser")
    p.add_argument("--temperature", type=float, default=0.0, help="same sampling on both sides (0 = greedy)")
    p.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction, default=False,
                   help="transformers serve --continuous-batching: off by default, its paged cache fails on MLA")
    p.add_argument("--serve-arg", dest="serve_args", action="append", default=[], help="extra `raymoe serve` args")
    p.add_argument("--slo-ttft-ms", type=float, default=2000)
    p.add_argument("--slo-tpot-ms", type=float, default=50)
    p.add_argument("--stop-timeout", type=int, default=60)
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--out", help="results folder (default loadtest-results/peer-<time>)")
    a = p.parse_args(argv)
    out = Path(a.out or Path("loadtest-results") / time.strftime("peer-%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    opts: dict[str, Any] = {"user_classes": [a.user_class], "stop_timeout": a.stop_timeout, "spawn_rate": None,
                            "slo_ttft_ms": a.slo_ttft_ms, "slo_tpot_ms": a.slo_tpot_ms, "slo_e2el_ms": None}
    workload = {"prompt_tokens": a.prompt_tokens, "output_tokens": a.output_tokens, "dist": a.dist,
                "temperature": a.temperature}
    summary = lt.summary_module()
    results: list[tuple[str, dict[str, Any]]] = []
    try:
        with lt.raymoe_server(out / "raymoe", serve_args=a.serve_args, ready_timeout=a.ready_timeout) as server:
            ckpt = lt.checkpoint_of(server)
            if ckpt is None:
                raise RuntimeError("raymoe serve did not report its checkpoint folder; see " + str(server.log_path))
            r = lt.run_point(server.url, out / "raymoe" / f"u{a.users}", users=a.users, duration=a.duration,
                             opts=opts, workload={**workload, "api_flavor": "raymoe", "tokenizer": ckpt})
            results.append(("raymoe", r))
            print(summary.format_summary(r, f"raymoe serve, {a.users} users"), flush=True)
        port = lt.free_port()
        cmd = [sys.executable, str(Path(__file__).resolve()), "serve-peer", ckpt, "--port", str(port),
               "--continuous-batching" if a.continuous_batching else "--no-continuous-batching"]
        with lt.ManagedServer("transformers serve", cmd, port, out / "peer" / "serve.log",
                              ready_timeout=a.ready_timeout) as peer:
            r = lt.run_point(peer.url, out / "peer" / f"u{a.users}", users=a.users, duration=a.duration,
                             opts=opts, workload={**workload, "api_flavor": "transformers", "tokenizer": ckpt,
                                                  "model": ckpt})
            results.append(("transformers", r))
            print(summary.format_summary(r, f"transformers serve, {a.users} users"), flush=True)
    except RuntimeError as e:
        print(f"peer.py: {e}", file=sys.stderr)
        return 1
    print(summary.format_table(results))
    (ours, peer_r) = results[0][1], results[1][1]
    tput = ours["output_throughput"] / max(peer_r["output_throughput"], 1e-9)
    ttft = peer_r["ttft_ms"]["p50"] / ours["ttft_ms"]["p50"]
    print(f"ratio raymoe / transformers serve at {a.users} users: output tok/s x{tput:.2f} "
          f"({ours['output_throughput']:.1f} vs {peer_r['output_throughput']:.1f}); p50 TTFT "
          f"{ours['ttft_ms']['p50']:.1f} vs {peer_r['ttft_ms']['p50']:.1f} ms (x{ttft:.2f} lower)")
    with open(out / "peer_summary.json", "w", encoding="utf-8") as f:
        json.dump({"raymoe": ours, "transformers": peer_r, "output_throughput_ratio": tput, "p50_ttft_ratio": ttft},
                  f, indent=2)
    print(f"peer.py: results in {out}")
    return 0 if all(r["failed"] == 0 for _, r in results) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve-peer"]:
        sys.exit(serve_peer(sys.argv[2:]))
    sys.exit(compare(sys.argv[1:]))
