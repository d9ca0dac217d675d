"""What limits the reward model of a finished sandbox demo run: its accuracy beside two references on the very
same held-out comparisons, per category.

    python benchmarks/rm_diagnostics.py runs/seeds/seed0 runs/seeds/seed1 ...   # one line per run, then JSON

For the RM's validation comparisons (training labelers, held-out prompts) and the held-out labelers' comparisons
(the split the RM stage makes, rebuilt from its ``sandbox_comparisons.jsonl``), the pairwise accuracy of

- ``rm``: the trained reward model (its ``results.json``);
- ``gold``: the world's hidden gold judgement used as a reward model: the accuracy a perfect RM would have
  against these labelers' noisy rankings (it depends on which labelers a seed draws and how noisy they are);
- ``sft_logp``: the SFT policy's own log-likelihood of ``response ⊕ EOS``, summed over its tokens: what the model
  the RM starts from already knows about the labelers' preferences without any comparison;

and the labelers' agreement on the RM's samples (``sandbox_agreement.json``), the bar of issue 26. Also the data
the RM saw: comparisons kept, all-tied comparisons dropped, distinct pairs. Every pair is a distinct untied pair
(``Comparison.distinct_pairs``), as the RM stage counts them.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
import yaml

from instructrl.data.loading import encode_prompts, load_comparisons
from instructrl.models.causal_lm import load_causal_lm, load_tokenizer
from instructrl.models.scoring import tokenize_texts
from instructrl.stages.rm import SANDBOX_COMPARISONS, split_comparisons
from instructrl.stages.rm_baselines import completion_logprobs
from instructrl.world import load_world


def diagnose(run: Path) -> dict:
    demo = yaml.safe_load((run / "instructrl_demo.yaml").read_text())
    seed, rm_dir = int(demo["seed"]), run / "rm"
    rm_config = yaml.safe_load((rm_dir / "instructrl_rm.yaml").read_text())
    results = json.loads((rm_dir / "results.json").read_text())
    world = load_world(demo.get("world", "sandbox"), seed)
    tasks = {t.id: t for t in world.tasks("train")}
    comparisons, _ = load_comparisons(str(rm_dir / SANDBOX_COMPARISONS), skip_bad=False, max_k=9)
    _, valid, heldout = split_comparisons(
        comparisons, None, [str(x) for x in rm_config["heldout_labelers"]], rm_config["valid_fraction"], seed
    )
    tokenizer = load_tokenizer(str(run / "sft"))
    policy = load_causal_lm(str(run / "sft"), tokenizer).eval()
    pad = tokenizer.pad_token_id
    out = {
        "seed": seed,
        "data": results["data"]["train"],
        "agreement_on_samples": results.get("labeler_agreement_on_samples"),
    }
    for name, subset in (("valid", valid), ("heldout", heldout)):
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        prompts = encode_prompts(tokenizer, [c.prompt for c in subset])
        for comparison, prompt in zip(subset, prompts):
            task = tasks[comparison.meta["id"]]
            gold = [world.gold_score(task, r) for r in comparison.responses]
            responses = tokenize_texts(tokenizer, list(comparison.responses))
            completions = [prompt + r + [tokenizer.eos_token_id] for r in responses]
            logp = completion_logprobs(policy, completions, [len(prompt)] * len(completions), pad, 16).tolist()
            for w, lo in comparison.distinct_pairs()[1]:
                for key in (comparison.meta.get("category", "?"), "all"):
                    c = counts[key]
                    c["pairs"] += 1
                    c["gold"] += gold[w] > gold[lo]
                    c["sft_logp"] += logp[w] > logp[lo]
        out[name] = {
            key: {"pairs": c["pairs"], "gold": c["gold"] / c["pairs"], "sft_logp": c["sft_logp"] / c["pairs"]}
            for key, c in sorted(counts.items(), key=lambda kv: -kv[1]["pairs"])
        }
        out[name]["all"]["rm"] = results[name]["accuracy"]
        out[name]["all"]["rm_stderr"] = results[name].get("accuracy_stderr")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    ns = parser.parse_args()
    torch.set_num_threads(1)
    report = [diagnose(run) for run in ns.runs]
    for r in report:
        v, h, a = r["valid"]["all"], r["heldout"]["all"], r["agreement_on_samples"] or {}
        print(
            f"seed {r['seed']}: agreement {100 * a.get('mean', float('nan')):.1f} | "
            f"valid rm {100 * v['rm']:.1f} gold {100 * v['gold']:.1f} sft_logp {100 * v['sft_logp']:.1f} | "
            f"heldout rm {100 * h['rm']:.1f} gold {100 * h['gold']:.1f} sft_logp {100 * h['sft_logp']:.1f} | "
            f"train comparisons {r['data']['comparisons']} (all tied {r['data']['all_tied']}), "
            f"pairs {r['data']['pairs']}"
        )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
