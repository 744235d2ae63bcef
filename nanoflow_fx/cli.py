"""The `nanoflow-fx` console script: `nanoflow-fx serve MODEL_OR_PATH [--host --port --dtype --device ...]`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoflow-fx", description="nanoflow_fx: NanoFlow-style serving for "
                                     "Hugging Face decoders")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model with OpenAI's API (needs nanoflow-fx[serve])",
                                description="Serve a model with OpenAI's API: /v1/completions, "
                                "/v1/chat/completions, /v1/models. SIGTERM or Ctrl-C finishes the requests in "
                                "flight, then exits.")
    serve.add_argument("model", metavar="MODEL_OR_PATH", help="a hub name or a local directory (save_pretrained)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                       help="weights' dtype (default: the checkpoint's)")
    serve.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if there is a GPU)")
    serve.add_argument("--served-model-name", default=None, help="the name clients give as `model` (default: "
                       "MODEL_OR_PATH)")
    serve.add_argument("--config", default=None, help="NanoFlowConfig fields as JSON, e.g. "
                       "'{\"max_batch_size\": 256}'")
    serve.add_argument("--http-processes", type=int, default=2, help="processes answering HTTP, beside the "
                       "engine's (default: %(default)s; 0: HTTP on a thread of the engine's process)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = json.loads(args.config) if args.config is not None else None
    except ValueError as err:
        raise SystemExit(f"nanoflow-fx serve: --config is not valid JSON ({err})") from None
    if config is not None and not isinstance(config, dict):
        raise SystemExit("nanoflow-fx serve: --config must be a JSON object of NanoFlowConfig fields")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        from nanoflow_fx.server import serve
    except ImportError as err:
        raise SystemExit(str(err)) from None
    serve(args.model, host=args.host, port=args.port, model_name=args.served_model_name, config=config,
          dtype=args.dtype, device=args.device, log_level=args.log_level, http_processes=args.http_processes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
