"""A toy GRPO loop through orchestrator/client.py, run as its own process by tests/test_rollouts.py: what a
trainer does, over REST only (this module imports no Django).

Each iteration submits the tasks × samples at the current model version, consumes complete groups, computes
group-normalised advantages from the rewards (masked samples dropped), then publishes the next checkpoint as the
next version. Every rollout consumed is written to ``--out`` with its iteration, the version it was submitted
under and its advantage, for the test to check.

    python -m tests.support.toy_grpo --url http://127.0.0.1:8000 --token KEY --tasks a,b --checkpoints p1,p2 \
        --out rollouts.jsonl [--cut-url http://127.0.0.1:9000]
"""

from __future__ import annotations

import argparse
import json
import statistics

from orchestrator.client import MegaFlow


def advantages(group: list[dict]) -> dict[int, float]:
    rewards = {rollout["episode_id"]: rollout["reward"] for rollout in group if not rollout["mask"]}
    if not rewards:
        return {}
    mean = statistics.fmean(rewards.values())
    spread = statistics.pstdev(rewards.values()) or 1.0
    return {episode: (reward - mean) / spread for episode, reward in rewards.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--cut-url", help="a proxy that cuts the first rollouts stream: iteration 1 reads through it")
    parser.add_argument("--token", required=True)
    parser.add_argument("--model", default="tiny-hf")
    parser.add_argument("--first-version", default="v0")
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--checkpoints", required=True, help="comma-separated: one published after each iteration")
    parser.add_argument("--run-fields", default="{}", help="JSON: more run fields (agent_config, max_steps, ...)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    mf = MegaFlow(args.url, args.token)
    cut = MegaFlow(args.cut_url, args.token) if args.cut_url else mf
    version = args.first_version
    with open(args.out, "w") as out:
        for iteration, checkpoint in enumerate(args.checkpoints.split(",")):
            run = mf.create_run(
                dataset="swe_mini", instance_ids=args.tasks.split(","), samples_per_task=args.samples,
                model_name=args.model, model_version=version, name=f"grpo {iteration}", **json.loads(args.run_fields),
            )  # fmt: skip
            reader = cut if iteration == 1 else mf
            for group in reader.groups(run["id"], deadline_s=600):
                scores = advantages(group)
                for rollout in group:
                    extra = {"iteration": iteration, "submitted_version": version,
                             "advantage": scores.get(rollout["episode_id"])}  # fmt: skip
                    out.write(json.dumps({**rollout, **extra}) + "\n")
            out.flush()
            version = f"v{iteration + 1}"
            published = mf.publish_version(args.model, version, checkpoint)
            print(f"iteration {iteration}: run {run['id']} consumed; published {published['version']}", flush=True)


if __name__ == "__main__":
    main()
