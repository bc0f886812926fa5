"""Phase 1 or Phase 2 pretraining checkpoint -> fine-tuning weights: keep the student (or the EMA
teacher) encoder as ``backbone_3d.*`` (plus the VFE), drop decoders / mask tokens / teacher /
projection heads / frame queue / masking state, and report coverage against a fine-tune config.

    python tools/convert_pretrain_ckpt.py --ckpt output/.../ckpt/checkpoint_epoch_30.pth \\
        --out pretrained_backbone.pth [--use teacher] \\
        [--cfg_file cfgs/custom_models/rmae_cmae_isarc_4class_finetune_phase1.yaml]
"""
import argparse
import sys

from pcdet_ext.engine.pretrained import (PretrainedWeightsError, build_model_without_data, coverage, format_coverage,
                                        read_weights)
from pcdet_ext.engine.startup.args import add_set_argument, load_config
from pcdet_ext.engine.convert import convert_pretrain
from pcdet_ext.utils.checkpoint import atomic_save


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="Phase 1 or Phase 2 pretraining checkpoint")
    p.add_argument("--out", required=True, help="output .pth (OpenPCDet format, model_state only)")
    p.add_argument("--use", choices=["student", "teacher"], default="student")
    p.add_argument("--cfg_file", default=None, help="fine-tune config to report coverage against")
    add_set_argument(p, default=None)
    args = p.parse_args(argv)
    try:
        weights = read_weights(args.ckpt)
        kept, dropped = convert_pretrain(weights, args.use)
    except (PretrainedWeightsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"kept {len(kept)} tensors ({args.use} encoder + VFE); dropped {len(dropped)} "
          f"({', '.join(sorted({k.split('.')[1] if k.startswith('backbone_3d.') else k.split('.')[0] for k in dropped}))})")
    if args.cfg_file:
        model = build_model_without_data(load_config(args.cfg_file, args.set_cfgs))
        table, _ = coverage(model.state_dict(), kept)
        print(f"coverage against {args.cfg_file}:\n{format_coverage(table)}")
    atomic_save({"model_state": kept, "epoch": 0, "it": 0, "version": "pcdet_ext+convert",
                 "pcdet_ext": {"converted_from": str(args.ckpt), "use": args.use}}, args.out)
    print(f"wrote {args.out}")
    return 0



if __name__ == "__main__":  # python -m pcdet_ext.cli.convert_pretrain_ckpt
    sys.exit(main())
