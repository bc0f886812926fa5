"""Edge -> bytes -> server gives exactly the in-process PointPillarRQ detections."""
import numpy as np
import pytest
import torch

from pcdet_ext.algorithms.bitstream import read_header
from pcdet_ext.config import cfg_from_list, cfg_from_yaml_file
from pcdet_ext.engine.startup import builders
from pcdet_ext.deploy import runtime
from tier2 import REPO, assert_other_codebooks_refuse, seed_everything

SMALL = ["DATA_CONFIG.POINT_CLOUD_RANGE", "[0, -20.48, -3, 40.96, 20.48, 1]",
         "MODEL.RQ_BOTTLENECK.NUM_CODEBOOKS", "3", "MODEL.RQ_BOTTLENECK.EMBEDDING_SCHEDULE", "[16, 64]",
         "MODEL.RQ_BOTTLENECK.CODEBOOK_SIZE", "64",
         # an untrained head scores ~0.01: keep its boxes so that there are detections to compare
         "MODEL.POST_PROCESSING.SCORE_THRESH", "0.0", "MODEL.POST_PROCESSING.NMS_CONFIG.NMS_POST_MAXSIZE", "50"]


def frames(root, split):
    ids = (root / "ImageSets" / f"{split}.txt").read_text().split()
    return [np.fromfile(root / "training" / "velodyne" / f"{i}.bin", dtype=np.float32).reshape(-1, 4) for i in ids]


@pytest.fixture(scope="module", params=["sparse", "dense"])
def trained(request, synthetic_kitti):
    seed_everything(3)
    cfg = cfg_from_yaml_file(REPO / "cfgs/kitti_models/pointpillar_rq.yaml")
    cfg_from_list(SMALL + ["MODEL.RQ_BOTTLENECK.MODE", request.param], cfg)
    (train_set, train_loader, _), (test_set, _, _) = builders.build_loaders(cfg, synthetic_kitti)
    model = builders.build_model(cfg, train_set)
    q = model.quantizer
    q.set_mode("ema")
    from pcdet.models import load_data_to_gpu
    model.train()
    for c in range(3):  # a briefly trained bottleneck: EMA warm-up of every codebook at 64 entries
        q.start_stage(c, 64)
        for batch in train_loader:
            load_data_to_gpu(batch)
            with torch.no_grad():
                model(batch)
    models = runtime.fit_probability_models(model, test_set, frames(synthetic_kitti, "train"), [16, 64])
    return model, test_set, models, frames(synthetic_kitti, "val")


@pytest.mark.parametrize("n,k", [(1, 16), (3, 64)])
def test_decoded_detections_equal_in_process(trained, n, k):
    model, dataset, models, val = trained
    edge = runtime.EdgeRuntime(model, dataset, models, n, k)
    server = runtime.ServerRuntime(model, dataset, models)
    for points in val:
        data, timing = edge.encode(points)
        hdr = read_header(data)
        assert (hdr["num_codebooks"], hdr["num_embeddings"]) == (n, k) and hdr["pillars"] == timing["pillars"]
        pred, _ = server.decode(data)
        ref = runtime.in_process(model, dataset, points, n, k)
        assert len(ref["pred_boxes"]) >= 1  # real detections, not two empty lists
        for key in ("pred_boxes", "pred_scores", "pred_labels"):
            assert torch.equal(pred[key], ref[key]), key
        payload = runtime.boxes_payload(pred, dataset.class_names)
        assert len(payload["boxes"]) == len(payload["labels"]) == len(pred["pred_boxes"])


def test_server_with_other_codebooks_refuses(trained, tmp_path):
    model, dataset, models, val = trained
    data, _ = runtime.EdgeRuntime(model, dataset, models, 2, 16).encode(val[0])
    assert_other_codebooks_refuse(model, dataset, models, data)


def test_server_refuses_untrained_cells_and_the_other_mode(trained):
    from pcdet_ext.algorithms.bitstream import BitstreamError, encode_frame
    model, dataset, models, val = trained
    server = runtime.ServerRuntime(model, dataset, models)
    assert runtime.trained_cells(model.quantizer, models) == [(1, 16), (2, 16), (3, 16), (1, 64), (2, 64), (3, 64)]
    geo = server.geo
    cells = np.arange(geo.height * geo.width) if server.dense else np.array([5, 9, 200])
    codes = np.zeros((len(cells), 2), dtype=np.int64)
    with pytest.raises(BitstreamError, match=r"\(2, 32\) is not a cell"):  # within 64 entries, never trained at 32
        server.decode(encode_frame(cells, codes, 32, models, server.model_id, dense=server.dense))
    other = np.array([5, 9, 200]) if server.dense else np.arange(geo.height * geo.width)
    with pytest.raises(BitstreamError, match="frame for a (sparse|dense) model"):
        server.decode(encode_frame(other, np.zeros((len(other), 2), dtype=np.int64), 16, models, server.model_id,
                                   dense=not server.dense))
