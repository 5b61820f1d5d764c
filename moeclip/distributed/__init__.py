"""Multi-process training on DeepSpeed: expert parallelism for MoE layers (`expert_parallel`), the
training loop's DeepSpeed backend (`engine`), and the names its checkpoints use, which
`moeclip.consolidate` reads without importing DeepSpeed.

Nothing here imports DeepSpeed at module import time: single-process users never pay for it.
"""

DS_DIR = "ds"         # the engine's checkpoint folder inside a loop checkpoint (ckpt/step_N/ds/)
DS_TAG = "state"      # its tag: ckpt/step_N/ds/state/*.pt
CLIENT_KEY = "moeclip"  # our entry in the engine checkpoint's client state (architecture, MoE layout)
ANCHOR = "moeclip_expert_anchor"  # stand-in expert parameter while experts are frozen (engine.py)
