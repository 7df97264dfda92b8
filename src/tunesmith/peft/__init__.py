"""LoRA adapters: our own ``LoRALinear`` (dense or 4-bit base), injection, merging, and PEFT-format files."""

from tunesmith.peft.io import load_adapter, save_adapter
from tunesmith.peft.lora import (LoRAConfig, LoRALinear, adapter_parameters, adapters_disabled, freeze_base,
                                 inject_lora, lora_modules, merge_all, unmerge_all)
from tunesmith.peft.merged import merged_state_dict

__all__ = ["LoRAConfig", "LoRALinear", "adapter_parameters", "adapters_disabled", "freeze_base", "inject_lora",
           "load_adapter", "lora_modules", "merge_all", "merged_state_dict", "save_adapter", "unmerge_all"]
