"""Which (codebooks, entries) cells a checkpoint can be evaluated at."""
import pytest
import torch

from pcdet_ext.algorithms.quantization import ResidualQuantizer
from pcdet_ext.engine.recipes.progressive_rq.evaluate import check_cell


def trained(stages):
    q = ResidualQuantizer(dim=4, num_codebooks=3, codebook_size=256, schedule=(16, 32, 64, 128, 256))
    x = torch.randn(500, 4)
    for c, k in stages:
        q.start_stage(c, k, x)
    return q


def test_cells_above_the_trained_size_are_refused_off_schedule_ones_warned():
    q = trained([(0, 16), (0, 64), (1, 16), (1, 32)])
    assert check_cell(q, 1, 64) is None and check_cell(q, 2, 32) is None
    with pytest.raises(ValueError, match=r"--eval_num_embeddings 256: codebooks 1..1 of this checkpoint were trained "
                                         r"with \[64\] entries; expected 1..64"):
        check_cell(q, 1, 256)
    with pytest.raises(ValueError, match=r"trained with \[64, 32\] entries; expected 1..32"):
        check_cell(q, 2, 64)
    with pytest.raises(ValueError, match="--eval_num_codebooks 3: this checkpoint has 2 trained"):
        check_cell(q, 3, 16)
    assert "17 is not a trained operating point" in check_cell(q, 1, 17)


def test_a_refused_cell_names_where_its_value_came_from():
    q = trained([(0, 16), (1, 16)])
    with pytest.raises(ValueError, match=r"^evaluation.use_num_codebook \(in exp.yaml\) 3: this checkpoint has 2"):
        check_cell(q, 3, 16, n_from="evaluation.use_num_codebook (in exp.yaml)")
    with pytest.raises(ValueError, match=r"^evaluation.use_num_embedding 64: codebooks 1..2"):
        check_cell(q, 2, 64, k_from="evaluation.use_num_embedding")


def test_a_checkpoint_of_other_codebooks_is_named_not_a_load_state_dict_traceback():
    from types import SimpleNamespace
    from pcdet_ext.engine.recipes.progressive_rq.evaluate import quantizer_mismatch
    q = ResidualQuantizer(dim=4, num_codebooks=2, codebook_size=64, schedule=(16, 64))
    state = {"model_state": {f"rq_bottleneck.quantizer.{k}": v for k, v in q.state_dict().items()},
             "config": {"model": {"n_codebook": 2}}}
    same = SimpleNamespace(quantizer=q)
    assert quantizer_mismatch(same, state, "ck.pth", "exp.yaml") is None
    other = SimpleNamespace(quantizer=ResidualQuantizer(dim=4, num_codebooks=5, codebook_size=256))
    msg = quantizer_mismatch(other, state, "ck.pth", "exp.yaml")
    assert msg.startswith("--rq_ckpt ck.pth holds 2 codebook(s) x 64 entries (its run had model.n_codebook 2), but "
                          "the experiment exp.yaml builds 5 x 256 (model.n_codebook;")
