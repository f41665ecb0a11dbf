"""transformers LlamaForCausalLM from a small random config (nothing downloaded): batched
greedy generate of 128 new tokens, tokens per second."""

import time

from common import parse, setup, write

BATCH = 8
PROMPT = 32
NEW_TOKENS = 128
RUNS = 3


def build(torch):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device="cuda", dtype=torch.float16).eval()
    return model


def generate(torch, model, ids):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    torch.cuda.synchronize()
    return out


def main():
    args = parse(__doc__)
    torch = setup(args.mode)
    model = build(torch)
    ids = torch.randint(3, 32000, (BATCH, PROMPT), device="cuda")
    generate(torch, model, ids)  # warm-up: kernels, caches, allocator pools
    times = []
    per_run = []
    for _ in range(RUNS):
        start = time.perf_counter()
        out = generate(torch, model, ids)
        times.append(time.perf_counter() - start)
        if args.mode == "kvh":
            import kvhygiene

            s = kvhygiene.stats()
            per_run.append({"counters": s["counters"], "accounting": s["accounting"]})
    new = (out.shape[1] - PROMPT) * BATCH
    best = min(times)
    write(
        args.out,
        {
            "step": "llama_generate",
            "mode": args.mode,
            "batch": BATCH,
            "new_tokens_per_sequence": out.shape[1] - PROMPT,
            "seconds": times,
            "tokens_per_s": new / best,
            "kvh_per_run": per_run,
        },
    )


if __name__ == "__main__":
    main()
