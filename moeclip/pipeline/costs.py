"""What each model of a DMU run cost: training samples and FLOPs, and inference FLOPs per image and caption.

Equal samples is not equal compute: a top-2 MoE runs two FFNs a token, router-only training skips weight
gradients, and DMU also embeds the whole corpus once per stage to cluster it. Each model is charged for
everything its weights went through (a stage model: its own stage, or every stage before it when stages
chain; DMU: all stages, their embedding passes and the router fine-tuning; a Drop-Upcycling main model,
`construction=drop_upcycle`: its fine-tuning alone), with per-pair FLOPs counted on the real models
(`moeclip.analysis.flops`).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from moeclip.analysis.flops import inference_flops, train_flops_per_pair
from moeclip.model.ffn import ffn_param_names
from moeclip.moe import TRAINABLE_MODES, set_trainable


def model_costs(base: nn.Module, make_moe: Callable[[float], nn.Module], cfg: Any, num_stages: int,
                corpus_pairs: int, samples: dict[str, int]) -> dict[str, dict[str, float]]:
    """{model name: {train_samples, train_flops, image_flops, caption_flops}} for the models in `samples`
    (their training samples; MCL stage models are derived from cfg). make_moe(drop_ratio) builds an upcycled
    copy of `base` with the run's MoE settings."""
    dense_infer = inference_flops(base)
    dense_ffn_pair = train_flops_per_pair(base, ffn_param_names(base))
    embed_pass = corpus_pairs * (dense_infer["image"] + dense_infer["caption"])
    moe = make_moe(0.0)
    moe_infer = inference_flops(moe)
    per_pair = {mode: train_flops_per_pair(moe, set_trainable(moe, mode)) for mode in TRAINABLE_MODES}
    stage = cfg.mcl.train.steps * cfg.mcl.train.global_batch
    embed_passes = 1 if cfg.mcl.construction == "specialists" else num_stages  # specialists: one partition
    mcl_flops = num_stages * stage * dense_ffn_pair + embed_passes * embed_pass

    def row(n: int, flops: float, infer: dict[str, int]) -> dict[str, float]:
        return {"train_samples": n, "train_flops": float(flops), "image_flops": infer["image"],
                "caption_flops": infer["caption"]}

    out = {"base": row(0, 0, dense_infer)}
    for s in range(1, num_stages + 1):
        lineage = s if cfg.mcl.start_from == "previous" else 1
        out[f"mcl_stage_{s}"] = row(lineage * stage, lineage * (stage * dense_ffn_pair + embed_pass), dense_infer)
    router_mode = cfg.router_ft.mode
    if "dmu" in samples:
        n = samples["dmu"]
        out["dmu"] = row(num_stages * stage + n, mcl_flops + n * per_pair[router_mode],
                         moe_infer)
    if "dmu_router_experts" in samples:
        n = samples["dmu_router_experts"]
        out["dmu_router_experts"] = row(num_stages * stage + n, mcl_flops + n * per_pair["router+experts"], moe_infer)
    if cfg.construction == "drop_upcycle" and "drop_upcycle" in samples:  # the main model: no MCL, construction_ft
        n = samples["drop_upcycle"]
        out["drop_upcycle"] = row(n, n * per_pair[cfg.construction_ft.mode], moe_infer)
    baseline_mode = cfg.baselines.upcycle_finetune.mode
    for name in ("upcycle", "drop_upcycle"):
        if name in samples and name not in out:
            n = samples[name]
            out[name] = row(n, n * per_pair[baseline_mode], moe_infer)
    if "dense_ft" in samples:
        out["dense_ft"] = row(samples["dense_ft"], samples["dense_ft"] * dense_ffn_pair, dense_infer)
    return out


def costs_markdown(report: dict[str, Any]) -> list[str]:
    """report.md's cost table (GFLOPs), with each model's mean R@1 beside it, and the retention tables of
    `data.also_val` sets; [] when the report has neither."""
    lines: list[str] = []
    costs, models = report.get("costs", {}), report.get("models", {})
    if costs:
        lines += ["", "## Cost per model", "", "Training: everything the model's weights went through (MCL stages "
                  "and their embedding passes included), counted on the real forward and backward; inference: one "
                  "image, one caption (matrix products and attention only).", "",
                  "| model | mean R@1 | training samples | training GFLOPs | GFLOPs / image | GFLOPs / caption |",
                  "|---|---|---|---|---|---|"]
        for name, c in costs.items():
            r1 = models.get(name, {}).get("mean_R@1")
            lines.append(f"| {name} | {'–' if r1 is None else f'{100 * r1:.1f}'} | {c['train_samples']:,} | "
                         f"{c['train_flops'] / 1e9:,.0f} | {c['image_flops'] / 1e9:.3f} | {c['caption_flops'] / 1e9:.3f} |")
    for vset, results in report.get("also_val", {}).items():
        lines += ["", f"## Also evaluated on `{vset}` (mean R@1 %, next to the main validation set)", "",
                  f"| model | main | {vset} |", "|---|---|---|"]
        for name, m in results.items():
            lines.append(f"| {name} | {100 * models.get(name, {}).get('mean_R@1', float('nan')):.1f} | "
                         f"{100 * m['mean_R@1']:.1f} |")
    return lines
