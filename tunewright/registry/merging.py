"""Several LoRA adapters over one base merged into one, with PEFT's weighted adapter merging.

`cat` is exact: the merged update is sum_i w_i * s_i * B_i A_i (s_i = adapter i's alpha / r), at the sum of
the ranks. `svd` forms that same sum and keeps its best rank-`svd_rank` approximation. `linear`, `ties`,
`dare_linear`, `dare_ties` and `magnitude_prune` combine the A matrices and the B matrices separately
(entry by entry, so the adapters need one rank), each with sqrt(|w_i * s_i|) (the sign of w_i on A); their
product holds cross terms B_i A_j, so it only approximates the weighted sum. The `*_svd` variants prune
and elect signs on the full updates, then factor like `svd`. The merged adapter's own scale is 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunewright.recipe.model import MergeConfig
from tunewright.registry.adapters import check_mergeable, is_remote, read_config


def check_sources(cfg: MergeConfig) -> None:
    """Raise ValueError, naming the recipe key, unless the merge's local adapter folders exist, hold PEFT adapters
    and can be merged with its combination.

    The recipe checks only what its YAML holds; this reads the folders, so it runs where the merge is set up:
    before a run starts (`tunewright validate`, `run`, ...) and in stage 2. Registered and S3 adapters get the
    same checks in stage 2, once fetched.
    """
    local = [ref for ref in cfg.adapters if not is_remote(ref)]
    configs = []
    for ref in local:
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            raise ValueError(f"model.merge.adapters: adapter folder not found: {ref}")
        try:
            configs.append((ref, read_config(folder)))
        except ValueError as exc:
            raise ValueError(f"model.merge.adapters: {exc}") from None
    try:
        check_mergeable(configs, cfg.combination)
    except ValueError as exc:
        raise ValueError(f"model.merge: {exc}") from None


def merge_adapters(base: Any, adapter_dirs: list[str], weights: list[float], combination: str, out_dir: Path, *,
                   density: float | None = None, majority_sign_method: str = "total", svd_rank: int | None = None,
                   svd_clamp: float | None = None, seed: int = 0, base_dir: str | None = None) -> dict:
    """Load the adapters over `base`, merge them, save the result as a plain adapter in `out_dir`.

    DARE's random pruning draws from torch's generator seeded with `seed`, so a merge is repeatable.
    Returns the merged adapter's rank and size. `base` is consumed (it carries adapter layers afterwards).
    """
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = [f"source_{i}" for i in range(len(adapter_dirs))]
    net = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0])
    for name, folder in zip(names[1:], adapter_dirs[1:]):
        net.load_adapter(folder, adapter_name=name)
    torch.manual_seed(seed)
    # "default" is the name PEFT saves at the folder's top level, where stage 4 and serving look for it
    net.add_weighted_adapter(names, list(weights), "default", combination_type=combination, density=density,
                             majority_sign_method=majority_sign_method, svd_rank=svd_rank, svd_clamp=svd_clamp)
    config = net.peft_config["default"]
    if config.use_rslora:
        # PEFT gives the merged adapter alpha = r, meant as scale 1; with rsLoRA inherited from the sources that
        # would be sqrt(r). The merged A and B already carry each source's scale.
        config.use_rslora = False
        for module in net.modules():
            if isinstance(module, LoraLayer) and "default" in module.scaling:
                module.scaling["default"] = 1.0
    if base_dir is not None:
        config.base_model_name_or_path = str(base_dir)
    for name in names:
        net.delete_adapter(name)
    net.set_adapter("default")
    net.save_pretrained(out_dir, selected_adapters=["default"])
    n_params = sum(p.numel() for n, p in net.named_parameters() if ".default." in n and "lora_" in n)
    return {"r": config.r, "n_params": n_params}

