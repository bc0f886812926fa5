"""Server side of split inference: receives coded frames over TCP, answers with detections (JSON).

    python tools/split_server.py --ckpt .../global_best_bitstream.pth --key_file server.keys --host 0.0.0.0

Without --key_file it takes unsigned frames and listens on loopback only (another address needs
--insecure). Requests are signed (HMAC-SHA256 per key id), fresh (sequence numbers and a clock window)
and bounded (workers, queue, connections, frame size and deadlines): docs/split_inference.md, "Running the
server on a network". SIGTERM drains. Frames come from tools/split_infer.py --remote or the lean edge.
"""
import argparse
import ipaddress
import json
import logging
import os
import resource
import socket
import ssl
import sys

import numpy as np

from pcdet_ext.algorithms.bitstream import BitstreamError, encode_frame, max_frame_bytes, read_header
from pcdet_ext.config import ConfigError
from pcdet_ext.deploy import runtime
from pcdet_ext.deploy.server import FrameServer, Refused, add_limit_arguments, limits_from_args, listen, server_tls
from pcdet_ext.edge.auth import ENVELOPE, MAC_SIZE, KeyFileError, read_keys
from pcdet_ext.engine.startup.args import add_set_argument
from pcdet_ext.utils.checkpoint import CheckpointError
from pcdet_ext.utils.console import quiet_known_warnings

log = logging.getLogger("split_server")


def is_loopback(host: str) -> bool:
    """Every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def frame_handler(server_side: "runtime.ServerRuntime", class_names):
    """Frame bytes -> detections JSON; a frame the decoder refuses raises :class:`Refused` ('model' when it
    was coded for another model, 'format' otherwise)."""
    def handle(data: bytes) -> bytes:
        try:
            pred, timing = server_side.decode(data)
        except BitstreamError as exc:
            try:
                other = read_header(data)["model_id"] != server_side.model_id
            except BitstreamError:
                other = False
            raise Refused("model" if other else "format", str(exc)) from None
        return json.dumps({**runtime.boxes_payload(pred, class_names), **timing}).encode()
    return handle


def warm_up(server_side: "runtime.ServerRuntime") -> int:
    """Decode and detect one frame (every cell empty, or zero codes in dense mode) before serving; returns
    the peak resident memory it took (bytes)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n, k = server_side.cells[-1]
    geo = server_side.geo
    cells = np.arange(geo.height * geo.width) if server_side.dense else np.zeros(0, dtype=np.int64)
    frame = encode_frame(cells, np.zeros((len(cells), n), dtype=np.int64), k, server_side.models,
                         server_side.model_id, dense=server_side.dense)
    server_side.decode(frame)
    return 1024 * (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)


def check_flags(args) -> str:
    """What is wrong with the address, key and TLS flags (empty: nothing); loads nothing."""
    if not 0 <= args.port <= 65535:
        return f"--port: expected 0..65535, got {args.port}"
    if not args.key_file and not args.insecure and not is_loopback(args.host):
        return (f"--host {args.host}: without --key_file the server takes unsigned frames and listens on loopback "
                "only; give --key_file (or --insecure to accept unsigned frames from the network)")
    if bool(args.tls_cert) != bool(args.tls_key):
        return "--tls_cert and --tls_key: give both"
    if args.tls_client_ca and not args.tls_cert:
        return "--tls_client_ca: needs --tls_cert / --tls_key (client certificates are checked over TLS)"
    return ""


def main(argv=None) -> int:
    quiet_known_warnings()  # OpenPCDet's anchor generator warns about torch.meshgrid on every run
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg_file", default=None, help="OpenPCDet model config (default: the one stored in --ckpt)")
    p.add_argument("--ckpt", required=True, help="checkpoint with bitstream models (split_infer.py --fit_models)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18890, help="0 picks a free port (printed)")
    p.add_argument("--key_file", default=None, help="keys of the edges it accepts ('<key id> <hex key>' lines, "
                   "chmod 600; python -m pcdet_ext.edge.auth writes one): signed frames only")
    p.add_argument("--insecure", action="store_true", help="without --key_file, listen on a non-loopback address")
    p.add_argument("--tls_cert", default=None, help="server certificate (PEM): TLS on every connection")
    p.add_argument("--tls_key", default=None, help="private key of --tls_cert")
    p.add_argument("--tls_client_ca", default=None, help="require client certificates signed by this CA")
    add_limit_arguments(p)
    add_set_argument(p, default=[])
    args = p.parse_args(argv)
    given_max_frame = args.max_frame
    if given_max_frame is None:
        args.max_frame = 1  # for the checks below; the model's bound replaces it once loaded
    bad = check_flags(args) or limits_from_args(args).problems()
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    try:
        keys = read_keys(args.key_file) if args.key_file else None
        tls = server_tls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
        sock = listen((args.host, args.port), limits_from_args(args))
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ssl.SSLError as exc:
        print(f"error: --tls_cert / --tls_key / --tls_client_ca: cannot load ({exc})", file=sys.stderr)
        return 2
    except OSError as exc:  # a TLS file that cannot be read; port in use, address not on this machine, no permission
        where = "--tls_cert / --tls_key / --tls_client_ca" if exc.filename else f"cannot listen on {args.host}:{args.port}"
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"error: {where} ({why}{': ' + str(exc.filename) if exc.filename else ''})", file=sys.stderr)
        return 2
    try:
        model, dataset, cfg = runtime.load_split_model(args.cfg_file, args.set_cfgs, ckpt=args.ckpt)
        server_side = runtime.ServerRuntime.from_checkpoint(model, dataset, args.ckpt)
    except (CheckpointError, ConfigError, FileNotFoundError) as exc:
        sock.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not server_side.cells:
        sock.close()
        print(f"error: {args.ckpt}: no (n, k) cell has both trained codebooks and fitted bitstream models",
              file=sys.stderr)
        return 2
    largest = max_frame_bytes(server_side.geo, max(n for n, _ in server_side.cells)) + ENVELOPE.size + MAC_SIZE
    args.max_frame = largest if given_max_frame is None else given_max_frame
    limits = limits_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    per_request = warm_up(server_side)
    server = FrameServer(sock, frame_handler(server_side, list(cfg.CLASS_NAMES)), limits, keys=keys, tls=tls)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    bound = base + (limits.workers - 1) * per_request + limits.buffer_bound()
    auth = (f"signed frames from {len(keys)} key id(s)" if keys else
            "no --key_file: unsigned frames" + (" from the network (--insecure)" if args.insecure else ", loopback only"))
    print(f"{auth}{', TLS' if tls else ''}; {limits.workers} worker(s), queue {limits.queue}, "
          f"{limits.max_connections} connections, frames up to {limits.max_frame} B; "
          f"memory bound {bound / 2**20:.0f} MiB", flush=True)
    print(f"listening on {args.host}:{server.port}", flush=True)
    server.serve_forever()
    if server.running:  # the drain deadline passed inside a detection: exit now, not when it ends
        log.warning("exiting with %d detection(s) still running", server.running)
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":  # python -m pcdet_ext.cli.split_server
    sys.exit(main())
