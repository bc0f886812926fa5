"""The progressive RQ recipe: the ``split1_ALL.yaml`` schema, its OpenPCDet objects, the stage-by-stage
trainer over the engine's runner, operating-point evaluation and the run folder."""
