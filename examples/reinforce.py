"""REINFORCE with a running-mean baseline on TIR-Math-v0, using only the public env API.

    python examples/reinforce.py --model HuggingFaceTB/SmolLM2-135M-Instruct --episodes 100

Any RL code that speaks Gymnasium plugs in: ``gymnasium.make``, ``reset``, ``step`` and the
per-turn ``reward``; nothing from ``algos``. Each turn is sampled until the closing code fence,
and the episode's return weights the log-probability of every token the model generated.
"""

import argparse

import gymnasium
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tir_envs  # noqa: F401  (registers TIR-Math-v0)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-6)
    args = p.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    env = gymnasium.make("TIR-Math-v0", tokenizer=tok, max_turns=3, max_episode_steps=3)
    baseline, returns = 0.0, []
    for episode in range(args.episodes):
        obs, _ = env.reset(seed=episode)
        ids = tok(obs, return_tensors="pt", add_special_tokens=False).input_ids
        turns, ret, done = [], 0.0, False
        while not done:
            with torch.no_grad():
                out = model.generate(ids, do_sample=True, max_new_tokens=args.max_new_tokens,
                                     stop_strings=["```\n"], tokenizer=tok,
                                     pad_token_id=tok.pad_token_id or tok.eos_token_id)
            turns.append((ids.shape[1], out.shape[1]))
            obs, reward, terminated, truncated, _ = env.step(
                tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
            ret, done = ret + reward, terminated or truncated
            ids = torch.cat([out, tok(obs, return_tensors="pt", add_special_tokens=False)
                             .input_ids], dim=1)
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        picked = logp.gather(1, ids[0, 1:, None]).squeeze(1)
        turn_logp = sum(picked[start - 1 : end - 1].sum() for start, end in turns)
        loss = -(ret - baseline) * turn_logp  # the baseline only lowers the variance
        opt.zero_grad()
        loss.backward()
        opt.step()
        baseline = 0.9 * baseline + 0.1 * ret
        returns.append(ret)
        print(f"episode {episode} turns {len(turns)} return {ret:+.2f} baseline {baseline:+.3f}")
    env.close()
    return model, returns


if __name__ == "__main__":
    main()
