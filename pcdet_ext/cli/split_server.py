"""Server side of split inference: receives coded frames over TCP, answers with detections (JSON).

    python tools/split_server.py --cfg_file cfgs/kitti_models/pointpillar_rq.yaml \
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
from pcdet_ext.deploy.transport import DEFAULT_MAX_FRAME, FrameServer
from pcdet_ext.utils.checkpoint import CheckpointError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg_file", default=None, help="OpenPCDet model config (default: the one stored in --ckpt)")
    p.add_argument("--ckpt", required=True, help="checkpoint with bitstream models (split_infer.py --fit_models)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18890, help="0 picks a free port (printed)")
    p.add_argument("--max_frame", type=int, default=DEFAULT_MAX_FRAME)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a client may stall mid-frame")
    p.add_argument("--set", dest="set_cfgs", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        model, dataset, cfg = runtime.load_split_model(args.cfg_file, args.set_cfgs, ckpt=args.ckpt)
        server_side = runtime.ServerRuntime.from_checkpoint(model, dataset, args.ckpt)
    except (CheckpointError, ConfigError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def handle(data: bytes) -> bytes:
        pred, timing = server_side.decode(data)
        return json.dumps({**runtime.boxes_payload(pred, list(cfg.CLASS_NAMES)), **timing}).encode()

    server = FrameServer((args.host, args.port), handle, max_frame=args.max_frame, timeout_s=args.timeout)
    print(f"listening on {args.host}:{server.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

