"""Talk to a trained model in the terminal, streaming tokens as they come.

    python -m launch.chat_cli                         # the newest stage's model; `clear` starts over, `quit` leaves
    python -m launch.chat_cli -i base -p "Why is the sky blue?"    # one answer, then exit

Loads the latest checkpoint of the stage (`-i`; default: the furthest stage present, rl, sft, mid
or base; `-g` picks a run, `-s` a step). Each turn is rendered as nanochat does:
<|user_start|>text<|user_end|><|assistant_start|>, and the reply streams until <|assistant_end|>
(added if the model stops without it). New tokens are capped to what fits the context. When the
conversation outgrows it, the oldest turns are dropped or the conversation starts over, as the
user chooses (`--on-overflow` decides without asking). Calculator calls run through the tool.
"""
import argparse
import sys

from nanochat_jax.checkpoint import STAGES
from nanochat_jax.engine import Engine
from nanochat_jax.loading import load_model, newest_stage
from nanochat_jax.serving.text import StreamingDecoder


def reply(engine, tokenizer, prompt: list[int], max_tokens: int, args) -> list[int]:
    """Stream one assistant reply to stdout; the reply's tokens, ending with <|assistant_end|>."""
    end, bos = tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_id
    decoder, generated = StreamingDecoder(tokenizer), []
    for column, _ in engine.generate(prompt, num_samples=1, max_tokens=max_tokens,
                                     temperature=args.temperature, top_k=args.top_k, seed=args.seed):
        token = column[0]
        generated.append(token)
        if token in (end, bos):
            break
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()
    print(decoder.flush())
    if generated and generated[-1] in (end, bos):
        generated.pop()
    return generated + [end]


def make_room(turns: list[list[int]], turn: list[int], min_room: int, context: int, choice: str) -> list[list[int]]:
    """The earlier turns to keep so that <|bos|> + them + `turn` leaves `min_room` tokens:
    all of them, the newest that fit (choice 'drop') or none ('clear')."""
    if choice == "clear":
        return []
    kept = list(turns)
    while kept and 1 + sum(map(len, kept)) + len(turn) + min_room > context:
        kept.pop(0)
    return kept


def ask_overflow(used: int, context: int) -> str | None:
    """Ask the user what to do with a conversation that no longer fits; None to quit."""
    while True:
        try:
            answer = input(f"(the conversation is {used} tokens and the model's context is {context}: "
                           "[d]rop the oldest turns, [s]tart over, or [q]uit?) ").strip().lower()
        except EOFError:
            return None
        if answer[:1] in ("d", "s", "q"):
            return {"d": "drop", "s": "clear", "q": None}[answer[:1]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--source", default=None, choices=STAGES, help="default: the newest stage present")
    parser.add_argument("-g", "--tag", default=None, help="run tag (default: the most recent of the stage)")
    parser.add_argument("-s", "--step", type=int, default=None)
    parser.add_argument("-t", "--temperature", type=float, default=0.6)
    parser.add_argument("-k", "--top-k", type=int, default=50)
    parser.add_argument("-m", "--max-tokens", type=int, default=256, help="per reply, at most what fits the context")
    parser.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    parser.add_argument("--on-overflow", choices=("ask", "drop", "clear"), default="ask",
                        help="when the conversation outgrows the context")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if args.temperature < 0 or args.top_k < 1 or args.max_tokens < 1:
        parser.error("need --temperature >= 0, --top-k >= 1 and --max-tokens >= 1")
    try:
        source = args.source or newest_stage()
        loaded = load_model(source, args.step, tag=args.tag)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    tok, context = loaded.tokenizer, loaded.model_cfg.sequence_len
    engine = Engine(loaded.graphdef, loaded.params, loaded.model_cfg, tok)
    user_start, user_end = tok.encode_special("<|user_start|>"), tok.encode_special("<|user_end|>")
    assistant_start = tok.encode_special("<|assistant_start|>")
    min_room = min(args.max_tokens, max(1, context // 4))  # a reply shorter than this means the context is full
    print(f"nanochat-jax: {source} model from {loaded.directory} (step {loaded.step}, context {context} tokens). "
          f"Type `clear` to start over, `quit` to leave.", file=sys.stderr)
    turns = []  # earlier exchanges, each user turn + reply
    while True:
        if args.prompt is not None:
            text = args.prompt
        else:
            try:
                text = input("\nUser: ").strip()
            except EOFError:
                break
            if text.lower() in ("quit", "exit"):
                break
            if text.lower() == "clear":
                turns = []
                print("(conversation cleared)")
                continue
            if not text:
                continue
        turn = [user_start, *tok.encode(text), user_end, assistant_start]
        if 1 + len(turn) + min_room > context:
            print(f"(that message is {len(turn)} tokens; with room for a reply it does not fit the model's "
                  f"{context}-token context: shorten it)")
            if args.prompt is not None:
                return 1
            continue
        used = 1 + sum(map(len, turns)) + len(turn)
        if used + min_room > context:
            choice = ask_overflow(used, context) if args.on_overflow == "ask" else args.on_overflow
            if choice is None:
                break
            before, turns = len(turns), make_room(turns, turn, min_room, context, choice)
            print(f"(dropped the {before - len(turns)} oldest of {before} turns)" if choice == "drop"
                  else "(conversation cleared)")
        prompt = [tok.bos_id, *[t for past in turns for t in past], *turn]
        print("\nAssistant: ", end="", flush=True)
        turns.append(turn + reply(engine, tok, prompt, min(args.max_tokens, context - len(prompt)), args))
        if args.prompt is not None:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
