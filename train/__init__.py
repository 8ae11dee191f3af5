"""``alignd train``: baselines and learned rewards for aligned decoding, as LoRA adapters of the SFT model.

    dpo    a baseline aligned to a target reward, from the SFT model's own samples (DPO, ALGORITHMS.md 7)
    irft   a reward learned from demonstrations: the implicit reward beta*log(pi_adapter/pi_sft) of an
           adapter trained with the IRFT / SPIN loss against regenerated negatives (ALGORITHMS.md 3)

The loops are TRL's (``DPOTrainer``) and the adapters PEFT's; this package prepares the data, hands the
options to TRL's ``DPOConfig``, keeps long runs resumable (``<out>.partial/``) and writes the manifest
``alignd_adapter.json``. Only ``alignd.cli`` imports it (an import-linter contract); nothing here is
imported by the server. See docs/TRAINING.md.
"""
