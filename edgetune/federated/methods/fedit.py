"""FedIT: federated instruction tuning with LoRA (Zhang et al., "Towards Building the
Federated GPT", ICASSP 2024) -- clients train LoRA adapters locally with AdamW and upload
them; the server averages them weighted by client sample counts (FedAvg, McMahan et al. 2017),
or steps a server optimizer on the average (finetune.server).

LoRA itself is peft's; the weighted mean is Flower's `aggregate`. Only adapter weights travel.
"""

from __future__ import annotations

from pathlib import Path

from edgetune.federated.methods.weights import WeightMethod


class FedIT(WeightMethod):
    def export(self, model, state, out_dir):
        self.apply_global(model, state)
        for config in model.peft_config.values():  # peft keeps a set, saved in the process's hash
            config.target_modules = sorted(config.target_modules)  # order: DVC saw a changed file
        model.save_pretrained(Path(out_dir) / "adapter")  # the adapter alone, as peft saves it
        super().export(model, state, out_dir)
