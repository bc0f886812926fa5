"""Start-up of the training tools: flags and config (:mod:`.args`), checks before anything runs
(:mod:`.preflight`), torch.distributed (:mod:`.distributed`), loaders / model / logger (:mod:`.builders`)
and the whole start of a run (:mod:`.prepare`)."""
