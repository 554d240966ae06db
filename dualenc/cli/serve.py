"""The `dualenc serve` subcommand: the embedding, search and zero-shot service (dualenc.serve) on uvicorn."""

from __future__ import annotations

import ipaddress
import os

from dualenc.cli.support import CommandError, at_least, load_model, note, shown
from dualenc.cli.options import PRECISIONS, subcommand

API_KEY_VARIABLE = "DUALENC_API_KEY"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _server_class():
    """uvicorn's Server, except that a SIGTERM or SIGINT, once the graceful shutdown is done, ends the command with
    status 0 (uvicorn raises the signal again once it has shut down, which would kill the process)."""
    import contextlib
    import signal
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server


def cmd_serve(args) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise CommandError("serve needs starlette and uvicorn: pip install 'dualenc[serve]'") from None
    from dualenc.cli.options import precision_dtype
    from dualenc.errors import InputError
    from dualenc.search import index as search_index
    from dualenc.serve import Limits, Service, create_app

    at_least(args.max_batch, "--max-batch")
    at_least(args.port, "--port", 0)
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    try:
        limits = Limits(max_body_bytes=int(args.max_body_mb * 2 ** 20), max_pixels=args.max_pixels,
                        max_inputs=args.max_inputs, timeout_s=args.timeout)
    except ValueError as e:
        raise CommandError(str(e)) from None
    opened = None
    if args.index:
        if not os.path.isfile(args.index):
            raise CommandError(f"index file not found: {args.index}")
        opened = search_index.open_index(args.index)
    if args.images and not os.path.isdir(args.images):
        raise CommandError(f"--images {args.images} is not a folder")
    if args.images and not args.index:
        raise CommandError("--images is the folder of --index's images: give --index")
    precision = args.precision or (opened.metadata.get("precision", "float32") if opened else "float32")
    if opened is not None and precision != opened.metadata.get("precision", "float32"):
        note("serve", f"warning: {args.index} was embedded in {opened.metadata.get('precision', 'float32')}, the "
                      f"queries will be in {precision}")
    config, params, processor = load_model(args.model)
    if opened is not None:
        if opened.dims != config.projection_dim:
            raise CommandError(f"{args.index} holds {opened.dims}-dim embeddings, the model makes "
                               f"{config.projection_dim}")
        if not args.any_model:
            try:
                search_index.check_model(opened, params, name=f"--model {args.model}")
            except InputError as e:
                raise CommandError(f"{e}: their scores would not compare; --any-model serves it anyway") from None
    if not _loopback(args.host) and not api_key:
        note("serve", f"warning: listening on {args.host} without an API key: anyone who can reach it can use it "
                      f"(--api-key, or {API_KEY_VARIABLE})")
    name = args.name or os.path.normpath(args.model)
    service = Service(params, config, processor, name=shown(name), index=opened, image_root=args.images,
                      dtype=precision_dtype(precision), max_batch=args.max_batch, batching=not args.no_batching,
                      limits=limits, api_key=api_key)
    app = create_app(service)
    server = _server_class()(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                            access_log=args.access_log, timeout_graceful_shutdown=args.timeout + 5,
                                            lifespan="on"))
    note("serve", f"serving {name} at http://{args.host}:{args.port}/ (the page; the API under /v1/)")
    server.run()
    note("serve", "stopped")
    return 0 if server.started else 1


EXAMPLES = {
    'serve': 'dualenc serve --model dualenc-demo/model --index digits.safetensors --port 8000',
}


def register(subs) -> None:
    """Adds serve to the `dualenc` command's subparsers."""
    p = subcommand(subs, EXAMPLES, "serve", cmd_serve,
                   "serve embeddings, search over an index and zero-shot classification over HTTP, with a search "
                   "page at / (needs dualenc[serve])")
    p.add_argument("--model", required=True, help="a dual encoder directory")
    p.add_argument("--index", help="an embedding file written by `dualenc embed` to search (/v1/search)")
    p.add_argument("--images", metavar="ROOT", help="the folder the index's names are paths in, the only one "
                                                    "thumbnails are read from (default: the current folder, where "
                                                    "`dualenc embed` was run)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (another than loopback without "
                                                       "--api-key is warned about)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--precision", choices=PRECISIONS, help="compute dtype of the matmuls (default: the index's "
                                                           "precision, else float32)")
    p.add_argument("--api-key", help=f"a key every /v1/ request must give (Authorization: Bearer KEY, or "
                                     f"x-api-key: KEY); default: ${API_KEY_VARIABLE}, else none")
    p.add_argument("--max-batch", type=int, default=64, help="the most inputs run in one forward batch (batches "
                                                             "are padded to 1, 8, 32, 64 rows up to it)")
    p.add_argument("--no-batching", action="store_true", help="run each request's inputs alone, never with "
                                                              "another request's")
    p.add_argument("--max-inputs", type=int, default=256, help="texts and images per request")
    p.add_argument("--max-pixels", type=int, default=25_000_000, help="pixels of an image (read from its header "
                                                                      "before it is decoded)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="request body size, MiB")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a request may take (then 504)")
    p.add_argument("--name", help="the model's name in responses (default: the --model path)")
    p.add_argument("--any-model", action="store_true", help="serve an index another model embedded")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
