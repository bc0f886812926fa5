"""Training recipes over the loop: OpenPCDet epochs (:mod:`.epochs`, fine-tuning and pretraining),
masked-occupancy validation (:mod:`.occupancy_validation`), progressive RQ (:mod:`.progressive_rq`)."""
