# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Needle in a haystack
#
# Does a real model find one fact hidden in a long prompt when the ring shards the prompt over its
# ranks, as it does unsharded, and does it answer with the unsharded model's very tokens?
#
# * **Haystack**: Python's language reference (`pydoc_data.topics`, shipped with CPython): real, varied
#   prose in a fixed order. **Needle**: "The secret passphrase for the vault is 'amber-falcon-7391'.",
#   its value drawn per case from `seed`, at the sentence boundary nearest each depth. The question comes
#   last; all of it is one user message through the model's chat template, `lengths` counted in its tokens.
# * **Answers**: greedy, up to `max_new_tokens`, stopping at the end-of-turn token, from FMS unsharded in
#   one process (`single`, the reference), fmsring's ring at each of `world_sizes` (`torchrun`), and
#   HF transformers (`hf`). Each case is one row of `needle.csv`: the answer, whether it holds the
#   needle, whether its tokens are the unsharded model's, the first token's largest logit difference to
#   it, the prefill time.
# * **Faults**: a launch that fails, or finishes no case for `timeout_s`, is killed and its cases get
#   `error`/`oom`/`timeout` rows; run the notebook again with the same parameters to retry only those.
# * Headless: `make needle` (CPU, the demo model SmolLM2-135M-Instruct), or on GPUs
#   `papermill notebooks/needle.ipynb out.ipynb -p model_path /ckpt/Llama-3.1-8B-Instruct -p device cuda
#   -p dtype bfloat16 -y "lengths: [8K, 32K, 128K]" -y "world_sizes: [2, 4]"`.
#
# The parameters are `fmsring.harness.needle.NeedleConfig`'s fields, with its defaults: a grid that
# finishes in under 10 minutes on 2 CPU cores (FMS unsharded and the ring at 2 ranks, 6 cases each).

# %% tags=["parameters"]
model_path: str = ''  # HF llama checkpoint with a chat template; empty: the demo model (make model)
lengths: list = [1024, 4096]  # prompt tokens (template and question included), 8K reads as 8192; each plus max_new_tokens within the model's context
depths: list = [0, 50, 100]  # needle depth, percent of the haystack (0: first, 100: just before the question)
strategies: list = ['single', 'ring']  # among single (FMS unsharded, the reference), ring, hf (HF transformers)
world_sizes: list = [2]  # ring's ranks (GPUs, or CPU processes)
device: str = 'cpu'  # cpu (gloo) or cuda (nccl)
dtype: str = 'float32'  # float32, bfloat16 or float16
max_new_tokens: int = 32  # the answer's budget; it stops earlier at the end-of-turn token
seed: int = 0  # draws each case's needle value
ring_kwargs: dict = {}  # ring_* options of fmsring.get_model, e.g. {"ring_layout": "contiguous"}
timeout_s: float = 900.0  # a launch that finishes no case for this long is killed
out_dir: str = 'runs/local'  # folder of run folders (runs/local is git-ignored)
name: str = ''  # run folder under out_dir; empty: needle-<device>-<checkpoint folder name>

# %%
# %matplotlib inline
from IPython.display import display

from fmsring.harness import needle_plots
from fmsring.harness.needle import NeedleConfig, run_needle
from fmsring.harness.sweep import repo_root

cfg = NeedleConfig(**{n: globals()[n] for n in NeedleConfig.names()})
run_dir = run_needle(cfg, repo_root())
print("run folder:", run_dir)

# %% [markdown]
# ## What came back
# Per strategy: needles found, answers identical (tokens) to FMS unsharded, the first token's largest logit
# difference to it; then every case's answer.

# %%
df = needle_plots.load(run_dir)
display(needle_plots.summary(df))
display(df[["panel", "length", "prompt_tokens", "depth", "needle", "answer", "retrieved", "identical_tokens",
            "logits_max_abs_diff", "prefill_s", "status", "error"]])  # fmt: skip
if not (df["status"] == "ok").any():
    raise RuntimeError(f"no case finished; see {run_dir / 'logs'}")

# %% [markdown]
# ## Figures
# Saved in the run folder's `figures/` as PNG and PDF.

# %%
for fig_name, fig in needle_plots.figures(df, run_dir / "figures").items():
    print(fig_name)
    display(fig)
