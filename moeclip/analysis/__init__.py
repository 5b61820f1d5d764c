"""Expert-usage analysis of MoE CLIP models: loads, routing entropy, co-selection, specialisation by group."""
from moeclip.analysis.experts import analyse_experts
from moeclip.analysis.report import write_expert_report
from moeclip.analysis.stats import LayerStats, mutual_information, normalised_mi

__all__ = ["LayerStats", "analyse_experts", "mutual_information", "normalised_mi", "write_expert_report"]
