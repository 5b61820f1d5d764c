"""The benchmark suite: one command that measures and regenerates docs/benchmarks.md.

    python bench/run.py            # full suite (~20 minutes on 2 loaded cores), writes docs/benchmarks.md
    python bench/run.py --quick    # small subset (< 3 minutes), writes runs/bench/quick/benchmarks.md
    python bench/run.py --only layer,ep   # re-run some sections, rebuild the doc from the rest's saved results

Sections run one after another, each in its own process (never two benchmark processes at once,
except the expert-parallel section's two torchrun ranks): layer, ep, clip, mcl, bf16, memory.
Raw results and logs go to runs/bench/{full,quick}/.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, loadavg, machine_facts, now, read_json, write_json  # noqa: E402

SECTIONS = ["layer", "ep", "clip", "mcl", "bf16", "memory"]
SCRIPTS = {"layer": "moe_layer.py", "ep": "expert_parallel.py", "clip": "clip_throughput.py",
           "mcl": "mcl_overhead.py", "bf16": "bf16_accuracy.py", "memory": "memory.py"}
GOALS = {"floor": 1.10, "deepspeed": 1.8, "bound": 0.9, "kmeans_s": 120.0}


def run_section(name: str, quick: bool, out_dir: Path) -> dict:
    out = out_dir / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).parent / SCRIPTS[name]), "--out", str(out)]
    if quick:
        cmd.append("--quick")
    if name in ("ep", "bf16") and (out_dir / "profiles.json").exists():
        cmd += ["--profiles", str(out_dir / "profiles.json")]
    before = loadavg()
    t0 = time.perf_counter()
    with open(out_dir / f"{name}.log", "w") as log:
        code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    info = {"section": name, "seconds": seconds, "load_before": before, "load_after": loadavg(), "exit": code,
            "command": " ".join(["python", f"bench/{SCRIPTS[name]}"] + cmd[2:]).replace(str(REPO) + "/", "")}
    print(f"{name}: {seconds:.0f} s, exit {code}, load {before} -> {info['load_after']}", flush=True)
    if code:
        print(f"  see {out_dir / (name + '.log')}", flush=True)
    if name == "layer" and out.exists():
        write_json(out_dir / "profiles.json", read_json(out)["dmu_routing"]["profiles"])
    return info


# ----------------------------------------------------------------------------------------------- formatting

def f(x: float | None, nd: int = 1) -> str:
    return "–" if x is None else f"{x:,.{nd}f}"


def r(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}x"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(row) + " |" for row in rows]


def load_json(out_dir: Path, name: str) -> dict | None:
    path = out_dir / f"{name}.json"
    return read_json(path) if path.exists() else None


# ----------------------------------------------------------------------------------------------- doc

def goals(res: dict) -> tuple[list[str], dict]:
    lines, verdict = [], {}
    layer, clip, mcl = res.get("layer"), res.get("clip"), res.get("mcl")
    rows = []
    if layer:
        big = [c for c in layer["grid"] if c["T"] >= 4096]
        final = {id(c): final_ratio(c) for c in big}
        worst = max(big, key=lambda c: final[id(c)])
        over = [c for c in big if final[id(c)] > GOALS["floor"]]
        screened = [c for c in big if c["moeclip_ratio"] > GOALS["floor"]]
        verdict["floor"] = not over
        confirmed = (f"; {len(screened)} screened above {GOALS['floor']:.2f}x, re-timed with more rounds: "
                     + ", ".join(f"{r(c['moeclip_ratio'])} -> {r(final_ratio(c))}" for c in screened)) if screened else ""
        rows.append(["MoE layer fwd+bwd / floor, T >= 4k", f"<= {GOALS['floor']:.2f}x",
                     f"median {r(statistics.median(final.values()))} over {len(big)} cells, worst {final[id(worst)]:.3f}x "
                     f"({cell(worst)}){confirmed}",
                     "met" if not over else f"missed in {len(over)} of {len(big)} cells (by up to "
                     f"{100 * (final[id(worst)] / GOALS['floor'] - 1):.1f}%)"])
        ds = [c for c in layer["grid"] if "deepspeed_over_moeclip" in c]
        bal = statistics.median(c["deepspeed_over_moeclip"] for c in ds)
        mean_sk = [c["deepspeed_over_moeclip"] for c in layer["skew"] if c["profile"] == "dmu-mean"]
        worst_sk = [c["deepspeed_over_moeclip"] for c in layer["skew"] if c["profile"] == "dmu-worst"]
        parts = [f"balanced routing: median {r(bal)} over {len(ds)} cells"]
        if mean_sk:
            parts.append(f"trained-DMU mean skew (fp32, bf16): {', '.join(f'{v:.3f}x' for v in mean_sk)}")
        if worst_sk:
            parts.append(f"its most skewed layer: {', '.join(f'{v:.3f}x' for v in worst_sk)}")
        met = bal >= GOALS["deepspeed"]
        verdict["deepspeed"] = met
        reached = [c for c in layer["skew"] if c["deepspeed_over_moeclip"] >= GOALS["deepspeed"]]
        rows.append(["speed-up over DeepSpeed dropless MoE, 1 process", f">= {GOALS['deepspeed']:.1f}x", "; ".join(parts),
                     "met" if met else "missed with balanced routing (no layer can beat its floor, and DeepSpeed "
                     "sits near it); " + (f"reached only at {', '.join(c['dtype'] + ' ' + c['profile'] for c in reached)}"
                                          if reached else "not reached at any measured skew") + " (1.2)"])
    if clip:
        fp32 = [c for c in clip["rows"] if c.get("mode", "fp32") == "fp32"]
        worst = min(fp32, key=lambda c: c["moe_of_bound"])
        met = worst["moe_of_bound"] >= GOALS["bound"]
        verdict["bound"] = met
        rows.append(["CLIP-MoE encode throughput / FLOP-bound (fp32)", f">= {GOALS['bound']:.1f}",
                     ", ".join(f"{c['arch']} {c['kind']} {c['moe_of_bound']:.3f}" for c in fp32),
                     "met" if met else f"missed ({worst['arch']} {worst['kind']})"])
    if mcl:
        big = [k for k in mcl["kmeans"] if k["n"] >= 1_000_000]
        if big:
            met = big[0]["seconds"] <= GOALS["kmeans_s"]
            verdict["kmeans"] = met
            rows.append(["k-means, 1M x 512", f"<= {GOALS['kmeans_s']:.0f} s", f"{big[0]['seconds']:.1f} s "
                         f"({big[0]['algorithm']})", "met" if met else "missed"])
        else:
            rows.append(["k-means, 1M x 512", f"<= {GOALS['kmeans_s']:.0f} s", "not run (quick mode)", "–"])
    lines += table(["goal", "target", "measured", "verdict"], rows)
    return lines, verdict


def final_ratio(c: dict) -> float:
    """The confirmation pass's ratio where a cell was re-timed, else the screening ratio."""
    return c["confirm"]["ratio"] if "confirm" in c else c["moeclip_ratio"]


def cell(c: dict) -> str:
    return f"{c['dtype']}, T {c['T']}, d {c['d']}, E {c['E']}, k {c['k']}"


def noise(grid: list[dict]) -> str:
    """Spread of the dense floor between cells that time the identical floor (same dtype, T, d, k; E differs)."""
    groups: dict[tuple, list[float]] = {}
    for c in grid:
        groups.setdefault((c["dtype"], c["T"], c["d"], c["k"]), []).append(c["floor_ms"])
    spread = [max(v) / min(v) - 1 for v in groups.values() if len(v) > 1]
    return f"up to {100 * max(spread):.0f}% (median {100 * statistics.median(spread):.0f}%)" if spread else "far"


def layer_section(layer: dict) -> list[str]:
    L = ["## 1. MoE layer", "",
         "One `MoEFFN` (FFN 4d, GELU, experts = perturbed copies of one dense FFN) on T tokens, forward and "
         "forward+backward (a fixed upstream gradient; gradients of the input and all weights). **Floor** = k x "
         "(one dense FFN of the same shape on the same T tokens): the compute top-k routing cannot avoid. ms are "
         "CPU time of the best round; ratios are best round over best round (the median of same-round ratios "
         "is in the raw results as `*_paired`). "
         "*fwd* is the forward of the fwd+bwd step (autograd recording). Variants share weights and routing:",
         "",
         "- **moeclip**: `MoEFFN`, `sorted_dispatch` (sort (token, slot) pairs by expert, one matmul per "
         "expert on a contiguous slice, inverse permutation, k-term weighted sum);",
         "- **loop**: `MoEFFN`, `loop_dispatch` (per-expert `torch.where` + gather + `index_add_`: the "
         "published CLIP-MoE code's style);",
         "- **DeepSpeed**: `deepspeed.moe.layer.MoE` on one process (1-rank gloo group, ep_size 1), "
         "`drop_tokens=False` (capacity = the busiest expert's count: dropless), its own gate with the same "
         "gate weights, `top2_2nd_expert_sampling=False`, `use_rts=False`, `min_capacity=0`.",
         "",
         "Routing here is *balanced* (random router, std 0.02; the busiest expert gets max-load x E ~ 1.0 of "
         "an even share); section 1.2 uses the trained model's skew. For k = 1 DeepSpeed's gate multiplies "
         "each output by the gate probability (Switch style) where moeclip's top-1 weight is exactly 1 "
         "(DMU's definition), so k = 1 outputs differ by that factor; timings are comparable. For k = 2 "
         "outputs agree to fp32 rounding (bf16: < 1% of the largest output).", ""]
    rows = []
    for c in layer["grid"]:
        rows.append([c["dtype"], f"{c['T']:,}", str(c["d"]), str(c["E"]), str(c["k"]),
                     f(c["floor_fwd_ms"]), f(c["floor_ms"]),
                     f"{f(c['moeclip_fwd_ms'])} ({r(c['moeclip_fwd_ratio'])})", f"{f(c['moeclip_ms'])} (**{r(c['moeclip_ratio'])}**)",
                     f"{f(c.get('loop_ms'))} ({r(c.get('loop_ratio'))})" if "loop_ms" in c else "–",
                     f"{f(c.get('deepspeed_ms'))} ({r(c.get('deepspeed_ratio'))})" if "deepspeed_ms" in c else "–",
                     r(c.get("deepspeed_over_moeclip")),
                     f"{r(c['confirm']['ratio'])} ({c['confirm']['rounds']} rounds)" if "confirm" in c else ""])
    L += ["### 1.1 The grid", ""]
    L += table(["dtype", "T", "d", "E", "k", "floor fwd ms", "floor fwd+bwd ms", "moeclip fwd ms (/floor)",
                "moeclip fwd+bwd ms (/floor)", "loop fwd+bwd (/floor)", "DeepSpeed fwd+bwd (/floor)",
                "DeepSpeed / moeclip", "re-timed moeclip / floor"], rows)
    skipped = "" if layer.get("quick") else (
        " Budget: every variant runs on every 1k cell and every E 4 cell at 4k; E 8 at 4k runs without the "
        "loop baseline; 16k runs E 4, k 2 against the floor only (one 16k fwd+bwd in fp32 at d 768 is ~13 s "
        "of this machine). The whole grid with every variant is ~40 minutes (`python bench/moe_layer.py "
        "--full-grid --out X.json`), over the suite's 15-minute budget. Rounds: 3 at 4k (+1 warm-up), 2 "
        "elsewhere.")
    big = [c for c in layer["grid"] if c["T"] >= 4096]
    small = [c for c in layer["grid"] if c["T"] < 4096]
    L += ["", f"Screening rounds, moeclip / floor, fwd+bwd: T >= 4k median {r(statistics.median(c['moeclip_ratio'] for c in big))} "
          f"(range {r(min(c['moeclip_ratio'] for c in big))}-{r(max(c['moeclip_ratio'] for c in big))}); "
          f"T = 1k median {r(statistics.median(c['moeclip_ratio'] for c in small))} "
          f"(range {r(min(c['moeclip_ratio'] for c in small))}-{r(max(c['moeclip_ratio'] for c in small))}). "
          f"Loop / floor at T >= 4k: median {r(statistics.median(c['loop_ratio'] for c in big if 'loop_ratio' in c))}."
          + skipped, ""]
    screened = [c for c in big if "confirm" in c]
    info = layer.get("confirm_info", {})
    if screened:
        L += [f"**Re-timing.** Each cell is screened with 2-3 rounds; on this shared machine that is not enough "
              f"for a 10% threshold (the identical dense floor measures {noise(layer['grid'])} apart in neighbouring "
              f"cells of one run). Every cell at T >= 4k above {GOALS['floor']:.2f}x was therefore re-timed, floor "
              "against moeclip only, with 8 rounds (6 at 16k): last column"
              + (f" ({info['seconds']:.0f} s, load {', '.join(map(str, info['load_before']))}; run separately after "
                 f"the suite as `{info['command']}`, which the suite now does inline)" if info.get("separate_run")
                 else f" ({info.get('seconds', 0):.0f} s)")
              + ". " + "; ".join(f"{cell(c)}: {r(c['moeclip_ratio'])} -> {c['confirm']['ratio']:.3f}x (median of "
                                 f"same-round ratios {c['confirm']['ratio_paired']:.3f}x)" for c in screened)
              + ".", ""]
    over = [c for c in big if final_ratio(c) > GOALS["floor"]]
    if over:
        def why(c: dict) -> str:
            paired = c.get("confirm", {}).get("ratio_paired")
            if paired is not None and paired <= GOALS["floor"]:
                return (f" (its same-round median is {paired:.3f}x: inside this machine's noise, but best-over-best "
                        "is the declared statistic, so it counts as a miss)")
            return " (the same-round median agrees: a real miss)"
        L += [f"Cells at T >= 4k above {GOALS['floor']:.2f}x after re-timing: "
              + "; ".join(f"{cell(c)}: {final_ratio(c):.3f}x{why(c)}" for c in over)
              + ". What sits above the floor: 1.3 and 1.4.", ""]
    bf = [final_ratio(c) for c in big if c["dtype"] == "bf16"]
    fp = [final_ratio(c) for c in big if c["dtype"] == "fp32"]
    if bf and fp:
        L += [f"At T >= 4k the median is {r(statistics.median(fp))} in fp32 and {r(statistics.median(bf))} in bf16: "
              "bf16 matmuls are ~2.5x faster here while the dispatch (gathers, permutation, combine, router in "
              "fp32) is memory-bound and barely faster, so the same overhead is a larger share (1.3).", ""]

    # skew
    prof = layer["dmu_routing"]
    L += ["### 1.2 Routing skew: where DeepSpeed's dropless layer pays", "",
          "A dropless DeepSpeed layer sizes every expert's buffer to the busiest expert (capacity = max count) "
          "and runs every expert on its full buffer, padding included: it computes max-load x E times the rows "
          "that are routed. moeclip computes exactly the routed rows whatever the skew. The trained DMU model "
          f"routes unevenly; its per-layer loads ({prof['source']}):", ""]
    if prof["layers"]:
        L += table(["tower", "block", "expert loads (fraction of routed slots)", "max-load x E"],
                   [[x["tower"], str(x["block"]), ", ".join(f"{v:.3f}" for v in x["loads"]), f"{x['max_load_x_E']:.2f}"]
                    for x in prof["layers"]])
        L += [""]
    L += [f"Profiles used below (loads sorted high to low): *dmu-mean* = the mean over layers "
          f"{prof['profiles']['dmu-mean']}, *dmu-worst* = its most skewed layer {prof['profiles']['dmu-worst']}; "
          "tokens are routed to match them (a fitted per-expert router bias). T 4,096, d 512, E 4, k 2:", ""]
    grid_bal = {c["dtype"]: c for c in layer["grid"] if (c["T"], c["d"], c["E"], c["k"]) == (4096, 512, 4, 2)
                and "deepspeed_ms" in c}
    srows = []
    for c in sorted(list(grid_bal.values()) + layer["skew"], key=lambda c: (c["dtype"], c["max_load_x_E"])):
        srows.append([c["dtype"], c["profile"], f"{c['max_load_x_E']:.2f}", f(c["floor_ms"]),
                      f"{f(c['moeclip_ms'])} ({r(c['moeclip_ratio'])})", f"{f(c['deepspeed_ms'])} ({r(c['deepspeed_ratio'])})",
                      f"**{r(c['deepspeed_over_moeclip'])}**"])
    L += table(["dtype", "routing", "max-load x E (DeepSpeed rows / routed rows)", "floor fwd+bwd ms",
                "moeclip (/floor)", "DeepSpeed (/floor)", "DeepSpeed / moeclip"], srows)
    worst_rows = [c for c in layer["skew"] if c["profile"] == "dmu-worst"]
    mean_rows = [c for c in layer["skew"] if c["profile"] == "dmu-mean"]
    ds_cells = [c for c in layer["grid"] if "deepspeed_ratio" in c]
    reach = [c for c in layer["skew"] if c["deepspeed_over_moeclip"] >= GOALS["deepspeed"]]
    L += ["", "So the speed-up over DeepSpeed's dropless layer is set by the routing, not by the dispatch. With "
          f"balanced routing both sit near the floor (DeepSpeed / floor: median "
          f"{r(statistics.median(c['deepspeed_ratio'] for c in ds_cells))} over the {len(ds_cells)} grid cells "
          "that run it), so moeclip cannot be 1.8x faster there: no layer can be faster than its floor. With "
          "skew, DeepSpeed's time follows max-load x E"
          + (f" (dmu-mean: {', '.join(r(c['deepspeed_over_moeclip']) for c in mean_rows)}" if mean_rows else "")
          + (f"; dmu-worst: {', '.join(r(c['deepspeed_over_moeclip']) for c in worst_rows)})" if worst_rows else ")")
          + (f". The {GOALS['deepspeed']:.1f}x goal is reached only at "
             + ", ".join(f"{c['dtype']} {c['profile']}" for c in reach) + "." if reach else
             f". The {GOALS['deepspeed']:.1f}x goal is not reached at any routing measured here.")
          + " The rest of the gap is not moeclip's to close: it is how much DeepSpeed pads.", ""]

    # overhead
    L += ["### 1.3 What sits above the floor", "",
          "T 4,096, d 512, E 4, k 2, balanced routing, fwd+bwd. *router+dispatch* runs the router and the "
          "dispatch with trivial experts (a per-channel scale), so it is everything the MoE adds except the "
          "expert matmuls; the layer's excess over the floor also includes running 4 smaller matmuls and "
          "4 experts' weight gradients instead of 1. The *floor* and *moeclip layer* rows are this table's own "
          "4 rounds, for scale (the grid and its re-timing are the numbers for the goal).", ""]
    L += table(["dtype", "part", "ms", "share of floor"],
               [[o["dtype"], o["part"], f(o["ms"], 2), f"{100 * o['share_of_floor']:.2f}%"] for o in layer["overhead"]])
    if "profile" in layer:
        L += ["", "torch.profiler, one fwd+bwd, bf16, T 4,096, dmu-mean skew: self CPU time of the top ops "
              "(DeepSpeed's extra `mm`/`addmm` time is the padded rows; its `index_select`/`scatter` and "
              "fp32 `mul`/`sum` are the dispatch and combine of the padded buffer).", ""]
        prows = []
        tops = layer["profile"]
        for i in range(8):
            row = []
            for name in ("moeclip", "deepspeed"):
                t = tops[name]["top"]
                row += [t[i]["op"], f(t[i]["self_ms"])] if i < len(t) else ["", ""]
            prows.append(row)
        L += table(["moeclip op", "self ms", "DeepSpeed op", "self ms"], prows)
        L += ["", f"Total self CPU: moeclip {f(tops['moeclip']['total_ms'])} ms, DeepSpeed "
              f"{f(tops['deepspeed']['total_ms'])} ms.", ""]

    # ideas
    L += ["### 1.4 Ideas tried (measured here)", ""]
    if layer.get("grouped_mm"):
        L += ["`torch.nn.functional.grouped_mm` (this torch has a CPU kernel): one `c_fc` of 4 experts over the "
              "8,192 sorted rows of 4k tokens top-2, forward:", ""]
        L += table(["dtype", "variant", "ms", "vs per-expert F.linear"],
                   [[g["dtype"], g.get("variant", g.get("note", "")), f(g.get("ms")), r(g.get("vs_loop"))]
                    for g in layer["grouped_mm"]])
        stacked = {g["dtype"]: g["vs_loop"] for g in layer["grouped_mm"] if g.get("variant") == "stack + grouped_mm"}
        L += ["", "With the weights already in one [E, d, 4d] tensor grouped_mm is faster, but moeclip's experts are "
              "separate `nn.Linear` modules (their parameter names are the checkpoint format and what DeepSpeed "
              "shards), so the layer would have to stack them every forward and split the weight gradients back "
              "every backward: the *stack + grouped_mm* row ("
              + ", ".join(f"{k} {r(v)}" for k, v in stacked.items())
              + " of the per-expert matmuls, before the backward's split and per-row biases, which grouped_mm "
              "does not take). Not adopted; it would matter on a GPU, where it also removes the host sync.", ""]
    amp = layer["autocast"]
    L += ["- **Host sync** `bincount().tolist()`: "
          + ", ".join(f"{o['dtype']} {o['ms'] * 1000:.0f} µs" for o in layer["overhead"] if "host sync" in o["part"])
          + " per layer on CPU (no device to wait for): nothing to win here. On a GPU it is a real stall; "
          "removing it needs a device-side grouped GEMM (`grouped_mm` with stacked expert weights), which "
          "changes the experts' parameter layout and checkpoint names: not done.",
          "- **Fused router + sort**: the router alone is "
          + ", ".join(f"{o['dtype']} {100 * o['share_of_floor']:.1f}%" for o in layer["overhead"] if o["part"] == "router")
          + " of the floor, and argsort/bincount a fraction of that: the most fusing them could win. Not worth "
          "a custom kernel. (The fp32 router converts the bf16 tokens to fp32 first; a bf16 matmul with fp32 "
          "accumulation would save part of it, but `router.py` is outside this change.)",
          "- **torch.compile** (`torch.compile(MoEFFN)`, default mode, bf16, 4k, d 512, E 4, k 2, fwd+bwd): "
          "68 s to compile, then 611 ms against 620 ms eager (floor 2 x 277 ms eager, 2 x 285 compiled): no "
          "gain, because >90% of the time is in oneDNN matmuls that compile does not change, and the "
          "data-dependent split sizes force a graph break at `.tolist()`. Measured during development "
          "(not re-run by the suite: the compile alone is 68 s).",
          "- **bf16 autocast** (kept, the change in `moeclip/moe/dispatch.py`): before, `sorted_dispatch` "
          "gathered the k copies of each token in fp32, cast every expert output back to fp32, and autocast "
          "cast them to bf16 again for the combine; top-1 returned fp32 while top-2 returned bf16. Now the T "
          "token rows are cast once before the gather, expert outputs stay in the compute dtype, and both "
          "dispatchers return the compute dtype for every k (like a dense FFN under autocast). fp32 "
          "weights under `torch.autocast(bfloat16)`, T 4,096, d 512, fwd+bwd:", ""]
    L += table(["E", "k", "floor ms", "before: v0 (/floor)", "after: moeclip (/floor)", "before / after"],
               [[str(c["E"]), str(c["k"]), f(c["floor_ms"]), f"{f(c['moeclip_v0_ms'])} ({r(c['moeclip_v0_ratio'])})",
                 f"{f(c['moeclip_ms'])} ({r(c['moeclip_ratio'])})", r(c["v0_over_moeclip"])] for c in amp])
    L += ["", "The floor under autocast casts one FFN's fp32 weights to bf16 per forward; the MoE casts E "
          "experts' weights (and converts E weight gradients back), which is part of what remains above the "
          "floor here and grows with E.", ""]
    return L


def ep_section(ep: dict) -> list[str]:
    L = ["## 2. Expert parallelism: EP=2 over 2 processes vs EP=1", "",
         "torchrun, 2 processes, gloo, 1 torch thread each; one MoE layer (E 4, k 2, fp32, FFN 4d), every rank "
         "with the same weights and its half of the same global tokens; fwd+bwd. *EP=1 moeclip*: every rank "
         "holds all experts (`MoEFFN`, no communication inside the layer; what data parallelism runs). *EP=1 "
         "DeepSpeed*: moeclip's `MoEFFN` on the expert-parallel backend with ep_size 1 (DeepSpeed's layer, no all-to-all). "
         "*EP=2*: the expert-parallel backend with ep_size 2 (2 experts per rank, 2 all-to-alls forward and 2 "
         "backward). Time = the slower rank's wall clock (barrier before each step), best of "
         f"{ep['rows'][0].get('repeats', '?')} rounds; ratios are best over best; *CPU* = the larger "
         "rank's CPU time. The all-to-all is also timed alone, 4 times, at the buffer size the layer sends.", ""]
    rows = []
    for x in ep["rows"]:
        ms, cpu = x["ms"], x.get("cpu_ms", {})
        rows.append([f"{x['tokens']:,}", str(x["d"]), x["profile"], ", ".join(f"{v:.2f}" for v in x["ep2_rank_share"]),
                     f(ms["EP=1 moeclip MoEFFN"]), f(ms["EP=1 DeepSpeed"]), f(ms["EP=2 DeepSpeed"]),
                     f"**{r(x['ep2_over_ep1_ds'])}**", r(x["ep2_over_ep1_moeclip"]), r(x.get("ep2_over_ep1_ds_cpu")),
                     f"{f(x['all_to_all_x4_ms'])} ({f(x['a2a_MB'])} MB each)",
                     f"{x['ep2_rel_diff']:.1e}", ", ".join(f"{v:,.0f}" for v in x["peak_rss_mb_per_rank"])])
    L += table(["global tokens", "d", "routing", "EP=2 work share per rank", "EP=1 moeclip ms", "EP=1 DeepSpeed ms",
                "EP=2 ms", "EP=2 / EP=1 DeepSpeed", "EP=2 / EP=1 moeclip", "same, CPU time",
                "4 all-to-alls alone ms", "EP=2 vs EP=1 output (max rel diff)", "peak RSS per rank MB"], rows)
    ratios = [x["ep2_over_ep1_ds"] for x in ep["rows"]]
    share = [x["all_to_all_x4_ms"] / x["ms"]["EP=2 DeepSpeed"] for x in ep["rows"]]
    skewed = [x for x in ep["rows"] if x["profile"] != "balanced"]
    L += ["", f"EP=2 against EP=1 on the same DeepSpeed layer: {r(min(ratios))}-{r(max(ratios))}; the four "
          f"all-to-alls alone are {100 * min(share):.0f}-{100 * max(share):.0f}% of an EP=2 step. On one machine EP "
          "cannot win time (both ranks share the cores and memory); what it buys is memory, E/2 experts per rank. "
          "With skewed routing the rank holding the busy experts computes more (*work share*) while the other "
          "waits at the all-to-all"
          + (", and DeepSpeed's layer pads every expert to the busiest one in both layouts: against moeclip's "
             "own EP=1 (`MoEFFN`, no padding) the skewed case costs "
             + ", ".join(f"{r(x['ep2_over_ep1_moeclip'])}" for x in skewed) if skewed else "")
          + ". Wall-clock ratios here carry scheduling noise from the other jobs (a preempted rank stalls both at "
          "the next all-to-all; two quick runs of one cell during development gave 1.33x and 0.93x), hence the "
          "CPU-time column.", ""]
    return L


def clip_section(clip: dict) -> list[str]:
    L = ["## 3. CLIP-MoE vs base: encode throughput against the FLOP-bound", "",
         "Random weights (no download); MoE = the dense model upcycled to 4 experts, top-2, in every block "
         "of both towers. Inference (`torch.inference_mode`), 1 thread, CPU time, best round. FLOPs per item "
         "from `FlopCounterMode` (forward; counted with autograd on so attention is seen). FLOP-bound = dense "
         "throughput x dense FLOPs / MoE FLOPs; *MoE / bound* = MoE items/s over it (best rounds). Text batches are 5-20-token captions padded to the context length.", ""]
    rows = []
    for c in clip["rows"]:
        rows.append([c["arch"], c["kind"], c.get("mode", "fp32"), str(c["batch"]),
                     f"{c['flops_dense'] / 1e9:.3f}", f"{c['flops_moe'] / 1e9:.3f}", f"{c['flop_ratio']:.3f}",
                     f(c["dense_per_s"]), f(c["moe_per_s"]), f(c["bound_per_s"]), f"**{c['moe_of_bound']:.2f}**"])
    L += table(["model", "encode", "precision", "batch", "dense GFLOP/item", "MoE GFLOP/item", "FLOP ratio",
                "dense items/s", "MoE items/s", "FLOP-bound items/s", "MoE / bound"], rows)
    L += ["", "Top-2 doubles the FFN FLOPs; attention, embeddings and norms are unchanged, so the MoE costs "
          "~1.65x the dense FLOPs. *MoE / bound* >= 1 means the MoE's several medium matmuls per layer run as "
          "efficiently per FLOP as the dense model's one big one (fewer rows per matmul stay in cache better, "
          "and the count gives no weight to non-matmul work, so a ratio can sit slightly above 1).", ""]
    ac = {(c["arch"], c["kind"]): c for c in clip["rows"] if c.get("mode") == "bf16 autocast"}
    fp = {(c["arch"], c["kind"]): c for c in clip["rows"] if c.get("mode", "fp32") == "fp32"}
    bw = {(c["arch"], c["kind"]): c for c in clip["rows"] if c.get("mode") == "bf16 weights"}
    key = ("ViT-B-32", "image")
    if key in ac and key in fp:
        L += [f"bf16 on this CPU: with bf16 weights ViT-B-32 encodes {bw[key]['dense_per_s'] / fp[key]['dense_per_s']:.1f}x "
              f"(dense) and {bw[key]['moe_per_s'] / fp[key]['moe_per_s']:.1f}x (MoE) faster than fp32, but under "
              f"autocast it is *slower* than fp32 ({ac[key]['dense_per_s']:.1f} vs {fp[key]['dense_per_s']:.1f} images/s "
              "dense), for the dense model as much as for the MoE. A profile (during development, ViT-B-32, 2 images, "
              "autocast) puts 2.4 s of 3.0 s in one `copy_` per block: autocast turns off `nn.MultiheadAttention`'s "
              "fused inference path, and the in-projection on the sequence-first (transposed) input in bf16 goes "
              "through `matmul`'s expand-the-weight-to-[L, d, 3d]-and-`bmm` route. That is torch/open_clip "
              "attention, not the MoE layer (whose autocast cost is in 1.4); for bf16 inference on CPU, cast the "
              "model to bf16 instead of using autocast. (For the same reason the autocast row's *MoE / bound* is "
              "not meaningful: the attention copy is a fixed cost both models pay, not proportional to FLOPs.)", ""]
    return L


def mcl_section(mcl: dict) -> list[str]:
    st = mcl["stages"]
    L = ["## 4. MCL overhead", "", f"### 4.1 Embedding + clustering vs training, per stage ({st['source']})", ""]
    rows = []
    for s in st["stages"]:
        share = s["embed_and_cluster_s"] / (s["embed_and_cluster_s"] + s["train_s"])
        rows.append([str(s["stage"]), f(s["embed_and_cluster_s"]), f(s.get("kmeans_s")),
                     f"{s['train_s']:.1f} ({s['train_steps']} steps x {s['global_batch']})",
                     f"{s['embed_and_cluster_s'] / s['train_s']:.2f}", f"{100 * share:.0f}%"])
    L += table(["stage", "embed + cluster s", "of which k-means (re-timed now) s", "train s",
                "embed+cluster / train", "share of the stage"], rows)
    if st["stages"] and "num_images" in st["stages"][0]:
        s0 = st["stages"][0]
        km = [x["kmeans_s"] / x["embed_and_cluster_s"] for x in st["stages"]]
        tr = [x["train_s"] for x in st["stages"]]
        L += ["", f"Each stage embeds {s0['num_images']:,} images and {s0['num_captions']:,} unique captions "
              f"(dim {s0['dim']}) with the previous stage's model, then runs k-means per modality on them. "
              f"k-means is {100 * min(km):.0f}-{100 * max(km):.0f}% of it; the rest is the embedding pass (image "
              "decode + both towers) and the clustering bookkeeping (accumulation, small-group merging, NMI). "
              f"The same training work took {min(tr):.0f}-{max(tr):.0f} s in different stages: that run shared "
              "the machine too.", ""]
    L += ["### 4.2 k-means as N grows (`moeclip.mcl.cluster.kmeans`, k 3, dim 512)", ""]
    L += table(["N", "algorithm", "time s", "CPU s", "sklearn threads", "features MB", "peak RSS MB"],
               [[f"{k['n']:,}", k["algorithm"], f(k["seconds"]), f(k["cpu_seconds"]),
                 ",".join(map(str, k["sklearn_threads"])), f(k["features_mb"], 0), f(k["peak_rss_mb"], 0)]
                for k in mcl["kmeans"]])
    L += ["", "Full KMeans runs up to 100k rows (3 k-means++ restarts to convergence over all rows); above it "
          "MiniBatchKMeans (batches of 4,096, early stopping), whose time grows far slower than N. A stage "
          "clusters two modalities, so twice the table's time per stage. Peak RSS is about the feature "
          "matrix plus its L2-normalised copy plus sklearn's buffers. Load matters: during development, with the "
          "load average at ~3.5 on these 2 cores and Gaussian instead of uniform noise, the 1M call took 42 s "
          "(40 s CPU); still a third of the 120 s goal.", ""]
    return L


def bf16_section(bf: dict) -> list[str]:
    L = ["## 5. bf16", "",
         f"Autocast runs on `{bf['device']}` here; the code path is device-agnostic (`torch.autocast(device_type)` "
         "in the router and `compute_dtype` in the dispatch read the tensors' device; nothing names one), and "
         "the tests in `tests/moe/test_autocast_dispatch.py` run on every available device. Speed under "
         "autocast: 1.4 above.", "",
         "### 5.1 MoE layer outputs and gradients vs fp32", "",
         "d 512, E 4, FFN 2,048, top-2, T 4,096, experts 5% apart, dmu-mean routing skew. *rel RMS* = RMS "
         "error / RMS of the fp32 value. The dense FFN under autocast is the yardstick of plain bf16 rounding.", ""]
    rows = []
    for x in bf["layer"]:
        rows.append([x["module"], x["mode"], x["out_dtype"], f"{x['output']['max_abs']:.2e}", f"{x['output']['mean_abs']:.2e}",
                     f"{100 * x['output']['rel_rms']:.2f}%", f"{100 * x['input_grad']['rel_rms']:.2f}%",
                     f"{100 * x['expert_weight_grad']['rel_rms']:.2f}%",
                     f"{100 * x['same_experts']:.2f}%" if "same_experts" in x else "–"])
    L += table(["module", "mode", "output dtype", "output max abs err", "output mean abs err", "output rel RMS",
                "input grad rel RMS", "weight grad rel RMS", "tokens with the same experts"], rows)
    same = {x["mode"]: x["same_experts"] for x in bf["layer"] if "same_experts" in x}
    L += ["", f"Under autocast the router still computes in fp32 on the fp32 activations: "
          f"{100 * same.get('autocast bf16', 0):.2f}% of tokens pick the same experts as in fp32, and the MoE's "
          "error is that of a dense FFN under autocast. With bf16 weights the router's weights and inputs are "
          f"bf16-rounded before its fp32 matmul, and near-ties flip ({100 * (1 - same.get('bf16 weights', 1)):.2f}% "
          "of tokens change an expert); the expert weight gradients also accumulate in bf16 there.", "",
          f"### 5.2 Retrieval under autocast ({bf['retrieval']['table']})", ""]
    rows = []
    for name, m in bf["retrieval"]["models"].items():
        for mode in ("fp32", "autocast bf16"):
            x = m[mode]
            fac = ", ".join(f"{k} {100 * v:.1f}" for k, v in x["factors"].items())
            rows.append([name, mode, f"{100 * x['mean_R@1']:.2f}", f"{100 * x['image_to_text_R@1']:.2f}",
                         f"{100 * x['text_to_image_R@1']:.2f}", fac, f(x["seconds"])])
        cos = m["min_cosine_fp32_vs_autocast"]
        rows.append([name, "fp32 vs autocast", f"min cos img {cos['image']:.4f}", f"txt {cos['text']:.4f}", "", "", ""])
    L += table(["model", "precision", "mean R@1", "i→t R@1", "t→i R@1", "per-factor probe accuracy", "eval s"], rows)
    parts = []
    for name, m in bf["retrieval"]["models"].items():
        n = m["fp32"]["num_rows"]
        delta = 100 * (m["autocast bf16"]["mean_R@1"] - m["fp32"]["mean_R@1"])
        parts.append(f"{name.split(' (')[0]} {delta:+.2f} points (~{abs(delta) * n / 100:.0f} of {n:,} rows per direction)")
    L += ["", "Mean R@1 under autocast minus fp32: " + "; ".join(parts) + ". The MoE model moves no more than the "
          "dense one: bf16 costs nothing measurable in retrieval here.", ""]
    return L


def memory_section(mem: dict, ep: dict | None, mcl: dict | None) -> list[str]:
    L = ["## 6. Peak memory", "",
         "Each case in a fresh process: peak RSS (`getrusage` maxrss) after set-up (interpreter, torch, "
         "moeclip, weights, inputs) and after the workload; *workload* = the difference, what the case "
         f"adds at its peak. Layer: T {mem['layer']['T']:,}, d {mem['layer']['d']}, E {mem['layer']['E']}, "
         f"k {mem['layer']['k']}, one fwd+bwd (the dense FFN: one FFN on the same tokens; the MoE runs k = 2 rows per token).", ""]
    L += table(["case", "set-up RSS MB", "peak RSS MB", "workload MB"],
               [[x["case"], f(x["setup_rss_mb"], 0), f(x["peak_rss_mb"], 0), f(x["workload_mb"], 0)] for x in mem["rows"]])
    extra = []
    if mcl:
        extra.append("k-means: " + ", ".join(f"{k['n']:,} rows {k['peak_rss_mb']:,.0f} MB" for k in mcl["kmeans"])
                     + " peak RSS (4.2)")
    if ep:
        extra.append("expert parallel: " + ", ".join(
            f"{x['tokens']:,} tokens d {x['d']} {x['profile']}: " + "/".join(f"{v:,.0f}" for v in x["peak_rss_mb_per_rank"])
            for x in ep["rows"]) + " MB per rank (process high-water marks, cumulative over the section's cases; 2)")
    if extra:
        L += ["", "Recorded by the other sections: " + "; ".join(extra) + ".", ""]
    return L


def write_doc(path: Path, res: dict, runs: list[dict], facts: dict, args: argparse.Namespace, total_s: float,
              started: str) -> None:
    mode = "quick" if args.quick else "full"
    v = facts["versions"]
    L = ["# Benchmarks", "",
         f"Generated by `python bench/run.py{' --quick' if args.quick else ''}` ({mode} mode) on {started}; "
         f"the suite took {total_s / 60:.1f} minutes. Raw results: `runs/bench/{mode}/*.json`. Every number "
         "below was measured by that command on this machine, except where a paragraph says it was measured "
         "during development.", "",
         "## Machine and conditions", "",
         f"- `nproc` {facts['nproc']}; {facts['cpu_model']} ({facts['cores_per_socket']} cores, "
         f"{facts['threads_per_core']} thread per core, {facts['hypervisor']} VM), L2 {facts['l2']}, L3 {facts['l3']}; "
         f"ISA: {', '.join(facts['isa'])}; {facts['mem_gb']} GB RAM.",
         f"- torch {v.get('torch')}, deepspeed {v.get('deepspeed')}, open_clip {v.get('open_clip')}, scikit-learn "
         f"{v.get('sklearn')}, numpy {v.get('numpy')}, Python {v.get('python')}.",
         "- Every timed process uses **1 torch thread** (the two ranks of section 2 one each; k-means uses "
         "sklearn's default threads). The machine was shared with other jobs (training runs, tests) during the "
         "run: load averages below, on 2 cores. Times are process CPU time (does not advance while the process "
         "waits for a core) unless a table says wall; variants are timed round-robin (order rotated every round) "
         "and ratios are best round over best round; single cells still move by +-5% between runs.", ""]
    L += table(["section", "command", "wall s", "load avg before", "load avg after"],
               [[x["section"], f"`{x['command']}`", f(x["seconds"], 0), ", ".join(map(str, x["load_before"])),
                 ", ".join(map(str, x["load_after"]))] for x in runs])
    L += ["", "## Goals", ""]
    glines, _ = goals(res)
    L += glines + [""]
    if res.get("layer"):
        L += layer_section(res["layer"])
    if res.get("ep"):
        L += ep_section(res["ep"])
    if res.get("clip"):
        L += clip_section(res["clip"])
    if res.get("mcl"):
        L += mcl_section(res["mcl"])
    if res.get("bf16"):
        L += bf16_section(res["bf16"])
    if res.get("memory"):
        L += memory_section(res["memory"], res.get("ep"), res.get("mcl"))
    L += ["## Not covered", "",
          "- GPUs: nothing here ran on one (none on this machine); the autocast path is device-agnostic and "
          "tested on every available device, but GPU speed is unmeasured.",
          "- Multi-node expert parallelism, ZeRO stages, and full training steps (optimizer included) are not timed.",
          "- In the full grid, 16k-token cells run moeclip against the floor at E 4, k 2 only, and E 8 at 4k "
          "runs without the loop baseline (budget; `bench/moe_layer.py --full-grid` runs everything).",
          "- torch.compile is a development measurement, not re-run by the suite (68 s compile).", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small subset, < 3 minutes")
    p.add_argument("--only", help=f"comma-separated sections to run ({','.join(SECTIONS)}); the doc uses saved results for the rest")
    p.add_argument("--doc-only", action="store_true", help="rebuild the doc from the saved results, run nothing")
    p.add_argument("--out", help="markdown output (default docs/benchmarks.md, or runs/bench/quick/benchmarks.md with --quick)")
    args = p.parse_args()
    mode = "quick" if args.quick else "full"
    out_dir = REPO / "runs" / "bench" / mode
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = Path(args.out) if args.out else (REPO / "runs" / "bench" / "quick" / "benchmarks.md" if args.quick
                                           else REPO / "docs" / "benchmarks.md")
    chosen = [] if args.doc_only else (args.only.split(",") if args.only else SECTIONS)
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    started = now()
    t0 = time.perf_counter()
    facts = machine_facts()
    runs_path = out_dir / "runs.json"
    previous = {x["section"]: x for x in (read_json(runs_path) if runs_path.exists() else [])}
    for name in SECTIONS:
        if name in chosen:
            previous[name] = run_section(name, args.quick, out_dir)
    runs = [previous[n] for n in SECTIONS if n in previous]
    write_json(runs_path, runs)
    res = {name: load_json(out_dir, name) for name in SECTIONS}
    total = time.perf_counter() - t0
    meta_path = out_dir / "meta.json"
    if args.only or args.doc_only:  # the measurement's date and time are the last full run's
        meta = read_json(meta_path) if meta_path.exists() else {"started": started,
                                                                "seconds": sum(x["seconds"] for x in runs)}
        started, total = meta["started"], meta["seconds"]
    else:
        write_json(meta_path, {"started": started, "seconds": total})
    write_doc(doc, res, runs, facts, args, total, started)
    print(f"wrote {doc.relative_to(REPO) if doc.is_relative_to(REPO) else doc} in {time.perf_counter() - t0:.0f} s "
          f"(load {loadavg()})")
    if any(x["exit"] for x in runs if x["section"] in chosen):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
