"""Server side of split inference: receives coded frames over TCP, answers with detections (JSON).

    python tools/split_server.py --cfg_file cfgs/kitti_models/pointpillar_rq.yaml \\
        --ckpt progressive_rq_logs/split1_ALL/checkpoints/global_best_bitstream.pth --port 18890

Frames: u32 length + payload (tools/split_infer.py --remote sends them). Bad frames get an error
reply; a client that disconnects or stalls is dropped; the server keeps serving the others.
"""
import argparse
import json
import logging
import sys


from pcdet_ext.config import ConfigError
from pcdet_ext.deploy import runtime
from pcdet_ext.edge.transport import DEFAULT_MAX_FRAME, FrameServer
from pcdet_ext.utils.checkpoint import CheckpointError
from pcdet_ext.engine.startup.args import add_set_argument
from pcdet_ext.utils.console import quiet_known_warnings


def check_limits(args) -> str:
    """What is wrong with --port / --max_frame / --timeout (empty: nothing)."""
    if not 0 <= args.port <= 65535:
        return f"--port: expected 0..65535, got {args.port}"
    if args.max_frame < 1:
        return f"--max_frame: expected a positive number of bytes, got {args.max_frame}"
    if not 0 < args.timeout < float("inf"):  # also NaN
        return f"--timeout: expected a positive number of seconds, got {args.timeout}"
    return ""


def main(argv=None) -> int:
    quiet_known_warnings()  # OpenPCDet's anchor generator warns about torch.meshgrid on every run
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg_file", default=None, help="OpenPCDet model config (default: the one stored in --ckpt)")
    p.add_argument("--ckpt", required=True, help="checkpoint with bitstream models (split_infer.py --fit_models)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18890, help="0 picks a free port (printed)")
    p.add_argument("--max_frame", type=int, default=DEFAULT_MAX_FRAME)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a client may stall mid-frame")
    add_set_argument(p, default=[])
    args = p.parse_args(argv)
    bad = check_limits(args)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        model, dataset, cfg = runtime.load_split_model(args.cfg_file, args.set_cfgs, ckpt=args.ckpt)
        server_side = runtime.ServerRuntime.from_checkpoint(model, dataset, args.ckpt)
    except (CheckpointError, ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def handle(data: bytes) -> bytes:
        pred, timing = server_side.decode(data)
        return json.dumps({**runtime.boxes_payload(pred, list(cfg.CLASS_NAMES)), **timing}).encode()

    try:
        server = FrameServer((args.host, args.port), handle, max_frame=args.max_frame, timeout_s=args.timeout)
    except OSError as exc:  # port in use, address not on this machine, no permission
        print(f"error: cannot listen on {args.host}:{args.port} ({exc.strerror or exc})", file=sys.stderr)
        return 2
    print(f"listening on {args.host}:{server.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0



if __name__ == "__main__":  # python -m pcdet_ext.cli.split_server
    sys.exit(main())
