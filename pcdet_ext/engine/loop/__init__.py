"""The one training loop (:mod:`.runner`) and the hooks the recipes share (:mod:`.hooks`)."""
