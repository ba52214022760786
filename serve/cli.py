"""``vlm serve``: run the OpenAI-compatible app on Ray Serve, or write its serve config YAML.

    vlm serve --checkpoint runs/demo/stage2/final --embedding-checkpoint runs/demo/stage1/final --port 8000
    vlm serve --config infra/serve/tiny.yaml                      # the same YAML `serve deploy` takes
    vlm serve --checkpoint DIR ingress.limits.max_images=4 lm.max_batch_size=16
    vlm serve --checkpoint DIR --write-config my-serve.yaml       # -> serve deploy my-serve.yaml

Any ``AppArgs`` field can be set with ``key.sub=value`` (values parsed as YAML, checked by
pydantic). Ctrl-C or SIGTERM shuts Serve down gracefully: in-flight requests drain first.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from serve.config import AppArgs, load_args

REPO = Path(__file__).resolve().parents[1]


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
        if not isinstance(tree, dict):
            raise ValueError(f"{dotted}: {k!r} is not a section")
    tree[keys[-1]] = value


def resolve_args(ns: argparse.Namespace) -> AppArgs:
    base = load_args(ns.config).model_dump(exclude_unset=True) if ns.config else {}
    for key, value in (("checkpoint", ns.checkpoint), ("embedding_checkpoint", ns.embedding_checkpoint),
                       ("model_name", ns.model_name)):
        if value is not None:
            base[key] = value
    for item in ns.overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {item!r}")
        _set(base, key, yaml.safe_load(raw))
    if "checkpoint" not in base:
        raise ValueError("expected --checkpoint DIR (or a --config file with checkpoint)")
    return AppArgs.model_validate(base)


def serve_config(args: AppArgs, *, name: str = "vlm", route_prefix: str = "/", host: str = "0.0.0.0",
                 port: int = 8000) -> dict[str, Any]:
    """The serve config (applications -> deployments) that ``serve deploy`` and KubeRay's
    ``serveConfigV2`` take. The runtime sections (``ingress``, ``encoder``, ``lm``) go in their
    deployment's ``user_config`` and the settings of ``args.deployments`` beside them: a change
    to either is then applied to the running replicas (``reconfigure()``, or a scale) where a
    change to ``args`` would start new ones (Serve versions an application by its ``args``)."""
    from serve.app import served_deployments
    from serve.config import USER_CONFIG_SECTIONS

    app_args = args.model_dump(exclude_defaults=True, exclude={"deployments", *USER_CONFIG_SECTIONS.values()})
    app_args["checkpoint"] = args.checkpoint
    served = list(served_deployments(args))
    unknown = sorted(set(args.deployments) - set(served))
    if unknown:
        raise ValueError(f"deployments: {', '.join(unknown)} not in this app (it has {', '.join(served)})")
    deployments = []
    for dep in served:
        entry: dict[str, Any] = {"name": dep, **args.deployments.get(dep, {})}
        if dep in USER_CONFIG_SECTIONS:
            entry["user_config"] = getattr(args, USER_CONFIG_SECTIONS[dep]).model_dump(mode="json")
        deployments.append(entry)
    app = {"name": name, "route_prefix": route_prefix, "import_path": "serve.app:build_app",
                           "args": app_args, "deployments": deployments}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port, "request_timeout_s": 300},
        "applications": [app],
    }


def local_cpus(args: AppArgs) -> int:
    """Logical CPUs for a local Ray serving ``args``: the machine's, or what the replicas take at
    their starting count plus one (on 2 cores the default app's 3 would never be scheduled)."""
    from serve.app import app_cpus

    return max(os.cpu_count() or 1, math.ceil(app_cpus(args)) + 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlm serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a stage-2 checkpoint (chat); a stage-1 one serves only embeddings")
    p.add_argument("--embedding-checkpoint", help="a stage-1 checkpoint for /v1/embeddings")
    p.add_argument("--config", help="YAML: AppArgs, or a serve config whose first application's args are used")
    p.add_argument("--model-name", help="the model id clients send (default: the checkpoint directory's name, "
                   "or the run's for a run's final/ export: runs/s2/final -> s2)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="Ray address (default: start a local Ray)")
    p.add_argument("--name", default="vlm", help="the Serve application name")
    p.add_argument("--route-prefix", default="/")
    p.add_argument("--write-config", metavar="FILE", help="write the serve config YAML and exit")
    p.add_argument("--no-block", action="store_true", help="deploy and return (the app keeps running on the cluster)")
    p.add_argument("overrides", nargs="*", help="AppArgs overrides, key.sub=value")
    ns = p.parse_args(argv)
    try:
        args = resolve_args(ns)
        args.names()  # reads checkpoint.json: a missing or wrong directory fails here, clearly
    except Exception as e:
        print(f"vlm serve: {e}", file=sys.stderr)
        return 2

    if ns.write_config:
        cfg = serve_config(args, name=ns.name, route_prefix=ns.route_prefix, host=ns.host, port=ns.port)
        text = f"# serve deploy {ns.write_config}\n" + yaml.safe_dump(cfg, sort_keys=False)
        Path(ns.write_config).write_text(text)
        print(f"wrote {ns.write_config}")
        return 0

    import ray
    from ray import serve

    from serve.app import build_app

    env = {"env_vars": {"PYTHONPATH": str(REPO)}}
    if ns.address:
        ray.init(address=ns.address, runtime_env=env)
    else:  # a local Ray: logical CPUs for every replica at its starting count, and one to scale up
        ray.init(num_cpus=local_cpus(args), runtime_env=env)
    serve.start(http_options={"host": ns.host, "port": ns.port})
    try:
        serve.run(build_app(args), name=ns.name, route_prefix=ns.route_prefix)
    except KeyboardInterrupt:
        print("interrupted while deploying; shutting down", file=sys.stderr, flush=True)
        serve.shutdown()
        ray.shutdown()
        return 130
    host = "127.0.0.1" if ns.host == "0.0.0.0" else ns.host
    chat, emb = args.names()
    print(f"serving {chat or '-'} (chat) and {emb or '-'} (embeddings) at http://{host}:{ns.port}{ns.route_prefix.rstrip('/')}/v1",
          flush=True)
    if ns.no_block:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("shutting down (draining in-flight requests)...", flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
